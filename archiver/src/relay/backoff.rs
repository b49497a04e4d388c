//! Retry timing: capped exponential backoff with jitter. Pure: the caller passes `now`
//! and the randomness, so it is tested without a clock.

use std::time::{Duration, Instant};

/// First retry delay.
pub const BASE: Duration = Duration::from_secs(1);
/// Longest delay between two attempts of one arrival.
pub const CAP: Duration = Duration::from_secs(60);

/// The delay before attempt `attempt + 1`, after `attempt` failures (1, 2, ...):
/// `BASE * 2^(attempt-1)`, capped at `cap`, then scaled by a jitter factor in
/// [0.5, 1.0] drawn from `rand` (any u64), so peers recovering together do not retry in
/// step.
pub fn delay(attempt: u32, cap: Duration, rand: u64) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let full = BASE.saturating_mul(1u32 << exp).min(cap);
    // 0.5 + (rand mod 1024)/2048: between half and all of the full delay.
    let jitter = 1024 + (rand % 1024);
    full * u32::try_from(jitter).expect("under 2048") / 2048
}

/// When the next attempt may start.
pub fn next_attempt(now: Instant, attempt: u32, cap: Duration, rand: u64) -> Instant {
    now + delay(attempt, cap, rand)
}

/// A cheap random u64 for jitter (no cryptographic use).
pub fn jitter_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_doubles_and_caps() {
        let cap = Duration::from_secs(60);
        // rand % 1024 == 1023: the full delay (to within a ms).
        let full = |a| delay(a, cap, 1023);
        assert_eq!(full(1), Duration::from_secs(1) * 2047 / 2048);
        assert!(full(2) > Duration::from_millis(1990) && full(2) <= Duration::from_secs(2));
        assert!(full(6) > Duration::from_secs(31) && full(6) <= Duration::from_secs(32));
        assert!(full(7) <= cap && full(7) > Duration::from_secs(59));
        assert!(full(1000) <= cap, "no overflow for huge attempt counts");
        assert_eq!(delay(0, cap, 1023), full(1));
    }

    #[test]
    fn jitter_stays_between_half_and_full() {
        let cap = Duration::from_secs(60);
        for rand in [0u64, 1, 511, 512, 1023, 1024, u64::MAX] {
            for attempt in 1..10 {
                let d = delay(attempt, cap, rand);
                let full = delay(attempt, cap, 1023);
                assert!(d >= full / 2 && d <= full, "{attempt} {rand}: {d:?}");
            }
        }
        assert_eq!(delay(3, cap, 0), Duration::from_secs(2));
    }

    #[test]
    fn next_attempt_adds_to_now() {
        let now = Instant::now();
        let cap = Duration::from_secs(5);
        assert_eq!(
            next_attempt(now, 10, cap, 0),
            now + Duration::from_millis(2500)
        );
    }
}
