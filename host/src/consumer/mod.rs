//! The consumer loop: broker -> fold -> state, on a thread of its own. Fifth layer.
//!
//! The one writer: only this loop replaces the store and the active reducer. Forward
//! swaps, rollbacks, file-watch swaps and replay handovers arrive as
//! [`Command`]s and are applied between two batches, in the order they arrive;
//! nothing calls into the loop.
//!
//! Each batch is one [`Stepper::step`] (poll -> fold -> apply -> advance), the same
//! code a replay steps with: a large batch is folded on other threads (in lanes, see
//! [`crate::fold::lanes`]) while this one polls the next, so taking records out of
//! librdkafka overlaps folding; the records stay in librdkafka's buffers until they
//! are framed for the reducer. The state still moves one whole batch at a time.
//!
//! Ordering assumption: none. The reducer's fold gives the same state whatever order
//! events arrive in and however often, so partitions are interleaved freely and a
//! record applied twice (after a retry, or at a replay handover) changes nothing.
//!
//! - [`dead_letter`]: refused records to the dead-letter topics;
//! - [`progress`]: readiness and lag;
//! - [`snapshots`]: writing and restoring snapshots.

pub mod dead_letter;
pub mod progress;
pub mod snapshots;
mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant, SystemTime};

use logq_abi::Source;

use crate::broker::consumer::{POLL_WAIT, REQUEST_TIMEOUT, TopicConsumer, Watermarks};
use crate::broker::group::{Member, Ownership};
use crate::broker::{KafkaError, Partition, Positions, Record, Topics};
use crate::cluster::Cluster;
use crate::config::RunConfig;
use crate::fold::DeadLetter;
use crate::metrics::{Metrics, Stage, Task};
use crate::reducers::{Active, Command, Registry, Switched};
use crate::state::Writer;
use crate::state::snapshot::Header;
use crate::state::snapshot::Share;
use crate::step::{Ahead, Observer, Step, Stepper, Timing};
use dead_letter::DeadLetters;
use progress::CatchUp;
use snapshots::{Made, PartitionOf, SnapshotWriter, Taken};

/// How often freed memory is handed back to the OS while following the topics.
const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Why the consumer loop could not run at all. Problems with records never end it.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The Kafka clients could not be created.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

/// `positions`, held back where a dead letter is not acknowledged yet: what may be
/// committed or snapshotted (reading from there again is harmless: the fold is
/// idempotent, and the dead letter is sent again).
fn safe(dlq: &DeadLetters, positions: &Positions) -> Positions {
    positions
        .iter()
        .map(|(&p, &next)| (p, dlq.safe(p, next)))
        .collect()
}

/// What the live loop does with a step's refusals and records: dead-letters the
/// refused ones, and leaves the batch's tail for the next candidate's canary.
struct Live<'a> {
    dlq: &'a mut DeadLetters,
    /// The store the step folds into: it keeps what was refused (for previews).
    store: &'a Writer,
    registry: &'a Registry,
    /// Whether this host dead-letters refused organization records: every host reads
    /// them all, so when hosts share partitions only one does (the holder of the users
    /// topic's partition 0), or each would be dead-lettered once per host.
    organization_letters: bool,
}

impl Observer for Live<'_> {
    fn refused(&mut self, source: Source, record: &Record<'_>, why: &DeadLetter, applied: u64) {
        let at = Partition {
            source,
            id: record.partition,
        };
        self.store.refused().insert(at, record.offset, &why.reason);
        if source == Source::Organizations && !self.organization_letters {
            return;
        }
        self.dlq.send(source, record, why, applied);
    }

    fn folded(&mut self, batch: &[logq_abi::Record<'_>]) {
        // The canary of the next candidate folds the newest records, so every batch
        // leaves its tail (at most 256 records: a small share of a catch-up batch).
        self.registry.remember(batch);
    }
}

/// Starts reading partitions the watcher found, from their beginning.
fn follow_new_partitions(
    consumer: &TopicConsumer,
    added: Vec<Partition>,
    positions: &mut Positions,
) {
    match consumer.add(&added) {
        Ok(()) => {
            for p in added {
                tracing::info!(
                    "{}/{} was added to its topic: folding it from its beginning",
                    consumer.topics().name(p.source),
                    p.id
                );
                positions.insert(p, 0);
            }
        }
        Err(e) => tracing::warn!("following new partitions {added:?}: {e}"),
    }
}

/// Stores (for the next commit) every partition's safe progress that moved. Runs
/// every loop iteration, so it allocates nothing.
fn store_safe_progress(
    consumer: &TopicConsumer,
    dlq: &DeadLetters,
    positions: &Positions,
    stored: &mut BTreeMap<Partition, i64>,
) {
    for (&p, &next) in positions {
        let next = dlq.safe(p, next);
        if stored.get(&p).is_some_and(|s| *s >= next) {
            continue;
        }
        match consumer.store_progress(p, next) {
            Ok(()) => {
                stored.insert(p, next);
            }
            Err(e) => tracing::debug!("storing progress of {p}: {e}"),
        }
    }
}

