//! agentq-common: the queue itself, shared by `agentq-api` and `agentq-worker`.
//!
//! - [`keys`]: every Redis key name, built in one place (hash-tagged per queue).
//! - [`broker`]: queue operations; each is one Lua script (`common/lua/`) or one pipeline.
//! - [`task`]: what clients submit, what Redis stores, what the API shows.
//! - [`config`]: environment variables, parsed once; bad values exit 64.
//! - [`metrics`], [`telemetry`], [`shutdown`], [`backoff`]: shared plumbing.
//!
//! See docs/architecture.md for the task lifecycle and the guarantees under failure.

pub mod backoff;
pub mod broker;
pub mod config;
pub mod keys;
pub mod metrics;
pub mod redis_conn;
pub mod shutdown;
pub mod task;
pub mod telemetry;
pub mod time;

pub use broker::Broker;
pub use redis_conn::Redis;
