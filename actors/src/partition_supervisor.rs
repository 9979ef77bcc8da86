//! The partition supervisor: one per assigned topic-partition. It parses records in offset order,
//! registers them with the committer, routes events to entity actors (spawning them on demand) and
//! dead-letters what cannot be processed. On revocation it drains and stops.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;

use crate::entity_actor::{Apply, EntityActor};
use crate::entity_registry::EntityHandle;
use crate::envelope::{parse, Event};
use crate::offset_committer::{DrainPartition, Register};
use crate::pipeline::Pipeline;
use crate::record::{Record, TopicPartition};
use crate::topology::PartitionStats;

/// Records of this partition, in offset order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    /// The records.
    pub records: Vec<Record>,
}

/// Hands `records` (of one partition, in offset order) to its supervisor, counting them in flight
/// first so that flow control sees records still queued in the supervisor's mailbox.
pub fn deliver(addr: &Addr<PartitionSupervisor>, stats: &PartitionStats, records: Vec<Record>) {
    stats
        .in_flight
        .fetch_add(records.len() as i64, Ordering::Relaxed);
    addr.do_send(Deliver { records });
}

/// Finish the in-flight work and stop; resolves with the offset to commit for the partition.
#[derive(Message)]
#[rtype(result = "Option<i64>")]
pub struct Drain;

/// The partition supervisor.
pub struct PartitionSupervisor {
    tp: TopicPartition,
    pipeline: Arc<Pipeline>,
    stats: Arc<PartitionStats>,
}

impl PartitionSupervisor {
    /// A supervisor of `tp`.
    pub fn new(tp: TopicPartition, pipeline: Arc<Pipeline>) -> Self {
        let stats = pipeline.topology.partition(&tp);
        PartitionSupervisor {
            tp,
            pipeline,
            stats,
        }
    }

    fn route(&self, event: Event, record: Record) {
        let p = &self.pipeline;
        let registry = &p.topology.entities;
        let handle = match registry.get(&event.key) {
            Some(h) if h.addr.connected() => h,
            _ => {
                let mailbox = Arc::new(AtomicUsize::new(0));
                let actor = EntityActor::new(
                    event.key.clone(),
                    self.tp.partition,
                    p.clone(),
                    mailbox.clone(),
                );
                let handle = EntityHandle {
                    addr: actor.start(),
                    mailbox,
                };
                registry.insert(event.key.clone(), handle.clone());
                handle
            }
        };
        handle.mailbox.fetch_add(1, Ordering::Relaxed);
        handle.addr.do_send(Apply { event, record });
    }
}

impl Actor for PartitionSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        tracing::info!(tp = %self.tp, "partition supervisor started");
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        // A re-assignment may already have registered fresh figures under the same partition.
        let stats = &self.stats;
        self.pipeline
            .topology
            .partitions
            .remove_if(&self.tp, |_, current| Arc::ptr_eq(current, stats));
        tracing::info!(tp = %self.tp, "partition supervisor stopped");
    }
}

impl Handler<Deliver> for PartitionSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Deliver, _: &mut Self::Context) {
        let Some(last) = msg.records.last() else {
            return;
        };
        self.stats
            .position
            .store(last.origin.offset + 1, Ordering::Relaxed);
        let p = self.pipeline.clone();
        p.committer.do_send(Register {
            tp: self.tp.clone(),
            offsets: msg
                .records
                .iter()
                .map(|r| (r.origin.offset, r.timestamp_ms.unwrap_or(0)))
                .collect(),
        });
        for record in msg.records {
            let source = p.rules.source_for_topic(&self.tp.topic);
            if let Some(s) = source {
                p.metrics.source(s).consumed.inc();
            }
            match parse(&record, &p.rules, &p.limits) {
                Ok(event) => self.route(event, record),
                Err(rejection) => {
                    let name = source.map_or_else(
                        || self.tp.topic.to_string(),
                        |s| p.rules.source(s).name.clone(),
                    );
                    p.dead_letters.send(record, &name, &rejection);
                }
            }
        }
    }
}

impl Handler<Drain> for PartitionSupervisor {
    type Result = ResponseActFuture<Self, Option<i64>>;

    fn handle(&mut self, _: Drain, _: &mut Self::Context) -> Self::Result {
        let drain = self.pipeline.committer.send(DrainPartition {
            tp: self.tp.clone(),
        });
        Box::pin(drain.into_actor(self).map(|res, act, ctx| {
            let offset = res.ok().flatten();
            tracing::info!(tp = %act.tp, ?offset, "partition drained");
            ctx.stop();
            offset
        }))
    }
}
