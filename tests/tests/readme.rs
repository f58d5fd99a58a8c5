//! The README's command blocks run as written, so the README cannot drift from the
//! binary, read from README.md: "Against a local broker (no Docker)" (start nisshi,
//! create the topics, `logq run`, `logq produce`, `curl`), "Producing events", the
//! example read of "HTTP API" (whose printed answer must be the answer) and the three
//! lines of "Swapping the reducer while it runs".
//!
//! What is changed, and only that: the fixed addresses (`127.0.0.1:9092` for the
//! broker, `127.0.0.1:8080` for HTTP) become free loopback ports, and
//! `/tmp/broker` a fresh temporary folder, so the test cannot collide with anything
//! on the machine; the swap's placeholders (`$TOKEN`, the reducer file, `new.wasm`)
//! are given; `logq` and `nisshi` are put on the PATH (the README's "`logq` on your
//! PATH" is what a reader does instead).

use std::process::Command;
use std::time::Duration;

use logq_e2e::{
    bash, eventually, fenced_blocks, free_port, logq_bin, path_with_tools, readme_section, root,
};

/// The first fenced `sh` block of the README's section `heading`.
fn sh_block(heading: &str) -> String {
    fenced_blocks(&readme_section(heading), "sh")
        .into_iter()
        .next()
        .expect("an sh block")
}

/// Events in `data/users.json`.
fn sample_users() -> usize {
    let text = std::fs::read_to_string(root().join("data/users.json")).expect("sample data");
    serde_json::from_str::<Vec<serde_json::Value>>(&text)
        .expect("a JSON array")
        .len()
}

/// Processes the block left running, killed when the test ends, pass or fail.
struct Background(Vec<u32>);

