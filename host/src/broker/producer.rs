//! Sending records: dead letters and `logq produce`, with delivery accounting.

use std::collections::BTreeMap;
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
    /// Per topic and partition, the next offset after the last acknowledged record.
    reached: Mutex<BTreeMap<(String, i32), i64>>,
}

impl Deliveries {
    /// The position the acknowledged records reached, as a token (see
    /// [`super::position`]); empty when nothing was delivered.
    pub fn position(&self) -> String {
        let reached = self.reached.lock().unwrap_or_else(|p| p.into_inner());
        super::position::format(reached.iter().map(|((t, p), o)| (t.as_str(), *p, *o)))
    }

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
            Ok(m) => {
                use rdkafka::Message;
                self.delivered.fetch_add(1, Relaxed);
                let mut reached = self.reached.lock().unwrap_or_else(|p| p.into_inner());
                let next = reached
                    .entry((m.topic().to_owned(), m.partition()))
                    .or_insert(0);
                *next = (*next).max(m.offset() + 1);
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
            // Idempotent: a retry after a broker restart neither doubles nor
            // reorders records, and the log order decides equal event times.
            // Keyed records go where Kafka's Java clients would put them (murmur2 of
            // the key), so that hosts sharing partitions (`logq run --sharded`) find
            // a user's partition from its id (see [`super::group::partition_of`]).
            &[
                ("enable.idempotence", "true"),
                ("linger.ms", "5"),
                ("partitioner", "murmur2_random"),
            ],
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
        let mut record = BaseRecord::to(topic)
            .payload(value)
            .headers(owned_headers(headers));
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

    /// Asks the broker for `topic` and waits up to `timeout` for its answer, so a
    /// wrong address fails at once, naming itself, instead of after the queued
    /// records time out.
    ///
    /// # Errors
    /// [`KafkaError::Unreachable`] when no broker answers at `brokers`,
    /// [`KafkaError::MissingTopic`] when the topic does not exist.
    pub fn check(&self, brokers: &str, topic: &str, timeout: Duration) -> Result<(), KafkaError> {
        let metadata = self
            .producer
            .client()
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| KafkaError::Unreachable {
                brokers: brokers.to_owned(),
                waited: timeout,
                error: e.to_string(),
            })?;
        match metadata.topics().iter().find(|t| t.name() == topic) {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
            _ => Err(KafkaError::MissingTopic(topic.to_owned())),
        }
    }
}

/// Text headers as librdkafka takes them.
fn owned_headers(headers: &[(impl AsRef<str>, impl AsRef<str>)]) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |h, (k, v)| {
            h.insert(Header {
                key: k.as_ref(),
                value: Some(v.as_ref().as_bytes()),
            })
        },
    )
}

/// Which source record a dead letter is for: its partition and offset.
pub type LetterKey = (super::Partition, i64);

/// What the broker said about each dead letter, collected by librdkafka's thread
/// until the consumer loop takes it.
#[derive(Debug, Default)]
pub struct LetterOutcomes {
    acked: Mutex<Vec<LetterKey>>,
    failed: Mutex<Vec<(LetterKey, String)>>,
}

impl ClientContext for LetterOutcomes {}

impl ProducerContext for LetterOutcomes {
    type DeliveryOpaque = Box<LetterKey>;

    fn delivery(&self, result: &DeliveryResult<'_>, key: Box<LetterKey>) {
        match result {
            Ok(_) => lock(&self.acked).push(*key),
            Err((e, _)) => lock(&self.failed).push((*key, e.to_string())),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The dead-letter producer: idempotent, acknowledged by every in-sync replica
/// (`acks=all`), and each record's outcome reported by its source key, so the consumer
/// loop commits a source offset only once its dead letter is safe.
pub struct LetterProducer {
    producer: ThreadedProducer<LetterOutcomes>,
}

impl LetterProducer {
    /// Creates the client.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka refuses the settings.
    pub fn new(kafka: &KafkaConfig) -> Result<Self, KafkaError> {
        let producer = client_config(
            kafka,
            &[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("linger.ms", "5"),
            ],
        )
        .create_with_context(LetterOutcomes::default())
        .map_err(|e| KafkaError::Config(e.to_string()))?;
        Ok(Self { producer })
    }

    /// Queues the dead letter of source record `key`; its outcome comes later from
    /// [`LetterProducer::take_outcomes`].
    ///
    /// # Errors
    /// When it cannot even be queued (then no outcome will come for it).
    pub fn send(
        &self,
        key: LetterKey,
        topic: &str,
        record_key: Option<&[u8]>,
        value: &[u8],
        headers: &[(String, String)],
    ) -> Result<(), KafkaError> {
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(key))
            .payload(value)
            .headers(owned_headers(headers));
        if let Some(k) = record_key {
            record = record.key(k);
        }
        self.producer.send(record).map_err(|(e, _)| e.into())
    }

    /// The dead letters acknowledged, and those that failed with the reason, since
    /// the last call.
    pub fn take_outcomes(&self) -> (Vec<LetterKey>, Vec<(LetterKey, String)>) {
        let ctx = self.producer.context();
        (
            std::mem::take(&mut *lock(&ctx.acked)),
            std::mem::take(&mut *lock(&ctx.failed)),
        )
    }

    /// Waits until every queued dead letter is delivered or failed.
    ///
    /// # Errors
    /// When `timeout` passes first.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)?;
        Ok(())
    }
}
