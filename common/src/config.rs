//! Configuration from environment variables, read once at start.
//!
//! Every variable is parsed here; a bad value is a [`ConfigError`] naming the variable, and the
//! binaries exit with code 64 (EX_USAGE). Config is read through [`Env`] so tests never touch the
//! process environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::keys::validate_queue;
use crate::task::MAX_ATTEMPTS_LIMIT;

pub const ENV_REDIS_URL: &str = "REDIS_URL";
/// Cluster mode: the comma-separated seed URLs of a Redis Cluster (`REDIS_URL` is then ignored).
pub const ENV_REDIS_CLUSTER_NODES: &str = "REDIS_CLUSTER_NODES";
/// Most seed URLs `REDIS_CLUSTER_NODES` may list (the client learns the rest from the cluster).
pub const MAX_CLUSTER_SEEDS: usize = 64;
pub const ENV_LISTEN: &str = "AGENTQ_LISTEN";
pub const ENV_KEY_PREFIX: &str = "AGENTQ_KEY_PREFIX";
pub const ENV_QUEUE: &str = "AGENTQ_QUEUE";
pub const ENV_OPENAI_BASE_URL: &str = "OPENAI_BASE_URL";
pub const ENV_OPENAI_API_KEY: &str = "OPENAI_API_KEY";
pub const ENV_MODEL: &str = "AGENTQ_MODEL";
pub const ENV_CONCURRENCY: &str = "WORKER_CONCURRENCY";
/// The worker's async runtime threads (see [`worker_threads`]).
pub const ENV_WORKER_THREADS: &str = "WORKER_THREADS";
pub const ENV_MAX_ATTEMPTS: &str = "AGENTQ_MAX_ATTEMPTS";
pub const ENV_HEARTBEAT_SECS: &str = "AGENTQ_HEARTBEAT_SECS";
pub const ENV_DRAIN_TIMEOUT_SECS: &str = "AGENTQ_DRAIN_TIMEOUT_SECS";
pub const ENV_LLM_TIMEOUT_SECS: &str = "AGENTQ_LLM_TIMEOUT_SECS";
pub const ENV_RESULT_TTL_SECS: &str = "AGENTQ_RESULT_TTL_SECS";
pub const ENV_LOG_FORMAT: &str = "AGENTQ_LOG_FORMAT";
pub const ENV_MAX_RATE_LIMITED: &str = "AGENTQ_MAX_RATE_LIMITED";
pub const ENV_RETRY_BASE_MS: &str = "AGENTQ_RETRY_BASE_MS";
pub const ENV_RETRY_MAX_MS: &str = "AGENTQ_RETRY_MAX_MS";
pub const ENV_MEMORY_MESSAGES: &str = "AGENTQ_MEMORY_MESSAGES";
pub const ENV_MCP_TIMEOUT_SECS: &str = "AGENTQ_MCP_TIMEOUT_SECS";
pub const ENV_MCP_MAX_RESULT_BYTES: &str = "AGENTQ_MCP_MAX_RESULT_BYTES";
/// The most `max_steps` a task may ask for (model calls of one task's tool loop).
pub const ENV_MAX_STEPS_CAP: &str = "AGENTQ_MAX_STEPS_CAP";
pub const ENV_MEMORY_TTL_SECS: &str = "AGENTQ_MEMORY_TTL_SECS";
pub const ENV_PRICES: &str = "AGENTQ_PRICES";
pub const ENV_FETCH_BATCH: &str = "AGENTQ_FETCH_BATCH";
pub const ENV_QUEUES: &str = "AGENTQ_QUEUES";
pub const ENV_MAX_RESPONSE_BYTES: &str = "AGENTQ_MAX_RESPONSE_BYTES";
pub const ENV_MAX_TOKENS: &str = "AGENTQ_MAX_TOKENS";
pub const ENV_MAX_TOKENS_PARAM: &str = "AGENTQ_MAX_TOKENS_PARAM";
pub const ENV_LIMITER_OUTPUT_TOKENS: &str = "AGENTQ_LIMITER_OUTPUT_TOKENS";
pub const ENV_LIMITER_GRANTS: &str = "AGENTQ_LIMITER_GRANTS";
/// Which HTTP the worker speaks to LLM upstreams: `auto` (default: HTTP/2 where a TLS upstream
/// offers it in ALPN, else HTTP/1.1), `http1` (HTTP/1.1 only, one connection per call in flight),
/// `http2` (HTTP/2 everywhere; a plain `http://` upstream must then speak h2c with prior
/// knowledge: vLLM behind Envoy, the mock LLM, ...).
pub const ENV_LLM_HTTP: &str = "AGENTQ_LLM_HTTP";
/// Calls one HTTP/2 connection carries at once: the worker opens about concurrency ÷ this many
/// connections per upstream and spreads its calls over them, since one connection never carries
/// more than the server's SETTINGS_MAX_CONCURRENT_STREAMS (and hyper queues the rest instead of
/// opening another). 100 is the least RFC 9113 asks servers to allow.
pub const ENV_LLM_HTTP2_STREAMS: &str = "AGENTQ_LLM_HTTP2_STREAMS";
/// How often a worker checks that the tasks it runs were not cancelled (or finished elsewhere)
/// behind its back: the backstop of the cancel channel, which misses what is published while it
/// reconnects.
pub const ENV_CANCEL_POLL_MS: &str = "AGENTQ_CANCEL_POLL_MS";
/// `on` (default): the worker asks for streamed answers and appends their text to each task's
/// event stream as it comes; `off`: one JSON answer per call (for an upstream that cannot
/// stream), and the stream gets the text with the result.
pub const ENV_STREAM: &str = "AGENTQ_STREAM";
/// How long a streamed answer's text may wait in the worker before it is written (ms).
pub const ENV_STREAM_FLUSH_MS: &str = "AGENTQ_STREAM_FLUSH_MS";
/// How much text is written at once without waiting for the flush interval (bytes).
pub const ENV_STREAM_FLUSH_BYTES: &str = "AGENTQ_STREAM_FLUSH_BYTES";
/// Most SSE streams one api process serves at once; past it `503`.
pub const ENV_MAX_STREAMS: &str = "AGENTQ_MAX_STREAMS";
/// Events buffered for one SSE client before it counts as too slow and is closed.
pub const ENV_STREAM_BUFFER: &str = "AGENTQ_STREAM_BUFFER";
/// Longest `POST /v1/chat/completions` waits for its task before answering 202 with the task id.
pub const ENV_CHAT_WAIT_SECS: &str = "AGENTQ_CHAT_WAIT_SECS";
/// `on`: a chat-completions client that hangs up cancels its task (default `off`: it runs on).
pub const ENV_CHAT_CANCEL_ON_DISCONNECT: &str = "AGENTQ_CHAT_CANCEL_ON_DISCONNECT";
/// Most concurrent `POST /v1/tasks` written by one script call (group commit); `0` writes each
/// request with its own call, as before group commit.
pub const ENV_ENQUEUE_GROUP_MAX: &str = "AGENTQ_ENQUEUE_GROUP_MAX";
pub const DEFAULT_ENQUEUE_GROUP_MAX: usize = 64;
/// Most group-commit script calls out at once; requests arriving while all are out form the next
/// group.
pub const ENV_ENQUEUE_GROUP_INFLIGHT: &str = "AGENTQ_ENQUEUE_GROUP_INFLIGHT";
pub const DEFAULT_ENQUEUE_GROUP_INFLIGHT: usize = 2;
/// Replicas an enqueue waits for (`WAIT`) before it is acknowledged with 202; default 1 in
/// cluster mode, 0 (no wait) with one server.
pub const ENV_ENQUEUE_REPLICAS: &str = "AGENTQ_ENQUEUE_REPLICAS";
/// How long an enqueue waits for those replicas before it answers 503 instead.
pub const ENV_ENQUEUE_REPLICA_TIMEOUT_MS: &str = "AGENTQ_ENQUEUE_REPLICA_TIMEOUT_MS";
pub const DEFAULT_ENQUEUE_REPLICA_TIMEOUT_MS: u64 = 1000;
/// `on` (default): every `/v1/*` route needs a bearer token; `off`: open, for local use.
pub const ENV_AUTH: &str = "AGENTQ_AUTH";
/// The admin token (manages tenants and their tokens, sees everything); required with auth on.
pub const ENV_ADMIN_TOKEN: &str = "AGENTQ_ADMIN_TOKEN";
/// Optional: a token `/metrics` then requires (unset: `/metrics` stays open).
pub const ENV_METRICS_TOKEN: &str = "AGENTQ_METRICS_TOKEN";
/// Failed authentications one source address may make per minute before it gets 429s.
pub const ENV_AUTH_FAIL_LIMIT: &str = "AGENTQ_AUTH_FAIL_LIMIT";
/// Most tenants, and most live tokens per tenant (admin-made state stays bounded too).
pub const ENV_MAX_TENANTS: &str = "AGENTQ_MAX_TENANTS";
pub const ENV_MAX_TOKENS_PER_TENANT: &str = "AGENTQ_MAX_TOKENS_PER_TENANT";
/// Shortest admin or metrics token accepted: a short secret is a guessable one.
pub const MIN_SECRET_LEN: usize = 16;
/// The Batch API (docs/architecture.md, "Batch API"): the largest file `POST /v1/files` takes.
pub const ENV_FILE_MAX_BYTES: &str = "AGENTQ_FILE_MAX_BYTES";
/// Most lines (requests) of one batch input file.
pub const ENV_BATCH_MAX_REQUESTS: &str = "AGENTQ_BATCH_MAX_REQUESTS";
/// How long a file is kept (its `expires_at`).
pub const ENV_FILE_TTL_SECS: &str = "AGENTQ_FILE_TTL_SECS";
/// The bytes all stored files may take together (uploads past it get 413).
pub const ENV_FILES_MAX_TOTAL_BYTES: &str = "AGENTQ_FILES_MAX_TOTAL_BYTES";
/// The queue batches fan out onto (default: the api's default queue; must be declared).
pub const ENV_BATCH_QUEUE: &str = "AGENTQ_BATCH_QUEUE";
/// Most batches not ended at once (past it `POST /v1/batches` gets 429).
pub const ENV_BATCHES_MAX: &str = "AGENTQ_BATCHES_MAX";
/// Lines per fan-out script, tasks per cancel script, requests per page of the output files.
pub const ENV_BATCH_CHUNK: &str = "AGENTQ_BATCH_CHUNK";
pub const DEFAULT_FILE_MAX_BYTES: u64 = 100 * 1024 * 1024;
pub const DEFAULT_BATCH_MAX_REQUESTS: usize = 50_000;
pub const DEFAULT_FILE_TTL_SECS: u64 = 30 * 86_400;
pub const DEFAULT_FILES_MAX_TOTAL_BYTES: u64 = 1024 * 1024 * 1024;
pub const DEFAULT_BATCHES_MAX: usize = 1000;
pub const DEFAULT_BATCH_CHUNK: usize = 500;
/// Below the official SDKs' 600 s request timeout, so the api answers (202 with the task id)
/// before an SDK gives up and resends the request as a second task.
pub const DEFAULT_CHAT_WAIT_SECS: u64 = 300;
/// Output tokens the limiter reserves for a call that sends no output cap (`AGENTQ_MAX_TOKENS=0`).
pub const DEFAULT_LIMITER_OUTPUT_TOKENS: u32 = 1024;

pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_WORKER_LISTEN: &str = "0.0.0.0:9090";
pub const DEFAULT_KEY_PREFIX: &str = "agentq";
pub const DEFAULT_QUEUE: &str = "default";
pub const DEFAULT_OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";
pub const DEFAULT_CONCURRENCY: usize = 16;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
pub const DEFAULT_HEARTBEAT_SECS: u64 = 30;
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 100;
pub const DEFAULT_LLM_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_RESULT_TTL_SECS: u64 = 86_400;
pub const DEFAULT_MAX_RATE_LIMITED: u32 = 20;
pub const DEFAULT_RETRY_BASE_MS: u64 = 1_000;
pub const DEFAULT_RETRY_MAX_MS: u64 = 300_000;
pub const DEFAULT_MEMORY_MESSAGES: usize = 10;
pub const DEFAULT_MAX_STEPS_CAP: u32 = 32;
pub const DEFAULT_MCP_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_MCP_MAX_RESULT_BYTES: usize = 16 * 1024;
pub const DEFAULT_MEMORY_TTL_SECS: u64 = 3_600;
pub const DEFAULT_FETCH_BATCH: usize = 32;
pub const DEFAULT_LLM_HTTP2_STREAMS: usize = 100;
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
pub const DEFAULT_CANCEL_POLL_MS: u64 = 2_000;
pub const DEFAULT_STREAM_FLUSH_MS: u64 = 50;
pub const DEFAULT_STREAM_FLUSH_BYTES: usize = 2048;
pub const DEFAULT_MAX_STREAMS: usize = 10_000;
pub const DEFAULT_STREAM_BUFFER: usize = 256;
/// Output cap sent with every call: bounds what a call can cost, and keeps a server from
/// generating long after the worker gave up on the call (llama.cpp does not stop on disconnect).
pub const DEFAULT_MAX_TOKENS: u32 = 4096;
/// Most queues the api accepts in `AGENTQ_QUEUES`: every queue costs gauges and a scrape's reads.
pub const MAX_QUEUES: usize = 256;

/// Exit code for a bad configuration (EX_USAGE from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// A variable that is set to something unusable.
#[derive(Debug, thiserror::Error)]
#[error("invalid {var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

