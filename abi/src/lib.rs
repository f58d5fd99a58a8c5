//! The byte format between the `logq` host and a reducer component, in one place.
//!
//! The WIT world (`wit/reducer.wit`) moves bulk data as flat byte lists; this crate
//! owns the types those bytes carry ([`Source`], [`Kind`], [`Entity`], [`Plan`],
//! [`Rejection`], [`Update`], [`Record`]), [`PerSource`] (one value per stream), and
//! every encoder/decoder pair:
//!
//! | what | direction | module |
//! |---|---|---|
//! | records of a batch (stream, partition, offset, value) | host -> reducer | [`records`] |
//! | the entities a batch touches | reducer -> host | [`entities`] |
//! | prior states of those entities | host -> reducer | [`prior`] |
//! | new states, with the answer and join key as ranges inside them | reducer -> host | [`updates`] |
//!
//! Both sides link this crate, so an encoder and its decoder cannot drift apart; each
//! pair has a round-trip property test. [`driver`] is the batch -> plan -> prior ->
//! fold -> apply sequence for tests and tools. The crate has no dependencies, so a
//! reducer of any author can use it.

pub mod driver;
pub mod entities;
pub mod prior;
pub mod records;
pub mod updates;
mod wire;

use std::ops::Range;

pub use updates::{UpdateRef, Updates};
pub use wire::{Reader, put_frame, put_u32, text_in};

/// Which stream a record was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// User events.
    Users,
    /// Organization events.
    Organizations,
}

impl Source {
    /// Both streams, users first (the order of the host's topic list).
    pub const ALL: [Source; 2] = [Source::Users, Source::Organizations];

    /// The byte that names the stream in [`records`].
    pub fn byte(self) -> u8 {
        match self {
            Source::Users => 0,
            Source::Organizations => 1,
        }
    }

    /// The stream a byte names.
    ///
    /// # Errors
    /// For a byte that names no stream.
    pub fn from_byte(b: u8) -> Result<Self, String> {
        match b {
            0 => Ok(Source::Users),
            1 => Ok(Source::Organizations),
            other => Err(format!("framing: unknown stream byte {other}")),
        }
    }
}

/// One value per stream: what is kept for each of the two topics, by [`Source`]
/// rather than by a position in an array.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerSource<T> {
    /// For the user events topic.
    pub users: T,
    /// For the organization events topic.
    pub organizations: T,
}

impl<T> PerSource<T> {
    /// Each stream's value, made by `f`.
    pub fn from_fn(mut f: impl FnMut(Source) -> T) -> Self {
        Self {
            users: f(Source::Users),
            organizations: f(Source::Organizations),
        }
    }

    /// The value of `source`.
    pub fn get(&self, source: Source) -> &T {
        match source {
            Source::Users => &self.users,
            Source::Organizations => &self.organizations,
        }
    }

    /// The value of `source`, to change.
    pub fn get_mut(&mut self, source: Source) -> &mut T {
        match source {
            Source::Users => &mut self.users,
            Source::Organizations => &mut self.organizations,
        }
    }

    /// Both, users first.
    pub fn iter(&self) -> impl Iterator<Item = (Source, &T)> {
        Source::ALL.into_iter().map(move |s| (s, self.get(s)))
    }
}

/// The kinds of entity the host keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Keyed by `id`.
    User,
    /// Keyed by `organization_key`.
    Organization,
}

impl Kind {
    /// The byte that names the kind in [`entities`] (and in the host's snapshots).
    pub fn byte(self) -> u8 {
        match self {
            Kind::User => 0,
            Kind::Organization => 1,
        }
    }

    /// The kind a byte names.
    ///
    /// # Errors
    /// For a byte that names no kind.
    pub fn from_byte(b: u8) -> Result<Self, String> {
        match b {
            0 => Ok(Kind::User),
            1 => Ok(Kind::Organization),
            other => Err(format!("unknown entity kind {other}")),
        }
    }
}

/// One entity a batch touches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entity {
    /// What kind.
    pub kind: Kind,
    /// Its key.
    pub key: String,
}

/// One record of a batch, as read from the log. The partition and offset let a
/// reducer order records of one partition by the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The stream it was read from.
    pub source: Source,
    /// Its partition.
    pub partition: i32,
    /// Its offset within the partition.
    pub offset: i64,
    /// The record value, exactly as read.
    pub value: &'a [u8],
}

impl<'a> Record<'a> {
    /// Values as if they were read in this order from partition 0 of their streams,
    /// at offsets 0, 1, 2, ... (for tests and tools that have values, not a log).
    pub fn sequence(values: impl IntoIterator<Item = (Source, &'a [u8])>) -> Vec<Record<'a>> {
        values
            .into_iter()
            .zip(0i64..)
            .map(|((source, value), offset)| Record {
                source,
                partition: 0,
                offset,
                value,
            })
            .collect()
    }

    /// An owned copy.
    pub fn to_owned(&self) -> OwnedRecord {
        OwnedRecord {
            source: self.source,
            partition: self.partition,
            offset: self.offset,
            value: self.value.to_vec(),
        }
    }
}

/// A [`Record`] that owns its value (kept beyond the batch, e.g. for a canary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRecord {
    /// The stream it was read from.
    pub source: Source,
    /// Its partition.
    pub partition: i32,
    /// Its offset within the partition.
    pub offset: i64,
    /// The record value.
    pub value: Vec<u8>,
}

impl OwnedRecord {
    /// Borrowed again.
    pub fn as_record(&self) -> Record<'_> {
        Record {
            source: self.source,
            partition: self.partition,
            offset: self.offset,
            value: &self.value,
        }
    }
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
    /// How many events of each record were accepted, in record order.
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
    /// The entity's newest event time (microseconds since the Unix epoch), if the
    /// reducer tells: it drives the expiry of tombstones (see [`updates::CLOCK`]).
    pub clock: Option<i64>,
}

impl Update {
    fn text(&self, range: Option<&Range<u32>>) -> Option<&str> {
        text_in(self.state.as_deref()?, range?).ok()
    }

    /// The JSON answer, when visible.
    pub fn view(&self) -> Option<&str> {
        self.text(self.view.as_ref())
    }

    /// The join key.
    pub fn join(&self) -> Option<&str> {
        self.text(self.join.as_ref())
    }

    /// Borrowed.
    pub fn as_ref(&self) -> UpdateRef<'_> {
        UpdateRef {
            state: self.state.as_deref(),
            view: self.view.clone(),
            join: self.join.clone(),
            clock: self.clock,
        }
    }
}

/// A folded batch: the plan, and one update per planned entity (same order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folded {
    /// Entities touched, rejections, accepted counts.
    pub plan: Plan,
    /// New state of each entity of `plan.entities`, same order.
    pub updates: Vec<Update>,
}

/// Where a fold finds the current states of the entities it touches: plain bytes,
/// exactly as an earlier fold returned them. The framing is the folder's business.
pub trait States {
    /// Calls `each` once per entity, in order, with its state (`None`: unknown).
    fn states(&self, entities: &[Entity], each: &mut dyn FnMut(Option<&[u8]>));
}

/// Something that folds a batch of records: the native fold, or a component run by
/// the host's runtime. [`driver::Model`] drives either.
pub trait Fold {
    /// Why a whole batch could not be folded.
    type Error: std::fmt::Display;

    /// Decodes `records`, asks `states` for the prior state of every entity touched,
    /// and folds.
    ///
    /// # Errors
    /// When the batch as a whole cannot be folded (bad records are rejections).
    fn fold(&self, records: &[Record<'_>], states: &dyn States) -> Result<Folded, Self::Error>;
}
