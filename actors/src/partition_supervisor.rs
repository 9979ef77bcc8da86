//! The partition supervisor: one per assigned topic-partition. It parses records in offset order,
//! registers them with the committer, routes events to entity actors (spawning them on demand) and
//! dead-letters what cannot be processed. It keeps every routed record until the committer has
//! passed it, so that when an entity actor dies with events in its mailbox, the next actor of that
//! key gets them again, in offset order, before anything newer. On revocation it drains and stops.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;

use crate::entity_actor::{Apply, EntityActor};
use crate::entity_registry::{EntityHandle, LiveEntity};
use crate::envelope::{parse, Event, Rejection};
use crate::kill::{injected_panic, Kill};
use crate::offset_committer::{DrainPartition, Register};
use crate::pipeline::Pipeline;
use crate::record::{Record, TopicPartition};
use crate::topology::{PartitionStats, Topology};
use crate::KeyHasher;

/// Records of this partition, in offset order, parsed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    /// The records.
    pub records: Vec<Parsed>,
}

/// A record and what parsing it gave.
pub struct Parsed {
    /// The record as read.
    pub record: Record,
    /// Its event, or why it is dead-lettered.
    pub event: Result<Event, Rejection>,
}

/// Parses `records` (of one partition, in offset order) on the calling thread, the consumer's,
/// so that the actors' thread only routes them, and hands them to their supervisor, counting
/// them in flight first so that flow control sees records still queued in its mailbox.
pub fn deliver(
    addr: &Addr<PartitionSupervisor>,
    stats: &PartitionStats,
    pipeline: &Pipeline,
    records: Vec<Record>,
) {
    stats
        .in_flight
        .fetch_add(records.len() as i64, Ordering::Relaxed);
    let records = records
        .into_iter()
        .map(|record| Parsed {
            event: parse(&record, &pipeline.rules, &pipeline.limits),
            record,
        })
        .collect();
    addr.do_send(Deliver { records });
}

/// The entity actor of `key` died: hand its unfinished records of this partition to the next one.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct ReplayEntity {
    /// The entity key.
    pub key: String,
}

/// Makes every partition supervisor die as a crash would, so that each partition is rewound to
/// its lowest unfinished offset and read again. The dedup actor and the offset committer call it
/// when they restart: what they lost is recovered by reading it again.
pub fn rewind_all_partitions(topology: &Topology) {
    for s in topology.supervisors.iter() {
        s.value().do_send(Kill { panic: false });
    }
}

/// Finish the in-flight work and stop; resolves with the offset to commit for the partition.
#[derive(Message)]
#[rtype(result = "Option<i64>")]
pub struct Drain;

/// A key's unfinished records, in offset order.
type KeyRecords = VecDeque<(i64, Arc<Record>)>;

/// Routed records not yet passed by the committer, by key, in offset order. The three
/// structures share one copy of each record's key.
#[derive(Default)]
struct Unfinished {
    order: VecDeque<(i64, Arc<str>)>,
    by_key: HashMap<Arc<str>, KeyRecords, KeyHasher>,
    /// Per key, the entity actor incarnation that has been sent every unfinished record.
    sent_to: HashMap<Arc<str>, u64, KeyHasher>,
}

impl Unfinished {
    fn push(&mut self, key: Arc<str>, record: Arc<Record>) {
        let offset = record.origin.offset;
        self.order.push_back((offset, key.clone()));
        self.by_key
            .entry(key)
            .or_default()
            .push_back((offset, record));
    }

    /// The records of `key` below `before` (all when `None`), in offset order, that no entity
    /// actor finished: what a new actor of the key must be sent again.
    fn to_replay(&self, key: &str, before: Option<i64>) -> Vec<Arc<Record>> {
        self.by_key
            .get(key)
            .into_iter()
            .flatten()
            .take_while(|(offset, _)| before.is_none_or(|b| *offset < b))
            .filter(|(_, record)| !record.finished.get())
            .map(|(_, record)| record.clone())
            .collect()
    }

