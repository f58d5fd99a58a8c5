//! Figure 6: reads with a position right after a produce, live changes, and (on the
//! large state of figure 4b) the export while events stream in.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use crate::{broker, history};

/// What figure 6 measured.
pub struct Live {
    /// Position-bounded read sent right after the produce was acknowledged: p50, p99 (ms).
    pub bounded_ms: (f64, f64),
    /// The same read without a position, at the same moments: p50, p99 (ms).
    pub plain_ms: (f64, f64),
    /// Reads done.
    pub reads: usize,
    /// SSE subscribers on `/changes`.
    pub watchers: usize,
    /// Change events delivered per second to all of them together.
    pub changes_per_s: f64,
    /// Events folded per second meanwhile.
    pub ingest_with_watchers: f64,
    /// Subscribers dropped as too slow.
    pub dropped: f64,
}

#[derive(Default)]
struct LastOffset(Mutex<Option<(i32, i64)>>);

impl ClientContext for LastOffset {}

impl ProducerContext for LastOffset {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        use rdkafka::Message as _;
        if let Ok(m) = result {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((m.partition(), m.offset()));
        }
    }
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        v.get(((v.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    (at(0.5), at(0.99))
}

/// Runs figure 6 against a caught-up `host` (`ids`: existing users).
pub fn run(
    host: &logq_e2e::Host,
    bootstrap: &str,
    ids: &[String],
    more: &history::History,
) -> anyhow::Result<Live> {
    // a. Read your writes: produce one update, then read it with its position.
    let producer: BaseProducer<LastOffset> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .create_with_context(LastOffset::default())?;
    let (mut bounded, mut plain) = (Vec::new(), Vec::new());
    let reads = 200.min(ids.len());
    for (i, id) in ids.iter().take(reads).enumerate() {
        let value = format!(
            r#"{{"id":"{id}","event_type":"User Updated","username":"ryw-{i}","received_at":"2030-01-01T00:00:{:02}.{i:06}Z"}}"#,
            i % 60
        );
        producer
            .send(BaseRecord::to("users").key(id.as_str()).payload(&value))
            .map_err(|(e, _)| e)?;
        producer.flush(Duration::from_secs(10))?;
        let (p, o) = producer
            .context()
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(|| anyhow::anyhow!("no delivery report"))?;
        let t = Instant::now();
        let r = host.get(&format!("/users/{id}?min_position=users/{p}@{}", o + 1));
        bounded.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            r.status == 200 && r.json()["username"] == format!("ryw-{i}"),
            "a bounded read missed its write: {} {}",
            r.status,
            r.body
        );
        let t = Instant::now();
        host.get(&format!("/users/{id}"));
        plain.push(t.elapsed().as_secs_f64() * 1e3);
    }

    let consumed = || broker::metric(host, "logq_records_consumed_total{topic=\"users\"}");

    // c. 100 subscribers on /changes while events stream in.
    let watchers = 100;
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..watchers)
        .map(|_| {
            let (stop, received, addr) = (stop.clone(), received.clone(), host.addr);
            std::thread::spawn(move || {
                let mut c = logq_e2e::SseClient::open(addr, "/changes", &[]);
                while !stop.load(Ordering::Relaxed) {
                    if c.next(Duration::from_millis(200)).is_some() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let before = consumed()?;
    let t = Instant::now();
    let n = broker::produce_updates(bootstrap, more)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while consumed()? < before + n as f64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let ingest_secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        let _ = th.join();
    }
    let delivered = received.load(Ordering::Relaxed) as f64;
    Ok(Live {
        bounded_ms: percentiles(bounded),
        plain_ms: percentiles(plain),
        reads,
        watchers,
        changes_per_s: delivered / (ingest_secs + 2.0),
        ingest_with_watchers: n as f64 / ingest_secs,
        dropped: broker::metric(host, "logq_subscribers_dropped_total")?,
    })
}

/// What an export under ingest measured.
pub struct ExportUnderIngest {
    /// Users in the export.
    pub exported: u64,
    /// How long it took, seconds.
    pub took: f64,
    /// User records folded while it ran, and per second.
    pub folded_during: f64,
    /// Records folded per second in the second before it began, and in the second
    /// after it ended.
    pub rate_before: f64,
    /// See `rate_before`.
    pub rate_after: f64,
    /// Records of the stream not folded yet when the second after it ended: more
    /// than none, or the stream ran out and `rate_after` says nothing.
    pub left_after: f64,
}

/// `GET /export` on `host` while `more`'s updates stream into the broker: whether
/// ingest goes on during the export, measured by the host's own counter before,
/// during and after it (the export starts once ingest is seen running).
///
/// # Errors
/// When the export fails or ingest never starts.
pub fn export_under_ingest(
    host: &logq_e2e::Host,
    bootstrap: &str,
    more: &history::History,
) -> anyhow::Result<ExportUnderIngest> {
    let consumed = || broker::metric(host, "logq_records_consumed_total{topic=\"users\"}");
    let start = consumed()?;
    let streamed = more
        .users
        .iter()
        .filter(|e| e.contains("\"User Updated\""))
        .count() as f64;
    let stream = {
        let (bootstrap, more) = (bootstrap.to_owned(), more.users.clone());
        std::thread::spawn(move || {
            let h = history::History {
                users: more,
                organizations: Vec::new(),
            };
            broker::produce_updates(&bootstrap, &h)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while consumed()? <= start {
        anyhow::ensure!(Instant::now() < deadline, "ingest never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (b0, tb) = (consumed()?, Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let rate_before = (consumed()? - b0) / tb.elapsed().as_secs_f64();
    let (c0, t0) = (consumed()?, Instant::now());
    let export = host.get("/export");
    let took = t0.elapsed().as_secs_f64();
    let (c1, t1) = (consumed()?, Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let c2 = consumed()?;
    let rate_after = (c2 - c1) / t1.elapsed().as_secs_f64();
    anyhow::ensure!(export.status == 200, "GET /export: {}", export.status);
    let end: serde_json::Value = serde_json::from_str(export.body.lines().last().unwrap_or("{}"))?;
    let exported = end["end"]["users"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("the export did not end whole"))?;
    stream
        .join()
        .map_err(|_| anyhow::anyhow!("producer panicked"))??;
    Ok(ExportUnderIngest {
        exported,
        took,
        folded_during: c1 - c0,
        rate_before,
        rate_after,
        left_after: streamed - (c2 - start),
    })
}
