//! The state: every entity's opaque reducer state and its rendered answer, the join
//! of users to organizations by name ([`StateStore`]), and snapshots of it on disk
//! ([`snapshot`]). Third stage of the data path, between the fold and the readers.
//!
//! Users live in [`SHARDS`] shards by a hash of their id ([`shard_of`]), each under
//! its own lock: the fold's lanes, which own disjoint sets of shards, apply their
//! updates at the same time, and a reader locks only the shard of the user it reads
//! (then the organizations', to join). A shard packs its users' ids and states end
//! to end in large chunks, with no allocation per user (`users.rs`). Organizations
//! are one small table of their own.
//! What readers can rely on: an entity is never seen half-applied (each one changes
//! under its shard's lock), a [`Writer::replace`] is seen whole or not at all
//! (it takes every lock), and the published position is never ahead of what every
//! shard shows (the writer publishes after the whole batch is applied). Two entities
//! of one batch may become visible a moment apart.
//!
//! The store hands out plain bytes; how they are framed for a reducer is the fold's
//! business ([`logq_abi::prior`]).

pub mod changes;
pub mod export;
pub mod refused;
pub mod snapshot;
mod tombstones;
mod users;

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use logq_abi::{Entity, Kind, States, Update, UpdateRef, Updates};

use crate::broker::Positions;
pub use crate::fold::lanes::{SHARDS, shard_of};
use crate::fold::{Lend, Note, Target};
use tombstones::Tombstones;
use users::{EntryRef, Users};

/// The maps' hasher: fast, and seeded per process (keys come from producers).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// An organization, or a user's entry saved for a running export: the state in a
/// block of its own. (Users live packed in their shard, see [`users`].)
#[derive(Debug, Clone)]
struct Entry {
    /// What the reducer hands itself next time.
    state: Box<[u8]>,
    /// The JSON answer's range in the state; `None` while not visible.
    view: Option<Range<u32>>,
    /// The organization name's range in the state (for a user: the one it joins;
    /// for an organization: its own).
    join: Option<Range<u32>>,
    /// Which reducer rendered it (see [`Writer::set_renderer`]).
    by: u32,
    /// The entity's newest event time, if the reducer says (see [`Update::clock`]).
    clock: Option<i64>,
}

impl Entry {
    /// The entry of `update`, by reducer `by`; `None` for an update that forgets.
    fn new(update: &UpdateRef<'_>, by: u32) -> Option<Self> {
        Some(Self {
            state: update.state?.into(),
            view: update.view.clone(),
            join: update.join.clone(),
            by,
            clock: update.clock,
        })
    }

    /// It, as a user's entry is lent.
    fn get(&self) -> EntryRef<'_> {
        EntryRef {
            room: &self.state,
            len: self.state.len(),
            view: self.view.clone(),
            join: self.join.clone(),
            by: self.by,
            clock: self.clock,
        }
    }

    fn answer_by(&self) -> Option<u32> {
        self.get().answer_by()
    }

    fn view(&self) -> Option<&str> {
        self.get().view()
    }

    fn join(&self) -> Option<&str> {
        self.get().join()
    }
}

impl EntryRef<'_> {
    /// An owned copy (what a running export saves).
    fn to_entry(&self) -> Entry {
        Entry {
            state: self.state().into(),
            view: self.view.clone(),
            join: self.join.clone(),
            by: self.by,
            clock: self.clock,
        }
    }
}

/// Visible answers per renderer.
#[derive(Debug, Default)]
struct Renderers(Map<u32, usize>);

impl Renderers {
    /// One visible answer less by `gone`'s renderer, one more by `came`'s.
    fn count(&mut self, gone: Option<u32>, came: Option<u32>) {
        if let Some(by) = gone
            && let Some(n) = self.0.get_mut(&by)
        {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&by);
            }
        }
        if let Some(by) = came {
            *self.0.entry(by).or_default() += 1;
        }
    }
}

/// One shard of the users: those whose id [`shard_of`] puts here.
#[derive(Debug, Default)]
struct Shard {
    users: Users,
    /// Visible answers per renderer.
    answers: Renderers,
    /// Users kept but not visible (deleted, or never created) that carry a clock,
    /// oldest first, by slot: what expires.
    tombstones: Tombstones,
    /// Running exports: before a user that existed when one began changes, its old
    /// entry is saved there (see [`export`]).
    images: Vec<std::sync::Weak<export::Image>>,
    /// Users touched since the last published position (only while someone
    /// subscribes to changes, see [`changes`]).
    touched: Vec<Box<str>>,
    /// Visible users, and the bytes of user keys and states: kept as the users
    /// change, so [`StateStore::sizes`] (the status page asks every second) does not
    /// walk a million users.
    users_visible: usize,
    user_bytes: usize,
}

/// The organizations: few, joined to users at read time.
#[derive(Debug, Default)]
struct Organizations {
    entries: Map<Box<str>, Entry>,
    /// organization name -> keys of organizations with that name. Names are not
    /// unique; a user joins the smallest key so the answer does not depend on order.
    by_name: Map<Box<str>, BTreeSet<Box<str>>>,
    /// Visible answers per renderer.
    answers: Renderers,
    /// Organizations touched since the last published position (see [`changes`]).
    touched: Vec<Box<str>>,
}

impl Organizations {
    /// The answer of the organization users named `name` join, if any.
    fn joined(&self, name: &str) -> Option<&str> {
        let key = self.by_name.get(name)?.first()?;
        self.entries.get(key)?.view()
    }
}

/// An entity's state as the store keeps it (see [`StateStore::user_kept`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The state, as the reducer returned it.
    pub state: Vec<u8>,
    /// Which reducer rendered it (see [`Writer::set_renderer`]).
    pub by: u32,
    /// The join key: for a user, the organization name it joins; for an
    /// organization, its own name.
    pub join: Option<String>,
    /// The answer `GET` gives now (joined, for a user); `None` while not visible.
    pub answer: Option<String>,
}

/// Counts for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sizes {
    /// Users that GET shows.
    pub users_visible: usize,
    /// Users kept, including deleted ones (their deletion time must be remembered).
    pub users_stored: usize,
    /// Organizations kept.
    pub organizations: usize,
    /// Bytes of user keys and states held (what the users cost before allocator and
    /// hash-table overhead).
    pub user_bytes: usize,
    /// Bytes the users' store holds in all: its chunks (states, room and waste
    /// included), slots, index and tombstone index.
    pub user_store_bytes: usize,
    /// Of the users stored, the tombstones waiting to expire.
    pub tombstones: usize,
    /// Tombstones forgotten after their retention, since start.
    pub tombstones_expired: u64,
    /// The event-time clock (µs since the Unix epoch), once anything carried one.
    pub clock: Option<i64>,
    /// Live-change subscribers connected now.
    pub subscribers: usize,
    /// Subscribers dropped as too slow, since start.
    pub subscribers_dropped: u64,
}

/// No clock yet (see [`StateStore::clock`]).
const NO_CLOCK: i64 = i64::MIN;

