//! `POST /v1/tasks/batch`: up to [`MAX_BATCH_TASKS`] tasks in one request, for big offline jobs
//! (BullMQ's `addBulk`). Each item is a task body, plus an optional `idempotency_key`, checked
//! exactly as `POST /v1/tasks` checks one, and accepted or refused on its own: the answer lists,
//! in the request's order, `{"id", "status"}` or `{"error": {...}}` per item. The accepted items
//! are written with `enqueue_many.lua`, [`agentq_common::queue::ITEMS_PER_CALL`] per script call,
//! the calls of one queue sent together.
//!
//! What is all or nothing: the request's own shape (not JSON, no `tasks`, more than 1,000 items,
//! over the size limit) is refused as a whole with nothing written, and so is a tenant over its
//! spend budget or enqueue rate (the batch counts one submission per task). Each item is atomic.
//! When Redis fails mid-request the answer is 503 and the items of the calls that landed stay
//! queued: send the batch again with `idempotency_key`s to make the retry safe.

use std::collections::HashMap;

use agentq_common::queue::{EnqueueItem, Enqueued};
use agentq_common::task::{CreateTask, Status};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::{
    body_error, check_new_task, deadline, json_body_limited, over_pending_message, register_queue,
    valid_idempotency_key, IDEMPOTENCY_KEY_RULE,
};
use crate::AppState;

/// Most tasks in one `POST /v1/tasks/batch`.
pub const MAX_BATCH_TASKS: usize = 1000;
/// Most bytes of one `POST /v1/tasks/batch` body (a single task's body may be 256 KiB; a batch's
/// items share this).
pub const MAX_BATCH_BODY_BYTES: usize = 8 * 1024 * 1024;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    tasks: Option<Vec<Box<RawValue>>>,
}

/// An item's fate before the write: refused with an error, or to be written (its index among
/// the items to write).
enum Slot {
    Refused(Value),
    Write(usize),
}

pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let BatchBody { tasks } = json_body_limited(&headers, body, MAX_BATCH_BODY_BYTES)?;
    let tasks = tasks.unwrap_or_default();
    if tasks.is_empty() || tasks.len() > MAX_BATCH_TASKS {
        return Err(ApiError::invalid(
            "tasks",
            format!("must hold 1 to {MAX_BATCH_TASKS} task bodies"),
        ));
    }
    let mut slots = Vec::with_capacity(tasks.len());
    let mut items: Vec<EnqueueItem> = Vec::with_capacity(tasks.len());
    for raw in &tasks {
        match check_item(&state, &caller, raw) {
            Ok(item) => {
                slots.push(Slot::Write(items.len()));
                items.push(item);
            }
            Err(e) => slots.push(Slot::Refused(item_error(&e))),
        }
    }
    drop(tasks);
    if !items.is_empty() {
        let n = u32::try_from(items.len()).unwrap_or(u32::MAX);
        crate::tenants::admit_many(&state, &caller, n).await?;
    }
    let outcomes = write(&state, &items).await?;
    let mut created: HashMap<&str, u64> = HashMap::new();
    let mut over_quota = 0u64;
    let mut replayed: Vec<(usize, String)> = Vec::new();
    let mut out: Vec<Value> = Vec::with_capacity(slots.len());
    for (i, slot) in slots.into_iter().enumerate() {
        match slot {
            Slot::Refused(e) => out.push(e),
            Slot::Write(k) => {
                let (id, outcome) = &outcomes[k];
                match outcome {
                    Enqueued::Created => {
                        *created.entry(items[k].task.queue.as_str()).or_default() += 1;
                        out.push(json!({"id": id, "status": Status::Queued.as_str()}));
                    }
                    Enqueued::Existing => {
                        replayed.push((i, id.clone()));
                        out.push(json!({"id": id, "status": Status::Queued.as_str(), "idempotent_replayed": true}));
                    }
                    Enqueued::OverQuota { pending } => {
                        over_quota += 1;
                        out.push(json!({"error": {
                            "code": "quota_exceeded",
                            "message": over_pending_message(*pending),
                            "field": Value::Null,
                            "status": StatusCode::TOO_MANY_REQUESTS.as_u16(),
                        }}));
                    }
                }
            }
        }
    }
    // A replayed item shows its task's status now, as a replayed single POST does. The reads go
    // out together (one round trip's wait on the multiplexed connection), not one after another:
    // a resent 1,000-item keyed batch would otherwise wait 1,000 round trips.
    let lookups = replayed.iter().filter_map(|(i, id)| {
        let tid = agentq_common::keys::TaskId::parse(id).ok()?;
        let broker = &state.broker;
        Some(async move { broker.get(&tid).await.map(|view| (*i, view)) })
    });
    for (i, view) in deadline(futures::future::try_join_all(lookups)).await? {
        if let Some(view) = view {
            out[i]["status"] = Value::from(view.status.as_str());
        }
    }
    if over_quota > 0 {
        state
            .metrics
            .quota_refusals
            .with_label_values(&["max_pending"])
            .inc_by(over_quota);
    }
    for (queue, n) in created {
        state.metrics.enqueued.with_label_values(&[queue]).inc_by(n);
        register_queue(&state, queue).await;
    }
    Ok((StatusCode::ACCEPTED, Json(json!({"tasks": out}))).into_response())
}

