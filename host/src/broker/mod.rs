//! Everything that talks to the broker: the only module that touches rdkafka. The
//! first stage of the data path: records come out of here, borrowed from the client.
//!
//! - [`consumer`]: reads the topics in batches, finds partitions and watermarks,
//!   stores progress;
//! - [`producer`]: sends records (dead letters, `logq produce`) and counts deliveries;
//! - [`admin`]: creates topics;
//! - [`group`]: sharing partitions among hosts through the broker's consumer group;
//! - [`members`]: the members topic, where sharing hosts say where they are;
//! - [`rekey`]: the re-key stage, which puts each user's events in the partition its
//!   id hashes to, for hosts that share partitions;
//! - [`mock`]: librdkafka's in-process mock cluster, for `logq dev` only.
//!
//! Which topic is which stream is said once, by [`Topics`]; a partition is a
//! [`Partition`] (stream and id), never a topic index.

pub mod admin;
pub mod consumer;
pub mod fetch;
pub mod group;
pub mod members;
pub mod mock;
pub mod position;
pub mod producer;
pub mod rekey;

use std::collections::BTreeMap;
use std::fmt;

use logq_abi::Source;
use rdkafka::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;

use crate::config::KafkaConfig;

/// One partition of one of the two streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    /// The stream (and so the topic) it belongs to.
    pub source: Source,
    /// The partition id within the topic.
    pub id: i32,
}

/// Next offset to read or fold, per partition.
pub type Positions = BTreeMap<Partition, i64>;

/// The topic names of the two streams, and the mapping between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Topic of user events.
    pub users: String,
    /// Topic of organization events.
    pub organizations: String,
    /// With the re-key stage: the topic the producers write users to, which the
    /// stage re-keys into `users` (whose records then name their origin in a header,
    /// looked for only then: it is a lookup per record).
    pub rekeyed_from: Option<String>,
}

impl From<&crate::config::RunConfig> for Topics {
    fn from(config: &crate::config::RunConfig) -> Self {
        Self {
            users: config.users_topic.clone(),
            organizations: config.organizations_topic.clone(),
            rekeyed_from: config.rekeyed_from.clone(),
        }
    }
}

impl Topics {
    /// The topic of `source`.
    pub fn name(&self, source: Source) -> &str {
        match source {
            Source::Users => &self.users,
            Source::Organizations => &self.organizations,
        }
    }

    /// The stream `topic` carries, if it is one of ours.
    pub fn source_of(&self, topic: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|s| self.name(*s) == topic)
    }

    /// Both topic names, users first.
    pub fn names(&self) -> [&str; 2] {
        Source::ALL.map(|s| self.name(s))
    }

    /// `positions` keyed `topic/partition`, as the admin API and logs show them.
    pub fn named(&self, positions: &Positions) -> BTreeMap<String, i64> {
        positions
            .iter()
            .map(|(p, o)| (self.partition_name(*p), *o))
            .collect()
    }

    /// `topic/partition`.
    pub fn partition_name(&self, p: Partition) -> String {
        format!("{}/{}", self.name(p.source), p.id)
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}/{}", self.source, self.id)
    }
}

/// A broker operation that failed, with librdkafka's words.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// The client could not be created (usually a bad `-X` setting).
    #[error("kafka client configuration: {0}")]
    Config(String),
    /// A topic does not exist on the broker.
    #[error(
        "topic {0:?} does not exist on the broker: create it with your broker's tool (e.g. `rpk topic create {0}`, or `nisshi topic create {0}`; see the README's \"Against a local broker\")"
    )]
    MissingTopic(String),
    /// No broker answered at the bootstrap address.
    #[error(
        "no Kafka broker answered at {brokers} within {waited:?} ({error}): is one running there? `logq dev` starts one at 127.0.0.1:9092; pass --brokers HOST:PORT (or LOGQ_BROKERS) for another"
    )]
    Unreachable {
        /// The bootstrap servers tried.
        brokers: String,
        /// How long it waited.
        waited: std::time::Duration,
        /// librdkafka's words.
        error: String,
    },
    /// Anything else the broker or client reported.
    #[error("kafka: {0}")]
    Broker(String),
}

impl From<rdkafka::error::KafkaError> for KafkaError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        Self::Broker(e.to_string())
    }
}

/// One record as read, borrowed from the client for the duration of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Topic it was read from.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
    /// Record key, if any.
    pub key: Option<&'a [u8]>,
    /// Record value; `None` for a tombstone.
    pub value: Option<&'a [u8]>,
    /// Where its events came from, for a record the re-key stage wrote.
    pub origin: Option<rekey::Origin<'a>>,
}

impl<'a> Record<'a> {
    /// The reducer's view of this record of stream `source` (as
    /// [`Topics::source_of`] its topic): stream, partition, offset and value,
    /// borrowed, not copied. `None` for a compaction tombstone (a null value: there is
    /// nothing to fold; the caller counts it).
    ///
    /// A re-keyed record is given its origin's partition and offset, so that equal
    /// event times are decided by the log the producer wrote, whatever order the
    /// re-key stage wrote it in (see [`rekey`]).
    pub fn for_reducer(&self, source: Source) -> Option<logq_abi::Record<'a>> {
        let (partition, offset) = self
            .origin
            .map_or((self.partition, self.offset), |o| (o.partition, o.offset));
        Some(logq_abi::Record {
            source,
            partition,
            offset,
            value: self.value?,
        })
    }
}

/// Client settings in a fixed order: bootstrap servers, then the client's own
/// `defaults`, then every `-X` setting on top, so a user can override anything
/// (security, timeouts, our defaults) without a code change.
fn client_config(kafka: &KafkaConfig, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set_log_level(RDKafkaLogLevel::Warning);
    for (key, value) in defaults {
        config.set(*key, *value);
    }
    for (key, value) in &kafka.extra {
        config.set(key, value);
    }
    config
}

/// The offset `committed` (a `committed_offsets` answer) holds for partition `p` of
/// `topic`: the next one the group reads; `None` when it has committed none there.
pub(crate) fn committed_at(
    committed: &rdkafka::topic_partition_list::TopicPartitionList,
    topic: &str,
    p: i32,
) -> Option<i64> {
    match committed.find_partition(topic, p)?.offset() {
        rdkafka::topic_partition_list::Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// Commits `next` (the next offset to read, per partition of `topic`) for the group
/// of `consumer`; nothing to do when `next` is empty.
///
/// # Errors
/// What librdkafka reports.
pub(crate) fn commit_offsets<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    topic: &str,
    next: &BTreeMap<i32, i64>,
    mode: rdkafka::consumer::CommitMode,
) -> Result<(), KafkaError> {
    use rdkafka::consumer::Consumer as _;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    if next.is_empty() {
        return Ok(());
    }
    let mut list = TopicPartitionList::new();
    for (p, at) in next {
        list.add_partition_offset(topic, *p, Offset::Offset(*at))?;
    }
    consumer.commit(&list, mode)?;
    Ok(())
}

/// Waits up to `max` for the thread of a group client (`what`) to end, and leaves
/// without it if it does not: with the broker gone, librdkafka's close can wait for
/// ever (a host stopped by SIGTERM after its broker stayed up for an hour, waiting).
pub(crate) fn join_within(
    thread: std::thread::JoinHandle<()>,
    max: std::time::Duration,
    what: &str,
) {
    let deadline = std::time::Instant::now() + max;
    while !thread.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if thread.is_finished() {
        let _ = thread.join();
    } else {
        tracing::warn!(
            "{what} did not close within {max:?} (is the broker gone?); leaving without it"
        );
    }
}
