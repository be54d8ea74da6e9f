//! HTTP handlers: the OpenAI-shaped `/v1` surface and the `/_mock` controls.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::journal::JournalEntry;
use crate::markers::{self, Fault, Hint, Plan, Reply};
use crate::quota::{self, Limits, Rejected, Rejection};
use crate::stream;
use crate::{CallOutcome, MockLlm, RequestRecord};

/// Generous: prompts in agent workloads can carry long transcripts.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// `[[hang]]` (and `[[stall]]`) is meant to outlive any sane client timeout.
pub(crate) const HANG: Duration = Duration::from_secs(3600);

const DEFAULT_MODEL: &str = "mock-gpt";

const MODELS_JSON: &str = r#"{"object":"list","data":[{"id":"mock-gpt","object":"model","created":0,"owned_by":"agentq"}]}"#;

/// Response extension telling [`crate::serve`] to close the connection
/// instead of writing this response.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropConnection;

pub(crate) fn router(mock: MockLlm) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/_mock/calls", get(calls))
        .route("/_mock/requests", get(requests))
        .route("/_mock/request_records", get(request_records))
        .route("/_mock/config", get(get_config).post(set_config))
        .route("/_mock/reset", post(reset))
        .route("/_mock/quota", get(get_quota))
        .route("/_mock/block", post(block))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(mock)
}

// ---------------------------------------------------------------------------
// Errors

/// OpenAI's error envelope with the `type` and `code` OpenAI uses for
/// `status` ([`error_kind`]), so SDK clients surface our failures as API
/// errors and tests see what a real server sends.
pub(crate) fn openai_error(status: StatusCode, message: impl Into<String>) -> Response {
    let (kind, code) = error_kind(status);
    error_response(status, message.into(), kind, code, None)
}

/// `type` and `code` of an error answered with `status`, after what OpenAI
/// sends: `invalid_api_key` on 401, a region block on 403, `model_not_found`
/// on 404, `rate_limit_exceeded` (type `requests`, as for a requests-per-minute
/// limit) on 429, `server_error` with no code on 5xx, and
/// `invalid_request_error` with no code on other 4xx.
pub(crate) fn error_kind(status: StatusCode) -> (&'static str, Option<&'static str>) {
    match status.as_u16() {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        403 => (
            "request_forbidden",
            Some("unsupported_country_region_territory"),
        ),
        404 => ("invalid_request_error", Some("model_not_found")),
        408 => ("server_error", Some("timeout")),
        429 => ("requests", Some("rate_limit_exceeded")),
        500..=599 => ("server_error", None),
        _ => ("invalid_request_error", None),
    }
}

fn error_response(
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
) -> Response {
    #[derive(Serialize)]
    struct Envelope {
        error: ErrorBody,
    }
    #[derive(Serialize)]
    struct ErrorBody {
        message: String,
        #[serde(rename = "type")]
        kind: &'static str,
        param: Option<&'static str>,
        code: Option<&'static str>,
    }
    let body = Envelope {
        error: ErrorBody {
            message,
            kind,
            param,
            code,
        },
    };
    (status, Json(body)).into_response()
}

async fn not_found(req: Request) -> Response {
    // OpenAI: "Invalid URL (POST /v1/nope)", with no code.
    error_response(
        StatusCode::NOT_FOUND,
        format!(
            "Invalid URL ({} {}) (mock: no such route)",
            req.method(),
            req.uri().path()
        ),
        "invalid_request_error",
        None,
        None,
    )
}

async fn method_not_allowed(req: Request) -> Response {
    openai_error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "mock: method {} not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}

/// The 401 to send, if the request lacks the configured API key.
fn auth_denial(mock: &MockLlm, headers: &HeaderMap) -> Option<Response> {
    let expected = mock.expected_auth()?;
    match headers.get(AUTHORIZATION) {
        Some(v) if v.as_bytes() == expected => None,
        Some(_) => Some(openai_error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided.",
        )),
        // OpenAI sends no code when the header is missing altogether.
        None => Some(error_response(
            StatusCode::UNAUTHORIZED,
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.".into(),
            "invalid_request_error",
            None,
            None,
        )),
    }
}

