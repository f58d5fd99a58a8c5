//! The records the reducer folding into a store refused (wholly or partly), by place,
//! with the reason: kept with the state, so that a swap preview can say which dead
//! letters a candidate would add or remove. The live loop notes what it dead-letters,
//! a replay what its reducer refused (a replay's store becomes the live one at the
//! flip, refusals and all), and snapshots keep them across restarts.
//!
//! Refused records are rare next to events, but a topic full of garbage is not: past
//! [`LIMIT`] places the set stops growing and says it is incomplete, rather than
//! letting a producer grow the host without bound.

use std::collections::BTreeMap;

use crate::broker::Partition;

/// Most refused records kept per store.
pub const LIMIT: usize = 100_000;

/// Refused records by (partition, offset), each with its reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refused {
    records: BTreeMap<(Partition, i64), Box<str>>,
    overflowed: bool,
}

impl Refused {
    /// Notes that the record at `offset` of `partition` was refused for `reason`
    /// (again: the newest reason stays).
    pub fn insert(&mut self, partition: Partition, offset: i64, reason: &str) {
        let key = (partition, offset);
        if self.records.len() >= LIMIT && !self.records.contains_key(&key) {
            self.overflowed = true;
            return;
        }
        self.records.insert(key, reason.into());
    }

    /// Whether every refusal is here (none was left out past [`LIMIT`]).
    pub fn complete(&self) -> bool {
        !self.overflowed
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The reason the record at `offset` of `partition` was refused, if it was.
    pub fn get(&self, partition: Partition, offset: i64) -> Option<&str> {
        self.records.get(&(partition, offset)).map(|r| &**r)
    }

    /// Every refusal in (partition, offset) order.
    pub fn iter(&self) -> impl Iterator<Item = (Partition, i64, &str)> {
        self.records.iter().map(|((p, o), r)| (*p, *o, &**r))
    }

    /// Forgets the refusals of the partitions `gone` says (a host that shares
    /// partitions no longer holds them).
    pub fn forget(&mut self, gone: impl Fn(Partition) -> bool) {
        self.records.retain(|(p, _), _| !gone(*p));
    }

    /// Rebuilds a set from a snapshot's parts.
    pub fn from_parts(records: Vec<(Partition, i64, String)>, complete: bool) -> Self {
        Self {
            records: records
                .into_iter()
                .map(|(p, o, r)| ((p, o), r.into_boxed_str()))
                .collect(),
            overflowed: !complete,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logq_abi::Source;

    const P0: Partition = Partition {
        source: Source::Users,
        id: 0,
    };
    const O1: Partition = Partition {
        source: Source::Organizations,
        id: 1,
    };

    #[test]
    fn refusals_are_kept_by_place_in_order_and_forgotten_by_partition() {
        let mut r = Refused::default();
        r.insert(O1, 3, "no id");
        r.insert(P0, 9, "not JSON");
        r.insert(P0, 2, "bad time");
        r.insert(P0, 9, "not JSON, again");
        assert_eq!(r.len(), 3);
        assert_eq!(r.get(P0, 9), Some("not JSON, again"));
        assert_eq!(r.get(P0, 3), None);
        let order: Vec<_> = r.iter().map(|(p, o, _)| (p, o)).collect();
        assert_eq!(order, vec![(P0, 2), (P0, 9), (O1, 3)]);
        r.forget(|p| p == P0);
        assert_eq!(
            r.iter().map(|(p, o, _)| (p, o)).collect::<Vec<_>>(),
            vec![(O1, 3)]
        );
        assert!(r.complete());
    }

    #[test]
    fn past_the_limit_the_set_stops_growing_and_says_so() {
        let mut r = Refused::default();
        for o in 0..LIMIT as i64 {
            r.insert(P0, o, "x");
        }
        assert!(r.complete());
        // A place already kept is updated, not counted as left out.
        r.insert(P0, 0, "y");
        assert!(r.complete());
        r.insert(P0, LIMIT as i64, "x");
        assert_eq!(r.len(), LIMIT);
        assert!(!r.complete());
        let parts: Vec<_> = r.iter().map(|(p, o, s)| (p, o, s.to_owned())).collect();
        assert_eq!(Refused::from_parts(parts, r.complete()), r);
    }
}
