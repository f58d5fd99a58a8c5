//! More than one host (`logq run --sharded`): which host holds which partition of the
//! users topic, and where to reach it. Fourth layer, beside the metrics.
//!
//! Each host holds the users of the partitions the group gave it ([`crate::broker::
//! group`]) and says so on the members topic ([`crate::broker::members`]) every
//! second, and at once when its share changes: its member id, the URL other hosts
//! reach it at, its partitions. Every host reads every advert, so any host can find
//! the holder of any user's partition (the user's partition is the murmur2 of its id,
//! as the producers' partitioner puts it) and forward a read there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::broker::group::partition_of;
use crate::broker::members::MembersLog;

/// Longest a host keeps answering for a partition it gave up.
pub const LINGER_MAX: Duration = Duration::from_secs(60);
/// How often a host says where it is and what it holds.
pub const ADVERT_EVERY: Duration = Duration::from_secs(1);
/// An advert older than this is forgotten: its host is gone (or cut off).
pub const ADVERT_FRESH: Duration = Duration::from_secs(4);
/// The members topic's key for the group's reducer (never a member id: those are
/// host names or addresses).
pub const REDUCER_KEY: &str = "logq:reducer";

/// The reducer the group runs: the newest swap or rollback sent to any of its hosts,
/// on the members topic under [`REDUCER_KEY`]. Each host applies it once; a host that
/// starts later finds it there (the topic is read from its beginning).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// Orders the group's swaps: one more than the newest this host had seen, or the
    /// wall clock's milliseconds when larger.
    pub seq: u64,
    /// The host the swap was sent to (breaks a tie of two swaps sent at once).
    pub by: String,
    /// sha256 of the component.
    pub sha256: String,
    /// `forward` or `replay`.
    pub mode: String,
    /// A rollback: a host whose previous reducer is this one rolls back (no fetch).
    pub rollback: bool,
}

impl Desired {
    fn newer_than(&self, other: &Desired) -> bool {
        (self.seq, &self.by) > (other.seq, &other.by)
    }
}

/// One host's advert on the members topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advert {
    /// Its stable member id (`group.instance.id`).
    pub instance: String,
    /// Where other hosts reach its HTTP API (`http://HOST:PORT`).
    pub url: String,
    /// The users topic's partitions it holds.
    pub partitions: Vec<i32>,
    /// Whether it has caught up with them.
    pub ready: bool,
    /// When it was sent (ms since the Unix epoch).
    pub sent_ms: u64,
    /// sha256 of the reducer it runs.
    #[serde(default)]
    pub reducer: String,
    /// Of `partitions`, those it is still folding from their beginning.
    #[serde(default)]
    pub behind: Vec<i32>,
    /// Partitions it gave up but whose users it keeps answering (as they were when
    /// it gave them up) until their new holder has caught up.
    #[serde(default)]
    pub lingering: Vec<i32>,
    /// Partitions it folds as a standby (`--standbys`), each with how many records it
    /// was behind at its last measure.
    #[serde(default)]
    pub standby: BTreeMap<i32, i64>,
}

struct Seen {
    advert: Advert,
    at: Instant,
}

/// This host's view of the group.
pub struct Cluster {
    instance: String,
    url: String,
    /// Partitions of the users topic (0 until known).
    partitions: AtomicI32,
    owned: RwLock<BTreeSet<i32>>,
    /// When this host got each partition it holds (ms since the Unix epoch).
    since: RwLock<BTreeMap<i32, u64>>,
    /// Held, and still being folded from their beginning.
    behind: RwLock<BTreeSet<i32>>,
    ready: AtomicBool,
    /// The group generation of this host's last assignment or revocation (-1 until
    /// the first).
    generation: AtomicI32,
    peers: RwLock<BTreeMap<String, Seen>>,
    /// Set when the share changed: the next advert goes out at once.
    changed: AtomicBool,
    forwarded: AtomicU64,
    forward_failures: AtomicU64,
    /// sha256 of the reducer this host runs.
    reducer: RwLock<String>,
    /// Partitions given up whose users this host still answers for, since when.
    lingering: RwLock<BTreeMap<i32, Instant>>,
    /// The newest group reducer heard of (or announced here).
    desired: RwLock<Option<Desired>>,
    /// A group reducer announced here, for the advert thread to publish.
    outbox: std::sync::Mutex<Option<Desired>>,
    /// Partitions this host folds as a standby, with its lag on each (records).
    standby: RwLock<BTreeMap<i32, i64>>,
    /// The most records a standby may be behind and still answer (`--max-standby-lag`).
    max_standby_lag: std::sync::atomic::AtomicI64,
    /// Reads answered by a standby, here or forwarded to one.
    standby_reads: AtomicU64,
}

