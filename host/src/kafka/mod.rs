//! Everything that talks to the broker: the only module that touches rdkafka.
//!
//! - [`consumer`]: reads the topics in batches, tracks watermarks, stores progress;
//! - [`producer`]: sends records (dead letters, `logq produce`) and counts deliveries;
//! - [`admin`]: creates topics;
//! - [`mock`]: librdkafka's in-process mock cluster, for `logq dev` only.

pub mod admin;
pub mod consumer;
pub mod mock;
pub mod producer;

use rdkafka::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;

use crate::config::KafkaConfig;

/// A broker operation that failed, with librdkafka's words.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// The client could not be created (usually a bad `-X` setting).
    #[error("kafka client configuration: {0}")]
    Config(String),
    /// A topic does not exist on the broker.
    #[error("topic {0:?} does not exist (create it, e.g. `rpk topic create {0}`)")]
    MissingTopic(String),
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
