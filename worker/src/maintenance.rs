//! Liveness and housekeeping. The heartbeat has its own timer and Redis connection, so nothing
//! else (a slow recovery pass, a big sweep, a promote) can delay it past its TTL. The maintenance
//! loop promotes due retries, recovers workers whose heartbeat expired, and returns ids orphaned in
//! this worker's own in-flight list.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentq_common::time::now_ms;
use agentq_common::Redis;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::{pause, Worker};

/// The longest the loop waits between promotions (and between recovery checks).
const PROMOTE_EVERY: Duration = Duration::from_millis(250);
/// The shortest: with turns closer than this, each pass moves the few due since the last.
const PROMOTE_MIN: Duration = Duration::from_millis(10);
/// Each worker wakes up to this much after a due time, at random: the fleet's workers do not
/// all ask at the same instant, and the first one awake moves the turn.
const PROMOTE_JITTER_MS: u64 = 10;

impl Worker {
    fn beat_every(&self) -> Duration {
        (self.cfg.heartbeat / 3).max(Duration::from_millis(200))
    }

    /// Refreshes the heartbeat every TTL/3 on `conn`, and keeps `healthy_since` (see [`Worker`]).
    pub(crate) async fn beat(self: Arc<Self>, conn: Redis, stop: CancellationToken) {
        let every = self.beat_every();
        let broker = agentq_common::Broker::new(conn, self.cfg.common.key_prefix.clone());
        loop {
            let t0 = Instant::now();
            let r = tokio::time::timeout(
                every,
                broker.heartbeat(&self.keys, &self.id, self.cfg.heartbeat),
            )
            .await;
            // A beat that failed or took longer than its interval means Redis was not reachable in
            // time: other workers' beats may have failed as well, so this one must not judge them.
            let healthy = matches!(r, Ok(Ok(()))) && t0.elapsed() < every;
            if let Ok(mut h) = self.healthy_since.lock() {
                match (healthy, *h) {
                    (true, None) => *h = Some(Instant::now()),
                    (false, _) => *h = None,
                    _ => {}
                }
            }
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat failed"),
                Err(_) => tracing::warn!("heartbeat timed out"),
            }
            if !pause(every.saturating_sub(t0.elapsed()), &stop).await {
                break;
            }
        }
    }

    /// True once this worker has reached Redis in time for a whole heartbeat TTL.
    fn may_judge_others(&self) -> bool {
        self.healthy_since
            .lock()
            .ok()
            .and_then(|h| *h)
            .is_some_and(|since| since.elapsed() >= self.cfg.heartbeat)
    }

    /// Retry promotion, recovery of lost workers and of this worker's orphaned ids.
    pub(crate) async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        let sweep_every = self.beat_every();
        let recover_every = (self.cfg.heartbeat / 2).max(Duration::from_millis(500));
        let mut next_sweep = Instant::now();
        let mut next_recover = Instant::now();
        let mut suspects: HashMap<String, u64> = HashMap::new();
        loop {
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = now + sweep_every;
                self.sweep_orphans(&mut suspects).await;
            }
            if now >= next_recover && self.may_judge_others() {
                next_recover = now + recover_every;
                match self.broker.recover_lost_workers(&self.keys, &self.id).await {
                    Ok(found) => {
                        for (w, n) in found {
                            tracing::warn!(lost_worker = %w, tasks = n, "recovered tasks of a lost worker");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "recovery scan failed"),
                }
            }
            let next_due = match self.broker.promote_due(&self.keys, 1000).await {
                Ok(p) => {
                    if p.moved > 0 {
                        tracing::debug!(moved = p.moved, "promoted due work");
                    }
                    p.next_due_ms
                }
                Err(e) => {
                    tracing::debug!(error = %e, "promotion failed");
                    None
                }
            };
            if !pause(promote_pause(next_due, now_ms()), &stop).await {
                break;
            }
        }
    }

    /// An id in this worker's in-flight list that no run here holds (a fetch whose reply was lost)
    /// is returned to pending once it was seen unheld on two sweeps and every fetch operation that
    /// had started by the first sighting has finished (so its reply, if any, was handled).
    async fn sweep_orphans(&self, suspects: &mut HashMap<String, u64>) {
        let Ok(ids) = self.broker.inflight_ids(&self.keys, &self.id).await else {
            return;
        };
        // Read after the list: any operation that moved an id in it had started by now.
        let started = self.fetches_started.load(Ordering::SeqCst);
        let finished = self.fetches_finished.load(Ordering::SeqCst);
        // An abandoned run (its report never landed after the drain's hard stop) called the LLM:
        // it is given back at exit with its token, counted as a give-back. Returning it here,
        // tokenless, would uncount an attempt that was paid for (chaos caught this in cluster mode,
        // where reports after a Redis restart give up at spread-out times).
        let unheld: HashSet<String> = {
            let Ok(held) = self.held.lock() else { return };
            let Ok(abandoned) = self.abandoned.lock() else {
                return;
            };
            ids.into_iter()
                .filter(|id| !held.contains_key(id) && !abandoned.contains_key(id))
                .collect()
        };
        suspects.retain(|id, _| unheld.contains(id));
        for id in unheld {
            match suspects.get(&id) {
                Some(&seen_at) if finished >= seen_at => {
                    tracing::warn!(task.id = %id, "returning an orphaned in-flight id to pending");
                    self.give_back_unstarted(&id, None).await;
                    suspects.remove(&id);
                }
                Some(_) => {}
                None => {
                    suspects.insert(id, started);
                }
            }
        }
    }
}

/// How long the maintenance loop waits before the next promotion: until the next retry or parked
/// task is due (plus a little jitter), within [`PROMOTE_MIN`]..[`PROMOTE_EVERY`]. A fixed period
/// released a period's worth of the limiter's turns at once: the fleet then ran in waves, the
/// calls of a wave starting and ending together, and `active` (which KEDA reads as in flight)
/// swung between zero and the whole wave, so a scaler sampling in step with the waves saw an idle
/// fleet while it ran at the quota's pace.
fn promote_pause(next_due_ms: Option<i64>, now: i64) -> Duration {
    let Some(at) = next_due_ms else {
        return PROMOTE_EVERY;
    };
    let until = u64::try_from(at.saturating_sub(now)).unwrap_or(0);
    let jitter = rand::rng().random_range(0..=PROMOTE_JITTER_MS);
    Duration::from_millis(until.saturating_add(jitter)).clamp(PROMOTE_MIN, PROMOTE_EVERY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_wakes_at_the_next_turn_within_its_bounds() {
        assert_eq!(promote_pause(None, 1_000), PROMOTE_EVERY);
        for _ in 0..100 {
            let p = promote_pause(Some(1_040), 1_000);
            assert!(
                p >= Duration::from_millis(40) && p <= Duration::from_millis(50),
                "{p:?}"
            );
            // overdue: soon, but not a busy loop
            let p = promote_pause(Some(900), 1_000);
            assert!(
                p >= PROMOTE_MIN && p <= PROMOTE_MIN.max(Duration::from_millis(PROMOTE_JITTER_MS)),
                "{p:?}"
            );
            // far off: the usual period, so recovery and sweeps keep their pace
            assert_eq!(promote_pause(Some(60_000), 1_000), PROMOTE_EVERY);
        }
    }
}
