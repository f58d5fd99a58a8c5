//! The record of every swap: what was asked, and what became of it. Each entry ends
//! in exactly one final [`Outcome`], set by whoever decided it: the validation, the
//! consumer loop when it applied (or refused) the command, or the replay.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

use super::active::{Origin, now};

/// How many past swaps `GET /admin/reducer` shows.
const KEEP: usize = 32;

/// What happens to the state when a reducer is swapped in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Keep the state; events from the next batch on use the new reducer.
    #[default]
    Forward,
    /// Rebuild the state from the earliest offsets with the new reducer, then flip.
    Replay,
    /// Rebuild a shadow state as a replay does, compare its answers with the live
    /// ones, keep the report, never flip (see [`super::preview`]).
    Preview,
}

/// Where a swap stands, or how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Being compiled and checked.
    Validating,
    /// Valid, sent to the consumer loop, not applied yet.
    Queued,
    /// A replay (or a rollback) is rebuilding the state with it.
    Replaying,
    /// The consumer loop made it active, and it still is.
    Active,
    /// It was active until a later swap or rollback took its place (`reason` says
    /// which, and when).
    Replaced,
    /// Refused before anything changed (see `reason`).
    Rejected,
    /// A replay (or rollback) cancelled by `DELETE /admin/reducer/replay` or by
    /// shutdown.
    Cancelled,
    /// A replay (or rollback) overtaken by a later swap or rollback before it handed
    /// over (see `reason` for which).
    Superseded,
    /// A replay (or rollback) that could not finish (see `reason`).
    Failed,
    /// A preview that caught up and wrote its report (`preview`); nothing changed.
    Previewed,
}

/// One attempted swap.
#[derive(Debug, Clone, Serialize)]
pub struct SwapRecord {
    /// Sequence number.
    pub id: u64,
    /// When it was asked for.
    pub at: String,
    /// sha256 of the candidate (empty when it was not even WebAssembly).
    pub sha256: String,
    /// How it arrived.
    pub origin: Origin,
    /// Forward or replay.
    pub mode: Mode,
    /// Where it stands.
    pub outcome: Outcome,
    /// Why it was rejected, superseded or failed.
    pub reason: Option<String>,
    /// Milliseconds to compile (0 when the compile cache had it).
    pub compile_ms: u64,
    /// Whether the compile cache had it.
    pub from_cache: bool,
    /// Milliseconds the canary took.
    pub canary_ms: u64,
    /// For an applied swap: the next offset of every partition when it took effect
    /// (`topic/partition` -> offset). Events before it were folded by the previous
    /// reducer, events from it on by this one.
    pub switch_offsets: Option<BTreeMap<String, i64>>,
    /// For a forward swap: how many visible answers were still rendered by earlier
    /// reducers when it took effect. Each changes when its entity gets an event; a
    /// replay or a rollback re-renders them all.
    pub stale_answers: Option<usize>,
    /// For a preview that finished: what the candidate would do to the answers.
    pub preview: Option<super::preview::Report>,
}

/// The last [`KEEP`] swaps.
#[derive(Debug, Default)]
pub struct History {
    inner: Mutex<(u64, VecDeque<SwapRecord>)>,
}

impl History {
    /// Opens a new entry (outcome [`Outcome::Validating`]) and returns it.
    pub fn begin(&self, sha256: String, origin: Origin, mode: Mode) -> SwapRecord {
        let mut inner = self.lock();
        inner.0 += 1;
        let record = SwapRecord {
            id: inner.0,
            at: now(),
            sha256,
            origin,
            mode,
            outcome: Outcome::Validating,
            reason: None,
            compile_ms: 0,
            from_cache: false,
            canary_ms: 0,
            switch_offsets: None,
            stale_answers: None,
            preview: None,
        };
        if inner.1.len() == KEEP {
            inner.1.pop_front();
        }
        inner.1.push_back(record.clone());
        record
    }

    /// Changes entry `id` (if it is still kept) and returns it as it is now.
    pub fn update(&self, id: u64, f: impl FnOnce(&mut SwapRecord)) -> Option<SwapRecord> {
        let mut inner = self.lock();
        let r = inner.1.iter_mut().find(|r| r.id == id)?;
        f(r);
        Some(r.clone())
    }

    /// Entry `id` became the active reducer: its outcome is [`Outcome::Active`] (and
    /// `f` records how), and the entry that was active before is
    /// [`Outcome::Replaced`], saying by which swap and when. Returns entry `id`.
    pub fn activated(&self, id: u64, f: impl FnOnce(&mut SwapRecord)) -> Option<SwapRecord> {
        let mut inner = self.lock();
        let at = now();
        for r in inner.1.iter_mut() {
            if r.id != id && r.outcome == Outcome::Active {
                r.outcome = Outcome::Replaced;
                r.reason = Some(format!("replaced by swap #{id} at {at}"));
            }
        }
        let r = inner.1.iter_mut().find(|r| r.id == id)?;
        r.outcome = Outcome::Active;
        f(r);
        Some(r.clone())
    }

    /// Sets the outcome (and reason) of entry `id`.
    pub fn end(&self, id: u64, outcome: Outcome, reason: Option<String>) {
        self.update(id, |r| {
            r.outcome = outcome;
            r.reason = reason;
        });
    }

    /// Every kept entry, newest first.
    pub fn newest_first(&self) -> Vec<SwapRecord> {
        self.lock().1.iter().rev().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, VecDeque<SwapRecord>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
