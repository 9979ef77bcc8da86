//! The live entity actors by key, shared by the partition supervisors that route to them and by
//! the HTTP API that reports their mailboxes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix::Addr;
use dashmap::DashMap;

use crate::entity_actor::{EntityActor, Passivate};

/// A live entity actor, shared: routing an event to it copies no address (an actix address
/// allocates twice when cloned).
pub type EntityHandle = Arc<LiveEntity>;

/// A live entity actor and its mailbox depth (events sent and not yet fully applied).
pub struct LiveEntity {
    /// The actor's address.
    pub addr: Addr<EntityActor>,
    /// Events sent to it whose fold has not finished (applied and staged, dropped as a
    /// duplicate, or dead-lettered).
    pub mailbox: Arc<AtomicUsize>,
    /// Distinguishes this actor from earlier ones of the same key.
    pub incarnation: u64,
    /// When it was last sent an event, on the registry's clock.
    pub last_sent: AtomicU64,
}

/// Live actors whose clocks the live bound's scan reads to place its cut-off: the sample places
/// it within a percent or two of the bound, where reading every actor's clocks would cost two
/// cache misses per actor once more.
const CUTOFF_SAMPLE: usize = 4096;

/// Entity actors by key.
#[derive(Default)]
pub struct EntityRegistry {
    actors: DashMap<String, EntityHandle, crate::KeyHasher>,
    incarnations: AtomicU64,
    /// Counts events sent, to order actors by their last one.
    clock: AtomicU64,
    /// Live actors at which the bound is next enforced.
    next_scan: AtomicUsize,
    /// Readings of `clock` taken by the idle sweeps, oldest first: an actor last sent an event
    /// before a reading taken `idle` ago has been idle that long.
    idle_marks: Mutex<VecDeque<(Instant, u64)>>,
}

impl EntityRegistry {
    /// The live actor of `key`, if any.
    pub fn get(&self, key: &str) -> Option<EntityHandle> {
        self.actors.get(key).map(|h| h.clone())
    }