// ---------------------------------------------------------------------------
// Chat completions

#[derive(Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow)]
    messages: Vec<Message<'a>>,
    /// `true`: answer a 200 as server-sent `chat.completion.chunk` events.
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    /// Ask for a last chunk carrying `usage` (and `"usage": null` on the others).
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow, default)]
    content: Text<'a>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<WireCall<'a>>>,
    #[serde(borrow, default)]
    tool_call_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct WireCall<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
}

/// What OpenAI refuses in a conversation's order, with its words: a `tool` message that does
/// not answer a call of the assistant message before it, and an assistant `tool_calls` message
/// not followed by an answer to each call. Providers check this strictly; so does the mock.
fn tool_order_error(messages: &[Message<'_>]) -> Option<String> {
    let mut open: Vec<&str> = Vec::new();
    for m in messages {
        if m.role == "tool" {
            let id = m.tool_call_id.as_deref().unwrap_or_default();
            match open.iter().position(|c| *c == id) {
                Some(k) => {
                    open.remove(k);
                }
                None => {
                    return Some(
                        "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'."
                            .to_owned(),
                    )
                }
            }
            continue;
        }
        if !open.is_empty() {
            break;
        }
        if m.role == "assistant" {
            open = m
                .tool_calls
                .iter()
                .flatten()
                .map(|c| c.id.as_ref())
                .collect();
        }
    }
    (!open.is_empty()).then(|| {
        format!(
            "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: {}",
            open.join(", ")
        )
    })
}

/// Message content flattened to text: either a plain string or the text of
/// an array of content parts (joined with newlines), `null` being empty.
#[derive(Default)]
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, an array of content parts, or null")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }

            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Text::default())
            }

            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Text::default())
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut text: Option<Cow<'a, str>> = None;
                while let Some(part) = seq.next_element::<Part<'a>>()? {
                    // Non-text parts (images, audio) carry no words to echo.
                    let Some(t) = part.text else { continue };
                    text = Some(match text {
                        None => t,
                        Some(prev) => Cow::Owned(format!("{prev}\n{t}")),
                    });
                }
                Ok(Text(text.unwrap_or_default()))
            }
        }

        deserializer.deserialize_any(TextVisitor(PhantomData))
    }
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

#[derive(Serialize)]
struct Completion<'a> {
    id: String,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: ReplyMessage<'a>,
    finish_reason: &'static str,
    logprobs: Option<()>,
}

#[derive(Serialize)]
struct ReplyMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// `(prompt_tokens, completion_tokens)` of the echo: words of every message,
/// at least 1, and words of `"echo: <prompt>"`. The quota counts exactly
/// these, so its arithmetic matches the `usage` the client reads.
fn echo_usage(request: &ChatRequest<'_>, prompt: &str) -> (u64, u64) {
    let prompt_tokens = request
        .messages
        .iter()
        .map(|m| words(&m.content.0))
        .sum::<u64>()
        .max(1);
    // "echo:" is one more word than the prompt.
    (prompt_tokens, 1 + words(prompt))
}

/// Counts the call as aborted ([`MockLlm::aborted`]) unless it was answered:
/// hyper drops the handler's future when the client goes away, and this with it.
struct Unanswered<'a>(Option<&'a MockLlm>);

impl Unanswered<'_> {
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(mock) = self.0 {
            mock.count_aborted();
        }
    }
}

async fn chat_completions(State(mock): State<MockLlm>, req: Request) -> Response {
    let unanswered = Unanswered(Some(&mock));
    let response = chat_completion(&mock, req).await;
    unanswered.answered();
    response
}

