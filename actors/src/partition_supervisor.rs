//! The partition supervisor: one per assigned topic-partition. It parses records in offset order,
//! registers them with the committer, routes events to entity actors (spawning them on demand) and
//! dead-letters what cannot be processed. It keeps every routed record until the committer has
//! passed it, so that when an entity actor dies with events in its mailbox, the next actor of that
//! key gets them again, in offset order, before anything newer. On revocation it drains and stops.

use std::collections::hash_map::Entry;
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

/// What a supervisor keeps of a key: the entity actor incarnation that has been sent every
/// record of the key held, and the offset of the key's last record (the key holds records while
/// that one is held).
struct KeyState {
    sent_to: Option<u64>,
    last_offset: i64,
}

/// Keys kept beyond twice the records held before the keys that hold none are dropped.
const IDLE_KEYS_KEPT: usize = 1024;

/// Routed records not yet passed by the committer, in offset order, each with its key (the
/// map's own copy); and per key, whom its records were handed to. A key's records are found by
/// walking those held, which only a new actor of a key that holds records needs; forgetting a
/// record so touches neither its key's entry nor a queue of its own.
#[derive(Default)]
struct Unfinished {
    order: VecDeque<(i64, Arc<str>, Arc<Record>)>,
    by_key: HashMap<Arc<str>, KeyState, KeyHasher>,
}

/// Whether a key whose last record is at `last_offset` still holds records, the first held
/// being at `front`.
fn holds(front: Option<i64>, last_offset: i64) -> bool {
    front.is_some_and(|front| last_offset >= front)
}

impl Unfinished {
    /// Offset of the first record held.
    fn front(&self) -> Option<i64> {
        self.order.front().map(|(offset, _, _)| *offset)
    }

    /// The records of `key` (the map's copy) held and finished by no entity actor, in offset
    /// order: what a new actor of the key must be sent again.
    fn unfinished_of(&self, key: &Arc<str>) -> Vec<Arc<Record>> {
        self.order
            .iter()
            .filter(|(_, of, record)| Arc::ptr_eq(of, key) && !record.finished.get())
            .map(|(_, _, record)| record.clone())
            .collect()
    }

    /// Holds `record` of `key` until the committer passes it, noting that actor `incarnation`
    /// is sent it; returns the key's records an earlier actor left unfinished, which this one
    /// must be sent first (none when it is the actor they were sent to, or the key holds none).
    fn push(&mut self, key: Arc<str>, record: Arc<Record>, incarnation: u64) -> Vec<Arc<Record>> {
        let offset = record.origin.offset;
        let front = self.front();
        let (key, earlier) = match self.by_key.entry(key) {
            Entry::Occupied(mut held) => {
                let state = held.get_mut();
                let earlier = if holds(front, state.last_offset) {
                    state.sent_to
                } else {
                    None
                };
                state.sent_to = Some(incarnation);
                state.last_offset = offset;
                (held.key().clone(), earlier)
            }
            Entry::Vacant(new) => {
                let key = new.key().clone();
                new.insert(KeyState {
                    sent_to: Some(incarnation),
                    last_offset: offset,
                });
                (key, None)
            }
        };
        let replay = match earlier {
            Some(earlier) if earlier != incarnation => self.unfinished_of(&key),
            _ => Vec::new(),
        };
        self.order.push_back((offset, key, record));
        replay
    }

    /// Whether `key` holds records.
    fn holds_key(&self, key: &str) -> bool {
        let front = self.front();
        self.by_key
            .get(key)
            .is_some_and(|state| holds(front, state.last_offset))
    }

    /// Notes that actor `incarnation` of `key` is to be sent every record of the key held, and
    /// returns those no actor finished, unless it was sent them already (a replay asked for
    /// when an actor died).
    fn hand_all_to(&mut self, key: &str, incarnation: u64) -> Vec<Arc<Record>> {
        let front = self.front();
        let Some((key, state)) = self.by_key.get_key_value(key) else {
            return Vec::new();
        };
        if !holds(front, state.last_offset) {
            return Vec::new();
        }
        let key = key.clone();
        let earlier = self
            .by_key
            .get_mut(&key)
            .and_then(|state| state.sent_to.replace(incarnation));
        match earlier {
            Some(earlier) if earlier != incarnation => self.unfinished_of(&key),
            _ => Vec::new(),
        }
    }

