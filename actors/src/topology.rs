//! The live actor tree as shared counters, read by the HTTP API and the consumer's flow control
//! without messaging the actors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use serde::Serialize;

use crate::entity_registry::EntityRegistry;
use crate::partition_supervisor::PartitionSupervisor;
use crate::record::TopicPartition;

/// "Not known yet" for offset gauges.
pub const UNKNOWN: i64 = -1;

/// Live figures of one assigned partition.
#[derive(Debug)]
pub struct PartitionStats {
    /// The partition.
    pub tp: TopicPartition,
    /// Last offset the broker confirmed as committed.
    pub committed: AtomicI64,
    /// Next offset the consumer will hand over.
    pub position: AtomicI64,
    /// High watermark (end offset) as last reported by the client.
    pub high_watermark: AtomicI64,
    /// Records registered and not yet fully processed.
    pub in_flight: AtomicI64,
    /// Records the supervisor keeps to hand to an entity's next actor, until the committer passes
    /// them: those in flight and the finished ones behind the oldest unfinished.
    pub held: AtomicI64,
    /// Lowest offset not yet fully processed (what a commit would carry now).
    pub committable: AtomicI64,
    /// Whether consumption of the partition is paused for backpressure.
    pub paused: AtomicBool,
}

impl PartitionStats {
    /// Fresh figures for `tp`.
    pub fn new(tp: TopicPartition) -> Self {
        PartitionStats {
            tp,
            committed: AtomicI64::new(UNKNOWN),
            position: AtomicI64::new(UNKNOWN),
            high_watermark: AtomicI64::new(UNKNOWN),
            in_flight: AtomicI64::new(0),
            held: AtomicI64::new(0),
            committable: AtomicI64::new(UNKNOWN),
            paused: AtomicBool::new(false),
        }
    }

    /// The partition is read again by a new supervisor: nothing of it is in flight, and what
    /// may be committed is unknown until the committer has the new supervisor's records (an
    /// offset published for the old supervisor's records may lie beyond the rewind).
    pub fn rewound(&self) {
        self.in_flight.store(0, Ordering::Relaxed);
        self.committable.store(UNKNOWN, Ordering::Relaxed);
    }

    /// High watermark minus position, when both are known.
    pub fn lag(&self) -> Option<i64> {
        let (hw, pos) = (
            self.high_watermark.load(Ordering::Relaxed),
            self.position.load(Ordering::Relaxed),
        );
        (hw >= 0 && pos >= 0).then(|| (hw - pos).max(0))
    }
}

/// Live figures of the dedup actor and its store.
#[derive(Debug, Default)]
pub struct DedupStats {
    /// Message ids checked.
    pub checks: AtomicU64,
    /// Checks that found the id already applied.
    pub hits: AtomicU64,
    /// Markers written to the store.
    pub markers_written: AtomicU64,
    /// Views written to the store.
    pub views_written: AtomicU64,
    /// Markers removed because newer ones pushed them out of the dedup window.
    pub markers_expired: AtomicU64,
    /// Completed flushes.
    pub flushes: AtomicU64,
    /// Views published to the changelog.
    pub changelog_sent: AtomicU64,
    /// Changelog records replayed into the store on assignment.
    pub changelog_restored: AtomicU64,
    /// Events staged and not yet written.
    pub pending: AtomicU64,
    /// Times the actor was restarted after it died.
    pub restarts: AtomicU64,
    /// Store size on disk at the last flush, in bytes.
    pub store_bytes: AtomicU64,
    /// The last store fault, cleared by the next success.
    pub last_fault: Mutex<Option<String>>,
}

impl DedupStats {
    /// Records the outcome of a store operation for `/health`.
    pub fn set_fault(&self, fault: Option<String>) {
        if let Ok(mut f) = self.last_fault.lock() {
            *f = fault;
        }
    }

    /// The current store fault, if any.
    pub fn fault(&self) -> Option<String> {
        self.last_fault.lock().ok().and_then(|f| f.clone())
    }
}

/// Live figures of the offset committer.
#[derive(Debug, Default)]
pub struct CommitterStats {
    /// Commit requests sent.
    pub commits: AtomicU64,
    /// Commit requests that failed.
    pub failures: AtomicU64,
    /// Times the actor was restarted after it died.
    pub restarts: AtomicU64,
    /// The last commit fault, cleared by the next success.
    pub last_fault: Mutex<Option<String>>,
    /// When the offset commit under way was sent: the consumer's poll loop waits for its answer,
    /// which a broker that is down holds back until the request times out.
    pub waiting_since: Mutex<Option<std::time::Instant>>,
}

