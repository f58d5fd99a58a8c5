//! What the consumer loop learns from the broker off its own thread: the partitions'
//! high watermarks (for the lag) and partitions added to the topics while the host
//! runs.
//!
//! A thread and a client of their own: the loop's client has a fetch outstanding
//! most of the time and a broker may answer one connection's requests in turn, so a
//! metadata or watermark request there waits behind it (against nisshi every such
//! request timed out, and each one stalled the loop for half a second).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use crate::broker::consumer::{REQUEST_TIMEOUT, TopicConsumer};
use crate::broker::{Partition, Topics};
use crate::config::KafkaConfig;

/// How often the high watermarks are read (the freshness of the lag, and of a
/// standby's measure of it).
pub const HIGHS_EVERY: Duration = Duration::from_secs(1);
/// How often the partition lists are read again.
pub const PARTITIONS_EVERY: Duration = Duration::from_secs(5);

/// One piece of news for the loop.
#[derive(Debug)]
pub enum News {
    /// The high watermark of each known partition (those that answered).
    Highs(BTreeMap<Partition, i64>),
    /// Partitions that appeared in the topics.
    Added(Vec<Partition>),
}

/// Starts the watcher for `known` partitions; it ends when `stop` is set or the loop
/// drops the receiver. A client that cannot be created is logged: the loop goes on
/// without news (no lag, no new partitions).
pub fn start(
    kafka: &KafkaConfig,
    group_id: &str,
    topics: Topics,
    mut known: BTreeSet<Partition>,
    stop: Arc<AtomicBool>,
) -> Receiver<News> {
    let (tx, rx) = channel();
    let (kafka, group_id) = (kafka.clone(), group_id.to_owned());
    let spawned = std::thread::Builder::new()
        .name("logq-broker-watch".into())
        .spawn(move || {
            let client = match TopicConsumer::new(&kafka, &group_id, topics) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("no lag and no new partitions will be seen: {e}");
                    return;
                }
            };
            let mut next_list = Instant::now() + PARTITIONS_EVERY;
            while !stop.load(Ordering::Relaxed) {
                let mut highs = BTreeMap::new();
                for &p in &known {
                    match client.watermarks(p, REQUEST_TIMEOUT) {
                        Ok(w) => {
                            highs.insert(p, w.high);
                        }
                        Err(e) => {
                            // The broker is likely down: try again next round.
                            tracing::debug!("watermarks of {p}: {e}");
                            break;
                        }
                    }
                }
                if !highs.is_empty() && tx.send(News::Highs(highs)).is_err() {
                    return;
                }
                if Instant::now() >= next_list {
                    next_list = Instant::now() + PARTITIONS_EVERY;
                    match client.new_partitions(&known, REQUEST_TIMEOUT) {
                        Ok(added) if !added.is_empty() => {
                            known.extend(added.iter().copied());
                            if tx.send(News::Added(added)).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!("partition lists: {e}"),
                    }
                }
                std::thread::sleep(HIGHS_EVERY);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no lag and no new partitions will be seen: {e}");
    }
    rx
}
