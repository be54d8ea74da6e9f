//! Retry delays: exponential backoff with full jitter, so a burst of failures does not come back
//! as a synchronized burst of retries.

use std::time::Duration;

use rand::Rng;

/// Upper bound of the delay before retry number `attempt` (1-based): `base * 2^(attempt-1)`,
/// capped at `max`.
pub fn ceiling(attempt: u32, base: Duration, max: Duration) -> Duration {
    let shift = attempt.saturating_sub(1).min(31);
    base.saturating_mul(1u32 << shift).min(max)
}

/// A delay drawn uniformly from `[0, ceiling(attempt)]`.
pub fn full_jitter(attempt: u32, base: Duration, max: Duration) -> Duration {
    let cap = ceiling(attempt, base, max).as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(0..=cap))
}

/// The wait before retrying a task's `nth` rate-limited call (1-based), given the server's hint.
///
/// A hint is clamped to `[base / 10, max]` and then spread upward by up to a fifth (at least
/// `base / 10`), so tasks blocked by one limit do not all wake on the same instant: a server's
/// reset time is a lower bound, never a meeting point. At the cap the spread goes downward, since
/// the operator's ceiling wins over any server. A zero hint (`Retry-After: 0`) is treated like no
/// hint, as the official OpenAI SDKs do: retrying at once would be a hot loop. With no hint the
/// wait is full jitter on the task's rate-limited count, so the `AGENTQ_MAX_RATE_LIMITED` cap
/// spans minutes of back-off rather than a burst of immediate retries.
pub fn rate_limited(hint: Option<Duration>, nth: u32, base: Duration, max: Duration) -> Duration {
    let floor = (base / 10).min(max);
    match hint.filter(|h| !h.is_zero()) {
        Some(h) => {
            let wait = h.clamp(floor, max);
            let spread = (wait / 5).max(floor);
            let (lo, hi) = if wait < max {
                (wait, wait.saturating_add(spread).min(max))
            } else {
                (max.saturating_sub(spread).max(floor), max)
            };
            uniform(lo, hi)
        }
        None => full_jitter(nth, base, max).max(floor),
    }
}

/// How long a 429 blocks its model for the whole fleet: the shortest wait [`rate_limited`] can
/// give the task that got it (its hint clamped, or the low end of the spread at the cap), so that
/// task never comes back to find the block still on. Without a hint nobody knows when the limit
/// lifts: the fleet pauses for `base` only, while that task backs off on its own count of 429s.
pub fn fleet_block(hint: Option<Duration>, base: Duration, max: Duration) -> Duration {
    let floor = (base / 10).min(max);
    match hint.filter(|h| !h.is_zero()) {
        Some(h) => {
            let wait = h.clamp(floor, max);
            if wait < max {
                wait
            } else {
                max.saturating_sub((wait / 5).max(floor)).max(floor)
            }
        }
        None => base.min(max),
    }
}

/// A duration drawn uniformly from `[lo, hi]`, at microsecond resolution.
fn uniform(lo: Duration, hi: Duration) -> Duration {
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let (lo, hi) = (micros(lo), micros(hi));
    if hi <= lo {
        return Duration::from_micros(lo);
    }
    Duration::from_micros(rand::rng().random_range(lo..=hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_fleet_block_ends_before_the_task_that_caused_it_returns(
            hint_ms in proptest::option::of(0u64..10_000_000),
            base_ms in 1u64..10_000,
            max_ms in 1u64..1_000_000,
            nth in 1u32..30,
        ) {
            let (base, max) = (Duration::from_millis(base_ms), Duration::from_millis(max_ms.max(base_ms)));
            let hint = hint_ms.map(Duration::from_millis);
            let block = fleet_block(hint, base, max);
            prop_assert!(block <= max);
            if hint.is_some_and(|h| !h.is_zero()) {
                prop_assert!(rate_limited(hint, nth, base, max) >= block);
            }
        }
    }

    proptest! {
        #[test]
        fn jitter_stays_within_the_ceiling(attempt in 0u32..200, base_ms in 1u64..10_000, max_ms in 1u64..1_000_000) {
            let base = Duration::from_millis(base_ms);
            let max = Duration::from_millis(max_ms);
            let d = full_jitter(attempt, base, max);
            prop_assert!(d <= ceiling(attempt, base, max));
            prop_assert!(d <= max);
        }
    }

    proptest! {
        #[test]
        fn rate_limited_waits_stay_in_bounds(
            hint_ms in proptest::option::of(0u64..u64::MAX / 2_000_000),
            nth in 0u32..100,
            base_ms in 1u64..10_000,
            extra_ms in 0u64..1_000_000,
        ) {
            let base = Duration::from_millis(base_ms);
            let max = Duration::from_millis(base_ms + extra_ms);
            let floor = base / 10;
            let d = rate_limited(hint_ms.map(Duration::from_millis), nth, base, max);
            prop_assert!(d >= floor, "{d:?} below the floor {floor:?}");
            prop_assert!(d <= max, "{d:?} above the cap {max:?}");
            if let Some(h) = hint_ms.map(Duration::from_millis).filter(|h| !h.is_zero()) {
                // never earlier than the server asked, unless the operator's cap says so
                if h < max {
                    prop_assert!(d >= h.max(floor));
                    prop_assert!(d <= h.max(floor) + (h.max(floor) / 5).max(floor));
                } else {
                    prop_assert!(d >= max - (max / 5).max(floor));
                }
            } else {
                prop_assert!(d <= ceiling(nth, base, max).max(floor));
            }
        }
    }

    #[test]
    fn rate_limited_without_a_hint_grows_with_the_count() {
        let base = Duration::from_millis(1000);
        let max = Duration::from_secs(300);
        // The sum of the ceilings over the default cap of 20 is what the cap can span.
        let span: Duration = (1..=20).map(|n| ceiling(n, base, max)).sum();
        assert!(span >= Duration::from_secs(60 * 40), "{span:?}");
        // Averages rise with the count: 200 draws each, the 8th's mean well above the 1st's.
        let mean = |n| {
            (0..200)
                .map(|_| rate_limited(None, n, base, max))
                .sum::<Duration>()
                / 200
        };
        assert!(mean(8) > mean(1) * 10);
        // Retry-After: 0 is no hint at all, not an immediate retry
        assert!((0..50).all(|_| rate_limited(Some(Duration::ZERO), 1, base, max) >= base / 10));
    }

    #[test]
    fn rate_limited_spreads_waiters_after_the_hint() {
        let base = Duration::from_millis(1000);
        let max = Duration::from_secs(60);
        let hint = Duration::from_secs(10);
        let waits: Vec<Duration> = (0..100)
            .map(|_| rate_limited(Some(hint), 1, base, max))
            .collect();
        assert!(waits.iter().all(|w| *w >= hint && *w <= hint + hint / 5));
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > 50, "waiters must not wake together");
        // an absurd hint is clamped to the cap, spread below it
        let huge = rate_limited(Some(Duration::MAX), 1, base, max);
        assert!(huge <= max && huge >= max - max / 5);
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Duration::from_millis(100);
        let m = Duration::from_secs(1);
        assert_eq!(ceiling(1, b, m), Duration::from_millis(100));
        assert_eq!(ceiling(2, b, m), Duration::from_millis(200));
        assert_eq!(ceiling(4, b, m), Duration::from_millis(800));
        assert_eq!(ceiling(5, b, m), m);
        assert_eq!(ceiling(500, b, m), m);
    }
}
