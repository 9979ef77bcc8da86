//! The ledger: what the dedup actor has staged and is writing, that is the message ids applied
//! and the views they produced since the last write. Entity actors check a message id and stage
//! their view through it by a call, not a message, so that an event costs no round trip to the
//! dedup actor, which runs on a thread of its own and only writes what the ledger hands it.
//!
//! A message id is seen before if it is staged, in a write under way, or in the store's window;
//! one lock covers the first two, and a write leaves the ledger only once the store has it, so
//! that a message id is always in one of the three places. Writes under way are kept in the
//! order they were taken, which is the order the store applies them in.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::aggregate::Aggregate;
use crate::marker_index::{HashSetOfHashes, MarkerHasher};
use crate::record::Origin;
use crate::store::{Store, StoreError};
use crate::topology::Topology;
use crate::KeyHasher;

/// The answer to a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not applied before: apply it and stage the result.
    New,
    /// Applied before: drop it; its offset completes with the next write.
    Seen,
    /// The asking actor was started before the dedup actor last restarted, so its view may hold
    /// effects that were lost: it must stop without applying anything.
    Stale,
}

/// The event `message_id` was applied: what a fold hands the ledger, to write its marker with
/// the view it changed in the next batch.
pub struct Applied {
    /// Partition the marker lives in.
    pub partition: i32,
    /// The message id.
    pub message_id: String,
    /// The record applied.
    pub origin: Origin,
    /// Index of the event's source, for the `applied` count once the effect is stored.
    pub source: usize,
}

/// Work applied since the last write: written together or not at all.
#[derive(Clone, Default)]
pub(crate) struct Staged {
    /// Message ids by partition, as the store's dedup window hashes them (the ids themselves
    /// are with their views).
    pub(crate) markers: HashMap<i32, HashSetOfHashes, KeyHasher>,
    /// Views by key, with the message ids applied to each since its last write.
    pub(crate) views: HashMap<String, (Arc<Aggregate>, Vec<String>), KeyHasher>,
}

impl Staged {
    fn is_empty(&self) -> bool {
        self.markers.is_empty() && self.views.is_empty()
    }

    fn has_marker(&self, partition: i32, hash: u128) -> bool {
        self.markers
            .get(&partition)
            .is_some_and(|ids| ids.contains(&hash))
    }

    /// Puts `older` (a write that failed) back in front of what was staged since.
    fn put_back(&mut self, older: Staged) {
        for (partition, ids) in older.markers {
            self.markers.entry(partition).or_default().extend(ids);
        }
        for (key, (view, mut ids)) in older.views {
            match self.views.entry(key) {
                std::collections::hash_map::Entry::Occupied(mut newer) => {
                    ids.append(&mut newer.get_mut().1);
                    newer.get_mut().1 = ids;
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert((view, ids));
                }
            }
        }
    }
}

/// A write taken from the ledger.
pub(crate) struct Taken {
    /// Its place in the order of writes: the store applies them in this order.
    pub(crate) seq: u64,
    /// Markers and views, also answering checks and loads until the write ends.
    pub(crate) staged: Arc<Staged>,
    /// What the writes taken before it and still under way hold, oldest first: their
    /// changelog records may not have reached the broker yet.
    pub(crate) earlier: Vec<Arc<Staged>>,
}

/// A write under way, answering checks and loads until the store has it.
struct Writing {
    seq: u64,
    staged: Arc<Staged>,
    /// Records the write completes (applied or found to be duplicates).
    done: Vec<Origin>,
    /// Source index of every staged event: counted as applied when written, not before, so that
    /// work lost with a restart is not counted.
    applied: Vec<usize>,
}

#[derive(Default)]
struct State {
    staged: Staged,
    done: Vec<Origin>,
    applied: Vec<usize>,
    /// Writes under way, oldest first.
    writing: VecDeque<Writing>,
    /// Sequence number of the next write taken; never reused, so that a write forgotten by a
    /// reset finds nothing of its own afterwards.
    next_seq: u64,
    /// Entity actors of this incarnation or older were started before the last restart.
    fence: u64,
    /// For its marker window; `None` once the store is handed back at shutdown, so that the
    /// ledger does not keep it open.
    store: Option<Store>,
}

impl State {
    /// The view of `key` staged or in the newest write under way that holds it.
    fn latest_view(&self, key: &str) -> Option<Arc<Aggregate>> {
        let (view, _) = self.staged.views.get(key).or_else(|| {
            self.writing
                .iter()
                .rev()
                .find_map(|w| w.staged.views.get(key))
        })?;
        Some(view.clone())
    }
}

