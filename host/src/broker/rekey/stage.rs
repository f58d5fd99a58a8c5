//! The stage itself: a member of the re-key group that reads the users topic, writes
//! each record's users' events to the internal topic, and commits what the broker
//! acknowledged.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::origin::{self, ORIGIN_HEADER};
use super::split::split;
use crate::broker::{KafkaError, client_config, commit_offsets, committed_at, join_within};
use crate::config::KafkaConfig;

/// Most input records in one batch of the stage. The stage waits for the broker's
/// acknowledgements once per batch, and that wait, not CPU, bounds it while it
/// catches up: 1M events (one host, three partitions, the test broker) took 29 s at
/// 4,096 records a batch with 0.42 cores busy, 11.3 s at 16,384, 7.4 s at 65,536.
/// Live, a batch is what has arrived, a few records.
const BATCH_MAX: usize = 65_536;
/// How long one poll waits for the first record of a batch.
const POLL_WAIT: Duration = Duration::from_millis(20);
/// How often the stage measures its lag.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for one of those requests.
const CHECK_WAIT: Duration = Duration::from_secs(2);
/// Longest wait for a batch's outputs to be acknowledged before it is sent again.
const FLUSH_WAIT: Duration = Duration::from_secs(30);

/// What the stage has done, for `/metrics`.
#[derive(Debug)]
pub struct Stats {
    /// Input records read (tombstones included).
    pub records: AtomicU64,
    /// Records written to the internal topic.
    pub written: AtomicU64,
    /// Input records dead-lettered, wholly or partly.
    pub dead_lettered: AtomicU64,
    /// Compaction tombstones skipped (nothing to route).
    pub tombstones: AtomicU64,
    /// Batches sent again because an output was not acknowledged.
    pub resent: AtomicU64,
    /// Batches set aside because the stage had stood still past half its session
    /// timeout (it may have lost its partitions meanwhile).
    pub doubted: AtomicU64,
    /// Records of the users topic the whole stage (every member) has not finished:
    /// high watermarks minus the group's committed offsets, checked every second;
    /// -1 until known.
    pub lag: AtomicI64,
    /// Whether the stage's group has finished the users topic as it stood when this
    /// member started (once true, stays true): the internal topic then holds every
    /// user's history, and a host may say it is ready.
    pub caught_up: AtomicBool,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            records: AtomicU64::new(0),
            written: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            tombstones: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            doubted: AtomicU64::new(0),
            lag: AtomicI64::new(-1),
            caught_up: AtomicBool::new(false),
        }
    }
}

/// How the stage runs: its group, where it reads and writes.
#[derive(Debug, Clone)]
pub struct Rekeying {
    /// The stage's consumer group.
    pub group: String,
    /// This member's stable id.
    pub instance: String,
    /// The users topic, read.
    pub from: String,
    /// The internal topic, written.
    pub to: String,
    /// Where what cannot be routed goes.
    pub dlq: String,
    /// Without a heartbeat for this long, a member's partitions go to the others.
    pub session_timeout: Duration,
}

/// The outcomes of the stage's sends since they were last taken.
#[derive(Debug, Default)]
struct Sent {
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ClientContext for Sent {}

impl ProducerContext for Sent {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, (): ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Relaxed);
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        }
    }
}

/// Where the stage stands: next offset per input partition, processed and
/// acknowledged; committed when a partition is revoked.
struct StageContext {
    topic: String,
    done: Mutex<BTreeMap<i32, i64>>,
}

impl ClientContext for StageContext {}

impl ConsumerContext for StageContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        // The loop polls only between batches, so what is done is all acknowledged.
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        let mut commit = TopicPartitionList::new();
        for e in list.elements() {
            if let Some(next) = done.remove(&e.partition()) {
                let _ =
                    commit.add_partition_offset(&self.topic, e.partition(), Offset::Offset(next));
            }
        }
        if consumer.assignment_lost() || commit.count() == 0 {
            return;
        }
        if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
            tracing::warn!("re-key stage: committing revoked partitions: {e}");
        }
    }
}

