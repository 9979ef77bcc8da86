//! The Kafka side of the service: the consumer-group member that runs on its own thread, turns
//! polled messages into records for the partition supervisors, pauses partitions whose in-flight
//! window is full and drains partitions on revocation. What the committer hands over is committed
//! beside it ([`crate::offset_sink`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::prelude::*;
use aggregator_actors::offset_committer::ResetPartition;
use aggregator_actors::partition_supervisor::{deliver, Drain, PartitionSupervisor};
use aggregator_actors::pipeline::Pipeline;
use aggregator_actors::topology::PartitionStats;
use aggregator_actors::{Origin, Record, RecordValue, Store, TopicPartition};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};

use crate::changelog_restorer::ChangelogRestorer;
use crate::config::Config;
use crate::offset_sink::{spawn_commit_thread, KafkaOffsetSink};

/// The consumer type of the service.
pub type AggregatorConsumer = BaseConsumer<AggregatorContext>;

/// Why the consumer could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// librdkafka refused the configuration or the subscription.
    #[error("kafka consumer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The consumer thread could not be spawned.
    #[error("cannot start the consumer thread: {0}")]
    Thread(std::io::Error),
}

/// How the consumer fetches; the bench's bare consumer fetches the same way, so that its latency
/// is the floor of the service's.
pub const FETCH_SETTINGS: [(&str, &str); 3] = [
    ("queued.max.messages.kbytes", "16384"),
    // librdkafka's 500 ms held records of quiet partitions back that long (the bench's p50
    // latency at 5,000 events/s: 340 ms, 29 ms with this); more fetches when idle.
    ("fetch.wait.max.ms", "10"),
    // A consumer queue over the limit above holds every partition's next fetch back this long
    // (librdkafka's 1,000 ms left the pipeline empty for up to a second once it drained).
    ("fetch.queue.backoff.ms", "10"),
];

/// What flow control does to a partition.
#[derive(Debug, PartialEq)]
enum Flow {
    Pause,
    Resume,
}

/// Part of the in-flight window that must be free before a paused partition resumes. Resuming at
/// half the window, a partition held between half and all of it (about three quarters on
/// average) and the service often waited on a pipeline half empty (`bench --events 1000000`,
/// alternating runs: 40,422 / 34,498 / 33,408 / 34,277 events/s resuming at an eighth, against
/// 30,866 / 35,771 / 30,141 / 31,428 at half); the gap keeps a partition from being paused and
/// resumed at every poll.
const RESUME_FREE_PART: i64 = 8;

/// Pauses a running partition whose `window` is full, resumes a paused one with a
/// [`RESUME_FREE_PART`] of it free (one record at least); `None` leaves it as it is.
fn flow(paused: bool, in_flight: i64, window: i64) -> Option<Flow> {
    if !paused && in_flight >= window {
        Some(Flow::Pause)
    } else if paused && in_flight <= window - (window / RESUME_FREE_PART).max(1) {
        Some(Flow::Resume)
    } else {
        None
    }
}

/// A live partition: its supervisor and its figures.
struct Assigned {
    addr: Addr<PartitionSupervisor>,
    stats: Arc<PartitionStats>,
    /// Offset of the first record handed over since assignment, where a rewind goes when
    /// nothing was registered yet.
    first_offset: Option<i64>,
    /// Broker leading the partition, from the client's statistics ([`NO_LEADER`] until known).
    leader: i32,
}

/// Leader of a partition the client's statistics have not reported yet.
const NO_LEADER: i32 = -1;

/// Rebalance, statistics and commit callbacks, and the map of live partition supervisors.
pub struct AggregatorContext {
    arbiter: ArbiterHandle,
    pipeline: Arc<Pipeline>,
    assigned: Mutex<HashMap<TopicPartition, Assigned>>,
    drain_timeout: Duration,
    /// Replays the changelog into the store on assignment, when state follows partitions; let go
    /// when polling ends, so that the store closes with the service although librdkafka may keep
    /// this context alive a while longer.
    restorer: Mutex<Option<(ChangelogRestorer, Store)>>,
    /// What the committer hands over; a drain's final commit takes its turn with the sink's.
    sink: Arc<KafkaOffsetSink>,
}

