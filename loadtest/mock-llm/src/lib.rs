//! `agentq-mock-llm`: an OpenAI-compatible mock chat-completions server.
//!
//! Integration tests embed it in-process ([`spawn`], or [`serve`] on a
//! listener of their own); load tests run the `agentq-mock-llm` binary. It
//! answers `POST /v1/chat/completions` with `"echo: <last user message>"`,
//! counts calls per prompt, and injects faults and odd replies scripted by
//! markers inside the last user message. With `"stream": true` it streams
//! the same answers as OpenAI's server-sent `chat.completion.chunk` events
//! (see "Streaming"). Control endpoints under `/_mock/` expose the counters
//! and change latency, error rate and stream rate at runtime.
//!
//! # Markers
//!
//! `N` is a call window: the marker applies to the first `N` calls of the
//! prompt (1-based), or to every call when it is `*` or left out. Among
//! `fail`/`hang`/`drop` markers the first whose window covers the call
//! decides the fault; among `reply` markers, likewise the shape of a 200.
//! A malformed marker (unknown `fail` header form, bad number, unknown reply
//! kind) is answered with a 400 instead of being ignored; a `[[…]]` whose
//! text up to the first `:` is not `fail`, `hang`, `drop`, `sleep`, `reply`,
//! `call`, `say`, `stream_rate`, `cut`, `midfail` or `stall` is ordinary
//! prompt content.
//!
//! - `[[fail:CODE]]`, `[[fail:CODE:N]]`: answer HTTP `CODE` (400–599) with an
//!   OpenAI error body (below). After `N`, any of these header forms may
//!   follow, each at most once per header (`raw` last, as it takes the rest
//!   of the marker verbatim, colons included):
//!   - `:S`: `Retry-After: S` (integer seconds), e.g. `[[fail:429:2:7]]`
//!   - `:date:S`: `Retry-After: <HTTP-date S seconds from now, rounded up>`
//!   - `:raw:VALUE`: `Retry-After: VALUE` exactly (`0`, `1e+300`, `-5`,
//!     `soon`, a past HTTP-date; printable ASCII)
//!   - `:ms:MS`: `retry-after-ms: MS` (`250`, `1.5`)
//!   - `:reset:DUR`: `x-ratelimit-reset-requests: DUR` and
//!     `x-ratelimit-remaining-requests: 0` (`DUR` a Go duration: `1s`,
//!     `6m0s`, `250ms`, `1.5s`)
//!   - `:reset_tokens:DUR`: the same with `x-ratelimit-*-tokens`
//!   - `:litellm:S`: `llm_provider-retry-after: S` (LiteLLM's header; `2`, `1.5`)
//!   - `:anthropic:S`: `anthropic-ratelimit-requests-reset: <RFC 3339 UTC time
//!     S seconds from now, rounded up>`
//!
//!   e.g. `[[fail:429:3:ms:250]]`, `[[fail:429:*:reset:6m0s]]`,
//!   `[[fail:429:1:litellm:2]]`, `[[fail:429:1:raw:1e+300]]`,
//!   `[[fail:429:1:ms:100:raw:0]]`.
//! - `[[hang]]`, `[[hang:N]]`: never answer (for an hour).
//! - `[[drop]]`, `[[drop:N]]`: close the connection without an answer.
//! - `[[sleep:MS]]`: add `MS` ms of latency (sleep markers add up).
//! - `[[reply:KIND]]`, `[[reply:KIND:N]]`: a successful call (HTTP 200) gets
//!   this shape instead of the plain echo. `usage` is always the echo's
//!   (prompt words, reply words) where there is one:
//!   - `tool_calls`: `content: null`, one call `{"id":"call_mock_<n>",
//!     "type":"function","function":{"name":"get_weather",
//!     "arguments":"{"city":"Paris"}"}}`, `finish_reason: "tool_calls"`
//!   - `refusal`: `content: null`, `refusal: "I can't help with that."`,
//!     `finish_reason: "stop"`
//!   - `empty`: `content: null` and nothing else, `finish_reason: "length"`
//!   - `groq`: the echo plus Groq's `service_tier: "on_demand"`,
//!     `x_groq: {"id"}`, `system_fingerprint` and float `queue_time`,
//!     `prompt_time`, `completion_time`, `total_time` in `usage`
//!   - `sparse`: no `id`, `created`, `choices[].index` or
//!     `usage.total_tokens`; `model: null`; `finish_reason: "eos_token"`
//!   - `no_usage`: the echo without a `usage` object
//!   - `error200`: body `{"error":{"message":"upstream overloaded",
//!     "type":"server_error","code":"overloaded"}}`
//!   - `error200_rate`: body `{"error":{"message":"Rate limit reached",
//!     "type":"rate_limit_error","code":429}}` (a numeric code)
//!   - `cached`: the echo with `usage.prompt_tokens_details.cached_tokens: 3`
//!     and `usage.completion_tokens_details.reasoning_tokens: 2`
//!   - `parts`: `content: [{"type":"text","text":"echo: …"}]`
//!
//! - `[[call:NAME]]`, `[[call:NAME:ARGS]]` (ARGS verbatim to the closing
//!   brackets, default `{}`): a scripted tool-using model. While the
//!   conversation does not end with `tool` messages, it asks for every
//!   `call` marker's tool at once (`content: null`, ids `call_<n>_<k>` for
//!   call `n` of the prompt, `finish_reason: "tool_calls"`); once it does, it
//!   answers `tool results: <r1>; <r2>…` (the trailing results, oldest first).
//!
//! - `[[say:TEXT]]` (TEXT verbatim to the closing brackets): the reply's
//!   content is TEXT instead of the echo (usage stays the echo's), e.g. a
//!   planner's `[[say:{"subtasks":[{"prompt":"a"}]}]]`.
//!
//! Every request is held to OpenAI's order of tool messages, with its 400
//! and words: a `tool` message must answer a call of the assistant message
//! before it, and an assistant message's `tool_calls` must each be answered
//! by the `tool` messages right after it.
//!
//! Markers combine: `[[fail:500:1]][[fail:429:2:ms:50]][[reply:tool_calls:3]]`
//! is a 500, then a 429, then a tool call, then plain echoes.
//!
//! Streamed answers only (see "Streaming"; a call without `"stream": true`
//! ignores these, but a malformed one is still a 400). `K` counts content
//! chunks (pieces of content, refusal or tool calls, not the role chunk);
//! among `cut`/`midfail`/`stall` the first whose window covers the call
//! decides; a `K` beyond the content fires where the finish chunk would be,
//! so a faulty stream never has its `finish_reason` or `[DONE]`:
//!
//! - `[[stream_rate:N]]`: this call's content chunks go out at `N` per second
//!   (0: as fast as possible) whatever the configured rate; the first counts.
//! - `[[cut:K]]`, `[[cut:K:N]]`: after `K` content chunks, close the
//!   connection abruptly (no terminating chunk: the client sees a truncated
//!   body).
//! - `[[midfail:K]]`, `[[midfail:K:N]]`: after `K` content chunks, send
//!   `data: {"error":{"message":"upstream failed mid-stream",
//!   "type":"server_error","code":"server_error"}}` and end the body (no
//!   `[DONE]`), as OpenAI-compatible servers report a failure once the 200
//!   is out.
//! - `[[stall:K]]`, `[[stall:K:N]]`: after `K` content chunks, send nothing
//!   more for an hour with the connection open (then close it abruptly).
//!
//! # Streaming
//!
//! A request with `"stream": true` whose answer is a 200 (the echo, `say`,
//! `call` and every `reply` shape) gets `200`, `content-type:
//! text/event-stream`, and the very answer a non-streamed call would get as
//! OpenAI's chunks, each `data: <json>\n\n` with `object:
//! "chat.completion.chunk"` and the answer's `id`, `created` and `model`
//! (and its shape's oddities: `sparse` has no `id`, `created` or `index`,
//! `groq` repeats its extras): a role chunk (`delta: {"role": "assistant",
//! "content": ""}`, `content: null` when the answer's content is null);
//! the content one "token" per chunk, a token being a word with the
//! whitespace after it, so the pieces add up to exactly the non-streamed
//! content (`parts` streams its text); a refusal likewise in
//! `delta.refusal`; each tool call as OpenAI streams it, a chunk with
//! `{"index", "id", "type", "function": {"name", "arguments": ""}}` then its
//! arguments in pieces split at JSON punctuation (`{"`, `city`, `":"`, …);
//! a chunk with an empty delta and the answer's `finish_reason`; with
//! `stream_options.include_usage`, `"usage": null` on every chunk and a last
//! chunk with `"choices": []` and the answer's `usage` (none of either for
//! `no_usage`); then `data: [DONE]`. `error200` and `error200_rate` send
//! their error object as the only event, without `[DONE]`.
//!
//! Latency and `[[sleep]]` delay the 200 and so the first chunk (time to
//! first token); content chunks then go out at the stream rate, token `i`
//! being due `i / rate` after the role chunk: [`MockConfig::stream_rate`]
//! (binary: `--stream-rate N` or `MOCK_LLM_STREAM_RATE`/`MOCK_STREAM_RATE`;
//! at runtime [`MockLlm::set_stream_rate`] or `POST /_mock/config` with
//! `{"stream_rate": N}`), or the call's `[[stream_rate:N]]`; 0, the default,
//! is as fast as the client reads. Faults that answer before any chunk
//! (`fail`, `hang`, `drop`, the error rate, a 400, quota and storm 429s) are
//! the same status answers with or without `"stream"`.
//!
//! A streamed call is counted (per prompt, in the total, by the quota) at its
//! arrival like any other; in the journal it ends when its last event is
//! handed over (`Status(200)`, also after a `midfail`), at a `cut`
//! (`Dropped`), or when the client leaves (`Cancelled`, `Hung` during a
//! `stall`).
//!
//! # Errors
//!
//! Every error is OpenAI's envelope `{"error":{"message","type","param","code"}}`
//! with OpenAI's type and code for the status: 401 `invalid_request_error` /
//! `invalid_api_key` (no code when the header is missing), 403
//! `request_forbidden` / `unsupported_country_region_territory`, 404
//! `invalid_request_error` / `model_not_found` (no code for an unknown
//! route), 408 `server_error` / `timeout`, 429 `requests` /
//! `rate_limit_exceeded`, 5xx `server_error` with no code, other 4xx
//! `invalid_request_error` with no code.
//!
//! # Quota mode
//!
//! With [`MockConfig::rpm`] and/or [`MockConfig::tpm`] set (binary: `--rpm`,
//! `--tpm`; at runtime [`MockLlm::set_quota`] or `POST /_mock/config` with
//! `{"rpm": N, "tpm": N}`, `null` or 0 for none), the mock enforces requests
//! and tokens per minute over an exact sliding 60 s window: a call admitted at
//! `t` counts until `t + 60 s`. A call's tokens are the `prompt_tokens +
//! completion_tokens` of the echo's `usage` (also for `[[reply:…]]` shapes,
//! including those that report no usage), counted at its arrival. A call that
//! would make the last minute hold more than `rpm` calls or `tpm` tokens is
//! answered at once (no latency) with OpenAI's 429: body
//! `{"error":{"message":"Rate limit reached for <model> in organization
//! org-mock on requests per min (RPM): Limit 3, Used 3, Requested 1. Please
//! try again in 20s. …","type":"requests","param":null,"code":"rate_limit_exceeded"}}`
//! (`tokens` per min (TPM) and type `tokens` for the token limit, which is
//! reported when only it is broken; a call larger than the whole `tpm` gets
//! OpenAI's "Request too large …" message). A rejected call is not counted
//! in the window (so "admitted in any minute ≤ limit" holds exactly) but is
//! counted by [`MockLlm::quota_rejections`].
//!
//! Every answer to an admitted call (200s, and `error_rate` 500s) and every
//! quota 429 carries, per configured limit, `x-ratelimit-limit-requests`,
//! `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests` and the
//! same with `-tokens`. Remaining is after this call when admitted, without
//! it when rejected. Reset is a Go duration as OpenAI sends it (`20ms`,
//! `1.5s`, `6m0s`, rounded up to the millisecond), measured from the call's
//! arrival: on a 429 for that limit, the time until enough of the oldest
//! calls leave the window for this call to fit (for rpm usually the oldest
//! one); otherwise the time until the oldest call leaves, i.e. until
//! `remaining` next grows. `0s` when the window is empty.
//!
//! The order of checks: a [`MockLlm::block_for`] storm first (every call is
//! a 429, markers or not); then markers: a call whose markers script a fault
//! (`fail`, `hang`, `drop`) gets exactly that, unchecked and uncounted by the
//! quota, so scripted tests behave the same in quota mode, and a malformed
//! marker is still a 400; then the quota.
//!
//! A storm ([`MockLlm::block_for`], or `POST /_mock/block?ms=N` from another
//! process) answers every chat call 429 (no latency) with
//! `x-ratelimit-remaining-requests: 0`, `x-ratelimit-reset-requests: <time
//! left>` and `retry-after: <whole seconds left, rounded up>` until it ends.
//! Its calls are counted by [`MockLlm::blocked_rejections`], not by the quota.
//! `GET /_mock/quota` shows limits, the window's requests and tokens, both
//! rejection counters and `block_remaining_ms`; `GET /_mock/calls` also
//! lists the counters.
//!
//! # Calls the client gave up on
//!
//! A chat call whose client went away (disconnected, timed out, was killed,
//! or aborted the request) before its answer was ready, or before a streamed
//! answer's last event, is counted by [`MockLlm::aborted`] and as `aborted`
//! in `GET /_mock/calls`, journal or not: hyper drops the handler's future
//! (or the streamed body) when the connection closes, and a drop guard counts
//! it. A whole answer goes out at once once the handler has returned; a
//! stream read to its end (or to a `midfail`) is not aborted. A `[[drop]]` or
//! `[[cut]]` is the mock closing the connection, not the client, and is not
//! counted; a client leaving during a `[[stall]]` is.
//!
//! # Observing requests
//!
//! With [`MockConfig::record`] on, the mock keeps each request's body and
//! what tests check about the wire ([`RequestRecord`]: `Authorization`
//! header or its absence, `max_tokens`, `max_completion_tokens`), through
//! [`MockLlm::request_records`] or `GET /_mock/request_records` (bodies alone:
//! [`MockLlm::requests`], `GET /_mock/requests`).
//!
//! With [`MockConfig::journal`] on, an in-process mock also keeps a bounded
//! call journal ([`MockLlm::journal`]): every call's prompt, start and end
//! [`Instant`]s and outcome (status, `[[drop]]`, or the
//! client going away during a `[[hang]]` or before the answer). A call ends
//! when its answer is ready or when the client disconnects, so tests can tell
//! whether two calls of one prompt really ran at the same time. The journal
//! also keeps every call at its arrival, in progress or not
//! ([`MockLlm::arrivals`], [`CallArrival`]: start `Instant`, wall-clock
//! `SystemTime`, and whether the quota or a storm refused it, which a
//! [`CallRecord`] shows only as `Status(429)`), and [`MockLlm::call_times`]
//! for "no call arrived between a and b".
//!
//! The request path is built for throughput: no per-request logging, atomics
//! for configuration and totals, a sharded map for per-prompt counters so
//! that worker threads rarely contend, and a marker-free prompt costs one
//! `contains("[[")`; recording and the journal cost one branch each when off.

