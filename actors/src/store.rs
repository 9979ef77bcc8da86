//! The durable store (sled): entity views, message-id markers and a per-partition index, all
//! written through atomic batches so that a marker never exists without its effect.
//!
//! Keys: `e/{entity}` holds the view as JSON; `p/{partition:05}/{entity}` indexes entities by
//! partition so that one partition's state can be read out alone; `m/{partition:05}/{message id}`
//! marks a message as applied (its value is the time it was written, for expiry).

use std::path::{Path, PathBuf};

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
}

/// One atomic write: markers, views and index entries applied together or not at all.
#[derive(Default)]
pub struct WriteBatch {
    batch: sled::Batch,
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
        self.markers += 1;
    }

    /// Writes the view `agg` and its partition index entry.
    pub fn put_view(&mut self, agg: &Aggregate) -> Result<(), serde_json::Error> {
        let bytes = serde_json::to_vec(agg)?;
        self.batch.insert(view_key(&agg.key), bytes);
        self.batch.insert(index_key(agg.partition, &agg.key), &[]);
        self.views += 1;
        Ok(())
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

impl Store {
    /// Opens (or creates) the store at `path` with sled's default cache.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store at `path`, caching at most `cache_bytes` of pages in memory.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
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

    /// Applies `batch` atomically; visible to reads at once, durable after [`Store::flush`].
    pub fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if self.faults.take() {
            return Err(StoreError::Write("injected fault".into()));
        }
        self.db
            .apply_batch(batch.batch)
            .map_err(|e| StoreError::Write(e.to_string()))
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

    fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
        actix_rt::System::new().block_on(f)
    }
}
