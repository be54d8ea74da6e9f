//! Tenants and their tokens: the admin routes (`/v1/admin/tenants...`), the records behind
//! them, and the per-process cache the auth layer reads.
//!
//! Keys (global, each read or written with single-key commands only, so they may live on any
//! cluster node; docs/architecture.md):
//! - `<p>:tenant:{<id>}` HASH: `weight`, `quotas` (JSON), `created_at`
//! - `<p>:tenant:{<id>}:tokens` SET: the tenant's token ids
//! - `<p>:tenant:{<id>}:rate` STRING: the enqueue-rate limiter's theoretical arrival time (ms)
//! - `<p>:tenants` SET: tenant ids
//! - `<p>:token:<token id>` HASH: `tenant`, `digest` (SHA-256 of the secret, hex), `created_at`,
//!   `expires_at`; expires with the token
//!
//! A tenant's weight and per-queue caps are also copied into every declared queue's `tenants`
//! hash (the queue's own slot), where the fair fetch reads them: on create and change, and for
//! every tenant when an api starts (a queue declared later gets them then).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentq_common::flow::budget::BudgetBody;
use agentq_common::task::FieldError;
use agentq_common::tenant::{valid_tenant_id, Admission, DEFAULT_TENANT, MAX_WEIGHT};
use agentq_common::time::now_ms;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::deadline;
use crate::AppState;

/// How long a replica trusts its copy of a tenant record: a weight or quota change, or a
/// deleted tenant, reaches every replica within this (the replica that made it at once).
const CACHE_TTL: Duration = Duration::from_secs(2);
/// Longest a token may live when it expires (a year); unset: until revoked.
const MAX_TOKEN_SECS: u64 = 366 * 86_400;
/// Most tasks per second `enqueue_rate` may allow (higher is no limit at all).
const MAX_RATE: f64 = 1_000_000.0;

/// A tenant's quotas; every one optional (absent: no limit).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Most of its tasks waiting in one queue's pending work.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "opt_whole"
    )]
    pub max_pending: Option<u64>,
    /// Most of its runs in flight at once in one queue.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "opt_whole"
    )]
    pub max_running: Option<u64>,
    /// Submissions per second (a task, a chat completion, a workflow or a batch is one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueue_rate: Option<f64>,
    /// Submissions allowed at once above the rate (default: one second's worth, at least 1).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "opt_whole_u32"
    )]
    pub enqueue_burst: Option<u32>,
    /// A spend budget over all the tenant's calls (budget scope `tenant:<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetBody>,
}

/// `3` or `3.0` (JSON Schema's `integer` allows both), or null.
fn opt_whole<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => whole(&v)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("expected a whole number, got {v}"))),
    }
}

fn opt_whole_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    opt_whole(d)?
        .map(|n| u32::try_from(n).map_err(|_| serde::de::Error::custom("too large")))
        .transpose()
}

/// A tenant as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tenant {
    pub id: String,
    pub weight: u32,
    pub quotas: Quotas,
    pub created_at: i64,
}

impl Tenant {
    pub fn admission(&self) -> Admission {
        Admission {
            weight: self.weight,
            max_pending: self.quotas.max_pending,
            max_running: self.quotas.max_running,
        }
    }

    fn from_hash(id: &str, h: &HashMap<String, String>) -> Option<Self> {
        Some(Self {
            id: id.to_owned(),
            weight: h.get("weight")?.parse().ok()?,
            quotas: h
                .get("quotas")
                .and_then(|q| serde_json::from_str(q).ok())
                .unwrap_or_default(),
            created_at: h.get("created_at")?.parse().ok()?,
        })
    }
}

fn tenant_key(state: &AppState, id: &str) -> String {
    format!("{}:tenant:{{{id}}}", state.config.common.key_prefix)
}
fn tokens_key(state: &AppState, id: &str) -> String {
    format!("{}:tenant:{{{id}}}:tokens", state.config.common.key_prefix)
}
pub(crate) fn rate_key(state: &AppState, id: &str) -> String {
    format!("{}:tenant:{{{id}}}:rate", state.config.common.key_prefix)
}
fn tenants_key(state: &AppState) -> String {
    format!("{}:tenants", state.config.common.key_prefix)
}
fn token_key(state: &AppState, token_id: &str) -> String {
    format!("{}:token:{token_id}", state.config.common.key_prefix)
}

