//! Taking fetched records from librdkafka many at a time.
//!
//! rust-rdkafka hands over one record per poll: an event, a reference count and a
//! clock reading each. Catching up on 65,536 records, that was a third of the
//! consumer thread's time (clock reads 15%, malloc/free 13%, queue locking), time
//! taken from the fold lanes on a machine with as many lanes as cores.
//!
//! Here every assigned partition's fetch queue is forwarded to one queue of our own,
//! which holds records only, and [`FetchQueue::take`] takes them up to
//! [`TAKE_MAX`] at a call with `rd_kafka_consume_batch_queue`. The consumer's own
//! queue stays where rust-rdkafka polls it, for everything else (commit results,
//! errors), so nothing it handles is handed to the batch call, which would treat a
//! rebalance or a commit result as a record.
//!
//! librdkafka clears a partition's forwarding when it stops fetching it (an
//! unassign), and does not set it again at the next assign once an application has
//! set it: [`FetchQueue::forward`] is therefore called again before every batch. A
//! record fetched while a partition was not forwarded goes to the consumer's queue,
//! which the caller drains first; the partition's later records come here.

use std::ffi::{CStr, CString};
use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::types::RDKafkaErrorCode;

use super::KafkaError;

/// Most records one [`FetchQueue::take`] hands over: a batch is taken in several,
/// so that it stops soon after its byte bound.
pub const TAKE_MAX: usize = 1024;

/// A queue of our own that assigned partitions' records are forwarded to.
pub struct FetchQueue {
    queue: NonNull<rd::rd_kafka_queue_t>,
    rk: NonNull<rd::rd_kafka_t>,
}

// SAFETY: librdkafka's queues and client handle are thread-safe (every operation
// takes the queue's lock); the handle is only destroyed in `drop`.
#[allow(unsafe_code)]
unsafe impl Send for FetchQueue {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for FetchQueue {}

impl FetchQueue {
    /// A new queue on `consumer`'s client. It must be dropped before the client.
    ///
    /// # Errors
    /// When librdkafka cannot make one.
    #[allow(unsafe_code)]
    pub fn new(consumer: &BaseConsumer) -> Result<Self, KafkaError> {
        let rk = NonNull::new(consumer.client().native_ptr())
            .ok_or_else(|| KafkaError::Config("no client handle".into()))?;
        // SAFETY: `rk` is the live client's handle; the queue is owned here.
        let queue = NonNull::new(unsafe { rd::rd_kafka_queue_new(rk.as_ptr()) })
            .ok_or_else(|| KafkaError::Config("librdkafka made no queue".into()))?;
        Ok(Self { queue, rk })
    }

    /// Forwards the records of `partitions` (topic, partition) here, from now on
    /// (records already fetched move along).
    #[allow(unsafe_code)]
    pub fn forward(&self, partitions: &[(CString, i32)]) {
        for (topic, partition) in partitions {
            // SAFETY: `rk` is live; the partition's queue handle is released right
            // after its forwarding is set (the forwarding outlives the handle).
            unsafe {
                let from =
                    rd::rd_kafka_queue_get_partition(self.rk.as_ptr(), topic.as_ptr(), *partition);
                if from.is_null() {
                    tracing::warn!("kafka: no fetch queue for {topic:?} [{partition}]");
                    continue;
                }
                rd::rd_kafka_queue_forward(from, self.queue.as_ptr());
                rd::rd_kafka_queue_destroy(from);
            }
        }
    }

    /// Appends up to `max` records (at most [`TAKE_MAX`]) to `into`, waiting up to
    /// `wait` for the first. Returns how many librdkafka handed over. Errors it
    /// reports in place of records (a partition that cannot be fetched) go to
    /// `errors`.
    #[allow(unsafe_code)]
    pub fn take(
        &self,
        into: &mut Vec<Fetched>,
        max: usize,
        wait: Duration,
        errors: &mut Vec<KafkaError>,
    ) -> usize {
        let mut raw = [std::ptr::null_mut::<rd::rd_kafka_message_t>(); TAKE_MAX];
        let max = max.min(TAKE_MAX);
        let wait_ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `raw` has room for `max` pointers; librdkafka writes at most that
        // many and says how many.
        let got = unsafe {
            rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), wait_ms, raw.as_mut_ptr(), max)
        };
        let got = usize::try_from(got).unwrap_or(0).min(max);
        for &m in &raw[..got] {
            let Some(m) = NonNull::new(m) else { continue };
            // SAFETY: a message librdkafka returned, alive until `fetched` drops.
            let fetched = Fetched(m, unsafe { *m.as_ptr() });
            let err = fetched.1.err;
            if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                into.push(fetched);
            } else {
                errors.push(KafkaError::Broker(format!(
                    "{} ({})",
                    RDKafkaErrorCode::from(err),
                    fetched.error_text()
                )));
            }
        }
        got
    }
}

