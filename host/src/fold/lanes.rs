//! Folding one batch in several lanes at once, each on its own thread with its own
//! reducer instance (under the same limits), with a result byte-identical to folding
//! it in one.
//!
//! A batch is cut into pieces that own shards of the state: an entity key belongs to
//! shard [`shard_of`] of [`SHARDS`], and shard `s` to piece `s % pieces`, with
//! several pieces per lane ([`PIECES_PER_LANE`]). Records are assigned to pieces by
//! the shard of their route (the record's key: the entity's key when producers key
//! their records by it, as they should for ordering anyway). Each lane takes the
//! next piece not taken yet until none is left, so a lane that shares its core with
//! another thread folds fewer pieces instead of keeping the others waiting. Each
//! piece is folded into a private [`Overlay`] over the shared state, which it only
//! reads.
//!
//! When every piece touched only entities of its own shards (records keyed by their
//! entity), no two pieces share an entity, and each lane applies the pieces it folded
//! to the target itself, at the same time as the others (the store locks per shard):
//! no merge, no serial apply. Whether that holds is known without comparing the
//! pieces: a piece whose every entity routes to itself cannot share one with a piece
//! that says the same; the lanes wait for each other to know it.
//!
//! Otherwise (records not keyed by their entity), the pieces' updates are put
//! together in piece order and applied in one [`Target::apply`]; when two pieces
//! touched the same entity, the later piece's result is thrown away and its records
//! are folded again, on this thread, over the updates of the pieces before it. The
//! fold is order-free and idempotent, so that gives exactly what one lane gives; only
//! the time differs.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use logq_abi::{Entity, Record, States, Updates};

use super::batch::{Folding, Lend, Note, Target, fold_into};
use super::runtime::Reducer;

/// Below this many records a batch is folded in one lane: a thread costs more than
/// it saves.
pub const MIN_RECORDS_PER_LANE: usize = 256;

/// Shards of the state: at most this many lanes fold at once.
pub const SHARDS: usize = 16;

/// A batch folded in lanes is cut into this many pieces per lane, at most one per
/// shard (see [`fold_in_lanes`]). Small pieces leave a lane little to wait for at
/// the end of a batch, while the other finishes its last piece, and keep each
/// call's buffers small; each costs an instance (tens of microseconds). Catch-up
/// from the broker (`bench/run.sh --catch-up-only`, 100k users, 2 lanes, the builds
/// in turn, 3 runs each): 402-431k events/s with 2 pieces per lane, 422-447k with
/// 4, 437-465k with 8 (16 pieces, one a shard).
pub const PIECES_PER_LANE: usize = 8;

/// The shard of an entity key (or of a record key). Fixed across runs and machines:
/// foldhash with a fixed seed.
pub fn shard_of(key: &[u8]) -> usize {
    let hash = foldhash::fast::FixedState::with_seed(0x6c6f_6771_7368_6172).hash_one(key);
    usize::try_from(hash % SHARDS as u64).unwrap_or(0)
}

/// The route of a record key (a producer's key: the entity's key when it keys by
/// it): its shard.
pub fn route(key: &[u8]) -> u64 {
    shard_of(key) as u64
}

/// The lane a route goes to: the lane that owns its shard.
fn lane_of(route: u64, lanes: usize) -> usize {
    usize::try_from(route % lanes.max(1) as u64).unwrap_or(0)
}

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Updates kept aside over a base state: reads see them first. What a lane folds
/// into before the batch is applied.
struct Overlay<'a> {
    base: &'a (dyn Lend + Sync),
    entities: Vec<Entity>,
    updates: Updates,
    /// Where the base found each of `entities` (same order), or empty.
    notes: Vec<Note>,
    /// Where each of `entities[..indexed]` is.
    index: Map<Entity, usize>,
    indexed: usize,
}

