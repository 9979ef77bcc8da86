//! Chaos for demonstrations and tests: kills busy entity actors and partition supervisors, by
//! stopping them or by a panic inside their handler, while events flow. A dead entity's records
//! are replayed by its supervisors; a dead supervisor's partition is rewound to its lowest
//! unfinished offset and read again; dedup keeps both harmless.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aggregator_actors::entity_actor::Kill;
use aggregator_actors::injected_panic::INJECTED_PANIC_PREFIX;
use aggregator_actors::partition_supervisor::KillSupervisor;
use aggregator_actors::topology::Topology;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Kills made so far, by kind.
#[derive(Debug, Default)]
pub struct KillCounts {
    /// Entity actors stopped.
    pub entity_stopped: AtomicU64,
    /// Entity actors killed by a panic in their handler.
    pub entity_panicked: AtomicU64,
    /// Partition supervisors stopped.
    pub supervisor_stopped: AtomicU64,
    /// Partition supervisors killed by a panic in their handler.
    pub supervisor_panicked: AtomicU64,
}

/// A snapshot of [`KillCounts`].
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Kills {
    /// Entity actors stopped.
    pub entity_stopped: u64,
    /// Entity actors killed by a panic.
    pub entity_panicked: u64,
    /// Partition supervisors stopped.
    pub supervisor_stopped: u64,
    /// Partition supervisors killed by a panic.
    pub supervisor_panicked: u64,
}

impl Kills {
    /// All kills.
    pub fn total(&self) -> u64 {
        self.entity_stopped
            + self.entity_panicked
            + self.supervisor_stopped
            + self.supervisor_panicked
    }
}

/// Deepest mailboxes a victim is picked from.
const VICTIMS: usize = 32;

/// The chaos monkey.
pub struct Chaos {
    topology: Arc<Topology>,
    rng: SmallRng,
    counts: KillCounts,
}

impl Chaos {
    /// A monkey over `topology`'s actors, deterministic for `seed`.
    pub fn new(topology: Arc<Topology>, seed: u64) -> Self {
        Chaos {
            topology,
            rng: SmallRng::seed_from_u64(seed),
            counts: KillCounts::default(),
        }
    }

    /// Kills one entity actor that has events waiting, if any has; returns whether it did.
    pub fn kill_busy_entity(&mut self) -> bool {
        let busy = self.topology.entities.busiest(VICTIMS);
        if busy.is_empty() {
            return false;
        }
        let (key, _) = &busy[self.rng.random_range(0..busy.len())];
        let Some(handle) = self.topology.entities.get(key) else {
            return false;
        };
        let panic = self.rng.random_bool(0.5);
        handle.addr.do_send(Kill { panic });
        let counter = if panic {
            &self.counts.entity_panicked
        } else {
            &self.counts.entity_stopped
        };
        counter.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Kills one partition supervisor that has records in flight, if any has.
    pub fn kill_busy_supervisor(&mut self) -> bool {
        let busy: Vec<_> = self
            .topology
            .partitions
            .iter()
            .filter(|p| p.in_flight.load(Ordering::Relaxed) > 0)
            .map(|p| p.tp.clone())
            .collect();
        if busy.is_empty() {
            return false;
        }
        let tp = &busy[self.rng.random_range(0..busy.len())];
        let Some(addr) = self.topology.supervisors.get(tp).map(|a| a.clone()) else {
            return false;
        };
        let panic = self.rng.random_bool(0.5);
        addr.do_send(KillSupervisor { panic });
        let counter = if panic {
            &self.counts.supervisor_panicked
        } else {
            &self.counts.supervisor_stopped
        };
        counter.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Kills so far.
    pub fn kills(&self) -> Kills {
        let c = &self.counts;
        Kills {
            entity_stopped: c.entity_stopped.load(Ordering::Relaxed),
            entity_panicked: c.entity_panicked.load(Ordering::Relaxed),
            supervisor_stopped: c.supervisor_stopped.load(Ordering::Relaxed),
            supervisor_panicked: c.supervisor_panicked.load(Ordering::Relaxed),
        }
    }
}

/// Silences the default panic message for the panics chaos injects on purpose; other panics
/// still print as usual.
pub fn quiet_injected_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let injected = info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|m| m.starts_with(INJECTED_PANIC_PREFIX));
        if !injected {
            default(info);
        }
    }));
}
