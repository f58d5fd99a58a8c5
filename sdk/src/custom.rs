//! Your own rules: a [`Reducer`] over decoded events and a state type of your own,
//! run as a [`Folder`] by [`Custom`].

use std::collections::HashMap;

use logq_abi::{Entity, Plan, Record, Rejection, Source, Update};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::{Answer, Folder, lay_out, parts, range};

/// The tag of a custom state's layout.
const TAG: &[u8; 4] = b"lqc1";

/// One event, decoded: a JSON object from a record (a record holds one object or an
/// array of them), and where it sits in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The topic it came from: user events or organization events.
    pub source: Source,
    /// Its record's partition.
    pub partition: i32,
    /// Its record's offset in that partition (within a partition, larger is later).
    pub offset: i64,
    /// Its place in the record's array (0 for a single object).
    pub index: u32,
    /// Its members.
    pub fields: Map<String, Value>,
}

impl Event {
    /// Member `name` when it is a string.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.fields.get(name).and_then(Value::as_str)
    }

    /// Its `event_type` member ("User Created", ...), if it is a string.
    pub fn event_type(&self) -> Option<&str> {
        self.str("event_type")
    }
}

/// A reducer of your own. Events of one batch reach [`Reducer::apply`] in log order
/// within each partition; across partitions, and across batches after a restart or a
/// replay, the order is the log's, which is not the order the events happened in:
/// rules that must give the same answer whatever the arrival order compare event
/// times (and break ties by [`Event::partition`] and [`Event::offset`]).
pub trait Reducer: Default + 'static {
    /// What you keep per entity (stored as JSON between batches).
    type State: Serialize + DeserializeOwned;

    /// Which entity `event` changes. An error refuses the event: its record goes to
    /// the dead-letter topic with your reason.
    ///
    /// # Errors
    /// Why the event is refused.
    fn entity(&self, event: &Event) -> Result<Entity, String>;

    /// The entity's state after `event`, from its state before (`None`: none yet).
    /// Return `Ok(None)` to forget the entity altogether.
    ///
    /// # Errors
    /// Why the event cannot be applied. The batch fails; the host folds its records
    /// one by one and dead-letters the failing one with this reason.
    fn apply(
        &self,
        state: Option<Self::State>,
        event: &Event,
    ) -> Result<Option<Self::State>, String>;

    /// What `GET` answers for the entity, or `None` for a 404 (never created,
    /// deleted). A user's answer gets its organization's answer joined in as
    /// `organization` by the host.
    fn answer(&self, state: &Self::State) -> Option<Answer>;

    /// For a user: the `organization_name` it joins; for an organization: its own.
    fn join(&self, state: &Self::State) -> Option<String> {
        let _ = state;
        None
    }

    /// The entity's newest event time in microseconds since the Unix epoch, if you
    /// keep one: entities without an answer expire that long after it (the host's
    /// `--tombstone-retention`). `None`: never expires.
    fn clock(&self, state: &Self::State) -> Option<i64> {
        let _ = state;
        None
    }
}

/// A batch folded by your [`Reducer`] `R`: a [`Folder`].
pub struct Custom<R> {
    reducer: R,
    plan: Plan,
    /// Accepted events, in input order, with the index of their entity in the plan.
    events: Vec<(usize, Event)>,
}

impl<R: Reducer> Folder for Custom<R> {
    fn new(records: &[Record<'_>]) -> Self {
        let reducer = R::default();
        let mut plan = Plan::default();
        let mut events = Vec::new();
        let mut seen: HashMap<Entity, usize> = HashMap::new();
        for (i, record) in records.iter().enumerate() {
            let input = u32::try_from(i).unwrap_or(u32::MAX);
            let mut accepted = 0u32;
            let mut refuse = |event: Option<u32>, reason: String| {
                plan.rejections.push(Rejection {
                    input,
                    event,
                    reason,
                });
            };
            let objects = match serde_json::from_slice::<Value>(record.value) {
                Ok(Value::Array(items)) => items.into_iter().map(Some).collect(),
                Ok(value @ Value::Object(_)) => vec![Some(value)],
                Ok(_) => {
                    refuse(None, "not a JSON object or an array of them".into());
                    Vec::new()
                }
                Err(e) => {
                    refuse(None, format!("invalid JSON: {e}"));
                    Vec::new()
                }
            };
            for (index, object) in (0u32..).zip(objects) {
                let Some(Value::Object(fields)) = object else {
                    refuse(Some(index), "not a JSON object".into());
                    continue;
                };
                let event = Event {
                    source: record.source,
                    partition: record.partition,
                    offset: record.offset,
                    index,
                    fields,
                };
                match reducer.entity(&event) {
                    Ok(entity) => {
                        let next = plan.entities.len();
                        let at = *seen.entry(entity.clone()).or_insert(next);
                        if at == next {
                            plan.entities.push(entity);
                        }
                        events.push((at, event));
                        accepted += 1;
                    }
                    Err(reason) => refuse(Some(index), reason),
                }
            }
            plan.accepted.push(accepted);
        }
        Self {
            reducer,
            plan,
            events,
        }
    }

    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn fold(&self, prior: &[Option<&[u8]>]) -> Result<Vec<Update>, String> {
        if prior.len() != self.plan.entities.len() {
            return Err(format!(
                "fold got {} prior states for {} entities",
                prior.len(),
                self.plan.entities.len()
            ));
        }
        let mut states = prior
            .iter()
            .map(|p| p.map(decode::<R::State>).transpose())
            .collect::<Result<Vec<_>, String>>()?;
        for (at, event) in &self.events {
            let state = states[*at].take();
            states[*at] = self.reducer.apply(state, event).map_err(|e| {
                format!(
                    "{:?} {:?}: {e}",
                    self.plan.entities[*at].kind, self.plan.entities[*at].key
                )
            })?;
        }
        states
            .iter()
            .map(|s| s.as_ref().map_or(Ok(forget()), |s| self.encode(s)))
            .collect()
    }
}

impl<R: Reducer> Custom<R> {
    fn encode(&self, state: &R::State) -> Result<Update, String> {
        let json = serde_json::to_vec(state).map_err(|e| format!("encoding the state: {e}"))?;
        let answer = self.reducer.answer(state).map(|a| a.to_json());
        let join = self.reducer.join(state);
        let (bytes, starts) = lay_out(
            TAG,
            &[
                &json,
                answer.as_deref().unwrap_or_default().as_bytes(),
                join.as_deref().unwrap_or_default().as_bytes(),
            ],
        );
        Ok(Update {
            view: answer.as_ref().map(|a| range(starts[1], a.len())),
            join: join.as_ref().map(|j| range(starts[2], j.len())),
            clock: self.reducer.clock(state),
            state: Some(bytes),
        })
    }
}

fn decode<S: DeserializeOwned>(bytes: &[u8]) -> Result<S, String> {
    let json = parts(TAG, bytes, 3)?[0];
    serde_json::from_slice(json).map_err(|e| format!("a stored state no longer decodes: {e}"))
}

fn forget() -> Update {
    Update {
        state: None,
        view: None,
        join: None,
        clock: None,
    }
}