/// The dedup actor's ledger, shared with the entity actors.
pub struct Ledger {
    state: Mutex<State>,
    /// Resets so far: a partition supervisor started before the last one routes nothing more.
    generation: AtomicU64,
    topology: Arc<Topology>,
    /// Fills a staged view's slot while its actor changes the view in place.
    placeholder: Arc<Aggregate>,
    /// The store's: a message id is hashed once for every place its marker may be.
    hasher: MarkerHasher,
}

impl Ledger {
    /// A ledger over `store`, counting checks and staged work in `topology`.
    pub fn new(store: Store, topology: Arc<Topology>) -> Self {
        let hasher = store.marker_hasher();
        Ledger {
            state: Mutex::new(State {
                store: Some(store),
                ..State::default()
            }),
            generation: AtomicU64::new(0),
            topology,
            placeholder: Arc::default(),
            hasher,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Was `message_id` of `partition` applied before? A duplicate's `origin` completes with the
    /// next write.
    pub fn check(
        &self,
        partition: i32,
        message_id: &str,
        origin: &Origin,
        incarnation: u64,
    ) -> Result<Verdict, StoreError> {
        let mut state = self.lock();
        if incarnation <= state.fence {
            return Ok(Verdict::Stale);
        }
        let Some(store) = &state.store else {
            return Err(StoreError::Released);
        };
        let stats = &self.topology.dedup;
        stats.checks.fetch_add(1, Ordering::Relaxed);
        let hash = self.hasher.hash(message_id);
        let seen = state.staged.has_marker(partition, hash)
            || state
                .writing
                .iter()
                .any(|w| w.staged.has_marker(partition, hash))
            || store.has_marker_hash(partition, hash);
        if seen {
            stats.hits.fetch_add(1, Ordering::Relaxed);
            state.done.push(origin.clone());
            return Ok(Verdict::Seen);
        }
        Ok(Verdict::New)
    }

    /// Folds an event into `view` and stages the result, in one step under the ledger's lock.
    /// The view this actor staged last, if no write has taken it yet, is let go by the ledger
    /// rather than copied: a view is copied only while a write under way still holds it.
    /// `Ok(false)` if the actor is fenced off (nothing is applied; its record is read again and
    /// applied by a new actor); `Err` if the fold failed,
    /// which leaves the view and the ledger as they were.
    pub fn fold_and_stage<E>(
        &self,
        view: &mut Arc<Aggregate>,
        incarnation: u64,
        fold: impl FnOnce(&mut Aggregate) -> Result<Applied, E>,
    ) -> Result<bool, E> {
        let mut guard = self.lock();
        if incarnation <= guard.fence {
            return Ok(false);
        }
        let state = &mut *guard;
        // The key's slot, looked up once: it gets the folded view, or its own back on failure.
        let mut slot = state.staged.views.get_mut(&view.key);
        let held = match slot.as_deref_mut() {
            Some((staged, _)) if Arc::ptr_eq(staged, view) => {
                *staged = self.placeholder.clone();
                true
            }
            _ => false,
        };
        // A panic must not leave the placeholder staged for the next write: the slot gets the
        // view back before the panic goes on (`Aggregate::apply` reads every input before it
        // changes anything, so the view is whole).
        let folded = std::panic::catch_unwind(AssertUnwindSafe(|| fold(Arc::make_mut(view))));
        if held && !matches!(folded, Ok(Ok(_))) {
            // The fold changed nothing: the slot gets back the view it held.
            if let Some((staged, _)) = slot.as_deref_mut() {
                *staged = view.clone();
            }
        }
        let applied = match folded {
            Ok(Ok(applied)) => applied,
            Ok(Err(e)) => return Err(e),
            Err(panic) => {
                drop(guard);
                std::panic::resume_unwind(panic)
            }
        };
        let hash = self.hasher.hash(&applied.message_id);
        match slot {
            Some((staged, markers)) => {
                *staged = view.clone();
                markers.push(applied.message_id);
            }
            None => {
                let key = view.key.clone();
                state
                    .staged
                    .views
                    .insert(key, (view.clone(), vec![applied.message_id]));
            }
        }
        state
            .staged
            .markers
            .entry(applied.partition)
            .or_default()
            .insert(hash);
        state.done.push(applied.origin);
        state.applied.push(applied.source);
        self.topology.dedup.pending.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// The staged (or being written) view of `key`: the latest.
    pub fn view(&self, key: &str) -> Option<Arc<Aggregate>> {
        self.lock().latest_view(key)
    }

    /// Runs `reads` (loads) in a turn of their own between the store's batches (see
    /// [`Store::reading`]); at once when the store is released.
    pub fn reading<R>(&self, reads: impl FnOnce() -> R) -> R {
        let store = self.lock().store.clone();
        match store {
            Some(store) => store.reading(reads),
            None => reads(),
        }
    }

    /// The latest view of `key`: staged, being written, or else stored. The ledger is asked
    /// first, and a write leaves it only once the store has it, so nothing newer is missed.
    pub fn load(&self, key: &str) -> Result<Option<Arc<Aggregate>>, StoreError> {
        let store = {
            let state = self.lock();
            if let Some(view) = state.latest_view(key) {
                return Ok(Some(view));
            }
            state.store.clone().ok_or(StoreError::Released)?
        };
        Ok(store.load(key)?.map(Arc::new))
    }

    /// Number of writes under way.
    pub(crate) fn writes_in_flight(&self) -> usize {
        self.lock().writing.len()
    }

    /// Whether write `seq` is still under way (not written, put back or forgotten).
    pub(crate) fn is_in_flight(&self, seq: u64) -> bool {
        self.lock().writing.iter().any(|w| w.seq == seq)
    }

    /// Takes what is staged as a new write, after those under way; `None` if nothing is staged.
    pub(crate) fn take(&self) -> Option<Taken> {
        let mut state = self.lock();
        if state.staged.is_empty() && state.done.is_empty() {
            return None;
        }
        let staged = Arc::new(std::mem::take(&mut state.staged));
        let earlier = state.writing.iter().map(|w| w.staged.clone()).collect();
        let seq = state.next_seq;
        state.next_seq += 1;
        let writing = Writing {
            seq,
            staged: staged.clone(),
            done: std::mem::take(&mut state.done),
            applied: std::mem::take(&mut state.applied),
        };
        state.writing.push_back(writing);
        self.topology.dedup.pending.store(0, Ordering::Relaxed);
        Some(Taken {
            seq,
            staged,
            earlier,
        })
    }

    /// Resets so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Write `seq`, the oldest under way, is in the store: it no longer answers checks and
    /// loads. Returns the records it completes and the sources of the events it applied; `None`
    /// if it is not the oldest write under way (a reset forgot it, or it was put back).
    pub(crate) fn written(&self, seq: u64) -> Option<(Vec<Origin>, Vec<usize>)> {
        let w = {
            let mut state = self.lock();
            if state.writing.front()?.seq != seq {
                return None;
            }
            state.writing.pop_front()?
        };
        // Its views and markers are freed here, after the lock: a large write's take
        // milliseconds, which every check, fold and load would wait for.
        Some((w.done, w.applied))
    }

    /// Write `seq` failed: its work, and that of every write taken after it (which holds newer
    /// views of the same keys and must not land before it), goes back in front of what was
    /// staged since, to be written again. Nothing happens if `seq` is no longer under way.
    pub(crate) fn put_back(&self, seq: u64) {
        let mut state = self.lock();
        let Some(at) = state.writing.iter().position(|w| w.seq == seq) else {
            return;
        };
        let failed: Vec<Writing> = state.writing.drain(at..).collect();
        // Newest first, each in front of what is staged: newer views of a key win.
        for w in failed.into_iter().rev() {
            // Copied only if an encoder still holds it (a later write taken back mid-encoding,
            // or a later write's encoder reading the markers it carries from this one); a write
            // that failed in its own stages has let go of it.
            let older = Arc::unwrap_or_clone(w.staged);
            let pending = w.applied.len() as u64;
            state.staged.put_back(older);
            let mut done = w.done;
            done.append(&mut state.done);
            state.done = done;
            let mut applied = w.applied;
            applied.append(&mut state.applied);
            state.applied = applied;
            self.topology
                .dedup
                .pending
                .fetch_add(pending, Ordering::Relaxed);
        }
    }

    /// Forgets what is staged and being written (the dedup actor restarted and lost it) and
    /// fences off every entity actor up to `fence`, in one step: an actor started later finds
    /// nothing here and loads its view from the store. Runs on the actors' thread, so that no
    /// actor is midway through an event meanwhile.
    pub fn reset(&self, fence: impl FnOnce() -> u64) {
        let mut state = self.lock();
        *state = State {
            fence: fence(),
            store: state.store.take(),
            next_seq: state.next_seq,
            ..State::default()
        };
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.topology.dedup.pending.store(0, Ordering::Relaxed);
    }

    /// The store was handed back: checks fail from now on.
    pub(crate) fn release(&self) {
        self.lock().store = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::TopicPartition;

    fn ledger() -> (Ledger, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        (Ledger::new(store, Arc::default()), dir)
    }

    fn origin(offset: i64) -> Origin {
        Origin {
            tp: TopicPartition::new("t", 0),
            offset,
        }
    }

    /// Stages `view` as it is, as applying event `id` by actor `incarnation`; `false` if fenced.
    fn stage_as(ledger: &Ledger, id: &str, view: Aggregate, incarnation: u64) -> bool {
        let staged = ledger.fold_and_stage(&mut Arc::new(view), incarnation, |_| {
            Ok::<_, String>(applied(id))
        });
        staged.expect("the fold cannot fail")
    }

    fn stage(ledger: &Ledger, id: &str, incarnation: u64) -> bool {
        stage_as(ledger, id, Aggregate::new("k", 0), incarnation)
    }

    fn stage_view(ledger: &Ledger, id: &str, key: &str, events: u64) -> bool {
        let mut view = Aggregate::new(key, 0);
        view.events_applied = events;
        stage_as(ledger, id, view, 1)
    }

    #[test]
    fn a_message_id_the_store_holds_is_seen_in_its_partition_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let mut batch = crate::store::WriteBatch::default();
        batch.add_marker(3, "stored");
        store.write(batch).expect("written");
        let l = Ledger::new(store, Arc::default());
        assert_eq!(
            l.check(3, "stored", &origin(0), 1).ok(),
            Some(Verdict::Seen)
        );
        assert_eq!(l.check(2, "stored", &origin(1), 1).ok(), Some(Verdict::New));
        assert_eq!(l.check(3, "other", &origin(2), 1).ok(), Some(Verdict::New));
    }

    #[test]
    fn a_message_id_is_seen_while_staged_and_while_being_written() {
        let (l, _dir) = ledger();
        assert_eq!(l.check(0, "m1", &origin(0), 1).ok(), Some(Verdict::New));
        assert!(stage(&l, "m1", 1));
        assert_eq!(l.check(0, "m1", &origin(1), 1).ok(), Some(Verdict::Seen));
        assert_eq!(l.check(1, "m1", &origin(1), 1).ok(), Some(Verdict::New));
        let taken = l.take().expect("something is staged");
        assert!(l.take().is_none(), "nothing staged since");
        assert_eq!(l.writes_in_flight(), 1);
        assert_eq!(l.check(0, "m1", &origin(2), 1).ok(), Some(Verdict::Seen));
        assert!(l.view("k").is_some());
        l.put_back(taken.seq);
        assert!(!l.is_in_flight(taken.seq));
        let again = l.take().expect("put back");
        assert!(again.staged.has_marker(0, l.hasher.hash("m1")));
        let (done, applied) = l.written(again.seq).expect("the oldest write");
        assert_eq!(
            done.iter().map(|o| o.offset).collect::<Vec<_>>(),
            vec![0, 1, 2],
            "the failed write's records come first, then the duplicate found since"
        );
        assert_eq!(applied, vec![0]);
        assert_eq!(l.writes_in_flight(), 0);
        assert!(
            l.view("k").is_none(),
            "written views are read from the store"
        );
    }

    #[test]
    fn writes_in_flight_end_in_order_and_a_failed_one_takes_the_later_ones_back() {
        let (l, _dir) = ledger();
        assert!(stage_view(&l, "m1", "a", 1));
        assert!(stage_view(&l, "m2", "b", 1));
        let first = l.take().expect("staged");
        assert!(stage_view(&l, "m3", "a", 2));
        let second = l.take().expect("staged");
        assert!(stage_view(&l, "m4", "a", 3));
        assert_eq!(l.writes_in_flight(), 2);
        for id in ["m1", "m2", "m3", "m4"] {
            assert_eq!(
                l.check(0, id, &origin(9), 1).ok(),
                Some(Verdict::Seen),
                "{id}"
            );
        }
        assert_eq!(l.view("a").map(|v| v.events_applied), Some(3));
        assert!(l.written(second.seq).is_none(), "not the oldest");
        l.put_back(first.seq);
        assert_eq!(l.writes_in_flight(), 0, "the later write went back too");
        assert!(l.written(second.seq).is_none());
        l.put_back(second.seq);
        let again = l.take().expect("put back");
        assert_eq!(
            again.staged.views["a"].0.events_applied, 3,
            "the newest view of a key wins"
        );
        assert_eq!(again.staged.views["a"].1, vec!["m1", "m3", "m4"]);
        assert_eq!(again.staged.views["b"].0.events_applied, 1);
        let (done, applied) = l.written(again.seq).expect("oldest");
        assert_eq!(
            (done.len(), applied.len()),
            (8, 4),
            "four applied, four duplicates found"
        );
    }

    fn applied(id: &str) -> Applied {
        Applied {
            partition: 0,
            message_id: id.into(),
            origin: origin(0),
            source: 0,
        }
    }

    fn bump(view: &mut Aggregate, id: &str) -> Result<Applied, String> {
        view.events_applied += 1;
        Ok(applied(id))
    }

    #[test]
    fn a_fold_changes_the_staged_view_in_place_and_copies_one_a_write_holds() {
        let (l, _dir) = ledger();
        let mut view = Arc::new(Aggregate::new("k", 0));
        assert_eq!(l.fold_and_stage(&mut view, 1, |v| bump(v, "m1")), Ok(true));
        let staged = Arc::as_ptr(&view);
        assert_eq!(l.fold_and_stage(&mut view, 1, |v| bump(v, "m2")), Ok(true));
        assert_eq!(Arc::as_ptr(&view), staged, "not copied: no write holds it");
        assert_eq!(l.view("k").map(|v| v.events_applied), Some(2));
        let taken = l.take().expect("staged");
        assert_eq!(taken.staged.views["k"].1, vec!["m1", "m2"]);
        assert_eq!(l.fold_and_stage(&mut view, 1, |v| bump(v, "m3")), Ok(true));
        assert_ne!(Arc::as_ptr(&view), staged, "copied: the write holds it");
        assert_eq!(
            taken.staged.views["k"].0.events_applied, 2,
            "the write's snapshot is unchanged"
        );
        assert_eq!(l.view("k").map(|v| v.events_applied), Some(3));
    }

    #[test]
    fn a_failed_panicking_or_fenced_fold_leaves_the_view_and_the_ledger_as_they_were() {
        let (l, _dir) = ledger();
        let mut view = Arc::new(Aggregate::new("k", 0));
        assert_eq!(l.fold_and_stage(&mut view, 2, |v| bump(v, "m1")), Ok(true));
        let failed = l.fold_and_stage(&mut view, 2, |_| Err::<Applied, _>("no".to_string()));
        assert_eq!(failed, Err("no".to_string()));
        let staged = l.view("k").expect("still staged");
        assert!(Arc::ptr_eq(&staged, &view), "the slot holds the view again");
        assert_eq!(staged.events_applied, 1);
        let panicked = std::panic::catch_unwind(AssertUnwindSafe(|| {
            l.fold_and_stage(&mut view, 2, |_| -> Result<Applied, String> {
                panic!("a bug")
            })
        }));
        assert!(panicked.is_err());
        let staged = l.view("k").expect("still staged");
        assert!(
            Arc::ptr_eq(&staged, &view),
            "a panicking fold leaves no placeholder staged"
        );
        l.reset(|| 2);
        let mut folded = false;
        let fenced = l.fold_and_stage(&mut view, 2, |v| {
            folded = true;
            bump(v, "m2")
        });
        assert_eq!(fenced, Ok(false));
        assert!(!folded, "a fenced-off actor applies nothing");
        assert_eq!(view.events_applied, 1);
    }

    #[test]
    fn a_reset_forgets_staged_work_and_fences_off_older_actors() {
        let (l, _dir) = ledger();
        assert!(stage(&l, "m1", 3));
        let taken = l.take().expect("staged");
        assert!(stage(&l, "m2", 4));
        l.reset(|| 3);
        assert_eq!(l.generation(), 1);
        l.put_back(taken.seq);
        assert!(
            l.take().is_none(),
            "a write taken before the reset is not put back"
        );
        assert!(l.written(taken.seq).is_none());
        assert!(l.view("k").is_none());
        assert_eq!(l.check(0, "m1", &origin(0), 3).ok(), Some(Verdict::Stale));
        assert!(!stage(&l, "m2", 3), "a fenced-off actor stages nothing");
        assert_eq!(l.check(0, "m1", &origin(0), 4).ok(), Some(Verdict::New));
        assert!(stage(&l, "m3", 4));
        let after = l.take().expect("staged after the reset");
        assert_ne!(after.seq, taken.seq, "sequence numbers are not reused");
        l.release();
        assert!(matches!(
            l.check(0, "m1", &origin(0), 4),
            Err(StoreError::Released)
        ));
    }
}