/// Tenant records by id, each kept [`CACHE_TTL`]; bounded by the tenant count
/// (`AGENTQ_MAX_TENANTS`) because only ids that exist in Redis are ever cached.
type Cached = HashMap<String, (Instant, Arc<Tenant>)>;

#[derive(Default, Clone)]
pub struct TenantCache(Arc<Mutex<Cached>>);

impl TenantCache {
    pub async fn get(&self, state: &AppState, id: &str) -> Result<Option<Arc<Tenant>>, ApiError> {
        {
            let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, t)) = m.get(id) {
                if at.elapsed() < CACHE_TTL {
                    return Ok(Some(t.clone()));
                }
            }
        }
        let found = load(state, id).await?.map(Arc::new);
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &found {
            Some(t) => {
                m.insert(id.to_owned(), (Instant::now(), t.clone()));
            }
            None => {
                m.remove(id);
            }
        }
        Ok(found)
    }

    fn forget(&self, id: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

async fn load(state: &AppState, id: &str) -> Result<Option<Tenant>, ApiError> {
    let key = tenant_key(state, id);
    let h: HashMap<String, String> = deadline(async {
        let mut conn = state.broker.redis().conn().await?;
        conn.hgetall(key).await
    })
    .await?;
    Ok(Tenant::from_hash(id, &h))
}

/// A token's stored record.
pub struct TokenRecord {
    pub tenant: String,
    pub digest: String,
    pub expires_at: Option<i64>,
}

pub async fn token_record(
    state: &AppState,
    token_id: &str,
) -> Result<Option<TokenRecord>, ApiError> {
    let key = token_key(state, token_id);
    let h: HashMap<String, String> = deadline(async {
        let mut conn = state.broker.redis().conn().await?;
        conn.hgetall(key).await
    })
    .await?;
    Ok(match (h.get("tenant"), h.get("digest")) {
        (Some(t), Some(d)) => Some(TokenRecord {
            tenant: t.clone(),
            digest: d.clone(),
            expires_at: h.get("expires_at").and_then(|v| v.parse().ok()),
        }),
        _ => None,
    })
}

/// The body as `T`, refusing JSON arrays where objects belong (serde would read a struct from an
/// array by position): the body itself, `quotas` and `quotas.budget`.
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let v: serde_json::Value =
        serde_path_to_error::deserialize(de).map_err(crate::routes::body_error)?;
    let object_or_null = |v: Option<&serde_json::Value>, field: &str| match v {
        None | Some(serde_json::Value::Null | serde_json::Value::Object(_)) => Ok(()),
        Some(_) => Err(ApiError::invalid(field, "must be a JSON object")),
    };
    if !v.is_object() {
        return Err(ApiError::invalid("body", "must be a JSON object"));
    }
    object_or_null(v.get("quotas"), "quotas")?;
    object_or_null(
        v.get("quotas").and_then(|q| q.get("budget")),
        "quotas.budget",
    )?;
    serde_path_to_error::deserialize(v).map_err(|e| {
        let field = e.path().to_string();
        ApiError::invalid(
            if field == "." {
                "body".to_owned()
            } else {
                field
            },
            e.inner().to_string(),
        )
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTenant {
    id: Option<String>,
    weight: Option<serde_json::Value>,
    quotas: Option<Quotas>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchTenant {
    weight: Option<serde_json::Value>,
    quotas: Option<Quotas>,
}

/// A JSON whole number (`3` or `3.0`, as JSON Schema's `integer` allows both).
fn whole(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= 9.0e15)
            .map(|f| f as u64)
    })
}

fn check_weight(w: Option<&serde_json::Value>) -> Result<Option<u32>, ApiError> {
    let Some(v) = w.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    whole(v)
        .filter(|n| (1..=u64::from(MAX_WEIGHT)).contains(n))
        .map(|n| Some(n as u32))
        .ok_or_else(|| {
            ApiError::invalid(
                "weight",
                format!("must be a whole number from 1 to {MAX_WEIGHT}"),
            )
        })
}

fn check_quotas(q: &Quotas, id: &str) -> Result<(), ApiError> {
    let positive = |v: Option<u64>, field: &str| match v {
        Some(0) => Err(ApiError::invalid(
            format!("quotas.{field}"),
            "must be at least 1 (leave it out for no limit)",
        )),
        _ => Ok(()),
    };
    positive(q.max_pending, "max_pending")?;
    positive(q.max_running, "max_running")?;
    if let Some(r) = q.enqueue_rate {
        if !r.is_finite() || r <= 0.0 || r > MAX_RATE {
            return Err(ApiError::invalid(
                "quotas.enqueue_rate",
                format!("must be submissions per second above 0 and at most {MAX_RATE}"),
            ));
        }
    }
    match (q.enqueue_burst, q.enqueue_rate) {
        (Some(0), _) => {
            return Err(ApiError::invalid(
                "quotas.enqueue_burst",
                "must be at least 1",
            ))
        }
        (Some(_), None) => {
            return Err(ApiError::invalid(
                "quotas.enqueue_burst",
                "needs quotas.enqueue_rate",
            ))
        }
        _ => {}
    }
    if let Some(b) = &q.budget {
        b.clone()
            .validate(&format!("tenant:{id}"))
            .map_err(|e: FieldError| {
                ApiError::invalid(format!("quotas.budget.{}", e.field), e.message)
            })?;
    }
    Ok(())
}

fn tenant_json(t: &Tenant) -> serde_json::Value {
    json!({"id": t.id, "weight": t.weight, "quotas": t.quotas, "created_at": t.created_at})
}

/// Writes the tenant's weight and caps into every declared queue, and its budget.
async fn apply(state: &AppState, t: &Tenant) -> Result<(), ApiError> {
    for q in &state.config.queues {
        deadline(state.broker.set_admission(q, &t.id, &t.admission())).await?;
    }
    let scope = format!("tenant:{}", t.id);
    match &t.quotas.budget {
        Some(b) => {
            let budget = b
                .clone()
                .validate(&scope)
                .map_err(|e| ApiError::invalid(format!("quotas.budget.{}", e.field), e.message))?;
            deadline(state.budgets.put(&budget))
                .await?
                .map_err(|e| ApiError::invalid(format!("quotas.budget.{}", e.field), e.message))?;
        }
        None => {
            deadline(state.budgets.delete(&scope)).await?;
        }
    }
    state.auth.tenants.forget(&t.id);
    Ok(())
}

/// Copies every tenant's admission settings into every declared queue; run once at start.
pub async fn sync_all(state: &AppState) -> anyhow::Result<usize> {
    let ids: Vec<String> = {
        let mut conn = state.broker.redis().conn().await?;
        conn.smembers(tenants_key(state)).await?
    };
    let mut n = 0;
    for id in ids {
        if let Ok(Some(t)) = load(state, &id).await {
            for q in &state.config.queues {
                state.broker.set_admission(q, &t.id, &t.admission()).await?;
            }
            n += 1;
        }
    }
    Ok(n)
}

fn created(body: serde_json::Value, location: &str) -> Response {
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if !valid_tenant_id(id) {
        return Err(ApiError::not_found("tenant"));
    }
    Ok(())
}

/// `POST /v1/admin/tenants`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let b: CreateTenant = parse_body(&body)?;
    let id = b.id.ok_or_else(|| ApiError::invalid("id", "is required"))?;
    if !valid_tenant_id(&id) {
        return Err(ApiError::invalid(
            "id",
            "must be 1 to 64 of a-z, 0-9, '_' and '-', starting with a letter or digit",
        ));
    }
    if id == DEFAULT_TENANT {
        return Err(ApiError::invalid(
            "id",
            "\"default\" is the tenant of the admin's own records; pick another id",
        ));
    }
    let weight = check_weight(b.weight.as_ref())?.unwrap_or(1);
    let quotas = b.quotas.unwrap_or_default();
    check_quotas(&quotas, &id)?;
    let t = Tenant {
        id: id.clone(),
        weight,
        quotas,
        created_at: now_ms(),
    };
    let quotas_json = serde_json::to_string(&t.quotas).map_err(|_| ApiError::unavailable())?;
    let (tkey, idx) = (tenant_key(&state, &id), tenants_key(&state));
    let max = state.config.auth.max_tenants;
    let made: i64 = deadline(async {
        let mut conn = state.broker.redis().conn().await?;
        // the index is the authority on count and existence: SADD claims the id, and the
        // record is written only by the claimer
        let n: u64 = conn.scard(&idx).await?;
        if n >= max as u64 {
            return Ok(-1);
        }
        let added: i64 = conn.sadd(&idx, &id).await?;
        if added == 0 {
            return Ok(0);
        }
        let _: () = conn
            .hset_multiple(
                &tkey,
                &[
                    ("weight", t.weight.to_string()),
                    ("quotas", quotas_json.clone()),
                    ("created_at", t.created_at.to_string()),
                ],
            )
            .await?;
        Ok(1)
    })
    .await?;
    match made {
        -1 => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "limit_reached",
                format!("at most {max} tenants (AGENTQ_MAX_TENANTS)"),
            )
            .field("id"))
        }
        0 => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("tenant {id:?} exists"),
            )
            .field("id"))
        }
        _ => {}
    }
    apply(&state, &t).await?;
    tracing::info!(tenant = %id, weight, "tenant created");
    Ok(created(tenant_json(&t), &format!("/v1/admin/tenants/{id}")))
}

