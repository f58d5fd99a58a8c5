//! The consumer loop is the one writer of the active reducer and the store: a forward
//! swap or a rollback (itself a replay of the previous reducer) that lands at any step
//! of a replay's handover is applied after it, in order; the last command in wins,
//! nothing is lost silently, and the history says what became of each.
//!
//! The replay is held at each step by the registry's test-only pause hook. The broker
//! here is librdkafka's in-process mock cluster (`logq dev`'s broker): this test is
//! about the order the loop applies commands in, which the broker cannot change; the
//! end-to-end swap tests run against a real broker process.

// Test helpers: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser as _;
use logq::broker::Topics;
use logq::broker::mock::DevBroker;
use logq::broker::producer::RecordProducer;
use logq::config::{Cli, Command as CliCommand, KafkaConfig, RunConfig};
use logq::consumer::Consumer;
use logq::fold::{DEFAULT_REDUCER, Limits, Runtime, sha256_hex};
use logq::metrics::Metrics;
use logq::reducers::canary::{SAMPLE_ORGANIZATIONS, SAMPLE_USERS};
use logq::reducers::replay::{Setup, Step};
use logq::reducers::{Active, Mode, Origin, Registry, SwapError};
use logq::state::{StateStore, Writer};

const SNAKE: &str = "069feb770fe581acc9d3313d59780196";

/// The armed step, where the hook says "paused", and where it waits for "go".
type Armed = Option<(Step, Sender<()>, Receiver<()>)>;

/// Holds the replay at one armed step until the test lets it go.
#[derive(Default)]
struct Gate {
    armed: Mutex<Armed>,
}

impl Gate {
    fn hold(&self, step: Step) {
        let taken = {
            let mut armed = self.armed.lock().unwrap();
            if armed.as_ref().is_some_and(|(s, _, _)| *s == step) {
                armed.take()
            } else {
                None
            }
        };
        if let Some((_, paused, go)) = taken {
            paused.send(()).unwrap();
            go.recv_timeout(Duration::from_secs(60))
                .expect("the test lets the replay go");
        }
    }

    /// Arms `step`; returns (paused, go).
    fn arm(&self, step: Step) -> (Receiver<()>, Sender<()>) {
        let (paused_tx, paused_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel();
        *self.armed.lock().unwrap() = Some((step, paused_tx, go_rx));
        (paused_rx, go_tx)
    }
}

struct Service {
    registry: Arc<Registry>,
    store: Arc<StateStore>,
    gate: Arc<Gate>,
    stop: Arc<AtomicBool>,
    loop_thread: Option<std::thread::JoinHandle<()>>,
    _broker: DevBroker,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.registry.cancel_replay();
        if let Some(t) = self.loop_thread.take() {
            let _ = t.join();
        }
    }
}

fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start() -> Service {
    let broker =
        DevBroker::start(&["users".into(), "organizations".into()], 2).expect("mock broker");
    let bootstrap = broker.bootstrap_servers();
    let kafka = KafkaConfig {
        brokers: bootstrap.clone(),
        extra: Vec::new(),
    };
    let producer = RecordProducer::new(&kafka).expect("producer");
    for (topic, text) in [
        ("users", SAMPLE_USERS),
        ("organizations", SAMPLE_ORGANIZATIONS),
    ] {
        for r in
            logq::cli::produce::parse_events(text, &logq::cli::produce::KeyBy::Default).unwrap()
        {
            producer
                .send(topic, r.key.as_deref(), &r.value, &[])
                .unwrap();
        }
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let CliCommand::Run(config) = Cli::try_parse_from(["logq", "run", "--brokers", &bootstrap])
        .unwrap()
        .command
    else {
        unreachable!("run parses as run")
    };
    let config: RunConfig = *config;
    let cache = std::env::temp_dir().join(format!("logq-one-writer-{}", std::process::id()));
    let runtime = Runtime::new(
        Limits {
            memory_bytes: 128 << 20,
            time: Duration::from_secs(10),
        },
        Some(cache),
    )
    .unwrap();
    let first = runtime.load(DEFAULT_REDUCER).expect("default reducer");
    let writer = Writer::new_store();
    let store = Arc::clone(writer.store());
    let (commands, command_rx) = mpsc::channel();
    let gate = Arc::new(Gate::default());
    let hook_gate = gate.clone();
    let registry = Arc::new(
        Registry::new(
            runtime,
            store.clone(),
            Arc::new(Active::new(first, Origin::Startup)),
            commands,
            Setup {
                kafka: config.kafka.clone(),
                group_id: config.group_id.clone(),
                topics: Topics {
                    users: "users".into(),
                    organizations: "organizations".into(),
                    rekeyed_from: None,
                },
                batch_max_records: 2000,
                batch_max_bytes: 1 << 20,
                time_limit: Duration::from_secs(2),
                tombstone_retention_micros: 0,
            },
        )
        .with_pause(Arc::new(move |step| hook_gate.hold(step))),
    );
    let metrics = Arc::new(Metrics::new(["users", "organizations"]));
    let stop = Arc::new(AtomicBool::new(false));
    let client = Consumer::client(&config).expect("client settings");
    let consumer = Consumer::new(
        config,
        registry.clone(),
        writer,
        metrics.clone(),
        stop.clone(),
        command_rx,
    );
    let loop_thread = std::thread::spawn(move || consumer.run(client).expect("the loop runs"));
    eventually("the loop to catch up", || metrics.status().0.then_some(()));
    Service {
        registry,
        store,
        gate,
        stop,
        loop_thread: Some(loop_thread),
        _broker: broker,
    }
}

fn mask_reducer() -> Vec<u8> {
    std::fs::read(env!("LOGQ_MASK_EMAILS_REDUCER_WASM")).expect("built by host/build.rs")
}

fn triggers_reducer() -> Vec<u8> {
    std::fs::read(env!("LOGQ_TEST_TRIGGERS_REDUCER_WASM")).expect("built by host/build.rs")
}

fn describe(s: &Service) -> serde_json::Value {
    s.registry.describe()
}

fn entry(d: &serde_json::Value, id: u64) -> serde_json::Value {
    d["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("swap #{id} is in the history: {d}"))
}

fn email_masked(s: &Service) -> bool {
    let answer: serde_json::Value =
        serde_json::from_str(&s.store.user(SNAKE).expect("Snake is served")).unwrap();
    answer["user_email"].as_str().unwrap().contains("***")
}

/// Waits until the replay has ended one way or another.
fn replay_ended(s: &Service) -> String {
    eventually("the replay to end", || {
        let phase = describe(s)["replay"]["phase"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        (!matches!(phase.as_str(), "catching_up" | "handing_over")).then_some(phase)
    })
}

/// The base of every case: state rebuilt by the default reducer (answers unmasked),
/// then the test-triggers reducer active forward, the default one previous.
fn reset(s: &Service) {
    s.registry
        .submit(DEFAULT_REDUCER, Origin::Http, Mode::Replay)
        .expect("replay starts");
    assert_eq!(replay_ended(s), "done");
    s.registry
        .submit(&triggers_reducer(), Origin::Http, Mode::Forward)
        .expect("forward");
    assert!(!email_masked(s));
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Forward,
    Rollback,
}

#[test]
fn a_swap_or_rollback_at_any_step_of_a_handover_is_applied_after_it() {
    let s = start();
    let default_sha = sha256_hex(DEFAULT_REDUCER);
    let triggers_sha = sha256_hex(&triggers_reducer());
    let mask = mask_reducer();
    for step in [
        Step::CaughtUp,
        Step::HandoverTaken,
        Step::TailRead,
        Step::Concluded,
    ] {
        for action in [Action::Forward, Action::Rollback] {
            let case = format!("{action:?} at {step:?}");
            reset(&s);
            let (paused, go) = s.gate.arm(step);
            let replay = s
                .registry
                .submit(&mask, Origin::Http, Mode::Replay)
                .expect("replay starts");
            paused
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("{case}: the replay reaches the step"));

            // Land the command while the replay is held; it blocks until the loop
            // applies it, which may be after the handover.
            let registry = s.registry.clone();
            let landed = std::thread::spawn(move || match action {
                Action::Forward => registry.submit(DEFAULT_REDUCER, Origin::Http, Mode::Forward),
                Action::Rollback => registry.rollback(),
            });
            let command = eventually("the command to reach the loop", || {
                let d = describe(&s);
                let newest = d["history"][0].clone();
                (newest["id"].as_u64() > Some(replay.swap.id) && newest["outcome"] != "validating")
                    .then(|| newest["id"].as_u64().unwrap())
            });
            go.send(()).unwrap();
            let landed = landed
                .join()
                .unwrap()
                .unwrap_or_else(|e: SwapError| panic!("{case}: {e}"));
            let phase = replay_ended(&s);
            let d = describe(&s);

            // The replay flips only when it had flipped before the command came in.
            let flipped = matches!(step, Step::Concluded);
            let replay_entry = entry(&d, replay.swap.id);
            let command_entry = entry(&d, command);
            assert_eq!(command_entry["outcome"], "active", "{case}: {d}");
            assert_eq!(landed.swap.id, command, "{case}");
            // What the replay slot shows last: the rollback's own replay, or the
            // overtaken one.
            let last_phase = match (action, flipped) {
                (Action::Forward, false) => "superseded",
                _ => "done",
            };
            assert_eq!(phase, last_phase, "{case}");
            if flipped {
                // It was active, until the command took its place.
                assert_eq!(replay_entry["outcome"], "replaced", "{case}: {d}");
                assert!(
                    replay_entry["reason"]
                        .as_str()
                        .is_some_and(|r| r.starts_with(&format!("replaced by swap #{command} at "))),
                    "{case}: {d}"
                );
            } else {
                assert_eq!(replay_entry["outcome"], "superseded", "{case}: {d}");
                assert_eq!(
                    replay_entry["reason"],
                    format!("superseded by swap #{command}"),
                    "{case}"
                );
            }
            // A forward swap keeps the state it finds (masked only if the replay
            // flipped); a rollback re-renders everything with an unmasking reducer.
            let masked = matches!(action, Action::Forward) && flipped;
            assert_eq!(email_masked(&s), masked, "{case}: whose state is served");
            assert_eq!(
                d["active"]["answers"]["share_by_active"],
                if masked { 0.0 } else { 1.0 },
                "{case}: {d}"
            );
            // The last command in wins.
            let expected = match (action, flipped) {
                (Action::Forward, _) => &default_sha,
                // Before the flip: back from triggers to default; after: from the
                // replayed reducer back to triggers.
                (Action::Rollback, false) => &default_sha,
                (Action::Rollback, true) => &triggers_sha,
            };
            assert_eq!(d["active"]["sha256"], expected.as_str(), "{case}: {d}");
            if matches!(action, Action::Forward) {
                assert_eq!(landed.active.sha256, *expected, "{case}");
            }
            assert_eq!(
                d["active"]["origin"],
                match action {
                    Action::Forward => "http",
                    Action::Rollback => "rollback",
                },
                "{case}"
            );
            // Nothing is left pending.
            for h in d["history"].as_array().unwrap() {
                assert!(
                    !matches!(
                        h["outcome"].as_str(),
                        Some("validating" | "queued" | "replaying")
                    ),
                    "{case}: {h}"
                );
            }
            println!("{case}: replay {phase}, active {}", &expected[..12]);
        }
    }
}

#[test]
fn refused_candidates_and_an_empty_rollback_change_nothing() {
    let s = start();
    let before = describe(&s)["active"].clone();
    assert!(matches!(s.registry.rollback(), Err(SwapError::NoPrevious)));
    assert!(matches!(
        s.registry.submit(b"hello", Origin::Http, Mode::Forward),
        Err(SwapError::NotWasm(_))
    ));
    assert!(matches!(
        s.registry
            .submit(b"\0asm\x0d\0\x01\0", Origin::Http, Mode::Forward),
        Err(SwapError::Invalid(_))
    ));
    let d = describe(&s);
    assert_eq!(d["active"], before);
    let outcomes: Vec<&str> = d["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["rejected", "rejected"], "{d}");
    assert!(!s.registry.cancel_replay(), "no replay runs");
    // A forward swap, applied by the loop, says how many answers it left stale;
    // a rollback re-renders them all with the previous reducer.
    let swapped = s
        .registry
        .submit(&mask_reducer(), Origin::Http, Mode::Forward)
        .unwrap();
    assert!(
        swapped.swap.switch_offsets.is_some(),
        "the loop says where it switched"
    );
    let visible = describe(&s)["active"]["answers"]["total"].as_u64().unwrap();
    assert!(visible > 3, "users and organizations are served: {visible}");
    assert_eq!(swapped.swap.stale_answers, Some(visible as usize));
    assert_eq!(
        describe(&s)["active"]["answers"]["by_earlier_reducers"],
        visible
    );
    let back = s.registry.rollback().unwrap();
    assert_eq!(back.swap.outcome, logq::reducers::Outcome::Replaying);
    assert_eq!(replay_ended(&s), "done");
    let d = describe(&s);
    assert_eq!(d["active"]["sha256"], before["sha256"]);
    assert_eq!(d["active"]["origin"], "rollback");
    assert_eq!(d["active"]["answers"]["by_active"], visible, "{d}");
}

#[test]
fn a_preview_cancelled_at_any_step_changes_nothing_and_one_let_through_reports_without_flipping() {
    let s = start();
    let triggers_sha = sha256_hex(&triggers_reducer());
    let default_sha = sha256_hex(DEFAULT_REDUCER);
    let mask = mask_reducer();
    let unchanged = |s: &Service, case: &str| {
        let d = describe(s);
        assert_eq!(d["active"]["sha256"], triggers_sha, "{case}: {d}");
        assert_eq!(d["previous"]["sha256"], default_sha, "{case}: {d}");
        assert!(!email_masked(s), "{case}: the live answers are not masked");
        d
    };
    for step in [
        Step::CaughtUp,
        Step::HandoverTaken,
        Step::TailRead,
        Step::Comparing,
    ] {
        let case = format!("cancelled at {step:?}");
        reset(&s);
        let (paused, go) = s.gate.arm(step);
        let preview = s
            .registry
            .submit(&mask, Origin::Http, Mode::Preview)
            .expect("preview starts");
        paused
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{case}: the preview reaches the step"));
        assert!(s.registry.cancel_replay(), "{case}: a preview runs");
        if matches!(step, Step::CaughtUp | Step::Comparing) {
            // Cancelled before the handover (the loop never gets it), or while the
            // comparison's thread waits (the loop is done with it).
            go.send(()).unwrap();
        } else {
            // The loop holds the handover: let it conclude before looking.
            let (concluded, go_on) = s.gate.arm(Step::Concluded);
            go.send(()).unwrap();
            concluded
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("{case}: the loop concludes the handover"));
            go_on.send(()).unwrap();
        }
        assert_eq!(replay_ended(&s), "cancelled", "{case}");
        let d = unchanged(&s, &case);
        let e = entry(&d, preview.swap.id);
        assert_eq!(e["outcome"], "cancelled", "{case}: {d}");
        assert!(e["preview"].is_null(), "{case}: no report: {d}");
    }
    // Let through: it reports and still changes nothing.
    reset(&s);
    let preview = s
        .registry
        .submit(&mask, Origin::Http, Mode::Preview)
        .expect("preview starts");
    assert_eq!(replay_ended(&s), "done");
    let d = unchanged(&s, "let through");
    let e = entry(&d, preview.swap.id);
    assert_eq!(e["outcome"], "previewed", "{d}");
    let report = &e["preview"]["users"];
    assert!(report["changed"].as_u64() > Some(0), "{d}");
    assert_eq!(report["fields"]["user_email"], report["changed"], "{d}");
    // A rollback still goes to the reducer before the active one.
    s.registry.rollback().unwrap();
    assert_eq!(replay_ended(&s), "done");
    assert_eq!(describe(&s)["active"]["sha256"], default_sha);
}

#[test]
fn a_preview_compares_off_the_loop_against_the_answers_at_its_position() {
    let s = start();
    let (paused, go) = s.gate.arm(Step::Comparing);
    let preview = s
        .registry
        .submit(&mask_reducer(), Origin::Http, Mode::Preview)
        .expect("preview starts");
    paused
        .recv_timeout(Duration::from_secs(60))
        .expect("the preview reaches its comparison");
    let email = |s: &Service| -> String {
        let answer: serde_json::Value =
            serde_json::from_str(&s.store.user(SNAKE).unwrap()).unwrap();
        answer["user_email"].as_str().unwrap().to_owned()
    };
    let before = email(&s);
    // While the comparison waits, the loop goes on: an event after the preview's
    // position is folded and served.
    let producer = RecordProducer::new(&KafkaConfig {
        brokers: s._broker.bootstrap_servers(),
        extra: Vec::new(),
    })
    .unwrap();
    let update = format!(
        r#"{{"id":"{SNAKE}","event_type":"User Updated","user_email":"big.boss@outerheaven.com","received_at":"2021-06-01 00:00:00"}}"#
    );
    producer
        .send("users", Some(SNAKE.as_bytes()), update.as_bytes(), &[])
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    eventually("the update to be served during the comparison", || {
        (email(&s) == "big.boss@outerheaven.com").then_some(())
    });
    go.send(()).unwrap();
    assert_eq!(replay_ended(&s), "done");
    // The report compares the answers at the preview's position: the e-mail before
    // the update, masked by the candidate.
    let e = entry(&describe(&s), preview.swap.id);
    assert_eq!(e["outcome"], "previewed", "{e}");
    let snake = e["preview"]["users"]["samples"]["changed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == SNAKE)
        .cloned()
        .unwrap_or_else(|| panic!("Snake among the changed samples: {e}"));
    assert_eq!(snake["before"]["user_email"], before.as_str(), "{snake}");
    assert_ne!(before, "big.boss@outerheaven.com");
    assert!(
        snake["after"]["user_email"]
            .as_str()
            .is_some_and(|m| m.contains("***") && !m.starts_with('b')),
        "{snake}"
    );
    assert_eq!(
        email(&s),
        "big.boss@outerheaven.com",
        "the live answer stays"
    );
}
