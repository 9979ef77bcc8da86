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
use crate::view_codec;

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

/// First byte of a record in the binary format; the JSON records of earlier versions start with
/// `{`.
const BINARY_V1: u8 = 1;

impl ChangelogRecord {
    /// The record of `view`, whose encoding ([`view_codec`]) is `encoded` (encoded once for the
    /// store and the changelog alike), with the message ids it newly holds: a format byte, the
    /// encoded view's length (4 bytes, big-endian) and the view, then the ids in postcard.
    pub fn of_view(view: &Aggregate, encoded: &[u8], markers: &[String]) -> Self {
        let mut value = Vec::with_capacity(encoded.len() + 16 + markers.len() * 40);
        value.push(BINARY_V1);
        value.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        value.extend_from_slice(encoded);
        // Writing strings into a vector cannot fail.
        let value = postcard::to_io(markers, value).unwrap_or_default();
        ChangelogRecord {
            partition: view.partition,
            key: view.key.clone(),
            value,
        }
    }
}

impl ChangelogEntry {
    /// Decodes the record at `offset` of changelog `partition`, binary or JSON.
    pub fn decode(partition: i32, offset: i64, value: &[u8]) -> Result<Self, ChangelogError> {
        let error = |reason: String| ChangelogError::Decode {
            partition,
            offset,
            reason,
        };
        match value.split_first() {
            Some((&BINARY_V1, rest)) => {
                let (len, rest) = rest
                    .split_first_chunk::<4>()
                    .ok_or_else(|| error("cut short before the view's length".into()))?;
                let len = u32::from_be_bytes(*len) as usize;
                if rest.len() < len {
                    return Err(error(format!(
                        "cut short: the view takes {len} bytes, {} follow",
                        rest.len()
                    )));
                }
                let (view, markers) = rest.split_at(len);
                Ok(ChangelogEntry {
                    view: view_codec::decode(view).map_err(|e| error(e.to_string()))?,
                    markers: postcard::from_bytes(markers).map_err(|e| error(e.to_string()))?,
                })
            }
            _ => serde_json::from_slice(value).map_err(|e| error(e.to_string())),
        }
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
        let encoded = view_codec::encode(&entry.view).unwrap();
        let record = ChangelogRecord::of_view(&entry.view, &encoded, &entry.markers);
        assert_eq!((record.partition, record.key.as_str()), (2, "C1"));
        assert_eq!(ChangelogEntry::decode(2, 9, &record.value).unwrap(), entry);
        let err = ChangelogEntry::decode(2, 9, b"{\"view\":1}").unwrap_err();
        assert!(err.to_string().contains("partition 2 offset 9"), "{err}");
        let cut = ChangelogEntry::decode(2, 9, &record.value[..8]).unwrap_err();
        assert!(cut.to_string().contains("cut short"), "{cut}");
        // Records of earlier versions, in JSON, still decode.
        let json = serde_json::to_vec(&entry).unwrap();
        assert_eq!(ChangelogEntry::decode(2, 9, &json).unwrap(), entry);
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
