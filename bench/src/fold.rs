//! Figure 1, the fold engine without a broker: the wasm reducer under the host's
//! runtime vs. the same fold compiled natively, on the same events, in this process,
//! one thread (so events/s is per core). Both go through the one driver
//! ([`logq_abi::driver::Model`]), so they pay the same bookkeeping.

use std::time::Instant;

use logq::fold::{DEFAULT_REDUCER, Limits, Runtime};
use logq_abi::driver::Model;
use logq_abi::{Fold, Record, Source};

use crate::history::History;

/// Events/s of each engine (best of the runs).
pub struct FoldResult {
    /// The reducer crate called directly.
    pub native: f64,
    /// The component through `logq::fold` (fresh instance per batch).
    pub wasm: f64,
}

/// The history as the records a host reads: organizations first, then users.
pub fn records(history: &History) -> Vec<Record<'_>> {
    Record::sequence(
        history
            .organizations
            .iter()
            .map(|v| (Source::Organizations, v.as_bytes()))
            .chain(history.users.iter().map(|v| (Source::Users, v.as_bytes()))),
    )
}

/// The limits the fold figures run under: the host's memory cap, a time budget no
/// batch of the benchmark comes near.
pub const LIMITS: Limits = Limits {
    memory_bytes: 256 << 20,
    time: std::time::Duration::from_secs(10),
};

/// Batches of `batch` records, as the host forms them.
pub fn run(history: &History, batch: usize, runs: usize) -> anyhow::Result<FoldResult> {
    let records = records(history);
    let reducer = Runtime::new(LIMITS, None)?.load(DEFAULT_REDUCER)?;
    let n = records.len() as f64;
    let (mut native, mut wasm) = (0f64, 0f64);
    let (mut native_model, mut wasm_model) = (Model::new(), Model::new());
    for _ in 0..runs {
        let (secs, model) = fold_all(&logq_reducer::Native, &records, batch)?;
        native = native.max(n / secs);
        native_model = model;
        let (secs, model) = fold_all(&reducer, &records, batch)?;
        wasm = wasm.max(n / secs);
        wasm_model = model;
    }
    anyhow::ensure!(
        native_model == wasm_model,
        "the wasm and native folds disagree ({} vs {} entities)",
        wasm_model.len(),
        native_model.len()
    );
    Ok(FoldResult { native, wasm })
}

/// Folds everything in batches; returns the seconds it took and the state.
fn fold_all<F: Fold>(
    fold: &F,
    records: &[Record<'_>],
    batch: usize,
) -> anyhow::Result<(f64, Model)> {
    let mut model = Model::new();
    let start = Instant::now();
    for chunk in records.chunks(batch) {
        model
            .apply(fold, chunk)
            .map_err(|e| anyhow::anyhow!("fold: {e}"))?;
    }
    Ok((start.elapsed().as_secs_f64(), model))
}
