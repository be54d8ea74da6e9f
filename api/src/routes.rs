//! Routes and handlers.

use std::time::{Duration, Instant};

use agentq_common::keys::{validate_queue, TaskId};
use agentq_common::metrics::render;
use agentq_common::queue::{CancelOutcome, Enqueued};
use agentq_common::task::{CreateTask, Status};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::{AppState, MAX_BODY_BYTES};

/// Longest any handler waits on Redis before answering 503.
const REDIS_DEADLINE: Duration = Duration::from_secs(4);
const MAX_IDEMPOTENCY_KEY: usize = 255;
const MAX_LIST_LIMIT: usize = 1000;

static OPENAPI: &str = include_str!("../openapi.json");

/// The OpenAPI document as this deployment serves it: `queue` (path parameters and the task body)
/// becomes an enum of the declared queues, so a client (or a fuzzer) generating "valid" requests
/// from it only names queues the api accepts.
pub fn openapi_for(queues: &[String]) -> String {
    let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(OPENAPI) else {
        return OPENAPI.to_owned();
    };
    let names: Vec<serde_json::Value> = queues.iter().map(|q| json!(q)).collect();
    if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
        for op in paths.values_mut().filter_map(|p| p.as_object_mut()) {
            for method in op.values_mut() {
                let Some(params) = method.get_mut("parameters").and_then(|p| p.as_array_mut())
                else {
                    continue;
                };
                for param in params
                    .iter_mut()
                    .filter(|p| p["name"] == "queue" || p["name"] == "X-Agentq-Queue")
                {
                    param["schema"]["enum"] = json!(names);
                }
            }
        }
    }
    let mut with_null = names.clone();
    with_null.push(serde_json::Value::Null);
    for schema in [
        "CreateTask",
        "BatchTaskItem",
        "CreateWorkflow",
        "WorkflowNode",
    ] {
        let body_queue = &mut doc["components"]["schemas"][schema]["properties"]["queue"];
        if body_queue.is_object() {
            body_queue["enum"] = json!(with_null);
        }
    }
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| OPENAPI.to_owned())
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/v1/tasks", post(create_task).get(crate::tasks::list))
        .route(
            "/v1/tasks/batch",
            post(crate::bulk::create)
                .layer(DefaultBodyLimit::max(crate::bulk::MAX_BATCH_BODY_BYTES)),
        )
        .route("/v1/tasks/{id}", get(get_task).delete(cancel_task))
        .route("/v1/tasks/{id}/events", get(crate::events::task_events))
        .route(
            "/v1/tasks/{id}/tool_outputs",
            post(crate::tools::submit_tool_outputs),
        )
        .route("/v1/workflows", post(crate::workflows::create))
        .route(
            "/v1/workflows/{id}/events",
            get(crate::events::workflow_events),
        )
        .route(
            "/v1/workflows/{id}",
            get(crate::workflows::get).delete(crate::workflows::cancel),
        )
        .route("/v1/queues", get(crate::queues::list))
        .route("/v1/queues/{queue}", get(queue_stats))
        .route("/v1/queues/{queue}/dead", get(list_dead))
        .route("/v1/queues/{queue}/dead/redrive", post(redrive_dead))
        .route("/v1/upstreams", get(crate::upstreams::list))
        .route("/v1/budgets", get(crate::budgets::list))
        .route(
            "/v1/budgets/{scope}",
            get(crate::budgets::get)
                .put(crate::budgets::put)
                .delete(crate::budgets::delete),
        )
        .route("/v1/usage", get(crate::budgets::usage))
        .route("/v1/chat/completions", post(crate::openai::chat::create))
        .route(
            "/v1/files",
            post(crate::batch::files::upload)
                .get(crate::batch::files::list)
                // the upload streams: its limit is the file's, plus room for the multipart framing
                .layer(DefaultBodyLimit::max(
                    usize::try_from(state.config.batch.file_max_bytes)
                        .unwrap_or(usize::MAX)
                        .saturating_add(64 * 1024),
                )),
        )
        .route(
            "/v1/files/{id}",
            get(crate::batch::files::get).delete(crate::batch::files::delete),
        )
        .route("/v1/files/{id}/content", get(crate::batch::files::content))
        .route(
            "/v1/batches",
            post(crate::batch::batches::create).get(crate::batch::batches::list),
        )
        .route("/v1/batches/{id}", get(crate::batch::batches::get))
        .route(
            "/v1/batches/{id}/cancel",
            post(crate::batch::batches::cancel),
        )
        .route(
            "/v1/admin/tenants",
            post(crate::tenants::create).get(crate::tenants::list),
        )
        .route(
            "/v1/admin/tenants/{id}",
            get(crate::tenants::get)
                .patch(crate::tenants::patch)
                .delete(crate::tenants::delete),
        )
        .route(
            "/v1/admin/tenants/{id}/tokens",
            post(crate::tenants::create_token).get(crate::tenants::list_tokens),
        )
        .route(
            "/v1/admin/tenants/{id}/tokens/{token_id}",
            axum::routing::delete(crate::tenants::revoke_token),
        )
        .route("/v1/models", get(crate::openai::list_models))
        .route("/v1/models/{model}", get(crate::openai::get_model))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .merge(crate::ui::routes())
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // inside `track`: a refused request is still counted, by its route
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::auth::layer,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    // Cheap clones (an enum and an Arc'd str), not String copies: this runs on every request.
    let method = req.method().clone();
    // The matched route template, never the raw path: ids must not become label values.
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", |p| p.as_str());
    let resp = next.run(req).await;
    let m = &state.metrics;
    m.http_requests
        .with_label_values(&[method.as_str(), route, resp.status().as_str()])
        .inc();
    m.http_duration
        .with_label_values(&[method.as_str(), route])
        .observe(start.elapsed().as_secs_f64());
    resp
}

