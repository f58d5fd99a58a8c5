//! Counters for `/metrics` (Prometheus text format) and the readiness the consumer
//! loop reports. Plain atomics: the hot path only adds.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use logq_abi::{PerSource, Source};

use crate::state::Sizes;

/// Upper bounds of the reducer call-time histogram, in seconds.
const CALL_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 1.0,
];

/// Upper bounds of the read-time histogram, in seconds: reads are answered from
/// memory, so the interesting part is below a millisecond.
const READ_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 1.0,
];

/// Upper bounds of the freshness and loop-task histograms, in seconds: from a
/// millisecond to the multi-second tails of a loop held up elsewhere.
const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Where a live record's time goes between its timestamp and the position that shows
/// it: the stages of `logq_event_wait_seconds`, each measured on the oldest record of
/// every batch the live loop applies once caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// From the record's timestamp (the producer's send, or the broker's append) to
    /// the poll that returned it: the producer's linger, the broker, the fetch, and
    /// the loop being busy with something else (see [`Task`]).
    Reach,
    /// From that poll to the start of the fold.
    Queue,
    /// The fold and the apply to the store.
    Fold,
    /// From the timestamp to the published position: what a read-your-writes read
    /// waits for.
    Total,
}

impl Stage {
    /// Every stage, in the order a record goes through them.
    pub const ALL: [Self; 4] = [Self::Reach, Self::Queue, Self::Fold, Self::Total];

    /// Its label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Reach => "reach",
            Self::Queue => "queue",
            Self::Fold => "fold",
            Self::Total => "total",
        }
    }
}

/// Work the consumer loop does between two batches, on its own thread (records that
/// arrive meanwhile wait for it): the tasks of `logq_loop_task_seconds`, each timed
/// whenever it had something to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Reducer swaps and replay handovers.
    Commands,
    /// Partitions given or taken by the group (sharing hosts).
    Group,
    /// Beginning an export (copying and sorting the user keys).
    Exports,
    /// Committing progress to the group (sharing hosts).
    Commit,
    /// Freezing the state for a snapshot (read out and written on a thread of its
    /// own).
    Snapshot,
}

impl Task {
    /// Every task.
    pub const ALL: [Self; 5] = [
        Self::Commands,
        Self::Group,
        Self::Exports,
        Self::Commit,
        Self::Snapshot,
    ];

    /// Its label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Commands => "commands",
            Self::Group => "group",
            Self::Exports => "exports",
            Self::Commit => "commit",
            Self::Snapshot => "snapshot",
        }
    }
}

/// How many recent dead letters each topic keeps for the status page.
const RECENT_DEAD_LETTERS: usize = 10;

/// A cumulative histogram of durations (Prometheus style: each bucket counts the
/// observations at or below its bound).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    micros: AtomicU64,
}

/// A histogram's counts at one moment (cumulative, like the exposition).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HistogramCounts {
    /// (upper bound in seconds, observations at or below it).
    pub buckets: Vec<(f64, u64)>,
    /// Every observation.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        // The first bucket that holds it; the exposition sums upwards.
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    /// The counts now, cumulative.
    pub fn counts(&self) -> HistogramCounts {
        let mut below = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.buckets)
            .map(|(bound, n)| {
                below += n.load(Relaxed);
                (*bound, below)
            })
            .collect();
        HistogramCounts {
            buckets,
            count: self.count.load(Relaxed),
            sum: self.micros.load(Relaxed) as f64 / 1e6,
        }
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_series(out, name, "");
    }

    /// The series of this histogram within family `name`, with `labels` (`a="b"`,
    /// or empty) on every line.
    fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let counts = self.counts();
        let (open, comma) = if labels.is_empty() {
            ("", "")
        } else {
            ("{", ",")
        };
        let close = if labels.is_empty() { "" } else { "}" };
        for (bound, n) in &counts.buckets {
            let _ = writeln!(out, "{name}_bucket{{{labels}{comma}le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{comma}le=\"+Inf\"}} {}",
            counts.count
        );
        let _ = writeln!(out, "{name}_sum{open}{labels}{close} {}", counts.sum);
        let _ = writeln!(out, "{name}_count{open}{labels}{close} {}", counts.count);
    }
}

