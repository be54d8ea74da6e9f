//! The LLM call: one chat completion through async-openai, classified once into
//! success, transient, rate-limited or permanent.
//!
//! async-openai's HTTP layer is replaced by our own tower service so that (a) no retry happens
//! below us (one attempt = one HTTP call, visible in the task's `attempts`), and (b) a non-2xx
//! answer keeps its status and `Retry-After` header, which async-openai's error type drops.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use agentq_common::config::Price;
use agentq_common::metrics::WorkerMetrics;
use agentq_common::task::{Message, Role, TaskResult, Usage};
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestAssistantMessageContent,
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestSystemMessageContent, ChatCompletionRequestUserMessage,
    ChatCompletionRequestUserMessageContent, CreateChatCompletionRequest,
};
use async_openai::Client;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};

/// Most bytes of an error body kept for the task's `error` field.
const MAX_ERROR_BODY: usize = 512;

/// Why a call did not produce a result, and what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub enum LlmFailure {
    /// Connection error, timeout, 408, 5xx: retry with backoff while attempts remain.
    Transient {
        outcome: &'static str,
        message: String,
    },
    /// 429: retry after `retry_after` (or backoff), without using up an attempt.
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    /// Any other 4xx, or an answer that is not a chat completion: retrying cannot help.
    Permanent {
        outcome: &'static str,
        message: String,
    },
}

impl LlmFailure {
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Transient { outcome, .. } | Self::Permanent { outcome, .. } => outcome,
            Self::RateLimited { .. } => "rate_limited",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Transient { message, .. }
            | Self::Permanent { message, .. }
            | Self::RateLimited { message, .. } => message,
        }
    }
}

/// A non-2xx HTTP answer, carried through async-openai as its boxed middleware error.
#[derive(Debug, thiserror::Error)]
#[error("llm answered {status}: {body}")]
struct HttpFailure {
    status: StatusCode,
    retry_after: Option<Duration>,
    body: String,
}

/// `Retry-After` is either delta-seconds or an HTTP date (RFC 9110 §10.2.3); a decimal number of
/// seconds is tolerated. Arithmetic is checked: a number too big for a `Duration` saturates (the
/// caller clamps every wait to `AGENTQ_RETRY_MAX_MS`); negative, NaN, infinite or unparsable
/// values are garbage and count as no header at all.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // all digits: only overflow can fail, and that means "very long"
        return Some(v.parse::<u64>().map_or(Duration::MAX, Duration::from_secs));
    }
    if let Ok(secs) = v.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        return Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

fn classify_status(status: StatusCode, retry_after: Option<Duration>, body: String) -> LlmFailure {
    let message = format!("llm answered {}: {}", status.as_u16(), body);
    match status.as_u16() {
        429 => LlmFailure::RateLimited {
            retry_after,
            message,
        },
        408 => LlmFailure::Transient {
            outcome: "timeout",
            message,
        },
        500..=599 => LlmFailure::Transient {
            outcome: "server_error",
            message,
        },
        _ => LlmFailure::Permanent {
            outcome: "client_error",
            message,
        },
    }
}

fn classify(err: OpenAIError) -> LlmFailure {
    match err {
        OpenAIError::Boxed(b) => match b.downcast::<HttpFailure>() {
            Ok(h) => classify_status(h.status, h.retry_after, h.body),
            Err(other) => match other.downcast::<TooLarge>() {
                Ok(t) => LlmFailure::Permanent {
                    outcome: "too_large",
                    message: t.to_string(),
                },
                Err(other) => classify_reqwest_like(other.to_string(), other.as_ref()),
            },
        },
        OpenAIError::Reqwest(e) => classify_reqwest(&e),
        OpenAIError::ApiError(a) => classify_status(a.status_code, None, a.api_error.message),
        OpenAIError::JSONDeserialize(e, _) => LlmFailure::Permanent {
            outcome: "bad_response",
            message: format!("llm answer is not a chat completion: {e}"),
        },
        other => LlmFailure::Permanent {
            outcome: "client_error",
            message: other.to_string(),
        },
    }
}

