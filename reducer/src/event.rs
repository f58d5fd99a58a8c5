//! Decoding record values into events, with a reason for everything refused.

use std::borrow::Cow;

use crate::Source;
use crate::json::{self, Value};
use crate::stamp::{Pos, Stamp};
use crate::time::{self, Micros};

/// Keys longer than this are refused: they are almost surely not ids, and every
/// byte of a key is kept in memory for as long as the entity lives.
pub const MAX_KEY_BYTES: usize = 1024;

/// A string of a batch's events, kept in the batch's [`Arena`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    start: usize,
    len: usize,
}

/// Every string a batch decodes, in one buffer: one growing allocation per batch
/// instead of several per event.
#[derive(Debug, Default)]
pub struct Arena(String);

impl Arena {
    /// Keeps `s`; the span reads it back.
    pub fn push(&mut self, s: &str) -> Span {
        let start = self.0.len();
        self.0.push_str(s);
        Span {
            start,
            len: s.len(),
        }
    }

    /// Bytes kept so far: a mark for [`Arena::truncate`].
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Forgets what was kept after `mark` (a [`Arena::len`]).
    pub fn truncate(&mut self, mark: usize) {
        self.0.truncate(mark);
    }

    /// The string behind `span`.
    pub fn get(&self, span: Span) -> &str {
        // Spans are only made by `push`, on char boundaries of this buffer.
        self.0
            .get(span.start..span.start + span.len)
            .unwrap_or_default()
    }
}

/// What a user event does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// "User Created": the full record of a (re-)created user.
    Created,
    /// "User Updated": some fields changed.
    Updated,
    /// "User Deleted": the user is gone.
    Deleted,
}

/// JSON names of the user fields, in the order of [`UserEvent::fields`].
pub const USER_FIELDS: [&str; 4] = ["username", "user_email", "user_type", "organization_name"];

/// Index of `organization_name` in [`USER_FIELDS`]: the join key.
pub const ORGANIZATION_NAME: usize = 3;

/// One decoded user event; its strings are in the batch's [`Arena`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEvent {
    /// The user's `id`.
    pub id: Span,
    /// What happened.
    pub action: Action,
    /// `received_at` (event time) and the event's place in the log.
    pub at: Stamp,
    /// Fields the event carries, in the order of [`USER_FIELDS`]; `None` where absent
    /// or null.
    pub fields: [Option<Span>; 4],
}

/// One decoded organization event; its strings are in the batch's [`Arena`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgEvent {
    /// `organization_key`: the organization's identity.
    pub key: Span,
    /// `organization_name`: what users join on.
    pub name: Span,
    /// `organization_tier`, if given.
    pub tier: Option<Span>,
    /// `created_at`.
    pub created_at: Micros,
    /// Which of two events for one key wins: `updated_at` (or `received_at`) when the
    /// event has one, else `created_at`; on equal times, the later in the log.
    pub version: Stamp,
}

/// A decoded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// From the users topic.
    User(UserEvent),
    /// From the organizations topic.
    Org(OrgEvent),
}

impl Event {
    /// The key of the entity the event touches.
    pub fn key(&self) -> Span {
        match self {
            Event::User(u) => u.id,
            Event::Org(o) => o.key,
        }
    }
}

/// An event that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Position inside the record's JSON array, `None` for a record that is one object
    /// or could not be split into events at all.
    pub event: Option<u32>,
    /// Why.
    pub reason: String,
}

/// The members of a user event this reducer reads.
#[derive(Default)]
struct RawUser<'a> {
    seen: u16,
    id: Option<Cow<'a, str>>,
    event_type: Option<Cow<'a, str>>,
    received_at: Option<Cow<'a, str>>,
    fields: [Option<Cow<'a, str>>; 4],
}

/// The members of an organization event this reducer reads.
#[derive(Default)]
struct RawOrg<'a> {
    seen: u16,
    organization_key: Option<Cow<'a, str>>,
    organization_name: Option<Cow<'a, str>>,
    organization_tier: Option<Cow<'a, str>>,
    created_at: Option<Cow<'a, str>>,
    updated_at: Option<Cow<'a, str>>,
    received_at: Option<Cow<'a, str>>,
}

