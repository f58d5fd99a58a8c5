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
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    anyhow::ensure!(!ms.is_empty(), "no probe measured");
    Ok(Visible {
        rate,
        sent_rate,
        probes: ms.len(),
        ms: [at(0.5), at(0.99), at(1.0)],
    })
}
