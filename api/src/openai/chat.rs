//! `POST /v1/chat/completions`: a chat-completions request becomes a task (same limiter,
//! budgets, retries and fencing as `POST /v1/tasks`), and the call waits for it: the answer in
//! OpenAI's `chat.completion` shape, or with `stream: true` its `chat.completion.chunk` SSE fed
//! from the task's event stream. The conversion both ways lives here too, for the Batch API.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use agentq_common::keys::TaskId;
use agentq_common::queue::Enqueued;
use agentq_common::task::{CreateTask, NewTask, Status, TaskResult, TaskView};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::{model_not_found, OaiError};
use crate::routes::deadline;
use crate::AppState;

/// Parameters of OpenAI's API that this front door does not pass on: refused by name rather
/// than dropped, so a client never believes a setting took effect when it did not.
const UNSUPPORTED: &[&str] = &[
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "modalities",
    "audio",
    "prediction",
    "service_tier",
    "reasoning_effort",
    "web_search_options",
    "functions",
    "function_call",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
];

/// What the chat-completions body passes to the task as it is: OpenAI's parameters the task
/// model carries, and agentq's own extensions (an SDK's `extra_body`).
const PASSED: &[&str] = &[
    "messages",
    "model",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    // agentq extensions
    "fallback_models",
    "max_attempts",
    "max_cost_usd",
    "max_total_tokens",
    "on_budget",
];

/// OpenAI's limits on `metadata`: 16 pairs, keys up to 64 characters, values up to 512.
const METADATA_PAIRS: usize = 16;
const METADATA_KEY: usize = 64;
const METADATA_VALUE: usize = 512;

/// A chat-completions request, checked and made a task.
#[derive(Debug)]
pub struct ChatRequest {
    pub task: NewTask,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with `usage` and no choices.
    pub include_usage: bool,
    /// The model as the client named it (every chunk says it).
    pub model: String,
}

/// Where the queue and agent came from, for the error that names them.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// `X-Agentq-Queue`
    pub queue: Option<String>,
    /// `X-Agentq-Agent-Id`
    pub agent_id: Option<String>,
}