/// Where configuration comes from: the process environment, or a map in tests.
pub trait Env {
    fn get(&self, key: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

fn parse<T: FromStr>(env: &dyn Env, var: &'static str, default: T) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match env.get(var).filter(|v| !v.trim().is_empty()) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|e: T::Err| ConfigError {
            var,
            message: format!("{e} (got {v:?})"),
        }),
    }
}

fn ranged<T: FromStr + PartialOrd + std::fmt::Display + Copy>(
    env: &dyn Env,
    var: &'static str,
    default: T,
    min: T,
    max: T,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    let v = parse(env, var, default)?;
    if v < min || v > max {
        return Err(ConfigError {
            var,
            message: format!("must be between {min} and {max} (got {v})"),
        });
    }
    Ok(v)
}

fn string(env: &dyn Env, var: &str, default: &str) -> String {
    env.get(var)
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Self::Json),
            "pretty" => Ok(Self::Pretty),
            _ => Err("expected json or pretty".to_owned()),
        }
    }
}

/// Reads `AGENTQ_LOG_FORMAT` alone, so logging can start before the rest of the config is read.
pub fn log_format(env: &dyn Env) -> Result<LogFormat, ConfigError> {
    parse(env, ENV_LOG_FORMAT, LogFormat::Pretty)
}

/// The default of `WORKER_THREADS`: a worker waits on the network almost all the time (a run is
/// ~50 µs of CPU per LLM call), so two threads keep up with what one Redis can feed it, and every
/// further thread costs memory (its allocator cache and arena, its stack) without adding
/// throughput: loadtest/bench/README.md, "Memory and CPU per call in flight (issue 20)".
pub const DEFAULT_MAX_WORKER_THREADS: usize = 2;

/// `WORKER_THREADS`: the worker's runtime threads, read before the runtime starts (so outside
/// [`WorkerConfig`]); by default the machine's cores, at most [`DEFAULT_MAX_WORKER_THREADS`].
pub fn worker_threads(env: &dyn Env, cores: usize) -> Result<usize, ConfigError> {
    let default = cores.clamp(1, DEFAULT_MAX_WORKER_THREADS);
    ranged(env, ENV_WORKER_THREADS, default, 1, 1024)
}

/// Settings shared by the api and the worker.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    pub redis_url: SecretString,
    /// `REDIS_CLUSTER_NODES`'s seeds; empty: one server at `redis_url`.
    pub redis_cluster_nodes: Vec<SecretString>,
    pub listen: SocketAddr,
    pub key_prefix: String,
    pub result_ttl: Duration,
    pub max_attempts: u32,
    pub log_format: LogFormat,
}

impl CommonConfig {
    fn from_env(env: &dyn Env, default_listen: &str) -> Result<Self, ConfigError> {
        let redis_url = string(env, ENV_REDIS_URL, DEFAULT_REDIS_URL);
        // Parse now so a typo fails at start; the message never repeats the URL (it may hold a password).
        if let Err(e) = redis::Client::open(redis_url.as_str()) {
            return Err(ConfigError {
                var: ENV_REDIS_URL,
                message: format!("not a redis:// or rediss:// URL ({})", e.category()),
            });
        }
        let redis_cluster_nodes = cluster_nodes(env)?;
        let default_listen: SocketAddr = default_listen.parse().map_err(|_| ConfigError {
            var: ENV_LISTEN,
            message: "bad built-in default".to_owned(),
        })?;
        let key_prefix = string(env, ENV_KEY_PREFIX, DEFAULT_KEY_PREFIX);
        if key_prefix.contains(['{', '}', ' ']) {
            return Err(ConfigError {
                var: ENV_KEY_PREFIX,
                message: "must not contain braces or spaces".to_owned(),
            });
        }
        Ok(Self {
            redis_url: SecretString::from(redis_url),
            redis_cluster_nodes,
            listen: parse(env, ENV_LISTEN, default_listen)?,
            key_prefix,
            result_ttl: Duration::from_secs(ranged(
                env,
                ENV_RESULT_TTL_SECS,
                DEFAULT_RESULT_TTL_SECS,
                1,
                365 * 86_400,
            )?),
            max_attempts: ranged(
                env,
                ENV_MAX_ATTEMPTS,
                DEFAULT_MAX_ATTEMPTS,
                1,
                MAX_ATTEMPTS_LIMIT,
            )?,
            log_format: log_format(env)?,
        })
    }

    /// The Redis address without credentials, for logs: the URL, or `cluster(<seeds>)`.
    pub fn redis_display(&self) -> String {
        if self.redis_cluster_nodes.is_empty() {
            return redact_url(self.redis_url.expose_secret());
        }
        let seeds: Vec<String> = self
            .redis_cluster_nodes
            .iter()
            .map(|u| redact_url(u.expose_secret()))
            .collect();
        format!("cluster({})", seeds.join(","))
    }

    /// Where Redis is: the cluster's seeds when `REDIS_CLUSTER_NODES` is set, else `REDIS_URL`.
    pub fn redis_target(&self) -> crate::redis_conn::RedisTarget {
        if self.redis_cluster_nodes.is_empty() {
            crate::redis_conn::RedisTarget::Single(self.redis_url.clone())
        } else {
            crate::redis_conn::RedisTarget::Cluster(self.redis_cluster_nodes.clone())
        }
    }
}

/// `REDIS_CLUSTER_NODES`: unset or blank for one server; else 1 to [`MAX_CLUSTER_SEEDS`] seed
/// URLs, comma-separated, each `redis://[user:password@]host:port` or `rediss://...`, agreeing on
/// credentials and TLS (the cluster client speaks to every node the same way). No database number:
/// a cluster has only database 0. Messages never repeat a URL (it may hold a password).
fn cluster_nodes(env: &dyn Env) -> Result<Vec<SecretString>, ConfigError> {
    let Some(raw) = env
        .get(ENV_REDIS_CLUSTER_NODES)
        .filter(|v| !v.trim().is_empty())
    else {
        return Ok(Vec::new());
    };
    let err = |message: String| ConfigError {
        var: ENV_REDIS_CLUSTER_NODES,
        message,
    };
    let seeds: Vec<&str> = raw.split(',').map(str::trim).collect();
    if seeds.len() > MAX_CLUSTER_SEEDS {
        return Err(err(format!("at most {MAX_CLUSTER_SEEDS} seed URLs")));
    }
    let mut infos = Vec::with_capacity(seeds.len());
    for (i, url) in seeds.iter().enumerate() {
        let n = i + 1;
        if url.is_empty() {
            return Err(err(format!("seed {n} is empty")));
        }
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(err(format!("seed {n} is not a redis:// or rediss:// URL")));
        }
        let info = redis::IntoConnectionInfo::into_connection_info(*url)
            .map_err(|e| err(format!("seed {n} is not a Redis URL ({})", e.category())))?;
        if info.redis_settings().db() != 0 {
            return Err(err(format!(
                "seed {n} names a database; a cluster has only database 0"
            )));
        }
        infos.push(info);
    }
    // the same checks the cluster client makes when it is built, here at start with the variable named
    redis::cluster::ClusterClient::new(infos)
        .map_err(|e| err(format!("the seeds disagree ({})", e.category())))?;
    Ok(seeds
        .into_iter()
        .map(|u| SecretString::from(u.to_owned()))
        .collect())
}