/// The members of one kind of event, read one by one by [`json`], then made an event.
trait Raw<'a>: Default {
    /// Keeps a member this reducer reads; ignores the others.
    fn member(&mut self, name: &str, value: Value<'a>) -> Result<(), String>;
    /// The event, once every member is read.
    fn event(self, pos: Pos, arena: &mut Arena) -> Result<Event, String>;
}

impl<'a> Raw<'a> for RawUser<'a> {
    fn member(&mut self, name: &str, value: Value<'a>) -> Result<(), String> {
        let (bit, slot) = match name {
            "id" => (1, &mut self.id),
            "event_type" => (2, &mut self.event_type),
            "received_at" => (4, &mut self.received_at),
            "username" => (8, &mut self.fields[0]),
            "user_email" => (16, &mut self.fields[1]),
            "user_type" => (32, &mut self.fields[2]),
            "organization_name" => (64, &mut self.fields[3]),
            _ => return Ok(()),
        };
        member(&mut self.seen, bit, name, slot, value)
    }
    fn event(self, pos: Pos, arena: &mut Arena) -> Result<Event, String> {
        user_event(self, pos, arena).map(Event::User)
    }
}

impl<'a> Raw<'a> for RawOrg<'a> {
    fn member(&mut self, name: &str, value: Value<'a>) -> Result<(), String> {
        let (bit, slot) = match name {
            "organization_key" => (1, &mut self.organization_key),
            "organization_name" => (2, &mut self.organization_name),
            "organization_tier" => (4, &mut self.organization_tier),
            "created_at" => (8, &mut self.created_at),
            "updated_at" => (16, &mut self.updated_at),
            "received_at" => (32, &mut self.received_at),
            _ => return Ok(()),
        };
        member(&mut self.seen, bit, name, slot, value)
    }
    fn event(self, pos: Pos, arena: &mut Arena) -> Result<Event, String> {
        org_event(self, pos, arena).map(Event::Org)
    }
}

/// Stores one member read by [`json`]: strings and null only, each at most once (a
/// repeated member would make the event ambiguous).
fn member<'a>(
    seen: &mut u16,
    bit: u16,
    name: &str,
    slot: &mut Option<Cow<'a, str>>,
    value: Value<'a>,
) -> Result<(), String> {
    if *seen & bit != 0 {
        return Err(format!("invalid JSON: duplicate field `{name}`"));
    }
    *seen |= bit;
    match value {
        Value::Str(s) => *slot = Some(s),
        Value::Null => *slot = None,
        Value::Other(kind) => {
            return Err(format!(
                "wrong field type: field `{name}` must be a string or null, found {kind}"
            ));
        }
    }
    Ok(())
}

/// Decodes one record value: a JSON object or a JSON array of objects. Each event is
/// decoded on its own, so one bad element of an array does not cost the others.
/// Strings go to `arena`; `pos` is the record's place in the log (its `item` is set
/// here, per element).
pub fn decode(
    source: Source,
    pos: Pos,
    value: &[u8],
    arena: &mut Arena,
    out: &mut Vec<Event>,
    refused: &mut Vec<Refusal>,
) {
    let whole = |reason: String| Refusal {
        event: None,
        reason,
    };
    let Some(&first) = value.iter().find(|b| !b.is_ascii_whitespace()) else {
        refused.push(whole("record value is empty".into()));
        return;
    };
    let text = match std::str::from_utf8(value) {
        Ok(text) => text,
        Err(e) => {
            refused.push(whole(format!(
                "invalid JSON: the record is not UTF-8 (byte {})",
                e.valid_up_to()
            )));
            return;
        }
    };
    let read = match source {
        Source::Users => read::<RawUser<'_>>,
        Source::Organizations => read::<RawOrg<'_>>,
    };
    read(first == b'[', text, pos, arena, out, refused);
}

