//! The one stepper of the live loop and replays: every record moves its partition on,
//! whatever becomes of it. A log that ends in compaction tombstones (null values) is
//! read to its end, a refused record is handed to the observer with its place in the
//! log, and a stepper that must not poll ahead holds no batch it has not folded.
//!
//! The broker is librdkafka's in-process mock cluster (`logq dev`'s broker): these
//! tests are about what the stepper does with the records a client hands it; the
//! end-to-end replay and rollback over a log ending in tombstones run against a real
//! broker process (tests/tests/rollback.rs).

// Test helpers: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use logq::broker::consumer::{POLL_WAIT, TopicConsumer};
use logq::broker::mock::DevBroker;
use logq::broker::{Partition, Positions, Record, Topics};
use logq::config::KafkaConfig;
use logq::fold::{DEFAULT_REDUCER, DeadLetter, Limits, Reducer, Runtime};
use logq::state::Writer;
use logq::step::{Ahead, Observer, Stepper};
use logq_abi::Source;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const USERS: Partition = Partition {
    source: Source::Users,
    id: 0,
};
const ORGANIZATIONS: Partition = Partition {
    source: Source::Organizations,
    id: 0,
};

fn topics() -> Topics {
    Topics {
        users: "users".into(),
        organizations: "organizations".into(),
        rekeyed_from: None,
    }
}

fn reducer() -> Reducer {
    let runtime = Runtime::new(
        Limits {
            memory_bytes: 128 << 20,
            time: Duration::from_secs(10),
        },
        None,
    )
    .unwrap();
    runtime.load(DEFAULT_REDUCER).unwrap()
}

fn user(id: &str, kind: &str, at: &str) -> String {
    serde_json::json!({"id": id, "event_type": kind, "username": id,
        "organization_name": "Outer Heaven", "received_at": at})
    .to_string()
}

/// Produces `(topic, value)` records in order; `None` is a compaction tombstone.
fn produce(broker: &DevBroker, records: &[(&str, Option<&str>)]) {
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    for (topic, value) in records {
        let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).key(b"k".as_slice());
        if let Some(v) = value {
            r = r.payload(v.as_bytes());
        }
        producer.send(r).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

/// Refusals as the observer saw them: (partition, offset, reason).
#[derive(Default)]
struct Seen(Vec<(i32, i64, String)>);

impl Observer for Seen {
    fn refused(&mut self, _: Source, record: &Record<'_>, why: &DeadLetter, _: u64) {
        self.0
            .push((record.partition, record.offset, why.reason.clone()));
    }
}

fn consumer(broker: &DevBroker, group: &str) -> TopicConsumer {
    let kafka = KafkaConfig {
        brokers: broker.bootstrap_servers(),
        extra: Vec::new(),
    };
    let c = TopicConsumer::new(&kafka, group, topics()).unwrap();
    c.assign(&[(USERS, None), (ORGANIZATIONS, None)]).unwrap();
    c
}

fn stepper(c: &TopicConsumer, ahead: Ahead) -> Stepper<'_> {
    Stepper::new(c, 2000, 1 << 20, Duration::from_secs(2), 2, ahead)
}

/// Steps until `positions` reach `goal`, failing loudly after a deadline.
fn step_until(
    stepper: &mut Stepper<'_>,
    reducer: &Reducer,
    store: &Writer,
    positions: &mut Positions,
    goal: &Positions,
    seen: &mut Seen,
) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut tombstones, mut applied) = (0, 0);
    while goal
        .iter()
        .any(|(p, g)| positions.get(p).copied().unwrap_or(0) < *g)
    {
        assert!(
            Instant::now() < deadline,
            "positions {positions:?} never reached {goal:?}"
        );
        if let Some(step) = stepper.step(reducer, store, POLL_WAIT, seen).unwrap() {
            step.advance(positions);
            tombstones += step.counts.users.tombstones + step.counts.organizations.tombstones;
            applied += step.applied();
        }
    }
    (tombstones, applied)
}

#[test]
fn a_log_ending_in_tombstones_is_read_to_its_end_and_refusals_keep_their_place() {
    let broker = DevBroker::start(&["users".into(), "organizations".into()], 1).unwrap();
    let t0 = "2020-01-01 00:00:00";
    let t1 = "2020-01-02 00:00:00";
    let (a, b, c) = (
        user("a", "User Created", t0),
        user("b", "User Created", t0),
        user("b", "User Deleted", t1),
    );
    produce(
        &broker,
        &[
            ("users", Some(&a)),
            ("users", Some(&b)),
            ("users", Some("{not json")),
            ("users", Some(&c)),
            ("users", None),
            ("users", None),
            ("users", None),
            ("organizations", None),
        ],
    );
    let (reducer, store) = (reducer(), Writer::new_store());
    let c = consumer(&broker, "stepper-test");
    let mut stepper = stepper(&c, Ahead::Never);
    let mut positions = Positions::new();
    let goal = Positions::from([(USERS, 7), (ORGANIZATIONS, 1)]);
    let mut seen = Seen::default();
    let (tombstones, applied) = step_until(
        &mut stepper,
        &reducer,
        &store,
        &mut positions,
        &goal,
        &mut seen,
    );
    assert_eq!(positions, goal, "every record moved its partition on");
    assert_eq!(tombstones, 4);
    assert_eq!(applied, 3);
    assert_eq!(seen.0.len(), 1, "{:?}", seen.0);
    assert_eq!((seen.0[0].0, seen.0[0].1), (0, 2), "{:?}", seen.0);
    assert!(store.user("a").is_some());
    assert!(store.user("b").is_none(), "deleted");
}

#[test]
fn a_stepper_that_may_not_poll_ahead_leaves_the_rest_to_the_next_one() {
    let broker = DevBroker::start(&["users".into(), "organizations".into()], 1).unwrap();
    // Enough records for lanes (and so for a poll ahead, were it allowed) in each of
    // two batches of at most 2000.
    let events: Vec<String> = (0..3000)
        .map(|i| user(&format!("u{i:04}"), "User Created", "2020-01-01 00:00:00"))
        .collect();
    let records: Vec<(&str, Option<&str>)> =
        events.iter().map(|e| ("users", Some(e.as_str()))).collect();
    produce(&broker, &records);
    let (reducer, store) = (reducer(), Writer::new_store());
    let c = consumer(&broker, "stepper-ahead-test");
    let mut positions = Positions::new();
    let mut seen = Seen::default();
    {
        // Stops at the first goal reached, as a replay's catch-up does.
        let mut first = stepper(&c, Ahead::Never);
        let goal = Positions::from([(USERS, 1)]);
        step_until(
            &mut first,
            &reducer,
            &store,
            &mut positions,
            &goal,
            &mut seen,
        );
    }
    // A second stepper (the handover's) goes on from where the client is: had the
    // first polled a batch ahead and dropped it, those records would be missing.
    let mut second = stepper(&c, Ahead::Never);
    let goal = Positions::from([(USERS, 3000)]);
    step_until(
        &mut second,
        &reducer,
        &store,
        &mut positions,
        &goal,
        &mut seen,
    );
    for i in 0..3000 {
        assert!(store.user(&format!("u{i:04}")).is_some(), "u{i:04} missing");
    }
    assert!(seen.0.is_empty(), "{:?}", seen.0);
}
