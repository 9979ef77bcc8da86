//! A consumed Kafka record as the actors see it, free of any client library.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A topic and partition number: the unit of assignment, ordering and commits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition number within the topic.
    pub partition: i32,
}

impl TopicPartition {
    /// Builds a topic-partition from its parts.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// Where a record came from: its topic-partition and offset.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    /// Topic-partition the record was read from.
    pub tp: TopicPartition,
    /// Offset of the record in its partition.
    pub offset: i64,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.tp, self.offset)
    }
}

/// One record as consumed: origin, key, value and headers, all still raw bytes.
#[derive(Clone, Debug)]
pub struct Record {
    /// Where the record was read from.
    pub origin: Origin,
    /// The record key, if any.
    pub key: Option<Vec<u8>>,
    /// The record value; `None` is a tombstone.
    pub value: Option<Vec<u8>>,
    /// Record headers in order; a header without a value is skipped by the client side.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Produce or log-append time in milliseconds since the epoch, when the broker gave one.
    pub timestamp_ms: Option<i64>,
    /// Set once an entity actor has finished the record (applied and staged, dropped as a
    /// duplicate, or dead-lettered), so that it is not handed to the key's next actor again.
    pub finished: Finished,
}

/// Whether a routed record's work is done; shared by the supervisor and the entity actor.
#[derive(Debug, Default)]
pub struct Finished(AtomicBool);

impl Finished {
    /// Marks the record finished.
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether the record is finished.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A copy of a record is a record of its own, as far as it was finished when copied.
impl Clone for Finished {
    fn clone(&self) -> Self {
        Finished(AtomicBool::new(self.get()))
    }
}

impl Record {
    /// The value of the first header named `name`, if present.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}