impl AggregatorContext {
    fn assigned(&self) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, Assigned>> {
        self.assigned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drains the supervisors of `tps` and commits their final offsets synchronously, after any
    /// commit under way.
    fn drain(&self, consumer: &AggregatorConsumer, tps: &[TopicPartition]) {
        let removed: Vec<(TopicPartition, Assigned)> = {
            let mut assigned = self.assigned();
            tps.iter()
                .filter_map(|tp| assigned.remove(tp).map(|a| (tp.clone(), a)))
                .collect()
        };
        if removed.is_empty() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        for (tp, a) in &removed {
            let (tx, tp, addr) = (tx.clone(), tp.clone(), a.addr.clone());
            self.arbiter.spawn(async move {
                let offset = addr.send(Drain).await.ok().flatten();
                let _ = tx.send((tp, offset));
            });
        }
        drop(tx);
        let deadline = Instant::now() + self.drain_timeout;
        let mut tpl = TopicPartitionList::new();
        let mut committed = Vec::new();
        for _ in 0..removed.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((tp, Some(offset))) => {
                    if let Some((_, a)) = removed.iter().find(|(removed, _)| *removed == tp) {
                        let _ = tpl.add_partition_offset(
                            &tp.topic,
                            tp.partition,
                            Offset::Offset(offset),
                        );
                        committed.push((a.stats.clone(), offset));
                    }
                }
                Ok((_, None)) => {}
                Err(_) => {
                    tracing::error!(
                        "partitions did not drain within {:?}; their unfinished records will be redelivered",
                        self.drain_timeout
                    );
                    break;
                }
            }
        }
        let _turn = self.sink.turn();
        self.sink.forget(tps);
        match self.commit_list(consumer, &tpl, committed) {
            Ok(0) => {}
            Ok(partitions) => tracing::info!(partitions, "final offsets committed"),
            Err(e) => tracing::warn!(
                "final commit failed; records since the last commit will be redelivered and deduplicated: {e}"
            ),
        }
        // Not ours any more: `/topology` shows the current assignment only.
        for (tp, _) in &removed {
            self.pipeline.topology.partitions.remove(tp);
        }
    }

    /// Commits `offsets` of the partitions still assigned, synchronously, each only if it is above
    /// the partition's last committed offset.
    pub(crate) fn commit(
        &self,
        consumer: &AggregatorConsumer,
        offsets: &HashMap<TopicPartition, i64>,
    ) -> KafkaResult<()> {
        let mut tpl = TopicPartitionList::new();
        let mut committed = Vec::new();
        {
            let assigned = self.assigned();
            for (tp, &offset) in offsets {
                let Some(a) = assigned.get(tp) else { continue };
                // An offset handed over before a rebalance may come after the drain's final one.
                if offset > a.stats.committed.load(Ordering::Relaxed) {
                    let _ =
                        tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(offset));
                    committed.push((a.stats.clone(), offset));
                }
            }
        }
        self.commit_list(consumer, &tpl, committed).map(|_| ())
    }

    /// Commits `tpl` synchronously and shows the outcome: each partition's committed offset in
    /// `/topology` (`committed`, one entry per partition in `tpl`), and a failure or a commit
    /// that waits too long in `/health`. The number of partitions committed.
    fn commit_list(
        &self,
        consumer: &AggregatorConsumer,
        tpl: &TopicPartitionList,
        committed: Vec<(Arc<PartitionStats>, i64)>,
    ) -> KafkaResult<usize> {
        if tpl.count() == 0 {
            return Ok(0);
        }
        let started = Instant::now();
        let metrics = &self.pipeline.metrics;
        let stats = &self.pipeline.topology.committer;
        set(&stats.waiting_since, Some(started));
        let result = consumer.commit(tpl, CommitMode::Sync);
        set(&stats.waiting_since, None);
        match &result {
            Ok(()) => {
                metrics
                    .commit_latency
                    .observe(started.elapsed().as_secs_f64());
                for (partition, offset) in &committed {
                    partition.committed.store(*offset, Ordering::Relaxed);
                }
                set(&stats.last_fault, None);
            }
            Err(e) => {
                metrics.fault("commit");
                stats.failures.fetch_add(1, Ordering::Relaxed);
                set(&stats.last_fault, Some(e.to_string()));
            }
        }
        result.map(|()| committed.len())
    }

    /// Restarts partitions whose supervisor died: the committer forgets their in-flight records
    /// and names the lowest unfinished offset, the consumer rewinds there, and a new supervisor
    /// takes the records read again (dedup drops what was already applied).
    fn restart_dead(&self, consumer: &AggregatorConsumer) {
        let dead: Vec<TopicPartition> = match self.pipeline.topology.dead_partitions.lock() {
            Ok(mut dead) => std::mem::take(&mut *dead),
            Err(_) => return,
        };
        for tp in dead {
            let mut assigned = self.assigned();
            let Some(a) = assigned.get_mut(&tp) else {
                continue;
            };
            let (tx, rx) = std::sync::mpsc::channel();
            let (committer, for_reset) = (self.pipeline.committer.clone(), tp.clone());
            self.arbiter.spawn(async move {
                let _ = tx.send(
                    committer
                        .send(ResetPartition { tp: for_reset })
                        .await
                        .ok()
                        .flatten(),
                );
            });
            let Ok(committable) = rx.recv_timeout(self.drain_timeout) else {
                tracing::error!(%tp, "the committer did not answer; leaving the partition for a rebalance");
                continue;
            };
            a.stats.rewound();
            // A committer that lost its bookkeeping does not know the lowest unfinished offset:
            // everything before the last successful commit is durable, so read again from there.
            let committed = Some(a.stats.committed.load(Ordering::Relaxed)).filter(|c| *c >= 0);
            if let Some(offset) = committable.or(committed).or(a.first_offset) {
                if let Err(e) = consumer.seek(
                    &tp.topic,
                    tp.partition,
                    Offset::Offset(offset),
                    Duration::from_secs(10),
                ) {
                    tracing::error!(%tp, "rewinding to {offset} failed: {e}");
                }
                tracing::warn!(%tp, offset, "partition rewound after its supervisor died");
            }
            if a.stats.paused.swap(false, Ordering::Relaxed) {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&tp.topic, tp.partition);
                let _ = consumer.resume(&tpl);
            }
            let (pipeline, for_actor) = (self.pipeline.clone(), tp.clone());
            a.addr = PartitionSupervisor::start_in_arbiter(&self.arbiter, move |_| {
                PartitionSupervisor::new(for_actor, pipeline)
            });
            self.pipeline.metrics.supervisor_restarts.inc();
        }
    }

    /// Shows the group's committed offsets of newly assigned partitions in their figures, so that
    /// `/topology` is right before the first commit of this assignment.
    fn show_committed(&self, consumer: &AggregatorConsumer, tpl: &TopicPartitionList) {
        match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(committed) => {
                for e in committed.elements() {
                    let tp = TopicPartition::new(e.topic(), e.partition());
                    if let (Some(stats), Offset::Offset(o)) =
                        (self.pipeline.topology.partitions.get(&tp), e.offset())
                    {
                        stats.committed.store(o, Ordering::Relaxed);
                    }
                }
            }
            Err(e) => tracing::warn!("reading committed offsets of the assignment: {e}"),
        }
    }

    /// Brings the store's state of newly assigned partitions up to date from the changelog, and
    /// has the live actors of entities it changed reload their views.
    fn restore(&self, tpl: &TopicPartitionList) {
        let restorer = self.restorer.lock().unwrap_or_else(|p| p.into_inner());
        let Some((restorer, store)) = restorer.as_ref() else {
            return;
        };
        let partitions: Vec<i32> = {
            let assigned = self.assigned();
            let mut numbers: Vec<i32> = tpl
                .elements()
                .iter()
                .filter(|e| !assigned.contains_key(&TopicPartition::new(e.topic(), e.partition())))
                .map(|e| e.partition())
                .collect();
            numbers.sort_unstable();
            numbers.dedup();
            numbers
        };
        let started = Instant::now();
        match restorer.restore(store, &partitions) {
            Ok(restored) => {
                let topology = &self.pipeline.topology;
                topology
                    .dedup
                    .changelog_restored
                    .fetch_add(restored.records, Ordering::Relaxed);
                for key in &restored.keys {
                    topology.entities.passivate(key);
                }
                tracing::info!(
                    ?partitions,
                    records = restored.records,
                    entities = restored.keys.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "state of assigned partitions restored from the changelog"
                );
            }
            Err(e) => {
                tracing::error!(
                    ?partitions,
                    "restoring from the changelog failed; processing on the stored state: {e}"
                );
                self.pipeline.metrics.fault("changelog_restore");
                set(&self.pipeline.topology.consumer_fault, Some(e.to_string()));
            }
        }
    }

    fn assign(&self, tpl: &TopicPartitionList) {
        let mut assigned = self.assigned();
        for e in tpl.elements() {
            let tp = TopicPartition::new(e.topic(), e.partition());
            if assigned.contains_key(&tp) {
                continue;
            }
            let stats = self.pipeline.topology.partition(&tp);
            let (pipeline, for_actor) = (self.pipeline.clone(), tp.clone());
            let addr = PartitionSupervisor::start_in_arbiter(&self.arbiter, move |_| {
                PartitionSupervisor::new(for_actor, pipeline)
            });
            assigned.insert(
                tp,
                Assigned {
                    addr,
                    stats,
                    first_offset: None,
                    leader: NO_LEADER,
                },
            );
        }
        self.pipeline.topology.joined.store(true, Ordering::Relaxed);
    }
}

