//! `POST /v1/batches` and the rest of OpenAI's batch endpoints, and the driving of a batch:
//! fan-out (one task per input line on the batch queue, `fanout.lua` chunk by chunk under a
//! cursor), stop (cancel, expiry), cancel pages, and finalization (the output and error files,
//! written from the task records in input order). Whoever drives a batch holds its lease: the
//! POST that created it (in a task of its own), else the loop of any replica, which also resumes
//! the work of a replica that died. Every step is idempotent or fenced, so a redo is safe.
//!
//! Batches are per tenant: `POST /v1/batches` takes only a file of the caller's tenant (another
//! tenant's file id answers as a missing one), counts as one submission against the tenant's
//! quotas (`tenants::admit`), and records the tenant on the batch hash (`tenant`, absent for the
//! default tenant), whence `fanout.lua` copies it onto every task record and the fan-out puts it
//! in every task's payload (`Payload::tenant`, read by the worker for budgets); the output and
//! error files are the tenant's. Another tenant's batch id answers 404 to get and cancel; a
//! tenant's list pages its own index (`batches:tenant:<id>`); the admin sees all.

use std::collections::HashMap;
use std::time::Duration;

use agentq_common::batch::{
    batches_gc_member, parse_batches_gc_member, tenant_batches_index, Fanout, FanoutLine, Finalize,
};
use agentq_common::keys::{self, Keys, TaskId};
use agentq_common::task::{TaskResult, TaskView};
use agentq_common::tenant::non_default;
use agentq_common::time::now_ms;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::files::{self, PURPOSE_BATCH, PURPOSE_OUTPUT};
use super::{dl, now_secs, page_of, query, ListQuery};
use crate::auth::Caller;
use crate::openai::chat;
use crate::openai::OaiError;
use crate::AppState;

/// The only completion window (OpenAI's too).
const WINDOW_SECS: i64 = 86_400;
/// Task records of a batch are kept this long past its window, so the finalizer reads them even
/// when the window closed first.
const KEEP_MARGIN_SECS: i64 = 3_600;
/// A driver's lease; renewed after every step, so only a dead driver's lapses.
const LEASE: Duration = Duration::from_secs(5);
/// A live entry with no record older than this is a POST that died half way: dropped.
const ORPHAN_MS: i64 = 60_000;

/// The statuses a batch ends in.
pub(crate) fn ended(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "expired" | "cancelled")
}

/// A new batch id: `batch_<queue>.<UUID v7 in hex>`; it names the queue its keys live under.
fn new_id(queue: &str) -> String {
    format!("batch_{queue}.{}", uuid::Uuid::now_v7().simple())
}

/// The queue of a batch id as the api makes them, or `None`.
pub(crate) fn parse_id(id: &str) -> Option<String> {
    let (queue, hex) = id.strip_prefix("batch_")?.rsplit_once('.')?;
    keys::validate_queue(queue).ok()?;
    (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| queue.to_owned())
}

fn not_found(id: &str) -> OaiError {
    let shown: String = id.chars().take(80).collect();
    OaiError::new(
        StatusCode::NOT_FOUND,
        format!("No batch found with id '{shown}'."),
    )
    .param("batch_id")
    .code("batch_not_found")
}

/// OpenAI's batch object from the batch's hash.
fn batch_object(h: &HashMap<String, String>) -> Value {
    let time = |k: &str| {
        h.get(k)
            .and_then(|v| v.parse::<i64>().ok())
            .map_or(Value::Null, Value::from)
    };
    let num = |k: &str| {
        h.get(k)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
            .max(0)
    };
    let text = |k: &str| h.get(k).map_or(Value::Null, |v| Value::String(v.clone()));
    let metadata: Value = h
        .get("metadata")
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or(Value::Null);
    json!({
        "id": text("id"),
        "object": "batch",
        "endpoint": text("endpoint"),
        "errors": null,
        "input_file_id": text("input_file_id"),
        "completion_window": text("completion_window"),
        "status": text("status"),
        "output_file_id": text("output_file_id"),
        "error_file_id": text("error_file_id"),
        "created_at": time("created_at"),
        "in_progress_at": time("in_progress_at"),
        "expires_at": time("expires_at"),
        "finalizing_at": time("finalizing_at"),
        "completed_at": time("completed_at"),
        "failed_at": time("failed_at"),
        "expired_at": time("expired_at"),
        "cancelling_at": time("cancelling_at"),
        "cancelled_at": time("cancelled_at"),
        "request_counts": {
            "total": num("total"),
            "completed": num("completed"),
            "failed": num("failed"),
        },
        "metadata": metadata,
    })
}

