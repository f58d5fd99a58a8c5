//! Folding one batch in several lanes at once, each on its own thread with its own
//! reducer instance (under the same limits), with a result byte-identical to folding
//! it in one.
//!
//! Records are assigned to lanes by a hash of their route (the record's key: the
//! entity's key when producers key their records by it, as they should for ordering
//! anyway). Each lane folds its records into a private [`Overlay`] over the shared
//! state, which it only reads. The lanes' updates are then put together in lane
//! order and handed to the target in one [`Target::apply`], so readers see the batch
//! whole or not at all, as with one lane.
//!
//! When two lanes touched the same entity (records not keyed by their entity), the
//! later lane's result is thrown away and its records are folded again, on this
//! thread, over the updates of the lanes before it. The fold is order-free and
//! idempotent, so that gives exactly what one lane gives; only the time differs.
//! Whether that can have happened is known without comparing the lanes: a lane
//! whose every entity routes to itself cannot share one with a lane that says the
//! same.

use std::cell::RefCell;
use std::collections::HashMap;

use logq_abi::{Entity, Record, States, Update};

use super::batch::{Folding, Target, fold_into};
use super::runtime::Reducer;

/// Below this many records a batch is folded in one lane: a thread costs more than
/// it saves.
pub const MIN_RECORDS_PER_LANE: usize = 256;

/// The route hash of a record key (a producer's key: the entity's key when it keys
/// by it). Fixed across runs and machines: SipHash with zero keys.
pub fn route(key: &[u8]) -> u64 {
    use std::hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(key)
}

/// The lane a route hash goes to.
fn lane_of(route: u64, lanes: usize) -> usize {
    usize::try_from(route % lanes.max(1) as u64).unwrap_or(0)
}

/// Updates kept aside over a base state: reads see them first. What a lane folds
/// into before the batch is applied.
struct Overlay<'a> {
    base: &'a (dyn States + Sync),
    entities: Vec<Entity>,
    updates: Vec<Update>,
    /// Where each of `entities[..indexed]` is.
    index: HashMap<Entity, usize>,
    indexed: usize,
}

impl<'a> Overlay<'a> {
    fn new(base: &'a (dyn States + Sync)) -> Self {
        Self {
            base,
            entities: Vec::new(),
            updates: Vec::new(),
            index: HashMap::new(),
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
    fn keep(&mut self, entities: Vec<Entity>, updates: Vec<Update>) {
        if self.entities.is_empty() {
            // One fold's entities are distinct: nothing to look up.
            self.entities = entities;
            self.updates = updates;
            return;
        }
        self.index_all();
        for (e, u) in entities.into_iter().zip(updates) {
            match self.index.get(&e) {
                Some(&i) => self.updates[i] = u,
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
                Some(&i) => each(self.updates[i].state.as_deref()),
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

impl Target for LaneTarget<'_> {
    fn apply(&self, entities: Vec<Entity>, updates: Vec<Update>) {
        self.0.borrow_mut().keep(entities, updates);
    }
}

/// What one lane made of its records.
struct Lane<'a> {
    overlay: Overlay<'a>,
    folding: Folding,
    /// Every entity it touched routes to it: no other lane that says the same can
    /// have touched one of them.
    own: bool,
}

/// Folds `records` into a fresh overlay over `base`, as lane `lane` of `lanes`.
fn fold_lane<'a>(
    reducer: &Reducer,
    base: &'a (dyn States + Sync),
    records: &[Record<'_>],
    lane: usize,
    lanes: usize,
) -> Lane<'a> {
    let target = LaneTarget(RefCell::new(Overlay::new(base)));
    let folding = fold_into(reducer, &target, records);
    let overlay = target.0.into_inner();
    let own = overlay
        .entities
        .iter()
        .all(|e| lane_of(route(e.key.as_bytes()), lanes) == lane);
    Lane {
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
    /// Lanes folded again because they touched an entity an earlier lane touched.
    pub refolded: usize,
}

/// Folds `records` into `target` in up to `lanes` lanes; `routes` holds each record's
/// route hash (same length). One lane, or a batch too small to share, is folded as
/// [`fold_into`] does. Returns what folding did, per record of `records`, and how
/// the lanes were used.
pub fn fold_in_lanes<T: Target + Sync>(
    reducer: &Reducer,
    target: &T,
    records: &[Record<'_>],
    routes: &[u64],
    lanes: usize,
) -> (Folding, LaneUse) {
    let lanes = lanes.min(records.len() / MIN_RECORDS_PER_LANE).max(1);
    if lanes == 1 {
        let folding = fold_into(reducer, target, records);
        return (
            folding,
            LaneUse {
                used: 1,
                refolded: 0,
            },
        );
    }
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); lanes];
    for (i, &r) in routes.iter().enumerate() {
        members[lane_of(r, lanes)].push(i);
    }
    let batches: Vec<Vec<Record<'_>>> = members
        .iter()
        .map(|m| m.iter().map(|&i| records[i]).collect())
        .collect();
    let base: &(dyn States + Sync) = target;
    let results: Vec<Lane<'_>> = std::thread::scope(|s| {
        let others: Vec<_> = batches
            .iter()
            .enumerate()
            .skip(1)
            .map(|(lane, batch)| {
                let reducer = reducer.clone();
                s.spawn(move || fold_lane(&reducer, base, batch, lane, lanes))
            })
            .collect();
        // This thread folds the first lane meanwhile.
        let mut out = vec![fold_lane(reducer, base, &batches[0], 0, lanes)];
        out.extend(
            others
                .into_iter()
                .map(|h| h.join().expect("a fold lane panicked")),
        );
        out
    });
    let mut folding = Folding {
        accepted: vec![0; records.len()],
        ..Folding::default()
    };
    let disjoint = results.iter().all(|l| l.own);
    let mut merged = Overlay::new(base);
    let (mut entities, mut updates) = (Vec::new(), Vec::new());
    let mut refolded = 0;
    for (lane, (members, batch)) in results.into_iter().zip(members.iter().zip(&batches)) {
        let lane = if disjoint {
            entities.extend(lane.overlay.entities);
            updates.extend(lane.overlay.updates);
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
                // Fold again over what the lanes before it made of their entities.
                refolded += 1;
                let Lane {
                    overlay, folding, ..
                } = fold_lane(reducer, &merged, batch, 0, 1);
                let (e, u) = (overlay.entities, overlay.updates);
                merged.keep(e, u);
                folding
            } else {
                merged.keep(overlay.entities, overlay.updates);
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
    if !disjoint {
        (entities, updates) = (merged.entities, merged.updates);
    }
    if !entities.is_empty() {
        target.apply(entities, updates);
    }
    (
        folding,
        LaneUse {
            used: lanes,
            refolded,
        },
    )
}
