//! Figure 11: more than one host (`logq run --sharded`) on the same topics as one
//! host holding everything: memory per host, time to ready, and what a forwarded read
//! costs over a local one.

use std::time::{Duration, Instant};

use logq_e2e::Host;

use crate::broker::{self, Loaded, USER_PARTITIONS};

/// What figure 11 measured.
pub struct Cluster {
    /// Hosts sharing the partitions.
    pub hosts: usize,
    /// One host holding everything: RSS once ready, and seconds to ready.
    pub one_rss: u64,
    pub one_ready: f64,
    /// The sharing hosts: RSS of each once the group settled, and seconds from their
    /// start to every partition held, known and caught up.
    pub each_rss: Vec<u64>,
    pub all_ready: f64,
    /// GET latencies (ms) at the first sharing host, answered there and forwarded.
    pub local_ms: Vec<f64>,
    pub forwarded_ms: Vec<f64>,
    /// GETs answered 503 (a partition still moving after the group settled: the
    /// documented answer, with `Retry-After`), each retried after 100 ms; the
    /// latency counted is the answered try's.
    pub unavailable: usize,
    /// Where each host's bytes lie (the one host first), for the note on the memory
    /// target: see [`bytes_of`].
    pub bytes: Vec<String>,
}

/// Where a host's resident bytes lie: its RSS, what its store says it holds, its
/// threads, and its largest mappings by RSS.
fn bytes_of(name: &str, host: &Host) -> String {
    let metric = |m: &str| host.metric(m).unwrap_or(f64::NAN);
    let threads = std::fs::read_to_string(format!("/proc/{}/status", host.pid()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().to_owned()))
        })
        .unwrap_or_default();
    let maps = broker::rss_by_mapping(host.pid(), 4)
        .map(|m| {
            m.iter()
                .map(|(n, _, rss)| format!("{n} {} MiB", rss >> 10))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    format!(
        "{name}: RSS {} MiB; store {:.0} MiB ({:.0} users stored, states {:.0} MiB); {threads} threads; by mapping: {maps}",
        broker::rss(host.pid()).unwrap_or(0) >> 20,
        metric("logq_user_store_bytes") / f64::from(1 << 20),
        metric("logq_users_stored"),
        metric("logq_user_state_bytes") / f64::from(1 << 20),
    )
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

impl Cluster {
    /// p50 and p99 (ms) of the local and the forwarded reads.
    pub fn latencies(&self) -> ((f64, f64), (f64, f64)) {
        let (mut l, mut f) = (self.local_ms.clone(), self.forwarded_ms.clone());
        (
            (percentile(&mut l, 0.5), percentile(&mut l, 0.99)),
            (percentile(&mut f, 0.5), percentile(&mut f, 0.99)),
        )
    }
}

/// How the sharing hosts get their users' events into the partitions of their ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The re-key stage (the default): every host runs a member of it.
    Rekeyed,
    /// `--keyed-input`: the bench's producer keys by id with murmur2 already.
    Keyed,
}

/// Runs figure 11 with `hosts` sharing hosts, reading `ids` (one GET each, a new
/// connection each, sequential: far below 1k GET/s).
pub fn run(loaded: &Loaded, hosts: usize, ids: &[String], input: Input) -> anyhow::Result<Cluster> {
    let one = broker::start_host(loaded, "fig11-one", &[]);
    // Each host's RSS 2 s after it is ready (see below).
    std::thread::sleep(Duration::from_secs(2));
    let one_rss = broker::rss(one.host.pid())?;
    let one_ready = one.ready_after.as_secs_f64();
    let mut bytes = vec![bytes_of("one host", &one.host)];
    drop(one);

    let started = Instant::now();
    // A group of its own per input (the stage writes `fig11-rekeyed.users.by-id`, 3 partitions as
    // the users topic has).
    let (group, mut args) = match input {
        Input::Rekeyed => ("fig11-rekeyed", vec![]),
        Input::Keyed => ("fig11-keyed", vec!["--keyed-input"]),
    };
    args.extend(["--sharded", "--group-id", group]);
    let sharing: Vec<Host> = (0..hosts)
        .map(|_| Host::start_at(&loaded.broker, &args))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let views: Vec<serde_json::Value> =
            sharing.iter().map(|h| h.get("/cluster").json()).collect();
        let ready = sharing.iter().all(|h| h.get("/readyz").status == 200);
        if logq_e2e::group_complete(&views, USER_PARTITIONS as usize) && ready {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the sharing hosts never settled: {views:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let all_ready = started.elapsed().as_secs_f64();
    // As figure 4 measures: once a host that just caught up on a moved partition has
    // given back its catch-up's buffers (sampled at readiness, one host of three
    // was caught at 99-131 MiB and held 45 a moment later).
    std::thread::sleep(Duration::from_secs(2));
    let each_rss = sharing
        .iter()
        .map(|h| broker::rss(h.pid()))
        .collect::<anyhow::Result<Vec<u64>>>()?;
    for (i, h) in sharing.iter().enumerate() {
        bytes.push(bytes_of(&format!("sharing host {i}"), h));
    }
    let me = sharing[0].get("/cluster").json()["instance"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (mut local_ms, mut forwarded_ms) = (Vec::new(), Vec::new());
    let mut unavailable = 0;
    for id in ids {
        let (r, ms) = loop {
            let t = Instant::now();
            let r = sharing[0].get(&format!("/users/{id}"));
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if r.status == 503 && unavailable < 100 {
                unavailable += 1;
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            break (r, ms);
        };
        anyhow::ensure!(
            r.status == 200 || r.status == 404,
            "GET /users/{id}: {} {}",
            r.status,
            r.body
        );
        if r.header("x-logq-served-by") == Some(me.as_str()) {
            local_ms.push(ms);
        } else {
            forwarded_ms.push(ms);
        }
    }
    Ok(Cluster {
        hosts,
        one_rss,
        one_ready,
        each_rss,
        all_ready,
        local_ms,
        forwarded_ms,
        unavailable,
        bytes,
    })
}

/// What figure 11b measured: one of three sharing hosts killed with SIGKILL.
pub struct Failover {
    /// `--standbys` of the hosts.
    pub standbys: usize,
    /// Seconds from the kill to every partition held by a live host and caught up.
    pub settled: f64,
    /// Reads of ids of the dead host's partitions meanwhile (one after another, at
    /// the survivors in turn), and how many got a 200.
    pub reads: u64,
    pub answered: u64,
    /// The longest run of reads that got no 200 (seconds).
    pub longest_gap: f64,
    /// Partitions moved to a host that stood by for them (no rebuild), and in all.
    pub promoted: usize,
    pub moved: usize,
    /// Why reads got no 200: status and the start of the body, with how many.
    pub why: std::collections::BTreeMap<String, u64>,
}

/// Three sharing hosts (`--keyed-input`: the figure is about the move, not the
/// stage) with `standbys`; once settled (and, with standbys, every standby within
/// its lag bound), the host holding the most partitions is killed with SIGKILL and
/// its users are read at the survivors until every partition is held and caught up.
pub fn failover(loaded: &Loaded, standbys: usize, ids: &[String]) -> anyhow::Result<Failover> {
    let group = format!("fig11b-standbys-{standbys}");
    let r = standbys.to_string();
    let args = [
        "--sharded",
        "--keyed-input",
        "--group-id",
        group.as_str(),
        "--session-timeout-ms",
        "2000",
        "--standbys",
        r.as_str(),
    ];
    let mut hosts: Vec<Host> = (0..3)
        .map(|_| Host::start_at(&loaded.broker, &args))
        .collect();
    let partitions = USER_PARTITIONS as usize;
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let views: Vec<serde_json::Value> =
            hosts.iter().map(|h| h.get("/cluster").json()).collect();
        // Standbys within the lag bound, as every host sees them (its own, and the
        // others' by their adverts): what a reader can turn to.
        let eligible = |v: &serde_json::Value| {
            v["standby"].as_object().map_or(0, |m| {
                m.values().filter(|l| l.as_i64() <= Some(1000)).count()
            })
        };
        let seen_everywhere = views.iter().all(|v| {
            let others: usize = v["others"]
                .as_array()
                .map_or(0, |o| o.iter().map(eligible).sum());
            eligible(v) + others >= partitions * standbys.min(2)
        });
        let ready = hosts.iter().all(|h| h.get("/readyz").status == 200);
        if logq_e2e::group_complete(&views, partitions) && ready && seen_everywhere {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "never settled: {views:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let victim_at = (0..hosts.len())
        .max_by_key(|i| logq_e2e::held_in(&hosts[*i].get("/cluster").json()))
        .unwrap_or(0);
    let victim_view = hosts[victim_at].get("/cluster").json();
    let dead: Vec<i64> = victim_view["partitions"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_i64).collect())
        .unwrap_or_default();
    // Which of the dead host's partitions each survivor stood by for.
    let survivors_standby: Vec<Vec<i64>> = hosts
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim_at)
        .map(|(_, h)| {
            h.get("/cluster").json()["standby"]
                .as_object()
                .map(|m| m.keys().filter_map(|k| k.parse().ok()).collect())
                .unwrap_or_default()
        })
        .collect();
    // Ids of the dead host's users: those it serves itself.
    let me = victim_view["instance"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let theirs: Vec<&String> = ids
        .iter()
        .filter(|id| {
            let r = hosts[victim_at].get(&format!("/users/{id}"));
            r.status == 200 && r.header("x-logq-served-by") == Some(me.as_str())
        })
        .take(200)
        .collect();
    anyhow::ensure!(!theirs.is_empty(), "no id served by the host to kill");
    let victim = hosts.remove(victim_at);
    let killed = Instant::now();
    victim.kill_9();
    let (mut reads, mut answered, mut longest_gap) = (0u64, 0u64, 0f64);
    let mut failing_since: Option<Instant> = None;
    let mut why = std::collections::BTreeMap::new();
    let mut i = 0usize;
    loop {
        let views: Vec<serde_json::Value> =
            hosts.iter().map(|h| h.get("/cluster").json()).collect();
        let behind = views
            .iter()
            .any(|v| v["behind"].as_array().is_some_and(|b| !b.is_empty()));
        if logq_e2e::group_complete(&views, partitions) && !behind {
            break;
        }
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(600),
            "never settled after the kill: {views:?}"
        );
        for _ in 0..20 {
            i += 1;
            let id = theirs[i % theirs.len()];
            let host = &hosts[i % hosts.len()];
            reads += 1;
            let answer = logq_e2e::get(host.addr, &format!("/users/{id}"));
            let ok = answer.as_ref().is_ok_and(|r| r.status == 200);
            if !ok {
                // Which survivor: the one that stood by for the dead host's
                // partitions, or the other.
                let role = if survivors_standby[i % hosts.len()]
                    .iter()
                    .any(|p| dead.contains(p))
                {
                    "at its standby"
                } else {
                    "at the other"
                };
                let what = match answer {
                    Ok(r) => format!(
                        "{role}: {} {}",
                        r.status,
                        r.body
                            .chars()
                            .take(160)
                            .collect::<String>()
                            .replace(|c: char| c.is_ascii_digit(), "")
                    ),
                    Err(e) => format!("{role}: {e}"),
                };
                *why.entry(what).or_default() += 1;
            }
            if ok {
                answered += 1;
                if let Some(t) = failing_since.take() {
                    longest_gap = longest_gap.max(t.elapsed().as_secs_f64());
                }
            } else if failing_since.is_none() {
                failing_since = Some(Instant::now());
            }
        }
    }
    let settled = killed.elapsed().as_secs_f64();
    if let Some(t) = failing_since {
        longest_gap = longest_gap.max(t.elapsed().as_secs_f64());
    }
    // Where the dead host's partitions went, and whether to a host that stood by.
    let mut promoted = 0;
    for (h, stood) in hosts.iter().zip(&survivors_standby) {
        let now = h.get("/cluster").json();
        for p in now["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_i64)
        {
            if dead.contains(&p) && stood.contains(&p) {
                promoted += 1;
            }
        }
    }
    Ok(Failover {
        standbys,
        settled,
        reads,
        answered,
        longest_gap,
        promoted,
        moved: dead.len(),
        why,
    })
}

/// What figure 11c measured: a sharing host killed and started again as the same
/// member, its partitions given back to it.
pub struct Restart {
    /// Seconds from the process's start to ready with every partition held and
    /// caught up: the first start (every partition rebuilt from the log), and the
    /// start after the kill (restored from the host's per-partition snapshots).
    pub rebuilt: f64,
    pub restored: f64,
    /// Partitions the second start restored from a snapshot (its log says so), of all.
    pub from_snapshot: usize,
    pub partitions: usize,
}

/// One sharing host (`--keyed-input`, `--state-dir`, a fixed `--instance-id`) holding
/// every partition: started on the whole history, given a few seconds to snapshot
/// (every second), killed with SIGKILL and started again.
pub fn restart(loaded: &Loaded) -> anyhow::Result<Restart> {
    let dir = std::env::temp_dir().join(format!("logq-bench-fig11c-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.to_string_lossy().into_owned();
    let args = [
        "--sharded",
        "--keyed-input",
        "--group-id",
        "fig11c",
        "--instance-id",
        "fig11c",
        "--session-timeout-ms",
        "2000",
        "--state-dir",
        state.as_str(),
        "--snapshot-interval-secs",
        "1",
    ];
    let partitions = USER_PARTITIONS as usize;
    let start = || -> anyhow::Result<(Host, f64)> {
        let started = Instant::now();
        let host = Host::start_at(&loaded.broker, &args);
        loop {
            let view = host.get("/cluster").json();
            let behind = view["behind"].as_array().is_some_and(|b| !b.is_empty());
            if logq_e2e::group_complete(std::slice::from_ref(&view), partitions)
                && !behind
                && host.get("/readyz").status == 200
            {
                return Ok((host, started.elapsed().as_secs_f64()));
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "never ready: {view:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let (first, rebuilt) = start()?;
    // A snapshot taken after the last record (one a second while anything changed).
    std::thread::sleep(Duration::from_secs(4));
    first.kill_9();
    let (second, restored) = start()?;
    let from_snapshot = second.log().matches("restored from its snapshot").count();
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Restart {
        rebuilt,
        restored,
        from_snapshot,
        partitions,
    })
}