/// `scheme://host:port/db` with any user and password removed.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let rest = rest.rsplit_once('@').map(|(_, host)| host).unwrap_or(rest);
    format!("{scheme}://{rest}")
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub common: CommonConfig,
    pub default_queue: String,
    /// The declared queues (`AGENTQ_QUEUES`, plus the default queue), sorted. Tasks may name only
    /// these: a client must not be able to create queues (keys, gauges) nobody serves.
    pub queues: Vec<String>,
    /// Which models exist (`AGENTQ_UPSTREAMS`); the api refuses a model nobody serves.
    pub upstreams: std::sync::Arc<crate::flow::Upstreams>,
    /// The most `max_steps` a task may ask for (`AGENTQ_MAX_STEPS_CAP`).
    pub max_steps_cap: u32,
    /// The MCP servers tasks may enable (`AGENTQ_MCP_SERVERS`; names only, no headers).
    pub mcp: crate::mcp::McpServers,
    /// `AGENTQ_MAX_STREAMS`: SSE streams served at once.
    pub max_streams: usize,
    /// `AGENTQ_STREAM_BUFFER`: events queued for one SSE client before it is dropped as slow.
    pub stream_buffer: usize,
    /// `AGENTQ_CHAT_WAIT_SECS`: how long a chat completion waits for its task.
    pub chat_wait: Duration,
    /// `AGENTQ_CHAT_CANCEL_ON_DISCONNECT`: a client hanging up cancels its task.
    pub chat_cancel_on_disconnect: bool,
    /// `AGENTQ_ENQUEUE_GROUP_MAX`: most single enqueues per group-commit call (0: no grouping).
    pub enqueue_group_max: usize,
    /// `AGENTQ_ENQUEUE_GROUP_INFLIGHT`: group-commit calls out at once.
    pub enqueue_group_inflight: usize,
    /// `AGENTQ_ENQUEUE_REPLICAS` and `AGENTQ_ENQUEUE_REPLICA_TIMEOUT_MS`: replicas an enqueue
    /// waits for before it is acknowledged; `None`: it is acknowledged once its master wrote it.
    pub enqueue_replicas: Option<crate::queue::ReplicaWait>,
    /// The Batch API's limits and queue (`AGENTQ_FILE_*`, `AGENTQ_BATCH*`).
    pub batch: BatchConfig,
    /// Tokens and tenants (`AGENTQ_AUTH`, `AGENTQ_ADMIN_TOKEN`, ...).
    pub auth: AuthConfig,
}

/// Authentication settings. The secrets are [`SecretString`]s: they never reach a log line or
/// an error message (a config error names the variable, not the value).
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub enabled: bool,
    pub admin_token: Option<SecretString>,
    pub metrics_token: Option<SecretString>,
    pub fail_limit: u32,
    pub max_tenants: usize,
    pub max_tokens_per_tenant: usize,
}

impl AuthConfig {
    /// Auth off: everything open, as before tenants existed.
    pub fn off() -> Self {
        Self {
            enabled: false,
            admin_token: None,
            metrics_token: None,
            fail_limit: 20,
            max_tenants: 1000,
            max_tokens_per_tenant: 100,
        }
    }

    fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let enabled = match string(env, ENV_AUTH, "on").trim() {
            "on" => true,
            "off" => false,
            other => {
                return Err(ConfigError {
                    var: ENV_AUTH,
                    message: format!("must be on or off (got {other:?})"),
                })
            }
        };
        let secret = |var: &'static str| -> Result<Option<SecretString>, ConfigError> {
            match env
                .get(var)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
            {
                None => Ok(None),
                // the value is never echoed: only its length is judged
                Some(v) if v.len() < MIN_SECRET_LEN => Err(ConfigError {
                    var,
                    message: format!("must be at least {MIN_SECRET_LEN} characters"),
                }),
                Some(v) if !v.bytes().all(|b| b.is_ascii_graphic()) => Err(ConfigError {
                    var,
                    message: "must be printable ASCII without spaces".into(),
                }),
                Some(v) => Ok(Some(SecretString::from(v))),
            }
        };
        let admin_token = secret(ENV_ADMIN_TOKEN)?;
        if enabled && admin_token.is_none() {
            return Err(ConfigError {
                var: ENV_ADMIN_TOKEN,
                message: "must be set while AGENTQ_AUTH is on (the default); set \
                          AGENTQ_AUTH=off for an open api on a trusted machine"
                    .into(),
            });
        }
        Ok(Self {
            enabled,
            admin_token,
            metrics_token: secret(ENV_METRICS_TOKEN)?,
            fail_limit: ranged(env, ENV_AUTH_FAIL_LIMIT, 20, 1, 1_000_000)?,
            max_tenants: ranged(env, ENV_MAX_TENANTS, 1000, 1, 100_000)?,
            max_tokens_per_tenant: ranged(env, ENV_MAX_TOKENS_PER_TENANT, 100, 1, 10_000)?,
        })
    }
}

/// The Batch API's settings (docs/architecture.md, "Batch API").
#[derive(Debug, Clone)]
pub struct BatchConfig {
    pub file_max_bytes: u64,
    pub max_requests: usize,
    pub file_ttl: Duration,
    pub files_max_total_bytes: u64,
    pub queue: String,
    pub batches_max: usize,
    pub chunk: usize,
}

impl BatchConfig {
    fn from_env(
        env: &dyn Env,
        default_queue: &str,
        queues: &[String],
    ) -> Result<Self, ConfigError> {
        let queue = string(env, ENV_BATCH_QUEUE, default_queue);
        if queues.binary_search(&queue).is_err() {
            return Err(ConfigError {
                var: ENV_BATCH_QUEUE,
                message: format!("{queue:?} is not a declared queue (AGENTQ_QUEUES)"),
            });
        }
        Ok(Self {
            file_max_bytes: ranged(
                env,
                ENV_FILE_MAX_BYTES,
                DEFAULT_FILE_MAX_BYTES,
                1024,
                1 << 40,
            )?,
            max_requests: ranged(
                env,
                ENV_BATCH_MAX_REQUESTS,
                DEFAULT_BATCH_MAX_REQUESTS,
                1,
                10_000_000,
            )?,
            file_ttl: Duration::from_secs(ranged(
                env,
                ENV_FILE_TTL_SECS,
                DEFAULT_FILE_TTL_SECS,
                60,
                365 * 86_400,
            )?),
            files_max_total_bytes: ranged(
                env,
                ENV_FILES_MAX_TOTAL_BYTES,
                DEFAULT_FILES_MAX_TOTAL_BYTES,
                1024,
                1 << 44,
            )?,
            queue,
            batches_max: ranged(env, ENV_BATCHES_MAX, DEFAULT_BATCHES_MAX, 1, 1_000_000)?,
            chunk: ranged(env, ENV_BATCH_CHUNK, DEFAULT_BATCH_CHUNK, 1, 10_000)?,
        })
    }
}

