//! New states, reducer -> host (what `fold` returns).
//!
//! For each entity of the plan, in order: a flags byte, then
//! - [`KEEP`]: the new state as a frame (without it the host forgets the entity);
//! - [`VIEW`]: the JSON answer as a `u32` offset and a `u32` length inside the state;
//! - [`JOIN`]: the join key, likewise;
//! - [`CLOCK`]: the entity's newest event time as an `i64` (little-endian,
//!   microseconds since the Unix epoch). The host's event-time clock is the largest
//!   it has seen; an entity that is not visible and whose clock has fallen behind it by
//!   more than the tombstone retention is forgotten. Without it the entity never
//!   expires (what 3.0 reducers give).
//!
//! The decoder treats its input as untrusted: every range must lie inside its state
//! and hold UTF-8.

use std::ops::Range;

use crate::{Reader, Update, put_frame, put_u32, text_in};

/// Flag: a new state follows.
pub const KEEP: u8 = 1;
/// Flag: the answer's range inside the state follows.
pub const VIEW: u8 = 2;
/// Flag: the join key's range inside the state follows.
pub const JOIN: u8 = 4;
/// Flag: the entity's newest event time follows (since 3.1).
pub const CLOCK: u8 = 8;

/// All of `updates`, framed.
pub fn encode(updates: &[Update]) -> Vec<u8> {
    let size = updates
        .iter()
        .map(|u| 29 + u.state.as_ref().map_or(0, Vec::len))
        .sum();
    let mut out = Vec::with_capacity(size);
    for u in updates {
        let flag = |set: bool, bit: u8| if set { bit } else { 0 };
        out.push(
            flag(u.state.is_some(), KEEP)
                | flag(u.view.is_some(), VIEW)
                | flag(u.join.is_some(), JOIN)
                | flag(u.clock.is_some(), CLOCK),
        );
        if let Some(state) = &u.state {
            put_frame(&mut out, state);
        }
        for range in [&u.view, &u.join].into_iter().flatten() {
            put_u32(&mut out, range.start);
            put_u32(&mut out, range.end.saturating_sub(range.start));
        }
        if let Some(clock) = u.clock {
            out.extend_from_slice(&clock.to_le_bytes());
        }
    }
    out
}

/// The updates `bytes` holds; there must be exactly `count`.
///
/// # Errors
/// As [`decode_batch`].
pub fn decode(bytes: &[u8], count: usize) -> Result<Vec<Update>, String> {
    decode_batch(bytes.to_vec(), count).map(|u| u.to_vec())
}

/// The updates `bytes` holds, kept in `bytes` itself: no state is copied or
/// allocated on its own (what the host does with a fold's output). There must be
/// exactly `count`.
///
/// # Errors
/// Broken framing, unknown flags, a range outside its state or not UTF-8, a range
/// without a state, or another count.
pub fn decode_batch(bytes: Vec<u8>, count: usize) -> Result<Updates, String> {
    let mut items = Vec::with_capacity(count.min(bytes.len()));
    let mut r = Reader::new(&bytes);
    while !r.is_empty() {
        let flags = r.u8()?;
        if flags & !(KEEP | VIEW | JOIN | CLOCK) != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let state = if flags & KEEP != 0 {
            Some(r.frame()?)
        } else {
            None
        };
        let mut range = |flag: u8, what: &str| -> Result<Option<Range<u32>>, String> {
            if flags & flag == 0 {
                return Ok(None);
            }
            let start = r.u32()?;
            let len = r.u32()?;
            let end = start
                .checked_add(len)
                .ok_or_else(|| format!("{what} range overflows"))?;
            let state = state.ok_or_else(|| format!("{what} range without a state"))?;
            text_in(state, &(start..end)).map_err(|e| format!("{what}: {e}"))?;
            Ok(Some(start..end))
        };
        let view = range(VIEW, "view")?;
        let join = range(JOIN, "join")?;
        let clock = if flags & CLOCK != 0 {
            Some(i64::from_le_bytes(r.array()?))
        } else {
            None
        };
        // Where the state lies in `bytes` (a frame is a slice of it).
        let state = state.map(|s| {
            let at = s.as_ptr() as usize - bytes.as_ptr() as usize;
            at..at + s.len()
        });
        items.push(Item {
            state,
            view,
            join,
            clock,
        });
    }
    if items.len() != count {
        return Err(format!("{} updates for {count} entities", items.len()));
    }
    Ok(Updates { bytes, items })
}

/// Where one update of an [`Updates`] lies.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    state: Option<Range<usize>>,
    view: Option<Range<u32>>,
    join: Option<Range<u32>>,
    clock: Option<i64>,
}

/// The new states of a batch's entities, every state in one buffer: decoding a
/// fold's output ([`decode_batch`]) copies and allocates nothing per entity, and the
/// host copies each state once, into where it keeps it.
#[derive(Debug, Clone, Default)]
pub struct Updates {
    bytes: Vec<u8>,
    items: Vec<Item>,
}

