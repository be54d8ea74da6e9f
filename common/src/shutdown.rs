//! Waiting for the signal to stop: SIGTERM from Kubernetes, SIGINT from a terminal.

use futures::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;

/// Resolves with the signal's name when SIGTERM or SIGINT arrives.
pub async fn signal() -> &'static str {
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        }
    };
    let name = match signals.next().await {
        Some(SIGTERM) => "SIGTERM",
        Some(SIGINT) => "SIGINT",
        _ => "signal",
    };
    tracing::info!(signal = name, "shutdown requested");
    name
}