mod api;
mod journal;
mod markers;
mod quota;
mod server;
mod stream;

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

pub use journal::{CallArrival, CallOutcome, CallRecord};
pub use quota::{QuotaStatus, Rejection};
pub use server::{serve, spawn};

use journal::{Journal, JournalEntry};
use quota::{Quota, Verdict};

/// How many request bodies are kept when [`MockConfig::record`] is on.
pub const RECORD_CAPACITY: usize = 1000;

/// How many finished calls the journal keeps when [`MockConfig::journal`] is
/// on (about 40 MB at most); older ones are dropped and counted
/// ([`MockLlm::journal_evicted`]).
pub const JOURNAL_CAPACITY: usize = 200_000;

/// A power of two comfortably above the core counts this runs on, so two
/// requests rarely wait for the same shard.
const SHARDS: usize = 32;

/// Per-prompt call counts for the prompts hashing to one shard.
type Shard = Mutex<HashMap<Box<str>, u64>>;

/// One chat completion request as the mock received it, kept when
/// [`MockConfig::record`] is on ([`MockLlm::request_records`], or
/// `GET /_mock/request_records` as a JSON array of these fields).
///
/// Only well-formed, authorised requests are recorded (a request the
/// configured [`MockConfig::api_key`] turned away with a 401 is not).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RequestRecord {
    /// The last user message's content (what per-prompt counters key on).
    pub prompt: String,
    /// This call's 1-based number among the calls of `prompt`.
    pub call: u64,
    /// The `Authorization` header's value (lossy UTF-8; `"Bearer"` for an
    /// empty key, as HTTP drops trailing spaces), or `None` when the request
    /// had no such header at all.
    pub authorization: Option<String>,
    /// The body's `max_tokens`, if it is a non-negative integer (see `body`
    /// for anything else).
    pub max_tokens: Option<u64>,
    /// The body's `max_completion_tokens`, if it is a non-negative integer.
    pub max_completion_tokens: Option<u64>,
    /// The whole request body.
    pub body: serde_json::Value,
}

