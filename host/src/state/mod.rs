//! The state: every entity's opaque reducer state and its rendered answer, the join
//! of users to organizations by name ([`StateStore`]), and snapshots of it on disk
//! ([`snapshot`]). Third stage of the data path, between the fold and the readers.
//!
//! The store hands out plain bytes; how they are framed for a reducer is the fold's
//! business ([`logq_abi::prior`]).

pub mod changes;
pub mod export;
pub mod snapshot;

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::RwLock;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

use logq_abi::{Entity, Kind, States, Update};

use crate::broker::Positions;
use crate::fold::Target;

/// One stored entity: one buffer, nothing twice.
#[derive(Debug, Clone)]
struct Entry {
    /// What the reducer hands itself next time.
    state: Box<[u8]>,
    /// The JSON answer's range in `state`; `None` while not visible.
    view: Option<Range<u32>>,
    /// The organization name's range in `state` (for a user: the one it joins; for an
    /// organization: its own).
    join: Option<Range<u32>>,
    /// Which reducer rendered it (see [`StateStore::set_renderer`]).
    by: u32,
    /// The entity's newest event time, if the reducer says (see [`Update::clock`]).
    clock: Option<i64>,
}

impl Entry {
    /// Whether user `key` with this entry is visible, and its bytes (key and state),
    /// as [`Sizes`] counts them.
    fn weight(&self, key: &str) -> (bool, usize) {
        (self.view.is_some(), key.len() + self.state.len())
    }

    fn new(update: Update, by: u32) -> Option<Self> {
        Some(Self {
            state: update.state?.into_boxed_slice(),
            view: update.view,
            join: update.join,
            by,
            clock: update.clock,
        })
    }

    /// When it is a tombstone (kept, not visible) that can expire: its clock.
    fn tombstone(&self) -> Option<i64> {
        self.view.is_none().then_some(self.clock).flatten()
    }

    /// The renderer whose visible answer this is, if it is visible.
    fn answer_by(&self) -> Option<u32> {
        self.view.as_ref().map(|_| self.by)
    }

    fn text(&self, range: Option<&Range<u32>>) -> Option<&str> {
        // The runtime checked that the range is inside the state and UTF-8.
        logq_abi::text_in(&self.state, range?).ok()
    }

    fn view(&self) -> Option<&str> {
        self.text(self.view.as_ref())
    }

    fn join(&self) -> Option<&str> {
        self.text(self.join.as_ref())
    }

    fn update(&self) -> Update {
        Update {
            state: Some(self.state.to_vec()),
            view: self.view.clone(),
            join: self.join.clone(),
            clock: self.clock,
        }
    }
}

#[derive(Debug, Default)]
struct Maps {
    users: HashMap<Box<str>, Entry>,
    organizations: HashMap<Box<str>, Entry>,
    /// organization name -> keys of organizations with that name. Names are not
    /// unique; a user joins the smallest key so the answer does not depend on order.
    by_name: HashMap<Box<str>, BTreeSet<Box<str>>>,
    /// Visible answers (users and organizations) per renderer.
    answers: HashMap<u32, usize>,
    /// The event-time clock: the largest entity clock seen (capped near the wall
    /// clock, see [`StateStore::apply`]).
    clock: Option<i64>,
    /// Users kept but not visible (deleted, or never created) that carry a clock,
    /// oldest first: what expires.
    tombstones: BTreeSet<(i64, Box<str>)>,
    /// Running exports: before a user that existed when one began changes, its old
    /// entry is saved there (see [`export`]).
    images: Vec<std::sync::Weak<export::Image>>,
    /// Entities touched since the last published position (only while someone
    /// subscribes to changes, see [`changes`]).
    touched: Vec<(Kind, Box<str>)>,
    /// Visible users, and the bytes of user keys and states: kept as the users
    /// change, so [`StateStore::sizes`] (the status page asks every second) does not
    /// walk a million users under the lock the writer needs.
    users_visible: usize,
    user_bytes: usize,
}

/// Counts for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// All state the host owns, shared by the consumer loop (its one writer) and HTTP
/// readers.
///
/// A `std::sync::RwLock` and not an async lock: nothing awaits while holding it,
/// readers hold it for a few hash lookups and the writer for one batch's updates.
#[derive(Debug, Default)]
pub struct StateStore {
    maps: RwLock<Maps>,
    /// The tag [`StateStore::apply`] gives the entries it writes: the id of the
    /// reducer folding into this store (0: an earlier one, after a restore).
    renderer: AtomicU32,
    /// How far (µs of event time) a tombstone's clock may fall behind the store's
    /// clock before it is forgotten; 0: never (see [`StateStore::set_retention`]).
    retention: AtomicI64,
    /// Tombstones this store forgot (kept across [`StateStore::replace`], so the
    /// counter never goes back).
    expired: AtomicU64,
    /// How far into the log the visible state is (see [`StateStore::position`]).
    position: Published,
    /// Exports asked for, to be begun by the writer between two batches.
    pending_exports: std::sync::Mutex<Vec<export::Pending>>,
    /// Live changes for subscribers.
    feed: changes::Feed,
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
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tombstones (users kept but not visible, with a clock) are forgotten once the
    /// store's clock has moved more than `micros` of event time past theirs; 0 keeps
    /// them for ever.
    pub fn set_retention(&self, micros: i64) {
        self.retention.store(micros.max(0), Ordering::Relaxed);
    }

