//! End-to-end test harness: a real Kafka-compatible broker process (nisshi), the real
//! `logq` binary as a child process, and plain HTTP/1.1 over TCP.
//!
//! Everything a test needs is built or started here; what cannot be (the broker binary
//! is missing) fails loudly with the command that installs it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod oracle;
pub mod webdriver;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// Where cargo builds (`$CARGO_TARGET_DIR` or `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// The `logq` binary, built (once per test process) from the current source, so a
/// test never runs a stale binary. `$LOGQ_BIN` names another build (the benchmark
/// sets it to the release binary it just built).
pub fn logq_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("LOGQ_BIN") {
            return bin.into();
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(root())
            .args(["build", "--locked", "-p", "logq", "--bin", "logq"])
            .status()
            .expect("running cargo build -p logq");
        assert!(status.success(), "`cargo build -p logq --bin logq` failed");
        target_dir().join("debug").join("logq")
    })
}

/// A section of the README, from its heading to the next `## `.
pub fn readme_section(heading: &str) -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let start = readme
        .find(heading)
        .unwrap_or_else(|| panic!("the README has {heading:?}"));
    let rest = &readme[start..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    rest[..end].to_owned()
}

/// The fenced blocks of `lang` in `text`, in order.
pub fn fenced_blocks(text: &str, lang: &str) -> Vec<String> {
    let fence = format!("```{lang}\n");
    text.split(&fence)
        .skip(1)
        .map(|b| b.split("```").next().unwrap_or_default().to_owned())
        .collect()
}