/// The running stage: a thread of its own, stopped when dropped (after committing
/// what it finished).
pub struct Rekey {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

impl Rekey {
    /// Joins the stage's group and starts the thread.
    ///
    /// # Errors
    /// When librdkafka refuses the settings or the subscription.
    pub fn start(kafka: &KafkaConfig, rekeying: Rekeying) -> Result<Self, KafkaError> {
        let make = {
            let (kafka, rekeying) = (kafka.clone(), rekeying.clone());
            move || -> Result<BaseConsumer<StageContext>, KafkaError> {
                let session = rekeying.session_timeout.as_millis().max(1).to_string();
                let heartbeat = (rekeying.session_timeout.as_millis() / 4)
                    .max(1)
                    .to_string();
                let consumer: BaseConsumer<StageContext> = client_config(
                    &kafka,
                    &[
                        ("group.id", rekeying.group.as_str()),
                        ("group.instance.id", rekeying.instance.as_str()),
                        ("partition.assignment.strategy", "cooperative-sticky"),
                        ("session.timeout.ms", session.as_str()),
                        ("heartbeat.interval.ms", heartbeat.as_str()),
                        ("enable.auto.commit", "false"),
                        ("auto.offset.reset", "earliest"),
                        ("enable.partition.eof", "false"),
                        // As the fold's consumer (see `consumer::TopicConsumer::new`): a
                        // broker that holds empty fetches would delay every live event.
                        ("fetch.wait.max.ms", "10"),
                        ("fetch.queue.backoff.ms", "10"),
                    ],
                )
                .create_with_context(StageContext {
                    topic: rekeying.from.clone(),
                    done: Mutex::new(BTreeMap::new()),
                })
                .map_err(|e| KafkaError::Config(e.to_string()))?;
                consumer.subscribe(&[rekeying.from.as_str()])?;
                Ok(consumer)
            }
        };
        let consumer = make()?;
        let producer: ThreadedProducer<Sent> = client_config(
            kafka,
            &[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("linger.ms", "1"),
                // Keyed by id: Kafka's Java partitioner, as the fold hosts expect.
                ("partitioner", "murmur2_random"),
            ],
        )
        .create_with_context(Sent::default())
        .map_err(|e| KafkaError::Config(e.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let thread = {
            let (stop, stats) = (stop.clone(), stats.clone());
            std::thread::Builder::new()
                .name("logq-rekey".into())
                .spawn(move || {
                    Stage {
                        consumer,
                        make: Box::new(make),
                        producer,
                        rekeying,
                        stats,
                        start_highs: None,
                    }
                    .run(&stop);
                })
                .map_err(|e| KafkaError::Config(format!("starting the re-key thread: {e}")))?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
            stats,
        })
    }

    /// What the stage has done so far.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }
}

impl Drop for Rekey {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            join_within(t, Duration::from_secs(10), "the re-key stage");
        }
    }
}

struct Stage {
    consumer: BaseConsumer<StageContext>,
    /// Makes the consumer again, after the group fenced this member.
    make: Box<dyn Fn() -> Result<BaseConsumer<StageContext>, KafkaError> + Send>,
    producer: ThreadedProducer<Sent>,
    rekeying: Rekeying,
    stats: Arc<Stats>,
    /// The users topic's high watermarks when this member started: what the group
    /// must have finished for [`Stats::caught_up`].
    start_highs: Option<BTreeMap<i32, i64>>,
}

