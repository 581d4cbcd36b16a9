//! Reconnect backoff: capped exponential with full jitter above a floor.
//!
//! Attempt `n` (0-based) waits a uniformly random time in `[min, cap(n)]` where
//! `cap(n) = min(max, min · 2^(n+1))`. The floor keeps a fleet of agents from hammering a broker
//! that just came back; the jitter spreads their reconnects so they do not arrive in waves.
//! The function is pure: the caller passes the random draw, so tests can pin it.

use std::time::Duration;

use rand::Rng;

/// The delay before reconnect attempt `attempt`, in milliseconds, for a random `unit` in
/// `[0, 1)`. `min_ms` is raised to 1 and `max_ms` to `min_ms`, so bad settings still back off.
pub fn delay_ms(attempt: u32, min_ms: u64, max_ms: u64, unit: f64) -> u64 {
    let min_ms = min_ms.max(1);
    let max_ms = max_ms.max(min_ms);
    // 2^(attempt+1) without overflow: past 2^62 the cap is max_ms anyway.
    let factor = 1u64
        .checked_shl(attempt.saturating_add(1))
        .unwrap_or(u64::MAX);
    let cap_ms = min_ms.saturating_mul(factor).min(max_ms);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let span = (cap_ms - min_ms) as f64;
    (min_ms + (span * unit).round() as u64).min(cap_ms)
}

/// [`delay_ms`] with a fresh random draw, as a [`Duration`].
pub fn delay(attempt: u32, min_ms: u64, max_ms: u64) -> Duration {
    let unit: f64 = rand::thread_rng().gen();
    Duration::from_millis(delay_ms(attempt, min_ms, max_ms, unit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_then_caps() {
        // The top of the range doubles per attempt until the cap.
        assert_eq!(delay_ms(0, 100, 10_000, 1.0), 200);
        assert_eq!(delay_ms(1, 100, 10_000, 1.0), 400);
        assert_eq!(delay_ms(5, 100, 10_000, 1.0), 6_400);
        assert_eq!(delay_ms(6, 100, 10_000, 1.0), 10_000);
        assert_eq!(delay_ms(u32::MAX, 100, 10_000, 1.0), 10_000);
        // The bottom stays at the floor.
        assert_eq!(delay_ms(0, 100, 10_000, 0.0), 100);
        assert_eq!(delay_ms(40, 100, 10_000, 0.0), 100);
        // Bad settings still back off.
        assert_eq!(delay_ms(3, 0, 0, 0.5), 1);
        assert_eq!(delay_ms(3, 500, 10, 0.5), 500);
        assert_eq!(delay_ms(3, 100, 10_000, f64::NAN), 100);
    }

    #[test]
    fn random_draws_are_spread() {
        // Full jitter: a handful of real draws at a capped attempt are not all the same value.
        let draws: std::collections::BTreeSet<u128> = (0..32)
            .map(|_| delay(20, 100, 10_000).as_millis())
            .collect();
        assert!(draws.len() > 1, "no jitter: {draws:?}");
        assert!(draws.iter().all(|d| (100..=10_000).contains(d)));
    }

    proptest! {
        #[test]
        fn always_within_floor_and_cap(attempt in 0u32..200, min in 0u64..5_000, max in 0u64..100_000, unit in 0.0f64..1.0) {
            let d = delay_ms(attempt, min, max, unit);
            let lo = min.max(1);
            let hi = max.max(lo);
            prop_assert!(d >= lo && d <= hi, "{d} not in [{lo}, {hi}]");
        }

        #[test]
        fn monotonic_in_the_draw(attempt in 0u32..64, a in 0.0f64..1.0, b in 0.0f64..1.0) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(delay_ms(attempt, 100, 10_000, lo) <= delay_ms(attempt, 100, 10_000, hi));
        }

        #[test]
        fn cap_never_shrinks(attempt in 0u32..64) {
            prop_assert!(delay_ms(attempt, 100, 10_000, 1.0) <= delay_ms(attempt + 1, 100, 10_000, 1.0));
        }
    }
}
