//! Which reducer is active, and how a new one gets there: validation (compile, world,
//! canary), forward switches, replays, rollback, and the history of all of it. The
//! admin API and the file watcher both end in [`Reducers::submit`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::runtime::{Input, Reducer, ReducerError, ReducerMeta, Runtime, Source};

/// How many past swaps `GET /admin/reducer` shows.
const HISTORY: usize = 32;
/// How many recent records the canary folds besides the sample data.
const RECENT: usize = 256;

/// How a reducer arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Loaded at start (`--reducer` or the built-in one).
    Startup,
    /// The `--reducer` file changed on disk.
    File,
    /// `PUT /admin/reducer`.
    Http,
    /// `POST /admin/reducer/rollback`.
    Rollback,
}

/// What happens to the state when a reducer is swapped in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Keep the state; events from the next batch on use the new reducer.
    #[default]
    Forward,
    /// Rebuild the state from the earliest offsets with the new reducer, then flip.
    Replay,
}

/// The active reducer and how it got there.
pub struct Active {
    /// The compiled reducer.
    pub reducer: Reducer,
    /// How it arrived.
    pub origin: Origin,
    /// When it was loaded (RFC 3339).
    pub loaded_at: String,
}

/// A description of a reducer for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct ReducerInfo {
    /// Hex sha256 of the component.
    pub sha256: String,
    /// Bytes.
    pub size: usize,
    /// `logq:reducer/fold` version it exports.
    pub world_version: String,
    /// When it was loaded.
    pub loaded_at: String,
    /// How it arrived.
    pub origin: Origin,
}

impl Active {
    fn info(&self) -> ReducerInfo {
        let m: &ReducerMeta = self.reducer.meta();
        ReducerInfo {
            sha256: m.sha256.clone(),
            size: m.size,
            world_version: m.world_version.clone(),
            loaded_at: self.loaded_at.clone(),
            origin: self.origin,
        }
    }
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
    /// `active`, `replaying`, `rejected`, `superseded`, `cancelled`, `failed`.
    pub outcome: String,
    /// Why it was rejected or failed.
    pub reason: Option<String>,
    /// Milliseconds to compile (0 when the compile cache had it).
    pub compile_ms: u64,
    /// Whether the compile cache had it.
    pub from_cache: bool,
    /// Milliseconds the canary took.
    pub canary_ms: u64,
    /// For an applied swap: the next offset of every partition when the new reducer
    /// folded its first batch (`topic/partition` -> offset). Events before it were
    /// folded by the previous reducer, events from it on by the new one.
    pub switch_offsets: Option<BTreeMap<String, i64>>,
}

/// Why a candidate was not swapped in.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// Not WebAssembly at all.
    #[error("{0}")]
    NotWasm(ReducerError),
    /// Does not compile or does not match the world.
    #[error("{0}")]
    Invalid(ReducerError),
    /// Trapped or hit a limit on the canary events.
    #[error("canary failed: {0}")]
    Canary(String),
    /// Another swap or replay is in progress.
    #[error("{0}")]
    Busy(String),
    /// Nothing to roll back to.
    #[error("there is no previous reducer to roll back to")]
    NoPrevious,
}

/// What a successful submit did.
#[derive(Debug, Clone, Serialize)]
pub struct Submitted {
    /// The swap's record (outcome `active` or `replaying`).
    pub swap: SwapRecord,
    /// The reducer now active (for a replay: still the old one until it flips).
    pub active: ReducerInfo,
}

/// All reducers the process knows about.
pub struct Reducers {
    runtime: Runtime,
    current: RwLock<Arc<Active>>,
    previous: Mutex<Option<Arc<Active>>>,
    history: Mutex<VecDeque<SwapRecord>>,
    recent: Mutex<VecDeque<Input>>,
    next_id: Mutex<u64>,
    /// One swap at a time: validation and activation are serialized.
    swapping: Mutex<()>,
    replay: Mutex<Option<Arc<crate::replay::Replay>>>,
}

impl Reducers {
    /// Starts with `reducer` active.
    pub fn new(runtime: Runtime, reducer: Reducer, origin: Origin) -> Self {
        Self {
            runtime,
            current: RwLock::new(Arc::new(Active {
                reducer,
                origin,
                loaded_at: now(),
            })),
            previous: Mutex::new(None),
            history: Mutex::new(VecDeque::new()),
            recent: Mutex::new(VecDeque::new()),
            next_id: Mutex::new(1),
            swapping: Mutex::new(()),
            replay: Mutex::new(None),
        }
    }

