//! The dedup actor: owns the store and its ledger (see [`crate::ledger`], through which entity
//! actors check message ids and stage their views), and writes each event's marker together with
//! the view it produced in one atomic batch (group commit on an interval; a large write is applied
//! in parts of 2,048 views, each with its views' markers, so that view loads take turns
//! with them). Offsets complete only after every part of the write that covers them is flushed.
//! Each write's views go to the changelog first, and a write is stored only once the broker has
//! acknowledged them.
//! Writes are pipelined: one is encoded on a blocking thread and queued for the changelog while
//! the one before it waits for its acknowledgements and the one before that is written to the
//! store; meanwhile the ledger stages the next and answers checks and loads from the writes
//! under way until each is stored. It runs on a thread of its own, so
//! that its bookkeeping does not take the entity actors' thread; views are read for starting
//! actors by the [`crate::view_loader`].
//!
//! It runs under an actix `Supervisor`: killed, it restarts with its address and mailbox kept but
//! what it had staged lost: on the actors' thread, between two of their messages, it resets the
//! ledger, fences off every entity actor that may hold a view with effects that never reached the
//! store, and has every partition rewound to its lowest unfinished offset (a supervisor started
//! before the reset routes nothing more); the records read again are checked against the store's
//! markers, so none counts twice. A store write already running when it restarts is waited for,
//! so that no view loaded after the restart misses an effect whose marker is stored.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use std::future::Future;

use crate::aggregate::Aggregate;
use crate::changelog::{Acks, ChangelogBundler, ChangelogRecord, ChangelogSink};
use crate::kill::{injected_panic, Kill};
use crate::ledger::{Ledger, Staged, Taken};
use crate::metrics::Metrics;
use crate::offset_committer::Completed;
use crate::partition_supervisor::rewind_all_partitions;
use crate::record::Origin;
use crate::store::{Store, StoreError, WriteBatch};
use crate::topology::Topology;
use crate::view_codec;

/// Longest wait between retries of a failed flush.
const FLUSH_RETRY_MAX: Duration = Duration::from_secs(5);

/// How long a store write or flush may be under way before `/health` reports the store stuck;
/// one normally takes milliseconds, a large one under load a second or two.
const STORE_STALL_AFTER: Duration = Duration::from_secs(30);

/// The current view of `key` if it exists (staged or stored), for readers such as the HTTP API.
#[derive(Message)]
#[rtype(result = "Result<Option<Aggregate>, StoreError>")]
pub struct Peek {
    /// Entity key.
    pub key: String,
}

/// Writes and flushes what is staged, then hands the store back so that it is closed
/// deterministically; the actor answers `StoreError::Released` from then on.
#[derive(Message)]
#[rtype(result = "Result<Store, StoreError>")]
pub struct Release;

/// Writes and flushes everything staged now; resolves when it is durable.
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct FlushNow;

/// Views in one atomic part of a write: a part holds its views with the markers of the events
/// they hold, so a write may be applied a part at a time, and view loads take turns with the
/// parts instead of waiting for the whole write (sled's batch blocks every read). Larger parts
/// are faster where many views are loaded: with 1,000,000 keys, 2,048 read 43,463-48,362
/// events/s against 36,103-43,282 with 512 (seven runs against five, about 10-15%), and more
/// than 2,048 gained nothing; with 100,000 keys, and at an offered 20,000/s (where a write
/// seldom fills a part), the figures, store size and restart times did not move
/// (docs/benchmarks.md, "Parts of 2,048 views, and what holds the memory"). Parts of 256 grew
/// the store by 30% (each batch costs sled log space of its own).
const VIEWS_PER_PART: usize = 2048;

/// A taken write, encoded: the store batches of its parts and the changelog records of its
/// views.
struct Encoded {
    parts: Vec<WriteBatch>,
    records: Vec<ChangelogRecord>,
}

