//! The memory budget for message content held by listeners (docs/reliability.md
//! "Memory bound").
//!
//! A session buffers a message while it arrives (DATA, or BDAT chunks) and keeps it until
//! the store has answered. Every byte of buffer *capacity* it allocates for content is
//! first claimed from one [`Budget`] shared by every listener of the daemon, sized by
//! `[store] max_pending`. When the budget cannot give more, the session stops buffering,
//! reads the rest of the message to its end, and answers `451 4.3.2` (the client keeps
//! the mail and retries): memory stays bounded by configuration, not by what clients
//! send.
//!
//! As with the store's own `max_pending` check, one claim is always granted when nothing
//! else is held, however big (up to the message size cap): a message larger than
//! `max_pending` can still be archived when the daemon is otherwise idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of message buffers held by sessions, against a maximum (live: SIGHUP may change
/// it).
#[derive(Debug)]
pub struct Budget {
    held: AtomicU64,
    max: AtomicU64,
}

impl Budget {
    pub fn new(max: u64) -> Arc<Budget> {
        Arc::new(Budget {
            held: AtomicU64::new(0),
            max: AtomicU64::new(max),
        })
    }

    /// Changes the maximum; claims already granted are kept.
    pub fn set_max(&self, max: u64) {
        self.max.store(max, Ordering::Relaxed);
    }

    pub fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// Bytes currently claimed by every session together.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// One session's share of a [`Budget`]; released when dropped. Without a budget (unit
/// tests, tools) every claim is granted.
#[derive(Debug, Default)]
pub struct Claim {
    budget: Option<Arc<Budget>>,
    held: u64,
}

impl Claim {
    /// A claim on `budget`, holding nothing yet.
    pub fn on(budget: Arc<Budget>) -> Claim {
        Claim {
            budget: Some(budget),
            held: 0,
        }
    }

    /// Bytes this claim holds.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Raises this claim to `total` bytes. False when the budget cannot give that much
    /// (others hold some, and the total would pass the maximum); the claim then holds
    /// what it held before. Lowering is done by [`Claim::release`] only.
    pub fn grow_to(&mut self, total: u64) -> bool {
        if total <= self.held {
            return true;
        }
        let Some(budget) = &self.budget else {
            self.held = total;
            return true;
        };
        let extra = total - self.held;
        let before = budget.held.fetch_add(extra, Ordering::AcqRel);
        let others = before.saturating_sub(self.held);
        if others > 0 && before.saturating_add(extra) > budget.max.load(Ordering::Relaxed) {
            budget.held.fetch_sub(extra, Ordering::AcqRel);
            return false;
        }
        self.held = total;
        true
    }

    /// Gives back everything this claim holds.
    pub fn release(&mut self) {
        if let Some(budget) = &self.budget {
            budget.held.fetch_sub(self.held, Ordering::AcqRel);
        }
        self.held = 0;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_share_the_maximum_and_one_is_always_granted() {
        let b = Budget::new(100);
        let mut a = Claim::on(b.clone());
        // Alone, a claim may pass the maximum.
        assert!(a.grow_to(60));
        assert!(a.grow_to(150));
        assert_eq!(b.held(), 150);
        let mut c = Claim::on(b.clone());
        assert!(!c.grow_to(1), "others hold more than the maximum");
        assert_eq!((c.held(), b.held()), (0, 150));
        a.release();
        assert!(c.grow_to(70));
        assert!(!a.grow_to(31));
        assert!(a.grow_to(30));
        assert_eq!(b.held(), 100);
        // Lowering is a no-op; release gives everything back.
        assert!(a.grow_to(10));
        assert_eq!(a.held(), 30);
        drop(a);
        drop(c);
        assert_eq!(b.held(), 0);
        b.set_max(5);
        assert_eq!(b.max(), 5);
        let mut d = Claim::default();
        assert!(d.grow_to(u64::MAX));
    }
}
