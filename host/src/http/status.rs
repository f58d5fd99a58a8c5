//! The status page: `GET /` serves it from the binary (with its script and style
//! under `/ui/`), `GET /status` is one sample as JSON, and `GET /status/stream` sends
//! the recent chart points, then a sample every second, over Server-Sent Events.
//!
//! One sampler task (started by the service) reads the counters once a second, turns
//! them into rates, and hands the sample to every open page: a page costs the host a
//! broadcast receiver, not a computation.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::broadcast;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::sse::Event;

use super::api::Api;
pub use super::samples::StatusFeed;
use crate::metrics::HistogramCounts;

/// Time between two samples.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The page, its script and its style (no build step, no external resources).
const PAGE: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/status.js");
const STYLE: &str = include_str!("ui/status.css");

/// The page may load only its own script and style and talk only to this host; it
/// handles an admin token, so nothing else may run in it or frame it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The counters one sample turns into rates with the next.
#[derive(Clone)]
struct Totals {
    at: Instant,
    consumed: u64,
    applied: u64,
    reads: HistogramCounts,
}

/// Takes a sample every [`INTERVAL`] until the process ends.
pub async fn run(api: Api) {
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut before: Option<Totals> = None;
    loop {
        ticks.tick().await;
        let task_api = api.clone();
        let prior = before.clone();
        // Counting the store takes its read lock: off the async workers.
        let Ok((sample, totals)) =
            tokio::task::spawn_blocking(move || sample(&task_api, prior.as_ref())).await
        else {
            continue;
        };
        api.status.publish(&sample);
        before = Some(totals);
    }
}

/// One sample: everything the page shows, with rates since `before`.
fn sample(api: &Api, before: Option<&Totals>) -> (Value, Totals) {
    let now = Instant::now();
    let sizes = api.store.sizes();
    let metrics = &api.metrics;
    let mut consumed = 0;
    let mut applied = 0;
    let topics: Vec<Value> = metrics
        .topics()
        .zip(api.status.dead_letter_topics())
        .map(|((topic, c), dlq)| {
            let load =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            consumed += load(&c.consumed);
            applied += load(&c.applied);
            json!({
                "topic": topic,
                "records_consumed": load(&c.consumed),
                "events_applied": load(&c.applied),
                "dead_letter_topic": dlq,
                "dead_lettered": load(&c.dead_lettered),
                "dead_letters_known": load(&c.dead_letters_known),
                "tombstones_skipped": load(&c.tombstones),
                "recent_dead_letters": c.recent_dead_letters(),
            })
        })
        .collect();
    let reads = metrics.reads();
    let totals = Totals {
        at: now,
        consumed,
        applied,
        reads: reads.clone(),
    };
    // Rates and quantiles since the previous sample; none in the first.
    let (records_per_second, events_per_second, reads_per_second, recent_reads) = match before {
        Some(b) => {
            let seconds = now.duration_since(b.at).as_secs_f64().max(1e-3);
            let rate =
                |now: u64, then: u64| Some(round(now.saturating_sub(then) as f64 / seconds, 1));
            (
                rate(consumed, b.consumed),
                rate(applied, b.applied),
                rate(reads.count, b.reads.count),
                reads.since(&b.reads),
            )
        }
        None => (None, None, None, HistogramCounts::default()),
    };
    let [p50, p99] = [0.5, 0.99].map(|q| recent_reads.quantile(q).map(|s| round(s * 1e3, 3)));
    let lags = metrics.lags();
    let partitions: Vec<Value> = lags
        .iter()
        .map(
            |((topic, partition), lag)| json!({"topic": topic, "partition": partition, "lag": lag}),
        )
        .collect();
    let lag_total: i64 = lags.values().sum();
    let (ready, status) = metrics.readiness();
    let rss = crate::memory::resident_bytes();
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let point = json!({
        "at_ms": wall_ms,
        "records_per_second": records_per_second,
        "events_per_second": events_per_second,
        "lag": lags.iter().map(|((t, p), lag)| (format!("{t}/{p}"), json!(lag))).collect::<serde_json::Map<_, _>>(),
        "reads_per_second": reads_per_second,
        "read_p50_ms": p50,
        "read_p99_ms": p99,
        "resident_bytes": rss,
        "users": sizes.users_visible,
    });
    let sample = json!({
        "at_ms": wall_ms,
        "ready": ready,
        "status": status,
        "position": api.reads.topics.token(&api.store.position()),
        "ingest": {
            "records_per_second": records_per_second,
            "events_per_second": events_per_second,
            "topics": topics,
        },
        "lag": {"total": lag_total, "partitions": partitions},
        "state": {
            "users": sizes.users_visible,
            "users_stored": sizes.users_stored,
            "organizations": sizes.organizations,
            "tombstones": sizes.tombstones,
            "user_state_bytes": sizes.user_bytes,
            "subscribers": sizes.subscribers,
        },
        "memory": {"resident_bytes": rss},
        "reads": {
            "total": reads.count,
            "per_second": reads_per_second,
            "p50_ms": p50,
            "p99_ms": p99,
        },
        "reducer": api.admin.control.describe(),
        "cluster": api.cluster.as_ref().map(|c| c.view()),
        "admin": {"enabled": api.admin.token.is_some()},
        "point": point,
    });
    (sample, totals)
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// `GET /status`: the latest sample (taken now if the sampler has none yet).
pub fn current(api: &Api) -> Response {
    let text = api
        .status
        .latest()
        .unwrap_or_else(|| sample(api, None).0.to_string().into());
    let mut r = Response::new(text.to_string().into());
    set(&mut r, "content-type", "application/json");
    set(&mut r, "cache-control", "no-store");
    r
}

/// `GET /status/stream`: a `points` event with the recent chart points, then a
/// `sample` event each second.
pub fn stream(api: &Api) -> Response {
    let Some(rx) = api.status.subscribe() else {
        return super::reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the host is shutting down".into(),
        );
    };
    let points = api.status.points();
    let first = Event::default()
        .event("points")
        .data(Value::Array(points).to_string());
    let events = futures_util::stream::unfold((Some(first), rx), |(first, mut rx)| async move {
        if let Some(e) = first {
            return Some((Ok::<_, Infallible>(e), (None, rx)));
        }
        loop {
            match rx.recv().await {
                Ok(text) => {
                    let e = Event::default().event("sample").data(text.as_ref());
                    return Some((Ok(e), (None, rx)));
                }
                // A page that fell behind skips to the newest sample.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let mut r = warp::reply::Reply::into_response(warp::sse::reply(
        warp::sse::keep_alive()
            .interval(Duration::from_secs(15))
            .stream(events),
    ));
    set(&mut r, "cache-control", "no-store");
    r
}

/// `GET /`, `GET /ui/status.js`, `GET /ui/status.css`: the page and its parts.
pub fn asset(path: &str) -> Option<Response> {
    let (body, kind) = match path {
        "/" => (PAGE, "text/html; charset=utf-8"),
        "/ui/status.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/ui/status.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut r = Response::new(body.into());
    set(&mut r, "content-type", kind);
    set(&mut r, "content-security-policy", CSP);
    set(&mut r, "x-content-type-options", "nosniff");
    set(&mut r, "referrer-policy", "no-referrer");
    set(&mut r, "x-frame-options", "DENY");
    // A new binary may bring a new page: always ask.
    set(&mut r, "cache-control", "no-cache");
    *r.status_mut() = StatusCode::OK;
    Some(r)
}

fn set(r: &mut Response, name: &'static str, value: &'static str) {
    r.headers_mut()
        .insert(name, HeaderValue::from_static(value));
}
