//! `logq dev` (the zero-setup main job) and the compose file.

use std::process::{Command, Stdio};
use std::time::Duration;

use logq_e2e::{free_port, get, logq_bin, root};

/// `logq produce --brokers BROKERS --topic users` with `event` on its standard input.
fn produce_one(brokers: &str, event: &[u8]) -> std::process::Output {
    let mut child = Command::new(logq_bin())
        .args(["produce", "--brokers", brokers, "--topic", "users"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("logq produce");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), event)
        .expect("writing the event");
    child.wait_with_output().expect("logq produce")
}

#[test]
fn logq_dev_serves_the_sample_data_with_zero_setup() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // Where Kafka clients reach the development broker (127.0.0.1:9092 unless told).
    let kafka = format!("127.0.0.1:{}", free_port());
    let log = std::env::temp_dir().join(format!("logq-dev-{}.log", std::process::id()));
    let child = Command::new(logq_bin())
        .args(["dev", "--listen", &addr, "--brokers", &kafka])
        .args(["--admin-token", "dev-token"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("starting logq dev");
    let addr = addr.parse().expect("addr");
    // Ready means the sample data (produced before the service starts) is all folded.
    logq_e2e::eventually(Duration::from_secs(120), "logq dev to be ready", || {
        get(addr, "/readyz").ok().filter(|r| r.status == 200)
    });
    // `logq dev` takes run's flags: the admin token opens the admin routes.
    let admin = logq_e2e::request(addr, "GET", "/admin/reducer", Some("dev-token"), b"")
        .expect("GET /admin/reducer");
    assert_eq!(admin.status, 200, "{}", admin.body);
    // A Kafka client reaches the development broker at the address it printed.
    let produced = produce_one(
        &kafka,
        br#"{"id":"42","event_type":"User Created","username":"Raiden","organization_name":"FOXHOUND","received_at":"2021-01-01 00:00:00"}"#,
    );
    assert!(
        produced.status.success(),
        "{}",
        String::from_utf8_lossy(&produced.stderr)
    );
    logq_e2e::eventually(Duration::from_secs(30), "the produced user", || {
        get(addr, "/users/42").ok().filter(|r| r.status == 200)
    });
    let answer = get(addr, "/users/069feb770fe581acc9d3313d59780196").expect("GET");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["username"], "Solid Snake");
    assert_eq!(
        answer.json()["organization"]["organization_name"],
        "Metal Gear Solid"
    );
    // A healthy start warns about nothing (the dead-letter topics exist on the dev
    // broker; asking it to create them used to time out 15 s after the service
    // started, which is after it was ready, with a warning): the step's outcome,
    // logged either way, is awaited before the log is read.
    logq_e2e::eventually(
        Duration::from_secs(30),
        "the dead-letter topic step to end",
        || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|l| l.contains("dead-letter topics"))
        },
    );
    // SIGTERM, as Ctrl-C would: a clean stop (and, under coverage, a written profile).
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().expect("output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("IN-MEMORY DEVELOPMENT BROKER"), "{text}");
    assert!(
        text.contains(&format!("produce --brokers {kafka} --topic users")),
        "{text}"
    );
    let stderr = std::fs::read_to_string(&log).expect("log");
    assert!(stderr.contains("caught up"), "{stderr}");
    assert!(
        !stderr.contains(" WARN ") && !stderr.contains(" ERROR "),
        "a healthy start logs no warning:\n{stderr}"
    );
    let _ = std::fs::remove_file(&log);
}

#[test]
fn compose_file_is_valid() {
    let out = Command::new("docker-compose")
        .current_dir(root())
        .args(["-f", "docker-compose.yml", "config", "--quiet"])
        .output()
        .unwrap_or_else(|e| {
            panic!("docker-compose is not installed ({e}); run ./scripts/setup.sh (apt-get install docker-compose)")
        });
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).expect("compose file");
    assert!(text.contains("redpanda"), "compose runs Redpanda");
    assert!(
        root().join("Dockerfile").exists(),
        "the host image is built from ./Dockerfile"
    );
}

#[test]
fn reducer_check_prints_a_verdict_and_exits_by_it() {
    let check = |file: &std::path::Path| {
        let out = Command::new(logq_bin())
            .args(["reducer", "check", "--no-compile-cache"])
            .arg(file)
            .output()
            .expect("logq reducer check");
        let verdict: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
        (out.status.success(), verdict)
    };
    let (ok, verdict) = check(&logq_e2e::component("mask-emails-reducer.wasm"));
    assert!(ok, "{verdict}");
    assert_eq!(verdict["ok"], true);
    assert_eq!(verdict["world_version"], "3.2.0");
    assert_eq!(verdict["from_cache"], false);
    println!("reducer check (no cache): {verdict}");

    let bad = std::env::temp_dir().join(format!("logq-bad-{}.wasm", std::process::id()));
    std::fs::write(&bad, b"\0asm\x0d\0\x01\0").unwrap();
    let (ok, verdict) = check(&bad);
    assert!(!ok, "a broken component exits non-zero");
    assert_eq!(verdict["ok"], false);
    assert_eq!(verdict["stage"], "load", "{verdict}");
    let _ = std::fs::remove_file(&bad);
}

#[test]
fn run_refuses_to_start_with_a_broken_reducer_and_says_why() {
    let bad = std::env::temp_dir().join(format!("logq-start-bad-{}.wasm", std::process::id()));
    std::fs::write(&bad, b"not a component").unwrap();
    let port = free_port();
    let out = Command::new(logq_bin())
        .args([
            "run",
            "--brokers",
            "127.0.0.1:1",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--reducer")
        .arg(&bad)
        .output()
        .expect("logq run");
    let _ = std::fs::remove_file(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a WebAssembly component"), "{err}");
    assert!(err.contains(bad.to_str().unwrap()), "names the file: {err}");
}

/// `logq produce` against an address where no broker listens fails within seconds,
/// naming the address and what to do, instead of timing out records after 30 s.
#[test]
fn produce_without_a_broker_fails_fast_naming_the_address() {
    let nobody = format!("127.0.0.1:{}", free_port());
    let started = std::time::Instant::now();
    let out = produce_one(&nobody, br#"{"id":"1"}"#);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    // The error's own first line (the client may have logged its attempts before).
    let error = stderr
        .lines()
        .find(|l| l.starts_with("Error: "))
        .unwrap_or_default();
    assert!(
        error.contains(&nobody) && error.contains("no Kafka broker answered"),
        "{stderr}"
    );
}

/// A client setting librdkafka does not know ends `logq run` at once, and the error
/// that ends it names the setting (it used to end with "Error: consumer", the cause
/// only in an earlier warning).
#[test]
fn an_unknown_kafka_setting_is_the_error_that_ends_the_process() {
    let nobody = format!("127.0.0.1:{}", free_port());
    let out = Command::new(logq_bin())
        .args(["run", "--brokers", &nobody, "--listen", "127.0.0.1:0"])
        .args(["-X", "no.such.setting=1"])
        .stdin(Stdio::null())
        .output()
        .expect("logq run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("Error: "))
        .unwrap_or_default();
    assert!(
        error.contains("no.such.setting") && error.contains("kafka client configuration"),
        "{stderr}"
    );
    // And it is the first thing said of it: no warning about another part (the
    // dead-letter topics) and no "the consumer loop ended on its own" before it.
    assert!(
        !stderr.contains(" WARN ") && !stderr.contains(" ERROR "),
        "{stderr}"
    );
}