/// Checks a chat-completions body (a JSON value already parsed) and builds its task.
/// `routing`: the headers' queue and agent; `metadata.queue` / `metadata.agent_id` do the
/// same, and a header and a metadata value that disagree are refused.
pub fn parse(state: &AppState, body: Value, routing: &Routing) -> Result<ChatRequest, OaiError> {
    let Value::Object(mut obj) = body else {
        return Err(OaiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ));
    };
    // an explicit null is "not given", as OpenAI reads it
    obj.retain(|_, v| !v.is_null());
    if let Some(p) = UNSUPPORTED.iter().find(|p| obj.contains_key(**p)) {
        return Err(OaiError::invalid(
            *p,
            format!("{p} is not supported by this deployment (agentq does not pass it on)"),
        )
        .code("unsupported_parameter"));
    }
    let stream = match obj.remove("stream") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(OaiError::invalid("stream", "must be a boolean")),
    };
    let include_usage = match obj.remove("stream_options") {
        None => false,
        Some(_) if !stream => {
            return Err(OaiError::invalid(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ))
        }
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| *k != "include_usage") {
                return Err(OaiError::invalid(
                    format!("stream_options.{k}"),
                    format!("unknown stream option {k:?}"),
                ));
            }
            match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(OaiError::invalid(
                        "stream_options.include_usage",
                        "must be a boolean",
                    ))
                }
            }
        }
        Some(_) => return Err(OaiError::invalid("stream_options", "must be an object")),
    };
    match obj.remove("n") {
        None => {}
        Some(n) if n.as_f64() == Some(1.0) => {}
        Some(_) => {
            return Err(OaiError::invalid(
                "n",
                "only n = 1 is supported (one task is one completion)",
            )
            .code("unsupported_value"))
        }
    }
    // `store` asks OpenAI to keep the completion; agentq keeps every task anyway
    if !matches!(obj.remove("store"), None | Some(Value::Bool(_))) {
        return Err(OaiError::invalid("store", "must be a boolean"));
    }
    let metadata = match obj.remove("metadata") {
        None => None,
        Some(Value::Object(m)) => Some(check_metadata(m)?),
        Some(_) => return Err(OaiError::invalid("metadata", "must be an object")),
    };
    if let Some(k) = obj.keys().find(|k| !PASSED.contains(&k.as_str())) {
        let shown: String = k.chars().take(64).collect();
        return Err(OaiError::invalid(
            shown.clone(),
            format!("Unrecognized request argument supplied: {shown}"),
        )
        .code("unknown_parameter"));
    }
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Err(OaiError::invalid("model", "must be a string")),
        None => {
            return Err(OaiError::invalid(
                "model",
                "you must provide a model parameter",
            ))
        }
    };
    if !obj.contains_key("messages") {
        return Err(OaiError::invalid(
            "messages",
            "Missing required parameter: 'messages'",
        ));
    }
    let from_meta = |key: &str| {
        metadata
            .as_ref()
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let queue = pick(routing.queue.clone(), from_meta("queue"), "queue")?;
    let agent_id = pick(routing.agent_id.clone(), from_meta("agent_id"), "agent_id")?;
    let create: CreateTask = serde_path_to_error::deserialize(Value::Object(obj))
        .map_err(|e| OaiError::from(crate::routes::body_error(e)))?;
    let create = CreateTask {
        queue: queue.clone(),
        agent_id,
        metadata,
        ..create
    };
    let mut task = create
        .validate(
            &state.config.default_queue,
            state.config.common.max_attempts,
        )
        .map_err(|e| match e.field.as_str() {
            // the headers' names where the value came from them
            "queue" if routing.queue.is_some() => OaiError::invalid("X-Agentq-Queue", e.message),
            "agent_id" if routing.agent_id.is_some() => {
                OaiError::invalid("X-Agentq-Agent-Id", e.message)
            }
            "queue" | "agent_id" => OaiError::invalid(format!("metadata.{}", e.field), e.message),
            _ => OaiError::invalid(e.field, e.message),
        })?;
    if let Err(e) = task.check_models(&state.config.upstreams) {
        return Err(if e.field == "model" {
            model_not_found(&model)
        } else {
            OaiError::invalid(e.field, e.message)
        });
    }
    if !state.config.declares(&task.queue) {
        let param = if routing.queue.is_some() {
            "X-Agentq-Queue"
        } else {
            "metadata.queue"
        };
        return Err(OaiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "queue {:?} is not declared (AGENTQ_QUEUES lists the queues this api serves)",
                task.queue
            ),
        )
        .param(param)
        .code("unknown_queue"));
    }
    task.payload.chat_completion = true;
    Ok(ChatRequest {
        task,
        stream,
        include_usage,
        model,
    })
}

/// A header and a metadata value for the same thing: either, or both when they agree.
fn pick(
    header: Option<String>,
    meta: Option<String>,
    what: &str,
) -> Result<Option<String>, OaiError> {
    match (header, meta) {
        (Some(h), Some(m)) if h != m => Err(OaiError::invalid(
            format!("metadata.{what}"),
            format!("metadata.{what} and the X-Agentq header for it disagree"),
        )),
        (h, m) => Ok(h.or(m)),
    }
}

fn check_metadata(m: Map<String, Value>) -> Result<Map<String, Value>, OaiError> {
    if m.len() > METADATA_PAIRS {
        return Err(OaiError::invalid(
            "metadata",
            format!("at most {METADATA_PAIRS} key-value pairs"),
        ));
    }
    for (k, v) in &m {
        if k.is_empty() || k.chars().count() > METADATA_KEY {
            return Err(OaiError::invalid(
                "metadata",
                format!("keys must be 1 to {METADATA_KEY} characters"),
            ));
        }
        match v {
            Value::String(s) if s.chars().count() <= METADATA_VALUE => {}
            _ => {
                let shown: String = k.chars().take(METADATA_KEY).collect();
                return Err(OaiError::invalid(
                    format!("metadata.{shown}"),
                    format!("values must be strings of at most {METADATA_VALUE} characters"),
                ));
            }
        }
    }
    Ok(m)
}