/// Startup configuration of a [`MockLlm`].
#[derive(Debug, Clone, Default)]
pub struct MockConfig {
    /// Delay added to every chat completion call (including failing ones,
    /// except quota and storm 429s, which are answered at once).
    pub latency: Duration,
    /// Fraction (`0.0..=1.0`) of chat completion calls answered with a 500.
    pub error_rate: f64,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>` (else 401).
    pub api_key: Option<String>,
    /// Keep the last [`RECORD_CAPACITY`] chat requests ([`MockLlm::requests`],
    /// [`MockLlm::request_records`]). Off, it costs one branch per call.
    pub record: bool,
    /// Keep a [`CallRecord`] of the last [`JOURNAL_CAPACITY`] calls. Off, it
    /// costs one branch per call, so benchmarks leave it off.
    pub journal: bool,
    /// Quota mode: admit at most this many requests in any 60 s (see
    /// "Quota mode" above). `None` or `Some(0)`: no limit.
    pub rpm: Option<u64>,
    /// Quota mode: admit at most this many tokens (prompt + completion of the
    /// reply's `usage`) in any 60 s. `None` or `Some(0)`: no limit.
    pub tpm: Option<u64>,
    /// Streamed answers (`"stream": true`): content chunks ("tokens") per
    /// second; 0 sends them as fast as possible. `[[stream_rate:N]]`
    /// overrides it per call.
    pub stream_rate: u64,
    /// HTTP/2 (h2c, prior knowledge: the server reads the preface and answers either protocol
    /// on one port): the calls one connection may carry at once
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`). 0: [`DEFAULT_H2_MAX_STREAMS`].
    pub h2_max_streams: u32,
    /// Serve HTTPS with this configuration (its ALPN decides HTTP/2 or HTTP/1.1: [`tls_config`])
    /// instead of plain HTTP.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

