//! Domain rules of the fold, proved natively: examples first, then properties over
//! generated histories.

use std::collections::BTreeMap;

use proptest::prelude::*;

use logq_abi::OwnedRecord;

use super::*;

/// The host's store as the one driver keeps it: entity -> latest update.
type Store = logq_abi::driver::Model;

/// Folds `records` as if read in this order from partition 0, at offsets 0, 1, ...
fn apply(store: &mut Store, records: &[(Source, String)]) -> Plan {
    let records = Record::sequence(records.iter().map(|(s, v)| (*s, v.as_bytes())));
    store.apply(&Native, &records).expect("fold")
}

/// Folds records that carry their own place in the log.
fn apply_logged(store: &mut Store, records: &[OwnedRecord]) -> Plan {
    let records: Vec<Record<'_>> = records.iter().map(OwnedRecord::as_record).collect();
    store.apply(&Native, &records).expect("fold")
}

/// `record` as read from `partition` at `offset`.
fn at_pos((source, value): (Source, String), partition: i32, offset: i64) -> OwnedRecord {
    OwnedRecord {
        source,
        partition,
        offset,
        value: value.into_bytes(),
    }
}

fn fold_logged(records: &[OwnedRecord]) -> Store {
    let mut store = Store::new();
    let plan = apply_logged(&mut store, records);
    assert!(plan.rejections.is_empty(), "{:?}", plan.rejections);
    store
}

fn fold_all(records: &[(Source, String)]) -> Store {
    let mut store = Store::new();
    let plan = apply(&mut store, records);
    assert!(plan.rejections.is_empty(), "{:?}", plan.rejections);
    store
}

fn view(store: &Store, id: &str) -> Option<serde_json::Value> {
    store
        .get(Kind::User, id)
        .and_then(Update::view)
        .map(|v| serde_json::from_str(v).expect("view is JSON"))
}

fn ev(id: &str, kind: &str, at: &str, fields: &[(&str, &str)]) -> (Source, String) {
    let mut obj = serde_json::json!({"id": id, "event_type": kind, "received_at": at});
    for (k, v) in fields {
        obj[*k] = (*v).into();
    }
    (Source::Users, obj.to_string())
}

fn org(key: &str, name: &str, tier: &str, created: &str) -> (Source, String) {
    let obj = serde_json::json!({"organization_key": key, "organization_name": name,
        "organization_tier": tier, "created_at": created});
    (Source::Organizations, obj.to_string())
}

const T1: &str = "2020-12-08 20:00:00.000001";
const T2: &str = "2020-12-08 20:00:00.000002";
const T3: &str = "2020-12-08 20:00:00.000003";
const T4: &str = "2020-12-08 20:00:00.000004";

#[test]
fn created_user_shows_every_field_and_event_times() {
    let store = fold_all(&[ev(
        "u",
        "User Created",
        T1,
        &[
            ("username", "Snake"),
            ("user_email", "s@o.com"),
            ("user_type", "Admin"),
            ("organization_name", "MGS"),
        ],
    )]);
    let v = view(&store, "u").expect("visible");
    assert_eq!(v["id"], "u");
    assert_eq!(v["username"], "Snake");
    assert_eq!(v["user_email"], "s@o.com");
    assert_eq!(v["user_type"], "Admin");
    assert_eq!(v["organization_name"], "MGS");
    assert_eq!(v["created_at"], "2020-12-08T20:00:00.000001Z");
    assert_eq!(v["updated_at"], "2020-12-08T20:00:00.000001Z");
    assert_eq!(
        store.get(Kind::User, "u").and_then(Update::join),
        Some("MGS"),
        "join key"
    );
}

#[test]
fn partial_update_keeps_the_other_fields() {
    let store = fold_all(&[
        ev(
            "u",
            "User Created",
            T1,
            &[("username", "a"), ("user_email", "a@x")],
        ),
        ev("u", "User Updated", T2, &[("username", "b")]),
    ]);
    let v = view(&store, "u").unwrap();
    assert_eq!(v["username"], "b");
    assert_eq!(v["user_email"], "a@x");
    assert_eq!(v["updated_at"], "2020-12-08T20:00:00.000002Z");
    assert_eq!(v["created_at"], "2020-12-08T20:00:00.000001Z");
}

