//! The api moves due work back to `pending` too (retries whose backoff is over, tasks the flow
//! limiter parked whose turn came), not only the workers: with `minReplicaCount: 0` there is no
//! worker to do it, and KEDA only wakes the fleet for work it sees in `pending`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::AppState;

const EVERY: Duration = Duration::from_secs(1);
const BATCH: usize = 1000;

pub async fn run(state: AppState, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        for q in &state.config.queues {
            let keys = state.broker.keys(q);
            if let Err(e) = state.broker.promote_due(&keys, BATCH).await {
                tracing::debug!(error = %e, queue = %q, "promote failed; next round retries");
                break;
            }
        }
    }
}