/// `GET /v1/admin/tenants`.
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let mut ids: Vec<String> = deadline(async {
        let mut conn = state.broker.redis().conn().await?;
        conn.smembers(tenants_key(&state)).await
    })
    .await?;
    ids.sort();
    let mut data = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(t) = load(&state, &id).await? {
            data.push(tenant_json(&t));
        }
    }
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// `GET /v1/admin/tenants/{id}`.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    check_id(&id)?;
    let t = load(&state, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("tenant"))?;
    Ok(Json(tenant_json(&t)).into_response())
}

/// `PATCH /v1/admin/tenants/{id}`: a new weight and/or quotas (quotas replace the old ones).
pub async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    check_id(&id)?;
    let b: PatchTenant = parse_body(&body)?;
    let mut t = load(&state, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("tenant"))?;
    if let Some(w) = check_weight(b.weight.as_ref())? {
        t.weight = w;
    }
    if let Some(q) = b.quotas {
        check_quotas(&q, &id)?;
        t.quotas = q;
    }
    let quotas_json = serde_json::to_string(&t.quotas).map_err(|_| ApiError::unavailable())?;
    let key = tenant_key(&state, &id);
    deadline(async {
        let mut conn = state.broker.redis().conn().await?;
        conn.hset_multiple::<_, _, _, ()>(
            &key,
            &[("weight", t.weight.to_string()), ("quotas", quotas_json)],
        )
        .await
    })
    .await?;
    apply(&state, &t).await?;
    Ok(Json(tenant_json(&t)).into_response())
}