impl ApiConfig {
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_env(env, DEFAULT_API_LISTEN)?;
        let cluster = !common.redis_cluster_nodes.is_empty();
        let default_queue = string(env, ENV_QUEUE, DEFAULT_QUEUE);
        validate_queue(&default_queue).map_err(|e| ConfigError {
            var: ENV_QUEUE,
            message: e.to_string(),
        })?;
        let mut queues = vec![default_queue.clone()];
        // Unset, the api accepts just its default queue: the one its release's workers serve.
        for q in string(env, ENV_QUEUES, &default_queue).split(',') {
            let q = q.trim();
            if q.is_empty() {
                continue;
            }
            validate_queue(q).map_err(|e| ConfigError {
                var: ENV_QUEUES,
                message: format!("{q:?}: {e}"),
            })?;
            queues.push(q.to_owned());
        }
        queues.sort();
        queues.dedup();
        if queues.len() > MAX_QUEUES {
            return Err(ConfigError {
                var: ENV_QUEUES,
                message: format!("at most {MAX_QUEUES} queues"),
            });
        }
        let upstreams = crate::flow::Upstreams::from_env(
            env,
            &string(env, ENV_OPENAI_BASE_URL, DEFAULT_OPENAI_BASE_URL),
            SecretString::from(String::new()),
            env.get(ENV_MODEL).as_deref(),
            &string(env, ENV_MODEL, DEFAULT_MODEL),
            false,
        )?;
        let max_steps_cap = ranged(
            env,
            ENV_MAX_STEPS_CAP,
            DEFAULT_MAX_STEPS_CAP as usize,
            1,
            crate::task::MAX_STEPS_LIMIT as usize,
        )? as u32;
        let batch = BatchConfig::from_env(env, &default_queue, &queues)?;
        Ok(Self {
            auth: AuthConfig::from_env(env)?,
            common,
            batch,
            default_queue,
            queues,
            upstreams: std::sync::Arc::new(upstreams),
            max_steps_cap,
            mcp: crate::mcp::McpServers::from_env(env, false)?,
            max_streams: ranged(env, ENV_MAX_STREAMS, DEFAULT_MAX_STREAMS, 1, 1_000_000)?,
            stream_buffer: ranged(env, ENV_STREAM_BUFFER, DEFAULT_STREAM_BUFFER, 8, 65_536)?,
            chat_wait: Duration::from_secs(ranged(
                env,
                ENV_CHAT_WAIT_SECS,
                DEFAULT_CHAT_WAIT_SECS,
                1,
                86_400,
            )?),
            enqueue_group_max: ranged(
                env,
                ENV_ENQUEUE_GROUP_MAX,
                DEFAULT_ENQUEUE_GROUP_MAX,
                0,
                crate::queue::ITEMS_PER_CALL,
            )?,
            enqueue_group_inflight: ranged(
                env,
                ENV_ENQUEUE_GROUP_INFLIGHT,
                DEFAULT_ENQUEUE_GROUP_INFLIGHT,
                1,
                64,
            )?,
            enqueue_replicas: {
                let default = u32::from(cluster);
                let replicas: u32 = ranged(env, ENV_ENQUEUE_REPLICAS, default, 0, 16)?;
                // below the api's 4 s Redis deadline, with room for the write before it
                let timeout = ranged(
                    env,
                    ENV_ENQUEUE_REPLICA_TIMEOUT_MS,
                    DEFAULT_ENQUEUE_REPLICA_TIMEOUT_MS,
                    1,
                    3000,
                )?;
                (replicas > 0).then(|| crate::queue::ReplicaWait {
                    replicas,
                    timeout: Duration::from_millis(timeout),
                })
            },
            chat_cancel_on_disconnect: match string(env, ENV_CHAT_CANCEL_ON_DISCONNECT, "off")
                .trim()
            {
                "on" => true,
                "off" => false,
                other => {
                    return Err(ConfigError {
                        var: ENV_CHAT_CANCEL_ON_DISCONNECT,
                        message: format!("must be on or off (got {other:?})"),
                    })
                }
            },
        })
    }

    pub fn declares(&self, queue: &str) -> bool {
        self.queues
            .binary_search_by(|q| q.as_str().cmp(queue))
            .is_ok()
    }
}

/// Dollars per million tokens, by model name.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
pub struct Price {
    pub prompt: f64,
    pub completion: f64,
}

/// A small built-in price table; `AGENTQ_PRICES` (JSON `{"model": {"prompt": P, "completion": C}}`)
/// adds to or overrides it. Unknown models cost 0, which the cost alert would show as flat.
pub fn default_prices() -> HashMap<String, Price> {
    [
        ("gpt-4o-mini", 0.15, 0.60),
        ("gpt-4o", 2.50, 10.00),
        ("gpt-4.1-mini", 0.40, 1.60),
        ("gpt-4.1", 2.00, 8.00),
        ("mock-gpt", 0.15, 0.60),
    ]
    .into_iter()
    .map(|(m, p, c)| {
        (
            m.to_owned(),
            Price {
                prompt: p,
                completion: c,
            },
        )
    })
    .collect()
}

/// The request field that carries the output cap. `max_tokens` is what every OpenAI-compatible
/// server understands (llama.cpp, vLLM, Ollama, LiteLLM); OpenAI's reasoning models refuse it
/// and want `max_completion_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxTokensParam {
    MaxTokens,
    MaxCompletionTokens,
}

