//! Figure 3, reads: `GET /users/{id}` over ids drawn uniformly from all live users,
//! vs. nginx serving each user's answer as a static file (configured as its
//! documentation recommends for small static files) to the same requests.
//!
//! - throughput: wrk's closed loop, both sides;
//! - latency below saturation: oha's open loop at one fixed rate for both sides (half
//!   the smaller of the two measured maximums, so the ratio compares equal loads),
//!   with coordinated-omission correction.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Requests per second.
    pub rps: f64,
    /// 50th percentile latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Requests answered.
    pub requests: u64,
    /// Non-2xx answers plus socket errors.
    pub errors: u64,
    /// Cores wrk itself took (its CPU seconds / the run's seconds).
    pub generator_cores: f64,
}

/// wrk's connections and threads: two threads on a two-core machine, 32 connections.
pub const WRK_THREADS: u32 = 2;
/// See [`WRK_THREADS`].
pub const WRK_CONNECTIONS: u32 = 32;

/// Writes a wrk script that requests `paths` in random order (uniformly).
pub fn script(dir: &Path, paths: &[String]) -> anyhow::Result<std::path::PathBuf> {
    let mut lua = String::from("local paths = {\n");
    for p in paths {
        lua.push_str(&format!("  {p:?},\n"));
    }
    // Requests are formatted once per thread, not once per request: with every live
    // user's path in the table, formatting each request was the load generator's
    // own limit.
    lua.push_str(
        "}\nlocal requests = {}\nmath.randomseed(42)\n\
         init = function(args)\n  for i, p in ipairs(paths) do requests[i] = wrk.format(\"GET\", p) end\nend\n\
         request = function()\n  return requests[math.random(#requests)]\nend\n",
    );
    let path = dir.join("random-users.lua");
    std::fs::write(&path, lua)?;
    Ok(path)
}

/// Runs wrk against `port` for `secs`.
pub fn wrk(port: u16, script: &Path, secs: u64) -> anyhow::Result<Load> {
    let before = crate::cpu::children_seconds()?;
    let out = Command::new("wrk")
        .args([
            &format!("-t{WRK_THREADS}"),
            &format!("-c{WRK_CONNECTIONS}"),
            &format!("-d{secs}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .context("running wrk (apt-get install wrk; scripts/setup.sh bench does)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "wrk failed: {text}");
    let mut load = parse_wrk(&text).with_context(|| format!("reading wrk's report:\n{text}"))?;
    load.generator_cores = (crate::cpu::children_seconds()? - before) / secs as f64;
    Ok(load)
}

fn parse_wrk(text: &str) -> Option<Load> {
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::trim))
    };
    let latency = |pct: &str| field(pct).and_then(duration_ms);
    let errors = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + field("Socket errors:").map_or(0, |v| {
            v.split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        });
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(Load {
        rps: field("Requests/sec:")?.parse().ok()?,
        p50_ms: latency("50%")?,
        p99_ms: latency("99%")?,
        requests,
        errors,
        generator_cores: 0.0,
    })
}

