//! Swap preview end to end (`PUT /admin/reducer?mode=preview`): the candidate folds
//! the log into a shadow, the report says what it would do to every answer, and
//! nothing changes: answers, active reducer, dead letters. Checked against the oracle
//! (the README's rules), not against the host's own fold.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use logq_e2e::{
    Broker, Host, component, eventually, expected_answers, history, logq_bin, masked, produce,
    produce_raw, read_topic,
};
use serde_json::Value;

const TOKEN: &str = "preview-token";

/// Waits for swap `id`'s history entry to end; returns it.
fn ended(host: &Host, id: &Value) -> Value {
    eventually(Duration::from_secs(120), "the preview to end", || {
        let d = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
        let entry = d["history"]
            .as_array()?
            .iter()
            .find(|e| e["id"] == *id)?
            .clone();
        (entry["outcome"] != "replaying").then_some(entry)
    })
}

#[test]
fn a_preview_of_mask_emails_reports_exactly_the_users_with_an_email_and_changes_nothing() {
    let broker = Broker::start();
    broker.create_default_topics();
    let (users, orgs) = history(0x9e7, 300, 3_000);
    produce(&broker, "users", &[], users.join("\n").as_bytes());
    produce(&broker, "organizations", &[], orgs.join("\n").as_bytes());
    // One record the candidate (like the live reducer) refuses: not JSON.
    produce_raw(
        &broker,
        "users",
        &[(Some(&b"bad"[..]), Some(&b"this is not an event"[..]))],
    );
    let host = Host::start(&broker, &["--admin-token", TOKEN]);
    host.wait_ready(Duration::from_secs(120));
    let expected = expected_answers(&users, &orgs);
    host.assert_answers(&users, expected.clone());
    let dead_before = read_topic(&broker, "users.dlq", 1, Duration::from_secs(30)).len();
    let active_before =
        host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json()["active"]["sha256"].clone();

    // Readers meanwhile: every GET of an existing user answers 200.
    let stop = Arc::new(AtomicBool::new(false));
    let getter = logq_e2e::hammer(host.addr, expected.keys().cloned().collect(), stop.clone());
    let mask = std::fs::read(component("mask-emails-reducer.wasm")).unwrap();
    let r = host.admin("PUT", "/admin/reducer?mode=preview", Some(TOKEN), &mask);
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["swap"]["mode"], "preview");
    let entry = ended(&host, &r.json()["swap"]["id"]);
    stop.store(true, Ordering::Relaxed);
    let (reads, failures) = getter.join().unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(reads > 0);
    assert_eq!(entry["outcome"], "previewed", "{entry}");

    // The report, against the oracle: masking changes exactly the answers that
    // carry an e-mail, and nothing appears or disappears.
    let report = &entry["preview"];
    let would_change = expected
        .values()
        .filter(|v| masked((*v).clone()) != **v)
        .count();
    assert!(would_change > 50, "{would_change} answers have an e-mail");
    let users_report = &report["users"];
    assert_eq!(users_report["changed"], would_change, "{report}");
    assert_eq!(users_report["compared"], expected.len(), "{report}");
    assert_eq!(
        users_report["unchanged"],
        expected.len() - would_change,
        "{report}"
    );
    assert_eq!(users_report["newly_visible"], 0, "{report}");
    assert_eq!(users_report["newly_hidden"], 0, "{report}");
    assert_eq!(
        users_report["fields"],
        serde_json::json!({ "user_email": would_change }),
        "{report}"
    );
    let sample = &users_report["samples"]["changed"][0];
    let id = sample["id"].as_str().unwrap();
    assert_eq!(sample["before"], expected[id]);
    assert_eq!(sample["after"], masked(expected[id].clone()));
    assert_eq!(
        sample["diff"],
        serde_json::json!({"user_email": {
            "before": expected[id]["user_email"],
            "after": masked(expected[id].clone())["user_email"],
        }}),
        "{sample}"
    );
    assert_eq!(report["organizations"]["changed"], 0, "{report}");
    // The refused record is counted; both reducers refuse it, so the dead letters
    // stay as they are.
    assert_eq!(report["records_refused"], 1, "{report}");
    assert_eq!(
        report["dead_letters"],
        serde_json::json!({"added": 0, "removed": 0, "unchanged": 1, "complete": true, "samples": {}}),
        "{report}"
    );
    assert!(report["position"].is_object(), "{report}");

    // Nothing changed: the same answers (whole set), the same active reducer, the
    // same dead letters.
    host.assert_answers(&users, expected);
    let described = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
    assert_eq!(described["active"]["sha256"], active_before);
    assert_eq!(
        dead_before, 1,
        "the live reducer dead-lettered the bad record"
    );
    // Read to the end offsets: a second copy would be seen.
    assert_eq!(
        read_topic(&broker, "users.dlq", 1, Duration::from_secs(30)).len(),
        1,
        "the preview wrote no dead letter"
    );
    // The same from the command line: `logq reducer preview` waits and prints the
    // entry; a wrong token is an error that says so.
    let component_path = component("mask-emails-reducer.wasm");
    let cli = |token: &str| {
        std::process::Command::new(logq_bin())
            .args(["reducer", "preview"])
            .arg(&component_path)
            .args(["--host", &format!("http://{}", host.addr), "--token", token])
            .output()
            .expect("runs logq")
    };
    let out = cli(TOKEN);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(printed["outcome"], "previewed", "{printed}");
    assert_eq!(printed["preview"]["users"]["changed"], would_change);
    let refused = cli("wrong");
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("refused the preview (401)"), "{said}");

    // And a rollback has nothing to go back to: the preview never became active.
    let r = host.admin("POST", "/admin/reducer/rollback", Some(TOKEN), b"");
    assert_eq!(r.status, 409, "{}", r.body);
}