/// The tenant a batch's hash names (`None`: the default tenant).
fn owner(h: &HashMap<String, String>) -> Option<&str> {
    non_default(h.get("tenant").map(String::as_str))
}

/// The batch's hash, or 404 when there is none or the caller does not see it (another tenant's
/// batch answers exactly as a missing one).
async fn read(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<HashMap<String, String>, OaiError> {
    let Some(queue) = parse_id(id) else {
        return Err(not_found(id));
    };
    let mut conn = dl(state.broker.redis().conn()).await?;
    let h: HashMap<String, String> = dl(redis::AsyncCommands::hgetall(
        &mut conn,
        state.broker.keys(&queue).batch(id),
    ))
    .await?;
    if h.is_empty() || !caller.sees(owner(&h)) {
        return Err(not_found(id));
    }
    Ok(h)
}

/// OpenAI's limits on `metadata`: 16 pairs, keys up to 64 characters, string values up to 512.
fn check_metadata(m: &Map<String, Value>) -> Result<(), OaiError> {
    if m.len() > 16 {
        return Err(OaiError::invalid("metadata", "at most 16 key-value pairs"));
    }
    for (k, v) in m {
        if k.is_empty() || k.chars().count() > 64 {
            return Err(OaiError::invalid(
                "metadata",
                "keys must be 1 to 64 characters",
            ));
        }
        if !matches!(v, Value::String(s) if s.chars().count() <= 512) {
            return Err(OaiError::invalid(
                "metadata",
                "values must be strings of at most 512 characters",
            ));
        }
    }
    Ok(())
}

fn string_param<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str, OaiError> {
    match obj.get(name) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(OaiError::invalid(
            name,
            format!("Missing required parameter: '{name}'"),
        )),
        Some(_) => Err(OaiError::invalid(name, format!("{name} must be a string"))),
    }
}

