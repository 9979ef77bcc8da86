//! The durable store (sled): entity views and message-id markers, written through atomic
//! batches so that a marker never exists without its effect.
//!
//! Keys: `e/{entity}` holds the view ([`crate::view_codec`]); `d/{partition:05}/{seq:020}` holds
//! the message ids one batch marked as applied in the partition (see `marker_index.rs`: one
//! entry per partition per batch, looked up in memory, expired whole once the dedup window has
//! passed all its ids); `c/{partition:05}` is the changelog offset up to which the partition's
//! state is in the store. Stores written by earlier versions also hold `p/{partition:05}/{entity}`
//! entries, a partition index that nothing read; they are left as they are.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::aggregate::Aggregate;
use crate::fault_injector::FaultInjector;
use crate::marker_index::{self, MarkerHasher, MarkerIndex};
use crate::view_codec::{self, ViewCodecError};

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
    /// A stored marker batch does not decode.
    #[error("stored marker batch {key:?} does not decode")]
    CorruptMarkers {
        /// The batch's key.
        key: String,
    },
    /// A stored view does not decode.
    #[error("stored view of {key:?} does not decode: {source}")]
    Decode {
        /// The entity key.
        key: String,
        /// What the decoder said.
        source: ViewCodecError,
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
    /// The dedup window of every partition, in memory.
    markers: Arc<Mutex<MarkerIndex>>,
    /// The window's hasher, fixed at open.
    hasher: MarkerHasher,
    /// Held for a whole write, so that one write's plan is committed before the next is made.
    writing: Arc<Mutex<()>>,
    /// Taken by each batch applied and by each round of reads that asks for it
    /// ([`Store::reading`]), and handed over fairly between them: sled 0.34's `apply_batch`
    /// holds a lock that every read waits for, for the whole batch, and a writer that takes it
    /// again at once would keep reads out between batches too.
    turn: Arc<parking_lot::Mutex<()>>,
    /// Held for a whole flush: flushes run one at a time (see [`Store::flush`]).
    flushing: Arc<tokio::sync::Mutex<()>>,
    /// When the write under way began.
    write_since: Arc<Mutex<Option<Instant>>>,
    /// When the flush under way began.
    flush_since: Arc<Mutex<Option<Instant>>>,
}

/// Marks an operation as under way from its creation until it is dropped.
struct Running(Arc<Mutex<Option<Instant>>>);

impl Running {
    fn start(since: &Arc<Mutex<Option<Instant>>>) -> Self {
        *lock(since) = Some(Instant::now());
        Running(since.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        *lock(&self.0) = None;
    }
}

/// Longest wait at open for a store that this process closed a moment ago to be let go.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Markers kept per partition by a store opened without a window.
pub const DEFAULT_DEDUP_WINDOW: u64 = 1_000_000;

/// One atomic write: markers and views applied together or not at all.
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
    /// Marks `message_id` of `partition` as applied.
    pub fn add_marker(&mut self, partition: i32, message_id: &str) {
        self.marked.push((partition, message_id.to_string()));
        self.markers += 1;
    }

    /// Writes the view `agg`.
    pub fn put_view(&mut self, agg: &Aggregate) -> Result<(), ViewCodecError> {
        let bytes = view_codec::encode(agg)?;
        self.put_encoded_view(&agg.key, bytes);
        Ok(())
    }

