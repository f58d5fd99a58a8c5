//! `logq dev` (the zero-setup main job) and the compose file.

use std::process::{Command, Stdio};
use std::time::Duration;

use logq_e2e::{free_port, get, logq_bin, root};

#[test]
fn logq_dev_serves_the_sample_data_with_zero_setup() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("logq-dev-{}.log", std::process::id()));
    let mut child = Command::new(logq_bin())
        .args(["dev", "--listen", &addr])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("starting logq dev");
    let addr = addr.parse().expect("addr");
    // Ready means the sample data (produced before the service starts) is all folded.
    logq_e2e::eventually(Duration::from_secs(120), "logq dev to be ready", || {
        get(addr, "/readyz").ok().filter(|r| r.status == 200)
    });
    let ready = std::time::Instant::now();
    let answer = get(addr, "/users/069feb770fe581acc9d3313d59780196").expect("GET");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["username"], "Solid Snake");
    assert_eq!(
        answer.json()["organization"]["organization_name"],
        "Metal Gear Solid"
    );
    // A healthy start warns about nothing (the dead-letter topics exist on the dev
    // broker; asking it to create them used to time out 15 s after the service
    // started, which is before it was ready, with a warning).
    std::thread::sleep(Duration::from_secs(17).saturating_sub(ready.elapsed()));
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("IN-MEMORY DEVELOPMENT BROKER"), "{text}");
    assert!(text.contains("logq produce --brokers"), "{text}");
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
    assert_eq!(verdict["world_version"], "3.1.0");
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