#[test]
fn older_update_arriving_late_does_not_overwrite() {
    let store = fold_all(&[
        ev("u", "User Created", T1, &[("username", "a")]),
        ev("u", "User Updated", T3, &[("username", "new")]),
        ev(
            "u",
            "User Updated",
            T2,
            &[("username", "old"), ("user_type", "User")],
        ),
    ]);
    let v = view(&store, "u").unwrap();
    assert_eq!(v["username"], "new");
    assert_eq!(
        v["user_type"], "User",
        "a field only the older event set is still taken"
    );
    assert_eq!(v["updated_at"], "2020-12-08T20:00:00.000003Z");
}

#[test]
fn deleted_user_is_not_visible() {
    let store = fold_all(&[
        ev("u", "User Created", T1, &[("username", "a")]),
        ev("u", "User Deleted", T2, &[]),
    ]);
    assert_eq!(view(&store, "u"), None);
}

#[test]
fn late_update_does_not_resurrect() {
    let store = fold_all(&[
        ev("u", "User Created", T1, &[("username", "a")]),
        ev("u", "User Deleted", T3, &[]),
        ev("u", "User Updated", T2, &[("username", "zombie")]),
        ev("u", "User Created", T2, &[("username", "zombie")]),
    ]);
    assert_eq!(view(&store, "u"), None);
}

#[test]
fn update_after_delete_without_recreate_stays_deleted() {
    let store = fold_all(&[
        ev("u", "User Created", T1, &[("username", "a")]),
        ev("u", "User Deleted", T2, &[]),
        ev("u", "User Updated", T3, &[("username", "ghost")]),
    ]);
    assert_eq!(view(&store, "u"), None);
}

#[test]
fn created_after_delete_recreates_without_leftovers() {
    let store = fold_all(&[
        ev(
            "u",
            "User Created",
            T1,
            &[("username", "a"), ("user_type", "Admin")],
        ),
        ev("u", "User Deleted", T2, &[]),
        ev("u", "User Created", T3, &[("username", "b")]),
    ]);
    let v = view(&store, "u").unwrap();
    assert_eq!(v["username"], "b");
    assert_eq!(
        v["user_type"],
        serde_json::Value::Null,
        "no field from before the deletion"
    );
    assert_eq!(v["created_at"], "2020-12-08T20:00:00.000003Z");
}

#[test]
fn recreate_arriving_before_the_deletion_it_follows() {
    let store = fold_all(&[
        ev("u", "User Created", T3, &[("username", "b")]),
        ev(
            "u",
            "User Created",
            T1,
            &[("username", "a"), ("user_type", "Admin")],
        ),
        ev("u", "User Deleted", T2, &[]),
    ]);
    let v = view(&store, "u").unwrap();
    assert_eq!(v["username"], "b");
    assert_eq!(v["user_type"], serde_json::Value::Null);
}

#[test]
fn delete_and_create_at_the_same_time_means_deleted() {
    let store = fold_all(&[
        ev("u", "User Created", T2, &[("username", "a")]),
        ev("u", "User Deleted", T2, &[]),
    ]);
    assert_eq!(view(&store, "u"), None);
}

#[test]
fn update_before_any_create_is_kept_only_if_newer_than_the_create() {
    let store = fold_all(&[
        ev("u", "User Updated", T1, &[("username", "too early")]),
        ev("u", "User Updated", T4, &[("user_type", "later")]),
        ev("u", "User Created", T2, &[("username", "created")]),
    ]);
    let v = view(&store, "u").unwrap();
    assert_eq!(v["username"], "created");
    assert_eq!(v["user_type"], "later");
    assert_eq!(v["updated_at"], "2020-12-08T20:00:00.000004Z");
}

/// Equal event times in one partition: the later offset wins, in both orders of
/// arrival, whatever the values' alphabetical order; a replay changes nothing.
#[test]
fn same_time_conflict_is_decided_by_the_log_not_the_alphabet() {
    let created = at_pos(ev("u", "User Created", T1, &[("username", "x")]), 0, 10);
    let earlier = at_pos(ev("u", "User Updated", T2, &[("username", "beta")]), 0, 11);
    let later = at_pos(ev("u", "User Updated", T2, &[("username", "alpha")]), 0, 12);
    let in_order = fold_logged(&[created.clone(), earlier.clone(), later.clone()]);
    let reversed = fold_logged(&[later.clone(), created.clone(), earlier.clone()]);
    assert_eq!(view(&in_order, "u").unwrap()["username"], "alpha");
    assert_eq!(in_order, reversed);
    let mut replayed = in_order.clone();
    apply_logged(&mut replayed, &[created, earlier, later]);
    assert_eq!(
        replayed, in_order,
        "a replay of the same records changes nothing"
    );
}

