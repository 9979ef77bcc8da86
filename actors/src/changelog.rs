//! The changelog: every view the dedup actor writes is also published, with the message ids whose
//! effects it newly holds, to partition *p* of a changelog topic (in bundles, a few Kafka records
//! per partition and write), before the store write. An
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

/// A changelog record ready to send: its partition and a bundle of encoded entries.
#[derive(Clone, Debug)]
pub struct ChangelogRecord {
    /// Changelog partition: the partition number its entities belong to.
    pub partition: i32,
    /// Entries (views) in the bundle.
    pub entries: usize,
    /// The bundle: a format byte (2), then each entry's length (4 bytes, big-endian) and the
    /// entry in the binary format of a single-view record (format byte 1).
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

/// First byte of a bundle of binary records, the format written since one record per view cost
/// the producer, the broker and the service more than the views' bytes did (docs/benchmarks.md,
/// "Changelog records in bundles").
const BUNDLE_V2: u8 = 2;

/// Size a bundle is closed at (one view larger than this goes alone): well under the 1 MB that
/// Kafka and librdkafka accept in a record by default.
pub const BUNDLE_BYTES: usize = 256 * 1024;

/// Gathers the changelog entries of one write into bundles of up to [`BUNDLE_BYTES`] per
/// partition, in the order they are added.
#[derive(Default)]
pub struct ChangelogBundler {
    /// By partition, looked up for every view: hashed by the fast hasher the key maps use.
    open: HashMap<i32, ChangelogRecord, crate::KeyHasher>,
    closed: Vec<ChangelogRecord>,
}

impl ChangelogBundler {
    /// Adds the entry of `view`, whose encoding ([`view_codec`]) is `encoded` (encoded once for
    /// the store and the changelog alike), with the message ids it newly holds: a format byte,
    /// the encoded view's length (4 bytes, big-endian) and the view, then the ids in postcard.
    pub fn add(&mut self, view: &Aggregate, encoded: &[u8], markers: &[String]) {
        // An estimate: it only decides where a bundle ends.
        let size = 9 + encoded.len() + markers.iter().map(|m| m.len() + 2).sum::<usize>();
        let empty = || ChangelogRecord {
            partition: view.partition,
            entries: 0,
            value: Vec::new(),
        };
        let bundle = self.open.entry(view.partition).or_insert_with(empty);
        if bundle.entries > 0 && bundle.value.len() + size > BUNDLE_BYTES {
            self.closed.push(std::mem::replace(bundle, empty()));
        }
        if bundle.value.is_empty() {
            bundle.value.reserve(size.max(BUNDLE_BYTES / 4));
            bundle.value.push(BUNDLE_V2);
        }
        let start = bundle.value.len();
        bundle.value.extend_from_slice(&[0; 4]);
        bundle.value.push(BINARY_V1);
        bundle
            .value
            .extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        bundle.value.extend_from_slice(encoded);
        // Writing strings into a vector cannot fail.
        let _ = postcard::to_io(markers, &mut bundle.value);
        let len = (bundle.value.len() - start - 4) as u32;
        bundle.value[start..start + 4].copy_from_slice(&len.to_be_bytes());
        bundle.entries += 1;
    }

    /// The bundles, each partition's in the order their entries were added.
    pub fn finish(mut self) -> Vec<ChangelogRecord> {
        let mut open: Vec<ChangelogRecord> = self.open.into_values().collect();
        open.sort_by_key(|r| r.partition);
        self.closed.extend(open);
        self.closed
    }
}

impl ChangelogEntry {
    /// Decodes the entries of the record at `offset` of changelog `partition`: a bundle, or one
    /// entry as earlier versions wrote them.
    pub fn decode_all(
        partition: i32,
        offset: i64,
        value: &[u8],
    ) -> Result<Vec<Self>, ChangelogError> {
        let Some((&BUNDLE_V2, mut rest)) = value.split_first() else {
            return Ok(vec![Self::decode(partition, offset, value)?]);
        };
        let mut entries = Vec::new();
        while !rest.is_empty() {
            let cut = || ChangelogError::Decode {
                partition,
                offset,
                reason: format!("bundle cut short after {} entries", entries.len()),
            };
            let (len, after) = rest.split_first_chunk::<4>().ok_or_else(cut)?;
            let len = u32::from_be_bytes(*len) as usize;
            let entry = after.get(..len).ok_or_else(cut)?;
            entries.push(Self::decode(partition, offset, entry)?);
            rest = &after[len..];
        }
        Ok(entries)
    }