async fn chat_completion(mock: &MockLlm, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    if let Some(denied) = auth_denial(mock, &headers) {
        return denied;
    }
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(e) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                format!("could not read request body (limit {MAX_BODY_BYTES} bytes): {e}"),
            )
        }
    };
    let request: ChatRequest<'_> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                format!("We could not parse the JSON body of your request: {e}"),
            )
        }
    };
    if request.messages.is_empty() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "Invalid 'messages': empty array. Expected an array with minimum length 1.".into(),
            "invalid_request_error",
            Some("empty_array"),
            Some("messages"),
        );
    }

    if request
        .messages
        .iter()
        .any(|m| m.tool_calls.is_some() || m.role == "tool")
    {
        if let Some(message) = tool_order_error(&request.messages) {
            return error_response(
                StatusCode::BAD_REQUEST,
                message,
                "invalid_request_error",
                None,
                Some("messages"),
            );
        }
    }

    let prompt: &str = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map_or("", |m| &m.content.0);
    let call = mock.count_call(prompt);
    if mock.recording() {
        record(mock, &headers, &body, prompt, call);
    }
    let arrived = Instant::now();
    let gate = gate(mock, &request, prompt, call, arrived);
    let rejected = match &gate {
        Gate::Now(_, rejected) => *rejected,
        Gate::Serve(..) => None,
    };
    // None unless the journal is on. If the client goes away, hyper drops this
    // future and the entry's drop guard records the call as ended right then.
    let mut entry = mock.journal_entry(prompt, call, arrived, rejected);
    let response = match gate {
        Gate::Now(response, _) => response,
        Gate::Serve(plan, limits) => {
            let mut response = answer(mock, &request, prompt, call, plan, &mut entry).await;
            if let Some(limits) = limits {
                limits.apply(response.headers_mut());
            }
            response
        }
    };
    // A streamed answer took the entry: it ends when the stream does.
    if let Some(entry) = entry {
        let outcome = if response.extensions().get::<DropConnection>().is_some() {
            CallOutcome::Dropped
        } else {
            CallOutcome::Status(response.status().as_u16())
        };
        entry.finish(outcome);
    }
    response
}

/// Keeps what the client sent with call `call` of `prompt`. The body is parsed
/// a second time only when recording, to keep the hot path lean.
fn record(mock: &MockLlm, headers: &HeaderMap, body: &[u8], prompt: &str, call: u64) {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    let authorization = headers
        .get(AUTHORIZATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    mock.record_request(RequestRecord {
        prompt: prompt.to_owned(),
        call,
        authorization,
        max_tokens: body.get("max_tokens").and_then(serde_json::Value::as_u64),
        max_completion_tokens: body
            .get("max_completion_tokens")
            .and_then(serde_json::Value::as_u64),
        body,
    });
}

/// What to do with a call, decided at its arrival.
enum Gate<'a> {
    /// Answer at once, with no latency: a storm or quota 429 (a provider
    /// refuses those without running the model) or a malformed marker's 400.
    Now(Response, Option<Rejection>),
    /// Serve it per its markers; with quota mode on, the answer carries these
    /// `x-ratelimit-*` headers.
    Serve(Plan<'a>, Option<Limits>),
}

/// The order: a storm refuses everything; then markers, since a test that
/// scripts a fault (`fail`, `hang`, `drop`) must get it whatever the quota
/// says, and such a call is neither checked nor counted by the quota (it
/// reports no usage); then the quota, for calls that would be served.
fn gate<'a>(
    mock: &MockLlm,
    request: &ChatRequest<'_>,
    prompt: &'a str,
    call: u64,
    now: Instant,
) -> Gate<'a> {
    if let Some(left) = mock.block_left(now) {
        mock.count_blocked();
        return Gate::Now(storm_response(left), Some(Rejection::Blocked));
    }
    let plan = match markers::plan(prompt, call) {
        Ok(plan) => plan,
        Err(msg) => return Gate::Now(openai_error(StatusCode::BAD_REQUEST, msg), None),
    };
    if plan.fault.is_some() {
        return Gate::Serve(plan, None);
    }
    let tokens = || {
        let (prompt_tokens, completion_tokens) = echo_usage(request, prompt);
        prompt_tokens + completion_tokens
    };
    match mock.admit(now, tokens) {
        None => Gate::Serve(plan, None),
        Some(verdict) => match verdict.rejected {
            None => Gate::Serve(plan, Some(verdict.limits)),
            Some(rejected) => {
                let model = request.model.as_deref().unwrap_or(DEFAULT_MODEL);
                let mut response = quota_response(&rejected, model);
                verdict.limits.apply(response.headers_mut());
                Gate::Now(response, Some(rejected.kind))
            }
        },
    }
}

