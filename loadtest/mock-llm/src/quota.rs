//! Quota mode: an enforced requests-per-minute / tokens-per-minute limit over
//! an exact sliding minute, answered like OpenAI (429 plus `x-ratelimit-*`
//! headers), and the `block_for` 429 storm.
//!
//! The window is exact rather than bucketed so that tests of agentq's
//! fleet-wide limiter measure against a server whose arithmetic they can
//! predict to the millisecond: a request admitted at `t` counts until
//! `t + 60 s`, and nothing else.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};

/// How long an admitted request counts against the quota.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);

/// Why a call was answered 429 without being served (see
/// [`CallArrival::rejected`](crate::CallArrival::rejected)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// Over the requests-per-minute quota ([`MockConfig::rpm`](crate::MockConfig::rpm)).
    Rpm,
    /// Over the tokens-per-minute quota ([`MockConfig::tpm`](crate::MockConfig::tpm)),
    /// including a request larger than the whole quota.
    Tpm,
    /// During a [`MockLlm::block_for`](crate::MockLlm::block_for) storm.
    Blocked,
}

/// The quota and what the current window holds, from
/// [`MockLlm::quota_status`](crate::MockLlm::quota_status) or `GET /_mock/quota`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct QuotaStatus {
    /// Requests per minute; `None` when not limited.
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute; `None` when not limited.
    pub tpm: Option<u64>,
    /// Admitted requests in the last 60 s.
    pub requests: u64,
    /// Their tokens.
    pub tokens: u64,
}

/// One limit as the `x-ratelimit-*-{requests,tokens}` headers report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LimitState {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
}

/// The `x-ratelimit-*` headers of one answer: only the configured limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Limits {
    pub(crate) requests: Option<LimitState>,
    pub(crate) tokens: Option<LimitState>,
}

impl Limits {
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        for (kind, state) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some(s) = state else { continue };
            let pairs = [
                ("limit", HeaderValue::from(s.limit)),
                ("remaining", HeaderValue::from(s.remaining)),
                ("reset", go_header(s.reset)),
            ];
            for (what, value) in pairs {
                // Names are built from fixed parts, so they are always valid.
                if let Ok(name) =
                    axum::http::HeaderName::try_from(format!("x-ratelimit-{what}-{kind}"))
                {
                    headers.insert(name, value);
                }
            }
        }
    }
}

fn go_header(d: Duration) -> HeaderValue {
    // A Go duration is plain ASCII; the fallback is unreachable.
    HeaderValue::from_str(&go_duration(d)).unwrap_or_else(|_| HeaderValue::from_static("0s"))
}

/// The quota's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// `None`: admitted (and counted).
    pub(crate) rejected: Option<Rejected>,
    /// Headers for the answer: remaining after this request when admitted,
    /// remaining without it when rejected.
    pub(crate) limits: Limits,
}

/// What the 429's message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rejected {
    pub(crate) kind: Rejection,
    pub(crate) limit: u64,
    /// Requests or tokens already in the window.
    pub(crate) used: u64,
    /// 1 request, or this request's tokens.
    pub(crate) requested: u64,
    /// How long until this request would fit (the reset of its kind).
    pub(crate) wait: Duration,
    /// The request alone exceeds the tokens-per-minute limit: it never fits.
    pub(crate) too_large: bool,
}

/// Limits and the sliding window of admitted requests.
#[derive(Debug, Default)]
pub(crate) struct Quota {
    rpm: Option<u64>,
    tpm: Option<u64>,
    /// Arrival and tokens of each admitted request, oldest first.
    window: VecDeque<(Instant, u64)>,
    /// Sum of the window's tokens, kept so a check is O(expired entries).
    tokens: u64,
}

impl Quota {
    /// `0` means no limit, like `None` (so `--rpm 0` or `MOCK_LLM_RPM=0` turns it off).
    pub(crate) fn set(&mut self, rpm: Option<u64>, tpm: Option<u64>) {
        self.rpm = rpm.filter(|&r| r > 0);
        self.tpm = tpm.filter(|&t| t > 0);
    }