/// All state the host owns. Its methods only read: HTTP readers share it as an
/// `Arc<StateStore>`; what changes it is the one [`Writer`] (the consumer loop, whose
/// lanes write their own shards through it at the same time).
///
/// `std::sync::RwLock`s and not async locks: nothing awaits while holding one,
/// readers hold one for a few hash lookups and a writer for its share of a batch.
/// Lock order, everywhere: a shard before the organizations, shards in index order;
/// no write holds two locks but [`Writer::replace`], which takes them all in that
/// order (and then the other store's, one at a time).
#[derive(Debug)]
pub struct StateStore {
    shards: Box<[RwLock<Shard>]>,
    organizations: RwLock<Organizations>,
    /// The tag [`Writer::apply`] gives the entries it writes: the id of the
    /// reducer folding into this store (0: an earlier one, after a restore).
    renderer: AtomicU32,
    /// How far (µs of event time) a tombstone's clock may fall behind the store's
    /// clock before it is forgotten; 0: never (see [`Writer::set_retention`]).
    retention: AtomicI64,
    /// The event-time clock: the largest entity clock seen (capped near the wall
    /// clock, see [`Writer::apply`]); [`NO_CLOCK`] before any.
    clock: AtomicI64,
    /// Tombstones this store forgot (kept across [`Writer::replace`], so the
    /// counter never goes back).
    expired: AtomicU64,
    /// How far into the log the visible state is (see [`StateStore::position`]).
    position: Published,
    /// Exports asked for, to be begun by the writer between two batches.
    pending_exports: std::sync::Mutex<Vec<export::Pending>>,
    /// Live changes for subscribers.
    feed: changes::Feed,
    /// The records the reducer folding into this store refused.
    refused: std::sync::Mutex<refused::Refused>,
    /// Whether a [`Writer`] of it exists.
    writer_held: AtomicBool,
}

/// The one writer of a store: the consumer loop (and its lanes, which it lends the
/// handle for the length of a batch), or a replay's thread for the shadow store it
/// builds. Everything that changes a store is a method of this handle, not of
/// [`StateStore`], whose methods readers call; and a store has at most one writer
/// at a time ([`Writer::claim`]). It derefs to the store, for the writer's reads.
#[derive(Debug)]
pub struct Writer(Arc<StateStore>);

impl std::ops::Deref for Writer {
    type Target = StateStore;

    fn deref(&self) -> &StateStore {
        &self.0
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.0.writer_held.store(false, Ordering::Release);
    }
}

impl Default for StateStore {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            organizations: RwLock::default(),
            renderer: AtomicU32::default(),
            retention: AtomicI64::default(),
            clock: AtomicI64::new(NO_CLOCK),
            expired: AtomicU64::default(),
            position: Published::default(),
            pending_exports: std::sync::Mutex::default(),
            feed: changes::Feed::default(),
            refused: std::sync::Mutex::default(),
            writer_held: AtomicBool::default(),
        }
    }
}

/// The published position, with a channel readers can wait on.
#[derive(Debug)]
struct Published(tokio::sync::watch::Sender<Positions>);

impl Default for Published {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(Positions::new()).0)
    }
}

/// One page of a listing: answers in key order, and the cursor of the next page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The answers (JSON objects), in key order.
    pub items: Vec<String>,
    /// The last key of this page when more follow (pass it as `after`).
    pub next: Option<String>,
}

/// Which reducer rendered the visible answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Answers {
    /// Visible answers (users and organizations).
    pub total: usize,
    /// Of those, rendered by the reducer asked about.
    pub by_it: usize,
}

/// The renderer tag of answers restored from a snapshot that an earlier reducer
/// rendered (before a forward swap).
pub const EARLIER: u32 = 0;

/// How far ahead of the wall clock an event time may move the store's clock: a
/// record stamped in the year 9999 must not expire every tombstone at once.
pub const CLOCK_AHEAD_MAX_MICROS: i64 = 24 * 3600 * 1_000_000;

impl StateStore {
    /// An empty store, without a writer yet (see [`Writer::new_store`]).
    fn new() -> Self {
        Self::default()
    }

    /// The event-time clock, once anything carried one.
    fn clock(&self) -> Option<i64> {
        Some(self.clock.load(Ordering::Relaxed)).filter(|c| *c != NO_CLOCK)
    }

    /// The next offset to fold per partition: everything below is in the state. Read
    /// it before reading an answer and the answer reflects at least this.
    pub fn position(&self) -> Positions {
        self.position.0.borrow().clone()
    }

    /// `f` of the position, borrowed: no copy of it (writers wait meanwhile).
    pub fn with_position<R>(&self, f: impl FnOnce(&Positions) -> R) -> R {
        f(&self.position.0.borrow())
    }

    /// A receiver that wakes when the position moves.
    pub fn watch_position(&self) -> tokio::sync::watch::Receiver<Positions> {
        self.position.0.subscribe()
    }

