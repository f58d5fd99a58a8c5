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
    assert_eq!(report["organizations"]["changed"], 0, "{report}");
    // The refused record is reported with its place and reason, not dead-lettered
    // again.
    assert_eq!(report["records_refused"], 1, "{report}");
    assert_eq!(
        report["refusals"][0]["partition"]
            .as_str()
            .map(|p| p.starts_with("users/")),
        Some(true)
    );
    assert!(
        report["refusals"][0]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
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
