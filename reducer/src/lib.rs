//! The default `logq` reducer: folds user and organization events into the latest
//! state of each entity.
//!
//! All logic is plain Rust and runs natively under `cargo test`; [`guest`] (built only
//! for `wasm32`) is the thin layer that exports it through the WIT world in `wit/`.
//! The host drives it in two steps per batch, mirroring the WIT `batch` resource:
//! [`Batch::new`] decodes, [`Batch::plan`] names the entities touched, and
//! [`Batch::fold`] folds the events into the states the host hands back.

pub mod event;
pub mod state;
pub mod time;

#[cfg(all(target_arch = "wasm32", feature = "component"))]
mod guest;
#[cfg(feature = "test-triggers")]
pub mod test_triggers;

use std::collections::HashMap;

use event::{Event, Refusal};
use state::{OrgState, UserState};

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
    /// The JSON answer; `None`: not visible.
    pub view: Option<String>,
    /// The join key (organization name).
    pub join: Option<String>,
}

/// The decoded records of one batch, grouped by the entity they touch.
pub struct Batch {
    plan: Plan,
    groups: Vec<Vec<Event>>,
}

impl Batch {
    /// Decodes every record; what cannot be decoded becomes a rejection.
    pub fn new<'a>(inputs: impl IntoIterator<Item = (Source, &'a [u8])>) -> Self {
        let mut plan = Plan::default();
        let mut groups: Vec<Vec<Event>> = Vec::new();
        let mut index: HashMap<(Kind, String), usize> = HashMap::new();
        let (mut events, mut refused) = (Vec::new(), Vec::new());
        for (i, (source, value)) in inputs.into_iter().enumerate() {
            let input = u32::try_from(i).unwrap_or(u32::MAX);
            event::decode(source, value, &mut events, &mut refused);
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
                .push(u32::try_from(events.len()).unwrap_or(u32::MAX));
            for event in events.drain(..) {
                let (kind, key) = match &event {
                    Event::User(u) => (Kind::User, &u.id),
                    Event::Org(o) => (Kind::Organization, &o.key),
                };
                let slot = match index.get(&(kind, key.clone())) {
                    Some(&slot) => slot,
                    None => {
                        let slot = groups.len();
                        index.insert((kind, key.clone()), slot);
                        plan.entities.push(Entity {
                            kind,
                            key: key.clone(),
                        });
                        groups.push(Vec::new());
                        slot
                    }
                };
                groups[slot].push(event);
            }
        }
        Self { plan, groups }
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
        if prior.len() != self.groups.len() {
            return Err(format!(
                "fold got {} prior states for {} entities",
                prior.len(),
                self.groups.len()
            ));
        }
        self.groups
            .iter()
            .zip(&self.plan.entities)
            .zip(prior)
            .map(|((events, entity), prior)| fold_entity(entity, events, *prior))
            .collect()
    }
}

fn fold_entity(entity: &Entity, events: &[Event], prior: Option<&[u8]>) -> Result<Update, String> {
    let fail = |e: String| format!("{:?} {:?}: {e}", entity.kind, entity.key);
    match entity.kind {
        Kind::User => {
            let mut state = match prior {
                Some(bytes) => UserState::decode(bytes).map_err(fail)?,
                None => UserState::new(entity.key.clone()),
            };
            for event in events {
                if let Event::User(u) = event {
                    state.apply(u);
                }
            }
            Ok(Update {
                state: Some(state.encode()),
                view: state.view(),
                join: state.organization_name().map(str::to_owned),
            })
        }
        Kind::Organization => {
            let mut orgs = events.iter().filter_map(|e| match e {
                Event::Org(o) => Some(o),
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
            Ok(Update {
                state: Some(state.encode()),
                view: Some(state.view()),
                join: Some(state.current.name.clone()),
            })
        }
    }
}

#[cfg(test)]
mod tests;
