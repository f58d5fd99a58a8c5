//! Reading the topics: partition discovery, watermarks, batched polling.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::fetch::{FetchQueue, Fetched, TAKE_MAX};
use super::{KafkaError, Partition, Record, Topics, client_config, committed_at};
use crate::config::KafkaConfig;

/// How long one poll waits for a record before its caller looks around again (stop
/// flag, commands). Short, because a forward swap waits for the consumer loop to
/// apply it: an idle loop answers within this (about 50 wake-ups a second when idle,
/// which cost nothing measurable).
pub const POLL_WAIT: Duration = Duration::from_millis(20);
/// Records polled, still in librdkafka's buffers (no copy is made until they are
/// framed for the reducer), when the poll returned them, and whether they may carry
/// their origin (read from the re-key stage's output).
pub struct Polled<'c> {
    /// Records found on the consumer's own queue (a partition's records fetched
    /// before its forwarding was set): they come before `fetched` of the same
    /// partition.
    polled: Vec<BorrowedMessage<'c>>,
    /// Records taken from the fetch queue.
    fetched: Vec<Fetched>,
    received: SystemTime,
    rekeyed: bool,
}

impl Polled<'_> {
    /// Whether nothing arrived.
    pub fn is_empty(&self) -> bool {
        self.polled.is_empty() && self.fetched.is_empty()
    }

    /// When the poll returned these records.
    pub fn received(&self) -> SystemTime {
        self.received
    }

    /// The oldest record timestamp among these records, in milliseconds since the
    /// epoch: the producer's send time (`CreateTime`) or the broker's append
    /// (`LogAppendTime`), as the topic is configured. `None` when none carries one.
    pub fn oldest_stamp_ms(&self) -> Option<i64> {
        let polled = self.polled.iter().filter_map(|m| m.timestamp().to_millis());
        let fetched = self.fetched.iter().filter_map(Fetched::timestamp_ms);
        polled.chain(fetched).min()
    }

    /// The records, borrowed, in the order they were read.
    pub fn records(&self) -> Vec<Record<'_>> {
        let mut out = Vec::with_capacity(self.polled.len() + self.fetched.len());
        out.extend(self.polled.iter().map(|m| Record {
            topic: m.topic(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key(),
            value: m.payload(),
            origin: if self.rekeyed { origin_of(m) } else { None },
        }));
        // Records of one topic come in runs: its name is read once a run.
        let mut topic = (0, "");
        out.extend(self.fetched.iter().map(|m| {
            if m.topic_handle() != topic.0 {
                topic = (m.topic_handle(), m.topic());
            }
            Record {
                topic: topic.1,
                partition: m.partition(),
                offset: m.offset(),
                key: m.key(),
                value: m.payload(),
                origin: if self.rekeyed {
                    m.header(super::rekey::ORIGIN_HEADER_C)
                        .and_then(super::rekey::Origin::parse)
                } else {
                    None
                },
            }
        }));
        out
    }
}

/// The origin header of a record the re-key stage wrote.
fn origin_of<'m>(m: &'m BorrowedMessage<'_>) -> Option<super::rekey::Origin<'m>> {
    use rdkafka::message::Headers as _;
    m.headers()?
        .iter()
        .find(|h| h.key == super::rekey::ORIGIN_HEADER)
        .and_then(|h| super::rekey::Origin::parse(h.value?))
}

/// The largest value among `polled` (at least 1 KiB: the first take's guess).
fn largest_value(polled: &[BorrowedMessage<'_>]) -> usize {
    polled
        .iter()
        .map(|m| m.payload_len())
        .max()
        .unwrap_or(0)
        .max(1024)
}

/// Longest wait for one metadata or watermark request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A consumer that reads whole topics itself (every replica of the service holds the
/// entire state, so partitions are assigned, not balanced across a group).
pub struct TopicConsumer {
    /// Declared before `consumer`: dropped before the client it belongs to.
    fetch: FetchQueue,
    /// What is assigned, to forward to `fetch` (again before every batch).
    assigned: Mutex<Vec<(CString, i32)>>,
    consumer: BaseConsumer,
    topics: Topics,
}

/// Where one partition stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    /// First offset still in the log.
    pub low: i64,
    /// Offset the next produced record will get.
    pub high: i64,
}

