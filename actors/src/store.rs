//! The durable store (sled): entity views, message-id markers and a per-partition index, all
//! written through atomic batches so that a marker never exists without its effect.
//!
//! Keys: `e/{entity}` holds the view as JSON; `p/{partition:05}/{entity}` indexes entities by
//! partition so that one partition's state can be read out alone; `m/{partition:05}/{message id}`
//! marks a message as applied (its value is the time it was written); `s/{partition:05}/{seq:020}`
//! lists a partition's markers in the order they were written, so that the oldest expire once a
//! partition holds more than the dedup window; `c/{partition:05}` is the changelog offset up to
//! which the partition's state is in the store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::aggregate::Aggregate;
use crate::fault_injector::FaultInjector;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be opened; the service must not start empty in its place.
    #[error("cannot open the store at {path}: {source}")]
    Open {
        /// Path of the store.
        path: PathBuf,
        /// What sled said.
        source: sled::Error,
    },
    /// A read failed.
    #[error("store read failed: {0}")]
    Read(sled::Error),
    /// A write or flush failed.
    #[error("store write failed: {0}")]
    Write(String),
    /// The store was handed back at shutdown and is no longer usable here.
    #[error("the store was released at shutdown")]
    Released,
    /// A stored view does not decode.
    #[error("stored view of {key:?} does not decode: {source}")]
    Decode {
        /// The entity key.
        key: String,
        /// What serde said.
        source: serde_json::Error,
    },
}

/// Page cache of a store opened with [`Store::open`], in bytes.
pub const DEFAULT_CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// Handle to the sled database. Cheap to clone; reads are safe from any thread, and all writes go
/// through the dedup actor's batches.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    path: PathBuf,
    faults: FaultInjector,
    /// Markers kept per partition; older ones expire.
    window: u64,
    /// Per partition, the sequence numbers of its oldest kept and its next marker.
    sequences: Arc<Mutex<HashMap<i32, MarkerSequence>>>,
}

/// Where a partition's marker list starts and ends.
#[derive(Clone, Copy, Debug, Default)]
struct MarkerSequence {
    oldest: u64,
    next: u64,
}

/// Markers kept per partition by a store opened without a window.
pub const DEFAULT_DEDUP_WINDOW: u64 = 1_000_000;

/// One atomic write: markers, views and index entries applied together or not at all.
#[derive(Default)]
pub struct WriteBatch {
    batch: sled::Batch,
    /// Message ids marked, by partition, in order.
    marked: Vec<(i32, String)>,
    /// Markers in this batch.
    pub markers: usize,
    /// Views in this batch.
    pub views: usize,
}

impl WriteBatch {
    /// Marks `message_id` of `partition` as applied at `now_ms`.
    pub fn add_marker(&mut self, partition: i32, message_id: &str, now_ms: i64) {
        self.batch
            .insert(marker_key(partition, message_id), &now_ms.to_be_bytes());
        self.marked.push((partition, message_id.to_string()));
        self.markers += 1;
    }

    /// Writes the view `agg` and its partition index entry.
    pub fn put_view(&mut self, agg: &Aggregate) -> Result<(), serde_json::Error> {
        let bytes = serde_json::to_vec(agg)?;
        self.put_encoded_view(agg.partition, &agg.key, bytes);
        Ok(())
    }

    /// Writes the view of `key`, already encoded as JSON, and its partition index entry.
    pub fn put_encoded_view(&mut self, partition: i32, key: &str, json: Vec<u8>) {
        self.batch.insert(view_key(key), json);
        self.batch.insert(index_key(partition, key), &[]);
        self.views += 1;
    }

    /// Records that changelog `partition` is reflected in the store up to `next` (exclusive).
    pub fn set_changelog_offset(&mut self, partition: i32, next: i64) {
        self.batch
            .insert(changelog_key(partition), &next.to_be_bytes());
    }

    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.markers == 0 && self.views == 0
    }
}

fn view_key(key: &str) -> Vec<u8> {
    format!("e/{key}").into_bytes()
}

fn index_key(partition: i32, key: &str) -> Vec<u8> {
    format!("p/{partition:05}/{key}").into_bytes()
}

fn marker_key(partition: i32, message_id: &str) -> Vec<u8> {
    format!("m/{partition:05}/{message_id}").into_bytes()
}