/// A TLS server configuration from PEM files (a certificate chain, a private key) offering
/// HTTP/2 and HTTP/1.1 in ALPN, as OpenAI's endpoints do.
pub fn tls_config(
    cert_pem: &std::path::Path,
    key_pem: &std::path::Path,
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert_pem)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "cannot read the certificates in {}: {e}",
                cert_pem.display()
            )
        })?;
    let key = PrivateKeyDer::from_pem_file(key_pem)
        .map_err(|e| format!("cannot read the private key in {}: {e}", key_pem.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// hyper's own default, and near what public LLM APIs announce (100–256).
pub const DEFAULT_H2_MAX_STREAMS: u32 = 200;

/// Shared handle to one mock's state; clones observe the same counters.
#[derive(Clone)]
pub struct MockLlm {
    inner: Arc<Inner>,
}

struct Inner {
    latency_nanos: AtomicU64,
    /// Tokens per second of streamed answers (0: unpaced).
    stream_rate: AtomicU64,
    /// `f64::to_bits` of the error rate, so it can change without a lock.
    error_rate_bits: AtomicU64,
    /// The full expected header value, precomputed so the check is a memcmp.
    expected_auth: Option<Box<[u8]>>,
    record: bool,
    total: AtomicU64,
    /// Source of `chatcmpl-<n>` ids; never reset so ids stay unique.
    next_id: AtomicU64,
    shard_hasher: RandomState,
    shards: Box<[Shard]>,
    recorded: Mutex<VecDeque<RequestRecord>>,
    journal: Option<Journal>,
    /// Whether an rpm or tpm is set, so quota-free calls skip the lock.
    quota_on: AtomicBool,
    quota: Mutex<Quota>,
    quota_rejections: AtomicU64,
    blocked_rejections: AtomicU64,
    /// Chat calls whose client went away before the answer was ready (or
    /// before a streamed answer's end).
    aborted: AtomicU64,
    /// Origin of `blocked_until_nanos` (an `Instant` cannot live in an atomic).
    epoch: Instant,
    /// End of the `block_for` storm in nanoseconds since `epoch`; 0: none.
    blocked_until_nanos: AtomicU64,
    h2_max_streams: u32,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// TCP connections accepted by [`serve`], and requests that came over HTTP/2 (any path):
    /// what a client's connection reuse and protocol look like from the server.
    connections: AtomicU64,
    http2_connections: AtomicU64,
    http2_requests: AtomicU64,
}

impl std::fmt::Debug for MockLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockLlm")
            .field("latency", &self.latency())
            .field("stream_rate", &self.stream_rate())
            .field("error_rate", &self.error_rate())
            .field("api_key", &self.inner.expected_auth.is_some())
            .field("record", &self.inner.record)
            .field("journal", &self.inner.journal.is_some())
            .field("total_calls", &self.total_calls())
            .field("quota", &self.quota_status())
            .field("block_remaining", &self.block_remaining())
            .finish()
    }
}