/// One item checked as a single task's body, with its own `idempotency_key` scoped to the
/// caller's tenant.
fn check_item(state: &AppState, caller: &Caller, raw: &RawValue) -> Result<EnqueueItem, ApiError> {
    let text = raw.get();
    if !text.starts_with('{') {
        return Err(ApiError::invalid(
            "body",
            "a task body must be a JSON object",
        ));
    }
    let de = &mut serde_json::Deserializer::from_str(text);
    let mut req: CreateTask = serde_path_to_error::deserialize(de).map_err(body_error)?;
    let idem = match req.idempotency_key.take() {
        None => None,
        Some(k) if valid_idempotency_key(&k) => {
            Some(agentq_common::tenant::idempotency_key(caller.tenant(), &k).into_owned())
        }
        Some(_) => return Err(ApiError::invalid("idempotency_key", IDEMPOTENCY_KEY_RULE)),
    };
    let task = check_new_task(state, caller, req)?;
    Ok(EnqueueItem {
        task,
        idempotency_key: idem,
    })
}

/// An item's refusal: the error a single `POST /v1/tasks` of it would get, with that status.
fn item_error(e: &ApiError) -> Value {
    json!({"error": {
        "code": e.code,
        "message": e.message,
        "field": e.field,
        "status": e.status.as_u16(),
    }})
}

/// Writes the accepted items, each queue's items with `enqueue_many` (the calls of every queue
/// sent together), and returns the outcomes in the items' order.
async fn write(
    state: &AppState,
    items: &[EnqueueItem],
) -> Result<Vec<(String, Enqueued)>, ApiError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let ttl = state.config.common.result_ttl;
    let first = &items[0].task.queue;
    if items.iter().all(|i| &i.task.queue == first) {
        observe(state, items.len());
        return deadline(state.broker.enqueue_many(first, items, ttl)).await;
    }
    // Several queues: one group per queue, answered back into the items' order.
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (k, item) in items.iter().enumerate() {
        let q = item.task.queue.as_str();
        match groups.iter_mut().find(|(name, _)| *name == q) {
            Some((_, v)) => v.push(k),
            None => groups.push((q, vec![k])),
        }
    }
    let calls = groups.iter().map(|(queue, idx)| {
        let part: Vec<EnqueueItem> = idx.iter().map(|&k| items[k].clone()).collect();
        observe(state, part.len());
        async move { state.broker.enqueue_many(queue, &part, ttl).await }
    });
    let replies = deadline(futures::future::try_join_all(calls)).await?;
    let mut out = vec![(String::new(), Enqueued::Created); items.len()];
    for ((_, idx), reply) in groups.iter().zip(replies) {
        for (&k, outcome) in idx.iter().zip(reply) {
            out[k] = outcome;
        }
    }
    Ok(out)
}

fn observe(state: &AppState, tasks: usize) {
    let h = state.metrics.enqueue_group.with_label_values(&["batch"]);
    let per = agentq_common::queue::ITEMS_PER_CALL;
    for start in (0..tasks).step_by(per) {
        h.observe((tasks - start).min(per) as f64);
    }
}