impl TopicConsumer {
    /// Creates the client. Nothing is sent to the broker yet.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka refuses the settings.
    pub fn new(kafka: &KafkaConfig, group_id: &str, topics: Topics) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer = client_config(
            kafka,
            &[
                ("group.id", group_id),
                // Progress is committed for monitoring, but only offsets whose effect
                // is in the state are stored (at-least-once; the fold is idempotent).
                ("enable.auto.commit", "true"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("enable.partition.eof", "false"),
                // librdkafka pauses fetching a partition for this long once its local
                // queue passes the prefetch thresholds (default 1000 ms). A host that
                // folds slower than the broker delivers hits them constantly and then
                // idles in poll for up to a second: catch-up ran at half speed (measured
                // with bench/run.sh: 118k -> 167-237k events/s).
                ("fetch.queue.backoff.ms", "10"),
                // How long the broker may hold a fetch that finds nothing new (default
                // 500 ms). A broker that does not answer a waiting fetch as soon as
                // records arrive (nisshi, for one) then delays every live event by up
                // to that: produce -> visible measured p50 256 ms, p99 527 ms at 10k
                // events/s (bench/run.sh, figure 7). An idle host sends about 100 small
                // fetches a second per broker instead.
                ("fetch.wait.max.ms", "10"),
            ],
        )
        .create()
        .map_err(|e| KafkaError::Config(e.to_string()))?;
        Ok(Self {
            fetch: FetchQueue::new(&consumer)?,
            assigned: Mutex::default(),
            consumer,
            topics,
        })
    }

    /// The topics this consumer reads.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Every partition of both topics with its watermarks now.
    ///
    /// # Errors
    /// When the broker cannot be reached or a topic does not exist.
    pub fn targets(
        &self,
        timeout: Duration,
    ) -> Result<BTreeMap<Partition, Watermarks>, KafkaError> {
        self.all_partitions(timeout)?
            .into_iter()
            .map(|p| Ok((p, self.watermarks(p, timeout)?)))
            .collect()
    }