    /// Visible users in id order after `after`, at most `limit`; with `organization`,
    /// only those whose `organization_name` it is. Each shard, under its read lock,
    /// gives its next `limit + 1`: without `organization`, from its ordered ids (a
    /// binary search and the page: O(log users + page)); with it, from its index by
    /// organization (a binary search and the organization's members there:
    /// O(log users + members · log members)). The smallest of those make the page. A
    /// user that changes in between is shown as it is then (one deleted meanwhile is
    /// left out).
    pub fn list_users(
        &self,
        organization: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Page {
        let mut candidates: Vec<Box<str>> = Vec::new();
        for shard in self.shards.iter() {
            let shard = read(shard);
            let more = limit.saturating_add(1);
            let keys = match organization {
                None => shard.users.page(after, more, |_, e| e.view.is_some()),
                Some(o) => smallest(shard.users.members(o, after).into_iter(), more).0,
            };
            candidates.extend(keys.into_iter().map(Box::from));
        }
        let (keys, next) = smallest(candidates.iter().map(AsRef::as_ref), limit);
        let items = keys.iter().filter_map(|k| self.user(k)).collect();
        Page { items, next }
    }

    /// Brings every shard's order of ids and index by organization up to date (see
    /// [`StateStore::list_users`]), under read locks: otherwise the first listing
    /// after a catch-up does it.
    pub fn settle_orders(&self) {
        for shard in self.shards.iter() {
            read(shard).users.settle_now();
        }
    }

    /// Organizations in key order after `after`, at most `limit`.
    pub fn list_organizations(&self, after: Option<&str>, limit: usize) -> Page {
        let orgs = self.read_organizations();
        let keys = orgs
            .entries
            .iter()
            .filter(|(k, e)| e.view.is_some() && after.is_none_or(|a| k.as_ref() > a))
            .map(|(k, _)| k.as_ref());
        let (keys, next) = smallest(keys, limit);
        let items = keys
            .iter()
            .filter_map(|k| orgs.entries.get(*k).and_then(Entry::view))
            .map(str::to_owned)
            .collect();
        Page { items, next }
    }

    /// The users that join organization `key` (whose answer's `organization` is
    /// it), as [`StateStore::list_users`]; `None` for an unknown organization.
    pub fn members(&self, key: &str, after: Option<&str>, limit: usize) -> Option<Page> {
        let name = {
            let orgs = self.read_organizations();
            let name = orgs.entries.get(key)?.join()?.to_owned();
            // Of two keys with one name, users join the smallest.
            let joins = orgs
                .by_name
                .get(name.as_str())
                .and_then(|keys| keys.first())
                .is_some_and(|k| k.as_ref() == key);
            if !joins {
                return Some(Page {
                    items: Vec::new(),
                    next: None,
                });
            }
            name
        };
        Some(self.list_users(Some(&name), after, limit))
    }

    /// How many visible answers there are, and how many reducer `id` rendered.
    pub fn answers(&self, id: u32) -> Answers {
        let mut out = Answers { total: 0, by_it: 0 };
        let mut add = |r: &Renderers| {
            out.total += r.0.values().sum::<usize>();
            out.by_it += r.0.get(&id).copied().unwrap_or(0);
        };
        for shard in self.shards.iter() {
            add(&read(shard).answers);
        }
        add(&self.read_organizations().answers);
        out
    }

    /// Every stored entity as (entity, update, whether reducer `current` rendered it):
    /// what a snapshot keeps. Taken by the one writer between two batches, so it is
    /// one consistent state (snapshots themselves are encoded straight from a
    /// frozen store: see [`Writer::freeze`]).
    pub fn dump(&self, current: u32) -> Vec<(Entity, Update, bool)> {
        let user = |key: &str, e: EntryRef<'_>| {
            let entity = Entity {
                kind: Kind::User,
                key: key.to_string(),
            };
            (entity, e.update(), e.by == current)
        };
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = read(shard);
            out.extend(shard.users.iter().map(|(k, e)| user(k, e)));
        }
        out.extend(self.organization_entities(current));
        out
    }

    /// The organizations' part of [`StateStore::dump`].
    fn organization_entities(&self, current: u32) -> Vec<(Entity, Update, bool)> {
        let orgs = self.read_organizations();
        orgs.entries
            .iter()
            .map(|(k, e)| {
                let e = e.get();
                let entity = Entity {
                    kind: Kind::Organization,
                    key: k.to_string(),
                };
                (entity, e.update(), e.by == current)
            })
            .collect()
    }

    /// The answer for user `id`: its view joined with its organization's.
    pub fn user(&self, id: &str) -> Option<String> {
        let shard = self.read_shard(id);
        let entry = shard.users.get(id)?;
        let view = entry.view()?;
        let orgs = self.read_organizations();
        let org = entry.join().and_then(|name| orgs.joined(name));
        // Copying a few hundred bytes under the read locks is cheaper than sharing
        // pointers to them; a writer holds a lock only for its share of a batch.
        Some(join_view(view, org))
    }

    /// A user's state as kept (visible or not), for `?explain=1`; `None` when no
    /// state is kept for `id`.
    pub fn user_kept(&self, id: &str) -> Option<Kept> {
        let shard = self.read_shard(id);
        let entry = shard.users.get(id)?;
        Some(Kept {
            state: entry.state().to_vec(),
            by: entry.by,
            join: entry.join().map(str::to_owned),
            answer: self.user(id),
        })
    }

    /// An organization's state as kept, as [`StateStore::user_kept`].
    pub fn organization_kept(&self, key: &str) -> Option<Kept> {
        let orgs = self.read_organizations();
        let entry = orgs.entries.get(key)?;
        Some(Kept {
            state: entry.state.to_vec(),
            by: entry.by,
            join: entry.join().map(str::to_owned),
            answer: entry.view().map(str::to_owned),
        })
    }

    /// The keys of the organizations named `name`, smallest first: users of that
    /// name join the first.
    pub fn organizations_named(&self, name: &str) -> Vec<String> {
        self.read_organizations()
            .by_name
            .get(name)
            .map(|keys| keys.iter().map(|k| k.to_string()).collect())
            .unwrap_or_default()
    }

    /// Every user kept (visible or not), in no order: what a swap preview compares.
    pub fn user_keys(&self) -> Vec<Box<str>> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(read(shard).users.keys().map(Box::from));
        }
        out
    }

    /// Every organization kept, in no order.
    pub fn organization_keys(&self) -> Vec<Box<str>> {
        self.read_organizations().entries.keys().cloned().collect()
    }

    /// The answer for organization `key`.
    pub fn organization(&self, key: &str) -> Option<String> {
        self.read_organizations()
            .entries
            .get(key)?
            .view()
            .map(str::to_owned)
    }

    /// How much is stored.
    pub fn sizes(&self) -> Sizes {
        // Before the maps' locks: `subscribe` takes the feed's lock, then the maps'.
        let (subscribers, subscribers_dropped) = self.subscribers();
        let mut sizes = Sizes {
            users_visible: 0,
            users_stored: 0,
            organizations: self.read_organizations().entries.len(),
            user_bytes: 0,
            user_store_bytes: 0,
            tombstones: 0,
            tombstones_expired: self.expired.load(Ordering::Relaxed),
            clock: self.clock(),
            subscribers,
            subscribers_dropped,
        };
        for shard in self.shards.iter() {
            let shard = read(shard);
            sizes.users_visible += shard.users_visible;
            sizes.users_stored += shard.users.len();
            sizes.user_bytes += shard.user_bytes;
            sizes.user_store_bytes += shard.users.held() + shard.tombstones.held();
            sizes.tombstones += shard.tombstones.len();
        }
        sizes
    }

    fn read_shard(&self, key: &str) -> std::sync::RwLockReadGuard<'_, Shard> {
        read(&self.shards[shard_of(key.as_bytes())])
    }

    fn write_shard(&self, i: usize) -> std::sync::RwLockWriteGuard<'_, Shard> {
        write(&self.shards[i])
    }

    fn read_organizations(&self) -> std::sync::RwLockReadGuard<'_, Organizations> {
        read(&self.organizations)
    }

    fn write_organizations(&self) -> std::sync::RwLockWriteGuard<'_, Organizations> {
        write(&self.organizations)
    }
}

impl Writer {
    /// A new, empty store and its writer.
    pub fn new_store() -> Self {
        let store = StateStore::new();
        store.writer_held.store(true, Ordering::Relaxed);
        Self(Arc::new(store))
    }

    /// The writer of `store`; `None` while another writer of it exists.
    pub fn claim(store: &Arc<StateStore>) -> Option<Self> {
        store
            .writer_held
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        Some(Self(Arc::clone(store)))
    }

    /// The store, for readers.
    pub fn store(&self) -> &Arc<StateStore> {
        &self.0
    }

    /// Brings the listings' indexes up to date on a thread of its own (after a
    /// catch-up or a replay's handover: many users came at once).
    pub fn settle_in_background(&self) {
        let store = Arc::clone(&self.0);
        let spawned = std::thread::Builder::new()
            .name("logq-order".into())
            .spawn(move || {
                store.settle_orders();
                // The merges' old buffers, freed in this thread's arena.
                crate::memory::trim();
            });
        if let Err(e) = spawned {
            tracing::warn!("ordering the ids for listings: {e}; the first listing will");
        }
    }

    /// Tombstones (users kept but not visible, with a clock) are forgotten once the
    /// store's clock has moved more than `micros` of event time past theirs; 0 keeps
    /// them for ever.
    pub fn set_retention(&self, micros: i64) {
        self.retention.store(micros.max(0), Ordering::Relaxed);
    }

    /// Stores the reducer's updates: each user under its shard's write lock (one
    /// lock a shard, not an entity), the organizations under theirs; then forgets the
    /// tombstones whose retention has passed. Several writers (the fold's lanes) may
    /// apply at once. The clock only moves forward, by event times (never more than
    /// [`CLOCK_AHEAD_MAX_MICROS`] past the wall clock).
    pub fn apply(&self, entities: &[Entity], updates: impl Into<Updates>) {
        self.apply_noted(entities, updates.into(), &[]);
    }