impl CommitterStats {
    /// The commit under way, described, if it has waited longer than `limit`.
    pub fn stalled(&self, limit: std::time::Duration) -> Option<String> {
        let since = (*self.waiting_since.lock().ok()?)?;
        let waited = since.elapsed();
        (waited > limit).then(|| format!("an offset commit has waited {waited:.1?} for the broker"))
    }
}

/// Everything `/topology` shows, shared by all actors.
#[derive(Default)]
pub struct Topology {
    /// Assigned partitions.
    pub partitions: DashMap<TopicPartition, Arc<PartitionStats>, crate::KeyHasher>,
    /// Live entity actors.
    pub entities: EntityRegistry,
    /// Live partition supervisors, told to replay an entity's records when it dies.
    pub supervisors: DashMap<TopicPartition, actix::Addr<PartitionSupervisor>, crate::KeyHasher>,
    /// Partitions whose supervisor died; the consumer rewinds and restarts them.
    pub dead_partitions: Mutex<Vec<TopicPartition>>,
    /// The dedup actor.
    pub dedup: DedupStats,
    /// The offset committer.
    pub committer: CommitterStats,
    /// The last consumer or broker fault, cleared when records flow again or the client's
    /// statistics show a broker up.
    pub consumer_fault: Mutex<Option<String>>,
    /// Set while no broker the consumer knows is up, from its statistics each second; records it
    /// fetched before still flow meanwhile, so they do not clear it.
    pub brokers_down: Mutex<Option<String>>,
    /// Whether the consumer has joined its group and received an assignment.
    pub joined: AtomicBool,
    /// Milliseconds from each record's timestamp to durable-and-committable.
    pub latency: LatencyHistogram,
    /// Milliseconds from each record's delivery to its partition supervisor to
    /// durable-and-committable: the service's own part of `latency`, without the broker's and
    /// the client's.
    pub service_latency: LatencyHistogram,
}

/// Latencies in milliseconds, recorded from any thread, summarised as percentiles.
#[derive(Default)]
pub struct LatencyHistogram(Mutex<Option<hdrhistogram::Histogram<u64>>>);

impl LatencyHistogram {
    /// Records one latency (at least 1 ms, at most an hour).
    pub fn record_ms(&self, ms: i64) {
        if let Ok(mut h) = self.0.lock() {
            let h = h.get_or_insert_with(|| {
                hdrhistogram::Histogram::new_with_bounds(1, LATENCY_MAX_MS, 3)
                    .expect("bounds and 3 significant digits are valid")
            });
            h.saturating_record((ms.max(1) as u64).min(LATENCY_MAX_MS));
        }
    }

    /// Percentiles of the latencies recorded so far, then forgets them.
    pub fn take(&self) -> Option<LatencySummary> {
        let h = self.0.lock().ok()?.take()?;
        Some(LatencySummary {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p95: h.value_at_quantile(0.95),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        })
    }
}