impl<'a> Overlay<'a> {
    fn new(base: &'a (dyn Lend + Sync)) -> Self {
        Self {
            base,
            entities: Vec::new(),
            updates: Updates::default(),
            notes: Vec::new(),
            index: Map::default(),
            indexed: 0,
        }
    }

    /// Indexes what is kept (done only when a lookup needs it: most lanes fold once
    /// and are never looked into).
    fn index_all(&mut self) {
        for (i, e) in self.entities.iter().enumerate().skip(self.indexed) {
            self.index.insert(e.clone(), i);
        }
        self.indexed = self.entities.len();
    }

    /// Keeps `updates` too; they win over what was kept for the same entities.
    /// `notes`: where the base found `entities`, if it said.
    fn keep(&mut self, entities: Vec<Entity>, updates: Updates, notes: &[Note]) {
        if self.entities.is_empty() {
            // One fold's entities are distinct: nothing to look up.
            self.entities = entities;
            self.updates = updates;
            self.notes = notes.to_vec();
            return;
        }
        // A second fold's entities were lent by this overlay, not found in the base.
        self.notes.clear();
        self.index_all();
        for (e, u) in entities.into_iter().zip(updates.iter()) {
            match self.index.get(&e) {
                Some(&i) => self.updates.set(i, u),
                None => {
                    self.index.insert(e.clone(), self.entities.len());
                    self.entities.push(e);
                    self.updates.push(u);
                    self.indexed += 1;
                }
            }
        }
    }
}

impl Lend for Overlay<'_> {
    /// Notes where the base found the entities while nothing is kept here (a lane's
    /// first fold: it then hands the notes back to the base with its updates).
    fn lend_noted(
        &self,
        entities: &[Entity],
        each: &mut dyn FnMut(Option<&[u8]>),
        notes: &mut Vec<Note>,
    ) {
        if self.entities.is_empty() {
            return self.base.lend_noted(entities, each, notes);
        }
        notes.clear();
        self.states(entities, each);
    }
}

impl States for Overlay<'_> {
    /// Needs [`Overlay::index_all`] first when anything is kept.
    fn states(&self, entities: &[Entity], each: &mut dyn FnMut(Option<&[u8]>)) {
        if self.entities.is_empty() {
            return self.base.states(entities, each);
        }
        debug_assert_eq!(self.indexed, self.entities.len());
        // One call to the base for the entities not kept here, so it can lend them
        // under one lock.
        let missing: Vec<Entity> = entities
            .iter()
            .filter(|e| !self.index.contains_key(*e))
            .cloned()
            .collect();
        let mut from_base: Vec<Option<Vec<u8>>> = Vec::with_capacity(missing.len());
        if !missing.is_empty() {
            self.base
                .states(&missing, &mut |s| from_base.push(s.map(<[u8]>::to_vec)));
        }
        let mut from_base = from_base.into_iter();
        for e in entities {
            match self.index.get(e) {
                Some(&i) => each(self.updates.get(i).state),
                None => each(from_base.next().flatten().as_deref()),
            }
        }
    }
}

/// A lane's overlay as a [`Target`] (which takes `&self`).
struct LaneTarget<'a>(RefCell<Overlay<'a>>);

impl States for LaneTarget<'_> {
    fn states(&self, entities: &[Entity], each: &mut dyn FnMut(Option<&[u8]>)) {
        self.0.borrow_mut().index_all();
        self.0.borrow().states(entities, each);
    }
}

impl Lend for LaneTarget<'_> {
    fn lend_noted(
        &self,
        entities: &[Entity],
        each: &mut dyn FnMut(Option<&[u8]>),
        notes: &mut Vec<Note>,
    ) {
        self.0.borrow_mut().index_all();
        self.0.borrow().lend_noted(entities, each, notes);
    }
}

impl Target for LaneTarget<'_> {
    fn apply(&self, entities: Vec<Entity>, updates: Updates) {
        self.0.borrow_mut().keep(entities, updates, &[]);
    }

    fn apply_noted(&self, entities: Vec<Entity>, updates: Updates, notes: &[Note]) {
        self.0.borrow_mut().keep(entities, updates, notes);
    }
}