/// Encodes a taken write into store batches of [`VIEWS_PER_PART`] views each (one at least),
/// every view with the markers of the events it holds, and, with a changelog, its records.
///
/// A view's changelog record also carries the markers the view had in `earlier` writes, those
/// still under way: their records are queued before this one's but may yet be refused, and a
/// view must never reach the changelog without the markers of every effect it holds (another
/// instance restoring it would apply those events again).
fn encode(
    staged: &Staged,
    earlier: &[Arc<Staged>],
    changelog: bool,
) -> Result<Encoded, StoreError> {
    let mut parts = Vec::with_capacity(staged.views.len().div_ceil(VIEWS_PER_PART));
    let mut part = WriteBatch::default();
    let mut bundler = changelog.then(ChangelogBundler::default);
    let mut carried = Vec::new();
    for (view, markers) in staged.views.values() {
        if part.views == VIEWS_PER_PART {
            parts.push(std::mem::take(&mut part));
        }
        let encoded = view_codec::encode(view).map_err(|e| StoreError::Write(e.to_string()))?;
        if let Some(bundler) = &mut bundler {
            carried.clear();
            for write in earlier {
                if let Some((_, ids)) = write.views.get(&view.key) {
                    carried.extend_from_slice(ids);
                }
            }
            if carried.is_empty() {
                bundler.add(view, &encoded, markers);
            } else {
                carried.extend_from_slice(markers);
                bundler.add(view, &encoded, &carried);
            }
        }
        for id in markers {
            part.add_marker(view.partition, id);
        }
        part.put_encoded_view(&view.key, encoded);
    }
    // The last part, empty for a write without views: it still carries the changelog offsets.
    parts.push(part);
    let records = bundler.map(ChangelogBundler::finish).unwrap_or_default();
    Ok(Encoded { parts, records })
}

/// A write encoded and its views queued for the changelog: the store batches of its parts, the
/// number of views sent, and what resolves, once the broker has them, with the changelog offset
/// each changelog partition reached (`None` without a changelog).
type Prepared = (Vec<WriteBatch>, u64, Option<Acks>);

/// Encodes a write on a blocking thread (its views are snapshots the entity actors no longer
/// change) and queues its views for the changelog, if any.
async fn prepare(
    staged: Arc<Staged>,
    earlier: Vec<Arc<Staged>>,
    changelog: Option<Arc<dyn ChangelogSink>>,
) -> Result<Prepared, WriteFailure> {
    let with_changelog = changelog.is_some();
    let encoded = tokio::task::spawn_blocking(move || encode(&staged, &earlier, with_changelog))
        .await
        .unwrap_or_else(|panicked| Err(StoreError::Write(panicked.to_string())));
    let Encoded { parts, records } = encoded.map_err(WriteFailure::Store)?;
    let sent = records.iter().map(|r| r.entries as u64).sum();
    let acks = match &changelog {
        Some(sink) if !records.is_empty() => {
            Some(sink.send(records).await.map_err(WriteFailure::Changelog)?)
        }
        _ => None,
    };
    Ok((parts, sent, acks))
}

/// The changelog offsets a write's acknowledgements report; none without a changelog.
async fn acknowledged(acks: Option<Acks>) -> Result<HashMap<i32, i64>, WriteFailure> {
    match acks {
        Some(acks) => acks.await.map_err(WriteFailure::Changelog),
        None => Ok(HashMap::new()),
    }
}

/// Text of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "the store write panicked".into())
}

/// Writes under way at most: one being encoded, one waiting for the changelog's
/// acknowledgements, and one in its store stage.
const MAX_WRITES_IN_FLIGHT: usize = 3;

/// Set while a write is being encoded and queued for the changelog: the next is taken only once
/// it is done, so that each write carries what was staged meanwhile and its changelog records
/// are queued after this one's.
struct Preparing(Arc<AtomicBool>);

impl Preparing {
    fn start(flag: &Arc<AtomicBool>) -> Self {
        flag.store(true, Ordering::Release);
        Preparing(flag.clone())
    }
}

impl Drop for Preparing {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// [`FlushNow`]s waiting for a write to be durable.
type Waiters = Vec<tokio::sync::oneshot::Sender<Result<(), StoreError>>>;

fn notify_all(waiters: Waiters, result: Result<(), StoreError>) {
    for tx in waiters {
        let _ = tx.send(match &result {
            Ok(()) => Ok(()),
            Err(e) => Err(StoreError::Write(e.to_string())),
        });
    }
}

/// Why a write in flight did not reach the store.
enum WriteFailure {
    Changelog(crate::changelog::ChangelogError),
    Store(StoreError),
    /// The actor restarted while the write was under way: the work is redone.
    Restarted,
    /// An earlier write failed and put this one back with its own work.
    PutBack,
}

/// Counts store writes running off the actor's thread, so that a restarting dedup actor can wait
/// until none is: a view it loads afterwards then holds every effect whose marker is stored.
#[derive(Default)]
struct WriteGate {
    running: Mutex<usize>,
    idle: std::sync::Condvar,
}

/// A write in progress; leaves the gate when dropped.
struct Entered(Arc<WriteGate>);

impl WriteGate {
    fn enter(self: &Arc<Self>) -> Entered {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        Entered(self.clone())
    }