    /// As [`Writer::apply`], with where [`Lend::lend_noted`] found each entity (same
    /// order; or none): a user whose shard has kept or forgotten no user since is not
    /// looked up again, nor its key hashed for its shard.
    fn apply_noted(&self, entities: &[Entity], updates: Updates, notes: &[Note]) {
        let notes = if notes.len() == entities.len() {
            notes
        } else {
            &[]
        };
        let by = self.renderer.load(Ordering::Relaxed);
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let cap = wall.saturating_add(CLOCK_AHEAD_MAX_MICROS);
        let recording = self.feed.enabled.load(Ordering::Relaxed);
        let mut clock = NO_CLOCK;
        // (shard, index) of each user; the organizations' indexes.
        let mut users: Vec<(usize, usize)> = Vec::with_capacity(entities.len());
        let mut organizations = Vec::new();
        for (i, (entity, update)) in entities.iter().zip(updates.iter()).enumerate() {
            if let Some(c) = update.clock {
                clock = clock.max(c.min(cap));
            }
            match entity.kind {
                Kind::User => users.push((
                    notes
                        .get(i)
                        .map_or_else(|| shard_of(entity.key.as_bytes()), |n| n.shard as usize),
                    i,
                )),
                Kind::Organization => organizations.push(i),
            }
        }
        self.clock.fetch_max(clock, Ordering::Relaxed);
        if !organizations.is_empty() {
            let mut orgs = self.write_organizations();
            for i in organizations {
                let key = entities[i].key.as_str();
                if recording {
                    orgs.touched.push(key.into());
                }
                let (gone, came) = orgs.put(key.into(), Entry::new(&updates.get(i), by));
                orgs.answers.count(gone, came);
            }
        }
        users.sort_unstable();
        for group in users.chunk_by(|a, b| a.0 == b.0) {
            let mut shard = self.write_shard(group[0].0);
            // The notes taken under this mark still hold: the group's entities are
            // distinct, so its own changes below move none of the others' slots.
            let epoch = shard.users.epoch();
            for &(_, i) in group {
                let key = entities[i].key.as_str();
                if recording {
                    shard.touched.push(key.into());
                }
                let found = match notes.get(i) {
                    Some(n) if n.epoch == epoch => (n.slot != Note::NOWHERE).then_some(n.slot),
                    _ => shard.users.find(key),
                };
                shard.put(key, found, &updates.get(i), by);
            }
            shard.tidy();
        }
        self.expire();
    }

    /// Forgets, in every shard, the tombstones whose retention has passed.
    fn expire(&self) {
        let retention = self.retention.load(Ordering::Relaxed);
        let Some(clock) = self.clock() else { return };
        if retention <= 0 {
            return;
        }
        let horizon = clock.saturating_sub(retention);
        for (i, shard) in self.shards.iter().enumerate() {
            if !read(shard).tombstones.any_before(horizon) {
                continue;
            }
            let n = self.write_shard(i).expire(horizon);
            self.expired.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Publishes how far into the log the visible state is: called by the one writer
    /// after each batch is applied (by every lane), so the published position never
    /// runs ahead of what readers see (it may briefly lag it, which is safe for
    /// read-your-writes).
    pub fn publish_position(&self, positions: &Positions) {
        if self.feed.enabled.load(Ordering::Relaxed) {
            self.publish_changes(positions);
        }
        self.position.0.send_if_modified(|p| {
            let changed = p != positions;
            if changed {
                p.clone_from(positions);
            }
            changed
        });
    }

    /// From now on, entries written are tagged as rendered by reducer `id`.
    pub fn set_renderer(&self, id: u32) {
        self.renderer.store(id, Ordering::Relaxed);
    }

    /// Takes over `other`'s contents in one step: readers see all of the old state
    /// or all of the new, never a mix (every lock is held for the swap).
    pub fn replace(&self, other: Writer) {
        self.set_renderer(other.renderer.load(Ordering::Relaxed));
        let mut shards: Vec<_> = self.shards.iter().map(write).collect();
        let mut orgs = write(&self.organizations);
        for (mine, theirs) in shards.iter_mut().zip(other.shards.iter()) {
            let theirs = std::mem::take(&mut *write(theirs));
            // Running exports cannot finish at their position on another state.
            for image in mine.images.drain(..).filter_map(|i| i.upgrade()) {
                image.break_off();
            }
            **mine = theirs;
        }
        *orgs = std::mem::take(&mut *write(&other.organizations));
        self.clock
            .store(other.clock.load(Ordering::Relaxed), Ordering::Relaxed);
        *self.refused() = std::mem::take(&mut *other.refused());
        drop(orgs);
        drop(shards);
        self.feed.replaced(self.position());
    }

    /// A store holding exactly `entities` (what [`StateStore::dump`] gave), those
    /// rendered by the dump's reducer tagged `current`, the others [`EARLIER`]; it
    /// goes on writing as `current`.
    pub fn from_dump(entities: Vec<(Entity, Update, bool)>, current: u32) -> Self {
        let store = Self::new_store();
        store.adopt(entities, current);
        store
    }

    /// Stores `entities` as a dump gives them (each with whether the reducer active as
    /// renderer `current` rendered it), over what is there: a sharing host restores a
    /// partition's users from its snapshot. Leaves `current` the renderer.
    pub fn adopt(&self, entities: Vec<(Entity, Update, bool)>, current: u32) {
        let (mine, earlier): (Vec<_>, Vec<_>) = entities.into_iter().partition(|e| e.2);
        for (tag, list) in [(EARLIER, earlier), (current, mine)] {
            self.set_renderer(tag);
            let (keys, updates): (Vec<Entity>, Vec<Update>) =
                list.into_iter().map(|(e, u, _)| (e, u)).unzip();
            self.apply(&keys, updates);
        }
    }

    /// Forgets every user (visible or not) whose id `gone` says: a host that shares
    /// partitions forgets the users of a partition that went to another host. Returns
    /// how many.
    pub fn forget_users(&self, gone: impl Fn(&str) -> bool) -> usize {
        (0..self.shards.len())
            .map(|i| self.write_shard(i).forget_where(&gone))
            .sum()
    }

    /// The records the reducer folding into this store refused (see [`refused`]):
    /// the writer notes them, a swap preview compares them.
    pub fn refused(&self) -> std::sync::MutexGuard<'_, refused::Refused> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner())
    }
}

// A panic while holding a lock cannot leave the maps half-updated in a way that
// matters more than stopping service would, so poison is ignored.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

impl States for StateStore {
    /// Lends each state under its shard's read lock. A lane reads only the entities
    /// of its batch, which no other lane writes (or, when records are not keyed by
    /// their entity, the lanes' results are checked and folded again; see
    /// [`crate::fold::lanes`]).
    fn states(&self, entities: &[Entity], each: &mut dyn FnMut(Option<&[u8]>)) {
        self.lend(entities, each, None);
    }
}

impl StateStore {
    /// Lends each state (see [`States::states`]); with `notes`, sets them to where
    /// each entity was found (its shard, its slot, the shard's [`Users::epoch`]).
    fn lend(
        &self,
        entities: &[Entity],
        each: &mut dyn FnMut(Option<&[u8]>),
        mut notes: Option<&mut Vec<Note>>,
    ) {
        if let Some(notes) = notes.as_deref_mut() {
            notes.clear();
            notes.reserve(entities.len());
        }
        for e in entities {
            let note = match e.kind {
                Kind::User => {
                    let i = shard_of(e.key.as_bytes());
                    let shard = read(&self.shards[i]);
                    let slot = shard.users.find(e.key.as_str());
                    each(slot.map(|id| shard.users.entry(id).state()));
                    Note {
                        shard: i as u32,
                        slot: slot.unwrap_or(Note::NOWHERE),
                        epoch: shard.users.epoch(),
                    }
                }
                Kind::Organization => {
                    let orgs = self.read_organizations();
                    each(orgs.entries.get(e.key.as_str()).map(|e| &*e.state));
                    if notes.is_none() {
                        continue;
                    }
                    // Only for the lanes' route check: the store does not look
                    // organizations up by note.
                    Note {
                        shard: shard_of(e.key.as_bytes()) as u32,
                        slot: Note::NOWHERE,
                        epoch: 0,
                    }
                }
            };
            if let Some(notes) = notes.as_deref_mut() {
                notes.push(note);
            }
        }
    }
}

impl States for Writer {
    fn states(&self, entities: &[Entity], each: &mut dyn FnMut(Option<&[u8]>)) {
        self.0.states(entities, each);
    }
}

impl Lend for Writer {
    fn lend_noted(
        &self,
        entities: &[Entity],
        each: &mut dyn FnMut(Option<&[u8]>),
        notes: &mut Vec<Note>,
    ) {
        self.0.lend(entities, each, Some(notes));
    }
}

impl Target for Writer {
    fn apply(&self, entities: Vec<Entity>, updates: Updates) {
        Writer::apply(self, &entities, updates);
    }

