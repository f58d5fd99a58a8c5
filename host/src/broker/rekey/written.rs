//! How far the re-key stage has written, for read-your-writes: a client's position
//! token names the topic it produced to (`users/0@124`: everything below offset 124
//! of partition 0), which a re-keying host does not fold. The stage commits an input
//! offset only after every output below it is acknowledged, so once the stage's
//! group has committed 124 or more for `users/0`, every record the client wrote there
//! is in the internal topic below its high watermarks as read after that commit was
//! seen: a host that has folded its partitions up to those has the client's writes.
//! (It may wait for a little more than it must: records written after the client's.)

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::TopicPartitionList;

use crate::broker::{KafkaError, client_config, committed_at};
use crate::config::KafkaConfig;

/// Reads the stage's committed offsets and the internal topic's high watermarks, with
/// a client of its own (it joins no group: it only asks the stage's for its commits).
pub struct Written {
    client: BaseConsumer,
    /// The producers' users topic, which the stage reads.
    input: String,
    /// The internal topic it writes.
    output: String,
}

impl std::fmt::Debug for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Written")
            .field("input", &self.input)
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

impl Written {
    /// A reader of the progress of the stage group `group`, re-keying `input` into
    /// `output`.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka refuses the settings.
    pub fn new(
        kafka: &KafkaConfig,
        group: &str,
        input: &str,
        output: &str,
    ) -> Result<Self, KafkaError> {
        let client: BaseConsumer = client_config(
            kafka,
            &[("group.id", group), ("enable.auto.commit", "false")],
        )
        .create()
        .map_err(|e| KafkaError::Config(e.to_string()))?;
        Ok(Self {
            client,
            input: input.to_owned(),
            output: output.to_owned(),
        })
    }

    /// The topic the producers write.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// Of `wanted` (next offsets of the input's partitions), those the stage has not
    /// committed yet, each with how far short its commit is (the whole offset when
    /// it has none). Blocks for a broker round trip.
    ///
    /// # Errors
    /// What the broker or librdkafka reports.
    pub fn short_of(
        &self,
        wanted: &BTreeMap<i32, i64>,
        timeout: Duration,
    ) -> Result<BTreeMap<i32, i64>, KafkaError> {
        let mut list = TopicPartitionList::new();
        for p in wanted.keys() {
            list.add_partition(&self.input, *p);
        }
        let committed = self.client.committed_offsets(list, timeout)?;
        Ok(wanted
            .iter()
            .filter_map(|(p, want)| {
                let have = committed_at(&committed, &self.input, *p).unwrap_or(0);
                (have < *want).then_some((*p, want - have))
            })
            .collect())
    }

    /// The internal topic's high watermark of each of `partitions`. Blocks for a
    /// broker round trip each.
    ///
    /// # Errors
    /// What the broker or librdkafka reports.
    pub fn highs(
        &self,
        partitions: &[i32],
        timeout: Duration,
    ) -> Result<BTreeMap<i32, i64>, KafkaError> {
        partitions
            .iter()
            .map(|p| {
                let (_, high) = self.client.fetch_watermarks(&self.output, *p, timeout)?;
                Ok((*p, high))
            })
            .collect()
    }
}
