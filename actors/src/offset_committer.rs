//! The offset committer: per partition, commits only the lowest offset not yet fully processed,
//! on an interval; hands a partition's final offset over when it is drained.
//!
//! It runs under an actix `Supervisor`: killed, it restarts with its address and mailbox kept but
//! its offset bookkeeping lost. It then has every partition rewound and ignores what the old
//! supervisors still register; each partition's new supervisor reads again from the partition's
//! last successful commit, registers afresh, and dedup keeps the re-read harmless.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::kill::{injected_panic, Kill};
use crate::metrics::Metrics;
use crate::offset_tracker::{OffsetTracker, Stamps};
use crate::partition_supervisor::rewind_all_partitions;
use crate::record::{Origin, TopicPartition};
use crate::topology::Topology;
use crate::KeyHasher;

/// Where commits go: the Kafka consumer in the service, memory in tests.
pub trait OffsetSink: Send + Sync + 'static {
    /// Hands over `offsets` (the next offset to read, per partition) for commit, without waiting.
    fn commit(&self, offsets: &[(TopicPartition, i64)]) -> Result<(), String>;
}

/// Offsets are now in flight (sent by the partition supervisor, in offset order).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    /// The partition.
    pub tp: TopicPartition,
    /// The offsets, ascending, with each record's timestamp (ms since the epoch, 0 if unknown).
    pub offsets: Vec<(i64, i64)>,
    /// When the partition supervisor got them, ms since the epoch.
    pub delivered_ms: i64,
}

/// These records are fully processed and their effect is durable.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Completed {
    /// The records.
    pub origins: Vec<Origin>,
}

/// Resolves once nothing of `tp` is in flight, with the offset to commit for it; stops tracking it.
#[derive(Message)]
#[rtype(result = "Option<i64>")]
pub struct DrainPartition {
    /// The partition to drain.
    pub tp: TopicPartition,
}

/// Forgets what is in flight for `tp` (its supervisor died) and answers the lowest unfinished
/// offset, from which the partition is read again (`None` if the committer does not know it);
/// completions of the old records are then ignored, and the records read again are registered
/// afresh.
#[derive(Message)]
#[rtype(result = "Option<i64>")]
pub struct ResetPartition {
    /// The partition.
    pub tp: TopicPartition,
}

/// Stop committing (at shutdown, after every partition was drained).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// The offset committer actor.
pub struct OffsetCommitter {
    tracker: OffsetTracker,
    sink: Arc<dyn OffsetSink>,
    topology: Arc<Topology>,
    metrics: Arc<Metrics>,
    interval: Duration,
    waiters: HashMap<TopicPartition, Vec<oneshot::Sender<Option<i64>>>, KeyHasher>,
    /// Partitions whose bookkeeping a restart lost, until their supervisor is replaced: what
    /// their old supervisor still registers is ignored.
    lost: HashSet<TopicPartition, KeyHasher>,
    shut_down: bool,
}

impl OffsetCommitter {
    /// A committer that commits to `sink` every `interval`.
    pub fn new(
        sink: Arc<dyn OffsetSink>,
        topology: Arc<Topology>,
        metrics: Arc<Metrics>,
        interval: Duration,
    ) -> Self {
        OffsetCommitter {
            tracker: OffsetTracker::default(),
            sink,
            topology,
            metrics,
            interval,
            waiters: HashMap::default(),
            lost: HashSet::default(),
            shut_down: false,
        }
    }

    fn commit_due(&mut self) {
        if self.shut_down {
            return;
        }
        let offsets = self.tracker.take_commits();
        if offsets.is_empty() {
            return;
        }
        let stats = &self.topology.committer;
        stats.commits.fetch_add(1, Ordering::Relaxed);
        match self.sink.commit(&offsets) {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!("offset commit failed, will retry: {e}");
                stats.failures.fetch_add(1, Ordering::Relaxed);
                self.metrics.fault("commit");
                if let Ok(mut f) = stats.last_fault.lock() {
                    *f = Some(e);
                }
                self.tracker.forget_commits(&offsets);
            }
        }
    }

    fn answer_drained(&mut self, tp: &TopicPartition) {
        if self.tracker.in_flight(tp) > 0 || !self.waiters.contains_key(tp) {
            return;
        }
        let offset = self.tracker.remove(tp);
        for waiter in self.waiters.remove(tp).unwrap_or_default() {
            let _ = waiter.send(offset);
        }
    }
}

impl OffsetCommitter {
    fn publish_committable(&self, tp: &TopicPartition) {
        if let (Some(p), Some(c)) = (
            self.topology.partitions.get(tp),
            self.tracker.committable(tp),
        ) {
            p.committable.store(c, Ordering::Relaxed);
        }
    }
}

