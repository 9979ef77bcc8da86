//! `aggregator bench --pipeline-only`: the actor pipeline alone (partition supervisors, entity
//! actors, the dedup actor with its sled store, the committer, changelog records encoded), fed
//! generated records straight into its partition supervisors: no broker and no Kafka client. It
//! is measured against parsing the same records in the same process. Its CPU figure leaves out
//! what the embedded broker and the clients cost, so that changes inside the pipeline show; run
//! under `valgrind --tool=callgrind`, it counts instructions, which repeat where timings on a
//! shared machine do not.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use anyhow::{bail, Context as _};
use serde::Serialize;

use aggregator_actors::changelog::{Acks, ChangelogRecord, ChangelogSink, SendFuture};
use aggregator_actors::dead_letter::{DeadLetter, DeadLetterSink, PublishFuture};
use aggregator_actors::dedup_actor::Release;
use aggregator_actors::envelope::parse;
use aggregator_actors::offset_committer::OffsetSink;
use aggregator_actors::partition_supervisor::{deliver, PartitionSupervisor};
use aggregator_actors::record::{Origin, Record, RecordValue, TopicPartition};

use crate::bench::{
    counts_text, exactly_once, process_cpu_seconds, workload_line, BenchOptions, Workload,
};
use crate::config::Config;
use crate::generator::Kind;
use crate::service;

/// What the pipeline benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    /// Records fed.
    pub events: u64,
    /// Distinct keys.
    pub keys: u32,
    /// Partitions per topic (seven topics).
    pub partitions: i32,
    /// Parsing every record on one thread, nothing else.
    pub parse: Workload,
    /// The actor pipeline, from the first record fed until every offset is committed.
    pub pipeline: Workload,
    /// pipeline / parse throughput.
    pub ratio: f64,
    /// Every record was applied once or dropped as the duplicate it was sent as.
    pub verified: bool,
    /// The counts the check compared: records fed, consumed, applied, dropped as duplicates,
    /// duplicates sent, dead-lettered.
    pub counts: [u64; 6],
}

/// How long the pipeline may commit nothing more before the run is given up.
const STALL_LIMIT: Duration = Duration::from_secs(120);

/// Keeps the offsets committed, per partition.
#[derive(Default)]
struct MemoryOffsets(Mutex<HashMap<TopicPartition, i64>>);

impl MemoryOffsets {
    /// Whether every partition in `ends` has committed up to its end.
    fn reached(&self, ends: &BTreeMap<TopicPartition, i64>) -> bool {
        let committed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        ends.iter()
            .all(|(tp, end)| committed.get(tp).is_some_and(|c| c >= end))
    }

    /// Offsets committed over all partitions.
    fn total(&self) -> i64 {
        let committed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        committed.values().sum()
    }
}

impl OffsetSink for MemoryOffsets {
    fn commit(&self, offsets: &[(TopicPartition, i64)]) -> Result<(), String> {
        let mut committed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for (tp, offset) in offsets {
            let c = committed.entry(tp.clone()).or_insert(*offset);
            *c = (*c).max(*offset);
        }
        Ok(())
    }
}

/// Takes changelog records as a broker would, numbering them per partition.
#[derive(Default)]
struct MemoryChangelog(Mutex<HashMap<i32, i64>>);

impl ChangelogSink for MemoryChangelog {
    fn send(&self, records: Vec<ChangelogRecord>) -> SendFuture {
        let mut next = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ends = HashMap::new();
        for r in &records {
            let n = next.entry(r.partition).or_insert(0);
            *n += 1;
            ends.insert(r.partition, *n);
        }
        Box::pin(async move { Ok(Box::pin(async move { Ok(ends) }) as Acks) })
    }
}

/// Takes dead letters and keeps nothing (the generated stream has none).
struct DiscardDeadLetters;

impl DeadLetterSink for DiscardDeadLetters {
    fn publish(&self, _: &DeadLetter) -> PublishFuture {
        Box::pin(async { Ok(()) })
    }
}

/// The generated records by topic-partition, offsets from 0, the partition chosen by key as a
/// producer's partitioner would (the same key, the same partition number in every topic); and
/// the number of duplicates among them.
fn generate(config: &Config, options: &BenchOptions) -> anyhow::Result<RecordsByPartition> {
    let topics = config.rules()?.topics();
    let generator = options.generator(config);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut by_tp: BTreeMap<TopicPartition, Vec<Record>> = BTreeMap::new();
    let mut duplicates = 0;
    for g in generator.take(options.events as usize) {
        let topic = topics
            .get(g.source)
            .with_context(|| format!("the generator made a record of source {}", g.source))?;
        let partition = g.key.as_ref().map_or(0, |key| {
            let mut h = DefaultHasher::new();
            key.hash(&mut h);
            (h.finish() % options.partitions as u64) as i32
        });
        let tp = TopicPartition::new(topic.as_str(), partition);
        let records = by_tp.entry(tp.clone()).or_default();
        records.push(Record {
            origin: Origin {
                tp,
                offset: records.len() as i64,
            },
            key: g.key.map(String::into_bytes),
            value: g.value.map(RecordValue::from),
            headers: g.headers,
            timestamp_ms: Some(now_ms),
            finished: Default::default(),
        });
        duplicates += u64::from(g.kind == Kind::Duplicate);
    }
    Ok(RecordsByPartition { by_tp, duplicates })
}

/// Generated records, by topic-partition.
struct RecordsByPartition {
    by_tp: BTreeMap<TopicPartition, Vec<Record>>,
    duplicates: u64,
}