    /// Stores the reducer's updates, all under one write lock so a reader sees the
    /// batch entirely or not at all; then forgets the tombstones whose retention has
    /// passed. The clock only moves forward, by event times (never more than
    /// [`CLOCK_AHEAD_MAX_MICROS`] past the wall clock).
    pub fn apply(&self, entities: &[Entity], updates: Vec<Update>) {
        let by = self.renderer.load(Ordering::Relaxed);
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let cap = wall.saturating_add(CLOCK_AHEAD_MAX_MICROS);
        let recording = self.feed.enabled.load(Ordering::Relaxed);
        let mut maps = self.write();
        for (entity, update) in entities.iter().zip(updates) {
            let key = entity.key.as_str();
            if recording {
                maps.touched.push((entity.kind, key.into()));
            }
            if let Some(c) = update.clock {
                maps.clock = maps.clock.max(Some(c.min(cap)));
            }
            let new = Entry::new(update, by);
            let (gone, came) = match entity.kind {
                Kind::User => {
                    maps.preserve_for_exports(key);
                    maps.track_tombstone(key, new.as_ref());
                    let came = new.as_ref().and_then(Entry::answer_by);
                    let before = maps.users.get(key).map(|e| e.weight(key));
                    let after = new.as_ref().map(|e| e.weight(key));
                    maps.reweigh(before, after);
                    let gone = match (new, maps.users.get_mut(key)) {
                        // Most updates replace an entry: keep its key, allocate nothing.
                        (Some(entry), Some(old)) => std::mem::replace(old, entry).answer_by(),
                        (Some(entry), None) => {
                            maps.users.insert(key.into(), entry);
                            None
                        }
                        (None, _) => maps.users.remove(key).and_then(|e| e.answer_by()),
                    };
                    (gone, came)
                }
                Kind::Organization => maps.put_organization(key.into(), new),
            };
            maps.count(gone, came);
        }
        let retention = self.retention.load(Ordering::Relaxed);
        if retention > 0 {
            let n = maps.expire(retention);
            self.expired.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Publishes how far into the log the visible state is: called by the one writer
    /// after each batch is applied, so the published position never runs ahead of
    /// what readers see (it may briefly lag it, which is safe for read-your-writes).
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

    /// The next offset to fold per partition: everything below is in the state. Read
    /// it before reading an answer and the answer reflects at least this.
    pub fn position(&self) -> Positions {
        self.position.0.borrow().clone()
    }

    /// A receiver that wakes when the position moves.
    pub fn watch_position(&self) -> tokio::sync::watch::Receiver<Positions> {
        self.position.0.subscribe()
    }

    /// Visible users in id order after `after`, at most `limit`; with `organization`,
    /// only those whose `organization_name` it is. One pass under the read lock
    /// (O(users · log limit)); nothing is copied but the page.
    pub fn list_users(
        &self,
        organization: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Page {
        let maps = self.read();
        let keys = maps.users.iter().filter(|(k, e)| {
            e.view.is_some()
                && after.is_none_or(|a| k.as_ref() > a)
                && organization.is_none_or(|o| e.join() == Some(o))
        });
        let (keys, next) = smallest(keys.map(|(k, _)| k.as_ref()), limit);
        let items = keys.iter().filter_map(|k| maps.user_answer(k)).collect();
        Page { items, next }
    }

    /// Organizations in key order after `after`, at most `limit`.
    pub fn list_organizations(&self, after: Option<&str>, limit: usize) -> Page {
        let maps = self.read();
        let keys = maps
            .organizations
            .iter()
            .filter(|(k, e)| e.view.is_some() && after.is_none_or(|a| k.as_ref() > a))
            .map(|(k, _)| k.as_ref());
        let (keys, next) = smallest(keys, limit);
        let items = keys
            .iter()
            .filter_map(|k| maps.organizations.get(*k).and_then(Entry::view))
            .map(str::to_owned)
            .collect();
        Page { items, next }
    }

    /// The users that join organization `key` (whose answer's `organization` is
    /// it), as [`StateStore::list_users`]; `None` for an unknown organization.
    pub fn members(&self, key: &str, after: Option<&str>, limit: usize) -> Option<Page> {
        let name = {
            let maps = self.read();
            let name = maps.organizations.get(key)?.join()?.to_owned();
            // Of two keys with one name, users join the smallest.
            let joins = maps
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

    /// From now on, entries written are tagged as rendered by reducer `id`.
    pub fn set_renderer(&self, id: u32) {
        self.renderer.store(id, Ordering::Relaxed);
    }

    /// How many visible answers there are, and how many reducer `id` rendered.
    pub fn answers(&self, id: u32) -> Answers {
        let maps = self.read();
        Answers {
            total: maps.answers.values().sum(),
            by_it: maps.answers.get(&id).copied().unwrap_or(0),
        }
    }

    /// Takes over `other`'s contents in one step: readers see all of the old state
    /// or all of the new, never a mix.
    pub fn replace(&self, other: StateStore) {
        self.set_renderer(other.renderer.load(Ordering::Relaxed));
        let new = other.maps.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut maps = self.write();
        // Running exports cannot finish at their position on another state.
        for image in maps.images.drain(..).filter_map(|i| i.upgrade()) {
            image.break_off();
        }
        *maps = new;
        drop(maps);
        self.feed.replaced();
    }

    /// Every stored entity as (entity, update, whether reducer `current` rendered it):
    /// what a snapshot keeps. Taken under one read lock, so it is one consistent state.
    pub fn dump(&self, current: u32) -> Vec<(Entity, Update, bool)> {
        let maps = self.read();
        let entry = |kind: Kind, key: &str, e: &Entry| {
            (
                Entity {
                    kind,
                    key: key.to_string(),
                },
                e.update(),
                e.by == current,
            )
        };
        let users = maps.users.iter().map(|(k, e)| entry(Kind::User, k, e));
        let orgs = maps
            .organizations
            .iter()
            .map(|(k, e)| entry(Kind::Organization, k, e));
        users.chain(orgs).collect()
    }

    /// A store holding exactly `entities` (what [`StateStore::dump`] gave), those
    /// rendered by the dump's reducer tagged `current`, the others [`EARLIER`]; it
    /// goes on writing as `current`.
    pub fn from_dump(entities: Vec<(Entity, Update, bool)>, current: u32) -> Self {
        let store = Self::new();
        let (mine, earlier): (Vec<_>, Vec<_>) = entities.into_iter().partition(|e| e.2);
        for (tag, list) in [(EARLIER, earlier), (current, mine)] {
            store.set_renderer(tag);
            let (keys, updates): (Vec<Entity>, Vec<Update>) =
                list.into_iter().map(|(e, u, _)| (e, u)).unzip();
            store.apply(&keys, updates);
        }
        store
    }

    /// The answer for user `id`: its view joined with its organization's.
    pub fn user(&self, id: &str) -> Option<String> {
        self.read().user_answer(id)
    }

    /// The answer for organization `key`.
    pub fn organization(&self, key: &str) -> Option<String> {
        self.read()
            .organizations
            .get(key)?
            .view()
            .map(str::to_owned)
    }

    /// How much is stored.
    pub fn sizes(&self) -> Sizes {
        // Before the maps' lock: `subscribe` takes the feed's lock, then the maps'.
        let (subscribers, subscribers_dropped) = self.subscribers();
        let maps = self.read();
        Sizes {
            users_visible: maps.users_visible,
            users_stored: maps.users.len(),
            organizations: maps.organizations.len(),
            user_bytes: maps.user_bytes,
            tombstones: maps.tombstones.len(),
            tombstones_expired: self.expired.load(Ordering::Relaxed),
            clock: maps.clock,
            subscribers,
            subscribers_dropped,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        // A panic while holding the lock cannot leave the maps half-updated in a way
        // that matters more than stopping service would, so poison is ignored.
        self.maps.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl States for StateStore {
    /// Lends the states under one read lock: a batch sees one consistent state.
    fn states(&self, entities: &[Entity], each: &mut dyn FnMut(Option<&[u8]>)) {
        let maps = self.read();
        for e in entities {
            each(maps.map(e.kind).get(e.key.as_str()).map(|e| &*e.state));
        }
    }
}

impl Target for StateStore {
    fn apply(&self, entities: Vec<Entity>, updates: Vec<Update>) {
        StateStore::apply(self, &entities, updates);
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

impl Maps {
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

    /// Saves user `key`'s entry for every running export, before it changes.
    fn preserve_for_exports(&mut self, key: &str) {
        if self.images.is_empty() {
            return;
        }
        let Some(old) = self.users.get(key) else {
            return;
        };
        self.images
            .retain(|i| i.upgrade().map(|image| image.preserve(key, old)).is_some());
    }

    /// The answer for user `id`: its view joined with its organization's.
    fn user_answer(&self, id: &str) -> Option<String> {
        let entry = self.users.get(id)?;
        let view = entry.view()?;
        let org = entry
            .join()
            .and_then(|name| self.by_name.get(name))
            .and_then(|keys| keys.first())
            .and_then(|key| self.organizations.get(key))
            .and_then(Entry::view);
        // Copying a few hundred bytes under the read lock is cheaper than sharing
        // pointers to them; the writer holds the lock only to swap a batch in.
        Some(join_view(view, org))
    }

    /// Keeps the tombstone index right as user `key`'s entry becomes `new`.
    fn track_tombstone(&mut self, key: &str, new: Option<&Entry>) {
        let old = self.users.get(key).and_then(Entry::tombstone);
        let new = new.and_then(Entry::tombstone);
        if old == new {
            return;
        }
        if let Some(c) = old {
            self.tombstones.remove(&(c, Box::from(key)));
        }
        if let Some(c) = new {
            self.tombstones.insert((c, Box::from(key)));
        }
    }

    /// Forgets every tombstone whose clock is more than `retention` behind the clock;
    /// returns how many.
    fn expire(&mut self, retention: i64) -> u64 {
        let Some(clock) = self.clock else { return 0 };
        let horizon = clock.saturating_sub(retention);
        let mut n = 0;
        while self.tombstones.first().is_some_and(|(c, _)| *c < horizon) {
            let Some((_, key)) = self.tombstones.pop_first() else {
                break;
            };
            // The index only holds current tombstones (see `track_tombstone`).
            self.preserve_for_exports(&key);
            let gone = self.users.remove(&key).map(|e| e.weight(&key));
            self.reweigh(gone, None);
            n += 1;
        }
        n
    }

    fn map(&self, kind: Kind) -> &HashMap<Box<str>, Entry> {
        match kind {
            Kind::User => &self.users,
            Kind::Organization => &self.organizations,
        }
    }

    /// One visible answer less by `gone`'s renderer, one more by `came`'s.
    fn count(&mut self, gone: Option<u32>, came: Option<u32>) {
        if let Some(by) = gone
            && let Some(n) = self.answers.get_mut(&by)
        {
            *n -= 1;
            if *n == 0 {
                self.answers.remove(&by);
            }
        }
        if let Some(by) = came {
            *self.answers.entry(by).or_default() += 1;
        }
    }

    /// Stores (or forgets) an organization; returns the renderers of the visible
    /// answer it replaced and of the one it stored.
    fn put_organization(
        &mut self,
        key: Box<str>,
        new: Option<Entry>,
    ) -> (Option<u32>, Option<u32>) {
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
                let old = self.organizations.insert(key.clone(), entry);
                let gone = old.as_ref().and_then(Entry::answer_by);
                (
                    old.as_ref()
                        .and_then(name_of)
                        .filter(|n| Some(n) != name.as_ref()),
                    gone,
                )
            }
            None => {
                let old = self.organizations.remove(&key);
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
        let store = StateStore::new();
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
    fn renamed_organization_leaves_its_old_name() {
        let store = StateStore::new();
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
        let store = StateStore::new();
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
        let store = StateStore::new();
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
        let restored = StateStore::from_dump(store.dump(2), 7);
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
        assert!(store.read().answers.is_empty(), "no zero counts kept");
    }

    #[test]
    fn invisible_and_forgotten_users_are_not_found() {
        let store = StateStore::new();
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
        let store = StateStore::new();
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
            store.read().users.contains_key("old"),
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
        let maps = store.read();
        maps.users.iter().fold((0, 0), |(n, bytes), (k, e)| {
            (
                n + usize::from(e.view.is_some()),
                bytes + k.len() + e.state.len(),
            )
        })
    }

    #[test]
    fn kept_counts_equal_a_recount_through_creates_updates_deletes_and_expiry() {
        let store = StateStore::new();
        store.set_retention(HOUR);
        let mut seed = 0x5eed_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
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
        let store = StateStore::new();
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
        let store = StateStore::new();
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
        let store = StateStore::new();
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

    #[test]
    fn a_restored_store_keeps_clocks_so_its_tombstones_still_expire() {
        let store = StateStore::new();
        store.apply(&[entity(Kind::User, "gone")], vec![at(None, T0)]);
        let restored = StateStore::from_dump(store.dump(1), 1);
        restored.set_retention(HOUR);
        assert_eq!(restored.sizes().tombstones, 1);
        restored.apply(
            &[entity(Kind::User, "x")],
            vec![at(Some("{}"), T0 + 2 * HOUR)],
        );
        assert_eq!(restored.sizes().users_stored, 1);
    }
}
