//! Names that recur in every view (payload field names, event codes, rule names): interned, so
//! that reading a view or an envelope allocates no string for them. A few thousand distinct names are usual; the
//! interned ones are bounded, and names past the bound, or too long, are kept as owned strings.

use std::borrow::Borrow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::KeyHasher;

/// Most names interned per process; each is kept for the life of the process.
pub const MAX_INTERNED: usize = 65_536;
/// Longest name interned, in bytes.
pub const MAX_INTERNED_LEN: usize = 64;

/// A name: interned when it is short and the bound has room, owned otherwise. Compares, hashes,
/// orders and serializes as its text.
#[derive(Clone)]
pub struct Name(Repr);

#[derive(Clone)]
enum Repr {
    Interned(&'static str),
    Owned(Box<str>),
}

/// Every name interned so far: the source of truth behind the threads' caches.
static INTERNED: Mutex<Option<HashSet<&'static str, KeyHasher>>> = Mutex::new(None);

/// Set once the bound is reached: from then on a name no thread has seen is owned without
/// taking the lock, so that names past the bound do not all contend for it.
static FULL: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread's copy of the names it has seen, read without a lock.
    static SEEN: RefCell<HashSet<&'static str, KeyHasher>> = RefCell::default();
}

/// The interned copy of `text`, interning it if there is room.
fn intern(text: &str) -> Option<&'static str> {
    if text.len() > MAX_INTERNED_LEN {
        return None;
    }
    SEEN.with(|seen| {
        if let Some(&name) = seen.borrow().get(text) {
            return Some(name);
        }
        if FULL.load(Ordering::Relaxed) {
            return None;
        }
        let mut all = INTERNED.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(name) = intern_in(all.get_or_insert_with(HashSet::default), text, MAX_INTERNED)
        else {
            FULL.store(true, Ordering::Relaxed);
            return None;
        };
        drop(all);
        seen.borrow_mut().insert(name);
        Some(name)
    })
}

/// `text`'s copy in `all`, added if `all` holds fewer than `max` names.
fn intern_in(
    all: &mut HashSet<&'static str, KeyHasher>,
    text: &str,
    max: usize,
) -> Option<&'static str> {
    if let Some(&name) = all.get(text) {
        return Some(name);
    }
    if all.len() >= max {
        return None;
    }
    // Kept for the life of the process: at most `max` names of a bounded length.
    let name: &'static str = Box::leak(Box::from(text));
    all.insert(name);
    Some(name)
}

impl Name {
    /// The name `text`.
    pub fn new(text: &str) -> Self {
        match intern(text) {
            Some(name) => Name(Repr::Interned(name)),
            None => Name(Repr::Owned(Box::from(text))),
        }
    }

    /// The name's text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Interned(name) => name,
            Repr::Owned(name) => name,
        }
    }
}

impl From<&str> for Name {
    fn from(text: &str) -> Self {
        Name::new(text)
    }
}

impl From<String> for Name {
    fn from(text: String) -> Self {
        match intern(&text) {
            Some(name) => Name(Repr::Interned(name)),
            None => Name(Repr::Owned(text.into_boxed_str())),
        }
    }
}

impl Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Name {}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Read from borrowed text where the format lends it, so that a name already interned costs no
/// allocation.
impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(NameVisitor)
    }
}

struct NameVisitor;

impl serde::de::Visitor<'_> for NameVisitor {
    type Value = Name;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Name, E> {
        Ok(Name::new(text))
    }

    fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Name, E> {
        Ok(Name::from(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interned(name: &Name) -> bool {
        matches!(name.0, Repr::Interned(_))
    }

    #[test]
    fn a_name_read_twice_is_the_same_interned_text() {
        let a = Name::new("customer_id");
        let b: Name = serde_json::from_str(r#""customer_id""#).unwrap();
        assert!(interned(&a) && interned(&b));
        assert_eq!(
            a.as_str().as_ptr(),
            b.as_str().as_ptr(),
            "one copy of the text"
        );
        assert_eq!(a, b);
        assert_eq!(serde_json::to_string(&b).unwrap(), r#""customer_id""#);
        // Another thread finds the same copy through the shared set.
        let elsewhere = std::thread::spawn(|| Name::new("customer_id").as_str().as_ptr() as usize)
            .join()
            .unwrap();
        assert_eq!(elsewhere, a.as_str().as_ptr() as usize);
    }

    #[test]
    fn names_past_the_bound_are_not_interned_and_known_ones_still_are() {
        let mut all = HashSet::default();
        let a = intern_in(&mut all, "a", 2).unwrap();
        assert!(intern_in(&mut all, "b", 2).is_some());
        assert_eq!(intern_in(&mut all, "c", 2), None, "the bound is reached");
        assert_eq!(
            intern_in(&mut all, "a", 2).map(str::as_ptr),
            Some(a.as_ptr())
        );
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn long_names_are_owned_and_still_equal_by_text() {
        let long = "x".repeat(MAX_INTERNED_LEN + 1);
        let a = Name::new(&long);
        let b = Name::from(long.clone());
        assert!(!interned(&a) && !interned(&b));
        assert_eq!(a, b);
        assert_eq!(a.as_str(), long);
        let escaped: Name = serde_json::from_str(r#""a\"b""#).unwrap();
        assert_eq!(escaped.as_str(), "a\"b");
        assert!(Name::new("a") < Name::new("b") && Name::from(long) > Name::new("x"));
    }
}
