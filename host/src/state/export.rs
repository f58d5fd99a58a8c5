//! A consistent export: every visible user and organization at one position, streamed
//! without stopping ingest and without copying the state.
//!
//! How it stays consistent: the export is begun by the one writer between two batches
//! ([`super::Writer::serve_exports`]), when the state is exactly at the loop's position.
//! It then copies only the user *keys* (about 40 bytes a user) and the organizations'
//! answers (few); user entries are read from the live store as the stream goes, in
//! chunks under short read locks. The writer, before it changes or forgets a user
//! that existed when the export began, saves the old entry into the export's image
//! (once per user): what the stream reads for that user. So the cost of an export is
//! the keys plus the users changed while it runs, never the whole state.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::broker::Positions;

use super::{Entry, EntryRef, StateStore, Writer, join_view};

/// Most exports running at once (each costs the writer a little per change).
pub const MAX_EXPORTS: usize = 4;
/// Users rendered per read lock.
const CHUNK: usize = 512;

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
    /// Every user key at the position, in order (once [`Export::sort`] ran).
    users: Vec<Box<str>>,
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
        if self.next < self.users.len() {
            let end = (self.next + CHUNK).min(self.users.len());
            let mut out = String::new();
            for key in &self.users[self.next..end] {
                let Some(answer) = self.user(key) else {
                    continue;
                };
                out.push_str("{\"user\":");
                out.push_str(&answer);
                out.push_str("}\n");
                self.users_sent += 1;
            }
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

    /// Every user key kept at the position (visible or not), in order.
    pub fn user_keys(&self) -> &[Box<str>] {
        &self.users
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
        self.users.sort_unstable();
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
    /// nothing changes it meanwhile). Collects the user keys and the organizations
    /// under a read lock, so GETs go on (O(users), no state copied).
    pub fn serve_exports(&self, position: &Positions) {
        let waiting: Vec<Pending> = {
            let mut pending = self
                .pending_exports
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if pending.is_empty() {
                return;
            }
            std::mem::take(&mut *pending)
        };
        for tx in waiting {
            let mut export = self.image(position);
            export.sort();
            // A client that went away meanwhile: its export is dropped here.
            let _ = tx.send(export);
        }
    }

    /// Freezes the answers at `position`: from now on, until the returned export is
    /// dropped, the writer saves the old entry of each user it changes or forgets.
    /// Called by the one writer between two batches, when the state is exactly at
    /// `position` (so nothing changes it meanwhile). Copies the user keys (unsorted:
    /// see [`Export::sort`]) and the organizations under read locks, so GETs go on.
    pub fn image(&self, position: &Positions) -> Export {
        let image = Arc::new(Image::default());
        for shard in self.shards.iter() {
            let mut shard = super::write(shard);
            shard.images.retain(|i| i.strong_count() > 0);
            shard.images.push(Arc::downgrade(&image));
        }
        let users = self.user_keys();
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
            users,
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
        rx.try_recv().expect("begun by serve_exports")
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
