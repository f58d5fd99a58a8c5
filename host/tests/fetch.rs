//! The consumer takes records from librdkafka a batch at a time (its fetch queue):
//! every record is read once and in its partition's order, also for a partition
//! unassigned and assigned again at once (librdkafka then drops the forwarding it
//! was given, and it must be set again); a poll keeps to its bounds and does not
//! wait for more records than have come; the re-key stage's origin header is read.
//!
//! The broker is librdkafka's in-process mock cluster (`logq dev`'s broker): these
//! tests are about how the client hands records over.

// Test helpers: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use logq::broker::consumer::TopicConsumer;
use logq::broker::mock::DevBroker;
use logq::broker::{Partition, Topics};
use logq::config::KafkaConfig;
use logq_abi::Source;
use rdkafka::ClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

fn users(id: i32) -> Partition {
    Partition {
        source: Source::Users,
        id,
    }
}

fn topics(rekeyed: bool) -> Topics {
    Topics {
        users: "users".into(),
        organizations: "organizations".into(),
        rekeyed_from: rekeyed.then(|| "users-in".into()),
    }
}

fn consumer(broker: &DevBroker, group: &str, rekeyed: bool) -> TopicConsumer {
    let kafka = KafkaConfig {
        brokers: broker.bootstrap_servers(),
        extra: Vec::new(),
    };
    TopicConsumer::new(&kafka, group, topics(rekeyed)).unwrap()
}

/// Produces `n` records of `size` bytes to each of `partitions` of `topic`, each
/// value naming its partition and sequence number, with an origin header that names
/// them too.
fn produce(broker: &DevBroker, topic: &str, partitions: &[i32], n: usize, size: usize) {
    let producer: BaseProducer<Deliveries> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create_with_context(Deliveries::default())
        .unwrap();
    for i in 0..n {
        for &p in partitions {
            let mut value = format!("{p}:{i}:").into_bytes();
            value.resize(size.max(value.len()), b'.');
            let origin = format!("users-in/{p}@{i}#0");
            let headers = OwnedHeaders::new().insert(Header {
                key: "logq.origin",
                value: Some(origin.as_bytes()),
            });
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
                .partition(p)
                .key(b"k".as_slice())
                .payload(value.as_slice())
                .headers(headers);
            while let Err((e, back)) = producer.send(record) {
                assert!(
                    e.to_string().contains("Queue full"),
                    "producing failed: {e}"
                );
                producer.poll(Duration::from_millis(10));
                record = back;
            }
        }
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let d = producer.context();
    assert_eq!(
        (
            d.ok.load(Ordering::SeqCst),
            d.failed.lock().unwrap().clone()
        ),
        (n * partitions.len(), Vec::new()),
        "every record delivered"
    );
}

/// What the broker acknowledged.
#[derive(Default)]
struct Deliveries {
    ok: AtomicUsize,
    failed: Mutex<Vec<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, (): ()) {
        match result {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::SeqCst);
            }
            Err((e, _)) => self.failed.lock().unwrap().push(e.to_string()),
        }
    }
}

/// Polls until `want` records came (failing after a deadline); returns each record
/// as (partition, offset, value's sequence number, the origin header's offset).
fn read(c: &TopicConsumer, want: usize, max_records: usize) -> Vec<(i32, i64, usize, Option<i64>)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.len() < want {
        assert!(
            Instant::now() < deadline,
            "read {} of {want} records: {:?}",
            out.len(),
            out.last()
        );
        let polled = c
            .poll(max_records, usize::MAX, Duration::from_millis(20))
            .unwrap();
        let records = polled.records();
        assert!(records.len() <= max_records, "{} records", records.len());
        for r in records {
            let value = std::str::from_utf8(r.value.unwrap()).unwrap();
            let seq = value.split(':').nth(1).unwrap().parse().unwrap();
            assert_eq!(r.topic, "users");
            out.push((r.partition, r.offset, seq, r.origin.map(|o| o.offset)));
        }
    }
    out
}

/// Each partition's records, in the order read.
fn by_partition(read: &[(i32, i64, usize, Option<i64>)]) -> BTreeMap<i32, Vec<i64>> {
    let mut out: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for (p, offset, _, _) in read {
        out.entry(*p).or_default().push(*offset);
    }
    out
}