    fn wait_idle(&self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        while *running > 0 {
            running = self.idle.wait(running).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let mut running = self.0.running.lock().unwrap_or_else(|p| p.into_inner());
        *running -= 1;
        if *running == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// The dedup actor.
pub struct DedupActor {
    store: Option<Store>,
    /// What is staged and being written, shared with the entity actors.
    ledger: Arc<Ledger>,
    committer: Recipient<Completed>,
    topology: Arc<Topology>,
    metrics: Arc<Metrics>,
    interval: Duration,
    /// Where each written view is published first, if state follows partitions between instances.
    changelog: Option<Arc<dyn ChangelogSink>>,
    /// `FlushNow`s waiting for the next write.
    flush_waiters: Waiters,
    /// Whether the store operation now stuck was logged already.
    stall_reported: bool,
    /// Store writes running on other threads.
    gate: Arc<WriteGate>,
    /// The arbiter the entity actors and partition supervisors run on: a restart resets the ledger
    /// there, between two of their messages.
    actors: ArbiterHandle,
    /// No write is taken before the ledger reaches this generation (a restart's reset is pending).
    resume_at: u64,
    /// Restarts so far: a write whose changelog send resolves after a restart is dropped.
    epoch: u64,
    /// The same, for the write's future.
    shared_epoch: Arc<std::sync::atomic::AtomicU64>,
    /// A write is being encoded and sent to the changelog.
    preparing: Arc<AtomicBool>,
    /// Resolves when the store stage of the last write taken ends: the next write's waits for it.
    store_turn: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl DedupActor {
    /// A dedup actor over `store` and its `ledger`, flushing every `interval` and reporting to
    /// `committer`; the entity actors run on `actors`.
    pub fn new(
        store: Store,
        ledger: Arc<Ledger>,
        actors: ArbiterHandle,
        committer: Recipient<Completed>,
        topology: Arc<Topology>,
        metrics: Arc<Metrics>,
        interval: Duration,
    ) -> Self {
        DedupActor {
            store: Some(store),
            ledger,
            committer,
            topology,
            metrics,
            interval,
            changelog: None,
            flush_waiters: Vec::new(),
            stall_reported: false,
            gate: Arc::default(),
            actors,
            resume_at: 0,
            epoch: 0,
            shared_epoch: Arc::default(),
            preparing: Arc::default(),
            store_turn: None,
        }
    }

    /// Publishes every written view to `sink` before it is written to the store.
    pub fn with_changelog(mut self, sink: Arc<dyn ChangelogSink>) -> Self {
        self.changelog = Some(sink);
        self
    }

    /// Writes what is staged, off the actor's thread, as a pipeline: encoding one write and
    /// queueing its changelog records overlap the wait for the acknowledgements of the write
    /// before it (the broker has a write before the store does) and the store stage of the one
    /// before that; store stages run one at a time, in the order the writes were taken, and each
    /// is followed by a flush that completes the records it covers.
    /// Meanwhile the ledger answers checks and loads from the writes under way.
    fn write_staged(&mut self, ctx: &mut Context<Self>) {
        if self.ledger.generation() < self.resume_at
            || self.preparing.load(Ordering::Acquire)
            || self.ledger.writes_in_flight() >= MAX_WRITES_IN_FLIGHT
        {
            return; // the next tick, or the end of a write, takes the next
        }
        let waiters = std::mem::take(&mut self.flush_waiters);
        let Some(store) = self.store.clone() else {
            return notify_all(waiters, Err(StoreError::Released));
        };
        let Some(Taken {
            seq,
            staged,
            earlier,
        }) = self.ledger.take()
        else {
            if self.ledger.writes_in_flight() == 0 {
                if !waiters.is_empty() {
                    self.flush_then(ctx, Vec::new(), waiters);
                }
            } else {
                // Answered once the writes under way are durable, not before.
                self.flush_waiters = waiters;
            }
            return;
        };
        let (topology, metrics) = (self.topology.clone(), self.metrics.clone());
        let (ledger, changelog) = (self.ledger.clone(), self.changelog.clone());
        let (epoch, shared_epoch, gate) =
            (self.epoch, self.shared_epoch.clone(), self.gate.clone());
        let preparing = Preparing::start(&self.preparing);
        // This write's store stage follows the previous write's, which the next write waits for.
        let (stored, store_turn) = tokio::sync::oneshot::channel::<()>();
        let previous = self.store_turn.replace(store_turn);
        let write = async move {
            let started = Instant::now();
            // Queued for the changelog, the next write may be taken and queued behind it while
            // the broker acknowledges this one; the store stage still waits for the
            // acknowledgements, so that the store never holds a view the changelog lacks.
            let prepared = prepare(staged, earlier, changelog).await;
            drop(preparing);
            let prepared = match prepared {
                Ok((parts, sent, acks)) => acknowledged(acks).await.map(|ends| (parts, sent, ends)),
                Err(failure) => Err(failure),
            };
            let prepared_at = started.elapsed();
            if let Some(previous) = previous {
                let _ = previous.await; // resolves when that store stage ends, however it ends
            }
            if shared_epoch.load(Ordering::Relaxed) != epoch {
                return Err(WriteFailure::Restarted);
            }
            if !ledger.is_in_flight(seq) {
                // An earlier write failed and took this one back with it.
                return Err(WriteFailure::PutBack);
            }
            let (mut parts, sent, ends) = match prepared {
                Ok(prepared) => prepared,
                Err(failure) => {
                    ledger.put_back(seq);
                    return Err(failure);
                }
            };
            // The store holds the changelog up to these offsets once every part is applied.
            if let Some(last) = parts.last_mut() {
                for (partition, next) in ends {
                    last.set_changelog_offset(partition, next);
                }
            }
            let (markers, views) = parts.iter().fold((0, 0), |(m, v), part| {
                (m + part.markers as u64, v + part.views as u64)
            });
            // Entered here, on the actor's thread, so that a restart can wait for it to end.
            let entered = gate.enter();
            let ledger_after = ledger.clone();
            // Counted by the blocking task itself: the actor may restart, and drop this future,
            // while the write runs to its end.
            let written = tokio::task::spawn_blocking(move || {
                let _entered = entered;
                let _stored = stored;
                let writing = Instant::now();
                // A panic is caught here, so that the work is put back before the next write's
                // store stage may begin.
                // A part applied before one that fails stays applied: its views and markers
                // agree. The write is taken back and written again whole later; its markers
                // already stored are not added twice, and its views are replaced.
                let written = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    parts
                        .into_iter()
                        .try_fold(0, |expired, part| Ok(expired + store.write(part)?))
                }))
                .unwrap_or_else(|panic| Err(StoreError::Write(panic_message(&panic))));
                let expired = match written {
                    Ok(expired) => expired,
                    Err(e) => {
                        ledger.put_back(seq);
                        return Err(WriteFailure::Store(e));
                    }
                };
                tracing::debug!(
                    views,
                    prepare_ms = prepared_at.as_millis() as u64,
                    store_ms = writing.elapsed().as_millis() as u64,
                    "write stored"
                );
                let Some((done, applied)) = ledger.written(seq) else {
                    return Err(WriteFailure::Restarted);
                };
                let stats = &topology.dedup;
                stats.changelog_sent.fetch_add(sent, Ordering::Relaxed);
                stats.markers_expired.fetch_add(expired, Ordering::Relaxed);
                stats.markers_written.fetch_add(markers, Ordering::Relaxed);
                stats.views_written.fetch_add(views, Ordering::Relaxed);
                for source in applied {
                    metrics.source(source).applied.inc();
                }
                Ok(done)
            })
            .await;
            written.unwrap_or_else(|panicked| {
                // Past the store write: nothing is left to put back unless it never ran.
                ledger_after.put_back(seq);
                Err(WriteFailure::Store(StoreError::Write(panicked.to_string())))
            })
        };
        ctx.spawn(write.into_actor(self).map(move |res, act, ctx| {
            if act.epoch != epoch {
                return notify_all(
                    waiters,
                    Err(StoreError::Write("the dedup actor restarted".into())),
                );
            }
            match res {
                Ok(done) => act.flush_then(ctx, done, waiters),
                Err(failure) => {
                    let e = match failure {
                        WriteFailure::Changelog(e) => {
                            act.metrics.fault("changelog");
                            StoreError::Write(e.to_string())
                        }
                        WriteFailure::Store(e) => {
                            act.metrics.fault("store_write");
                            e
                        }
                        WriteFailure::Restarted => StoreError::Write("restarted".into()),
                        WriteFailure::PutBack => {
                            StoreError::Write("an earlier write failed".into())
                        }
                    };
                    tracing::warn!("write failed, will retry: {e}");
                    act.topology.dedup.set_fault(Some(e.to_string()));
                    notify_all(waiters, Err(e));
                }
            }
            if !act.flush_waiters.is_empty() {
                act.write_staged(ctx);
            }
        }));
    }

    fn flush_then(&mut self, ctx: &mut Context<Self>, origins: Vec<Origin>, waiters: Waiters) {
        ctx.spawn(
            self.flush_and_complete(origins)
                .into_actor(self)
                .map(move |res, _, _| notify_all(waiters, res)),
        );
    }

    /// Flushes the store until it succeeds, then completes `done`.
    fn flush_and_complete(
        &self,
        done: Vec<Origin>,
    ) -> impl Future<Output = Result<(), StoreError>> + 'static {
        let store = self.store.clone();
        let committer = self.committer.clone();
        let topology = self.topology.clone();
        let metrics = self.metrics.clone();
        async move {
            let Some(store) = store else {
                return Err(StoreError::Released);
            };
            let started = Instant::now();
            let mut delay = Duration::from_millis(10);
            while let Err(e) = store.flush().await {
                tracing::warn!("store flush failed, retrying in {delay:?}: {e}");
                metrics.fault("store_flush");
                topology.dedup.set_fault(Some(e.to_string()));
                actix::clock::sleep(delay).await;
                delay = (delay * 2).min(FLUSH_RETRY_MAX);
            }
            metrics
                .flush_latency
                .observe(started.elapsed().as_secs_f64());
            let stats = &topology.dedup;
            stats.flushes.fetch_add(1, Ordering::Relaxed);
            stats
                .store_bytes
                .store(store.size_on_disk(), Ordering::Relaxed);
            stats.set_fault(None);
            tracing::debug!(
                records = done.len(),
                flush_ms = started.elapsed().as_millis() as u64,
                "write durable"
            );
            if !done.is_empty() {
                committer.do_send(Completed { origins: done });
            }
            Ok(())
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let stall = self
            .store
            .as_ref()
            .and_then(|store| store.stalled(STORE_STALL_AFTER));
        match stall {
            Some(stall) => {
                if !self.stall_reported {
                    tracing::error!("{stall}: the store is not answering");
                    self.metrics.fault("store_stall");
                    self.stall_reported = true;
                }
                // Until the operation ends and a flush succeeds, which clears it.
                self.topology.dedup.set_fault(Some(stall));
            }
            None => self.stall_reported = false,
        }
        self.write_staged(ctx);
    }
}

impl Actor for DedupActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.interval, Self::tick);
    }
}

