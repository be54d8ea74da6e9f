//! The api moves due work back to `pending` too (retries whose backoff is over, tasks the flow
//! limiter parked whose turn came), not only the workers: with `minReplicaCount: 0` there is no
//! worker to do it, and KEDA only wakes the fleet for work it sees in `pending`. It is a backstop:
//! it moves only work overdue by a second, which running workers have always moved already.
//! It also fails tasks whose client tool outputs did not come within their `tool_timeout_secs`,
//! and sweeps agents' lanes: a lane whose head became final without moving on (a tool timeout, a
//! task buried at fetch, a worker lost between its report and its release) lets its next task run.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::AppState;

const EVERY: Duration = Duration::from_secs(1);
const BATCH: usize = 1000;
/// Only work overdue by this much: while workers run they promote each turn as it comes, and a second's
/// worth of turns moved at once would show up as a burst of `pending` the autoscaler reads as
/// load. With no worker, due work still reaches `pending` within about two seconds.
const LAG: Duration = Duration::from_secs(1);

/// Lanes looked at per queue per second by the sweep (it resumes where it stopped).
const LANES_PER_PASS: usize = 500;

pub async fn run(state: AppState, stop: CancellationToken) {
    // the Batch API's loop (fan-out resumed, cancels, expiry, finalization, files collected)
    // beside this one, so a slow finalization never delays a promotion
    tokio::spawn(crate::batch::run(state.clone(), stop.clone()));
    let mut lane_cursors: std::collections::HashMap<String, u64> = Default::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        for q in &state.config.queues {
            let keys = state.broker.keys(q);
            // agents' lanes whose head became final on a path that did not move them on
            let cursor = lane_cursors.entry(q.clone()).or_insert(0);
            match state
                .broker
                .lane_sweep(&keys, *cursor, LANES_PER_PASS)
                .await
            {
                Ok(next) => *cursor = next,
                Err(e) => {
                    tracing::debug!(error = %e, queue = %q, "lane sweep failed; next round retries");
                    break;
                }
            }
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
