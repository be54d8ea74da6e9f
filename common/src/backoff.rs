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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
