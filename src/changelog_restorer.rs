//! Brings a newly assigned partition's state up to date: reads the changelog partition from where
//! the store last was to its end, and writes what other instances published into the store before
//! the partition's supervisors start.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use aggregator_actors::changelog::{restore_into, ChangelogEntry, ChangelogError};
use aggregator_actors::Store;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::config::Config;

/// Entries written to the store in one atomic batch while restoring.
const RESTORE_CHUNK: usize = 1_000;

/// What one restore did.
#[derive(Debug, Default)]
pub struct Restored {
    /// Changelog records replayed into the store.
    pub records: u64,
    /// Entities whose stored view changed: their live actors must reload it.
    pub keys: HashSet<String>,
}

/// Client callbacks of the reader: the end-of-partition events it asks for are not errors.
struct RestoreContext;

impl ClientContext for RestoreContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let end_of_partition = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end_of_partition {
            tracing::warn!("changelog reader: {error}: {reason}");
        }
    }
}

impl ConsumerContext for RestoreContext {}

/// Reads the changelog topic into the store.
pub struct ChangelogRestorer {
    consumer: BaseConsumer<RestoreContext>,
    topic: String,
    timeout: Duration,
}

impl ChangelogRestorer {
    /// A reader of the configured changelog topic (assigned partitions only, no group).
    pub fn new(config: &Config) -> Result<Self, KafkaError> {
        let group = format!("{}-changelog-restore", config.kafka.group_id);
        let client = config.kafka.consumer_client(&[
            ("group.id", &group),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "true"),
            // A stored offset the broker no longer has: take what is left, and say so below.
            ("auto.offset.reset", "earliest"),
            // A partition is restored once its end is reached, which a fetch finding nothing
            // tells only after this wait (librdkafka's 500 ms made every start that much slower).
            ("fetch.wait.max.ms", "10"),
        ]);
        Ok(ChangelogRestorer {
            consumer: client.create_with_context(RestoreContext)?,
            topic: config.changelog.topic.clone(),
            timeout: Duration::from_millis(config.changelog.restore_timeout_ms),
        })
    }

    /// Replays changelog `partitions` into `store`, each from the offset the store last reached to
    /// the end the broker reports when the read gets there.
    pub fn restore(&self, store: &Store, partitions: &[i32]) -> Result<Restored, ChangelogError> {
        let mut restored = Restored::default();
        if partitions.is_empty() {
            return Ok(restored);
        }
        let read_error = |e: KafkaError| ChangelogError::Read(e.to_string());
        let mut tpl = TopicPartitionList::new();
        let mut from = BTreeMap::new();
        for &p in partitions {
            let offset = store.changelog_offset(p)?;
            // A partition the store is up to date with is not read: learning that from a fetch
            // that finds nothing takes librdkafka up to a second, asking for the end a moment.
            // (An end below the store's offset, a topic made anew, is read from its start.)
            let (_, end) = self
                .consumer
                .fetch_watermarks(&self.topic, p, self.timeout)
                .map_err(read_error)?;
            if offset == end {
                continue;
            }
            from.insert(p, offset);
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(offset))
                .map_err(read_error)?;
        }
        if from.is_empty() {
            return Ok(restored);
        }
        self.consumer.assign(&tpl).map_err(read_error)?;
        let result = self.read(store, &from, &mut restored);
        let _ = self.consumer.unassign();
        result.map(|()| restored)
    }

    fn read(
        &self,
        store: &Store,
        from: &BTreeMap<i32, i64>,
        restored: &mut Restored,
    ) -> Result<(), ChangelogError> {
        let deadline = Instant::now() + self.timeout;
        let mut open: HashSet<i32> = from.keys().copied().collect();
        let mut pending: BTreeMap<i32, Vec<(i64, ChangelogEntry)>> = BTreeMap::new();
        let mut first_seen: HashSet<i32> = HashSet::new();
        let write = |p: i32, entries: &mut Vec<(i64, ChangelogEntry)>, r: &mut Restored| {
            for (_, e) in entries.iter() {
                r.keys.insert(e.view.key.clone());
            }
            r.records += restore_into(store, p, entries)? as u64;
            entries.clear();
            Ok::<(), ChangelogError>(())
        };
        while !open.is_empty() {
            if Instant::now() > deadline {
                return Err(ChangelogError::Read(format!(
                    "partitions {open:?} of {} not read to their end within {:?}",
                    self.topic, self.timeout
                )));
            }
            let m = match self.consumer.poll(Duration::from_millis(100)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    open.remove(&p);
                    continue;
                }
                Some(Err(e)) => return Err(ChangelogError::Read(e.to_string())),
                Some(Ok(m)) => m,
            };
            let (p, offset) = (m.partition(), m.offset());
            if first_seen.insert(p) && from.get(&p).is_some_and(|f| offset > *f) {
                tracing::error!(
                    partition = p,
                    "changelog records {}..{offset} of {} are gone (retention); views of partition {p} may miss their effects",
                    from[&p],
                    self.topic
                );
            }
            let Some(value) = m.payload() else { continue };
            let entries = pending.entry(p).or_default();
            for entry in ChangelogEntry::decode_all(p, offset, value)? {
                entries.push((offset, entry));
            }
            if entries.len() >= RESTORE_CHUNK {
                write(p, entries, restored)?;
            }
        }
        for (p, entries) in &mut pending {
            write(*p, entries, restored)?;
        }
        Ok(())
    }
}
