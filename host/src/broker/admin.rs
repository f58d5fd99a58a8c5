//! Creating topics.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use super::{KafkaError, client_config};
use crate::config::KafkaConfig;

/// Creates each `(topic, partitions)` that does not exist yet. Topics that already
/// exist are left as they are.
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
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
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
