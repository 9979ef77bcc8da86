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
