//! The README's command blocks run as written, so the README cannot drift from the
//! binary: "Against a local broker (no Docker)" (start nisshi, create the topics,
//! `logq run`, `logq produce`, `curl`) and "Producing events", read from README.md.
//!
//! What is changed, and only that: the fixed addresses (`127.0.0.1:9092` for the
//! broker, `127.0.0.1:8080` for HTTP) become free loopback ports, and
//! `/tmp/broker` a fresh temporary folder, so the test cannot collide with anything
//! on the machine; `logq` and `nisshi` are put on the PATH (the README's "`logq` on
//! your PATH" is what a reader does instead).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use logq_e2e::{eventually, free_port, logq_bin, nisshi_bin, root};

/// A section of the README, from its heading to the next `## `.
fn section(heading: &str) -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let start = readme
        .find(heading)
        .unwrap_or_else(|| panic!("the README has {heading:?}"));
    let rest = &readme[start..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    rest[..end].to_owned()
}

/// The first fenced `sh` block of `text`.
fn sh_block(text: &str) -> String {
    text.split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("an sh block")
        .to_owned()
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

impl Drop for Background {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

/// PATH with the directories of `logq` and `nisshi` first.
fn path_with_tools() -> String {
    let dir = |p: PathBuf| {
        let p = if p.is_absolute() {
            p
        } else {
            // `nisshi` found on the PATH: leave the PATH as it is.
            return String::new();
        };
        p.parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    };
    let logq = logq_bin()
        .canonicalize()
        .expect("the logq binary")
        .parent()
        .expect("a folder")
        .display()
        .to_string();
    let nisshi = dir(nisshi_bin());
    let rest = std::env::var("PATH").unwrap_or_default();
    [logq, nisshi, rest]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn the_local_broker_walk_runs_as_written() {
    let (kafka, http) = (free_port(), free_port());
    let folder = std::env::temp_dir().join(format!("logq-readme-broker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&folder);
    let block = sh_block(&section("## Against a local broker (no Docker)"))
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
    let _background = Background(
        stdout
            .lines()
            .filter_map(|l| l.strip_prefix("jobs "))
            .flat_map(|l| l.split_whitespace().filter_map(|p| p.parse().ok()))
            .collect(),
    );
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
    let mut dev = Command::new(logq_bin())
        .args(["dev", "--listen", &format!("127.0.0.1:{http}")])
        .args(["--brokers", &format!("127.0.0.1:{kafka}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("logq dev");
    let _background = Background(vec![dev.id()]);
    let addr = format!("127.0.0.1:{http}").parse().expect("addr");
    eventually(Duration::from_secs(120), "logq dev to be ready", || {
        logq_e2e::get(addr, "/readyz")
            .ok()
            .filter(|r| r.status == 200)
    });
    let block = sh_block(&section("## Producing events"))
        .replace("127.0.0.1:9092", &format!("127.0.0.1:{kafka}"));
    let out = Command::new("bash")
        .current_dir(root())
        .env("PATH", path_with_tools())
        // The second line uses the default address, as a reader's would.
        .env("LOGQ_BROKERS", format!("127.0.0.1:{kafka}"))
        .arg("-c")
        .arg(format!("set -e\n{block}"))
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("produced ").count(), 2, "{stdout}");
    // The second line deletes user 42, which the first did not create: still absent.
    let users = sample_users();
    eventually(Duration::from_secs(30), "the deletion folded", || {
        let m = logq_e2e::metric_at(addr, "logq_records_consumed_total{topic=\"users\"}")?;
        // The sample data `logq dev` loads, the same file again, the deletion.
        (m >= (2 * users + 1) as f64).then_some(())
    });
    assert_eq!(logq_e2e::get(addr, "/users/42").expect("GET").status, 404);
    let _ = dev.kill();
}