/// Within one record (a JSON array), the later element wins on equal times.
#[test]
fn same_time_events_of_one_record_are_ordered_by_element() {
    let first = ev("u", "User Created", T1, &[("username", "zulu")]).1;
    let second = ev("u", "User Updated", T1, &[("username", "alpha")]).1;
    let record = (Source::Users, format!("[{first},{second}]"));
    let store = fold_logged(&[at_pos(record, 0, 0)]);
    assert_eq!(view(&store, "u").unwrap()["username"], "alpha");
}

/// Across partitions offsets do not compare: the higher partition wins on equal
/// times, whatever the offsets and the order of arrival.
#[test]
fn same_time_across_partitions_is_decided_by_partition() {
    let created = at_pos(ev("u", "User Created", T1, &[("username", "x")]), 0, 0);
    let p1 = at_pos(ev("u", "User Updated", T2, &[("username", "one")]), 1, 5);
    let p0 = at_pos(ev("u", "User Updated", T2, &[("username", "zero")]), 0, 900);
    let a = fold_logged(&[created.clone(), p0.clone(), p1.clone()]);
    let b = fold_logged(&[p1, created, p0]);
    assert_eq!(view(&a, "u").unwrap()["username"], "one");
    assert_eq!(a, b);
}

/// A created and a deleted event with the same time: the later in the log decides.
#[test]
fn same_time_create_and_delete_follow_the_log() {
    let created = at_pos(ev("u", "User Created", T1, &[("username", "x")]), 0, 1);
    let deleted = at_pos(ev("u", "User Deleted", T1, &[]), 0, 2);
    let recreated = at_pos(ev("u", "User Created", T1, &[("username", "y")]), 0, 3);
    assert_eq!(
        view(&fold_logged(&[deleted.clone(), created.clone()]), "u"),
        None
    );
    let back = fold_logged(&[recreated, deleted, created]);
    assert_eq!(view(&back, "u").unwrap()["username"], "y");
}

/// The seed's organizations carry only `created_at`: a correction re-sent with the same
/// time and a new tier wins because it is later in the log ("Small" sorts after
/// "Enterprise", so comparing values would keep the old tier).
#[test]
fn organization_correction_with_the_same_time_wins() {
    let old = at_pos(org("k", "MGS", "Small", T1), 0, 3);
    let new = at_pos(org("k", "MGS", "Enterprise", T1), 0, 4);
    for order in [[old.clone(), new.clone()], [new.clone(), old.clone()]] {
        let store = fold_logged(&order);
        let o = store.get(Kind::Organization, "k").and_then(Update::view);
        let o: serde_json::Value = serde_json::from_str(o.expect("visible")).unwrap();
        assert_eq!(o["organization_tier"], "Enterprise");
    }
}

/// Each update carries the entity's newest event time: the host's event-time clock
/// and, for a deleted user, the time its tombstone expires from.
#[test]
fn updates_carry_the_newest_event_time() {
    let micros = |t: &str| time::parse(t).unwrap();
    let store = fold_all(&[
        ev("u", "User Created", T1, &[("username", "a")]),
        ev("u", "User Deleted", T3, &[]),
        ev("u", "User Updated", T2, &[("username", "b")]),
        org("k", "MGS", "Small", T4),
    ]);
    let user = store.get(Kind::User, "u").expect("kept as a tombstone");
    assert_eq!((user.view(), user.clock), (None, Some(micros(T3))));
    let o = store.get(Kind::Organization, "k").expect("kept");
    assert_eq!(o.clock, Some(micros(T4)));
}

#[test]
fn a_state_of_the_encoding_without_positions_is_refused_with_a_hint() {
    // "U", flags 0, escaped 0: a user state of the earlier encoding, empty body.
    let earlier = b"U\0\0\x03\0\0\0";
    let value = ev("u", "User Created", T1, &[]).1;
    let batch = Batch::new(&Record::sequence([(Source::Users, value.as_bytes())]));
    let err = batch.fold(&[Some(&earlier[..])]).unwrap_err();
    assert!(err.contains("mode=replay"), "{err}");
}