impl Background {
    /// The processes a block listed with `echo jobs $(jobs -p)`.
    fn listed(stdout: &str) -> Self {
        Self(
            stdout
                .lines()
                .filter_map(|l| l.strip_prefix("jobs "))
                .flat_map(|l| l.split_whitespace().filter_map(|p| p.parse().ok()))
                .collect(),
        )
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        // Whatever has not exited after a while is killed: a test must leave no
        // process behind (hosts stopped after their broker were found running an
        // hour later).
        // Running, not a zombie waiting to be reaped (their parent, the block's
        // shell, is gone).
        let alive = |pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| !rest.starts_with('Z'))
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.0.iter().any(alive) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for pid in self.0.iter().filter(|p| alive(p)) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// `logq dev` with its Kafka clients at `kafka` and HTTP at `http`, ready; stopped
/// when dropped.
struct Dev(std::process::Child);

impl Dev {
    fn start(kafka: u16, http: u16) -> Self {
        let child = Command::new(logq_bin())
            .args(["dev", "--listen", &format!("127.0.0.1:{http}")])
            .args(["--brokers", &format!("127.0.0.1:{kafka}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("logq dev");
        let dev = Self(child);
        let addr = format!("127.0.0.1:{http}").parse().expect("addr");
        eventually(Duration::from_secs(120), "logq dev to be ready", || {
            logq_e2e::get(addr, "/readyz")
                .ok()
                .filter(|r| r.status == 200)
        });
        dev
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_local_broker_walk_runs_as_written() {
    let (kafka, http) = (free_port(), free_port());
    let folder = std::env::temp_dir().join(format!("logq-readme-broker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&folder);
    let block = sh_block("## Against a local broker (no Docker)")
        .replace("127.0.0.1:9092", &format!("127.0.0.1:{kafka}"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{http}"))
        .replace("/tmp/broker", &folder.display().to_string())
        .replace(
            "/tmp/logq.log",
            &folder.join("logq.log").display().to_string(),
        );
    // Everything but the last line (the read), then the read until it answers: a
    // reader types the lines one by one, slower than a script.
    let (setup, read) = block
        .trim_end()
        .rsplit_once('\n')
        .expect("the block ends with a read");
    assert!(read.starts_with("curl "), "{read}");
    std::fs::create_dir_all(&folder).expect("a scratch folder");
    // To files, not pipes: the processes the block leaves running keep them open.
    let (out_file, err_file) = (folder.join("walk.out"), folder.join("walk.err"));
    let status = Command::new("bash")
        .current_dir(root())
        .env("PATH", path_with_tools())
        // What `logq run` and `logq produce` default to, moved with the block's port.
        .env("LOGQ_BROKERS", format!("127.0.0.1:{kafka}"))
        .env("LOGQ_LISTEN", format!("127.0.0.1:{http}"))
        .arg("-c")
        .arg(format!("set -e\n{setup}\necho jobs $(jobs -p)\n"))
        .stdout(std::fs::File::create(&out_file).expect("a file"))
        .stderr(std::fs::File::create(&err_file).expect("a file"))
        .status()
        .expect("bash");
    let stdout = std::fs::read_to_string(&out_file).unwrap_or_default();
    let _background = Background::listed(&stdout);
    assert!(
        status.success(),
        "the walk failed:\n{stdout}\n{}",
        std::fs::read_to_string(&err_file).unwrap_or_default()
    );
    let users = sample_users();
    assert!(
        stdout.contains(&format!("produced {users} records to users")),
        "{stdout}"
    );
    let answer = eventually(
        Duration::from_secs(120),
        "the README's read to answer",
        || {
            let out = Command::new("bash")
                .arg("-c")
                .arg(read)
                .output()
                .expect("curl");
            let body = String::from_utf8_lossy(&out.stdout).into_owned();
            body.contains("\"username\"").then_some(body)
        },
    );
    let v: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(v["username"], "Solid Snake", "{answer}");
    assert_eq!(v["organization"]["organization_name"], "Metal Gear Solid");
    let _ = std::fs::remove_dir_all(&folder);
}

#[test]
fn the_producing_lines_run_as_written_against_logq_dev() {
    let (kafka, http) = (free_port(), free_port());
    let _dev = Dev::start(kafka, http);
    let addr = format!("127.0.0.1:{http}").parse().expect("addr");
    let block =
        sh_block("## Producing events").replace("127.0.0.1:9092", &format!("127.0.0.1:{kafka}"));
    let kafka_addr = std::ffi::OsString::from(format!("127.0.0.1:{kafka}"));
    // The second line uses the default address, as a reader's would.
    let stdout = bash(&root(), &block, &[("LOGQ_BROKERS", &kafka_addr)]);
    assert_eq!(stdout.matches("produced ").count(), 2, "{stdout}");
    // The second line deletes user 42, which the first did not create: still absent.
    let users = sample_users();
    eventually(Duration::from_secs(30), "the deletion folded", || {
        let m = logq_e2e::metric_at(addr, "logq_records_consumed_total{topic=\"users\"}")?;
        // The sample data `logq dev` loads, the same file again, the deletion.
        (m >= (2 * users + 1) as f64).then_some(())
    });
    assert_eq!(logq_e2e::get(addr, "/users/42").expect("GET").status, 404);
}

/// The HTTP section's example read, against `logq dev`'s sample data, answers exactly
/// what the README prints under it; then the swap section's three lines (start with a
/// reducer file, PUT a new one in replay mode, GET the admin view) do what the README
/// says, with `$TOKEN`, the reducer file and `new.wasm` given.
#[test]
fn the_http_and_swap_examples_run_as_written() {
    // 1. The read and its printed answer.
    let (kafka, http) = (free_port(), free_port());
    let dev = Dev::start(kafka, http);
    let block = sh_block("## HTTP API");
    let (read, printed) = block
        .trim()
        .split_once('\n')
        .expect("a read and its answer");
    let read = read.replace("127.0.0.1:8080", &format!("127.0.0.1:{http}"));
    let answer = bash(&root(), &read, &[]);
    let got: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    let want: serde_json::Value = serde_json::from_str(printed).expect("the README's JSON");
    assert_eq!(got, want);
    drop(dev);

    // 2. The swap.
    let broker = logq_e2e::Broker::start();
    broker.create_default_topics();
    for topic in ["users", "organizations"] {
        let data = std::fs::read(root().join("data").join(format!("{topic}.json")))
            .expect("the sample data");
        logq_e2e::produce(&broker, topic, &[], &data);
    }
    let dir = std::env::temp_dir().join(format!("logq-readme-swap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    let reducer = dir.join("reducer.wasm");
    std::fs::copy(logq_e2e::component("reducer.wasm"), &reducer).expect("the reducer");
    std::fs::copy(
        logq_e2e::component("mask-emails-reducer.wasm"),
        dir.join("new.wasm"),
    )
    .expect("the new reducer");
    let http = free_port();
    let block = sh_block("## Swapping the reducer while it runs")
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{http}"))
        .replace("/opt/logq/reducer.wasm", &reducer.display().to_string());
    let (run, curls) = block.split_once('\n').expect("logq run, then the curls");
    assert!(run.starts_with("logq run "), "{run}");
    let (token, brokers, listen) = (
        std::ffi::OsString::from("readme-secret"),
        std::ffi::OsString::from(&broker.bootstrap),
        std::ffi::OsString::from(format!("127.0.0.1:{http}")),
    );
    let envs = [
        ("TOKEN", token.as_os_str()),
        ("LOGQ_BROKERS", brokers.as_os_str()),
        ("LOGQ_LISTEN", listen.as_os_str()),
    ];
    let started = bash(&dir, &format!("{run} > logq.log 2>&1 &\necho $!"), &envs);
    let _host = Background(started.trim().parse().into_iter().collect());
    let addr = format!("127.0.0.1:{http}").parse().expect("addr");
    eventually(Duration::from_secs(120), "logq run to be ready", || {
        logq_e2e::get(addr, "/readyz")
            .ok()
            .filter(|r| r.status == 200)
    });
    let out = bash(&dir, curls, &envs);
    // The PUT's answer, then the admin view: the replay started, and in the view.
    let (put, view) = out
        .split_once("}{")
        .map_or((out.as_str(), ""), |(a, b)| (a, b));
    assert!(put.contains("\"mode\":\"replay\""), "{out}");
    assert!(view.contains("\"history\""), "{out}");
    eventually(Duration::from_secs(120), "the masked answers", || {
        let r = logq_e2e::get(addr, "/users/069feb770fe581acc9d3313d59780196").ok()?;
        (r.json()["user_email"] == "s***@outerheaven.com").then_some(())
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// "More than one host": the three `logq run --sharded` lines as written (addresses
/// moved), against a real broker with the sample data; the block's `curl` shows the
/// group, the three hosts share the partitions, and each answers a user it may not
/// hold.
#[test]
fn the_more_than_one_host_block_runs_as_written() {
    let broker = logq_e2e::Broker::start();
    broker.create_default_topics();
    let data = root().join("data");
    logq_e2e::produce(
        &broker,
        "users",
        &[data.join("users.json").to_str().expect("path")],
        b"",
    );
    logq_e2e::produce(
        &broker,
        "organizations",
        &[data.join("organizations.json").to_str().expect("path")],
        b"",
    );
    let ports = [free_port(), free_port(), free_port()];
    let mut block = sh_block("## More than one host").replace("127.0.0.1:9092", &broker.bootstrap);
    for (port, given) in ports.iter().zip(["8081", "8082", "8083"]) {
        block = block.replace(&format!("127.0.0.1:{given}"), &format!("127.0.0.1:{port}"));
    }
    let (setup, read) = block
        .trim_end()
        .rsplit_once('\n')
        .expect("the block ends with a read");
    assert!(read.starts_with("curl "), "{read}");
    let folder = std::env::temp_dir().join(format!("logq-readme-hosts-{}", std::process::id()));
    std::fs::create_dir_all(&folder).expect("a scratch folder");
    let out_file = folder.join("hosts.out");
    let status = Command::new("bash")
        .current_dir(root())
        .env("PATH", path_with_tools())
        .arg("-c")
        .arg(format!("set -e\n{setup}\necho jobs $(jobs -p)\n"))
        .stdout(std::fs::File::create(&out_file).expect("a file"))
        .stderr(std::fs::File::create(folder.join("hosts.err")).expect("a file"))
        .status()
        .expect("bash");
    let stdout = std::fs::read_to_string(&out_file).unwrap_or_default();
    let _background = Background::listed(&stdout);
    assert!(status.success(), "{stdout}");
    let cluster = |port: u16| {
        logq_e2e::get(
            format!("127.0.0.1:{port}").parse().expect("addr"),
            "/cluster",
        )
        .ok()
        .map(|r| r.json())
    };
    eventually(
        Duration::from_secs(90),
        "the three hosts to share the partitions",
        || {
            let views: Vec<serde_json::Value> =
                ports.iter().map(|p| cluster(*p)).collect::<Option<_>>()?;
            logq_e2e::group_complete(&views, 3).then_some(())
        },
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(read)
        .output()
        .expect("curl");
    let view: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the block's curl answers JSON");
    assert_eq!(view["sharded"], true, "{view}");
    for port in ports {
        let addr = format!("127.0.0.1:{port}").parse().expect("addr");
        let answer = eventually(Duration::from_secs(30), "every host to answer", || {
            logq_e2e::get(addr, "/users/069feb770fe581acc9d3313d59780196")
                .ok()
                .filter(|r| r.status == 200)
        });
        assert_eq!(answer.json()["username"], "Solid Snake");
    }
    let _ = std::fs::remove_dir_all(&folder);
}
