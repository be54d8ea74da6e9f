//! The LLM call: one chat completion, classified once into success, transient, rate-limited or
//! permanent.
//!
//! The request is built with async-openai's request types (typed messages, serialized by serde),
//! and sent with our own reqwest client, so that (a) no retry happens below us (one attempt = one
//! HTTP call, visible in the task's `attempts`), (b) a non-2xx answer keeps its status and its
//! rate-limit headers, and (c) the reply is read tolerantly ([`wire`]) instead of by
//! async-openai's strict response type, which fails on fields real servers send (see
//! docs/architecture.md, "The LLM wire").

mod lanes;
mod ratelimit;
mod stream;
pub mod tokens;
mod wire;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use agentq_common::chat::{ChatParams, Content};
use agentq_common::config::{LlmHttp, MaxTokensParam, Price};
use agentq_common::metrics::WorkerMetrics;
use agentq_common::task::{Message, Role, TaskResult, Usage};
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestAssistantMessageContent,
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestSystemMessageContent, ChatCompletionRequestUserMessage,
    ChatCompletionRequestUserMessageContent, CreateChatCompletionRequest,
};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};

pub use ratelimit::{parse_go_duration, parse_retry_after, Reported};
pub use stream::DeltaSink;

/// One call's full account, for the flow limiter as well as the run.
#[derive(Debug)]
pub struct Call {
    pub result: Result<TaskResult, LlmFailure>,
    /// The usage the reply reported, even for a reply refused after parsing.
    pub usage: Option<Usage>,
    /// What the reply's headers said about the upstream's limits.
    pub reported: Reported,
    /// False when the request never got an answer with a status (refused connection, DNS):
    /// the upstream cannot have counted it.
    pub reached: bool,
    pub latency: Duration,
}

/// What a call's request and body came to: the usage reported (even for a reply then refused),
/// and the result or why there is none.
type Outcome = (Option<Usage>, Result<TaskResult, LlmFailure>);

/// Most bytes of an error body kept for the task's `error` field.
const MAX_ERROR_BODY: usize = 512;

/// Why a call did not produce a result, and what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub enum LlmFailure {
    /// Connection error, timeout, 408, 5xx, an error object in a 200: retry with backoff while
    /// attempts remain.
    Transient {
        outcome: &'static str,
        message: String,
    },
    /// 429: retry after the server's hint (or a growing backoff), without using up an attempt.
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    /// Any other 4xx, or an answer that is not a usable chat completion: retrying cannot help.
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

fn classify_reqwest(e: &reqwest::Error) -> LlmFailure {
    let outcome = if e.is_timeout() {
        "timeout"
    } else {
        "connection_error"
    };
    LlmFailure::Transient {
        outcome,
        message: format!("llm request failed: {}", strip_url(e)),
    }
}

/// The error's text without its URL: some setups put credentials in the base URL, and the task's
/// `error` field and the logs must never show them.
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

fn too_large(limit: usize) -> LlmFailure {
    LlmFailure::Permanent {
        outcome: "too_large",
        message: format!("llm response body exceeds AGENTQ_MAX_RESPONSE_BYTES ({limit} bytes)"),
    }
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

/// The start of an error body, as far as the task's error field keeps it: a huge error page is
/// never read whole.
async fn error_head(response: &mut reqwest::Response) -> String {
    let mut head = Vec::new();
    while head.len() <= MAX_ERROR_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                head.extend_from_slice(&chunk[..chunk.len().min(MAX_ERROR_BODY + 1)])
            }
            _ => break,
        }
    }
    truncate(String::from_utf8_lossy(&head).into_owned(), MAX_ERROR_BODY)
}

/// A 2xx response whose body is still to be read, with the lane it holds until then: on HTTP/2
/// the call's stream is open until its body ends.
struct Answer {
    response: reqwest::Response,
    lane: lanes::Taken,
}

impl std::ops::Deref for Answer {
    type Target = reqwest::Response;
    fn deref(&self) -> &reqwest::Response {
        &self.response
    }
}

impl std::ops::DerefMut for Answer {
    fn deref_mut(&mut self) -> &mut reqwest::Response {
        &mut self.response
    }
}

#[derive(Clone)]
pub struct Llm {
    /// The upstream's HTTP clients (more than one where calls may go over HTTP/2: `lanes`).
    http: std::sync::Arc<lanes::Lanes>,
    /// `<OPENAI_BASE_URL>/chat/completions`, built and parsed once: reqwest takes a `&str` by
    /// parsing it again on every call (a WHATWG parse with IDNA, ~6,000 instructions), a `Url`
    /// by a clone.
    url: reqwest::Url,
    /// `Bearer <key>`, marked sensitive; `None` when no key is configured: then no
    /// `Authorization` header is sent at all (an empty bearer is a malformed key to LiteLLM).
    auth: Option<HeaderValue>,
    timeout: Duration,
    max_tokens: Option<(MaxTokensParam, u32)>,
    max_response_bytes: usize,
    metrics: WorkerMetrics,
    prices: std::sync::Arc<HashMap<String, Price>>,
    /// The configured model: with the price table's models and the models of
    /// `AGENTQ_UPSTREAMS`, the only `model` label values.
    default_model: std::sync::Arc<str>,
    known_models: std::sync::Arc<std::collections::HashSet<String>>,
}