fn classify_reqwest(e: &reqwest::Error) -> LlmFailure {
    let outcome = if e.is_timeout() {
        "timeout"
    } else {
        "connection_error"
    };
    // without_url: the URL may carry credentials in some proxies' setups; keep logs clean
    LlmFailure::Transient {
        outcome,
        message: format!("llm request failed: {}", strip_url(e)),
    }
}

fn classify_reqwest_like(text: String, e: &(dyn std::error::Error + 'static)) -> LlmFailure {
    match e.downcast_ref::<reqwest::Error>() {
        Some(r) => classify_reqwest(r),
        None => LlmFailure::Transient {
            outcome: "connection_error",
            message: text,
        },
    }
}

fn strip_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<llm endpoint>");
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// A response body over `AGENTQ_MAX_RESPONSE_BYTES`: the attempt fails as permanent (the same
/// request would get the same answer) and the body is never held whole.
#[derive(Debug, thiserror::Error)]
#[error("llm response body exceeds AGENTQ_MAX_RESPONSE_BYTES ({limit} bytes)")]
struct TooLarge {
    limit: usize,
}

/// Reads at most `limit` bytes of a body. `Ok(None)` when there was more (the rest is not read;
/// the connection is dropped with the response).
async fn read_capped(
    response: &mut reqwest::Response,
    limit: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// Sends the request; a non-2xx answer becomes an [`HttpFailure`] with its status and Retry-After.
/// Bodies are read with a bound: a success up to `limit`, an error only as far as the task's error
/// field keeps it.
async fn send(
    http: reqwest::Client,
    factory: HttpRequestFactory,
    limit: usize,
) -> Result<reqwest::Response, OpenAIError> {
    let request = factory.build().await?;
    let mut response = http.execute(request).await.map_err(OpenAIError::Reqwest)?;
    let status = response.status();
    if status.is_success() {
        let Some(body) = read_capped(&mut response, limit)
            .await
            .map_err(OpenAIError::Reqwest)?
        else {
            return Err(OpenAIError::Boxed(Box::new(TooLarge { limit })));
        };
        // Hand async-openai an already-read response: it parses the bytes we bounded.
        let mut rebuilt = http::Response::new(body);
        *rebuilt.status_mut() = status;
        *rebuilt.headers_mut() = std::mem::take(response.headers_mut());
        return Ok(reqwest::Response::from(rebuilt));
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let mut head = Vec::new();
    // Only the start of an error body is kept; stop reading once there is enough of it.
    while head.len() <= MAX_ERROR_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                head.extend_from_slice(&chunk[..chunk.len().min(MAX_ERROR_BODY + 1)])
            }
            _ => break,
        }
    }
    let body = String::from_utf8_lossy(&head).into_owned();
    Err(OpenAIError::Boxed(Box::new(HttpFailure {
        status,
        retry_after,
        body: truncate(body, MAX_ERROR_BODY),
    })))
}

#[derive(Clone)]
pub struct Llm {
    client: Client<OpenAIConfig>,
    timeout: Duration,
    metrics: WorkerMetrics,
    prices: std::sync::Arc<HashMap<String, Price>>,
    /// The configured model: with the price table's models, the only `model` label values.
    default_model: std::sync::Arc<str>,
}

impl Llm {
    pub fn new(
        base_url: &str,
        api_key: &SecretString,
        timeout: Duration,
        metrics: WorkerMetrics,
        prices: HashMap<String, Price>,
        default_model: &str,
        max_response_bytes: usize,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()?;
        let service = tower::service_fn(move |factory: HttpRequestFactory| {
            send(http.clone(), factory, max_response_bytes)
        });
        let config = OpenAIConfig::new()
            .with_api_base(base_url)
            .with_api_key(api_key.expose_secret());
        Ok(Self {
            client: Client::with_config(config).with_http_service(service),
            timeout,
            metrics,
            prices: std::sync::Arc::new(prices),
            default_model: default_model.into(),
        })
    }

