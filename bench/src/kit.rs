//! Figure 1b, reducers written with the kit: fold-only events/s of a Rust reducer
//! written with the SDK and of the JavaScript example, next to the hand-tuned default
//! reducer, on the same records, in this process, one thread; with each component's
//! size, wasmtime compile time and (when `bench/run.sh` built it) toolchain build time.

use std::path::PathBuf;
use std::time::Instant;

use logq::fold::{DEFAULT_REDUCER, Runtime};
use logq_abi::driver::Model;

use crate::history::History;

/// A component to measure: its name, file, and how long its build took.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// What it is.
    pub name: String,
    /// The component.
    pub path: PathBuf,
    /// Seconds `logq reducer build` took, if known.
    pub build_seconds: Option<f64>,
}

impl std::str::FromStr for Candidate {
    type Err = String;

    /// `NAME=PATH` or `NAME=PATH@BUILD_SECONDS`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rest) = s.split_once('=').ok_or("expected NAME=PATH[@SECONDS]")?;
        let (path, secs) = match rest.rsplit_once('@') {
            Some((p, secs)) => (p, Some(secs.parse().map_err(|e| format!("{secs}: {e}"))?)),
            None => (rest, None),
        };
        Ok(Self {
            name: name.to_owned(),
            path: PathBuf::from(path),
            build_seconds: secs,
        })
    }
}

/// One measured component.
pub struct Measured {
    /// Its name.
    pub name: String,
    /// Events folded per second (best of the runs).
    pub events_per_second: f64,
    /// Bytes of the component.
    pub size: usize,
    /// Milliseconds wasmtime took to compile it (no cache).
    pub compile_ms: f64,
    /// Seconds its build took, if known.
    pub build_seconds: Option<f64>,
}

/// Measures the default reducer and every candidate on the first `records` records
/// of `history`, in batches of `batch`.
pub fn run(
    history: &History,
    candidates: &[Candidate],
    batch: usize,
    records: usize,
    runs: usize,
) -> anyhow::Result<Vec<Measured>> {
    let all = crate::fold::records(history);
    let records = &all[..records.min(all.len())];
    let runtime = Runtime::new(crate::fold::LIMITS, None)?;
    let mut out = Vec::new();
    let default = Candidate {
        name: "default reducer (hand-tuned Rust)".into(),
        path: PathBuf::new(),
        build_seconds: None,
    };
    let mut entities = None;
    let mut loaded = Vec::new();
    for c in std::iter::once(&default).chain(candidates) {
        let bytes = if c.path.as_os_str().is_empty() {
            DEFAULT_REDUCER.to_vec()
        } else {
            std::fs::read(&c.path).map_err(|e| anyhow::anyhow!("{}: {e}", c.path.display()))?
        };
        let start = Instant::now();
        let reducer = runtime.load(&bytes)?;
        let compile_ms = start.elapsed().as_secs_f64() * 1e3;
        loaded.push((c, reducer, bytes.len(), compile_ms, 0f64));
    }
    // The candidates take turns, run by run, so a slow spell of the machine hits all.
    for _ in 0..runs.max(1) {
        for (c, reducer, _, _, best) in &mut loaded {
            let mut model = Model::new();
            let start = Instant::now();
            for chunk in records.chunks(batch) {
                model
                    .apply(reducer, chunk)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", c.name))?;
            }
            *best = best.max(records.len() as f64 / start.elapsed().as_secs_f64());
            // Every reducer keys users and organizations alike: the same entities.
            let n = model.len();
            anyhow::ensure!(
                *entities.get_or_insert(n) == n,
                "{} kept {n} entities, the default {entities:?}",
                c.name
            );
        }
    }
    for (c, _, size, compile_ms, best) in loaded {
        out.push(Measured {
            name: c.name.clone(),
            events_per_second: best,
            size,
            compile_ms,
            build_seconds: c.build_seconds,
        });
    }
    Ok(out)
}