    /// A number no other entity actor had.
    pub fn next_incarnation(&self) -> u64 {
        self.incarnations.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The highest incarnation handed out so far.
    pub fn last_incarnation(&self) -> u64 {
        self.incarnations.load(Ordering::Relaxed)
    }

    /// Forgets every actor and asks each to stop (the dedup actor lost what they staged); new
    /// events go to new actors, which load their views from the store.
    pub fn passivate_all(&self) {
        let handles: Vec<EntityHandle> = self.actors.iter().map(|h| h.clone()).collect();
        self.actors.clear();
        for h in handles {
            h.addr.do_send(Passivate);
        }
    }

    /// Forgets the actor of `key` and asks it to stop, so that the next event loads the stored
    /// view afresh (it was replaced from the changelog).
    pub fn passivate(&self, key: &str) {
        if let Some((_, h)) = self.actors.remove(key) {
            h.addr.do_send(Passivate);
        }
    }

    /// The registry's clock now, without counting an event: what a new actor is stamped with.
    pub fn clock(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }

    /// Counts an event sent to `handle`, for the least-recently-used order.
    pub fn touch(&self, handle: &EntityHandle) {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        handle.last_sent.store(now, Ordering::Relaxed);
    }

    /// Keeps the live actors near `bound` before one more starts: at the bound, passivates idle
    /// ones down to a tenth below it. Busy actors stay, so the scan is not repeated until a tenth
    /// of the bound more have started, whatever it freed: its cost per start stays constant.
    pub fn enforce_bound(&self, bound: usize) {
        let live = self.actors.len();
        if live < bound.max(self.next_scan.load(Ordering::Relaxed)) {
            return;
        }
        let slack = (bound / 10).max(1);
        self.shrink_to(bound.saturating_sub(slack));
        self.next_scan
            .store(self.actors.len() + slack, Ordering::Relaxed);
    }

    /// Passivates idle actors (nothing unfinished in their mailboxes), those sent an event least
    /// recently first, until at most `keep` are live or none is idle. Their views are staged or
    /// stored, so the next actor of a key loads them whole.
    fn shrink_to(&self, keep: usize) {
        let live = self.actors.len();
        let excess = live.saturating_sub(keep);
        if excess == 0 {
            return;
        }
        // The cut-off is estimated from the idle actors' clocks in a sample of the live ones
        // (the map's order has nothing to do with when actors were sent events), then one pass
        // removes those at or below it: no key is copied. Clock readings are unique, and nothing
        // else changes the registry's clocks or mailboxes meanwhile (all of that happens on
        // this thread).
        let sample = live.min(CUTOFF_SAMPLE);
        let mut clocks: Vec<u64> = self
            .actors
            .iter()
            .take(sample)
            .filter(|h| h.mailbox.load(Ordering::Relaxed) == 0)
            .map(|h| h.last_sent.load(Ordering::Relaxed))
            .collect();
        // The sample's share of the excess: all of it when the sample is every live actor.
        let n = excess
            .saturating_mul(sample)
            .div_ceil(live)
            .min(clocks.len());
        if n == 0 {
            return;
        }
        let (_, &mut cutoff, _) = clocks.select_nth_unstable(n - 1);
        self.passivate_idle_sent_before(cutoff.saturating_add(1));
    }

    /// Passivates the actors with nothing unfinished last sent an event before `clock`; returns
    /// how many.
    fn passivate_idle_sent_before(&self, clock: u64) -> usize {
        let before = self.actors.len();
        self.actors.retain(|_, h| {
            let stop = h.mailbox.load(Ordering::Relaxed) == 0
                && h.last_sent.load(Ordering::Relaxed) < clock;
            if stop {
                h.addr.do_send(Passivate);
            }
            !stop
        });
        before.saturating_sub(self.actors.len())
    }

    /// Passivates the actors sent no event for `idle` or longer, with nothing unfinished; called
    /// every `idle / 2` (one sweep for all actors, rather than a timer each), so an actor goes
    /// between `idle` and half as long again after its last event. Returns how many it stopped.
    pub fn sweep_idle(&self, now: Instant, idle: Duration) -> usize {
        let cutoff = {
            let mut marks = self
                .idle_marks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            marks.push_back((now, self.clock()));
            let mut cutoff = None;
            while let Some(&(at, reading)) = marks.front() {
                if now.saturating_duration_since(at) < idle {
                    break;
                }
                cutoff = Some(reading);
                marks.pop_front();
            }
            cutoff
        };
        cutoff.map_or(0, |cutoff| self.passivate_idle_sent_before(cutoff))
    }

    /// Registers the actor of `key`.
    pub fn insert(&self, key: String, handle: EntityHandle) {
        self.actors.insert(key, handle);
    }

    /// Forgets the actor of `key` if it is still `addr` (a newer one may have replaced it).
    pub fn remove(&self, key: &str, addr: &Addr<EntityActor>) {
        self.actors.remove_if(key, |_, h| h.addr == *addr);
    }

    /// Number of live entity actors.
    pub fn len(&self) -> usize {
        self.actors.len()
    }

    /// Whether no entity actor is alive.
    pub fn is_empty(&self) -> bool {
        self.actors.is_empty()
    }

    /// Total events waiting in all mailboxes.
    pub fn mailbox_total(&self) -> usize {
        self.actors
            .iter()
            .map(|h| h.mailbox.load(Ordering::Relaxed))
            .sum()
    }

    /// The `n` deepest mailboxes, deepest first, as (key, depth).
    pub fn busiest(&self, n: usize) -> Vec<(String, usize)> {
        let mut all: Vec<(String, usize)> = self
            .actors
            .iter()
            .map(|h| (h.key().clone(), h.mailbox.load(Ordering::Relaxed)))
            .filter(|(_, depth)| *depth > 0)
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    /// All live actors, for stopping them.
    pub fn handles(&self) -> Vec<EntityHandle> {
        self.actors.iter().map(|h| h.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handle with `depth` events unfinished, whose address leads to a closed mailbox (what it
    /// is sent is dropped).
    fn handle(depth: usize) -> EntityHandle {
        let (tx, _rx) = actix::dev::channel::channel::<EntityActor>(16);
        Arc::new(LiveEntity {
            addr: Addr::new(tx),
            mailbox: Arc::new(AtomicUsize::new(depth)),
            incarnation: 0,
            last_sent: AtomicU64::default(),
        })
    }

    #[test]
    fn the_idle_sweep_passivates_actors_sent_nothing_for_the_idle_time() {
        let registry = EntityRegistry::default();
        let idle = Duration::from_secs(30);
        let start = Instant::now();
        for (key, depth) in [("old", 0), ("busy", 1), ("recent", 0)] {
            let h = handle(depth);
            registry.touch(&h);
            registry.insert(key.into(), h);
        }
        assert_eq!(
            registry.sweep_idle(start, idle),
            0,
            "no reading is old enough yet"
        );
        registry.touch(&registry.get("recent").expect("registered"));
        assert_eq!(registry.sweep_idle(start + idle / 2, idle), 0);
        assert_eq!(registry.sweep_idle(start + idle, idle), 1);
        let mut live: Vec<String> = registry.actors.iter().map(|h| h.key().clone()).collect();
        live.sort();
        assert_eq!(
            live,
            ["busy", "recent"],
            "old was sent nothing since the first sweep, busy has work pending"
        );
        assert_eq!(
            registry.sweep_idle(start + idle * 2, idle),
            1,
            "recent's turn"
        );
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn the_bound_passivates_the_idle_actors_sent_an_event_least_recently() {
        let registry = EntityRegistry::default();
        // Sent to in this order: "busy" first of all, yet it has an event unfinished.
        for (key, depth) in [
            ("busy", 1),
            ("a", 0),
            ("b", 0),
            ("c", 0),
            ("d", 0),
            ("e", 0),
        ] {
            let h = handle(depth);
            registry.touch(&h);
            registry.insert(key.into(), h);
        }
        registry.touch(&registry.get("a").expect("registered"));
        registry.shrink_to(3);
        let mut live: Vec<String> = registry.actors.iter().map(|h| h.key().clone()).collect();
        live.sort();
        assert_eq!(live, ["a", "busy", "e"], "b, c and d were idle longest");
        registry.shrink_to(0);
        let live: Vec<String> = registry.actors.iter().map(|h| h.key().clone()).collect();
        assert_eq!(
            live,
            ["busy"],
            "an actor with work pending never passivates"
        );
    }

    #[test]
    fn beyond_the_sample_the_bound_passivates_about_the_excess_least_recent_first() {
        let registry = EntityRegistry::default();
        let total = CUTOFF_SAMPLE * 5;
        for i in 0..total {
            let h = handle(0);
            registry.touch(&h);
            registry.insert(format!("k{i}"), h);
        }
        registry.shrink_to(total / 2);
        let live = registry.len();
        // The sample of 4,096 places the cut-off within about 1.5% of all actors (two standard
        // errors); 5% is more than six.
        let margin = total / 20;
        assert!(
            live.abs_diff(total / 2) < margin,
            "{live} live of {total}, asked to keep {}",
            total / 2
        );
        let oldest_live = registry
            .actors
            .iter()
            .map(|h| h.last_sent.load(Ordering::Relaxed))
            .min()
            .expect("some live");
        assert_eq!(
            oldest_live as usize,
            total - live,
            "exactly the least recently sent to were passivated"
        );
    }
}