impl Supervised for DedupActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        if self.store.is_none() {
            return; // released at shutdown: nothing to recover
        }
        tracing::warn!(
            "dedup actor restarted; its staged work is lost and every partition is rewound"
        );
        self.epoch += 1;
        self.shared_epoch.store(self.epoch, Ordering::Relaxed);
        // A write already under way lands first, so that views loaded from now on hold it.
        self.gate.wait_idle();
        self.topology.dedup.restarts.fetch_add(1, Ordering::Relaxed);
        self.metrics.actor_restarts("dedup");
        // On the actors' thread, as one step between two of their messages: no entity actor
        // stages into the ledger once it is reset, and every partition supervisor is told to die
        // before it handles another record. Nothing is written until then.
        self.resume_at = self.ledger.generation() + 1;
        let (ledger, topology) = (self.ledger.clone(), self.topology.clone());
        self.actors.spawn(async move {
            let entities = &topology.entities;
            ledger.reset(|| entities.last_incarnation());
            entities.passivate_all();
            rewind_all_partitions(&topology);
        });
    }
}

/// Its staged markers and views are lost; see the module docs for the recovery.
impl Handler<Kill> for DedupActor {
    type Result = ();

    fn handle(&mut self, msg: Kill, ctx: &mut Self::Context) {
        injected_panic(msg, || "the dedup actor".to_string());
        ctx.stop();
    }
}

