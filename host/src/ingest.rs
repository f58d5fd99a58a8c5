//! The ingest loop: broker -> reducer -> state, on a thread of its own.
//!
//! Ordering assumption: none. The reducer's fold gives the same state whatever order
//! events arrive in and however often, so partitions are interleaved freely and a
//! record applied twice (after a retry, or at a replay handover) changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::config::RunConfig;
use crate::kafka::consumer::TopicConsumer;
use crate::kafka::producer::RecordProducer;
use crate::kafka::{KafkaError, Record};
use crate::metrics::Metrics;
use crate::replay::{Control, PartitionId, Positions};
use crate::runtime::{Input, Reducer, Source};
use crate::snapshot::Snapshot;
use crate::state::StateStore;
use crate::swap::{Active, Reducers};

/// How long one poll waits before the loop looks at the stop flag again.
pub(crate) const POLL_WAIT: Duration = Duration::from_millis(100);
/// How often consumer lag is refreshed from the broker's watermarks.
const LAG_EVERY: Duration = Duration::from_secs(2);
/// How often freed memory is handed back to the OS while following the topics.
const TRIM_EVERY: Duration = Duration::from_secs(30);
/// Longest wait for one broker request.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the ingest loop could not run at all. Problems with records never end it.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The Kafka clients could not be created.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

/// Everything the ingest loop owns or shares.
pub struct Ingest {
    config: RunConfig,
    reducers: Arc<Reducers>,
    store: Arc<StateStore>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    control: Receiver<Control>,
}

/// A record the reducer would not fold, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadLetter {
    /// Index of the record in the batch.
    pub input: usize,
    /// Why, in words.
    pub reason: String,
    /// Positions of the refused events inside the record, comma-separated.
    pub events: String,
}

/// What folding one batch did.
#[derive(Debug, Default)]
pub(crate) struct Folding {
    /// Events applied, per input.
    pub accepted: Vec<u64>,
    /// Records (wholly or partly) refused.
    pub dead: Vec<DeadLetter>,
    /// Reducer calls that failed as a whole (trap, limit, refusal).
    pub failures: u64,
    /// Time spent in successful reducer calls.
    pub elapsed: Duration,
}

/// Folds `inputs` into `store` with `reducer`. A batch the reducer cannot fold is
/// split into single records, so one poison record costs only itself.
pub(crate) fn fold_into(reducer: &Reducer, store: &StateStore, inputs: &[Input]) -> Folding {
    let mut out = Folding {
        accepted: vec![0; inputs.len()],
        ..Folding::default()
    };
    fold_range(reducer, store, inputs, 0, &mut out);
    out
}

fn fold_range(
    reducer: &Reducer,
    store: &StateStore,
    inputs: &[Input],
    base: usize,
    out: &mut Folding,
) {
    if inputs.is_empty() {
        return;
    }
    match reducer.fold(inputs, |entities, out| store.prior(entities, out)) {
        Ok(folded) => {
            out.elapsed += folded.elapsed;
            store.apply(&folded.plan.entities, folded.updates);
            for (i, n) in folded.plan.accepted.iter().enumerate() {
                out.accepted[base + i] = u64::from(*n);
            }
            let mut reasons: BTreeMap<u32, Vec<(Option<u32>, String)>> = BTreeMap::new();
            for r in folded.plan.rejections {
                reasons
                    .entry(r.input)
                    .or_default()
                    .push((r.event, r.reason));
            }
            for (input, list) in reasons {
                let events: Vec<String> = list
                    .iter()
                    .filter_map(|(e, _)| e.map(|e| e.to_string()))
                    .collect();
                let reason: Vec<&str> = list.iter().map(|(_, r)| r.as_str()).collect();
                out.dead.push(DeadLetter {
                    input: base + input as usize,
                    reason: reason.join("; "),
                    events: events.join(","),
                });
            }
        }
        Err(e) => {
            out.failures += 1;
            if inputs.len() == 1 {
                out.dead.push(DeadLetter {
                    input: base,
                    reason: e.to_string(),
                    events: String::new(),
                });
            } else {
                tracing::warn!(
                    "reducer failed on a batch of {} records ({e}); folding them one by one",
                    inputs.len()
                );
                for (i, input) in inputs.iter().enumerate() {
                    fold_range(reducer, store, std::slice::from_ref(input), base + i, out);
                }
            }
        }
    }
}

