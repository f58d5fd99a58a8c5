//! Hostile reducers in every call of a batch: a reducer that traps, loops, writes
//! memory past its limit or breaks the output contract in its constructor, in
//! `plan()` or in `fold()` fails with a typed [`ReducerError`]; folded as the host
//! folds (`fold_into`, which splits a failing batch), the record that set it off is
//! dead-lettered with that reason while every other record of the batch is applied,
//! and the next batch folds as if nothing happened (every batch gets a fresh
//! instance). The reducer is the default fold built with the `test-triggers`
//! feature: a marker in a record's value makes it misbehave in the phase it names.
//!
//!
//! At instantiation: the default fold with a start function (added by `build.rs`, run
//! when an instance is made, before any call) that traps, loops, or grows and writes
//! memory until the limit stops it, fails every batch with the typed error; the canary
//! a swap runs refuses such a candidate (`tests/tests/hot_swap.rs`). A broken output
//! contract has no meaning there: instantiation returns nothing.

// Test helpers: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use logq::fold::{Limits, Reducer, ReducerError, Runtime, fold_into};
use logq::state::Writer;
use logq_abi::driver::NoPrior;
use logq_abi::{Record, Source};

const LIMITS: Limits = Limits {
    memory_bytes: 32 << 20,
    time: Duration::from_millis(300),
};

fn hostile() -> Reducer {
    let bytes = std::fs::read(env!("LOGQ_TEST_TRIGGERS_REDUCER_WASM")).expect("built by build.rs");
    Runtime::new(LIMITS, None).unwrap().load(&bytes).unwrap()
}

fn user(id: &str, name: &str) -> String {
    format!(
        r#"{{"id":"{id}","event_type":"User Created","username":"{name}","received_at":"2021-01-01 00:00:00"}}"#
    )
}

/// Does `e` say what `behaviour` is?
fn is(behaviour: &str, e: &ReducerError) -> bool {
    match behaviour {
        "trap" => matches!(e, ReducerError::Trap(_)),
        "loop" => matches!(e, ReducerError::TimeLimit(_)),
        "oom" | "oom-written" => matches!(e, ReducerError::MemoryLimit(32)),
        "contract" => matches!(e, ReducerError::Contract(_)),
        _ => false,
    }
}

/// The reason a dead letter carries for `behaviour` (the error's words).
fn reason_says(behaviour: &str) -> &'static str {
    match behaviour {
        "trap" => "reducer trapped",
        "loop" => "time limit",
        "oom" | "oom-written" => "memory limit of 32 MiB",
        _ => "broke the contract",
    }
}

const CASES: [(&str, &str); 14] = [
    ("trap", "ctor"),
    ("trap", "plan"),
    ("trap", "fold"),
    ("loop", "ctor"),
    ("loop", "plan"),
    ("loop", "fold"),
    ("oom", "ctor"),
    ("oom-written", "ctor"),
    ("oom-written", "plan"),
    ("oom-written", "fold"),
    ("oom", "fold"),
    ("contract", "plan"),
    ("contract", "fold"),
    // The marker without a phase means the constructor.
    ("trap", ""),
];

fn marker(behaviour: &str, phase: &str) -> String {
    if phase.is_empty() || phase == "ctor" {
        format!("logq-test:{behaviour}")
    } else {
        format!("logq-test:{behaviour}@{phase}")
    }
}

#[test]
fn every_misbehaviour_in_every_phase_is_a_typed_error() {
    let r = hostile();
    for (behaviour, phase) in CASES {
        let value = user("a", &marker(behaviour, phase));
        let started = std::time::Instant::now();
        let err = r
            .fold(
                &Record::sequence([(Source::Users, value.as_bytes())]),
                &NoPrior,
            )
            .err()
            .unwrap_or_else(|| panic!("{behaviour}@{phase} folded"));
        assert!(is(behaviour, &err), "{behaviour}@{phase}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{behaviour}@{phase} was cut late: {:?}",
            started.elapsed()
        );
    }
    // The same reducer folds a good record after all of them.
    let ok = r
        .fold(
            &Record::sequence([(Source::Users, user("b", "fine").as_bytes())]),
            &NoPrior,
        )
        .unwrap();
    assert_eq!(ok.0.accepted, [1]);
}

