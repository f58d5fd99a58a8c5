//! The consumer loop: broker -> fold -> state, on a thread of its own. Fifth layer.
//!
//! The one writer: only this loop replaces the store and the active reducer. Forward
//! swaps, rollbacks, file-watch swaps and replay handovers arrive as
//! [`Command`]s and are applied between two batches, in the order they arrive;
//! nothing calls into the loop.
//!
//! Each batch is one [`Stepper::step`] (poll -> fold -> apply -> advance), the same
//! code a replay steps with: a large batch is folded on other threads (in lanes, see
//! [`crate::fold::lanes`]) while this one polls the next, so taking records out of
//! librdkafka overlaps folding; the records stay in librdkafka's buffers until they
//! are framed for the reducer. The state still moves one whole batch at a time.
//!
//! Ordering assumption: none. The reducer's fold gives the same state whatever order
//! events arrive in and however often, so partitions are interleaved freely and a
//! record applied twice (after a retry, or at a replay handover) changes nothing.
//!
//! - [`dead_letter`]: refused records to the dead-letter topics;
//! - [`progress`]: readiness and lag;
//! - [`snapshots`]: writing and restoring snapshots.

pub mod dead_letter;
pub mod progress;
pub mod snapshots;
mod watch;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use logq_abi::Source;

use crate::broker::consumer::{POLL_WAIT, REQUEST_TIMEOUT, TopicConsumer, Watermarks};
use crate::broker::{KafkaError, Partition, Positions, Record, Topics};
use crate::config::RunConfig;
use crate::fold::DeadLetter;
use crate::metrics::Metrics;
use crate::reducers::{Active, Command, Registry, Switched};
use crate::state::StateStore;
use crate::state::snapshot::Snapshot;
use crate::step::{Ahead, Observer, Step, Stepper};
use dead_letter::DeadLetters;
use progress::CatchUp;
use snapshots::SnapshotWriter;

/// How often freed memory is handed back to the OS while following the topics.
const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Why the consumer loop could not run at all. Problems with records never end it.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The Kafka clients could not be created.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

/// `positions`, held back where a dead letter is not acknowledged yet: what may be
/// committed or snapshotted (reading from there again is harmless: the fold is
/// idempotent, and the dead letter is sent again).
fn safe(dlq: &DeadLetters, positions: &Positions) -> Positions {
    positions
        .iter()
        .map(|(&p, &next)| (p, dlq.safe(p, next)))
        .collect()
}

/// What the live loop does with a step's refusals and records: dead-letters the
/// refused ones, and leaves the batch's tail for the next candidate's canary.
struct Live<'a> {
    dlq: &'a mut DeadLetters,
    registry: &'a Registry,
}

impl Observer for Live<'_> {
    fn refused(&mut self, source: Source, record: &Record<'_>, why: &DeadLetter, applied: u64) {
        self.dlq.send(source, record, why, applied);
    }

    fn folded(&mut self, batch: &[logq_abi::Record<'_>]) {
        // The canary of the next candidate folds the newest records, so every batch
        // leaves its tail (at most 256 records: a small share of a catch-up batch).
        self.registry.remember(batch);
    }
}

/// Starts reading partitions the watcher found, from their beginning.
fn follow_new_partitions(
    consumer: &TopicConsumer,
    added: Vec<Partition>,
    positions: &mut Positions,
) {
    match consumer.add(&added) {
        Ok(()) => {
            for p in added {
                tracing::info!(
                    "{}/{} was added to its topic: folding it from its beginning",
                    consumer.topics().name(p.source),
                    p.id
                );
                positions.insert(p, 0);
            }
        }
        Err(e) => tracing::warn!("following new partitions {added:?}: {e}"),
    }
}

/// Stores (for the next commit) every partition's safe progress that moved. Runs
/// every loop iteration, so it allocates nothing.
fn store_safe_progress(
    consumer: &TopicConsumer,
    dlq: &DeadLetters,
    positions: &Positions,
    stored: &mut BTreeMap<Partition, i64>,
) {
    for (&p, &next) in positions {
        let next = dlq.safe(p, next);
        if stored.get(&p).is_some_and(|s| *s >= next) {
            continue;
        }
        match consumer.store_progress(p, next) {
            Ok(()) => {
                stored.insert(p, next);
            }
            Err(e) => tracing::debug!("storing progress of {p}: {e}"),
        }
    }
}

/// The reducer the loop folds with, and the one before it (for rollback). Owned by
/// the loop; the registry gets a published copy.
struct Slots {
    current: Arc<Active>,
    previous: Option<Arc<Active>>,
}

impl Slots {
    fn install(&mut self, active: Arc<Active>) {
        self.previous = Some(std::mem::replace(&mut self.current, active));
    }
}

/// Everything the consumer loop owns or shares.
pub struct Consumer {
    config: RunConfig,
    topics: Topics,
    registry: Arc<Registry>,
    store: Arc<StateStore>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    commands: Receiver<Command>,
    slots: Slots,
}

