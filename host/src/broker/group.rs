//! Sharing the users topic's partitions among hosts (`logq run --sharded`) through the
//! broker's own consumer-group protocol: no coordinator of our own.
//!
//! A [`Member`] joins the group with the cooperative-sticky assignor and a stable
//! member id (`group.instance.id`), so a restart within the session timeout keeps its
//! partitions. It reads nothing itself: every partition it is given is paused at once
//! (the consumer loop reads with its own client, by assignment), and what changes is
//! handed to the loop as [`Ownership`] news. A revocation waits (bounded) for the loop
//! to stop folding the partitions and hand over their progress, which is committed
//! before the partitions go: the next holder starts where this one stopped, and dead
//! letters below that offset are not sent again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::topic_partition_list::TopicPartitionList;

use super::{KafkaError, client_config, commit_offsets, committed_at, join_within};
use crate::config::KafkaConfig;

/// How long a revocation waits for the loop to hand over the partitions' progress.
const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// Kafka's murmur2 (as its Java clients hash keys), for [`partition_of`].
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `partitions` a record keyed `key` goes to, as Kafka's Java
/// clients (and librdkafka's `murmur2_random`, which `logq produce` uses) choose it.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// What changed in this host's share of the partitions.
#[derive(Debug)]
pub enum Ownership {
    /// These partitions are this host's now, each with the group's committed offset
    /// (the next to read), if any.
    Assigned(Vec<(i32, Option<i64>)>),
    /// The group's generation this host's client is in now: sent before the
    /// assignment or revocation that comes with it.
    Generation(i32),
    /// These partitions go to another host, or (`lost`) went already: this host was
    /// thought dead. The loop stops folding them and answers with the progress to
    /// commit for them (next offset per partition); the group waits for that answer.
    Revoked {
        /// The partitions.
        partitions: Vec<i32>,
        /// Whether another host has them already.
        lost: bool,
        /// Where the loop answers.
        ack: SyncSender<BTreeMap<i32, i64>>,
    },
}

struct GroupContext {
    topic: String,
    news: Sender<Ownership>,
    /// Set when this host stops: the client's close revokes everything locally,
    /// and nobody is left to hand partitions over to.
    closing: Arc<AtomicBool>,
}

impl ClientContext for GroupContext {}

fn ids(list: &TopicPartitionList) -> Vec<i32> {
    list.elements().iter().map(|e| e.partition()).collect()
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        if self.closing.load(Ordering::Relaxed) {
            return;
        }
        let revoked = ids(list);
        if revoked.is_empty() {
            return;
        }
        let (ack, handed) = sync_channel(1);
        let lost = consumer.assignment_lost();
        if let Some(g) = generation(consumer) {
            let _ = self.news.send(Ownership::Generation(g));
        }
        let news = Ownership::Revoked {
            partitions: revoked,
            lost,
            ack,
        };
        if self.news.send(news).is_err() {
            return;
        }
        let Ok(progress) = handed.recv_timeout(HANDOVER_WAIT) else {
            tracing::warn!("the loop did not hand over revoked partitions in time");
            return;
        };
        if lost {
            // Another host has them already; its commits are the ones that count.
            return;
        }
        if let Err(e) = commit_offsets(consumer, &self.topic, &progress, CommitMode::Sync) {
            tracing::warn!("committing revoked partitions: {e}");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(list) = rebalance else {
            return;
        };
        // This client only keeps the membership: the loop reads the partitions.
        if list.count() > 0
            && let Err(e) = consumer.pause(list)
        {
            tracing::warn!("pausing the group client's partitions: {e}");
        }
        let committed = consumer
            .committed_offsets((*list).clone(), Duration::from_secs(10))
            .unwrap_or_else(|e| {
                tracing::warn!("committed offsets of new partitions unknown ({e})");
                TopicPartitionList::new()
            });
        let assigned = ids(list)
            .into_iter()
            .map(|p| (p, committed_at(&committed, &self.topic, p)))
            .collect();
        if let Some(g) = generation(consumer) {
            let _ = self.news.send(Ownership::Generation(g));
        }
        let _ = self.news.send(Ownership::Assigned(assigned));
    }
}

