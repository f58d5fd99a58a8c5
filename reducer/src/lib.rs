//! The default `logq` reducer: folds user and organization events into the latest
//! state of each entity.
//!
//! All logic is plain Rust and runs natively under `cargo test`; [`guest`] (built only
//! for `wasm32`) is the thin layer that exports it through the WIT world in `wit/`.
//! The host drives it in two steps per batch, mirroring the WIT `batch` resource:
//! [`Batch::new`] decodes, [`Batch::plan`] names the entities touched, and
//! [`Batch::fold`] folds the events into the states the host hands back.

pub mod event;
pub mod json;
pub mod state;
pub mod time;
pub mod wire;

#[cfg(all(target_arch = "wasm32", feature = "component"))]
mod guest;
#[cfg(feature = "test-triggers")]
pub mod test_triggers;

use std::borrow::Cow;
use std::hash::BuildHasher as _;
use std::ops::Range;

use event::{Arena, Event, Refusal};
use state::{Org, OrgState, UserState};

/// Which stream a record was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// User events.
    Users,
    /// Organization events.
    Organizations,
}

/// The kinds of entity the host keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Keyed by `id`.
    User,
    /// Keyed by `organization_key`.
    Organization,
}

/// One entity a batch touches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entity {
    /// What kind.
    pub kind: Kind,
    /// Its key.
    pub key: String,
}

/// An event the reducer refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Index of the record in the batch.
    pub input: u32,
    /// Position of the event inside the record, if known.
    pub event: Option<u32>,
    /// Why.
    pub reason: String,
}

/// What a batch needs from the host before it can fold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The distinct entities touched, in first-seen order.
    pub entities: Vec<Entity>,
    /// The refused events.
    pub rejections: Vec<Rejection>,
    /// How many events of each input were accepted, in input order.
    pub accepted: Vec<u32>,
}

/// The new state of one entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// State to hand back next time; `None`: forget the entity.
    pub state: Option<Vec<u8>>,
    /// The JSON answer's range in `state`; `None`: not visible.
    pub view: Option<Range<u32>>,
    /// The join key's (organization name's) range in `state`.
    pub join: Option<Range<u32>>,
}

impl Update {
    fn text(&self, range: Option<&Range<u32>>) -> Option<&str> {
        wire::text_in(self.state.as_deref()?, range?).ok()
    }

    /// The JSON answer, when visible.
    pub fn view(&self) -> Option<&str> {
        self.text(self.view.as_ref())
    }

    /// The join key.
    pub fn join(&self) -> Option<&str> {
        self.text(self.join.as_ref())
    }
}

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
    pub fn new<'a>(inputs: impl IntoIterator<Item = (Source, &'a [u8])>) -> Self {
        let mut plan = Plan::default();
        let mut arena = Arena::default();
        let (mut events, mut next, mut lists) = (Vec::new(), Vec::new(), Vec::<(u32, u32)>::new());
        // Entity -> index into `lists`, found by the key's text in the arena.
        let mut index: hashbrown::HashTable<u32> = hashbrown::HashTable::new();
        let hasher = foldhash::fast::FixedState::with_seed(0x6c6f6771);
        let mut refused = Vec::new();
        for (i, (source, value)) in inputs.into_iter().enumerate() {
            let input = u32::try_from(i).unwrap_or(u32::MAX);
            let first = events.len();
            event::decode(source, value, &mut arena, &mut events, &mut refused);
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

/// Framed entry points: what the WIT interface carries (see [`wire`]).
impl Batch {
    /// Decodes the framed records of a batch.
    ///
    /// # Errors
    /// When the framing is broken (a host bug, not bad records).
    pub fn from_records(records: &[u8]) -> Result<Self, String> {
        let mut r = wire::Reader::new(records);
        let mut inputs = Vec::new();
        while !r.is_empty() {
            let source = match r.u8()? {
                wire::SOURCE_USERS => Source::Users,
                wire::SOURCE_ORGANIZATIONS => Source::Organizations,
                other => return Err(format!("framing: unknown stream byte {other}")),
            };
            inputs.push((source, r.frame()?));
        }
        Ok(Self::new(inputs))
    }

    /// The plan's entities, framed.
    pub fn entities_framed(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.plan.entities.len() * 40);
        for e in &self.plan.entities {
            out.push(match e.kind {
                Kind::User => wire::KIND_USER,
                Kind::Organization => wire::KIND_ORGANIZATION,
            });
            wire::put_frame(&mut out, e.key.as_bytes());
        }
        out
    }

    /// [`Batch::fold`] on framed prior states, returning framed updates.
    ///
    /// # Errors
    /// As [`Batch::fold`], or when the framing is broken.
    pub fn fold_framed(&self, prior: &[u8]) -> Result<Vec<u8>, String> {
        let mut r = wire::Reader::new(prior);
        let mut states = Vec::with_capacity(self.lists.len());
        while !r.is_empty() {
            states.push(r.prior()?);
        }
        let updates = self.fold(&states)?;
        let size: usize = updates
            .iter()
            .map(|u| 21 + u.state.as_ref().map_or(0, Vec::len))
            .sum();
        let mut out = Vec::with_capacity(size);
        for u in &updates {
            let flag = |set: bool, bit: u8| if set { bit } else { 0 };
            let flags = flag(u.state.is_some(), wire::KEEP)
                | flag(u.view.is_some(), wire::VIEW)
                | flag(u.join.is_some(), wire::JOIN);
            out.push(flags);
            if let Some(state) = &u.state {
                wire::put_frame(&mut out, state);
            }
            for range in [&u.view, &u.join].into_iter().flatten() {
                wire::put_u32(&mut out, range.start);
                wire::put_u32(&mut out, range.end - range.start);
            }
        }
        Ok(out)
    }
}

fn update(e: state::Encoded) -> Update {
    Update {
        state: Some(e.state),
        view: e.view,
        join: e.join,
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
