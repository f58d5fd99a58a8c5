//! A consistent export: every visible user and organization at one position, streamed
//! without stopping ingest and without copying the state.
//!
//! How it stays consistent: the export is begun by the one writer between two batches
//! ([`super::Writer::serve_exports`]), when the state is exactly at the loop's position.
//! It then copies only each shard's user *slots* (4 bytes a user, under the shard's
//! lock: a few milliseconds at a million users) and the organizations' answers (few);
//! the ids are read from those slots off the writer's thread, and the entries from the
//! live store as the stream goes, in chunks under short read locks. The writer,
//! before it changes or forgets a user that existed when the export began, saves the
//! old entry into the export's image (once per user): what the stream reads for that
//! user. While an image lives, its shards free no slot for reuse (see
//! `Users::pin`), so the slots it copied go on naming the same users. So the cost of
//! an export is the slots, the ids, and the users changed while it runs, never the
//! whole state.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::broker::Positions;

use logq_abi::{Entity, Kind, Update};

use super::{Entry, EntryRef, StateStore, Writer, join_view};

/// Most exports running at once (each costs the writer a little per change).
pub const MAX_EXPORTS: usize = 4;
/// Users rendered per read lock.
const CHUNK: usize = 512;
/// Frozen users read per read lock (a few microseconds' hold: a reader preempted
/// while it holds the lock stalls the writer until it runs again).
const FROZEN_PER_LOCK: usize = 32;

/// User keys packed in one buffer, each a range of it: a million of them are one
/// growing buffer and a `memcpy` a key, not a million allocations.
#[derive(Debug, Default)]
pub struct Keys {
    text: String,
    ranges: Vec<(usize, usize)>,
}

impl Keys {
    /// Adds `key`.
    pub fn push(&mut self, key: &str) {
        let start = self.text.len();
        self.text.push_str(key);
        self.ranges.push((start, self.text.len()));
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Key `i`.
    pub fn get(&self, i: usize) -> &str {
        let (start, end) = self.ranges[i];
        &self.text[start..end]
    }

    /// The keys in their order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.ranges.iter().map(|&(s, e)| &self.text[s..e])
    }

    /// Puts the keys in order.
    pub fn sort(&mut self) {
        let text = &self.text;
        self.ranges
            .sort_unstable_by(|a, b| text[a.0..a.1].cmp(&text[b.0..b.1]));
    }
}

/// Old entries saved for a running export.
#[derive(Debug, Default)]
pub(super) struct Image {
    saved: Mutex<HashMap<Box<str>, Entry>>,
    /// The store was replaced (a replay handed over, a snapshot restored): the export
    /// cannot finish at its position.
    replaced: AtomicBool,
}

impl Image {
    /// Keeps `old` as user `key`'s entry at the export's position, unless kept already.
    pub(super) fn preserve(&self, key: &str, old: &EntryRef<'_>) {
        let mut saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        if !saved.contains_key(key) {
            saved.insert(key.into(), old.to_entry());
        }
    }

    pub(super) fn break_off(&self) {
        self.replaced.store(true, Ordering::Relaxed);
    }
}

/// An export begun at one position.
#[derive(Debug)]
pub struct Export {
    store: Arc<StateStore>,
    /// The position it reflects.
    pub position: Positions,
    /// Per shard, the slots of the users kept at the position (the shard keeps
    /// them pinned while the image lives).
    slots: Vec<Vec<u32>>,
    /// Their ids, read on first use (off the writer's thread); in order once
    /// [`Export::sort`] ran.
    users: OnceLock<Keys>,
    /// Organization keys and answers at the position, in key order.
    organizations: Vec<(Box<str>, String)>,
    /// organization name -> the answer users of that name join, at the position.
    joins: HashMap<Box<str>, String>,
    image: Arc<Image>,
    next: usize,
    organizations_sent: bool,
    users_sent: usize,
    ended: bool,
}

/// Why an export stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The state was replaced under it.
    #[error("the state was replaced while the export ran (a replay handed over); start it again")]
    Replaced,
}

