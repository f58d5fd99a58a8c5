//! What decides between two events of one entity: event time first, then the log.
//!
//! Two events with the same event time are ordered by where they are in the log, so
//! that a correction sent with an unchanged timestamp wins, as it does on a compacted
//! topic or in a KTable:
//! - within one partition, the later offset wins; within one record (a JSON array of
//!   events), the later element wins;
//! - across partitions, where offsets do not compare, the higher partition number wins.
//!   That rule is arbitrary but deterministic: the same records give the same state in
//!   any order of arrival, after a replay and with duplicates.

use crate::time::Micros;

/// Where an event is in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    /// The record's partition.
    pub partition: i32,
    /// The record's offset in its partition.
    pub offset: i64,
    /// The event's index in its record (0 for a record that is one object).
    pub item: u32,
}

/// An event's place in an entity's history: compared by time, then by [`Pos`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp {
    /// Event time.
    pub at: Micros,
    /// Position in the log.
    pub pos: Pos,
}

impl Stamp {
    /// The stamp of an event at time `at` and position `pos`.
    pub fn new(at: Micros, pos: Pos) -> Self {
        Self { at, pos }
    }

    /// The stamp of time `at`, partition, offset and item: for tests.
    #[cfg(test)]
    pub(crate) fn of(at: Micros, partition: i32, offset: i64, item: u32) -> Self {
        Self::new(
            at,
            Pos {
                partition,
                offset,
                item,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_first_then_partition_then_offset_then_item() {
        let s = Stamp::of;
        assert!(
            s(2, 0, 0, 0) > s(1, 9, 9, 9),
            "a later time wins whatever the position"
        );
        assert!(
            s(1, 0, 5, 0) > s(1, 0, 4, 7),
            "same partition: the later offset wins"
        );
        assert!(
            s(1, 0, 4, 1) > s(1, 0, 4, 0),
            "same record: the later element wins"
        );
        assert!(
            s(1, 1, 0, 0) > s(1, 0, 9, 0),
            "across partitions: the higher partition"
        );
    }
}