/// The reducer the loop folds with, and the one before it (for rollback). Owned by
/// the loop; the registry gets a published copy.
struct Slots {
    current: Arc<Active>,
    previous: Option<Arc<Active>>,
}

impl Slots {
    fn install(&mut self, active: Arc<Active>) {
        self.previous = Some(std::mem::replace(&mut self.current, active));
    }
}

/// Where a sharing host restores a partition given to it from: its own snapshot of
/// that partition (under `root`, the `--state-dir`), made by the active reducer.
struct Restore<'a> {
    root: &'a std::path::Path,
    made: Made<'a>,
}

/// Where to read on from in a partition restored from a snapshot at `at`: there, or
/// from the group's `committed` offset if that is earlier (the dead letters of
/// records past it may not have been sent: folding them again sends them, and the
/// fold is idempotent), never below the log's start.
fn resume(at: i64, committed: Option<i64>, log: Watermarks) -> i64 {
    at.min(committed.unwrap_or(log.low)).max(log.low)
}

/// With `--sharded`: this host's membership of the group and its view of it.
pub struct Sharing {
    /// The group membership (commits go through it).
    pub member: Member,
    /// What the group changes in this host's share.
    pub news: Receiver<Ownership>,
    /// Who holds what, for the HTTP layer and the members topic.
    pub cluster: Arc<Cluster>,
    /// Without a heartbeat for this long, the group gives a host's partitions away.
    pub session_timeout: Duration,
    /// When the loop last looked (see [`Sharing::in_doubt`]).
    last_seen: Instant,
    /// Until when the loop folds nothing: it stood still long enough to have lost
    /// its partitions without knowing it yet.
    doubt_until: Option<Instant>,
    /// How many other hosts fold each partition as a standby (`--standbys`).
    standbys: usize,
    /// The partitions this host folds as a standby, with its lag on each (records;
    /// `i64::MAX` until measured).
    standing: BTreeMap<i32, i64>,
    /// When the standby partitions are looked at next.
    next_standby_look: Instant,
}

impl Sharing {
    /// A membership, its news and its view, with the group's session timeout.
    pub fn new(
        member: Member,
        news: Receiver<Ownership>,
        cluster: Arc<Cluster>,
        session_timeout: Duration,
    ) -> Self {
        Self {
            member,
            news,
            cluster,
            session_timeout,
            last_seen: Instant::now(),
            doubt_until: None,
            standbys: 0,
            standing: BTreeMap::new(),
            next_standby_look: Instant::now(),
        }
    }

    /// Also folds `r` other hosts' partitions as a standby (`--standbys`).
    #[must_use]
    pub fn with_standbys(mut self, r: usize) -> Self {
        self.standbys = r;
        self
    }

    /// Once a second: starts folding the partitions this host should stand by for
    /// now (from their beginning; the group's holder of each is another host) and
    /// stops folding those it should not (their users forgotten). How far behind it
    /// is on each is measured as the high watermarks come ([`Sharing::measured`]):
    /// readers whose holder cannot answer turn to a standby within
    /// `--max-standby-lag`. A standby commits nothing and sends
    /// no dead letter; it keeps them, for the day the group gives it the partition.
    fn stand_by(
        &mut self,
        consumer: &TopicConsumer,
        store: &Writer,
        positions: &mut Positions,
        dlq: &mut DeadLetters,
    ) {
        if self.standbys == 0 || Instant::now() < self.next_standby_look {
            return;
        }
        self.next_standby_look = Instant::now() + Duration::from_secs(1);
        if !self.cluster.unanswered().is_empty() && self.standing.is_empty() {
            // Not knowing the group yet (a host just started sees no other), every
            // partition would look like one to stand by for.
            return;
        }
        let owned = self.cluster.owned();
        let wanted: BTreeSet<i32> = self
            .cluster
            .standbys_wanted(self.standbys)
            .into_iter()
            // A partition given up keeps its users until handed over: not before.
            .filter(|p| !owned.contains(p) && !self.cluster.lingers(*p))
            .collect();
        let gone: Vec<i32> = self
            .standing
            .keys()
            .filter(|p| !wanted.contains(p))
            // Kept while its holder is unknown or still rebuilding it: readers turn
            // here meanwhile. (A host just killed still ranks, by its advert, until
            // that goes stale, and may push this one out of the first `R`.)
            .filter(|p| {
                owned.contains(p)
                    || self
                        .cluster
                        .holder(**p)
                        .is_some_and(|h| !h.behind.contains(p))
            })
            .copied()
            .collect();
        if !gone.is_empty() {
            let parts: Vec<Partition> = gone.iter().map(|p| Self::users(*p)).collect();
            // Readers learn it is gone before its users are (as for a lost partition).
            for p in &gone {
                self.standing.remove(p);
            }
            self.cluster.set_standby(self.standing.clone());
            if let Err(e) = consumer.remove(&parts) {
                tracing::warn!("no longer reading the standby partitions: {e}");
            }
            dlq.discard(&parts);
            for p in &parts {
                positions.remove(p);
                dlq.stand_down(*p);
            }
            let forgotten = self.forget(store, &gone);
            tracing::info!("no longer a standby of users/{gone:?}: {forgotten} users forgotten");
        }
        let mut read = Vec::new();
        for p in wanted {
            if self.standing.contains_key(&p) {
                continue;
            }
            let at = Self::users(p);
            let from = consumer
                .watermarks(at, REQUEST_TIMEOUT)
                .map_or(0, |w| w.low);
            positions.insert(at, from);
            dlq.stand_by(at);
            self.standing.insert(p, i64::MAX);
            read.push((at, from));
            tracing::info!("a standby of users/{p}: folding it from offset {from}");
        }
        if !read.is_empty()
            && let Err(e) = consumer.add_at(&read)
        {
            tracing::warn!("reading the standby partitions: {e}");
        }
        self.cluster.set_standby(self.standing.clone());
    }