/// Longest latency tracked exactly; longer ones count as this (one hour).
const LATENCY_MAX_MS: u64 = 3_600_000;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencySummary {
    /// Events measured.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 95th percentile.
    pub p95: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

/// One partition supervisor in the snapshot.
#[derive(Debug, Serialize)]
pub struct PartitionSnapshot {
    /// Topic.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
    /// Last committed offset, if any.
    pub committed: Option<i64>,
    /// High watermark, if known.
    pub watermark: Option<i64>,
    /// Next offset to consume, if known.
    pub position: Option<i64>,
    /// Records in flight.
    pub in_flight: i64,
    /// Records kept for replay until committable.
    pub held: i64,
    /// Watermark minus position, if known.
    pub lag: Option<i64>,
    /// Whether the partition is paused for backpressure.
    pub paused: bool,
}

/// The whole tree as `/topology` serves it.
#[derive(Debug, Serialize)]
pub struct TopologySnapshot {
    /// Partition supervisors, by topic and partition.
    pub partitions: Vec<PartitionSnapshot>,
    /// Entity actors.
    pub entities: EntitiesSnapshot,
    /// The dedup actor.
    pub dedup: DedupSnapshot,
    /// The offset committer.
    pub committer: CommitterSnapshot,
}

/// Entity actors in the snapshot.
#[derive(Debug, Serialize)]
pub struct EntitiesSnapshot {
    /// Live entity actors.
    pub actors: usize,
    /// Events waiting in all mailboxes.
    pub mailbox_total: usize,
    /// Deepest mailboxes, deepest first.
    pub busiest: Vec<MailboxSnapshot>,
}

/// One mailbox in the snapshot.
#[derive(Debug, Serialize)]
pub struct MailboxSnapshot {
    /// Entity key.
    pub key: String,
    /// Events waiting.
    pub depth: usize,
}

/// The dedup actor in the snapshot.
#[derive(Debug, Serialize)]
pub struct DedupSnapshot {
    /// Message ids checked.
    pub checks: u64,
    /// Duplicates dropped.
    pub hits: u64,
    /// Markers written.
    pub markers_written: u64,
    /// Views written.
    pub views_written: u64,
    /// Markers expired out of the dedup window.
    pub markers_expired: u64,
    /// Flushes done.
    pub flushes: u64,
    /// Views published to the changelog.
    pub changelog_sent: u64,
    /// Changelog records replayed into the store on assignment.
    pub changelog_restored: u64,
    /// Events staged, not yet written.
    pub pending: u64,
    /// Restarts after the actor died.
    pub restarts: u64,
    /// Store size on disk in bytes.
    pub store_bytes: u64,
    /// Current store fault.
    pub fault: Option<String>,
}

/// The committer in the snapshot.
#[derive(Debug, Serialize)]
pub struct CommitterSnapshot {
    /// Commit requests sent.
    pub commits: u64,
    /// Commit requests failed.
    pub failures: u64,
    /// Restarts after the actor died.
    pub restarts: u64,
    /// Last committed offset per partition, as `topic[partition]` to offset.
    pub last_commit: Vec<(String, i64)>,
    /// Current commit fault.
    pub fault: Option<String>,
}

fn known(v: i64) -> Option<i64> {
    (v >= 0).then_some(v)
}

impl Topology {
    /// Figures of `tp`, created on first use.
    pub fn partition(&self, tp: &TopicPartition) -> Arc<PartitionStats> {
        self.partitions
            .entry(tp.clone())
            .or_insert_with(|| Arc::new(PartitionStats::new(tp.clone())))
            .clone()
    }

    /// Each assigned partition's next offset to read, where known.
    pub fn positions(&self) -> BTreeMap<(String, i32), i64> {
        self.partitions
            .iter()
            .filter_map(|p| {
                let position = known(p.position.load(Ordering::Relaxed))?;
                Some(((p.tp.topic.to_string(), p.tp.partition), position))
            })
            .collect()
    }

    /// A consistent-enough picture of the whole tree, with the `busiest` deepest mailboxes.
    pub fn snapshot(&self, busiest: usize) -> TopologySnapshot {
        let mut partitions: Vec<PartitionSnapshot> = self
            .partitions
            .iter()
            .map(|p| PartitionSnapshot {
                topic: p.tp.topic.to_string(),
                partition: p.tp.partition,
                committed: known(p.committed.load(Ordering::Relaxed)),
                watermark: known(p.high_watermark.load(Ordering::Relaxed)),
                position: known(p.position.load(Ordering::Relaxed)),
                in_flight: p.in_flight.load(Ordering::Relaxed),
                held: p.held.load(Ordering::Relaxed),
                lag: p.lag(),
                paused: p.paused.load(Ordering::Relaxed),
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        let last_commit = partitions
            .iter()
            .filter_map(|p| Some((format!("{}[{}]", p.topic, p.partition), p.committed?)))
            .collect();
        let d = &self.dedup;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TopologySnapshot {
            partitions,
            entities: EntitiesSnapshot {
                actors: self.entities.len(),
                mailbox_total: self.entities.mailbox_total(),
                busiest: self
                    .entities
                    .busiest(busiest)
                    .into_iter()
                    .map(|(key, depth)| MailboxSnapshot { key, depth })
                    .collect(),
            },
            dedup: DedupSnapshot {
                checks: load(&d.checks),
                hits: load(&d.hits),
                markers_written: load(&d.markers_written),
                views_written: load(&d.views_written),
                markers_expired: load(&d.markers_expired),
                flushes: load(&d.flushes),
                changelog_sent: load(&d.changelog_sent),
                changelog_restored: load(&d.changelog_restored),
                pending: load(&d.pending),
                restarts: load(&d.restarts),
                store_bytes: load(&d.store_bytes),
                fault: d.fault(),
            },
            committer: CommitterSnapshot {
                commits: load(&self.committer.commits),
                failures: load(&self.committer.failures),
                restarts: load(&self.committer.restarts),
                last_commit,
                fault: self
                    .committer
                    .last_fault
                    .lock()
                    .ok()
                    .and_then(|f| f.clone()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_commit_is_stalled_once_it_has_waited_longer_than_the_limit() {
        let stats = CommitterStats::default();
        assert_eq!(stats.stalled(Duration::ZERO), None, "no commit under way");
        let sent = Instant::now() - Duration::from_secs(3);
        *stats.waiting_since.lock().unwrap() = Some(sent);
        assert_eq!(stats.stalled(Duration::from_secs(60)), None);
        let stalled = stats.stalled(Duration::from_secs(2)).expect("stalled");
        assert!(
            stalled.starts_with("an offset commit has waited 3."),
            "{stalled}"
        );
    }
}