    /// The `model` label for a task's model: a client names models freely, so any model the
    /// operator did not configure is counted as `other` (label values must stay few).
    fn label<'a>(&self, model: &'a str) -> &'a str {
        if model == &*self.default_model || self.prices.contains_key(model) {
            model
        } else {
            "other"
        }
    }

    /// One chat completion: exactly one HTTP request, bounded by the LLM timeout.
    pub async fn chat(&self, model: &str, messages: &[Message]) -> Result<TaskResult, LlmFailure> {
        let request = CreateChatCompletionRequest {
            model: model.to_owned(),
            messages: messages.iter().map(to_openai).collect(),
            ..Default::default()
        };
        let start = Instant::now();
        let result =
            match tokio::time::timeout(self.timeout, self.client.chat().create(request)).await {
                Ok(Ok(resp)) => {
                    let content = resp
                        .choices
                        .into_iter()
                        .next()
                        .and_then(|c| c.message.content);
                    match content {
                        Some(content) => {
                            let usage = resp.usage.map(|u| Usage {
                                prompt_tokens: u.prompt_tokens,
                                completion_tokens: u.completion_tokens,
                            });
                            Ok(TaskResult {
                                content,
                                model: if resp.model.is_empty() {
                                    model.to_owned()
                                } else {
                                    resp.model
                                },
                                usage: usage.unwrap_or_default(),
                            })
                        }
                        None => Err(LlmFailure::Permanent {
                            outcome: "bad_response",
                            message: "llm answer has no message content".to_owned(),
                        }),
                    }
                }
                Ok(Err(e)) => Err(classify(e)),
                Err(_) => Err(LlmFailure::Transient {
                    outcome: "timeout",
                    message: format!("llm call timed out after {}s", self.timeout.as_secs()),
                }),
            };
        self.record(model, start.elapsed(), &result);
        result
    }

    fn record(&self, model: &str, took: Duration, result: &Result<TaskResult, LlmFailure>) {
        let m = &self.metrics;
        let price = self.prices.get(model);
        let model = self.label(model);
        m.llm_duration
            .with_label_values(&[model])
            .observe(took.as_secs_f64());
        match result {
            Ok(r) => {
                m.llm_requests.with_label_values(&[model, "ok"]).inc();
                m.llm_tokens
                    .with_label_values(&[model, "prompt"])
                    .inc_by(u64::from(r.usage.prompt_tokens));
                m.llm_tokens
                    .with_label_values(&[model, "completion"])
                    .inc_by(u64::from(r.usage.completion_tokens));
                if let Some(p) = price {
                    let cost = (f64::from(r.usage.prompt_tokens) * p.prompt
                        + f64::from(r.usage.completion_tokens) * p.completion)
                        / 1_000_000.0;
                    m.llm_cost.with_label_values(&[model]).inc_by(cost);
                }
            }
            Err(f) => m
                .llm_requests
                .with_label_values(&[model, f.outcome()])
                .inc(),
        }
    }
}

fn to_openai(m: &Message) -> ChatCompletionRequestMessage {
    match m.role {
        Role::System => ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage {
            content: ChatCompletionRequestSystemMessageContent::Text(m.content.clone()),
            name: None,
        }),
        Role::User => ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage {
            content: ChatCompletionRequestUserMessageContent::Text(m.content.clone()),
            name: None,
        }),
        Role::Assistant => {
            ChatCompletionRequestMessage::Assistant(ChatCompletionRequestAssistantMessage {
                content: Some(ChatCompletionRequestAssistantMessageContent::Text(
                    m.content.clone(),
                )),
                ..Default::default()
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_both_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn retry_after_never_panics_or_overflows() {
        let now = SystemTime::now();
        let huge = parse_retry_after("1e20", now).expect("a number");
        assert!(huge >= Duration::from_secs(u64::from(u32::MAX)));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::MAX)
        );
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        for garbage in ["-1", "NaN", "inf", "-inf", "", "1e", "0x10", "Tue, 99 Foo"] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage}");
        }
    }

    #[test]
    fn statuses_are_classified_once() {
        let c = |s: u16| {
            classify_status(
                StatusCode::from_u16(s).expect("valid status"),
                None,
                String::new(),
            )
        };
        assert!(matches!(c(429), LlmFailure::RateLimited { .. }));
        for s in [408, 500, 502, 503, 504] {
            assert!(matches!(c(s), LlmFailure::Transient { .. }), "{s}");
        }
        for s in [400, 401, 403, 404, 422] {
            assert!(matches!(c(s), LlmFailure::Permanent { .. }), "{s}");
        }
    }
}