/// OpenAI's 429 for a rate limit, message included (clients and humans read
/// the wait from it): "Rate limit reached for gpt-4o in organization org-…
/// on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again
/// in 20s. …", or "Request too large …" for a request over the whole TPM.
fn quota_response(rejected: &Rejected, model: &str) -> Response {
    let (kind, unit) = match rejected.kind {
        Rejection::Tpm => ("tokens", "tokens per min (TPM)"),
        Rejection::Rpm | Rejection::Blocked => ("requests", "requests per min (RPM)"),
    };
    let message = if rejected.too_large {
        format!(
            "Request too large for {model} in organization org-mock on {unit}: Limit {}, \
             Requested {}. The input or output tokens must be reduced in order to run \
             successfully. Visit https://platform.openai.com/account/rate-limits to learn more.",
            rejected.limit, rejected.requested
        )
    } else {
        format!(
            "Rate limit reached for {model} in organization org-mock on {unit}: Limit {}, \
             Used {}, Requested {}. Please try again in {}. Visit \
             https://platform.openai.com/account/rate-limits to learn more.",
            rejected.limit,
            rejected.used,
            rejected.requested,
            quota::go_duration(rejected.wait)
        )
    };
    error_response(
        StatusCode::TOO_MANY_REQUESTS,
        message,
        kind,
        Some("rate_limit_exceeded"),
        None,
    )
}

/// The 429 of a `block_for` storm, with `left` of it to go.
fn storm_response(left: Duration) -> Response {
    let reset = quota::go_duration(left);
    let mut response = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "Rate limit reached for requests (mock: 429 storm, {reset} left). \
             Please try again in {reset}."
        ),
        "requests",
        Some("rate_limit_exceeded"),
        None,
    );
    let headers = response.headers_mut();
    headers.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from_static("0"),
    );
    if let Ok(v) = HeaderValue::from_str(&reset) {
        headers.insert("x-ratelimit-reset-requests", v);
    }
    headers.insert(
        RETRY_AFTER,
        HeaderValue::from(quota::retry_after_secs(left)),
    );
    response
}

/// The answer to call number `call` of `prompt` per its `plan`: scripted
/// faults, latency, or the echo. A streamed 200 takes the journal `entry`
/// along, since the call only ends when its last chunk is out.
async fn answer(
    mock: &MockLlm,
    request: &ChatRequest<'_>,
    prompt: &str,
    call: u64,
    plan: Plan<'_>,
    entry: &mut Option<JournalEntry>,
) -> Response {
    let delay = mock.latency().saturating_add(plan.extra_latency);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    match plan.fault {
        Some(Fault::Hang) => {
            if let Some(entry) = entry.as_mut() {
                entry.hanging();
            }
            tokio::time::sleep(HANG).await;
            return openai_error(StatusCode::GATEWAY_TIMEOUT, "mock: [[hang]] gave up");
        }
        Some(Fault::Drop) => return drop_connection(),
        Some(Fault::Fail { status, hints }) => return scripted_failure(status, &hints, call),
        None => {}
    }

    let error_rate = mock.error_rate();
    if error_rate > 0.0 && rand::random::<f64>() < error_rate {
        return openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "mock: random failure (error_rate)",
        );
    }

    let reply = match plan.say {
        Some(text) => text.to_owned(),
        None => format!("echo: {prompt}"),
    };
    let (prompt_tokens, completion_tokens) = echo_usage(request, prompt);
    let created = unix_now();
    // Streamed answers are built from the very body a non-streamed call
    // would get, so both carry the same content, tool calls and usage.
    let streaming = request.stream.unwrap_or(false).then(|| stream::Options {
        rate: plan.stream_rate.unwrap_or_else(|| mock.stream_rate()),
        fault: plan.stream_fault,
        include_usage: request
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    });
    if plan.reply.is_some() || !plan.calls.is_empty() {
        let echo = Echo {
            reply: &reply,
            model: request.model.as_deref().unwrap_or(DEFAULT_MODEL),
            created,
            prompt_tokens,
            completion_tokens,
        };
        let body = match plan.reply {
            Some(shape) => shaped_reply(mock, shape, &echo),
            None => tool_reply(mock, request, &plan.calls, call, &echo),
        };
        return match streaming {
            Some(options) => stream::respond(mock, &body, options, entry.take()),
            None => Json(body).into_response(),
        };
    }
    let completion = Completion {
        id: format!("chatcmpl-{}", mock.next_id()),
        object: "chat.completion",
        created,
        model: request.model.as_deref().unwrap_or(DEFAULT_MODEL),
        choices: [Choice {
            index: 0,
            message: ReplyMessage {
                role: "assistant",
                content: &reply,
            },
            finish_reason: "stop",
            logprobs: None,
        }],
        usage: Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        },
    };
    match streaming {
        None => Json(completion).into_response(),
        // Plain structs with string keys always serialize; the arm is there
        // only because the signature allows an error.
        Some(options) => match serde_json::to_value(&completion) {
            Ok(body) => stream::respond(mock, &body, options, entry.take()),
            Err(e) => openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("mock: cannot build the streamed answer: {e}"),
            ),
        },
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What every reply shape is built from: the echo and its usage.
struct Echo<'a> {
    reply: &'a str,
    model: &'a str,
    created: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

