//! `agentq-worker`: reads configuration from the environment (exit 64 on a bad value), binds the
//! probe/metrics port `AGENTQ_LISTEN`, runs tasks until SIGTERM or SIGINT, drains, exits 0.

use agentq_common::config::{self, ProcessEnv, WorkerConfig, EXIT_CONFIG};
use agentq_common::{shutdown, telemetry};

/// jemalloc instead of glibc malloc: the request paths allocate many small, short-lived buffers
/// and glibc's malloc/free was ~15% of CPU in profiles. mimalloc was as fast but raised the
/// worker's peak RSS at 1000 concurrent LLM calls from 46 to 68 MiB; jemalloc kept it at 46
/// (loadtest/bench/README.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() {
    let format = match config::log_format(&ProcessEnv) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("agentq-worker: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    telemetry::init(format);
    let config = match WorkerConfig::from_env(&ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(variable = e.var, error = %e, "bad configuration");
            eprintln!("agentq-worker: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    let listener = match tokio::net::TcpListener::bind(config.common.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, listen = %config.common.listen, "cannot bind");
            std::process::exit(1);
        }
    };
    let stop = async {
        shutdown::signal().await;
    };
    if let Err(e) = agentq_worker::run(config, listener, stop).await {
        tracing::error!(error = %e, "agentq-worker failed");
        std::process::exit(1);
    }
}
