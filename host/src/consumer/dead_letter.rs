//! Dead letters: a record the reducer refused (wholly or partly) goes to
//! `<topic><dlq suffix>` with its key and value and headers saying why and where from.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use logq_abi::Source;

use crate::broker::producer::RecordProducer;
use crate::broker::{KafkaError, Record, Topics};
use crate::config::RunConfig;
use crate::fold::DeadLetter;
use crate::metrics::Metrics;

/// Sends dead letters and counts them.
pub struct DeadLetters {
    producer: RecordProducer,
    topics: Topics,
    suffix: String,
    metrics: Arc<Metrics>,
}

impl DeadLetters {
    /// A producer for the dead-letter topics of `config`.
    ///
    /// # Errors
    /// When librdkafka refuses the settings.
    pub fn new(
        config: &RunConfig,
        topics: Topics,
        metrics: Arc<Metrics>,
    ) -> Result<Self, KafkaError> {
        Ok(Self {
            producer: RecordProducer::new(&config.kafka)?,
            topics,
            suffix: config.dlq_suffix.clone(),
            metrics,
        })
    }

    /// Logs, counts and sends `record` (of stream `source`), refused as `d` says, with
    /// `applied` of its events applied.
    pub fn send(&self, source: Source, record: &Record<'_>, d: &DeadLetter, applied: u64) {
        let topic = self.topics.name(source);
        let dlq_topic = format!("{topic}{}", self.suffix);
        let reason = d.reason.as_str();
        tracing::warn!(
            topic,
            partition = record.partition,
            offset = record.offset,
            "dead-lettered to {dlq_topic}: {reason}"
        );
        self.metrics
            .topic(source)
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
        if let Err(e) = self.producer.send(&dlq_topic, record.key, value, &headers) {
            self.metrics.dlq_failed();
            tracing::error!(
                topic,
                partition = record.partition,
                offset = record.offset,
                "could not dead-letter to {dlq_topic}: {e}; reason was: {reason}"
            );
        }
    }

    /// Publishes the delivery failures the broker reported so far.
    pub fn report(&self) {
        self.metrics
            .set_dlq_delivery_failures(self.producer.deliveries().failed.load(Ordering::Relaxed));
    }

    /// Waits for every queued dead letter to be delivered or failed.
    ///
    /// # Errors
    /// When `timeout` passes first.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}
