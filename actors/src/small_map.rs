//! A map of a few entries kept as a vector sorted by key, for the maps a view holds (its sources,
//! counters and figures, and each section's fields): many small maps, where a B-tree's node
//! costs several times the handful of entries it holds and every passivated view's maps are
//! built again when it is read back. It serializes exactly as a B-tree map of the same entries
//! (a map in key order), so views stored by either read back alike.

use std::ops::{Deref, DerefMut};

use litemap::LiteMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A map of a few entries, sorted by key; [`LiteMap`]'s methods through `Deref`.
#[derive(Clone, Debug, PartialEq)]
pub struct SmallMap<K, V>(LiteMap<K, V>);

impl<K, V> SmallMap<K, V> {
    /// An empty map.
    pub fn new() -> Self {
        SmallMap(LiteMap::new())
    }

    /// An empty map with room for `capacity` entries.
    pub fn with_capacity(capacity: usize) -> Self {
        SmallMap(LiteMap::with_capacity(capacity))
    }

    /// An empty map for the `count` entries stored data says follow; the room taken ahead is
    /// bounded, so that a damaged count allocates nothing large.
    pub fn for_reading(count: usize) -> Self {
        Self::with_capacity(count.min(READ_AHEAD))
    }
}

/// Most entries a map read back is given room for ahead.
const READ_AHEAD: usize = 64;

impl<K: Ord, V> SmallMap<K, V> {
    /// Adds an entry read back: appended while keys come in order, as maps are written;
    /// inserted otherwise, a later entry of a key replacing the earlier.
    pub fn push_read(&mut self, key: K, value: V) {
        if let Some((key, value)) = self.0.try_append(key, value) {
            self.0.insert(key, value);
        }
    }
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V> Deref for SmallMap<K, V> {
    type Target = LiteMap<K, V>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<K, V> DerefMut for SmallMap<K, V> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// Later entries of a key win.
impl<K: Ord, V> FromIterator<(K, V)> for SmallMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        SmallMap(iter.into_iter().collect())
    }
}

/// Entries of a key already present replace its value.
impl<K: Ord, V> Extend<(K, V)> for SmallMap<K, V> {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        self.0.extend(iter)
    }
}

impl<K, V> IntoIterator for SmallMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// Always a map, as a B-tree map is, also when empty (`LiteMap` writes an empty map to JSON as a
/// sequence).
impl<K: Serialize, V: Serialize> Serialize for SmallMap<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter())
    }
}

impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Deserialize<'de> for SmallMap<K, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        LiteMap::deserialize(deserializer).map(SmallMap)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn both(entries: &[(&str, u64)]) -> (SmallMap<String, u64>, BTreeMap<String, u64>) {
        let owned = || entries.iter().map(|(k, v)| (k.to_string(), *v));
        (owned().collect(), owned().collect())
    }

    #[test]
    fn entries_read_back_out_of_order_are_sorted_and_the_last_of_a_key_wins() {
        let mut map = SmallMap::for_reading(usize::MAX);
        for (k, v) in [("b", 1), ("d", 2), ("a", 3), ("d", 4), ("c", 5)] {
            map.push_read(k, v);
        }
        let entries: Vec<_> = map.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(entries, [("a", 3), ("b", 1), ("c", 5), ("d", 4)]);
    }

    #[test]
    fn serializes_as_a_b_tree_map_of_the_same_entries() {
        for entries in [&[][..], &[("b", 2), ("a", 1), ("c", 3)][..]] {
            let (small, btree) = both(entries);
            assert_eq!(
                serde_json::to_string(&small).unwrap(),
                serde_json::to_string(&btree).unwrap()
            );
            assert_eq!(
                postcard::to_allocvec(&small).unwrap(),
                postcard::to_allocvec(&btree).unwrap()
            );
            let bytes = postcard::to_allocvec(&btree).unwrap();
            assert_eq!(
                postcard::from_bytes::<SmallMap<String, u64>>(&bytes).unwrap(),
                small
            );
        }
        assert_eq!(
            serde_json::to_string(&SmallMap::<String, u64>::new()).unwrap(),
            "{}"
        );
    }

    #[test]
    fn keeps_its_keys_sorted_and_later_values_win() {
        let (mut small, _) = both(&[("b", 2), ("a", 1)]);
        small.extend([("c".to_string(), 3), ("a".to_string(), 10)]);
        assert_eq!(
            small
                .iter()
                .map(|(k, v)| (k.as_str(), *v))
                .collect::<Vec<_>>(),
            vec![("a", 10), ("b", 2), ("c", 3)]
        );
        assert_eq!(small.get("b"), Some(&2));
        let read: SmallMap<String, u64> = serde_json::from_str(r#"{"z":1,"y":2}"#).unwrap();
        assert_eq!(read.iter().next(), Some((&"y".to_string(), &2)));
    }
}
