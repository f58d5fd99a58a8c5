//! Live changes: what each batch changed, for `GET /changes` and
//! `GET /users/{id}/watch`.
//!
//! The one writer records which entities a batch touched; when it publishes the
//! batch's position it renders their answers (users joined with their organization)
//! into one [`ChangeBatch`], keeps it in a bounded window for resuming, and offers it
//! to every subscriber without waiting: a subscriber whose queue is full is dropped
//! with a reason and never slows ingest. Nothing is recorded until the first
//! subscription, so a host nobody watches pays nothing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use logq_abi::Kind;

use crate::broker::Positions;

use super::StateStore;

/// Most subscribers at once (watchers and `/changes` streams together).
pub const MAX_SUBSCRIBERS: usize = 256;
/// Batches waiting for one subscriber before it is dropped as too slow.
pub const QUEUE_BATCHES: usize = 256;
/// Changes kept for resuming (`Last-Event-ID`); older batches fall out of the window.
pub const WINDOW_CHANGES: usize = 100_000;

/// One entity's new answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// User or organization.
    pub kind: Kind,
    /// Its key.
    pub key: Box<str>,
    /// Its answer now (a user joined with its organization); `None`: not visible any
    /// more (deleted).
    pub answer: Option<String>,
    /// For an organization: its name (what users join on).
    pub name: Option<Box<str>>,
}

/// What one batch changed, and the position after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeBatch {
    /// The position after the batch.
    pub position: Positions,
    /// The entities whose answer changed, in the order first touched.
    pub changes: Vec<Change>,
}

/// Which changes a subscriber gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// Every change.
    All,
    /// Batches that change this user or any organization (it may join it).
    User(Box<str>),
}

impl Filter {
    fn wants(&self, batch: &ChangeBatch) -> bool {
        match self {
            Filter::All => true,
            Filter::User(id) => batch
                .changes
                .iter()
                .any(|c| c.kind == Kind::Organization || (c.kind == Kind::User && c.key == *id)),
        }
    }
}

/// Why a subscription ended early, once it has.
pub type Dropped = Arc<Mutex<Option<String>>>;

struct Subscriber {
    filter: Filter,
    tx: tokio::sync::mpsc::Sender<Arc<ChangeBatch>>,
    dropped: Dropped,
}

/// A subscription, taken at one point: what was missed (for a resume), then live.
pub struct Subscription {
    /// Batches after the resume point still in the window (oldest first).
    pub backlog: Vec<Arc<ChangeBatch>>,
    /// When the resume point is outside the window: why (the client missed changes
    /// and must start from the current state).
    pub reset: Option<String>,
    /// Live batches from here on.
    pub live: tokio::sync::mpsc::Receiver<Arc<ChangeBatch>>,
    /// Set (with the reason) when the subscriber is dropped as too slow.
    pub dropped: Dropped,
    /// The position the subscription starts at.
    pub position: Positions,
    /// For a user watch: the user's answer at that position.
    pub current: Option<String>,
}

/// The feed (inside [`StateStore`]).
#[derive(Default)]
pub(super) struct Feed {
    /// Recording since the first subscription.
    pub(super) enabled: AtomicBool,
    inner: Mutex<Inner>,
    /// Subscribers dropped as too slow, since start.
    pub(super) dropped_total: AtomicU64,
}

#[derive(Default)]
struct Inner {
    window: VecDeque<Arc<ChangeBatch>>,
    window_changes: usize,
    /// The position before the oldest batch of the window: a resume from at least
    /// here misses nothing.
    floor: Option<Positions>,
    /// The position at which the whole state was last replaced: changes from before
    /// it cannot be resumed (every answer may have changed).
    rebuilt_at: Option<Positions>,
    subscribers: Vec<Subscriber>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

/// Whether `a` is at or before `b` in every partition `a` names.
fn at_or_before(a: &Positions, b: &Positions) -> bool {
    a.iter().all(|(p, o)| b.get(p).is_some_and(|x| o <= x))
}

impl Feed {
    /// Keeps `batch` for resuming and offers it to every subscriber that wants it.
    fn publish(&self, batch: ChangeBatch) {
        let batch = Arc::new(batch);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.window_changes += batch.changes.len();
        inner.window.push_back(batch.clone());
        while inner.window_changes > WINDOW_CHANGES && inner.window.len() > 1 {
            if let Some(old) = inner.window.pop_front() {
                inner.window_changes -= old.changes.len();
                inner.floor = Some(old.position.clone());
            }
        }
        let mut dropped = 0;
        inner.subscribers.retain(|s| {
            if !s.filter.wants(&batch) {
                return !s.tx.is_closed();
            }
            match s.tx.try_send(batch.clone()) {
                Ok(()) => true,
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    *s.dropped.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                        "too slow: {QUEUE_BATCHES} batches of changes were waiting; reconnect with Last-Event-ID to resume"
                    ));
                    dropped += 1;
                    false
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        self.dropped_total.fetch_add(dropped, Ordering::Relaxed);
    }

    /// The whole state was replaced at `position` (a replay handed over, a snapshot
    /// restored): every answer may have changed at once, so subscribers are ended
    /// with the reason and the window is emptied (a resume from before is told to
    /// start again, and why).
    pub(super) fn replaced(&self, position: Positions) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.rebuilt_at = Some(position);
        for s in inner.subscribers.drain(..) {
            *s.dropped.lock().unwrap_or_else(|p| p.into_inner()) = Some(
                "the state was rebuilt (a replay or rollback handed over): every answer may have changed; start again from the current state".into(),
            );
        }
        inner.window.clear();
        inner.window_changes = 0;
        inner.floor = None;
    }