/// PATH with the folders of `logq` (the binary under test) and of the test broker
/// first, as a reader who followed the README has them.
pub fn path_with_tools() -> String {
    let logq = logq_bin()
        .canonicalize()
        .expect("the logq binary")
        .parent()
        .expect("a folder")
        .display()
        .to_string();
    // `nisshi` found on the PATH comes back as a bare name: nothing to add.
    let nisshi = nisshi_bin();
    let nisshi = nisshi
        .parent()
        .filter(|_| nisshi.is_absolute())
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let rest = std::env::var("PATH").unwrap_or_default();
    [logq, nisshi, rest]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs `script` with bash (`set -euo pipefail`) in `dir`, with [`path_with_tools`]
/// and `envs`, and without `CARGO_TARGET_DIR` (a project of a user's own builds in
/// its own `target/`, as a user's would) or the rustc wrapper of a coverage run (it
/// would instrument a user's wasm build, for which there is no profiler runtime);
/// its standard output, or a panic with the script and both outputs.
pub fn bash(dir: &Path, script: &str, envs: &[(&str, &std::ffi::OsStr)]) -> String {
    let out = Command::new("bash")
        .current_dir(dir)
        .args(["-c", &format!("set -euo pipefail\n{script}")])
        .env("PATH", path_with_tools())
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTC_WRAPPER")
        .envs(envs.iter().copied())
        .output()
        .expect("running bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bash failed at:\n{script}\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A reducer component built by the host's build script (`<target>/reducer-wasm/components/`).
pub fn component(name: &str) -> PathBuf {
    logq_bin();
    let path = target_dir()
        .join("reducer-wasm")
        .join("components")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing; it is built by `cargo build -p logq`",
        path.display()
    );
    path
}

/// A free port on 127.0.0.1 (bound and released; good enough on a test machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

pub(crate) fn wait_for_port(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The broker binary: `$NISSHI`, else `nisshi` on PATH, else `~/.cargo/bin/nisshi`.
pub fn nisshi_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NISSHI") {
        return p.into();
    }
    let on_path = Command::new("nisshi")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path {
        return "nisshi".into();
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let p = home.join(".cargo/bin/nisshi");
    assert!(
        p.exists(),
        "the nisshi broker is not installed; run ./scripts/setup.sh \
         (it runs `cargo +nightly install nisshi --locked --no-default-features --features dynostore,libsql`)"
    );
    p
}

/// A real Kafka-compatible broker process (nisshi) on a loopback port, in a clean
/// temporary folder (it reads a `.env` from its working directory). Killed on drop.
pub struct Broker {
    /// `127.0.0.1:port`.
    pub bootstrap: String,
    port: u16,
    storage: String,
    child: Option<Child>,
    dir: PathBuf,
}

impl Broker {
    /// Starts a broker with in-memory storage on a free port.
    pub fn start() -> Self {
        Self::start_with(free_port(), false)
    }

    /// Starts a broker on `port`; with `durable`, on SQLite in its folder, so that
    /// [`Broker::kill`] and [`Broker::restart`] keep the data.
    pub fn start_with(port: u16, durable: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("logq-e2e-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the broker folder");
        let storage = if durable {
            // Relative to the broker's working directory (its folder).
            "sqlite://broker.db".to_string()
        } else {
            "memory://logq/".to_string()
        };
        let mut broker = Self {
            bootstrap: format!("127.0.0.1:{port}"),
            port,
            storage,
            child: None,
            dir,
        };
        broker.restart();
        broker
    }

    /// Starts the process (again), on the same port and storage.
    pub fn restart(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))
            .expect("broker log");
        let child = Command::new(nisshi_bin())
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", &self.storage])
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("starting nisshi");
        self.child = Some(child);
        if !wait_for_port(self.port, Duration::from_secs(30)) {
            self.kill();
            panic!("nisshi did not listen on {}: {}", self.port, self.log());
        }
    }

    /// The process id, while the broker runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A handle on a broker started elsewhere (for `produce` from another thread); it
    /// does not own the process.
    pub fn attach(bootstrap: &str) -> BrokerRef {
        BrokerRef {
            bootstrap: bootstrap.to_string(),
        }
    }

    /// Creates a topic.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        self.create_topic_with(name, partitions, &[]);
    }

    /// Creates a topic with topic settings (`key=value`, e.g. `max.message.bytes=...`).
    pub fn create_topic_with(&self, name: &str, partitions: u32, settings: &[&str]) {
        let mut cmd = Command::new(nisshi_bin());
        cmd.current_dir(&self.dir)
            .args([
                "topic",
                "create",
                name,
                "--partitions",
                &partitions.to_string(),
            ])
            .args(["--broker", &format!("tcp://{}", self.bootstrap)]);
        for s in settings {
            cmd.args(["--config", s]);
        }
        let out = cmd.output().expect("running nisshi topic create");
        // The host creates its dead-letter topics itself when it can; either is fine.
        let exists = [&out.stdout, &out.stderr]
            .iter()
            .any(|o| String::from_utf8_lossy(o).contains("already exists"));
        assert!(
            out.status.success() || exists,
            "creating topic {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates `users`, `organizations` and their dead-letter topics.
    pub fn create_default_topics(&self) {
        self.create_topic("users", 3);
        self.create_topic("organizations", 2);
        self.create_topic("users.dlq", 1);
        self.create_topic("organizations.dlq", 1);
    }

    /// Adds one partition to `topic` while the broker runs. nisshi does not implement
    /// Kafka's CreatePartitions API, so this writes what that API would into its SQLite
    /// catalogue (durable brokers only): the topic's partition count, the new
    /// partition and its empty watermark. The broker reads the catalogue on every
    /// request; clients see a topic that grew, as they would on Kafka or Redpanda.
    pub fn add_partition(&self, topic: &str) -> i32 {
        assert!(
            self.storage.starts_with("sqlite://"),
            "add_partition needs a durable broker (Broker::start_with(port, true))"
        );
        let sql = format!(
            "begin;
             update topic set partitions = partitions + 1 where name = '{topic}';
             insert into topition (topic, partition)
               select id, partitions - 1 from topic where name = '{topic}';
             insert into watermark (topition)
               select tp.id from topition tp join topic t on tp.topic = t.id
               where t.name = '{topic}' and tp.partition = t.partitions - 1;
             commit;
             select partitions - 1 from topic where name = '{topic}';"
        );
        let out = self.sqlite(&sql);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("adding a partition to {topic}: {out}"))
    }

    /// Records the broker holds in one partition of `topic` (durable brokers only).
    pub fn records_in(&self, topic: &str, partition: i32) -> usize {
        let out = self.sqlite(&format!(
            "select count(*) from record r join topition tp on r.topition = tp.id
             join topic t on tp.topic = t.id
             where t.name = '{topic}' and tp.partition = {partition};"
        ));
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("counting records: {out}"))
    }

    fn sqlite(&self, sql: &str) -> String {
        let out = Command::new("sqlite3")
            .current_dir(&self.dir)
            .args(["-bail", "broker.db", sql])
            .output()
            .expect("sqlite3 is missing: run scripts/setup.sh all (it installs it)");
        assert!(
            out.status.success(),
            "sqlite3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The broker's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The address of a broker, without owning it.
pub struct BrokerRef {
    /// `127.0.0.1:port`.
    pub bootstrap: String,
}

/// Anything with a bootstrap address.
pub trait Bootstrap {
    /// `host:port`.
    fn bootstrap(&self) -> &str;
}

impl Bootstrap for Broker {
    fn bootstrap(&self) -> &str {
        &self.bootstrap
    }
}

impl Bootstrap for BrokerRef {
    fn bootstrap(&self) -> &str {
        &self.bootstrap
    }
}

/// Runs `logq produce` with `args`, feeding `stdin`; returns its standard output.
pub fn produce(broker: &impl Bootstrap, topic: &str, args: &[&str], stdin: &[u8]) -> String {
    let mut child = Command::new(logq_bin())
        .args(["produce", "--brokers", broker.bootstrap(), "--topic", topic])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting logq produce");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("writing to logq produce");
    let out = child.wait_with_output().expect("logq produce");
    assert!(
        out.status.success(),
        "logq produce failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The position `logq produce` printed (a token for `X-Logq-Min-Position`).
pub fn produced_position(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("position "))
        .unwrap_or_else(|| panic!("logq produce printed no position: {out}"))
        .to_owned()
}

/// A running `logq run` process. Killed on drop if still running.
pub struct Host {
    /// Where it serves HTTP.
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Host {
    /// Starts `logq run` against `broker` with extra `args`.
    pub fn start(broker: &Broker, args: &[&str]) -> Self {
        Self::start_at(broker, args)
    }

    /// Starts `logq run` against whatever `broker` names (it need not be up yet).
    ///
    /// Tombstones never expire unless `args` say otherwise: the generated histories
    /// are shuffled over a whole year of event time, far more disorder than any
    /// retention allows, and the oracle knows no retention (the expiry tests set one).
    pub fn start_at(broker: &impl Bootstrap, args: &[&str]) -> Self {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let log = std::env::temp_dir().join(format!("logq-host-{}-{port}.log", std::process::id()));
        let file = std::fs::File::create(&log).expect("host log");
        let child = Command::new(logq_bin())
            .args([
                "run",
                "--brokers",
                broker.bootstrap(),
                "--listen",
                &addr.to_string(),
            ])
            .args(args)
            .env("LOGQ_TOMBSTONE_RETENTION", "never")
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .expect("starting logq run");
        let mut host = Self { addr, child, log };
        if !wait_for_port(port, Duration::from_secs(60)) {
            let _ = host.child.kill();
            panic!("logq did not listen on {addr}: {}", host.log());
        }
        host
    }

    /// Waits until `/readyz` answers 200; returns how long that took.
    pub fn wait_ready(&self, within: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(r) = get(self.addr, "/readyz")
                && r.status == 200
            {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("logq not ready after {within:?}: {}", self.log());
    }

    /// GET `path`, panicking on a transport error.
    pub fn get(&self, path: &str) -> Response {
        get(self.addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()))
    }

    /// An admin request with `token`, panicking on a transport error.
    pub fn admin(&self, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> Response {
        request(self.addr, method, path, token, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()))
    }

    /// Asserts the whole set of users: every `(id, answer)` is exactly what `GET
    /// /users/{id}` answers, and every other id that `produced` (the user events the
    /// test sent) names answers 404, so a deleted user who came back is seen.
    pub fn assert_answers(
        &self,
        produced: &[String],
        expected: impl IntoIterator<Item = (String, serde_json::Value)>,
    ) {
        let expected: std::collections::BTreeMap<String, serde_json::Value> =
            expected.into_iter().collect();
        for (id, want) in &expected {
            let r = self.get(&format!("/users/{id}"));
            assert_eq!(r.status, 200, "{id}: {}", r.body);
            assert_eq!(r.json(), *want, "{id}");
        }
        let absent: Vec<String> = user_ids(produced)
            .into_iter()
            .filter(|id| !expected.contains_key(id))
            .collect();
        for id in &absent {
            let r = self.get(&format!("/users/{}", percent_encode(id)));
            assert_eq!(r.status, 404, "{id} must be absent: {}", r.body);
        }
    }

    /// Waits until the host has consumed `n` records of `topic` (from `/metrics`).
    pub fn wait_consumed(&self, topic: &str, n: usize, within: Duration) {
        let needle = format!("logq_records_consumed_total{{topic=\"{topic}\"}} {n}\n");
        eventually(within, &format!("{n} records of {topic} consumed"), || {
            self.get("/metrics").body.contains(&needle).then_some(())
        });
    }

    /// `GET path` with extra request headers.
    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        request_with(self.addr, "GET", path, headers, b"")
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// One unlabelled gauge or counter (or a labelled one, `name{label="x"}`) from
    /// `/metrics`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        metric_at(self.addr, name)
    }

    /// Kills the process with SIGKILL (no chance to clean up) and waits for it.
    pub fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(mut self) -> ExitStatus {
        stop_gently(&mut self.child, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("logq ignored SIGTERM: {}", self.log()))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The host's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the host's log is (it stays after the host is gone).
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Under scripts/coverage.sh a process writes its profile only when it exits:
        // ask it to stop (SIGTERM) and give it a few seconds before the kill.
        if std::env::var_os("LLVM_PROFILE_FILE").is_some()
            && stop_gently(&mut self.child, Duration::from_secs(5)).is_some()
        {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Partitions a host's `/cluster` view says it holds.
pub fn held_in(view: &serde_json::Value) -> usize {
    view["partitions"].as_array().map_or(0, Vec::len)
}

/// Whether hosts sharing partitions (their `/cluster` views) hold all `partitions`
/// between them and each knows the holder of every partition.
pub fn group_complete(views: &[serde_json::Value], partitions: usize) -> bool {
    views.iter().map(held_in).sum::<usize>() == partitions
        && views
            .iter()
            .all(|v| v["unheld"].as_array().is_some_and(Vec::is_empty))
}

/// Sends `child` SIGTERM and waits up to `grace` for it to exit; its status, or
/// `None` if it is still running then.
pub fn stop_gently(child: &mut std::process::Child, grace: Duration) -> Option<ExitStatus> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + grace;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header lines, lower-cased names.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

impl Response {
    /// The body as JSON, panicking with the body if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 GET on a fresh connection.
///
/// # Errors
/// Transport errors and unparseable responses.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    request(addr, "GET", path, None, &[])
}

/// One HTTP/1.1 request on a fresh connection, with an optional bearer token.
///
/// # Errors
/// Transport errors and unparseable responses.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> std::io::Result<Response> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    request_with(addr, method, path, &headers, body)
}

/// One HTTP/1.1 request with extra `headers`; the whole response.
///
/// # Errors
/// Connection failures and unparseable responses.
pub fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    )?;
    // A server may answer (413, 401) before it has read the whole body.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end: {text:?}")))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)
            .ok_or_else(|| std::io::Error::other(format!("broken chunked body: {body:?}")))?
    } else {
        body.to_string()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// The payload of a `Transfer-Encoding: chunked` body; `None` when it is cut short.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, tail) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(tail.get(..size)?);
        rest = tail.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// Polls `check` until it returns `Some`, or panics after `within` with `what`.
pub fn eventually<T>(within: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    /// Partition it was read from.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Vec<u8>,
    /// Headers as text.
    pub headers: Vec<(String, String)>,
}

impl ReadRecord {
    /// The value of header `name`, if the record has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// GETs `/users/{id}` for the ids in a loop until stopped (or 20 failures); anything
/// but 200 (a 404 included: the caller passes users that exist throughout) and
/// transport errors are failures. Returns the successes and the failures.
pub fn hammer(
    addr: SocketAddr,
    ids: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut ok, mut failures) = (0u64, Vec::new());
        let mut i = 0;
        // Gives up on its own if the host is gone (a failed test must not spin).
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && failures.len() < 20 {
            let id = &ids[i % ids.len()];
            match get(addr, &format!("/users/{id}")) {
                Ok(r) if r.status == 200 => ok += 1,
                other => failures.push(format!("{id}: {other:?}")),
            }
            i += 1;
        }
        (ok, failures)
    })
}

/// Counts failed deliveries of the raw producer.
#[derive(Default)]
struct Failures(std::sync::Mutex<Vec<String>>);

impl rdkafka::ClientContext for Failures {}

impl rdkafka::producer::ProducerContext for Failures {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(e.to_string());
        }
    }
}