/// `AGENTQ_LLM_HTTP`: the HTTP versions the worker offers its LLM upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmHttp {
    /// HTTP/2 when a TLS upstream picks it in ALPN, else HTTP/1.1.
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only (prior knowledge on plain `http://`).
    Http2,
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub common: CommonConfig,
    pub queue: String,
    pub openai_base_url: String,
    pub openai_api_key: SecretString,
    pub model: String,
    pub concurrency: usize,
    pub heartbeat: Duration,
    pub drain_timeout: Duration,
    pub llm_timeout: Duration,
    pub max_rate_limited: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub memory_messages: usize,
    pub memory_ttl: Duration,
    pub prices: HashMap<String, Price>,
    pub fetch_batch: usize,
    /// Largest LLM response body read; a bigger one fails the attempt as permanent.
    pub max_response_bytes: usize,
    /// `AGENTQ_MAX_TOKENS`: output cap sent with every call; 0 sends none.
    pub max_tokens: u32,
    pub max_tokens_param: MaxTokensParam,
    /// `AGENTQ_UPSTREAMS`, or the implicit upstream from `OPENAI_BASE_URL` / `OPENAI_API_KEY`.
    pub upstreams: std::sync::Arc<crate::flow::Upstreams>,
    /// `AGENTQ_LIMITER_OUTPUT_TOKENS`: output tokens reserved when no output cap is sent.
    pub limiter_output_tokens: u32,
    /// `AGENTQ_LIMITER_GRANTS` (1, default, or 0): whether a worker takes grants of the fleet's
    /// limits for routes it calls many times a moment, instead of one script per call.
    pub limiter_grants: bool,
    /// `AGENTQ_MCP_SERVERS`, headers resolved.
    pub mcp: crate::mcp::McpServers,
    /// `AGENTQ_MCP_TIMEOUT_SECS`: the longest one MCP tool call (or tool listing) may take.
    pub mcp_timeout: Duration,
    /// `AGENTQ_MCP_MAX_RESULT_BYTES`: the most of a tool result the model is given.
    pub mcp_max_result_bytes: usize,
    /// `AGENTQ_CANCEL_POLL_MS`: how often the runs in progress are checked against their records
    /// (a cancelled or finished task's run is aborted), besides the cancel channel.
    pub cancel_poll: Duration,
    /// `AGENTQ_STREAM`: call with `stream: true` and write the text as it comes.
    pub stream: bool,
    /// `AGENTQ_STREAM_FLUSH_MS`: the longest a streamed answer's text waits to be written.
    pub stream_flush: Duration,
    /// `AGENTQ_STREAM_FLUSH_BYTES`: text written at once without waiting.
    pub stream_flush_bytes: usize,
    /// `AGENTQ_LLM_HTTP`.
    pub llm_http: LlmHttp,
    /// `AGENTQ_LLM_HTTP2_STREAMS`: calls per HTTP/2 connection.
    pub llm_http2_streams: usize,
}