impl ClientContext for AggregatorContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", "{fac}: {message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", "{fac}: {message}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", "{fac}: {message}"),
            L::Debug => tracing::debug!(target: "librdkafka", "{fac}: {message}"),
        }
    }

    fn stats(&self, statistics: Statistics) {
        let brokers = statistics
            .brokers
            .values()
            .map(|b| (b.nodeid, b.name.as_str(), b.state.as_str()));
        let topology = &self.pipeline.topology;
        match broker_health(brokers) {
            None => {}
            // A fault the client reported before is over once a broker is up, also when no
            // record flows afterwards to clear it (the work may all be done).
            Some(Ok(())) => {
                set(&topology.brokers_down, None);
                set(&topology.consumer_fault, None);
            }
            Some(Err(down)) => set(&topology.brokers_down, Some(down)),
        }
        let mut assigned = self.assigned();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                let tp = TopicPartition::new(topic.as_str(), *partition);
                if let Some(stats) = self.pipeline.topology.partitions.get(&tp) {
                    if p.hi_offset >= 0 {
                        stats.high_watermark.store(p.hi_offset, Ordering::Relaxed);
                    }
                }
                if let Some(a) = assigned.get_mut(&tp) {
                    a.leader = p.leader;
                }
            }
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!("kafka client error: {error}: {reason}");
        self.pipeline.metrics.fault("broker");
        set(
            &self.pipeline.topology.consumer_fault,
            Some(format!("{error}: {reason}")),
        );
    }
}