/// A family of histograms told apart by one label.
fn render_family<'h>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    series: impl IntoIterator<Item = (&'static str, &'h Histogram)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (value, h) in series {
        h.render_series(out, name, &format!("{label}=\"{value}\""));
    }
}

impl HistogramCounts {
    /// The series of histogram `name` with exactly the labels `labels` (`a="b"`, or
    /// empty for none; `le` aside) in a `/metrics` text; `None` when it is not there.
    pub fn parse(text: &str, name: &str, labels: &str) -> Option<Self> {
        let prefix = if labels.is_empty() {
            format!("{name}_bucket{{le=\"")
        } else {
            format!("{name}_bucket{{{labels},le=\"")
        };
        let tail = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let value = |line: &str, head: &str| -> Option<f64> {
            line.strip_prefix(head)?.trim().parse().ok()
        };
        let mut out = Self::default();
        let mut seen = false;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&prefix) {
                let (bound, n) = rest.split_once("\"} ")?;
                let n: u64 = n.trim().parse().ok()?;
                if bound != "+Inf" {
                    out.buckets.push((bound.parse().ok()?, n));
                }
                seen = true;
            } else if let Some(sum) = value(line, &format!("{name}_sum{tail} ")) {
                out.sum = sum;
            } else if let Some(count) = value(line, &format!("{name}_count{tail} ")) {
                out.count = count as u64;
            }
        }
        seen.then_some(out)
    }

    /// The observations between `earlier` and these counts.
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            buckets: self
                .buckets
                .iter()
                .zip(
                    earlier
                        .buckets
                        .iter()
                        .map(|(_, n)| *n)
                        .chain(std::iter::repeat(0)),
                )
                .map(|((bound, n), before)| (*bound, n.saturating_sub(before)))
                .collect(),
            count: self.count.saturating_sub(earlier.count),
            sum: (self.sum - earlier.sum).max(0.0),
        }
    }

    /// The `q` quantile (0..=1) in seconds, interpolated linearly inside its bucket;
    /// `None` without observations. Beyond the last bound it is that bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut lower = (0.0, 0u64);
        for (bound, n) in &self.buckets {
            if *n as f64 >= rank {
                let (low, below) = lower;
                let inside = (n - below) as f64;
                let share = if inside == 0.0 {
                    1.0
                } else {
                    (rank - below as f64) / inside
                };
                return Some(low + (bound - low) * share);
            }
            lower = (*bound, *n);
        }
        Some(lower.0)
    }
}

/// A record that went to a dead-letter topic, as the status page lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RecentDeadLetter {
    /// When it was sent (RFC 3339).
    pub at: String,
    /// Where it came from.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// Why it was refused.
    pub reason: String,
}

/// Counters of one consumed topic.
#[derive(Debug, Default)]
pub struct TopicCounters {
    /// Records read from the topic.
    pub consumed: AtomicU64,
    /// Events folded into the state.
    pub applied: AtomicU64,
    /// Records sent to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Records refused again that an earlier run already dead-lettered (below the
    /// committed offset at start): not sent twice.
    pub dead_letters_known: AtomicU64,
    /// Compaction tombstones (null values), skipped.
    pub tombstones: AtomicU64,
    /// The latest dead letters, newest last.
    recent: Mutex<VecDeque<RecentDeadLetter>>,
}

impl TopicCounters {
    /// Remembers a dead letter for the status page (the newest few are kept).
    pub fn note_dead_letter(&self, partition: i32, offset: i64, reason: &str) {
        /// Longest reason kept, in bytes.
        const MAX_REASON: usize = 500;
        let mut reason = reason.to_owned();
        if reason.len() > MAX_REASON {
            let mut cut = MAX_REASON;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
            reason.push('…');
        }
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT_DEAD_LETTERS {
            recent.pop_front();
        }
        recent.push_back(RecentDeadLetter {
            at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            partition,
            offset,
            reason,
        });
    }

    /// The latest dead letters, newest first.
    pub fn recent_dead_letters(&self) -> Vec<RecentDeadLetter> {
        lock(&self.recent).iter().rev().cloned().collect()
    }
}

