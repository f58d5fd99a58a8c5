//! Prior states, host -> reducer (the `fold` argument).
//!
//! For each entity of the plan, in order: one byte (0: the host has no state for it;
//! 1: it has) and, when 1, the state as a frame.

use crate::{Reader, put_frame};

/// Appends one entity's prior state (or its absence).
pub fn put(out: &mut Vec<u8>, state: Option<&[u8]>) {
    match state {
        Some(state) => {
            out.push(1);
            put_frame(out, state);
        }
        None => out.push(0),
    }
}

/// All of `states`, framed.
pub fn encode<'a>(states: impl IntoIterator<Item = Option<&'a [u8]>>) -> Vec<u8> {
    let mut out = Vec::new();
    for s in states {
        put(&mut out, s);
    }
    out
}

/// The states `bytes` holds, borrowed.
///
/// # Errors
/// A flag other than 0 or 1, or a frame that runs past the end.
pub fn decode(bytes: &[u8]) -> Result<Vec<Option<&[u8]>>, String> {
    let mut r = Reader::new(bytes);
    let mut out = Vec::new();
    while !r.is_empty() {
        out.push(match r.u8()? {
            0 => None,
            1 => Some(r.frame()?),
            other => return Err(format!("framing: bad prior flag {other}")),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn prior_states_round_trip(
            list in proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
                0..20,
            )
        ) {
            let bytes = encode(list.iter().map(Option::as_deref));
            let back: Vec<Option<Vec<u8>>> =
                decode(&bytes).map_err(TestCaseError::fail)?.into_iter().map(|s| s.map(<[u8]>::to_vec)).collect();
            prop_assert_eq!(back, list);
        }
    }

    #[test]
    fn a_bad_flag_is_refused() {
        assert_eq!(decode(&[2]).unwrap_err(), "framing: bad prior flag 2");
    }
}