    /// The broker's high watermarks, read off the loop (see [`watch`]): how far
    /// behind this host is on each partition it stands by for, for its advert (at
    /// once when a partition crosses `--max-standby-lag`, see `Cluster::set_standby`).
    fn measured(&mut self, highs: &BTreeMap<Partition, i64>, positions: &Positions) {
        if self.standing.is_empty() {
            return;
        }
        for (p, lag) in &mut self.standing {
            let at = Self::users(*p);
            if let (Some(high), Some(next)) = (highs.get(&at), positions.get(&at)) {
                *lag = (high - next).max(0);
            }
        }
        self.cluster.set_standby(self.standing.clone());
    }

    fn is_standby(&self, p: &Partition) -> bool {
        p.source == Source::Users && self.standing.contains_key(&p.id)
    }

    /// Whether the loop must not fold now. A host that stood still (frozen, stopped
    /// with SIGSTOP, starved) for half the session timeout or more may have been
    /// thought dead and its partitions given away, and it learns that only at its next
    /// heartbeat: until the group has spoken (news arrive) or long enough for it to
    /// have spoken, it folds nothing and sends no dead letter, so a zombie writes
    /// nothing another host also writes.
    fn in_doubt(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.last_seen) > self.session_timeout / 2 {
            tracing::warn!(
                "this host stood still for {:?}: folding nothing until the group says whether its partitions are still its own",
                now.duration_since(self.last_seen)
            );
            self.doubt_until = Some(now + self.session_timeout / 2 + Duration::from_secs(1));
        }
        self.last_seen = now;
        match self.doubt_until {
            Some(until) if now < until => true,
            _ => {
                self.doubt_until = None;
                false
            }
        }
    }

    /// The group has spoken: no more doubt.
    fn heard(&mut self) {
        self.doubt_until = None;
    }

    /// After a step that took `took`: its dead letters go out, unless the loop stood
    /// still long enough meanwhile to have lost its partitions (then they wait for
    /// the group's word, see [`Sharing::in_doubt`]).
    fn stepped(&mut self, took: Duration, dlq: &mut DeadLetters) {
        if took > self.session_timeout / 2 {
            tracing::warn!(
                "a step took {took:?}: its dead letters wait until the group says whether its partitions are still this host's"
            );
            self.doubt_until =
                Some(Instant::now() + self.session_timeout / 2 + Duration::from_secs(1));
        }
        if self.doubt_until.is_none() {
            dlq.release();
        }
    }

    fn users(p: i32) -> Partition {
        Partition {
            source: Source::Users,
            id: p,
        }
    }

    /// This host's user partitions now, which of them it is still catching up with,
    /// and whether it has caught up with all.
    fn publish(&self, positions: &Positions, catch_up: &CatchUp) {
        let owned = positions
            .keys()
            .filter(|p| p.source == Source::Users && !self.is_standby(p))
            .map(|p| p.id)
            .collect();
        let behind = positions
            .keys()
            .filter(|p| p.source == Source::Users && !self.is_standby(p) && catch_up.is_behind(**p))
            .map(|p| p.id)
            .collect();
        self.cluster.set_owned(owned, behind, catch_up.caught_up());
    }

    /// Applies one change of this host's share: partitions given are restored from
    /// this host's own snapshot of them (with `restore`) or rebuilt from their
    /// beginning; partitions taken are no longer read, their users are forgotten, and
    /// their safe progress goes back to the group to commit before another host takes
    /// them.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        news: Ownership,
        consumer: &TopicConsumer,
        store: &Writer,
        positions: &mut Positions,
        catch_up: &mut CatchUp,
        dlq: &mut DeadLetters,
        restore: Option<&Restore<'_>>,
    ) {
        match news {
            Ownership::Generation(g) => {
                self.cluster.set_generation(g);
                return;
            }
            Ownership::Assigned(given) => {
                let mut read = Vec::new();
                for (id, committed) in given {
                    let p = Self::users(id);
                    let w = consumer
                        .watermarks(p, REQUEST_TIMEOUT)
                        .unwrap_or(Watermarks { low: 0, high: 0 });
                    if self.standing.remove(&id).is_some()
                        && let Some(at) = positions.get(&p).copied()
                    {
                        // Folded here as a standby: it goes on from where it is. Its
                        // kept dead letters at or past the group's commit are sent
                        // now; those below it the last holder sent.
                        dlq.known(p, committed);
                        dlq.promote(p, committed);
                        catch_up.track(p, w.high, at);
                        tracing::info!(
                            "users/{id} is this host's now: its standby, at offset {at} (no rebuild)"
                        );
                        continue;
                    }
                    // The partition's users come from this host's own snapshot of it
                    // (it held or stood by for it before), else they are rebuilt from
                    // its beginning (the last holder's state is in its memory, not
                    // here). The committed offset says which dead letters were sent.
                    let snapshot = restore.and_then(|r| {
                        snapshots::restore_share(
                            r.root,
                            Share::Users(id),
                            &r.made,
                            &BTreeMap::from([(p, w)]),
                            store,
                        )
                    });
                    let from = match snapshot.as_ref().and_then(|at| at.get(&p)) {
                        Some(&at) => resume(at, committed, w),
                        None => w.low,
                    };
                    dlq.known(p, committed);
                    positions.insert(p, from);
                    catch_up.track(p, w.high, from);
                    read.push((p, from));
                    match snapshot {
                        Some(_) => tracing::info!(
                            "users/{id} is this host's now: restored from its snapshot, folding on from offset {from}"
                        ),
                        None => tracing::info!(
                            "users/{id} is this host's now: folding it from offset {from}"
                        ),
                    }
                }
                if let Err(e) = consumer.add_at(&read) {
                    tracing::warn!("reading the partitions given: {e}");
                }
                catch_up.release();
            }
            Ownership::Revoked {
                partitions: taken,
                lost,
                ack,
            } => {
                let parts: Vec<Partition> = taken.iter().map(|id| Self::users(*id)).collect();
                if let Err(e) = consumer.remove(&parts) {
                    tracing::warn!("no longer reading the partitions taken: {e}");
                }
                if lost {
                    // Folded while this host no longer held them: the holder sends
                    // these dead letters, from its own fold.
                    dlq.discard(&parts);
                } else {
                    dlq.release();
                }
                // Their dead letters acknowledged, so the commit may pass them.
                if let Err(e) = dlq.flush(REQUEST_TIMEOUT) {
                    tracing::warn!("dead letters not flushed before a handover: {e}");
                }
                let mut progress = BTreeMap::new();
                for p in &parts {
                    if let Some(next) = positions.remove(p) {
                        progress.insert(p.id, dlq.safe(*p, next));
                    }
                    catch_up.forget(*p);
                }
                if lost {
                    // Readers learn they are gone before their users are: a read
                    // never finds the partition held here and its user missing.
                    self.publish(positions, catch_up);
                    let gone = self.forget(store, &taken);
                    tracing::info!(
                        "users/{taken:?} were lost to another host: {gone} users forgotten"
                    );
                } else {
                    // Handed over: their users keep answering from here (as they are
                    // now) until the new holder has caught up; then forgotten.
                    for p in &taken {
                        self.cluster.linger(*p);
                    }
                    tracing::info!(
                        "users/{taken:?} went to another host: answered from here until it has caught up"
                    );
                }
                let _ = ack.send(progress);
            }
        }
        self.publish(positions, catch_up);
        // After: a partition taken over from standing by is said to be held here
        // before it stops being said to be stood by for (no read falls between).
        self.cluster.set_standby(self.standing.clone());
        // For the record (and the chaos test: at most one host holds a partition in
        // any one generation).
        tracing::info!(
            "holding users/{:?} in generation {}",
            self.cluster.owned(),
            self.cluster.generation()
        );
    }

    /// Forgets the users of `partitions` and their refusals; how many users.
    fn forget(&self, store: &Writer, partitions: &[i32]) -> usize {
        store
            .refused()
            .forget(|p| p.source == Source::Users && partitions.contains(&p.id));
        store.forget_users(|id| {
            self.cluster
                .partition_of(id)
                .is_some_and(|p| partitions.contains(&p))
        })
    }

    /// After a step: a batch polled before a handover may have folded records of a
    /// partition this host no longer holds; its users go again (unless it still
    /// answers for them: then they are only newer).
    fn tidy(&self, store: &Writer, step: &Step, positions: &mut Positions) {
        let stray: Vec<i32> = step
            .advanced
            .keys()
            .filter(|p| {
                p.source == Source::Users && !self.cluster.owns(p.id) && !self.is_standby(p)
            })
            .map(|p| p.id)
            .collect();
        if !stray.is_empty() {
            for id in &stray {
                positions.remove(&Self::users(*id));
            }
            let gone: Vec<i32> = stray
                .into_iter()
                .filter(|p| !self.cluster.lingers(*p))
                .collect();
            self.forget(store, &gone);
        }
    }

    /// Forgets the users of partitions given up whose new holder has caught up.
    fn let_go(&self, store: &Writer) {
        let done: Vec<i32> = self
            .cluster
            .handed_over()
            .into_iter()
            .filter(|p| !self.cluster.owns(*p) && !self.standing.contains_key(p))
            .collect();
        if !done.is_empty() {
            let gone = self.forget(store, &done);
            tracing::info!(
                "users/{done:?} caught up at their new holder: {gone} users forgotten here"
            );
        }
    }

    /// The progress of this host's user partitions, for the group to commit.
    fn commit(&self, dlq: &DeadLetters, positions: &Positions) {
        let progress = positions
            .iter()
            .filter(|(p, _)| p.source == Source::Users && !self.is_standby(p))
            .map(|(p, next)| (p.id, dlq.safe(*p, *next)))
            .collect();
        self.member.commit(progress);
    }
}