impl Export {
    /// The next lines (NDJSON, one `{"user": ...}` or `{"organization": ...}` per
    /// line, then one `{"end": {"users": N, "organizations": M}}`), or `None` when
    /// everything was sent.
    ///
    /// # Errors
    /// When the store was replaced while the export ran.
    pub fn next_chunk(&mut self) -> Option<Result<String, ExportError>> {
        if self.image.replaced.load(Ordering::Relaxed) {
            return Some(Err(ExportError::Replaced));
        }
        let users = self.user_keys();
        if self.next < users.len() {
            let end = (self.next + CHUNK).min(users.len());
            let mut out = String::new();
            let mut sent = 0;
            for i in self.next..end {
                let Some(answer) = self.user(users.get(i)) else {
                    continue;
                };
                out.push_str("{\"user\":");
                out.push_str(&answer);
                out.push_str("}\n");
                sent += 1;
            }
            self.users_sent += sent;
            self.next = end;
            return Some(Ok(out));
        }
        if !self.organizations_sent {
            self.organizations_sent = true;
            let mut out = String::new();
            for (_, o) in &self.organizations {
                out.push_str("{\"organization\":");
                out.push_str(o);
                out.push_str("}\n");
            }
            return Some(Ok(out));
        }
        if !self.ended {
            self.ended = true;
            return Some(Ok(format!(
                "{{\"end\":{{\"users\":{},\"organizations\":{}}}}}\n",
                self.users_sent,
                self.organizations.len()
            )));
        }
        None
    }
}

impl Export {
    /// User `key`'s answer at the position (joined as it was then); `None` when it
    /// was not visible.
    pub fn user(&self, key: &str) -> Option<String> {
        // The shard's lock before the image's, as the writer takes them (it saves an
        // old entry while it holds the shard).
        let shard = self.store.read_shard(key);
        let saved = self.image.saved.lock().unwrap_or_else(|p| p.into_inner());
        let entry = saved
            .get(key)
            .map(Entry::get)
            .or_else(|| shard.users.get(key))?;
        let view = entry.view()?;
        let org = entry
            .join()
            .and_then(|name| self.joins.get(name))
            .map(String::as_str);
        Some(join_view(view, org))
    }

    /// Every user key kept at the position (visible or not), in order once
    /// [`Export::sort`] ran. The first call reads them (O(users)).
    pub fn user_keys(&self) -> &Keys {
        self.users.get_or_init(|| {
            let mut keys = Keys::default();
            self.each_frozen(|key, _| keys.push(key));
            keys
        })
    }

    /// `f(id, entry at the position)` for every user frozen, shard by shard, a
    /// few hundred under each read lock (the writer goes on between). Stops when the
    /// store was replaced: the slots would name another store's users (the flag is
    /// raised under every shard's write lock, so it is seen before any of them).
    fn each_frozen(&self, mut f: impl FnMut(&str, EntryRef<'_>)) {
        for (i, slots) in self.slots.iter().enumerate() {
            for part in slots.chunks(FROZEN_PER_LOCK) {
                let shard = super::read(&self.store.shards[i]);
                if self.replaced() {
                    return;
                }
                let saved = self.image.saved.lock().unwrap_or_else(|p| p.into_inner());
                for &slot in part {
                    // A forgotten user's id and block stay while the slot is pinned.
                    let key = shard.users.key(slot);
                    let entry = saved
                        .get(key)
                        .map_or_else(|| shard.users.entry(slot), Entry::get);
                    f(key, entry);
                }
            }
        }
    }

    /// The organizations' keys and answers at the position, in key order.
    pub fn organizations(&self) -> &[(Box<str>, String)] {
        &self.organizations
    }

    /// Whether the store was replaced since the position (the image is void).
    pub fn replaced(&self) -> bool {
        self.image.replaced.load(Ordering::Relaxed)
    }

    /// Puts the user keys in order: [`super::Writer::image`] leaves that to its caller,
    /// off the writer's thread.
    pub fn sort(&mut self) {
        self.user_keys();
        if let Some(keys) = self.users.get_mut() {
            keys.sort();
        }
    }
}

/// The whole state frozen at one position for a snapshot. The writer freezes it
/// between two batches as it begins an export (copying the users' slots, not their
/// ids or states: where copying every entity held the loop for 440 ms at a million
/// users); another thread then reads the entities out while the writer goes on.
#[derive(Debug)]
pub struct Frozen {
    users: Export,
    /// The organizations' entities (few: copied whole).
    organizations: Vec<(Entity, Update, bool)>,
    /// The renderer of the active reducer at the position.
    current: u32,
}

/// One entity as a snapshot holds it, borrowed: from the store, or from an
/// [`Entity`] and its [`Update`].
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    /// User or organization.
    pub kind: Kind,
    /// Its key.
    pub key: &'a str,
    /// Its state.
    pub state: Option<&'a [u8]>,
    /// Its view's range in the state.
    pub view: Option<&'a Range<u32>>,
    /// Its join's range in the state.
    pub join: Option<&'a Range<u32>>,
    /// Its newest event time.
    pub clock: Option<i64>,
    /// Whether the active reducer rendered it.
    pub mine: bool,
}

