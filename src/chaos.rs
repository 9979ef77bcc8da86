//! Chaos for demonstrations and tests: kills actors of every kind of the tree while events flow,
//! by stopping them or by a panic inside their handler. A dead entity's records are replayed by
//! its supervisors; a dead supervisor's partition is rewound to its lowest unfinished offset and
//! read again; a dead dedup actor or offset committer is restarted by its supervisor and has every
//! partition rewound. Dedup keeps all of it harmless.

use std::fmt;
use std::sync::atomic::Ordering;

use std::sync::Arc;

use actix::Addr;
use aggregator_actors::dedup_actor::DedupActor;
use aggregator_actors::entity_actor::EntityActor;
use aggregator_actors::kill::{Kill, INJECTED_PANIC_PREFIX};
use aggregator_actors::offset_committer::OffsetCommitter;
use aggregator_actors::partition_supervisor::PartitionSupervisor;
use aggregator_actors::topology::Topology;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::service::RunningService;

/// Kills of one kind of actor.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct KillsOf {
    /// Stopped, as a crash would.
    pub stopped: u64,
    /// Killed by a panic inside a handler.
    pub panicked: u64,
}

impl KillsOf {
    /// Both ways.
    pub fn total(&self) -> u64 {
        self.stopped + self.panicked
    }

    /// Whether the kind died both ways at least once.
    pub fn both_ways(&self) -> bool {
        self.stopped > 0 && self.panicked > 0
    }
}

/// Kills made so far, by kind of actor.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Kills {
    /// Entity actors.
    pub entity: KillsOf,
    /// Partition supervisors.
    pub supervisor: KillsOf,
    /// The dedup actor.
    pub dedup: KillsOf,
    /// The offset committer.
    pub committer: KillsOf,
}

impl Kills {
    /// All kills.
    pub fn total(&self) -> u64 {
        self.entity.total() + self.supervisor.total() + self.dedup.total() + self.committer.total()
    }
}

impl fmt::Display for Kills {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds = [
            ("entity actors", self.entity),
            ("partition supervisors", self.supervisor),
            ("dedup actor", self.dedup),
            ("offset committer", self.committer),
        ];
        for (i, (name, k)) in kinds.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{name} {} stopped, {} panicked", k.stopped, k.panicked)?;
        }
        Ok(())
    }
}

/// What a kill hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// An entity actor with events waiting.
    Entity,
    /// A partition supervisor with records in flight.
    Supervisor,
    /// The dedup actor.
    Dedup,
    /// The offset committer.
    Committer,
}

/// Deepest mailboxes a victim is picked from.
const VICTIMS: usize = 32;

/// In every this many strikes, one hits a partition supervisor.
const SUPERVISOR_EVERY: u64 = 10;

/// In every this many strikes, one hits the dedup actor or the offset committer (in turn): each
/// of those rewinds every partition, so they are the rarest.
const SINGLETON_EVERY: u64 = 40;

/// The chaos monkey.
pub struct Chaos {
    topology: Arc<Topology>,
    dedup: Addr<DedupActor>,
    committer: Addr<OffsetCommitter>,
    rng: SmallRng,
    strikes: u64,
    kills: Kills,
}

impl Chaos {
    /// A monkey over `service`'s actors, deterministic for `seed`.
    pub fn new(service: &RunningService, seed: u64) -> Self {
        Chaos {
            topology: service.topology.clone(),
            dedup: service.dedup.clone(),
            committer: service.committer.clone(),
            rng: SmallRng::seed_from_u64(seed),
            strikes: 0,
            kills: Kills::default(),
        }
    }

    /// One kill on the standing schedule: mostly entity actors, one in ten a partition
    /// supervisor, one in forty the dedup actor or the offset committer. Returns whether it
    /// found a victim.
    pub fn strike(&mut self) -> bool {
        self.strikes += 1;
        let target = if self.strikes.is_multiple_of(SINGLETON_EVERY) {
            if (self.strikes / SINGLETON_EVERY) % 2 == 1 {
                Target::Dedup
            } else {
                Target::Committer
            }
        } else if self.strikes.is_multiple_of(SUPERVISOR_EVERY) {
            Target::Supervisor
        } else {
            Target::Entity
        };
        self.kill(target)
    }

    /// Kills one actor of `target`'s kind, by stopping it and by a panic in turn; returns whether
    /// there was one to kill (entities and supervisors must have work in flight).
    pub fn kill(&mut self, target: Target) -> bool {
        let kill = Kill {
            panic: self.of(target).total() % 2 == 1,
        };
        let sent = match target {
            Target::Entity => self.busy_entity().map(|addr| addr.do_send(kill)).is_some(),
            Target::Supervisor => self
                .busy_supervisor()
                .map(|addr| addr.do_send(kill))
                .is_some(),
            Target::Dedup => {
                self.dedup.do_send(kill);
                true
            }
            Target::Committer => {
                self.committer.do_send(kill);
                true
            }
        };
        if !sent {
            return false;
        }
        let of = self.of(target);
        if kill.panic {
            of.panicked += 1;
        } else {
            of.stopped += 1;
        }
        true
    }

    fn of(&mut self, target: Target) -> &mut KillsOf {
        match target {
            Target::Entity => &mut self.kills.entity,
            Target::Supervisor => &mut self.kills.supervisor,
            Target::Dedup => &mut self.kills.dedup,
            Target::Committer => &mut self.kills.committer,
        }
    }

    fn busy_entity(&mut self) -> Option<Addr<EntityActor>> {
        let busy = self.topology.entities.busiest(VICTIMS);
        if busy.is_empty() {
            return None;
        }
        let (key, _) = &busy[self.rng.random_range(0..busy.len())];
        self.topology.entities.get(key).map(|h| h.addr.clone())
    }

    fn busy_supervisor(&mut self) -> Option<Addr<PartitionSupervisor>> {
        let busy: Vec<_> = self
            .topology
            .partitions
            .iter()
            .filter(|p| p.in_flight.load(Ordering::Relaxed) > 0)
            .map(|p| p.tp.clone())
            .collect();
        if busy.is_empty() {
            return None;
        }
        let tp = &busy[self.rng.random_range(0..busy.len())];
        self.topology.supervisors.get(tp).map(|a| a.clone())
    }

    /// Kills so far.
    pub fn kills(&self) -> Kills {
        self.kills
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