    fn subscribers(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .subscribers
            .iter()
            .filter(|s| !s.tx.is_closed())
            .count()
    }
}

impl StateStore {
    /// Subscribes to changes from now on; with `resume_from` (a position from an
    /// earlier event), first the batches after it that are still in the window, or a
    /// `reset` reason when it is outside. `Err` when [`MAX_SUBSCRIBERS`] are taken.
    ///
    /// # Errors
    /// Too many subscribers, with the reason.
    pub fn subscribe(
        &self,
        filter: Filter,
        resume_from: Option<&Positions>,
    ) -> Result<Subscription, String> {
        let (tx, live) = tokio::sync::mpsc::channel(QUEUE_BATCHES);
        let dropped: Dropped = Arc::default();
        let mut inner = self.feed.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.subscribers.retain(|s| !s.tx.is_closed());
        if inner.subscribers.len() >= MAX_SUBSCRIBERS {
            return Err(format!(
                "{MAX_SUBSCRIBERS} subscribers are connected; retry later"
            ));
        }
        // From the first subscription on, batches are recorded; the window starts here.
        let position = self.position();
        self.feed.enabled.store(true, Ordering::Relaxed);
        if inner.floor.is_none() {
            inner.floor = Some(position.clone());
        }
        let (backlog, reset) = match resume_from {
            None => (Vec::new(), None),
            Some(from)
                if inner
                    .rebuilt_at
                    .as_ref()
                    .is_some_and(|r| at_or_before(from, r)) =>
            {
                (
                    Vec::new(),
                    Some("the state was rebuilt after the resume point (a replay or rollback handed over): every answer may have changed; start again from the current state".to_owned()),
                )
            }
            Some(from) => match &inner.floor {
                // The batch at `from` too: a client may have stopped inside it.
                Some(floor) if at_or_before(floor, from) => (
                    inner
                        .window
                        .iter()
                        .filter(|b| (b.position == *from || !at_or_before(&b.position, from)) && filter.wants(b))
                        .cloned()
                        .collect(),
                    None,
                ),
                _ => (
                    Vec::new(),
                    Some("the resume point is older than the changes kept (the window holds the last 100,000 changes); start again from the current state".to_owned()),
                ),
            },
        };
        let current = match &filter {
            Filter::User(id) => self.user(id),
            Filter::All => None,
        };
        inner.subscribers.push(Subscriber {
            filter,
            tx,
            dropped: dropped.clone(),
        });
        Ok(Subscription {
            backlog,
            reset,
            live,
            dropped,
            position,
            current,
        })
    }

    /// Subscribers connected now, and dropped as too slow since start.
    pub fn subscribers(&self) -> (usize, u64) {
        (
            self.feed.subscribers(),
            self.feed.dropped_total.load(Ordering::Relaxed),
        )
    }

