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
/// its own `target/`, as a user's would); its standard output, or a panic with the
/// script and both outputs.
pub fn bash(dir: &Path, script: &str, envs: &[(&str, &std::ffi::OsStr)]) -> String {
    let out = Command::new("bash")
        .current_dir(dir)
        .args(["-c", &format!("set -euo pipefail\n{script}")])
        .env("PATH", path_with_tools())
        .env_remove("CARGO_TARGET_DIR")
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
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "logq ignored SIGTERM: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The host's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
fn percent_encode(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
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

/// A shuffled, partly duplicated history: users created, updated, deleted and
/// re-created across partitions, organizations replaced; about 250 bytes an event.
pub fn history(seed: u64, users: u64, events: usize) -> (Vec<String>, Vec<String>) {
    const NAMES: [&str; 4] = [
        "Metal Gear Solid",
        "Outer Heaven",
        "FOXHOUND",
        "Philanthropy",
    ];
    const TYPES: [&str; 3] = ["User Created", "User Updated", "User Deleted"];
    let mut rng = Rng(seed);
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
        let at = format!(
            "2021-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
            1 + rng.below(12),
            1 + rng.below(28),
            rng.below(24),
            rng.below(60),
            rng.below(60),
            rng.below(1_000_000)
        );
        let mut e = serde_json::json!({"id": id, "event_type": kind, "received_at": at});
        if kind != "User Deleted" {
            let n = rng.below(1000);
            e["username"] = format!("user-{n}").into();
            e["user_email"] = format!("user-{n}@example.com").into();
            if kind == "User Created" || rng.below(2) == 0 {
                e["user_type"] = ["Admin", "User"][rng.below(2) as usize].into();
                e["organization_name"] = NAMES[rng.below(4) as usize].into();
            }
        }
        user_events.push(e.to_string());
        if rng.below(20) == 0 {
            let dup = user_events[rng.below(user_events.len() as u64) as usize].clone();
            user_events.push(dup);
        }
    }
    let orgs = (0..12)
        .map(|i| {
            let tier = ["Small", "Medium", "Large"][rng.below(3) as usize];
            serde_json::json!({
                "organization_key": format!("org-{}", i % 4),
                "organization_name": NAMES[i % 4],
                "organization_tier": tier,
                "created_at": format!("2018-01-{:02} 00:00:00", 1 + rng.below(28)),
            })
            .to_string()
        })
        .collect();
    (user_events, orgs)
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
