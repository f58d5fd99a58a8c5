//! librdkafka's in-process mock cluster: a Kafka-protocol broker in memory, for
//! `logq dev`. Data is lost when the process exits; it is not for production. It
//! keeps the last 5 MiB or 100,000 records of each partition (librdkafka's fixed
//! limits): older records are dropped as more arrive.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use super::KafkaError;

/// A running development broker. Dropping it stops it.
pub struct DevBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl DevBroker {
    /// Starts a one-broker cluster with `topics` created (`partitions` each).
    ///
    /// # Errors
    /// When librdkafka cannot start the cluster or create a topic.
    pub fn start(topics: &[String], partitions: i32) -> Result<Self, KafkaError> {
        let cluster = MockCluster::new(1)?;
        for topic in topics {
            cluster.create_topic(topic, partitions, 1)?;
        }
        Ok(Self { cluster })
    }

    /// The bootstrap address clients connect to.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}