/// `POST /v1/batches`: a batch of the caller's tenant, over a file of that tenant.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OaiError> {
    let tenant = non_default(caller.tenant());
    let obj: Map<String, Value> = crate::routes::json_body(&headers, body)?;
    if let Some(k) = obj.keys().find(|k| {
        !matches!(
            k.as_str(),
            "input_file_id" | "endpoint" | "completion_window" | "metadata"
        )
    }) {
        let shown: String = k.chars().take(64).collect();
        return Err(OaiError::invalid(
            shown.clone(),
            format!("Unrecognized request argument supplied: {shown}"),
        )
        .code("unknown_parameter"));
    }
    let file_id = string_param(&obj, "input_file_id")?.to_owned();
    if string_param(&obj, "endpoint")? != "/v1/chat/completions" {
        return Err(OaiError::invalid(
            "endpoint",
            "endpoint must be /v1/chat/completions (the only endpoint batches serve here)",
        )
        .code("unsupported_value"));
    }
    if string_param(&obj, "completion_window")? != "24h" {
        return Err(
            OaiError::invalid("completion_window", "completion_window must be 24h")
                .code("unsupported_value"),
        );
    }
    let metadata = match obj.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            check_metadata(m)?;
            Some(Value::Object(m.clone()).to_string())
        }
        Some(_) => return Err(OaiError::invalid("metadata", "metadata must be an object")),
    };
    let file_missing = || {
        OaiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "No such File object: {}",
                file_id.chars().take(64).collect::<String>()
            ),
        )
        .param("input_file_id")
        .code("file_not_found")
    };
    if !files::valid_file_id(&file_id) {
        return Err(file_missing());
    }
    let p = state.broker.prefix().to_owned();
    // another tenant's file is a missing one (a file's tenant never changes, so reading it
    // before file_use.lua takes the file is no race)
    let file_owner: Option<String> = {
        let mut conn = dl(state.broker.redis().conn()).await?;
        dl(redis::AsyncCommands::hget(
            &mut conn,
            keys::file_meta(&p, &file_id),
            "tenant",
        ))
        .await?
    };
    if !caller.sees(non_default(file_owner.as_deref())) {
        return Err(file_missing());
    }
    // one submission against the tenant's quotas (spend budget, enqueue rate); refused, nothing
    // is written
    crate::tenants::admit(&state, &caller).await?;
    let cfg = &state.config.batch;
    let queue = cfg.queue.clone();
    let id = new_id(&queue);
    let now = now_ms();
    // the cap on batches not ended: take a place, give it back when over (one place per
    // batch, so concurrent POSTs never end above the cap)
    let live: u64 = {
        let mut conn = dl(state.broker.redis().conn()).await?;
        let (n,): (u64,) = dl(redis::pipe()
            .zadd(keys::batches_live(&p), &id, now)
            .ignore()
            .zcard(keys::batches_live(&p))
            .query_async(&mut conn))
        .await?;
        n
    };
    let give_back = || async {
        if let Ok(mut conn) = state.broker.redis().conn().await {
            let _: Result<i64, _> =
                redis::AsyncCommands::zrem(&mut conn, keys::batches_live(&p), &id).await;
        }
    };
    if live > cfg.batches_max as u64 {
        give_back().await;
        return Err(OaiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "at most {} batches may be in progress at once (AGENTQ_BATCHES_MAX); wait for one to end",
                cfg.batches_max
            ),
        )
        .code("batch_limit"));
    }
    let lines = match dl(state.broker.file_use(&file_id, &id, PURPOSE_BATCH)).await {
        Ok(agentq_common::batch::FileUse::Ok(n)) => n,
        Ok(agentq_common::batch::FileUse::Missing) => {
            give_back().await;
            return Err(file_missing());
        }
        Ok(agentq_common::batch::FileUse::Purpose(p)) => {
            give_back().await;
            return Err(OaiError::invalid(
                "input_file_id",
                format!("the file's purpose is {p:?}; a batch reads a file of purpose \"batch\""),
            ));
        }
        Err(e) => {
            give_back().await;
            return Err(e);
        }
    };
    let created = now / 1000;
    let expires = created + WINDOW_SECS;
    let mut fields: Vec<(&str, String)> = vec![
        ("id", id.clone()),
        ("queue", queue.clone()),
        ("status", "validating".to_owned()),
        ("endpoint", "/v1/chat/completions".to_owned()),
        ("input_file_id", file_id.clone()),
        ("completion_window", "24h".to_owned()),
        ("created_at", created.to_string()),
        ("expires_at", expires.to_string()),
        ("keep_until", (expires + KEEP_MARGIN_SECS).to_string()),
        ("total", lines.to_string()),
        ("completed", "0".to_owned()),
        ("failed", "0".to_owned()),
        ("cursor", "0".to_owned()),
    ];
    if let Some(m) = metadata {
        fields.push(("metadata", m));
    }
    if let Some(t) = tenant {
        // fanout.lua copies it onto every task record of the batch
        fields.push(("tenant", t.to_owned()));
    }
    let keys = state.broker.keys(&queue);
    {
        let mut conn = dl(state.broker.redis().conn()).await?;
        dl(redis::AsyncCommands::hset_multiple::<_, _, _, ()>(
            &mut conn,
            keys.batch(&id),
            &fields,
        ))
        .await?;
        let mut pipe = redis::pipe();
        pipe.zadd(keys::batches_index(&p), &id, now).ignore();
        if let Some(t) = tenant {
            pipe.zadd(tenant_batches_index(&p, t), &id, now).ignore();
        }
        dl(pipe.query_async::<()>(&mut conn)).await?;
    }
    state.metrics.batches.with_label_values(&["created"]).inc();
    crate::routes::register_queue(&state, &queue).await;
    tracing::info!(batch.id = %id, file.id = %file_id, requests = lines, "batch created");
    // fan out now, beside the answer; the loop resumes it if this replica dies
    tokio::spawn(drive(state.clone(), queue, id.clone()));
    let h: HashMap<String, String> = fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    Ok(Json(batch_object(&h)).into_response())
}

/// `GET /v1/batches/{id}`
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, OaiError> {
    Ok(Json(batch_object(&read(&state, &caller, &id).await?)).into_response())
}

