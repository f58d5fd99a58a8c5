//! Creating topics.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use super::{KafkaError, client_config};
use crate::config::KafkaConfig;

/// Creates each `(topic, partitions)` that does not exist yet. Topics that already
/// exist are left as they are; when all exist, nothing is asked of the broker but
/// metadata (some brokers, librdkafka's mock among them, never answer `CreateTopics`).
///
/// # Errors
/// The first topic that could not be created, with the broker's reason.
pub async fn create_topics(
    kafka: &KafkaConfig,
    topics: &[(String, i32)],
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka, &[])
        .create()
        .map_err(|e| KafkaError::Config(e.to_string()))?;
    let admin = std::sync::Arc::new(admin);
    let lookup = admin.clone();
    let existing: Vec<String> = tokio::task::spawn_blocking(move || {
        lookup
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|m| m.topics().iter().map(|t| t.name().to_owned()).collect())
    })
    .await
    .map_err(|e| KafkaError::Broker(e.to_string()))??;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .filter(|(name, _)| !existing.contains(name))
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::Broker(format!(
                    "creating topic {topic}: {code}"
                )));
            }
        }
    }
    Ok(())
}

/// How many partitions `topic` has; `None` when it does not exist.
///
/// # Errors
/// When the broker does not answer within 10 s.
pub async fn partitions(kafka: &KafkaConfig, topic: &str) -> Result<Option<i32>, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka, &[])
        .create()
        .map_err(|e| KafkaError::Config(e.to_string()))?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let metadata = admin
            .inner()
            .fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| i32::try_from(t.partitions().len()).unwrap_or(i32::MAX)))
    })
    .await
    .map_err(|e| KafkaError::Broker(e.to_string()))?
}
