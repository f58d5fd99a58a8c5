//! Figures 2, 4 and 5 against a real broker: the host's catch-up vs. a plain rdkafka
//! consumer of the same topics, resident memory per user, start-up time.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use logq_e2e::{Broker, Host};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::history::History;

/// Partitions of the users topic (the organizations topic has one).
pub const USER_PARTITIONS: u32 = 3;

/// A broker loaded with a history.
pub struct Loaded {
    /// The broker process.
    pub broker: Broker,
    /// Records in the two topics.
    pub records: usize,
}

/// Starts a broker (memory storage) and produces `history` with `logq produce`.
pub fn load(history: &History) -> Loaded {
    let broker = Broker::start();
    broker.create_topic("users", USER_PARTITIONS);
    broker.create_topic("organizations", 1);
    broker.create_topic("users.dlq", 1);
    broker.create_topic("organizations.dlq", 1);
    broker.create_topic("empty-users", 1);
    broker.create_topic("empty-organizations", 1);
    let lines = |events: &[String]| events.join("\n").into_bytes();
    logq_e2e::produce(
        &broker,
        "organizations",
        &[],
        &lines(&history.organizations),
    );
    logq_e2e::produce(&broker, "users", &[], &lines(&history.users));
    Loaded {
        broker,
        records: history.len(),
    }
}

/// Produces the "User Updated" events of `history` to `users` with `logq produce`;
/// returns how many. Updates only: a deletion would turn a GET of the reads into a 404,
/// which wrk counts as an error.
pub fn produce_updates(bootstrap: &str, history: &History) -> anyhow::Result<usize> {
    let updates: Vec<&str> = history
        .users
        .iter()
        .map(String::as_str)
        .filter(|e| e.contains("\"User Updated\""))
        .collect();
    produce_lines(bootstrap, "users", &updates)
}

/// Produces `lines` (one JSON event each) to `topic` with `logq produce`; returns how
/// many.
pub fn produce_lines(
    bootstrap: &str,
    topic: &str,
    lines: &[impl AsRef<str>],
) -> anyhow::Result<usize> {
    let mut child = std::process::Command::new(logq_e2e::logq_bin())
        .args(["produce", "--brokers", bootstrap, "--topic", topic])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        for line in lines {
            stdin.write_all(line.as_ref().as_bytes())?;
            stdin.write_all(b"\n")?;
        }
    }
    anyhow::ensure!(child.wait()?.success(), "logq produce failed");
    Ok(lines.len())
}

/// A plain rdkafka consumer (librdkafka defaults, like the host's) reading every
/// partition of both topics from the beginning and discarding the records. Returns
/// the time from creating the client to the last record, and the bytes read.
pub fn raw_consumer(loaded: &Loaded) -> anyhow::Result<(Duration, usize)> {
    let start = Instant::now();
    let consumer = reading_all(&loaded.broker.bootstrap, "logq-bench-raw", &[])?;
    let (mut seen, mut bytes) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen < loaded.records {
        anyhow::ensure!(
            Instant::now() < deadline,
            "raw consumer stuck at {seen} records"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                seen += 1;
                bytes += m.payload_len();
            }
            Some(Err(e)) => anyhow::bail!("raw consumer: {e}"),
            None => {}
        }
    }
    Ok((start.elapsed(), bytes))
}

/// A plain consumer (librdkafka defaults but `settings`, no commits) assigned every
/// partition of both topics from the beginning.
///
/// # Errors
/// When the client cannot be created or assigned.
pub fn reading_all(
    bootstrap: &str,
    group: &str,
    settings: &[(&str, &str)],
) -> anyhow::Result<BaseConsumer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false");
    for (k, v) in settings {
        config.set(*k, *v);
    }
    let consumer: BaseConsumer = config
        .create()
        .with_context(|| format!("creating the consumer {group}"))?;
    let mut list = TopicPartitionList::new();
    for (topic, partitions) in [("users", USER_PARTITIONS), ("organizations", 1)] {
        for p in 0..partitions {
            list.add_partition_offset(topic, p as i32, Offset::Beginning)?;
        }
    }
    consumer.assign(&list)?;
    Ok(consumer)
}

/// A host that caught up on the whole history.
pub struct CaughtUp {
    /// The running host.
    pub host: Host,
    /// From spawning the process to `/readyz` answering 200.
    pub ready_after: Duration,
}

/// Starts `logq run` and waits until it has caught up with the start watermarks.
pub fn start_host(loaded: &Loaded, group: &str, extra: &[&str]) -> CaughtUp {
    let mut args = vec!["--group-id", group];
    args.extend_from_slice(extra);
    let start = Instant::now();
    let host = Host::start_at(&loaded.broker, &args);
    host.wait_ready(Duration::from_secs(900));
    CaughtUp {
        host,
        ready_after: start.elapsed(),
    }
}

/// Resident memory of a process, in bytes.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")?;
    Ok(kib * 1024)
}

/// Where a process's resident memory lies: the largest mappings by RSS (path or
/// `[heap]`/`anon`, size and RSS in KiB), and the sum of the rest.
pub fn rss_by_mapping(pid: u32, top: usize) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut maps: Vec<(String, u64, u64)> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let name = line.split_whitespace().nth(5).unwrap_or("anon").to_owned();
            maps.push((name, 0, 0));
        } else if let Some(last) = maps.last_mut() {
            let mut kib = || {
                words
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            match first {
                "Size:" => last.1 = kib(),
                "Rss:" => last.2 = kib(),
                _ => {}
            }
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.2));
    let rest = maps.split_off(top.min(maps.len()));
    maps.push((
        format!("{} other mappings", rest.len()),
        rest.iter().map(|m| m.1).sum(),
        rest.iter().map(|m| m.2).sum(),
    ));
    Ok(maps)
}

/// A gauge or counter from `/metrics`.
pub fn metric(host: &Host, name: &str) -> anyhow::Result<f64> {
    host.metric(name)
        .with_context(|| format!("metric {name} not found"))
}