/// Everything `/metrics` shows, and readiness.
#[derive(Debug)]
pub struct Metrics {
    topics: PerSource<(String, TopicCounters)>,
    dlq_failed: AtomicU64,
    dlq_pending: AtomicU64,
    snapshots_written: AtomicU64,
    snapshot_failures: AtomicU64,
    /// Why dead letters cannot be delivered right now, if they cannot.
    dlq_trouble: Mutex<Option<String>>,
    reducer_failures: AtomicU64,
    lanes_refolded: AtomicU64,
    calls: Histogram,
    reads: Histogram,
    /// By [`Stage`], in its order.
    waits: [Histogram; 4],
    /// By [`Task`], in its order.
    tasks: [Histogram; 5],
    lag: Mutex<BTreeMap<(String, i32), i64>>,
    ready: AtomicBool,
    status: Mutex<String>,
    /// The re-key stage's counters, when this host runs one.
    rekey: std::sync::OnceLock<Arc<crate::broker::rekey::Stats>>,
}

impl Metrics {
    /// Metrics for the two consumed topics (users first).
    pub fn new(topics: [&str; 2]) -> Self {
        Self {
            topics: PerSource {
                users: (topics[0].to_string(), TopicCounters::default()),
                organizations: (topics[1].to_string(), TopicCounters::default()),
            },
            dlq_failed: AtomicU64::new(0),
            dlq_pending: AtomicU64::new(0),
            snapshots_written: AtomicU64::new(0),
            snapshot_failures: AtomicU64::new(0),
            dlq_trouble: Mutex::new(None),
            reducer_failures: AtomicU64::new(0),
            lanes_refolded: AtomicU64::new(0),
            calls: Histogram::new(CALL_BUCKETS),
            reads: Histogram::new(READ_BUCKETS),
            waits: std::array::from_fn(|_| Histogram::new(WAIT_BUCKETS)),
            tasks: std::array::from_fn(|_| Histogram::new(WAIT_BUCKETS)),
            lag: Mutex::new(BTreeMap::new()),
            ready: AtomicBool::new(false),
            status: Mutex::new("starting".into()),
            rekey: std::sync::OnceLock::new(),
        }
    }

    /// Shows the counters of this host's re-key stage.
    pub fn show_rekey(&self, stats: Arc<crate::broker::rekey::Stats>) {
        let _ = self.rekey.set(stats);
    }

    /// Counters of the topic of `source`.
    pub fn topic(&self, source: Source) -> &TopicCounters {
        &self.topics.get(source).1
    }

    /// How many dead letters await the broker's acknowledgement, and why they cannot
    /// be delivered if they cannot (shown by `/readyz`, which answers 503 meanwhile).
    pub fn set_dlq_pending(&self, n: usize, trouble: Option<String>) {
        self.dlq_pending.store(n as u64, Relaxed);
        *self.dlq_trouble.lock().unwrap_or_else(|p| p.into_inner()) = trouble;
    }

    /// A snapshot was written (`true`) or could not be (`false`).
    pub fn snapshot_written(&self, ok: bool) {
        let counter = if ok {
            &self.snapshots_written
        } else {
            &self.snapshot_failures
        };
        counter.fetch_add(1, Relaxed);
    }

    /// A dead-letter record could not be delivered (it is logged with its content).
    pub fn dlq_failed(&self) {
        self.dlq_failed.fetch_add(1, Relaxed);
    }

    /// A reducer call failed as a whole (trap, limit, refusal).
    pub fn reducer_failed(&self) {
        self.reducer_failures.fetch_add(1, Relaxed);
    }

    /// Fold lanes folded again because they touched an entity an earlier lane of the
    /// same batch touched (records not keyed by their entity).
    pub fn lanes_refolded(&self, n: u64) {
        self.lanes_refolded.fetch_add(n, Relaxed);
    }

    /// Records the duration of one folded batch.
    pub fn reducer_call(&self, elapsed: Duration) {
        self.calls.observe(elapsed);
    }

    /// Records the time to answer one read (`GET` of a user, an organization or a
    /// listing).
    pub fn read_answered(&self, elapsed: Duration) {
        self.reads.observe(elapsed);
    }