impl Actor for OffsetCommitter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.interval, |act, _| act.commit_due());
    }
}

impl Supervised for OffsetCommitter {
    fn restarting(&mut self, _: &mut Self::Context) {
        if self.shut_down {
            return;
        }
        tracing::warn!(
            "offset committer restarted; its bookkeeping is lost and every partition is rewound"
        );
        self.lost = self
            .tracker
            .partitions()
            .cloned()
            .chain(self.topology.supervisors.iter().map(|s| s.key().clone()))
            .collect();
        self.tracker = OffsetTracker::default();
        // Drains waiting now get `None`: their partitions are handed over uncommitted.
        self.waiters.clear();
        self.topology
            .committer
            .restarts
            .fetch_add(1, Ordering::Relaxed);
        self.metrics.actor_restarts("committer");
        rewind_all_partitions(&self.topology);
    }
}

/// Its bookkeeping is lost; see the module docs for the recovery.
impl Handler<Kill> for OffsetCommitter {
    type Result = ();

    fn handle(&mut self, msg: Kill, ctx: &mut Self::Context) {
        injected_panic(msg, || "the offset committer".to_string());
        ctx.stop();
    }
}

impl Handler<Register> for OffsetCommitter {
    type Result = ();

    fn handle(&mut self, msg: Register, _: &mut Self::Context) {
        if self.lost.contains(&msg.tp) {
            return;
        }
        let delivered_ms = msg.delivered_ms;
        self.tracker.register_all(
            &msg.tp,
            msg.offsets.iter().map(|&(offset, produced_ms)| {
                let stamps = Stamps {
                    produced_ms,
                    delivered_ms,
                };
                (offset, stamps)
            }),
        );
        self.publish_committable(&msg.tp);
    }
}

impl Handler<Completed> for OffsetCommitter {
    type Result = ();

    fn handle(&mut self, msg: Completed, _: &mut Self::Context) {
        // A write's records come by entity, their partitions interleaved; a write touches a few
        // dozen partitions at most, so a scan beats sorting its records, and each partition is
        // then looked up once for all its offsets.
        let mut by_partition: Vec<(&TopicPartition, Vec<i64>)> = Vec::new();
        for origin in &msg.origins {
            let tp = &origin.tp;
            match by_partition
                .iter_mut()
                .find(|(t, _)| t.partition == tp.partition && t.topic == tp.topic)
            {
                Some((_, offsets)) => offsets.push(origin.offset),
                None => by_partition.push((tp, vec![origin.offset])),
            }
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        for (tp, offsets) in by_partition {
            let (topology, metrics) = (&self.topology, &self.metrics);
            let completed = self.tracker.complete_all(tp, offsets, |stamps| {
                let timestamp_ms = stamps.produced_ms;
                if timestamp_ms > 0 {
                    topology.latency.record_ms(now_ms - timestamp_ms);
                    metrics
                        .event_latency
                        .observe((now_ms - timestamp_ms).max(0) as f64 / 1000.0);
                }
                topology
                    .service_latency
                    .record_ms(now_ms - stamps.delivered_ms);
            });
            if completed == 0 {
                continue;
            }
            // In-flight counts are added by `deliver` and taken off here, once per record.
            if let Some(p) = self.topology.partitions.get(tp) {
                p.in_flight.fetch_sub(completed as i64, Ordering::Relaxed);
                if let Some(c) = self.tracker.committable(tp) {
                    p.committable.store(c, Ordering::Relaxed);
                }
            }
            self.answer_drained(tp);
        }
    }
}

impl Handler<DrainPartition> for OffsetCommitter {
    type Result = ResponseFuture<Option<i64>>;

    fn handle(&mut self, msg: DrainPartition, _: &mut Self::Context) -> Self::Result {
        // Its supervisor stops now; a later one registers afresh.
        self.lost.remove(&msg.tp);
        let (tx, rx) = oneshot::channel();
        self.waiters.entry(msg.tp.clone()).or_default().push(tx);
        self.answer_drained(&msg.tp);
        Box::pin(async move { rx.await.ok().flatten() })
    }
}

impl Handler<Shutdown> for OffsetCommitter {
    type Result = ();

    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) {
        // Stopping would restart it under its supervisor; it goes when its addresses do.
        self.shut_down = true;
    }
}

impl Handler<ResetPartition> for OffsetCommitter {
    type Result = Option<i64>;

    fn handle(&mut self, msg: ResetPartition, _: &mut Self::Context) -> Option<i64> {
        if self.lost.remove(&msg.tp) {
            self.tracker.remove(&msg.tp);
            return None;
        }
        self.tracker.remove(&msg.tp)
    }
}
