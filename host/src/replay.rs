//! Replay mode of a reducer swap: a shadow state is rebuilt from the earliest offsets
//! with the new reducer while the old one keeps serving; when the shadow has caught up,
//! the ingest loop hands over and state and reducer flip together.
//!
//! Handover protocol: the replay asks the ingest loop for its positions (the loop
//! pauses between batches; reads go on from the old state), reads on until it has
//! folded at least that far in every partition, then hands over. Records between the
//! two positions are folded twice into the new state, which the fold's idempotence
//! makes harmless; none is skipped.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::RunConfig;
use crate::ingest::{POLL_WAIT, fold_into, inputs_of, named, partition_targets};
use crate::kafka::consumer::TopicConsumer;
use crate::state::StateStore;
use crate::swap::{Active, Reducers};

/// A partition of one of the two topics: (topic index, partition id).
pub type PartitionId = (usize, i32);
/// Next offset to fold, per partition.
pub type Positions = HashMap<PartitionId, i64>;

/// A message from a replay to the ingest loop.
pub enum Control {
    /// "Tell me your positions on `live`, then wait for `resume`: `Some` to adopt the
    /// new state and reducer, `None` to go on as before."
    Handover {
        /// Where the ingest loop sends its positions.
        live: Sender<Positions>,
        /// Where the replay sends its verdict.
        resume: mpsc::Receiver<Option<Handover>>,
    },
}

/// What a finished replay hands to the ingest loop.
pub struct Handover {
    /// The rebuilt state.
    pub store: StateStore,
    /// The new reducer.
    pub active: Arc<Active>,
    /// The swap this finishes.
    pub swap_id: u64,
}

/// What a replay needs from the running service.
#[derive(Clone)]
pub struct ReplayContext {
    /// The service's configuration (broker, topics, batch sizes).
    pub config: RunConfig,
    /// The channel to the ingest loop.
    pub control: Sender<Control>,
}

/// Progress, as `GET /admin/reducer` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// sha256 of the reducer being replayed.
    pub sha256: String,
    /// `catching_up`, `handing_over`, `done`, `cancelled`, `failed`.
    pub phase: String,
    /// Events folded so far.
    pub events_folded: u64,
    /// Records read so far.
    pub records_read: u64,
    /// Records the new reducer refused (not dead-lettered again; counted here).
    pub records_refused: u64,
    /// Records between the replay and the targets.
    pub lag: i64,
    /// Events per second so far.
    pub events_per_second: f64,
    /// Seconds since the replay started.
    pub elapsed_seconds: f64,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Where the replay stood at handover (`topic/partition` -> offset).
    pub handover_offsets: Option<BTreeMap<String, i64>>,
}

/// A running (or finished) replay.
pub struct Replay {
    sha256: String,
    cancel: AtomicBool,
    running: AtomicBool,
    events: AtomicU64,
    progress: Mutex<Progress>,
    started: Instant,
}