    /// The read-time histogram now.
    pub fn reads(&self) -> HistogramCounts {
        self.reads.counts()
    }

    /// A live record spent `took` in `stage`.
    pub fn waited(&self, stage: Stage, took: Duration) {
        self.waits[stage as usize].observe(took);
    }

    /// The consumer loop spent `took` on `task` between two batches.
    pub fn loop_task(&self, task: Task, took: Duration) {
        self.tasks[task as usize].observe(took);
    }

    /// Every consumed topic's name and counters, users first.
    pub fn topics(&self) -> impl Iterator<Item = (&str, &TopicCounters)> {
        self.topics.iter().map(|(_, (name, c))| (name.as_str(), c))
    }

    /// The lag of every partition, by (topic, partition).
    pub fn lags(&self) -> BTreeMap<(String, i32), i64> {
        lock(&self.lag).clone()
    }

    /// Sets the consumer lag of one partition.
    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        lock(&self.lag).insert((topic.to_string(), partition), lag.max(0));
    }

    /// Sets readiness and the reason shown by `/readyz`.
    pub fn set_status(&self, ready: bool, status: impl Into<String>) {
        *lock(&self.status) = status.into();
        self.ready.store(ready, Relaxed);
    }

    /// Whether the state has caught up, and what the consumer loop is doing.
    pub fn status(&self) -> (bool, String) {
        (self.ready.load(Relaxed), lock(&self.status).clone())
    }

    /// What `/readyz` says: the catch-up status, unless dead letters cannot be
    /// delivered (then not ready, with the reason: the host holds its progress).
    pub fn readiness(&self) -> (bool, String) {
        match lock(&self.dlq_trouble).clone() {
            Some(trouble) => (false, trouble),
            None => self.status(),
        }
    }

    /// Forgets the lag of one partition: this host no longer reads it (another host
    /// of its group holds it).
    pub fn forget_lag(&self, topic: &str, partition: i32) {
        lock(&self.lag).remove(&(topic.to_string(), partition));
    }

    /// The sum of all partitions' lag.
    pub fn total_lag(&self) -> i64 {
        lock(&self.lag).values().sum()
    }

    /// Prometheus text exposition.
    pub fn render(&self, sizes: Sizes) -> String {
        let mut out = String::with_capacity(2048);
        let mut counter = |name: &str, help: &str, get: &dyn Fn(&TopicCounters) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (_, (topic, c)) in self.topics.iter() {
                let _ = writeln!(out, "{name}{{topic=\"{}\"}} {}", escape(topic), get(c));
            }
        };
        counter(
            "logq_records_consumed_total",
            "Records read from the topic.",
            &|c| c.consumed.load(Relaxed),
        );
        counter(
            "logq_events_applied_total",
            "Events folded into the state.",
            &|c| c.applied.load(Relaxed),
        );
        counter(
            "logq_records_dead_lettered_total",
            "Records sent to the dead-letter topic.",
            &|c| c.dead_lettered.load(Relaxed),
        );
        counter(
            "logq_dead_letters_known_total",
            "Records refused again that an earlier run had dead-lettered (not sent twice).",
            &|c| c.dead_letters_known.load(Relaxed),
        );
        counter(
            "logq_tombstones_skipped_total",
            "Compaction tombstones (null values) skipped.",
            &|c| c.tombstones.load(Relaxed),
        );
        let mut single = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        single(
            "logq_dead_letter_failures_total",
            "counter",
            "Dead-letter records that could not be delivered.",
            self.dlq_failed.load(Relaxed).to_string(),
        );
        single(
            "logq_dead_letters_pending",
            "gauge",
            "Dead letters not yet acknowledged by the broker; their source offsets are not committed.",
            self.dlq_pending.load(Relaxed).to_string(),
        );
        single(
            "logq_snapshots_written_total",
            "counter",
            "State snapshots written to --state-dir.",
            self.snapshots_written.load(Relaxed).to_string(),
        );
        single(
            "logq_snapshot_failures_total",
            "counter",
            "State snapshots that could not be written (full or unwritable --state-dir).",
            self.snapshot_failures.load(Relaxed).to_string(),
        );
        single(
            "logq_reducer_failures_total",
            "counter",
            "Reducer calls that trapped, hit a limit or refused a batch.",
            self.reducer_failures.load(Relaxed).to_string(),
        );
        single(
            "logq_fold_lanes_refolded_total",
            "counter",
            "Fold lanes folded again because an earlier lane of the batch touched one of their entities (records not keyed by their entity).",
            self.lanes_refolded.load(Relaxed).to_string(),
        );
        if let Some(r) = self.rekey.get() {
            for (name, help, value) in [
                (
                    "logq_rekey_records_total",
                    "Users-topic records the re-key stage read and finished (written or dead-lettered; tombstones included).",
                    &r.records,
                ),
                (
                    "logq_rekey_written_total",
                    "Records the re-key stage wrote to the internal topic (one per user per input record).",
                    &r.written,
                ),
                (
                    "logq_rekey_dead_lettered_total",
                    "Users-topic records the re-key stage dead-lettered (not JSON, no string id), wholly or partly.",
                    &r.dead_lettered,
                ),
                (
                    "logq_rekey_tombstones_total",
                    "Compaction tombstones the re-key stage skipped.",
                    &r.tombstones,
                ),
                (
                    "logq_rekey_batches_resent_total",
                    "Re-key batches sent again because an output was not acknowledged.",
                    &r.resent,
                ),
                (
                    "logq_rekey_batches_doubted_total",
                    "Re-key batches set aside and read again because the stage stood still past half its session timeout.",
                    &r.doubted,
                ),
            ] {
                single(name, "counter", help, value.load(Relaxed).to_string());
            }
            let lag = r.lag.load(Relaxed);
            if lag >= 0 {
                single(
                    "logq_rekey_lag",
                    "gauge",
                    "Records of the users topic the re-key stage (all its members) has not finished: high watermarks minus its group's commits.",
                    lag.to_string(),
                );
            }
            single(
                "logq_rekey_caught_up",
                "gauge",
                "1 once the re-key stage has finished the users topic as it stood when this host started (readiness waits for it).",
                u8::from(r.caught_up.load(Relaxed)).to_string(),
            );
        }
        single(
            "logq_ready",
            "gauge",
            "1 once the state has caught up with the topics.",
            u8::from(self.ready.load(Relaxed)).to_string(),
        );
        single(
            "logq_users",
            "gauge",
            "Users GET shows.",
            sizes.users_visible.to_string(),
        );
        single(
            "logq_users_stored",
            "gauge",
            "Users kept, deleted ones included.",
            sizes.users_stored.to_string(),
        );
        single(
            "logq_user_state_bytes",
            "gauge",
            "Bytes of user keys and states held, before allocator and table overhead.",
            sizes.user_bytes.to_string(),
        );
        single(
            "logq_user_store_bytes",
            "gauge",
            "Bytes the users' store holds in all: state chunks (room and waste included), slots and indexes.",
            sizes.user_store_bytes.to_string(),
        );
        single(
            "logq_organizations",
            "gauge",
            "Organizations kept.",
            sizes.organizations.to_string(),
        );
        single(
            "logq_tombstones",
            "gauge",
            "Users kept only to remember a deletion (or never created), waiting to expire.",
            sizes.tombstones.to_string(),
        );
        single(
            "logq_tombstones_expired_total",
            "counter",
            "Tombstones forgotten after --tombstone-retention of event time.",
            sizes.tombstones_expired.to_string(),
        );
        single(
            "logq_subscribers",
            "gauge",
            "Live-change subscribers (/changes, /users/{id}/watch) connected.",
            sizes.subscribers.to_string(),
        );
        single(
            "logq_subscribers_dropped_total",
            "counter",
            "Live-change subscribers dropped as too slow.",
            sizes.subscribers_dropped.to_string(),
        );
        if let Some(clock) = sizes.clock {
            single(
                "logq_event_time_seconds",
                "gauge",
                "The event-time clock: the newest event time folded (tombstones expire against it).",
                format!("{:.6}", clock as f64 / 1e6),
            );
        }

        if let Some(rss) = crate::memory::resident_bytes() {
            single(
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory of the process (RSS), in bytes.",
                rss.to_string(),
            );
        }
        self.calls.render(
            &mut out,
            "logq_reducer_call_seconds",
            "Time to fold one batch in the reducer.",
        );
        self.reads.render(
            &mut out,
            "logq_read_seconds",
            "Time to answer one read (GET of a user, an organization or a listing), until the response head.",
        );

        render_family(
            &mut out,
            "logq_event_wait_seconds",
            "Where live records' time goes, from their timestamp to the published position, by stage (the oldest record of each batch applied once caught up).",
            "stage",
            Stage::ALL
                .iter()
                .map(|s| (s.label(), &self.waits[*s as usize])),
        );
        render_family(
            &mut out,
            "logq_loop_task_seconds",
            "Time the consumer loop spent on a task between two batches (records arriving meanwhile wait for it), by task.",
            "task",
            Task::ALL
                .iter()
                .map(|t| (t.label(), &self.tasks[*t as usize])),
        );

        let name = "logq_consumer_lag";
        let _ = writeln!(
            out,
            "# HELP {name} Records between the consumer and the partition's high watermark.\n# TYPE {name} gauge"
        );
        for ((topic, partition), lag) in lock(&self.lag).iter() {
            let _ = writeln!(
                out,
                "{name}{{topic=\"{}\",partition=\"{partition}\"}} {lag}",
                escape(topic)
            );
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_counters_histogram_and_lag() {
        let m = Metrics::new(["users", "orgs"]);
        m.topic(Source::Users).consumed.fetch_add(5, Relaxed);
        m.topic(Source::Organizations)
            .dead_lettered
            .fetch_add(2, Relaxed);
        m.reducer_call(Duration::from_micros(300));
        m.set_lag("users", 1, 7);
        let text = m.render(Sizes {
            users_visible: 3,
            users_stored: 4,
            organizations: 1,
            user_bytes: 1234,
            user_store_bytes: 4321,
            tombstones: 1,
            tombstones_expired: 9,
            clock: Some(1_600_000_000_500_000),
            subscribers: 2,
            subscribers_dropped: 1,
        });
        assert!(text.contains("logq_subscribers 2\n"), "{text}");
        assert!(text.contains("logq_tombstones 1\n"), "{text}");
        assert!(text.contains("logq_tombstones_expired_total 9\n"), "{text}");
        assert!(
            text.contains("logq_event_time_seconds 1600000000.500000\n"),
            "{text}"
        );
        assert!(
            text.contains("logq_records_consumed_total{topic=\"users\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("logq_records_dead_lettered_total{topic=\"orgs\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("logq_reducer_call_seconds_bucket{le=\"0.00025\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("logq_reducer_call_seconds_bucket{le=\"0.0005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("logq_reducer_call_seconds_count 1\n"),
            "{text}"
        );
        assert!(
            text.contains("logq_consumer_lag{topic=\"users\",partition=\"1\"} 7\n"),
            "{text}"
        );
        assert!(text.contains("logq_users 3\n"), "{text}");
        assert!(text.contains("logq_user_state_bytes 1234\n"), "{text}");
        assert!(text.contains("logq_user_store_bytes 4321\n"), "{text}");
        assert_eq!(m.total_lag(), 7);
        m.forget_lag("users", 1);
        assert_eq!(m.total_lag(), 0);
        assert!(m.lags().is_empty());
    }

    #[test]
    fn histogram_quantiles_interpolate_inside_buckets_and_deltas_subtract() {
        let h = Histogram::new(READ_BUCKETS);
        assert_eq!(
            h.counts().quantile(0.5),
            None,
            "no observations, no quantile"
        );
        for _ in 0..90 {
            h.observe(Duration::from_micros(80)); // (50 µs, 100 µs]
        }
        for _ in 0..10 {
            h.observe(Duration::from_micros(1_500)); // (1 ms, 2 ms]
        }
        let all = h.counts();
        assert_eq!(all.count, 100);
        let p50 = all.quantile(0.5).unwrap();
        assert!(
            (p50 - (0.000_05 + 0.000_05 * 50.0 / 90.0)).abs() < 1e-9,
            "{p50}"
        );
        let p99 = all.quantile(0.99).unwrap();
        assert!((p99 - (0.001 + 0.001 * 9.0 / 10.0)).abs() < 1e-9, "{p99}");
        let before = h.counts();
        h.observe(Duration::from_secs(5)); // beyond the last bound
        let recent = h.counts().since(&before);
        assert_eq!(recent.count, 1);
        assert_eq!(recent.buckets.iter().map(|(_, n)| n).sum::<u64>(), 0);
        assert_eq!(recent.quantile(0.99), Some(1.0), "capped at the last bound");
        assert!((recent.sum - 5.0).abs() < 1e-6, "{}", recent.sum);
    }

    #[test]
    fn render_shows_the_read_histogram_and_resident_memory() {
        let m = Metrics::new(["users", "orgs"]);
        m.read_answered(Duration::from_micros(70));
        m.read_answered(Duration::from_micros(300));
        let text = m.render(Sizes::default());
        assert!(
            text.contains("logq_read_seconds_bucket{le=\"0.00005\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("logq_read_seconds_bucket{le=\"0.0001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("logq_read_seconds_bucket{le=\"0.0005\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("logq_read_seconds_count 2\n"), "{text}");
        let rss = metric_value(&text, "process_resident_memory_bytes");
        assert!(
            rss > 1_000_000.0,
            "a running test process holds more than 1 MB: {rss}"
        );
    }

    #[test]
    fn wait_and_loop_task_histograms_render_by_label_and_parse_back() {
        let m = Metrics::new(["users", "orgs"]);
        m.waited(Stage::Reach, Duration::from_millis(3));
        m.waited(Stage::Total, Duration::from_millis(700));
        m.waited(Stage::Total, Duration::from_millis(4));
        m.loop_task(Task::Snapshot, Duration::from_millis(80));
        m.read_answered(Duration::from_micros(300));
        let text = m.render(Sizes::default());
        let parse = |name: &str, labels: &str| {
            HistogramCounts::parse(&text, name, labels)
                .unwrap_or_else(|| panic!("{name}{{{labels}}} missing: {text}"))
        };
        let wait = |stage: Stage| {
            parse(
                "logq_event_wait_seconds",
                &format!("stage=\"{}\"", stage.label()),
            )
        };
        let reach = wait(Stage::Reach);
        assert_eq!(reach.count, 1);
        assert!(reach.buckets.contains(&(0.002_5, 0)), "{reach:?}");
        assert!(reach.buckets.contains(&(0.005, 1)), "{reach:?}");
        assert_eq!(wait(Stage::Queue).count, 0, "one series per stage");
        let total = wait(Stage::Total);
        assert_eq!(total.count, 2);
        let p99 = total.quantile(0.99).unwrap();
        assert!((0.5..=1.0).contains(&p99), "{p99}");
        assert!((total.sum - 0.704).abs() < 1e-6, "{}", total.sum);
        let task = |t: Task| parse("logq_loop_task_seconds", &format!("task=\"{}\"", t.label()));
        assert_eq!(task(Task::Snapshot).count, 1);
        assert_eq!(task(Task::Commands).count, 0);
        assert!(text.contains("logq_loop_task_seconds_sum{task=\"snapshot\"} 0.08\n"));
        // The unlabelled family parses too, equal to the counts it was rendered from.
        assert_eq!(parse("logq_read_seconds", ""), m.reads());
        assert!(HistogramCounts::parse(&text, "logq_nothing_seconds", "").is_none());
    }

    fn metric_value(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing: {text}"))
    }

    #[test]
    fn recent_dead_letters_keep_the_newest_few_with_reasons_cut_short() {
        let c = TopicCounters::default();
        for offset in 0..15 {
            c.note_dead_letter(2, offset, &format!("reason {offset}"));
        }
        c.note_dead_letter(1, 99, &"é".repeat(400));
        let recent = c.recent_dead_letters();
        assert_eq!(recent.len(), RECENT_DEAD_LETTERS);
        assert_eq!(recent[0].offset, 99, "newest first");
        assert_eq!(recent[1].reason, "reason 14");
        assert_eq!(recent.last().unwrap().offset, 6, "the oldest kept");
        assert!(recent[0].reason.ends_with('…'));
        assert!(recent[0].reason.len() <= 500 + '…'.len_utf8());
    }
}