/// Everything the consumer loop owns or shares.
pub struct Consumer {
    config: RunConfig,
    topics: Topics,
    registry: Arc<Registry>,
    store: Writer,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    commands: Receiver<Command>,
    slots: Slots,
    sharing: Option<Sharing>,
    /// This host's member of the re-key stage, whose first catch-up readiness waits for.
    stage: Option<Arc<crate::broker::rekey::Stats>>,
}

impl Consumer {
    /// Prepares the loop, starting with the registry's current reducer; nothing runs
    /// until [`Consumer::run`].
    pub fn new(
        config: RunConfig,
        registry: Arc<Registry>,
        store: Writer,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
        commands: Receiver<Command>,
    ) -> Self {
        let topics = Topics::from(&config);
        let current = registry.current();
        store.set_renderer(current.id);
        Self {
            slots: Slots {
                current,
                previous: None,
            },
            config,
            topics,
            registry,
            store,
            metrics,
            stop,
            commands,
            sharing: None,
            stage: None,
        }
    }

    /// Shares the users topic's partitions with the group's other hosts
    /// (`--sharded`): this host reads only the partitions the group gives it.
    #[must_use]
    pub fn with_sharing(mut self, sharing: Sharing) -> Self {
        self.sharing = Some(sharing);
        self
    }