#[test]
fn duplicated_events_change_nothing() {
    let events = [
        ev("u", "User Created", T1, &[("username", "a")]),
        ev("u", "User Updated", T2, &[("username", "b")]),
    ];
    let once = fold_all(&events);
    let mut store = once.clone();
    apply(&mut store, &events);
    apply(&mut store, &events[..1]);
    assert_eq!(store, once);
}

#[test]
fn organization_is_replaced_by_a_newer_event_for_its_key() {
    let store = fold_all(&[
        org("k", "MGS", "Medium", "2018-01-24 17:28:09"),
        org("k", "MGS", "Large", "2019-01-24 17:28:09"),
        org("k", "MGS", "Small", "2017-01-24 17:28:09"),
    ]);
    let o = store.get(Kind::Organization, "k").expect("kept");
    let (v, join) = (o.view(), o.join());
    let v: serde_json::Value = serde_json::from_str(v.unwrap()).unwrap();
    assert_eq!(v["organization_tier"], "Large");
    assert_eq!(v["organization_key"], "k");
    assert_eq!(v["created_at"], "2019-01-24T17:28:09.000000Z");
    assert_eq!(join, Some("MGS"));
}

#[test]
fn seed_samples_fold_without_rejections() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/");
    let users = std::fs::read_to_string(format!("{dir}users.json")).expect("data/users.json");
    let orgs =
        std::fs::read_to_string(format!("{dir}organizations.json")).expect("organizations.json");
    let store = fold_all(&[(Source::Users, users), (Source::Organizations, orgs)]);
    let snake = view(&store, "069feb770fe581acc9d3313d59780196").expect("Snake is visible");
    assert_eq!(snake["username"], "Solid Snake");
    assert_eq!(
        view(&store, "a0b1c2d3e4f5061728394a5b6c7d8e9f"),
        None,
        "Liquid was deleted"
    );
    assert_eq!(
        store
            .iter()
            .filter(|(e, _)| e.kind == Kind::Organization)
            .count(),
        3
    );
}

#[test]
fn rejections_name_their_record_and_event() {
    let mut store = Store::new();
    let plan = apply(
        &mut store,
        &[
            ev("u", "User Created", T1, &[]),
            (Source::Users, "not json".into()),
            (
                Source::Users,
                format!("[{},{{}}]", ev("v", "User Created", T1, &[]).1),
            ),
        ],
    );
    assert_eq!(plan.accepted, [1, 0, 1]);
    assert_eq!(plan.rejections.len(), 2);
    assert_eq!(
        (plan.rejections[0].input, plan.rejections[0].event),
        (1, None)
    );
    assert_eq!(
        (plan.rejections[1].input, plan.rejections[1].event),
        (2, Some(1))
    );
    assert!(
        view(&store, "v").is_some(),
        "the good event of the mixed array applied"
    );
}

#[test]
fn foreign_state_is_an_error_not_a_panic() {
    let value = ev("u", "User Created", T1, &[]).1;
    let batch = Batch::new(&Record::sequence([(Source::Users, value.as_bytes())]));
    for junk in [&b""[..], b"U", b"O\0\0\0\0", b"U\x05\0\0\0abc"] {
        assert!(batch.fold(&[Some(junk)]).is_err(), "{junk:?}");
    }
    assert!(batch.fold(&[]).is_err(), "wrong prior length");
}

// ---- properties over generated histories ----

const NAMES: [&str; 3] = ["Metal Gear Solid", "Outer Heaven", "FOXHOUND"];
const ACTIONS: [&str; 3] = ["User Created", "User Updated", "User Deleted"];

#[derive(Debug, Clone)]
struct GenUser {
    id: u8,
    action: usize,
    at: i64,
    fields: [Option<u8>; 4],
}

#[derive(Debug, Clone)]
struct GenOrg {
    key: u8,
    name: usize,
    tier: u8,
    at: i64,
}

fn render_time(at: i64) -> String {
    // Base time plus `at` seconds, alternating the two accepted formats.
    let t = time::render(1_600_000_000_000_000 + at * 1_000_000);
    if at % 2 == 0 {
        t
    } else {
        t.replace('T', " ").trim_end_matches('Z').to_string()
    }
}