const TOOL_NAME: &str = "get_weather";
const TOOL_ARGUMENTS: &str = r#"{"city":"Paris"}"#;
const REFUSAL: &str = "I can't help with that.";
const CACHED_TOKENS: u64 = 3;
const REASONING_TOKENS: u64 = 2;

/// The body of a 200 in the shape `[[reply:KIND]]` asked for. Built with
/// `json!`: only prompts with markers get here, so the plain echo keeps its
/// typed fast path.
fn shaped_reply(mock: &MockLlm, shape: Reply, echo: &Echo<'_>) -> serde_json::Value {
    use serde_json::{json, Value};
    let id = mock.next_id();
    let usage = json!({
        "prompt_tokens": echo.prompt_tokens,
        "completion_tokens": echo.completion_tokens,
        "total_tokens": echo.prompt_tokens + echo.completion_tokens,
    });
    let completion = |message: Value, finish_reason: &str, usage: Option<Value>| {
        let mut body = json!({
            "id": format!("chatcmpl-{id}"),
            "object": "chat.completion",
            "created": echo.created,
            "model": echo.model,
            "choices": [{
                "index": 0,
                "message": message,
                "finish_reason": finish_reason,
                "logprobs": null,
            }],
        });
        if let (Some(usage), Some(obj)) = (usage, body.as_object_mut()) {
            obj.insert("usage".into(), usage);
        }
        body
    };
    let body = match shape {
        Reply::ToolCalls => completion(
            json!({
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "id": format!("call_mock_{id}"),
                    "type": "function",
                    "function": {"name": TOOL_NAME, "arguments": TOOL_ARGUMENTS},
                }],
            }),
            "tool_calls",
            Some(usage),
        ),
        Reply::Refusal => completion(
            json!({"role": "assistant", "content": null, "refusal": REFUSAL}),
            "stop",
            Some(usage),
        ),
        Reply::Empty => completion(
            json!({"role": "assistant", "content": null}),
            "length",
            Some(usage),
        ),
        Reply::Groq => {
            let mut body = completion(
                json!({"role": "assistant", "content": echo.reply}),
                "stop",
                Some(json!({
                    "queue_time": 0.017_283_5,
                    "prompt_tokens": echo.prompt_tokens,
                    "prompt_time": 0.000_412,
                    "completion_tokens": echo.completion_tokens,
                    "completion_time": 0.002_1,
                    "total_tokens": echo.prompt_tokens + echo.completion_tokens,
                    "total_time": 0.002_512,
                })),
            );
            if let Some(obj) = body.as_object_mut() {
                obj.insert("system_fingerprint".into(), json!("fp_mock_groq"));
                obj.insert("x_groq".into(), json!({"id": format!("req_mock_{id}")}));
                obj.insert("service_tier".into(), json!("on_demand"));
            }
            body
        }
        Reply::Sparse => json!({
            "object": "chat.completion",
            "model": null,
            "choices": [{
                "message": {"role": "assistant", "content": echo.reply},
                "finish_reason": "eos_token",
            }],
            "usage": {
                "prompt_tokens": echo.prompt_tokens,
                "completion_tokens": echo.completion_tokens,
            },
        }),
        Reply::NoUsage => completion(
            json!({"role": "assistant", "content": echo.reply}),
            "stop",
            None,
        ),
        Reply::Error200 => json!({"error": {
            "message": "upstream overloaded",
            "type": "server_error",
            "code": "overloaded",
        }}),
        Reply::Error200Rate => json!({"error": {
            "message": "Rate limit reached",
            "type": "rate_limit_error",
            "code": 429,
        }}),
        Reply::Cached => completion(
            json!({"role": "assistant", "content": echo.reply}),
            "stop",
            Some(json!({
                "prompt_tokens": echo.prompt_tokens,
                "completion_tokens": echo.completion_tokens,
                "total_tokens": echo.prompt_tokens + echo.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": REASONING_TOKENS,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            })),
        ),
        Reply::Parts => completion(
            json!({"role": "assistant", "content": [{"type": "text", "text": echo.reply}]}),
            "stop",
            Some(usage),
        ),
    };
    body
}

/// `[[call:NAME:ARGS]]`: while the conversation does not end with tool results, the model asks
/// for every scripted tool at once (ids `call_<call>_<k>`, `finish_reason: "tool_calls"`); once
/// it does, it answers `tool results: <each result>` — what an agent loop needs to be tested.
fn tool_reply(
    mock: &MockLlm,
    request: &ChatRequest<'_>,
    calls: &[(&str, &str)],
    call: u64,
    echo: &Echo<'_>,
) -> serde_json::Value {
    use serde_json::json;
    let results: Vec<&str> = request
        .messages
        .iter()
        .rev()
        .take_while(|m| m.role == "tool")
        .map(|m| m.content.0.as_ref())
        .collect();
    let id = mock.next_id();
    let (message, finish_reason) = if results.is_empty() {
        let tool_calls: Vec<_> = calls
            .iter()
            .enumerate()
            .map(|(k, (name, args))| {
                json!({
                    "id": format!("call_{call}_{k}"),
                    "type": "function",
                    "function": {"name": name, "arguments": args},
                })
            })
            .collect();
        (
            json!({"role": "assistant", "content": null, "tool_calls": tool_calls}),
            "tool_calls",
        )
    } else {
        // oldest result first, as the calls were made
        let text: Vec<&str> = results.into_iter().rev().collect();
        (
            json!({"role": "assistant", "content": format!("tool results: {}", text.join("; "))}),
            "stop",
        )
    };
    json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": echo.created,
        "model": echo.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": null}],
        "usage": {
            "prompt_tokens": echo.prompt_tokens,
            "completion_tokens": echo.completion_tokens,
            "total_tokens": echo.prompt_tokens + echo.completion_tokens,
        },
    })
}