    /// Decodes one entry at `offset` of changelog `partition`, binary or JSON.
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

/// Resolves once every record of a send is stored by the broker, with, per changelog partition,
/// the offset after the last record sent there.
pub type Acks =
    Pin<Box<dyn Future<Output = Result<HashMap<i32, i64>, ChangelogError>> + Send + 'static>>;

/// Resolves once every record is queued to be sent, after those of earlier sends, with what
/// resolves once the broker has them: the next send may then be queued while the broker has not
/// yet answered this one, and its records still follow these.
pub type SendFuture = Pin<Box<dyn Future<Output = Result<Acks, ChangelogError>> + Send + 'static>>;

/// Where changelog records go: a Kafka topic in the service.
pub trait ChangelogSink: Send + Sync + 'static {
    /// Sends `records`, each partition's in the order given and after every earlier send's.
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

    fn entry(key: &str, partition: i32, applied: u64, markers: &[&str]) -> ChangelogEntry {
        let mut view = Aggregate::new(key, partition);
        view.events_applied = applied;
        ChangelogEntry {
            view,
            markers: markers.iter().map(|m| m.to_string()).collect(),
        }
    }

    fn bundle(entries: &[ChangelogEntry]) -> Vec<ChangelogRecord> {
        let mut bundler = ChangelogBundler::default();
        for e in entries {
            bundler.add(&e.view, &view_codec::encode(&e.view).unwrap(), &e.markers);
        }
        bundler.finish()
    }

    #[test]
    fn entries_round_trip_in_a_bundle_per_partition_and_a_bad_record_names_its_place() {
        let entries = [
            entry("C1", 2, 4, &["m3", "m4"]),
            entry("C2", 1, 1, &[]),
            entry("C3", 2, 7, &["m9"]),
        ];
        let records = bundle(&entries);
        let by_partition: Vec<(i32, usize)> =
            records.iter().map(|r| (r.partition, r.entries)).collect();
        assert_eq!(by_partition, [(1, 1), (2, 2)]);
        assert_eq!(
            ChangelogEntry::decode_all(2, 9, &records[1].value).unwrap(),
            [entries[0].clone(), entries[2].clone()]
        );
        let err = ChangelogEntry::decode_all(2, 9, b"{\"view\":1}").unwrap_err();
        assert!(err.to_string().contains("partition 2 offset 9"), "{err}");
        let value = &records[1].value;
        let cut = ChangelogEntry::decode_all(2, 9, &value[..value.len() - 3]).unwrap_err();
        assert!(cut.to_string().contains("cut short"), "{cut}");
        // Records of earlier versions, one entry each in binary or in JSON, still decode.
        let single = &value[5..5 + u32::from_be_bytes(value[1..5].try_into().unwrap()) as usize];
        assert_eq!(
            ChangelogEntry::decode_all(2, 9, single).unwrap(),
            [entries[0].clone()]
        );
        let json = serde_json::to_vec(&entries[0]).unwrap();
        assert_eq!(
            ChangelogEntry::decode_all(2, 9, &json).unwrap(),
            [entries[0].clone()]
        );
    }

    #[test]
    fn a_bundle_closes_at_its_size_and_keeps_each_partitions_order() {
        let long = "x".repeat(1000);
        let entries: Vec<ChangelogEntry> = (0..600)
            .map(|i| entry(&format!("C{i}"), i % 2, 1, &[long.as_str()]))
            .collect();
        let records = bundle(&entries);
        for r in &records {
            assert!(r.value.len() <= BUNDLE_BYTES, "{} bytes", r.value.len());
        }
        assert!(records.len() >= 4, "600 KB in {} bundles", records.len());
        for partition in [0, 1] {
            let decoded: Vec<ChangelogEntry> = records
                .iter()
                .filter(|r| r.partition == partition)
                .flat_map(|r| ChangelogEntry::decode_all(partition, 0, &r.value).unwrap())
                .collect();
            let expected: Vec<ChangelogEntry> = entries
                .iter()
                .filter(|e| e.view.partition == partition)
                .cloned()
                .collect();
            assert_eq!(decoded, expected, "partition {partition} in order");
        }
        // One view larger than a bundle goes alone.
        let huge = "y".repeat(BUNDLE_BYTES);
        let records = bundle(&[entry("small", 0, 1, &[]), entry("huge", 0, 1, &[&huge])]);
        assert_eq!(
            records.iter().map(|r| r.entries).collect::<Vec<_>>(),
            [1, 1]
        );
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