    /// Forgets records below `committable`: their effects are durable. It stops at the first
    /// record no entity actor finished: a committable offset can run ahead of what this
    /// supervisor routed (one published before a rewind, or a completion of the same offset
    /// read before the rewind), and a record forgotten unfinished could not be handed to the
    /// next actor of its key if the one holding it died.
    fn prune(&mut self, committable: i64) {
        while let Some((offset, key)) = self.order.front() {
            if *offset >= committable {
                break;
            }
            let emptied = match self.by_key.get_mut(key) {
                Some(list) => {
                    if !list
                        .front()
                        .is_some_and(|(_, record)| record.finished.get())
                    {
                        break;
                    }
                    list.pop_front();
                    list.is_empty()
                }
                None => false,
            };
            let Some((_, key)) = self.order.pop_front() else {
                break;
            };
            if emptied {
                self.by_key.remove(&key);
                self.sent_to.remove(&key);
            }
        }
    }
}

/// How often a supervisor forgets the records the committer has passed when no records arrive.
const FORGET_COMMITTED_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// The partition supervisor.
pub struct PartitionSupervisor {
    tp: TopicPartition,
    pipeline: Arc<Pipeline>,
    stats: Arc<PartitionStats>,
    unfinished: Unfinished,
    died: bool,
    /// The ledger's generation when it started: after a reset it routes nothing more, it dies.
    generation: u64,
}

impl PartitionSupervisor {
    /// A supervisor of `tp`.
    pub fn new(tp: TopicPartition, pipeline: Arc<Pipeline>) -> Self {
        let stats = pipeline.topology.partition(&tp);
        let generation = pipeline.ledger.generation();
        PartitionSupervisor {
            tp,
            pipeline,
            stats,
            unfinished: Unfinished::default(),
            died: false,
            generation,
        }
    }

    /// Dies, to be rewound, if the dedup actor lost staged work since this supervisor started:
    /// records it holds as finished may not be durable, and routing anything newer of their keys
    /// would apply it ahead of them.
    fn outlived_reset(&mut self, ctx: &mut Context<Self>) -> bool {
        if self.pipeline.ledger.generation() == self.generation {
            return false;
        }
        self.died = true;
        ctx.stop();
        true
    }

    /// Forgets the records the committer has passed, and shows how many are still held.
    fn forget_committed(&mut self) {
        self.unfinished
            .prune(self.stats.committable.load(Ordering::Relaxed));
        self.show_held();
    }

    /// Shows in `/topology` how many records the supervisor holds.
    fn show_held(&self) {
        self.stats
            .held
            .store(self.unfinished.order.len() as i64, Ordering::Relaxed);
    }

    /// The live actor of `key`, started if there is none.
    fn entity(&self, key: &str) -> EntityHandle {
        let p = &self.pipeline;
        let registry = &p.topology.entities;
        match registry.get(key) {
            Some(h) if h.addr.connected() => h,
            _ => {
                // Before the new actor is registered, which has been sent nothing yet.
                registry.enforce_bound(p.max_live_entities);
                let mailbox = Arc::new(AtomicUsize::new(0));
                let incarnation = registry.next_incarnation();
                let actor = EntityActor::new(
                    key.to_string(),
                    self.tp.partition,
                    incarnation,
                    p.clone(),
                    mailbox.clone(),
                );
                let handle = Arc::new(LiveEntity {
                    addr: actor.start(),
                    mailbox,
                    incarnation,
                    // Not idle since before it started, were it sent nothing (a replay of none).
                    last_sent: AtomicU64::new(registry.clock()),
                });
                registry.insert(key.to_string(), handle.clone());
                handle
            }
        }
    }

    fn send(&self, handle: &EntityHandle, event: Event, record: Arc<Record>) {
        self.pipeline.topology.entities.touch(handle);
        handle.mailbox.fetch_add(1, Ordering::Relaxed);
        handle.addr.do_send(Apply { event, record });
    }

