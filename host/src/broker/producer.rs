//! Sending records: dead letters and `logq produce`, with delivery accounting.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use super::{KafkaError, client_config};
use crate::config::KafkaConfig;

/// Counts deliveries as the broker confirms them.
#[derive(Debug, Default)]
pub struct Deliveries {
    /// Records the broker acknowledged.
    pub delivered: AtomicU64,
    /// Records that could not be delivered.
    pub failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Deliveries {
    /// The most recent delivery error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Relaxed);
            }
            Err((e, m)) => {
                use rdkafka::Message;
                self.failed.fetch_add(1, Relaxed);
                let text = format!("delivery to {} failed: {e}", m.topic());
                tracing::error!("{text}");
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
            }
        }
    }
}

/// A producer whose deliveries are counted in [`Deliveries`].
pub struct RecordProducer {
    producer: ThreadedProducer<Deliveries>,
}

impl RecordProducer {
    /// Creates the client.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka refuses the settings.
    pub fn new(kafka: &KafkaConfig) -> Result<Self, KafkaError> {
        let producer = client_config(
            kafka,
            &[("enable.idempotence", "false"), ("linger.ms", "5")],
        )
        .create_with_context(Deliveries::default())
        .map_err(|e| KafkaError::Config(e.to_string()))?;
        Ok(Self { producer })
    }

    /// Queues one record; waits (up to 30 s) while the local queue is full.
    ///
    /// # Errors
    /// When the record cannot be queued (too large, unknown topic, queue stuck).
    pub fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), KafkaError> {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = BaseRecord::to(topic).payload(value).headers(h);
        if let Some(key) = key {
            record = record.key(key);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((rdkafka::error::KafkaError::MessageProduction(code), back))
                    if code == rdkafka::types::RDKafkaErrorCode::QueueFull
                        && Instant::now() < deadline =>
                {
                    record = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Waits until every queued record is delivered or failed.
    ///
    /// # Errors
    /// When `timeout` passes first.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)?;
        Ok(())
    }

    /// Delivery counts so far.
    pub fn deliveries(&self) -> &Deliveries {
        self.producer.context()
    }
}