/// The group generation `consumer` is in: librdkafka keeps it in the consumer group
/// metadata, which it gives out only serialized (`rd_kafka_consumer_group_metadata_write`:
/// a 7-byte magic, then the generation). `None` outside a group, or if the format
/// is not the one known here.
#[allow(unsafe_code)]
fn generation<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Option<i32> {
    use rdkafka::bindings as rd;
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is this live client's handle. The metadata object is owned here
    // and destroyed once; the buffer librdkafka writes is owned here, read only
    // within the size it says, and freed with librdkafka's own free.
    unsafe {
        let md = rd::rd_kafka_consumer_group_metadata(rk);
        if md.is_null() {
            return None;
        }
        let mut buf: *mut std::ffi::c_void = std::ptr::null_mut();
        let mut size: usize = 0;
        let error = rd::rd_kafka_consumer_group_metadata_write(md, &raw mut buf, &raw mut size);
        rd::rd_kafka_consumer_group_metadata_destroy(md);
        if !error.is_null() {
            rd::rd_kafka_error_destroy(error);
            return None;
        }
        if buf.is_null() {
            return None;
        }
        let found = generation_in(std::slice::from_raw_parts(buf.cast::<u8>(), size));
        rd::rd_kafka_mem_free(rk, buf);
        found
    }
}

/// The generation in serialized consumer group metadata (librdkafka's format 2:
/// `CGMDv2:`, then the generation as a native-endian `i32`, then the ids).
fn generation_in(bytes: &[u8]) -> Option<i32> {
    let rest = bytes.strip_prefix(b"CGMDv2:")?;
    Some(i32::from_ne_bytes(rest.get(..4)?.try_into().ok()?))
}

/// The newest progress handed over (each supersedes the ones before it).
fn newest(handed: &Receiver<BTreeMap<i32, i64>>) -> Option<BTreeMap<i32, i64>> {
    let mut latest = None;
    while let Ok(progress) = handed.try_recv() {
        latest = Some(progress);
    }
    latest
}

/// This host's membership of the group: a thread that keeps it alive and commits
/// the progress the loop hands it.
pub struct Member {
    commits: Sender<BTreeMap<i32, i64>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How a host joins: the group, its stable id, and how soon it is thought dead.
#[derive(Debug, Clone)]
pub struct Joining {
    /// The consumer group.
    pub group: String,
    /// This host's stable member id (`group.instance.id`).
    pub instance: String,
    /// The topic whose partitions are shared.
    pub topic: String,
    /// Without a heartbeat for this long, a host's partitions go to the others.
    pub session_timeout: Duration,
}

impl Member {
    /// Joins; ownership news arrive on the receiver from the first assignment on.
    ///
    /// # Errors
    /// When librdkafka refuses the settings or the subscription.
    pub fn join(
        kafka: &KafkaConfig,
        joining: &Joining,
    ) -> Result<(Self, Receiver<Ownership>), KafkaError> {
        let (news, receiver) = channel();
        let closing = Arc::new(AtomicBool::new(false));
        let make = {
            let (kafka, joining, closing) = (kafka.clone(), joining.clone(), closing.clone());
            move || -> Result<BaseConsumer<GroupContext>, KafkaError> {
                let session = joining.session_timeout.as_millis().max(1).to_string();
                let heartbeat = (joining.session_timeout.as_millis() / 4).max(1).to_string();
                let consumer: BaseConsumer<GroupContext> = client_config(
                    &kafka,
                    &[
                        ("group.id", joining.group.as_str()),
                        ("group.instance.id", joining.instance.as_str()),
                        ("partition.assignment.strategy", "cooperative-sticky"),
                        ("session.timeout.ms", session.as_str()),
                        ("heartbeat.interval.ms", heartbeat.as_str()),
                        ("enable.auto.commit", "false"),
                        ("auto.offset.reset", "earliest"),
                    ],
                )
                .create_with_context(GroupContext {
                    topic: joining.topic.clone(),
                    news: news.clone(),
                    closing: closing.clone(),
                })
                .map_err(|e| KafkaError::Config(e.to_string()))?;
                consumer.subscribe(&[joining.topic.as_str()])?;
                Ok(consumer)
            }
        };
        let mut consumer = make()?;
        let (commits, to_commit) = channel::<BTreeMap<i32, i64>>();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let topic = joining.topic.clone();
            std::thread::Builder::new()
                .name("logq-group".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        // Paused partitions deliver nothing: this serves the group's
                        // heartbeats and rebalances.
                        if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                            tracing::debug!("group client: {e}");
                        }
                        if let Some((_, why)) = consumer.client().fatal_error() {
                            // A host thought dead and back is fenced by the group (its old
                            // member id is gone): the client can do nothing more. A new
                            // one joins under the same stable id and takes it over.
                            tracing::warn!("the group fenced this host ({why}): joining again");
                            drop(consumer);
                            loop {
                                match make() {
                                    Ok(fresh) => {
                                        consumer = fresh;
                                        break;
                                    }
                                    Err(e) => {
                                        tracing::error!("joining the group again: {e}");
                                        std::thread::sleep(Duration::from_secs(1));
                                    }
                                }
                            }
                        }
                        if let Some(progress) = newest(&to_commit)
                            && let Err(e) =
                                commit_offsets(&consumer, &topic, &progress, CommitMode::Async)
                        {
                            tracing::debug!("committing progress: {e}");
                        }
                    }
                    // The loop's last progress, committed before the client goes. A
                    // static member keeps its partitions for the session timeout
                    // (a restart within it finds them again, KIP-345).
                    if let Some(progress) = newest(&to_commit)
                        && let Err(e) =
                            commit_offsets(&consumer, &topic, &progress, CommitMode::Sync)
                    {
                        tracing::warn!("committing progress before leaving: {e}");
                    }
                    closing.store(true, Ordering::Relaxed);
                })
                .map_err(|e| KafkaError::Config(format!("starting the group thread: {e}")))?
        };
        Ok((
            Self {
                commits,
                stop,
                thread: Some(thread),
            },
            receiver,
        ))
    }

    /// Commits `progress` (next offset per partition of this host) soon.
    pub fn commit(&self, progress: BTreeMap<i32, i64>) {
        let _ = self.commits.send(progress);
    }
}

