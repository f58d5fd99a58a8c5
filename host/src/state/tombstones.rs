//! One shard's tombstones (users kept but not visible, with a clock) by clock, oldest
//! first: what expires once its retention has passed.
//!
//! A min-heap of `(clock, slot)`, 16 bytes a tombstone in one vector. An ordered set
//! would let an entry be removed when its user comes back or its clock moves, but a
//! B-tree node holds its entries at 55-75% and its own header, about 30 bytes a
//! tombstone: a tenth of what a tombstone costs in all, at a third of the users
//! kept. Here an entry is not removed; it goes stale, and is checked against the
//! user when it reaches the top ([`Tombstones::pop_due`]). Stale entries are dropped
//! in one pass once they outnumber the current ones (and 1,024), so the heap stays
//! under about twice the tombstones and each change costs O(log n) amortized.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Stale entries tolerated before a pass, besides as many as there are tombstones.
const STALE_MIN: usize = 1024;

/// See the module's doc.
#[derive(Debug, Default)]
pub(super) struct Tombstones {
    heap: BinaryHeap<Reverse<(i64, u32)>>,
    /// Current tombstones: the heap's entries that are not stale.
    current: usize,
}

impl Tombstones {
    /// Tombstones kept.
    pub fn len(&self) -> usize {
        self.current
    }

    /// Bytes it holds.
    pub fn held(&self) -> usize {
        self.heap.capacity() * std::mem::size_of::<(i64, u32)>()
    }

    /// The tombstone clock of the user in slot `id` goes from `old` to `new` (`None`:
    /// not a tombstone). `clock_of(id)` says what it is now for any slot, so that stale
    /// entries can be told from current ones.
    pub fn track(
        &mut self,
        id: u32,
        old: Option<i64>,
        new: Option<i64>,
        clock_of: impl Fn(u32) -> Option<i64>,
    ) {
        if old == new {
            return;
        }
        if old.is_some() {
            // Its entry is stale from now on.
            self.current -= 1;
        }
        if let Some(c) = new {
            self.current += 1;
            self.heap.push(Reverse((c, id)));
        }
        if self.heap.len() > 2 * self.current + STALE_MIN {
            self.drop_stale(clock_of);
        }
    }

    /// Keeps only the current entries, once each (a slot given to another user with
    /// the same clock, or a user back at the same clock, may have left two).
    fn drop_stale(&mut self, clock_of: impl Fn(u32) -> Option<i64>) {
        let mut kept: Vec<_> = std::mem::take(&mut self.heap)
            .into_iter()
            .filter(|Reverse((c, id))| clock_of(*id) == Some(*c))
            .collect();
        kept.sort_unstable();
        kept.dedup();
        self.heap = BinaryHeap::from(kept);
        self.heap.shrink_to_fit();
    }

    /// Whether the oldest entry (current or stale) is older than `horizon`: a cheap
    /// check before [`Tombstones::pop_due`] under a write lock.
    pub fn any_before(&self, horizon: i64) -> bool {
        self.heap.peek().is_some_and(|Reverse((c, _))| *c < horizon)
    }

    /// The slot of a current tombstone whose clock is before `horizon`, its entry
    /// taken off the heap; stale entries met on the way are dropped. `None` when
    /// there is none. The caller forgets the user and says so with [`Tombstones::track`]
    /// (to `None`), which counts it out.
    pub fn pop_due(&mut self, horizon: i64, clock_of: impl Fn(u32) -> Option<i64>) -> Option<u32> {
        while let Some(&Reverse((c, id))) = self.heap.peek()
            && c < horizon
        {
            self.heap.pop();
            if clock_of(id) == Some(c) {
                return Some(id);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashMap};

    /// Against an ordered set of the current tombstones: random users become
    /// tombstones, move their clocks, come back, expire; slots are reused. What
    /// expires, and when, is the same.
    #[test]
    fn expires_what_an_ordered_set_of_the_current_tombstones_would() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut index = Tombstones::default();
        // Slot -> its tombstone clock now (absent: visible or free).
        let mut clocks: HashMap<u32, i64> = HashMap::new();
        let mut model: BTreeSet<(i64, u32)> = BTreeSet::new();
        let mut horizon = 0;
        let mut expired = 0;
        for round in 0..200_000 {
            let id = (next() % 3_000) as u32;
            let old = clocks.get(&id).copied();
            // Clocks mostly rise; sometimes stay (a slot reused at the same clock).
            let new = match next() % 4 {
                0 => None,
                1 => old,
                _ => Some(horizon + (next() % 5_000) as i64),
            };
            match new {
                Some(c) => clocks.insert(id, c),
                None => clocks.remove(&id),
            };
            if let Some(c) = old {
                model.remove(&(c, id));
            }
            if let Some(c) = new {
                model.insert((c, id));
            }
            index.track(id, old, new, |i| clocks.get(&i).copied());
            assert_eq!(index.len(), model.len(), "round {round}");
            assert!(index.heap.len() <= 2 * index.len() + STALE_MIN + 1);
            if round % 97 == 0 {
                horizon += (next() % 300) as i64;
                let want: Vec<u32> = model
                    .iter()
                    .take_while(|(c, _)| *c < horizon)
                    .map(|(_, id)| *id)
                    .collect();
                let mut got = Vec::new();
                while let Some(id) = index.pop_due(horizon, |i| clocks.get(&i).copied()) {
                    // The caller forgets the user.
                    let c = clocks
                        .remove(&id)
                        .unwrap_or_else(|| panic!("{id} not current"));
                    index.track(id, Some(c), None, |i| clocks.get(&i).copied());
                    model.remove(&(c, id));
                    got.push(id);
                }
                let mut want_sorted = want.clone();
                want_sorted.sort_unstable();
                got.sort_unstable();
                assert_eq!(got, want_sorted, "round {round}");
                assert!(!model.iter().any(|(c, _)| *c < horizon));
                expired += got.len();
            }
        }
        assert!(expired > 10_000, "expiry was exercised: {expired}");
    }

    /// A user that comes back and is deleted again at the same clock, over and over,
    /// leaves entries that all look current: a pass keeps one, not all of them.
    #[test]
    fn a_pass_keeps_each_current_tombstone_once() {
        let mut index = Tombstones::default();
        let mut clock = None;
        for _ in 0..5_000 {
            let new = if clock.is_some() { None } else { Some(5) };
            index.track(7, clock, new, |_| new);
            clock = new;
        }
        let now = Some(5);
        index.track(7, clock, now, |_| now);
        index.drop_stale(|_| now);
        assert_eq!((index.len(), index.heap.len()), (1, 1));
        assert!(index.heap.len() <= 2 * index.len() + STALE_MIN);
    }
}