    fn apply_noted(&self, entities: Vec<Entity>, updates: Updates, notes: &[Note]) {
        Writer::apply_noted(self, &entities, updates, notes);
    }
}

/// The `limit` smallest of `keys` in order, and the last of them when more follow.
fn smallest<'k>(
    keys: impl Iterator<Item = &'k str>,
    limit: usize,
) -> (Vec<&'k str>, Option<String>) {
    // A max-heap of the limit + 1 smallest seen so far.
    let mut heap = std::collections::BinaryHeap::with_capacity(limit.saturating_add(1).min(4096));
    for k in keys {
        if heap.len() <= limit {
            heap.push(k);
        } else if heap.peek().is_some_and(|top| k < *top) {
            heap.pop();
            heap.push(k);
        }
    }
    let more = heap.len() > limit;
    let mut page = heap.into_sorted_vec();
    page.truncate(limit);
    let next = more.then(|| page.last().map(|k| (*k).to_owned())).flatten();
    (page, next)
}

impl Shard {
    /// Stores user `key`'s update (or forgets the user, for an update without a
    /// state), keeping the counts, the tombstone index and the running exports right.
    /// An entry that is kept is overwritten in place: no allocation (see [`users`]).
    /// `found`: its slot, if kept (what [`Users::find`] says, or a note of it).
    fn put(&mut self, key: &str, found: Option<u32>, update: &UpdateRef<'_>, by: u32) {
        if let Some(id) = found {
            self.preserve_for_exports(id, key);
        }
        let Some(id) = found else {
            // New: nothing to replace.
            if let Some(state) = update.state {
                let id = self.users.insert(key, update, state, by);
                let entry = self.users.entry(id);
                let (tombstone, weight, came) =
                    (entry.tombstone(), entry.weight(key), entry.answer_by());
                self.track_tombstone(id, None, tombstone);
                self.reweigh(None, Some(weight));
                self.answers.count(None, came);
            }
            return;
        };
        let old = self.users.entry(id);
        let (before, tombstone, gone) = (old.weight(key), old.tombstone(), old.answer_by());
        match update.state {
            Some(state) => {
                self.users.set(id, update, state, by);
                let new = self.users.entry(id);
                let (after, now, came) = (new.weight(key), new.tombstone(), new.answer_by());
                self.track_tombstone(id, tombstone, now);
                self.reweigh(Some(before), Some(after));
                self.answers.count(gone, came);
            }
            None => {
                self.users.remove(id);
                self.track_tombstone(id, tombstone, None);
                self.reweigh(Some(before), None);
                self.answers.count(gone, None);
            }
        }
    }

    /// Counts a user entry of weight `before` (if there was one) replaced by one of
    /// weight `after` (if there is one).
    fn reweigh(&mut self, before: Option<(bool, usize)>, after: Option<(bool, usize)>) {
        if let Some((visible, bytes)) = before {
            self.users_visible -= usize::from(visible);
            self.user_bytes -= bytes;
        }
        if let Some((visible, bytes)) = after {
            self.users_visible += usize::from(visible);
            self.user_bytes += bytes;
        }
    }

    /// Saves the entry of user `key` (in slot `id`) for every running export, before
    /// it changes.
    fn preserve_for_exports(&mut self, id: u32, key: &str) {
        if self.images.is_empty() {
            return;
        }
        let old = self.users.entry(id);
        self.images
            .retain(|i| i.upgrade().map(|image| image.preserve(key, &old)).is_some());
    }

    /// Keeps the tombstone index right as the tombstone clock (see
    /// [`EntryRef::tombstone`]) of the user in slot `id` goes from `old` to `new`.
    fn track_tombstone(&mut self, id: u32, old: Option<i64>, new: Option<i64>) {
        let users = &self.users;
        self.tombstones
            .track(id, old, new, |id| users.tombstone_clock(id));
    }

    /// Forgets the user in slot `id` (its key `key`), keeping the counts, the
    /// tombstone index and the running exports right.
    fn forget(&mut self, id: u32, key: &str) {
        self.preserve_for_exports(id, key);
        let old = self.users.entry(id);
        let (tombstone, weight, gone) = (old.tombstone(), old.weight(key), old.answer_by());
        self.users.remove(id);
        self.track_tombstone(id, tombstone, None);
        self.reweigh(Some(weight), None);
        self.answers.count(gone, None);
    }

    /// Forgets every user whose key `gone` says; returns how many.
    fn forget_where(&mut self, gone: &dyn Fn(&str) -> bool) -> usize {
        let keys: Vec<Box<str>> = self
            .users
            .keys()
            .filter(|k| gone(k))
            .map(Box::from)
            .collect();
        for key in &keys {
            if let Some(id) = self.users.find(key) {
                self.forget(id, key);
            }
        }
        self.tidy();
        keys.len()
    }

    /// Forgets every tombstone whose clock is before `horizon`; returns how many.
    fn expire(&mut self, horizon: i64) -> u64 {
        let mut n = 0;
        loop {
            let users = &self.users;
            let Some(id) = self
                .tombstones
                .pop_due(horizon, |id| users.tombstone_clock(id))
            else {
                break;
            };
            let key: Box<str> = self.users.key(id).into();
            self.forget(id, &key);
            n += 1;
        }
        self.tidy();
        n
    }

    /// The writer's upkeep of the users after a change ([`Users::tidy`]), with their
    /// slots pinned while a frozen image names them.
    fn tidy(&mut self) {
        self.images.retain(|i| i.strong_count() > 0);
        self.users.pin(!self.images.is_empty());
        self.users.tidy();
    }
}

impl Organizations {
    /// Stores (or forgets) an organization; returns the renderers of the visible
    /// answer it replaced and of the one it stored.
    fn put(&mut self, key: Box<str>, new: Option<Entry>) -> (Option<u32>, Option<u32>) {
        let name_of = |e: &Entry| e.join().map(Box::<str>::from);
        let came = new.as_ref().and_then(Entry::answer_by);
        let (old, gone) = match new {
            Some(entry) => {
                let name = name_of(&entry);
                if let Some(name) = &name {
                    self.by_name
                        .entry(name.clone())
                        .or_default()
                        .insert(key.clone());
                }
                let old = self.entries.insert(key.clone(), entry);
                let gone = old.as_ref().and_then(Entry::answer_by);
                (
                    old.as_ref()
                        .and_then(name_of)
                        .filter(|n| Some(n) != name.as_ref()),
                    gone,
                )
            }
            None => {
                let old = self.entries.remove(&key);
                (
                    old.as_ref().and_then(name_of),
                    old.as_ref().and_then(Entry::answer_by),
                )
            }
        };
        if let Some(old_name) = old
            && let Some(keys) = self.by_name.get_mut(&old_name)
        {
            keys.remove(&key);
            if keys.is_empty() {
                self.by_name.remove(&old_name);
            }
        }
        (gone, came)
    }
}

/// A xorshift generator from `seed` (not 0): the store's randomized tests.
#[cfg(test)]
pub(crate) fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// An update whose state holds `view` and `join` (and a marker byte), the way a
/// reducer lays them out.
#[cfg(test)]
pub(crate) fn test_update(view: Option<&str>, join: Option<&str>) -> Update {
    let mut state = b"s".to_vec();
    let mut put = |text: Option<&str>| {
        text.map(|t| {
            let start = state.len() as u32;
            state.extend_from_slice(t.as_bytes());
            start..state.len() as u32
        })
    };
    let view = put(view);
    let join = put(join);
    Update {
        state: Some(state),
        view,
        join,
        clock: None,
    }
}