#[test]
fn every_record_is_read_once_in_order_also_after_an_unassign_and_assign_at_once() {
    let broker = DevBroker::start(&["users".into(), "organizations".into()], 2).unwrap();
    produce(&broker, "users", &[0, 1], 3000, 40);
    let c = consumer(&broker, "fetch-test", true);
    c.assign(&[(users(0), None), (users(1), None)]).unwrap();
    let first = read(&c, 6000, 2500);
    let expected: Vec<i64> = (0..3000).collect();
    for (p, offsets) in by_partition(&first) {
        assert_eq!(offsets, expected, "partition {p}: once each, in order");
    }
    // The value, the offset and the origin header agree record by record.
    for (_, offset, seq, origin) in &first {
        assert_eq!((*seq as i64, *origin), (*offset, Some(*offset)));
    }
    // Partition 0 away and back at once, from offset 1000: its fetch stops after
    // the forwarding is set again, which then has to be set once more.
    for round in 0..5 {
        c.remove(&[users(0)]).unwrap();
        c.add_at(&[(users(0), 1000)]).unwrap();
        let again = read(&c, 2000, 700);
        let offsets = &by_partition(&again)[&0];
        assert_eq!(
            offsets,
            &(1000..3000).collect::<Vec<i64>>(),
            "round {round}: partition 0 read again from 1000"
        );
    }
    // New records of both partitions still come.
    produce(&broker, "users", &[0, 1], 10, 40);
    let more = read(&c, 20, 100);
    for (p, offsets) in by_partition(&more) {
        assert_eq!(offsets, (3000..3010).collect::<Vec<i64>>(), "partition {p}");
    }
}

#[test]
fn a_poll_keeps_to_its_bounds_and_waits_only_for_a_first_record() {
    let broker = DevBroker::start(&["users".into(), "organizations".into()], 1).unwrap();
    let c = consumer(&broker, "fetch-bounds-test", false);
    c.assign(&[(users(0), None)]).unwrap();
    // Nothing there: the poll waits as long as it was told, then returns nothing.
    let start = Instant::now();
    let polled = c.poll(100, usize::MAX, Duration::from_millis(300)).unwrap();
    assert!(polled.is_empty());
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    drop(polled);

    produce(&broker, "users", &[0], 3, 100);
    // Records there: a long wait is not spent waiting for more than came.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    while seen < 3 {
        assert!(Instant::now() < deadline, "{seen} of 3 records");
        let start = Instant::now();
        let polled = c.poll(100, usize::MAX, Duration::from_secs(5)).unwrap();
        let n = polled.records().len();
        assert!(n > 0);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{n} records took {:?}",
            start.elapsed()
        );
        seen += n;
    }

    // The bounds: 5000 records of 512 bytes, taken at most 1500 or about 50 KiB at
    // once. (The mock cluster keeps the last 5 MiB of a partition: 1 KiB records
    // were dropped before a loaded machine's consumer read them.)
    produce(&broker, "users", &[0], 5000, 512);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut seen, mut sizes) = (0, Vec::new());
    while seen < 5000 {
        assert!(Instant::now() < deadline, "{seen} of 5000 records");
        let by_count = c.poll(1500, usize::MAX, Duration::from_millis(20)).unwrap();
        let n = by_count.records().len();
        assert!(n <= 1500, "{n} records");
        seen += n;
        drop(by_count);
        let by_bytes = c
            .poll(usize::MAX, 50 << 10, Duration::from_millis(20))
            .unwrap();
        let bytes: usize = by_bytes
            .records()
            .iter()
            .map(|r| r.value.map_or(0, <[u8]>::len))
            .sum();
        // The bound, and at most one record past it.
        assert!(bytes < (50 << 10) + 512, "{bytes} bytes");
        seen += by_bytes.records().len();
        sizes.push((n, bytes));
    }
    // Full batches came by both bounds (not one record a poll).
    assert!(sizes.iter().any(|(n, _)| *n == 1500), "{sizes:?}");
    assert!(
        sizes.iter().any(|(_, b)| *b >= (50 << 10) - 512),
        "{sizes:?}"
    );
}