/// `GET /v1/batches`: newest first. A tenant's token pages its tenant's own index
/// (`batches:tenant:<id>`: a page costs what its own batches do, and is full while more
/// follow); the admin pages the index of every batch.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, OaiError> {
    let q = query(q)?;
    if q.purpose.is_some() {
        return Err(OaiError::invalid(
            "purpose",
            "batches have no purpose to filter on",
        ));
    }
    let limit = q.limit(20)?;
    let newest_first = q.newest_first()?;
    let p = state.broker.prefix();
    let tenant_index = non_default(caller.tenant()).map(|t| tenant_batches_index(p, t));
    let index = tenant_index
        .clone()
        .unwrap_or_else(|| keys::batches_index(p));
    let (ids, more) = page_of(&state, &index, q.after.as_deref(), limit, newest_first).await?;
    let mut pipe = redis::pipe();
    let mut listed = Vec::new();
    for id in &ids {
        if let Some(queue) = parse_id(id) {
            pipe.hgetall(state.broker.keys(&queue).batch(id));
            listed.push(id);
        }
    }
    let hashes: Vec<HashMap<String, String>> = if listed.is_empty() {
        Vec::new()
    } else {
        let mut conn = dl(state.broker.redis().conn()).await?;
        dl(pipe.query_async(&mut conn)).await?
    };
    // a tenant's entry whose record expired before the collection took it off is dropped now
    let gone: Vec<&&String> = listed
        .iter()
        .zip(&hashes)
        .filter(|(_, h)| h.is_empty())
        .map(|(id, _)| id)
        .collect();
    if let (Some(ti), false) = (&tenant_index, gone.is_empty()) {
        let mut conn = dl(state.broker.redis().conn()).await?;
        let _: i64 = dl(redis::AsyncCommands::zrem(&mut conn, ti, &gone)).await?;
    }
    let data: Vec<Value> = hashes
        .iter()
        .filter(|h| !h.is_empty() && caller.sees(owner(h)))
        .map(batch_object)
        .collect();
    Ok(super::list_page(data, more))
}

/// `POST /v1/batches/{id}/cancel`: `cancelling` at once, then `cancelled` once its tasks are
/// cancelled and the files written. A batch already cancelling or cancelled is answered as it
/// is; one that ended otherwise (or is finalizing) is a 409.
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, OaiError> {
    let Some(queue) = parse_id(&id) else {
        return Err(not_found(&id));
    };
    // another tenant's batch is a missing one: nothing is stopped
    read(&state, &caller, &id).await?;
    let keys = state.broker.keys(&queue);
    match dl(state.broker.batch_stop(&keys, &id, "cancelled"))
        .await?
        .as_str()
    {
        "missing" => return Err(not_found(&id)),
        "ok" => {
            tracing::info!(batch.id = %id, "batch cancelling");
            tokio::spawn(drive(state.clone(), queue, id.clone()));
        }
        "stopping" | "cancelled" => {}
        other => {
            return Err(OaiError::new(
                StatusCode::CONFLICT,
                format!("Cannot cancel a batch with status {other}."),
            )
            .code("batch_not_cancellable"))
        }
    }
    Ok(Json(batch_object(&read(&state, &caller, &id).await?)).into_response())
}

/// Drives one batch while this replica holds its lease: whatever it needs next, until it waits
/// for its tasks or ends. Failures are logged; the loop tries again.
pub(crate) async fn drive(state: AppState, queue: String, id: String) {
    let keys = state.broker.keys(&queue);
    let token = uuid::Uuid::new_v4().simple().to_string();
    match state
        .broker
        .batch_lease(&keys, &id, "take", &token, LEASE)
        .await
    {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::debug!(error = %e, batch.id = %id, "batch lease not taken; the loop retries");
            return;
        }
    }
    if let Err(e) = steps(&state, &keys, &id, &token).await {
        tracing::warn!(error = %e.message, batch.id = %id, "batch step failed; the loop resumes it");
    }
    let _ = state
        .broker
        .batch_lease(&keys, &id, "release", &token, LEASE)
        .await;
}

fn field(h: &HashMap<String, String>, k: &str) -> i64 {
    h.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// What a batch needs next, from its hash: `None` when it waits for its tasks.
fn next_step(h: &HashMap<String, String>, now: i64) -> Option<&'static str> {
    let status = h.get("status").map(String::as_str).unwrap_or("");
    if ended(status) {
        return Some("settle");
    }
    let stopping = h.contains_key("ending");
    let open = matches!(status, "validating" | "in_progress");
    if !stopping && open && now >= field(h, "expires_at") {
        return Some("expire");
    }
    if !stopping && open && field(h, "cursor") < field(h, "total") {
        return Some("fanout");
    }
    if stopping && field(h, "ccur") < field(h, "cursor") {
        return Some("cancel");
    }
    if field(h, "completed") + field(h, "failed") >= field(h, "total") {
        return Some("finalize");
    }
    None
}

