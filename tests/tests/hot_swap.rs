//! Hot swaps of the reducer against a real broker while events and GETs keep coming.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use logq_e2e::{Broker, Host, component, eventually, expected_answers, history, masked, produce};

const READY: Duration = Duration::from_secs(120);
const TOKEN: &str = "test-admin-token";

/// Produces `events` to `users` in chunks on a thread until done or stopped; returns
/// how many it produced.
fn stream(
    broker: &Broker,
    events: Vec<String>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let bootstrap = broker.bootstrap.clone();
    std::thread::spawn(move || {
        let mut sent = 0;
        for chunk in events.chunks(150) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            produce(
                &Broker::attach(&bootstrap),
                "users",
                &[],
                chunk.join("\n").as_bytes(),
            );
            sent += chunk.len();
            std::thread::sleep(Duration::from_millis(100));
        }
        sent
    })
}

#[test]
fn forward_and_replay_swaps_under_load_lose_nothing() {
    let broker = Broker::start();
    broker.create_default_topics();
    let (mut users, orgs) = history(0xfeed, 500, 4_000);
    produce(&broker, "users", &[], users.join("\n").as_bytes());
    produce(&broker, "organizations", &[], orgs.join("\n").as_bytes());
    let host = Host::start(&broker, &["--admin-token", TOKEN]);
    host.wait_ready(READY);
    // The streams below delete some users; the others exist throughout.
    let (more_forward, _) = history(0xbeef, 500, 2_000);
    let (more_replay, _) = history(0xcafe, 500, 2_000);
    let deleted: std::collections::BTreeSet<String> = more_forward
        .iter()
        .chain(&more_replay)
        .map(|e| serde_json::from_str::<serde_json::Value>(e).unwrap())
        .filter(|e| {
            // However the generator spells it (`user_deleted`, ` User Deleted `).
            let kind = e["event_type"].as_str().unwrap().trim().to_lowercase();
            kind.replace(['_', '-'], " ") == "user deleted"
        })
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let ids: Vec<String> = expected_answers(&users, &orgs)
        .into_keys()
        .filter(|id| !deleted.contains(id))
        .collect();
    assert!(ids.len() > 50, "{} users exist throughout", ids.len());
    let stop_gets = Arc::new(AtomicBool::new(false));
    let getter = logq_e2e::hammer(host.addr, ids.clone(), stop_gets.clone());
    let proof = std::fs::read(component("mask-emails-reducer.wasm")).unwrap();

    // Forward, under a stream of events (the same generator, another seed).
    let more = more_forward;
    let stop = Arc::new(AtomicBool::new(false));
    let consumed = host
        .metric("logq_records_consumed_total{topic=\"users\"}")
        .unwrap();
    let producer = stream(&broker, more.clone(), stop.clone());
    eventually(Duration::from_secs(30), "the stream to be folded", || {
        (host.metric("logq_records_consumed_total{topic=\"users\"}")? > consumed).then_some(())
    });
    let put = Instant::now();
    let r = host.admin("PUT", "/admin/reducer?mode=forward", Some(TOKEN), &proof);
    assert_eq!(r.status, 200, "{}", r.body);
    println!(
        "forward swap: PUT -> active in {:?} ({})",
        put.elapsed(),
        r.body
    );
    assert_eq!(r.json()["swap"]["outcome"], "active");
    let sent = producer.join().unwrap();
    users.extend(more[..sent].iter().cloned());
    host.wait_consumed("users", users.len(), Duration::from_secs(60));

    // Exactly the old-then-new fold at the recorded switch offsets: a user answers
    // with the new (masked) rendering iff one of its records lies at or after the
    // switch offset of its partition (records are keyed by id: one partition each).
    let described = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
    let switch = described["history"][0]["switch_offsets"].clone();
    assert!(switch.is_object(), "switch offsets recorded: {described}");
    let log = logq_e2e::read_topic(&broker, "users", users.len(), Duration::from_secs(60));
    assert_eq!(log.len(), users.len());
    let mut after_switch = std::collections::BTreeSet::new();
    for r in &log {
        let at = switch[format!("users/{}", r.partition)]
            .as_i64()
            .expect("partition offset");
        if r.offset >= at {
            after_switch.insert(String::from_utf8(r.key.clone().unwrap()).unwrap());
        }
    }
    assert!(!after_switch.is_empty(), "events arrived after the switch");
    host.assert_answers(
        &users,
        expected_answers(&users, &orgs).into_iter().map(|(id, v)| {
            let v = if after_switch.contains(&id) {
                masked(v)
            } else {
                v
            };
            (id, v)
        }),
    );

    // Rollback (a replay of the previous reducer), then a replay with the proof
    // reducer under another stream.
    let r = host.admin("POST", "/admin/reducer/rollback", Some(TOKEN), b"");
    assert_eq!(r.status, 202, "{}", r.body);
    let rollback = r.json()["swap"]["id"].clone();
    eventually(Duration::from_secs(120), "the rollback to finish", || {
        let d = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
        (d["history"][0]["id"] == rollback && d["history"][0]["outcome"] == "active").then_some(())
    });
    let more = more_replay;
    let producer = stream(&broker, more.clone(), stop.clone());
    let put = Instant::now();
    let r = host.admin("PUT", "/admin/reducer?mode=replay", Some(TOKEN), &proof);
    assert_eq!(r.status, 202, "{}", r.body);
    let progress = eventually(Duration::from_secs(120), "the replay to finish", || {
        let d = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
        (d["replay"]["phase"] == "done").then_some(d["replay"].clone())
    });
    println!(
        "replay: PUT -> flipped in {:?}; progress {progress}",
        put.elapsed()
    );
    assert!(
        progress["events_folded"].as_u64().unwrap() >= 6_000,
        "{progress}"
    );
    let sent = producer.join().unwrap();
    users.extend(more[..sent].iter().cloned());
    stop_gets.store(true, Ordering::Relaxed);
    let (ok, failures) = getter.join().unwrap();
    assert!(
        failures.is_empty(),
        "GETs failed during the swaps ({ok} succeeded): {failures:#?}"
    );
    assert!(ok > 50, "the GET stream ran ({ok})");

    // Replay: every answer equals a fresh fold of everything, by the new reducer.
    host.wait_consumed("users", users.len(), Duration::from_secs(60));
    host.assert_answers(
        &users,
        expected_answers(&users, &orgs)
            .into_iter()
            .map(|(id, v)| (id, masked(v))),
    );
    let active = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
    assert_eq!(active["active"]["origin"], "http");
    assert_eq!(active["history"][0]["outcome"], "active", "{active}");
}

