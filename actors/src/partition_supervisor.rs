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

/// A key's unfinished records, in offset order, and the entity actor incarnation that has been
/// sent every one of them.
#[derive(Default)]
struct KeyRecords {
    records: VecDeque<(i64, Arc<Record>)>,
    sent_to: Option<u64>,
}

impl KeyRecords {
    /// The records below `before` (all when `None`), in offset order, that no entity actor
    /// finished: what a new actor of the key must be sent again.
    fn to_replay(&self, before: Option<i64>) -> Vec<Arc<Record>> {
        self.records
            .iter()
            .take_while(|(offset, _)| before.is_none_or(|b| *offset < b))
            .filter(|(_, record)| !record.finished.get())
            .map(|(_, record)| record.clone())
            .collect()
    }

    /// Notes that `incarnation` has been sent every record below `before`, and returns those it
    /// must be sent again first: none when it is the actor they were sent to, or the key's first.
    fn hand_to(&mut self, incarnation: u64, before: Option<i64>) -> Vec<Arc<Record>> {
        match self.sent_to.replace(incarnation) {
            Some(earlier) if earlier != incarnation => self.to_replay(before),
            _ => Vec::new(),
        }
    }
}

/// Routed records not yet passed by the committer, by key, in offset order. Both structures
/// share one copy of each record's key, and a key is looked up once to route a record to it.
#[derive(Default)]
struct Unfinished {
    order: VecDeque<(i64, Arc<str>)>,
    by_key: HashMap<Arc<str>, KeyRecords, KeyHasher>,
}

impl Unfinished {
    /// Holds `record` of `key` until the committer passes it; returns the key's records.
    fn push(&mut self, key: Arc<str>, record: Arc<Record>) -> &mut KeyRecords {
        let offset = record.origin.offset;
        self.order.push_back((offset, key.clone()));
        let held = self.by_key.entry(key).or_default();
        held.records.push_back((offset, record));
        held
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
                Some(held) => {
                    if !held
                        .records
                        .front()
                        .is_some_and(|(_, record)| record.finished.get())
                    {
                        break;
                    }
                    held.records.pop_front();
                    held.records.is_empty()
                }
                None => false,
            };
            let Some((_, key)) = self.order.pop_front() else {
                break;
            };
            if emptied {
                self.by_key.remove(&key);
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

    /// Sends `handle` again, in offset order, the records an earlier actor of its key was sent
    /// and did not finish (it died with them in its mailbox).
    fn resend(&self, handle: &EntityHandle, records: Vec<Arc<Record>>) {
        let p = &self.pipeline;
        for record in records {
            // It parsed before, so it parses again the same way.
            if let Ok(event) = parse(&record, &p.rules, &p.limits) {
                p.metrics.replayed.inc();
                self.send(handle, event, record);
            }
        }
    }

    fn route(&mut self, event: Event, record: Record) {
        let record = Arc::new(record);
        let key: Arc<str> = Arc::from(event.key.as_str());
        let offset = record.origin.offset;
        let handle = self.entity(&key);
        // A new actor of the key is sent what an earlier one left unfinished before this record.
        let replay = self
            .unfinished
            .push(key, record.clone())
            .hand_to(handle.incarnation, Some(offset));
        self.resend(&handle, replay);
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
        if !self.unfinished.by_key.contains_key(msg.key.as_str()) {
            return;
        }
        let handle = self.entity(&msg.key);
        let replay = match self.unfinished.by_key.get_mut(msg.key.as_str()) {
            Some(held) => held.hand_to(handle.incarnation, None),
            None => Vec::new(),
        };
        self.resend(&handle, replay);
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
        u.by_key.get_mut("b").expect("b is held").sent_to = Some(1);
        let offsets = |u: &Unfinished, k: &str| -> Vec<i64> {
            u.by_key
                .get(k)
                .into_iter()
                .flat_map(|held| held.records.iter())
                .map(|(o, _)| *o)
                .collect()
        };
        assert_eq!(offsets(&u, "a"), [0, 2, 3]);
        for held in u.by_key.values() {
            for (_, r) in &held.records {
                r.finished.set();
            }
        }
        u.prune(2);
        assert_eq!(offsets(&u, "a"), [2, 3]);
        assert!(!u.by_key.contains_key("b"), "b is forgotten with its actor");
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
        u.by_key["a"].records[0].1.finished.set();
        u.prune(3);
        let left: Vec<i64> = u.order.iter().map(|(o, _)| *o).collect();
        assert_eq!(left, [1, 2], "1 is unfinished: it and what follows stay");
        let replay: Vec<i64> = u.by_key["b"]
            .to_replay(None)
            .iter()
            .map(|r| r.origin.offset)
            .collect();
        assert_eq!(replay, [1], "the next actor of b is handed it again");
        u.by_key["b"].records[0].1.finished.set();
        u.prune(3);
        assert_eq!(u.order.iter().map(|(o, _)| *o).collect::<Vec<_>>(), [2]);
        u.by_key["a"].records[0].1.finished.set();
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
        assert_eq!(offsets(u.by_key["a"].to_replay(None)), [0, 1, 2, 3, 4]);
        // The actor that died finished the first two; the third and fourth were in its mailbox.
        for (_, r) in u.by_key["a"].records.iter().take(2) {
            r.finished.set();
        }
        assert_eq!(offsets(u.by_key["a"].to_replay(None)), [2, 3, 4]);
        assert_eq!(
            offsets(u.by_key["a"].to_replay(Some(4))),
            [2, 3],
            "the record being routed is sent next"
        );
    }

    #[test]
    fn a_new_actor_of_a_key_is_handed_once_what_the_one_before_left_unfinished() {
        let mut u = Unfinished::default();
        let offsets = |records: Vec<Arc<Record>>| -> Vec<i64> {
            records.iter().map(|r| r.origin.offset).collect()
        };
        // The key's first actor, and the same actor again: nothing to send twice.
        assert!(u.push("a".into(), record(0)).hand_to(1, Some(0)).is_empty());
        assert!(u.push("a".into(), record(1)).hand_to(1, Some(1)).is_empty());
        u.by_key["a"].records[0].1.finished.set();
        // Actor 1 died with record 1 in its mailbox; actor 2 gets it before record 2.
        let held = u.push("a".into(), record(2));
        assert_eq!(offsets(held.hand_to(2, Some(2))), [1]);
        assert_eq!(held.sent_to, Some(2));
        assert!(held.hand_to(2, Some(2)).is_empty(), "handed once");
        // A replay asked for by the actor's death hands over everything unfinished.
        assert_eq!(
            offsets(u.by_key.get_mut("a").unwrap().hand_to(3, None)),
            [1, 2]
        );
    }
}