    /// Writes the view of `key`, already encoded ([`view_codec`]).
    pub fn put_encoded_view(&mut self, key: &str, encoded: Vec<u8>) {
        self.batch.insert(view_key(key), encoded);
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

/// The store key of `key`'s view. Built by hand: a view is written and read by key thousands of
/// times a second, and `format!` cost ten times the copy (530 instructions a key in callgrind).
fn view_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(VIEW_PREFIX.len() + key.len());
    k.extend_from_slice(VIEW_PREFIX);
    k.extend_from_slice(key.as_bytes());
    k
}

/// What every view's key starts with.
const VIEW_PREFIX: &[u8] = b"e/";

fn changelog_key(partition: i32) -> Vec<u8> {
    format!("c/{partition:05}").into_bytes()
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
    /// and keeping the latest `window` message-id markers of each partition (read into memory
    /// here).
    pub fn open_with(path: &Path, cache_bytes: u64, window: u64) -> Result<Self, StoreError> {
        let started = Instant::now();
        let db = open_db(path, cache_bytes)?;
        let opened = started.elapsed();
        let markers = load_markers(&db, window)?;
        tracing::info!(
            path = %path.display(),
            open_ms = opened.as_millis() as u64,
            markers_ms = (started.elapsed() - opened).as_millis() as u64,
            markers = markers.total(),
            "store opened"
        );
        Ok(Store {
            db,
            path: path.to_path_buf(),
            faults: FaultInjector::default(),
            hasher: markers.hasher(),
            markers: Arc::new(Mutex::new(markers)),
            writing: Arc::new(Mutex::new(())),
            turn: Arc::default(),
            flushing: Arc::new(tokio::sync::Mutex::new(())),
            write_since: Arc::default(),
            flush_since: Arc::default(),
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
                view_codec::decode(&bytes)
                    .map(Some)
                    .map_err(|source| StoreError::Decode {
                        key: key.to_string(),
                        source,
                    })
            }
        }
    }

    /// Runs `reads` (of this store) in a turn of their own between batches applied: a batch
    /// waits for them to end, and they wait for at most the batch under way.
    pub fn reading<R>(&self, reads: impl FnOnce() -> R) -> R {
        let turn = self.turn.lock();
        let read = reads();
        parking_lot::MutexGuard::unlock_fair(turn);
        read
    }

    /// Whether `message_id` of `partition` has been applied.
    pub fn has_marker(&self, partition: i32, message_id: &str) -> Result<bool, StoreError> {
        Ok(lock(&self.markers).contains(partition, message_id))
    }

    /// Whether the message id hashed to `hash` by [`Store::marker_hasher`] has been applied in
    /// `partition`.
    pub(crate) fn has_marker_hash(&self, partition: i32, hash: u128) -> bool {
        lock(&self.markers).contains_hash(partition, hash)
    }

    /// The hasher the dedup window keys message ids by, fixed for the life of this store.
    pub(crate) fn marker_hasher(&self) -> MarkerHasher {
        self.hasher
    }

    /// Applies `batch` atomically, with the expiry of the markers it pushes out of the window;
    /// visible to reads at once, durable after [`Store::flush`]. Returns the markers expired.
    pub fn write(&self, batch: WriteBatch) -> Result<u64, StoreError> {
        if self.faults.take() {
            return Err(StoreError::Write("injected fault".into()));
        }
        let WriteBatch {
            mut batch,
            marked,
            views,
            ..
        } = batch;
        // Hashed before the index is locked: every check on the actors' thread waits for it.
        let hashed: Vec<(i32, u128, &str)> = marked
            .iter()
            .map(|(partition, id)| (*partition, self.hasher.hash(id), id.as_str()))
            .collect();
        let _writing = lock(&self.writing);
        let _running = Running::start(&self.write_since);
        let plan = lock(&self.markers).plan(&hashed, &mut batch);
        let applying = Instant::now();
        let turn = self.turn.lock();
        self.db
            .apply_batch(batch)
            .map_err(|e| StoreError::Write(e.to_string()))?;
        parking_lot::MutexGuard::unlock_fair(turn);
        tracing::debug!(
            views,
            markers = marked.len(),
            ms = applying.elapsed().as_millis() as u64,
            "store batch applied"
        );
        let expired = plan.expired;
        lock(&self.markers).commit(plan);
        Ok(expired)
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

    /// The store operation that has been under way longer than `limit`, described: a store that
    /// stops answering (a sled deadlock, a hung disk) then shows in `/health`, not only as a
    /// pipeline that stopped.
    pub fn stalled(&self, limit: Duration) -> Option<String> {
        [("write", &self.write_since), ("flush", &self.flush_since)]
            .into_iter()
            .find_map(|(operation, since)| {
                let running = (*lock(since))?.elapsed();
                (running > limit)
                    .then(|| format!("a store {operation} has been under way for {running:.1?}"))
            })
    }

    /// Markers kept for `partition`.
    pub fn marker_count(&self, partition: i32) -> Result<u64, StoreError> {
        Ok(lock(&self.markers).len(partition) as u64)
    }

    /// Makes every write so far durable. Flushes run one at a time, each on a blocking thread:
    /// concurrent `flush_async` calls beside batches deadlocked the whole store under load
    /// (flushes on sled's thread pool holding its read lock, waiting for log writes, while a
    /// batch waited for the write lock; sled issue #1308). Either change alone avoided it in the
    /// store's test; a flush that waited for the one before it finds little left to write.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.flushing.lock().await;
        let db = self.db.clone();
        let since = self.flush_since.clone();
        tokio::task::spawn_blocking(move || {
            let _running = Running::start(&since);
            db.flush()
        })
        .await
        .map_err(|e| StoreError::Write(format!("the flush did not run to its end: {e}")))?
        .map(|_| ())
        .map_err(|e| StoreError::Write(e.to_string()))
    }

    /// Number of entity views stored.
    pub fn entity_count(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for k in self.db.scan_prefix(VIEW_PREFIX).keys() {
            k.map_err(StoreError::Read)?;
            n += 1;
        }
        Ok(n)
    }

    /// Size of the store on disk, in bytes.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Opens the closed store at `path` and closes it again: sled writes its snapshot while it
    /// opens, so the next start replays only what is written after this, not everything written
    /// since the store was last opened (seconds with a million entities). For a clean shutdown.
    pub fn checkpoint(path: &Path) -> Result<Duration, StoreError> {
        let started = Instant::now();
        drop(open_db(path, DEFAULT_CACHE_BYTES)?);
        Ok(started.elapsed())
    }

    /// Waits up to `timeout` until nobody holds the store at `path`; whether it is free (also
    /// when there is no store yet). sled lets go of its lock on the directory only when its I/O
    /// threads end, a moment after the last handle is dropped (sled issues #1234, #1289).
    pub fn wait_released(path: &Path, timeout: Duration) -> bool {
        let lock_file = path.join("db");
        let Ok(file) = std::fs::OpenOptions::new().write(true).open(&lock_file) else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        let mut logged = false;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    let _ = file.unlock();
                    return true;
                }
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    if !logged {
                        tracing::info!(path = %lock_file.display(), "store locked, waiting");
                        logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
    }
}

/// Opens the sled database at `path` once no handle of this process holds it any more.
fn open_db(path: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    // A store closed a moment ago in this process may still be locked; one held elsewhere is
    // still refused, after the wait.
    Store::wait_released(path, LOCK_WAIT);
    sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        // The dedup actor flushes after every batch; a timer-driven flush would only add I/O.
        .flush_every_ms(None)
        .open()
        .map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads every stored marker batch into a new index, and removes the batches that fall out of
/// `window` (it may be smaller than when they were written).
fn load_markers(db: &sled::Db, window: u64) -> Result<MarkerIndex, StoreError> {
    let mut index = MarkerIndex::new(window);
    for entry in db.scan_prefix(marker_index::batch_prefix()) {
        let (key, value) = entry.map_err(StoreError::Read)?;
        let corrupt = || StoreError::CorruptMarkers {
            key: String::from_utf8_lossy(&key).into_owned(),
        };
        let (partition, seq) = marker_index::parse_batch_key(&key).ok_or_else(corrupt)?;
        let ids = marker_index::decode_ids(&value).ok_or_else(corrupt)?;
        index.load_batch(partition, seq, &ids);
    }
    let dead = index.trim();
    if !dead.is_empty() {
        let mut batch = sled::Batch::default();
        for key in dead {
            batch.remove(key);
        }
        db.apply_batch(batch)
            .map_err(|e| StoreError::Write(e.to_string()))?;
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_locked_while_a_handle_lives_and_opens_again_once_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        assert!(Store::wait_released(&path, Duration::ZERO), "no store yet");
        let store = Store::open(&path).unwrap();
        let other = store.clone();
        drop(store);
        assert!(
            !Store::wait_released(&path, Duration::from_millis(20)),
            "a remaining handle keeps it"
        );
        drop(other);
        assert!(Store::wait_released(&path, LOCK_WAIT));
        assert!(Store::open(&path).is_ok());
    }

    #[test]
    fn batch_writes_marker_and_view_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        let mut agg = Aggregate::new("C1", 3);
        agg.events_applied = 2;
        let mut batch = WriteBatch::default();
        batch.add_marker(3, "m1");
        batch.put_view(&agg).unwrap();
        assert!(!store.has_marker(3, "m1").unwrap());
        store.write(batch).unwrap();
        assert!(store.has_marker(3, "m1").unwrap());
        assert!(!store.has_marker(2, "m1").unwrap());
        assert_eq!(store.load("C1").unwrap(), Some(agg));
        assert_eq!(store.entity_count().unwrap(), 1);
    }

    /// A batch waits for a round of reads under way ([`Store::reading`]) and is applied once it
    /// ends; reads in their turn are not blocked by writes queued meanwhile.
    #[test]
    fn a_write_waits_for_a_round_of_reads_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        let written = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (writer, done) = (store.clone(), written.clone());
        let round = store.reading(|| {
            let handle = std::thread::spawn(move || {
                let mut batch = WriteBatch::default();
                batch.put_view(&Aggregate::new("C1", 0)).unwrap();
                writer.write(batch).unwrap();
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(50));
            let during = written.load(std::sync::atomic::Ordering::SeqCst);
            let read = store.load("C1").unwrap();
            (handle, during, read)
        });
        let (handle, during, read) = round;
        assert!(!during, "the batch was applied during the round of reads");
        assert!(read.is_none(), "the round read a view written during it");
        handle.join().unwrap();
        assert!(store.load("C1").unwrap().is_some());
    }

    /// The service flushes after every write while the next write's batch is applied and views
    /// are read: sled 0.34's `flush_async` deadlocked that way under load (its issue #1308).
    /// Every flush, write and read must end; a deadlock fails the test at the watchdog instead
    /// of hanging it.
    #[test]
    fn flushes_beside_batches_and_reads_all_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let worker = store.clone();
        std::thread::spawn(move || {
            futures_lite_block_on(async move {
                let writer = worker.clone();
                let writes = tokio::task::spawn_blocking(move || {
                    for round in 0..400u32 {
                        let mut batch = WriteBatch::default();
                        for i in 0..200u32 {
                            let mut view =
                                Aggregate::new(format!("C{}", (round * 7919 + i) % 20_000), 0);
                            view.events_applied = u64::from(round);
                            batch.put_view(&view).unwrap();
                            batch.add_marker(0, &format!("m{round}-{i}"));
                        }
                        writer.write(batch).unwrap();
                    }
                });
                let reader = worker.clone();
                let reads = tokio::task::spawn_blocking(move || {
                    for i in 0..200_000u32 {
                        reader.load(&format!("C{}", i % 20_000)).unwrap();
                    }
                });
                let flushes = (0..8).map(|_| {
                    let flusher = worker.clone();
                    actix_rt::spawn(async move {
                        for _ in 0..100 {
                            flusher.flush().await.unwrap();
                        }
                    })
                });
                let flushes: Vec<_> = flushes.collect();
                writes.await.unwrap();
                reads.await.unwrap();
                for flush in flushes {
                    flush.await.unwrap();
                }
            });
            let _ = done_tx.send(());
        });
        // A watchdog, not a timing assertion: the work takes a few seconds; a deadlock never ends.
        done_rx
            .recv_timeout(Duration::from_secs(300))
            .expect("flushes, writes and reads deadlocked");
    }

