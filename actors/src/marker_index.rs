//! The dedup window in memory: per partition, the message ids whose markers the store holds, in
//! the order they were written. The store keeps a partition's markers as one sled entry per write
//! (a marker batch, under a sequential key) instead of one entry per id, so that a write costs one
//! insert per partition, a lookup never touches the disk, and expiry removes whole batches once
//! every id in them has left the window. A batch partly out of the window stays whole on disk
//! until then: a store reopened with the same window trims to it exactly, one reopened with a
//! larger window remembers those few ids again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use xxhash_rust::xxh3::xxh3_128_with_seed;

/// Key prefix of the marker batches: `d/{partition:05}/{seq:020}`.
const PREFIX: &str = "d/";

/// Key of marker batch `seq` of `partition`.
pub(crate) fn batch_key(partition: i32, seq: u64) -> Vec<u8> {
    format!("{PREFIX}{partition:05}/{seq:020}").into_bytes()
}

/// The prefix under which every marker batch is stored.
pub(crate) fn batch_prefix() -> &'static [u8] {
    PREFIX.as_bytes()
}

/// Partition and sequence number of a marker batch's key.
pub(crate) fn parse_batch_key(key: &[u8]) -> Option<(i32, u64)> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(PREFIX)?;
    let (partition, seq) = rest.split_once('/')?;
    Some((partition.parse().ok()?, seq.parse().ok()?))
}

/// A marker batch's value: each id as a 4-byte big-endian length and its bytes.
fn encode_ids<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<u8> {
    let mut out = Vec::new();
    for id in ids {
        out.extend_from_slice(&(id.len() as u32).to_be_bytes());
        out.extend_from_slice(id.as_bytes());
    }
    out
}

/// The ids of a marker batch's value; `None` if it is cut short.
pub(crate) fn decode_ids(mut value: &[u8]) -> Option<Vec<&str>> {
    let mut ids = Vec::new();
    while !value.is_empty() {
        let len = u32::from_be_bytes(value.get(..4)?.try_into().ok()?) as usize;
        let id = value.get(4..4 + len)?;
        ids.push(std::str::from_utf8(id).ok()?);
        value = &value[4 + len..];
    }
    Some(ids)
}

/// Hashes a marker's 128-bit hash by its low 64 bits: it is already a seeded xxh3 hash, so
/// hashing it again (SipHash, the default) only costs time, at every check and at every start.
#[derive(Default)]
pub(crate) struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u128 keys are hashed here; other input is folded in rather than lost.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }

    fn write_u128(&mut self, hash: u128) {
        self.0 = hash as u64;
    }
}

/// A set of marker hashes ([`MarkerHasher::hash`]).
pub(crate) type HashSetOfHashes = HashSet<u128, BuildHasherDefault<PrehashedHasher>>;

/// Hashes message ids for the dedup window: a seeded 128-bit xxh3, chosen anew at every start
/// (the index is rebuilt from the stored ids). The ledger hashes an id once with the index's
/// hasher and looks the hash up everywhere a marker may be, instead of hashing the text again
/// for every place.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MarkerHasher {
    seed: u64,
}

impl MarkerHasher {
    /// A hasher with a seed of its own.
    pub(crate) fn new() -> Self {
        MarkerHasher {
            seed: std::collections::hash_map::RandomState::new().hash_one(0u8),
        }
    }

    /// The hash of message id `id`.
    pub(crate) fn hash(&self, id: &str) -> u128 {
        xxh3_128_with_seed(id.as_bytes(), self.seed)
    }
}

/// One partition's window.
#[derive(Default)]
struct PartitionMarkers {
    /// Hashes of the ids in the window.
    live: HashSetOfHashes,
    /// The same, oldest first.
    order: VecDeque<u128>,
    /// Stored batches, oldest first: sequence number and how many of its ids are still live.
    batches: VecDeque<(u64, usize)>,
    /// Sequence number of the next batch.
    next_batch: u64,
}

impl PartitionMarkers {
    /// Whole batches dropped and ids expired from the batch then at the front, when the oldest
    /// `n` ids leave the window.
    fn expiry(&self, mut n: usize) -> (usize, usize) {
        let mut whole = 0;
        for (_, live) in &self.batches {
            if *live > n {
                return (whole, n);
            }
            n -= live;
            whole += 1;
        }
        (whole, 0)
    }