    /// Forgets records below `committable`: their effects are durable. It stops at the first
    /// record no entity actor finished: a committable offset can run ahead of what this
    /// supervisor routed (one published before a rewind, or a completion of the same offset
    /// read before the rewind), and a record forgotten unfinished could not be handed to the
    /// next actor of its key if the one holding it died.
    fn prune(&mut self, committable: i64) {
        while let Some((offset, _, record)) = self.order.front() {
            if *offset >= committable || !record.finished.get() {
                break;
            }
            self.order.pop_front();
        }
        // The keys that hold nothing are dropped in one pass once they outnumber those that
        // can hold records, so the pass costs a few key entries a record.
        if self.by_key.len() > 2 * self.order.len() + IDLE_KEYS_KEPT {
            let front = self.front();
            self.by_key
                .retain(|_, state| holds(front, state.last_offset));
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
        let handle = self.entity(&key);
        // A new actor of the key is sent what an earlier one left unfinished before this record.
        let replay = self
            .unfinished
            .push(key, record.clone(), handle.incarnation);
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
        if !self.unfinished.holds_key(&msg.key) {
            return;
        }
        let handle = self.entity(&msg.key);
        let replay = self.unfinished.hand_all_to(&msg.key, handle.incarnation);
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

    /// The offsets of `records`.
    fn offsets(records: &[Arc<Record>]) -> Vec<i64> {
        records.iter().map(|r| r.origin.offset).collect()
    }

    /// The offsets held, in order.
    fn held(u: &Unfinished) -> Vec<i64> {
        u.order.iter().map(|(offset, _, _)| *offset).collect()
    }

    /// Holds records at `offsets` for their keys, all sent to actor 1; returns them.
    fn push_all(u: &mut Unfinished, records: &[(i64, &str)]) -> Vec<Arc<Record>> {
        records
            .iter()
            .map(|(offset, key)| {
                let r = record(*offset);
                assert!(u.push((*key).into(), r.clone(), 1).is_empty());
                r
            })
            .collect()
    }

    #[test]
    fn unfinished_records_are_kept_in_order_until_the_committer_passes_them() {
        let mut u = Unfinished::default();
        let records = push_all(&mut u, &[(0, "a"), (1, "b"), (2, "a"), (3, "a")]);
        assert!(u.holds_key("a") && u.holds_key("b") && !u.holds_key("c"));
        for r in &records {
            r.finished.set();
        }
        u.prune(2);
        assert_eq!(held(&u), [2, 3]);
        assert!(!u.holds_key("b"), "b is forgotten with its last record");
        assert!(u.holds_key("a"));
        u.prune(10);
        assert!(u.order.is_empty() && !u.holds_key("a"));
    }

    #[test]
    fn records_no_actor_finished_are_kept_below_a_committable_that_ran_ahead() {
        // Read again after a rewind from 0, while the committable offset published for the
        // records of the supervisor before it still says 3.
        let mut u = Unfinished::default();
        let records = push_all(&mut u, &[(0, "a"), (1, "b"), (2, "a")]);
        records[0].finished.set();
        u.prune(3);
        assert_eq!(
            held(&u),
            [1, 2],
            "1 is unfinished: it and what follows stay"
        );
        assert_eq!(
            offsets(&u.hand_all_to("b", 2)),
            [1],
            "the next actor of b is handed it again"
        );
        records[1].finished.set();
        u.prune(3);
        assert_eq!(held(&u), [2]);
        records[2].finished.set();
        u.prune(3);
        assert!(u.order.is_empty());
    }

    #[test]
    fn only_records_no_actor_finished_are_replayed_in_order() {
        let mut u = Unfinished::default();
        let records = push_all(&mut u, &[(0, "a"), (1, "a"), (2, "b"), (3, "a"), (4, "a")]);
        // The actor that died finished the first two; the others were in its mailbox.
        records[0].finished.set();
        records[1].finished.set();
        assert_eq!(offsets(&u.hand_all_to("a", 2)), [3, 4]);
        assert_eq!(offsets(&u.hand_all_to("b", 3)), [2]);
        // The next record of a goes to actor 3, which is sent a's unfinished ones first, the
        // record being routed excepted (it is sent next).
        assert_eq!(offsets(&u.push("a".into(), record(5), 3)), [3, 4]);
    }

    #[test]
    fn a_new_actor_of_a_key_is_handed_once_what_the_one_before_left_unfinished() {
        let mut u = Unfinished::default();
        // The key's first actor, and the same actor again: nothing to send twice.
        let first = record(0);
        assert!(u.push("a".into(), first.clone(), 1).is_empty());
        assert!(u.push("a".into(), record(1), 1).is_empty());
        first.finished.set();
        // Actor 1 died with record 1 in its mailbox; actor 2 gets it before record 2.
        assert_eq!(offsets(&u.push("a".into(), record(2), 2)), [1]);
        assert!(u.push("a".into(), record(3), 2).is_empty(), "handed once");
        assert!(
            u.hand_all_to("a", 2).is_empty(),
            "handed once, on a death too"
        );
        // A replay asked for by the actor's death hands over everything unfinished.
        assert_eq!(offsets(&u.hand_all_to("a", 3)), [1, 2, 3]);
    }

    #[test]
    fn a_key_whose_records_were_all_forgotten_starts_afresh() {
        let mut u = Unfinished::default();
        let records = push_all(&mut u, &[(0, "a"), (1, "b")]);
        records[0].finished.set();
        u.prune(1);
        // a's actor was passivated meanwhile: its next one has nothing to be sent again.
        assert!(u.push("a".into(), record(2), 2).is_empty());
        assert!(u.hand_all_to("b", 2).len() == 1, "b still holds its record");
    }

    #[test]
    fn keys_that_hold_nothing_are_dropped_once_they_outnumber_those_held() {
        let mut u = Unfinished::default();
        let n = IDLE_KEYS_KEPT + 10;
        for offset in 0..n as i64 {
            let r = record(offset);
            r.finished.set();
            assert!(u.push(format!("k{offset}").into(), r, 1).is_empty());
        }
        let last = record(n as i64);
        assert!(u.push("last".into(), last, 1).is_empty());
        u.prune(n as i64);
        assert_eq!(held(&u), [n as i64]);
        assert_eq!(
            u.by_key.len(),
            1,
            "only the key that holds a record is kept"
        );
        assert!(u.holds_key("last"));
    }
}