    /// Partition ids of `topic`.
    fn partitions(&self, topic: &str, timeout: Duration) -> Result<Vec<i32>, KafkaError> {
        let metadata = self.consumer.fetch_metadata(Some(topic), timeout)?;
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| KafkaError::MissingTopic(topic.into()))?;
        if t.error().is_some() || t.partitions().is_empty() {
            return Err(KafkaError::MissingTopic(topic.into()));
        }
        Ok(t.partitions().iter().map(|p| p.id()).collect())
    }

    /// Asks the broker for a partition's watermarks.
    ///
    /// # Errors
    /// When the broker does not answer in time.
    pub fn watermarks(&self, p: Partition, timeout: Duration) -> Result<Watermarks, KafkaError> {
        let (low, high) =
            self.consumer
                .fetch_watermarks(self.topics.name(p.source), p.id, timeout)?;
        Ok(Watermarks { low, high })
    }

    /// Reads `partitions` from the given offsets (`None`: the earliest).
    ///
    /// # Errors
    /// When librdkafka refuses the assignment.
    pub fn assign(&self, partitions: &[(Partition, Option<i64>)]) -> Result<(), KafkaError> {
        let list = self.list(partitions)?;
        self.assigned().clear();
        self.forward(partitions.iter().map(|(p, _)| *p));
        self.consumer.assign(&list)?;
        Ok(())
    }

    /// Also reads `partitions` (from the earliest offset), keeping what is assigned.
    ///
    /// # Errors
    /// When librdkafka refuses the assignment.
    pub fn add(&self, partitions: &[Partition]) -> Result<(), KafkaError> {
        let from_start: Vec<(Partition, Option<i64>)> =
            partitions.iter().map(|p| (*p, None)).collect();
        let list = self.list(&from_start)?;
        self.forward(partitions.iter().copied());
        self.consumer.incremental_assign(&list)?;
        Ok(())
    }

    /// Also reads `partitions`, each from the offset given, keeping what is assigned.
    ///
    /// # Errors
    /// When librdkafka refuses the assignment.
    pub fn add_at(&self, partitions: &[(Partition, i64)]) -> Result<(), KafkaError> {
        let at: Vec<(Partition, Option<i64>)> =
            partitions.iter().map(|(p, o)| (*p, Some(*o))).collect();
        let list = self.list(&at)?;
        self.forward(partitions.iter().map(|(p, _)| *p));
        self.consumer.incremental_assign(&list)?;
        Ok(())
    }

    /// Stops reading `partitions`, keeping the rest.
    ///
    /// # Errors
    /// When librdkafka refuses the change.
    pub fn remove(&self, partitions: &[Partition]) -> Result<(), KafkaError> {
        let at: Vec<(Partition, Option<i64>)> = partitions.iter().map(|p| (*p, None)).collect();
        self.consumer.incremental_unassign(&self.list(&at)?)?;
        let gone: Vec<(CString, i32)> = partitions.iter().filter_map(|p| self.named(*p)).collect();
        self.assigned().retain(|p| !gone.contains(p));
        Ok(())
    }

    /// What is assigned (a poisoned lock only means a panic elsewhere mid-update of
    /// a list that is whole at every step).
    fn assigned(&self) -> std::sync::MutexGuard<'_, Vec<(CString, i32)>> {
        self.assigned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A partition as librdkafka names it (`None` for a topic name with a NUL byte,
    /// which no broker accepts).
    fn named(&self, p: Partition) -> Option<(CString, i32)> {
        Some((CString::new(self.topics.name(p.source)).ok()?, p.id))
    }

    /// Forwards `partitions`' records to the fetch queue and keeps them to forward
    /// again before each batch.
    fn forward(&self, partitions: impl Iterator<Item = Partition>) {
        let named: Vec<(CString, i32)> = partitions.filter_map(|p| self.named(p)).collect();
        self.fetch.forward(&named);
        let mut assigned = self.assigned();
        for p in named {
            if !assigned.contains(&p) {
                assigned.push(p);
            }
        }
    }

    /// Partitions of both topics that exist now and are not in `known`: partitions
    /// added to a topic while the host runs.
    ///
    /// # Errors
    /// When the broker cannot be reached or a topic does not exist.
    pub fn new_partitions(
        &self,
        known: &std::collections::BTreeSet<Partition>,
        timeout: Duration,
    ) -> Result<Vec<Partition>, KafkaError> {
        let mut all = self.all_partitions(timeout)?;
        all.retain(|p| !known.contains(p));
        Ok(all)
    }

    /// Every partition of both topics, users first.
    fn all_partitions(&self, timeout: Duration) -> Result<Vec<Partition>, KafkaError> {
        let mut out = Vec::new();
        for source in logq_abi::Source::ALL {
            for id in self.partitions(self.topics.name(source), timeout)? {
                out.push(Partition { source, id });
            }
        }
        Ok(out)
    }

    fn list(
        &self,
        partitions: &[(Partition, Option<i64>)],
    ) -> Result<TopicPartitionList, KafkaError> {
        let mut list = TopicPartitionList::new();
        for (p, offset) in partitions {
            let at = offset.map_or(Offset::Beginning, Offset::Offset);
            list.add_partition_offset(self.topics.name(p.source), p.id, at)?;
        }
        Ok(list)
    }

    /// Waits up to `wait` for a record, then takes what else is ready without waiting,
    /// up to `max_records` records or `max_bytes` of values. The records stay in
    /// librdkafka's buffers until the [`Polled`] is dropped; empty when nothing arrived.
    ///
    /// First the consumer's own queue is served (commit results, errors, and any
    /// record fetched before its partition was forwarded), then records are taken
    /// from the fetch queue up to [`TAKE_MAX`] at a time. The byte bound is checked
    /// between takes, each sized to stay under it at the largest value seen so far.
    ///
    /// # Errors
    /// A client or broker error reported instead of any record. Errors beside records
    /// are logged.
    pub fn poll(
        &self,
        max_records: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Polled<'_>, KafkaError> {
        let mut polled = Vec::new();
        let mut bytes = 0;
        let mut errors = Vec::new();
        while polled.len() < max_records && bytes < max_bytes {
            match self.consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => {
                    bytes += m.payload_len();
                    polled.push(m);
                }
                Some(Err(e)) => errors.push(e.into()),
                None => break,
            }
        }
        self.fetch.forward(&self.assigned());
        let mut fetched: Vec<Fetched> = Vec::new();
        let mut largest = largest_value(&polled);
        // A take that waits waits for all it asks for: the wait is for one record.
        let mut wait = (polled.is_empty() && errors.is_empty() && !wait.is_zero()).then_some(wait);
        while polled.len() + fetched.len() < max_records && bytes < max_bytes {
            let room = max_records - polled.len() - fetched.len();
            let fits = (max_bytes - bytes) / largest.max(1);
            let ask = match wait {
                Some(_) => 1,
                None => room.min(fits.max(1)).min(TAKE_MAX),
            };
            let from = fetched.len();
            let got = self.fetch.take(
                &mut fetched,
                ask,
                wait.take().unwrap_or(Duration::ZERO),
                &mut errors,
            );
            for m in &fetched[from..] {
                bytes += m.payload_len();
                largest = largest.max(m.payload_len());
            }
            if got < ask {
                break;
            }
        }
        // The first error stands for an empty poll; the others are logged.
        let mut errors = errors.into_iter();
        let first = (polled.is_empty() && fetched.is_empty())
            .then(|| errors.next())
            .flatten();
        for e in errors {
            tracing::warn!("kafka: {e}");
        }
        if let Some(e) = first {
            return Err(e);
        }
        Ok(Polled {
            polled,
            fetched,
            received: SystemTime::now(),
            rekeyed: self.topics.rekeyed_from.is_some(),
        })
    }

    /// The offsets this consumer group committed for `partitions` (the next offset to
    /// read); partitions without a commit are left out.
    ///
    /// # Errors
    /// When the broker does not answer in time.
    pub fn committed(
        &self,
        partitions: &[Partition],
        timeout: Duration,
    ) -> Result<BTreeMap<Partition, i64>, KafkaError> {
        let mut list = TopicPartitionList::new();
        for p in partitions {
            list.add_partition(self.topics.name(p.source), p.id);
        }
        let committed = self.consumer.committed_offsets(list, timeout)?;
        Ok(partitions
            .iter()
            .filter_map(|p| {
                Some((
                    *p,
                    committed_at(&committed, self.topics.name(p.source), p.id)?,
                ))
            })
            .collect())
    }

    /// Commits `progress` (the next offset to read, per partition) now and waits for
    /// the broker's answer. (Not the consumer's position: that may be past records
    /// whose effects are not safe yet.)
    ///
    /// # Errors
    /// When the commit fails.
    pub fn commit(&self, progress: &BTreeMap<Partition, i64>) -> Result<(), KafkaError> {
        let mut list = TopicPartitionList::new();
        for (p, next) in progress {
            list.add_partition_offset(self.topics.name(p.source), p.id, Offset::Offset(*next))?;
        }
        self.consumer.commit(&list, CommitMode::Sync)?;
        Ok(())
    }

    /// Marks everything before `next` in a partition as applied, for the next commit.
    ///
    /// # Errors
    /// When the partition is not assigned.
    pub fn store_progress(&self, p: Partition, next: i64) -> Result<(), KafkaError> {
        // `rd_kafka_offsets_store` stores the offset as given; the single-offset
        // `store_offset` would store `next + 1`, one record too far.
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(self.topics.name(p.source), p.id, Offset::Offset(next))?;
        self.consumer.store_offsets(&list)?;
        Ok(())
    }
}

