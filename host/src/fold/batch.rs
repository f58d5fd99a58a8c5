//! Folding one batch into a target, and the batch-splitting policy: a batch the
//! reducer cannot fold as a whole is split into single records, so one poison
//! record costs only itself and the rest of the batch is applied.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use logq_abi::{Entity, Record, States, Updates};

use super::runtime::Reducer;

/// Where a batch is folded into: lends prior states, takes updates.
pub trait Target: States {
    /// Stores the updates of one batch (one per entity, same order), atomically for
    /// readers.
    fn apply(&self, entities: Vec<Entity>, updates: Updates);
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
    match reducer.fold(records, target) {
        Ok((plan, updates)) => {
            out.elapsed += start.elapsed();
            target.apply(plan.entities, updates);
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