    /// Expires the oldest `n` ids; yields the sequence numbers of the batches left empty.
    fn expire_front(&mut self, n: usize) -> impl Iterator<Item = u64> + '_ {
        let (whole, partial) = self.expiry(n);
        for _ in 0..n {
            if let Some(h) = self.order.pop_front() {
                self.live.remove(&h);
            }
        }
        if let Some((_, live)) = self.batches.get_mut(whole) {
            *live -= partial;
        }
        self.batches.drain(..whole).map(|(seq, _)| seq)
    }
}

/// What a write does to one partition's window.
struct PartitionPlan {
    partition: i32,
    /// Hashes of the new ids that stay in the window, in order.
    added: Vec<u128>,
    /// Old ids that leave the window.
    expire: usize,
}

/// What one write does to the index; applied with [`MarkerIndex::commit`] once the store has it.
pub(crate) struct MarkerPlan {
    partitions: Vec<PartitionPlan>,
    /// Markers expired by the write (old ones and new ones already beyond the window).
    pub(crate) expired: u64,
}

/// The dedup window of every partition.
pub(crate) struct MarkerIndex {
    hasher: MarkerHasher,
    /// Ids kept per partition.
    window: usize,
    partitions: HashMap<i32, PartitionMarkers, crate::KeyHasher>,
}

impl MarkerIndex {
    /// An empty index keeping `window` ids per partition.
    pub(crate) fn new(window: u64) -> Self {
        MarkerIndex {
            hasher: MarkerHasher::new(),
            window: usize::try_from(window.max(1)).unwrap_or(usize::MAX),
            partitions: HashMap::default(),
        }
    }

    fn hash(&self, id: &str) -> u128 {
        self.hasher.hash(id)
    }

    /// The hasher the index keys its ids by.
    pub(crate) fn hasher(&self) -> MarkerHasher {
        self.hasher
    }

    /// Whether `id` of `partition` is in the window.
    pub(crate) fn contains(&self, partition: i32, id: &str) -> bool {
        self.contains_hash(partition, self.hash(id))
    }