    pub(crate) fn enabled(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some()
    }

    pub(crate) fn clear(&mut self) {
        self.window.clear();
        self.tokens = 0;
    }

    pub(crate) fn status(&mut self, now: Instant) -> QuotaStatus {
        self.expire(now);
        QuotaStatus {
            rpm: self.rpm,
            tpm: self.tpm,
            requests: self.window.len() as u64,
            tokens: self.tokens,
        }
    }

    /// Admits (and counts) a request of `tokens` arriving at `now`, or says
    /// which limit it would break. A rejected request is not counted: what
    /// OpenAI counts for a refused request is not documented, and not counting
    /// it keeps "admitted in the last minute ≤ limit" an exact invariant that
    /// tests can assert.
    pub(crate) fn admit(&mut self, now: Instant, tokens: u64) -> Verdict {
        self.expire(now);
        let count = self.window.len() as u64;
        let sum = self.tokens;
        let over_rpm = self.rpm.is_some_and(|r| count + 1 > r);
        let over_tpm = self.tpm.is_some_and(|t| sum + tokens > t);
        let admitted = !over_rpm && !over_tpm;
        if admitted {
            self.window.push_back((now, tokens));
            self.tokens += tokens;
        }
        let (count_now, sum_now) = (self.window.len() as u64, self.tokens);

        // A reset is when the headers' `remaining` would let this request in
        // (rejected), or else when it next grows (the oldest request leaves).
        let requests = self.rpm.map(|r| {
            let leave = if over_rpm { count + 1 - r } else { 1 };
            LimitState {
                limit: r,
                remaining: r.saturating_sub(count_now),
                reset: self.until_gone(now, usize::try_from(leave).unwrap_or(usize::MAX)),
            }
        });
        let tokens_state = self.tpm.map(|t| {
            let leave = if over_tpm {
                self.entries_to_free(sum + tokens - t)
            } else {
                1
            };
            LimitState {
                limit: t,
                remaining: t.saturating_sub(sum_now),
                reset: self.until_gone(now, leave),
            }
        });
        let limits = Limits {
            requests,
            tokens: tokens_state,
        };

        // Requests first when both break, as the request count is what a
        // client can always act on; the headers report both anyway.
        let rejected = match (over_rpm, over_tpm, requests, tokens_state) {
            (true, _, Some(s), _) => Some(Rejected {
                kind: Rejection::Rpm,
                limit: s.limit,
                used: count,
                requested: 1,
                wait: s.reset,
                too_large: false,
            }),
            (false, true, _, Some(s)) => Some(Rejected {
                kind: Rejection::Tpm,
                limit: s.limit,
                used: sum,
                requested: tokens,
                wait: s.reset,
                too_large: tokens > s.limit,
            }),
            _ => None,
        };
        Verdict { rejected, limits }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, tokens)) = self.window.front() {
            if now.saturating_duration_since(at) < WINDOW {
                break;
            }
            self.window.pop_front();
            self.tokens -= tokens;
        }
    }

    /// How many of the oldest entries must leave to free `needed` tokens (all
    /// of them when even that is not enough: a request over the whole limit).
    fn entries_to_free(&self, needed: u64) -> usize {
        let mut freed = 0;
        for (i, &(_, tokens)) in self.window.iter().enumerate() {
            freed += tokens;
            if freed >= needed {
                return i + 1;
            }
        }
        self.window.len()
    }

    /// Time until the `k` oldest entries have left the window (zero for none;
    /// all of them when `k` exceeds the window).
    fn until_gone(&self, now: Instant, k: usize) -> Duration {
        if k == 0 || self.window.is_empty() {
            return Duration::ZERO;
        }
        let idx = k.min(self.window.len()) - 1;
        (self.window[idx].0 + WINDOW).saturating_duration_since(now)
    }
}