/// What a lane made of one piece's records.
struct Piece<'a> {
    overlay: Overlay<'a>,
    folding: Folding,
    /// Every entity it touched routes to it: no other piece that says the same can
    /// have touched one of them.
    own: bool,
}

/// Folds `records` into a fresh overlay over `base`, as piece `piece` of `pieces`.
fn fold_piece<'a>(
    reducer: &Reducer,
    base: &'a (dyn Lend + Sync),
    records: &[Record<'_>],
    piece: usize,
    pieces: usize,
) -> Piece<'a> {
    let target = LaneTarget(RefCell::new(Overlay::new(base)));
    let folding = fold_into(reducer, &target, records);
    let overlay = target.0.into_inner();
    // The notes name each entity's shard: no need to hash its key again.
    let own = if overlay.notes.len() == overlay.entities.len() {
        overlay
            .notes
            .iter()
            .all(|n| lane_of(u64::from(n.shard), pieces) == piece)
    } else {
        overlay
            .entities
            .iter()
            .all(|e| lane_of(route(e.key.as_bytes()), pieces) == piece)
    };
    Piece {
        overlay,
        folding,
        own,
    }
}

/// How a batch was shared among lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneUse {
    /// Lanes that folded it (1 for a batch too small to share).
    pub used: usize,
    /// Pieces folded again because they touched an entity an earlier piece touched.
    pub refolded: usize,
    /// Every piece kept to its own shards and each lane applied the pieces it
    /// folded itself, at the same time as the others (records keyed by their entity).
    pub owned: bool,
}