    /// Makes sure the live actor of `key` has been sent every unfinished record of the key
    /// before `before` (all of them when `None`): a new actor is sent again those an earlier
    /// actor was sent and did not finish (it died with them in its mailbox).
    fn catch_up(&mut self, key: &Arc<str>, before: Option<i64>) -> EntityHandle {
        let handle = self.entity(key);
        let current = self.unfinished.sent_to.get(key).copied();
        if current != Some(handle.incarnation) {
            if current.is_some() {
                let p = self.pipeline.clone();
                for record in self.unfinished.to_replay(key, before) {
                    // It parsed before, so it parses again the same way.
                    if let Ok(event) = parse(&record, &p.rules, &p.limits) {
                        p.metrics.replayed.inc();
                        self.send(&handle, event, record);
                    }
                }
            }
            self.unfinished
                .sent_to
                .insert(key.clone(), handle.incarnation);
        }
        handle
    }

    fn route(&mut self, event: Event, record: Record) {
        let record = Arc::new(record);
        let key: Arc<str> = Arc::from(event.key.as_str());
        let offset = record.origin.offset;
        self.unfinished.push(key.clone(), record.clone());
        let handle = self.catch_up(&key, Some(offset));
        self.send(&handle, event, record);
    }
}

impl Actor for PartitionSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.pipeline
            .topology
            .supervisors
            .insert(self.tp.clone(), ctx.address());
        // Records are otherwise forgotten as the next ones arrive: after the last of a burst, the
        // supervisors kept tens of thousands of them (38,759 over 28 partitions after a
        // benchmark) until traffic resumed.
        ctx.run_interval(FORGET_COMMITTED_EVERY, |supervisor, _| {
            supervisor.forget_committed()
        });
        tracing::info!(tp = %self.tp, "partition supervisor started");
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        let topology = &self.pipeline.topology;
        let me = ctx.address();
        topology
            .supervisors
            .remove_if(&self.tp, |_, current| *current == me);
        if self.died {
            tracing::warn!(tp = %self.tp, "partition supervisor died; the partition will be rewound");
            if let Ok(mut dead) = topology.dead_partitions.lock() {
                dead.push(self.tp.clone());
            }
            return;
        }
        // A re-assignment may already have registered fresh figures under the same partition.
        let stats = &self.stats;
        topology
            .partitions
            .remove_if(&self.tp, |_, current| Arc::ptr_eq(current, stats));
        tracing::info!(tp = %self.tp, "partition supervisor stopped");
    }
}

impl Handler<Deliver> for PartitionSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        if self.outlived_reset(ctx) {
            return;
        }
        let Some(last) = msg.records.last() else {
            return;
        };
        self.stats
            .position
            .store(last.record.origin.offset + 1, Ordering::Relaxed);
        self.forget_committed();
        let p = self.pipeline.clone();
        p.committer.do_send(Register {
            tp: self.tp.clone(),
            delivered_ms: chrono::Utc::now().timestamp_millis(),
            offsets: msg
                .records
                .iter()
                .map(|p| (p.record.origin.offset, p.record.timestamp_ms.unwrap_or(0)))
                .collect(),
        });
        let source = p.rules.source_for_topic(&self.tp.topic);
        for Parsed { record, event } in msg.records {
            if let Some(s) = source {
                p.metrics.source(s).consumed.inc();
            }
            match event {
                Ok(event) => self.route(event, record),
                Err(rejection) => {
                    let name = source.map_or_else(
                        || self.tp.topic.to_string(),
                        |s| p.rules.source(s).name.clone(),
                    );
                    p.dead_letters.send(record, &name, &rejection);
                }
            }
        }
        self.show_held();
    }
}

impl Handler<ReplayEntity> for PartitionSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ReplayEntity, ctx: &mut Self::Context) {
        if self.outlived_reset(ctx) {
            return;
        }
        self.forget_committed();
        if let Some((key, _)) = self.unfinished.by_key.get_key_value(msg.key.as_str()) {
            let key = key.clone();
            self.catch_up(&key, None);
        }
    }
}

/// Its mailbox and unfinished records are lost; the consumer rewinds the partition to the lowest
/// unfinished offset and starts a new supervisor.
impl Handler<Kill> for PartitionSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Kill, ctx: &mut Self::Context) {
        injected_panic(msg, || format!("the partition supervisor of {}", self.tp));
        self.died = true;
        ctx.stop();
    }
}

