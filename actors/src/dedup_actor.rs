//! The dedup actor: owns the store, decides whether a message id was applied before, and writes
//! each event's marker together with the view it produced in one atomic batch (group commit on an
//! interval). Offsets complete only after the batch that covers them is flushed. Each batch's
//! views go to the changelog first; the store write runs on a blocking thread while the actor
//! stages the next batch, answering checks and loads from the batch in flight until it is stored.
//!
//! It runs under an actix `Supervisor`: killed, it restarts with its address and mailbox kept but
//! what it had staged lost. It then fences off every entity actor that may hold a view with
//! effects that never reached the store, and has every partition rewound to its lowest unfinished
//! offset; the records read again are checked against the store's markers, so none counts twice.
//! A store write already running when it restarts is waited for, so that no view loaded after the
//! restart misses an effect whose marker is stored.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use std::future::Future;

use crate::aggregate::Aggregate;
use crate::changelog::{ChangelogRecord, ChangelogSink};
use crate::kill::{injected_panic, Kill};
use crate::metrics::Metrics;
use crate::offset_committer::Completed;
use crate::partition_supervisor::rewind_all_partitions;
use crate::record::Origin;
use crate::store::{Store, StoreError, WriteBatch};
use crate::topology::Topology;

/// A view shared by its entity actor (which folds into it) and the dedup actor (which writes it).
pub type SharedAggregate = Arc<Mutex<Aggregate>>;

/// Longest wait between retries of a failed flush.
const FLUSH_RETRY_MAX: Duration = Duration::from_secs(5);

/// The current view of `key`: staged, stored, or new.
#[derive(Message)]
#[rtype(result = "Result<Aggregate, StoreError>")]
pub struct Load {
    /// Entity key.
    pub key: String,
    /// Partition a new view belongs to.
    pub partition: i32,
}

/// Was `message_id` applied before? If so, the caller drops the event and its offset completes
/// with the next flush.
#[derive(Message)]
#[rtype(result = "Result<Verdict, StoreError>")]
pub struct Check {
    /// Partition the marker lives in.
    pub partition: i32,
    /// The message id.
    pub message_id: String,
    /// The record being checked.
    pub origin: Origin,
    /// The asking entity actor's incarnation.
    pub incarnation: u64,
}

/// The answer to [`Check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not applied before: apply it and stage the result.
    New,
    /// Applied before: drop it.
    Seen,
    /// The asking actor was started before the dedup actor last restarted, so its view may hold
    /// effects that were lost: it must stop without applying anything.
    Stale,
}

/// The event `message_id` was applied to `view`: write both in the next batch.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stage {
    /// Partition the marker lives in.
    pub partition: i32,
    /// The message id.
    pub message_id: String,
    /// The view after the event.
    pub view: SharedAggregate,
    /// The record applied.
    pub origin: Origin,
    /// Index of the event's source, for the `applied` count once the effect is stored.
    pub source: usize,
    /// The staging entity actor's incarnation.
    pub incarnation: u64,
}

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

/// Work applied since the last write: written together or not at all.
#[derive(Default)]
struct Staged {
    /// Message ids by partition (nested so that a lookup needs no owned key).
    markers: HashMap<i32, HashSet<String>>,
    /// Views by key, with the message ids applied to each since its last write.
    views: HashMap<String, (SharedAggregate, Vec<String>)>,
    /// Records this write completes (applied or found to be duplicates).
    done: Vec<Origin>,
    /// Source index of every staged event: counted as applied when written, not before, so that
    /// work lost with a restart is not counted.
    applied: Vec<usize>,
}

impl Staged {
    fn is_empty(&self) -> bool {
        self.markers.is_empty() && self.views.is_empty() && self.done.is_empty()
    }