/// Longest a leaving host waits for its group client to commit and close. With the
/// broker gone, librdkafka's close can wait for ever: a host stopped by SIGTERM after
/// its broker was stayed up for an hour (its consumer thread waiting here).
const LEAVE_MAX: Duration = Duration::from_secs(10);

impl Drop for Member {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            join_within(t, LEAVE_MAX, "the group client");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// librdkafka's own serialized metadata of a group generation is read back, and
    /// anything else is not taken for one.
    #[test]
    #[allow(unsafe_code)]
    fn a_generation_is_read_from_librdkafkas_group_metadata() {
        use rdkafka::bindings as rd;
        let group = std::ffi::CString::new("g").unwrap();
        let member = std::ffi::CString::new("m").unwrap();
        // SAFETY: the strings outlive the calls; the object and the buffer are owned
        // here and freed once.
        let written = unsafe {
            let md = rd::rd_kafka_consumer_group_metadata_new_with_genid(
                group.as_ptr(),
                42,
                member.as_ptr(),
                std::ptr::null(),
            );
            let mut buf: *mut std::ffi::c_void = std::ptr::null_mut();
            let mut size: usize = 0;
            let error = rd::rd_kafka_consumer_group_metadata_write(md, &raw mut buf, &raw mut size);
            assert!(error.is_null());
            rd::rd_kafka_consumer_group_metadata_destroy(md);
            let bytes = std::slice::from_raw_parts(buf.cast::<u8>(), size).to_vec();
            rd::rd_kafka_mem_free(std::ptr::null_mut(), buf);
            bytes
        };
        assert_eq!(generation_in(&written), Some(42));
        assert_eq!(generation_in(b"CGMDv1:\x2a\0\0\0g"), None);
        assert_eq!(generation_in(b"CGMDv2:\x2a"), None);
    }

    /// The values Kafka's own test of its Java murmur2 expects (`UtilsTest`).
    #[test]
    fn murmur2_is_kafkas() {
        for (key, hash) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(key.as_bytes()), hash, "{key}");
        }
        assert!((0..6).contains(&partition_of(b"any id", 6)));
    }
}
