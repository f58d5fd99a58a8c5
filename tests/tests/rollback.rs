//! A rollback rolls back what readers see: after a replay swap, a forward swap or a
//! file-watch swap, and after a second rollback, every answer equals the fold of the
//! reducer then active, from the moment the admin API says the rollback is done; and
//! all the while, a GET of a user that exists never gets anything but 200.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use logq_e2e::{Broker, Host, component, eventually, expected_answers, history, masked, produce};

const TOKEN: &str = "rollback-test-token";
const WITHIN: Duration = Duration::from_secs(120);

/// Waits until swap `id` is active: for a replay or a rollback, its state has flipped.
fn wait_active(host: &Host, id: &serde_json::Value) -> serde_json::Value {
    eventually(WITHIN, "the swap to be active", || {
        let d = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
        let entry = d["history"]
            .as_array()?
            .iter()
            .find(|h| h["id"] == *id)?
            .clone();
        assert!(
            !matches!(
                entry["outcome"].as_str(),
                Some("failed" | "superseded" | "cancelled" | "rejected")
            ),
            "{d}"
        );
        (entry["outcome"] == "active").then_some(d)
    })
}

fn rollback(host: &Host) -> serde_json::Value {
    let r = host.admin("POST", "/admin/reducer/rollback", Some(TOKEN), b"");
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["swap"]["mode"], "replay");
    wait_active(host, &r.json()["swap"]["id"])
}

/// `User Updated` events for `ids`, newer than anything in the history.
fn updates(ids: &[String], tag: &str) -> Vec<String> {
    ids.iter()
        .map(|id| {
            serde_json::json!({"id": id, "event_type": "User Updated", "user_type": tag,
                "received_at": "2030-01-01 00:00:00"})
            .to_string()
        })
        .collect()
}

fn all_masked(
    answers: std::collections::BTreeMap<String, serde_json::Value>,
) -> impl Iterator<Item = (String, serde_json::Value)> {
    answers.into_iter().map(|(id, v)| (id, masked(v)))
}

