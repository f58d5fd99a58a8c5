//! Figure 7, produce -> visible: under a steady stream of events at a fixed rate,
//! the time from a producer's `send` of an update to the first `GET /users/{id}`
//! that shows it.
//!
//! One event in `PROBE_EVERY` is a probe: an update of a user the rest of the stream
//! never touches, with a username nobody else has. Watcher threads poll that user's
//! answer until the username shows; a probe's latency runs from the moment it was
//! handed to the producer to the arrival of the answer that shows it. Polls are
//! spaced by `POLL_GAP`, which bounds the resolution.

use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

/// One event in this many is a probe.
const PROBE_EVERY: u64 = 200;
/// Threads polling for probes.
const WATCHERS: usize = 4;
/// Pause between two polls of one probe.
const POLL_GAP: Duration = Duration::from_micros(250);
/// A probe not visible after this counts as lost (and fails the figure).
const GIVE_UP: Duration = Duration::from_secs(10);

/// What figure 7 measured.
pub struct Visible {
    /// The rate asked for, events/s.
    pub rate: f64,
    /// The rate sent.
    pub sent_rate: f64,
    /// Probes measured.
    pub probes: usize,
    /// p50, p99 and the largest, in ms.
    pub ms: [f64; 3],
    /// The host's own account of the window: where live records' time went.
    pub host: HostSide,
}

