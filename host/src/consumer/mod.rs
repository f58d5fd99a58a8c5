//! The consumer loop: broker -> fold -> state, on a thread of its own. Fifth layer.
//!
//! The one writer: only this loop replaces the store and the active reducer. Forward
//! swaps, rollbacks, file-watch swaps and replay handovers arrive as
//! [`Command`]s and are applied between two batches, in the order they arrive;
//! nothing calls into the loop.
//!
//! Stages: a large batch is folded on other threads (in lanes, see
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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use logq_abi::Source;

use crate::broker::consumer::{POLL_WAIT, Polled, REQUEST_TIMEOUT, TopicConsumer, Watermarks};
use crate::broker::{KafkaError, Partition, Positions, Record, Topics};
use crate::config::RunConfig;
use crate::fold::lanes::MIN_RECORDS_PER_LANE;
use crate::fold::{BatchSize, fold_in_lanes};
use crate::metrics::Metrics;
use crate::reducers::{Active, Command, Registry, Switched};
use crate::state::StateStore;
use crate::state::snapshot::Snapshot;
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

/// Which fold lane a record goes to: a hash of its key (the entity's key when the
/// producer keys by it), else of its partition.
fn route(r: &Record<'_>) -> u64 {
    crate::fold::lanes::route(r.key.unwrap_or(&r.partition.to_le_bytes()))
}

/// Stores (for the next commit) every partition's safe progress that moved. Runs
/// every loop iteration, so it allocates nothing.
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
    lanes: usize,
    /// How many records the next poll may take.
    batch_size: std::cell::RefCell<BatchSize>,
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
            lanes: config.lanes(),
            batch_size: std::cell::RefCell::new(BatchSize::new(
                crate::fold::sizing::FIRST_RECORDS,
                config.batch_max_records,
                Duration::from_millis(config.limits.reducer_time_limit_ms),
            )),
            config,
            topics,
            registry,
            store,
            metrics,
            stop,
            commands,
        }
    }

    /// Runs until the stop flag is set: waits for the broker and the topics, reads
    /// them from a snapshot's offsets or the earliest, then follows them.
    ///
    /// # Errors
    /// Only when the Kafka clients cannot be created (bad settings).
    pub fn run(mut self) -> Result<(), ConsumerError> {
        let consumer = TopicConsumer::new(
            &self.config.kafka,
            &self.config.group_id,
            self.topics.clone(),
        )?;
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

        // The batch polled while the one before it was being folded.
        let mut ahead: Option<Result<Polled<'_>, KafkaError>> = None;
        while !self.stop.load(Ordering::Relaxed) {
            self.serve_commands(&positions);
            let (max_records, max_bytes) =
                (self.batch_size.borrow().get(), self.config.batch_bytes());
            let polled = ahead
                .take()
                .unwrap_or_else(|| consumer.poll(max_records, max_bytes, POLL_WAIT));
            let polled = polled.map(|batch| {
                (!batch.is_empty()).then(|| {
                    let (progress, next) = self.process(&batch.records(), &mut dlq, || {
                        consumer.poll(max_records, max_bytes, Duration::ZERO)
                    });
                    ahead = next;
                    progress
                })
            });
            match polled {
                Ok(Some(progress)) => {
                    changed = true;
                    let mut applied = 0;
                    for (&p, &(next, n)) in &progress {
                        applied += n;
                        positions.insert(p, next);
                        catch_up.advanced(p, next);
                    }
                    catch_up.applied(applied);
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
                tail.finish(positions, |shadow, active| {
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
                    tracing::warn!("waiting for the broker: {e}");
                    self.metrics
                        .set_status(false, format!("waiting for the broker: {e}"));
                    self.serve_commands(&Positions::new());
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Folds one batch, dead-letters what was refused; returns, per partition touched,
    /// the next offset and the number of events applied. A batch large enough to share
    /// among lanes is folded on other threads while this one runs `meanwhile` (polls
    /// the next batch), whose result comes back too; a small one is folded here.
    fn process<N>(
        &self,
        records: &[Record<'_>],
        dlq: &mut DeadLetters,
        meanwhile: impl FnOnce() -> N,
    ) -> (HashMap<Partition, (i64, u64)>, Option<N>) {
        let mut progress: HashMap<Partition, (i64, u64)> = HashMap::new();
        let (mut consumed, mut tombstones) = ([0u64; 2], [0u64; 2]);
        let (mut kept, mut batch, mut routes) = (
            Vec::with_capacity(records.len()),
            Vec::with_capacity(records.len()),
            Vec::with_capacity(records.len()),
        );
        for r in records {
            let Some(source) = self.topics.source_of(r.topic) else {
                continue;
            };
            let side = usize::from(source == Source::Organizations);
            consumed[side] += 1;
            // Every record moves its partition on, tombstones too.
            let slot = progress
                .entry(Partition {
                    source,
                    id: r.partition,
                })
                .or_insert((0, 0));
            slot.0 = slot.0.max(r.offset + 1);
            match self.topics.record(r) {
                Some(record) => {
                    routes.push(route(r));
                    kept.push(r);
                    batch.push(record);
                }
                // A compaction tombstone: nothing to fold, nothing wrong.
                None => tombstones[side] += 1,
            }
        }
        let (reducer, store, lanes) = (&self.slots.current.reducer, &*self.store, self.lanes);
        let ((folding, lanes), next) = if batch.len() >= MIN_RECORDS_PER_LANE {
            std::thread::scope(|s| {
                let fold = s.spawn(|| fold_in_lanes(reducer, store, &batch, &routes, lanes));
                let next = meanwhile();
                let folded = fold
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (folded, Some(next))
            })
        } else {
            (fold_in_lanes(reducer, store, &batch, &routes, lanes), None)
        };
        if lanes.refolded > 0 {
            self.metrics.lanes_refolded(lanes.refolded as u64);
        }
        self.batch_size
            .borrow_mut()
            .folded(records.len(), lanes.used, folding.elapsed);
        if folding.elapsed > Duration::ZERO {
            self.metrics.reducer_call(folding.elapsed);
        }
        for _ in 0..folding.failures {
            self.metrics.reducer_failed();
        }
        let mut applied = [0u64; 2];
        for (r, accepted) in batch.iter().zip(&folding.accepted) {
            applied[usize::from(r.source == Source::Organizations)] += accepted;
            if let Some(p) = progress.get_mut(&Partition {
                source: r.source,
                id: r.partition,
            }) {
                p.1 += accepted;
            }
        }
        for (i, source) in Source::ALL.into_iter().enumerate() {
            let counters = self.metrics.topic(source);
            counters.consumed.fetch_add(consumed[i], Ordering::Relaxed);
            counters.applied.fetch_add(applied[i], Ordering::Relaxed);
            counters
                .tombstones
                .fetch_add(tombstones[i], Ordering::Relaxed);
        }
        for d in &folding.dead {
            dlq.send(
                batch[d.input].source,
                kept[d.input],
                d,
                folding.accepted[d.input],
            );
        }
        // The canary of the next candidate folds the newest records, so every batch
        // leaves its tail (at most 256 records: a small share of a catch-up batch).
        self.registry.remember(&batch);
        (progress, next)
    }
}