impl Handler<Drain> for PartitionSupervisor {
    type Result = ResponseActFuture<Self, Option<i64>>;

    fn handle(&mut self, _: Drain, _: &mut Self::Context) -> Self::Result {
        // Replays may still be needed while the partition drains: stay registered until done.
        let drain = self.pipeline.committer.send(DrainPartition {
            tp: self.tp.clone(),
        });
        Box::pin(drain.into_actor(self).map(|res, act, ctx| {
            let offset = res.ok().flatten();
            tracing::info!(tp = %act.tp, ?offset, "partition drained");
            ctx.stop();
            offset
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Origin;

    fn record(offset: i64) -> Arc<Record> {
        Arc::new(Record {
            origin: Origin {
                tp: TopicPartition::new("t", 0),
                offset,
            },
            key: None,
            value: None,
            headers: vec![],
            timestamp_ms: None,
            finished: Default::default(),
        })
    }

    #[test]
    fn unfinished_records_are_kept_per_key_in_order_until_the_committer_passes_them() {
        let mut u = Unfinished::default();
        for (offset, key) in [(0, "a"), (1, "b"), (2, "a"), (3, "a")] {
            u.push(key.into(), record(offset));
        }
        u.sent_to.insert("b".into(), 1);
        let offsets = |u: &Unfinished, k: &str| -> Vec<i64> {
            u.by_key
                .get(k)
                .into_iter()
                .flatten()
                .map(|(o, _)| *o)
                .collect()
        };
        assert_eq!(offsets(&u, "a"), [0, 2, 3]);
        for list in u.by_key.values() {
            for (_, r) in list {
                r.finished.set();
            }
        }
        u.prune(2);
        assert_eq!(offsets(&u, "a"), [2, 3]);
        assert!(!u.by_key.contains_key("b") && !u.sent_to.contains_key("b"));
        u.prune(10);
        assert!(u.by_key.is_empty() && u.order.is_empty());
    }

    #[test]
    fn records_no_actor_finished_are_kept_below_a_committable_that_ran_ahead() {
        // Read again after a rewind from 0, while the committable offset published for the
        // records of the supervisor before it still says 3.
        let mut u = Unfinished::default();
        for (offset, key) in [(0, "a"), (1, "b"), (2, "a")] {
            u.push(key.into(), record(offset));
        }
        u.by_key["a"][0].1.finished.set();
        u.prune(3);
        let left: Vec<i64> = u.order.iter().map(|(o, _)| *o).collect();
        assert_eq!(left, [1, 2], "1 is unfinished: it and what follows stay");
        let replay: Vec<i64> = u
            .to_replay("b", None)
            .iter()
            .map(|r| r.origin.offset)
            .collect();
        assert_eq!(replay, [1], "the next actor of b is handed it again");
        u.by_key["b"][0].1.finished.set();
        u.prune(3);
        assert_eq!(u.order.iter().map(|(o, _)| *o).collect::<Vec<_>>(), [2]);
        u.by_key["a"][0].1.finished.set();
        u.prune(3);
        assert!(u.order.is_empty() && u.by_key.is_empty());
    }

    #[test]
    fn only_records_no_actor_finished_are_replayed_in_order() {
        let mut u = Unfinished::default();
        for offset in 0..5 {
            u.push("a".into(), record(offset));
        }
        u.push("b".into(), record(5));
        let offsets = |records: Vec<Arc<Record>>| -> Vec<i64> {
            records.iter().map(|r| r.origin.offset).collect()
        };
        assert_eq!(offsets(u.to_replay("a", None)), [0, 1, 2, 3, 4]);
        // The actor that died finished the first two; the third and fourth were in its mailbox.
        for (_, r) in u.by_key["a"].iter().take(2) {
            r.finished.set();
        }
        assert_eq!(offsets(u.to_replay("a", None)), [2, 3, 4]);
        assert_eq!(
            offsets(u.to_replay("a", Some(4))),
            [2, 3],
            "the record being routed is sent next"
        );
        assert!(u.to_replay("c", None).is_empty());
    }
}
