//! Who is calling: bearer tokens on every `/v1/*` route (docs/security.md, README "Tenants and
//! tokens").
//!
//! - The admin token (`AGENTQ_ADMIN_TOKEN`) manages tenants and sees everything; what it creates
//!   belongs to the default tenant.
//! - A tenant token (`agentq_<token id>_<secret>`, made by `POST /v1/admin/tenants/{id}/tokens`)
//!   acts as its tenant: it sees and changes only that tenant's records, and another tenant's id
//!   answers 404 exactly as an id that does not exist.
//! - With `AGENTQ_AUTH=off` every caller is the admin (the open api of a local setup).
//!
//! Secrets are compared as SHA-256 digests in constant time; a token's secret is stored only as
//! its digest. Failed attempts are counted per source address fleet-wide (`<p>:authfail:<ip>`,
//! one minute): past `AGENTQ_AUTH_FAIL_LIMIT` the source gets 429 for the rest of the minute,
//! valid token or not, so a guesser learns nothing from further tries. No token ever reaches a
//! log line, an error message or a metric label.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentq_common::tenant::non_default;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::tenants::{Tenant, TenantCache};
use crate::AppState;

/// What every token starts with: secret scanners (and people) can tell an agentq token.
pub const TOKEN_PREFIX: &str = "agentq_";
/// Bytes of a token id (hex in the token) and of its secret (base64url in the token).
const TOKEN_ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
/// How long a source's failures are counted, and the most sources a replica remembers as
/// blocked (an attacker with many addresses cannot grow it past this).
const FAIL_WINDOW: Duration = Duration::from_secs(60);
const MAX_BLOCKED_SOURCES: usize = 10_000;

/// The caller of a `/v1/*` request, put into the request's extensions by [`layer`].
#[derive(Debug, Clone)]
pub enum Caller {
    /// The admin token, or anyone while auth is off.
    Admin,
    Tenant(Arc<Tenant>),
}

impl Caller {
    /// The tenant whose records this caller creates: `None` for the default tenant.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::Tenant(t) => Some(&t.id),
        }
    }

    pub fn tenant_record(&self) -> Option<&Arc<Tenant>> {
        match self {
            Caller::Admin => None,
            Caller::Tenant(t) => Some(t),
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Admin)
    }

    /// Whether the caller may see a record owned by `owner` (the record's `tenant` field, absent
    /// for the default tenant). The admin sees everything.
    pub fn sees(&self, owner: Option<&str>) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Tenant(t) => non_default(owner) == Some(t.id.as_str()),
        }
    }

    /// 404 unless the caller sees a record of `owner`: another tenant's record answers exactly
    /// like one that does not exist.
    pub fn check(&self, owner: Option<&str>, what: &str) -> Result<(), ApiError> {
        if self.sees(owner) {
            Ok(())
        } else {
            Err(ApiError::not_found(what))
        }
    }

    /// 403 unless the caller is the admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this route needs the admin token",
            ))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match parts.extensions.get::<Caller>() {
            Some(c) => Ok(c.clone()),
            // only the auth layer inserts a caller; without one, auth off means open
            None if !state.config.auth.enabled => Ok(Caller::Admin),
            None => Err(unauthorized("missing bearer token")),
        }
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// A freshly made tenant token: shown to the admin once, stored only as `digest`.
pub struct NewToken {
    pub token_id: String,
    pub token: String,
    pub digest: String,
}

/// A random token id and secret from the OS RNG.
pub fn mint_token() -> anyhow::Result<NewToken> {
    let mut id = [0u8; TOKEN_ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let token_id = hex::encode(id);
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    let digest = digest_hex(secret.as_bytes());
    Ok(NewToken {
        token: format!("{TOKEN_PREFIX}{token_id}_{secret}"),
        token_id,
        digest,
    })
}

fn digest_hex(secret: &[u8]) -> String {
    hex::encode(Sha256::digest(secret))
}

/// `agentq_<16 hex>_<secret>` → (token id, secret). The id is hex, so the first `_` after it
/// ends it even though a base64url secret may hold `_` itself.
fn split_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == TOKEN_ID_BYTES * 2
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        && !secret.is_empty()
        && secret.len() <= 128)
        .then_some((id, secret))
}

/// Equal secrets, in time that depends on neither: both sides are hashed first, so not even
/// the length of the expected one shows.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    Sha256::digest(given)
        .ct_eq(&Sha256::digest(expected))
        .into()
}

fn bearer(req: &Request) -> Option<&str> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Per-replica memory of sources over the failure limit, so a blocked source is refused without
/// a Redis round trip; the fleet-wide count lives in Redis.
#[derive(Default)]
pub struct Blocked(Mutex<HashMap<IpAddr, Instant>>);

impl Blocked {
    fn until(&self, ip: IpAddr) -> Option<Duration> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match m.get(&ip) {
            Some(&t) if t > now => Some(t - now),
            Some(_) => {
                m.remove(&ip);
                None
            }
            None => None,
        }
    }

    fn block(&self, ip: IpAddr, for_: Duration) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if m.len() >= MAX_BLOCKED_SOURCES {
            m.retain(|_, t| *t > now);
        }
        if m.len() < MAX_BLOCKED_SOURCES {
            m.insert(ip, now + for_);
        }
    }
}

/// Shared auth state of one api process.
#[derive(Default, Clone)]
pub struct AuthState {
    pub blocked: Arc<Blocked>,
    pub tenants: TenantCache,
}