impl Handler<FlushNow> for DedupActor {
    type Result = ResponseActFuture<Self, Result<(), StoreError>>;

    fn handle(&mut self, _: FlushNow, ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.flush_waiters.push(tx);
        self.write_staged(ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Released)) }.into_actor(self))
    }
}

impl Handler<Peek> for DedupActor {
    type Result = Result<Option<Aggregate>, StoreError>;

    fn handle(&mut self, msg: Peek, _: &mut Self::Context) -> Self::Result {
        Ok(self.ledger.load(&msg.key)?.map(Arc::unwrap_or_clone))
    }
}

impl Handler<Release> for DedupActor {
    type Result = ResponseActFuture<Self, Result<Store, StoreError>>;

    fn handle(&mut self, _: Release, ctx: &mut Self::Context) -> Self::Result {
        let flushed = self.handle(FlushNow, ctx);
        Box::pin(flushed.map(|res, act, _| {
            res?;
            act.ledger.release();
            act.store.take().ok_or(StoreError::Released)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::{ChangelogEntry, ChangelogError, SendFuture};
    use crate::ledger::Applied;
    use crate::record::TopicPartition;
    use crate::rules::{Rules, SourceConfig};
    use tokio::sync::oneshot;

    /// A changelog that queues each send at once and acknowledges it, or refuses it, when the
    /// test says.
    #[derive(Default)]
    struct HeldChangelog {
        /// Each send's entries (entity key and markers, by key) and the answer it waits for.
        sends: Mutex<Vec<(Vec<(String, Vec<String>)>, Option<oneshot::Sender<bool>>)>>,
    }

    impl HeldChangelog {
        /// The entity keys of each send, sorted.
        fn sends(&self) -> Vec<Vec<String>> {
            let sends = self.sends.lock().expect("not poisoned");
            let keys = |entries: &Vec<(String, Vec<String>)>| {
                entries.iter().map(|(key, _)| key.clone()).collect()
            };
            sends.iter().map(|(entries, _)| keys(entries)).collect()
        }

        /// The markers that send `send` carried with the view of `key`.
        fn markers(&self, send: usize, key: &str) -> Vec<String> {
            let sends = self.sends.lock().expect("not poisoned");
            let entry = sends[send].0.iter().find(|(k, _)| k == key);
            entry.expect("the key was sent").1.clone()
        }

        fn answer(&self, send: usize, acknowledged: bool) {
            let mut sends = self.sends.lock().expect("not poisoned");
            let answer = sends[send].1.take().expect("answered once");
            answer.send(acknowledged).expect("the write waits for it");
        }
    }

    impl ChangelogSink for HeldChangelog {
        fn send(&self, records: Vec<ChangelogRecord>) -> SendFuture {
            let mut entries: Vec<(String, Vec<String>)> = records
                .iter()
                .flat_map(|r| {
                    ChangelogEntry::decode_all(r.partition, 0, &r.value).expect("decodes")
                })
                .map(|e| (e.view.key, e.markers))
                .collect();
            entries.sort();
            let (tx, rx) = oneshot::channel();
            self.sends
                .lock()
                .expect("not poisoned")
                .push((entries, Some(tx)));
            Box::pin(async move {
                let acks: Acks = Box::pin(async move {
                    match rx.await {
                        Ok(true) => Ok(HashMap::from([(0, 1)])),
                        _ => Err(ChangelogError::Send("refused by the test".into())),
                    }
                });
                Ok(acks)
            })
        }
    }

    /// Stands in for the offset committer: keeps the offsets completed.
    struct Completions(Arc<Mutex<Vec<i64>>>);

    impl Actor for Completions {
        type Context = Context<Self>;
    }

    impl Handler<Completed> for Completions {
        type Result = ();

        fn handle(&mut self, msg: Completed, _: &mut Self::Context) {
            let offsets = msg.origins.iter().map(|o| o.offset);
            self.0.lock().expect("not poisoned").extend(offsets);
        }
    }

    /// Stages a view of `key` as applying event `id`, read at `offset` of partition 0.
    fn stage(ledger: &Ledger, key: &str, id: &str, offset: i64) {
        let mut view = view(key, 0);
        let staged = ledger.fold_and_stage(&mut view, 1, |view| {
            view.events_applied += 1;
            Ok::<_, String>(Applied {
                partition: 0,
                message_id: id.into(),
                origin: Origin {
                    tp: TopicPartition::new("t", 0),
                    offset,
                },
                source: 0,
            })
        });
        assert_eq!(staged, Ok(true), "staged");
    }

    /// Waits until `done` holds; fails the test after 10 s.
    async fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            actix::clock::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A dedup actor writing every millisecond to a fresh store, through a [`HeldChangelog`],
    /// completing into the list returned; it lives while its address does.
    #[allow(clippy::type_complexity)]
    fn started_with_held_changelog() -> (
        Addr<DedupActor>,
        tempfile::TempDir,
        Store,
        Arc<Ledger>,
        Arc<HeldChangelog>,
        Arc<Mutex<Vec<i64>>>,
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let topology = Arc::new(Topology::default());
        let source = SourceConfig {
            name: "a".into(),
            topic: "t".into(),
            key_pointer: None,
            delete_codes: Vec::new(),
        };
        let metrics = Arc::new(Metrics::new(
            &Rules::new(vec![source], Vec::new()).expect("rules"),
        ));
        let ledger = Arc::new(Ledger::new(store.clone(), topology.clone()));
        let completed = Arc::new(Mutex::new(Vec::new()));
        let committer = Completions(completed.clone()).start();
        let changelog = Arc::new(HeldChangelog::default());
        let dedup = DedupActor::new(
            store.clone(),
            ledger.clone(),
            Arbiter::current(),
            committer.recipient(),
            topology,
            metrics,
            Duration::from_millis(1),
        )
        .with_changelog(changelog.clone())
        .start();
        (dedup, dir, store, ledger, changelog, completed)
    }

    /// Stages event `m1` of key `a`, waits for its write to be sent, then stages event `m2` of
    /// `second` and waits for its write to be queued behind the first, unacknowledged.
    async fn two_writes_queued(ledger: &Ledger, changelog: &HeldChangelog, second: &str) {
        stage(ledger, "a", "m1", 1);
        wait_until("the first write sent", || changelog.sends().len() == 1).await;
        stage(ledger, second, "m2", 2);
        wait_until("the second write queued behind the first", || {
            changelog.sends().len() == 2
        })
        .await;
    }

    /// Refuses the first of the two sends and acknowledges the second; waits for the writes put
    /// back to be sent again.
    async fn refuse_the_first(changelog: &HeldChangelog) {
        changelog.answer(0, false);
        changelog.answer(1, true);
        wait_until("the put-back writes sent again", || {
            changelog.sends().len() == 3
        })
        .await;
    }

    #[actix_rt::test]
    async fn a_view_queued_behind_an_unacknowledged_write_carries_the_markers_it_had_there() {
        let (_dedup, _dir, store, ledger, changelog, completed) = started_with_held_changelog();
        two_writes_queued(&ledger, &changelog, "a").await;
        // Were the first refused and the second taken, the second alone must still say that its
        // view holds both events.
        assert_eq!(changelog.markers(0, "a"), ["m1"]);
        assert_eq!(changelog.markers(1, "a"), ["m1", "m2"]);

        refuse_the_first(&changelog).await;
        assert_eq!(changelog.markers(2, "a"), ["m1", "m2"]);
        changelog.answer(2, true);
        wait_until("both records completed", || {
            completed.lock().expect("not poisoned").len() == 2
        })
        .await;
        let stored = |id: &str| store.has_marker(0, id).expect("read");
        assert!(stored("m1") && stored("m2"));
    }

    #[actix_rt::test]
    async fn a_write_is_queued_for_the_changelog_behind_one_unacknowledged_and_stored_after_its_acknowledgements(
    ) {
        let (_dedup, _dir, store, ledger, changelog, completed) = started_with_held_changelog();
        let stored = |id: &str| store.has_marker(0, id).expect("read");

        two_writes_queued(&ledger, &changelog, "b").await;
        assert!(
            !stored("m1") && !stored("m2"),
            "nothing stored unacknowledged"
        );

        // The first is refused: both go back, the second though acknowledged, and out again
        // together; the store holds neither meanwhile.
        refuse_the_first(&changelog).await;
        assert_eq!(changelog.sends()[2], ["a", "b"]);
        assert!(
            !stored("m1") && !stored("m2"),
            "nothing stored unacknowledged"
        );
        assert!(completed.lock().expect("not poisoned").is_empty());

        changelog.answer(2, true);
        wait_until("both records completed", || {
            completed.lock().expect("not poisoned").len() == 2
        })
        .await;
        assert!(stored("m1") && stored("m2"), "stored once acknowledged");
        for key in ["a", "b"] {
            let view = store.load(key).expect("read").expect("stored");
            assert_eq!(view.events_applied, 1, "{key}");
        }
        let mut offsets = completed.lock().expect("not poisoned").clone();
        offsets.sort();
        assert_eq!(offsets, [1, 2]);
    }

    fn view(key: &str, events: u64) -> Arc<Aggregate> {
        let mut view = Aggregate::new(key, 0);
        view.events_applied = events;
        Arc::new(view)
    }

    #[test]
    fn a_write_stores_each_view_and_sends_each_to_the_changelog() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let mut staged = Staged::default();
        staged.views.insert(
            "new".into(),
            (view("new", 2), vec!["m1".into(), "m2".into()]),
        );
        staged
            .views
            .insert("stored".into(), (view("stored", 5), vec!["m3".into()]));
        let Encoded { parts, records } = encode(&staged, &[], true).expect("encodes");
        assert_eq!((parts.len(), parts[0].views), (1, 2));
        // Both views belong to partition 0: one bundle.
        let bundles: Vec<(i32, usize)> = records.iter().map(|r| (r.partition, r.entries)).collect();
        assert_eq!(bundles, [(0, 2)]);
        for part in parts {
            store.write(part).expect("written");
        }
        for (key, events) in [("new", 2), ("stored", 5)] {
            assert_eq!(
                store.load(key).expect("read"),
                Some((*view(key, events)).clone())
            );
        }
        for id in ["m1", "m2", "m3"] {
            assert!(store.has_marker(0, id).expect("read"), "marker {id} stored");
        }
        let sent: Vec<String> = records
            .iter()
            .flat_map(|r| ChangelogEntry::decode_all(r.partition, 0, &r.value).expect("decodes"))
            .map(|e| e.view.key)
            .collect();
        assert_eq!(sent.len(), 2);
        assert!(
            sent.contains(&"new".to_string()) && sent.contains(&"stored".to_string()),
            "{sent:?}"
        );
    }

    #[test]
    fn a_write_is_encoded_in_parts_each_holding_its_views_with_their_markers() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let mut staged = Staged::default();
        let count = 2 * VIEWS_PER_PART + 10;
        for i in 0..count {
            let key = format!("k{i}");
            let partition = (i % 4) as i32;
            let ids: Vec<String> = (0..1 + i % 3).map(|j| format!("m{i}-{j}")).collect();
            let mut view = Aggregate::new(key.clone(), partition);
            view.events_applied = ids.len() as u64;
            let hasher = store.marker_hasher();
            for id in &ids {
                staged
                    .markers
                    .entry(partition)
                    .or_default()
                    .insert(hasher.hash(id));
            }
            staged.views.insert(key, (Arc::new(view), ids));
        }
        let Encoded { parts, records } = encode(&staged, &[], false).expect("encodes");
        assert!(records.is_empty());
        let sizes: Vec<usize> = parts.iter().map(|p| p.views).collect();
        assert_eq!(sizes, [VIEWS_PER_PART, VIEWS_PER_PART, 10]);
        let markers: usize = parts.iter().map(|p| p.markers).sum();
        let staged_markers: usize = staged.markers.values().map(|ids| ids.len()).sum();
        assert_eq!(markers, staged_markers, "every staged marker is in a part");

        // Only the first part applied, as when a later one fails: every view it holds has all
        // of its markers stored, and no other view has any.
        let first = parts.into_iter().next().expect("a part");
        store.write(first).expect("written");
        let mut stored_views = 0;
        for (key, (view, ids)) in &staged.views {
            let stored = store.load(key).expect("read").is_some();
            stored_views += usize::from(stored);
            for id in ids {
                assert_eq!(
                    store.has_marker(view.partition, id).expect("read"),
                    stored,
                    "marker {id} of {key} is stored with its view, and only with it"
                );
            }
        }
        assert_eq!(stored_views, VIEWS_PER_PART);
    }
}