impl Updates {
    /// How many.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The `i`th.
    ///
    /// # Panics
    /// When there is no `i`th.
    pub fn get(&self, i: usize) -> UpdateRef<'_> {
        let item = &self.items[i];
        UpdateRef {
            state: item.state.clone().map(|r| &self.bytes[r]),
            view: item.view.clone(),
            join: item.join.clone(),
            clock: item.clock,
        }
    }

    /// All of them, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = UpdateRef<'_>> + '_ {
        (0..self.items.len()).map(|i| self.get(i))
    }

    /// Adds one at the end.
    pub fn push(&mut self, update: UpdateRef<'_>) {
        let item = self.store(update);
        self.items.push(item);
    }

    /// Replaces the `i`th (its old bytes stay in the buffer until it is dropped).
    ///
    /// # Panics
    /// When there is no `i`th.
    pub fn set(&mut self, i: usize, update: UpdateRef<'_>) {
        self.items[i] = self.store(update);
    }

    fn store(&mut self, update: UpdateRef<'_>) -> Item {
        let state = update.state.map(|s| {
            let at = self.bytes.len();
            self.bytes.extend_from_slice(s);
            at..self.bytes.len()
        });
        Item {
            state,
            view: update.view,
            join: update.join,
            clock: update.clock,
        }
    }

    /// Owned copies, one by one.
    pub fn to_vec(&self) -> Vec<Update> {
        self.iter().map(|u| u.to_owned()).collect()
    }
}

impl From<Vec<Update>> for Updates {
    fn from(list: Vec<Update>) -> Self {
        let mut out = Updates {
            bytes: Vec::with_capacity(
                list.iter()
                    .map(|u| u.state.as_ref().map_or(0, Vec::len))
                    .sum(),
            ),
            items: Vec::with_capacity(list.len()),
        };
        for u in &list {
            out.push(u.as_ref());
        }
        out
    }
}

impl PartialEq for Updates {
    /// The same updates, wherever their bytes lie.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().zip(other.iter()).all(|(a, b)| a == b)
    }
}

impl Eq for Updates {}

/// One update of an [`Updates`], borrowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateRef<'a> {
    /// State to hand back next time; `None`: forget the entity.
    pub state: Option<&'a [u8]>,
    /// The JSON answer's range in `state`; `None`: not visible.
    pub view: Option<Range<u32>>,
    /// The join key's (organization name's) range in `state`.
    pub join: Option<Range<u32>>,
    /// The entity's newest event time, if the reducer tells.
    pub clock: Option<i64>,
}

impl<'a> UpdateRef<'a> {
    fn text(&self, range: Option<&Range<u32>>) -> Option<&'a str> {
        text_in(self.state?, range?).ok()
    }

    /// The JSON answer, when visible.
    pub fn view(&self) -> Option<&'a str> {
        self.text(self.view.as_ref())
    }

    /// The join key.
    pub fn join(&self) -> Option<&'a str> {
        self.text(self.join.as_ref())
    }

    /// An owned copy.
    pub fn to_owned(&self) -> Update {
        Update {
            state: self.state.map(<[u8]>::to_vec),
            view: self.view.clone(),
            join: self.join.clone(),
            clock: self.clock,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A state with text at two places, and an update that names some of them.
    fn update() -> impl Strategy<Value = Update> {
        (
            proptest::option::of(("[a-z]{0,8}", "[a-z{}\":é]{0,16}", "[A-Z ]{0,8}")),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(any::<i64>()),
        )
            .prop_map(|(parts, with_view, with_join, clock)| match parts {
                None => Update {
                    state: None,
                    view: None,
                    join: None,
                    clock,
                },
                Some((head, view, join)) => {
                    let mut state = head.into_bytes();
                    let v = state.len() as u32..(state.len() + view.len()) as u32;
                    state.extend_from_slice(view.as_bytes());
                    let j = state.len() as u32..(state.len() + join.len()) as u32;
                    state.extend_from_slice(join.as_bytes());
                    Update {
                        state: Some(state),
                        view: with_view.then_some(v),
                        join: with_join.then_some(j),
                        clock,
                    }
                }
            })
    }

    proptest! {
        #[test]
        fn updates_round_trip(list in proptest::collection::vec(update(), 0..20)) {
            let bytes = encode(&list);
            prop_assert_eq!(decode(&bytes, list.len()).map_err(TestCaseError::fail)?, list.clone());
            prop_assert!(decode(&bytes, list.len() + 1).is_err(), "count is checked");
            // Kept in one buffer, and built one by one: the same updates.
            let batch = decode_batch(bytes.clone(), list.len()).map_err(TestCaseError::fail)?;
            prop_assert_eq!(batch.to_vec(), list.clone());
            prop_assert_eq!(&Updates::from(list.clone()), &batch);
            let mut replaced = Updates::from(list.clone());
            for i in 0..list.len() {
                replaced.set(i, list[list.len() - 1 - i].as_ref());
            }
            let mut reversed = list.clone();
            reversed.reverse();
            prop_assert_eq!(replaced.to_vec(), reversed);
        }
    }

    fn one(state: &[u8], view: Range<u32>) -> Vec<u8> {
        encode(&[Update {
            state: Some(state.to_vec()),
            view: Some(view),
            join: None,
            clock: None,
        }])
    }

    #[test]
    fn untrusted_ranges_are_checked() {
        assert_eq!(
            decode(&one(b"{}", 0..3), 1).unwrap_err(),
            "view: range is outside the state"
        );
        assert_eq!(
            decode(&one(b"\xff\xfe", 0..2), 1).unwrap_err(),
            "view: text is not UTF-8"
        );
        // A range without a state: flags VIEW alone.
        let mut bytes = vec![VIEW];
        put_u32(&mut bytes, 0);
        put_u32(&mut bytes, 1);
        assert_eq!(decode(&bytes, 1).unwrap_err(), "view range without a state");
        assert_eq!(decode(&[16], 1).unwrap_err(), "unknown flags 0x10");
        assert!(decode(&[CLOCK, 1, 2], 1).is_err(), "a clock is 8 bytes");
        let mut overflow = vec![KEEP | VIEW];
        put_frame(&mut overflow, b"x");
        put_u32(&mut overflow, u32::MAX);
        put_u32(&mut overflow, 2);
        assert_eq!(decode(&overflow, 1).unwrap_err(), "view range overflows");
    }
}