fn duration_ms(v: &str) -> Option<f64> {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

/// nginx serving a file per user under `/users/`, as a child process.
pub struct Nginx {
    child: Child,
    dir: std::path::PathBuf,
    /// Its port.
    pub port: u16,
}

impl Nginx {
    /// Starts nginx (Debian's package) in `dir` with a worker per core, serving
    /// `answers` (id, JSON) as `/users/{id}`. Tuned as nginx's documentation advises
    /// for small static files: `sendfile`, `tcp_nopush`, `open_file_cache` for every
    /// file, or as many as the open-files hard limit allows, and a high
    /// `keepalive_requests`. Its error log is checked after the runs.
    pub fn start(dir: &Path, answers: &[(String, Vec<u8>)]) -> anyhow::Result<Self> {
        let dir = dir.join("nginx");
        std::fs::create_dir_all(dir.join("logs"))?;
        std::fs::create_dir_all(dir.join("users"))?;
        for (id, answer) in answers {
            std::fs::write(dir.join("users").join(id), answer)?;
        }
        let port = logq_e2e::free_port();
        let fds = open_files_hard_limit().unwrap_or(1024);
        let conf = format!(
            "worker_processes auto;\nworker_rlimit_nofile {fds};\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\ndaemon off;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n\
             \x20 keepalive_requests 1000000;\n  keepalive_timeout 65;\n\
             \x20 open_file_cache max={cache} inactive=300s;\n  open_file_cache_valid 300s;\n  open_file_cache_min_uses 1;\n  open_file_cache_errors on;\n\
             \x20 client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             \x20 server {{\n    listen 127.0.0.1:{port};\n    root {d};\n    location /users/ {{ default_type application/json; }}\n  }}\n}}\n",
            d = dir.display(),
            // Every cached file holds a descriptor, and connections need theirs: as
            // many files as this process's hard limit allows, less room for 4,096
            // connections.
            cache = (answers.len() + 1000)
                .min(fds.saturating_sub(5000))
                .max(1000),
            fds = fds,
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let nginx = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nginx");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx (apt-get install nginx-light; scripts/setup.sh bench does)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "nginx did not listen: {}",
                std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child, dir, port })
    }

    /// The problems nginx logged (`[error]` and worse): a peer that logged any was
    /// not at its best, and the comparison does not count.
    pub fn problems(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("logs/error.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                ["[error]", "[crit]", "[alert]", "[emerg]"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .map(str::to_owned)
            .collect()
    }
}

/// The hard limit on open files of this process (what nginx may raise its own to).
fn open_files_hard_limit() -> Option<usize> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(4)?
        .parse()
        .ok()
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its workers; SIGKILL would orphan them.
        if logq_e2e::stop_gently(&mut self.child, Duration::from_secs(5)).is_some() {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_oha_report_and_names_its_errors() {
        let text = r#"{"summary":{"requestsPerSec":999.5},
            "latencyPercentiles":{"p50":0.0005,"p99":0.002,"p99.9":0.01},
            "statusCodeDistribution":{"200":990,"404":3},
            "errorDistribution":{"connection closed before message completed":7,
                "aborted due to deadline":2}}"#;
        let l = parse_oha(text, 1000.0).unwrap();
        assert_eq!(l.errors, 10);
        assert_eq!(l.ms, [0.5, 2.0, 10.0]);
        assert_eq!(
            l.what,
            "3 x status 404; 7 x connection closed before message completed"
        );
        let clean = text
            .replace(r#","404":3"#, "")
            .replace(r#""connection closed before message completed":7,"#, "");
        let l = parse_oha(&clean, 1000.0).unwrap();
        assert_eq!((l.errors, l.what.as_str()), (0, ""));
    }

    #[test]
    fn reads_a_wrk_report() {
        let text = "Running 10s test @ http://127.0.0.1:1\n  2 threads and 32 connections\n\
            \x20 Latency Distribution\n     50%  210.00us\n     75%  300.00us\n     90%    1.10ms\n     99%    2.50ms\n\
            \x20 123456 requests in 10.00s, 30.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n\
            \x20 Non-2xx or 3xx responses: 4\nRequests/sec:  12345.60\nTransfer/sec:      3.00MB\n";
        let load = parse_wrk(text).unwrap();
        assert_eq!(load.requests, 123_456);
        assert_eq!(load.errors, 7);
        assert!((load.rps - 12_345.6).abs() < 1e-6);
        assert!((load.p50_ms - 0.21).abs() < 1e-9);
        assert!((load.p99_ms - 2.5).abs() < 1e-9);
    }
}

/// What one open-loop run measured.
#[derive(Debug, Clone)]
pub struct Latency {
    /// The rate asked for, requests/s.
    pub rate: f64,
    /// The rate achieved.
    pub achieved: f64,
    /// Latency percentiles in ms, from when each request was due (coordinated
    /// omission corrected): p50, p99, p99.9.
    pub ms: [f64; 3],
    /// Answers other than 200, plus failed requests.
    pub errors: u64,
    /// Cores oha itself took (its CPU seconds / the run's seconds).
    pub generator_cores: f64,
    /// What the errors were (statuses, oha's error kinds), empty without errors.
    pub what: String,
}

/// Connections oha keeps: enough that a fixed rate never waits for a free one.
pub const OHA_CONNECTIONS: u32 = 32;

/// oha at a fixed `rate` for `secs`, each request to a URL drawn uniformly from
/// `urls` (a file, one URL a line), latency counted from when each request was due.
pub fn oha(urls: &Path, rate: f64, secs: u64) -> anyhow::Result<Latency> {
    let before = crate::cpu::children_seconds()?;
    let out = Command::new("oha")
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "--latency-correction",
            "-z",
            &format!("{secs}s"),
            "-q",
            &format!("{rate:.0}"),
            "-c",
            &OHA_CONNECTIONS.to_string(),
            "--urls-from-file",
        ])
        .arg(urls)
        .output()
        .context("running oha (scripts/setup.sh bench installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "oha failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut latency =
        parse_oha(&text, rate).with_context(|| format!("reading oha's report:\n{text}"))?;
    latency.generator_cores = (crate::cpu::children_seconds()? - before) / secs as f64;
    Ok(latency)
}

fn parse_oha(text: &str, rate: f64) -> Option<Latency> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let pct = |p: &str| Some(v["latencyPercentiles"][p].as_f64()? * 1000.0);
    let statuses = v["statusCodeDistribution"].as_object()?;
    let ok = statuses
        .get("200")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let all: u64 = statuses
        .values()
        .filter_map(serde_json::Value::as_u64)
        .sum();
    // Requests still in flight when the run's time is up are cut off by oha itself
    // ("aborted due to deadline"): not the server's errors.
    let errors: Vec<(&String, u64)> = v["errorDistribution"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(kind, _)| !kind.contains("aborted due to deadline"))
        .filter_map(|(kind, n)| Some((kind, n.as_u64()?)))
        .collect();
    let failed: u64 = errors.iter().map(|(_, n)| n).sum();
    // What the errors were: statuses other than 200, then oha's error kinds.
    let what: Vec<String> = statuses
        .iter()
        .filter(|(status, _)| *status != "200")
        .map(|(status, n)| format!("{n} x status {status}"))
        .chain(errors.iter().map(|(kind, n)| format!("{n} x {kind}")))
        .collect();
    Some(Latency {
        rate,
        achieved: v["summary"]["requestsPerSec"].as_f64()?,
        ms: [pct("p50")?, pct("p99")?, pct("p99.9")?],
        errors: all - ok + failed,
        generator_cores: 0.0,
        what: what.join("; "),
    })
}