    /// Waits, before it says it is ready, for the re-key stage to have written the
    /// users topic's history (as it stood when the stage started) into the
    /// partitions this host folds; until then every read of a user is a 503, not a
    /// 404 (the user may exist and not be re-keyed yet).
    #[must_use]
    pub fn with_stage(mut self, stage: Arc<crate::broker::rekey::Stats>) -> Self {
        self.stage = Some(stage);
        self
    }

    /// The client [`Consumer::run`] reads with, made from `config`. Made before the
    /// loop starts, so that bad client settings (an unknown `-X KEY=VALUE`) end the
    /// process at once with librdkafka's words, and kept for the loop: making a
    /// client only to check the settings and dropping it cost every start-up 0.1 s
    /// (librdkafka's teardown).
    ///
    /// # Errors
    /// When librdkafka refuses the settings.
    pub fn client(config: &RunConfig) -> Result<TopicConsumer, KafkaError> {
        // Sharing hosts commit their users' progress through the group membership;
        // this client's own commits (organizations) go under a group of its own.
        let group = if config.sharded {
            format!("{}.reader", config.group_id)
        } else {
            config.group_id.clone()
        };
        TopicConsumer::new(&config.kafka, &group, Topics::from(config))
    }

    /// Runs until the stop flag is set: waits for the broker and the topics, reads
    /// them with `consumer` (made from this loop's settings, see
    /// [`Consumer::client`]) from a snapshot's offsets or the earliest, then follows
    /// them.
    ///
    /// # Errors
    /// Only when the Kafka clients cannot be created (bad settings).
    pub fn run(mut self, consumer: TopicConsumer) -> Result<(), ConsumerError> {
        let Some(mut targets) = self.discover(&consumer) else {
            return Ok(());
        };
        let mut sharing = self.sharing.take();
        // Every partition's high watermark is watched, also those of users a sharing
        // host does not hold (yet): the lag of a standby partition is measured from it.
        let watched: BTreeSet<Partition> = targets.keys().copied().collect();
        if let Some(s) = &sharing {
            let users = targets.keys().filter(|p| p.source == Source::Users).count();
            s.cluster
                .set_partitions(i32::try_from(users).unwrap_or(i32::MAX));
            // The group gives this host its users' partitions (see `Sharing::apply`);
            // their lag is this host's only while it holds them.
            for p in targets.keys().filter(|p| p.source == Source::Users) {
                self.metrics.forget_lag(self.topics.name(p.source), p.id);
            }
            targets.retain(|p, _| p.source != Source::Users);
        }
        let partitions: Vec<Partition> = targets.keys().copied().collect();
        // Below these, an earlier run dead-lettered what it refused (commits never
        // pass an unacknowledged dead letter): not sent again.
        let mut committed = consumer
            .committed(&partitions, REQUEST_TIMEOUT)
            .unwrap_or_else(|e| {
                tracing::warn!(
                    "committed offsets unknown ({e}): refused records may be dead-lettered again"
                );
                BTreeMap::new()
            });
        // A commit beyond the log belongs to an earlier topic of the same name.
        committed.retain(|p, at| {
            let fits = targets.get(p).is_some_and(|w| *at <= w.high);
            if !fits {
                tracing::warn!(
                    "committed offset {at} of {p} is beyond the log (topic recreated?); ignored"
                );
            }
            fits
        });
        let mut stored = committed.clone();
        let mut dlq = DeadLetters::new(
            &self.config,
            self.topics.clone(),
            self.metrics.clone(),
            committed,
        )?;
        if sharing.is_some() {
            dlq.hold_new();
        }
        let mut positions: Positions = targets.iter().map(|(p, w)| (*p, w.low)).collect();
        // A sharing host's snapshots are split by partition: the organizations are
        // restored here, each users partition when the group gives it (`Sharing::apply`).
        let split: Option<PartitionOf> = sharing.as_ref().map(|s| {
            let cluster = Arc::clone(&s.cluster);
            Arc::new(move |id: &str| cluster.partition_of(id)) as PartitionOf
        });
        if let Some(dir) = &self.config.state_dir {
            let made = self.made();
            if split.is_some() {
                let restored = snapshots::restore_share(
                    dir,
                    Share::Organizations,
                    &made,
                    &targets,
                    &self.store,
                );
                for (p, at) in restored.unwrap_or_default() {
                    positions.insert(p, resume(at, stored.get(&p).copied(), targets[&p]));
                }
            } else if let Some(restored) = snapshots::restore(dir, &made, &targets, &self.store) {
                positions = restored;
            }
        }
        let mut catch_up = CatchUp::new(
            self.metrics.clone(),
            self.topics.clone(),
            &targets,
            &positions,
        );
        let assigned: Vec<(Partition, Option<i64>)> = targets
            .iter()
            .map(|(p, w)| (*p, Some(positions[p]).filter(|at| *at > w.low)))
            .collect();
        consumer.assign(&assigned)?;
        let mut stage = self
            .stage
            .clone()
            .filter(|st| !st.caught_up.load(Ordering::Relaxed));
        if stage.is_some() {
            catch_up.wait_for_stage(&format!(
                "waiting for the re-key stage to write {}'s history into {}",
                self.config
                    .rekeyed_from
                    .as_deref()
                    .unwrap_or("the users topic"),
                self.topics.users
            ));
        }
        if let Some(s) = &sharing {
            catch_up.hold("waiting for the group to give this host its partitions");
            s.publish(&positions, &catch_up);
        }
        self.store.publish_position(&positions);
        let snapshots = self
            .config
            .state_dir
            .clone()
            .map(|dir| SnapshotWriter::start(dir, self.metrics.clone()));
        let snapshot_every = Duration::from_secs(self.config.snapshot_interval_secs.max(1));
        let mut next_snapshot = Instant::now() + snapshot_every;
        let mut changed = false;
        let mut next_trim = Instant::now() + TRIM_EVERY;
        let mut trimming: Option<std::thread::JoinHandle<()>> = None;
        let broker_news = watch::start(
            &self.config.kafka,
            &self.config.group_id,
            self.topics.clone(),
            watched,
            self.stop.clone(),
        );

        let mut stepper = Stepper::new(
            &consumer,
            self.config.batch_max_records,
            self.config.batch_bytes(),
            Duration::from_millis(self.config.limits.reducer_time_limit_ms),
            self.config.lanes(),
            Ahead::Poll,
        );
        let mut next_commit = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            self.serve_commands(&positions);
            if let Some(s) = &mut sharing {
                let doubt = s.in_doubt();
                while let Ok(news) = s.news.try_recv() {
                    let began = Instant::now();
                    let restore = self.config.state_dir.as_deref().map(|root| Restore {
                        root,
                        made: self.made(),
                    });
                    s.apply(
                        news,
                        &consumer,
                        &self.store,
                        &mut positions,
                        &mut catch_up,
                        &mut dlq,
                        restore.as_ref(),
                    );
                    self.metrics.loop_task(Task::Group, began.elapsed());
                    s.heard();
                    self.store.publish_position(&positions);
                }
                if doubt && s.doubt_until.is_some() {
                    std::thread::sleep(POLL_WAIT);
                    continue;
                }
                // Out of doubt: what waited goes out.
                dlq.release();
            }
            if stage
                .as_ref()
                .is_some_and(|st| st.caught_up.load(Ordering::Relaxed))
            {
                // The history is in the partitions now: catch up with what they hold.
                for (p, at) in positions.iter().filter(|(p, _)| p.source == Source::Users) {
                    match consumer.watermarks(*p, REQUEST_TIMEOUT) {
                        Ok(w) => catch_up.track(*p, w.high, *at),
                        Err(e) => tracing::warn!("watermarks of {p}: {e}"),
                    }
                }
                catch_up.stage_caught_up();
                stage = None;
                if let Some(s) = &sharing {
                    s.publish(&positions, &catch_up);
                }
            }
            let step_started = Instant::now();
            let mut live = Live {
                dlq: &mut dlq,
                store: &self.store,
                registry: &self.registry,
                organization_letters: sharing.as_ref().is_none_or(|s| s.cluster.owns(0)),
            };
            let reducer = &self.slots.current.reducer;
            match stepper.step(reducer, &self.store, POLL_WAIT, &mut live) {
                Ok(Some(step)) => {
                    // Caught up before this batch: its records are live, not history.
                    let live = catch_up.caught_up();
                    changed = true;
                    self.count(&step);
                    step.advance(&mut positions);
                    if let Some(s) = &sharing {
                        s.tidy(&self.store, &step, &mut positions);
                    }
                    for (&p, a) in &step.advanced {
                        catch_up.advanced(p, a.next);
                    }
                    if catch_up.applied(step.applied()) {
                        self.store.settle_in_background();
                    }
                    self.store.publish_position(&positions);
                    if live {
                        self.waited(&step.timing);
                    }
                    if let Some(s) = &sharing {
                        s.publish(&positions, &catch_up);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("{e}");
                    if !self.metrics.status().0 {
                        self.metrics
                            .set_status(false, format!("catching up; last broker error: {e}"));
                    }
                }
            }
            if let Some(s) = &mut sharing {
                s.stepped(step_started.elapsed(), &mut dlq);
                s.last_seen = Instant::now();
                s.let_go(&self.store);
                s.stand_by(&consumer, &self.store, &mut positions, &mut dlq);
            }
            dlq.poll();
            // Between two batches the state is exactly at `positions`.
            let began = Instant::now();
            if self.store.serve_exports(&positions) {
                self.metrics.loop_task(Task::Exports, began.elapsed());
            }
            store_safe_progress(&consumer, &dlq, &positions, &mut stored);
            if let Some(s) = &sharing
                && Instant::now() >= next_commit
            {
                let began = Instant::now();
                s.commit(&dlq, &positions);
                self.metrics.loop_task(Task::Commit, began.elapsed());
                next_commit = Instant::now() + Duration::from_secs(1);
            }
            if let Some(tx) = &snapshots
                && changed
                && Instant::now() >= next_snapshot
            {
                // Busy with the last one: try next round.
                if tx.idle() {
                    let began = Instant::now();
                    if tx.offer(self.snapshot(&safe(&dlq, &positions), split.as_ref())) {
                        changed = false;
                    }
                    self.metrics.loop_task(Task::Snapshot, began.elapsed());
                }
                next_snapshot = Instant::now() + snapshot_every;
            }
            if Instant::now() >= next_trim {
                // On a thread of its own: at a million users a trim took 40-50 ms of
                // this loop, which live records waited for.
                if trimming.as_ref().is_none_or(|t| t.is_finished()) {
                    trimming = std::thread::Builder::new()
                        .name("logq-trim".into())
                        .spawn(crate::memory::trim)
                        .ok();
                }
                next_trim = Instant::now() + TRIM_EVERY;
            }
            while let Ok(news) = broker_news.try_recv() {
                match news {
                    watch::News::Highs(highs) => {
                        for (p, high) in &highs {
                            // A standby partition's lag is its advert's (the group
                            // table shows it), not this host's own.
                            if sharing.as_ref().is_some_and(|s| s.is_standby(p)) {
                                continue;
                            }
                            if let Some(next) = positions.get(p) {
                                let topic = self.topics.name(p.source);
                                self.metrics.set_lag(topic, p.id, high - next);
                            }
                        }
                        if let Some(s) = &mut sharing {
                            s.measured(&highs, &positions);
                        }
                    }
                    watch::News::Added(mut added) => {
                        if sharing.is_some() {
                            // The group hands out new partitions of the users topic.
                            added.retain(|p| p.source != Source::Users);
                        }
                        follow_new_partitions(&consumer, added, &mut positions);
                    }
                }
            }
        }
        dlq.release();
        if let Err(e) = dlq.flush(REQUEST_TIMEOUT) {
            tracing::error!("dead letters not flushed before exit: {e}");
        }
        store_safe_progress(&consumer, &dlq, &positions, &mut stored);
        if let Err(e) = consumer.commit(&stored) {
            tracing::warn!("committing progress before exit: {e}");
        }
        if let Some(s) = &sharing {
            s.commit(&dlq, &positions);
        }
        // Leaves the group (after its last commit) before the process goes. Its
        // partitions' users keep answering from here until their new holders have
        // caught up (the service waits for that, bounded, before it stops serving).
        if let Some(s) = &sharing {
            for p in s.cluster.owned() {
                s.cluster.linger(p);
            }
            s.cluster.set_owned(BTreeSet::new(), BTreeSet::new(), false);
        }
        drop(sharing);
        if let Some(writer) = snapshots {
            // One last snapshot, so the next start has nothing to replay; written
            // before the process may exit (a large state takes a while).
            writer.finish(self.snapshot(&safe(&dlq, &positions), split.as_ref()));
        }
        Ok(())
    }

