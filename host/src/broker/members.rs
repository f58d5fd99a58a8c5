//! The members topic of a sharded group (`<group>.members`): each host's advert
//! (its address and partitions), keyed by its member id, read back by every host.
//! librdkafka exposes no custom member metadata, so the group itself cannot carry an
//! address; a compacted topic can.

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::producer::RecordProducer;
use super::{KafkaError, client_config};
use crate::config::KafkaConfig;

/// Writes this host's adverts and reads everyone's.
pub struct MembersLog {
    topic: String,
    producer: RecordProducer,
    consumer: BaseConsumer,
}

impl MembersLog {
    /// Clients for `topic` (which must exist), read from its beginning.
    ///
    /// # Errors
    /// When librdkafka refuses the settings or the assignment.
    pub fn open(kafka: &KafkaConfig, topic: &str) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer = client_config(
            kafka,
            &[
                ("group.id", "logq-members-reader"),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "false"),
                ("fetch.wait.max.ms", "100"),
            ],
        )
        .create()
        .map_err(|e| KafkaError::Config(e.to_string()))?;
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, 0, Offset::Beginning)?;
        consumer.assign(&list)?;
        Ok(Self {
            topic: topic.to_owned(),
            producer: RecordProducer::new(kafka)?,
            consumer,
        })
    }

    /// Queues `value` under `key` (an empty value: this member left).
    ///
    /// # Errors
    /// When the record cannot be queued.
    pub fn publish(&self, key: &str, value: &[u8]) -> Result<(), KafkaError> {
        self.producer
            .send(&self.topic, Some(key.as_bytes()), value, &[])
    }

    /// Waits until what was published is delivered (at most `timeout`).
    ///
    /// # Errors
    /// When `timeout` passes first.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }

    /// Adverts that arrived (key, value), waiting at most `wait` for the first.
    pub fn read(&self, wait: Duration) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut next = self.consumer.poll(wait);
        while let Some(m) = next {
            match m {
                Ok(m) => {
                    let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                    out.push((key, m.payload().unwrap_or_default().to_vec()));
                }
                Err(e) => tracing::debug!("members topic: {e}"),
            }
            next = self.consumer.poll(Duration::ZERO);
        }
        out
    }
}