impl Replay {
    /// Starts replaying with `active` on a thread of its own.
    pub fn start(
        ctx: ReplayContext,
        reducers: Arc<Reducers>,
        active: Arc<Active>,
        swap_id: u64,
    ) -> Arc<Self> {
        let sha256 = active.reducer.meta().sha256.clone();
        let replay = Arc::new(Self {
            sha256: sha256.clone(),
            cancel: AtomicBool::new(false),
            running: AtomicBool::new(true),
            events: AtomicU64::new(0),
            progress: Mutex::new(Progress {
                sha256,
                phase: "catching_up".into(),
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
        });
        let me = replay.clone();
        let spawned = std::thread::Builder::new()
            .name("logq-replay".into())
            .spawn(move || {
                let outcome = me.run(&ctx, active, swap_id);
                let (phase, reason) = match outcome {
                    Ok(true) => ("done", None),
                    Ok(false) => ("cancelled", None),
                    Err(e) => ("failed", Some(e)),
                };
                if phase != "done" {
                    reducers.finish(swap_id, phase, reason.clone());
                }
                tracing::info!(
                    "replay {phase}{}",
                    reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
                me.update(|p| {
                    p.phase = phase.into();
                    p.error = reason;
                });
                me.running.store(false, Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            replay.update(|p| {
                p.phase = "failed".into();
                p.error = Some(e.to_string());
            });
            replay.running.store(false, Ordering::Relaxed);
        }
        replay
    }

    /// sha256 of the reducer being replayed.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Whether it is still working.
    pub fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Asks it to stop; the old reducer and state stay.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// A snapshot of its progress.
    pub fn progress(&self) -> Progress {
        let mut p = self
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        p.elapsed_seconds = self.started.elapsed().as_secs_f64();
        p.events_folded = self.events.load(Ordering::Relaxed);
        p.events_per_second = p.events_folded as f64 / p.elapsed_seconds.max(1e-9);
        p
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// `Ok(true)` handed over, `Ok(false)` cancelled.
    fn run(&self, ctx: &ReplayContext, active: Arc<Active>, swap_id: u64) -> Result<bool, String> {
        let config = &ctx.config;
        let consumer = TopicConsumer::new(&config.kafka, &format!("{}-replay", config.group_id))
            .map_err(|e| e.to_string())?;
        let targets = partition_targets(&consumer, config).map_err(|e| e.to_string())?;
        let assigned: Vec<(String, i32, Option<i64>)> = targets
            .keys()
            .map(|(t, p)| (config.topics()[*t].to_string(), *p, None))
            .collect();
        consumer.assign(&assigned).map_err(|e| e.to_string())?;
        let shadow = StateStore::new();
        let mut positions: Positions = targets.iter().map(|(p, (low, _))| (*p, *low)).collect();
        let goal: Positions = targets.iter().map(|(p, (_, high))| (*p, *high)).collect();
        if !self.read_until(&consumer, config, &active, &shadow, &mut positions, &goal)? {
            return Ok(false);
        }

        self.update(|p| p.phase = "handing_over".into());
        let (live_tx, live_rx) = mpsc::channel();
        let (resume_tx, resume_rx) = mpsc::channel();
        ctx.control
            .send(Control::Handover {
                live: live_tx,
                resume: resume_rx,
            })
            .map_err(|_| "the ingest loop has stopped".to_string())?;
        let live = loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Ok(false);
            }
            match live_rx.recv_timeout(POLL_WAIT) {
                Ok(live) => break live,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("the ingest loop went away during handover".into());
                }
            }
        };
        // The ingest loop is paused now; catch up to exactly where it stands.
        let reached = self.read_until(&consumer, config, &active, &shadow, &mut positions, &live);
        match reached {
            Ok(true) => {
                self.update(|p| p.handover_offsets = Some(named(config, &positions)));
                resume_tx
                    .send(Some(Handover {
                        store: shadow,
                        active,
                        swap_id,
                    }))
                    .map_err(|_| "the ingest loop went away during handover".to_string())?;
                Ok(true)
            }
            other => {
                let _ = resume_tx.send(None);
                other
            }
        }
    }

    /// Folds records into `shadow` until every partition reaches `goal`. `Ok(false)`
    /// when cancelled.
    fn read_until(
        &self,
        consumer: &TopicConsumer,
        config: &RunConfig,
        active: &Active,
        shadow: &StateStore,
        positions: &mut Positions,
        goal: &Positions,
    ) -> Result<bool, String> {
        let behind = |positions: &Positions| -> i64 {
            goal.iter()
                .map(|(p, g)| (g - positions.get(p).copied().unwrap_or(0)).max(0))
                .sum()
        };
        let mut last_error = Instant::now();
        while behind(positions) > 0 {
            if self.cancel.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let polled = consumer.poll_batch(
                config.batch_max_records,
                config.batch_max_bytes,
                POLL_WAIT,
                |records| {
                    let batch = inputs_of(config, records);
                    let folding = fold_into(&active.reducer, shadow, &batch.inputs);
                    for (&t, r) in batch.topics.iter().zip(&batch.records) {
                        let next = positions.entry((t, r.partition)).or_insert(0);
                        *next = (*next).max(r.offset + 1);
                    }
                    (
                        records.len() as u64,
                        folding.accepted.iter().sum::<u64>(),
                        folding.dead.len() as u64,
                    )
                },
            );
            match polled {
                Ok(Some((read, folded, refused))) => {
                    self.events.fetch_add(folded, Ordering::Relaxed);
                    let lag = behind(positions);
                    self.update(|p| {
                        p.records_read += read;
                        p.records_refused += refused;
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