impl<'a> Part<'a> {
    /// The parts of `entity` with `update`.
    pub fn of(entity: &'a Entity, update: &'a Update, mine: bool) -> Self {
        Self {
            kind: entity.kind,
            key: &entity.key,
            state: update.state.as_deref(),
            view: update.view.as_ref(),
            join: update.join.as_ref(),
            clock: update.clock,
            mine,
        }
    }
}

impl Frozen {
    /// How many entities were stored at the position.
    pub fn len(&self) -> usize {
        self.users.slots.iter().map(Vec::len).sum::<usize>() + self.organizations.len()
    }

    /// Whether none were.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `f` of the kind and key of every entity stored at the position, in the order
    /// [`Frozen::each`] gives them (a split snapshot counts each file's entities
    /// first: its header says how many).
    pub(super) fn each_key(&self, mut f: impl FnMut(Kind, &str)) {
        self.users.each_frozen(|key, _| f(Kind::User, key));
        for (entity, _, _) in &self.organizations {
            f(entity.kind, &entity.key);
        }
    }

    /// `f` of every entity stored at the position (users, then organizations),
    /// borrowed from the store: nothing is copied. [`Frozen::len`] calls in all,
    /// unless the store was replaced meanwhile.
    ///
    /// # Errors
    /// When the store was replaced meanwhile (a handover): the position no longer
    /// describes what could be read, and what was given is to be thrown away.
    pub(super) fn each(self, mut f: impl FnMut(Part<'_>)) -> Result<(), ExportError> {
        let current = self.current;
        self.users.each_frozen(|key, e| {
            f(Part {
                kind: Kind::User,
                key,
                state: Some(e.state()),
                view: e.view.as_ref(),
                join: e.join.as_ref(),
                clock: e.clock,
                mine: e.by == current,
            });
        });
        // Replaced under the shards' write locks, so any entry read from a new store
        // was read after the flag went up.
        if self.users.replaced() {
            return Err(ExportError::Replaced);
        }
        for (entity, u, mine) in &self.organizations {
            f(Part::of(entity, u, *mine));
        }
        Ok(())
    }

    /// Every entity stored at the position, as [`StateStore::dump`] gives them then
    /// (for tests: a snapshot encodes them straight from the store).
    ///
    /// # Errors
    /// When the store was replaced meanwhile, as [`Frozen::each`].
    #[cfg(test)]
    pub fn entities(self) -> Result<Vec<(Entity, Update, bool)>, ExportError> {
        let mut out = Vec::with_capacity(self.len());
        self.each(|p| {
            let entity = Entity {
                kind: p.kind,
                key: p.key.to_string(),
            };
            let update = Update {
                state: p.state.map(<[u8]>::to_vec),
                view: p.view.cloned(),
                join: p.join.cloned(),
                clock: p.clock,
            };
            out.push((entity, update, p.mine));
        })?;
        Ok(out)
    }
}

/// An export asked for, waiting for the writer.
pub(super) type Pending = tokio::sync::oneshot::Sender<Export>;

impl StateStore {
    /// Asks for an export; the one writer begins it between two batches. `None` when
    /// [`MAX_EXPORTS`] are already running.
    pub fn request_export(&self) -> Option<tokio::sync::oneshot::Receiver<Export>> {
        // Every shard holds every running export's image: the first one says.
        let running = super::read(&self.shards[0])
            .images
            .iter()
            .filter(|i| i.strong_count() > 0)
            .count();
        let mut pending = self
            .pending_exports
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if running + pending.len() >= MAX_EXPORTS {
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        pending.push(tx);
        Some(rx)
    }
}

impl Writer {
    /// Begins the exports asked for, at `position`: called by the one writer between
    /// two batches, when the state is exactly there (and, being the writer's thread,
    /// nothing changes it meanwhile). See [`Writer::image`] for what it copies.
    /// Returns whether any export was waiting.
    pub fn serve_exports(&self, position: &Positions) -> bool {
        let waiting: Vec<Pending> = {
            let mut pending = self
                .pending_exports
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if pending.is_empty() {
                return false;
            }
            std::mem::take(&mut *pending)
        };
        for tx in waiting {
            // Unsorted: its reader sorts the keys, off this thread.
            let export = self.image(position);
            // A client that went away meanwhile: its export is dropped here.
            let _ = tx.send(export);
        }
        true
    }

