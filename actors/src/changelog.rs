//! The changelog: every view the dedup actor writes is also published, with the message ids whose
//! effects it newly holds, to partition *p* of a changelog topic, before the store write. An
//! instance that is assigned partition *p* replays the records it has not seen into its store, so
//! a partition's state follows it from one instance to the next (DESIGN §3a).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::aggregate::Aggregate;
use crate::store::{Store, WriteBatch};

/// One changelog record: a view after a flush and the message ids applied to it since the last.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangelogEntry {
    /// The whole view.
    pub view: Aggregate,
    /// Message ids whose effects this view holds and no earlier record of it announced.
    pub markers: Vec<String>,
}

/// A changelog record ready to send: its partition, key (the entity) and encoded entry.
#[derive(Clone, Debug)]
pub struct ChangelogRecord {
    /// Changelog partition: the partition number the entity belongs to.
    pub partition: i32,
    /// The entity key.
    pub key: String,
    /// The encoded [`ChangelogEntry`].
    pub value: Vec<u8>,
}

/// Why the changelog could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChangelogError {
    /// The broker did not accept a record.
    #[error("changelog send failed: {0}")]
    Send(String),
    /// A record in the changelog does not decode.
    #[error("changelog record at partition {partition} offset {offset} does not decode: {reason}")]
    Decode {
        /// Changelog partition.
        partition: i32,
        /// Offset of the record.
        offset: i64,
        /// What the decoder said.
        reason: String,
    },
    /// Reading the changelog failed.
    #[error("reading the changelog: {0}")]
    Read(String),
    /// Writing what was read into the store failed.
    #[error("restoring into the store: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl ChangelogRecord {
    /// The record of `view`, whose JSON encoding is `view_json` (encoded once for the store and
    /// the changelog alike), with the message ids it newly holds.
    pub fn of_view(
        view: &Aggregate,
        view_json: &[u8],
        markers: &[String],
    ) -> Result<Self, serde_json::Error> {
        let markers = serde_json::to_vec(markers)?;
        let mut value = Vec::with_capacity(view_json.len() + markers.len() + 24);
        value.extend_from_slice(b"{\"view\":");
        value.extend_from_slice(view_json);
        value.extend_from_slice(b",\"markers\":");
        value.extend_from_slice(&markers);
        value.push(b'}');
        Ok(ChangelogRecord {
            partition: view.partition,
            key: view.key.clone(),
            value,
        })
    }
}

impl ChangelogEntry {
    /// Decodes the record at `offset` of changelog `partition`.
    pub fn decode(partition: i32, offset: i64, value: &[u8]) -> Result<Self, ChangelogError> {
        serde_json::from_slice(value).map_err(|e| ChangelogError::Decode {
            partition,
            offset,
            reason: e.to_string(),
        })
    }
}

/// Resolves once every record is stored by the broker, with, per changelog partition, the offset
/// after the last record sent there.
pub type SendFuture =
    Pin<Box<dyn Future<Output = Result<HashMap<i32, i64>, ChangelogError>> + Send + 'static>>;

/// Where changelog records go: a Kafka topic in the service.
pub trait ChangelogSink: Send + Sync + 'static {
    /// Sends `records`, each partition's in the order given.
    fn send(&self, records: Vec<ChangelogRecord>) -> SendFuture;
}

/// Writes `entries` (read at the given offsets of changelog `partition`, in order) into `store` in
/// one atomic batch, with the offset to read from next time. A view replaces the stored one;
/// markers already stored are not written twice. Returns the entries applied.
pub fn restore_into(
    store: &Store,
    partition: i32,
    entries: &[(i64, ChangelogEntry)],
) -> Result<usize, ChangelogError> {
    let Some((last, _)) = entries.last() else {
        return Ok(0);
    };
    let mut batch = WriteBatch::default();
    let mut marked = std::collections::HashSet::new();
    // Only the last entry of a view counts, but its markers are spread over all of them.
    let mut latest: HashMap<&str, &Aggregate> = HashMap::new();
    for (_, entry) in entries {
        for id in &entry.markers {
            if !marked.contains(id.as_str()) && !store.has_marker(partition, id)? {
                batch.add_marker(partition, id);
                marked.insert(id.as_str());
            }
        }
        latest.insert(&entry.view.key, &entry.view);
    }
    for view in latest.values() {
        batch
            .put_view(view)
            .map_err(|e| ChangelogError::Read(e.to_string()))?;
    }
    batch.set_changelog_offset(partition, last + 1);
    store.write(batch)?;
    Ok(entries.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_round_trips_and_a_bad_record_names_its_place() {
        let mut view = Aggregate::new("C1", 2);
        view.events_applied = 4;
        let entry = ChangelogEntry {
            view,
            markers: vec!["m3".into(), "m4".into()],
        };
        let json = serde_json::to_vec(&entry.view).unwrap();
        let record = ChangelogRecord::of_view(&entry.view, &json, &entry.markers).unwrap();
        assert_eq!((record.partition, record.key.as_str()), (2, "C1"));
        assert_eq!(ChangelogEntry::decode(2, 9, &record.value).unwrap(), entry);
        let err = ChangelogEntry::decode(2, 9, b"{\"view\":1}").unwrap_err();
        assert!(err.to_string().contains("partition 2 offset 9"), "{err}");
    }

    #[test]
    fn restoring_keeps_the_last_view_every_marker_once_and_where_to_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        let entry = |n: u64, markers: &[&str]| {
            let mut view = Aggregate::new("C1", 1);
            view.events_applied = n;
            ChangelogEntry {
                view,
                markers: markers.iter().map(|m| m.to_string()).collect(),
            }
        };
        assert_eq!(store.changelog_offset(1).unwrap(), 0);
        let mut first = WriteBatch::default();
        first.add_marker(1, "a");
        store.write(first).unwrap();
        let entries = [(4, entry(1, &["a"])), (7, entry(2, &["b", "c"]))];
        assert_eq!(restore_into(&store, 1, &entries).unwrap(), 2);
        assert_eq!(store.load("C1").unwrap().unwrap().events_applied, 2);
        assert_eq!(store.marker_count(1).unwrap(), 3, "a is not marked twice");
        assert!(store.has_marker(1, "b").unwrap() && store.has_marker(1, "c").unwrap());
        assert_eq!(store.changelog_offset(1).unwrap(), 8);
        assert_eq!(
            store.changelog_offset(0).unwrap(),
            0,
            "offsets are per partition"
        );
    }
}
