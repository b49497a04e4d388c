//! Counters the writer keeps for `/metrics`: totals mirrored from the index after each
//! commit, batch sizes and commit latency, errors by kind.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (inclusive) of the batch-size histogram buckets, in messages.
pub const BATCH_BUCKETS: [u64; 8] = [1, 2, 4, 8, 16, 32, 64, 128];
/// Upper bounds of the commit-latency histogram buckets, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 10] = [
    500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// A fixed-bucket histogram of atomics (Prometheus semantics: cumulative on export).
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    pub bounds: [u64; N],
    /// `counts[i]` counts observations in `(bounds[i-1], bounds[i]]`; the last slot is +Inf.
    counts: [AtomicU64; 11],
    pub sum: AtomicU64,
    pub count: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    pub const fn new(bounds: [u64; N]) -> Self {
        assert!(N < 11);
        Self {
            bounds,
            counts: [const { AtomicU64::new(0) }; 11],
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: u64) {
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(N);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative counts per bound, then the +Inf total.
    pub fn cumulative(&self) -> Vec<(Option<u64>, u64)> {
        let mut acc = 0;
        let mut out = Vec::with_capacity(N + 1);
        for i in 0..=N {
            acc += self.counts[i].load(Ordering::Relaxed);
            out.push((self.bounds.get(i).copied(), acc));
        }
        out
    }
}

#[derive(Debug)]
pub struct StoreStats {
    pub messages: AtomicU64,
    pub arrivals: AtomicU64,
    pub repeats: AtomicU64,
    pub raw_bytes: AtomicU64,
    pub stored_bytes: AtomicU64,
    pub batch_messages: Histogram<8>,
    /// Append + fdatasync of a log batch: the acknowledgement path.
    pub commit_us: Histogram<10>,
    /// One index transaction (which may cover several log batches).
    pub index_commit_us: Histogram<10>,
    pub errors_append: AtomicU64,
    pub errors_sync: AtomicU64,
    pub errors_commit: AtomicU64,
    pub reopens: AtomicU64,
}

impl Default for StoreStats {
    fn default() -> Self {
        Self {
            messages: AtomicU64::new(0),
            arrivals: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
            raw_bytes: AtomicU64::new(0),
            stored_bytes: AtomicU64::new(0),
            batch_messages: Histogram::new(BATCH_BUCKETS),
            commit_us: Histogram::new(LATENCY_BUCKETS_US),
            index_commit_us: Histogram::new(LATENCY_BUCKETS_US),
            errors_append: AtomicU64::new(0),
            errors_sync: AtomicU64::new(0),
            errors_commit: AtomicU64::new(0),
            reopens: AtomicU64::new(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new([1, 4, 16]);
        for v in [1, 2, 3, 20, 16] {
            h.observe(v);
        }
        assert_eq!(
            h.cumulative(),
            vec![(Some(1), 1), (Some(4), 3), (Some(16), 4), (None, 5)]
        );
        assert_eq!(h.sum.load(Ordering::Relaxed), 42);
    }
}