#[test]
fn a_reducer_hostile_at_instantiation_fails_every_batch_with_the_typed_error() {
    let dir = std::path::Path::new(env!("LOGQ_TEST_START_REDUCERS_DIR"));
    for (name, behaviour) in [
        ("trap", "trap"),
        ("loop", "loop"),
        ("memory", "oom-written"),
    ] {
        let bytes = std::fs::read(dir.join(format!("test-start-{name}-reducer.wasm"))).unwrap();
        let r = Runtime::new(LIMITS, None).unwrap().load(&bytes).unwrap();
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let err = r
                .fold(
                    &Record::sequence([(Source::Users, user("a", "fine").as_bytes())]),
                    &NoPrior,
                )
                .err()
                .unwrap_or_else(|| panic!("start-{name} folded"));
            assert!(is(behaviour, &err), "start-{name}: {err}");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "start-{name} was cut late: {:?}",
                started.elapsed()
            );
        }
    }
}

#[test]
fn a_batch_with_one_hostile_record_dead_letters_it_and_applies_the_rest() {
    let r = hostile();
    for (behaviour, phase) in CASES {
        let values: Vec<String> = (0..5)
            .map(|i| {
                if i == 2 {
                    user("bad", &marker(behaviour, phase))
                } else {
                    user(&format!("u{i}"), "fine")
                }
            })
            .collect();
        let records = Record::sequence(values.iter().map(|v| (Source::Users, v.as_bytes())));
        let store = Writer::new_store();
        let folding = fold_into(&r, &store, &records);
        let case = format!("{behaviour}@{phase}");
        assert_eq!(folding.dead.len(), 1, "{case}: {:?}", folding.dead);
        assert_eq!(folding.dead[0].input, 2, "{case}");
        assert!(
            folding.dead[0].reason.contains(reason_says(behaviour)),
            "{case}: {}",
            folding.dead[0].reason
        );
        assert_eq!(folding.accepted, [1, 1, 0, 1, 1], "{case}");
        // The whole batch failed, then the bad record alone.
        assert_eq!(folding.failures, 2, "{case}");
        for i in [0, 1, 3, 4] {
            assert!(store.user(&format!("u{i}")).is_some(), "{case}: u{i}");
        }
        assert!(store.user("bad").is_none(), "{case}");
    }
}

#[test]
fn the_batch_split_isolates_every_bad_record_and_keeps_the_good_ones() {
    let r = hostile();
    // Good records, two hostile ones in different phases, and a record the reducer
    // refuses by itself (not JSON): each bad one costs only itself.
    let values: Vec<String> = (0..12)
        .map(|i| match i {
            3 => user("bad-fold", "logq-test:trap@fold"),
            7 => user("bad-plan", "logq-test:contract@plan"),
            9 => "{not json".to_owned(),
            _ => user(&format!("u{i}"), "fine"),
        })
        .collect();
    let records = Record::sequence(values.iter().map(|v| (Source::Users, v.as_bytes())));
    let store = Writer::new_store();
    let folding = fold_into(&r, &store, &records);
    let dead: Vec<usize> = folding.dead.iter().map(|d| d.input).collect();
    assert_eq!(dead, [3, 7, 9], "{:?}", folding.dead);
    assert!(
        folding.dead[2].reason.contains("JSON"),
        "{:?}",
        folding.dead[2]
    );
    let good: Vec<usize> = (0..12).filter(|i| ![3, 7, 9].contains(i)).collect();
    for i in &good {
        assert_eq!(folding.accepted[*i], 1, "record {i}");
        assert!(store.user(&format!("u{i}")).is_some(), "u{i}");
    }
    // One failure for the whole batch, one for each hostile record alone (the
    // refused one is not a failure: the reducer said why).
    assert_eq!(folding.failures, 3);
}
