//! End-of-message latency: how long the MTA waits at end-of-message for the milter's
//! answer (the handoff's last chunk and cofferd's durable 250s, or the failure).
//!
//! A fixed, lock-free histogram: log-linear buckets of microseconds, 8 per power of two
//! (a quantile is reported as the upper edge of its bucket, so at most 12.5 % high, and
//! never below the true value). [`Histogram::take`] returns the counts since the last
//! call and starts a new window: SIGUSR1 logs that window (`eom latency` with
//! `count`, `p50_ms`, `p90_ms`, `p99_ms`, `p999_ms`, `max_ms`, `failed`), and so does
//! exit. docs/milter.md "Latency report".

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two.
const SUB: usize = 8;
const SUB_BITS: u32 = 3;
/// Buckets: values 0..8 exactly, then 8 per power of two up to 2^64 µs.
const BUCKETS: usize = SUB + (64 - SUB_BITS as usize) * SUB;

/// The bucket of a value in microseconds.
fn bucket(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros(); // >= SUB_BITS
    let sub = ((us >> (exp - SUB_BITS)) as usize) & (SUB - 1);
    SUB + (exp - SUB_BITS) as usize * SUB + sub
}

/// The largest value (µs) that falls in bucket `i`.
fn upper(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let exp = (i - SUB) / SUB + SUB_BITS as usize;
    let sub = ((i - SUB) % SUB) as u64;
    let low = (1u64 << exp) + (sub << (exp - SUB_BITS as usize));
    low.saturating_add((1u64 << (exp - SUB_BITS as usize)) - 1)
}

/// Counts of end-of-message latencies.
pub struct Histogram {
    counts: Box<[AtomicU64]>,
    max_us: AtomicU64,
    failed: AtomicU64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram").finish_non_exhaustive()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one end-of-message; `ok` is false when the message was not archived.
    pub fn record(&self, d: Duration, ok: bool) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.counts[bucket(us)].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts since the last call, and a new window.
    pub fn take(&self) -> Summary {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.swap(0, Ordering::Relaxed))
            .collect();
        Summary {
            counts,
            max_us: self.max_us.swap(0, Ordering::Relaxed),
            failed: self.failed.swap(0, Ordering::Relaxed),
        }
    }
}

/// One window of the histogram.
#[derive(Clone, Debug)]
pub struct Summary {
    counts: Vec<u64>,
    pub max_us: u64,
    pub failed: u64,
}

impl Summary {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (0..=1) in microseconds: the upper edge of its bucket, capped
    /// at the maximum seen. `None` when the window is empty.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        // The rank of the quantile, 1-based: ceil(q * n), at least 1.
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(upper(i).min(self.max_us));
            }
        }
        Some(self.max_us)
    }

    /// The quantile in milliseconds, formatted with three decimals, or `-`.
    pub fn quantile_ms(&self, q: f64) -> String {
        self.quantile_us(q).map_or_else(|| "-".into(), ms)
    }
}

/// Microseconds as milliseconds with three decimals.
pub fn ms(us: u64) -> String {
    format!("{}.{:03}", us / 1000, us % 1000)
}

/// Logs one window at info level (the line the benchmark reads).
pub fn log(what: &str, s: &Summary) {
    tracing::info!(
        count = s.count(),
        failed = s.failed,
        p50_ms = %s.quantile_ms(0.50),
        p90_ms = %s.quantile_ms(0.90),
        p99_ms = %s.quantile_ms(0.99),
        p999_ms = %s.quantile_ms(0.999),
        max_ms = %ms(s.max_us),
        "eom latency {what}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut prev = 0;
        for us in (0..5000).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let b = bucket(us);
            assert!(b < BUCKETS, "{us}");
            assert!(b >= prev, "{us}");
            assert!(upper(b) >= us, "{us}: bucket {b} ends at {}", upper(b));
            if b > 0 {
                assert!(upper(b - 1) < us, "{us}: also fits bucket {}", b - 1);
            }
            // At most 12.5 % above the value.
            assert!(upper(b) - us <= us / 8, "{us}: {}", upper(b));
            prev = b;
        }
    }

    #[test]
    fn quantiles() {
        let h = Histogram::default();
        assert_eq!(h.take().quantile_us(0.5), None);
        // 1..=1000 ms, one each.
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms), ms != 7);
        }
        let s = h.take();
        assert_eq!(s.count(), 1000);
        assert_eq!(s.failed, 1);
        assert_eq!(s.max_us, 1_000_000);
        for (q, want_ms) in [(0.5, 500u64), (0.99, 990), (1.0, 1000)] {
            let got = s.quantile_us(q).unwrap();
            let want = want_ms * 1000;
            assert!(got >= want && got - want <= want / 8, "q{q}: {got}");
        }
        assert_eq!(s.quantile_us(1.0), Some(1_000_000));
        // A new window starts empty.
        assert_eq!(h.take().count(), 0);
        assert_eq!(ms(1_234), "1.234");
        assert_eq!(ms(5), "0.005");
    }
}
