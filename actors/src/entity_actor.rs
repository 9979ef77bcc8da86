//! The entity actor: one per entity key. Its mailbox is the ordering guarantee: it applies its
//! events one at a time, checking each against the dedup actor's ledger and staging the view it
//! produced there. It stops when the entity registry passivates it: idle for
//! `tuning.entity_idle_ms`, or idle longest when the live actors reach their bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::aggregate::Aggregate;
use crate::envelope::{Event, Rejection};
use crate::kill::{injected_panic, Kill};
use crate::ledger::{Applied, Verdict};
use crate::partition_supervisor::ReplayEntity;
use crate::pipeline::Pipeline;
use crate::record::Record;
use crate::store::StoreError;

/// Longest wait between retries of a failed store read.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Apply `event` (parsed from `record`) to the entity's view.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Apply {
    /// The parsed event.
    pub event: Event,
    /// The raw record, kept to dead-letter it if a rule fails.
    pub record: Arc<Record>,
}

/// Stop now (shutdown or chaos): leave the registry and stop after the current event.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Passivate;

/// The entity actor.
pub struct EntityActor {
    key: String,
    partition: i32,
    /// Which actor of the key this is; the dedup actor refuses work of incarnations it fenced off.
    incarnation: u64,
    /// Shared with the ledger while staged; changed through [`crate::ledger::Ledger::fold_and_stage`],
    /// which copies it only while a write under way holds it.
    view: Option<Arc<Aggregate>>,
    pipeline: Arc<Pipeline>,
    mailbox: Arc<AtomicUsize>,
    /// Set when the actor dies with work possibly lost, so that its records are replayed.
    died: bool,
}

impl EntityActor {
    /// Actor `incarnation` for `key` of `partition`; `mailbox` counts the events sent to it.
    pub fn new(
        key: String,
        partition: i32,
        incarnation: u64,
        pipeline: Arc<Pipeline>,
        mailbox: Arc<AtomicUsize>,
    ) -> Self {
        EntityActor {
            key,
            partition,
            incarnation,
            view: None,
            pipeline,
            mailbox,
            died: false,
        }
    }

    /// Checks `apply` against the ledger, retrying store faults with backoff; the actor takes no
    /// other message meanwhile, so the order of events is kept.
    fn check(&mut self, apply: Apply, delay: Duration, ctx: &mut Context<Self>) {
        let verdict = self.pipeline.ledger.check(
            self.partition,
            &apply.event.message_id,
            &apply.event.origin,
            self.incarnation,
        );
        match verdict {
            Ok(Verdict::Stale) => {
                // The dedup actor restarted and lost what this actor staged: its view is not
                // durable. The partitions are rewound and a new actor takes over.
                tracing::debug!(key = %self.key, "fenced off by a restarted dedup actor");
                ctx.stop();
            }
            Ok(verdict) => self.applied(apply, verdict == Verdict::Seen, ctx),
            Err(e) => self.retry(apply, delay, e, ctx),
        }
    }

    fn retry(&mut self, apply: Apply, delay: Duration, e: StoreError, ctx: &mut Context<Self>) {
        tracing::warn!(key = %self.key, "dedup check failed, retrying in {delay:?}: {e}");
        self.pipeline.metrics.fault("store_read");
        ctx.wait(
            actix::clock::sleep(delay)
                .into_actor(self)
                .map(move |_, act, ctx| act.check(apply, (delay * 2).min(RETRY_MAX), ctx)),
        );
    }

    fn applied(&mut self, apply: Apply, seen: bool, ctx: &mut Context<Self>) {
        if seen {
            let source = apply.event.source;
            self.pipeline.metrics.source(source).duplicates.inc();
            self.finished(&apply.record);
            return;
        }
        self.fold(apply, 0, ctx);
    }

    /// An event's work is done (staged, dropped or dead-lettered): the record is not handed to
    /// a later actor of the key, and only now may this one passivate, its view holding every
    /// effect.
    fn finished(&self, record: &Record) {
        record.finished.set();
        self.mailbox.fetch_sub(1, Ordering::Relaxed);
    }