/// The `chat.completion` object of a succeeded task's result. `id`: the task id (the
/// completion's id is `chatcmpl-<task id>`); `created`: Unix seconds.
pub fn completion(id: &str, created: i64, result: &TaskResult) -> Value {
    json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": created,
        "model": result.model,
        "choices": [{
            "index": 0,
            "message": message(result),
            "logprobs": null,
            "finish_reason": finish_reason(result),
        }],
        "usage": usage(&result.usage),
        "system_fingerprint": null,
    })
}

fn message(result: &TaskResult) -> Value {
    let mut m = json!({
        "role": "assistant",
        "content": content(result),
        "refusal": result.refusal,
    });
    if let Some(calls) = &result.tool_calls {
        m["tool_calls"] = calls.clone();
    }
    m
}

/// The reply's text; `null` when the model answered only with tool calls or a refusal, as
/// OpenAI sends it.
fn content(result: &TaskResult) -> Value {
    if result.content.is_empty() && (result.tool_calls.is_some() || result.refusal.is_some()) {
        Value::Null
    } else {
        Value::String(result.content.clone())
    }
}

pub(crate) fn finish_reason(result: &TaskResult) -> String {
    result.finish_reason.clone().unwrap_or_else(|| {
        if result.tool_calls.is_some() {
            "tool_calls".to_owned()
        } else {
            "stop".to_owned()
        }
    })
}

pub(crate) fn usage(u: &agentq_common::task::Usage) -> Value {
    let total = if u.total_tokens > 0 {
        u.total_tokens
    } else {
        u.prompt_tokens.saturating_add(u.completion_tokens)
    };
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": total,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens.unwrap_or(0)},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens.unwrap_or(0)},
    })
}

/// A task that ended without an answer, as the error an OpenAI client expects. Each says
/// `x-should-retry: false`: the fleet already retried what could be retried, and an SDK
/// resending the request would only enqueue (and pay for) the same work again.
pub fn task_error(view: &TaskView) -> OaiError {
    let error = view.error.clone().unwrap_or_default();
    let id = &view.id;
    let e = if view.status == agentq_common::task::Status::Cancelled {
        OaiError::new(
            StatusCode::CONFLICT,
            format!("task {id} was cancelled before it answered"),
        )
        .code("cancelled")
    } else if view.error_code.as_deref() == Some(agentq_common::task::BUDGET_EXCEEDED) {
        OaiError::new(StatusCode::TOO_MANY_REQUESTS, error)
            .kind("insufficient_quota")
            .code("budget_exceeded")
    } else if let Some((status, body)) = upstream_answer(&error) {
        // the upstream refused the request itself: its status and words, unless it refused
        // agentq's own credentials (the client's request was not at fault)
        match status {
            401 | 403 => OaiError::new(
                StatusCode::BAD_GATEWAY,
                format!("the upstream refused this deployment's credentials ({status})"),
            )
            .code("upstream_auth"),
            400..=499 => {
                let upstream: Option<Value> = serde_json::from_str(body).ok();
                let msg = upstream
                    .as_ref()
                    .and_then(|v| v["error"]["message"].as_str())
                    .map_or_else(|| body.to_owned(), str::to_owned);
                let mut e = OaiError::new(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                    msg,
                );
                if let Some(p) = upstream.as_ref().and_then(|v| v["error"]["param"].as_str()) {
                    e = e.param(p);
                }
                if let Some(c) = upstream.as_ref().and_then(|v| v["error"]["code"].as_str()) {
                    e = e.code(c);
                }
                e
            }
            _ => OaiError::new(StatusCode::BAD_GATEWAY, error).code("upstream_error"),
        }
    } else {
        OaiError::new(StatusCode::BAD_GATEWAY, error).code(
            view.error_code
                .clone()
                .unwrap_or_else(|| "upstream_error".to_owned()),
        )
    };
    e.should_retry(false)
}

