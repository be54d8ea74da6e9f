//! The api moves due work back to `pending` too (retries whose backoff is over, tasks the flow
//! limiter parked whose turn came), not only the workers: with `minReplicaCount: 0` there is no
//! worker to do it, and KEDA only wakes the fleet for work it sees in `pending`. It is a backstop:
//! it moves only work overdue by a second, which running workers have always moved already.
//! It also fails tasks whose client tool outputs did not come within their `tool_timeout_secs`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::AppState;

const EVERY: Duration = Duration::from_secs(1);
const BATCH: usize = 1000;
/// Only work overdue by this much: while workers run they promote each turn as it comes, and a second's
/// worth of turns moved at once would show up as a burst of `pending` the autoscaler reads as
/// load. With no worker, due work still reaches `pending` within about two seconds.
const LAG: Duration = Duration::from_secs(1);

pub async fn run(state: AppState, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        for q in &state.config.queues {
            let keys = state.broker.keys(q);
            if let Err(e) = state.broker.promote_due_by(&keys, BATCH, LAG).await {
                tracing::debug!(error = %e, queue = %q, "promote failed; next round retries");
                break;
            }
            // tasks whose client tool outputs are overdue fail here, with or without workers
            match state
                .broker
                .expire_tool_waits(&keys, state.config.common.result_ttl, BATCH)
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(queue = %q, tasks = n, "tool outputs overdue: tasks failed")
                }
                Err(e) => {
                    tracing::debug!(error = %e, queue = %q, "tool timeout sweep failed; next round retries");
                    break;
                }
            }
        }
    }
}