    /// The active reducer. Callers keep the `Arc` for one batch, so a swap takes
    /// effect exactly at a batch boundary.
    pub fn current(&self) -> Arc<Active> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Remembers the tail of a batch for the canary of the next candidate.
    pub fn remember(&self, inputs: &[Input]) {
        let mut recent = lock(&self.recent);
        for i in inputs.iter().rev().take(RECENT).rev() {
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(i.clone());
        }
    }

    /// Validates `bytes` and swaps it in (forward) or starts a replay with it.
    ///
    /// # Errors
    /// A [`SwapError`] saying why nothing changed.
    pub fn submit(
        self: &Arc<Self>,
        bytes: &[u8],
        origin: Origin,
        mode: Mode,
        replay_ctx: &crate::replay::ReplayContext,
    ) -> Result<Submitted, SwapError> {
        let _one_at_a_time = lock(&self.swapping);
        let mut record = self.record(crate::runtime::sha256_hex(bytes), origin, mode);
        let result = self.validate(bytes, &mut record);
        let reducer = match result {
            Ok(r) => r,
            Err(e) => {
                record.outcome = "rejected".into();
                record.reason = Some(e.to_string());
                self.push(record);
                return Err(e);
            }
        };
        let active = Arc::new(Active {
            reducer,
            origin,
            loaded_at: now(),
        });
        match mode {
            Mode::Forward => {
                if let Some(replay) = lock(&self.replay).take() {
                    replay.cancel();
                }
                record.outcome = "active".into();
                self.install(active);
            }
            Mode::Replay => {
                let mut slot = lock(&self.replay);
                if let Some(r) = slot.as_ref().filter(|r| r.running()) {
                    let msg = format!("a replay of {} is in progress; cancel it first", r.sha256());
                    record.outcome = "rejected".into();
                    record.reason = Some(msg.clone());
                    self.push(record);
                    return Err(SwapError::Busy(msg));
                }
                record.outcome = "replaying".into();
                *slot = Some(crate::replay::Replay::start(
                    replay_ctx.clone(),
                    self.clone(),
                    active,
                    record.id,
                ));
            }
        }
        self.push(record.clone());
        Ok(Submitted {
            swap: record,
            active: self.current().info(),
        })
    }

    /// Compile, world check, canary: everything that must pass before anything changes.
    fn validate(&self, bytes: &[u8], record: &mut SwapRecord) -> Result<Reducer, SwapError> {
        let start = Instant::now();
        let reducer = self.runtime.load(bytes).map_err(|e| match e {
            ReducerError::NotWasm => SwapError::NotWasm(e),
            other => SwapError::Invalid(other),
        })?;
        record.compile_ms = millis(start.elapsed());
        record.from_cache = reducer.meta().from_cache;
        let start = Instant::now();
        let recent: Vec<Input> = lock(&self.recent).iter().cloned().collect();
        canary(&reducer, &recent).map_err(SwapError::Canary)?;
        record.canary_ms = millis(start.elapsed());
        Ok(reducer)
    }

