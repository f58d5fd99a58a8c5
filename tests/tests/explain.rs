//! Answer provenance end to end: `GET /users/{id}?explain=1` cites, for every field, the
//! event that set it, and each cited record, read back from the broker at its partition
//! and offset, is the one the oracle says won (keyless arrays over several partitions,
//! with out-of-order, duplicated and deleted events); `logq explain --records` prints
//! those records; a reducer without the `explain` export says so (501).

// Test helpers: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use logq_e2e::oracle::{Oracle, Place};
use logq_e2e::{Broker, Host, component, history, in_arrays, logged, produce};
use serde_json::Value;

const READY: Duration = Duration::from_secs(120);
const TOKEN: &str = "explain-token";

/// The event at `place` of a topic's log, from the records read back.
fn event_at(log: &BTreeMap<(i32, i64), Value>, place: Place) -> Value {
    let record = &log[&(place.0, place.1)];
    match record {
        Value::Array(items) => items[place.2].clone(),
        one => {
            assert_eq!(place.2, 0, "an element of a record that is not an array");
            one.clone()
        }
    }
}

fn cited(stamp: &Value) -> Place {
    (
        i32::try_from(stamp["partition"].as_i64().expect("partition")).unwrap(),
        stamp["offset"].as_i64().expect("offset"),
        usize::try_from(stamp["element"].as_u64().expect("element")).unwrap(),
    )
}

#[test]
fn every_field_cites_the_record_the_rules_say_won() {
    let broker = Broker::start();
    broker.create_default_topics();
    let (users, orgs) = history(0xe4_91a1, 200, 3_000);
    let (user_records, org_records) = (in_arrays(7, &users), in_arrays(8, &orgs));
    for chunk in user_records.chunks(40) {
        produce(
            &broker,
            "users",
            &["--raw-lines"],
            chunk.join("\n").as_bytes(),
        );
    }
    produce(
        &broker,
        "organizations",
        &["--raw-lines"],
        org_records.join("\n").as_bytes(),
    );
    let log_users = logged(&broker, "users", user_records.len());
    let log_orgs = logged(&broker, "organizations", org_records.len());
    let mut oracle = Oracle::new();
    oracle.fold_logged(&log_users, &log_orgs);
    let by_place = |log: &[logq_e2e::oracle::Logged]| -> BTreeMap<(i32, i64), Value> {
        log.iter()
            .map(|r| {
                let v: Value = serde_json::from_str(&r.value).unwrap();
                ((r.partition, r.offset), v)
            })
            .collect()
    };
    let (user_log, org_log) = (by_place(&log_users), by_place(&log_orgs));

    let host = Host::start(&broker, &["--admin-token", TOKEN]);
    host.wait_ready(READY);
    host.wait_consumed("users", user_records.len(), Duration::from_secs(60));
    let answers = oracle.answers();
    let (mut fields, mut hidden) = (0, 0);
    for id in logq_e2e::user_ids(&users) {
        let want = oracle
            .provenance(&id)
            .expect("every produced id is remembered");
        let r = host.get(&format!("/users/{id}?explain=1"));
        assert_eq!(r.status, 200, "{id}: {}", r.body);
        let e = r.json();
        let p = &e["provenance"];
        assert_eq!(
            e["answer"],
            answers.get(&id).cloned().unwrap_or(Value::Null),
            "{id}"
        );
        assert_eq!(p["visible"], answers.contains_key(&id), "{id}");
        for (name, stamp) in [("created", want.created), ("deleted", want.deleted)] {
            match stamp {
                Some(place) => assert_eq!(cited(&p[name]), place, "{id} {name}"),
                None => assert_eq!(p[name], Value::Null, "{id} {name}"),
            }
        }
        if !answers.contains_key(&id) {
            hidden += 1;
            continue;
        }
        for (name, set_by) in p["fields"].as_object().expect("fields") {
            if set_by.is_null() {
                assert!(!want.fields.contains_key(name.as_str()), "{id} {name}");
                continue;
            }
            let place = cited(&set_by["set_by"]);
            assert_eq!(Some(&place), want.fields.get(name.as_str()), "{id} {name}");
            // The record at that place in the log carries this value.
            let event = event_at(&user_log, place);
            assert_eq!(event["id"], id.as_str());
            assert_eq!(
                event[name.as_str()],
                set_by["value"],
                "{id} {name} at {place:?}"
            );
            fields += 1;
        }
        // The join: the organization the oracle picks, and its winning event.
        if let Some(name) = answers[&id]["organization_name"].as_str() {
            let o = &e["organization"];
            match oracle.joined(name) {
                Some((key, place)) => {
                    assert_eq!(o["joined"], key.as_str(), "{id}");
                    let version = &o["joined_organization"]["provenance"]["version"];
                    assert_eq!(cited(version), place, "{id}: {key}");
                    assert_eq!(event_at(&org_log, place)["organization_key"], key.as_str());
                }
                None => assert_eq!(o["joined"], Value::Null, "{id}"),
            }
        }
    }
    assert!(
        fields > 500 && hidden > 10,
        "{fields} fields, {hidden} hidden users checked"
    );
    // The plain answer is untouched by all of this.
    let (id, want) = answers.iter().next().unwrap();
    assert_eq!(host.get(&format!("/users/{id}")).json(), *want);

    // `logq explain --records` prints the records the table cites, as they are.
    let out = std::process::Command::new(logq_e2e::logq_bin())
        .args(["explain", id, "--records", "--host"])
        .arg(format!("http://{}", host.addr))
        .args(["--brokers", &broker.bootstrap])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let place = oracle.provenance(id).unwrap().fields["username"];
    let record = log_users
        .iter()
        .find(|r| (r.partition, r.offset) == (place.0, place.1))
        .unwrap();
    assert!(
        text.contains(&format!("users/{}@{}: {}", place.0, place.1, record.value)),
        "{text}"
    );
    assert!(text.contains(want["username"].as_str().unwrap()), "{text}");

    // A reducer without the explain export (built with the SDK's plain world): 501,
    // and the plain answers go on.
    let mask = std::fs::read(component("mask-emails-reducer.wasm")).unwrap();
    let r = host.admin("PUT", "/admin/reducer?mode=forward", Some(TOKEN), &mask);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = host.get(&format!("/users/{id}?explain=1"));
    assert_eq!(r.status, 501, "{}", r.body);
    assert!(
        r.body.contains("does not export logq:reducer/explain"),
        "{}",
        r.body
    );
    assert_eq!(host.get(&format!("/users/{id}")).status, 200);
    assert_eq!(host.get("/users/nobody?explain=1").status, 404);
    assert_eq!(host.get(&format!("/users/{id}?explain=yes")).status, 400);
}
