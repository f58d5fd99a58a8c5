//! Replay mode of a swap: a shadow state is rebuilt from the earliest offsets with the
//! new reducer while the old one keeps serving. A replay is built from a broker client,
//! the fold and a shadow store; it knows nothing of the consumer loop.
//!
//! Handover: once the shadow has caught up with the high watermarks seen at its
//! start, the replay thread hands its [`Tail`] (client, shadow, positions) to the
//! consumer loop as a command and ends. The loop, between two batches, calls
//! [`Tail::finish`] with its own positions: the tail reads the few records up to there
//! into the shadow and, unless the replay was cancelled or superseded meanwhile, the
//! loop flips state and reducer together. Records between the replay's and the loop's
//! positions are folded twice into the new state, which the fold's idempotence makes
//! harmless; none is skipped.
//!
//! The phase is kept under one lock. Cancelling, superseding and concluding each take
//! it, so exactly one of them wins, and the history says which.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use logq_abi::Source;
use serde::Serialize;

use super::active::Active;
use super::history::{History, Outcome};
use super::preview::Report;
use crate::broker::Record;
use crate::broker::consumer::{POLL_WAIT, REQUEST_TIMEOUT, TopicConsumer};
use crate::broker::{Partition, Positions, Topics};
use crate::config::KafkaConfig;
use crate::fold::DeadLetter;
use crate::state::Writer;
use crate::state::export::Export;
use crate::state::refused::Refused;
use crate::step::{Ahead, Observer, Stepper};

/// Where a replay stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reading from the earliest offsets into the shadow.
    CatchingUp,
    /// Caught up; waiting for the consumer loop to take the handover.
    HandingOver,
    /// The loop flipped to the new state and reducer.
    Done,
    /// Cancelled (admin request or shutdown).
    Cancelled,
    /// Overtaken by a later swap or rollback.
    Superseded,
    /// Could not finish.
    Failed,
}

impl Phase {
    fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Done | Phase::Cancelled | Phase::Superseded | Phase::Failed
        )
    }
}

/// The points of a handover where a test may hold a replay (see
/// [`super::Registry::with_pause`]); production code never sets a hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The replay thread has caught up and is about to hand over.
    CaughtUp,
    /// The consumer loop has taken the handover, before reading the tail.
    HandoverTaken,
    /// The loop has read the tail, before the flip.
    TailRead,
    /// The loop has flipped (or found the replay overtaken and dropped it, or
    /// handed a preview's comparison to its thread).
    Concluded,
    /// A preview's comparison thread, before it compares (the loop goes on).
    Comparing,
}

/// A test's hook, called at each [`Step`].
pub type PauseHook = Arc<dyn Fn(Step) + Send + Sync>;

/// What a replay needs from the service's configuration.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The broker.
    pub kafka: KafkaConfig,
    /// The replay's client uses `<group_id>-replay`.
    pub group_id: String,
    /// The topics.
    pub topics: Topics,
    /// Most records in one fold (the batches are sized by
    /// [`crate::fold::BatchSize`] within it).
    pub batch_max_records: usize,
    /// Most value bytes in one fold.
    pub batch_max_bytes: usize,
    /// The reducer's time limit, which sizes the batches.
    pub time_limit: Duration,
    /// Tombstone retention in event time, µs (0: never), as the live store has it.
    pub tombstone_retention_micros: i64,
}

/// Progress, as `GET /admin/reducer` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// The swap this replay is.
    pub swap: u64,
    /// sha256 of the reducer being replayed.
    pub sha256: String,
    /// Where it stands.
    pub phase: Phase,
    /// Events folded so far.
    pub events_folded: u64,
    /// Records read so far.
    pub records_read: u64,
    /// Records the new reducer refused (not dead-lettered again; counted here).
    pub records_refused: u64,
    /// Records between the replay and its goal.
    pub lag: i64,
    /// Events per second so far.
    pub events_per_second: f64,
    /// Seconds since the replay started.
    pub elapsed_seconds: f64,
    /// Why it failed or stopped, if it did.
    pub error: Option<String>,
    /// Where the replay stood at handover (`topic/partition` -> offset).
    pub handover_offsets: Option<std::collections::BTreeMap<String, i64>>,
}

/// A running (or finished) replay: its phase, progress and stop flag.
pub struct Replay {
    swap: u64,
    sha256: String,
    /// A preview: compared at the handover, never flipped (see [`super::preview`]).
    preview: bool,
    phase: Mutex<Phase>,
    /// Set together with a final phase; read on the hot path without the lock.
    stop: AtomicBool,
    events: AtomicU64,
    progress: Mutex<Progress>,
    started: Instant,
    /// How long it ran, once it has ended: its time and rate stop there.
    ended: std::sync::OnceLock<std::time::Duration>,
    history: Arc<History>,
    pause: Option<PauseHook>,
}