impl Stage {
    fn run(mut self, stop: &Arc<AtomicBool>) {
        let stood_still = Stillness::watch(stop.clone());
        let mut next_check = Instant::now();
        while !stop.load(Relaxed) {
            if Instant::now() >= next_check {
                self.check();
                next_check = Instant::now() + CHECK_EVERY;
            }
            if let Some((_, why)) = self.consumer.client().fatal_error() {
                // A member thought dead and back is fenced (its static id went to
                // the group's next generation): a new client joins under the same id.
                tracing::warn!(
                    "the re-key stage's group fenced this member ({why}): joining again"
                );
                match (self.make)() {
                    Ok(fresh) => self.consumer = fresh,
                    Err(e) => {
                        tracing::error!("re-key stage: joining again: {e}");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                continue;
            }
            let batch = self.poll();
            let stood_still = stood_still.take();
            // A revocation inside the poll took these partitions away: their next
            // holder reads them from what was committed.
            let batch = self.still_owned(batch);
            if batch.is_empty() {
                continue;
            }
            if stood_still > self.rekeying.session_timeout / 2 {
                // Frozen (SIGSTOP, a stalled VM) long enough that the group may have
                // given these partitions to another member, which writes them
                // itself. Read them again once the group has had its say.
                self.doubt(&batch);
                continue;
            }
            let mut backoff = Duration::from_millis(100);
            while !self.send(&batch) {
                if stop.load(Relaxed) {
                    return;
                }
                self.stats.resent.fetch_add(1, Relaxed);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            self.done(&batch);
        }
        let done = self.consumer.context().done.lock().map(|d| d.clone());
        if let Ok(done) = done
            && let Err(e) =
                commit_offsets(&self.consumer, &self.rekeying.from, &done, CommitMode::Sync)
        {
            tracing::warn!("re-key stage: committing before leaving: {e}");
        }
    }

    /// Measures the whole stage's lag, and whether it has caught up with the users
    /// topic as it stood when this member started. Broker requests: once a second.
    fn check(&mut self) {
        let client = self.consumer.client();
        let topic = self.rekeying.from.as_str();
        let Ok(metadata) = client.fetch_metadata(Some(topic), CHECK_WAIT) else {
            return;
        };
        let Some(partitions) = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
        else {
            return;
        };
        let mut marks = BTreeMap::new();
        let mut all = TopicPartitionList::new();
        for p in partitions {
            let Ok(w) = client.fetch_watermarks(topic, p, CHECK_WAIT) else {
                return;
            };
            marks.insert(p, w);
            let _ = all.add_partition(topic, p);
        }
        let Ok(committed) = self.consumer.committed_offsets(all, CHECK_WAIT) else {
            return;
        };
        // Where the group stands on each partition: its commit, or the log's start.
        let done = |p: i32, low: i64| committed_at(&committed, topic, p).unwrap_or(0).max(low);
        let lag = marks
            .iter()
            .map(|(p, (low, high))| (high - done(*p, *low)).max(0))
            .sum();
        self.stats.lag.store(lag, Relaxed);
        let start = self
            .start_highs
            .get_or_insert_with(|| marks.iter().map(|(p, (_, high))| (*p, *high)).collect());
        if !self.stats.caught_up.load(Relaxed)
            && marks
                .iter()
                .all(|(p, (low, _))| done(*p, *low) >= start.get(p).copied().unwrap_or(0))
        {
            tracing::info!("the re-key stage has caught up with {topic}");
            self.stats.caught_up.store(true, Relaxed);
        }
    }

    /// Up to [`BATCH_MAX`] records: waits for the first, takes what else is there.
    fn poll(&self) -> Vec<BorrowedMessage<'_>> {
        let mut batch = Vec::new();
        let mut wait = POLL_WAIT;
        while batch.len() < BATCH_MAX {
            match self.consumer.poll(wait) {
                Some(Ok(m)) => batch.push(m),
                Some(Err(e)) => {
                    tracing::debug!("re-key stage: {e}");
                    break;
                }
                None => break,
            }
            wait = Duration::ZERO;
        }
        batch
    }

    fn still_owned<'c>(&self, mut batch: Vec<BorrowedMessage<'c>>) -> Vec<BorrowedMessage<'c>> {
        if batch.is_empty() {
            return batch;
        }
        let assigned = self.consumer.assignment().unwrap_or_default();
        batch.retain(|m| assigned.find_partition(m.topic(), m.partition()).is_some());
        batch
    }