impl MockLlm {
    /// Creates the shared state; serve it with [`MockLlm::router`] or [`serve`].
    pub fn new(config: MockConfig) -> Self {
        let expected_auth = config
            .api_key
            .as_deref()
            .map(|key| format!("Bearer {key}").into_bytes().into_boxed_slice());
        let inner = Inner {
            latency_nanos: AtomicU64::new(duration_to_nanos(config.latency)),
            stream_rate: AtomicU64::new(config.stream_rate),
            error_rate_bits: AtomicU64::new(clamp_rate(config.error_rate).to_bits()),
            expected_auth,
            record: config.record,
            total: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            shard_hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            recorded: Mutex::new(VecDeque::new()),
            journal: config.journal.then(|| Journal::new(JOURNAL_CAPACITY)),
            quota_on: AtomicBool::new(false),
            quota: Mutex::new(Quota::default()),
            quota_rejections: AtomicU64::new(0),
            blocked_rejections: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
            epoch: Instant::now(),
            blocked_until_nanos: AtomicU64::new(0),
            h2_max_streams: if config.h2_max_streams == 0 {
                DEFAULT_H2_MAX_STREAMS
            } else {
                config.h2_max_streams
            },
            tls: config.tls.map(tokio_rustls::TlsAcceptor::from),
            connections: AtomicU64::new(0),
            http2_connections: AtomicU64::new(0),
            http2_requests: AtomicU64::new(0),
        };
        let mock = Self {
            inner: Arc::new(inner),
        };
        mock.set_quota(config.rpm, config.tpm);
        mock
    }