/// Folds `records` into `target` in up to `lanes` lanes (at most [`SHARDS`]);
/// `routes` holds each record's route (same length). One lane, or a batch too small
/// to share, is folded as [`fold_into`] does. Returns what folding did, per record of
/// `records`, and how the lanes were used.
pub fn fold_in_lanes<T: Target + Sync>(
    reducer: &Reducer,
    target: &T,
    records: &[Record<'_>],
    routes: &[u64],
    lanes: usize,
) -> (Folding, LaneUse) {
    let lanes = lanes
        .min(SHARDS)
        .min(records.len() / MIN_RECORDS_PER_LANE)
        .max(1);
    if lanes == 1 {
        let folding = fold_into(reducer, target, records);
        return (
            folding,
            LaneUse {
                used: 1,
                refolded: 0,
                owned: true,
            },
        );
    }
    // More pieces than lanes, each a set of shards: a lane takes the next piece when
    // it is done with one, so a lane that shares its core with another thread (the
    // loop polling the next batch) folds fewer and no lane waits long for another.
    let pieces = (lanes * PIECES_PER_LANE).min(SHARDS);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); pieces];
    for (i, &r) in routes.iter().enumerate() {
        members[lane_of(r, pieces)].push(i);
    }
    let batches: Vec<Vec<Record<'_>>> = members
        .iter()
        .map(|m| m.iter().map(|&i| records[i]).collect())
        .collect();
    let base: &(dyn Lend + Sync) = target;
    // Every piece is folded, then the lanes wait here to learn whether each piece
    // kept to its own shards; if so, each lane applies the pieces it folded.
    let (barrier, all_own, next) = (
        Barrier::new(lanes),
        AtomicBool::new(true),
        AtomicUsize::new(0),
    );
    let lane = |reducer: &Reducer| {
        let mut mine: Vec<(usize, Piece<'_>)> = Vec::new();
        let folded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            loop {
                let piece = next.fetch_add(1, Ordering::SeqCst);
                let Some(batch) = batches.get(piece) else {
                    break;
                };
                let folded = fold_piece(reducer, base, batch, piece, pieces);
                all_own.fetch_and(folded.own, Ordering::SeqCst);
                mine.push((piece, folded));
            }
        }));
        if folded.is_err() {
            all_own.store(false, Ordering::SeqCst);
        }
        barrier.wait();
        if let Err(panic) = folded {
            std::panic::resume_unwind(panic);
        }
        if all_own.load(Ordering::SeqCst) {
            for (_, folded) in &mut mine {
                if folded.overlay.entities.is_empty() {
                    continue;
                }
                let entities = std::mem::take(&mut folded.overlay.entities);
                let updates = std::mem::take(&mut folded.overlay.updates);
                let notes = std::mem::take(&mut folded.overlay.notes);
                target.apply_noted(entities, updates, &notes);
            }
        }
        mine
    };
    let mut results: Vec<(usize, Piece<'_>)> = std::thread::scope(|s| {
        let others: Vec<_> = (1..lanes)
            .map(|_| {
                let (reducer, lane) = (reducer.clone(), &lane);
                s.spawn(move || lane(&reducer))
            })
            .collect();
        // This thread is the first lane meanwhile.
        let mut out = lane(reducer);
        for other in others {
            out.extend(other.join().expect("a fold lane panicked"));
        }
        out
    });
    // In piece order: what the merge below does must not depend on who took what.
    results.sort_unstable_by_key(|(piece, _)| *piece);
    let results = results.into_iter().map(|(_, folded)| folded);
    let mut folding = Folding {
        accepted: vec![0; records.len()],
        ..Folding::default()
    };
    // The lanes have applied every piece already when all kept to their shards.
    let applied = all_own.load(Ordering::SeqCst);
    let mut merged = Overlay::new(base);
    let mut refolded = 0;
    for (lane, (members, batch)) in results.into_iter().zip(members.iter().zip(&batches)) {
        let lane = if applied {
            lane.folding
        } else {
            let mut overlay = lane.overlay;
            merged.index_all();
            overlay.index_all();
            let shares = overlay
                .entities
                .iter()
                .any(|e| merged.index.contains_key(e));
            if shares {
                // Fold again over what the pieces before it made of their entities.
                refolded += 1;
                let Piece {
                    overlay, folding, ..
                } = fold_piece(reducer, &merged, batch, 0, 1);
                let (e, u) = (overlay.entities, overlay.updates);
                merged.keep(e, u, &[]);
                folding
            } else {
                merged.keep(overlay.entities, overlay.updates, &[]);
                lane.folding
            }
        };
        for (local, &global) in members.iter().enumerate() {
            folding.accepted[global] = lane.accepted[local];
        }
        folding.dead.extend(lane.dead.into_iter().map(|mut d| {
            d.input = members[d.input];
            d
        }));
        folding.failures += lane.failures;
        folding.elapsed += lane.elapsed;
    }
    folding.dead.sort_by_key(|d| d.input);
    if !merged.entities.is_empty() {
        target.apply(merged.entities, merged.updates);
    }
    (
        folding,
        LaneUse {
            used: lanes,
            refolded,
            owned: applied,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_over_every_shard_and_each_shard_has_one_lane() {
        let mut per_shard = [0usize; SHARDS];
        for i in 0..16_000 {
            per_shard[shard_of(format!("{i:032x}").as_bytes())] += 1;
        }
        // About 1,000 each: no shard is empty or twice its share.
        assert!(
            per_shard.iter().all(|n| (500..2000).contains(n)),
            "{per_shard:?}"
        );
        assert_eq!(shard_of(b"same key"), shard_of(b"same key"), "fixed");
        for lanes in 1..=SHARDS {
            for key in ["a", "b", "069feb770fe581acc9d3313d59780196"] {
                // A record keyed by an entity goes to the lane that owns its shard.
                let lane = lane_of(route(key.as_bytes()), lanes);
                assert_eq!(lane, shard_of(key.as_bytes()) % lanes);
                assert!(lane < lanes);
            }
        }
    }
}
