//! Differential tests: the built reducer component, run by the host's runtime, gives
//! exactly the native fold's results on the same records, good and bad.

use std::sync::OnceLock;
use std::time::Duration;

use logq::fold::{DEFAULT_REDUCER, Folding, Limits, Reducer, ReducerError, Runtime, fold_in_lanes};
use logq::state::Writer;
use logq_abi::driver::{Model, NoPrior};
use logq_abi::{OwnedRecord, Record, Source};
use logq_reducer::Native;
use proptest::prelude::*;

const LIMITS: Limits = Limits {
    memory_bytes: 64 << 20,
    time: Duration::from_secs(5),
};

fn runtime_with(limits: Limits) -> Runtime {
    Runtime::new(limits, None).expect("engine")
}

fn reducer() -> &'static Reducer {
    static R: OnceLock<Reducer> = OnceLock::new();
    R.get_or_init(|| {
        runtime_with(LIMITS)
            .load(DEFAULT_REDUCER)
            .expect("default reducer loads")
    })
}

fn record(source: Source, value: Vec<u8>) -> OwnedRecord {
    OwnedRecord {
        source,
        partition: 0,
        offset: 0,
        value,
    }
}

/// Folds the batches both ways through the one driver, each side carrying its own
/// state, and compares everything observable after every batch: the plan (entities,
/// rejections, accepted counts) and the whole kept state.
fn compare(batches: &[Vec<OwnedRecord>]) -> Result<(), TestCaseError> {
    let (mut wasm, mut native) = (Model::new(), Model::new());
    let mut offset = 0;
    for batch in batches {
        let records: Vec<Record<'_>> = batch
            .iter()
            .map(|r| {
                offset += 1;
                Record {
                    offset,
                    ..r.as_record()
                }
            })
            .collect();
        let w = wasm
            .apply(reducer(), &records)
            .map_err(|e| TestCaseError::fail(format!("wasm fold failed: {e}")))?;
        let n = native
            .apply(&Native, &records)
            .map_err(TestCaseError::fail)?;
        prop_assert_eq!(&w, &n);
        // Every update (state, answer range, join range) is kept or forgot alike.
        prop_assert_eq!(&wasm, &native);
    }
    Ok(())
}

