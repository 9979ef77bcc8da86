//! The dedup actor: owns the store and its ledger (see [`crate::ledger`], through which entity
//! actors check message ids and stage their views), and writes each event's marker together with
//! the view it produced in one atomic batch (group commit on an interval). Offsets complete only
//! after the batch that covers them is flushed. Each batch's views go to the changelog first; the
//! store write runs on a blocking thread while the ledger stages the next batch and answers checks
//! and loads from the batch in flight until it is stored. It runs on a thread of its own, so that
//! encoding views and reading the store do not take the entity actors' thread.
//!
//! It runs under an actix `Supervisor`: killed, it restarts with its address and mailbox kept but
//! what it had staged lost: on the actors' thread, between two of their messages, it resets the
//! ledger, fences off every entity actor that may hold a view with effects that never reached the
//! store, and has every partition rewound to its lowest unfinished offset (a supervisor started
//! before the reset routes nothing more); the records read again are checked against the store's
//! markers, so none counts twice. A store write already running when it restarts is waited for,
//! so that no view loaded after the restart misses an effect whose marker is stored.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use std::future::Future;

use crate::aggregate::Aggregate;
use crate::changelog::{ChangelogRecord, ChangelogSink};
use crate::kill::{injected_panic, Kill};
use crate::ledger::{Ledger, Staged, Taken};
use crate::metrics::Metrics;
use crate::offset_committer::Completed;
use crate::partition_supervisor::rewind_all_partitions;
use crate::record::Origin;
use crate::store::{Store, StoreError, WriteBatch};
use crate::topology::Topology;

/// Longest wait between retries of a failed flush.
const FLUSH_RETRY_MAX: Duration = Duration::from_secs(5);

/// The current view of `key`: staged, stored, or new.
#[derive(Message)]
#[rtype(result = "Result<Arc<Aggregate>, StoreError>")]
pub struct Load {
    /// Entity key.
    pub key: String,
    /// Partition a new view belongs to.
    pub partition: i32,
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

/// A taken write, encoded: the store batch and the changelog records of its views.
struct Encoded {
    batch: WriteBatch,
    records: Vec<ChangelogRecord>,
}

/// Encodes a taken write into a store batch and, with a changelog, its records.
fn encode(staged: &Staged, changelog: bool) -> Result<Encoded, StoreError> {
    let mut batch = WriteBatch::default();
    let mut records = Vec::new();
    for (partition, ids) in &staged.markers {
        for id in ids {
            batch.add_marker(*partition, id);
        }
    }
    let encode_error = |e: serde_json::Error| StoreError::Write(e.to_string());
    for (view, markers) in staged.views.values() {
        let json = serde_json::to_vec(&**view).map_err(encode_error)?;
        if changelog {
            records.push(ChangelogRecord::of_view(view, &json, markers).map_err(encode_error)?);
        }
        batch.put_encoded_view(view.partition, &view.key, json);
    }
    Ok(Encoded { batch, records })
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
            gate: Arc::default(),
            actors,
            resume_at: 0,
            epoch: 0,
            shared_epoch: Arc::default(),
        }
    }

    /// Publishes every written view to `sink` before it is written to the store.
    pub fn with_changelog(mut self, sink: Arc<dyn ChangelogSink>) -> Self {
        self.changelog = Some(sink);
        self
    }

    fn store(&self) -> Result<&Store, StoreError> {
        self.store.as_ref().ok_or(StoreError::Released)
    }

    /// The current view of `key`: staged, being written, or stored.
    fn current_view(&self, key: &str) -> Result<Option<Arc<Aggregate>>, StoreError> {
        if let Some(view) = self.ledger.view(key) {
            return Ok(Some(view));
        }
        Ok(self.store()?.load(key)?.map(Arc::new))
    }

    /// Writes what is staged, off the actor's thread: to the changelog first, then (once the
    /// broker has it) to the store in one atomic batch; then flushes and completes the records it
    /// covers. One write is in flight at a time; meanwhile the ledger answers checks and loads
    /// from its work.
    fn write_staged(&mut self, ctx: &mut Context<Self>) {
        if self.ledger.is_writing() || self.ledger.generation() < self.resume_at {
            return; // the write in flight, or the reset, is followed by the next tick's
        }
        let waiters = std::mem::take(&mut self.flush_waiters);
        let Some(store) = self.store.clone() else {
            return notify_all(waiters, Err(StoreError::Released));
        };
        let Some(taken) = self.ledger.take() else {
            if !waiters.is_empty() {
                self.flush_then(ctx, Vec::new(), waiters);
            }
            return;
        };
        let Taken {
            generation,
            staged,
            done,
            applied,
        } = taken;
        let (topology, metrics) = (self.topology.clone(), self.metrics.clone());
        let changelog = self.changelog.clone();
        let (epoch, shared_epoch, gate) =
            (self.epoch, self.shared_epoch.clone(), self.gate.clone());
        let write = async move {
            // The views are snapshots the entity actors no longer change: encoded off this thread,
            // which meanwhile answers loads.
            let with_changelog = changelog.is_some();
            let encoded = tokio::task::spawn_blocking(move || encode(&staged, with_changelog))
                .await
                .unwrap_or_else(|panicked| Err(StoreError::Write(panicked.to_string())));
            let Encoded { mut batch, records } = match encoded {
                Ok(encoded) => encoded,
                Err(e) => return Err((WriteFailure::Store(e), applied)),
            };
            let sent = records.len() as u64;
            let ends = match &changelog {
                Some(sink) if !records.is_empty() => sink.send(records).await,
                _ => Ok(HashMap::new()),
            };
            let ends = match ends {
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
            // Entered here, on the actor's thread, so that a restart can wait for it to end.
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
            match res {
                Ok(()) => {
                    act.ledger.written(generation);
                    act.flush_then(ctx, done, waiters);
                }
                Err((failure, applied)) => {
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
                    act.ledger.put_back(generation, done, applied);
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

impl Handler<Load> for DedupActor {
    type Result = Result<Arc<Aggregate>, StoreError>;

    fn handle(&mut self, msg: Load, _: &mut Self::Context) -> Self::Result {
        Ok(self
            .current_view(&msg.key)?
            .unwrap_or_else(|| Arc::new(Aggregate::new(msg.key, msg.partition))))
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
        Ok(self.current_view(&msg.key)?.map(Arc::unwrap_or_clone))
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