impl Drop for FetchQueue {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: owned here, destroyed once.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) }
    }
}

/// One record taken from a [`FetchQueue`], in librdkafka's buffers until dropped,
/// with a copy of its fields: read when it was taken, while librdkafka had just
/// touched them, and contiguous with the batch's others (reading each from its own
/// allocation later cost a cache miss or two a record: 4-6 ms a batch of 65,536,
/// with the lanes waiting).
pub struct Fetched(NonNull<rd::rd_kafka_message_t>, rd::rd_kafka_message_t);

// SAFETY: a message is librdkafka's heap object, destroyed from any thread.
#[allow(unsafe_code)]
unsafe impl Send for Fetched {}
// SAFETY: only read through `&self`.
#[allow(unsafe_code)]
unsafe impl Sync for Fetched {}

#[allow(unsafe_code)]
impl Fetched {
    fn message(&self) -> &rd::rd_kafka_message_t {
        &self.1
    }

    /// A `(pointer, length)` pair of the message as bytes (`None` for null).
    fn bytes(&self, ptr: *mut std::ffi::c_void, len: usize) -> Option<&[u8]> {
        if ptr.is_null() {
            return None;
        }
        // SAFETY: librdkafka's buffer of `len` bytes, alive with the message.
        Some(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
    }

    /// The topic handle, which identifies the topic without reading its name.
    pub fn topic_handle(&self) -> usize {
        self.message().rkt as usize
    }

    /// The topic's name.
    pub fn topic(&self) -> &str {
        let rkt = self.message().rkt;
        if rkt.is_null() {
            return "";
        }
        // SAFETY: the message holds a reference to its topic, whose name is a
        // NUL-terminated string that lives as long as the topic.
        unsafe { CStr::from_ptr(rd::rd_kafka_topic_name(rkt)) }
            .to_str()
            .unwrap_or("")
    }

    /// The partition.
    pub fn partition(&self) -> i32 {
        self.message().partition
    }

    /// The offset.
    pub fn offset(&self) -> i64 {
        self.message().offset
    }

    /// The key, if any.
    pub fn key(&self) -> Option<&[u8]> {
        let m = self.message();
        self.bytes(m.key, m.key_len)
    }

    /// The value (`None`: a tombstone).
    pub fn payload(&self) -> Option<&[u8]> {
        let m = self.message();
        self.bytes(m.payload, m.len)
    }

    /// The value's length.
    pub fn payload_len(&self) -> usize {
        self.message().len
    }

    /// The record's timestamp in milliseconds since the epoch, if it has one.
    pub fn timestamp_ms(&self) -> Option<i64> {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a live message; `kind` is written.
        let ms = unsafe { rd::rd_kafka_message_timestamp(self.0.as_ptr(), &raw mut kind) };
        (kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && ms >= 0)
            .then_some(ms)
    }

    /// The value of the first header named `name`, if any.
    pub fn header(&self, name: &CStr) -> Option<&[u8]> {
        let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        let mut value: *const std::ffi::c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: a live message; the headers and the value stay with it.
        unsafe {
            if rd::rd_kafka_message_headers(self.0.as_ptr(), &raw mut headers)
                != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                || headers.is_null()
            {
                return None;
            }
            if rd::rd_kafka_header_get(headers, 0, name.as_ptr(), &raw mut value, &raw mut size)
                != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            {
                return None;
            }
        }
        if value.is_null() {
            return None;
        }
        // SAFETY: `size` bytes at `value`, owned by the message's headers.
        Some(unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) })
    }

    /// librdkafka's words for an error message.
    fn error_text(&self) -> String {
        // SAFETY: a live message; the text is NUL-terminated and lives with it.
        unsafe {
            let text = rd::rd_kafka_message_errstr(self.0.as_ptr());
            if text.is_null() {
                return String::new();
            }
            CStr::from_ptr(text).to_string_lossy().into_owned()
        }
    }
}

impl Drop for Fetched {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: owned here, destroyed once.
        unsafe { rd::rd_kafka_message_destroy(self.0.as_ptr()) }
    }
}