/// [`decode`] once the record is known to be UTF-8, for one kind of event.
fn read<'a, R: Raw<'a>>(
    array: bool,
    text: &'a str,
    pos: Pos,
    arena: &mut Arena,
    out: &mut Vec<Event>,
    refused: &mut Vec<Refusal>,
) {
    if !array {
        let mut raw = R::default();
        let event = json::object(text, |name, value| raw.member(name, value))
            .and_then(|()| raw.event(Pos { item: 0, ..pos }, arena));
        match event {
            Ok(event) => out.push(event),
            Err(reason) => refused.push(Refusal {
                event: None,
                reason,
            }),
        }
        return;
    }
    // What an array that turns out not to be JSON takes back.
    let marks = (out.len(), refused.len(), arena.len());
    let mut elements = |out: &mut Vec<Event>, refused: &mut Vec<Refusal>| -> Result<u32, String> {
        let mut items = json::Objects::new(text)?;
        let mut index = 0u32;
        loop {
            let mut raw = R::default();
            let Some(read) = items.next_object(|name, value| raw.member(name, value))? else {
                return Ok(index);
            };
            let pos = Pos { item: index, ..pos };
            match read.and_then(|()| raw.event(pos, arena)) {
                Ok(event) => out.push(event),
                Err(reason) => refused.push(Refusal {
                    event: Some(index),
                    reason: format!("event {index}: {reason}"),
                }),
            }
            index = index.saturating_add(1);
        }
    };
    let whole = match elements(out, refused) {
        Ok(0) => "the record is an empty JSON array: no events".to_string(),
        Ok(_) => return,
        Err(e) => format!("invalid JSON array: {e}"),
    };
    out.truncate(marks.0);
    refused.truncate(marks.1);
    arena.truncate(marks.2);
    refused.push(Refusal {
        event: None,
        reason: whole,
    });
}

fn required_key<'a>(name: &str, value: &'a Option<Cow<'_, str>>) -> Result<&'a str, String> {
    let value = value
        .as_deref()
        .ok_or_else(|| format!("missing field `{name}`"))?;
    if value.trim().is_empty() {
        return Err(format!("field `{name}` is empty"));
    }
    if value.len() > MAX_KEY_BYTES {
        return Err(format!(
            "field `{name}` is {} bytes, more than {MAX_KEY_BYTES}",
            value.len()
        ));
    }
    Ok(value)
}

fn timestamp(name: &str, value: Option<&str>) -> Result<Micros, String> {
    let value = value.ok_or_else(|| format!("missing field `{name}`"))?;
    time::parse(value).map_err(|e| format!("field `{name}`: {e}"))
}

/// Reads `event_type`, accepting the documented spelling and its obvious variants
/// ("user_created", "USER CREATED"): producers differ, the meaning does not.
fn action(event_type: &str) -> Option<Action> {
    let t = event_type.trim().as_bytes();
    let (prefix, verb) = (t.get(..5)?, t.get(5..)?);
    let same = |a: &[u8], b: &[u8]| {
        a.len() == b.len()
            && a.iter().zip(b).all(|(&x, &y)| {
                let x = if x == b'_' || x == b'-' { b' ' } else { x };
                x.eq_ignore_ascii_case(&y)
            })
    };
    if !same(prefix, b"user ") {
        return None;
    }
    [
        (&b"created"[..], Action::Created),
        (b"updated", Action::Updated),
        (b"deleted", Action::Deleted),
    ]
    .into_iter()
    .find_map(|(name, action)| same(verb, name).then_some(action))
}

fn user_event(raw: RawUser<'_>, pos: Pos, arena: &mut Arena) -> Result<UserEvent, String> {
    let id = required_key("id", &raw.id)?;
    let event_type = raw.event_type.ok_or("missing field `event_type`")?;
    let action = action(&event_type).ok_or_else(|| {
        format!(
            "unknown event_type {:?}: expected \"User Created\", \"User Updated\" or \"User Deleted\"",
            event_type.chars().take(64).collect::<String>()
        )
    })?;
    let at = Stamp::new(timestamp("received_at", raw.received_at.as_deref())?, pos);
    let id = arena.push(id);
    let fields = raw.fields.map(|f| f.map(|f| arena.push(&f)));
    Ok(UserEvent {
        id,
        action,
        at,
        fields,
    })
}

