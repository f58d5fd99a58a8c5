//! Folding one batch in several lanes at once, each on its own thread with its own
//! reducer instance (under the same limits), with a result byte-identical to folding
//! it in one.
//!
//! Records are assigned to lanes by a hash of their route (the record's key: the
//! entity's key when producers key their records by it, as they should for ordering
//! anyway). Each lane folds its records into a private [`Overlay`] over the shared
//! state, which it only reads. The lanes' updates are then merged in lane order and
//! handed to the target in one [`Target::apply`], so readers see the batch whole or
//! not at all, as with one lane.
//!
//! When two lanes touched the same entity (records not keyed by their entity), the
//! later lane's result is thrown away and its records are folded again, on this
//! thread, over the merged updates of the lanes before it. The fold is order-free and
//! idempotent, so that gives exactly what one lane gives; only the time differs.

use std::collections::HashMap;

use logq_abi::{Entity, Record, States, Update};

use super::batch::{Folding, Target, fold_into};
use super::runtime::Reducer;

/// Below this many records a batch is folded in one lane: a thread costs more than
/// it saves.
pub const MIN_RECORDS_PER_LANE: usize = 256;

/// Updates kept aside over a base state: reads see them first. What a lane folds
/// into before the batch is applied.
pub struct Overlay<'a> {
    base: &'a (dyn States + Sync),
    entities: Vec<Entity>,
    updates: Vec<Update>,
    index: HashMap<Entity, usize>,
}

impl<'a> Overlay<'a> {
    /// Nothing kept aside yet.
    pub fn new(base: &'a (dyn States + Sync)) -> Self {
        Self {
            base,
            entities: Vec::new(),
            updates: Vec::new(),
            index: HashMap::new(),
        }
    }

    /// Whether any entity of `other` is kept here too.
    fn overlaps(&self, other: &Overlay<'_>) -> bool {
        let (small, large) = if self.index.len() <= other.index.len() {
            (self, other)
        } else {
            (other, self)
        };
        small.entities.iter().any(|e| large.index.contains_key(e))
    }

    /// Keeps `updates` too; they win over what was kept for the same entities.
    fn keep(&mut self, entities: &[Entity], updates: Vec<Update>) {
        for (e, u) in entities.iter().zip(updates) {
            match self.index.get(e) {
                Some(&i) => self.updates[i] = u,
                None => {
                    self.index.insert(e.clone(), self.entities.len());
                    self.entities.push(e.clone());
                    self.updates.push(u);
                }
            }
        }
    }

    /// What is kept, in first-touched order, each entity once.
    fn into_parts(self) -> (Vec<Entity>, Vec<Update>) {
        (self.entities, self.updates)
    }
}

impl States for Overlay<'_> {
    fn states(&self, entities: &[Entity], each: &mut dyn FnMut(Option<&[u8]>)) {
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

/// `Target` takes `&self`; a lane owns its overlay, so it goes through a cell.
struct LaneTarget<'a>(std::cell::RefCell<Overlay<'a>>);

impl States for LaneTarget<'_> {
    fn states(&self, entities: &[Entity], each: &mut dyn FnMut(Option<&[u8]>)) {
        self.0.borrow().states(entities, each);
    }
}

impl Target for LaneTarget<'_> {
    fn apply(&self, entities: &[Entity], updates: Vec<Update>) {
        self.0.borrow_mut().keep(entities, updates);
    }
}

/// Folds `records` into a fresh overlay over `base`.
fn fold_lane<'a>(
    reducer: &Reducer,
    base: &'a (dyn States + Sync),
    records: &[Record<'_>],
) -> (Overlay<'a>, Folding) {
    let target = LaneTarget(std::cell::RefCell::new(Overlay::new(base)));
    let folding = fold_into(reducer, &target, records);
    (target.0.into_inner(), folding)
}

/// The route hash of a record key (a producer's key: the entity's key when it keys
/// by it). Fixed across runs and machines: SipHash with zero keys.
pub fn route(key: &[u8]) -> u64 {
    use std::hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(key)
}

/// Which lane each record goes to, from its route hash.
pub fn assign(routes: &[u64], lanes: usize) -> Vec<usize> {
    let lanes = lanes.max(1) as u64;
    routes
        .iter()
        .map(|r| usize::try_from(r % lanes).unwrap_or(0))
        .collect()
}

/// Folds `records` into `target` in up to `lanes` lanes; `routes` holds each record's
/// route hash (same length). One lane, or a batch too small to share, is folded as
/// [`fold_into`] does. Returns what folding did, per record of `records`, and how
/// many lanes had to be folded again because they touched an entity an earlier lane
/// touched.
pub fn fold_in_lanes<T: Target + Sync>(
    reducer: &Reducer,
    target: &T,
    records: &[Record<'_>],
    routes: &[u64],
    lanes: usize,
) -> (Folding, usize) {
    let lanes = lanes.min(records.len() / MIN_RECORDS_PER_LANE).max(1);
    if lanes == 1 {
        return (fold_into(reducer, target, records), 0);
    }
    let lane_of = assign(routes, lanes);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); lanes];
    for (i, &l) in lane_of.iter().enumerate() {
        members[l].push(i);
    }
    let batches: Vec<Vec<Record<'_>>> = members
        .iter()
        .map(|m| m.iter().map(|&i| records[i]).collect())
        .collect();
    let base: &(dyn States + Sync) = target;
    let results: Vec<(Overlay<'_>, Folding)> = std::thread::scope(|s| {
        let others: Vec<_> = batches[1..]
            .iter()
            .map(|batch| {
                let reducer = reducer.clone();
                s.spawn(move || fold_lane(&reducer, base, batch))
            })
            .collect();
        // This thread folds the first lane meanwhile.
        let mut out = vec![fold_lane(reducer, base, &batches[0])];
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
    let mut merged = Overlay::new(base);
    let mut refolded = 0;
    for ((overlay, lane), (members, batch)) in results.into_iter().zip(members.iter().zip(&batches))
    {
        let lane = if merged.overlaps(&overlay) {
            // Fold again over what the lanes before it made of the shared entities.
            refolded += 1;
            drop(overlay);
            let (again, lane) = fold_lane(reducer, &merged, batch);
            let (entities, updates) = again.into_parts();
            merged.keep(&entities, updates);
            lane
        } else {
            let (entities, updates) = overlay.into_parts();
            merged.keep(&entities, updates);
            lane
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
    let (entities, updates) = merged.into_parts();
    if !entities.is_empty() {
        target.apply(&entities, updates);
    }
    (folding, refolded)
}