impl ConsumerContext for AggregatorContext {
    fn pre_rebalance(&self, consumer: &AggregatorConsumer, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let tps: Vec<TopicPartition> = tpl
                .elements()
                .iter()
                .map(|e| TopicPartition::new(e.topic(), e.partition()))
                .collect();
            tracing::info!(partitions = tps.len(), "partitions revoked; draining");
            self.pipeline
                .metrics
                .partitions_revoked
                .inc_by(tps.len() as u64);
            self.drain(consumer, &tps);
        }
    }

    fn post_rebalance(&self, consumer: &AggregatorConsumer, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned");
                self.restore(tpl);
                self.assign(tpl);
                self.show_committed(consumer, tpl);
                // librdkafka keeps a partition's pause across a rebalance; the new supervisor
                // starts with nothing in flight, so it starts unpaused.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::warn!("resuming assigned partitions: {e}");
                }
            }
            Rebalance::Error(e) => tracing::warn!("rebalance error: {e}"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// The running consumer thread.
pub struct ConsumerThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    done: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl ConsumerThread {
    /// Creates the consumer, subscribes to every source topic and starts polling on a new thread.
    /// Supervisors are started on `arbiter`.
    pub fn start(
        config: &Config,
        pipeline: Arc<Pipeline>,
        sink: Arc<KafkaOffsetSink>,
        arbiter: ArbiterHandle,
        restorer: Option<(ChangelogRestorer, Store)>,
    ) -> Result<Self, ConsumerError> {
        let context = AggregatorContext {
            arbiter,
            pipeline: pipeline.clone(),
            assigned: Mutex::new(HashMap::new()),
            drain_timeout: Config::ms(config.tuning.drain_timeout_ms),
            restorer: Mutex::new(restorer),
            sink: sink.clone(),
        };
        let session_timeout = config.kafka.session_timeout_ms.to_string();
        let mut settings = vec![
            ("group.id", config.kafka.group_id.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", &config.kafka.auto_offset_reset),
            ("session.timeout.ms", &session_timeout),
            ("statistics.interval.ms", "1000"),
            // Range gives partition p of every topic to the same member: an entity's events and
            // its state (changelog partition p) stay together.
            ("partition.assignment.strategy", "range"),
        ];
        settings.extend(FETCH_SETTINGS);
        let client = config.kafka.consumer_client(&settings);
        let consumer: Arc<AggregatorConsumer> = Arc::new(client.create_with_context(context)?);
        let topics = pipeline.rules.topics();
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topic_refs)?;

        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let committing =
            spawn_commit_thread(consumer.clone(), sink.clone()).map_err(ConsumerError::Thread)?;
        let poll = PollLoop {
            consumer,
            committing,
            stop: stop.clone(),
            batch: config.tuning.poll_batch,
            window: config.tuning.max_in_flight_per_partition as i64,
        };
        let handle = std::thread::Builder::new()
            .name("kafka-consumer".into())
            .spawn(move || {
                poll.run();
                let _ = done_tx.send(());
            })
            .map_err(|e| {
                // The poll loop, which would have stopped it, never ran.
                sink.stop();
                ConsumerError::Thread(e)
            })?;
        Ok(ConsumerThread {
            stop,
            handle: Some(handle),
            done: Some(done_rx),
        })
    }

    /// Stops polling, drains every partition, commits and leaves the group. Awaiting does not
    /// block the actix thread, which the drain needs.
    pub async fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

struct PollLoop {
    consumer: Arc<AggregatorConsumer>,
    /// The thread that commits what the committer hands over; it ends after the final drain.
    committing: JoinHandle<()>,
    stop: Arc<AtomicBool>,
    batch: usize,
    window: i64,
}

impl PollLoop {
    fn run(self) {
        let context = self.consumer.context();
        while !self.stop.load(Ordering::Relaxed) {
            // Before polling: records fetched before a rewind must not reach the new supervisor.
            context.restart_dead(&self.consumer);
            let mut polled = PolledPartitions::default();
            let mut batches: Vec<Vec<Record>> = Vec::new();
            let mut taken = 0;
            let mut wait = Duration::from_millis(100);
            while taken < self.batch {
                match self.consumer.poll(wait) {
                    None => break,
                    Some(Ok(m)) => {
                        let (i, tp) = polled.of(m.topic(), m.partition());
                        let record = to_record(&m, tp.clone());
                        // Indices come in the order partitions are first seen: a new one is
                        // the next batch.
                        match batches.get_mut(i) {
                            Some(batch) => batch.push(record),
                            None => batches.push(vec![record]),
                        }
                        taken += 1;
                    }
                    Some(Err(e)) => {
                        tracing::warn!("consume error: {e}");
                        context.pipeline.metrics.fault("broker");
                        set(
                            &context.pipeline.topology.consumer_fault,
                            Some(e.to_string()),
                        );
                        break;
                    }
                }
                wait = Duration::ZERO;
            }
            if taken > 0 {
                set(&context.pipeline.topology.consumer_fault, None);
            }
            {
                let mut assigned = context.assigned();
                for (tp, records) in polled.into_partitions().into_iter().zip(batches) {
                    match assigned.get_mut(&tp) {
                        Some(a) => {
                            if a.first_offset.is_none() {
                                a.first_offset = records.first().map(|r| r.origin.offset);
                            }
                            deliver(&a.addr, &a.stats, &context.pipeline, records)
                        }
                        // Not ours any more: the new owner reads it again from the committed offset.
                        None => tracing::debug!(%tp, "records of an unassigned partition dropped"),
                    }
                }
            }
            self.flow_control();
        }
        let all: Vec<TopicPartition> = context.assigned().keys().cloned().collect();
        context.drain(&self.consumer, &all);
        context.sink.stop();
        if self.committing.join().is_err() {
            tracing::error!("the offset commit thread panicked");
        }
        self.consumer.unsubscribe();
        // Serve the (now empty) revoke callback so the group sees this member leave promptly.
        while self.consumer.poll(Duration::from_millis(10)).is_some() {}
        // librdkafka may keep the consumer, and so this context, a while longer.
        context
            .restorer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Pauses partitions whose in-flight window is full; resumes them once an eighth of it is
    /// free ([`flow`]).
    fn flow_control(&self) {
        let assigned = self.consumer.context().assigned();
        let (mut pause, mut resume) = (TopicPartitionList::new(), TopicPartitionList::new());
        let mut resumed = Vec::new();
        for (tp, a) in assigned.iter() {
            let in_flight = a.stats.in_flight.load(Ordering::Relaxed);
            let paused = a.stats.paused.load(Ordering::Relaxed);
            match flow(paused, in_flight, self.window) {
                Some(Flow::Pause) => {
                    pause.add_partition(&tp.topic, tp.partition);
                }
                Some(Flow::Resume) => {
                    resume.add_partition(&tp.topic, tp.partition);
                    resumed.push((tp, a.leader));
                }
                None => continue,
            };
            a.stats.paused.store(!paused, Ordering::Relaxed);
        }
        let wake: Vec<TopicPartition> = one_per_leader(&resumed).into_iter().cloned().collect();
        drop(assigned);
        if pause.count() > 0 {
            tracing::debug!(partitions = pause.count(), "pausing: in-flight window full");
            if let Err(e) = self.consumer.pause(&pause) {
                tracing::warn!("pause failed: {e}");
            }
        }
        if resume.count() > 0 {
            tracing::debug!(
                partitions = resume.count(),
                "resuming: an eighth of the in-flight window free"
            );
            if let Err(e) = self.consumer.resume(&resume) {
                tracing::warn!("resume failed: {e}");
            }
            // librdkafka decides to fetch a resumed partition only when the thread of its
            // leader's connection next wakes up, which, with all its partitions paused, is the
            // next answer from that broker or a second later: the pipeline sat empty for up to a
            // second after each drain. A request to each leader wakes its thread now; its
            // answer is not needed, so a short wait is enough.
            for tp in &wake {
                let _ = self
                    .consumer
                    .fetch_watermarks(&tp.topic, tp.partition, WAKE_TIMEOUT);
            }
        }
    }
}

/// Longest wait for the answer to a request that only wakes a broker connection's thread.
const WAKE_TIMEOUT: Duration = Duration::from_millis(100);

/// One partition of each leader among `resumed` (partition, leader), and every partition whose
/// leader is not known yet.
fn one_per_leader<'a>(resumed: &[(&'a TopicPartition, i32)]) -> Vec<&'a TopicPartition> {
    let mut leaders = std::collections::HashSet::new();
    resumed
        .iter()
        .filter(|(_, leader)| *leader == NO_LEADER || leaders.insert(*leader))
        .map(|(tp, _)| *tp)
        .collect()
}

