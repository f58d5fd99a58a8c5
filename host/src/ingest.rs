//! The ingest loop: broker -> reducer -> state, on a thread of its own.
//!
//! Ordering assumption: none. The reducer's fold gives the same state whatever order
//! events arrive in and however often, so partitions are interleaved freely and a
//! record applied twice (after a retry) changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::RunConfig;
use crate::kafka::consumer::TopicConsumer;
use crate::kafka::producer::RecordProducer;
use crate::kafka::{KafkaError, Record};
use crate::metrics::Metrics;
use crate::runtime::{Input, Reducer, ReducerError, Source};
use crate::state::StateStore;

/// How long one poll waits before the loop looks at the stop flag again.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// How often consumer lag is refreshed from the broker's watermarks.
const LAG_EVERY: Duration = Duration::from_secs(2);
/// Longest wait for one broker request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
    reducer: Reducer,
    store: Arc<StateStore>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
}

/// A partition of one of the two topics: (topic index, partition id).
type PartitionId = (usize, i32);

impl Ingest {
    /// Prepares the loop; nothing runs until [`Ingest::run`].
    pub fn new(
        config: RunConfig,
        reducer: Reducer,
        store: Arc<StateStore>,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Self {
            config,
            reducer,
            store,
            metrics,
            stop,
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
        let mut pending: HashMap<PartitionId, i64> = targets
            .iter()
            .filter(|(_, (low, high))| high > low)
            .map(|(p, (_, high))| (*p, *high))
            .collect();
        let assigned: Vec<(String, i32)> = targets
            .keys()
            .map(|(t, p)| (self.config.topics()[*t].to_string(), *p))
            .collect();
        consumer.assign_from_beginning(&assigned)?;
        let mut positions: HashMap<PartitionId, i64> =
            targets.iter().map(|(p, (low, _))| (*p, *low)).collect();
        let started = Instant::now();
        let mut applied_since_start = 0u64;
        self.report_catch_up(&pending, started, applied_since_start);
        let mut next_lag = Instant::now();

        while !self.stop.load(Ordering::Relaxed) {
            let polled = consumer.poll_batch(
                self.config.batch_max_records,
                self.config.batch_max_bytes,
                POLL_WAIT,
                |records| self.process(records, &dlq),
            );
            match polled {
                Ok(Some(progress)) => {
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
            if Instant::now() >= next_lag {
                self.refresh_lag(&consumer, &positions);
                self.metrics
                    .set_dlq_delivery_failures(dlq.deliveries().failed.load(Ordering::Relaxed));
                next_lag = Instant::now() + LAG_EVERY;
            }
        }
        if let Err(e) = dlq.flush(REQUEST_TIMEOUT) {
            tracing::error!("dead letters not flushed before exit: {e}");
        }
        Ok(())
    }

    /// Waits for the broker and both topics; returns every partition with the
    /// watermarks seen now, which define "caught up". `None` when stopped first.
    fn discover(&self, consumer: &TopicConsumer) -> Option<BTreeMap<PartitionId, (i64, i64)>> {
        let mut delay = Duration::from_millis(200);
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            match self.watermarks(consumer) {
                Ok(targets) => return Some(targets),
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

    fn watermarks(
        &self,
        consumer: &TopicConsumer,
    ) -> Result<BTreeMap<PartitionId, (i64, i64)>, KafkaError> {
        let mut targets = BTreeMap::new();
        for (t, topic) in self.config.topics().into_iter().enumerate() {
            for p in consumer.partitions(topic, REQUEST_TIMEOUT)? {
                let w = consumer.watermarks(topic, p, REQUEST_TIMEOUT)?;
                self.metrics.set_lag(topic, p, w.high - w.low);
                targets.insert((t, p), (w.low, w.high));
            }
        }
        Ok(targets)
    }

    fn report_catch_up(&self, pending: &HashMap<PartitionId, i64>, started: Instant, applied: u64) {
        if pending.is_empty() {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                "caught up: {applied} events folded in {secs:.3} s ({:.0} events/s)",
                applied as f64 / secs.max(1e-9)
            );
            self.metrics.set_status(true, "caught up");
        } else {
            self.metrics.set_status(
                false,
                format!("replaying: {} partitions not caught up yet", pending.len()),
            );
        }
    }

    /// Lag = high watermark now - next offset to fold. One broker round trip per
    /// partition; stops at the first failure (the broker is likely down).
    fn refresh_lag(&self, consumer: &TopicConsumer, positions: &HashMap<PartitionId, i64>) {
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

    /// Folds one batch and applies it; returns, per partition touched, the next offset
    /// and the number of events applied.
    fn process(
        &self,
        records: &[Record<'_>],
        dlq: &RecordProducer,
    ) -> HashMap<PartitionId, (i64, u64)> {
        let mut progress: HashMap<PartitionId, (i64, u64)> = HashMap::new();
        let mut inputs = Vec::with_capacity(records.len());
        let mut kept = Vec::with_capacity(records.len());
        for r in records {
            let Some(t) = self.topic_index(r.topic) else {
                // Only assigned topics are delivered; a stranger is a client bug.
                tracing::error!("record from unexpected topic {} ignored", r.topic);
                continue;
            };
            self.metrics
                .topic(t)
                .consumed
                .fetch_add(1, Ordering::Relaxed);
            let slot = progress.entry((t, r.partition)).or_insert((0, 0));
            slot.0 = slot.0.max(r.offset + 1);
            inputs.push(Input {
                source: if t == 0 {
                    Source::Users
                } else {
                    Source::Organizations
                },
                value: r.value.unwrap_or_default().to_vec(),
            });
            kept.push((t, *r));
        }
        self.fold(&inputs, &kept, dlq, &mut progress);
        progress
    }

    /// Folds `inputs` (from `records`, same order). A batch the reducer cannot fold is
    /// split into single records, so one poison record costs only itself.
    fn fold(
        &self,
        inputs: &[Input],
        records: &[(usize, Record<'_>)],
        dlq: &RecordProducer,
        progress: &mut HashMap<PartitionId, (i64, u64)>,
    ) {
        if inputs.is_empty() {
            return;
        }
        match self
            .reducer
            .fold(inputs, |entities| self.store.prior(entities))
        {
            Ok(folded) => {
                self.metrics.reducer_call(folded.elapsed);
                self.store.apply(&folded.plan.entities, folded.updates);
                let mut reasons: BTreeMap<u32, Vec<(Option<u32>, String)>> = BTreeMap::new();
                for r in folded.plan.rejections {
                    reasons
                        .entry(r.input)
                        .or_default()
                        .push((r.event, r.reason));
                }
                for (i, ((t, record), accepted)) in
                    records.iter().zip(&folded.plan.accepted).enumerate()
                {
                    let accepted = u64::from(*accepted);
                    self.metrics
                        .topic(*t)
                        .applied
                        .fetch_add(accepted, Ordering::Relaxed);
                    if let Some(p) = progress.get_mut(&(*t, record.partition)) {
                        p.1 += accepted;
                    }
                    if let Some(list) = reasons.get(&(i as u32)) {
                        let events: Vec<String> = list
                            .iter()
                            .filter_map(|(e, _)| e.map(|e| e.to_string()))
                            .collect();
                        let reason: Vec<&str> = list.iter().map(|(_, r)| r.as_str()).collect();
                        self.dead_letter(
                            dlq,
                            *t,
                            record,
                            &reason.join("; "),
                            &events.join(","),
                            accepted,
                        );
                    }
                }
            }
            Err(e) if inputs.len() == 1 => {
                self.metrics.reducer_failed();
                let (t, record) = &records[0];
                self.dead_letter(dlq, *t, record, &e.to_string(), "", 0);
            }
            Err(e) => {
                self.metrics.reducer_failed();
                tracing::warn!(
                    "reducer failed on a batch of {} records ({e}); folding them one by one",
                    inputs.len()
                );
                if matches!(e, ReducerError::Contract(_)) {
                    tracing::error!("the reducer broke the contract: {e}");
                }
                for (input, record) in inputs.iter().zip(records) {
                    self.fold(
                        std::slice::from_ref(input),
                        std::slice::from_ref(record),
                        dlq,
                        progress,
                    );
                }
            }
        }
    }

    fn dead_letter(
        &self,
        dlq: &RecordProducer,
        t: usize,
        record: &Record<'_>,
        reason: &str,
        events: &str,
        applied: u64,
    ) {
        let topic = self.config.topics()[t];
        let dlq_topic = self.config.dlq_topic(topic);
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
            ("logq.events.rejected", events),
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

    fn topic_index(&self, topic: &str) -> Option<usize> {
        self.config.topics().iter().position(|t| *t == topic)
    }
}