async fn steps(state: &AppState, keys: &Keys, id: &str, token: &str) -> Result<(), OaiError> {
    loop {
        let h: HashMap<String, String> = {
            let mut conn = dl(state.broker.redis().conn()).await?;
            dl(redis::AsyncCommands::hgetall(&mut conn, keys.batch(id))).await?
        };
        if h.is_empty() {
            return Ok(());
        }
        match next_step(&h, now_secs()) {
            None => return Ok(()),
            Some("settle") => return settle(state, id, &h).await,
            Some("expire") => {
                dl(state.broker.batch_stop(keys, id, "expired")).await?;
                tracing::info!(batch.id = %id, "batch window over: expiring");
            }
            Some("fanout") => fan_out(state, keys, id, &h).await?,
            Some("cancel") => {
                let reason = match h.get("ending").map(String::as_str) {
                    Some("expired") => "batch_expired: the batch's completion window ended",
                    _ => "batch_cancelled: the batch was cancelled",
                };
                dl(state.broker.batch_cancel_page(
                    keys,
                    id,
                    state.config.batch.chunk,
                    state.config.common.result_ttl,
                    reason,
                ))
                .await?;
            }
            Some(_) => {
                if !finalize(state, keys, id, token, &h).await? {
                    return Ok(());
                }
            }
        }
        if !dl(state.broker.batch_lease(keys, id, "renew", token, LEASE)).await? {
            return Ok(());
        }
    }
}

/// An ended batch leaves the live set and enters the index's collection; its input file is free.
async fn settle(state: &AppState, id: &str, h: &HashMap<String, String>) -> Result<(), OaiError> {
    let p = state.broker.prefix();
    let until = now_ms() + state.config.common.result_ttl.as_millis() as i64;
    let mut pipe = redis::pipe();
    pipe.zrem(keys::batches_live(p), id)
        .ignore()
        .zadd(keys::batches_gc(p), batches_gc_member(id, owner(h)), until)
        .ignore();
    if let Some(f) = h.get("input_file_id") {
        pipe.srem(keys::file_users(p, f), id).ignore();
    }
    let mut conn = dl(state.broker.redis().conn()).await?;
    dl(pipe.query_async::<()>(&mut conn)).await
}

/// A line made ready for the fan-out: its task (of the batch's `tenant`: the worker reads the
/// payload's tenant for budgets), or the error that keeps it from running.
fn prepare(state: &AppState, queue: &str, tenant: Option<&str>, text: &str) -> FanoutLine {
    let task_id = TaskId::generate(queue).map_or_else(|_| String::new(), |t| t.to_string());
    match files::check_line(state, 0, text) {
        Ok((custom_id, mut task)) => {
            task.queue = queue.to_owned();
            task.payload.tenant = tenant.map(str::to_owned);
            match serde_json::to_string(&task.payload) {
                Ok(p) => FanoutLine {
                    task_id,
                    custom_id,
                    max_attempts: task.max_attempts,
                    payload: Some(p),
                    error: None,
                },
                Err(e) => failed_line(
                    task_id,
                    String::new(),
                    &OaiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("the request could not be stored: {e}"),
                    ),
                ),
            }
        }
        Err(e) => {
            // the custom_id is still there (the line was valid at upload)
            let custom_id = serde_json::from_str::<Value>(text)
                .ok()
                .and_then(|v| v["custom_id"].as_str().map(str::to_owned))
                .unwrap_or_default();
            // the line number of a re-check means nothing: the message without it
            let message = e
                .message
                .strip_prefix("line 0: ")
                .unwrap_or(&e.message)
                .to_owned();
            let e = OaiError { message, ..e };
            failed_line(task_id, custom_id, &e)
        }
    }
}

fn failed_line(task_id: String, custom_id: String, e: &OaiError) -> FanoutLine {
    FanoutLine {
        task_id,
        custom_id,
        max_attempts: 1,
        payload: None,
        error: Some((
            e.message.clone(),
            format!("{}|{}", e.status.as_u16(), e.body()),
        )),
    }
}

/// One chunk of the fan-out: the next lines of the input file (`LRANGE`, the file's slot),
/// made tasks by `fanout.lua` (the batch's slot) only if the cursor did not move meanwhile.
async fn fan_out(
    state: &AppState,
    keys: &Keys,
    id: &str,
    h: &HashMap<String, String>,
) -> Result<(), OaiError> {
    let from = field(h, "cursor").max(0) as u64;
    let total = field(h, "total").max(0) as u64;
    let n = (state.config.batch.chunk as u64).min(total.saturating_sub(from));
    let queue = h.get("queue").cloned().unwrap_or_default();
    let file = h.get("input_file_id").cloned().unwrap_or_default();
    let texts: Vec<String> = {
        let mut conn = dl(state.broker.redis().conn()).await?;
        dl(redis::AsyncCommands::lrange(
            &mut conn,
            keys::file_lines(state.broker.prefix(), &file),
            from as isize,
            (from + n) as isize - 1,
        ))
        .await?
    };
    let tenant = owner(h);
    let mut lines: Vec<FanoutLine> = texts
        .iter()
        .map(|t| prepare(state, &queue, tenant, t))
        .collect();
    // the input file is kept while the batch lives; lines missing anyway still get a place
    while (lines.len() as u64) < n {
        let tid = TaskId::generate(&queue).map_or_else(|_| String::new(), |t| t.to_string());
        let e = OaiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the input file's line is gone",
        );
        lines.push(failed_line(tid, String::new(), &e));
    }
    if lines.iter().any(|l| l.task_id.is_empty()) {
        return Err(OaiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the batch's queue {queue:?} is not a valid queue name"),
        ));
    }
    let out = dl(state
        .broker
        .batch_fanout(keys, id, from, state.config.common.result_ttl, &lines))
    .await?;
    if let Fanout::Done(_) = out {
        state
            .metrics
            .enqueued
            .with_label_values(&[&queue])
            .inc_by(lines.iter().filter(|l| l.payload.is_some()).count() as u64);
    }
    Ok(())
}

