//! Prometheus counters of the pipeline: per source what was consumed, applied, dropped as a
//! duplicate and dead-lettered; per partition the lag; store and commit latencies.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::rules::Rules;

/// Counters of one source, resolved once so the hot path does no label lookup.
#[derive(Clone)]
pub struct SourceMetrics {
    /// Records consumed from the source's topic.
    pub consumed: IntCounter,
    /// Events applied to a view, counted when the view is written to the store.
    pub applied: IntCounter,
    /// Events dropped because their message id was seen before.
    pub duplicates: IntCounter,
}

/// Every metric the service exports, registered in one registry.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    sources: Vec<SourceMetrics>,
    dead_lettered: IntCounterVec,
    /// Lag per partition: high watermark minus consumer position.
    pub lag: IntGaugeVec,
    /// Events waiting in entity mailboxes.
    pub mailbox_depth: IntGauge,
    /// Entity actors alive.
    pub entity_actors: IntGauge,
    /// Dead letters handed to the sink and not yet stored: their offsets cannot commit until then.
    pub dead_letters_pending: IntGauge,
    /// Records handed again to a new entity actor after the previous one died.
    pub replayed: IntCounter,
    /// Entity actors that stopped with work pending (killed or panicked).
    pub entity_deaths: IntCounter,
    /// Entity actors that passivated with all their work done (idle, or beyond the live bound).
    pub entity_passivations: IntCounter,
    /// Partition supervisors restarted after they died.
    pub supervisor_restarts: IntCounter,
    /// The dedup actor and the offset committer restarted after they died, by actor.
    restarts: IntCounterVec,
    /// Partitions revoked by consumer-group rebalances (each drained and committed first).
    pub partitions_revoked: IntCounter,
    /// Seconds from commit request to the broker's answer.
    pub commit_latency: Histogram,
    /// Seconds a store flush took.
    pub flush_latency: Histogram,
    /// Seconds from an entity actor asking for its view to having it.
    pub view_load_latency: Histogram,
    /// Seconds from a record's timestamp to its effect being durable and its offset committable.
    pub event_latency: Histogram,
    /// Faults seen, by kind (store_write, store_flush, store_stall, commit, dead_letter, broker).
    pub faults: IntCounterVec,
}

/// Metric names share this prefix.
const PREFIX: &str = "aggregator";

impl Metrics {
    /// Registers all metrics, with per-source counters for every configured source.
    pub fn new(rules: &Rules) -> Self {
        let registry = Registry::new_custom(Some(PREFIX.into()), None).expect("prefix is valid");
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let consumed = counter_vec("consumed_total", "Records consumed.", &["source"]);
        let applied = counter_vec("applied_total", "Events applied to a view.", &["source"]);
        let duplicates = counter_vec(
            "duplicates_total",
            "Events dropped as duplicates.",
            &["source"],
        );
        let dead_lettered = counter_vec(
            "dead_lettered_total",
            "Records sent to the dead-letter topic.",
            &["source", "reason"],
        );
        let faults = counter_vec("faults_total", "Faults seen, by kind.", &["kind"]);
        let sources = rules
            .sources()
            .iter()
            .map(|s| SourceMetrics {
                consumed: consumed.with_label_values(&[&s.name]),
                applied: applied.with_label_values(&[&s.name]),
                duplicates: duplicates.with_label_values(&[&s.name]),
            })
            .collect();
        let lag = IntGaugeVec::new(
            Opts::new("lag", "High watermark minus position, per partition."),
            &["topic", "partition"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(lag.clone()))
            .expect("unique metric");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let mailbox_depth = gauge("mailbox_depth", "Events waiting in entity mailboxes.");
        let entity_actors = gauge("entity_actors", "Entity actors alive.");
        let dead_letters_pending = gauge(
            "dead_letters_pending",
            "Dead letters handed to the dead-letter topic and not yet stored there.",
        );
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let replayed = counter(
            "replayed_total",
            "Records handed again to a new entity actor after the previous one died.",
        );
        let supervisor_restarts = counter(
            "supervisor_restarts_total",
            "Partition supervisors restarted after they died.",
        );
        let restarts = counter_vec(
            "actor_restarts_total",
            "The dedup actor and the offset committer restarted after they died, by actor.",
            &["actor"],
        );
        let partitions_revoked = counter(
            "partitions_revoked_total",
            "Partitions revoked by rebalances, each drained and committed first.",
        );
        let entity_deaths = counter(
            "entity_deaths_total",
            "Entity actors that stopped with work pending.",
        );
        let entity_passivations = counter(
            "entity_passivations_total",
            "Entity actors that passivated with all their work done (idle, or beyond the live bound).",
        );
        let histogram = |name: &str, help: &str| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]))
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let commit_latency = histogram(
            "commit_latency_seconds",
            "Seconds from commit request to the broker's answer.",
        );
        let flush_latency = histogram("store_flush_seconds", "Seconds a store flush took.");
        let view_load_latency = histogram(
            "view_load_seconds",
            "Seconds from an entity actor asking for its view to having it.",
        );
        let event_latency = histogram(
            "event_latency_seconds",
            "Seconds from a record's timestamp to its effect being durable and committable.",
        );
        Metrics {
            registry,
            sources,
            dead_lettered,
            lag,
            mailbox_depth,
            entity_actors,
            dead_letters_pending,
            replayed,
            entity_deaths,
            entity_passivations,
            supervisor_restarts,
            restarts,
            partitions_revoked,
            commit_latency,
            flush_latency,
            view_load_latency,
            event_latency,
            faults,
        }
    }

    /// Counters of the source at `index`.
    pub fn source(&self, index: usize) -> &SourceMetrics {
        &self.sources[index]
    }

    /// Counts a dead-lettered record of `source` (a source name, or the topic when unknown).
    pub fn dead_lettered(&self, source: &str, reason: &str) {
        self.dead_lettered
            .with_label_values(&[source, reason])
            .inc();
    }

    /// Dead-lettered records of `source` for `reason` so far.
    pub fn dead_lettered_count(&self, source: &str, reason: &str) -> u64 {
        self.dead_lettered
            .with_label_values(&[source, reason])
            .get()
    }

    /// Counts a restart of `actor` (`dedup` or `committer`).
    pub fn actor_restarts(&self, actor: &str) {
        self.restarts.with_label_values(&[actor]).inc();
    }

    /// Counts a fault of `kind`.
    pub fn fault(&self, kind: &str) {
        self.faults.with_label_values(&[kind]).inc();
    }

    /// Totals over all sources: (consumed, applied, duplicates).
    pub fn totals(&self) -> (u64, u64, u64) {
        self.sources.iter().fold((0, 0, 0), |(c, a, d), s| {
            (
                c + s.consumed.get(),
                a + s.applied.get(),
                d + s.duplicates.get(),
            )
        })
    }

    /// Dead-lettered records over all sources and reasons.
    pub fn dead_lettered_total(&self) -> u64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == format!("{PREFIX}_dead_lettered_total"))
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }
}
