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

/// One record as consumed: origin, key, value and headers as read (the value kept as text when
/// it is UTF-8, see [`RecordValue`]).
#[derive(Clone, Debug)]
pub struct Record {
    /// Where the record was read from.
    pub origin: Origin,
    /// The record key, if any.
    pub key: Option<Vec<u8>>,
    /// The record value; `None` is a tombstone.
    pub value: Option<RecordValue>,
    /// Record headers in order; a header without a value is skipped by the client side.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Produce or log-append time in milliseconds since the epoch, when the broker gave one.
    pub timestamp_ms: Option<i64>,
    /// Set once an entity actor has finished the record (applied and staged, dropped as a
    /// duplicate, or dead-lettered), so that it is not handed to the key's next actor again.
    pub finished: Finished,
}

/// A record's value: its text when it is UTF-8, as an envelope is, so that the envelope parsed
/// from it shares it instead of copying it again; its bytes otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordValue {
    /// A value that is UTF-8.
    Text(Arc<str>),
    /// A value that is not.
    Bytes(Box<[u8]>),
}

impl RecordValue {
    /// The value of `bytes`, checked for UTF-8 here, once.
    pub fn new(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => RecordValue::Text(Arc::from(text)),
            Err(_) => RecordValue::Bytes(Box::from(bytes)),
        }
    }

    /// The value's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            RecordValue::Text(text) => text.as_bytes(),
            RecordValue::Bytes(bytes) => bytes,
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Vec<u8>> for RecordValue {
    fn from(bytes: Vec<u8>) -> Self {
        match String::from_utf8(bytes) {
            Ok(text) => RecordValue::Text(Arc::from(text)),
            Err(e) => RecordValue::Bytes(e.into_bytes().into_boxed_slice()),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_text_when_it_is_utf8_and_keeps_its_bytes_either_way() {
        for bytes in [&b"{\"a\": 1}"[..], b"", &[0xff, 0xfe, b'{'][..]] {
            let made = RecordValue::new(bytes);
            let from_vec = RecordValue::from(bytes.to_vec());
            assert_eq!(made, from_vec);
            assert_eq!(made.as_bytes(), bytes);
            assert_eq!(made.len(), bytes.len());
            assert_eq!(
                matches!(made, RecordValue::Text(_)),
                std::str::from_utf8(bytes).is_ok()
            );
        }
    }
}