fn user_record(u: &GenUser) -> (Source, String) {
    let mut obj = serde_json::json!({
        "id": format!("user-{}", u.id),
        "event_type": ACTIONS[u.action],
        "received_at": render_time(u.at),
    });
    if u.action != 2 {
        for (name, v) in event::USER_FIELDS.iter().zip(u.fields) {
            if let Some(v) = v {
                obj[*name] = if *name == "organization_name" {
                    NAMES[usize::from(v) % NAMES.len()].into()
                } else {
                    format!("{name}-{v}").into()
                };
            }
        }
    }
    (Source::Users, obj.to_string())
}

fn org_record(o: &GenOrg) -> (Source, String) {
    let obj = serde_json::json!({
        "organization_key": format!("org-{}", o.key),
        "organization_name": NAMES[o.name],
        "organization_tier": format!("tier-{}", o.tier),
        "created_at": render_time(o.at),
    });
    (Source::Organizations, obj.to_string())
}

fn gen_user(max_time: i64) -> impl Strategy<Value = GenUser> {
    (
        0u8..4,
        0usize..3,
        0..max_time,
        proptest::array::uniform4(proptest::option::of(0u8..3)),
    )
        .prop_map(|(id, action, at, fields)| GenUser {
            id,
            action,
            at,
            fields,
        })
}

fn gen_org(max_time: i64) -> impl Strategy<Value = GenOrg> {
    (0u8..3, 0usize..3, 0u8..3, 0..max_time).prop_map(|(key, name, tier, at)| GenOrg {
        key,
        name,
        tier,
        at,
    })
}

/// A log: generated events, each in a record on partition 0 or 1 at the next offset
/// (generation order is log order), then sorted by event time (stable on ties).
fn history(max_time: i64) -> impl Strategy<Value = Vec<OwnedRecord>> {
    (
        proptest::collection::vec((gen_user(max_time), 0i32..2), 0..40),
        proptest::collection::vec((gen_org(max_time), 0i32..2), 0..6),
    )
        .prop_map(|(users, orgs)| {
            let mut timed: Vec<(i64, OwnedRecord)> = users
                .iter()
                .map(|(u, p)| (u.at, user_record(u), *p))
                .chain(orgs.iter().map(|(o, p)| (o.at, org_record(o), *p)))
                .zip(0i64..)
                .map(|((at, record, partition), offset)| (at, at_pos(record, partition, offset)))
                .collect();
            timed.sort_by_key(|(at, _)| *at);
            timed.into_iter().map(|(_, r)| r).collect()
        })
}

/// Folds `records` in batches whose sizes come from `cuts`.
fn fold_in_batches(records: &[OwnedRecord], cuts: &[usize]) -> Store {
    let mut store = Store::new();
    let mut rest = records;
    let mut cuts = cuts.iter().cycle();
    while !rest.is_empty() {
        let n = (*cuts.next().unwrap_or(&1)).clamp(1, rest.len());
        let (head, tail) = rest.split_at(n);
        let plan = apply_logged(&mut store, head);
        assert!(plan.rejections.is_empty(), "{:?}", plan.rejections);
        rest = tail;
    }
    store
}