impl Cluster {
    /// This host, member `instance`, reached at `url`.
    pub fn new(instance: &str, url: &str) -> Arc<Self> {
        Arc::new(Self {
            instance: instance.to_owned(),
            url: url.trim_end_matches('/').to_owned(),
            partitions: AtomicI32::new(0),
            owned: RwLock::default(),
            since: RwLock::default(),
            behind: RwLock::default(),
            ready: AtomicBool::new(false),
            generation: AtomicI32::new(-1),
            peers: RwLock::default(),
            changed: AtomicBool::new(true),
            forwarded: AtomicU64::new(0),
            forward_failures: AtomicU64::new(0),
            reducer: RwLock::default(),
            lingering: RwLock::default(),
            desired: RwLock::default(),
            outbox: std::sync::Mutex::default(),
            standby: RwLock::default(),
            max_standby_lag: std::sync::atomic::AtomicI64::new(0),
            standby_reads: AtomicU64::new(0),
        })
    }

    /// A standby answers only while at most `records` behind (`--max-standby-lag`).
    pub fn set_max_standby_lag(&self, records: i64) {
        self.max_standby_lag.store(records, Ordering::Relaxed);
    }

    /// This host folds `partitions` as a standby, each this many records behind.
    pub fn set_standby(&self, partitions: BTreeMap<i32, i64>) {
        let max = self.max_standby_lag.load(Ordering::Relaxed);
        let eligible = |m: &BTreeMap<i32, i64>| -> Vec<(i32, bool)> {
            m.iter().map(|(p, lag)| (*p, *lag <= max)).collect()
        };
        let mut standby = write(&self.standby);
        // Said at once when a standby starts, stops, or comes within the lag bound
        // (or falls out of it): readers choose by it.
        if eligible(&standby) != eligible(&partitions) {
            self.changed.store(true, Ordering::Relaxed);
        }
        *standby = partitions;
    }

    /// The partitions this host folds as a standby, with its lag on each.
    pub fn standby(&self) -> BTreeMap<i32, i64> {
        read(&self.standby).clone()
    }

    /// Whether this host folds partition `p` as a standby and is close enough behind
    /// to answer for it.
    pub fn answers_as_standby(&self, p: i32) -> bool {
        let max = self.max_standby_lag.load(Ordering::Relaxed);
        read(&self.standby).get(&p).is_some_and(|lag| *lag <= max)
    }

    /// Another host that folds partition `p` as a standby close enough behind to
    /// answer for it (the least behind).
    pub fn standby_of(&self, p: i32) -> Option<Advert> {
        let max = self.max_standby_lag.load(Ordering::Relaxed);
        read(&self.peers)
            .values()
            .filter(|s| s.at.elapsed() < ADVERT_FRESH)
            .filter_map(|s| Some((*s.advert.standby.get(&p)?, &s.advert)))
            .filter(|(lag, _)| *lag <= max)
            .min_by_key(|(lag, a)| (*lag, a.instance.clone()))
            .map(|(_, a)| a.clone())
    }

    /// A read was answered by a standby.
    pub fn count_standby_read(&self) {
        self.standby_reads.fetch_add(1, Ordering::Relaxed);
    }

    /// The partitions this host should fold as a standby: for each partition, the
    /// `r` hosts ranked first by rendezvous hash of (host, partition) among the hosts
    /// with a fresh advert and this one, its holder left out. Every host ranks alike
    /// from the same adverts, so each partition gets `r` standbys (fewer when there
    /// are fewer other hosts), and a host that comes or goes moves few of them.
    pub fn standbys_wanted(&self, r: usize) -> BTreeSet<i32> {
        let n = self.partitions();
        if r == 0 || n == 0 {
            return BTreeSet::new();
        }
        let mut hosts: Vec<String> = read(&self.peers)
            .values()
            .filter(|s| s.at.elapsed() < ADVERT_FRESH)
            .map(|s| s.advert.instance.clone())
            .collect();
        hosts.push(self.instance.clone());
        (0..n)
            .filter(|p| {
                let holder = if self.owns(*p) {
                    Some(self.instance.clone())
                } else {
                    self.holder(*p).map(|a| a.instance)
                };
                let mut ranked: Vec<(u64, &String)> = hosts
                    .iter()
                    .filter(|h| holder.as_ref() != Some(*h))
                    .map(|h| (rendezvous(h, *p), h))
                    .collect();
                ranked.sort_unstable_by(|a, b| b.cmp(a));
                ranked.iter().take(r).any(|(_, h)| **h == self.instance)
            })
            .collect()
    }

