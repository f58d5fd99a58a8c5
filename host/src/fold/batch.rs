//! Folding one batch into a target, and the batch-splitting policy: a batch the
//! reducer cannot fold as a whole is split into single records, so one poison
//! record costs only itself and the rest of the batch is applied.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use logq_abi::{Entity, Record, States, Updates};

use super::runtime::Reducer;

/// Where a target found one entity when it lent its state ([`Lend::lend_noted`]),
/// so that storing its update ([`Target::apply_noted`]) need not look for it again:
/// each of a fold's entities is looked up once, not once to lend and once to store.
/// What the numbers mean is the target's business; a note is only ever handed back
/// to the target that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Note {
    /// The entity's shard: [`crate::fold::lanes::shard_of`] of its key (the lanes
    /// route by it without hashing the key again).
    pub shard: u32,
    /// Where in it; [`Note::NOWHERE`]: not there (yet).
    pub slot: u32,
    /// The target's mark of the moment: the slot is still the entity's while the
    /// mark is unchanged.
    pub epoch: u64,
}

impl Note {
    /// The slot of an entity not found.
    pub const NOWHERE: u32 = u32::MAX;
}

/// What a fold reads prior states from.
pub trait Lend: States {
    /// Lends the states of `entities` as [`States::states`] does, and sets `notes`
    /// to one [`Note`] per entity, same order, saying where each was found; or
    /// leaves `notes` empty (the default: nothing noted).
    fn lend_noted(
        &self,
        entities: &[Entity],
        each: &mut dyn FnMut(Option<&[u8]>),
        notes: &mut Vec<Note>,
    ) {
        notes.clear();
        self.states(entities, each);
    }
}

/// Where a batch is folded into: lends prior states, takes updates.
pub trait Target: Lend {
    /// Stores the updates of one batch (one per entity, same order), atomically for
    /// readers.
    fn apply(&self, entities: Vec<Entity>, updates: Updates);

    /// As [`Target::apply`], with the `notes` this target's [`Lend::lend_noted`] made
    /// for the same entities in the same order (or none: then as `apply`). A note
    /// gone stale meanwhile is found out and the entity looked up again.
    fn apply_noted(&self, entities: Vec<Entity>, updates: Updates, notes: &[Note]) {
        let _ = notes;
        self.apply(entities, updates);
    }
}

/// A target lending through [`Lend::lend_noted`], keeping the notes for the apply.
struct Noting<'a> {
    target: &'a dyn Target,
    notes: RefCell<Vec<Note>>,
}

impl States for Noting<'_> {
    fn states(&self, entities: &[Entity], each: &mut dyn FnMut(Option<&[u8]>)) {
        self.target
            .lend_noted(entities, each, &mut self.notes.borrow_mut());
    }
}

/// A record the reducer would not fold, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Index of the record in the batch.
    pub input: usize,
    /// Why, in words.
    pub reason: String,
    /// Positions of the refused events inside the record, comma-separated.
    pub events: String,
}

/// What folding one batch did.
#[derive(Debug, Default)]
pub struct Folding {
    /// Events applied, per record.
    pub accepted: Vec<u64>,
    /// Records (wholly or partly) refused.
    pub dead: Vec<DeadLetter>,
    /// Reducer calls that failed as a whole (trap, limit, refusal).
    pub failures: u64,
    /// Time spent in successful reducer calls.
    pub elapsed: Duration,
}

/// Folds `records` into `target` with `reducer`, splitting on failure.
pub fn fold_into(reducer: &Reducer, target: &dyn Target, records: &[Record<'_>]) -> Folding {
    let mut out = Folding {
        accepted: vec![0; records.len()],
        ..Folding::default()
    };
    fold_range(reducer, target, records, 0, &mut out);
    out
}

fn fold_range(
    reducer: &Reducer,
    target: &dyn Target,
    records: &[Record<'_>],
    base: usize,
    out: &mut Folding,
) {
    if records.is_empty() {
        return;
    }
    let start = Instant::now();
    let noting = Noting {
        target,
        notes: RefCell::new(Vec::new()),
    };
    match reducer.fold(records, &noting) {
        Ok((plan, updates)) => {
            out.elapsed += start.elapsed();
            let notes = noting.notes.into_inner();
            let notes = if notes.len() == plan.entities.len() {
                &notes[..]
            } else {
                &[]
            };
            target.apply_noted(plan.entities, updates, notes);
            for (i, n) in plan.accepted.iter().enumerate() {
                out.accepted[base + i] = u64::from(*n);
            }
            let mut reasons: BTreeMap<u32, Vec<(Option<u32>, String)>> = BTreeMap::new();
            for r in plan.rejections {
                reasons
                    .entry(r.input)
                    .or_default()
                    .push((r.event, r.reason));
            }
            for (input, list) in reasons {
                let events: Vec<String> = list
                    .iter()
                    .filter_map(|(e, _)| e.map(|e| e.to_string()))
                    .collect();
                let reason: Vec<&str> = list.iter().map(|(_, r)| r.as_str()).collect();
                out.dead.push(DeadLetter {
                    input: base + input as usize,
                    reason: reason.join("; "),
                    events: events.join(","),
                });
            }
        }
        Err(e) => {
            out.failures += 1;
            if records.len() == 1 {
                out.dead.push(DeadLetter {
                    input: base,
                    reason: e.to_string(),
                    events: String::new(),
                });
            } else {
                tracing::warn!(
                    "reducer failed on a batch of {} records ({e}); folding them one by one",
                    records.len()
                );
                for (i, record) in records.iter().enumerate() {
                    fold_range(reducer, target, std::slice::from_ref(record), base + i, out);
                }
            }
        }
    }
}