/// How the worker talks to the LLM, from its configuration.
pub struct LlmSettings<'a> {
    pub base_url: &'a str,
    pub api_key: &'a SecretString,
    pub timeout: Duration,
    pub prices: HashMap<String, Price>,
    pub default_model: &'a str,
    pub max_response_bytes: usize,
    /// The output cap sent with every call (`AGENTQ_MAX_TOKENS`; 0 = none) and its parameter name.
    pub max_tokens: u32,
    pub max_tokens_param: MaxTokensParam,
    /// Models named in `AGENTQ_UPSTREAMS` (bounded by the file, so fine as label values).
    pub known_models: std::sync::Arc<std::collections::HashSet<String>>,
    /// `AGENTQ_LLM_HTTP`, `AGENTQ_LLM_HTTP2_STREAMS` and the worker's concurrency: how many
    /// clients the upstream gets (`lanes`).
    pub http: LlmHttp,
    pub http2_streams: usize,
    pub concurrency: usize,
}

impl Llm {
    pub fn new(s: LlmSettings<'_>, metrics: WorkerMetrics) -> anyhow::Result<Self> {
        let key = s.api_key.expose_secret();
        let auth = if key.is_empty() {
            None
        } else {
            let mut v = HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| anyhow::anyhow!("OPENAI_API_KEY is not a valid header value"))?;
            v.set_sensitive(true);
            Some(v)
        };
        let url = format!("{}/chat/completions", s.base_url.trim_end_matches('/'));
        // Never shown: a base URL may carry credentials.
        let url = reqwest::Url::parse(&url)
            .map_err(|e| anyhow::anyhow!("the LLM base URL does not parse: {e}"))?;
        let count = lanes::lane_count(
            s.http,
            url.scheme() == "http",
            s.concurrency,
            s.http2_streams,
        );
        let http = lanes::Lanes::new(s.http, count, s.timeout.min(Duration::from_secs(10)))?;
        Ok(Self {
            http: std::sync::Arc::new(http),
            url,
            auth,
            timeout: s.timeout,
            max_tokens: (s.max_tokens > 0).then_some((s.max_tokens_param, s.max_tokens)),
            max_response_bytes: s.max_response_bytes,
            metrics,
            prices: std::sync::Arc::new(s.prices),
            default_model: s.default_model.into(),
            known_models: s.known_models,
        })
    }

    /// How many HTTP clients (lanes) the upstream has.
    pub fn lanes(&self) -> usize {
        self.http.len()
    }

    /// The `model` label for a task's model: a client names models freely, so any model the
    /// operator did not configure is counted as `other` (label values must stay few).
    pub fn label<'a>(&self, model: &'a str) -> &'a str {
        if model == &*self.default_model
            || self.prices.contains_key(model)
            || self.known_models.contains(model)
        {
            model
        } else {
            "other"
        }
    }

    fn body(
        &self,
        model: &str,
        messages: &[Message],
        params: &ChatParams,
    ) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&self.request(model, messages, params)?)
    }

    /// The request as async-openai's type, before serialization (`chat_streamed` adds `stream`).
    fn request(
        &self,
        model: &str,
        messages: &[Message],
        params: &ChatParams,
    ) -> Result<CreateChatCompletionRequest, serde_json::Error> {
        // The task's own output cap, under its own name, wins over AGENTQ_MAX_TOKENS.
        let (max_tokens, max_completion_tokens) = match params.output_cap() {
            Some(_) => (params.max_tokens, params.max_completion_tokens),
            None => (
                self.max_tokens
                    .filter(|(p, _)| *p == MaxTokensParam::MaxTokens)
                    .map(|(_, n)| n),
                self.max_tokens
                    .filter(|(p, _)| *p == MaxTokensParam::MaxCompletionTokens)
                    .map(|(_, n)| n),
            ),
        };
        #[allow(deprecated)] // `max_tokens` and `user`: deprecated by OpenAI, still widely served
        let mut request = CreateChatCompletionRequest {
            model: model.to_owned(),
            messages: messages.iter().map(to_openai).collect::<Result<_, _>>()?,
            max_tokens,
            max_completion_tokens,
            // validated in f64 (so 2.0000001 is refused, not rounded to 2); sent as f32, the
            // precision async-openai's type has
            temperature: params.temperature.map(|t| t as f32),
            top_p: params.top_p.map(|p| p as f32),
            seed: params.seed,
            parallel_tool_calls: params.parallel_tool_calls,
            user: params.user.clone(),
            ..Default::default()
        };
        // The rarer, nested parameters: our types serialize as OpenAI's wire, which
        // async-openai's types read (a round trip only for tasks that set them).
        if let Some(stop) = &params.stop {
            request.stop = Some(convert(stop)?);
        }
        if let Some(f) = &params.response_format {
            request.response_format = Some(convert(f)?);
        }
        if let Some(tools) = &params.tools {
            request.tools = Some(convert(tools)?);
        }
        if let Some(choice) = &params.tool_choice {
            request.tool_choice = Some(convert(choice)?);
        }
        Ok(request)
    }

    /// One chat completion: exactly one HTTP request, bounded by the LLM timeout.
    pub async fn chat(&self, model: &str, messages: &[Message], params: &ChatParams) -> Call {
        let start = Instant::now();
        let mut reported = Reported::default();
        let mut reached = false;
        let outcome = tokio::time::timeout(
            self.timeout,
            self.call(model, messages, params, &mut reported, &mut reached),
        )
        .await;
        self.account(model, start, outcome, reported, reached)
    }

    /// The end of a call, streamed or not: its timeout read as a failure, its metrics, its account.
    fn account(
        &self,
        model: &str,
        start: Instant,
        outcome: Result<Outcome, tokio::time::error::Elapsed>,
        reported: Reported,
        reached: bool,
    ) -> Call {
        let timed_out = outcome.is_err();
        let (usage, result) = outcome.unwrap_or_else(|_| {
            (
                None,
                Err(LlmFailure::Transient {
                    outcome: "timeout",
                    message: format!("llm call timed out after {}s", self.timeout.as_secs()),
                }),
            )
        });
        let latency = start.elapsed();
        self.record(model, latency, usage.as_ref(), &result);
        Call {
            result,
            usage,
            reported,
            // a call that timed out may have reached the upstream while we waited
            reached: reached || timed_out,
            latency,
        }
    }

    async fn call(
        &self,
        model: &str,
        messages: &[Message],
        params: &ChatParams,
        reported: &mut Reported,
        reached: &mut bool,
    ) -> Outcome {
        let body = self.body(model, messages, params);
        match self.send(body, reported, reached).await {
            Ok(mut response) => self.read_whole(&mut response, model).await,
            Err(f) => (None, Err(f)),
        }
    }

    /// Sends the one request and reads its status: `Ok` with the response of a 2xx, whose body is
    /// still to be read; else the failure, classified. Sets `reported` and `reached` either way.
    async fn send(
        &self,
        body: Result<Vec<u8>, serde_json::Error>,
        reported: &mut Reported,
        reached: &mut bool,
    ) -> Result<Answer, LlmFailure> {
        let body = body.map_err(|e| LlmFailure::Permanent {
            outcome: "client_error",
            message: format!("request does not serialize: {e}"),
        })?;
        let lane = self.http.take();
        let mut request = lane
            .http()
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                // Refused or unresolvable: the request never reached the upstream. Anything
                // later (a reset mid-request, a timeout) may have been counted there.
                *reached = !(e.is_connect() || e.is_builder());
                return Err(classify_reqwest(&e));
            }
        };
        *reached = true;
        let status = response.status();
        *reported = ratelimit::reported(response.headers(), SystemTime::now());
        if !status.is_success() {
            let hint = ratelimit::read(response.headers(), SystemTime::now());
            if let Some(h) = hint.filter(|_| status == StatusCode::TOO_MANY_REQUESTS) {
                tracing::debug!(
                    wait_ms = h.wait.as_millis() as u64,
                    source = h.source,
                    "rate-limit hint"
                );
            }
            let body = error_head(&mut response).await;
            return Err(classify_status(status, hint.map(|h| h.wait), body));
        }
        Ok(Answer { response, lane })
    }

    /// A 2xx body read whole (up to the cap) and parsed as a chat completion.
    async fn read_whole(&self, response: &mut reqwest::Response, model: &str) -> Outcome {
        let body = match read_capped(response, self.max_response_bytes).await {
            Ok(Some(b)) => b,
            Ok(None) => return (None, Err(too_large(self.max_response_bytes))),
            Err(e) => return (None, Err(classify_reqwest(&e))),
        };
        let parsed = wire::parse(&body, model);
        (parsed.usage, parsed.result)
    }

    /// Counts the call, and the tokens of every reply that reported usage: a reply refused after
    /// parsing (empty, an error object) was still paid for.
    fn record(
        &self,
        model: &str,
        took: Duration,
        usage: Option<&Usage>,
        result: &Result<TaskResult, LlmFailure>,
    ) {
        let m = &self.metrics;
        let price = self.prices.get(model);
        let model = self.label(model);
        m.llm_duration
            .with_label_values(&[model])
            .observe(took.as_secs_f64());
        let outcome = match result {
            Ok(_) => "ok",
            Err(f) => f.outcome(),
        };
        m.llm_requests.with_label_values(&[model, outcome]).inc();
        if let Some(u) = usage {
            m.llm_tokens
                .with_label_values(&[model, "prompt"])
                .inc_by(u64::from(u.prompt_tokens));
            m.llm_tokens
                .with_label_values(&[model, "completion"])
                .inc_by(u64::from(u.completion_tokens));
            if let Some(p) = price {
                let cost = (f64::from(u.prompt_tokens) * p.prompt
                    + f64::from(u.completion_tokens) * p.completion)
                    / 1_000_000.0;
                m.llm_cost.with_label_values(&[model]).inc_by(cost);
            }
        }
    }
}