pub(crate) async fn deadline<T>(
    fut: impl std::future::Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(REDIS_DEADLINE, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => {
            tracing::warn!("redis call timed out");
            Err(ApiError::unavailable())
        }
    }
}

fn json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        })
        .unwrap_or(false)
}

pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_header",
            IDEMPOTENCY_KEY_RULE.to_owned(),
        )
        .field("Idempotency-Key")
    };
    let s = v.to_str().map_err(|_| bad())?;
    if !valid_idempotency_key(s) {
        return Err(bad());
    }
    Ok(Some(s.to_owned()))
}

pub(crate) const IDEMPOTENCY_KEY_RULE: &str = "must be 1 to 255 visible ASCII characters";

/// An idempotency key's shape, for the header and a batch item's `idempotency_key` alike.
pub(crate) fn valid_idempotency_key(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_IDEMPOTENCY_KEY && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Turns a serde error into the JSON field it is about ("body" when it is about the whole body).
pub(crate) fn body_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    // serde_path_to_error already ends the path with an unknown field's name; "?" and "." mean
    // the error is about the body as a whole (syntax, EOF, not an object).
    let path = e.path().to_string();
    let field = if path == "." || path == "?" || path.is_empty() {
        "body".to_owned()
    } else {
        path
    };
    let inner = e.into_inner();
    let msg = inner.to_string();
    // A repeated key is reported at the object's level; name the key itself.
    let duplicate = msg
        .strip_prefix("duplicate field `")
        .and_then(|rest| rest.split('`').next());
    let field = match duplicate {
        Some(name) if field == "body" => name.to_owned(),
        Some(name) => format!("{field}.{name}"),
        None => field,
    };
    if msg.starts_with("unknown field `") {
        return ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_field", msg).field(field);
    }
    if inner.is_syntax() || inner.is_eof() {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", msg).field(field)
    } else {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", msg).field(field)
    }
}

/// A JSON object body parsed into `T`, with the same errors as every body route: 413 when too
/// big, 415 without a JSON content type, 400 malformed, 422 naming the field.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    json_body_limited(headers, body, MAX_BODY_BYTES)
}