/// Splices `"organization": <org or null>` into the user's JSON object.
fn join_view(user: &str, org: Option<&str>) -> String {
    let body = user.trim_end();
    let body = body.strip_suffix('}').unwrap_or(body);
    let org = org.unwrap_or("null");
    let mut out = String::with_capacity(body.len() + org.len() + 20);
    out.push_str(body);
    // An empty object gets no leading comma.
    if body.trim_end() != "{" {
        out.push(',');
    }
    out.push_str("\"organization\":");
    out.push_str(org);
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity(kind: Kind, key: &str) -> Entity {
        Entity {
            kind,
            key: key.into(),
        }
    }

    fn update(view: Option<&str>, join: Option<&str>) -> Update {
        test_update(view, join)
    }

    #[test]
    fn user_is_joined_with_its_organization_in_either_order() {
        let store = Writer::new_store();
        store.apply(
            &[entity(Kind::User, "u")],
            vec![update(Some(r#"{"id":"u"}"#), Some("MGS"))],
        );
        assert_eq!(
            store.user("u").unwrap(),
            r#"{"id":"u","organization":null}"#
        );
        store.apply(
            &[entity(Kind::Organization, "k")],
            vec![update(Some(r#"{"organization_key":"k"}"#), Some("MGS"))],
        );
        let v: serde_json::Value = serde_json::from_str(&store.user("u").unwrap()).unwrap();
        assert_eq!(v["organization"]["organization_key"], "k");
    }

    #[test]
    fn a_note_is_used_only_while_its_shard_kept_and_forgot_no_user() {
        use logq_abi::Updates;
        let store = Writer::new_store();
        let users = |prefix: &str, n: usize| -> Vec<Entity> {
            (0..n)
                .map(|i| entity(Kind::User, &format!("{prefix}{i}")))
                .collect()
        };
        let answer = |key: &str| update(Some(&format!(r#"{{"id":"{key}"}}"#)), None);
        let put = |list: &[Entity]| {
            let answers: Vec<Update> = list.iter().map(|e| answer(&e.key)).collect();
            store.apply(list, answers);
        };
        let old = users("old-", 6000);
        put(&old);
        // Where `old-0` and `old-1` are, as a fold lends them.
        let (lent, mut notes) = (&old[..2], Vec::new());
        let mut states = 0;
        store.lend_noted(
            lent,
            &mut |s| states += usize::from(s.is_some()),
            &mut notes,
        );
        assert_eq!((states, notes.len()), (2, 2));
        assert!(notes.iter().all(|n| n.slot != Note::NOWHERE));
        assert_eq!(notes[0].shard as usize, shard_of(b"old-0"));
        // A note of a shard nobody touched since is taken as it is.
        let fresh = |list: &[Entity], tag: &str| -> Updates {
            list.iter()
                .map(|e| answer(&format!("{}-{tag}", e.key)))
                .collect::<Vec<_>>()
                .into()
        };
        Target::apply_noted(&store, lent.to_vec(), fresh(lent, "a"), &notes);
        assert_eq!(
            store.user("old-0").unwrap(),
            r#"{"id":"old-0-a","organization":null}"#
        );
        // Now all but a few are forgotten (every shard purges its slots), and as many
        // new users take the slots: `old-0`'s slot is another user's.
        let keep = |k: &str| ["old-1", "old-5999"].contains(&k);
        assert_eq!(store.forget_users(|k| !keep(k)), 5998);
        let new = users("new-", 6000);
        put(&new);
        // The stale note is found out: `old-0` comes back in a slot of its own, and
        // no new user's state is overwritten. (`old-1` was kept: still right.)
        Target::apply_noted(&store, lent.to_vec(), fresh(lent, "b"), &notes);
        for (key, want) in [("old-0", "old-0-b"), ("old-1", "old-1-b")] {
            assert_eq!(
                store.user(key).unwrap(),
                format!(r#"{{"id":"{want}","organization":null}}"#)
            );
        }
        for e in &new {
            assert_eq!(
                store.user(&e.key).unwrap(),
                format!(r#"{{"id":"{}","organization":null}}"#, e.key),
                "{}",
                e.key
            );
        }
        assert_eq!(store.sizes().users_visible, 2 + 1 + new.len());
    }

    /// The state a fold would get back for user `key`, and where its block is.
    fn lent(store: &StateStore, key: &str) -> (Option<Vec<u8>>, Option<usize>) {
        let mut got = None;
        store.states(&[entity(Kind::User, key)], &mut |s| {
            got = s.map(<[u8]>::to_vec)
        });
        let shard = store.read_shard(key);
        let at = shard.users.get(key).map(|e| e.room.as_ptr() as usize);
        (got, at)
    }

    #[test]
    fn a_state_is_overwritten_in_place_when_it_fits_and_moves_when_it_does_not() {
        let store = Writer::new_store();
        let u = [entity(Kind::User, "u")];
        let answer = |n: usize| format!(r#"{{"id":"u","pad":"{}"}}"#, "x".repeat(n));
        let room = |store: &StateStore| store.read_shard("u").users.get("u").unwrap().room.len();
        // A state of 110 bytes ("s", then the answer) gets a block of just that and its
        // id: most users never change.
        store.apply(&u, vec![update(Some(&answer(90)), None)]);
        let (first, exact) = lent(&store, "u");
        assert_eq!(first, update(Some(&answer(90)), None).state);
        assert_eq!(room(&store), 110);
        // Five bytes longer: a new block, with room to grow.
        store.apply(&u, vec![update(Some(&answer(95)), None)]);
        let (_, block) = lent(&store, "u");
        assert_ne!(block, exact, "outgrew its first block");
        assert_eq!(room(&store), 115 + users::SLACK);
        // A little longer or shorter: the same block, the new bytes.
        for n in [80, 100, 95] {
            store.apply(&u, vec![update(Some(&answer(n)), None)]);
            let (state, at) = lent(&store, "u");
            assert_eq!(state, update(Some(&answer(n)), None).state, "{n}");
            assert_eq!(at, block, "{n}: fits the room");
            assert_eq!(
                store.user("u").unwrap(),
                format!(
                    r#"{{"id":"u","pad":"{}","organization":null}}"#,
                    "x".repeat(n)
                )
            );
        }
        // Far longer: a new block; far shorter again: the big block is given back.
        store.apply(&u, vec![update(Some(&answer(1000)), None)]);
        let (state, big) = lent(&store, "u");
        assert_eq!(state, update(Some(&answer(1000)), None).state);
        assert_ne!(big, block);
        assert!(
            (1020..1020 + 32).contains(&room(&store)),
            "{}",
            room(&store)
        );
        store.apply(&u, vec![update(Some(&answer(10)), None)]);
        assert_eq!(lent(&store, "u").0, update(Some(&answer(10)), None).state);
        assert!(room(&store) < 64, "{}", room(&store));
        // The sizes count the room, kept right through all of it.
        assert_eq!(store.sizes().user_bytes, 1 + room(&store));
        // Forgotten, then back.
        store.apply(
            &u,
            vec![Update {
                state: None,
                view: None,
                join: None,
                clock: None,
            }],
        );
        assert_eq!(lent(&store, "u"), (None, None));
        assert_eq!(store.sizes().user_bytes, 0);
    }

    #[test]
    fn a_store_has_one_writer_at_a_time() {
        let first = Writer::new_store();
        let store = Arc::clone(first.store());
        assert!(
            Writer::claim(&store).is_none(),
            "a second writer while the first lives"
        );
        drop(first);
        let second = Writer::claim(&store).expect("claimed once the first is gone");
        assert!(Writer::claim(&store).is_none());
        second.apply(
            &[entity(Kind::User, "u")],
            vec![update(Some(r#"{"id":"u"}"#), None)],
        );
        assert!(
            store.user("u").is_some(),
            "readers see what the writer applies"
        );
    }

    #[test]
    fn renamed_organization_leaves_its_old_name() {
        let store = Writer::new_store();
        let user = [entity(Kind::User, "u")];
        store.apply(&user, vec![update(Some(r#"{"id":"u"}"#), Some("Old"))]);
        let org = [entity(Kind::Organization, "k")];
        store.apply(&org, vec![update(Some(r#"{"v":1}"#), Some("Old"))]);
        store.apply(&org, vec![update(Some(r#"{"v":2}"#), Some("New"))]);
        assert_eq!(
            store.user("u").unwrap(),
            r#"{"id":"u","organization":null}"#
        );
        store.apply(&user, vec![update(Some(r#"{"id":"u"}"#), Some("New"))]);
        assert_eq!(
            store.user("u").unwrap(),
            r#"{"id":"u","organization":{"v":2}}"#
        );
    }

    #[test]
    fn same_name_joins_the_smallest_key() {
        let store = Writer::new_store();
        store.apply(
            &[entity(Kind::User, "u")],
            vec![update(Some("{}"), Some("N"))],
        );
        store.apply(
            &[
                entity(Kind::Organization, "b"),
                entity(Kind::Organization, "a"),
            ],
            vec![
                update(Some(r#"{"k":"b"}"#), Some("N")),
                update(Some(r#"{"k":"a"}"#), Some("N")),
            ],
        );
        assert_eq!(store.user("u").unwrap(), r#"{"organization":{"k":"a"}}"#);
    }

    #[test]
    fn answers_are_counted_by_the_reducer_that_rendered_them() {
        let store = Writer::new_store();
        store.set_renderer(1);
        store.apply(
            &[
                entity(Kind::User, "u"),
                entity(Kind::User, "hidden"),
                entity(Kind::Organization, "k"),
            ],
            vec![
                update(Some("{}"), Some("N")),
                update(None, None),
                update(Some("{}"), Some("N")),
            ],
        );
        assert_eq!(store.answers(1), Answers { total: 2, by_it: 2 });
        store.set_renderer(2);
        store.apply(&[entity(Kind::User, "u")], vec![update(Some("{}"), None)]);
        assert_eq!(store.answers(2), Answers { total: 2, by_it: 1 });
        assert_eq!(store.answers(1).by_it, 1, "the organization is still 1's");
        // A snapshot keeps who rendered what; a restore tags the others EARLIER.
        let restored = Writer::from_dump(store.dump(2), 7);
        assert_eq!(restored.answers(7), Answers { total: 2, by_it: 1 });
        assert_eq!(restored.answers(EARLIER).by_it, 1);
        // Hidden and forgotten answers are no longer counted.
        store.apply(
            &[entity(Kind::User, "u"), entity(Kind::Organization, "k")],
            vec![
                Update {
                    state: None,
                    view: None,
                    join: None,
                    clock: None,
                },
                update(None, Some("N")),
            ],
        );
        assert_eq!(store.answers(2), Answers { total: 0, by_it: 0 });
        assert!(
            store.shards.iter().all(|s| read(s).answers.0.is_empty())
                && store.read_organizations().answers.0.is_empty(),
            "no zero counts kept"
        );
    }

    #[test]
    fn invisible_and_forgotten_users_are_not_found() {
        let store = Writer::new_store();
        let u = [entity(Kind::User, "u")];
        store.apply(&u, vec![update(None, None)]);
        assert_eq!(store.user("u"), None);
        assert_eq!(store.sizes().users_stored, 1);
        assert_eq!(store.sizes().users_visible, 0);
        store.apply(
            &u,
            vec![Update {
                state: None,
                view: Some(0..2),
                join: None,
                clock: None,
            }],
        );
        assert_eq!(store.sizes().users_stored, 0);
    }

    const HOUR: i64 = 3600 * 1_000_000;
    /// 2021-01-01, in µs: event times well behind the wall clock.
    const T0: i64 = 1_609_459_200_000_000;

    fn at(view: Option<&str>, clock: i64) -> Update {
        Update {
            clock: Some(clock),
            ..update(view, None)
        }
    }

    #[test]
    fn tombstones_expire_after_the_retention_in_event_time() {
        let store = Writer::new_store();
        store.set_retention(24 * HOUR);
        let users =
            |keys: &[&str]| -> Vec<Entity> { keys.iter().map(|k| entity(Kind::User, k)).collect() };
        // A visible user, a tombstone, a user with no clock (a 3.0 reducer's).
        store.apply(
            &users(&["alive", "gone", "old"]),
            vec![
                at(Some("{}"), T0),
                at(None, T0),
                Update {
                    clock: None,
                    ..update(None, None)
                },
            ],
        );
        assert_eq!(store.sizes().tombstones, 1);
        // The clock moves (by any entity, an organization too) but not past the
        // retention: kept.
        store.apply(
            &[entity(Kind::Organization, "k")],
            vec![at(Some("{}"), T0 + 24 * HOUR)],
        );
        assert_eq!(store.sizes().users_stored, 3);
        // A later event for the tombstone refreshes it: it expires from then on.
        store.apply(&users(&["gone"]), vec![at(None, T0 + 2 * HOUR)]);
        store.apply(&users(&["alive"]), vec![at(Some("{}"), T0 + 26 * HOUR)]);
        assert_eq!(store.sizes().users_stored, 3, "2 h + 24 h is not past 26 h");
        store.apply(&users(&["alive"]), vec![at(Some("{}"), T0 + 27 * HOUR)]);
        let sizes = store.sizes();
        assert_eq!(sizes.users_stored, 2, "the tombstone is forgotten");
        assert_eq!((sizes.tombstones, sizes.tombstones_expired), (0, 1));
        assert_eq!(sizes.clock, Some(T0 + 27 * HOUR));
        assert!(store.user("alive").is_some(), "visible users never expire");
        assert!(
            store.read_shard("old").users.find("old").is_some(),
            "no clock, no expiry"
        );
        // A user that becomes visible again leaves the tombstones.
        store.apply(&users(&["back"]), vec![at(None, T0 + 27 * HOUR)]);
        store.apply(&users(&["back"]), vec![at(Some("{}"), T0 + 28 * HOUR)]);
        store.apply(&users(&["alive"]), vec![at(Some("{}"), T0 + 90 * HOUR)]);
        assert!(store.user("back").is_some());
        assert_eq!(store.sizes().tombstones, 0);
    }

    /// The visible users and user bytes counted the slow way, by walking them.
    fn recount(store: &StateStore) -> (usize, usize) {
        store
            .shards
            .iter()
            .flat_map(|s| {
                read(s)
                    .users
                    .iter()
                    .map(|(k, e)| (usize::from(e.view.is_some()), k.len() + e.room.len()))
                    .collect::<Vec<_>>()
            })
            .fold((0, 0), |(n, bytes), (v, b)| (n + v, bytes + b))
    }

    #[test]
    fn kept_counts_equal_a_recount_through_creates_updates_deletes_and_expiry() {
        let store = Writer::new_store();
        store.set_retention(HOUR);
        let mut next = xorshift(0x5eed);
        for step in 0..2_000_i64 {
            let key = format!("u{}", next() % 50);
            let body = "x".repeat(usize::try_from(next() % 40).unwrap());
            let update = match next() % 4 {
                0 => at(None, T0 + step * 60_000_000),
                1 => update(None, None),
                _ => at(
                    Some(&format!("{{\"b\":\"{body}\"}}")),
                    T0 + step * 60_000_000,
                ),
            };
            store.apply(&[entity(Kind::User, &key)], vec![update]);
            let sizes = store.sizes();
            assert_eq!(
                (sizes.users_visible, sizes.user_bytes),
                recount(&store),
                "step {step}"
            );
        }
        assert!(store.sizes().tombstones_expired > 0, "expiry was exercised");
    }

    #[test]
    fn retention_never_keeps_tombstones_and_far_future_times_are_capped() {
        let store = Writer::new_store();
        let u = [entity(Kind::User, "gone")];
        store.apply(&u, vec![at(None, T0)]);
        store.apply(
            &[entity(Kind::User, "x")],
            vec![at(Some("{}"), T0 + 10_000 * HOUR)],
        );
        assert_eq!(store.sizes().users_stored, 2, "no retention set: never");
        // The year 9999 does not become the clock: the wall clock plus a day does.
        store.set_retention(24 * HOUR);
        store.apply(&[entity(Kind::User, "y")], vec![at(Some("{}"), i64::MAX)]);
        let clock = store.sizes().clock.unwrap();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64;
        assert!(
            clock <= wall + CLOCK_AHEAD_MAX_MICROS && clock > wall,
            "{clock} vs {wall}"
        );
    }

    #[test]
    fn listings_page_in_key_order_with_filters_and_members() {
        let store = Writer::new_store();
        let user = |id: &str, org: &str| {
            (
                entity(Kind::User, id),
                update(Some(&format!(r#"{{"id":"{id}"}}"#)), Some(org)),
            )
        };
        let (keys, updates): (Vec<_>, Vec<_>) = [
            user("c", "MGS"),
            user("a", "MGS"),
            user("e", "FOX"),
            user("b", "MGS"),
            user("d", "FOX"),
        ]
        .into_iter()
        .chain([(entity(Kind::User, "gone"), update(None, Some("MGS")))])
        .chain(["k2", "k1", "k3"].map(|k| {
            let name = if k == "k3" { "FOX" } else { "MGS" };
            (
                entity(Kind::Organization, k),
                update(
                    Some(&format!(r#"{{"organization_key":"{k}"}}"#)),
                    Some(name),
                ),
            )
        }))
        .unzip();
        store.apply(&keys, updates);
        let ids = |page: &Page| -> Vec<String> {
            page.items
                .iter()
                .map(|i| {
                    serde_json::from_str::<serde_json::Value>(i).unwrap()["id"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect()
        };
        let first = store.list_users(None, None, 2);
        assert_eq!(
            (ids(&first), first.next.as_deref()),
            (vec!["a".into(), "b".into()], Some("b"))
        );
        let second = store.list_users(None, first.next.as_deref(), 2);
        assert_eq!(ids(&second), ["c", "d"]);
        let last = store.list_users(None, second.next.as_deref(), 2);
        assert_eq!((ids(&last), last.next), (vec!["e".into()], None));
        let mgs = store.list_users(Some("MGS"), None, 10);
        assert_eq!(ids(&mgs), ["a", "b", "c"], "invisible users are not listed");
        assert!(
            mgs.items[0].contains(r#""organization":{"organization_key":"k1"}"#),
            "{mgs:?}"
        );
        let orgs = store.list_organizations(Some("k1"), 10);
        assert_eq!(orgs.items.len(), 2);
        assert!(orgs.items[0].contains("k2"));
        // Members: the smallest key of a name has them; another key of it has none.
        assert_eq!(
            ids(&store.members("k1", None, 10).unwrap()),
            ["a", "b", "c"]
        );
        assert!(store.members("k2", None, 10).unwrap().items.is_empty());
        assert_eq!(ids(&store.members("k3", Some("d"), 10).unwrap()), ["e"]);
        assert_eq!(store.members("nope", None, 10), None);
    }

    #[test]
    fn the_published_position_wakes_watchers_only_when_it_moves() {
        use crate::broker::Partition;
        let store = Writer::new_store();
        let mut rx = store.watch_position();
        let p = Partition {
            source: logq_abi::Source::Users,
            id: 0,
        };
        let at: Positions = [(p, 7)].into_iter().collect();
        store.publish_position(&at);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), at);
        store.publish_position(&at);
        assert!(
            !rx.has_changed().unwrap(),
            "the same position again wakes no one"
        );
        assert_eq!(store.position(), at);
    }

    /// What readers rely on while lanes apply at once: an answer is never half an
    /// update (its view and its join come from one version), and an answer read
    /// after the published position is at least as new as that position.
    #[test]
    fn readers_never_see_half_an_entity_or_answers_behind_the_published_position() {
        use crate::broker::Partition;
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        const USERS: usize = 64;
        const ROUNDS: i64 = 300;
        let store = Writer::new_store();
        let p = Partition {
            source: logq_abi::Source::Users,
            id: 0,
        };
        let orgs: Vec<Entity> = (0..3)
            .map(|k| entity(Kind::Organization, &format!("k{k}")))
            .collect();
        store.apply(
            &orgs,
            (0..3)
                .map(|k| update(Some(&format!(r#"{{"n":{k}}}"#)), Some(&format!("o{k}"))))
                .collect::<Vec<_>>(),
        );
        let ids: Vec<String> = (0..USERS).map(|i| format!("user-{i}")).collect();
        // Two writers, as two lanes: each the users of its own shards.
        let halves: [Vec<&String>; 2] = [0, 1].map(|l| {
            ids.iter()
                .filter(|k| shard_of(k.as_bytes()) % 2 == l)
                .collect()
        });
        assert!(halves.iter().all(|h| !h.is_empty()));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (store, ids, stop) = (Arc::clone(store.store()), ids.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let published = store.position().get(&p).copied().unwrap_or(0);
                        for id in &ids {
                            let Some(answer) = store.user(id) else {
                                continue;
                            };
                            let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
                            let round = v["v"].as_i64().unwrap();
                            assert!(
                                round >= published,
                                "{id} answers round {round}, the position says {published}"
                            );
                            assert_eq!(
                                v["organization"]["n"].as_i64(),
                                Some(round % 3),
                                "{id}: view and join of one version: {answer}"
                            );
                            reads += 1;
                        }
                    }
                    reads
                })
            })
            .collect();
        for round in 1..=ROUNDS {
            std::thread::scope(|s| {
                for half in &halves {
                    let store = &store;
                    s.spawn(move || {
                        let keys: Vec<Entity> =
                            half.iter().map(|k| entity(Kind::User, k)).collect();
                        let updates: Vec<Update> = half
                            .iter()
                            .map(|k| {
                                update(
                                    Some(&format!(r#"{{"id":"{k}","v":{round}}}"#)),
                                    Some(&format!("o{}", round % 3)),
                                )
                            })
                            .collect();
                        store.apply(&keys, updates);
                    });
                }
            });
            store.publish_position(&[(p, round)].into_iter().collect());
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0, "the readers read");
        }
    }

    #[test]
    fn a_restored_store_keeps_clocks_so_its_tombstones_still_expire() {
        let store = Writer::new_store();
        store.apply(&[entity(Kind::User, "gone")], vec![at(None, T0)]);
        let restored = Writer::from_dump(store.dump(1), 1);
        restored.set_retention(HOUR);
        assert_eq!(restored.sizes().tombstones, 1);
        restored.apply(
            &[entity(Kind::User, "x")],
            vec![at(Some("{}"), T0 + 2 * HOUR)],
        );
        assert_eq!(restored.sizes().users_stored, 1);
    }
}