/// The sequential model's live user: field index -> value, created, touched.
type LiveUser = (BTreeMap<usize, u8>, i64, i64);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any permutation, with duplicates, in any batching, folds to the state of the
    /// sorted history (times drawn from a small range, so ties happen often).
    #[test]
    fn any_order_and_duplication_gives_the_sorted_state(
        sorted in history(12),
        seed in any::<u64>(),
        dup_mask in any::<u64>(),
        cuts in proptest::collection::vec(1usize..8, 1..5),
    ) {
        let reference = fold_in_batches(&sorted, &[sorted.len().max(1)]);
        let mut shuffled = sorted.clone();
        for (i, r) in sorted.iter().enumerate() {
            if dup_mask >> (i % 64) & 1 == 1 {
                shuffled.push(r.clone());
            }
        }
        let mut rng = seed | 1;
        for i in (1..shuffled.len()).rev() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            shuffled.swap(i, (rng % (i as u64 + 1)) as usize);
        }
        prop_assert_eq!(fold_in_batches(&shuffled, &cuts), reference);
    }

    /// With distinct times, the fold agrees with the plain sequential model of the
    /// rules: apply events one by one in time order.
    #[test]
    fn fold_matches_the_sequential_model(users in proptest::collection::vec(gen_user(1_000_000), 0..40)) {
        let mut users = users;
        users.sort_by_key(|u| u.at);
        users.dedup_by_key(|u| u.at);
        let records: Vec<_> = users.iter().zip(0..).map(|(u, offset)| at_pos(user_record(u), 0, offset)).collect();
        let store = fold_in_batches(&records, &[3]);

        // The model: a user is None (absent/deleted) or its live fields.
        let mut model: BTreeMap<u8, Option<LiveUser>> = BTreeMap::new();
        for u in &users {
            let entry = model.entry(u.id).or_insert(None);
            match u.action {
                0 => {
                    let fields = u.fields.iter().enumerate().filter_map(|(i, v)| v.map(|v| (i, v))).collect();
                    *entry = Some((fields, u.at, u.at));
                }
                1 => {
                    if let Some((fields, _, touched)) = entry {
                        for (i, v) in u.fields.iter().enumerate() {
                            if let Some(v) = v { fields.insert(i, *v); }
                        }
                        *touched = u.at;
                    }
                }
                _ => *entry = None,
            }
        }
        for (id, expected) in model {
            let got = view(&store, &format!("user-{id}"));
            match expected {
                None => prop_assert_eq!(got, None),
                Some((fields, created, touched)) => {
                    let got = got.expect("visible in the model");
                    prop_assert_eq!(&got["created_at"], &serde_json::Value::from(time::render(1_600_000_000_000_000 + created * 1_000_000)));
                    prop_assert_eq!(&got["updated_at"], &serde_json::Value::from(time::render(1_600_000_000_000_000 + touched * 1_000_000)));
                    for (i, name) in event::USER_FIELDS.iter().enumerate() {
                        let want = match fields.get(&i) {
                            None => serde_json::Value::Null,
                            Some(v) if *name == "organization_name" => NAMES[usize::from(*v) % 3].into(),
                            Some(v) => format!("{name}-{v}").into(),
                        };
                        prop_assert_eq!(&got[*name], &want, "field {}", name);
                    }
                }
            }
        }
    }
}

#[test]
fn escaped_values_survive_the_state_round_trip() {
    let odd = "Snake \"Solid\" \\ \n\t\u{1} ü 😀";
    let org_name = "Outer \"Heaven\"";
    let mut store = Store::new();
    // Two batches, so the second folds into the decoded state of the first.
    apply(
        &mut store,
        &[
            ev(
                "u",
                "User Created",
                T1,
                &[
                    ("username", odd),
                    ("organization_name", org_name),
                    ("user_type", "x"),
                ],
            ),
            org("k", org_name, "Tier \"1\"", T1),
        ],
    );
    apply(
        &mut store,
        &[ev("u", "User Updated", T2, &[("user_type", "Admin")])],
    );
    let v = view(&store, "u").expect("visible");
    assert_eq!(v["username"], odd);
    assert_eq!(v["organization_name"], org_name);
    assert_eq!(v["user_type"], "Admin");
    let join = store.get(Kind::User, "u").and_then(Update::join);
    assert_eq!(join, Some(org_name), "the join key is the raw name");
    let o = store.get(Kind::Organization, "k").expect("kept");
    let (state, org_view, org_join) = (o.state.as_deref().expect("state"), o.view(), o.join());
    let org_view: serde_json::Value = serde_json::from_str(org_view.unwrap()).unwrap();
    assert_eq!(org_view["organization_tier"], "Tier \"1\"");
    assert_eq!(org_join, Some(org_name));
    // The organization state decodes to the same record.
    let decoded = state::OrgState::decode(state).unwrap();
    assert_eq!(decoded.current.name, org_name);
    assert_eq!(decoded.current.tier.as_deref(), Some("Tier \"1\""));
}

#[test]
fn states_keep_each_string_once() {
    let mut store = Store::new();
    apply(
        &mut store,
        &[ev(
            "0123456789abcdef0123456789abcdef",
            "User Created",
            T1,
            &[
                ("username", "solid-snake-the-legendary"),
                ("user_email", "snake@outerheaven.example.com"),
                ("user_type", "Admin"),
                ("organization_name", "Metal Gear Solid"),
            ],
        )],
    );
    let kept = store
        .get(Kind::User, "0123456789abcdef0123456789abcdef")
        .expect("kept");
    let (state, view) = (
        kept.state.as_deref().expect("state"),
        kept.view().expect("view"),
    );
    // The state is the answer plus a small header: not a second copy of every field.
    assert!(
        state.len() <= view.len() + 100,
        "state {} bytes for a {}-byte answer",
        state.len(),
        view.len()
    );
}