/// [`json_body`] for a route with its own body limit (`limit`, named in the 413).
pub(crate) fn json_body_limited<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let body = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("body must be at most {limit} bytes"),
            )
            .field("body")
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_body", rej.body_text()).field("body")
        }
    })?;
    if !json_content_type(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json",
        )
        .field("Content-Type"));
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(ApiError::invalid("body", "must be a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(de).map_err(body_error)
}

async fn create_task(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let idem = idempotency_key(&headers)?
        .map(|k| agentq_common::tenant::idempotency_key(caller.tenant(), &k).into_owned());
    let req: CreateTask = json_body(&headers, body)?;
    req.refuse_idempotency_field("a single task takes the Idempotency-Key header")
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    let task = check_new_task(&state, &caller, req)?;
    crate::tenants::admit(&state, &caller).await?;
    let ttl = state.config.common.result_ttl;
    let queue = task.queue.clone();
    let (id, outcome) = match &state.group {
        Some(group) => {
            let item = agentq_common::queue::EnqueueItem {
                task,
                idempotency_key: idem,
            };
            deadline(group.enqueue(item)).await?
        }
        None => deadline(state.broker.enqueue(&task, idem.as_deref(), ttl)).await?,
    };
    let status = match outcome {
        Enqueued::Created => {
            state.metrics.enqueued.with_label_values(&[&queue]).inc();
            register_queue(&state, &queue).await;
            Status::Queued.as_str().to_owned()
        }
        Enqueued::OverQuota { pending } => return Err(over_pending(&state, pending)),
        Enqueued::Existing => {
            let current = match TaskId::parse(&id) {
                Ok(tid) => deadline(state.broker.get(&tid)).await?.map(|v| v.status),
                Err(_) => None,
            };
            current.unwrap_or(Status::Queued).as_str().to_owned()
        }
    };
    let location = format!("/v1/tasks/{id}");
    let mut resp = (
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "status": status})),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if outcome == Enqueued::Existing {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// A task body checked as `POST /v1/tasks` checks it (and each item of `POST /v1/tasks/batch`):
/// valid, its models served, its steps and MCP servers allowed, its queue declared; owned by the
/// caller's tenant. Errors name the body's field.
pub(crate) fn check_new_task(
    state: &AppState,
    caller: &Caller,
    req: CreateTask,
) -> Result<agentq_common::task::NewTask, ApiError> {
    let mut task = req
        .validate(
            &state.config.default_queue,
            state.config.common.max_attempts,
        )
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    task.check_models(&state.config.upstreams)
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    task.check_steps(state.config.max_steps_cap)
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    task.check_mcp(&state.config.mcp)
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    if !state.config.declares(&task.queue) {
        return Err(undeclared(&task.queue));
    }
    task.payload.tenant = caller.tenant().map(str::to_owned);
    Ok(task)
}

/// 429 for a tenant at its `max_pending` quota in the queue (nothing was written).
pub(crate) fn over_pending(state: &AppState, pending: u64) -> ApiError {
    state
        .metrics
        .quota_refusals
        .with_label_values(&["max_pending"])
        .inc();
    ApiError::over_quota(over_pending_message(pending), 1)
}

pub(crate) fn over_pending_message(pending: u64) -> String {
    format!("the tenant has {pending} tasks pending in this queue (its max_pending quota)")
}

/// Adds a declared queue to the `agentq:queues` set on its first task; once per queue per process.
pub(crate) async fn register_queue(state: &AppState, queue: &str) {
    let fresh = state
        .known_queues
        .lock()
        .map(|mut s| s.insert(queue.to_owned()))
        .unwrap_or(false);
    if fresh {
        if let Err(e) = state.broker.register_queue(queue).await {
            tracing::warn!(error = %e, queue, "could not register queue; will retry");
            if let Ok(mut s) = state.known_queues.lock() {
                s.remove(queue);
            }
        }
    }
}

/// A queue nobody declared: refused, so clients cannot create keys and gauges without bound, or
/// park tasks on a queue no worker serves.
pub(crate) fn undeclared(queue: &str) -> ApiError {
    ApiError::invalid(
        "queue",
        format!("queue {queue:?} is not declared (AGENTQ_QUEUES lists the queues this api serves)"),
    )
}

pub(crate) fn parse_id(raw: &str) -> Result<TaskId, ApiError> {
    TaskId::parse(raw).map_err(|_| ApiError::not_found("task"))
}

#[derive(serde::Deserialize)]
pub(crate) struct GetTaskQuery {
    include: Option<String>,
}

async fn get_task(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
    query: Result<Query<GetTaskQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    // `include` is a comma-separated list (OpenAPI: an array, `explode: false`), each value once
    let (mut steps, mut input) = (false, false);
    let bad = || {
        ApiError::invalid(
            "include",
            "a comma-separated list of \"steps\" (the transcript of the task's steps) and \"input\" (its request)",
        )
    };
    match query {
        Ok(Query(GetTaskQuery { include: None })) => {}
        Ok(Query(GetTaskQuery {
            include: Some(ref i),
        })) => {
            for part in i.split(',') {
                let seen = match part {
                    "steps" => &mut steps,
                    "input" => &mut input,
                    _ => return Err(bad()),
                };
                if *seen {
                    return Err(bad());
                }
                *seen = true;
            }
        }
        Err(_) => return Err(bad()),
    }
    let view = if steps || input {
        deadline(state.broker.get_including(&id, steps, input)).await?
    } else {
        deadline(state.broker.get(&id)).await?
    };
    match view {
        Some(view) if caller.sees(view.tenant.as_deref()) => Ok(Json(view).into_response()),
        _ => Err(ApiError::not_found("task")),
    }
}

/// 404 unless the task exists and the caller sees it: another tenant's task answers exactly
/// like a missing one.
pub(crate) async fn check_task(
    state: &AppState,
    caller: &Caller,
    id: &TaskId,
) -> Result<agentq_common::task::TaskView, ApiError> {
    match deadline(state.broker.get(id)).await? {
        Some(v) if caller.sees(v.tenant.as_deref()) => Ok(v),
        _ => Err(ApiError::not_found("task")),
    }
}

async fn cancel_task(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    check_task(&state, &caller, &id).await?;
    match cancel(&state, &id).await? {
        CancelOutcome::Cancelled => {
            Ok(Json(json!({"id": raw, "status": "cancelled"})).into_response())
        }
        CancelOutcome::NotFound => Err(ApiError::not_found("task")),
        CancelOutcome::AlreadyFinished(s) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_finished",
            format!("task already {}", s.as_str()),
        )
        .field("id")),
    }
}