/// `DELETE /v1/admin/tenants/{id}`: the tenant and every token of it. Its tasks, workflows and
/// batches stay (the admin still sees them) and expire as usual.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    check_id(&id)?;
    let (tkey, toks, idx) = (
        tenant_key(&state, &id),
        tokens_key(&state, &id),
        tenants_key(&state),
    );
    let removed: i64 = deadline(async {
        let mut conn = state.broker.redis().conn().await?;
        let token_ids: Vec<String> = conn.smembers(&toks).await?;
        for tid in &token_ids {
            let _: i64 = conn.del(token_key(&state, tid)).await?;
        }
        let _: i64 = conn.del(&[&tkey, &toks, &rate_key(&state, &id)]).await?;
        conn.srem(&idx, &id).await
    })
    .await?;
    if removed == 0 {
        return Err(ApiError::not_found("tenant"));
    }
    for q in &state.config.queues {
        deadline(state.broker.clear_admission(q, &id)).await?;
    }
    deadline(state.budgets.delete(&format!("tenant:{id}"))).await?;
    // its own budgets too: a tenant re-created with this id starts with none
    deadline(state.budgets.delete_tenant_budgets(&id)).await?;
    state.auth.tenants.forget(&id);
    tracing::info!(tenant = %id, "tenant deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    expires_in_secs: Option<serde_json::Value>,
}