impl Consumer {
    /// Prepares the loop, starting with the registry's current reducer; nothing runs
    /// until [`Consumer::run`].
    pub fn new(
        config: RunConfig,
        registry: Arc<Registry>,
        store: Arc<StateStore>,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
        commands: Receiver<Command>,
    ) -> Self {
        let topics = Topics::from(&config);
        let current = registry.current();
        store.set_renderer(current.id);
        Self {
            slots: Slots {
                current,
                previous: None,
            },
            config,
            topics,
            registry,
            store,
            metrics,
            stop,
            commands,
        }
    }

    /// The client [`Consumer::run`] reads with, made from `config`. Made before the
    /// loop starts, so that bad client settings (an unknown `-X KEY=VALUE`) end the
    /// process at once with librdkafka's words, and kept for the loop: making a
    /// client only to check the settings and dropping it cost every start-up 0.1 s
    /// (librdkafka's teardown).
    ///
    /// # Errors
    /// When librdkafka refuses the settings.
    pub fn client(config: &RunConfig) -> Result<TopicConsumer, KafkaError> {
        TopicConsumer::new(&config.kafka, &config.group_id, Topics::from(config))
    }

    /// Runs until the stop flag is set: waits for the broker and the topics, reads
    /// them with `consumer` (made from this loop's settings, see
    /// [`Consumer::client`]) from a snapshot's offsets or the earliest, then follows
    /// them.
    ///
    /// # Errors
    /// Only when the Kafka clients cannot be created (bad settings).
    pub fn run(mut self, consumer: TopicConsumer) -> Result<(), ConsumerError> {
        let Some(targets) = self.discover(&consumer) else {
            return Ok(());
        };
        let partitions: Vec<Partition> = targets.keys().copied().collect();
        // Below these, an earlier run dead-lettered what it refused (commits never
        // pass an unacknowledged dead letter): not sent again.
        let mut committed = consumer
            .committed(&partitions, REQUEST_TIMEOUT)
            .unwrap_or_else(|e| {
                tracing::warn!(
                    "committed offsets unknown ({e}): refused records may be dead-lettered again"
                );
                BTreeMap::new()
            });
        // A commit beyond the log belongs to an earlier topic of the same name.
        committed.retain(|p, at| {
            let fits = targets.get(p).is_some_and(|w| *at <= w.high);
            if !fits {
                tracing::warn!(
                    "committed offset {at} of {p} is beyond the log (topic recreated?); ignored"
                );
            }
            fits
        });
        let mut stored = committed.clone();
        let mut dlq = DeadLetters::new(
            &self.config,
            self.topics.clone(),
            self.metrics.clone(),
            committed,
        )?;
        let mut positions: Positions = targets.iter().map(|(p, w)| (*p, w.low)).collect();
        if let Some(dir) = &self.config.state_dir
            && let Some(restored) = snapshots::restore(
                dir,
                self.slots.current.sha256(),
                self.slots.current.id,
                &self.topics.names(),
                &targets,
                &self.store,
            )
        {
            positions = restored;
        }
        let mut catch_up = CatchUp::new(
            self.metrics.clone(),
            self.topics.clone(),
            &targets,
            &positions,
        );
        let assigned: Vec<(Partition, Option<i64>)> = targets
            .iter()
            .map(|(p, w)| (*p, Some(positions[p]).filter(|at| *at > w.low)))
            .collect();
        consumer.assign(&assigned)?;
        self.store.publish_position(&positions);
        let snapshots = self
            .config
            .state_dir
            .clone()
            .map(|dir| SnapshotWriter::start(dir, self.metrics.clone()));
        let snapshot_every = Duration::from_secs(self.config.snapshot_interval_secs.max(1));
        let mut next_snapshot = Instant::now() + snapshot_every;
        let mut changed = false;
        let mut next_trim = Instant::now() + TRIM_EVERY;
        let broker_news = watch::start(
            &self.config.kafka,
            &self.config.group_id,
            self.topics.clone(),
            positions.keys().copied().collect(),
            self.stop.clone(),
        );

        let mut stepper = Stepper::new(
            &consumer,
            self.config.batch_max_records,
            self.config.batch_bytes(),
            Duration::from_millis(self.config.limits.reducer_time_limit_ms),
            self.config.lanes(),
            Ahead::Poll,
        );
        while !self.stop.load(Ordering::Relaxed) {
            self.serve_commands(&positions);
            let mut live = Live {
                dlq: &mut dlq,
                registry: &self.registry,
            };
            let reducer = &self.slots.current.reducer;
            match stepper.step(reducer, &*self.store, POLL_WAIT, &mut live) {
                Ok(Some(step)) => {
                    changed = true;
                    self.count(&step);
                    step.advance(&mut positions);
                    for (&p, a) in &step.advanced {
                        catch_up.advanced(p, a.next);
                    }
                    catch_up.applied(step.applied());
                    self.store.publish_position(&positions);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("{e}");
                    if !self.metrics.status().0 {
                        self.metrics
                            .set_status(false, format!("catching up; last broker error: {e}"));
                    }
                }
            }
            dlq.poll();
            // Between two batches the state is exactly at `positions`.
            self.store.serve_exports(&positions);
            store_safe_progress(&consumer, &dlq, &positions, &mut stored);
            if let Some(tx) = &snapshots
                && changed
                && Instant::now() >= next_snapshot
            {
                // Full: the writer is still busy with the last one; try next round.
                if tx.offer(self.snapshot(&safe(&dlq, &positions))) {
                    changed = false;
                }
                next_snapshot = Instant::now() + snapshot_every;
            }
            if Instant::now() >= next_trim {
                crate::memory::trim();
                next_trim = Instant::now() + TRIM_EVERY;
            }
            while let Ok(news) = broker_news.try_recv() {
                match news {
                    watch::News::Highs(highs) => {
                        for (p, high) in highs {
                            if let Some(next) = positions.get(&p) {
                                let topic = self.topics.name(p.source);
                                self.metrics.set_lag(topic, p.id, high - next);
                            }
                        }
                    }
                    watch::News::Added(added) => {
                        follow_new_partitions(&consumer, added, &mut positions);
                    }
                }
            }
        }
        if let Err(e) = dlq.flush(REQUEST_TIMEOUT) {
            tracing::error!("dead letters not flushed before exit: {e}");
        }
        store_safe_progress(&consumer, &dlq, &positions, &mut stored);
        if let Err(e) = consumer.commit(&stored) {
            tracing::warn!("committing progress before exit: {e}");
        }
        if let Some(writer) = snapshots {
            // One last snapshot, so the next start has nothing to replay; written
            // before the process may exit (a large state takes a while).
            writer.finish(self.snapshot(&safe(&dlq, &positions)));
        }
        Ok(())
    }