    /// Sends every output of `batch` and waits for the broker's word on each.
    /// `false`: some were not acknowledged (the batch is to be sent again).
    fn send(&self, batch: &[BorrowedMessage<'_>]) -> bool {
        let sent = self.producer.context();
        sent.failed.store(0, Relaxed);
        for m in batch {
            if let Err(e) = self.send_one(m) {
                tracing::warn!("re-key stage: {e}");
                sent.failed.fetch_add(1, Relaxed);
            }
        }
        if let Err(e) = self.producer.flush(FLUSH_WAIT) {
            tracing::warn!("re-key stage: outputs not acknowledged within {FLUSH_WAIT:?}: {e}");
            return false;
        }
        let failed = sent.failed.load(Relaxed);
        if failed > 0 {
            let why = sent.last_error.lock().map(|e| e.clone()).ok().flatten();
            tracing::warn!(
                "re-key stage: {failed} outputs not delivered ({}); sending the batch again",
                why.unwrap_or_default()
            );
        }
        failed == 0
    }

    fn send_one(&self, m: &BorrowedMessage<'_>) -> Result<(), KafkaError> {
        let Some(value) = m.payload() else {
            self.stats.tombstones.fetch_add(1, Relaxed);
            return Ok(());
        };
        let stamp = m.timestamp().to_millis();
        let split = split(value);
        for user in &split.users {
            let origin = origin::write(m.topic(), m.partition(), m.offset(), &user.elements);
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                key: ORIGIN_HEADER,
                value: Some(origin.as_bytes()),
            });
            let mut record = BaseRecord::to(&self.rekeying.to)
                .key(user.id.as_bytes())
                .payload(user.value.as_ref())
                .headers(headers);
            if let Some(ms) = stamp {
                record = record.timestamp(ms);
            }
            self.produce(record)?;
            self.stats.written.fetch_add(1, Relaxed);
        }
        if !split.refused.is_empty() {
            let reason = split.reason();
            tracing::warn!(
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                "dead-lettered to {} by the re-key stage: {reason}",
                self.rekeying.dlq
            );
            let headers = [
                ("logq.reason", reason),
                ("logq.topic", m.topic().to_owned()),
                ("logq.partition", m.partition().to_string()),
                ("logq.offset", m.offset().to_string()),
                ("logq.events.rejected", split.refused_positions()),
                ("logq.stage", "rekey".to_owned()),
            ]
            .iter()
            .fold(OwnedHeaders::new_with_capacity(6), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                })
            });
            let mut record = BaseRecord::to(&self.rekeying.dlq)
                .payload(value)
                .headers(headers);
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            self.produce(record)?;
            self.stats.dead_lettered.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    /// Queues one record, waiting while librdkafka's queue is full.
    fn produce(&self, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<(), KafkaError> {
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// `batch` is written and acknowledged: its input may be committed.
    fn done(&self, batch: &[BorrowedMessage<'_>]) {
        self.stats.records.fetch_add(batch.len() as u64, Relaxed);
        let mut done = self
            .consumer
            .context()
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for m in batch {
            let next = done.entry(m.partition()).or_insert(0);
            *next = (*next).max(m.offset() + 1);
        }
        if let Err(e) = commit_offsets(
            &self.consumer,
            &self.rekeying.from,
            &done,
            CommitMode::Async,
        ) {
            tracing::debug!("re-key stage: committing: {e}");
        }
    }

    /// Sets `batch` aside: every partition is paused while the group has half a
    /// session timeout to say whether they are still this member's (a revocation
    /// takes them away), then those still here are read on, the batch's from its
    /// first records again.
    fn doubt(&self, batch: &[BorrowedMessage<'_>]) {
        self.stats.doubted.fetch_add(1, Relaxed);
        let mut first: BTreeMap<i32, i64> = BTreeMap::new();
        for m in batch {
            first.entry(m.partition()).or_insert(m.offset());
        }
        tracing::warn!(
            "re-key stage stood still past half its session timeout: reading {} partitions again once the group has answered",
            first.len()
        );
        // Pausing drops what was fetched for a partition; resuming fetches again
        // from the last record handed out, so the partitions not in the batch lose
        // nothing.
        if let Ok(assigned) = self.consumer.assignment() {
            let _ = self.consumer.pause(&assigned);
        }
        let until = Instant::now() + self.rekeying.session_timeout / 2;
        while Instant::now() < until {
            if let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(50)) {
                tracing::warn!(
                    "re-key stage: a record of paused partition {} came anyway; it is read again",
                    m.partition()
                );
                first.entry(m.partition()).or_insert(m.offset());
            }
        }
        let assigned = self.consumer.assignment().unwrap_or_default();
        let mut again = TopicPartitionList::new();
        for (p, at) in &first {
            if assigned.find_partition(&self.rekeying.from, *p).is_some() {
                let _ = again.add_partition_offset(&self.rekeying.from, *p, Offset::Offset(*at));
            }
        }
        if again.count() > 0
            && let Err(e) = self.consumer.seek_partitions(again, Duration::from_secs(5))
        {
            tracing::warn!("re-key stage: reading the set-aside batch again: {e}");
        }
        let _ = self.consumer.resume(&assigned);
    }
}

/// How long the process stood still (SIGSTOP, a stalled VM): a thread of its own
/// ticks every 50 ms and keeps the longest gap between two ticks. The stage's own
/// slow work does not count (librdkafka heartbeats meanwhile from its own threads);
/// a frozen process stops every thread, heartbeats included.
struct Stillness {
    base: Instant,
    /// The longest gap between two ticks since the last [`Stillness::take`].
    longest_ms: Arc<AtomicU64>,
    /// The last tick, in ms since `base`.
    ticked_ms: Arc<AtomicU64>,
}

impl Stillness {
    fn watch(stop: Arc<AtomicBool>) -> Self {
        let base = Instant::now();
        let (longest_ms, ticked_ms) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (longest, ticked) = (longest_ms.clone(), ticked_ms.clone());
        let spawned = std::thread::Builder::new()
            .name("logq-rekey-watch".into())
            .spawn(move || {
                let mut last = Instant::now();
                while !stop.load(Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    longest.fetch_max(millis(last.elapsed()), Relaxed);
                    last = Instant::now();
                    ticked.store(millis(last - base), Relaxed);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("re-key stage: no watch for standing still ({e})");
        }
        Self {
            base,
            longest_ms,
            ticked_ms,
        }
    }

    /// The longest stand-still since the last call: between two ticks, or since the
    /// last one (a thawed process may run this thread before the watch's).
    fn take(&self) -> Duration {
        let since_tick = millis(self.base.elapsed()).saturating_sub(self.ticked_ms.load(Relaxed));
        Duration::from_millis(self.longest_ms.swap(0, Relaxed).max(since_tick))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
