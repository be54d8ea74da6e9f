//! The HTTP clients of one LLM upstream, and which one a call takes.
//!
//! Over HTTP/1.1 every call in flight holds a connection of its own, and with it hyper's
//! per-connection buffers and dispatch channel: ~30 KiB of a call's ~38 KiB at 1000 in flight
//! (loadtest/bench/README.md, "Memory and CPU per call in flight"). HTTP/2 carries many calls
//! on one connection, a stream each, for a few hundred bytes of state per stream. But a hyper
//! client never opens a second HTTP/2 connection to a host: calls past the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` wait inside it for a stream to free (hyper#2197), which
//! would cap a worker's real concurrency at that number. So an upstream that may speak HTTP/2
//! gets several clients ("lanes"), about `concurrency ÷ AGENTQ_LLM_HTTP2_STREAMS`, each with its
//! own connection pool, and a call takes the lane with the fewest calls in flight: no lane
//! carries more than `ceil(calls ÷ lanes)` (while no call ends meanwhile; see `take`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentq_common::config::LlmHttp;

/// How often an idle-looking HTTP/2 connection is pinged, and how long the answer may take: a
/// connection that died silently (a NAT or load balancer dropped it) fails its calls at the next
/// ping instead of at each call's own timeout. Each call carries its own timeout besides.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Lanes {
    lanes: Box<[Lane]>,
}

struct Lane {
    http: reqwest::Client,
    calls: AtomicUsize,
}

/// A lane taken by one call, until the call is done (its body read or dropped).
pub(crate) struct Taken {
    lanes: Arc<Lanes>,
    index: usize,
}

impl Taken {
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.lanes.lanes[self.index].http
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.lanes.lanes[self.index]
            .calls
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many lanes an upstream gets: one where every call is HTTP/1.1 anyway (a single pool opens
/// a connection per call in flight), else enough that `concurrency` calls fit at `streams` each.
pub(crate) fn lane_count(
    http: LlmHttp,
    plain_http: bool,
    concurrency: usize,
    streams: usize,
) -> usize {
    match http {
        LlmHttp::Http1 => 1,
        // auto negotiates HTTP/2 only in TLS (ALPN); plain http:// stays HTTP/1.1
        LlmHttp::Auto if plain_http => 1,
        LlmHttp::Auto | LlmHttp::Http2 => concurrency.div_ceil(streams.max(1)).max(1),
    }
}

impl Lanes {
    pub(crate) fn new(
        http: LlmHttp,
        count: usize,
        connect_timeout: Duration,
    ) -> reqwest::Result<Self> {
        let lanes = (0..count.max(1))
            .map(|_| {
                // No total timeout here: `chat` bounds the whole call (send and body) with one
                // timer, so a timed-out attempt always reads the same "timed out after" error.
                let mut b = reqwest::Client::builder()
                    .connect_timeout(connect_timeout)
                    .tcp_nodelay(true)
                    .pool_idle_timeout(Duration::from_secs(90));
                b = match http {
                    LlmHttp::Http1 => b.http1_only(),
                    LlmHttp::Http2 => b.http2_prior_knowledge(),
                    LlmHttp::Auto => b,
                };
                if http != LlmHttp::Http1 {
                    b = b
                        .http2_keep_alive_interval(H2_PING_INTERVAL)
                        .http2_keep_alive_timeout(H2_PING_TIMEOUT);
                }
                Ok(Lane {
                    http: b.build()?,
                    calls: AtomicUsize::new(0),
                })
            })
            .collect::<reqwest::Result<Vec<_>>>()?;
        Ok(Self {
            lanes: lanes.into_boxed_slice(),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.lanes.len()
    }

    /// The lane with the fewest calls in flight (the first of equals), counted as taken. The
    /// count is raised only from the value the choice read (a compare-and-swap; chosen again if
    /// another call got there first), so two calls choosing at once never both land on one lane
    /// while another has fewer: with no call ending meanwhile, the lanes stay within one call of
    /// even.
    pub(crate) fn take(self: &Arc<Self>) -> Taken {
        let index = if self.lanes.len() == 1 {
            self.lanes[0].calls.fetch_add(1, Ordering::Relaxed);
            0
        } else {
            loop {
                let (index, n) = self.least();
                if self.raise(index, n) {
                    break index;
                }
            }
        };
        Taken {
            lanes: self.clone(),
            index,
        }
    }

    /// One call more on the lane, if it still has the `seen` calls the choice read.
    fn raise(&self, index: usize, seen: usize) -> bool {
        self.lanes[index]
            .calls
            .compare_exchange(seen, seen + 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// The lane with the fewest calls in flight (the first of equals) and that count.
    fn least(&self) -> (usize, usize) {
        let mut best = (0, usize::MAX);
        for (i, lane) in self.lanes.iter().enumerate() {
            let n = lane.calls.load(Ordering::Relaxed);
            if n < best.1 {
                best = (i, n);
                if n == 0 {
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_fit_the_concurrency() {
        assert_eq!(lane_count(LlmHttp::Http1, false, 1000, 100), 1);
        assert_eq!(lane_count(LlmHttp::Auto, true, 1000, 100), 1);
        assert_eq!(lane_count(LlmHttp::Auto, false, 1000, 100), 10);
        assert_eq!(lane_count(LlmHttp::Http2, true, 1001, 100), 11);
        assert_eq!(lane_count(LlmHttp::Http2, true, 16, 100), 1);
    }

    #[test]
    fn a_choice_made_on_a_stale_count_is_made_again() {
        // call A reads the lanes; call B takes the lane A chose before A raises its count
        let lanes =
            Arc::new(Lanes::new(LlmHttp::Http2, 2, Duration::from_secs(1)).expect("builds"));
        let (chosen, seen) = lanes.least();
        let b = lanes.take();
        assert_eq!((chosen, seen, b.index), (0, 0, 0));
        // A's choice no longer holds (it would put two calls on lane 0, none on lane 1) ...
        assert!(!lanes.raise(chosen, seen));
        // ... so A chooses again, and takes the other lane
        let a = lanes.take();
        assert_eq!(a.index, 1);
        assert!(lanes.raise(1, 1), "a choice that still holds is taken");
    }

    #[test]
    fn calls_spread_over_lanes_and_give_them_back() {
        let lanes =
            Arc::new(Lanes::new(LlmHttp::Http2, 3, Duration::from_secs(1)).expect("builds"));
        let taken: Vec<Taken> = (0..7).map(|_| lanes.take()).collect();
        let load = |l: &Lanes| -> Vec<usize> {
            l.lanes
                .iter()
                .map(|x| x.calls.load(Ordering::Relaxed))
                .collect()
        };
        assert_eq!(load(&lanes), vec![3, 2, 2]);
        // the lanes of the first three calls taken (0, 1, 2) are freed: each has one call less
        let mut taken = taken;
        let rest = taken.split_off(3);
        drop(taken);
        assert_eq!(load(&lanes), vec![2, 1, 1]);
        let next = lanes.take();
        assert_eq!(next.index, 1);
        drop(rest);
        drop(next);
        assert_eq!(load(&lanes), vec![0, 0, 0]);
    }
}
