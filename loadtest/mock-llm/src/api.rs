//! HTTP handlers: the OpenAI-shaped `/v1` surface and the `/_mock` controls.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
use crate::markers::{self, Fault, RetryAfter};
use crate::{CallOutcome, MockLlm};

/// Generous: prompts in agent workloads can carry long transcripts.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// `[[hang]]` is meant to outlive any sane client timeout.
const HANG: Duration = Duration::from_secs(3600);

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
        .route("/_mock/config", get(get_config).post(set_config))
        .route("/_mock/reset", post(reset))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(mock)
}

// ---------------------------------------------------------------------------
// Errors

/// OpenAI's error envelope, so SDK clients surface our failures as API errors.
pub(crate) fn openai_error(status: StatusCode, message: impl Into<String>) -> Response {
    #[derive(Serialize)]
    struct Envelope {
        error: ErrorBody,
    }
    #[derive(Serialize)]
    struct ErrorBody {
        message: String,
        #[serde(rename = "type")]
        kind: &'static str,
        param: Option<()>,
        code: Option<()>,
    }
    let kind = if status == StatusCode::TOO_MANY_REQUESTS {
        "rate_limit_error"
    } else if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = Envelope {
        error: ErrorBody {
            message: message.into(),
            kind,
            param: None,
            code: None,
        },
    };
    (status, Json(body)).into_response()
}

async fn not_found(req: Request) -> Response {
    openai_error(
        StatusCode::NOT_FOUND,
        format!("mock: no route for {} {}", req.method(), req.uri().path()),
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
        None => Some(openai_error(
            StatusCode::UNAUTHORIZED,
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
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
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow, default)]
    content: Text<'a>,
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

async fn chat_completions(State(mock): State<MockLlm>, req: Request) -> Response {
    if let Some(denied) = auth_denial(&mock, req.headers()) {
        return denied;
    }
    let body = match axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES).await {
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
        return openai_error(
            StatusCode::BAD_REQUEST,
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
        );
    }
    if mock.recording() {
        // Parsed a second time only when recording, to keep the hot path lean.
        if let Ok(value) = serde_json::from_slice(&body) {
            mock.record_request(value);
        }
    }

    let prompt: &str = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map_or("", |m| &m.content.0);
    let call = mock.count_call(prompt);
    // None unless the journal is on. If the client goes away, hyper drops this
    // future and the entry's drop guard records the call as ended right then.
    let mut entry = mock.journal_entry(prompt, call);
    let response = answer(&mock, &request, prompt, call, entry.as_mut()).await;
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

/// The answer to call number `call` of `prompt`: scripted faults, latency, or the echo.
async fn answer(
    mock: &MockLlm,
    request: &ChatRequest<'_>,
    prompt: &str,
    call: u64,
    entry: Option<&mut JournalEntry>,
) -> Response {
    let plan = match markers::plan(prompt, call) {
        Ok(plan) => plan,
        Err(msg) => return openai_error(StatusCode::BAD_REQUEST, msg),
    };

    let delay = mock.latency().saturating_add(plan.extra_latency);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    match plan.fault {
        Some(Fault::Hang) => {
            if let Some(entry) = entry {
                entry.hanging();
            }
            tokio::time::sleep(HANG).await;
            return openai_error(StatusCode::GATEWAY_TIMEOUT, "mock: [[hang]] gave up");
        }
        Some(Fault::Drop) => return drop_connection(),
        Some(Fault::Fail {
            status,
            retry_after,
        }) => return scripted_failure(status, retry_after, call),
        None => {}
    }

    let error_rate = mock.error_rate();
    if error_rate > 0.0 && rand::random::<f64>() < error_rate {
        return openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "mock: random failure (error_rate)",
        );
    }

    let reply = format!("echo: {prompt}");
    let prompt_tokens = request
        .messages
        .iter()
        .map(|m| words(&m.content.0))
        .sum::<u64>()
        .max(1);
    let completion_tokens = words(&reply);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
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
    Json(completion).into_response()
}

fn scripted_failure(status: u16, retry_after: Option<RetryAfter>, call: u64) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = openai_error(
        status,
        format!("mock: scripted failure {} on call {call}", status.as_u16()),
    );
    let header = match retry_after {
        None => None,
        Some(RetryAfter::Seconds(s)) => Some(HeaderValue::from(s)),
        Some(RetryAfter::DateIn(s)) => {
            // HTTP-dates have whole-second resolution; round up so the date
            // is never earlier than S seconds from now.
            let now = SystemTime::now();
            let subsec = now.duration_since(UNIX_EPOCH).map_or(Duration::ZERO, |d| {
                Duration::from_nanos(d.subsec_nanos().into())
            });
            let round_up = if subsec.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_secs(1) - subsec
            };
            let at = now + Duration::from_secs(s) + round_up;
            HeaderValue::from_str(&httpdate::fmt_http_date(at)).ok()
        }
    };
    if let Some(value) = header {
        response.headers_mut().insert(RETRY_AFTER, value);
    }
    response
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
            Json(serde_json::json!({ "total": mock.total_calls(), "by_prompt": by_prompt }))
                .into_response()
        }
    }
}

async fn requests(State(mock): State<MockLlm>) -> Response {
    Json(mock.requests()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigUpdate {
    latency_ms: Option<u64>,
    error_rate: Option<f64>,
}

fn current_config(mock: &MockLlm) -> Response {
    let latency_ms = u64::try_from(mock.latency().as_millis()).unwrap_or(u64::MAX);
    Json(serde_json::json!({ "latency_ms": latency_ms, "error_rate": mock.error_rate() }))
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
                format!("expected {{\"latency_ms\": u64, \"error_rate\": 0.0..=1.0}}: {e}"),
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
    current_config(&mock)
}

async fn reset(State(mock): State<MockLlm>) -> StatusCode {
    mock.reset();
    StatusCode::NO_CONTENT
}
