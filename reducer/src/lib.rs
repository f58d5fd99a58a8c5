//! The default `logq` reducer: folds user and organization events into the latest
//! state of each entity.
//!
//! All logic is plain Rust and runs natively under `cargo test`; [`guest`] (built only
//! for `wasm32`) is the thin layer that exports it through the WIT world in `wit/`.
//! The host drives it in two steps per batch, mirroring the WIT `batch` resource:
//! [`Batch::new`] decodes, [`Batch::plan`] names the entities touched, and
//! [`Batch::fold`] folds the events into the states the host hands back.

pub mod event;
pub mod explain;
pub mod json;
pub mod stamp;
pub mod state;
pub mod time;

#[cfg(all(target_arch = "wasm32", feature = "component"))]
mod guest;
#[cfg(any(test, feature = "test-triggers"))]
pub mod test_triggers;

use std::borrow::Cow;
use std::hash::BuildHasher as _;

use event::{Arena, Event, Refusal};
use state::{Org, OrgState, UserState};

pub use logq_abi::{Entity, Fold, Folded, Kind, Plan, Record, Rejection, Source, States, Update};

/// No entry: the end of an entity's list of events.
const NONE: u32 = u32::MAX;

/// The decoded records of one batch, grouped by the entity they touch.
pub struct Batch {
    plan: Plan,
    /// Every string of `events`.
    arena: Arena,
    /// All accepted events, in input order.
    events: Vec<Event>,
    /// For each event, the next event of the same entity (or [`NONE`]).
    next: Vec<u32>,
    /// For each entity of the plan, its first and last event.
    lists: Vec<(u32, u32)>,
}

impl Batch {
    /// Decodes every record; what cannot be decoded becomes a rejection.
    pub fn new(records: &[Record<'_>]) -> Self {
        let mut plan = Plan::default();
        let mut arena = Arena::default();
        let (mut events, mut next, mut lists) = (Vec::new(), Vec::new(), Vec::<(u32, u32)>::new());
        // Entity -> index into `lists`, found by the key's text in the arena.
        let mut index: hashbrown::HashTable<u32> = hashbrown::HashTable::new();
        let hasher = foldhash::fast::FixedState::with_seed(0x6c6f6771);
        let mut refused = Vec::new();
        for (i, record) in records.iter().enumerate() {
            let input = u32::try_from(i).unwrap_or(u32::MAX);
            let first = events.len();
            let pos = stamp::Pos {
                partition: record.partition,
                offset: record.offset,
                item: 0,
            };
            event::decode(
                record.source,
                pos,
                record.value,
                &mut arena,
                &mut events,
                &mut refused,
            );
            plan.rejections.extend(
                refused
                    .drain(..)
                    .map(|Refusal { event, reason }| Rejection {
                        input,
                        event,
                        reason,
                    }),
            );
            plan.accepted
                .push(u32::try_from(events.len() - first).unwrap_or(u32::MAX));
            for (at, event) in events.iter().enumerate().skip(first) {
                let this = u32::try_from(at).unwrap_or(NONE);
                let kind = kind_of(event);
                let key = arena.get(event.key());
                let hash = hasher.hash_one((kind, key));
                let found = index.find(hash, |&slot| {
                    let e = &plan.entities[slot as usize];
                    e.kind == kind && e.key == key
                });
                next.push(NONE);
                match found {
                    Some(&slot) => {
                        let list = &mut lists[slot as usize];
                        next[list.1 as usize] = this;
                        list.1 = this;
                    }
                    None => {
                        let slot = u32::try_from(lists.len()).unwrap_or(NONE);
                        index.insert_unique(hash, slot, |&s| {
                            let e: &Entity = &plan.entities[s as usize];
                            hasher.hash_one((e.kind, e.key.as_str()))
                        });
                        plan.entities.push(Entity {
                            kind,
                            key: key.to_owned(),
                        });
                        lists.push((this, this));
                    }
                }
            }
        }
        Self {
            plan,
            arena,
            events,
            next,
            lists,
        }
    }

    /// The entities touched and the events refused.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Folds the batch into `prior` (one entry per entity of [`Batch::plan`]).
    ///
    /// # Errors
    /// When `prior` has the wrong length or holds a state this reducer did not write.
    pub fn fold(&self, prior: &[Option<&[u8]>]) -> Result<Vec<Update>, String> {
        if prior.len() != self.lists.len() {
            return Err(format!(
                "fold got {} prior states for {} entities",
                prior.len(),
                self.lists.len()
            ));
        }
        self.lists
            .iter()
            .zip(&self.plan.entities)
            .zip(prior)
            .map(|((&(first, _), entity), prior)| self.fold_entity(entity, first, *prior))
            .collect()
    }

    /// The events of one entity, in arrival order.
    fn list(&self, first: u32) -> impl Iterator<Item = &Event> {
        std::iter::successors(Some(first), |&at| {
            Some(self.next[at as usize]).filter(|&n| n != NONE)
        })
        .map(|at| &self.events[at as usize])
    }

    fn org(&self, o: &event::OrgEvent) -> Org<'_> {
        Org {
            key: Cow::Borrowed(self.arena.get(o.key)),
            name: Cow::Borrowed(self.arena.get(o.name)),
            tier: o.tier.map(|t| Cow::Borrowed(self.arena.get(t))),
            created_at: o.created_at,
            version: o.version,
        }
    }