/// The values of the records at `places` (topic, partition, offset), read with a
/// client of its own (no group, nothing committed): `None` for a record not found
/// within `timeout` (compacted away, or past the end). For `logq explain --records`.
///
/// # Errors
/// When the client cannot be made or a partition cannot be assigned.
pub fn read_at(
    kafka: &KafkaConfig,
    places: &[(String, i32, i64)],
    timeout: Duration,
) -> Result<Vec<Option<Vec<u8>>>, KafkaError> {
    let consumer: BaseConsumer = client_config(
        kafka,
        &[
            ("group.id", "logq-explain"),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "false"),
        ],
    )
    .create()
    .map_err(|e| KafkaError::Config(e.to_string()))?;
    let mut out = Vec::with_capacity(places.len());
    for (topic, partition, offset) in places {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        consumer.assign(&list)?;
        let deadline = std::time::Instant::now() + timeout;
        let mut found = None;
        while found.is_none() && std::time::Instant::now() < deadline {
            match consumer.poll(POLL_WAIT) {
                Some(Ok(m)) if m.partition() == *partition && m.offset() == *offset => {
                    found = Some(m.payload().unwrap_or_default().to_vec());
                }
                // Compacted away: the log went past it.
                Some(Ok(m)) if m.partition() == *partition && m.offset() > *offset => break,
                _ => {}
            }
        }
        out.push(found);
    }
    Ok(out)
}