    /// This host runs reducer `sha256` now (said in its next advert).
    pub fn set_reducer(&self, sha256: &str) {
        let mut r = write(&self.reducer);
        if *r != sha256 {
            sha256.clone_into(&mut r);
            self.changed.store(true, Ordering::Relaxed);
        }
    }

    /// Tells the group to run `sha256` (sent to this host in `mode`, or a rollback
    /// to it): published on the members topic by the advert thread. Returns what was
    /// announced.
    pub fn announce(&self, sha256: &str, mode: &str, rollback: bool) -> Desired {
        let mut desired = write(&self.desired);
        // The wall clock too: a host that has not read the topic yet (just started)
        // still announces after every earlier swap.
        let d = Desired {
            seq: (desired.as_ref().map_or(0, |d| d.seq) + 1).max(now_ms()),
            by: self.instance.clone(),
            sha256: sha256.to_owned(),
            mode: mode.to_owned(),
            rollback,
        };
        *desired = Some(d.clone());
        *self.outbox.lock().unwrap_or_else(|p| p.into_inner()) = Some(d.clone());
        d
    }

    /// The group's reducer, as the newest announcement says.
    pub fn desired(&self) -> Option<Desired> {
        read(&self.desired).clone()
    }

    /// The other hosts' addresses (fresh adverts) that run reducer `sha256` first,
    /// then the rest: where to fetch a component from.
    pub fn peers_for(&self, sha256: &str) -> Vec<String> {
        let peers = read(&self.peers);
        let mut fresh: Vec<&Advert> = peers
            .values()
            .filter(|s| s.at.elapsed() < ADVERT_FRESH)
            .map(|s| &s.advert)
            .collect();
        fresh.sort_by_key(|a| a.reducer != sha256);
        fresh.into_iter().map(|a| a.url.clone()).collect()
    }

    /// Which reducer each host runs: this one first, then every fresh advert.
    pub fn reducers(&self) -> Vec<serde_json::Value> {
        let me = serde_json::json!({
            "instance": self.instance,
            "url": self.url,
            "sha256": *read(&self.reducer),
        });
        let peers = read(&self.peers);
        std::iter::once(me)
            .chain(
                peers
                    .values()
                    .filter(|s| s.at.elapsed() < ADVERT_FRESH)
                    .map(|s| {
                        serde_json::json!({
                            "instance": s.advert.instance,
                            "url": s.advert.url,
                            "sha256": s.advert.reducer,
                        })
                    }),
            )
            .collect()
    }

    /// This host's member id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The users topic has `n` partitions.
    pub fn set_partitions(&self, n: i32) {
        self.partitions.store(n, Ordering::Relaxed);
    }

    /// Partitions of the users topic (0 until known).
    pub fn partitions(&self) -> i32 {
        self.partitions.load(Ordering::Relaxed)
    }

    /// The partition user `id` is in; `None` while the partition count is unknown.
    pub fn partition_of(&self, id: &str) -> Option<i32> {
        let n = self.partitions.load(Ordering::Relaxed);
        (n > 0).then(|| partition_of(id.as_bytes(), n))
    }

    /// The group generation this host's share came with.
    pub fn set_generation(&self, generation: i32) {
        self.generation.store(generation, Ordering::Relaxed);
    }

    /// The group generation of this host's last assignment or revocation (-1 until
    /// the first).
    pub fn generation(&self) -> i32 {
        self.generation.load(Ordering::Relaxed)
    }

