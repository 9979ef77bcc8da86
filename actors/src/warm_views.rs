//! Warm views: the views of passivated entity actors, kept in memory up to a bound, the most
//! recently passivated longest. An actor started again for the key takes its view back at once,
//! where it would wait for the view loader to read and decode it from the store.
//!
//! A kept view is the latest of its key only while nothing else changed the key: it is taken (not
//! copied) when the key's next actor starts, an actor keeps its view only when no newer actor of
//! the key is live, and every view kept or obtained before a reset of the ledger (staged work
//! lost) or a restore from the changelog (stored views replaced) is refused.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use lru::LruCache;

use crate::aggregate::Aggregate;
use crate::ledger::Ledger;

/// A view kept, with the epoch at which its actor obtained it.
struct Warm {
    epoch: u64,
    view: Arc<Aggregate>,
}

/// The views of passivated actors by key, least recently kept evicted first.
pub struct WarmViews {
    /// `None` when the bound is 0: nothing is kept.
    views: Option<Mutex<LruCache<String, Warm, crate::KeyHasher>>>,
    /// Whose resets end an epoch.
    ledger: Arc<Ledger>,
    /// Restores from the changelog so far, which end an epoch too.
    invalidations: AtomicU64,
}

impl WarmViews {
    /// Keeps up to `bound` views; the ledger's resets end their epoch.
    pub fn new(bound: usize, ledger: Arc<Ledger>) -> Self {
        WarmViews {
            views: NonZeroUsize::new(bound)
                .map(|cap| Mutex::new(LruCache::with_hasher(cap, crate::KeyHasher::default()))),
            ledger,
            invalidations: AtomicU64::new(0),
        }
    }

    /// The current epoch: an actor notes it before it obtains its view, and only a view
    /// obtained in the current epoch is kept or taken back.
    pub fn epoch(&self) -> u64 {
        self.ledger.generation() + self.invalidations.load(Ordering::Acquire)
    }

    /// Refuses every view kept or obtained so far: the store's views were replaced (a restore
    /// from the changelog); call after the replacement, before the replaced keys' actors stop.
    pub fn invalidate(&self) {
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        if let Some(mut views) = self.lock() {
            views.clear();
        }
    }

    /// Keeps `view`, obtained by its actor at `epoch`, as its key's latest. Returns what is not
    /// kept: the view evicted (or replaced), or `view` itself from an earlier epoch or when
    /// nothing is kept; the caller drops it where that is cheap.
    pub fn keep(&self, view: Arc<Aggregate>, epoch: u64) -> Option<Arc<Aggregate>> {
        if epoch != self.epoch() {
            return Some(view);
        }
        let Some(mut views) = self.lock() else {
            return Some(view);
        };
        views
            .push(view.key.clone(), Warm { epoch, view })
            .map(|(_, evicted)| evicted.view)
    }

    /// Takes the kept view of `key` if it is of the current epoch; what an actor starting for
    /// the key calls first, so that no view of the key stays kept while an actor changes it.
    pub fn take(&self, key: &str) -> Option<Arc<Aggregate>> {
        let warm = self.lock()?.pop(key)?;
        (warm.epoch == self.epoch()).then_some(warm.view)
    }

    /// Views kept.
    pub fn len(&self) -> usize {
        self.lock().map_or(0, |views| views.len())
    }

    /// Whether no view is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> Option<MutexGuard<'_, LruCache<String, Warm, crate::KeyHasher>>> {
        self.views
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn warm_views(bound: usize) -> (WarmViews, Arc<Ledger>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let ledger = Arc::new(Ledger::new(store, Arc::default()));
        (WarmViews::new(bound, ledger.clone()), ledger, dir)
    }

    fn view(key: &str, events: u64) -> Arc<Aggregate> {
        let mut v = Aggregate::new(key, 0);
        v.events_applied = events;
        Arc::new(v)
    }

    #[test]
    fn a_kept_view_is_taken_back_once() {
        let (warm, _ledger, _dir) = warm_views(10);
        let kept = view("a", 3);
        assert!(warm.keep(kept.clone(), warm.epoch()).is_none());
        let taken = warm.take("a").expect("kept");
        assert!(Arc::ptr_eq(&taken, &kept), "the same view, not a copy");
        assert!(warm.take("a").is_none(), "taken, not copied");
        assert!(warm.take("b").is_none());
    }

    #[test]
    fn beyond_the_bound_the_least_recently_kept_is_evicted() {
        let (warm, _ledger, _dir) = warm_views(2);
        let epoch = warm.epoch();
        assert!(warm.keep(view("a", 1), epoch).is_none());
        assert!(warm.keep(view("b", 1), epoch).is_none());
        let evicted = warm.keep(view("c", 1), epoch).expect("over the bound");
        assert_eq!(evicted.key, "a");
        assert_eq!(warm.len(), 2);
        let replaced = warm.keep(view("b", 2), epoch).expect("b was kept");
        assert_eq!(
            replaced.events_applied, 1,
            "a newer view of b replaces the older"
        );
        assert_eq!(warm.take("b").map(|v| v.events_applied), Some(2));
    }

    #[test]
    fn views_of_an_earlier_epoch_are_refused() {
        let (warm, ledger, _dir) = warm_views(10);
        let before = warm.epoch();
        assert!(warm.keep(view("a", 1), before).is_none());
        ledger.reset(|| 0);
        assert!(
            warm.take("a").is_none(),
            "kept before the ledger lost staged work"
        );
        let stale = warm.keep(view("b", 1), before).expect("refused");
        assert_eq!(stale.key, "b", "obtained before the reset");

        let now = warm.epoch();
        assert_ne!(now, before);
        assert!(warm.keep(view("c", 1), now).is_none());
        warm.invalidate();
        assert!(warm.is_empty(), "a restore forgets every view kept");
        assert!(
            warm.keep(view("c", 1), now).is_some(),
            "obtained before the restore"
        );
    }

    #[test]
    fn a_bound_of_zero_keeps_nothing() {
        let (warm, _ledger, _dir) = warm_views(0);
        assert!(warm.keep(view("a", 1), warm.epoch()).is_some());
        assert!(warm.take("a").is_none());
    }
}