    /// Puts `older` (a write that failed) back in front of what was staged since.
    fn put_back(&mut self, older: Staged) {
        for (partition, ids) in older.markers {
            self.markers.entry(partition).or_default().extend(ids);
        }
        for (key, (view, mut ids)) in older.views {
            match self.views.entry(key) {
                std::collections::hash_map::Entry::Occupied(mut newer) => {
                    ids.append(&mut newer.get_mut().1);
                    newer.get_mut().1 = ids;
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert((view, ids));
                }
            }
        }
        let mut done = older.done;
        done.append(&mut self.done);
        self.done = done;
        self.applied.extend(older.applied);
    }
}

/// A staged write, encoded: the store batch and the changelog records of its views.
struct Encoded {
    staged: Staged,
    batch: WriteBatch,
    records: Vec<ChangelogRecord>,
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
    /// The actor restarted while the changelog send was under way: the work is redone.
    Restarted,
}

/// Counts store writes running off the actix thread, so that a restarting dedup actor can wait
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
    committer: Recipient<Completed>,
    topology: Arc<Topology>,
    metrics: Arc<Metrics>,
    interval: Duration,
    /// Where each written view is published first, if state follows partitions between instances.
    changelog: Option<Arc<dyn ChangelogSink>>,
    staged: Staged,
    /// The work of the write in flight, until it is stored.
    writing: Option<Staged>,
    /// `FlushNow`s waiting for the next write.
    flush_waiters: Waiters,
    /// Store writes running on other threads.
    gate: Arc<WriteGate>,
    /// Entity actors of this incarnation or older started before the last restart.
    fence: u64,
    /// Restarts so far: a write whose changelog send resolves after a restart is dropped.
    epoch: u64,
    /// The same, for the write's future.
    shared_epoch: Arc<std::sync::atomic::AtomicU64>,
}

impl DedupActor {
    /// A dedup actor over `store`, flushing every `interval` and reporting to `committer`.
    pub fn new(
        store: Store,
        committer: Recipient<Completed>,
        topology: Arc<Topology>,
        metrics: Arc<Metrics>,
        interval: Duration,
    ) -> Self {
        DedupActor {
            store: Some(store),
            committer,
            topology,
            metrics,
            interval,
            changelog: None,
            staged: Staged::default(),
            writing: None,
            flush_waiters: Vec::new(),
            gate: Arc::default(),
            fence: 0,
            epoch: 0,
            shared_epoch: Arc::default(),
        }
    }

    /// Publishes every written view to `sink` before it is written to the store.
    pub fn with_changelog(mut self, sink: Arc<dyn ChangelogSink>) -> Self {
        self.changelog = Some(sink);
        self
    }

    fn stale(&self, incarnation: u64) -> bool {
        incarnation <= self.fence
    }

    fn store(&self) -> Result<&Store, StoreError> {
        self.store.as_ref().ok_or(StoreError::Released)
    }