    /// Freezes the state at `position` for a snapshot of the entities that reducer
    /// `current` rendered: called by the one writer between two batches, like
    /// [`Writer::image`], whose cost it has.
    pub fn freeze(&self, position: &Positions, current: u32) -> Frozen {
        Frozen {
            users: self.image(position),
            organizations: self.organization_entities(current),
            current,
        }
    }

    /// Freezes the answers at `position`: from now on, until the returned export is
    /// dropped, the writer saves the old entry of each user it changes or forgets.
    /// Called by the one writer between two batches, when the state is exactly at
    /// `position` (so nothing changes it meanwhile). Copies each shard's user slots
    /// (4 bytes a user; the ids are read later, see [`Export::user_keys`] and
    /// [`Export::sort`]) and the organizations' answers.
    pub fn image(&self, position: &Positions) -> Export {
        let image = Arc::new(Image::default());
        let mut slots = Vec::with_capacity(self.shards.len());
        for shard in self.shards.iter() {
            let mut shard = super::write(shard);
            shard.images.retain(|i| i.strong_count() > 0);
            shard.images.push(Arc::downgrade(&image));
            shard.users.pin(true);
            slots.push(shard.users.slot_ids());
        }
        let (organizations, joins) = {
            let orgs = self.read_organizations();
            let answers: BTreeMap<&str, &str> = orgs
                .entries
                .iter()
                .filter_map(|(k, e)| Some((k.as_ref(), e.view()?)))
                .collect();
            let joins: HashMap<Box<str>, String> = orgs
                .by_name
                .keys()
                .filter_map(|name| Some((name.clone(), orgs.joined(name)?.to_owned())))
                .collect();
            (
                answers
                    .into_iter()
                    .map(|(k, v)| (Box::from(k), v.to_owned()))
                    .collect::<Vec<_>>(),
                joins,
            )
        };
        Export {
            store: Arc::clone(&self.0),
            position: position.clone(),
            slots,
            users: OnceLock::new(),
            organizations,
            joins,
            image,
            next: 0,
            organizations_sent: false,
            users_sent: 0,
            ended: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Writer;
    use crate::state::test_update;
    use logq_abi::{Entity, Kind};

    fn user(id: &str, name: &str) -> (Entity, logq_abi::Update) {
        (
            Entity {
                kind: Kind::User,
                key: id.into(),
            },
            test_update(
                Some(&format!(r#"{{"id":"{id}","v":"{name}"}}"#)),
                Some("MGS"),
            ),
        )
    }

    fn apply(store: &Writer, items: Vec<(Entity, logq_abi::Update)>) {
        let (keys, updates): (Vec<_>, Vec<_>) = items.into_iter().unzip();
        store.apply(&keys, updates);
    }

    fn drain(mut export: Export) -> Result<String, ExportError> {
        let mut out = String::new();
        while let Some(chunk) = export.next_chunk() {
            out.push_str(&chunk?);
        }
        Ok(out)
    }

    fn begin(store: &Writer) -> Export {
        let mut rx = store.request_export().expect("room for an export");
        store.serve_exports(&Positions::new());
        let mut export = rx.try_recv().expect("begun by serve_exports");
        // As `GET /export` does, off the writer's thread.
        export.sort();
        export
    }

    #[test]
    fn an_export_shows_the_state_it_began_at_whatever_changes_meanwhile() {
        let store = Writer::new_store();
        let mut users: Vec<_> = (0..1500)
            .map(|i| user(&format!("u{i:04}"), "old"))
            .collect();
        users.push((
            Entity {
                kind: Kind::Organization,
                key: "k".into(),
            },
            test_update(
                Some(r#"{"organization_key":"k","tier":"old"}"#),
                Some("MGS"),
            ),
        ));
        apply(&store, users);
        let export = begin(&store);
        // Meanwhile: updates (some twice), a deletion, a new user, a new tier.
        apply(
            &store,
            (0..1500)
                .step_by(7)
                .map(|i| user(&format!("u{i:04}"), "new"))
                .collect(),
        );
        apply(&store, vec![user("u0000", "newer"), user("zzz", "new")]);
        apply(
            &store,
            vec![(
                Entity {
                    kind: Kind::User,
                    key: "u0001".into(),
                },
                logq_abi::Update {
                    state: None,
                    view: None,
                    join: None,
                    clock: None,
                },
            )],
        );
        apply(
            &store,
            vec![(
                Entity {
                    kind: Kind::Organization,
                    key: "k".into(),
                },
                test_update(
                    Some(r#"{"organization_key":"k","tier":"new"}"#),
                    Some("MGS"),
                ),
            )],
        );
        let text = drain(export).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.len(),
            1500 + 1 + 1,
            "users, the organization, the end line"
        );
        assert!(
            lines[0].contains(r#""id":"u0000","v":"old""#),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("u0001"),
            "a user deleted meanwhile is still there"
        );
        assert!(
            text.lines()
                .all(|l| !l.contains("\"new") && !l.contains("zzz")),
            "nothing from after"
        );
        assert!(
            lines[0].contains(r#""tier":"old""#),
            "joined with the organization as it was"
        );
        assert_eq!(lines[1501], r#"{"end":{"users":1500,"organizations":1}}"#);
        // The export is over: no shard keeps its image alive.
        assert!(store.shards.iter().all(|s| {
            let shard = crate::state::read(s);
            shard.images.iter().all(|i| i.strong_count() == 0)
        }));
    }

    /// `entities` in one order, for comparing.
    fn sorted(mut entities: Vec<(Entity, logq_abi::Update, bool)>) -> Vec<String> {
        entities.sort_by(|a, b| (a.0.kind as u8, &a.0.key).cmp(&(b.0.kind as u8, &b.0.key)));
        entities.iter().map(|e| format!("{e:?}")).collect()
    }

    #[test]
    fn a_frozen_state_reads_out_as_the_dump_at_its_position_whatever_changes_meanwhile() {
        let store = Writer::new_store();
        let mut rng = 0x9e37_79b9_u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut users: Vec<_> = (0..20_000)
            .map(|i| user(&format!("u{i:05}"), "old"))
            .collect();
        users.push((
            Entity {
                kind: Kind::Organization,
                key: "k".into(),
            },
            test_update(Some(r#"{"organization_key":"k","tier":"old"}"#), None),
        ));
        apply(&store, users);
        // One user a tombstone: stored, not visible.
        apply(
            &store,
            vec![(
                Entity {
                    kind: Kind::User,
                    key: "u00007".into(),
                },
                test_update(None, None),
            )],
        );
        let before = store.dump(1);
        let frozen = store.freeze(&Positions::new(), 1);
        // Meanwhile: updates (some users twice), deletions, new users, and users
        // forgotten (the writer's upkeep compacts and purges as it goes).
        for round in 0..4 {
            let changed: Vec<_> = (0..3000)
                .map(|_| {
                    let i = next(21_000);
                    let v = if next(5) == 0 { "gone" } else { "new" };
                    (i, v)
                })
                .collect();
            apply(
                &store,
                changed
                    .iter()
                    .map(|(i, v)| {
                        let key = format!("u{i:05}");
                        if *v == "gone" {
                            let none = logq_abi::Update {
                                state: None,
                                view: None,
                                join: None,
                                clock: None,
                            };
                            (
                                Entity {
                                    kind: Kind::User,
                                    key,
                                },
                                none,
                            )
                        } else {
                            user(&key, &format!("{v}{round}"))
                        }
                    })
                    .collect(),
            );
            // A quarter of the users each round: enough for purges (and their slots
            // reused by the next round's new users) were the slots not pinned.
            let n = store.forget_users(|k| {
                k.bytes()
                    .last()
                    .is_some_and(|d| u64::from(d - b'0') % 4 == round)
            });
            assert!(n > 0, "round {round} forgot users");
        }
        let after = store.dump(1);
        assert_ne!(
            sorted(after),
            sorted(before.clone()),
            "the state did change"
        );
        assert_eq!(
            sorted(frozen.entities().unwrap()),
            sorted(before),
            "the frozen state is the state at its position"
        );
    }

    #[test]
    fn a_frozen_state_replaced_meanwhile_reads_out_as_an_error() {
        let store = Writer::new_store();
        apply(&store, vec![user("a", "x")]);
        let frozen = store.freeze(&Positions::new(), 1);
        store.replace(Writer::new_store());
        assert!(matches!(frozen.entities(), Err(ExportError::Replaced)));
    }

    #[test]
    fn exports_are_bounded_and_cut_short_by_a_replaced_state() {
        let store = Writer::new_store();
        apply(&store, vec![user("a", "x")]);
        let export = begin(&store);
        store.replace(Writer::new_store());
        let e = drain(export).unwrap_err();
        assert!(e.to_string().contains("replaced"), "{e}");
        let running: Vec<_> = (0..MAX_EXPORTS)
            .map(|_| store.request_export().unwrap())
            .collect();
        assert!(store.request_export().is_none(), "at most {MAX_EXPORTS}");
        drop(running);
    }
}