#[test]
fn bad_candidates_are_refused_and_the_running_reducer_keeps_serving() {
    let broker = Broker::start();
    broker.create_default_topics();
    produce(&broker, "users", &[root_file("users.json").as_str()], b"");
    let host = Host::start(
        &broker,
        &[
            "--admin-token",
            TOKEN,
            "--reducer-time-limit-ms",
            "300",
            "--reducer-memory-mib",
            "48",
        ],
    );
    host.wait_ready(READY);
    let before = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json()["active"].clone();
    let snake = host.get("/users/069feb770fe581acc9d3313d59780196").body;

    // Authentication and size first.
    assert_eq!(host.admin("GET", "/admin/reducer", None, b"").status, 401);
    assert_eq!(
        host.admin("GET", "/admin/reducer", Some("wrong"), b"")
            .status,
        401
    );
    let big = vec![0u8; 33 << 20];
    assert_eq!(
        host.admin("PUT", "/admin/reducer", Some(TOKEN), &big)
            .status,
        413
    );

    let refuse = |body: &[u8], status: u16, needle: &str| {
        let r = host.admin("PUT", "/admin/reducer", Some(TOKEN), body);
        assert_eq!(r.status, status, "{needle}: {}", r.body);
        assert!(r.body.contains(needle), "{needle}: {}", r.body);
    };
    refuse(b"definitely not wasm", 400, "not a WebAssembly component");
    let wasi =
        wat::parse_str("(component (import \"wasi:filesystem/types@0.2.0\" (instance)))").unwrap();
    refuse(&wasi, 422, "imports wasi:filesystem/types@0.2.0");
    let v1 = wat::parse_str(
        "(component (instance $i) (export \"logq:reducer/fold@1.0.0\" (instance $i)))",
    )
    .unwrap();
    refuse(&v1, 422, "fold@1.0.0");
    let other = wat::parse_str("(component)").unwrap();
    refuse(&other, 422, "does not export");

    // Reducers that loop, eat memory or trap on recent events: the canary folds the
    // recent records, so each marker below makes the test reducer misbehave there.
    let hostile = std::fs::read(component("test-triggers-reducer.wasm")).unwrap();
    let marked = |id: &str, marker: &str| {
        format!(
            r#"{{"id":"{id}","event_type":"User Created","username":"{marker}","received_at":"2021-01-01 00:00:00"}}"#
        )
    };
    let filler: Vec<String> = (0..300).map(|i| marked(&format!("f{i}"), "fine")).collect();
    for (marker, reason) in [
        ("logq-test:loop", "time limit"),
        ("logq-test:oom", "memory limit"),
        ("logq-test:trap", "trapped"),
    ] {
        // Flush the recent-records window, then add one marked record.
        let mut lines = filler.clone();
        lines.push(marked(marker, marker));
        produce(&broker, "users", &[], lines.join("\n").as_bytes());
        eventually(
            Duration::from_secs(30),
            "the marked record to be folded",
            || (host.get(&format!("/users/{marker}")).status == 200).then_some(()),
        );
        let start = Instant::now();
        refuse(&hostile, 422, reason);
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{marker} was cut by a limit"
        );
    }

    // Reducers hostile as soon as an instance is made (a start function), whatever
    // the records: the canary's first instance is refused.
    for (name, reason) in [
        ("loop", "time limit"),
        ("memory", "memory limit"),
        ("trap", "trapped"),
    ] {
        let start = Instant::now();
        let candidate =
            std::fs::read(component(&format!("test-start-{name}-reducer.wasm"))).unwrap();
        refuse(&candidate, 422, reason);
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "start-{name} was cut by a limit"
        );
    }

    let after = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
    assert_eq!(
        after["active"]["sha256"], before["sha256"],
        "the running reducer stayed"
    );
    let rejected = after["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["outcome"] == "rejected")
        .count();
    assert_eq!(rejected, 10, "{after}");
    assert_eq!(
        host.get("/users/069feb770fe581acc9d3313d59780196").body,
        snake
    );
}

