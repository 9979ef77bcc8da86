//! The actors of the aggregator and what they work on: records and their parsing, the rules and the
//! fold, the store, and the actor tree of the design card (partition supervisor, entity actor,
//! dedup actor, offset committer). Nothing here talks to Kafka: records come in, offsets and dead
//! letters go out through the sinks, so the whole tree runs in tests without a broker.

pub mod aggregate;
pub mod changelog;
pub mod dead_letter;
pub mod dedup_actor;
pub mod entity_actor;
pub mod entity_registry;
pub mod envelope;
pub mod fault_injector;
pub mod figure;
pub mod json_fields;
pub mod kill;
pub mod ledger;
mod marker_index;
pub mod metrics;
pub mod name;
pub mod offset_committer;
pub mod offset_tracker;
pub mod partition_supervisor;
pub mod pipeline;
pub mod record;
pub mod rules;
pub mod section;
pub mod small_map;
pub mod store;
pub mod topology;
pub mod view_codec;
pub mod view_loader;

/// The hasher of the maps looked up by entity key or message id for every event: foldhash,
/// seeded at random per process, where the standard SipHash was about 5% of the actors' thread.
pub(crate) type KeyHasher = foldhash::fast::RandomState;

pub use aggregate::Aggregate;
pub use envelope::{Event, ParseLimits, Rejection};
pub use record::{Origin, Record, RecordValue, TopicPartition};
pub use rules::{RuleConfig, RuleKind, Rules, RulesError, SourceConfig};
pub use store::{Store, StoreError};