/// One of our request types as async-openai's equivalent, through their shared wire format.
fn convert<T: serde::Serialize, U: serde::de::DeserializeOwned>(v: &T) -> serde_json::Result<U> {
    serde_json::from_value(serde_json::to_value(v)?)
}

/// A message as async-openai's type: plain text directly (the common case, no round trip);
/// content parts, tool calls and tool results through the wire format.
fn to_openai(m: &Message) -> serde_json::Result<ChatCompletionRequestMessage> {
    let plain = match &m.content {
        Some(Content::Text(t)) if m.name.is_none() && m.tool_calls.is_none() => Some(t),
        _ => None,
    };
    Ok(match (m.role, plain) {
        (Role::System, Some(t)) => {
            ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage {
                content: ChatCompletionRequestSystemMessageContent::Text(t.clone()),
                name: None,
            })
        }
        (Role::User, Some(t)) => {
            ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage {
                content: ChatCompletionRequestUserMessageContent::Text(t.clone()),
                name: None,
            })
        }
        (Role::Assistant, Some(t)) => {
            ChatCompletionRequestMessage::Assistant(ChatCompletionRequestAssistantMessage {
                content: Some(ChatCompletionRequestAssistantMessageContent::Text(
                    t.clone(),
                )),
                ..Default::default()
            })
        }
        _ => convert(m)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llm(max_tokens: u32) -> Llm {
        Llm::new(
            LlmSettings {
                base_url: "http://127.0.0.1:9",
                api_key: &SecretString::from(String::new()),
                timeout: Duration::from_secs(1),
                prices: HashMap::new(),
                default_model: "m",
                max_response_bytes: 1024,
                max_tokens,
                max_tokens_param: MaxTokensParam::MaxTokens,
                known_models: Default::default(),
                http: LlmHttp::Auto,
                http2_streams: 100,
                concurrency: 1,
            },
            WorkerMetrics::new(),
        )
        .expect("builds")
    }

    /// Every parameter and message shape a task accepts reaches the wire as OpenAI spells it,
    /// through async-openai's request type.
    #[test]
    fn the_whole_request_reaches_the_wire() {
        let task = serde_json::json!({
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "name": "ann", "content": [{"type": "text", "text": "add"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "high"}}]},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\":1}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "1"},
                {"role": "user", "content": "and?"}
            ],
            "temperature": 0.5, "top_p": 0.25, "max_completion_tokens": 77, "stop": ["X", "Y"], "seed": 42,
            "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": true}},
            "tools": [{"type": "function", "function": {"name": "add", "description": "adds", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}],
            "tool_choice": "auto", "parallel_tool_calls": false, "user": "u-1"
        });
        let create: agentq_common::task::CreateTask =
            serde_json::from_value(task.clone()).expect("a task body");
        let payload = create.validate("q", 3).expect("valid").payload;
        let body = llm(500)
            .body("m", &payload.messages, &payload.params)
            .expect("serializes");
        let wire: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(wire["messages"], task["messages"]);
        for k in [
            "stop",
            "seed",
            "response_format",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "user",
            "max_completion_tokens",
            "top_p",
            "temperature",
        ] {
            assert_eq!(wire[k], task[k], "{k}");
        }
        // the task's own cap replaces AGENTQ_MAX_TOKENS, under the task's name for it
        assert!(wire.get("max_tokens").is_none());
        // a plain task still gets the operator's cap
        let plain = vec![Message::user("hi")];
        let body = llm(500)
            .body("m", &plain, &ChatParams::default())
            .expect("serializes");
        let wire: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(wire["max_tokens"], 500);
        assert_eq!(
            wire["messages"],
            serde_json::json!([{"role": "user", "content": "hi"}])
        );
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