fn scripted_failure(status: u16, hints: &[Hint<'_>], call: u64) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = if status == StatusCode::TOO_MANY_REQUESTS {
        format!("Rate limit reached for requests (mock: scripted failure 429 on call {call})")
    } else {
        format!("mock: scripted failure {} on call {call}", status.as_u16())
    };
    let mut response = openai_error(status, message);
    let headers = response.headers_mut();
    for hint in hints {
        // Values were validated as header-safe when the marker was parsed, so
        // `from_str` cannot fail; a hint that somehow did is simply left out.
        let text = |v: &str| HeaderValue::from_str(v).ok();
        let zero = HeaderValue::from_static("0");
        let (name, value) = match *hint {
            Hint::Seconds(s) => (RETRY_AFTER.as_str(), Some(HeaderValue::from(s))),
            Hint::DateIn(s) => (
                RETRY_AFTER.as_str(),
                HeaderValue::from_str(&httpdate::fmt_http_date(whole_seconds_from_now(s))).ok(),
            ),
            Hint::Raw(v) => (RETRY_AFTER.as_str(), text(v)),
            Hint::Ms(v) => ("retry-after-ms", text(v)),
            Hint::LiteLlm(v) => ("llm_provider-retry-after", text(v)),
            Hint::ResetRequests(v) => {
                headers.insert("x-ratelimit-remaining-requests", zero);
                ("x-ratelimit-reset-requests", text(v))
            }
            Hint::ResetTokens(v) => {
                headers.insert("x-ratelimit-remaining-tokens", zero);
                ("x-ratelimit-reset-tokens", text(v))
            }
            Hint::Anthropic(s) => (
                "anthropic-ratelimit-requests-reset",
                HeaderValue::from_str(&rfc3339(whole_seconds_from_now(s))).ok(),
            ),
        };
        if let Some(value) = value {
            headers.insert(name, value);
        }
    }
    response
}

