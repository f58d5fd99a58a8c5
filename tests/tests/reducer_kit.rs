//! The reducer kit end to end: the README's "Write your own reducer" walks run
//! literally (read from the README, the only change being the host's address), and
//! each example under `examples/` built from source with `logq reducer build`,
//! hot-swapped into a running host, and its answers checked against its own rules.
//!
//! The examples' Rust builds share `target/examples-wasm`; the walk-through's project
//! builds in its own folder; the JavaScript ones run `npm install` (ComponentizeJS from
//! the npm registry) in a temporary folder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use logq_e2e::{
    Broker, Host, eventually, expected_answers, fenced_blocks, history, produce, readme_section,
    root,
};
use serde_json::Value;

const TOKEN: &str = "secret";
const WITHIN: Duration = Duration::from_secs(120);
const SNAKE: &str = "069feb770fe581acc9d3313d59780196";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("logq-kit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

/// A host with the sample data and the admin token the README uses.
fn host_with_samples(broker: &Broker) -> Host {
    broker.create_default_topics();
    for topic in ["users", "organizations"] {
        let data = std::fs::read(root().join("data").join(format!("{topic}.json")))
            .expect("the sample data");
        produce(broker, topic, &[], &data);
    }
    let host = Host::start(broker, &["--admin-token", TOKEN]);
    host.wait_ready(WITHIN);
    host
}

/// The README's section "Write your own reducer".
fn walkthrough() -> String {
    readme_section("## Write your own reducer")
}

/// Runs `script` with bash in `dir`, `logq` on the PATH; its standard output. Cargo
/// builds of the workspace's examples share `target/examples-wasm`; a project of its
/// own (the walk-through's) builds in its own `target/`, as a user's would: the two
/// must not share a target folder (the same path crates, built from two workspaces,
/// would meet there under one name).
fn bash(dir: &Path, script: &str) -> String {
    logq_e2e::bash(dir, script, &[])
}

/// Runs a README walk (`sh` block) against `host`: the lines before the "(edit ...)"
/// comment, then `edit`, then the rest. Returns the user's answer before the
/// rollback and after it (the two `curl`s of the user).
fn walk(host: &Host, block: &str, dir: &Path, edit: impl FnOnce(&Path)) -> (Value, Value) {
    let block = block.replace("http://127.0.0.1:8080", &format!("http://{}", host.addr));
    let (before, after) = block
        .split_once("# (edit")
        .expect("the walk says where to edit");
    let after = after.split_once('\n').map_or("", |(_, rest)| rest);
    let export = block.lines().next().unwrap_or_default();
    assert!(export.starts_with("export HOST="), "{export}");
    bash(dir, before);
    edit(dir);
    let out = bash(dir, &format!("{export}\n{after}"));
    assert!(out.contains("\"ok\": true"), "the build's verdict: {out}");
    let answers: Vec<Value> = out
        .lines()
        .filter(|l| l.starts_with("{\"id\""))
        .map(|l| serde_json::from_str(l).expect("an answer"))
        .collect();
    assert_eq!(answers.len(), 2, "two answers of the user: {out}");
    (answers[0].clone(), answers[1].clone())
}

/// Replaces the first `old` in file `path` with `new` (which must be there once).
fn replace_in(path: &Path, old: &str, new: &str) {
    let text = std::fs::read_to_string(path).expect("the file to edit");
    assert_eq!(
        text.matches(old).count(),
        1,
        "{old:?} in {}",
        path.display()
    );
    std::fs::write(path, text.replacen(old, new, 1)).expect("writing the edit");
}

#[test]
fn the_rust_walkthrough_and_the_display_name_example_serve_their_answers() {
    let broker = Broker::start();
    let host = host_with_samples(&broker);
    let plain = host.get(&format!("/users/{SNAKE}")).json();
    let section = walkthrough();
    let rust = &fenced_blocks(&section, "rust")[0];
    let dir = scratch("rust-walk");
    let (swapped, rolled_back) = walk(&host, &fenced_blocks(&section, "sh")[1], &dir, |dir| {
        replace_in(
            &dir.join("my-reducer/src/lib.rs"),
            "    fn user(&self, answer: &mut Answer) {\n        let _ = answer;\n    }\n",
            rust,
        );
    });
    let mut want = plain.clone();
    want["greeting"] = "Hello, Solid Snake".into();
    assert_eq!(swapped, want, "the README's edit shows");
    assert_eq!(rolled_back, plain, "and the rollback takes it back");

    // examples/display-name, from source, on a generated history.
    let (users, orgs) = history(0xd15, 150, 1_200);
    produce(&broker, "users", &[], users.join("\n").as_bytes());
    produce(&broker, "organizations", &[], orgs.join("\n").as_bytes());
    let out = dir.join("display-name.wasm");
    let example = root().join("examples/display-name");
    let examples_target = logq_e2e::target_dir().join("examples-wasm");
    logq_e2e::bash(
        &dir,
        &format!(
            "logq reducer build {} --out {}",
            example.display(),
            out.display()
        ),
        &[("CARGO_TARGET_DIR", examples_target.as_os_str())],
    );
    let r = host.admin(
        "PUT",
        "/admin/reducer?mode=replay",
        Some(TOKEN),
        &std::fs::read(&out).unwrap(),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let sha = r.json()["swap"]["sha256"].as_str().unwrap().to_owned();
    wait_done(&host, &sha);
    // The oracle sees the sample data too (its organizations share names with the
    // generated ones; a user joins the smallest key).
    let sample = |topic: &str| -> Vec<String> {
        let text =
            std::fs::read_to_string(root().join("data").join(format!("{topic}.json"))).unwrap();
        let events: Vec<Value> = serde_json::from_str(&text).unwrap();
        events.iter().map(Value::to_string).collect()
    };
    let all_users: Vec<String> = sample("users").into_iter().chain(users).collect();
    let all_orgs: Vec<String> = sample("organizations").into_iter().chain(orgs).collect();
    let mut expected = expected_answers(&all_users, &all_orgs);
    assert!(expected.len() > 50, "{} users", expected.len());
    for answer in expected.values_mut() {
        // The example's rule: username, else the e-mail's local part, else the id.
        let name = answer["username"]
            .as_str()
            .filter(|u| !u.is_empty())
            .or_else(|| {
                answer["user_email"]
                    .as_str()
                    .and_then(|e| e.split_once('@'))
                    .map(|(l, _)| l)
            })
            .unwrap_or_else(|| answer["id"].as_str().unwrap())
            .to_owned();
        let admin = answer["user_type"] == "Admin";
        answer["display_name"] = name.into();
        answer["is_admin"] = admin.into();
    }
    host.assert_answers(&all_users, expected);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_javascript_walkthrough_and_example_serve_their_answers() {
    let broker = Broker::start();
    let host = host_with_samples(&broker);
    let plain = host.get(&format!("/users/{SNAKE}")).json();
    let section = walkthrough();
    let js = &fenced_blocks(&section, "js")[0];
    let dir = scratch("js-walk");
    let (swapped, rolled_back) = walk(&host, &fenced_blocks(&section, "sh")[2], &dir, |dir| {
        let path = dir.join("my-js/reducer.js");
        let text = std::fs::read_to_string(&path).unwrap();
        let start = text
            .find("  answer(state, entity) {")
            .expect("the template's answer");
        let end = start + text[start..].find("\n  },\n").unwrap() + "\n  },\n".len();
        std::fs::write(&path, format!("{}{js}{}", &text[..start], &text[end..])).unwrap();
    });
    // The template's rules: the members of the latest events, without event_type and
    // received_at, joined with the organization by the host.
    assert_eq!(swapped["username"], "Solid Snake");
    assert_eq!(swapped["shouted_name"], "SOLID SNAKE", "{swapped}");
    let org = &swapped["organization"];
    assert_eq!(
        org["organization_key"], plain["organization"]["organization_key"],
        "joined"
    );
    assert!(org.get("shouted_name").is_none(), "users only: {org}");
    assert!(swapped.get("event_type").is_none() && swapped.get("received_at").is_none());
    assert_eq!(rolled_back, plain, "the rollback takes it back");

    // examples/lowercase-emails-js, from a copy of its folder (package.json and
    // reducer.js only: the build writes the rest).
    let copy = dir.join("lowercase-emails-js");
    std::fs::create_dir_all(&copy).unwrap();
    for file in ["package.json", "reducer.js"] {
        std::fs::copy(
            root().join("examples/lowercase-emails-js").join(file),
            copy.join(file),
        )
        .unwrap();
    }
    let events: Vec<String> = (0..40)
        .map(|i| {
            serde_json::json!({"id": format!("js-{}", i % 10), "event_type": "User Created",
                "username": format!("n{i}"), "user_email": format!("Mixed.Case{i}@Example.COM"),
                "organization_name": "Metal Gear Solid",
                "received_at": format!("2022-01-01 00:00:{:02}", i)})
            .to_string()
        })
        .collect();
    produce(&broker, "users", &[], events.join("\n").as_bytes());
    let out = bash(&dir, "logq reducer build lowercase-emails-js");
    assert!(out.contains("\"ok\": true"), "{out}");
    let r = host.admin(
        "PUT",
        "/admin/reducer?mode=replay",
        Some(TOKEN),
        &std::fs::read(copy.join("reducer.wasm")).unwrap(),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let sha = r.json()["swap"]["sha256"].as_str().unwrap().to_owned();
    wait_done(&host, &sha);
    for k in 0..10 {
        // Events i = k, k + 10, ...: the latest (i = k + 30) wins.
        let i = k + 30;
        let a = host.get(&format!("/users/js-{k}")).json();
        assert_eq!(a["username"], format!("n{i}"), "{a}");
        assert_eq!(a["user_email"], format!("mixed.case{i}@example.com"), "{a}");
        assert_eq!(a["email_domain"], "example.com", "{a}");
    }
    let snake = host.get(&format!("/users/{SNAKE}")).json();
    assert_eq!(snake["email_domain"], "outerheaven.com", "{snake}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until the replay of `sha` is done and it is the active reducer.
fn wait_done(host: &Host, sha: &str) {
    eventually(WITHIN, &format!("{sha} active after its replay"), || {
        let d = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
        (d["active"]["sha256"] == sha && d["replay"]["phase"] == "done").then_some(())
    });
}
