//! Fault injection for tests of fault handling: makes the next operations of one kind fail (store
//! writes, rule folds). Holding an injector keeps nothing else alive.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Makes the next `n` operations of its kind fail.
#[derive(Clone, Debug, Default)]
pub struct FaultInjector(Arc<AtomicU64>);

impl FaultInjector {
    /// Makes the next `n` operations fail.
    pub fn fail_next(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    /// Whether this operation must fail (using up one of the injected faults).
    pub fn take(&self) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_exactly_the_next_n_operations() {
        let f = FaultInjector::default();
        assert!(!f.take());
        f.fail_next(2);
        assert!(f.take() && f.take());
        assert!(!f.take());
    }
}