fn user_value() -> impl Strategy<Value = Vec<u8>> {
    let field = |name: &'static str| {
        proptest::option::of(prop_oneof![
            "[a-zA-Z0-9 ]{0,12}"
                .prop_map(move |v| format!(r#","{name}":{}"#, serde_json::json!(v))),
            Just(format!(r#","{name}":null"#)),
            Just(format!(r#","{name}":42"#)),
            Just(format!(r#","{name}":"é\"\\\u2028""#)),
            // Long enough for the guest's 16-byte SIMD steps, with an escape or a raw
            // control character (invalid JSON: the reason names its byte) anywhere.
            (
                "[a-zA-Z0-9 ]{0,40}",
                "[a-z]{0,40}",
                prop_oneof![Just("\\n"), Just("\u{1}"), Just("")]
            )
                .prop_map(move |(a, b, mid)| format!(r#","{name}":"{a}{mid}{b}""#)),
        ])
        .prop_map(|f| f.unwrap_or_default())
    };
    (
        0u8..5,
        prop_oneof![
            Just("User Created"),
            Just("User Updated"),
            Just("User Deleted"),
            Just("user_updated"),
            Just("User Exploded")
        ],
        prop_oneof![
            (0u32..100).prop_map(|s| format!("2021-03-04 05:06:{:02}.{:06}", s % 60, s)),
            (0u32..100).prop_map(|s| format!("2021-03-04T05:06:{:02}+01:00", s % 60)),
            Just("not a time".to_string()),
        ],
        field("username"),
        field("user_email"),
        field("organization_name"),
    )
        .prop_map(|(id, kind, at, a, b, c)| {
            format!(r#"{{"id":"u{id}","event_type":"{kind}","received_at":"{at}"{a}{b}{c}}}"#)
                .into_bytes()
        })
}

fn org_value() -> impl Strategy<Value = Vec<u8>> {
    (0u8..3, 0u8..3, 0u32..50).prop_map(|(k, n, t)| {
        format!(
            r#"{{"organization_key":"k{k}","organization_name":"N{n}","organization_tier":"T{t}","created_at":"2018-01-01 00:00:{:02}"}}"#,
            t % 60
        )
        .into_bytes()
    })
}

fn input() -> impl Strategy<Value = OwnedRecord> {
    prop_oneof![
        6 => user_value().prop_map(|value| record(Source::Users, value)),
        2 => org_value().prop_map(|value| record(Source::Organizations, value)),
        1 => proptest::collection::vec(user_value(), 0..4).prop_map(|vs| {
            let mut value = b"[".to_vec();
            value.extend(vs.join(&b","[..]));
            value.push(b']');
            record(Source::Users, value)
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(|value| record(Source::Users, value)),
    ]
}

/// Folds the batches into a fresh store in `lanes` lanes; returns the kept state
/// (sorted), what each batch's folding said, and how many lanes were folded again.
/// What folding some batches in lanes gave: the state, each batch's folding, how
/// many lanes were folded again, and how many batches every lane applied itself.
type InLanes = (
    Vec<(logq_abi::Entity, logq_abi::Update, bool)>,
    Vec<Folding>,
    usize,
    usize,
);

fn fold_in(lanes: usize, batches: &[Vec<(OwnedRecord, u64)>]) -> InLanes {
    let store = Writer::new_store();
    let (mut foldings, mut refolded, mut owned) = (Vec::new(), 0, 0);
    for batch in batches {
        let records: Vec<Record<'_>> = batch.iter().map(|(r, _)| r.as_record()).collect();
        let routes: Vec<u64> = batch.iter().map(|(_, route)| *route).collect();
        let (folding, used) = fold_in_lanes(reducer(), &store, &records, &routes, lanes);
        foldings.push(folding);
        refolded += used.refolded;
        owned += usize::from(used.owned && used.used > 1);
    }
    let mut state = store.dump(0);
    state.sort_by(|a, b| a.0.cmp(&b.0));
    (state, foldings, refolded, owned)
}

/// Everything observable of a folding but its time.
fn outcome(f: &[Folding]) -> Vec<(Vec<u64>, Vec<logq::fold::DeadLetter>, u64)> {
    f.iter()
        .map(|f| (f.accepted.clone(), f.dead.clone(), f.failures))
        .collect()
}

/// Numbers the records of each batch by their offset, as a partition would.
fn numbered(batches: Vec<Vec<(OwnedRecord, u64)>>) -> Vec<Vec<(OwnedRecord, u64)>> {
    let mut offset = 0;
    batches
        .into_iter()
        .map(|b| {
            b.into_iter()
                .map(|(r, route)| {
                    offset += 1;
                    (OwnedRecord { offset, ..r }, route)
                })
                .collect()
        })
        .collect()
}

#[test]
fn records_keyed_by_their_entity_fold_in_lanes_without_refolding_to_the_same_state() {
    // 3,000 users' events, some deleted, keyed (routed) by the user's id, as a
    // producer keys them; three batches of 2,000 with every user in several.
    let batches: Vec<Vec<(OwnedRecord, u64)>> = (0..3)
        .map(|b| {
            (0..2000u64)
                .map(|i| {
                    let id = (i * 7 + b * 13) % 3000;
                    let kind = if (i + b) % 11 == 0 { "User Deleted" } else { "User Updated" };
                    let value = format!(
                        r#"{{"id":"u{id}","event_type":"{kind}","received_at":"2021-03-04 05:06:{:02}.{:06}","username":"n{i}","organization_name":"N{}"}}"#,
                        (i + b) % 60,
                        i * 3 + b,
                        id % 5
                    );
                    // Routed as the host routes a record keyed by the user's id.
                    let route = logq::fold::lanes::route(format!("u{id}").as_bytes());
                    (record(Source::Users, value.into_bytes()), route)
                })
                .collect()
        })
        .collect();
    let batches = numbered(batches);
    let (one, one_folding, _, _) = fold_in(1, &batches);
    let (four, four_folding, refolded, owned) = fold_in(4, &batches);
    assert!(one.len() > 2000, "the history keeps {} entities", one.len());
    assert_eq!(
        refolded, 0,
        "keyed records never share an entity across lanes"
    );
    assert_eq!(
        owned,
        batches.len(),
        "every lane kept to its own shards and applied its updates itself"
    );
    assert_eq!(outcome(&four_folding), outcome(&one_folding));
    assert!(four == one, "4 lanes kept another state than 1 lane");
}

/// A store whose lending is slow for the entities of one piece, and which notes the
/// thread that stores each entity's update.
struct SlowForOnePiece {
    store: Writer,
    slow_piece: usize,
    pieces: usize,
    applied_by: std::sync::Mutex<Vec<(std::thread::ThreadId, usize)>>,
}

impl logq_abi::States for SlowForOnePiece {
    fn states(&self, entities: &[logq_abi::Entity], each: &mut dyn FnMut(Option<&[u8]>)) {
        self.store.states(entities, each);
    }
}

impl logq::fold::Lend for SlowForOnePiece {
    fn lend_noted(
        &self,
        entities: &[logq_abi::Entity],
        each: &mut dyn FnMut(Option<&[u8]>),
        notes: &mut Vec<logq::fold::Note>,
    ) {
        let piece_of = |e: &logq_abi::Entity| logq::state::shard_of(e.key.as_bytes()) % self.pieces;
        if entities.iter().any(|e| piece_of(e) == self.slow_piece) {
            std::thread::sleep(Duration::from_millis(1000));
        }
        logq::fold::Lend::lend_noted(&self.store, entities, each, notes);
    }
}

impl logq::fold::Target for SlowForOnePiece {
    fn apply(&self, entities: Vec<logq_abi::Entity>, updates: logq_abi::Updates) {
        self.apply_noted(entities, updates, &[]);
    }

    fn apply_noted(
        &self,
        entities: Vec<logq_abi::Entity>,
        updates: logq_abi::Updates,
        notes: &[logq::fold::Note],
    ) {
        let me = std::thread::current().id();
        self.applied_by.lock().expect("not poisoned").extend(
            entities
                .iter()
                .map(|e| (me, logq::state::shard_of(e.key.as_bytes()) % self.pieces)),
        );
        logq::fold::Target::apply_noted(&self.store, entities, updates, notes);
    }
}

#[test]
fn a_lane_held_up_folds_fewer_pieces_and_the_others_take_the_rest() {
    // 2 lanes cut a batch into pieces of shards (shard % pieces); lending the states
    // of piece 0 takes 1 s. The lane that takes piece 0 must be left with it alone:
    // the other lane takes every other piece meanwhile (with a fixed half per lane,
    // the lane of piece 0 would also fold and store half of the rest).
    let lanes = 2;
    let pieces = (lanes * logq::fold::lanes::PIECES_PER_LANE).min(logq::fold::lanes::SHARDS);
    assert!(pieces > lanes, "more pieces than lanes");
    let batch: Vec<(OwnedRecord, u64)> = (0..2000u64)
        .map(|i| {
            let value = format!(
                r#"{{"id":"u{i}","event_type":"User Created","received_at":"2021-03-04 05:06:07.{i:06}","username":"n{i}"}}"#
            );
            let route = logq::fold::lanes::route(format!("u{i}").as_bytes());
            (record(Source::Users, value.into_bytes()), route)
        })
        .collect();
    let batch = numbered(vec![batch]).remove(0);
    let records: Vec<Record<'_>> = batch.iter().map(|(r, _)| r.as_record()).collect();
    let routes: Vec<u64> = batch.iter().map(|(_, route)| *route).collect();
    let target = SlowForOnePiece {
        store: Writer::new_store(),
        slow_piece: 0,
        pieces,
        applied_by: std::sync::Mutex::new(Vec::new()),
    };
    let (folding, used) = fold_in_lanes(reducer(), &target, &records, &routes, lanes);
    assert_eq!((used.used, used.owned, used.refolded), (2, true, 0));
    assert_eq!(folding.accepted.iter().sum::<u64>(), 2000);
    let applied = target.applied_by.into_inner().expect("not poisoned");
    assert_eq!(applied.len(), 2000, "every user stored once");
    let slow_lane = applied
        .iter()
        .find(|(_, p)| *p == 0)
        .expect("piece 0 stored")
        .0;
    let of_slow_lane: std::collections::BTreeSet<usize> = applied
        .iter()
        .filter(|(t, _)| *t == slow_lane)
        .map(|(_, p)| *p)
        .collect();
    let of_other: std::collections::BTreeSet<usize> = applied
        .iter()
        .filter(|(t, _)| *t != slow_lane)
        .map(|(_, p)| *p)
        .collect();
    assert_eq!(
        of_slow_lane,
        [0].into(),
        "the held-up lane folded only its piece"
    );
    assert_eq!(
        of_other,
        (1..pieces).collect(),
        "the other lane took the rest"
    );
    // And the state is what one lane makes of the batch.
    let one = Writer::new_store();
    fold_in_lanes(reducer(), &one, &records, &routes, 1);
    let sorted = |w: &Writer| {
        let mut d = w.dump(0);
        d.sort_by(|a, b| a.0.cmp(&b.0));
        d
    };
    assert!(
        sorted(&target.store) == sorted(&one),
        "another state than one lane's"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Any routing (here random, so lanes share entities all the time) gives the
    /// state and the dead letters of one lane, byte for byte.
    #[test]
    fn any_routing_folds_in_lanes_to_the_state_of_one_lane(
        batches in proptest::collection::vec(
            proptest::collection::vec((input(), 0u64..16), 0..1500), 1..4)
    ) {
        let batches = numbered(batches);
        let (one, one_folding, _, _) = fold_in(1, &batches);
        let (four, four_folding, refolded, _) = fold_in(4, &batches);
        if batches.iter().any(|b| b.len() >= 2 * logq::fold::lanes::MIN_RECORDS_PER_LANE) {
            // Five users and three organizations over hundreds of records a lane.
            prop_assert!(refolded > 0, "lanes that shared entities were not folded again");
        }
        prop_assert_eq!(outcome(&four_folding), outcome(&one_folding));
        prop_assert!(four == one, "4 lanes kept another state than 1 lane");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn component_matches_the_native_fold(
        batches in proptest::collection::vec(proptest::collection::vec(input(), 0..30), 1..5)
    ) {
        compare(&batches)?;
    }
}

#[test]
fn seed_samples_match_the_native_fold() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/");
    let batch = |source, file: &str| {
        record(
            source,
            std::fs::read(format!("{root}{file}")).expect("sample data"),
        )
    };
    compare(&[vec![
        batch(Source::Users, "users.json"),
        batch(Source::Organizations, "organizations.json"),
    ]])
    .unwrap();
}

#[test]
fn the_component_imports_nothing_and_a_non_component_is_refused() {
    // Loading links against an empty linker: any import would fail here.
    let rt = runtime_with(LIMITS);
    let meta = rt.load(DEFAULT_REDUCER).expect("loads").meta().clone();
    assert_eq!(meta.world_version, "3.2.0");
    assert_eq!(meta.sha256.len(), 64);
    for junk in [&b""[..], b"not wasm at all"] {
        let err = rt.load(junk).err().expect("refused");
        assert!(matches!(err, ReducerError::NotWasm), "{err}");
    }
    // A core module is WebAssembly but not a component.
    let err = rt.load(b"\0asm\x01\0\0\0").err().expect("refused");
    assert!(matches!(err, ReducerError::Invalid(_)), "{err}");
}

#[test]
fn test_trigger_reducer_is_contained_by_the_limits() {
    let bytes = std::fs::read(env!("LOGQ_TEST_TRIGGERS_REDUCER_WASM")).expect("built by build.rs");
    let limits = Limits {
        memory_bytes: 32 << 20,
        time: Duration::from_millis(200),
    };
    let r = runtime_with(limits).load(&bytes).expect("loads");
    let fold = |marker: &str| {
        let value = format!(
            r#"{{"id":"a","event_type":"User Created","username":"{marker}","received_at":"2021-01-01 00:00:00"}}"#
        );
        r.fold(
            &Record::sequence([(Source::Users, value.as_bytes())]),
            &NoPrior,
        )
    };
    assert!(matches!(fold("logq-test:trap"), Err(ReducerError::Trap(_))));
    let start = std::time::Instant::now();
    assert!(matches!(
        fold("logq-test:loop"),
        Err(ReducerError::TimeLimit(_))
    ));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "cut by the time limit"
    );
    assert!(matches!(
        fold("logq-test:oom"),
        Err(ReducerError::MemoryLimit(32))
    ));
    // The same reducer keeps working after each failure: every batch gets a new instance.
    let ok = fold("fine").expect("a normal record folds");
    assert_eq!(ok.0.accepted, [1]);
}

/// Components that are valid WebAssembly but not reducers of this host's world.
#[test]
fn wrong_worlds_and_imports_are_refused_at_load() {
    let rt = runtime_with(LIMITS);
    let cases = [
        (
            "(component (import \"wasi:cli/environment@0.2.0\" (instance)))",
            "imports wasi:cli/environment@0.2.0",
        ),
        ("(component)", "does not export logq:reducer/fold@3.x"),
        (
            "(component (instance $i) (export \"logq:reducer/fold@1.0.0\" (instance $i)))",
            "built against logq:reducer/fold@1.0.0",
        ),
        // 2.x framed records without their partition and offset: refused by name.
        (
            "(component (instance $i) (export \"logq:reducer/fold@2.0.0\" (instance $i)))",
            "built against logq:reducer/fold@2.0.0; this host speaks 3.x",
        ),
        (
            "(component (instance $i) (export \"logq:reducer/fold@3.0.0\" (instance $i)))",
            "does not match the reducer world",
        ),
    ];
    for (text, expected) in cases {
        let bytes = wat::parse_str(text).expect("valid component text");
        let err = rt.load(&bytes).err().expect("refused").to_string();
        assert!(err.contains(expected), "{text}: {err}");
    }
}

#[test]
fn compiled_reducers_are_cached_by_sha256() {
    let dir = std::env::temp_dir().join(format!("logq-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = Runtime::new(LIMITS, Some(dir.clone())).expect("engine");
    let first = rt.load(DEFAULT_REDUCER).expect("loads");
    assert!(!first.meta().from_cache);
    let cached = std::fs::read_dir(&dir).expect("cache dir").count();
    assert_eq!(cached, 1, "one compiled entry");
    let second = Runtime::new(LIMITS, Some(dir.clone()))
        .expect("engine")
        .load(DEFAULT_REDUCER)
        .expect("loads from cache");
    assert!(second.meta().from_cache);
    // And the cached code folds exactly like freshly compiled code.
    let users = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/users.json")).unwrap();
    let records = Record::sequence([(Source::Users, users.as_slice())]);
    let a = first.fold(&records, &NoPrior).unwrap();
    let b = second.fold(&records, &NoPrior).unwrap();
    assert!(!a.1.is_empty());
    assert_eq!(a, b);
    let _ = std::fs::remove_dir_all(&dir);
}