    /// Makes `active` current; the old one becomes `previous`.
    pub(crate) fn install(&self, active: Arc<Active>) {
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
            active,
        );
        *lock(&self.previous) = Some(old);
    }

    /// Returns to the previous reducer (forward mode).
    ///
    /// # Errors
    /// [`SwapError::NoPrevious`] when there is none.
    pub fn rollback(&self) -> Result<Submitted, SwapError> {
        let _one_at_a_time = lock(&self.swapping);
        let previous = lock(&self.previous).take().ok_or(SwapError::NoPrevious)?;
        let sha = previous.reducer.meta().sha256.clone();
        let mut record = self.record(sha, Origin::Rollback, Mode::Forward);
        record.outcome = "active".into();
        record.from_cache = true;
        let back = Arc::new(Active {
            // The compiled reducer is reused as it is: a rollback never recompiles.
            reducer: previous.reducer.clone(),
            origin: Origin::Rollback,
            loaded_at: now(),
        });
        self.install(back);
        self.push(record.clone());
        Ok(Submitted {
            swap: record,
            active: self.current().info(),
        })
    }

    /// Called by the ingest loop when it folds its first batch with a reducer it has
    /// not used before: records where the switch happened.
    pub fn note_switch(&self, sha256: &str, offsets: BTreeMap<String, i64>) {
        let mut history = lock(&self.history);
        if let Some(r) = history
            .iter_mut()
            .rev()
            .find(|r| r.sha256 == sha256 && r.switch_offsets.is_none() && r.outcome == "active")
        {
            r.switch_offsets = Some(offsets);
        }
    }

    /// Sets the outcome of swap `id` (a replay finishing, failing or being cancelled).
    pub fn finish(&self, id: u64, outcome: &str, reason: Option<String>) {
        if let Some(r) = lock(&self.history).iter_mut().find(|r| r.id == id) {
            r.outcome = outcome.into();
            r.reason = reason;
        }
    }

    /// Cancels a running replay; `false` when none runs.
    pub fn cancel_replay(&self) -> bool {
        match lock(&self.replay).as_ref().filter(|r| r.running()) {
            Some(r) => {
                r.cancel();
                true
            }
            None => false,
        }
    }

    /// Everything `GET /admin/reducer` shows.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "active": self.current().info(),
            "previous": lock(&self.previous).as_ref().map(|p| p.info()),
            "history": lock(&self.history).iter().rev().cloned().collect::<Vec<_>>(),
            "replay": lock(&self.replay).as_ref().map(|r| r.progress()),
        })
    }

    fn record(&self, sha256: String, origin: Origin, mode: Mode) -> SwapRecord {
        let mut next = lock(&self.next_id);
        let id = *next;
        *next += 1;
        SwapRecord {
            id,
            at: now(),
            sha256,
            origin,
            mode,
            outcome: "validating".into(),
            reason: None,
            compile_ms: 0,
            from_cache: false,
            canary_ms: 0,
            switch_offsets: None,
        }
    }

    fn push(&self, record: SwapRecord) {
        let mut history = lock(&self.history);
        history.retain(|r| r.id != record.id);
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(record);
    }
}

/// `logq reducer check`: the validation a hot swap runs (compile, world, canary on
/// the sample data), offline. Returns the verdict as JSON (`ok` true or false).
pub fn check(
    bytes: &[u8],
    limits: crate::runtime::Limits,
    cache_dir: Option<std::path::PathBuf>,
) -> serde_json::Value {
    let sha256 = crate::runtime::sha256_hex(bytes);
    let runtime = match Runtime::new(limits, cache_dir) {
        Ok(r) => r,
        Err(e) => {
            return serde_json::json!({"ok": false, "sha256": sha256, "reason": e.to_string()});
        }
    };
    let start = Instant::now();
    let reducer = match runtime.load(bytes) {
        Ok(r) => r,
        Err(e) => {
            return serde_json::json!({"ok": false, "sha256": sha256, "stage": "load", "reason": e.to_string()});
        }
    };
    let compile_ms = millis(start.elapsed());
    let start = Instant::now();
    let meta = reducer.meta().clone();
    match canary(&reducer, &[]) {
        Ok(()) => serde_json::json!({
            "ok": true,
            "sha256": meta.sha256,
            "size": meta.size,
            "world_version": meta.world_version,
            "compile_ms": compile_ms,
            "from_cache": meta.from_cache,
            "canary_ms": millis(start.elapsed()),
        }),
        Err(reason) => {
            serde_json::json!({"ok": false, "sha256": sha256, "stage": "canary", "reason": reason})
        }
    }
}

/// Folds the built-in sample data and `recent` records with `reducer` under its normal
/// limits. A trap, a limit hit, a refused batch or a view that is not a JSON object
/// fails the canary. Rejected events are fine: bad input exists.
///
/// # Errors
/// The reason, in words.
pub fn canary(reducer: &Reducer, recent: &[Input]) -> Result<(), String> {
    let samples = [
        (Source::Users, crate::dev::SAMPLE_USERS),
        (Source::Organizations, crate::dev::SAMPLE_ORGANIZATIONS),
    ]
    .map(|(source, text)| Input {
        source,
        value: text.as_bytes().to_vec(),
    });
    for (name, batch) in [
        ("the sample data", &samples[..]),
        ("recent records", recent),
    ] {
        if batch.is_empty() {
            continue;
        }
        let folded = reducer
            .fold(batch, |entities, out| {
                for _ in entities {
                    crate::runtime::put_prior(out, None);
                }
            })
            .map_err(|e| format!("on {name}: {e}"))?;
        for view in folded.updates.iter().filter_map(|u| u.view()) {
            let parsed: Result<serde_json::Map<String, serde_json::Value>, _> =
                serde_json::from_str(view);
            if let Err(e) = parsed {
                return Err(format!("on {name}: a view is not a JSON object ({e})"));
            }
        }
    }
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Now, RFC 3339 UTC with milliseconds.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