/// A duration as Go's `time.Duration.String()` prints it, as OpenAI sends it
/// in `x-ratelimit-reset-*`: `0s`, `20ms`, `1.5s`, `6m0s`, `1h0m0s`. Rounded
/// up to whole milliseconds (OpenAI's precision), never down, so a client that
/// waits exactly this long is never early.
pub(crate) fn go_duration(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m) = (ms / 3_600_000, ms / 60_000 % 60);
    let (s, frac) = (ms / 1000 % 60, ms % 1000);
    let secs = if frac == 0 {
        format!("{s}s")
    } else {
        let frac = format!("{frac:03}");
        format!("{s}.{}s", frac.trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{secs}")
    } else if m > 0 {
        format!("{m}m{secs}")
    } else {
        secs
    }
}

/// `Retry-After` for a wait: whole seconds, rounded up (a client must not come
/// back before the wait is over).
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    d.as_nanos()
        .div_ceil(1_000_000_000)
        .try_into()
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn quota(rpm: Option<u64>, tpm: Option<u64>) -> Quota {
        let mut q = Quota::default();
        q.set(rpm, tpm);
        q
    }

    #[test]
    fn go_durations_like_openai() {
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_nanos(1)), "1ms", "rounded up");
        assert_eq!(go_duration(ms(20)), "20ms");
        assert_eq!(go_duration(ms(999)), "999ms");
        assert_eq!(go_duration(ms(1000)), "1s");
        assert_eq!(go_duration(ms(1500)), "1.5s");
        assert_eq!(go_duration(ms(1234)), "1.234s");
        assert_eq!(go_duration(ms(1200)), "1.2s");
        assert_eq!(go_duration(Duration::from_micros(1_200_001)), "1.201s");
        assert_eq!(go_duration(ms(59_987)), "59.987s");
        assert_eq!(go_duration(ms(60_000)), "1m0s");
        assert_eq!(go_duration(ms(360_000)), "6m0s");
        assert_eq!(go_duration(ms(61_050)), "1m1.05s");
        assert_eq!(go_duration(ms(3_600_000)), "1h0m0s");
        assert_eq!(go_duration(ms(3_723_500)), "1h2m3.5s");
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 0);
        assert_eq!(retry_after_secs(ms(1)), 1);
        assert_eq!(retry_after_secs(ms(1000)), 1);
        assert_eq!(retry_after_secs(ms(1001)), 2);
    }

    #[test]
    fn rpm_over_an_exact_sliding_minute() {
        let t0 = Instant::now();
        let mut q = quota(Some(3), None);
        let a = q.admit(t0, 10);
        assert_eq!(a.rejected, None);
        let req = a.limits.requests.expect("rpm set");
        assert_eq!((req.limit, req.remaining, req.reset), (3, 2, WINDOW));
        assert_eq!(a.limits.tokens, None, "no tpm, no token headers");
        assert_eq!(q.admit(t0 + ms(10_000), 10).rejected, None);
        let c = q.admit(t0 + ms(20_000), 10);
        assert_eq!(c.rejected, None);
        let req = c.limits.requests.expect("rpm set");
        assert_eq!(
            (req.remaining, req.reset),
            (0, ms(40_000)),
            "oldest leaves at 60 s"
        );

        let d = q.admit(t0 + ms(30_000), 10);
        let rejected = d.rejected.expect("over rpm");
        assert_eq!(rejected.kind, Rejection::Rpm);
        assert_eq!(
            (rejected.limit, rejected.used, rejected.requested),
            (3, 3, 1)
        );
        assert_eq!(rejected.wait, ms(30_000));
        let req = d.limits.requests.expect("rpm set");
        assert_eq!((req.remaining, req.reset), (0, ms(30_000)));
        assert_eq!(
            q.status(t0 + ms(30_000)).requests,
            3,
            "a rejection is not counted"
        );

        // One millisecond early: still full. At 60 s the first one is gone,
        // but the two later ones still count: a sliding window, not a fixed one.
        assert!(q.admit(t0 + ms(59_999), 10).rejected.is_some());
        let e = q.admit(t0 + ms(60_000), 10);
        assert_eq!(e.rejected, None);
        let req = e.limits.requests.expect("rpm set");
        assert_eq!((req.remaining, req.reset), (0, ms(10_000)));
        let f = q.admit(t0 + ms(60_001), 10);
        assert_eq!(f.rejected.map(|r| r.wait), Some(ms(9_999)));
        assert_eq!(
            q.status(t0 + ms(60_001)),
            QuotaStatus {
                rpm: Some(3),
                tpm: None,
                requests: 3,
                tokens: 30
            }
        );
    }

    #[test]
    fn tpm_frees_as_many_oldest_requests_as_needed() {
        let t0 = Instant::now();
        let mut q = quota(None, Some(100));
        assert_eq!(q.admit(t0, 30).rejected, None);
        assert_eq!(q.admit(t0 + ms(1_000), 30).rejected, None);
        let c = q.admit(t0 + ms(2_000), 30);
        let tok = c.limits.tokens.expect("tpm set");
        assert_eq!((tok.limit, tok.remaining, tok.reset), (100, 10, ms(58_000)));

        // 90 used + 50 > 100: 40 must go, so the two oldest (30 + 30) must leave.
        let d = q.admit(t0 + ms(3_000), 50);
        let rejected = d.rejected.expect("over tpm");
        assert_eq!(rejected.kind, Rejection::Tpm);
        assert_eq!(
            (rejected.limit, rejected.used, rejected.requested),
            (100, 90, 50)
        );
        assert_eq!(rejected.wait, ms(58_000));
        assert!(!rejected.too_large);
        let tok = d.limits.tokens.expect("tpm set");
        assert_eq!((tok.remaining, tok.reset), (10, ms(58_000)));

        // A request that fits in what is left still gets in.
        assert_eq!(q.admit(t0 + ms(3_000), 10).rejected, None);
        assert!(q.admit(t0 + ms(60_999), 50).rejected.is_some());
        assert_eq!(q.admit(t0 + ms(61_000), 50).rejected, None);
    }

    #[test]
    fn a_request_over_the_whole_tpm_never_fits() {
        let t0 = Instant::now();
        let mut q = quota(None, Some(100));
        let empty = q.admit(t0, 101).rejected.expect("too large");
        assert!(empty.too_large);
        assert_eq!(
            empty.wait,
            Duration::ZERO,
            "nothing to wait for: it cannot fit"
        );
        assert_eq!(q.admit(t0, 40).rejected, None);
        let r = q.admit(t0 + ms(5_000), 500).rejected.expect("too large");
        assert!(r.too_large);
        assert_eq!(r.wait, ms(55_000), "until the window is empty");
    }

    #[test]
    fn both_limits_report_both_headers_and_requests_win() {
        let t0 = Instant::now();
        let mut q = quota(Some(1), Some(10));
        let a = q.admit(t0, 4);
        assert_eq!(a.rejected, None);
        assert_eq!(a.limits.tokens.map(|s| s.remaining), Some(6));
        let b = q.admit(t0 + ms(500), 20);
        assert_eq!(b.rejected.map(|r| r.kind), Some(Rejection::Rpm));
        let tok = b.limits.tokens.expect("tpm set");
        assert_eq!((tok.remaining, tok.reset), (6, ms(59_500)));
    }

    #[test]
    fn lowering_the_limit_waits_for_enough_to_leave() {
        let t0 = Instant::now();
        let mut q = quota(Some(10), None);
        for i in 0..5 {
            assert_eq!(q.admit(t0 + ms(i * 1000), 1).rejected, None);
        }
        q.set(Some(2), None);
        // 5 in the window, room for 2: the 4 oldest must leave (at 63 s).
        let r = q.admit(t0 + ms(10_000), 1).rejected.expect("over");
        assert_eq!(r.wait, ms(53_000));
        q.set(Some(0), Some(0));
        assert!(!q.enabled(), "0 means no limit");
    }
}