    /// Applies every command that has arrived, in order.
    fn serve_commands(&mut self, positions: &Positions) {
        while let Ok(command) = self.commands.try_recv() {
            self.apply(command, positions);
        }
    }

    /// The one place the active reducer and the store are replaced. (A rollback is a
    /// replay of the previous reducer, so it arrives as a handover.)
    fn apply(&mut self, command: Command, positions: &Positions) {
        match command {
            Command::Activate { swap, active, done } => {
                let offsets = self.topics.named(positions);
                tracing::info!(
                    "swap #{swap}: folding with reducer {} from offsets {offsets:?}",
                    active.sha256()
                );
                self.store.set_renderer(active.id);
                self.slots.install(active);
                self.publish();
                // Every answer there is was rendered by an earlier reducer.
                let stale_answers = self.store.answers(self.slots.current.id).total;
                let _ = done.send(Ok(Switched {
                    active: self.slots.current.info(),
                    offsets,
                    stale_answers,
                }));
            }
            Command::Handover(tail) => {
                let (store, slots, registry) = (&self.store, &mut self.slots, &self.registry);
                // Both flips are atomic for readers; no batch runs in between.
                tail.finish(positions, store, |shadow, active| {
                    store.replace(shadow);
                    slots.install(active);
                    registry.publish(&slots.current, slots.previous.as_ref());
                });
            }
        }
    }

    fn publish(&self) {
        self.registry
            .publish(&self.slots.current, self.slots.previous.as_ref());
    }

    /// The current state, its offsets and reducer, for a snapshot.
    fn snapshot(&self, positions: &Positions) -> Snapshot {
        Snapshot {
            reducer_sha256: self.slots.current.sha256().to_owned(),
            topics: self.topics.names().map(str::to_owned).to_vec(),
            offsets: positions.clone(),
            entities: self.store.dump(self.slots.current.id),
        }
    }

    /// Waits for the broker and both topics; returns every partition with the
    /// watermarks seen now, which define "caught up". Commands are served meanwhile.
    /// `None` when stopped first.
    fn discover(&mut self, consumer: &TopicConsumer) -> Option<BTreeMap<Partition, Watermarks>> {
        let mut delay = Duration::from_millis(200);
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            match consumer.targets(REQUEST_TIMEOUT) {
                Ok(targets) => {
                    for (p, w) in &targets {
                        self.metrics
                            .set_lag(self.topics.name(p.source), p.id, w.high - w.low);
                    }
                    return Some(targets);
                }
                Err(e) => {
                    let brokers = &self.config.kafka.brokers;
                    tracing::warn!("waiting for the broker at {brokers}: {e}");
                    self.metrics
                        .set_status(false, format!("waiting for the broker at {brokers}: {e}"));
                    self.serve_commands(&Positions::new());
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Counts what a step did in the metrics.
    fn count(&self, step: &Step) {
        if let Some(lanes) = step.lanes
            && lanes.refolded > 0
        {
            self.metrics.lanes_refolded(lanes.refolded as u64);
        }
        if step.elapsed > Duration::ZERO {
            self.metrics.reducer_call(step.elapsed);
        }
        for _ in 0..step.failures {
            self.metrics.reducer_failed();
        }
        for source in Source::ALL {
            let (counters, counts) = (self.metrics.topic(source), step.counts.get(source));
            counters
                .consumed
                .fetch_add(counts.consumed, Ordering::Relaxed);
            counters
                .applied
                .fetch_add(counts.applied, Ordering::Relaxed);
            counters
                .tombstones
                .fetch_add(counts.tombstones, Ordering::Relaxed);
        }
    }
}