/// What the host's histograms say about the window (`logq_event_wait_seconds` and
/// `logq_loop_task_seconds`, their counts during it).
pub struct HostSide {
    /// Per stage (reach, queue, fold, total): p50 and p99 in ms, interpolated within
    /// the histogram's buckets, and the bucket bound the largest fell under.
    pub stages: Vec<(&'static str, [f64; 3])>,
    /// Per loop task that ran in the window: how often, its total and the bucket
    /// bound the longest fell under, in ms.
    pub tasks: Vec<(&'static str, u64, f64, f64)>,
}

impl HostSide {
    fn between(before: &str, after: &str) -> anyhow::Result<Self> {
        use logq::metrics::{HistogramCounts, Stage, Task};
        let window = |name: &str, label: String| -> anyhow::Result<HistogramCounts> {
            let at = |text: &str| {
                HistogramCounts::parse(text, name, &label)
                    .ok_or_else(|| anyhow::anyhow!("no {name}{{{label}}} in /metrics"))
            };
            Ok(at(after)?.since(&at(before)?))
        };
        // The bound of the bucket holding the largest observation (a histogram keeps
        // no maximum); past the last bound, that bound.
        let top = |h: &HistogramCounts| {
            h.buckets
                .iter()
                .find(|(_, n)| *n == h.count)
                .or(h.buckets.last())
                .map_or(0.0, |(b, _)| b * 1e3)
        };
        let mut stages = Vec::new();
        for stage in Stage::ALL {
            let h = window(
                "logq_event_wait_seconds",
                format!("stage=\"{}\"", stage.label()),
            )?;
            let q = |q| h.quantile(q).unwrap_or(0.0) * 1e3;
            stages.push((stage.label(), [q(0.5), q(0.99), top(&h)]));
        }
        let mut tasks = Vec::new();
        for task in Task::ALL {
            let h = window(
                "logq_loop_task_seconds",
                format!("task=\"{}\"", task.label()),
            )?;
            if h.count > 0 {
                tasks.push((task.label(), h.count, h.sum * 1e3, top(&h)));
            }
        }
        Ok(Self { stages, tasks })
    }

    /// One line: the stages' p99 and the tasks that ran.
    pub fn summary(&self) -> String {
        let stages: Vec<String> = self
            .stages
            .iter()
            .map(|(name, ms)| format!("{name} {:.1}/{:.1} (max <= {})", ms[0], ms[1], ms[2]))
            .collect();
        let tasks: Vec<String> = self
            .tasks
            .iter()
            .map(|(name, n, sum, top)| format!("{name} x{n} ({sum:.1} ms, longest <= {top})"))
            .collect();
        format!(
            "host p50/p99 ms: {}; loop tasks: {}",
            stages.join(", "),
            if tasks.is_empty() {
                "none".to_string()
            } else {
                tasks.join(", ")
            }
        )
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Streams `rate` events/s for `secs` to `users` (keyed by id, as `logq produce`
/// does) over `ids` (existing users), probing as described above.
pub fn run(
    host: &logq_e2e::Host,
    bootstrap: &str,
    ids: &[String],
    rate: f64,
    secs: u64,
) -> anyhow::Result<Visible> {
    anyhow::ensure!(ids.len() > 1000, "need more than 1,000 users");
    // Whatever was produced before must be folded first, or the probes measure that
    // backlog: wait until the host's consumed count has stood still for a second.
    let consumed = || host.metric("logq_records_consumed_total{topic=\"users\"}");
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = consumed();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = consumed();
        if now == last {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the host never caught up");
        last = now;
    }
    let metrics_before = logq_e2e::get(host.addr, "/metrics")?.body;
    let (probe_ids, others) = ids.split_at(500);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()?;
    // Each watcher keeps its share of the probes in flight and polls every one of
    // them in turn, so a slow probe never holds up the next.
    let channels: Vec<_> = (0..WATCHERS)
        .map(|_| mpsc::channel::<(String, String, Instant)>())
        .collect();
    let addr = host.addr;
    let mut senders = Vec::new();
    let mut watchers = Vec::new();
    for (tx, rx) in channels {
        senders.push(tx);
        watchers.push(std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
            let mut seen = Vec::new();
            let mut pending: Vec<(String, String, Instant)> = Vec::new();
            let mut open = true;
            while open || !pending.is_empty() {
                loop {
                    match rx.try_recv() {
                        Ok(p) => pending.push((format!("/users/{}", p.0), p.1, p.2)),
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
                let mut i = 0;
                while i < pending.len() {
                    let (path, marker, sent) = &pending[i];
                    let r = logq_e2e::get(addr, path)?;
                    if r.body.contains(marker.as_str()) {
                        seen.push(sent.elapsed().as_secs_f64() * 1e3);
                        pending.swap_remove(i);
                    } else {
                        anyhow::ensure!(
                            sent.elapsed() < GIVE_UP,
                            "probe {marker} at {path} not visible after {GIVE_UP:?}"
                        );
                        i += 1;
                    }
                }
                std::thread::sleep(POLL_GAP);
            }
            Ok(seen)
        }));
    }
    let start = Instant::now();
    let total = (rate * secs as f64) as u64;
    let mut sent = 0u64;
    let mut rng = logq_e2e::Rng(7);
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
        while sent < due {
            let probe = sent.is_multiple_of(PROBE_EVERY);
            let id = if probe {
                &probe_ids[(sent / PROBE_EVERY) as usize % probe_ids.len()]
            } else {
                &others[rng.below(others.len() as u64) as usize]
            };
            let name = format!("visible-{sent}");
            let value = format!(
                r#"{{"id":"{id}","event_type":"User Updated","username":"{name}","received_at":"{}"}}"#,
                logq_reducer::time::render(now_micros())
            );
            let at = Instant::now();
            producer
                .send(BaseRecord::to("users").key(id.as_str()).payload(&value))
                .map_err(|(e, _)| e)?;
            if probe {
                let watcher = (sent / PROBE_EVERY) as usize % WATCHERS;
                senders[watcher].send((id.clone(), format!("\"{name}\""), at))?;
            }
            sent += 1;
        }
        producer.poll(Duration::ZERO);
        std::thread::sleep(Duration::from_micros(500));
    }
    let sent_rate = sent as f64 / start.elapsed().as_secs_f64();
    producer.flush(Duration::from_secs(30))?;
    drop(senders);
    let mut ms = Vec::new();
    for w in watchers {
        ms.extend(
            w.join()
                .map_err(|_| anyhow::anyhow!("a watcher panicked"))??,
        );
    }
    let host_side =
        HostSide::between(&metrics_before, &logq_e2e::get(host.addr, "/metrics")?.body)?;
    ms.sort_by(f64::total_cmp);
    anyhow::ensure!(!ms.is_empty(), "no probe measured");
    let at = |q: f64| quantile(&ms, q);
    Ok(Visible {
        rate,
        sent_rate,
        probes: ms.len(),
        ms: [at(0.5), at(0.99), at(1.0)],
        host: host_side,
    })
}

/// The `q` quantile of sorted, non-empty `xs`.
fn quantile(xs: &[f64], q: f64) -> f64 {
    xs[((xs.len() as f64 - 1.0) * q).round() as usize]
}