/// Every partition of the configured topics with its watermarks now.
///
/// # Errors
/// When the broker cannot be reached or a topic does not exist.
pub(crate) fn partition_targets(
    consumer: &TopicConsumer,
    config: &RunConfig,
) -> Result<BTreeMap<PartitionId, (i64, i64)>, KafkaError> {
    let mut targets = BTreeMap::new();
    for (t, topic) in config.topics().into_iter().enumerate() {
        for p in consumer.partitions(topic, REQUEST_TIMEOUT)? {
            let w = consumer.watermarks(topic, p, REQUEST_TIMEOUT)?;
            targets.insert((t, p), (w.low, w.high));
        }
    }
    Ok(targets)
}

/// The records of a batch that come from the configured topics, each with its topic
/// index and as a reducer input (same order in all three).
pub(crate) struct Inputs<'r, 'a> {
    /// Topic index (0 users, 1 organizations) of each record.
    pub topics: Vec<usize>,
    /// The records themselves.
    pub records: Vec<&'r Record<'a>>,
    /// What the reducer folds.
    pub inputs: Vec<Input>,
}

/// Turns the records of a batch into reducer inputs.
pub(crate) fn inputs_of<'r, 'a>(config: &RunConfig, records: &'r [Record<'a>]) -> Inputs<'r, 'a> {
    let mut out = Inputs {
        topics: Vec::with_capacity(records.len()),
        records: Vec::with_capacity(records.len()),
        inputs: Vec::with_capacity(records.len()),
    };
    for r in records {
        let Some(t) = config.topics().iter().position(|t| *t == r.topic) else {
            // Only assigned topics are delivered; a stranger is a client bug.
            tracing::error!("record from unexpected topic {} ignored", r.topic);
            continue;
        };
        let source = if t == 0 {
            Source::Users
        } else {
            Source::Organizations
        };
        out.topics.push(t);
        out.records.push(r);
        out.inputs.push(Input {
            source,
            value: r.value.unwrap_or_default().to_vec(),
        });
    }
    out
}

/// Writes snapshots on a thread of its own, so the ingest loop never waits on disk.
pub(crate) struct SnapshotWriter {
    tx: std::sync::mpsc::SyncSender<Snapshot>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SnapshotWriter {
    pub(crate) fn start(dir: std::path::PathBuf) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Snapshot>(1);
        let spawned = std::thread::Builder::new()
            .name("logq-snapshot".into())
            .spawn(move || {
                for snap in rx {
                    let stamp = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis())
                        .unwrap_or_default();
                    let n = snap.entities.len();
                    match crate::snapshot::write(&dir, &snap, stamp) {
                        Ok(path) => {
                            tracing::info!("snapshot {} written ({n} entities)", path.display())
                        }
                        Err(e) => tracing::error!("snapshot in {} failed: {e}", dir.display()),
                    }
                }
            });
        let thread = spawned
            .map_err(|e| tracing::error!("snapshots disabled: {e}"))
            .ok();
        Self { tx, thread }
    }

    /// Hands a snapshot over unless the writer is still busy with the last one.
    pub(crate) fn offer(&self, snapshot: Snapshot) -> bool {
        self.tx.try_send(snapshot).is_ok()
    }

    /// Writes `last` and waits until it is on disk: the process may exit right after.
    pub(crate) fn finish(self, last: Snapshot) {
        let Self { tx, thread } = self;
        let _ = tx.send(last);
        drop(tx);
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!("the snapshot writer panicked");
        }
    }
}

/// `topic/partition` -> offset, for people.
pub(crate) fn named(config: &RunConfig, positions: &Positions) -> BTreeMap<String, i64> {
    positions
        .iter()
        .map(|(&(t, p), &o)| (format!("{}/{p}", config.topics()[t]), o))
        .collect()
}

impl Ingest {
    /// Prepares the loop; nothing runs until [`Ingest::run`].
    pub fn new(
        config: RunConfig,
        reducers: Arc<Reducers>,
        store: Arc<StateStore>,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
        control: Receiver<Control>,
    ) -> Self {
        Self {
            config,
            reducers,
            store,
            metrics,
            stop,
            control,
        }
    }