    /// This host now holds `partitions`, is still catching up with those `behind`
    /// (folding them from their beginning), and is ready or not.
    pub fn set_owned(&self, partitions: BTreeSet<i32>, behind: BTreeSet<i32>, ready: bool) {
        let mut owned = write(&self.owned);
        if *owned != partitions
            || self.ready.load(Ordering::Relaxed) != ready
            || *read(&self.behind) != behind
        {
            // Said at once: a host that gave a partition up waits for this.
            self.changed.store(true, Ordering::Relaxed);
        }
        {
            let mut since = write(&self.since);
            since.retain(|p, _| partitions.contains(p));
            for p in &partitions {
                since.entry(*p).or_insert_with(now_ms);
            }
        }
        *owned = partitions;
        *write(&self.behind) = behind;
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether this host holds partition `p` but has not caught up with it yet: a
    /// user not found there may only not be folded yet.
    pub fn is_behind(&self, p: i32) -> bool {
        read(&self.behind).contains(&p)
    }

    /// Whether this host holds partition `p`.
    pub fn owns(&self, p: i32) -> bool {
        read(&self.owned).contains(&p)
    }

    /// The partitions this host holds.
    pub fn owned(&self) -> BTreeSet<i32> {
        read(&self.owned).clone()
    }

    /// Whether this host answers for partition `p` itself: it holds `p` and no host
    /// has claimed `p` since it got it (see [`Cluster::contested`]). Reads, watches
    /// and redirects all follow this one rule.
    pub fn serves(&self, p: i32) -> bool {
        self.owns(p) && !self.contested(p)
    }

    /// This host gave up partition `p` (not lost: handed over) and keeps its users,
    /// answering for them until the new holder has caught up (see
    /// [`Cluster::handed_over`]).
    pub fn linger(&self, p: i32) {
        write(&self.lingering).insert(p, Instant::now());
        self.changed.store(true, Ordering::Relaxed);
    }

    /// Whether this host still answers for partition `p`, which it gave up.
    pub fn lingers(&self, p: i32) -> bool {
        read(&self.lingering).contains_key(&p)
    }

    /// The partitions this host gave up and may forget now: their new holder has
    /// caught up (or [`LINGER_MAX`] passed, or they are this host's again); they
    /// stop lingering.
    pub fn handed_over(&self) -> Vec<i32> {
        // Called between every two batches: most of the time there is nothing.
        if read(&self.lingering).is_empty() {
            return Vec::new();
        }
        let mut lingering = write(&self.lingering);
        let done: Vec<i32> = lingering
            .iter()
            .filter(|(p, since)| {
                since.elapsed() > LINGER_MAX
                    || self.owns(**p)
                    || self.holder(**p).is_some_and(|h| !h.behind.contains(p))
            })
            .map(|(p, _)| *p)
            .collect();
        for p in &done {
            lingering.remove(p);
        }
        if !done.is_empty() {
            self.changed.store(true, Ordering::Relaxed);
        }
        done
    }

    /// The users partitions no host is known to answer for: not held here, not
    /// held by any host with a fresh advert, and not lingering anywhere. All of them
    /// while the partition count is unknown (`[0]` then).
    pub fn unanswered(&self) -> Vec<i32> {
        let n = self.partitions();
        if n == 0 {
            return vec![0];
        }
        (0..n)
            .filter(|p| {
                !self.owns(*p)
                    && !self.lingers(*p)
                    && self.holder(*p).is_none()
                    && self.lingerer(*p).is_none()
            })
            .collect()
    }

    /// Whether this host still answers for any partition it gave up.
    pub fn lingers_any(&self) -> bool {
        !read(&self.lingering).is_empty()
    }

    /// Whether another host's advert is fresh.
    pub fn has_peers(&self) -> bool {
        self.newest(|_| true).is_some()
    }

    /// Another host that still answers for partition `p`, which it gave up.
    pub fn lingerer(&self, p: i32) -> Option<Advert> {
        self.newest(|a| a.lingering.contains(&p))
    }

    /// The freshest advert of another host that says `which`.
    fn newest(&self, which: impl Fn(&Advert) -> bool) -> Option<Advert> {
        read(&self.peers)
            .values()
            .filter(|s| s.at.elapsed() < ADVERT_FRESH && which(&s.advert))
            .max_by_key(|s| s.advert.sent_ms)
            .map(|s| s.advert.clone())
    }

    /// Whether another host says it holds partition `p`, which this host also holds,
    /// in an advert sent after this host got it: this host is the stale one (it stood
    /// still past the session timeout, and the group gave `p` away meanwhile).
    pub fn contested(&self, p: i32) -> bool {
        let Some(since) = read(&self.since).get(&p).copied() else {
            return false;
        };
        self.holder(p).is_some_and(|a| a.sent_ms > since)
    }

    /// Another host that holds partition `p`, by its freshest advert.
    pub fn holder(&self, p: i32) -> Option<Advert> {
        self.newest(|a| a.partitions.contains(&p))
    }

    /// A read was forwarded (`ok`) or could not be.
    pub fn count_forward(&self, ok: bool) {
        let counter = if ok {
            &self.forwarded
        } else {
            &self.forward_failures
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads forwarded to other hosts, and those that failed.
    pub fn forwards(&self) -> (u64, u64) {
        (
            self.forwarded.load(Ordering::Relaxed),
            self.forward_failures.load(Ordering::Relaxed),
        )
    }

    /// Prometheus lines: partitions held and behind, reads forwarded and failed.
    pub fn render_metrics(&self) -> String {
        let (forwarded, failed) = self.forwards();
        let behind = read(&self.behind).len();
        format!(
            "# HELP logq_partitions_held Partitions of the users topic this host holds (--sharded).\n\
             # TYPE logq_partitions_held gauge\nlogq_partitions_held {}\n\
             # HELP logq_partitions_behind Held partitions still being folded from their beginning.\n\
             # TYPE logq_partitions_behind gauge\nlogq_partitions_behind {behind}\n\
             # HELP logq_reads_forwarded_total Reads forwarded to the host that holds the user.\n\
             # TYPE logq_reads_forwarded_total counter\nlogq_reads_forwarded_total {forwarded}\n\
             # HELP logq_reads_forward_failures_total Reads whose holder did not answer (503).\n\
             # TYPE logq_reads_forward_failures_total counter\nlogq_reads_forward_failures_total {failed}\n\
             # HELP logq_partitions_standby Partitions this host folds as a standby (--standbys).\n\
             # TYPE logq_partitions_standby gauge\nlogq_partitions_standby {}\n\
             # HELP logq_reads_standby_total Reads answered by a standby because the holder could not answer (here, or forwarded to one).\n\
             # TYPE logq_reads_standby_total counter\nlogq_reads_standby_total {}\n",
            self.owned().len(),
            read(&self.standby).len(),
            self.standby_reads.load(Ordering::Relaxed)
        )
    }

    /// The group as this host sees it: itself and every fresh advert.
    pub fn view(&self) -> serde_json::Value {
        let peers = read(&self.peers);
        let others: Vec<serde_json::Value> = peers
            .values()
            .filter(|s| s.at.elapsed() < ADVERT_FRESH)
            .map(|s| {
                serde_json::json!({
                    "instance": s.advert.instance,
                    "url": s.advert.url,
                    "partitions": s.advert.partitions,
                    "ready": s.advert.ready,
                    "behind": s.advert.behind,
                    "lingering": s.advert.lingering,
                    "standby": s.advert.standby,
                    "reducer": s.advert.reducer,
                    "seen_ms_ago": s.at.elapsed().as_millis() as u64,
                })
            })
            .collect();
        let (forwarded, failed) = self.forwards();
        drop(peers);
        let nobody: Vec<i32> = (0..self.partitions())
            .filter(|p| !self.owns(*p) && self.holder(*p).is_none())
            .collect();
        serde_json::json!({
            "unheld": nobody,
            "instance": self.instance,
            "url": self.url,
            "partitions": self.owned(),
            "ready": self.ready.load(Ordering::Relaxed),
            "reducer": *read(&self.reducer),
            "behind": *read(&self.behind),
            "lingering": read(&self.lingering).keys().collect::<Vec<_>>(),
            "standby": self.standby(),
            "group_reducer": self.desired(),
            "topic_partitions": self.partitions.load(Ordering::Relaxed),
            "generation": self.generation.load(Ordering::Relaxed),
            "others": others,
            "forwarded": forwarded,
            "forward_failures": failed,
        })
    }

    fn advert(&self) -> Advert {
        Advert {
            instance: self.instance.clone(),
            url: self.url.clone(),
            partitions: self.owned().into_iter().collect(),
            ready: self.ready.load(Ordering::Relaxed),
            sent_ms: now_ms(),
            reducer: read(&self.reducer).clone(),
            behind: read(&self.behind).iter().copied().collect(),
            lingering: read(&self.lingering).keys().copied().collect(),
            standby: self.standby(),
        }
    }

    fn heard(&self, key: String, value: &[u8]) {
        if key == REDUCER_KEY {
            match serde_json::from_slice::<Desired>(value) {
                Ok(d) => {
                    let mut desired = write(&self.desired);
                    if desired.as_ref().is_none_or(|old| d.newer_than(old)) {
                        *desired = Some(d);
                    }
                }
                Err(e) => tracing::warn!("members topic: a group reducer not ours ({e})"),
            }
            return;
        }
        if key == self.instance {
            return;
        }
        let mut peers = write(&self.peers);
        if value.is_empty() {
            // It left cleanly.
            peers.remove(&key);
            return;
        }
        match serde_json::from_slice::<Advert>(value) {
            Ok(advert) => {
                peers.insert(
                    key,
                    Seen {
                        advert,
                        at: Instant::now(),
                    },
                );
            }
            Err(e) => tracing::debug!("members topic: an advert that is not ours ({e})"),
        }
    }

    /// Says where this host is every [`ADVERT_EVERY`] (and at once when its share
    /// changes) and reads every other host's adverts, on a thread of its own, until
    /// `stop`; then says it left.
    pub fn run(
        self: &Arc<Self>,
        log: MembersLog,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let announced = me.outbox.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(d) = announced
                    && let Ok(value) = serde_json::to_vec(&d)
                    && let Err(e) = log.publish(REDUCER_KEY, &value)
                {
                    tracing::warn!(
                        "members topic: announcing reducer {} (again soon): {e}",
                        d.sha256
                    );
                    let mut outbox = me.outbox.lock().unwrap_or_else(|p| p.into_inner());
                    if outbox.is_none() {
                        *outbox = Some(d);
                    }
                }
                if Instant::now() >= next || me.changed.swap(false, Ordering::Relaxed) {
                    if let Ok(value) = serde_json::to_vec(&me.advert())
                        && let Err(e) = log.publish(&me.instance, &value)
                    {
                        tracing::warn!("members topic: {e}");
                    }
                    next = Instant::now() + ADVERT_EVERY;
                }
                for (key, value) in log.read(Duration::from_millis(50)) {
                    me.heard(key, &value);
                }
            }
            let _ = log.publish(&me.instance, b"");
            let _ = log.flush(Duration::from_secs(2));
        })
    }
}