/// How each request ended, for `agentq_batch_requests_total`.
#[derive(Default)]
struct Outcomes {
    succeeded: u64,
    failed: u64,
    cancelled: u64,
    expired: u64,
}

/// An output or error file being written by the finalizer.
/// It belongs to the batch's tenant.
struct OutFile {
    id: String,
    tenant: Option<String>,
    lines: u64,
    bytes: u64,
    page: Vec<String>,
}

impl OutFile {
    async fn start(state: &AppState, id: String, tenant: Option<&str>) -> Result<Self, OaiError> {
        // a finalizer that died wrote part of it: it is written again from the start
        dl(files::discard(state, &id, tenant)).await?;
        dl(files::begin_file(state, &id, PURPOSE_OUTPUT, tenant)).await?;
        Ok(Self {
            id,
            tenant: tenant.map(str::to_owned),
            lines: 0,
            bytes: 0,
            page: Vec::new(),
        })
    }

    async fn flush(&mut self, state: &AppState) -> Result<(), OaiError> {
        // output files are charged like any file, but never refused: a batch must end
        dl(files::append_lines(state, &self.id, &self.page)).await?;
        self.lines += self.page.len() as u64;
        self.bytes += self.page.iter().map(|l| l.len() as u64 + 1).sum::<u64>();
        self.page.clear();
        Ok(())
    }

    /// Stored, or dropped when empty (a batch omits an empty file, as OpenAI does).
    async fn finish(&self, state: &AppState, filename: &str) -> Result<bool, OaiError> {
        let tenant = self.tenant.as_deref();
        if self.lines == 0 {
            dl(files::discard(state, &self.id, tenant)).await?;
            return Ok(false);
        }
        dl(files::commit_file(
            state, &self.id, filename, self.bytes, self.lines, tenant,
        ))
        .await
    }
}