    /// Renders what the batch up to `position` changed and offers it (the writer,
    /// from [`super::Writer::publish_position`]).
    pub(super) fn publish_changes(&self, position: &Positions) {
        let mut touched: Vec<(Kind, Box<str>)> = Vec::new();
        for shard in self.shards.iter() {
            let users = std::mem::take(&mut super::write(shard).touched);
            touched.extend(users.into_iter().map(|k| (Kind::User, k)));
        }
        let organizations = std::mem::take(&mut self.write_organizations().touched);
        touched.extend(organizations.into_iter().map(|k| (Kind::Organization, k)));
        if touched.is_empty() {
            return;
        }
        // A batch split after a failure touches an entity more than once.
        let mut seen = std::collections::HashSet::new();
        let touched: Vec<_> = touched
            .into_iter()
            .filter(|t| seen.insert(t.clone()))
            .collect();
        let changes = touched
            .into_iter()
            .map(|(kind, key)| {
                let (answer, name) = match kind {
                    Kind::User => (self.user(&key), None),
                    Kind::Organization => {
                        let orgs = self.read_organizations();
                        let e = orgs.entries.get(&key);
                        (
                            e.and_then(super::Entry::view).map(str::to_owned),
                            e.and_then(super::Entry::join).map(Box::from),
                        )
                    }
                };
                Change {
                    kind,
                    key,
                    answer,
                    name,
                }
            })
            .collect();
        self.feed.publish(ChangeBatch {
            position: position.clone(),
            changes,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Partition;
    use crate::state::Writer;
    use crate::state::test_update;
    use logq_abi::{Entity, Source};

    fn at(n: i64) -> Positions {
        [(
            Partition {
                source: Source::Users,
                id: 0,
            },
            n,
        )]
        .into_iter()
        .collect()
    }

    fn set(store: &Writer, id: &str, v: Option<&str>, n: i64) {
        let update = match v {
            Some(v) => test_update(Some(&format!(r#"{{"id":"{id}","v":"{v}"}}"#)), None),
            None => test_update(None, None),
        };
        store.apply(
            &[Entity {
                kind: Kind::User,
                key: id.into(),
            }],
            vec![update],
        );
        store.publish_position(&at(n));
    }

    #[test]
    fn watchers_get_each_change_of_their_user_in_order_and_resume_from_the_window() {
        let store = Writer::new_store();
        set(&store, "a", Some("0"), 1);
        let mut sub = store.subscribe(Filter::User("a".into()), None).unwrap();
        assert_eq!(
            sub.current.as_deref(),
            Some(r#"{"id":"a","v":"0","organization":null}"#)
        );
        set(&store, "b", Some("x"), 2);
        set(&store, "a", Some("1"), 3);
        set(&store, "a", None, 4);
        let got: Vec<_> = std::iter::from_fn(|| sub.live.try_recv().ok()).collect();
        assert_eq!(got.len(), 2, "b's change is not a's");
        assert_eq!(
            got[0].changes[0].answer.as_deref(),
            Some(r#"{"id":"a","v":"1","organization":null}"#)
        );
        assert_eq!(got[1].changes[0].answer, None, "the deletion");
        assert_eq!(got[1].position, at(4));
        // Resume after position 2: both changes of a again; from before the window:
        // told so.
        let again = store
            .subscribe(Filter::User("a".into()), Some(&at(2)))
            .unwrap();
        assert_eq!(again.backlog.len(), 2);
        assert!(again.reset.is_none());
        let all = store.subscribe(Filter::All, Some(&at(3))).unwrap();
        assert_eq!(
            all.backlog.len(),
            2,
            "the batch at the resume point (3), and 4"
        );
        let after_b = store.subscribe(Filter::All, Some(&at(2))).unwrap();
        assert_eq!(after_b.backlog.len(), 3, "positions 2 (b), 3 and 4");
        let old = store.subscribe(Filter::All, Some(&at(0))).unwrap();
        assert!(old.reset.unwrap().contains("older than the changes kept"));
        assert_eq!(store.subscribers().0, 5);
    }

    #[test]
    fn a_slow_subscriber_is_dropped_with_a_reason_and_ingest_goes_on() {
        let store = Writer::new_store();
        let slow = store.subscribe(Filter::All, None).unwrap();
        for n in 0..(QUEUE_BATCHES as i64 + 5) {
            set(&store, "a", Some(&n.to_string()), n + 1);
        }
        let reason = slow.dropped.lock().unwrap().clone().expect("dropped");
        assert!(reason.contains("too slow"), "{reason}");
        assert_eq!(store.subscribers(), (0, 1));
        drop(slow);
    }

    #[test]
    fn a_replaced_state_ends_subscriptions_and_resumes_start_again() {
        let store = Writer::new_store();
        set(&store, "a", Some("0"), 1);
        let sub = store.subscribe(Filter::All, None).unwrap();
        set(&store, "a", Some("1"), 2);
        store.replace(Writer::new_store());
        let reason = sub.dropped.lock().unwrap().clone().expect("ended");
        assert!(reason.contains("rebuilt"), "{reason}");
        store.publish_position(&at(3));
        let resumed = store.subscribe(Filter::All, Some(&at(2))).unwrap();
        let reason = resumed.reset.expect("changes before the rebuild are gone");
        assert!(reason.contains("rebuilt"), "{reason}");
        let fresh = store.subscribe(Filter::All, Some(&at(3))).unwrap();
        assert!(fresh.reset.is_none() && fresh.backlog.is_empty());
    }
}