/// `POST /v1/admin/tenants/{id}/tokens` → 201 `{"token_id", "token", ...}`: the only time the
/// token is shown.
pub async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    check_id(&id)?;
    let b: CreateToken = if body.iter().all(u8::is_ascii_whitespace) {
        CreateToken {
            expires_in_secs: None,
        }
    } else {
        parse_body(&body)?
    };
    let expires_in = match &b.expires_in_secs {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            whole(v)
                .filter(|n| (1..=MAX_TOKEN_SECS).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "expires_in_secs",
                        format!("must be a whole number of seconds from 1 to {MAX_TOKEN_SECS}"),
                    )
                })?,
        ),
    };
    if load(&state, &id).await?.is_none() {
        return Err(ApiError::not_found("tenant"));
    }
    let minted = crate::auth::mint_token().map_err(|e| {
        tracing::error!(error = %e, "no token minted");
        ApiError::unavailable()
    })?;
    let now = now_ms();
    let expires_at = expires_in.map(|s| now + (s as i64) * 1000);
    let (key, toks) = (token_key(&state, &minted.token_id), tokens_key(&state, &id));
    let max = state.config.auth.max_tokens_per_tenant;
    let ok: bool = deadline(async {
        let mut conn = state.broker.redis().conn().await?;
        // expired tokens leave the set here, so the count is of live ones
        let ids: Vec<String> = conn.smembers(&toks).await?;
        let mut live = 0usize;
        for tid in ids {
            let exists: bool = conn.exists(token_key(&state, &tid)).await?;
            if exists {
                live += 1;
            } else {
                let _: i64 = conn.srem(&toks, &tid).await?;
            }
        }
        if live >= max {
            return Ok(false);
        }
        let mut fields = vec![
            ("tenant", id.clone()),
            ("digest", minted.digest.clone()),
            ("created_at", now.to_string()),
        ];
        if let Some(e) = expires_at {
            fields.push(("expires_at", e.to_string()));
        }
        let _: () = conn.hset_multiple(&key, &fields).await?;
        if let Some(e) = expires_at {
            let _: i64 = redis::cmd("PEXPIREAT")
                .arg(&key)
                .arg(e)
                .query_async(&mut conn)
                .await?;
        }
        let _: i64 = conn.sadd(&toks, &minted.token_id).await?;
        Ok(true)
    })
    .await?;
    if !ok {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "limit_reached",
            format!(
                "at most {max} live tokens per tenant (AGENTQ_MAX_TOKENS_PER_TENANT); revoke one"
            ),
        ));
    }
    tracing::info!(tenant = %id, token_id = %minted.token_id, "token created");
    Ok(created(
        json!({
            "token_id": minted.token_id,
            "token": minted.token,
            "tenant": id,
            "created_at": now,
            "expires_at": expires_at,
        }),
        &format!("/v1/admin/tenants/{id}/tokens/{}", minted.token_id),
    ))
}

/// `GET /v1/admin/tenants/{id}/tokens`: ids and times, never a secret.
pub async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    check_id(&id)?;
    if load(&state, &id).await?.is_none() {
        return Err(ApiError::not_found("tenant"));
    }
    let toks = tokens_key(&state, &id);
    let data: Vec<serde_json::Value> = deadline(async {
        let mut conn = state.broker.redis().conn().await?;
        let mut ids: Vec<String> = conn.smembers(&toks).await?;
        ids.sort();
        let mut out = Vec::new();
        for tid in ids {
            let h: HashMap<String, String> = conn.hgetall(token_key(&state, &tid)).await?;
            if h.is_empty() {
                continue;
            }
            let num = |f: &str| h.get(f).and_then(|v| v.parse::<i64>().ok());
            out.push(json!({
                "token_id": tid,
                "created_at": num("created_at"),
                "expires_at": num("expires_at"),
            }));
        }
        Ok(out)
    })
    .await?;
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// `DELETE /v1/admin/tenants/{id}/tokens/{token_id}`: revoked at once on every replica (tokens
/// are checked against Redis on every request).
pub async fn revoke_token(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, token_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    check_id(&id)?;
    if token_id.len() > 64 || !token_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::not_found("token"));
    }
    let (key, toks) = (token_key(&state, &token_id), tokens_key(&state, &id));
    let gone: bool = deadline(async {
        let mut conn = state.broker.redis().conn().await?;
        let owner: Option<String> = conn.hget(&key, "tenant").await?;
        if owner.as_deref() != Some(id.as_str()) {
            return Ok(false);
        }
        let _: i64 = conn.del(&key).await?;
        let _: i64 = conn.srem(&toks, &token_id).await?;
        Ok(true)
    })
    .await?;
    if !gone {
        return Err(ApiError::not_found("token"));
    }
    tracing::info!(tenant = %id, token_id = %token_id, "token revoked");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A tenant's submission quotas, before anything is written: its spend budget, then its
