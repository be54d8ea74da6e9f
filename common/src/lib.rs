//! agentq-common: the queue itself, shared by `agentq-api` and `agentq-worker`.
//!
//! - [`keys`]: every Redis key name, built in one place (hash-tagged per queue).
//! - [`batch`]: the Batch API's scripts (fan-out, stop, cancel pages, finalization, files).
//! - [`queue`]: the queue operations (the broker); each is one Lua script (beside it in
//!   `src/queue/`) or one pipeline.
//! - [`flow`]: upstreams (which server serves a model) and the fleet-wide rate limiter.
//! - [`task`]: what clients submit, what Redis stores, what the API shows.
//! - [`tenant`]: tenant ids, the names they namespace, and what admission needs of a tenant.
//! - [`chat`]: the chat-completions request a task carries (messages, tools, parameters).
//! - [`config`]: environment variables, parsed once; bad values exit 64.
//! - [`script`]: how a Lua script is made; a debug build checks that it touches only its `KEYS`.
//! - [`metrics`], [`telemetry`], [`shutdown`], [`backoff`]: shared plumbing.
//!
//! See docs/architecture.md for the task lifecycle and the guarantees under failure.

pub mod backoff;
pub mod batch;
pub mod chat;
pub mod config;
pub mod flow;
pub mod graph;
pub mod keys;
pub mod mcp;
pub mod metrics;
pub mod queue;
pub mod redis_conn;
pub mod script;
pub mod shutdown;
pub mod task;
pub mod telemetry;
pub mod tenant;
pub mod time;

pub use queue::Broker;
pub use redis_conn::Redis;