#[test]
fn changing_the_reducer_file_swaps_it_in_and_a_broken_file_is_refused() {
    let broker = Broker::start();
    broker.create_default_topics();
    produce(&broker, "users", &[root_file("users.json").as_str()], b"");
    let dir = std::env::temp_dir().join(format!("logq-watch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("reducer.wasm");
    std::fs::copy(component("reducer.wasm"), &file).unwrap();
    let host = Host::start(
        &broker,
        &["--admin-token", TOKEN, "--reducer", file.to_str().unwrap()],
    );
    host.wait_ready(READY);
    let path = "/users/069feb770fe581acc9d3313d59780196";
    assert_eq!(host.get(path).json()["user_email"], "snake@outerheaven.com");
    let default_sha =
        host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json()["active"]["sha256"].clone();
    assert!(default_sha.is_string(), "{default_sha}");

    // Atomic replace (write elsewhere, rename over), as deploy tools do.
    let tmp = dir.join("reducer.wasm.new");
    std::fs::copy(component("mask-emails-reducer.wasm"), &tmp).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    eventually(
        Duration::from_secs(30),
        "the file's reducer to be active",
        || {
            let d = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
            (d["active"]["origin"] == "file").then_some(())
        },
    );
    // Forward mode: the next event for Snake is rendered by the new reducer.
    let update = r#"{"id":"069feb770fe581acc9d3313d59780196","event_type":"User Updated","user_type":"Legend","received_at":"2022-01-01 00:00:00"}"#;
    produce(&broker, "users", &[], update.as_bytes());
    let deadline = Instant::now() + Duration::from_secs(30);
    while host.get(path).json()["user_email"] != "s***@outerheaven.com" {
        assert!(
            Instant::now() < deadline,
            "Snake's masked answer never came: {}\n{}\n{}",
            host.get(path).body,
            host.admin("GET", "/admin/reducer", Some(TOKEN), b"").body,
            host.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A broken write in place is refused; the masked reducer keeps serving.
    std::fs::write(&file, b"\0asm garbage").unwrap();
    eventually(
        Duration::from_secs(30),
        "the broken file to be refused",
        || {
            let d = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
            (d["history"][0]["outcome"] == "rejected" && d["history"][0]["origin"] == "file")
                .then_some(())
        },
    );
    assert_eq!(host.get(path).json()["user_type"], "Legend");
    assert_eq!(host.get(path).json()["user_email"], "s***@outerheaven.com");

    // What counts is the active reducer, not the last file tried: the default back in
    // the file swaps it in; after an HTTP swap to another, the default put back in the
    // file again swaps it back (it used to be skipped as "tried before").
    let file_is_active = |why: &str| {
        eventually(Duration::from_secs(30), why, || {
            let d = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
            (d["active"]["origin"] == "file" && d["active"]["sha256"] == default_sha).then_some(())
        })
    };
    std::fs::copy(component("reducer.wasm"), &tmp).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    file_is_active("the default reducer from the file");
    let mask = std::fs::read(component("mask-emails-reducer.wasm")).unwrap();
    let r = host.admin("PUT", "/admin/reducer?mode=forward", Some(TOKEN), &mask);
    assert_eq!(r.status, 200, "{}", r.body);
    std::fs::copy(component("reducer.wasm"), &tmp).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    file_is_active("the default reducer put back in the file after an HTTP swap");
    assert!(
        host.log().contains("swapping in its reducer"),
        "every watch decision is logged:\n{}",
        host.log()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn root_file(name: &str) -> String {
    logq_e2e::root()
        .join("data")
        .join(name)
        .to_string_lossy()
        .into_owned()
}