impl WorkerConfig {
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_env(env, DEFAULT_WORKER_LISTEN)?;
        let queue = string(env, ENV_QUEUE, DEFAULT_QUEUE);
        validate_queue(&queue).map_err(|e| ConfigError {
            var: ENV_QUEUE,
            message: e.to_string(),
        })?;
        let openai_base_url = string(env, ENV_OPENAI_BASE_URL, DEFAULT_OPENAI_BASE_URL);
        if !(openai_base_url.starts_with("http://") || openai_base_url.starts_with("https://")) {
            return Err(ConfigError {
                var: ENV_OPENAI_BASE_URL,
                message: "must start with http:// or https://".to_owned(),
            });
        }
        let mut prices = default_prices();
        if let Some(raw) = env.get(ENV_PRICES).filter(|v| !v.trim().is_empty()) {
            let extra: HashMap<String, Price> =
                serde_json::from_str(&raw).map_err(|e| ConfigError {
                    var: ENV_PRICES,
                    message: format!(
                        "expected {{\"model\": {{\"prompt\": 0.15, \"completion\": 0.6}}}}: {e}"
                    ),
                })?;
            prices.extend(extra);
        }
        let retry_base = ranged(env, ENV_RETRY_BASE_MS, DEFAULT_RETRY_BASE_MS, 1, 3_600_000)?;
        let retry_max = ranged(env, ENV_RETRY_MAX_MS, DEFAULT_RETRY_MAX_MS, 1, 86_400_000)?;
        if retry_max < retry_base {
            return Err(ConfigError {
                var: ENV_RETRY_MAX_MS,
                message: format!("must be at least {ENV_RETRY_BASE_MS} ({retry_base})"),
            });
        }
        let max_tokens_param = match string(env, ENV_MAX_TOKENS_PARAM, "max_tokens").trim() {
            "max_tokens" => MaxTokensParam::MaxTokens,
            "max_completion_tokens" => MaxTokensParam::MaxCompletionTokens,
            _ => {
                return Err(ConfigError {
                    var: ENV_MAX_TOKENS_PARAM,
                    message: "must be max_tokens or max_completion_tokens".to_owned(),
                })
            }
        };
        let llm_http = match string(env, ENV_LLM_HTTP, "auto").trim() {
            "auto" => LlmHttp::Auto,
            "http1" => LlmHttp::Http1,
            "http2" => LlmHttp::Http2,
            _ => {
                return Err(ConfigError {
                    var: ENV_LLM_HTTP,
                    message: "must be auto, http1 or http2".to_owned(),
                })
            }
        };
        let openai_api_key = SecretString::from(string(env, ENV_OPENAI_API_KEY, ""));
        let upstreams = crate::flow::Upstreams::from_env(
            env,
            &openai_base_url,
            openai_api_key.clone(),
            env.get(ENV_MODEL).as_deref(),
            &string(env, ENV_MODEL, DEFAULT_MODEL),
            true,
        )?;
        Ok(Self {
            common,
            queue,
            openai_base_url: openai_base_url.trim_end_matches('/').to_owned(),
            openai_api_key,
            model: upstreams.default_model.clone(),
            upstreams: std::sync::Arc::new(upstreams),
            limiter_output_tokens: ranged(
                env,
                ENV_LIMITER_OUTPUT_TOKENS,
                DEFAULT_LIMITER_OUTPUT_TOKENS,
                1,
                10_000_000,
            )?,
            limiter_grants: ranged(env, ENV_LIMITER_GRANTS, 1, 0, 1)? == 1,
            concurrency: ranged(env, ENV_CONCURRENCY, DEFAULT_CONCURRENCY, 1, 100_000)?,
            heartbeat: Duration::from_secs(ranged(
                env,
                ENV_HEARTBEAT_SECS,
                DEFAULT_HEARTBEAT_SECS,
                1,
                3_600,
            )?),
            drain_timeout: Duration::from_secs(ranged(
                env,
                ENV_DRAIN_TIMEOUT_SECS,
                DEFAULT_DRAIN_TIMEOUT_SECS,
                0,
                86_400,
            )?),
            llm_timeout: Duration::from_secs(ranged(
                env,
                ENV_LLM_TIMEOUT_SECS,
                DEFAULT_LLM_TIMEOUT_SECS,
                1,
                3_600,
            )?),
            max_rate_limited: ranged(
                env,
                ENV_MAX_RATE_LIMITED,
                DEFAULT_MAX_RATE_LIMITED,
                1,
                1_000_000,
            )?,
            retry_base: Duration::from_millis(retry_base),
            retry_max: Duration::from_millis(retry_max),
            memory_messages: ranged(env, ENV_MEMORY_MESSAGES, DEFAULT_MEMORY_MESSAGES, 0, 1_000)?,
            memory_ttl: Duration::from_secs(ranged(
                env,
                ENV_MEMORY_TTL_SECS,
                DEFAULT_MEMORY_TTL_SECS,
                1,
                365 * 86_400,
            )?),
            prices,
            fetch_batch: ranged(env, ENV_FETCH_BATCH, DEFAULT_FETCH_BATCH, 1, 1_000)?,
            max_response_bytes: ranged(
                env,
                ENV_MAX_RESPONSE_BYTES,
                DEFAULT_MAX_RESPONSE_BYTES,
                1024,
                1 << 30,
            )?,
            max_tokens: ranged(env, ENV_MAX_TOKENS, DEFAULT_MAX_TOKENS, 0, 10_000_000)?,
            max_tokens_param,
            llm_http,
            llm_http2_streams: ranged(
                env,
                ENV_LLM_HTTP2_STREAMS,
                DEFAULT_LLM_HTTP2_STREAMS,
                1,
                100_000,
            )?,
            mcp: crate::mcp::McpServers::from_env(env, true)?,
            mcp_timeout: Duration::from_secs(ranged(
                env,
                ENV_MCP_TIMEOUT_SECS,
                DEFAULT_MCP_TIMEOUT_SECS,
                1,
                3600,
            )?),
            mcp_max_result_bytes: ranged(
                env,
                ENV_MCP_MAX_RESULT_BYTES,
                DEFAULT_MCP_MAX_RESULT_BYTES,
                256,
                4 << 20,
            )?,
            cancel_poll: Duration::from_millis(ranged(
                env,
                ENV_CANCEL_POLL_MS,
                DEFAULT_CANCEL_POLL_MS,
                50,
                600_000,
            )?),
            stream: match string(env, ENV_STREAM, "on").trim() {
                "on" => true,
                "off" => false,
                other => {
                    return Err(ConfigError {
                        var: ENV_STREAM,
                        message: format!("must be on or off (got {other:?})"),
                    })
                }
            },
            stream_flush: Duration::from_millis(ranged(
                env,
                ENV_STREAM_FLUSH_MS,
                DEFAULT_STREAM_FLUSH_MS,
                1,
                10_000,
            )?),
            stream_flush_bytes: ranged(
                env,
                ENV_STREAM_FLUSH_BYTES,
                DEFAULT_STREAM_FLUSH_BYTES,
                1,
                1 << 20,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The given variables; the api's checks below run with auth off unless they set it.
    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        m.entry(ENV_AUTH.to_owned()).or_insert_with(|| "off".into());
        m
    }

    #[test]
    fn auth_needs_an_admin_token_and_never_echoes_it() {
        let mut e = env(&[]);
        e.remove(ENV_AUTH);
        let err = ApiConfig::from_env(&e).expect_err("auth on by default needs the admin token");
        assert_eq!(err.var, ENV_ADMIN_TOKEN);
        let err = ApiConfig::from_env(&env(&[(ENV_AUTH, "on"), (ENV_ADMIN_TOKEN, "short-secret")]))
            .expect_err("too short");
        assert_eq!(err.var, ENV_ADMIN_TOKEN);
        assert!(!err.to_string().contains("short-secret"), "{err}");
        let err = ApiConfig::from_env(&env(&[(ENV_AUTH, "maybe")])).expect_err("on|off");
        assert_eq!(err.var, ENV_AUTH);
        let a = ApiConfig::from_env(&env(&[
            (ENV_AUTH, "on"),
            (ENV_ADMIN_TOKEN, "0123456789abcdef-admin"),
        ]))
        .expect("valid");
        assert!(a.auth.enabled);
        assert!(!format!("{:?}", a.auth).contains("0123456789abcdef"));
        let a = ApiConfig::from_env(&env(&[])).expect("off");
        assert!(!a.auth.enabled);
    }

    #[test]
    fn defaults_apply() {
        let c = WorkerConfig::from_env(&env(&[])).expect("defaults are valid");
        assert_eq!(c.queue, "default");
        assert_eq!(c.concurrency, DEFAULT_CONCURRENCY);
        assert_eq!(c.common.max_attempts, 5);
        assert_eq!(c.heartbeat, Duration::from_secs(30));
        assert_eq!(c.drain_timeout, Duration::from_secs(100));
        assert_eq!(c.cancel_poll, Duration::from_millis(2_000));
        assert_eq!(c.common.result_ttl, Duration::from_secs(86_400));
        assert_eq!(c.common.listen.to_string(), "0.0.0.0:9090");
        let a = ApiConfig::from_env(&env(&[])).expect("defaults are valid");
        assert_eq!(a.common.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(a.queues, vec!["default".to_owned()]);
        assert_eq!(c.max_response_bytes, 8 * 1024 * 1024);
        assert_eq!(
            (c.max_tokens, c.max_tokens_param),
            (4096, MaxTokensParam::MaxTokens)
        );
        assert_eq!((c.llm_http, c.llm_http2_streams), (LlmHttp::Auto, 100));
    }

    #[test]
    fn llm_http_versions() {
        for (raw, want) in [
            ("auto", LlmHttp::Auto),
            ("http1", LlmHttp::Http1),
            (" http2 ", LlmHttp::Http2),
        ] {
            let c = WorkerConfig::from_env(&env(&[(ENV_LLM_HTTP, raw)])).expect("valid");
            assert_eq!(c.llm_http, want, "{raw}");
        }
        for bad in ["h2", "HTTP/2", "2"] {
            let err = WorkerConfig::from_env(&env(&[(ENV_LLM_HTTP, bad)])).expect_err(bad);
            assert_eq!(err.var, ENV_LLM_HTTP);
        }
        let err = WorkerConfig::from_env(&env(&[(ENV_LLM_HTTP2_STREAMS, "0")])).expect_err("0");
        assert_eq!(err.var, ENV_LLM_HTTP2_STREAMS);
    }

    #[test]
    fn output_cap_and_its_parameter_name() {
        let c = WorkerConfig::from_env(&env(&[
            (ENV_MAX_TOKENS, "0"),
            (ENV_MAX_TOKENS_PARAM, "max_completion_tokens"),
        ]))
        .expect("valid");
        assert_eq!(
            (c.max_tokens, c.max_tokens_param),
            (0, MaxTokensParam::MaxCompletionTokens)
        );
        let err = WorkerConfig::from_env(&env(&[(ENV_MAX_TOKENS_PARAM, "tokens")]))
            .expect_err("unknown name");
        assert_eq!(err.var, ENV_MAX_TOKENS_PARAM);
        let err = WorkerConfig::from_env(&env(&[(ENV_MAX_TOKENS, "-1")])).expect_err("negative");
        assert_eq!(err.var, ENV_MAX_TOKENS);
    }

    #[test]
    fn declared_queues_include_the_default_queue() {
        let a = ApiConfig::from_env(&env(&[(ENV_QUEUES, " emails, ,reports,emails")]))
            .expect("valid list");
        assert_eq!(a.queues, vec!["default", "emails", "reports"]);
        assert!(a.declares("reports") && a.declares("default") && !a.declares("other"));
        let a = ApiConfig::from_env(&env(&[(ENV_QUEUE, "emails")])).expect("valid");
        assert_eq!(a.queues, vec!["emails"]);
        let err = ApiConfig::from_env(&env(&[(ENV_QUEUES, "ok,not ok")])).expect_err("bad name");
        assert_eq!(err.var, ENV_QUEUES);
        let many: Vec<String> = (0..300).map(|i| format!("q{i}")).collect();
        let err =
            ApiConfig::from_env(&env(&[(ENV_QUEUES, &many.join(","))])).expect_err("too many");
        assert_eq!(err.var, ENV_QUEUES);
    }

    #[test]
    fn worker_threads_default_to_the_cores_up_to_two() {
        let threads = |pairs: &[(&str, &str)], cores| worker_threads(&env(pairs), cores).ok();
        assert_eq!(threads(&[], 1), Some(1));
        assert_eq!(threads(&[], 16), Some(2));
        assert_eq!(threads(&[(ENV_WORKER_THREADS, "8")], 2), Some(8));
        for bad in ["0", "lots", "-1", "1025"] {
            let err = worker_threads(&env(&[(ENV_WORKER_THREADS, bad)]), 2).expect_err(bad);
            assert_eq!(err.var, ENV_WORKER_THREADS);
        }
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases = [
            (ENV_CONCURRENCY, "lots"),
            (ENV_CONCURRENCY, "0"),
            (ENV_MAX_ATTEMPTS, "0"),
            (ENV_HEARTBEAT_SECS, "-1"),
            (ENV_LISTEN, "nowhere"),
            (ENV_LOG_FORMAT, "xml"),
            (ENV_QUEUE, "a b"),
            (ENV_OPENAI_BASE_URL, "ftp://x"),
            (ENV_PRICES, "{"),
            (ENV_MAX_RESPONSE_BYTES, "10"),
            (ENV_REDIS_URL, "mysql://x"),
            (ENV_REDIS_CLUSTER_NODES, "redis://a:1,,redis://b:2"),
            (ENV_REDIS_CLUSTER_NODES, "redis://a:1,http://b:2"),
            (ENV_REDIS_CLUSTER_NODES, "redis://a:1/3"),
            (ENV_REDIS_CLUSTER_NODES, "redis://a:1,rediss://b:2"),
            (ENV_REDIS_CLUSTER_NODES, "redis://:x@a:1,redis://:y@b:2"),
            (ENV_CANCEL_POLL_MS, "10"),
            (ENV_CANCEL_POLL_MS, "600001"),
            (ENV_CANCEL_POLL_MS, "soon"),
        ];
        for (var, value) in cases {
            let err = WorkerConfig::from_env(&env(&[(var, value)])).expect_err(var);
            assert_eq!(err.var, var);
        }
    }

    #[test]
    fn tls_and_password_urls_are_accepted() {
        for url in [
            "rediss://:pw@redis.example:6380/0",
            "redis://user:pw@10.0.0.1:6379/2",
        ] {
            let c = ApiConfig::from_env(&env(&[(ENV_REDIS_URL, url)])).expect(url);
            assert!(
                !c.common.redis_display().contains("pw"),
                "{}",
                c.common.redis_display()
            );
        }
    }

    #[test]
    fn cluster_seeds_are_read_and_redacted() {
        let c = ApiConfig::from_env(&env(&[(
            ENV_REDIS_CLUSTER_NODES,
            " redis://:pw@10.0.0.1:7000 , redis://:pw@10.0.0.2:7001",
        )]))
        .expect("two seeds");
        assert_eq!(c.common.redis_cluster_nodes.len(), 2);
        assert_eq!(
            c.common.redis_display(),
            "cluster(redis://10.0.0.1:7000,redis://10.0.0.2:7001)"
        );
        assert!(matches!(
            c.common.redis_target(),
            crate::redis_conn::RedisTarget::Cluster(ref s) if s.len() == 2
        ));
        let single = ApiConfig::from_env(&env(&[(ENV_REDIS_CLUSTER_NODES, "  ")])).expect("blank");
        assert!(single.common.redis_cluster_nodes.is_empty());
        let many = vec!["redis://h:1"; MAX_CLUSTER_SEEDS + 1].join(",");
        let err = ApiConfig::from_env(&env(&[(ENV_REDIS_CLUSTER_NODES, many.as_str())]))
            .expect_err("too many seeds");
        assert_eq!(err.var, ENV_REDIS_CLUSTER_NODES);
        let err = ApiConfig::from_env(&env(&[(
            ENV_REDIS_CLUSTER_NODES,
            "redis://:hunter2@a:1,redis://:other@b:2",
        )]))
        .expect_err("different passwords");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn enqueues_wait_for_a_replica_by_default_only_in_cluster_mode() {
        let single = ApiConfig::from_env(&env(&[])).expect("defaults");
        assert_eq!(single.enqueue_replicas, None);
        let seeds = (ENV_REDIS_CLUSTER_NODES, "redis://a:1,redis://b:2");
        let cluster = ApiConfig::from_env(&env(&[seeds])).expect("cluster");
        assert_eq!(
            cluster.enqueue_replicas,
            Some(crate::queue::ReplicaWait {
                replicas: 1,
                timeout: Duration::from_millis(DEFAULT_ENQUEUE_REPLICA_TIMEOUT_MS)
            })
        );
        let off = ApiConfig::from_env(&env(&[seeds, (ENV_ENQUEUE_REPLICAS, "0")])).expect("off");
        assert_eq!(off.enqueue_replicas, None);
        let two = ApiConfig::from_env(&env(&[
            (ENV_ENQUEUE_REPLICAS, "2"),
            (ENV_ENQUEUE_REPLICA_TIMEOUT_MS, "250"),
        ]))
        .expect("two with one server (a Sentinel setup)");
        assert_eq!(
            two.enqueue_replicas,
            Some(crate::queue::ReplicaWait {
                replicas: 2,
                timeout: Duration::from_millis(250)
            })
        );
        for (var, bad) in [
            (ENV_ENQUEUE_REPLICAS, "17"),
            (ENV_ENQUEUE_REPLICAS, "-1"),
            (ENV_ENQUEUE_REPLICA_TIMEOUT_MS, "0"),
            (ENV_ENQUEUE_REPLICA_TIMEOUT_MS, "3001"),
        ] {
            let err = ApiConfig::from_env(&env(&[(var, bad)])).expect_err(bad);
            assert_eq!(err.var, var);
        }
    }

    #[test]
    fn secrets_stay_out_of_messages() {
        let err = WorkerConfig::from_env(&env(&[(ENV_REDIS_URL, "mysql://u:hunter2@h")]))
            .expect_err("bad scheme");
        assert!(!err.to_string().contains("hunter2"));
        assert_eq!(
            redact_url("rediss://user:hunter2@redis:6380/0"),
            "rediss://redis:6380/0"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        let c = WorkerConfig::from_env(&env(&[(ENV_OPENAI_API_KEY, "sk-hunter2")])).expect("valid");
        assert!(!format!("{c:?}").contains("sk-hunter2"));
    }
}