/// A record to produce as it is: (key, value), either may be absent.
pub type RawRecord<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// Produces exact bytes (any key, value or none) with a plain client, for records
/// `logq produce` would refuse to make. Panics if any is not delivered.
pub fn produce_raw(broker: &Broker, topic: &str, records: &[RawRecord<'_>]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer<Failures> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("message.max.bytes", "20000000")
        .create_with_context(Failures::default())
        .expect("test producer");
    for (key, value) in records {
        let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(k) = key {
            r = r.key(*k);
        }
        if let Some(v) = value {
            r = r.payload(*v);
        }
        producer
            .send(r)
            .map_err(|(e, _)| e)
            .expect("queueing a raw record");
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("raw records delivered");
    let failures = producer
        .context()
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    assert!(
        failures.is_empty(),
        "raw records not delivered: {failures:?}"
    );
}

/// Produces one keyless `value` to `partition` of `topic`, acknowledged.
pub fn produce_to(broker: &Broker, topic: &str, partition: i32, value: &str) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer<Failures> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create_with_context(Failures::default())
        .expect("test producer");
    producer
        .send(
            BaseRecord::<[u8], [u8]>::to(topic)
                .partition(partition)
                .payload(value.as_bytes()),
        )
        .map_err(|(e, _)| e)
        .expect("queueing a record");
    producer
        .flush(Duration::from_secs(30))
        .expect("the record delivered");
    let failures = producer
        .context()
        .0
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default();
    assert!(failures.is_empty(), "not delivered: {failures:?}");
}

/// Reads every record of `topic` to its end: waits up to `within` until it holds at
/// least `at_least` records (by its watermarks), then reads every partition up to the
/// high watermark it has then. So a count checked on the result sees a copy too
/// many, not only one too few.
pub fn read_topic(
    broker: &Broker,
    topic: &str,
    at_least: usize,
    within: Duration,
) -> Vec<ReadRecord> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", format!("e2e-reader-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("test consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let marks = || -> Vec<(i32, i64, i64)> {
        partitions
            .iter()
            .map(|&p| {
                let (low, high) = consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .expect("watermarks");
                (p, low, high)
            })
            .collect()
    };
    let deadline = Instant::now() + within;
    let mut ends = marks();
    while ends.iter().map(|(_, l, h)| (h - l) as usize).sum::<usize>() < at_least
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
        ends = marks();
    }
    let mut list = rdkafka::TopicPartitionList::new();
    for p in &partitions {
        list.add_partition_offset(topic, *p, rdkafka::Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&list).expect("assign");
    // Next offset to see per partition, from the low watermark.
    let mut next: std::collections::BTreeMap<i32, (i64, i64)> = ends
        .iter()
        .map(|&(p, low, high)| (p, (low, high)))
        .collect();
    let mut out = Vec::new();
    let read_by = Instant::now() + Duration::from_secs(60);
    while next.values().any(|(at, high)| at < high) {
        assert!(
            Instant::now() < read_by,
            "reading {topic} to its end stalled at {next:?}"
        );
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let Some((at, high)) = next.get_mut(&m.partition()) else {
            continue;
        };
        if m.offset() >= *high {
            continue;
        }
        *at = m.offset() + 1;
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| {
                        (
                            x.key.to_string(),
                            String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(ReadRecord {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
    out
}

/// An answer as the proof reducer (`mask-emails`) renders it.
pub fn masked(mut answer: serde_json::Value) -> serde_json::Value {
    if let Some(e) = answer["user_email"].as_str() {
        answer["user_email"] = oracle::mask_email(e).into();
    }
    answer
}

/// Every user id the user events `produced` name (an event or an array of events a
/// record; records that are not JSON are left out).
pub fn user_ids(produced: &[String]) -> std::collections::BTreeSet<String> {
    let mut ids = std::collections::BTreeSet::new();
    for value in produced {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(value) else {
            continue;
        };
        let events = match v {
            serde_json::Value::Array(items) => items,
            one => vec![one],
        };
        for e in events {
            if let Some(id) = e["id"].as_str() {
                ids.insert(id.to_owned());
            }
        }
    }
    ids
}

/// `id` with every byte outside `[A-Za-z0-9-._~]` percent-encoded, for a path.
pub fn percent_encode(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every record of `topic` with its place in the log, read back from the broker to
/// its end (once it holds `at_least`), for [`oracle::Oracle::fold_logged`]; records
/// that are not JSON (the tests' deliberately bad ones) are left out.
pub fn logged(broker: &Broker, topic: &str, at_least: usize) -> Vec<oracle::Logged> {
    read_topic(broker, topic, at_least, Duration::from_secs(60))
        .into_iter()
        .filter_map(|r| {
            let value = String::from_utf8(r.value).ok()?;
            serde_json::from_str::<serde_json::Value>(&value).ok()?;
            Some(oracle::Logged {
                partition: r.partition,
                offset: r.offset,
                value,
            })
        })
        .collect()
}

/// The answer `GET /users/{id}` must give for every user, from the records of
/// `users` and `organizations` as the broker holds them (at least the counts given):
/// for records produced keyless, where an entity's events are spread over
/// partitions and only the log says which of two equal times wins.
pub fn expected_from_log(
    broker: &Broker,
    users: usize,
    organizations: usize,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut oracle = oracle::Oracle::new();
    oracle.fold_logged(
        &logged(broker, "users", users),
        &logged(broker, "organizations", organizations),
    );
    oracle.answers()
}

/// The answer `GET /users/{id}` must give for every user: [`oracle::answers`], the
/// README's rules applied in order, independent of the reducer's code.
pub fn expected_answers(
    users: &[String],
    organizations: &[String],
) -> std::collections::BTreeMap<String, serde_json::Value> {
    oracle::answers(users, organizations)
}

/// A deterministic generator (xorshift) so a failure can be replayed.
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A shuffled, partly duplicated history, one event a record (about 250 bytes an
/// event), that exercises every rule of the README's "Event rules" the oracle
/// models: users created, updated (some fields only, some `null`, unknown fields
/// beside them), deleted and re-created; event times in every accepted form (the
/// seed's, RFC 3339 with `Z` or `z`, `T` or `t`, offsets, 0 to 9 fraction digits, a
/// leap second) and, for one event in ten, the same instant as the id's previous event
/// written differently, so equal times are decided by the log; event types in their
/// accepted variants (`user_created`, `USER-UPDATED`, blanks around); organizations
/// whose names are shared by two keys, renamed, and versioned by `updated_at`,
/// `received_at` or only `created_at` (equal versions included).
pub fn history(seed: u64, users: u64, events: usize) -> (Vec<String>, Vec<String>) {
    const NAMES: [&str; 4] = [
        "Metal Gear Solid",
        "Outer Heaven",
        "FOXHOUND",
        "Philanthropy",
    ];
    const TYPES: [&str; 3] = ["User Created", "User Updated", "User Deleted"];
    let mut rng = Rng(seed);
    // 2021-01-01T00:00:00Z and a year of microseconds.
    const START: i64 = 1_609_459_200_000_000;
    const YEAR: i64 = 365 * 86_400 * 1_000_000;
    let mut last_time: std::collections::HashMap<String, i64> = Default::default();
    let mut user_events = Vec::with_capacity(events);
    for _ in 0..events {
        let id = format!(
            "{:032x}",
            rng.below(users).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        );
        let kind = TYPES[match rng.below(10) {
            0..=3 => 0,
            4..=8 => 1,
            _ => 2,
        }];
        let at = match last_time.get(&id) {
            Some(&t) if rng.below(10) == 0 => t,
            _ => START + i64::try_from(rng.below(YEAR as u64)).unwrap_or(0),
        };
        last_time.insert(id.clone(), at);
        let mut e = serde_json::json!({
            "id": id,
            "event_type": spelled(kind, &mut rng),
            "received_at": written(at, &mut rng),
        });
        if kind != "User Deleted" {
            let n = rng.below(1000);
            e["username"] = format!("user-{n}").into();
            e["user_email"] = format!("user-{n}@example.com").into();
            if kind == "User Created" || rng.below(2) == 0 {
                e["user_type"] = ["Admin", "User"][rng.below(2) as usize].into();
                e["organization_name"] = NAMES[rng.below(4) as usize].into();
            } else if rng.below(3) == 0 {
                e["user_type"] = serde_json::Value::Null;
            }
            if rng.below(8) == 0 {
                e["source"] = serde_json::json!({"app": "e2e", "retries": [1, 2]});
            }
        }
        user_events.push(e.to_string());
        if rng.below(20) == 0 {
            let dup = user_events[rng.below(user_events.len() as u64) as usize].clone();
            user_events.push(dup);
        }
    }
    // Six keys: org-4 shares its first name with org-0, org-5 with org-1. Each
    // key is created once, then replaced or renamed.
    let mut versions = [0i64; 6];
    let mut orgs = Vec::new();
    for i in 0..30 {
        let k = if i < 6 { i } else { rng.below(6) as usize };
        let name = if i < 6 || rng.below(10) < 7 {
            NAMES[k % 4]
        } else {
            NAMES[rng.below(4) as usize]
        };
        let tier = ["Small", "Medium", "Large"][rng.below(3) as usize];
        let created = START - YEAR + i64::try_from(k).unwrap_or(0) * 86_400_000_000;
        let mut e = serde_json::json!({
            "organization_key": format!("org-{k}"),
            "organization_name": name,
            "organization_tier": tier,
            "created_at": written(created, &mut rng),
        });
        // Versioned by updated_at, received_at, or (equal to every other such event
        // of the key) created_at alone; now and then the key's previous version again.
        if i >= 6 && rng.below(3) != 0 {
            if rng.below(5) != 0 {
                versions[k] = created + i64::try_from(rng.below(YEAR as u64)).unwrap_or(0);
            }
            let field = ["updated_at", "received_at"][rng.below(2) as usize];
            e[field] = written(versions[k].max(created), &mut rng).into();
        }
        orgs.push(e.to_string());
    }
    (user_events, orgs)
}

/// `kind` as producers spell it: mostly as documented, else lower case with `_`,
/// upper case with `-`, or with blanks around.
fn spelled(kind: &str, rng: &mut Rng) -> String {
    match rng.below(10) {
        0 => kind.to_lowercase().replace(' ', "_"),
        1 => kind.to_uppercase().replace(' ', "-"),
        2 => format!(" {kind} "),
        _ => kind.to_owned(),
    }
}

/// An instant (µs since the epoch) written in one of the forms the README accepts,
/// all naming that instant, truncated to the second or the millisecond by the forms
/// with fewer fraction digits and to the minute by the leap second.
fn written(t: i64, rng: &mut Rng) -> String {
    // "YYYY-MM-DDTHH:MM:SS.ffffffZ" of the instant shifted by `minutes`.
    let at = |minutes: i64| oracle::render(t + minutes * 60_000_000);
    let (date_time, micros) = {
        let r = at(0);
        (r[..19].to_owned(), r[20..26].to_owned())
    };
    match rng.below(12) {
        0..=4 => format!("{} {}.{micros}", &date_time[..10], &date_time[11..]),
        5 => date_time.replace('T', " "),
        6 => format!("{date_time}.{}Z", &micros[..3]),
        7 => format!("{}t{}.{micros}789z", &date_time[..10], &date_time[11..]),
        8 => format!("{}.{micros}+02:00", &at(120)[..19]),
        9 => {
            let local = at(-330);
            format!("{} {}.{micros}-05:30", &local[..10], &local[11..19])
        }
        10 => format!("{date_time}.{micros}Z"),
        _ => {
            // A leap second: the instant truncated to its minute, written as the
            // previous minute's second 60.
            let before = oracle::render(t - t.rem_euclid(60_000_000) - 60_000_000);
            format!("{} {}:60", &before[..10], &before[11..16])
        }
    }
}

/// `values` in records of one to four: a group of one is the value itself, a larger
/// one a JSON array of them (as the seed's producer sends), for producing keyless.
pub fn in_arrays(seed: u64, values: &[String]) -> Vec<String> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let mut rest = values;
    while !rest.is_empty() {
        let n = (1 + rng.below(4) as usize).min(rest.len());
        let (group, tail) = rest.split_at(n);
        out.push(if n == 1 {
            group[0].clone()
        } else {
            format!("[{}]", group.join(","))
        });
        rest = tail;
    }
    out
}

/// One unlabelled gauge or counter (or a labelled one, `name{label="x"}`) from the
/// `/metrics` of the host at `addr`; `None` when it cannot be read or is missing.
pub fn metric_at(addr: SocketAddr, name: &str) -> Option<f64> {
    get(addr, "/metrics")
        .ok()?
        .body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (empty for the default `message`).
    pub event: String,
    /// `id:`.
    pub id: Option<String>,
    /// `data:` lines, joined with newlines.
    pub data: String,
}

impl SseEvent {
    /// The data as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {self:?}"))
    }
}

/// A client of a Server-Sent Events stream over plain HTTP/1.1 (chunked).
pub struct SseClient {
    stream: TcpStream,
    /// Status of the response.
    pub status: u16,
    /// Bytes received and not yet de-chunked.
    raw: Vec<u8>,
    /// De-chunked text not yet parsed into events.
    text: String,
}

impl SseClient {
    /// Opens `path` on `addr` with extra request headers; reads the response head.
    pub fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Self {
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        let extra: String = headers
            .iter()
            .map(|(n, v)| format!("{n}: {v}\r\n"))
            .collect();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{extra}\r\n"
        )
        .expect("request");
        let mut client = Self {
            stream,
            status: 0,
            raw: Vec::new(),
            text: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(end) = client.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&client.raw[..end]).into_owned();
                client.status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                client.raw.drain(..end + 4);
                return client;
            }
            assert!(Instant::now() < deadline, "no response head from {path}");
            client.fill(Duration::from_secs(1));
        }
    }

    fn fill(&mut self, wait: Duration) -> usize {
        self.stream.set_read_timeout(Some(wait)).expect("timeout");
        let mut buf = [0u8; 65536];
        match self.stream.read(&mut buf) {
            Ok(n) => {
                self.raw.extend_from_slice(&buf[..n]);
                n
            }
            Err(_) => 0,
        }
    }

    /// Moves whole chunks from `raw` to `text`.
    fn dechunk(&mut self) {
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size = std::str::from_utf8(&self.raw[..line_end])
                .ok()
                .and_then(|s| {
                    usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok()
                })
                .expect("a chunk size");
            if self.raw.len() < line_end + 2 + size + 2 {
                return;
            }
            let chunk = self.raw[line_end + 2..line_end + 2 + size].to_vec();
            self.raw.drain(..line_end + 2 + size + 2);
            self.text.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The next event (keep-alive comments skipped), waiting up to `within`.
    pub fn next(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + within;
        loop {
            self.dechunk();
            while let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut e = SseEvent::default();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        e.event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        e.id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                    }
                }
                if e.event.is_empty() && e.id.is_none() && data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                e.data = data.join("\n");
                return Some(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.fill(left.min(Duration::from_millis(200)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;

    /// The generator gives the end-to-end tests every case the README's rules name
    /// (or the tests that rely on it would pass with a rule broken), and the oracle
    /// reads all of it.
    #[test]
    fn the_history_exercises_every_rule() {
        let (users, orgs) = super::history(0x5eed_1234, 2_000, 20_000);
        let mut forms = BTreeSet::new();
        let mut types = BTreeSet::new();
        let (mut nulls, mut unknown) = (0, 0);
        // (id, instant) -> the distinct texts naming it.
        let mut instants: BTreeMap<(String, i64), BTreeSet<String>> = BTreeMap::new();
        for value in &users {
            let e: Value = serde_json::from_str(value).expect("JSON");
            let at = e["received_at"].as_str().expect("time");
            forms.insert(form(at));
            types.insert(e["event_type"].as_str().expect("type").to_owned());
            nulls += usize::from(e.get("user_type") == Some(&Value::Null));
            unknown += usize::from(e.get("source").is_some());
            instants
                .entry((
                    e["id"].as_str().expect("id").to_owned(),
                    super::oracle::instant(at),
                ))
                .or_default()
                .insert(value.clone());
        }
        assert_eq!(
            forms,
            BTreeSet::from([
                "seed",
                "seed, seconds",
                "T Z, ms",
                "t z, ns",
                "T +02:00",
                "blank -05:30",
                "T Z",
                "leap second"
            ]),
        );
        for variant in [
            "user_created",
            "USER-UPDATED",
            " User Deleted ",
            "User Created",
        ] {
            assert!(types.contains(variant), "{variant}: {types:?}");
        }
        assert!(
            nulls > 10 && unknown > 10,
            "{nulls} nulls, {unknown} unknown"
        );
        let ties = instants.values().filter(|texts| texts.len() > 1).count();
        assert!(ties > 100, "{ties} ids with one instant in two events");

        let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut versioned = BTreeSet::new();
        for value in &orgs {
            let e: Value = serde_json::from_str(value).expect("JSON");
            let key = e["organization_key"].as_str().expect("key").to_owned();
            let name = e["organization_name"].as_str().expect("name").to_owned();
            names.entry(key.clone()).or_default().insert(name.clone());
            keys.entry(name).or_default().insert(key);
            versioned.insert(
                ["updated_at", "received_at"]
                    .into_iter()
                    .find(|f| e.get(*f).is_some())
                    .unwrap_or("created_at only"),
            );
        }
        assert!(names.values().any(|n| n.len() > 1), "a key renamed");
        assert!(keys.values().any(|k| k.len() > 1), "a name shared");
        assert_eq!(versioned.len(), 3, "{versioned:?}");
        assert!(super::expected_answers(&users, &orgs).len() > 500);
    }

    /// Which of the generator's forms a time is written in.
    fn form(t: &str) -> &'static str {
        let fraction = t
            .split_once('.')
            .map_or(0, |(_, f)| f.bytes().take_while(u8::is_ascii_digit).count());
        match (&t[10..11], &t[t.len() - 1..], fraction) {
            (_, _, _) if t.ends_with("+02:00") => "T +02:00",
            (_, _, _) if t.ends_with("-05:30") => "blank -05:30",
            (_, _, _) if t.ends_with(":60") => "leap second",
            (" ", _, 6) => "seed",
            (" ", _, 0) => "seed, seconds",
            ("T", "Z", 3) => "T Z, ms",
            ("t", "z", 9) => "t z, ns",
            ("T", "Z", 6) => "T Z",
            _ => panic!("a form the generator should not write: {t}"),
        }
    }
}
