//! What every partition supervisor and entity actor shares: the rules, the limits, the actors they
//! talk to, and the live figures they update.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;

use crate::dead_letter::DeadLetterer;
use crate::dedup_actor::DedupActor;
use crate::envelope::ParseLimits;
use crate::metrics::Metrics;
use crate::offset_committer::OffsetCommitter;
use crate::rules::Rules;
use crate::topology::Topology;

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
    /// The offset committer.
    pub committer: Addr<OffsetCommitter>,
    /// Where unprocessable records go.
    pub dead_letters: DeadLetterer,
    /// How long an entity actor stays alive without events.
    pub entity_idle: Duration,
}
