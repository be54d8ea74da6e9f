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

/// jemalloc's options, read once before `main` (jemalloc's `malloc_conf`; `_RJEM_MALLOC_CONF` in
/// the environment is read after it, so an operator can still override any of them):
/// - `narenas:1`: one arena instead of four per core. The worker has at most a few busy threads
///   (`WORKER_THREADS`, 2 by default), so arena contention is small, while every extra arena keeps
///   its own partly used pages: at 1000 LLM calls in flight one arena took ~3 MiB off the peak RSS.
/// - `dirty_decay_ms:1000,muzzy_decay_ms:0`: freed pages go back to the kernel after ~1 s instead
///   of ~10 s, so the memory of calls that ended is not still counted when the next 1000 start
///   (~1 MiB more off the peak).
///
/// Neither changed the drain's CPU per task (loadtest/bench/README.md, "jemalloc's options").
// One of the two unsafe-lint exceptions in the workspace (worker/Cargo.toml; the other is this
// file's test): a symbol export, no unsafe block. tikv-jemalloc-sys builds jemalloc with the `_rjem_` prefix, so this is its `malloc_conf`.
#[allow(non_upper_case_globals, unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &u8 = &JEMALLOC_OPTIONS[0];

/// The C string behind [`malloc_conf`] (NUL-terminated, as jemalloc reads it).
const JEMALLOC_OPTIONS: &[u8] = b"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

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

#[cfg(test)]
mod tests {
    /// The options in [`super::JEMALLOC_OPTIONS`] reach jemalloc: this test binary links the same
    /// `malloc_conf` symbol and allocator as the worker.
    #[test]
    fn jemalloc_runs_with_the_workers_options() {
        // the allocator is initialised before a test runs; read its options back
        // (arenas.narenas would say 2: jemalloc adds its own arena for very large allocations)
        let narenas: std::ffi::c_uint = read_opt(c"opt.narenas");
        assert_eq!(narenas, 1);
        let dirty: isize = read_opt(c"opt.dirty_decay_ms");
        let muzzy: isize = read_opt(c"opt.muzzy_decay_ms");
        assert_eq!((dirty, muzzy), (1000, 0));
    }

    /// One of jemalloc's options by `mallctl`; `T` must be the option's C type.
    #[allow(unsafe_code)]
    fn read_opt<T: Copy + Default>(name: &std::ffi::CStr) -> T {
        let mut value = T::default();
        let mut len = std::mem::size_of::<T>();
        // SAFETY: `name` is NUL-terminated; `value` is a writable T of `len` bytes, the size of
        // the option's type (checked below through the length jemalloc reports back)
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&raw mut value).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(rc, 0, "mallctl {name:?}");
        assert_eq!(len, std::mem::size_of::<T>(), "{name:?}'s size");
        value
    }
}
