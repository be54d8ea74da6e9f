//! `POST /v1/chat/completions`: a chat-completions request becomes a task (same limiter,
//! budgets, retries and fencing as `POST /v1/tasks`), and the call waits for it: the answer in
//! OpenAI's `chat.completion` shape, or with `stream: true` its `chat.completion.chunk` SSE fed
//! from the task's event stream. The conversion both ways lives here too, for the Batch API.

use agentq_common::task::{CreateTask, NewTask, TaskResult, TaskView};
use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use super::{model_not_found, OaiError};
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
    task.payload.return_tool_calls = true;
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