    /// Applies every command that has arrived, in order.
    fn serve_commands(&mut self, positions: &Positions) {
        while let Ok(command) = self.commands.try_recv() {
            let began = Instant::now();
            self.apply(command, positions);
            self.metrics.loop_task(Task::Commands, began.elapsed());
        }
    }

    /// Where the oldest record of a batch applied live spent its time, now that its
    /// position is published.
    fn waited(&self, timing: &Timing) {
        if timing.stamped_ms.is_none() {
            return;
        }
        let m = &self.metrics;
        m.waited(Stage::Reach, timing.reach());
        m.waited(Stage::Queue, timing.queue());
        m.waited(Stage::Fold, timing.fold());
        m.waited(Stage::Total, timing.since_stamp(SystemTime::now()));
    }

    /// The one place the active reducer and the store are replaced. (A rollback is a
    /// replay of the previous reducer, so it arrives as a handover.)
    fn apply(&mut self, command: Command, positions: &Positions) {
        match command {
            Command::Activate { swap, active, done } => {
                let offsets = self.topics.named(positions);
                tracing::info!(
                    "swap #{swap}: folding with reducer {} from offsets {offsets:?}",
                    active.sha256()
                );
                self.store.set_renderer(active.id);
                self.slots.install(active);
                self.publish();
                // Every answer there is was rendered by an earlier reducer.
                let stale_answers = self.store.answers(self.slots.current.id).total;
                let _ = done.send(Ok(Switched {
                    active: self.slots.current.info(),
                    offsets,
                    stale_answers,
                }));
            }
            Command::Handover(tail) => {
                let (store, slots, registry) = (&self.store, &mut self.slots, &self.registry);
                // Both flips are atomic for readers; no batch runs in between.
                tail.finish(positions, store, |shadow, active| {
                    store.replace(shadow);
                    slots.install(active);
                    registry.publish(&slots.current, slots.previous.as_ref());
                });
            }
        }
    }