/// Whether a broker the client has learned (`nodeid` 0 or more, not the bootstrap or internal
/// ones) is up, from (nodeid, name, state) in its statistics: `Err` with their states when none
/// is, `None` while none is known. A fault cleared as records flow would clear while records
/// fetched before an outage are still being polled, and librdkafka reports a broker's failure
/// once, not for as long as it lasts.
fn broker_health<'a>(
    brokers: impl Iterator<Item = (i32, &'a str, &'a str)>,
) -> Option<Result<(), String>> {
    let mut learned = brokers.filter(|(id, _, _)| *id >= 0).peekable();
    learned.peek()?;
    let mut states = Vec::new();
    for (_, name, state) in learned {
        if state == "UP" || state == "UPDATE" {
            return Some(Ok(()));
        }
        states.push(format!("{name} {state}"));
    }
    states.sort();
    Some(Err(format!("no broker is up: {}", states.join(", "))))
}

/// Sets a shared slot (a poisoned lock's value is still a value).
fn set<T>(slot: &Mutex<Option<T>>, value: Option<T>) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = value;
}

/// The partitions of the messages one poll returned, each named once: the records of a partition
/// share its name instead of each allocating a copy, and are grouped by it without hashing it.
#[derive(Default)]
pub struct PolledPartitions {
    partitions: Vec<TopicPartition>,
    /// The index found last: a fetch returns a partition's messages one after the other.
    last: usize,
}