/// enqueue rate (`max_pending` is checked by the enqueue script itself, atomically).
pub async fn admit(state: &AppState, caller: &Caller) -> Result<(), ApiError> {
    admit_many(state, caller, 1).await
}

/// [`admit`] for `count` submissions at once (`POST /v1/tasks/batch`): the enqueue-rate quota
/// counts each. A count above the tenant's `enqueue_burst` could never be admitted: 422 naming
/// `tasks`, so the client splits the batch instead of retrying it forever.
pub async fn admit_many(state: &AppState, caller: &Caller, count: u32) -> Result<(), ApiError> {
    if let Err(e) = admit_spend(state, caller).await {
        if e.status == StatusCode::TOO_MANY_REQUESTS {
            state
                .metrics
                .quota_refusals
                .with_label_values(&["budget"])
                .inc();
        }
        return Err(e);
    }
    if let Err(e) = admit_submission(state, caller, count).await {
        if e.status == StatusCode::TOO_MANY_REQUESTS {
            state
                .metrics
                .quota_refusals
                .with_label_values(&["enqueue_rate"])
                .inc();
        }
        return Err(e);
    }
    Ok(())
}

/// The enqueue-rate quota (GCRA on `<p>:tenant:{<id>}:rate`, one key, one script): `Ok` when
/// the submission may go ahead, else 429 with `Retry-After`. Nothing else is written when it
/// refuses.
async fn admit_submission(state: &AppState, caller: &Caller, count: u32) -> Result<(), ApiError> {
    let Some(t) = caller.tenant_record() else {
        return Ok(());
    };
    let Some(rate) = t.quotas.enqueue_rate else {
        return Ok(());
    };
    let burst = t
        .quotas
        .enqueue_burst
        .unwrap_or_else(|| (rate.ceil() as u32).max(1));
    if count > burst {
        return Err(ApiError::invalid(
            "tasks",
            format!("{count} tasks are more than the tenant's enqueue_burst quota ({burst}) allows at once; send at most {burst} per request"),
        ));
    }
    let interval_us = (1_000_000.0 / rate).max(1.0) as i64;
    let wait_us: i64 = deadline(async {
        let mut conn = state.broker.redis().conn().await?;
        GCRA.key(rate_key(state, &t.id))
            .arg(agentq_common::time::now_us())
            .arg(interval_us)
            .arg(i64::from(burst))
            .arg(count)
            .invoke_async(&mut conn)
            .await
    })
    .await?;
    if wait_us > 0 {
        return Err(ApiError::over_quota(
            format!("over the tenant's enqueue_rate quota ({rate}/s, burst {burst})"),
            (wait_us as u64).div_ceil(1_000_000),
        ));
    }
    Ok(())
}

static GCRA: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| agentq_common::script::declared(include_str!("tenants/gcra.lua")));

/// The tenant's spend budget, checked before enqueueing: a tenant whose `tenant:<id>` budget
/// has nothing left gets 429 now instead of a task that would fail `budget_exceeded` later.
async fn admit_spend(state: &AppState, caller: &Caller) -> Result<(), ApiError> {
    let Some(t) = caller.tenant_record() else {
        return Ok(());
    };
    if t.quotas.budget.is_none() {
        return Ok(());
    }
    let scope = format!("tenant:{}", t.id);
    let now = now_ms();
    // a call was refused for want of room: refuse submissions until the window frees it (a
    // worst-case reservation can be refused while `remaining` is still above 0)
    if let Some(until) = deadline(state.budgets.refusing(&scope, now)).await? {
        let mut e = ApiError::over_quota(
            "the tenant's budget has no room for another call until its window frees some",
            u64::try_from((until - now).max(1))
                .unwrap_or(1)
                .div_ceil(1000),
        );
        e.code = "budget_exceeded";
        return Err(e);
    }
    let view = deadline(state.budgets.view(&scope, now)).await?;
    if let Some(v) = view {
        if v.remaining_usd <= 0.0 {
            let mut e = ApiError::over_quota(
                format!(
                    "the tenant's budget ({} USD per {}) is spent",
                    v.limit_usd, v.window
                ),
                60,
            );
            e.code = "budget_exceeded";
            return Err(e);
        }
    }
    Ok(())
}