/// Cancels a task, and lets its agent's next task run.
pub(crate) async fn cancel(state: &AppState, id: &TaskId) -> Result<CancelOutcome, ApiError> {
    let outcome = deadline(state.broker.cancel(id, state.config.common.result_ttl)).await?;
    if outcome == CancelOutcome::Cancelled {
        // the agent's next task may run now (the lane sweep makes it if this fails)
        if let Ok(Ok(Some(view))) =
            tokio::time::timeout(std::time::Duration::from_secs(2), state.broker.get(id)).await
        {
            if let Some(agent) = view.agent_id {
                let keys = state.broker.keys(id.queue());
                let lane = agentq_common::tenant::agent_key(view.tenant.as_deref(), &agent);
                let _ = state.broker.lane_release(&keys, &lane).await;
            }
        }
    }
    Ok(outcome)
}

fn check_queue(state: &AppState, queue: &str) -> Result<(), ApiError> {
    validate_queue(queue).map_err(|e| ApiError::invalid("queue", e.to_string()))?;
    if state.config.declares(queue) {
        Ok(())
    } else {
        Err(ApiError::not_found("queue"))
    }
}

async fn queue_stats(
    State(state): State<AppState>,
    Path(queue): Path<String>,
) -> Result<Response, ApiError> {
    check_queue(&state, &queue)?;
    Ok(Json(deadline(state.broker.stats(&queue)).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    limit: Option<usize>,
}

fn limit(
    q: Result<Query<LimitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<usize, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("limit", e.body_text()))?;
    match q.limit {
        None => Ok(100),
        Some(n) if (1..=MAX_LIST_LIMIT).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::invalid(
            "limit",
            format!("must be between 1 and {MAX_LIST_LIMIT}"),
        )),
    }
}