impl PolledPartitions {
    /// The index of partition `partition` of `topic`, in the order partitions were first seen,
    /// and its name.
    pub fn of(&mut self, topic: &str, partition: i32) -> (usize, &TopicPartition) {
        let same = |tp: &TopicPartition| tp.partition == partition && *tp.topic == *topic;
        if !self.partitions.get(self.last).is_some_and(same) {
            self.last = match self.partitions.iter().position(same) {
                Some(i) => i,
                None => {
                    self.partitions.push(TopicPartition::new(topic, partition));
                    self.partitions.len() - 1
                }
            };
        }
        (self.last, &self.partitions[self.last])
    }

    /// The partitions seen, in the order of their indices.
    pub fn into_partitions(self) -> Vec<TopicPartition> {
        self.partitions
    }
}

/// Copies a polled message of partition `tp` into a record the actors own.
pub fn to_record(m: &BorrowedMessage<'_>, tp: TopicPartition) -> Record {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .filter_map(|h| Some((h.key.to_string(), h.value?.to_vec())))
                .collect()
        })
        .unwrap_or_default();
    Record {
        origin: Origin {
            tp,
            offset: m.offset(),
        },
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(RecordValue::new),
        headers,
        timestamp_ms: m.timestamp().to_millis(),
        finished: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_records_of_a_partition_share_its_name_and_index() {
        let mut polled = PolledPartitions::default();
        let seen: Vec<(usize, TopicPartition)> = [("a", 0), ("a", 0), ("b", 0), ("a", 1), ("a", 0)]
            .into_iter()
            .map(|(topic, partition)| {
                let (i, tp) = polled.of(topic, partition);
                (i, tp.clone())
            })
            .collect();
        let indices: Vec<usize> = seen.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, [0, 0, 1, 2, 0], "in the order first seen");
        assert!(
            Arc::ptr_eq(&seen[0].1.topic, &seen[4].1.topic),
            "one copy of the name"
        );
        assert_eq!(seen[3].1, TopicPartition::new("a", 1));
        let partitions = polled.into_partitions();
        assert_eq!(
            partitions,
            [
                TopicPartition::new("a", 0),
                TopicPartition::new("b", 0),
                TopicPartition::new("a", 1)
            ]
        );
    }

    #[test]
    fn each_leader_of_resumed_partitions_is_woken_once() {
        let tp = |p| TopicPartition::new("t", p);
        let (a, b, c, d, e) = (tp(0), tp(1), tp(2), tp(3), tp(4));
        let resumed = [(&a, 1), (&b, 2), (&c, 1), (&d, NO_LEADER), (&e, NO_LEADER)];
        let woken: Vec<i32> = one_per_leader(&resumed)
            .into_iter()
            .map(|tp| tp.partition)
            .collect();
        assert_eq!(
            woken,
            vec![0, 1, 3, 4],
            "leader 1 once, unknown leaders each"
        );
        assert!(one_per_leader(&[]).is_empty());
    }

    #[test]
    fn brokers_are_down_only_while_every_learned_one_is_not_up() {
        let bootstrap = (-1, "127.0.0.1:9092/bootstrap", "DOWN");
        assert_eq!(
            broker_health([bootstrap].into_iter()),
            None,
            "none learned yet"
        );
        assert_eq!(
            broker_health([bootstrap, (1, "b1:9092/1", "UP")].into_iter()),
            Some(Ok(()))
        );
        assert_eq!(
            broker_health([(1, "b1:9092/1", "CONNECT"), (2, "b2:9092/2", "UPDATE")].into_iter()),
            Some(Ok(())),
            "one broker up is enough"
        );
        assert_eq!(
            broker_health(
                [
                    (2, "b2:9092/2", "CONNECT"),
                    bootstrap,
                    (1, "b1:9092/1", "DOWN")
                ]
                .into_iter()
            ),
            Some(Err(
                "no broker is up: b1:9092/1 DOWN, b2:9092/2 CONNECT".to_string()
            ))
        );
    }

    #[test]
    fn a_full_window_pauses_and_an_eighth_free_resumes() {
        assert_eq!(flow(false, 2_000, 2_000), Some(Flow::Pause));
        assert_eq!(flow(false, 1_999, 2_000), None);
        assert_eq!(
            flow(true, 1_751, 2_000),
            None,
            "still paused short of an eighth free"
        );
        assert_eq!(flow(true, 1_750, 2_000), Some(Flow::Resume));
        assert_eq!(flow(true, 2_500, 2_000), None);
        assert_eq!(flow(false, 0, 2_000), None);
        // A window of one still pauses when full and resumes only when empty.
        assert_eq!(flow(false, 1, 1), Some(Flow::Pause));
        assert_eq!(flow(true, 1, 1), None);
        assert_eq!(flow(true, 0, 1), Some(Flow::Resume));
    }
}
