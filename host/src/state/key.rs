//! A user's id as the store keeps it: inside the map's own slot when short (ids are
//! UUIDs or 32 hex digits), so a lookup compares the key where it found the slot
//! instead of following a pointer to a block of its own (a cache miss per lookup at
//! a million users), and a user costs one allocation less.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

/// Ids up to this many bytes are kept inline.
const INLINE: usize = 38;

/// An id: inline up to [`INLINE`] bytes, else on the heap. Hashes, compares and
/// borrows as the `str` it holds, so maps keyed by it are looked up with a `&str`.
#[derive(Clone)]
pub(crate) enum Key {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

impl From<&str> for Key {
    fn from(s: &str) -> Self {
        match u8::try_from(s.len()) {
            Ok(len) if s.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                bytes[..s.len()].copy_from_slice(s.as_bytes());
                Key::Inline { len, bytes }
            }
            _ => Key::Heap(s.into()),
        }
    }
}

impl Deref for Key {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            // Only ever made from a `str` cut at its end, so still UTF-8.
            Key::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            Key::Heap(s) => s,
        }
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        self
    }
}

impl Borrow<str> for Key {
    fn borrow(&self) -> &str {
        self
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (**self).cmp(&**other)
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn short_ids_are_inline_long_ones_not_and_both_look_up_by_str() {
        let uuid = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
        let long = "x".repeat(200);
        assert!(matches!(Key::from(uuid), Key::Inline { .. }));
        assert!(matches!(
            Key::from(&*"y".repeat(INLINE)),
            Key::Inline { .. }
        ));
        assert!(matches!(Key::from(&*"y".repeat(INLINE + 1)), Key::Heap(_)));
        let mut map: HashMap<Key, u32> = HashMap::new();
        for (i, k) in ["", "a", uuid, &long, "é☃"].into_iter().enumerate() {
            map.insert(k.into(), i as u32);
        }
        assert_eq!(map.get(uuid), Some(&2));
        assert_eq!(map.get(long.as_str()), Some(&3));
        assert_eq!(map.get("é☃"), Some(&4));
        assert_eq!(map.get(""), Some(&0));
        assert_eq!(map.get("b"), None);
        assert_eq!(&*Key::from(uuid), uuid);
        assert!(Key::from("a") < Key::from("b") && Key::from(&*long) > Key::from("x"));
        // One slot: smaller than a boxed str plus the block it points to.
        assert_eq!(std::mem::size_of::<Key>(), 40);
    }
}
