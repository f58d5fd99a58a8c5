//! Figure 1, the fold engine without a broker: the wasm reducer under the host's
//! runtime vs. the same fold compiled natively, on the same events, in this process,
//! one thread (so events/s is per core). Both go through the one driver
//! ([`logq_abi::driver::Model`]), so they pay the same bookkeeping.

use std::time::Instant;

use logq::fold::{DEFAULT_REDUCER, Limits, Runtime};
use logq_abi::driver::Model;
use logq_abi::{Fold, Record, Source};

use crate::history::History;

/// Events/s of each engine, every run (the two engines alternate).
pub struct FoldResult {
    /// The reducer crate called directly.
    pub native: Vec<f64>,
    /// The component through `logq::fold` (fresh instance per batch).
    pub wasm: Vec<f64>,
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
    let (mut native, mut wasm) = (Vec::new(), Vec::new());
    let (mut native_model, mut wasm_model) = (Model::new(), Model::new());
    for _ in 0..runs {
        let (secs, model) = fold_all(&logq_reducer::Native, &records, batch)?;
        native.push(n / secs);
        native_model = model;
        let (secs, model) = fold_all(&reducer, &records, batch)?;
        wasm.push(n / secs);
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

/// Events/s of the host's own fold path (lanes, the store, its one apply a batch)
/// with 1 and 2 lanes, the two alternating.
pub struct LanesResult {
    /// Events/s of every run with 1 lane, then with 2.
    pub runs: [Vec<f64>; 2],
    /// Cores the fold took in each of those runs (this process's CPU / wall time).
    pub cores: [Vec<f64>; 2],
}

/// The record key a producer gives each event (`logq produce` keys by `id`, else
/// `organization_key`).
fn key(value: &str) -> &str {
    for field in ["\"id\":\"", "\"organization_key\":\""] {
        if let Some(at) = value.find(field) {
            let rest = &value[at + field.len()..];
            return &rest[..rest.find('"').unwrap_or(rest.len())];
        }
    }
    ""
}

/// Folds the history through `logq::fold::fold_in_lanes` into a store (its `Writer`), in
/// batches of `batch`, `runs` times with 1 and 2 lanes alternately; checks that both
/// keep the same state.
pub fn lanes(history: &History, batch: usize, runs: usize) -> anyhow::Result<LanesResult> {
    let records = records(history);
    let routes: Vec<u64> = history
        .organizations
        .iter()
        .chain(&history.users)
        .map(|v| logq::fold::lanes::route(key(v).as_bytes()))
        .collect();
    let reducer = Runtime::new(LIMITS, None)?.load(DEFAULT_REDUCER)?;
    let n = records.len() as f64;
    let mut out = LanesResult {
        runs: [Vec::new(), Vec::new()],
        cores: [Vec::new(), Vec::new()],
    };
    let mut states: [Vec<_>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..runs.max(1) {
        for (i, lanes) in [1, 2].into_iter().enumerate() {
            let store = logq::state::Writer::new_store();
            let cpu_before = crate::cpu::own_seconds()?;
            let start = Instant::now();
            for (chunk, routes) in records.chunks(batch).zip(routes.chunks(batch)) {
                let (folding, _) =
                    logq::fold::fold_in_lanes(&reducer, &store, chunk, routes, lanes);
                anyhow::ensure!(folding.dead.is_empty(), "{:?}", folding.dead.first());
            }
            let took = start.elapsed().as_secs_f64();
            out.runs[i].push(n / took);
            out.cores[i].push((crate::cpu::own_seconds()? - cpu_before) / took);
            states[i] = store.dump(0);
            states[i].sort_by(|a, b| a.0.cmp(&b.0));
        }
    }
    anyhow::ensure!(
        states[0] == states[1],
        "1 and 2 lanes kept different states ({} and {} entities)",
        states[0].len(),
        states[1].len()
    );
    Ok(out)
}
