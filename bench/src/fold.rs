//! Figure 1, the fold engine without a broker: the wasm reducer under the host's
//! runtime vs. the same fold compiled natively, on the same events, in this process,
//! one thread (so events/s is per core).

use std::collections::HashMap;
use std::time::Instant;

use logq::runtime::{self, Input, Limits, Runtime, Source};

use crate::history::History;

/// Events/s of each engine (best of the runs).
pub struct FoldResult {
    /// The reducer crate called directly.
    pub native: f64,
    /// The component through `logq::runtime` (fresh instance per batch).
    pub wasm: f64,
}

/// Batches of `batch` records, as the host forms them.
pub fn run(history: &History, batch: usize, runs: usize) -> anyhow::Result<FoldResult> {
    let inputs: Vec<Input> = history
        .organizations
        .iter()
        .map(|v| (Source::Organizations, v))
        .chain(history.users.iter().map(|v| (Source::Users, v)))
        .map(|(source, v)| Input {
            source,
            value: v.as_bytes().to_vec(),
        })
        .collect();
    let limits = Limits {
        memory_bytes: 256 << 20,
        time: std::time::Duration::from_secs(10),
    };
    let reducer = Runtime::new(limits, None)?.load(runtime::DEFAULT_REDUCER)?;
    let n = inputs.len() as f64;
    let (mut native, mut wasm) = (0f64, 0f64);
    let (mut native_states, mut wasm_states) = (States::default(), States::default());
    for _ in 0..runs {
        native_states = States::default();
        let start = Instant::now();
        for chunk in inputs.chunks(batch) {
            fold_native(chunk, &mut native_states)?;
        }
        native = native.max(n / start.elapsed().as_secs_f64());

        wasm_states = States::default();
        let start = Instant::now();
        for chunk in inputs.chunks(batch) {
            let folded = reducer.fold(chunk, |entities, out| {
                for e in entities {
                    let map = &wasm_states[usize::from(e.kind == runtime::Kind::User)];
                    runtime::put_prior(out, map.get(e.key.as_str()).map(Vec::as_slice));
                }
            })?;
            for (e, u) in folded.plan.entities.into_iter().zip(folded.updates) {
                if let Some(state) = u.state {
                    wasm_states[usize::from(e.kind == runtime::Kind::User)].insert(e.key, state);
                }
            }
        }
        wasm = wasm.max(n / start.elapsed().as_secs_f64());
    }
    anyhow::ensure!(
        native_states == wasm_states,
        "the wasm and native folds disagree ({} vs {} users)",
        wasm_states[1].len(),
        native_states[1].len()
    );
    Ok(FoldResult { native, wasm })
}

/// Entity states by key: organizations, users.
type States = [HashMap<String, Vec<u8>>; 2];

fn fold_native(chunk: &[Input], states: &mut States) -> anyhow::Result<()> {
    let batch = logq_reducer::Batch::new(chunk.iter().map(|i| (i.source, i.value.as_slice())));
    let map = |e: &logq_reducer::Entity| usize::from(e.kind == logq_reducer::Kind::User);
    let prior: Vec<Option<&[u8]>> = batch
        .plan()
        .entities
        .iter()
        .map(|e| states[map(e)].get(e.key.as_str()).map(Vec::as_slice))
        .collect();
    let updates = batch.fold(&prior).map_err(anyhow::Error::msg)?;
    for (e, u) in batch.plan().entities.iter().zip(updates) {
        if let Some(state) = u.state {
            states[map(e)].insert(e.key.clone(), state);
        }
    }
    Ok(())
}