    fn fold_entity(
        &self,
        entity: &Entity,
        first: u32,
        prior: Option<&[u8]>,
    ) -> Result<Update, String> {
        let fail = |e: String| format!("{:?} {:?}: {e}", entity.kind, entity.key);
        match entity.kind {
            Kind::User => {
                let mut state = match prior {
                    Some(bytes) => UserState::decode(bytes, &entity.key).map_err(fail)?,
                    None => UserState::new(&entity.key),
                };
                for event in self.list(first) {
                    if let Event::User(u) = event {
                        let fields = u.fields.map(|f| f.map(|f| self.arena.get(f)));
                        state.apply(u.action, u.at, fields);
                    }
                }
                Ok(update(state.encode()))
            }
            Kind::Organization => {
                let mut orgs = self.list(first).filter_map(|e| match e {
                    Event::Org(o) => Some(self.org(o)),
                    Event::User(_) => None,
                });
                let mut state = match prior {
                    Some(bytes) => OrgState::decode(bytes).map_err(fail)?,
                    None => match orgs.next() {
                        Some(first) => OrgState::new(first),
                        None => return Err(fail("no organization event".into())),
                    },
                };
                for o in orgs {
                    state.apply(o);
                }
                Ok(update(state.encode()))
            }
        }
    }
}

/// Framed entry points: what the WIT interface carries (the formats live in
/// [`logq_abi`], shared with the host).
impl Batch {
    /// Decodes the framed records of a batch.
    ///
    /// # Errors
    /// When the framing is broken (a host bug, not bad records).
    pub fn from_records(records: &[u8]) -> Result<Self, String> {
        Ok(Self::new(&logq_abi::records::decode(records)?))
    }

    /// The plan's entities, framed.
    pub fn entities_framed(&self) -> Vec<u8> {
        logq_abi::entities::encode(&self.plan.entities)
    }

    /// [`Batch::fold`] on framed prior states, returning framed updates.
    ///
    /// # Errors
    /// As [`Batch::fold`], or when the framing is broken.
    pub fn fold_framed(&self, prior: &[u8]) -> Result<Vec<u8>, String> {
        let states = logq_abi::prior::decode(prior)?;
        Ok(logq_abi::updates::encode(&self.fold(&states)?))
    }
}

/// The native fold: this crate's logic called directly, no wasm. What the
/// differential tests compare a component with, and what [`logq_abi::driver`] drives
/// in tests and tools.
#[derive(Debug, Clone, Copy, Default)]
pub struct Native;

impl Fold for Native {
    type Error = String;

    fn fold(&self, records: &[Record<'_>], states: &dyn States) -> Result<Folded, String> {
        let batch = Batch::new(records);
        // The states are lent for the call only; the fold needs them all at once.
        let mut prior: Vec<Option<Vec<u8>>> = Vec::with_capacity(batch.plan.entities.len());
        states.states(&batch.plan.entities, &mut |s| {
            prior.push(s.map(<[u8]>::to_vec))
        });
        let prior: Vec<Option<&[u8]>> = prior.iter().map(Option::as_deref).collect();
        let updates = batch.fold(&prior)?;
        Ok(Folded {
            plan: batch.plan,
            updates,
        })
    }
}

fn update(e: state::Encoded) -> Update {
    Update {
        state: Some(e.state),
        view: e.view,
        join: e.join,
        clock: Some(e.clock),
    }
}

fn kind_of(event: &Event) -> Kind {
    match event {
        Event::User(_) => Kind::User,
        Event::Org(_) => Kind::Organization,
    }
}

#[cfg(test)]
mod tests;
