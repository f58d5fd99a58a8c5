//! The entities a batch touches, reducer -> host (the plan's `entities`).
//!
//! For each entity: its kind ([`Kind::byte`]) and its key (UTF-8) as a frame.

use crate::{Entity, Kind, Reader, put_frame};

/// All of `entities`, framed.
pub fn encode(entities: &[Entity]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entities.iter().map(|e| e.key.len() + 5).sum());
    for e in entities {
        out.push(e.kind.byte());
        put_frame(&mut out, e.key.as_bytes());
    }
    out
}

/// The entities `bytes` holds; there must be exactly `count`.
///
/// # Errors
/// Broken framing, an unknown kind, a key that is not UTF-8, or another count.
pub fn decode(bytes: &[u8], count: u32) -> Result<Vec<Entity>, String> {
    let mut r = Reader::new(bytes);
    // The count comes from the guest: do not trust it for an allocation.
    let mut out = Vec::with_capacity((count as usize).min(bytes.len() / 5));
    while !r.is_empty() {
        let kind = Kind::from_byte(r.u8()?)?;
        let key = std::str::from_utf8(r.frame()?)
            .map_err(|_| "an entity key is not UTF-8".to_string())?;
        out.push(Entity {
            kind,
            key: key.to_owned(),
        });
    }
    if out.len() != count as usize {
        return Err(format!("{} entities framed, {count} announced", out.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entity() -> impl Strategy<Value = Entity> {
        (
            prop_oneof![Just(Kind::User), Just(Kind::Organization)],
            ".{0,12}",
        )
            .prop_map(|(kind, key)| Entity { kind, key })
    }

    proptest! {
        #[test]
        fn entities_round_trip(list in proptest::collection::vec(entity(), 0..20)) {
            let bytes = encode(&list);
            prop_assert_eq!(decode(&bytes, list.len() as u32).map_err(TestCaseError::fail)?, list.clone());
            prop_assert!(decode(&bytes, list.len() as u32 + 1).is_err(), "count is checked");
        }
    }

    #[test]
    fn bad_kinds_and_keys_are_refused() {
        let one = encode(&[Entity {
            kind: Kind::User,
            key: "u".into(),
        }]);
        let mut bad_kind = one.clone();
        bad_kind[0] = 2;
        assert_eq!(decode(&bad_kind, 1).unwrap_err(), "unknown entity kind 2");
        let mut bad_key = one;
        bad_key[5] = 0xff;
        assert_eq!(
            decode(&bad_key, 1).unwrap_err(),
            "an entity key is not UTF-8"
        );
    }
}