async fn list_dead(
    State(state): State<AppState>,
    caller: Caller,
    Path(queue): Path<String>,
    q: Result<Query<LimitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    check_queue(&state, &queue)?;
    let n = limit(q)?;
    let tasks = match caller.tenant() {
        // the admin sees every tenant's dead letters
        None => deadline(state.broker.dead(&queue, n)).await?,
        Some(t) => deadline(state.broker.dead_of(&queue, Some(t), n)).await?,
    };
    Ok(Json(json!({"queue": queue, "tasks": tasks})).into_response())
}

/// `POST .../dead/redrive` body: the dead tasks to redrive (else the oldest `limit`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveBody {
    ids: Option<Vec<String>>,
}

async fn redrive_dead(
    State(state): State<AppState>,
    caller: Caller,
    Path(queue): Path<String>,
    q: Result<Query<LimitQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_queue(&state, &queue)?;
    let n = limit(q)?;
    let named = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let de = &mut serde_json::Deserializer::from_slice(&body);
        let v: serde_json::Value = serde_path_to_error::deserialize(de).map_err(body_error)?;
        if !v.is_object() {
            return Err(ApiError::invalid("body", "must be a JSON object"));
        }
        let b: RedriveBody =
            serde_json::from_value(v).map_err(|e| ApiError::invalid("ids", e.to_string()))?;
        b.ids
    };
    let ids: Option<Vec<String>> = match named {
        Some(ids) => {
            if ids.is_empty() || ids.len() > MAX_LIST_LIMIT {
                return Err(ApiError::invalid(
                    "ids",
                    format!("must name 1 to {MAX_LIST_LIMIT} task ids"),
                ));
            }
            let mut own = Vec::with_capacity(ids.len());
            for raw in &ids {
                // an id that is no task of this queue, or another tenant's, is skipped exactly
                // like an id that is not dead
                let Some(id) = TaskId::parse(raw).ok().filter(|id| id.queue() == queue) else {
                    continue;
                };
                if let Some(v) = deadline(state.broker.get(&id)).await? {
                    if caller.sees(v.tenant.as_deref()) {
                        own.push(raw.clone());
                    }
                }
            }
            Some(own)
        }
        None => match caller.tenant() {
            None => None,
            Some(t) => Some(
                deadline(state.broker.dead_of(&queue, Some(t), n))
                    .await?
                    .into_iter()
                    .map(|d| d.id)
                    .collect(),
            ),
        },
    };
    let (redriven, dropped) = match ids {
        Some(ids) => deadline(state.broker.redrive_ids(&queue, &ids)).await?,
        None => deadline(state.broker.redrive(&queue, n)).await?,
    };
    Ok(Json(json!({"queue": queue, "redriven": redriven, "dropped": dropped})).into_response())
}

async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let up = tokio::time::timeout(REDIS_DEADLINE, state.broker.redis().ping())
        .await
        .unwrap_or(false);
    if up {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": "redis unreachable"})),
        )
            .into_response()
    }
}

/// Refreshes the queue gauges from Redis, then renders. A scrape during an outage still answers,
/// with the last known depths.
async fn metrics(State(state): State<AppState>) -> Response {
    let refresh = async {
        for q in &state.config.queues {
            let s = state.broker.stats(q).await?;
            let g = &state.metrics.queue_depth;
            g.with_label_values(&[q, "pending"]).set(s.pending as i64);
            g.with_label_values(&[q, "inflight"]).set(s.inflight as i64);
            g.with_label_values(&[q, "retrying"]).set(s.retrying as i64);
            g.with_label_values(&[q, "throttled"])
                .set(s.throttled as i64);
            g.with_label_values(&[q, "dead"]).set(s.dead as i64);
            let age = state.broker.oldest_pending_age(q).await?;
            state.metrics.oldest_age.with_label_values(&[q]).set(age);
        }
        crate::budgets::refresh_gauges(&state).await?;
        Ok::<_, redis::RedisError>(())
    };
    if let Ok(Err(e)) | Err(e) = tokio::time::timeout(REDIS_DEADLINE, refresh)
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "timed out")))
    {
        tracing::warn!(error = %e, "queue depth refresh failed");
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&state.metrics.registry),
    )
        .into_response()
}

async fn openapi(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi.clone(),
    )
        .into_response()
}

async fn fallback() -> ApiError {
    ApiError::not_found("route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}