    /// Folds the event into the view and stages it; a failing rule is retried with backoff, the
    /// actor taking no other message meanwhile, until the retry budget is spent and the record
    /// is dead-lettered with the reason. The view is untouched by a failed fold.
    fn fold(&mut self, mut apply: Apply, retries: u32, ctx: &mut Context<Self>) {
        let p = self.pipeline.clone();
        let view = self
            .view
            .as_mut()
            .expect("the view is loaded in started() before any message is handled");
        let partition = self.partition;
        let event = &mut apply.event;
        let folded = p.ledger.fold_and_stage(view, self.incarnation, |view| {
            if p.rule_faults.take() {
                return Err("injected rule fault".to_string());
            }
            view.apply(&p.rules, event).map_err(|e| e.to_string())?;
            Ok(Applied {
                partition,
                message_id: std::mem::take(&mut event.message_id),
                origin: event.origin.clone(),
                source: event.source,
            })
        });
        let Apply { event, record } = apply;
        match folded {
            Ok(true) => self.finished(&record),
            Ok(false) => {
                // Fenced off by a restarted dedup actor while a failed rule was retried: as for
                // a stale check, a new actor takes over from the rewound partitions.
                tracing::debug!(key = %self.key, "fenced off by a restarted dedup actor");
                ctx.stop();
            }
            Err(e) if retries < p.rule_retries => {
                p.metrics.fault("rule");
                let delay = p.rule_retry_backoff * 2u32.saturating_pow(retries);
                tracing::debug!(key = %self.key, "rule failed, retrying in {delay:?}: {e}");
                let apply = Apply { event, record };
                ctx.wait(
                    actix::clock::sleep(delay.min(RETRY_MAX))
                        .into_actor(self)
                        .map(move |_, act, ctx| act.fold(apply, retries + 1, ctx)),
                );
            }
            Err(e) => {
                p.metrics.fault("rule");
                let source = &p.rules.source(event.source).name;
                let attempts = retries + 1;
                p.dead_letters.send(
                    Record::clone(&record),
                    source,
                    &Rejection::RuleFailed(format!("{e} (after {attempts} attempts)")),
                );
                self.finished(&record);
            }
        }
    }

    /// Loads the view from the view loader (on its own thread), retrying store faults with
    /// backoff; the actor takes no message before it has its view.
    fn load(&mut self, ctx: &mut Context<Self>) {
        let p = self.pipeline.clone();
        let (key, partition) = (self.key.clone(), self.partition);
        let loading = async move {
            let asked = Instant::now();
            let mut delay = Duration::from_millis(10);
            loop {
                match p.loader.load(key.clone()).await {
                    Ok(Ok(view)) => {
                        p.metrics
                            .view_load_latency
                            .observe(asked.elapsed().as_secs_f64());
                        return Some(
                            view.unwrap_or_else(|| Arc::new(Aggregate::new(key, partition))),
                        );
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%key, "loading view failed, retrying in {delay:?}: {e}");
                        p.metrics.fault("store_read");
                        actix::clock::sleep(delay).await;
                        delay = (delay * 2).min(RETRY_MAX);
                    }
                    Err(_) => return None,
                }
            }
        };
        ctx.wait(loading.into_actor(self).map(|view, act, ctx| match view {
            Some(view) => {
                act.partition = view.partition;
                act.view = Some(view);
            }
            None => ctx.stop(),
        }));
    }
}

impl Actor for EntityActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.pipeline.metrics.entity_actors.inc();
        if let Some(view) = self.pipeline.ledger.view(&self.key) {
            self.partition = view.partition;
            self.view = Some(view);
        } else {
            self.load(ctx);
        }
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        let p = &self.pipeline;
        p.topology.entities.remove(&self.key, &ctx.address());
        p.metrics.entity_actors.dec();
        if let Some(view) = self.view.take() {
            p.loader.retire(view);
        }
        if self.died || self.mailbox.load(Ordering::Relaxed) > 0 {
            // Events in the mailbox are gone with it: every supervisor hands its unfinished
            // records of this key, in offset order, to the next actor of the key.
            p.metrics.entity_deaths.inc();
            for s in p.topology.supervisors.iter() {
                s.value().do_send(ReplayEntity {
                    key: self.key.clone(),
                });
            }
        } else {
            p.metrics.entity_passivations.inc();
        }
    }
}

impl Handler<Apply> for EntityActor {
    type Result = ();

    fn handle(&mut self, msg: Apply, ctx: &mut Self::Context) {
        self.check(msg, Duration::from_millis(10), ctx);
    }
}

impl Handler<Passivate> for EntityActor {
    type Result = ();

    fn handle(&mut self, _: Passivate, ctx: &mut Self::Context) {
        self.pipeline
            .topology
            .entities
            .remove(&self.key, &ctx.address());
        ctx.stop();
    }
}

/// Events still in the mailbox are lost with it and replayed by the partition supervisors.
impl Handler<Kill> for EntityActor {
    type Result = ();

    fn handle(&mut self, msg: Kill, ctx: &mut Self::Context) {
        injected_panic(msg, || format!("the entity actor of {}", self.key));
        self.died = true;
        ctx.stop();
    }
}