    #[test]
    fn a_write_under_way_too_long_is_reported_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        assert_eq!(store.stalled(Duration::ZERO), None, "nothing under way");
        // The write stops at the marker index while the test holds it.
        let held = lock(&store.markers);
        let writer = store.clone();
        let write = std::thread::spawn(move || {
            let mut batch = WriteBatch::default();
            batch.add_marker(0, "m");
            writer.write(batch).unwrap();
        });
        // A watchdog, not a timing assertion: the write is blocked, so it is reported at once.
        let watchdog = Instant::now() + Duration::from_secs(30);
        let reported = loop {
            if let Some(stall) = store.stalled(Duration::ZERO) {
                break stall;
            }
            assert!(
                Instant::now() < watchdog,
                "the write under way was never reported"
            );
            std::thread::yield_now();
        };
        assert!(
            reported.starts_with("a store write has been under way for"),
            "{reported}"
        );
        assert_eq!(
            store.stalled(Duration::from_secs(3600)),
            None,
            "not yet past that limit"
        );
        drop(held);
        write.join().unwrap();
        assert_eq!(store.stalled(Duration::ZERO), None, "the write ended");
        assert!(store.has_marker(0, "m").unwrap());
    }

    /// Opens the store at `path`, writes and flushes `batch`, and closes the store.
    fn write_flushed_and_close(path: &Path, batch: WriteBatch) {
        let store = Store::open(path).unwrap();
        store.write(batch).unwrap();
        futures_lite_block_on(store.flush()).unwrap();
    }

    #[test]
    fn a_checkpointed_store_keeps_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut batch = WriteBatch::default();
        batch.add_marker(0, "m");
        batch.put_view(&Aggregate::new("C1", 0)).unwrap();
        write_flushed_and_close(&path, batch);
        Store::checkpoint(&path).unwrap();
        let store = Store::open(&path).unwrap();
        assert!(store.has_marker(0, "m").unwrap());
        assert_eq!(store.load("C1").unwrap(), Some(Aggregate::new("C1", 0)));
    }

    #[test]
    fn reopening_keeps_flushed_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut batch = WriteBatch::default();
        batch.add_marker(0, "m");
        write_flushed_and_close(&path, batch);
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
                batch.add_marker(1, &format!("id{i}"));
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
            other.add_marker(2, "id0");
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

    #[test]
    fn a_marker_batch_that_does_not_decode_refuses_the_store_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        {
            let db = sled::open(&path).unwrap();
            db.insert(marker_index::batch_key(2, 5), &[0, 0, 0, 9, b'x'])
                .unwrap();
            db.flush().unwrap();
        }
        let err = Store::open(&path).err().expect("a cut batch is refused");
        assert_eq!(
            err.to_string(),
            "stored marker batch \"d/00002/00000000000000000005\" does not decode"
        );
    }

    #[test]
    fn a_view_written_again_replaces_the_one_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        for n in 1..=2 {
            let mut agg = Aggregate::new("C1", 3);
            agg.events_applied = n;
            let mut batch = WriteBatch::default();
            batch.put_view(&agg).unwrap();
            store.write(batch).unwrap();
        }
        assert_eq!(store.entity_count().unwrap(), 1);
        assert_eq!(store.load("C1").unwrap().unwrap().events_applied, 2);
    }

    fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
        actix_rt::System::new().block_on(f)
    }
}
