//! Which reducer folds, and how another one gets there: validation (compile, world,
//! canary), forward swaps, replays, rollbacks, and the history of all of it. Fourth
//! layer: it uses the broker, the fold and the state, and talks to the consumer loop
//! only by [`Command`].
//!
//! Nothing here changes the active reducer or the store: the consumer loop is their
//! one writer. A forward swap, a file-watch swap and the handover of a replay (a
//! rollback is a replay of the previous reducer) each reach it as a command, and it
//! applies them in the order they arrive, between two batches. The [`Registry`] keeps the record: the history, and a published copy of
//! what the loop made active, for readers.
//!
//! - [`active`]: a loaded reducer and how it arrived;
//! - [`history`]: every swap and its outcome;
//! - [`command`]: what goes to the loop, and its answers;
//! - [`canary`]: the checks a candidate must pass; `logq reducer check`;
//! - [`replay`]: rebuilding the state with a new reducer beside the live one;
//! - [`watch`]: the `--reducer` file, swapped in when it changes.

pub mod active;
pub mod canary;
pub mod command;
pub mod history;
pub mod preview;
pub mod replay;
pub mod watch;

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use logq_abi::Record;
use serde::Serialize;

pub use active::{Active, Origin, ReducerInfo};
pub use command::{Command, SwapError, Switched};
pub use history::{Mode, Outcome, SwapRecord};

use canary::{Recent, canary, millis};
use history::History;
use replay::{PauseHook, Phase, Replay, Setup};

use crate::fold::{Reducer, ReducerError, Runtime, sha256_hex};
use crate::state::StateStore;

/// What a successful submit did.
#[derive(Debug, Clone, Serialize)]
pub struct Submitted {
    /// The swap's record (outcome `active` or `replaying`).
    pub swap: SwapRecord,
    /// The reducer now active (for a replay: still the old one until it flips).
    pub active: ReducerInfo,
}

/// What the consumer loop made active, as readers see it.
struct Published {
    current: Arc<Active>,
    previous: Option<Arc<Active>>,
}

/// The service's reducers: validation, the command channel to the loop, the history.
pub struct Registry {
    runtime: Runtime,
    /// Read only (for the answer counts); the consumer loop writes it.
    store: Arc<StateStore>,
    commands: Sender<Command>,
    published: RwLock<Published>,
    history: Arc<History>,
    recent: Mutex<Recent>,
    /// One swap at a time: validation, the command and its answer are serialized, so
    /// the history's order is the order the loop applied them in.
    swapping: Mutex<()>,
    replay: Mutex<Option<Arc<Replay>>>,
    setup: Setup,
    pause: Option<PauseHook>,
}

impl Registry {
    /// A registry whose loop starts with `active` and writes `store`; commands go to
    /// `commands`.
    pub fn new(
        runtime: Runtime,
        store: Arc<StateStore>,
        active: Arc<Active>,
        commands: Sender<Command>,
        setup: Setup,
    ) -> Self {
        Self {
            runtime,
            store,
            commands,
            published: RwLock::new(Published {
                current: active,
                previous: None,
            }),
            history: Arc::new(History::default()),
            recent: Mutex::new(Recent::default()),
            swapping: Mutex::new(()),
            replay: Mutex::new(None),
            setup,
            pause: None,
        }
    }

    /// Test only: replays started from now on call `hook` at each step of their
    /// handover, so a test can land other commands at exactly that point.
    #[doc(hidden)]
    pub fn with_pause(mut self, hook: PauseHook) -> Self {
        self.pause = Some(hook);
        self
    }

    /// Bytes the reducers' instance pool keeps resident in slots not in use (see
    /// [`Runtime::pool_resident_bytes`]).
    pub fn pool_resident_bytes(&self) -> usize {
        self.runtime.pool_resident_bytes()
    }

    /// The active reducer, as last published by the consumer loop.
    pub fn current(&self) -> Arc<Active> {
        self.read().current.clone()
    }

    /// The reducer before the active one (a rollback's target), if any.
    pub fn previous(&self) -> Option<Arc<Active>> {
        self.read().previous.clone()
    }

    /// Called by the consumer loop, and only by it, after it changed the active
    /// reducer.
    pub fn publish(&self, current: &Arc<Active>, previous: Option<&Arc<Active>>) {
        let mut p = self.published.write().unwrap_or_else(|e| e.into_inner());
        p.current = current.clone();
        p.previous = previous.cloned();
    }