    /// The full HTTP surface (`/v1/*`, `/healthz`, `/_mock/*`).
    ///
    /// `[[drop]]` can only close the connection without a response when the
    /// router is run by [`serve`]/[`spawn`]; under another server (e.g.
    /// `axum::serve`) the client instead gets response headers followed by a
    /// body error.
    pub fn router(&self) -> axum::Router {
        api::router(self.clone())
    }

    /// Chat completion calls whose last user message content equals `prompt`.
    pub fn calls(&self, prompt: &str) -> u64 {
        self.shard(prompt).lock().get(prompt).copied().unwrap_or(0)
    }

    /// All chat completion calls that were authorised and well-formed.
    pub fn total_calls(&self) -> u64 {
        self.inner.total.load(Ordering::Relaxed)
    }

    /// Recorded request bodies, oldest first (empty unless `record`).
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.inner
            .recorded
            .lock()
            .iter()
            .map(|r| r.body.clone())
            .collect()
    }

    /// Recorded requests with what the client sent besides the messages
    /// (`Authorization`, `max_tokens`), oldest first (empty unless `record`).
    pub fn request_records(&self) -> Vec<RequestRecord> {
        self.inner.recorded.lock().iter().cloned().collect()
    }

    /// Finished calls, oldest first (empty unless `journal`). A call still in
    /// progress appears once it ends; [`MockLlm::journal_open`] counts those.
    pub fn journal(&self) -> Vec<CallRecord> {
        self.inner
            .journal
            .as_ref()
            .map(Journal::records)
            .unwrap_or_default()
    }

    /// Calls started whose end is not in the journal yet.
    pub fn journal_open(&self) -> u64 {
        self.inner.journal.as_ref().map_or(0, Journal::open)
    }

    /// Records the journal dropped because it was full (0 means it is complete).
    pub fn journal_evicted(&self) -> u64 {
        self.inner.journal.as_ref().map_or(0, Journal::evicted)
    }

    pub fn set_latency(&self, d: Duration) {
        self.inner
            .latency_nanos
            .store(duration_to_nanos(d), Ordering::Relaxed);
    }

    /// Tokens per second of streamed answers from now on (0: as fast as
    /// possible); a call's `[[stream_rate:N]]` still wins.
    pub fn set_stream_rate(&self, tokens_per_second: u64) {
        self.inner
            .stream_rate
            .store(tokens_per_second, Ordering::Relaxed);
    }

    /// Values outside `0.0..=1.0` are clamped; NaN means 0.
    pub fn set_error_rate(&self, r: f64) {
        self.inner
            .error_rate_bits
            .store(clamp_rate(r).to_bits(), Ordering::Relaxed);
    }

    /// Sets the quota at runtime (`None` or `Some(0)`: no limit; both: quota
    /// mode off). Requests admitted in the last 60 s keep counting against the
    /// new limits; requests served while quota mode was off were not counted.
    pub fn set_quota(&self, rpm: Option<u64>, tpm: Option<u64>) {
        let mut quota = self.inner.quota.lock();
        quota.set(rpm, tpm);
        self.inner
            .quota_on
            .store(quota.enabled(), Ordering::Relaxed);
    }

    /// The limits and what the current 60 s window holds.
    pub fn quota_status(&self) -> QuotaStatus {
        self.inner.quota.lock().status(Instant::now())
    }

    /// Calls the quota answered 429 (over rpm or tpm). Storm 429s are counted
    /// apart, by [`MockLlm::blocked_rejections`].
    pub fn quota_rejections(&self) -> u64 {
        self.inner.quota_rejections.load(Ordering::Relaxed)
    }

    /// Calls answered 429 by a [`MockLlm::block_for`] storm.
    pub fn blocked_rejections(&self) -> u64 {
        self.inner.blocked_rejections.load(Ordering::Relaxed)
    }

    /// Chat calls whose client went away (closed the connection) before the
    /// answer was ready, whatever the call was doing then (reading the body,
    /// latency, a `[[sleep]]`, a `[[hang]]`), or in the middle of a streamed
    /// answer (between chunks, a `[[stall]]`). Not `[[drop]]`s or `[[cut]]`s:
    /// those are the mock's own doing.
    pub fn aborted(&self) -> u64 {
        self.inner.aborted.load(Ordering::Relaxed)
    }

    /// A 429 storm: for `d` from now every chat completion call is answered
    /// 429 with `x-ratelimit-remaining-requests: 0`,
    /// `x-ratelimit-reset-requests: <time left>` and `retry-after: <whole
    /// seconds left, rounded up>`, quota or not. Replaces a storm in
    /// progress; `Duration::ZERO` ends it.
    pub fn block_for(&self, d: Duration) {
        let until = if d.is_zero() {
            0
        } else {
            // At least 1 so a storm never reads as "none"; saturating so a
            // huge `d` means "for as long as this process runs".
            duration_to_nanos(self.inner.epoch.elapsed().saturating_add(d)).max(1)
        };
        self.inner
            .blocked_until_nanos
            .store(until, Ordering::Relaxed);
    }

    /// Time left in the current [`MockLlm::block_for`] storm (zero when none).
    pub fn block_remaining(&self) -> Duration {
        self.block_left(Instant::now()).unwrap_or(Duration::ZERO)
    }

    /// Every journaled call at its arrival, oldest first, including calls
    /// still in progress (empty unless `journal`).
    pub fn arrivals(&self) -> Vec<CallArrival> {
        self.inner
            .journal
            .as_ref()
            .map(Journal::arrivals)
            .unwrap_or_default()
    }

    /// Wall-clock arrival time of every journaled call, oldest first,
    /// including calls still in progress and calls answered 429 (empty unless
    /// `journal`): for "no call arrived between a and b".
    pub fn call_times(&self) -> Vec<SystemTime> {
        self.arrivals().into_iter().map(|a| a.at).collect()
    }

    /// Clears call counters (the aborted, connection and HTTP/2 counts too), recorded requests, the
    /// journal, the quota's window and rejection counters, and ends a storm (not latency, error
    /// rate or the quota's limits; calls in progress are journaled when they
    /// end).
    pub fn reset(&self) {
        for shard in self.inner.shards.iter() {
            shard.lock().clear();
        }
        self.inner.total.store(0, Ordering::Relaxed);
        self.inner.recorded.lock().clear();
        if let Some(journal) = &self.inner.journal {
            journal.clear();
        }
        self.inner.quota.lock().clear();
        self.inner.quota_rejections.store(0, Ordering::Relaxed);
        self.inner.blocked_rejections.store(0, Ordering::Relaxed);
        self.inner.aborted.store(0, Ordering::Relaxed);
        self.inner.connections.store(0, Ordering::Relaxed);
        self.inner.http2_requests.store(0, Ordering::Relaxed);
        self.inner.http2_connections.store(0, Ordering::Relaxed);
        self.block_for(Duration::ZERO);
    }

    /// TCP connections accepted since the start (or the last reset).
    pub fn connections(&self) -> u64 {
        self.inner.connections.load(Ordering::Relaxed)
    }

    /// Requests (any path) that came over HTTP/2, since the start (or the last reset).
    pub fn http2_requests(&self) -> u64 {
        self.inner.http2_requests.load(Ordering::Relaxed)
    }

    pub(crate) fn count_connection(&self) {
        self.inner.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections that carried HTTP/2 (counted at their first request).
    pub fn http2_connections(&self) -> u64 {
        self.inner.http2_connections.load(Ordering::Relaxed)
    }

    pub(crate) fn count_http2(&self, first_on_connection: bool) {
        self.inner.http2_requests.fetch_add(1, Ordering::Relaxed);
        if first_on_connection {
            self.inner.http2_connections.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn tls(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        self.inner.tls.as_ref()
    }

    pub(crate) fn h2_max_streams(&self) -> u32 {
        self.inner.h2_max_streams
    }

    pub(crate) fn latency(&self) -> Duration {
        Duration::from_nanos(self.inner.latency_nanos.load(Ordering::Relaxed))
    }

    pub(crate) fn stream_rate(&self) -> u64 {
        self.inner.stream_rate.load(Ordering::Relaxed)
    }

    pub(crate) fn error_rate(&self) -> f64 {
        f64::from_bits(self.inner.error_rate_bits.load(Ordering::Relaxed))
    }

    pub(crate) fn expected_auth(&self) -> Option<&[u8]> {
        self.inner.expected_auth.as_deref()
    }

    pub(crate) fn recording(&self) -> bool {
        self.inner.record
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts one call for `prompt` and returns its 1-based call number.
    pub(crate) fn count_call(&self, prompt: &str) -> u64 {
        self.inner.total.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.shard(prompt).lock();
        // Look up by &str first: repeated prompts are the hot path and must
        // not allocate a key.
        if let Some(count) = shard.get_mut(prompt) {
            *count += 1;
            *count
        } else {
            shard.insert(prompt.into(), 1);
            1
        }
    }

    /// Starts the journal entry of a call that arrived at `start` (None when
    /// the journal is off, so the hot path allocates nothing).
    pub(crate) fn journal_entry(
        &self,
        prompt: &str,
        call: u64,
        start: Instant,
        rejected: Option<Rejection>,
    ) -> Option<JournalEntry> {
        let journal = self.inner.journal.as_ref()?;
        Some(JournalEntry::begin(
            self.clone(),
            journal,
            prompt,
            call,
            start,
            rejected,
        ))
    }

    /// Time left in the storm at `now`, if one is on.
    pub(crate) fn block_left(&self, now: Instant) -> Option<Duration> {
        let until = self.inner.blocked_until_nanos.load(Ordering::Relaxed);
        if until == 0 {
            return None;
        }
        let now = duration_to_nanos(now.saturating_duration_since(self.inner.epoch));
        (now < until).then(|| Duration::from_nanos(until - now))
    }

    pub(crate) fn count_aborted(&self) {
        self.inner.aborted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_blocked(&self) {
        self.inner
            .blocked_rejections
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The quota's verdict on a request of `tokens()` tokens arriving at
    /// `now`; `None` when quota mode is off (one atomic load, no token count).
    pub(crate) fn admit(&self, now: Instant, tokens: impl FnOnce() -> u64) -> Option<Verdict> {
        if !self.inner.quota_on.load(Ordering::Relaxed) {
            return None;
        }
        let tokens = tokens();
        let verdict = self.inner.quota.lock().admit(now, tokens);
        if verdict.rejected.is_some() {
            self.inner.quota_rejections.fetch_add(1, Ordering::Relaxed);
        }
        Some(verdict)
    }

    pub(crate) fn journal_state(&self) -> Option<&Journal> {
        self.inner.journal.as_ref()
    }

    pub(crate) fn record_request(&self, record: RequestRecord) {
        let mut recorded = self.inner.recorded.lock();
        if recorded.len() >= RECORD_CAPACITY {
            recorded.pop_front();
        }
        recorded.push_back(record);
    }

    /// Snapshot of all per-prompt counters.
    pub(crate) fn calls_by_prompt(&self) -> Vec<(String, u64)> {
        let mut all = Vec::new();
        for shard in self.inner.shards.iter() {
            let shard = shard.lock();
            all.extend(shard.iter().map(|(k, v)| (k.to_string(), *v)));
        }
        all
    }

    fn shard(&self, prompt: &str) -> &Shard {
        let hash = self.inner.shard_hasher.hash_one(prompt);
        // Truncation is fine: only the low bits pick the shard.
        &self.inner.shards[(hash as usize) % SHARDS]
    }
}

fn duration_to_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn clamp_rate(r: f64) -> f64 {
    if r.is_nan() {
        0.0
    } else {
        r.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_prompt_and_reset() {
        let mock = MockLlm::new(MockConfig::default());
        assert_eq!(mock.count_call("a"), 1);
        assert_eq!(mock.count_call("a"), 2);
        assert_eq!(mock.count_call("b"), 1);
        assert_eq!(mock.calls("a"), 2);
        assert_eq!(mock.calls("zzz"), 0);
        assert_eq!(mock.total_calls(), 3);
        mock.reset();
        assert_eq!(mock.calls("a"), 0);
        assert_eq!(mock.total_calls(), 0);
    }

    #[test]
    fn recording_is_bounded() {
        let mock = MockLlm::new(MockConfig {
            record: true,
            ..MockConfig::default()
        });
        for i in 0..(RECORD_CAPACITY + 5) {
            mock.record_request(RequestRecord {
                prompt: "p".into(),
                call: i as u64 + 1,
                authorization: None,
                max_tokens: None,
                max_completion_tokens: None,
                body: serde_json::json!(i),
            });
        }
        let recorded = mock.requests();
        assert_eq!(recorded.len(), RECORD_CAPACITY);
        assert_eq!(recorded[0], serde_json::json!(5));
        assert_eq!(mock.request_records()[0].call, 6);
    }

    #[test]
    fn a_storm_ends_on_time_on_zero_or_on_reset() {
        let mock = MockLlm::new(MockConfig::default());
        assert_eq!(mock.block_remaining(), Duration::ZERO);
        let now = Instant::now();
        mock.block_for(Duration::from_secs(10));
        let left = mock.block_left(now).expect("blocked");
        // Measured from just before the call: at least the full 10 s.
        assert!(left >= Duration::from_secs(10) && left < Duration::from_secs(11));
        assert_eq!(mock.block_left(now + Duration::from_secs(11)), None);
        mock.block_for(Duration::ZERO);
        assert_eq!(mock.block_left(now), None);
        mock.block_for(Duration::MAX);
        assert!(mock.block_remaining() > Duration::from_secs(1 << 30));
        mock.reset();
        assert_eq!(mock.block_remaining(), Duration::ZERO);
    }

    #[test]
    fn config_sets_the_quota_and_zero_means_none() {
        let mock = MockLlm::new(MockConfig {
            rpm: Some(5),
            tpm: Some(0),
            ..MockConfig::default()
        });
        let status = mock.quota_status();
        assert_eq!((status.rpm, status.tpm), (Some(5), None));
        mock.set_quota(None, None);
        assert!(mock
            .admit(Instant::now(), || unreachable!("off: no token count"))
            .is_none());
    }

    #[test]
    fn error_rate_is_clamped() {
        let mock = MockLlm::new(MockConfig::default());
        mock.set_error_rate(3.0);
        assert_eq!(mock.error_rate(), 1.0);
        mock.set_error_rate(f64::NAN);
        assert_eq!(mock.error_rate(), 0.0);
    }
}