/// Parses every record on this thread: the floor of any pipeline over these records.
fn parse_all(config: &Config, records: &RecordsByPartition) -> anyhow::Result<Workload> {
    let rules = config.rules()?;
    let limits = config.tuning.limits();
    let (started, cpu) = (Instant::now(), process_cpu_seconds());
    let mut parsed = 0u64;
    for record in records.by_tp.values().flatten() {
        parsed += u64::from(parse(record, &rules, &limits).is_ok());
    }
    let total: usize = records.by_tp.values().map(Vec::len).sum();
    if parsed != total as u64 {
        bail!(
            "{} of {total} generated records do not parse",
            total as u64 - parsed
        );
    }
    Ok(Workload::new(
        parsed,
        started.elapsed().as_secs_f64(),
        process_cpu_seconds() - cpu,
    ))
}

/// Runs the pipeline benchmark. Must run inside an actix system.
pub async fn run(mut config: Config, options: BenchOptions) -> anyhow::Result<PipelineReport> {
    if options.events == 0 || options.keys == 0 || options.partitions < 1 {
        bail!("--events, --keys and --partitions must be at least 1");
    }
    config.tuning.commit_interval_ms = options.commit_interval_ms;
    let dir = tempfile::tempdir().context("creating the store directory")?;
    config.store.path = dir.path().join("store");
    config.validate()?;

    eprintln!("bench: generating {} records", options.events);
    let records = generate(&config, &options)?;
    eprintln!("bench: parse only, {} records", options.events);
    let parsed = parse_all(&config, &records)?;

    eprintln!(
        "bench: actor pipeline (no broker), {} records",
        options.events
    );
    let offsets = Arc::new(MemoryOffsets::default());
    let changelog: Option<Arc<dyn ChangelogSink>> = config
        .changelog
        .enabled
        .then(|| Arc::new(MemoryChangelog::default()) as Arc<dyn ChangelogSink>);
    let tree = service::start_actors(
        &config,
        config.store.open()?,
        offsets.clone(),
        Arc::new(DiscardDeadLetters),
        changelog,
    )?;
    let ends: BTreeMap<TopicPartition, i64> = records
        .by_tp
        .iter()
        .map(|(tp, r)| (tp.clone(), r.len() as i64))
        .collect();
    let mut partitions = Vec::new();
    for (tp, list) in records.by_tp {
        let pipeline = tree.pipeline.clone();
        let for_actor = tp.clone();
        let addr = PartitionSupervisor::new(for_actor, pipeline).start();
        partitions.push((tree.pipeline.topology.partition(&tp), addr, list));
    }
    let (batch, in_flight_max) = (
        config.tuning.poll_batch.max(1),
        config.tuning.max_in_flight_per_partition as i64,
    );
    let pipeline = tree.pipeline.clone();
    let (started, cpu) = (Instant::now(), process_cpu_seconds());
    // Fed from a thread of its own, as the consumer thread feeds the service: each partition a
    // batch at a time while it has room in flight.
    let feeder = std::thread::Builder::new()
        .name("bench-feeder".into())
        .spawn(move || {
            let mut queues: Vec<_> = partitions
                .into_iter()
                .map(|(stats, addr, list)| (stats, addr, list.into_iter()))
                .collect();
            loop {
                let mut left = false;
                let mut fed = false;
                for (stats, addr, records) in &mut queues {
                    if records.as_slice().is_empty() {
                        continue;
                    }
                    left = true;
                    if stats.in_flight.load(Ordering::Relaxed) >= in_flight_max {
                        continue;
                    }
                    let next: Vec<Record> = records.by_ref().take(batch).collect();
                    deliver(addr, stats, &pipeline, next);
                    fed = true;
                }
                if !left {
                    return;
                }
                if !fed {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        })?;
    let (mut last, mut since) = (0, Instant::now());
    while !offsets.reached(&ends) {
        let committed = offsets.total();
        if committed != last {
            (last, since) = (committed, Instant::now());
        } else if since.elapsed() > STALL_LIMIT {
            bail!(
                "the pipeline stopped: {committed} of {} offsets committed, none more in {STALL_LIMIT:?}",
                options.events
            );
        }
        actix::clock::sleep(Duration::from_millis(1)).await;
    }
    let pipelined = Workload::new(
        options.events,
        started.elapsed().as_secs_f64(),
        process_cpu_seconds() - cpu,
    );
    feeder
        .join()
        .map_err(|_| anyhow::anyhow!("the feeder thread panicked"))?;
    let (consumed, applied, dropped) = tree.metrics.totals();
    let dead_lettered = tree.metrics.dead_lettered_total();
    let counts = [
        options.events,
        consumed,
        applied,
        dropped,
        records.duplicates,
        dead_lettered,
    ];
    // The store is flushed and closed before its directory goes.
    let released = tree.dedup.send(Release).await;
    tree.dedup_thread.stop();
    drop(released.context("the dedup actor stopped")??);
    Ok(PipelineReport {
        events: options.events,
        keys: options.keys,
        partitions: options.partitions,
        ratio: pipelined.events_per_sec / parsed.events_per_sec.max(1e-9),
        parse: parsed,
        pipeline: pipelined,
        verified: exactly_once(&counts),
        counts,
    })
}

/// The report as text.
pub fn render(r: &PipelineReport) -> String {
    format!(
        "records {} | keys {} | 7 topics x {} partitions | no broker\n\
         parse only                 {}\n\
         actor pipeline             {}\n\
         ratio pipeline/parse       {:>10.3}\n\
         verified (every record applied once or dropped as a duplicate): {} ({})",
        r.events,
        r.keys,
        r.partitions,
        workload_line(&r.parse, "record"),
        workload_line(&r.pipeline, "record"),
        r.ratio,
        r.verified,
        counts_text("fed", &r.counts),
    )
}