    /// Remembers the tail of a batch for the canary of the next candidate.
    pub fn remember(&self, records: &[Record<'_>]) {
        lock(&self.recent).remember(records);
    }

    /// Validates `bytes`, then has the loop make it active (forward: returns once it
    /// is) or starts a replay with it (returns at once).
    ///
    /// # Errors
    /// A [`SwapError`] saying why nothing changed.
    pub fn submit(&self, bytes: &[u8], origin: Origin, mode: Mode) -> Result<Submitted, SwapError> {
        let _one_at_a_time = lock(&self.swapping);
        let mut record = self.history.begin(sha256_hex(bytes), origin, mode);
        let reducer = match self.validate(bytes, &mut record) {
            Ok(r) => r,
            Err(e) => {
                self.history
                    .end(record.id, Outcome::Rejected, Some(e.to_string()));
                return Err(e);
            }
        };
        let active = Arc::new(Active::new(reducer, origin));
        match mode {
            Mode::Forward => {
                self.supersede_replay(record.id);
                self.apply(record.id, |done| Command::Activate {
                    swap: record.id,
                    active,
                    done,
                })
            }
            Mode::Replay | Mode::Preview => self.start_replay(record.id, active, mode),
        }
    }

    /// Goes back to the previous reducer: a replay with it (no recompile), so that
    /// every answer is the previous reducer's again, not only those of entities that
    /// get events later. The current answers keep serving until it flips. A running
    /// replay is superseded. Returns at once, like a replay.
    ///
    /// # Errors
    /// [`SwapError::NoPrevious`] when there is none.
    pub fn rollback(&self) -> Result<Submitted, SwapError> {
        let _one_at_a_time = lock(&self.swapping);
        let previous = self.read().previous.clone().ok_or(SwapError::NoPrevious)?;
        let record =
            self.history
                .begin(previous.sha256().to_owned(), Origin::Rollback, Mode::Replay);
        self.history.update(record.id, |r| r.from_cache = true);
        self.supersede_replay(record.id);
        let back = Arc::new(Active::new(previous.reducer.clone(), Origin::Rollback));
        self.start_replay(record.id, back, Mode::Replay)
    }

    /// Cancels a running replay; `false` when none runs.
    pub fn cancel_replay(&self) -> bool {
        lock(&self.replay)
            .as_ref()
            .is_some_and(|r| r.stop(Phase::Cancelled, None))
    }

    /// Everything `GET /admin/reducer` shows; `active.answers` says how many of the
    /// visible answers the active reducer rendered.
    pub fn describe(&self) -> serde_json::Value {
        // The history first, then the reducers, then the replay: a handover installs
        // the reducer, then marks its entry active and the phase done. Read in this
        // order, a response whose history says a swap is active also shows its
        // reducer active and its replay done (read the other way round, CI once saw
        // the entry active beside the reducer before it).
        let history = self.history.newest_first();
        let (current, id, previous) = {
            let p = self.read();
            (
                p.current.info(),
                p.current.id,
                p.previous.as_ref().map(|p| p.info()),
            )
        };
        let answers = self.store.answers(id);
        let mut active = serde_json::json!(current);
        active["answers"] = serde_json::json!({
            "total": answers.total,
            "by_active": answers.by_it,
            "by_earlier_reducers": answers.total - answers.by_it,
            "share_by_active": if answers.total == 0 {
                1.0
            } else {
                answers.by_it as f64 / answers.total as f64
            },
        });
        serde_json::json!({
            "active": active,
            "previous": previous,
            "history": history,
            "replay": lock(&self.replay).as_ref().map(|r| r.progress()),
        })
    }

    /// Compile, world check, canary: everything that must pass before anything changes.
    fn validate(&self, bytes: &[u8], record: &mut SwapRecord) -> Result<Reducer, SwapError> {
        let start = Instant::now();
        let reducer = self.runtime.load(bytes).map_err(|e| match e {
            ReducerError::NotWasm => SwapError::NotWasm(e),
            other => SwapError::Invalid(other),
        })?;
        let compile_ms = millis(start.elapsed());
        let from_cache = reducer.meta().from_cache;
        let start = Instant::now();
        let recent = lock(&self.recent).to_vec();
        canary(&reducer, &recent).map_err(SwapError::Canary)?;
        let canary_ms = millis(start.elapsed());
        if let Some(r) = self.history.update(record.id, |r| {
            r.compile_ms = compile_ms;
            r.from_cache = from_cache;
            r.canary_ms = canary_ms;
        }) {
            *record = r;
        }
        Ok(reducer)
    }

    /// Sends the command `make` builds to the loop and waits for its answer.
    fn apply(
        &self,
        id: u64,
        make: impl FnOnce(command::Reply) -> Command,
    ) -> Result<Submitted, SwapError> {
        self.history.update(id, |r| r.outcome = Outcome::Queued);
        let (done, answer) = mpsc::sync_channel(1);
        let answer = match self.commands.send(make(done)) {
            Ok(()) => answer.recv().unwrap_or(Err(SwapError::Stopped)),
            Err(_) => Err(SwapError::Stopped),
        };
        match answer {
            Ok(switched) => {
                let swap = self
                    .history
                    .activated(id, |r| {
                        r.switch_offsets = Some(switched.offsets);
                        r.stale_answers = Some(switched.stale_answers);
                    })
                    .ok_or(SwapError::Stopped)?;
                Ok(Submitted {
                    swap,
                    active: switched.active,
                })
            }
            Err(e) => {
                self.history.end(id, Outcome::Rejected, Some(e.to_string()));
                Err(e)
            }
        }
    }

    fn start_replay(
        &self,
        id: u64,
        active: Arc<Active>,
        mode: Mode,
    ) -> Result<Submitted, SwapError> {
        let mut slot = lock(&self.replay);
        if let Some(r) = slot.as_ref().filter(|r| r.running()) {
            let msg = format!(
                "a replay of {} (swap #{}) is in progress; cancel it first",
                r.sha256(),
                r.swap()
            );
            self.history.end(id, Outcome::Rejected, Some(msg.clone()));
            return Err(SwapError::Busy(msg));
        }
        let commands = self.commands.clone();
        let swap = self
            .history
            .update(id, |r| r.outcome = Outcome::Replaying)
            .ok_or(SwapError::Stopped)?;
        *slot = Some(Replay::start(
            self.setup.clone(),
            active,
            id,
            mode == Mode::Preview,
            self.history.clone(),
            self.pause.clone(),
            move |tail| {
                commands
                    .send(Command::Handover(Box::new(tail)))
                    .map_err(|_| "the consumer loop has stopped".to_string())
            },
        ));
        Ok(Submitted {
            swap,
            active: self.current().info(),
        })
    }

    /// A later swap or rollback overtakes a running replay: it will not flip.
    fn supersede_replay(&self, by: u64) {
        if let Some(r) = lock(&self.replay).as_ref() {
            r.stop(Phase::Superseded, Some(format!("superseded by swap #{by}")));
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Published> {
        self.published.read().unwrap_or_else(|e| e.into_inner())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
