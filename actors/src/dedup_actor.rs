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

/// The dedup actor.
pub struct DedupActor {
    store: Option<Store>,
    committer: Recipient<Completed>,
    topology: Arc<Topology>,
    metrics: Arc<Metrics>,
    interval: Duration,
    /// Staged message ids by partition (nested so that a lookup needs no owned key).
    markers: HashMap<i32, HashSet<String>>,
    views: HashMap<String, SharedAggregate>,
    done: Vec<Origin>,
    /// Source index of every staged event: counted as applied when written, not before, so that
    /// work lost with a restart is not counted.
    applied: Vec<usize>,
    /// Entity actors of this incarnation or older started before the last restart.
    fence: u64,
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
            markers: HashMap::new(),
            views: HashMap::new(),
            done: Vec::new(),
            applied: Vec::new(),
            fence: 0,
        }
    }

    fn stale(&self, incarnation: u64) -> bool {
        incarnation <= self.fence
    }

    fn store(&self) -> Result<&Store, StoreError> {
        self.store.as_ref().ok_or(StoreError::Released)
    }

    /// Writes the staged markers and views in one atomic batch. On success returns the records
    /// that batch covers; on failure everything stays staged for the next attempt.
    fn write_staged(&mut self) -> Result<Vec<Origin>, StoreError> {
        if self.markers.is_empty() && self.views.is_empty() && self.done.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = WriteBatch::default();
        let now = chrono::Utc::now().timestamp_millis();
        for (partition, ids) in &self.markers {
            for id in ids {
                batch.add_marker(*partition, id, now);
            }
        }
        for view in self.views.values() {
            let view = view.lock().unwrap_or_else(|p| p.into_inner());
            batch
                .put_view(&view)
                .map_err(|e| StoreError::Write(e.to_string()))?;
        }
        let (markers, views) = (batch.markers as u64, batch.views as u64);
        let expired = match self.store()?.write(batch) {
            Ok(expired) => expired,
            Err(e) => {
                self.metrics.fault("store_write");
                self.topology.dedup.set_fault(Some(e.to_string()));
                return Err(e);
            }
        };
        let stats = &self.topology.dedup;
        stats.markers_expired.fetch_add(expired, Ordering::Relaxed);
        stats.markers_written.fetch_add(markers, Ordering::Relaxed);
        stats.views_written.fetch_add(views, Ordering::Relaxed);
        stats.pending.store(0, Ordering::Relaxed);
        self.markers.clear();
        self.views.clear();
        for source in self.applied.drain(..) {
            self.metrics.source(source).applied.inc();
        }
        Ok(std::mem::take(&mut self.done))
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
        match self.write_staged() {
            Ok(done) if done.is_empty() => {}
            Ok(done) => {
                ctx.spawn(
                    self.flush_and_complete(done)
                        .into_actor(self)
                        .map(|_, _, _| ()),
                );
            }
            Err(e) => tracing::warn!("store write failed, will retry: {e}"),
        }
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
            staged = self.done.len(),
            "dedup actor restarted; its staged work is lost and every partition is rewound"
        );
        self.markers.clear();
        self.views.clear();
        self.done.clear();
        self.applied.clear();
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
        if let Some(view) = self.views.get(&msg.key) {
            return Ok(view.lock().unwrap_or_else(|p| p.into_inner()).clone());
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
            .markers
            .get(&msg.partition)
            .is_some_and(|ids| ids.contains(&msg.message_id))
            || self.store()?.has_marker(msg.partition, &msg.message_id)?;
        if seen {
            stats.hits.fetch_add(1, Ordering::Relaxed);
            self.done.push(msg.origin);
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
        self.markers
            .entry(msg.partition)
            .or_default()
            .insert(msg.message_id);
        self.views.insert(key, msg.view);
        self.done.push(msg.origin);
        self.applied.push(msg.source);
        self.topology.dedup.pending.fetch_add(1, Ordering::Relaxed);
    }
}

impl Handler<FlushNow> for DedupActor {
    type Result = ResponseActFuture<Self, Result<(), StoreError>>;

    fn handle(&mut self, _: FlushNow, _: &mut Self::Context) -> Self::Result {
        match self.write_staged() {
            Ok(done) => Box::pin(self.flush_and_complete(done).into_actor(self)),
            Err(e) => Box::pin(fut::ready(Err(e))),
        }
    }
}

impl Handler<Peek> for DedupActor {
    type Result = Result<Option<Aggregate>, StoreError>;

    fn handle(&mut self, msg: Peek, _: &mut Self::Context) -> Self::Result {
        if let Some(view) = self.views.get(&msg.key) {
            return Ok(Some(view.lock().unwrap_or_else(|p| p.into_inner()).clone()));
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