    /// The staged (or being written) view of `key`.
    fn staged_view(&self, key: &str) -> Option<Aggregate> {
        let (view, _) = self
            .staged
            .views
            .get(key)
            .or_else(|| self.writing.as_ref()?.views.get(key))?;
        Some(view.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Whether `message_id` of `partition` is staged or being written.
    fn staged_marker(&self, partition: i32, message_id: &str) -> bool {
        [Some(&self.staged), self.writing.as_ref()]
            .into_iter()
            .flatten()
            .any(|s| {
                s.markers
                    .get(&partition)
                    .is_some_and(|ids| ids.contains(message_id))
            })
    }

    /// Encodes what is staged into a store batch and changelog records, and takes it; `None` if
    /// nothing is staged. On failure everything stays staged.
    fn encode_staged(&mut self) -> Result<Option<Encoded>, StoreError> {
        if self.staged.is_empty() {
            return Ok(None);
        }
        let mut batch = WriteBatch::default();
        let mut records = Vec::new();
        for (partition, ids) in &self.staged.markers {
            for id in ids {
                batch.add_marker(*partition, id);
            }
        }
        let encode_error = |e: serde_json::Error| StoreError::Write(e.to_string());
        for (view, markers) in self.staged.views.values() {
            let view = view.lock().unwrap_or_else(|p| p.into_inner());
            let json = serde_json::to_vec(&*view).map_err(encode_error)?;
            if self.changelog.is_some() {
                records
                    .push(ChangelogRecord::of_view(&view, &json, markers).map_err(encode_error)?);
            }
            batch.put_encoded_view(view.partition, &view.key, json);
        }
        Ok(Some(Encoded {
            staged: std::mem::take(&mut self.staged),
            batch,
            records,
        }))
    }

    /// Writes what is staged, off the actix thread: to the changelog first, then (once the broker
    /// has it) to the store in one atomic batch; then flushes and completes the records it covers.
    /// One write is in flight at a time; meanwhile its work answers checks and loads from memory.
    fn write_staged(&mut self, ctx: &mut Context<Self>) {
        if self.writing.is_some() {
            return; // the write in flight starts the next one when it ends
        }
        let waiters = std::mem::take(&mut self.flush_waiters);
        let encoded = match self.encode_staged() {
            Ok(Some(encoded)) => encoded,
            Ok(None) => {
                if !waiters.is_empty() {
                    self.flush_then(ctx, Vec::new(), waiters);
                }
                return;
            }
            Err(e) => return notify_all(waiters, Err(e)),
        };
        let Encoded {
            mut staged,
            mut batch,
            records,
        } = encoded;
        let Some(store) = self.store.clone() else {
            self.staged.put_back(staged);
            return notify_all(waiters, Err(StoreError::Released));
        };
        // Counted once stored, even if the actor restarts meanwhile: those events are in the
        // store, and read again they are dropped as duplicates.
        let applied = std::mem::take(&mut staged.applied);
        self.writing = Some(staged);
        let sent = records.len() as u64;
        let (topology, metrics) = (self.topology.clone(), self.metrics.clone());
        let send = match &self.changelog {
            Some(sink) if !records.is_empty() => sink.send(records),
            _ => Box::pin(std::future::ready(Ok(HashMap::new()))),
        };
        let (epoch, shared_epoch, gate) =
            (self.epoch, self.shared_epoch.clone(), self.gate.clone());
        let write = async move {
            let ends = match send.await {
                Ok(ends) => ends,
                Err(e) => return Err((WriteFailure::Changelog(e), applied)),
            };
            if shared_epoch.load(Ordering::Relaxed) != epoch {
                return Err((WriteFailure::Restarted, applied));
            }
            for (partition, next) in ends {
                batch.set_changelog_offset(partition, next);
            }
            let (markers, views) = (batch.markers as u64, batch.views as u64);
            // Entered here, on the actix thread, so that a restart can wait for it to end.
            let entered = gate.enter();
            // Counted by the blocking task itself: the actor may restart, and drop this future,
            // while the write runs to its end.
            let written = tokio::task::spawn_blocking(move || {
                let _entered = entered;
                let expired = match store.write(batch) {
                    Ok(expired) => expired,
                    Err(e) => return Err((WriteFailure::Store(e), applied)),
                };
                let stats = &topology.dedup;
                stats.changelog_sent.fetch_add(sent, Ordering::Relaxed);
                stats.markers_expired.fetch_add(expired, Ordering::Relaxed);
                stats.markers_written.fetch_add(markers, Ordering::Relaxed);
                stats.views_written.fetch_add(views, Ordering::Relaxed);
                for source in applied {
                    metrics.source(source).applied.inc();
                }
                Ok(())
            })
            .await;
            match written {
                Ok(result) => result,
                // The write panicked: its work stays staged and is retried, uncounted.
                Err(e) => Err((
                    WriteFailure::Store(StoreError::Write(e.to_string())),
                    Vec::new(),
                )),
            }
        };
        ctx.spawn(write.into_actor(self).map(move |res, act, ctx| {
            if act.epoch != epoch {
                return notify_all(
                    waiters,
                    Err(StoreError::Write("the dedup actor restarted".into())),
                );
            }
            let Some(mut staged) = act.writing.take() else {
                return;
            };
            match res {
                Ok(()) => {
                    act.topology
                        .dedup
                        .pending
                        .store(act.staged.applied.len() as u64, Ordering::Relaxed);
                    act.flush_then(ctx, staged.done, waiters);
                }
                Err((failure, applied)) => {
                    staged.applied = applied;
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
                    };
                    tracing::warn!("write failed, will retry: {e}");
                    act.topology.dedup.set_fault(Some(e.to_string()));
                    act.staged.put_back(staged);
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
            if !done.is_empty() {
                committer.do_send(Completed { origins: done });
            }
            Ok(())
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
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
            staged = self.staged.done.len(),
            "dedup actor restarted; its staged work is lost and every partition is rewound"
        );
        self.staged = Staged::default();
        self.writing = None;
        self.epoch += 1;
        self.shared_epoch.store(self.epoch, Ordering::Relaxed);
        // A write already under way lands first, so that views loaded from now on hold it.
        self.gate.wait_idle();
        self.topology.dedup.pending.store(0, Ordering::Relaxed);
        self.topology.dedup.restarts.fetch_add(1, Ordering::Relaxed);
        self.metrics.actor_restarts("dedup");
        let entities = &self.topology.entities;
        self.fence = entities.last_incarnation();
        entities.passivate_all();
        rewind_all_partitions(&self.topology);
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

impl Handler<Load> for DedupActor {
    type Result = Result<Aggregate, StoreError>;

    fn handle(&mut self, msg: Load, _: &mut Self::Context) -> Self::Result {
        if let Some(view) = self.staged_view(&msg.key) {
            return Ok(view);
        }
        Ok(self
            .store()?
            .load(&msg.key)?
            .unwrap_or_else(|| Aggregate::new(msg.key, msg.partition)))
    }
}

impl Handler<Check> for DedupActor {
    type Result = Result<Verdict, StoreError>;

    fn handle(&mut self, msg: Check, _: &mut Self::Context) -> Self::Result {
        if self.stale(msg.incarnation) {
            return Ok(Verdict::Stale);
        }
        let stats = &self.topology.dedup;
        stats.checks.fetch_add(1, Ordering::Relaxed);
        let seen = self.staged_marker(msg.partition, &msg.message_id)
            || self.store()?.has_marker(msg.partition, &msg.message_id)?;
        if seen {
            stats.hits.fetch_add(1, Ordering::Relaxed);
            self.staged.done.push(msg.origin);
            return Ok(Verdict::Seen);
        }
        Ok(Verdict::New)
    }
}

impl Handler<Stage> for DedupActor {
    type Result = ();

    fn handle(&mut self, msg: Stage, _: &mut Self::Context) {
        if self.stale(msg.incarnation) {
            return; // the record is read again and applied by a new actor
        }
        let key = msg
            .view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .key
            .clone();
        let staged = &mut self.staged;
        staged
            .markers
            .entry(msg.partition)
            .or_default()
            .insert(msg.message_id.clone());
        let (view, markers) = staged
            .views
            .entry(key)
            .or_insert_with(|| (msg.view.clone(), Vec::new()));
        // A new actor of the same key (after passivation) stages its own view object.
        *view = msg.view;
        markers.push(msg.message_id);
        staged.done.push(msg.origin);
        staged.applied.push(msg.source);
        self.topology.dedup.pending.fetch_add(1, Ordering::Relaxed);
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
        if let Some(view) = self.staged_view(&msg.key) {
            return Ok(Some(view));
        }
        self.store()?.load(&msg.key)
    }
}

impl Handler<Release> for DedupActor {
    type Result = ResponseActFuture<Self, Result<Store, StoreError>>;

    fn handle(&mut self, _: Release, ctx: &mut Self::Context) -> Self::Result {
        let flushed = self.handle(FlushNow, ctx);
        Box::pin(flushed.map(|res, act, _| {
            res?;
            act.store.take().ok_or(StoreError::Released)
        }))
    }
}
