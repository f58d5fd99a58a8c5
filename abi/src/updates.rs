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
/// Broken framing, unknown flags, a range outside its state or not UTF-8, a range
/// without a state, or another count.
pub fn decode(bytes: &[u8], count: usize) -> Result<Vec<Update>, String> {
    let mut r = Reader::new(bytes);
    let mut out = Vec::with_capacity(count.min(bytes.len()));
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
        out.push(Update {
            state: state.map(<[u8]>::to_vec),
            view,
            join,
            clock,
        });
    }
    if out.len() != count {
        return Err(format!("{} updates for {count} entities", out.len()));
    }
    Ok(out)
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