    /// Runs until the stop flag is set: waits for the broker and the topics, replays
    /// them from the earliest offsets, then follows them.
    ///
    /// # Errors
    /// Only when the Kafka clients cannot be created (bad settings).
    pub fn run(self) -> Result<(), IngestError> {
        let consumer = TopicConsumer::new(&self.config.kafka, &self.config.group_id)?;
        let dlq = RecordProducer::new(&self.config.kafka)?;
        let Some(targets) = self.discover(&consumer) else {
            return Ok(());
        };
        let mut positions: Positions = targets.iter().map(|(p, (low, _))| (*p, *low)).collect();
        if let Some(restored) = self.restore(&targets) {
            positions = restored;
        }
        let mut pending: HashMap<PartitionId, i64> = targets
            .iter()
            .filter(|(p, (_, high))| *high > positions[*p])
            .map(|(p, (_, high))| (*p, *high))
            .collect();
        let assigned: Vec<(String, i32, Option<i64>)> = targets
            .iter()
            .map(|(&(t, p), &(low, _))| {
                let at = positions[&(t, p)];
                (
                    self.config.topics()[t].to_string(),
                    p,
                    (at > low).then_some(at),
                )
            })
            .collect();
        consumer.assign(&assigned)?;
        let snapshots = self.config.state_dir.clone().map(SnapshotWriter::start);
        let snapshot_every = Duration::from_secs(self.config.snapshot_interval_secs.max(1));
        let mut next_snapshot = Instant::now() + snapshot_every;
        let mut changed = false;
        let started = Instant::now();
        let mut applied_since_start = 0u64;
        self.report_catch_up(&pending, started, applied_since_start);
        let mut next_lag = Instant::now();
        let mut next_trim = Instant::now() + TRIM_EVERY;
        let mut last_used: Option<Arc<Active>> = None;

        while !self.stop.load(Ordering::Relaxed) {
            self.serve_control(&positions);
            let polled = consumer.poll_batch(
                self.config.batch_max_records,
                self.config.batch_max_bytes,
                POLL_WAIT,
                |records| {
                    // Read once the batch is formed, not before the poll: a record that
                    // arrives after a swap is visible is folded by the new reducer.
                    let active = self.reducers.current();
                    if !last_used.as_ref().is_some_and(|l| Arc::ptr_eq(l, &active)) {
                        // The first batch this reducer folds: the switch point.
                        let at = named(&self.config, &positions);
                        tracing::info!(
                            "folding with reducer {} from offsets {at:?}",
                            active.reducer.meta().sha256
                        );
                        self.reducers.note_switch(&active.reducer.meta().sha256, at);
                        last_used = Some(active.clone());
                    }
                    self.process(&active.reducer, records, &dlq)
                },
            );
            match polled {
                Ok(Some(progress)) => {
                    changed = true;
                    applied_since_start += progress.values().map(|(_, n)| n).sum::<u64>();
                    for (&(t, p), &(next, _)) in &progress {
                        positions.insert((t, p), next);
                        let topic = self.config.topics()[t];
                        if let Err(e) = consumer.store_progress(topic, p, next) {
                            tracing::debug!("storing progress of {topic}/{p}: {e}");
                        }
                        if pending.get(&(t, p)).is_some_and(|high| next >= *high) {
                            pending.remove(&(t, p));
                        }
                        // Until the next refresh from the broker, the start watermark
                        // is the best estimate of the lag.
                        if let Some((_, high)) = targets.get(&(t, p)) {
                            self.metrics.set_lag(topic, p, high - next);
                        }
                    }
                    if !self.metrics.status().0 {
                        self.report_catch_up(&pending, started, applied_since_start);
                    }
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
            if let Some(tx) = &snapshots
                && changed
                && Instant::now() >= next_snapshot
            {
                // Full: the writer is still busy with the last one; try next round.
                if tx.offer(self.snapshot(&positions)) {
                    changed = false;
                }
                next_snapshot = Instant::now() + snapshot_every;
            }
            if Instant::now() >= next_lag {
                self.refresh_lag(&consumer, &positions);
                self.metrics
                    .set_dlq_delivery_failures(dlq.deliveries().failed.load(Ordering::Relaxed));
                next_lag = Instant::now() + LAG_EVERY;
            }
            if Instant::now() >= next_trim {
                crate::memory::trim();
                next_trim = Instant::now() + TRIM_EVERY;
            }
        }
        if let Err(e) = dlq.flush(REQUEST_TIMEOUT) {
            tracing::error!("dead letters not flushed before exit: {e}");
        }
        if let Some(writer) = snapshots {
            // One last snapshot, so the next start has nothing to replay; written
            // before the process may exit (a large state takes a while).
            writer.finish(self.snapshot(&positions));
        }
        Ok(())
    }

    /// The current state, its offsets and reducer, for a snapshot.
    fn snapshot(&self, positions: &Positions) -> Snapshot {
        Snapshot {
            reducer_sha256: self.reducers.current().reducer.meta().sha256.clone(),
            topics: self.config.topics().map(str::to_owned).to_vec(),
            offsets: positions.iter().map(|(k, v)| (*k, *v)).collect(),
            entities: self.store.dump(),
        }
    }

    /// Loads the newest valid snapshot into the store; returns the positions to read
    /// on from. `None`: no usable snapshot, replay from the earliest offsets.
    fn restore(&self, targets: &BTreeMap<PartitionId, (i64, i64)>) -> Option<Positions> {
        let dir = self.config.state_dir.as_ref()?;
        let sha = self.reducers.current().reducer.meta().sha256.clone();
        let (snap, path) = crate::snapshot::load_newest(dir, &sha, &self.config.topics())?;
        if let Some((p, o)) = snap
            .offsets
            .iter()
            .find(|(p, o)| targets.get(p).is_none_or(|(_, high)| **o > *high))
        {
            tracing::warn!(
                "skipping snapshot {}: offset {o} of partition {p:?} is beyond the log (topic recreated?); replaying from the earliest offsets",
                path.display()
            );
            return None;
        }
        let positions: Positions = targets
            .iter()
            .map(|(p, (low, _))| (*p, snap.offsets.get(p).copied().unwrap_or(*low).max(*low)))
            .collect();
        let n = snap.entities.len();
        self.store.replace(StateStore::from_dump(snap.entities));
        tracing::info!(
            "loaded snapshot {} ({n} entities); reading on from its offsets",
            path.display()
        );
        Some(positions)
    }

    /// A replay asks to take over: tell it where we are, wait (serving reads from the
    /// old state meanwhile) until it hands over its state and reducer, or gives up.
    fn serve_control(&self, positions: &Positions) {
        while let Ok(Control::Handover { live, resume }) = self.control.try_recv() {
            if live.send(positions.clone()).is_err() {
                continue;
            }
            loop {
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                match resume.recv_timeout(POLL_WAIT) {
                    Ok(Some(handover)) => {
                        // Both flips are atomic for readers; no batch runs in between.
                        self.store.replace(handover.store);
                        self.reducers.install(handover.active);
                        self.reducers.finish(handover.swap_id, "active", None);
                        tracing::info!("replay handed over: new state and reducer active");
                        break;
                    }
                    Ok(None) | Err(RecvTimeoutError::Disconnected) => break,
                    Err(RecvTimeoutError::Timeout) => {}
                }
            }
        }
    }

    /// Waits for the broker and both topics; returns every partition with the
    /// watermarks seen now, which define "caught up". `None` when stopped first.
    fn discover(&self, consumer: &TopicConsumer) -> Option<BTreeMap<PartitionId, (i64, i64)>> {
        let mut delay = Duration::from_millis(200);
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            match partition_targets(consumer, &self.config) {
                Ok(targets) => {
                    for (&(t, p), &(low, high)) in &targets {
                        self.metrics.set_lag(self.config.topics()[t], p, high - low);
                    }
                    return Some(targets);
                }
                Err(e) => {
                    tracing::warn!("waiting for the broker: {e}");
                    self.metrics
                        .set_status(false, format!("waiting for the broker: {e}"));
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn report_catch_up(&self, pending: &HashMap<PartitionId, i64>, started: Instant, applied: u64) {
        if pending.is_empty() {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                "caught up: {applied} events folded in {secs:.3} s ({:.0} events/s)",
                applied as f64 / secs.max(1e-9)
            );
            self.metrics.set_status(true, "caught up");
            crate::memory::trim();
        } else {
            self.metrics.set_status(
                false,
                format!("replaying: {} partitions not caught up yet", pending.len()),
            );
        }
    }

    /// Lag = high watermark now - next offset to fold. One broker round trip per
    /// partition; stops at the first failure (the broker is likely down).
    fn refresh_lag(&self, consumer: &TopicConsumer, positions: &Positions) {
        for (&(t, p), &next) in positions {
            let topic = self.config.topics()[t];
            match consumer.watermarks(topic, p, Duration::from_millis(500)) {
                Ok(w) => self.metrics.set_lag(topic, p, w.high - next),
                Err(e) => {
                    tracing::debug!("lag of {topic}/{p}: {e}");
                    return;
                }
            }
        }
    }

    /// Folds one batch, dead-letters what was refused; returns, per partition touched,
    /// the next offset and the number of events applied.
    fn process(
        &self,
        reducer: &Reducer,
        records: &[Record<'_>],
        dlq: &RecordProducer,
    ) -> HashMap<PartitionId, (i64, u64)> {
        let mut progress: HashMap<PartitionId, (i64, u64)> = HashMap::new();
        let Inputs {
            topics,
            records: kept,
            inputs,
        } = inputs_of(&self.config, records);
        for (&t, r) in topics.iter().zip(&kept) {
            self.metrics
                .topic(t)
                .consumed
                .fetch_add(1, Ordering::Relaxed);
            let slot = progress.entry((t, r.partition)).or_insert((0, 0));
            slot.0 = slot.0.max(r.offset + 1);
        }
        let folding = fold_into(reducer, &self.store, &inputs);
        if folding.elapsed > Duration::ZERO {
            self.metrics.reducer_call(folding.elapsed);
        }
        for _ in 0..folding.failures {
            self.metrics.reducer_failed();
        }
        for ((&t, r), accepted) in topics.iter().zip(&kept).zip(&folding.accepted) {
            self.metrics
                .topic(t)
                .applied
                .fetch_add(*accepted, Ordering::Relaxed);
            if let Some(p) = progress.get_mut(&(t, r.partition)) {
                p.1 += accepted;
            }
        }
        for d in &folding.dead {
            let t = topics[d.input];
            self.dead_letter(dlq, t, kept[d.input], d, folding.accepted[d.input]);
        }
        self.reducers.remember(&inputs);
        progress
    }

    fn dead_letter(
        &self,
        dlq: &RecordProducer,
        t: usize,
        record: &Record<'_>,
        d: &DeadLetter,
        applied: u64,
    ) {
        let topic = self.config.topics()[t];
        let dlq_topic = self.config.dlq_topic(topic);
        let reason = d.reason.as_str();
        tracing::warn!(
            topic,
            partition = record.partition,
            offset = record.offset,
            "dead-lettered to {dlq_topic}: {reason}"
        );
        self.metrics
            .topic(t)
            .dead_lettered
            .fetch_add(1, Ordering::Relaxed);
        let (partition, offset, applied) = (
            record.partition.to_string(),
            record.offset.to_string(),
            applied.to_string(),
        );
        let headers = [
            ("logq.reason", reason),
            ("logq.topic", topic),
            ("logq.partition", partition.as_str()),
            ("logq.offset", offset.as_str()),
            ("logq.events.rejected", d.events.as_str()),
            ("logq.events.applied", applied.as_str()),
        ];
        let value = record.value.unwrap_or_default();
        if let Err(e) = dlq.send(&dlq_topic, record.key, value, &headers) {
            self.metrics.dlq_failed();
            tracing::error!(
                topic,
                partition = record.partition,
                offset = record.offset,
                "could not dead-letter to {dlq_topic}: {e}; reason was: {reason}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{Entity, Kind};

    #[test]
    fn the_last_snapshot_is_on_disk_when_finish_returns() {
        let dir = std::env::temp_dir().join(format!("logq-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let view = format!("{{\"id\":\"{}\"}}", "x".repeat(300));
        let snapshot = Snapshot {
            reducer_sha256: "0".repeat(64),
            topics: vec!["users".into(), "organizations".into()],
            offsets: BTreeMap::from([((0, 0), 42)]),
            // Big enough that writing it takes a while.
            entities: (0..50_000)
                .map(|i| {
                    (
                        Entity {
                            kind: Kind::User,
                            key: format!("user-{i}"),
                        },
                        crate::state::test_update(Some(&view), Some("Org")),
                    )
                })
                .collect(),
        };
        SnapshotWriter::start(dir.clone()).finish(snapshot);
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.len() == 1 && names[0].starts_with("snapshot-") && names[0].ends_with(".bin"),
            "{names:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
