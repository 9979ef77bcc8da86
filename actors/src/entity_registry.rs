//! The live entity actors by key, shared by the partition supervisors that route to them and by
//! the HTTP API that reports their mailboxes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use actix::Addr;
use dashmap::DashMap;

use crate::entity_actor::{EntityActor, Passivate};

/// A live entity actor and its mailbox depth (events sent and not yet applied).
#[derive(Clone)]
pub struct EntityHandle {
    /// The actor's address.
    pub addr: Addr<EntityActor>,
    /// Events waiting in its mailbox.
    pub mailbox: Arc<AtomicUsize>,
    /// Distinguishes this actor from earlier ones of the same key.
    pub incarnation: u64,
}

/// Entity actors by key.
#[derive(Default)]
pub struct EntityRegistry {
    actors: DashMap<String, EntityHandle>,
    incarnations: AtomicU64,
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