fn changelog_key(partition: i32) -> Vec<u8> {
    format!("c/{partition:05}").into_bytes()
}

fn sequence_prefix(partition: i32) -> String {
    format!("s/{partition:05}/")
}

fn sequence_key(partition: i32, seq: u64) -> Vec<u8> {
    format!("s/{partition:05}/{seq:020}").into_bytes()
}

impl Store {
    /// Opens (or creates) the store at `path` with sled's default cache.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store at `path`, caching at most `cache_bytes` of pages in memory.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with(path, cache_bytes, DEFAULT_DEDUP_WINDOW)
    }

    /// Opens (or creates) the store at `path`, caching at most `cache_bytes` of pages in memory
    /// and keeping the latest `window` message-id markers of each partition.
    pub fn open_with(path: &Path, cache_bytes: u64, window: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // The dedup actor flushes after every batch; a timer-driven flush would only add I/O.
            .flush_every_ms(None)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Store {
            db,
            path: path.to_path_buf(),
            faults: FaultInjector::default(),
            window: window.max(1),
            sequences: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The handle that injects write faults into this store.
    pub fn fault_injector(&self) -> FaultInjector {
        self.faults.clone()
    }

    /// Path the store was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored view of `key`.
    pub fn load(&self, key: &str) -> Result<Option<Aggregate>, StoreError> {
        match self.db.get(view_key(key)).map_err(StoreError::Read)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StoreError::Decode {
                        key: key.to_string(),
                        source,
                    })
            }
        }
    }

    /// Whether `message_id` of `partition` has been applied.
    pub fn has_marker(&self, partition: i32, message_id: &str) -> Result<bool, StoreError> {
        self.db
            .contains_key(marker_key(partition, message_id))
            .map_err(StoreError::Read)
    }

    /// Applies `batch` atomically, with the expiry of the markers it pushes out of the window;
    /// visible to reads at once, durable after [`Store::flush`]. Returns the markers expired.
    pub fn write(&self, batch: WriteBatch) -> Result<u64, StoreError> {
        if self.faults.take() {
            return Err(StoreError::Write("injected fault".into()));
        }
        let WriteBatch {
            mut batch, marked, ..
        } = batch;
        let mut sequences = self.sequences.lock().unwrap_or_else(|p| p.into_inner());
        // Worked on a copy: a failed write must leave the sequences as they were.
        let mut changed: HashMap<i32, MarkerSequence> = HashMap::new();
        let mut added: HashMap<(i32, u64), &str> = HashMap::new();
        for (partition, id) in &marked {
            let seq = match changed.get(partition).or_else(|| sequences.get(partition)) {
                Some(s) => *s,
                None => self.read_sequence(*partition)?,
            };
            let seq = changed.entry(*partition).or_insert(seq);
            batch.insert(sequence_key(*partition, seq.next), id.as_bytes());
            added.insert((*partition, seq.next), id);
            seq.next += 1;
        }
        let mut expired = 0;
        for (partition, seq) in &mut changed {
            while seq.next - seq.oldest > self.window {
                let key = sequence_key(*partition, seq.oldest);
                let id = match added.get(&(*partition, seq.oldest)) {
                    Some(id) => Some(id.as_bytes().to_vec()),
                    None => self
                        .db
                        .get(&key)
                        .map_err(StoreError::Read)?
                        .map(|v| v.to_vec()),
                };
                if let Some(id) = id {
                    batch.remove(marker_key(*partition, &String::from_utf8_lossy(&id)));
                    expired += 1;
                }
                batch.remove(key);
                seq.oldest += 1;
            }
        }
        self.db
            .apply_batch(batch)
            .map_err(|e| StoreError::Write(e.to_string()))?;
        sequences.extend(changed);
        Ok(expired)
    }

    /// A partition's marker list as stored: its first and one past its last sequence number.
    fn read_sequence(&self, partition: i32) -> Result<MarkerSequence, StoreError> {
        let prefix = sequence_prefix(partition);
        let seq_of = |k: sled::IVec| {
            std::str::from_utf8(&k[prefix.len()..])
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let mut keys = self.db.scan_prefix(prefix.as_bytes()).keys();
        let first = keys.next().transpose().map_err(StoreError::Read)?;
        let last = keys.next_back().transpose().map_err(StoreError::Read)?;
        Ok(match (first, last) {
            (None, _) => MarkerSequence::default(),
            (Some(f), None) => {
                let f = seq_of(f);
                MarkerSequence {
                    oldest: f,
                    next: f + 1,
                }
            }
            (Some(f), Some(l)) => MarkerSequence {
                oldest: seq_of(f),
                next: seq_of(l) + 1,
            },
        })
    }

    /// The changelog offset of `partition` to read from next: records below it are in the store.
    pub fn changelog_offset(&self, partition: i32) -> Result<i64, StoreError> {
        Ok(self
            .db
            .get(changelog_key(partition))
            .map_err(StoreError::Read)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(i64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Markers kept for `partition`.
    pub fn marker_count(&self, partition: i32) -> Result<u64, StoreError> {
        Ok(self
            .db
            .scan_prefix(format!("m/{partition:05}/").as_bytes())
            .keys()
            .filter(Result::is_ok)
            .count() as u64)
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(|e| StoreError::Write(e.to_string()))
    }

    /// Keys of the entities stored for `partition`.
    pub fn entities_of_partition(&self, partition: i32) -> Result<Vec<String>, StoreError> {
        let prefix = format!("p/{partition:05}/");
        self.db
            .scan_prefix(prefix.as_bytes())
            .keys()
            .map(|k| {
                k.map(|k| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
                    .map_err(StoreError::Read)
            })
            .collect()
    }

    /// Number of entity views stored.
    pub fn entity_count(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for k in self.db.scan_prefix(b"e/").keys() {
            k.map_err(StoreError::Read)?;
            n += 1;
        }
        Ok(n)
    }

    /// Size of the store on disk, in bytes.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_writes_marker_view_and_index_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        let mut agg = Aggregate::new("C1", 3);
        agg.events_applied = 2;
        let mut batch = WriteBatch::default();
        batch.add_marker(3, "m1", 10);
        batch.put_view(&agg).unwrap();
        assert!(!store.has_marker(3, "m1").unwrap());
        store.write(batch).unwrap();
        assert!(store.has_marker(3, "m1").unwrap());
        assert!(!store.has_marker(2, "m1").unwrap());
        assert_eq!(store.load("C1").unwrap(), Some(agg));
        assert_eq!(
            store.entities_of_partition(3).unwrap(),
            vec!["C1".to_string()]
        );
        assert!(store.entities_of_partition(4).unwrap().is_empty());
    }

    #[test]
    fn reopening_keeps_flushed_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        {
            let store = Store::open(&path).unwrap();
            let mut batch = WriteBatch::default();
            batch.add_marker(0, "m", 1);
            store.write(batch).unwrap();
            futures_lite_block_on(store.flush()).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert!(store.has_marker(0, "m").unwrap());
    }

    #[test]
    fn markers_beyond_the_window_expire_oldest_first_and_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mark = |store: &Store, ids: std::ops::Range<u32>| {
            let mut batch = WriteBatch::default();
            for i in ids {
                batch.add_marker(1, &format!("id{i}"), 0);
            }
            store.write(batch).unwrap()
        };
        {
            let store = Store::open_with(&path, 1 << 20, 3).unwrap();
            assert_eq!(mark(&store, 0..2), 0);
            // A batch larger than the window expires some of its own markers.
            assert_eq!(mark(&store, 2..7), 4);
            mark(&store, 0..0);
            let mut other = WriteBatch::default();
            other.add_marker(2, "id0", 0);
            store.write(other).unwrap();
            futures_lite_block_on(store.flush()).unwrap();
        }
        let store = Store::open_with(&path, 1 << 20, 3).unwrap();
        let kept: Vec<bool> = (0..7)
            .map(|i| store.has_marker(1, &format!("id{i}")).unwrap())
            .collect();
        assert_eq!(kept, [false, false, false, false, true, true, true]);
        assert!(
            store.has_marker(2, "id0").unwrap(),
            "windows are per partition"
        );
        // The sequence carries on after reopening.
        assert_eq!(mark(&store, 7..9), 2);
        assert_eq!(store.marker_count(1).unwrap(), 3);
        assert!(store.has_marker(1, "id8").unwrap() && !store.has_marker(1, "id5").unwrap());
    }

    fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
        actix_rt::System::new().block_on(f)
    }
}