fn too_many_failures(path: &str, wait: Duration) -> Response {
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_auth_failures",
        "too many failed authentications from this address; retry later",
    );
    e.retry_after = Some(wait.as_secs().max(1));
    refuse(path, e)
}

/// The OpenAI-compatible routes answer in OpenAI's error shape (the SDKs read `error.type`),
/// every other route in agentq's.
fn refuse(path: &str, e: ApiError) -> Response {
    let openai = ["/v1/chat/", "/v1/models", "/v1/files", "/v1/batches"]
        .iter()
        .any(|p| path.starts_with(p));
    if openai {
        let mut o = crate::openai::OaiError::from(e);
        // a retry with the same credentials cannot succeed sooner than Retry-After says
        o.should_retry = Some(false);
        o.into_response()
    } else {
        e.into_response()
    }
}

/// The middleware: authenticates `/v1/*` (and `/metrics` when it has a token), inserts the
/// [`Caller`], and refuses what does not authenticate.
pub async fn layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let auth = &state.config.auth;
    if path == "/metrics" {
        if let Some(want) = &auth.metrics_token {
            let ok = bearer(&req)
                .is_some_and(|t| same_secret(t.as_bytes(), want.expose_secret().as_bytes()));
            if !ok {
                return refuse(path, unauthorized("/metrics needs its bearer token"));
            }
        }
        return next.run(req).await;
    }
    if !path.starts_with("/v1/") {
        return next.run(req).await;
    }
    if !auth.enabled {
        req.extensions_mut().insert(Caller::Admin);
        return next.run(req).await;
    }
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if let Some(wait) = source.and_then(|ip| state.auth.blocked.until(ip)) {
        return too_many_failures(path, wait);
    }
    let path = path.to_owned();
    let verdict = match bearer(&req) {
        None => Err(AuthFail::Denied("missing bearer token")),
        Some(token) => authenticate(&state, token).await,
    };
    match verdict {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(AuthFail::Store(e)) => refuse(&path, e),
        Err(AuthFail::Denied(why)) => {
            if let Some(ip) = source {
                if let Some(wait) = count_failure(&state, ip).await {
                    return too_many_failures(&path, wait);
                }
            }
            state.metrics.auth_failures.inc();
            refuse(&path, unauthorized(why))
        }
    }
}

enum AuthFail {
    Denied(&'static str),
    Store(ApiError),
}

impl From<&'static str> for AuthFail {
    fn from(s: &'static str) -> Self {
        AuthFail::Denied(s)
    }
}

async fn authenticate(state: &AppState, token: &str) -> Result<Caller, AuthFail> {
    if let Some(admin) = &state.config.auth.admin_token {
        if same_secret(token.as_bytes(), admin.expose_secret().as_bytes()) {
            return Ok(Caller::Admin);
        }
    }
    let (token_id, secret) = split_token(token).ok_or("invalid bearer token")?;
    let record = crate::tenants::token_record(state, token_id)
        .await
        .map_err(AuthFail::Store)?
        .ok_or("invalid bearer token")?;
    // compare digests in constant time: the stored one is already SHA-256 of the secret
    let given = digest_hex(secret.as_bytes());
    if !bool::from(given.as_bytes().ct_eq(record.digest.as_bytes())) {
        return Err("invalid bearer token".into());
    }
    if record
        .expires_at
        .is_some_and(|t| t <= agentq_common::time::now_ms())
    {
        return Err("token expired".into());
    }
    let tenant = state
        .auth
        .tenants
        .get(state, &record.tenant)
        .await
        .map_err(AuthFail::Store)?
        // a token whose tenant was deleted dies with it
        .ok_or("invalid bearer token")?;
    Ok(Caller::Tenant(tenant))
}

/// Counts one failure of `ip` fleet-wide; `Some(wait)` once the source is over the limit.
async fn count_failure(state: &AppState, ip: IpAddr) -> Option<Duration> {
    let key = format!("{}:authfail:{ip}", state.config.common.key_prefix);
    let counted: redis::RedisResult<(u64, i64)> = async {
        let mut conn = state.broker.redis().conn().await?;
        redis::pipe()
            .incr(&key, 1)
            .cmd("EXPIRE")
            .arg(&key)
            .arg(FAIL_WINDOW.as_secs())
            .arg("NX")
            .ignore()
            .ttl(&key)
            .query_async(&mut conn)
            .await
    }
    .await;
    match counted {
        Ok((n, ttl)) if n > u64::from(state.config.auth.fail_limit) => {
            let wait = Duration::from_secs(u64::try_from(ttl).unwrap_or(1).max(1));
            state.auth.blocked.block(ip, wait);
            tracing::warn!(source = %ip, failures = n, "authentication failures over the limit");
            Some(wait)
        }
        Ok(_) => None,
        Err(e) => {
            // counting is protection, not a gate: a Redis hiccup still answers 401
            tracing::debug!(error = %e, "auth failure not counted");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_split_and_compare() {
        let t = mint_token().expect("rng");
        assert!(t.token.starts_with(TOKEN_PREFIX));
        let (id, secret) = split_token(&t.token).expect("own format");
        assert_eq!(id, t.token_id);
        assert_eq!(digest_hex(secret.as_bytes()), t.digest);
        assert!(!t.digest.contains(secret));
        assert!(split_token("agentq_XYZ_abc").is_none());
        assert!(split_token("Bearer x").is_none());
        assert!(split_token(&format!("{TOKEN_PREFIX}0123456789abcdef_")).is_none());
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        let other = mint_token().expect("rng");
        assert_ne!(other.token, t.token);
    }
}