    /// Whether the id hashed to `hash` by [`MarkerIndex::hasher`] is in the window of
    /// `partition`.
    pub(crate) fn contains_hash(&self, partition: i32, hash: u128) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|p| p.live.contains(&hash))
    }

    /// Ids in the window of `partition`.
    pub(crate) fn len(&self, partition: i32) -> usize {
        self.partitions.get(&partition).map_or(0, |p| p.live.len())
    }

    /// Ids in the window of every partition.
    pub(crate) fn total(&self) -> usize {
        self.partitions.values().map(|p| p.live.len()).sum()
    }

    /// Loads stored batch `seq` of `partition` while opening the store; batches must come in
    /// key order. Call [`MarkerIndex::trim`] after the last one.
    pub(crate) fn load_batch(&mut self, partition: i32, seq: u64, ids: &[&str]) {
        let hashes: Vec<u128> = ids.iter().map(|id| self.hash(id)).collect();
        let p = self.partitions.entry(partition).or_default();
        let mut live = 0;
        for h in hashes {
            if p.live.insert(h) {
                p.order.push_back(h);
                live += 1;
            }
        }
        p.batches.push_back((seq, live));
        p.next_batch = seq + 1;
    }

    /// Drops what lies beyond the window after loading (the window may have shrunk since the
    /// batches were written); returns the keys of batches left with no live id, to be removed.
    pub(crate) fn trim(&mut self) -> Vec<Vec<u8>> {
        let window = self.window;
        let mut dead = Vec::new();
        for (partition, p) in &mut self.partitions {
            let excess = p.order.len().saturating_sub(window);
            let emptied = p.expire_front(excess);
            dead.extend(emptied.map(|seq| batch_key(*partition, seq)));
        }
        dead
    }

    /// Adds to `batch` the marker batches of `marked` (new ids, by partition, in order, each
    /// with its hash by [`MarkerIndex::hasher`], taken before the index is locked) and the
    /// removal of batches whose ids all leave the window; the index itself is unchanged until
    /// [`MarkerIndex::commit`], so that a failed write leaves it as it was.
    pub(crate) fn plan<'a>(
        &self,
        marked: &[(i32, u128, &'a str)],
        batch: &mut sled::Batch,
    ) -> MarkerPlan {
        let mut by_partition: Vec<(i32, Vec<(u128, &'a str)>)> = Vec::new();
        for &(partition, hash, id) in marked {
            match by_partition.iter_mut().find(|(p, _)| *p == partition) {
                Some((_, ids)) => ids.push((hash, id)),
                None => by_partition.push((partition, vec![(hash, id)])),
            }
        }
        let empty = PartitionMarkers::default();
        let mut plan = MarkerPlan {
            partitions: Vec::new(),
            expired: 0,
        };
        for (partition, ids) in by_partition {
            let p = self.partitions.get(&partition).unwrap_or(&empty);
            // Hashes already: hashing them again with SipHash was half of this plan's cost.
            let mut seen = HashSetOfHashes::with_capacity_and_hasher(ids.len(), Default::default());
            let new: Vec<(u128, &str)> = ids
                .into_iter()
                .filter(|(h, _)| !p.live.contains(h) && seen.insert(*h))
                .collect();
            // New ids beyond the window expire at once, then the oldest stored ones.
            let drop_new = new.len().saturating_sub(self.window);
            let kept = &new[drop_new..];
            let expire = (p.order.len() + kept.len()).saturating_sub(self.window);
            if !kept.is_empty() {
                batch.insert(
                    batch_key(partition, p.next_batch),
                    encode_ids(kept.iter().map(|(_, id)| *id)),
                );
            }
            let (whole, _) = p.expiry(expire);
            for (seq, _) in p.batches.iter().take(whole) {
                batch.remove(batch_key(partition, *seq));
            }
            plan.expired += (drop_new + expire) as u64;
            plan.partitions.push(PartitionPlan {
                partition,
                added: kept.iter().map(|(h, _)| *h).collect(),
                expire,
            });
        }
        plan
    }

    /// Applies a plan whose batch the store has written.
    pub(crate) fn commit(&mut self, plan: MarkerPlan) {
        for PartitionPlan {
            partition,
            added,
            expire,
        } in plan.partitions
        {
            let p = self.partitions.entry(partition).or_default();
            // The plan's batch already removed the emptied batches from the store.
            p.expire_front(expire).for_each(drop);
            if !added.is_empty() {
                p.batches.push_back((p.next_batch, added.len()));
                p.next_batch += 1;
                for h in added {
                    p.live.insert(h);
                    p.order.push_back(h);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(range: std::ops::Range<u32>) -> Vec<(i32, String)> {
        range.map(|i| (1, format!("id{i}"))).collect()
    }

    /// `index.plan` of `marked`, hashed as the store hashes them.
    fn plan_of(
        index: &MarkerIndex,
        marked: &[(i32, String)],
        batch: &mut sled::Batch,
    ) -> MarkerPlan {
        let marked: Vec<(i32, u128, &str)> = marked
            .iter()
            .map(|(partition, id)| (*partition, index.hash(id), id.as_str()))
            .collect();
        index.plan(&marked, batch)
    }

    #[test]
    fn ids_round_trip_and_a_cut_value_is_refused() {
        let value = encode_ids(["a", "", "ccc"].into_iter());
        assert_eq!(decode_ids(&value).unwrap(), ["a", "", "ccc"]);
        assert!(decode_ids(&value[..value.len() - 1]).is_none());
        assert_eq!(parse_batch_key(&batch_key(3, 17)), Some((3, 17)));
    }

    #[test]
    fn a_batch_is_removed_when_its_last_id_leaves_the_window() {
        let mut index = MarkerIndex::new(3);
        let mut batch = sled::Batch::default();
        let plan = plan_of(&index, &ids(0..2), &mut batch);
        assert_eq!(plan.expired, 0);
        index.commit(plan);
        // Two more: id0 leaves, its batch still holds id1.
        let plan = plan_of(&index, &ids(2..4), &mut batch);
        assert_eq!(plan.expired, 1);
        index.commit(plan);
        assert!(!index.contains(1, "id0") && index.contains(1, "id1"));
        assert_eq!(index.partitions[&1].batches, [(0, 1), (1, 2)]);
        // One more: id1 leaves and batch 0 with it.
        let plan = plan_of(&index, &ids(4..5), &mut batch);
        index.commit(plan);
        assert_eq!(index.partitions[&1].batches, [(1, 2), (2, 1)]);
        assert_eq!(index.len(1), 3);
        assert_eq!(index.len(2), 0, "windows are per partition");
    }

    #[test]
    fn ids_already_in_the_window_are_not_marked_again() {
        let mut index = MarkerIndex::new(10);
        let mut batch = sled::Batch::default();
        let plan = plan_of(&index, &ids(0..2), &mut batch);
        index.commit(plan);
        let again = vec![(1, "id1".to_string()), (1, "id2".into()), (1, "id2".into())];
        let plan = plan_of(&index, &again, &mut batch);
        index.commit(plan);
        assert_eq!(index.len(1), 3);
        assert_eq!(index.partitions[&1].order.len(), 3);
    }
}