/// `llm answered 400: {body}` (the worker's words for an upstream's refusal): status and body.
fn upstream_answer(error: &str) -> Option<(u16, &str)> {
    let rest = error.strip_prefix("llm answered ")?;
    let (status, body) = rest.split_once(": ")?;
    Some((status.parse().ok()?, body))
}

/// Where the request ended, for `agentq_chat_completions_total`.
fn count(state: &AppState, stream: bool, outcome: &str) {
    state
        .metrics
        .chat_completions
        .with_label_values(&[if stream { "stream" } else { "wait" }, outcome])
        .inc();
}

/// A header of ours: absent, or visible ASCII; the error names it.
fn header(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, OaiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
            _ => Err(OaiError::invalid(name, "must be visible ASCII, not empty")),
        },
    }
}

/// `X-Agentq-Wait-Secs` shortens the wait for one call (never past `AGENTQ_CHAT_WAIT_SECS`);
/// `X-Agentq-Cancel-On-Disconnect: true|false` overrides `AGENTQ_CHAT_CANCEL_ON_DISCONNECT`.
fn options(state: &AppState, headers: &HeaderMap) -> Result<(Duration, bool), OaiError> {
    let max = state.config.chat_wait;
    let wait = match header(headers, "x-agentq-wait-secs")? {
        None => max,
        Some(s) => match s.parse::<u64>() {
            Ok(n) if n >= 1 => Duration::from_secs(n).min(max),
            _ => {
                return Err(OaiError::invalid(
                    "X-Agentq-Wait-Secs",
                    format!("must be a whole number of seconds, 1 to {}", max.as_secs()),
                ))
            }
        },
    };
    let cancel = match header(headers, "x-agentq-cancel-on-disconnect")?.as_deref() {
        None => state.config.chat_cancel_on_disconnect,
        Some("true") => true,
        Some("false") => false,
        Some(_) => {
            return Err(OaiError::invalid(
                "X-Agentq-Cancel-On-Disconnect",
                "must be true or false",
            ))
        }
    };
    Ok((wait, cancel))
}

/// Counts (and, if asked to, cancels the task) when the client hangs up before its answer:
/// dropped with the request's future (a wait) or its response stream (a stream) unless
/// disarmed first.
struct HangUp {
    state: AppState,
    id: TaskId,
    armed: bool,
    cancel: bool,
    stream: bool,
}

impl HangUp {
    /// The call ended as `outcome`: counted once, nothing to do when dropped.
    fn end(&mut self, outcome: &str) {
        if self.armed {
            self.armed = false;
            count(&self.state, self.stream, outcome);
        }
    }
}

impl Drop for HangUp {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        count(&self.state, self.stream, "disconnected");
        if !self.cancel {
            return;
        }
        let state = self.state.clone();
        let id = self.id.clone();
        tokio::spawn(async move {
            match crate::routes::cancel(&state, &id).await {
                Ok(_) => tracing::info!(task.id = %id, "chat client hung up; task cancelled"),
                Err(e) => {
                    tracing::debug!(task.id = %id, error = %e.message, "chat client hung up; not cancelled")
                }
            }
        });
    }
}