    fn publish(&self) {
        self.registry
            .publish(&self.slots.current, self.slots.previous.as_ref());
    }

    /// What a snapshot must have been made by and for to be restored now.
    fn made(&self) -> Made<'_> {
        Made {
            sha256: self.slots.current.sha256(),
            renderer: self.slots.current.id,
            topics: self.topics.names(),
        }
    }

    /// The current state frozen at `positions` with its reducer, for a snapshot
    /// (split by partition with `split`, see [`Taken::split`]).
    fn snapshot(&self, positions: &Positions, split: Option<&PartitionOf>) -> Taken {
        Taken {
            split: split.cloned(),
            header: Header {
                reducer_sha256: self.slots.current.sha256().to_owned(),
                topics: self.topics.names().map(str::to_owned).to_vec(),
                offsets: positions.clone(),
            },
            refused: self.store.refused().clone(),
            state: self.store.freeze(positions, self.slots.current.id),
        }
    }

    /// Waits for the broker and both topics; returns every partition with the
    /// watermarks seen now, which define "caught up". Commands are served meanwhile.
    /// `None` when stopped first.
    fn discover(&mut self, consumer: &TopicConsumer) -> Option<BTreeMap<Partition, Watermarks>> {
        let mut delay = Duration::from_millis(200);
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            match consumer.targets(REQUEST_TIMEOUT) {
                Ok(targets) => {
                    for (p, w) in &targets {
                        self.metrics
                            .set_lag(self.topics.name(p.source), p.id, w.high - w.low);
                    }
                    return Some(targets);
                }
                Err(e) => {
                    let brokers = &self.config.kafka.brokers;
                    tracing::warn!("waiting for the broker at {brokers}: {e}");
                    self.metrics
                        .set_status(false, format!("waiting for the broker at {brokers}: {e}"));
                    self.serve_commands(&Positions::new());
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Counts what a step did in the metrics.
    fn count(&self, step: &Step) {
        if let Some(lanes) = step.lanes
            && lanes.refolded > 0
        {
            self.metrics.lanes_refolded(lanes.refolded as u64);
        }
        if step.elapsed > Duration::ZERO {
            self.metrics.reducer_call(step.elapsed);
        }
        for _ in 0..step.failures {
            self.metrics.reducer_failed();
        }
        for source in Source::ALL {
            let (counters, counts) = (self.metrics.topic(source), step.counts.get(source));
            counters
                .consumed
                .fetch_add(counts.consumed, Ordering::Relaxed);
            counters
                .applied
                .fetch_add(counts.applied, Ordering::Relaxed);
            counters
                .tombstones
                .fetch_add(counts.tombstones, Ordering::Relaxed);
        }
    }
}
