//! What every partition supervisor and entity actor shares: the rules, the limits, the actors they
//! talk to, and the live figures they update.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;

use crate::dead_letter::DeadLetterer;
use crate::dedup_actor::DedupActor;
use crate::envelope::ParseLimits;
use crate::fault_injector::FaultInjector;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::offset_committer::OffsetCommitter;
use crate::rules::Rules;
use crate::topology::Topology;
use crate::view_loader::ViewLoader;

/// Shared context of the actor tree.
pub struct Pipeline {
    /// The validated sources and rules.
    pub rules: Arc<Rules>,
    /// Parse limits.
    pub limits: ParseLimits,
    /// Live figures of the tree.
    pub topology: Arc<Topology>,
    /// Exported metrics.
    pub metrics: Arc<Metrics>,
    /// The dedup actor.
    pub dedup: Addr<DedupActor>,
    /// The dedup actor's ledger, where entity actors check message ids and stage their views.
    pub ledger: Arc<Ledger>,
    /// Reads the views of entity actors that start.
    pub loader: ViewLoader,
    /// The offset committer.
    pub committer: Addr<OffsetCommitter>,
    /// Where unprocessable records go.
    pub dead_letters: DeadLetterer,
    /// How long an entity actor stays alive without events.
    pub entity_idle: Duration,
    /// Live entity actors beyond which idle ones passivate, least recently used first.
    pub max_live_entities: usize,
    /// Times a failing rule is retried before its record is dead-lettered.
    pub rule_retries: u32,
    /// Wait before the first retry of a failing rule; doubles with each retry.
    pub rule_retry_backoff: Duration,
    /// Makes the next rule folds fail, for tests of the retry budget.
    pub rule_faults: FaultInjector,
}