/// `S` seconds from now, rounded up to a whole second: dates in headers have
/// whole-second resolution and must never be earlier than S seconds from now.
fn whole_seconds_from_now(s: u64) -> SystemTime {
    let now = SystemTime::now();
    let subsec = now.duration_since(UNIX_EPOCH).map_or(Duration::ZERO, |d| {
        Duration::from_nanos(d.subsec_nanos().into())
    });
    let round_up = if subsec.is_zero() {
        Duration::ZERO
    } else {
        Duration::from_secs(1) - subsec
    };
    now + Duration::from_secs(s) + round_up
}

/// `2026-03-01T12:00:05Z` (RFC 3339, UTC, whole seconds), as Anthropic's
/// `anthropic-ratelimit-*-reset` headers carry it.
fn rfc3339(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (>= 0).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A response [`crate::serve`] turns into a closed connection. Under any
/// other server the body errors right after the headers, which is the closest
/// a plain handler can get.
fn drop_connection() -> Response {
    let failing = futures::stream::once(async {
        Err::<Bytes, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "mock: [[drop]]",
        ))
    });
    let mut response = Response::new(Body::from_stream(failing));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response.extensions_mut().insert(DropConnection);
    response
}

async fn models(State(mock): State<MockLlm>, headers: HeaderMap) -> Response {
    if let Some(denied) = auth_denial(&mock, &headers) {
        return denied;
    }
    (
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        MODELS_JSON,
    )
        .into_response()
}

// ---------------------------------------------------------------------------
// Controls

#[derive(Deserialize)]
struct CallsQuery {
    prompt: Option<String>,
}

async fn calls(State(mock): State<MockLlm>, Query(query): Query<CallsQuery>) -> Response {
    match query.prompt {
        Some(prompt) => {
            let count = mock.calls(&prompt);
            Json(serde_json::json!({ "prompt": prompt, "count": count })).into_response()
        }
        None => {
            // Sorted so scripts and humans get a stable listing.
            let by_prompt: BTreeMap<String, u64> = mock.calls_by_prompt().into_iter().collect();
            Json(serde_json::json!({
                "total": mock.total_calls(),
                "by_prompt": by_prompt,
                "quota_rejections": mock.quota_rejections(),
                "blocked_rejections": mock.blocked_rejections(),
                "aborted": mock.aborted(),
                "connections": mock.connections(),
                "http2_connections": mock.http2_connections(),
                "http2_requests": mock.http2_requests(),
            }))
            .into_response()
        }
    }
}

async fn requests(State(mock): State<MockLlm>) -> Response {
    Json(mock.requests()).into_response()
}