/// The live side of a preview, frozen by the loop at the handover's position.
struct Frozen {
    /// The live answers there.
    answers: Export,
    /// The records the live reducer refused there.
    refused: Refused,
    /// Where the preview began reading each partition.
    from: Positions,
    /// The position, by topic name.
    offsets: std::collections::BTreeMap<String, i64>,
    topics: Topics,
    /// How long the loop spent on the handover.
    loop_seconds: f64,
}

/// A caught-up replay, handed to the consumer loop to finish.
pub struct Tail {
    replay: Arc<Replay>,
    consumer: TopicConsumer,
    setup: Setup,
    shadow: Writer,
    positions: Positions,
    /// Where it began reading each partition (the log's start then): refusals of
    /// the live state before these are not compared.
    from: Positions,
    active: Arc<Active>,
}

impl Replay {
    /// Starts replaying swap `swap` with `active` on a thread of its own; once caught
    /// up, its [`Tail`] goes to `handover` (which sends it to the consumer loop).
    pub fn start(
        setup: Setup,
        active: Arc<Active>,
        swap: u64,
        preview: bool,
        history: Arc<History>,
        pause: Option<PauseHook>,
        handover: impl FnOnce(Tail) -> Result<(), String> + Send + 'static,
    ) -> Arc<Self> {
        let sha256 = active.sha256().to_owned();
        let replay = Arc::new(Self {
            swap,
            sha256: sha256.clone(),
            preview,
            phase: Mutex::new(Phase::CatchingUp),
            stop: AtomicBool::new(false),
            events: AtomicU64::new(0),
            progress: Mutex::new(Progress {
                swap,
                sha256,
                phase: Phase::CatchingUp,
                events_folded: 0,
                records_read: 0,
                records_refused: 0,
                lag: 0,
                events_per_second: 0.0,
                elapsed_seconds: 0.0,
                error: None,
                handover_offsets: None,
            }),
            started: Instant::now(),
            ended: std::sync::OnceLock::new(),
            history,
            pause,
        });
        let me = replay.clone();
        let spawned = std::thread::Builder::new()
            .name("logq-replay".into())
            .spawn(move || match me.clone().catch_up(setup, active) {
                Ok(Some(tail)) => {
                    if let Err(e) = handover(tail) {
                        me.stop(Phase::Failed, Some(e));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    me.stop(Phase::Failed, Some(e));
                }
            });
        if let Err(e) = spawned {
            replay.stop(Phase::Failed, Some(e.to_string()));
        }
        replay
    }

    /// sha256 of the reducer being replayed.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The swap this replay is.
    pub fn swap(&self) -> u64 {
        self.swap
    }

    /// Whether it has not ended yet (catching up or handing over).
    pub fn running(&self) -> bool {
        !self.phase().is_final()
    }

    /// Where it stands.
    pub fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    /// Ends it with `phase` (cancelled, superseded, failed) unless it has ended
    /// already; records the outcome in the history. `false`: it had ended (a
    /// handover that already flipped stays flipped).
    pub fn stop(&self, phase: Phase, reason: Option<String>) -> bool {
        let outcome = match phase {
            Phase::Cancelled => Outcome::Cancelled,
            Phase::Superseded => Outcome::Superseded,
            _ => Outcome::Failed,
        };
        {
            let mut current = lock(&self.phase);
            if current.is_final() {
                return false;
            }
            // The entry and the error before the phase says so, under its lock (as
            // the handover does): whoever sees the replay ended sees why.
            self.history.end(self.swap, outcome, reason.clone());
            self.update(|p| p.error = reason.clone());
            *current = phase;
            self.stop.store(true, Ordering::Relaxed);
            let _ = self.ended.set(self.started.elapsed());
        }
        tracing::info!(
            "replay of swap #{} {outcome:?}{}",
            self.swap,
            reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        true
    }

    /// A snapshot of its progress.
    pub fn progress(&self) -> Progress {
        let mut p = lock(&self.progress).clone();
        p.phase = self.phase();
        p.elapsed_seconds = self
            .ended
            .get()
            .copied()
            .unwrap_or_else(|| self.started.elapsed())
            .as_secs_f64();
        p.events_folded = self.events.load(Ordering::Relaxed);
        p.events_per_second = p.events_folded as f64 / p.elapsed_seconds.max(1e-9);
        p
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut lock(&self.progress));
    }

    fn pause(&self, step: Step) {
        if let Some(hook) = &self.pause {
            hook(step);
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// A preview's comparison, on its own thread while the consumer loop goes on:
    /// the live answers as `live` froze them against the candidate's `shadow`. The
    /// report goes into the history unless the preview was cancelled or superseded
    /// meanwhile; the shadow and the image are dropped either way.
    fn report(&self, live: Frozen, shadow: Writer) {
        self.pause(Step::Comparing);
        let Frozen {
            mut answers,
            refused,
            from,
            offsets,
            topics,
            loop_seconds,
        } = live;
        let started = Instant::now();
        answers.sort();
        let (users, organizations) = super::preview::compare(&answers, &shadow);
        let dead_letters = super::preview::dead_letters(&refused, &shadow.refused(), &from, |p| {
            format!("{}/{}", topics.name(p.source), p.id)
        });
        let compare_seconds = started.elapsed().as_secs_f64();
        let rss_bytes = crate::memory::resident_bytes();
        let replaced = answers.replaced();
        drop(answers);
        drop(shadow);
        crate::memory::trim();
        if replaced {
            self.stop(
                Phase::Failed,
                Some(
                    "the live state was replaced while the preview compared; preview again".into(),
                ),
            );
            return;
        }
        let report = Report {
            position: offsets,
            users,
            organizations,
            records_refused: lock(&self.progress).records_refused,
            dead_letters,
            seconds: self.started.elapsed().as_secs_f64(),
            rss_bytes,
            compare_seconds,
            loop_seconds,
        };
        // The entry is written before the phase says done, under its lock: a
        // cancel either comes first (no report) or finds the preview ended.
        let mut phase = lock(&self.phase);
        if phase.is_final() {
            return;
        }
        self.history.update(self.swap, |r| {
            r.outcome = Outcome::Previewed;
            r.preview = Some(report);
        });
        *phase = Phase::Done;
        let _ = self.ended.set(self.started.elapsed());
        drop(phase);
        tracing::info!("preview of swap #{} reported", self.swap);
    }

    /// Reads from the earliest offsets to the high watermarks seen now. `Ok(None)`:
    /// stopped on the way.
    fn catch_up(
        self: Arc<Self>,
        setup: Setup,
        active: Arc<Active>,
    ) -> Result<Option<Tail>, String> {
        let group = format!("{}-replay", setup.group_id);
        let consumer = TopicConsumer::new(&setup.kafka, &group, setup.topics.clone())
            .map_err(|e| e.to_string())?;
        let targets = consumer
            .targets(REQUEST_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let assigned: Vec<(Partition, Option<i64>)> = targets.keys().map(|p| (*p, None)).collect();
        consumer.assign(&assigned).map_err(|e| e.to_string())?;
        let shadow = Writer::new_store();
        shadow.set_renderer(active.id);
        shadow.set_retention(setup.tombstone_retention_micros);
        let mut positions: Positions = targets.iter().map(|(p, w)| (*p, w.low)).collect();
        let goal: Positions = targets.iter().map(|(p, w)| (*p, w.high)).collect();
        let mut tail = Tail {
            replay: self.clone(),
            consumer,
            setup,
            shadow,
            positions: Positions::new(),
            from: positions.clone(),
            active,
        };
        if !tail.read_until(&mut positions, &goal)? {
            return Ok(None);
        }
        // Here, on the replay's thread, not at the first listing after the flip.
        tail.shadow.settle_orders();
        tail.positions = positions;
        self.pause(Step::CaughtUp);
        let mut phase = lock(&self.phase);
        if phase.is_final() {
            return Ok(None);
        }
        *phase = Phase::HandingOver;
        Ok(Some(tail))
    }
}

impl Tail {
    /// Finishes the handover on the consumer loop's thread: reads up to `live` (the
    /// loop's positions), drops the replay's client, then calls `flip` with the
    /// shadow state and the new reducer unless the replay has ended meanwhile (a
    /// preview compares the shadow with `store` instead and keeps the report); the
    /// freed memory is given back before the swap is marked done. Returns whether it
    /// flipped.
    pub fn finish(
        mut self,
        live: &Positions,
        store: &Writer,
        flip: impl FnOnce(Writer, Arc<Active>),
    ) -> bool {
        let taken = Instant::now();
        let replay = self.replay.clone();
        replay.pause(Step::HandoverTaken);
        let mut positions = std::mem::take(&mut self.positions);
        // Partitions the loop found after the replay started: read them from the start.
        let added: Vec<Partition> = live
            .keys()
            .filter(|p| !positions.contains_key(p))
            .copied()
            .collect();
        let reached = if added.is_empty() {
            Ok(())
        } else {
            self.consumer.add(&added).map_err(|e| e.to_string())
        }
        .and_then(|()| self.read_until(&mut positions, live));
        replay.pause(Step::TailRead);
        let flipped = match reached {
            Ok(true) => {
                let offsets = self.setup.topics.named(&positions);
                let Tail {
                    shadow,
                    active,
                    consumer,
                    from,
                    setup,
                    ..
                } = self;
                // The replay's client and what it holds go before the flip, so that
                // the memory given back after it (the flip frees the old state) is
                // all a replay took, before the swap is said to be active.
                drop(consumer);
                let mut phase = lock(&replay.phase);
                if phase.is_final() {
                    false
                } else if replay.preview {
                    // A preview freezes the live answers here and compares them with
                    // the shadow on a thread of its own: the loop goes on at once.
                    let frozen = Frozen {
                        answers: store.image(live),
                        refused: store.refused().clone(),
                        from,
                        offsets,
                        topics: setup.topics,
                        loop_seconds: taken.elapsed().as_secs_f64(),
                    };
                    drop(phase);
                    let me = replay.clone();
                    let spawned = std::thread::Builder::new()
                        .name("logq-preview".into())
                        .spawn(move || me.report(frozen, shadow));
                    if let Err(e) = spawned {
                        replay.stop(Phase::Failed, Some(e.to_string()));
                    }
                    false
                } else {
                    flip(shadow, active);
                    // A whole state was just freed (the old one), and the replay's
                    // client before it: give it back now, before the swap is said to
                    // be done, or every swap would leave the process larger.
                    crate::memory::trim();
                    // The entry and the offsets before the phase says done, under its
                    // lock (as a preview's report): whoever sees the replay done sees
                    // its swap active.
                    replay.update(|p| p.handover_offsets = Some(offsets.clone()));
                    replay.history.activated(replay.swap, |r| {
                        r.switch_offsets = Some(offsets);
                    });
                    *phase = Phase::Done;
                    let _ = replay.ended.set(replay.started.elapsed());
                    drop(phase);
                    tracing::info!("replay of swap #{} handed over", replay.swap);
                    true
                }
            }
            Ok(false) => false,
            Err(e) => {
                replay.stop(Phase::Failed, Some(e));
                false
            }
        };
        replay.pause(Step::Concluded);
        flipped
    }

    /// Folds records into the shadow until every partition reaches `goal`, stepping
    /// as the live loop does ([`Stepper`]): every record moves its partition on,
    /// compaction tombstones and refused records too. `Ok(false)` when the replay
    /// was stopped.
    fn read_until(&self, positions: &mut Positions, goal: &Positions) -> Result<bool, String> {
        let replay = &self.replay;
        let behind = |positions: &Positions| -> i64 {
            goal.iter()
                .map(|(p, g)| (g - positions.get(p).copied().unwrap_or(0)).max(0))
                .sum()
        };
        let mut last_error = Instant::now();
        // One lane: the other cores keep serving live ingest and reads. Nothing is
        // polled ahead: the handover goes on from here with another stepper.
        let mut stepper = Stepper::new(
            &self.consumer,
            self.setup.batch_max_records,
            self.setup.batch_max_bytes,
            self.setup.time_limit,
            1,
            Ahead::Never,
        );
        let mut refusals = Refusals {
            shadow: &self.shadow,
        };
        while behind(positions) > 0 {
            if replay.stopped() {
                return Ok(false);
            }
            match stepper.step(&self.active.reducer, &self.shadow, POLL_WAIT, &mut refusals) {
                Ok(Some(step)) => {
                    step.advance(positions);
                    replay.events.fetch_add(step.applied(), Ordering::Relaxed);
                    let lag = behind(positions);
                    replay.update(|p| {
                        p.records_read += step.records as u64;
                        p.records_refused += step.refused();
                        p.lag = lag;
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    if last_error.elapsed() > Duration::from_secs(5) {
                        tracing::warn!("replay: {e}");
                        last_error = Instant::now();
                    }
                }
            }
        }
        Ok(true)
    }
}

/// What a replay does with a refused record: counts it (in the step) and notes it
/// in the shadow, which keeps its refusals as the live state does (for a preview's
/// comparison, and for the previews after a flip). Nothing is dead-lettered.
struct Refusals<'a> {
    shadow: &'a Writer,
}

impl Observer for Refusals<'_> {
    fn refused(&mut self, source: Source, record: &Record<'_>, why: &DeadLetter, _: u64) {
        let at = Partition {
            source,
            id: record.partition,
        };
        self.shadow.refused().insert(at, record.offset, &why.reason);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
