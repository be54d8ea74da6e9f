//! `agentq-worker`: reads configuration from the environment (exit 64 on a bad value), binds the
//! probe/metrics port `AGENTQ_LISTEN`, runs tasks until SIGTERM or SIGINT, drains, exits 0.

use agentq_common::config::{self, ConfigError, ProcessEnv, WorkerConfig, EXIT_CONFIG};
use agentq_common::{shutdown, telemetry};

/// jemalloc instead of glibc malloc: the request paths allocate many small, short-lived buffers
/// and glibc's malloc/free was ~15% of CPU in profiles. mimalloc was as fast but raised the
/// worker's peak RSS at 1000 concurrent LLM calls from 46 to 68 MiB; jemalloc kept it at 46
/// (loadtest/bench/README.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let format = match config::log_format(&ProcessEnv) {
        Ok(f) => f,
        Err(e) => refuse(&e),
    };
    telemetry::init(format);
    let config = match WorkerConfig::from_env(&ProcessEnv) {
        Ok(c) => c,
        Err(e) => refuse(&e),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match config::worker_threads(&ProcessEnv, cores) {
        Ok(t) => t,
        Err(e) => refuse(&e),
    };
    // Threads, not cores: a worker waits on the network almost all the time, and each runtime
    // thread costs memory of its own (config::DEFAULT_MAX_WORKER_THREADS).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            std::process::exit(1);
        }
    };
    tracing::debug!(threads, cores, "async runtime");
    runtime.block_on(serve(config));
}

async fn serve(config: WorkerConfig) {
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

/// A bad setting: logged, printed (the log may not be set up, or not read), exit 64.
fn refuse(e: &ConfigError) -> ! {
    tracing::error!(variable = e.var, error = %e, "bad configuration");
    eprintln!("agentq-worker: {e}");
    std::process::exit(EXIT_CONFIG);
}