fn org_event(raw: RawOrg<'_>, pos: Pos, arena: &mut Arena) -> Result<OrgEvent, String> {
    let key = required_key("organization_key", &raw.organization_key)?;
    let name = required_key("organization_name", &raw.organization_name)?;
    let created_at = timestamp("created_at", raw.created_at.as_deref())?;
    let version = match (raw.updated_at.as_deref(), raw.received_at.as_deref()) {
        (Some(t), _) => timestamp("updated_at", Some(t))?,
        (None, Some(t)) => timestamp("received_at", Some(t))?,
        (None, None) => created_at,
    };
    Ok(OrgEvent {
        key: arena.push(key),
        name: arena.push(name),
        tier: raw.organization_tier.map(|t| arena.push(&t)),
        created_at,
        version: Stamp::new(version, pos),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(source: Source, value: &str) -> (Vec<Event>, Vec<Refusal>) {
        run_in(&mut Arena::default(), source, value)
    }

    fn run_in(arena: &mut Arena, source: Source, value: &str) -> (Vec<Event>, Vec<Refusal>) {
        let (mut out, mut refused) = (Vec::new(), Vec::new());
        let pos = Pos {
            partition: 2,
            offset: 7,
            item: 0,
        };
        decode(source, pos, value.as_bytes(), arena, &mut out, &mut refused);
        (out, refused)
    }

    #[test]
    fn seed_user_event_decodes() {
        let mut arena = Arena::default();
        let (events, refused) = run_in(
            &mut arena,
            Source::Users,
            r#"{"id":"069f","event_type":"User Created","username":"Snake","user_email":"s@o.com",
               "user_type":"Admin","organization_name":"Metal Gear Solid","received_at":"2020-12-08 20:03:16.759617"}"#,
        );
        assert!(refused.is_empty(), "{refused:?}");
        let Event::User(u) = &events[0] else {
            panic!("not a user event: {events:?}")
        };
        assert_eq!(arena.get(u.id), "069f");
        assert_eq!(u.action, Action::Created);
        assert_eq!(
            u.fields[ORGANIZATION_NAME].map(|s| arena.get(s)),
            Some("Metal Gear Solid")
        );
        assert_eq!(u.at.at, time::parse("2020-12-08 20:03:16.759617").unwrap());
        assert_eq!((u.at.pos.partition, u.at.pos.offset), (2, 7));
    }

    #[test]
    fn array_with_a_bad_element_keeps_the_good_ones() {
        let (events, refused) = run(
            Source::Users,
            r#"[{"id":"a","event_type":"User Deleted","received_at":"2020-01-01 00:00:00"},
                {"id":"b","event_type":"User Exploded","received_at":"2020-01-01 00:00:00"},
                42,
                {"id":"c","event_type":"user_updated","received_at":"2020-01-01T00:00:00Z","username":"C"}]"#,
        );
        assert_eq!(events.len(), 2);
        let items: Vec<u32> = events
            .iter()
            .map(|e| match e {
                Event::User(u) => u.at.pos.item,
                Event::Org(o) => o.version.pos.item,
            })
            .collect();
        assert_eq!(items, [0, 3], "each event knows its element of the array");
        assert_eq!(refused.len(), 2);
        assert_eq!(refused[0].event, Some(1));
        assert!(
            refused[0].reason.contains("unknown event_type"),
            "{refused:?}"
        );
        assert_eq!(refused[1].event, Some(2));
        assert!(
            refused[1].reason.contains("wrong field type"),
            "{refused:?}"
        );
    }

    #[test]
    fn every_kind_of_bad_record_gets_a_reason() {
        let cases = [
            ("", "empty"),
            (" [ ] ", "empty JSON array"),
            ("   ", "empty"),
            ("{\"id\":", "invalid JSON"),
            ("[{\"id\":\"a\"}", "invalid JSON array"),
            ("\"just a string\"", "wrong field type"),
            (
                "{\"event_type\":\"User Created\",\"received_at\":\"2020-01-01 00:00:00\"}",
                "missing field `id`",
            ),
            (
                "{\"id\":\"  \",\"event_type\":\"User Created\",\"received_at\":\"2020-01-01 00:00:00\"}",
                "is empty",
            ),
            (
                "{\"id\":\"a\",\"received_at\":\"2020-01-01 00:00:00\"}",
                "missing field `event_type`",
            ),
            (
                "{\"id\":\"a\",\"event_type\":\"User Created\"}",
                "missing field `received_at`",
            ),
            (
                "{\"id\":\"a\",\"event_type\":\"User Created\",\"received_at\":\"soon\"}",
                "invalid timestamp",
            ),
            (
                "{\"id\":5,\"event_type\":\"User Created\",\"received_at\":\"2020-01-01 00:00:00\"}",
                "wrong field type",
            ),
            (
                "{\"id\":\"a\",\"event_type\":\"User Created\",\"received_at\":\"2020-01-01 00:00:00\",\"username\":[1]}",
                "wrong field type",
            ),
        ];
        for (value, expected) in cases {
            let (events, refused) = run(Source::Users, value);
            assert!(events.is_empty(), "{value:?} decoded to {events:?}");
            assert_eq!(refused.len(), 1, "{value:?}");
            assert!(
                refused[0].reason.contains(expected),
                "{value:?}: {:?} does not mention {expected:?}",
                refused[0].reason
            );
        }
    }

    #[test]
    fn an_array_that_is_not_json_takes_back_its_good_elements() {
        let good = r#"{"id":"a","event_type":"User Deleted","received_at":"2020-01-01 00:00:00"}"#;
        let mut arena = Arena::default();
        for broken in [
            format!("[{good},{good},{{\"id\":"),
            format!("[{good},{{\"x\":1}},42] trailing"),
            format!("[{good} {good}]"),
        ] {
            let (events, refused) = run_in(&mut arena, Source::Users, &broken);
            assert!(events.is_empty(), "{broken}: {events:?}");
            assert_eq!(refused.len(), 1, "{broken}: {refused:?}");
            assert_eq!(refused[0].event, None);
            assert!(
                refused[0].reason.starts_with("invalid JSON array: "),
                "{refused:?}"
            );
            assert!(arena.is_empty(), "{broken}: the arena kept its strings");
        }
        let (events, _) = run_in(&mut arena, Source::Users, &format!("[{good},{good}]"));
        assert_eq!(events.len(), 2);
        assert!(!arena.is_empty());
    }

    #[test]
    fn over_long_keys_and_deep_nesting_are_refused() {
        let long = "x".repeat(MAX_KEY_BYTES + 1);
        let value = format!(
            r#"{{"id":"{long}","event_type":"User Deleted","received_at":"2020-01-01 00:00:00"}}"#
        );
        let (_, refused) = run(Source::Users, &value);
        assert!(refused[0].reason.contains("more than 1024"), "{refused:?}");

        // Deep nesting never overflows the stack: as the record it is refused, inside
        // an unknown field it is skipped like any unknown field.
        let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let (events, refused) = run(Source::Users, &nest(100_000));
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(refused.len(), 1, "{refused:?}");
        for deep in [
            format!(
                r#"{{"id":"a","event_type":"User Deleted","received_at":"2020-01-01 00:00:00","extra":{}}}"#,
                nest(100_000)
            ),
            format!(
                r#"[{{"id":"a","event_type":"User Deleted","received_at":"2020-01-01 00:00:00","extra":{}}}]"#,
                nest(100_000)
            ),
        ] {
            let (events, refused) = run(Source::Users, &deep);
            assert_eq!(events.len(), 1, "{refused:?}");
        }
    }

    #[test]
    fn organization_version_prefers_updated_at() {
        let (events, refused) = run(
            Source::Organizations,
            r#"{"organization_key":"k","organization_name":"N","organization_tier":"Small",
                "created_at":"2018-01-24 17:28:09.000000","updated_at":"2019-01-01T00:00:00Z"}"#,
        );
        assert!(refused.is_empty(), "{refused:?}");
        let Event::Org(o) = &events[0] else {
            panic!("not an org event")
        };
        assert_eq!(o.version.at, time::parse("2019-01-01T00:00:00Z").unwrap());
        assert_eq!(o.created_at, time::parse("2018-01-24 17:28:09").unwrap());

        let (_, refused) = run(
            Source::Organizations,
            r#"{"organization_key":"k","created_at":"2018-01-24 17:28:09"}"#,
        );
        assert!(
            refused[0].reason.contains("organization_name"),
            "{refused:?}"
        );
    }
}