async fn request_records(State(mock): State<MockLlm>) -> Response {
    Json(mock.request_records()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigUpdate {
    latency_ms: Option<u64>,
    error_rate: Option<f64>,
    /// Tokens per second of streamed answers (0: as fast as possible).
    stream_rate: Option<u64>,
    /// Absent: unchanged; `null` or 0: no limit; N: the new limit.
    #[serde(default, deserialize_with = "present")]
    rpm: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    tpm: Option<Option<u64>>,
}

/// Tells a field sent as `null` (`Some(None)`) from one left out (`None`,
/// through `#[serde(default)]`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

fn current_config(mock: &MockLlm) -> Response {
    let latency_ms = u64::try_from(mock.latency().as_millis()).unwrap_or(u64::MAX);
    let quota = mock.quota_status();
    Json(serde_json::json!({
        "latency_ms": latency_ms,
        "error_rate": mock.error_rate(),
        "stream_rate": mock.stream_rate(),
        "rpm": quota.rpm,
        "tpm": quota.tpm,
    }))
    .into_response()
}

async fn get_config(State(mock): State<MockLlm>) -> Response {
    current_config(&mock)
}

async fn set_config(State(mock): State<MockLlm>, body: Bytes) -> Response {
    let update: ConfigUpdate = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "expected {{\"latency_ms\": u64, \"error_rate\": 0.0..=1.0, \
                     \"stream_rate\": u64, \"rpm\": u64 | null, \"tpm\": u64 | null}}: {e}"
                ),
            )
        }
    };
    if let Some(rate) = update.error_rate {
        if !(0.0..=1.0).contains(&rate) {
            return openai_error(
                StatusCode::BAD_REQUEST,
                format!("error_rate must be within 0.0..=1.0, got {rate}"),
            );
        }
    }
    if let Some(ms) = update.latency_ms {
        mock.set_latency(Duration::from_millis(ms));
    }
    if let Some(rate) = update.error_rate {
        mock.set_error_rate(rate);
    }
    if let Some(rate) = update.stream_rate {
        mock.set_stream_rate(rate);
    }
    if update.rpm.is_some() || update.tpm.is_some() {
        let current = mock.quota_status();
        mock.set_quota(
            update.rpm.unwrap_or(current.rpm),
            update.tpm.unwrap_or(current.tpm),
        );
    }
    current_config(&mock)
}

fn quota_json(mock: &MockLlm) -> Response {
    let status = mock.quota_status();
    let block_ms = u64::try_from(mock.block_remaining().as_millis()).unwrap_or(u64::MAX);
    Json(serde_json::json!({
        "rpm": status.rpm,
        "tpm": status.tpm,
        "requests": status.requests,
        "tokens": status.tokens,
        "quota_rejections": mock.quota_rejections(),
        "blocked_rejections": mock.blocked_rejections(),
        "block_remaining_ms": block_ms,
    }))
    .into_response()
}

async fn get_quota(State(mock): State<MockLlm>) -> Response {
    quota_json(&mock)
}

#[derive(Deserialize)]
struct BlockQuery {
    ms: Option<String>,
}

/// `POST /_mock/block?ms=N`: [`MockLlm::block_for`] for out-of-process users
/// (`ms=0` ends a storm); answers like `GET /_mock/quota`.
async fn block(State(mock): State<MockLlm>, Query(query): Query<BlockQuery>) -> Response {
    let Some(ms) = query
        .ms
        .as_deref()
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "expected ?ms=N, N a non-negative integer of milliseconds",
        );
    };
    mock.block_for(Duration::from_millis(ms));
    quota_json(&mock)
}

async fn reset(State(mock): State<MockLlm>) -> StatusCode {
    mock.reset();
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |secs: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_868_801), "2000-03-01T00:00:01Z");
        assert_eq!(at(1_709_208_000), "2024-02-29T12:00:00Z");
        assert_eq!(at(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(at(4_102_444_800), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn error_kinds_per_status() {
        let kind = |s: u16| error_kind(StatusCode::from_u16(s).expect("valid status"));
        assert_eq!(kind(429), ("requests", Some("rate_limit_exceeded")));
        assert_eq!(
            kind(401),
            ("invalid_request_error", Some("invalid_api_key"))
        );
        assert_eq!(kind(418), ("invalid_request_error", None));
        assert_eq!(kind(529), ("server_error", None));
    }
}
