//! The dedup actor: owns the store, decides whether a message id was applied before, and writes
//! each event's marker together with the view it produced in one atomic batch (group commit on an
//! interval). Offsets complete only after the batch that covers them is flushed.
//!
//! It runs under an actix `Supervisor`: killed, it restarts with its address and mailbox kept but
//! what it had staged lost. It then fences off every entity actor that may hold a view with
//! effects that never reached the store, and has every partition rewound to its lowest unfinished
//! offset; the records read again are checked against the store's markers, so none counts twice.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use std::future::Future;

use crate::aggregate::Aggregate;
use crate::changelog::{ChangelogEntry, ChangelogRecord, ChangelogSink};
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

/// Resolves a [`FlushNow`] once its write is durable.
type Notify = Option<tokio::sync::oneshot::Sender<Result<(), StoreError>>>;

fn notify(to: Notify, result: Result<(), StoreError>) {
    if let Some(tx) = to {
        let _ = tx.send(result);
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
    /// Entity actors of this incarnation or older started before the last restart.
    fence: u64,
    /// Restarts so far: a changelog send that resolves after a restart belongs to lost work.
    epoch: u64,
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
            fence: 0,
            epoch: 0,
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

    /// The staged (or last written and not yet stored) view of `key`.
    fn staged_view(&self, key: &str) -> Option<Aggregate> {
        let (view, _) = self.staged.views.get(key)?;
        Some(view.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Encodes what is staged into a store batch and changelog records, and takes it; `None` if
    /// nothing is staged. On failure everything stays staged.
    fn encode_staged(&mut self) -> Result<Option<Encoded>, StoreError> {
        if self.staged.is_empty() {
            return Ok(None);
        }
        let mut batch = WriteBatch::default();
        let mut records = Vec::new();
        let now = chrono::Utc::now().timestamp_millis();
        for (partition, ids) in &self.staged.markers {
            for id in ids {
                batch.add_marker(*partition, id, now);
            }
        }
        let encode_error = |e: serde_json::Error| StoreError::Write(e.to_string());
        for (view, markers) in self.staged.views.values() {
            let view = view.lock().unwrap_or_else(|p| p.into_inner());
            if self.changelog.is_some() {
                let entry = ChangelogEntry {
                    view: view.clone(),
                    markers: markers.clone(),
                };
                records.push(entry.encode().map_err(encode_error)?);
            }
            batch.put_view(&view).map_err(encode_error)?;
        }
        Ok(Some(Encoded {
            staged: std::mem::take(&mut self.staged),
            batch,
            records,
        }))
    }

    /// Writes `encoded` to the store, with the changelog offsets its records reached. On failure
    /// its work is staged again for the next attempt.
    fn write_encoded(
        &mut self,
        encoded: Encoded,
        changelog_ends: HashMap<i32, i64>,
    ) -> Result<Vec<Origin>, StoreError> {
        let Encoded {
            staged, mut batch, ..
        } = encoded;
        for (partition, next) in changelog_ends {
            batch.set_changelog_offset(partition, next);
        }
        let (markers, views) = (batch.markers as u64, batch.views as u64);
        let expired = match self.store().and_then(|s| s.write(batch)) {
            Ok(expired) => expired,
            Err(e) => {
                self.metrics.fault("store_write");
                self.topology.dedup.set_fault(Some(e.to_string()));
                self.staged.put_back(staged);
                return Err(e);
            }
        };
        let stats = &self.topology.dedup;
        stats.markers_expired.fetch_add(expired, Ordering::Relaxed);
        stats.markers_written.fetch_add(markers, Ordering::Relaxed);
        stats.views_written.fetch_add(views, Ordering::Relaxed);
        stats
            .pending
            .store(self.staged.applied.len() as u64, Ordering::Relaxed);
        for source in staged.applied {
            self.metrics.source(source).applied.inc();
        }
        Ok(staged.done)
    }

    /// Writes what is staged: to the changelog first (the actor handles nothing else until the
    /// broker has it, so the store sees writes in the order the changelog does), then to the
    /// store; then flushes and completes the records it covers. `done` hears when it is durable.
    fn write_staged(&mut self, ctx: &mut Context<Self>, done: Notify) {
        let mut encoded = match self.encode_staged() {
            Ok(Some(encoded)) => encoded,
            Ok(None) => {
                if done.is_some() {
                    self.flush_then(ctx, Vec::new(), done);
                }
                return;
            }
            Err(e) => return notify(done, Err(e)),
        };
        let sink = match &self.changelog {
            Some(sink) if !encoded.records.is_empty() => sink.clone(),
            _ => return self.store_then_flush(ctx, encoded, HashMap::new(), done),
        };
        let sent = encoded.records.len() as u64;
        let send = sink.send(std::mem::take(&mut encoded.records));
        let epoch = self.epoch;
        ctx.wait(send.into_actor(self).map(move |res, act, ctx| {
            if act.epoch != epoch {
                // Sent by the actor before it restarted: that work is read again and redone.
                return notify(
                    done,
                    Err(StoreError::Write("the dedup actor restarted".into())),
                );
            }
            match res {
                Ok(ends) => {
                    act.topology
                        .dedup
                        .changelog_sent
                        .fetch_add(sent, Ordering::Relaxed);
                    act.store_then_flush(ctx, encoded, ends, done)
                }
                Err(e) => {
                    tracing::warn!("changelog send failed, will retry: {e}");
                    act.metrics.fault("changelog");
                    act.topology.dedup.set_fault(Some(e.to_string()));
                    act.staged.put_back(encoded.staged);
                    notify(done, Err(StoreError::Write(e.to_string())));
                }
            }
        }));
    }

    fn store_then_flush(
        &mut self,
        ctx: &mut Context<Self>,
        encoded: Encoded,
        changelog_ends: HashMap<i32, i64>,
        done: Notify,
    ) {
        match self.write_encoded(encoded, changelog_ends) {
            Ok(origins) => self.flush_then(ctx, origins, done),
            Err(e) => {
                tracing::warn!("store write failed, will retry: {e}");
                notify(done, Err(e));
            }
        }
    }

    fn flush_then(&mut self, ctx: &mut Context<Self>, origins: Vec<Origin>, done: Notify) {
        ctx.spawn(
            self.flush_and_complete(origins)
                .into_actor(self)
                .map(move |res, _, _| notify(done, res)),
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
        self.write_staged(ctx, None);
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
        self.epoch += 1;
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
        let seen = self
            .staged
            .markers
            .get(&msg.partition)
            .is_some_and(|ids| ids.contains(&msg.message_id))
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
        self.write_staged(ctx, Some(tx));
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
