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
//! own connection pool, and a call takes the lane with the fewest calls in flight: no lane ever
//! carries more than `ceil(calls ÷ lanes)`.

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

    /// The lane with the fewest calls in flight (the first of equals), counted as taken. Two calls
    /// choosing at once may pick the same lane; the next choice sees both, so the spread stays
    /// within one call of even.
    pub(crate) fn take(self: &Arc<Self>) -> Taken {
        let mut index = 0;
        if self.lanes.len() > 1 {
            let mut least = usize::MAX;
            for (i, lane) in self.lanes.iter().enumerate() {
                let n = lane.calls.load(Ordering::Relaxed);
                if n < least {
                    least = n;
                    index = i;
                    if n == 0 {
                        break;
                    }
                }
            }
        }
        self.lanes[index].calls.fetch_add(1, Ordering::Relaxed);
        Taken {
            lanes: self.clone(),
            index,
        }
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
