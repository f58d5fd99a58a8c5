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
    let one_rss = broker::rss(one.host.pid())?;
    let one_ready = one.ready_after.as_secs_f64();
    drop(one);

    let started = Instant::now();
    // A group of its own per input (the stage writes `users.by-id`, 3 partitions as
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
    let each_rss = sharing
        .iter()
        .map(|h| broker::rss(h.pid()))
        .collect::<anyhow::Result<Vec<u64>>>()?;
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
    })
}