/// `n` creations of users `<prefix>-1`.. whose username carries the test fixture's
/// `marker` (the default reducer folds them; the fixture misbehaves on them).
fn marked(prefix: &str, marker: &str, n: usize) -> Vec<String> {
    (1..=n)
        .map(|i| {
            serde_json::json!({
                "id": format!("{prefix}-{i}"), "event_type": "User Created",
                "username": marker, "received_at": format!("2021-01-{i:02} 00:00:00"),
            })
            .to_string()
        })
        .collect()
}

/// The `preview` entry's dead-letter places of `category`, as (`topic/partition`,
/// offset), and their reasons.
fn refusals(report: &Value, category: &str) -> (Vec<(String, i64)>, Vec<String>) {
    let samples = report["dead_letters"]["samples"][category]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut places: Vec<(String, i64)> = samples
        .iter()
        .map(|s| {
            (
                s["partition"].as_str().unwrap_or_default().to_owned(),
                s["offset"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    places.sort();
    let reasons = samples
        .iter()
        .map(|s| s["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    (places, reasons)
}

/// Previews `component` on `host` and waits for the report.
fn previewed(host: &Host, component: &[u8]) -> Value {
    let r = host.admin("PUT", "/admin/reducer?mode=preview", Some(TOKEN), component);
    assert_eq!(r.status, 202, "{}", r.body);
    ended(host, &r.json()["swap"]["id"])["preview"].clone()
}

/// A report's dead letters: (added, removed, unchanged).
fn letter_counts(report: &Value) -> (u64, u64, u64) {
    let count = |what: &str| report["dead_letters"][what].as_u64().unwrap_or(u64::MAX);
    (count("added"), count("removed"), count("unchanged"))
}

/// The visible/hidden ids of a report's samples in `category`, sorted.
fn sample_ids(report: &Value, category: &str) -> Vec<String> {
    let mut ids: Vec<String> = report["users"]["samples"][category]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

#[test]
fn a_preview_reports_the_dead_letters_a_candidate_would_add_or_remove_and_writes_none() {
    let broker = Broker::start();
    broker.create_default_topics();
    // Three users that only the test fixture refuses (it traps on the marker; the
    // default reducer folds them), first in the log so that the canary's recent
    // records do not hold them; one record both refuse; then a generated history.
    let traps = marked("trap", "logq-test:trap", 3);
    produce(&broker, "users", &[], traps.join("\n").as_bytes());
    produce_raw(
        &broker,
        "users",
        &[(Some(&b"bad"[..]), Some(&b"this is not an event"[..]))],
    );
    let (users, orgs) = history(0xd1ff, 300, 3_000);
    produce(&broker, "users", &[], users.join("\n").as_bytes());
    produce(&broker, "organizations", &[], orgs.join("\n").as_bytes());
    // Where the marked records landed, read back from the broker.
    let mut marked: Vec<(String, i64)> = read_topic(&broker, "users", 4, Duration::from_secs(30))
        .into_iter()
        .filter(|r| String::from_utf8_lossy(&r.value).contains("logq-test:trap"))
        .map(|r| (format!("users/{}", r.partition), r.offset))
        .collect();
    marked.sort();
    assert_eq!(marked.len(), 3, "{marked:?}");
    let trap_ids = vec!["trap-1".to_owned(), "trap-2".into(), "trap-3".into()];

    let host = Host::start(&broker, &["--admin-token", TOKEN]);
    host.wait_ready(Duration::from_secs(120));
    for id in &trap_ids {
        assert_eq!(host.get(&format!("/users/{id}")).status, 200, "{id}");
    }
    let dead = || read_topic(&broker, "users.dlq", 1, Duration::from_secs(30)).len();
    assert_eq!(
        dead(),
        1,
        "the live reducer dead-lettered the bad record only"
    );

    // The fixture as a candidate: it would refuse the three, which the live reducer
    // folded; the record both refuse is unchanged.
    let fixture = std::fs::read(component("test-triggers-reducer.wasm")).unwrap();
    let report = previewed(&host, &fixture);
    assert_eq!(letter_counts(&report), (3, 0, 1), "{report}");
    assert_eq!(report["dead_letters"]["complete"], true, "{report}");
    let (added, reasons) = refusals(&report, "added");
    assert_eq!(added, marked, "{report}");
    assert!(reasons.iter().all(|r| r.contains("trapped")), "{reasons:?}");
    assert_eq!(report["users"]["newly_hidden"], 3, "{report}");
    assert_eq!(sample_ids(&report, "newly_hidden"), trap_ids);
    assert_eq!(report["users"]["changed"], 0, "{report}");
    assert_eq!(dead(), 1, "a preview writes no dead letter");

    // Swapped in by a replay, the fixture's refusals are the live ones (a replay
    // writes no dead letter either): a preview of the default reducer would now
    // remove those three, with the live reducer's reasons, and show the users again.
    let r = host.admin("PUT", "/admin/reducer?mode=replay", Some(TOKEN), &fixture);
    assert_eq!(r.status, 202, "{}", r.body);
    let swapped = ended(&host, &r.json()["swap"]["id"]);
    assert_eq!(swapped["outcome"], "active", "{swapped}");
    for id in &trap_ids {
        assert_eq!(host.get(&format!("/users/{id}")).status, 404, "{id}");
    }
    let default = std::fs::read(component("reducer.wasm")).unwrap();
    let report = previewed(&host, &default);
    assert_eq!(letter_counts(&report), (0, 3, 1), "{report}");
    let (removed, reasons) = refusals(&report, "removed");
    assert_eq!(removed, marked, "{report}");
    assert!(reasons.iter().all(|r| r.contains("trapped")), "{reasons:?}");
    assert_eq!(report["users"]["newly_visible"], 3, "{report}");
    assert_eq!(sample_ids(&report, "newly_visible"), trap_ids);
    assert_eq!(
        dead(),
        1,
        "neither the replay nor the preview wrote a dead letter"
    );
}

#[test]
fn a_preview_cancelled_midway_leaves_answers_position_reducer_and_dead_letters_as_they_were() {
    let broker = Broker::start();
    broker.create_default_topics();
    // Five records the test fixture loops on until the time limit cuts it (the
    // default reducer folds them): each batch that holds one costs a preview a time
    // limit per split, so the preview is still running when it is cancelled. They
    // come first, so the canary's recent records do not hold them.
    let slow = marked("slow", "logq-test:loop", 5);
    let (history_users, orgs) = history(0xca9c, 300, 3_000);
    let users: Vec<String> = slow.iter().chain(&history_users).cloned().collect();
    produce(&broker, "users", &[], slow.join("\n").as_bytes());
    produce(&broker, "users", &[], history_users.join("\n").as_bytes());
    produce(&broker, "organizations", &[], orgs.join("\n").as_bytes());
    produce_raw(
        &broker,
        "users",
        &[(Some(&b"bad"[..]), Some(&b"this is not an event"[..]))],
    );
    let host = Host::start(
        &broker,
        &["--admin-token", TOKEN, "--reducer-time-limit-ms", "500"],
    );
    host.wait_ready(Duration::from_secs(120));
    let expected = expected_answers(&users, &orgs);
    host.assert_answers(&users, expected.clone());
    let position = |host: &Host| {
        host.get("/users/slow-1")
            .header("x-logq-position")
            .map(str::to_owned)
            .expect("answers carry their position")
    };
    let before = position(&host);
    let described = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
    let history_len = described["history"].as_array().unwrap().len();

    let fixture = std::fs::read(component("test-triggers-reducer.wasm")).unwrap();
    let r = host.admin("PUT", "/admin/reducer?mode=preview", Some(TOKEN), &fixture);
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["swap"]["id"].clone();
    // Midway: it is folding (a step over the looping records takes seconds: the
    // time limit at each split; its progress shows when the step ends, so the phase
    // is what says it runs).
    let running = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
    assert_eq!(running["replay"]["phase"], "catching_up", "{running}");
    let r = host.admin("DELETE", "/admin/reducer/replay", Some(TOKEN), b"");
    assert_eq!(r.status, 200, "cancelled while running: {}", r.body);
    let entry = ended(&host, &id);
    assert_eq!(entry["outcome"], "cancelled", "{entry}");
    assert!(entry["preview"].is_null(), "no report: {entry}");

    // Nothing changed: every answer, the position, the active reducer, the history
    // (one entry more: the cancelled preview), the dead letters.
    host.assert_answers(&users, expected);
    assert_eq!(position(&host), before);
    let after = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
    assert_eq!(after["active"], described["active"]);
    assert_eq!(after["previous"], described["previous"]);
    assert_eq!(after["history"].as_array().unwrap().len(), history_len + 1);
    assert_eq!(
        read_topic(&broker, "users.dlq", 1, Duration::from_secs(30)).len(),
        1,
        "the live reducer's one dead letter, and none from the preview"
    );
}