#[test]
fn every_rollback_restores_every_answer_and_no_existing_user_is_ever_missing() {
    let broker = Broker::start();
    broker.create_default_topics();
    let (mut users, orgs) = history(0x0b5e, 300, 2_000);
    produce(&broker, "users", &[], users.join("\n").as_bytes());
    produce(&broker, "organizations", &[], orgs.join("\n").as_bytes());
    let dir = std::env::temp_dir().join(format!("logq-rollback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("reducer.wasm");
    std::fs::copy(component("reducer.wasm"), &file).unwrap();
    let host = Host::start(
        &broker,
        &["--admin-token", TOKEN, "--reducer", file.to_str().unwrap()],
    );
    host.wait_ready(WITHIN);
    let ids: Vec<String> = expected_answers(&users, &orgs).into_keys().collect();
    assert!(ids.len() > 100, "{} users", ids.len());
    let stop = Arc::new(AtomicBool::new(false));
    let getter = logq_e2e::hammer(host.addr, ids.clone(), stop.clone());
    let mask = std::fs::read(component("mask-emails-reducer.wasm")).unwrap();

    // 1. A replay swap, then a rollback.
    let r = host.admin("PUT", "/admin/reducer?mode=replay", Some(TOKEN), &mask);
    assert_eq!(r.status, 202, "{}", r.body);
    let mask_sha = r.json()["swap"]["sha256"].clone();
    let d = wait_active(&host, &r.json()["swap"]["id"]);
    assert_eq!(d["active"]["answers"]["share_by_active"], 1.0, "{d}");
    host.assert_answers(&users, all_masked(expected_answers(&users, &orgs)));
    let d = rollback(&host);
    assert_eq!(d["active"]["answers"]["share_by_active"], 1.0, "{d}");
    host.assert_answers(&users, expected_answers(&users, &orgs));

    // 2. A forward swap: it says how many answers it leaves to the old reducer, and
    // only the users with new events change. Then a rollback restores them.
    let r = host.admin("PUT", "/admin/reducer?mode=forward", Some(TOKEN), &mask);
    assert_eq!(r.status, 200, "{}", r.body);
    let d = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
    let total = d["active"]["answers"]["total"].as_u64().unwrap();
    assert_eq!(r.json()["swap"]["stale_answers"], total, "{}", r.body);
    let touched = &ids[..20];
    let more = updates(touched, "Forwarded");
    produce(&broker, "users", &[], more.join("\n").as_bytes());
    users.extend(more);
    host.wait_consumed("users", users.len(), WITHIN);
    let d = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
    assert_eq!(d["active"]["answers"]["by_active"], 20, "{d}");
    host.assert_answers(
        &users,
        expected_answers(&users, &orgs).into_iter().map(|(id, v)| {
            let v = if touched.contains(&id) { masked(v) } else { v };
            (id, v)
        }),
    );
    rollback(&host);
    host.assert_answers(&users, expected_answers(&users, &orgs));

    // 3. A second rollback goes back to the newer reducer, for every answer.
    let d = rollback(&host);
    assert_eq!(d["active"]["sha256"], mask_sha, "{d}");
    host.assert_answers(&users, all_masked(expected_answers(&users, &orgs)));
    rollback(&host);
    host.assert_answers(&users, expected_answers(&users, &orgs));

    // 4. A file-watch swap (forward), then a rollback.
    let tmp = dir.join("reducer.wasm.new");
    std::fs::copy(component("mask-emails-reducer.wasm"), &tmp).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    eventually(WITHIN, "the file's reducer to be active", || {
        let d = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
        (d["active"]["origin"] == "file").then_some(())
    });
    let touched = &ids[20..30];
    let more = updates(touched, "Watched");
    produce(&broker, "users", &[], more.join("\n").as_bytes());
    users.extend(more);
    host.wait_consumed("users", users.len(), WITHIN);
    host.assert_answers(
        &users,
        expected_answers(&users, &orgs).into_iter().map(|(id, v)| {
            let v = if touched.contains(&id) { masked(v) } else { v };
            (id, v)
        }),
    );
    rollback(&host);
    host.assert_answers(&users, expected_answers(&users, &orgs));

    stop.store(true, Ordering::Relaxed);
    let (ok, failures) = getter.join().unwrap();
    assert!(
        failures.is_empty(),
        "GETs of existing users failed: {failures:#?}"
    );
    assert!(ok > 100, "the GET stream ran ({ok})");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A replay and a rollback (itself a replay) finish over a log whose last records are
/// compaction tombstones (null values, as a compacted topic has): the stepper they
/// share with the live loop moves a partition past every record, folded or not. (They
/// used to stay `replaying` for ever: the replay dropped tombstones before advancing.)
#[test]
fn a_replay_and_a_rollback_finish_over_a_log_that_ends_in_tombstones() {
    let broker = Broker::start();
    broker.create_topic("users", 1);
    broker.create_topic("organizations", 1);
    let users: Vec<String> = (0..20)
        .map(|i| {
            serde_json::json!({"id": format!("tomb{i:02}"), "event_type": "User Created",
                "username": format!("user {i}"), "user_email": format!("u{i}@example.com"),
                "organization_name": "Outer Heaven", "received_at": "2021-03-04 05:06:07"})
            .to_string()
        })
        .chain(std::iter::once(
            serde_json::json!({"id": "tomb07", "event_type": "User Deleted",
                "received_at": "2021-03-05 00:00:00"})
            .to_string(),
        ))
        .collect();
    let orgs = vec![
        serde_json::json!({"organization_key": "oh", "organization_name": "Outer Heaven",
            "organization_tier": "Small", "created_at": "2020-01-01 00:00:00"})
        .to_string(),
    ];
    let records: Vec<logq_e2e::RawRecord<'_>> = users
        .iter()
        .map(|u| (None, Some(u.as_bytes())))
        .chain([(Some(b"tomb01".as_slice()), None); 3])
        .collect();
    logq_e2e::produce_raw(&broker, "users", &records);
    produce(&broker, "organizations", &[], orgs.join("\n").as_bytes());
    let host = Host::start(&broker, &["--admin-token", TOKEN]);
    host.wait_ready(WITHIN);
    assert_eq!(
        host.metric("logq_tombstones_skipped_total{topic=\"users\"}"),
        Some(3.0)
    );
    let expected = expected_answers(&users, &orgs);
    assert_eq!(expected.len(), 19);
    let deleted = "tomb07";
    assert!(!expected.contains_key(deleted));
    let check = |mask: bool| {
        host.assert_answers(
            &users,
            expected
                .clone()
                .into_iter()
                .map(|(id, v)| (id, if mask { masked(v) } else { v })),
        );
        assert_eq!(host.get(&format!("/users/{deleted}")).status, 404);
    };
    check(false);

    let mask = std::fs::read(component("mask-emails-reducer.wasm")).unwrap();
    let r = host.admin("PUT", "/admin/reducer?mode=replay", Some(TOKEN), &mask);
    assert_eq!(r.status, 202, "{}", r.body);
    let d = wait_active(&host, &r.json()["swap"]["id"]);
    assert_eq!(d["active"]["answers"]["share_by_active"], 1.0, "{d}");
    check(true);
    rollback(&host);
    check(false);
}