/// The rendezvous (highest random weight) score of `host` for partition `p`: FNV-1a
/// of both, mixed; the same on every host and every run.
fn rendezvous(host: &str, p: i32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.bytes().chain(p.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's last bytes move the high bits little: finish with a mix (splitmix64).
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advert(instance: &str, partitions: Vec<i32>, sent_ms: u64) -> Vec<u8> {
        serde_json::to_vec(&Advert {
            instance: instance.into(),
            url: format!("http://{instance}"),
            partitions,
            ready: true,
            sent_ms,
            reducer: String::new(),
            behind: Vec::new(),
            lingering: Vec::new(),
            standby: BTreeMap::new(),
        })
        .unwrap()
    }

    #[test]
    fn a_host_serves_what_it_holds_until_another_claims_it_later() {
        let me = Cluster::new("a", "http://a");
        me.set_partitions(4);
        me.set_owned(BTreeSet::from([0, 1]), BTreeSet::new(), true);
        let got = me.since.read().unwrap()[&1];
        // An advert from before this host got users/1 (the old holder's last word).
        me.heard("b".into(), &advert("b", vec![1, 2], got - 1));
        assert!(me.serves(0) && me.serves(1));
        assert!(!me.serves(2), "held elsewhere");
        assert_eq!(me.holder(2).map(|a| a.instance), Some("b".to_owned()));
        // The group gave users/1 to b after this host got it: b is the holder now.
        me.heard("b".into(), &advert("b", vec![1, 2], got + 1));
        assert!(!me.serves(1), "contested");
        assert!(me.serves(0));
        // b left cleanly: its tombstone forgets it.
        me.heard("b".into(), b"");
        assert!(me.serves(1) && me.holder(2).is_none());
    }

    #[test]
    fn a_partition_given_up_is_answered_here_until_its_new_holder_has_caught_up() {
        let me = Cluster::new("a", "http://a");
        me.set_partitions(2);
        me.set_owned(BTreeSet::from([0, 1]), BTreeSet::new(), true);
        me.set_owned(BTreeSet::from([0]), BTreeSet::new(), true);
        me.linger(1);
        assert!(me.lingers(1) && !me.serves(1));
        let says = |behind: Vec<i32>, sent_ms| {
            let mut a: Advert = serde_json::from_slice(&advert("b", vec![1], sent_ms)).unwrap();
            a.behind = behind;
            serde_json::to_vec(&a).unwrap()
        };
        // No holder yet, then one still folding it: keep answering.
        assert!(me.handed_over().is_empty());
        me.heard("b".into(), &says(vec![1], now_ms()));
        assert!(me.handed_over().is_empty());
        assert!(me.lingers(1));
        // Caught up there: forget it here.
        me.heard("b".into(), &says(vec![], now_ms()));
        assert_eq!(me.handed_over(), vec![1]);
        assert!(!me.lingers(1));
        // Another host's advert says what it lingers on.
        let mut c: Advert = serde_json::from_slice(&advert("c", vec![], now_ms())).unwrap();
        c.lingering = vec![0];
        me.heard("c".into(), &serde_json::to_vec(&c).unwrap());
        assert_eq!(me.lingerer(0).map(|a| a.instance), Some("c".to_owned()));
        assert!(me.lingerer(1).is_none());
    }

    /// Three hosts holding two of six partitions each, each having heard the others.
    fn three_hosts() -> Vec<Arc<Cluster>> {
        let shares = [("a", vec![0, 1]), ("b", vec![2, 3]), ("c", vec![4, 5])];
        let hosts: Vec<Arc<Cluster>> = shares
            .iter()
            .map(|(name, held)| {
                let h = Cluster::new(name, &format!("http://{name}"));
                h.set_partitions(6);
                h.set_owned(held.iter().copied().collect(), BTreeSet::new(), true);
                h
            })
            .collect();
        for h in &hosts {
            for (name, held) in &shares {
                h.heard((*name).into(), &advert(name, held.clone(), now_ms()));
            }
        }
        hosts
    }

    #[test]
    fn each_partition_gets_r_standbys_never_its_holder_and_every_host_agrees() {
        let hosts = three_hosts();
        for (r, each) in [(1, 1), (2, 2), (5, 2)] {
            let mut count = BTreeMap::new();
            for h in &hosts {
                for p in h.standbys_wanted(r) {
                    assert!(!h.owns(p), "{} stands by for its own users/{p}", h.instance);
                    *count.entry(p).or_insert(0) += 1;
                }
            }
            assert_eq!(count, (0..6).map(|p| (p, each)).collect(), "r = {r}");
        }
        assert!(hosts[0].standbys_wanted(0).is_empty());
    }

    #[test]
    fn a_standby_answers_only_within_the_lag_bound_the_least_behind_first() {
        let me = Cluster::new("a", "http://a");
        me.set_partitions(2);
        me.set_max_standby_lag(100);
        let standing = |name: &str, lags: &[(i32, i64)]| {
            let mut a: Advert = serde_json::from_slice(&advert(name, vec![], now_ms())).unwrap();
            a.standby = lags.iter().copied().collect();
            serde_json::to_vec(&a).unwrap()
        };
        me.heard("b".into(), &standing("b", &[(0, 50), (1, 101)]));
        me.heard("c".into(), &standing("c", &[(0, 10)]));
        assert_eq!(me.standby_of(0).map(|a| a.instance), Some("c".to_owned()));
        assert!(me.standby_of(1).is_none(), "101 records behind");
        me.set_standby(BTreeMap::from([(1, 100), (0, i64::MAX)]));
        assert!(me.answers_as_standby(1));
        assert!(!me.answers_as_standby(0), "not measured yet");
    }

    #[test]
    fn the_newest_group_reducer_wins_by_sequence_then_announcer() {
        let me = Cluster::new("a", "http://a");
        let d = |seq, by: &str| Desired {
            seq,
            by: by.into(),
            sha256: format!("{seq}{by}"),
            mode: "replay".into(),
            rollback: false,
        };
        for (seq, by) in [(5, "b"), (3, "c"), (5, "c"), (4, "z")] {
            me.heard(
                REDUCER_KEY.into(),
                &serde_json::to_vec(&d(seq, by)).unwrap(),
            );
        }
        assert_eq!(me.desired(), Some(d(5, "c")));
        // Announcing here goes after every one heard, and is published.
        let mine = me.announce("f00", "forward", false);
        assert!(mine.seq > 5 && mine.by == "a");
        assert_eq!(me.desired(), Some(mine.clone()));
        assert_eq!(me.outbox.lock().unwrap().clone(), Some(mine));
    }
}