/// `POST /v1/chat/completions`
pub async fn create(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match handle(state, caller, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(
    state: AppState,
    caller: crate::auth::Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OaiError> {
    let idem = crate::routes::idempotency_key(&headers)?
        .map(|k| agentq_common::tenant::idempotency_key(caller.tenant(), &k).into_owned());
    let value: Value = crate::routes::json_body(&headers, body)?;
    let routing = Routing {
        queue: header(&headers, "x-agentq-queue")?,
        agent_id: header(&headers, "x-agentq-agent-id")?,
    };
    let mut req = parse(&state, value, &routing)?;
    req.task.payload.tenant = caller.tenant().map(str::to_owned);
    let (wait, cancel) = options(&state, &headers)?;
    crate::tenants::admit(&state, &caller).await?;
    // the stream place first: refused, nothing was written
    let Some(slot) = crate::events::take_slot(&state) else {
        count(&state, req.stream, "refused");
        let mut e = OaiError::from(crate::events::too_many_streams(&state));
        e.should_retry = Some(true);
        return Err(e);
    };
    let ttl = state.config.common.result_ttl;
    let (id, outcome) = deadline(state.broker.enqueue(&req.task, idem.as_deref(), ttl)).await?;
    if let Enqueued::OverQuota { pending } = outcome {
        return Err(crate::routes::over_pending(&state, pending).into());
    }
    if outcome == Enqueued::Created {
        state
            .metrics
            .enqueued
            .with_label_values(&[&req.task.queue])
            .inc();
        crate::routes::register_queue(&state, &req.task.queue).await;
    }
    let tid = TaskId::parse(&id).map_err(|_| {
        OaiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the queue gave a bad task id",
        )
    })?;
    let created = agentq_common::time::now_ms() / 1000;
    let hangup = HangUp {
        state: state.clone(),
        id: tid.clone(),
        armed: true,
        cancel,
        stream: req.stream,
    };
    let feed = crate::events::task_feed(state.clone(), tid.clone(), slot);
    let mut resp = if req.stream {
        streamed(state, req, tid, created, feed, wait, hangup)
    } else {
        waited(state, tid, created, feed, wait, hangup).await?
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert("x-agentq-task-id", v.clone());
        // the SDKs keep it as the response's request id (`_request_id`)
        h.insert("x-request-id", v);
    }
    if outcome == Enqueued::Existing {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// Waits for the task's end on its event stream, then answers from its record: the completion,
/// the error it ended with, or (past the wait) 202 with the task id.
async fn waited(
    state: AppState,
    id: TaskId,
    created: i64,
    mut feed: crate::events::Feed,
    wait: Duration,
    mut hangup: HangUp,
) -> Result<Response, OaiError> {
    let until = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(until, feed.next()).await {
            // time is up, or the stream ended (the server is stopping): the record says where
            // the task is
            Err(_) | Ok(None) => break,
            Ok(Some(ev)) => {
                if ev.comment.is_some() || matches!(ev.name(), Some("done" | "error")) {
                    break;
                }
            }
        }
    }
    // the stream place goes back before the record is read
    drop(feed);
    let view = match deadline(state.broker.get(&id)).await {
        Ok(v) => v,
        Err(e) => {
            hangup.end("unavailable");
            return Err(e.into());
        }
    };
    let Some(view) = view else {
        hangup.end("failed");
        return Err(OaiError::new(
            StatusCode::NOT_FOUND,
            format!("task {id} is gone (its record expired)"),
        )
        .should_retry(false));
    };
    match (view.status, &view.result) {
        (Status::Succeeded, Some(result)) => {
            hangup.end("succeeded");
            Ok(Json(completion(&view.id, created, result)).into_response())
        }
        (s, _) if s.is_final() => {
            hangup.end(if s == Status::Cancelled {
                "cancelled"
            } else {
                "failed"
            });
            Err(task_error(&view))
        }
        _ => {
            hangup.end("timeout");
            Ok(still_running(&view, wait))
        }
    }
}

/// A task that outlived the wait: 202 and where to find it, rather than a connection held
/// open without end. The task runs on; its result is the completion.
fn still_running(view: &TaskView, waited: Duration) -> Response {
    let task_url = format!("/v1/tasks/{}", view.id);
    let body = json!({
        "id": view.id,
        "object": "agentq.task",
        "status": view.status.as_str(),
        "task_url": task_url,
        "events_url": format!("{task_url}/events"),
        "message": format!(
            "the task is still {} after {} s (AGENTQ_CHAT_WAIT_SECS or X-Agentq-Wait-Secs); it runs on: GET task_url for its result, or follow events_url",
            view.status.as_str(),
            waited.as_secs()
        ),
    });
    let mut r = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&task_url) {
        r.headers_mut().insert(axum::http::header::LOCATION, v);
    }
    r
}

/// `stream: true`: OpenAI's chunks, fed from the task's event stream.
fn streamed(
    state: AppState,
    req: ChatRequest,
    id: TaskId,
    created: i64,
    feed: crate::events::Feed,
    wait: Duration,
    hangup: HangUp,
) -> Response {
    let chunks = Chunks {
        state,
        completion_id: format!("chatcmpl-{id}"),
        id,
        model: req.model,
        created,
        include_usage: req.include_usage,
        feed,
        hangup,
        until: tokio::time::Instant::now() + wait,
        sent: String::new(),
        attempt: None,
        current: String::new(),
        out: VecDeque::new(),
        started: false,
        done: false,
    };
    let stream = futures::stream::unfold(chunks, |mut c| async move {
        c.next()
            .await
            .map(|d| (Ok::<_, Infallible>(Event::default().data(d)), c))
    });
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    r
}

/// The chunks of one streamed completion.
///
/// The task's `delta` events carry the text of each attempt. A retried attempt starts its text
/// again, and what a client already got cannot be taken back: the next attempt's text is sent
/// on only while it repeats what was sent (a deterministic model, or a retry before any text)
/// and continues it; an attempt whose text departs from it ends the stream with an error
/// (`stream_diverged`, naming the task, which runs on), never a mixed answer.
struct Chunks {
    state: AppState,
    id: TaskId,
    completion_id: String,
    model: String,
    created: i64,
    include_usage: bool,
    feed: crate::events::Feed,
    hangup: HangUp,
    until: tokio::time::Instant,
    /// The text the client has.
    sent: String,
    /// The attempt whose text `current` is.
    attempt: Option<u64>,
    current: String,
    out: VecDeque<String>,
    started: bool,
    done: bool,
}

impl Chunks {
    fn chunk(&self, delta: Value, finish_reason: Option<String>) -> String {
        let mut c = json!({
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c.to_string()
    }

    /// Ends the stream with an OpenAI error object (the SDKs raise it as an `APIError`).
    fn fail(&mut self, outcome: &str, error: &OaiError) {
        self.out.push_back(error.body().to_string());
        self.done = true;
        self.hangup.end(outcome);
    }

    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(d) = self.out.pop_front() {
                return Some(d);
            }
            if self.done {
                return None;
            }
            if !self.started {
                // OpenAI's first chunk: the role, before any text
                self.started = true;
                let first = self.chunk(json!({"role": "assistant", "content": ""}), None);
                self.out.push_back(first);
                continue;
            }
            let ev = match tokio::time::timeout_at(self.until, self.feed.next()).await {
                Err(_) => {
                    let e = OaiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "task {} is still running after the wait (AGENTQ_CHAT_WAIT_SECS); it runs on: GET /v1/tasks/{} for its result",
                            self.id, self.id
                        ),
                    )
                    .code("wait_timeout");
                    self.fail("timeout", &e);
                    continue;
                }
                Ok(Some(ev)) if ev.comment.is_none() => ev,
                Ok(_) => {
                    let e = OaiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "the server closed the stream; task {} runs on: GET /v1/tasks/{} for its result",
                            self.id, self.id
                        ),
                    )
                    .code("stream_closed");
                    self.fail("closed", &e);
                    continue;
                }
            };
            match ev.name() {
                // a new attempt, or a fallback model after text went out: its text starts over
                Some("attempt_started") => self.current.clear(),
                Some("delta") => self.delta(&ev.data),
                Some("done") => self.finish(&ev.data),
                Some("error") => self.failed().await,
                _ => {}
            }
        }
    }

    fn diverged(&mut self) {
        let e = OaiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "task {} was retried after part of its answer was streamed, and the new attempt's text differs: the streamed text is void. The task runs on: GET /v1/tasks/{} for its result",
                self.id, self.id
            ),
        )
        .code("stream_diverged");
        self.fail("diverged", &e);
    }

    /// Sends what `text` (the whole text the current attempt has now) adds to what was sent.
    fn extend_to(&mut self, text: &str) -> bool {
        if text.len() <= self.sent.len() {
            return self.sent.starts_with(text);
        }
        if !text.starts_with(self.sent.as_str()) {
            return false;
        }
        let more = &text[self.sent.len()..];
        let c = self.chunk(json!({ "content": more }), None);
        self.out.push_back(c);
        self.sent = text.to_owned();
        true
    }

    fn delta(&mut self, data: &str) {
        let Ok(d) = serde_json::from_str::<Value>(data) else {
            return;
        };
        let attempt = d["attempt"].as_u64();
        if attempt != self.attempt {
            self.attempt = attempt;
            self.current.clear();
        }
        self.current
            .push_str(d["text"].as_str().unwrap_or_default());
        let current = std::mem::take(&mut self.current);
        let ok = self.extend_to(&current);
        self.current = current;
        if !ok {
            self.diverged();
        }
    }

    fn finish(&mut self, data: &str) {
        let result = serde_json::from_str::<Value>(data)
            .ok()
            .and_then(|d| serde_json::from_value::<TaskResult>(d["result"].clone()).ok());
        let Some(result) = result else {
            let e = OaiError::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "task {} succeeded but its result could not be read: GET /v1/tasks/{}",
                    self.id, self.id
                ),
            );
            self.fail("failed", &e);
            return;
        };
        // the answer must be the text sent so far, or go on from it: shorter is another answer
        if result.content.len() < self.sent.len() || !self.extend_to(&result.content) {
            self.diverged();
            return;
        }
        if let Some(Value::Array(calls)) = &result.tool_calls {
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut c = c.clone();
                    c["index"] = json!(i);
                    c
                })
                .collect();
            let c = self.chunk(json!({ "tool_calls": calls }), None);
            self.out.push_back(c);
        }
        if let Some(r) = &result.refusal {
            let c = self.chunk(json!({ "refusal": r }), None);
            self.out.push_back(c);
        }
        let c = self.chunk(json!({}), Some(finish_reason(&result)));
        self.out.push_back(c);
        if self.include_usage {
            let mut u: Value =
                serde_json::from_str(&self.chunk(json!({}), None)).unwrap_or_else(|_| json!({}));
            u["choices"] = json!([]);
            u["usage"] = usage(&result.usage);
            self.out.push_back(u.to_string());
        }
        self.out.push_back("[DONE]".to_owned());
        self.done = true;
        self.hangup.end("succeeded");
    }

    /// The task ended without an answer: its record says how.
    async fn failed(&mut self) {
        let view = match deadline(self.state.broker.get(&self.id)).await {
            Ok(Some(v)) => v,
            _ => {
                let e = OaiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("task {} failed: GET /v1/tasks/{}", self.id, self.id),
                );
                self.fail("failed", &e);
                return;
            }
        };
        let outcome = if view.status == Status::Cancelled {
            "cancelled"
        } else {
            "failed"
        };
        self.fail(outcome, &task_error(&view));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_refusals_are_read_back() {
        assert_eq!(
            upstream_answer(r#"llm answered 400: {"error":{}}"#),
            Some((400, r#"{"error":{}}"#))
        );
        assert_eq!(upstream_answer("timeout: no answer"), None);
        assert_eq!(upstream_answer("llm answered x: y"), None);
    }

    #[test]
    fn metadata_is_bounded_like_openai() {
        let ok: Map<String, Value> = serde_json::from_value(json!({"a": "b"})).expect("map");
        assert!(check_metadata(ok).is_ok());
        let long: Map<String, Value> =
            serde_json::from_value(json!({"a": "x".repeat(513)})).expect("map");
        assert_eq!(
            check_metadata(long).map_err(|e| e.param),
            Err(Some("metadata.a".to_owned()))
        );
        let not_text: Map<String, Value> = serde_json::from_value(json!({"a": 1})).expect("map");
        assert!(check_metadata(not_text).is_err());
        let many: Map<String, Value> = (0..17).map(|i| (i.to_string(), json!("v"))).collect();
        assert!(check_metadata(many).is_err());
    }
}