/// Finalizes a batch whose requests are all final: freezes the counts, writes the output and
/// error files in input order from the task records (pages of `AGENTQ_BATCH_CHUNK`), then ends
/// it. Returns false when there is nothing to do now (requests still open, lease lost).
async fn finalize(
    state: &AppState,
    keys: &Keys,
    id: &str,
    token: &str,
    h: &HashMap<String, String>,
) -> Result<bool, OaiError> {
    let begun = dl(state.broker.batch_finalize_begin(
        keys,
        id,
        token,
        &files::new_file_id(),
        &files::new_file_id(),
    ))
    .await?;
    let (out_id, err_id, ending) = match begun {
        Finalize::Ok(o, e, ending) => (o, e, ending),
        Finalize::Ended(_) => return Ok(true),
        Finalize::Lease | Finalize::Missing | Finalize::Open => return Ok(false),
    };
    let ending = (!ending.is_empty()).then_some(ending);
    let mut out = OutFile::start(state, out_id, owner(h)).await?;
    let mut err = OutFile::start(state, err_id, owner(h)).await?;
    let total = field(h, "total").max(0) as u64;
    let made = field(h, "cursor").max(0) as u64;
    let input = h.get("input_file_id").cloned().unwrap_or_default();
    let page = state.config.batch.chunk as u64;
    let mut n = Outcomes::default();
    let mut at = 0u64;
    while at < total {
        let end = (at + page).min(total);
        if at < made {
            let ids: Vec<String> = {
                let mut conn = dl(state.broker.redis().conn()).await?;
                dl(redis::AsyncCommands::lrange(
                    &mut conn,
                    keys.batch_tasks(id),
                    at as isize,
                    end.min(made) as isize - 1,
                ))
                .await?
            };
            let mut pipe = redis::pipe();
            for t in &ids {
                pipe.hgetall(keys.task_raw(t));
            }
            let records: Vec<HashMap<String, String>> = if ids.is_empty() {
                Vec::new()
            } else {
                let mut conn = dl(state.broker.redis().conn()).await?;
                dl(pipe.query_async(&mut conn)).await?
            };
            for (t, rec) in ids.iter().zip(&records) {
                let (is_error, line) = request_line(t, rec, ending.as_deref(), &mut n);
                if is_error {
                    err.page.push(line);
                } else {
                    out.page.push(line);
                }
            }
        }
        if end > made {
            // lines never fanned out (the batch stopped first): their custom_ids from the input
            let from = at.max(made);
            let texts: Vec<String> = {
                let mut conn = dl(state.broker.redis().conn()).await?;
                dl(redis::AsyncCommands::lrange(
                    &mut conn,
                    keys::file_lines(state.broker.prefix(), &input),
                    from as isize,
                    end as isize - 1,
                ))
                .await?
            };
            for (i, text) in texts.iter().enumerate() {
                let custom_id = serde_json::from_str::<Value>(text)
                    .ok()
                    .and_then(|v| v["custom_id"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                let req_id = format!(
                    "batch_req_{}_{}",
                    id.rsplit('.').next().unwrap_or(""),
                    from + i as u64
                );
                err.page
                    .push(stopped_line(&req_id, &custom_id, ending.as_deref(), &mut n));
            }
        }
        out.flush(state).await?;
        err.flush(state).await?;
        if !dl(state.broker.batch_lease(keys, id, "renew", token, LEASE)).await? {
            return Ok(false);
        }
        at = end;
    }
    let has_out = out.finish(state, &format!("{id}_output.jsonl")).await?;
    let has_err = err.finish(state, &format!("{id}_error.jsonl")).await?;
    match dl(state.broker.batch_finalize_end(
        keys,
        id,
        token,
        has_out,
        has_err,
        state.config.common.result_ttl,
    ))
    .await?
    {
        Finalize::Ok(status, _, _) => {
            let m = &state.metrics;
            m.batches.with_label_values(&[&status]).inc();
            for (outcome, count) in [
                ("succeeded", n.succeeded),
                ("failed", n.failed),
                ("cancelled", n.cancelled),
                ("expired", n.expired),
            ] {
                m.batch_requests.with_label_values(&[outcome]).inc_by(count);
            }
            tracing::info!(
                batch.id = %id,
                status = %status,
                succeeded = n.succeeded,
                failed = n.failed + n.cancelled + n.expired,
                "batch ended"
            );
            Ok(true)
        }
        Finalize::Ended(_) => Ok(true),
        _ => Ok(false),
    }
}

/// The error-file line of a request the batch stopped before it ran or finished.
fn stopped_line(req_id: &str, custom_id: &str, ending: Option<&str>, n: &mut Outcomes) -> String {
    let (code, message) = if ending == Some("expired") {
        n.expired += 1;
        (
            "batch_expired",
            "This request could not be executed before the completion window expired.",
        )
    } else {
        n.cancelled += 1;
        (
            "batch_cancelled",
            "This request was cancelled with its batch.",
        )
    };
    json!({
        "id": req_id,
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    })
    .to_string()
}

/// One request's line from its task record: (is it an error line, the JSON line).
fn request_line(
    task_id: &str,
    rec: &HashMap<String, String>,
    ending: Option<&str>,
    n: &mut Outcomes,
) -> (bool, String) {
    let req_id = format!(
        "batch_req_{}",
        task_id
            .rsplit('.')
            .next()
            .unwrap_or(task_id)
            .replace('-', "")
    );
    let custom_id = rec.get("custom_id").cloned().unwrap_or_default();
    let status = rec.get("status").map(String::as_str).unwrap_or("");
    let response = |code: u16, body: Value| {
        json!({
            "id": req_id,
            "custom_id": custom_id,
            "response": {"status_code": code, "request_id": task_id, "body": body},
            "error": null,
        })
        .to_string()
    };
    let view = || {
        TaskId::parse(task_id)
            .ok()
            .map(|tid| TaskView::from_hash(&tid, rec))
    };
    match status {
        "succeeded" => {
            let result: Option<TaskResult> =
                rec.get("result").and_then(|r| serde_json::from_str(r).ok());
            if let Some(r) = result {
                n.succeeded += 1;
                let created = rec
                    .get("created_at")
                    .and_then(|c| c.parse::<i64>().ok())
                    .unwrap_or(0)
                    / 1000;
                return (false, response(200, chat::completion(task_id, created, &r)));
            }
            n.failed += 1;
            let e = OaiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request's result is unreadable",
            );
            (true, response(e.status.as_u16(), e.body()))
        }
        "cancelled" if ending.is_some() => (true, stopped_line(&req_id, &custom_id, ending, n)),
        "failed" | "cancelled" => {
            n.failed += 1;
            // a line that no longer validated at fan-out carries its own error
            if let Some((code, body)) = rec.get("batch_error").and_then(|e| e.split_once('|')) {
                let body: Value = serde_json::from_str(body).unwrap_or(Value::Null);
                return (true, response(code.parse().unwrap_or(400), body));
            }
            match view() {
                Some(v) => {
                    let e = chat::task_error(&v);
                    (true, response(e.status.as_u16(), e.body()))
                }
                None => {
                    let e = OaiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the request failed");
                    (true, response(e.status.as_u16(), e.body()))
                }
            }
        }
        other => {
            // not final (redriven after the counts froze) or its record is gone
            n.failed += 1;
            let why = if other.is_empty() {
                "the request's record is gone".to_owned()
            } else {
                format!("the request was {other} when its batch was finalized")
            };
            (
                true,
                json!({
                    "id": req_id,
                    "custom_id": custom_id,
                    "response": null,
                    "error": {"code": "request_unavailable", "message": why},
                })
                .to_string(),
            )
        }
    }
}

/// The loop's pass over live batches: those that need something are driven (fan-out resumed
/// after a replica died, expiry, cancel pages, finalization), one after another.
pub(crate) async fn tick(state: &AppState) -> Result<(), OaiError> {
    let p = state.broker.prefix();
    let live: Vec<(String, i64)> = {
        let mut conn = dl(state.broker.redis().conn()).await?;
        dl(redis::AsyncCommands::zrange_withscores(
            &mut conn,
            keys::batches_live(p),
            0,
            -1,
        ))
        .await?
    };
    if live.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    let mut queues = Vec::with_capacity(live.len());
    for (id, _) in &live {
        let q = parse_id(id).unwrap_or_default();
        pipe.hgetall(
            state
                .broker
                .keys(if q.is_empty() { "_" } else { &q })
                .batch(id),
        );
        queues.push(q);
    }
    let hashes: Vec<HashMap<String, String>> = {
        let mut conn = dl(state.broker.redis().conn()).await?;
        dl(pipe.query_async(&mut conn)).await?
    };
    let now = now_secs();
    for (((id, score), queue), h) in live.iter().zip(queues).zip(hashes) {
        if h.is_empty() {
            // a POST that died between taking its place and writing the batch
            if queue.is_empty() || now_ms() - score > ORPHAN_MS {
                let mut conn = dl(state.broker.redis().conn()).await?;
                let _: i64 = dl(redis::AsyncCommands::zrem(
                    &mut conn,
                    keys::batches_live(p),
                    id,
                ))
                .await?;
            }
            continue;
        }
        if next_step(&h, now).is_some() {
            drive(state.clone(), queue, id.clone()).await;
        }
    }
    Ok(())
}

/// Drops ended batches whose records expired from the list's index, and a tenant's batch from
/// its tenant's index too (the tenant travels in the collection's member).
pub(crate) async fn gc(state: &AppState) -> Result<(), OaiError> {
    let p = state.broker.prefix();
    let mut conn = dl(state.broker.redis().conn()).await?;
    let due: Vec<String> = dl(redis::cmd("ZRANGEBYSCORE")
        .arg(keys::batches_gc(p))
        .arg("-inf")
        .arg(now_ms())
        .arg("LIMIT")
        .arg(0)
        .arg(1000)
        .query_async(&mut conn))
    .await?;
    if due.is_empty() {
        return Ok(());
    }
    let mut ids: Vec<&str> = Vec::with_capacity(due.len());
    let mut by_tenant: HashMap<&str, Vec<&str>> = HashMap::new();
    for m in &due {
        let (id, tenant) = parse_batches_gc_member(m);
        ids.push(id);
        if let Some(t) = tenant {
            by_tenant.entry(t).or_default().push(id);
        }
    }
    let mut pipe = redis::pipe();
    pipe.zrem(keys::batches_index(p), &ids).ignore();
    for (t, tids) in &by_tenant {
        pipe.zrem(tenant_batches_index(p, t), tids).ignore();
    }
    pipe.zrem(keys::batches_gc(p), &due).ignore();
    dl(pipe.query_async::<()>(&mut conn)).await
}
