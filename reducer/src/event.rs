//! Decoding record values into events, with a reason for everything refused.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::Source;
use crate::time::{self, Micros};

/// Keys longer than this are refused: they are almost surely not ids, and every
/// byte of a key is kept in memory for as long as the entity lives.
pub const MAX_KEY_BYTES: usize = 1024;

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

/// The user fields an event can set, in a fixed order (see [`USER_FIELDS`]).
pub type UserFields = [Option<String>; 4];

/// JSON names of the user fields, in the order of [`UserFields`].
pub const USER_FIELDS: [&str; 4] = ["username", "user_email", "user_type", "organization_name"];

/// Index of `organization_name` in [`UserFields`]: the join key.
pub const ORGANIZATION_NAME: usize = 3;

/// One decoded user event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEvent {
    /// The user's `id`.
    pub id: String,
    /// What happened.
    pub action: Action,
    /// `received_at`: event time.
    pub at: Micros,
    /// Fields the event carries; `None` where absent or null.
    pub fields: UserFields,
}

/// One decoded organization event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgEvent {
    /// `organization_key`: the organization's identity.
    pub key: String,
    /// `organization_name`: what users join on.
    pub name: String,
    /// `organization_tier`, if given.
    pub tier: Option<String>,
    /// `created_at`.
    pub created_at: Micros,
    /// Which of two events for one key wins: `updated_at` (or `received_at`) when the
    /// event has one, else `created_at`.
    pub version: Micros,
}

/// A decoded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// From the users topic.
    User(UserEvent),
    /// From the organizations topic.
    Org(OrgEvent),
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

#[derive(Deserialize)]
struct RawUser<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    event_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    received_at: Option<Cow<'a, str>>,
    #[serde(borrow)]
    username: Option<Cow<'a, str>>,
    #[serde(borrow)]
    user_email: Option<Cow<'a, str>>,
    #[serde(borrow)]
    user_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    organization_name: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawOrg<'a> {
    #[serde(borrow)]
    organization_key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    organization_name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    organization_tier: Option<Cow<'a, str>>,
    #[serde(borrow)]
    created_at: Option<Cow<'a, str>>,
    #[serde(borrow)]
    updated_at: Option<Cow<'a, str>>,
    #[serde(borrow)]
    received_at: Option<Cow<'a, str>>,
}

/// Decodes one record value: a JSON object or a JSON array of objects. Each event is
/// decoded on its own, so one bad element of an array does not cost the others.
pub fn decode(source: Source, value: &[u8], out: &mut Vec<Event>, refused: &mut Vec<Refusal>) {
    let whole = |reason: String| Refusal {
        event: None,
        reason,
    };
    let Some(&first) = value.iter().find(|b| !b.is_ascii_whitespace()) else {
        refused.push(whole("record value is empty".into()));
        return;
    };
    if first == b'[' {
        match serde_json::from_slice::<Vec<&RawValue>>(value) {
            Ok(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    let index = u32::try_from(i).unwrap_or(u32::MAX);
                    match decode_one(source, item.get().as_bytes()) {
                        Ok(event) => out.push(event),
                        Err(reason) => refused.push(Refusal {
                            event: Some(index),
                            reason: format!("event {index}: {reason}"),
                        }),
                    }
                }
            }
            Err(e) => refused.push(whole(format!("invalid JSON array: {e}"))),
        }
    } else {
        match decode_one(source, value) {
            Ok(event) => out.push(event),
            Err(reason) => refused.push(whole(reason)),
        }
    }
}

fn decode_one(source: Source, json: &[u8]) -> Result<Event, String> {
    match source {
        Source::Users => {
            let raw: RawUser = serde_json::from_slice(json).map_err(json_error)?;
            user_event(raw).map(Event::User)
        }
        Source::Organizations => {
            let raw: RawOrg = serde_json::from_slice(json).map_err(json_error)?;
            org_event(raw).map(Event::Org)
        }
    }
}

fn json_error(e: serde_json::Error) -> String {
    if e.is_data() {
        format!("wrong field type: {e}")
    } else {
        format!("invalid JSON: {e}")
    }
}

fn required_key(name: &str, value: Option<Cow<'_, str>>) -> Result<String, String> {
    let value = value.ok_or_else(|| format!("missing field `{name}`"))?;
    if value.trim().is_empty() {
        return Err(format!("field `{name}` is empty"));
    }
    if value.len() > MAX_KEY_BYTES {
        return Err(format!(
            "field `{name}` is {} bytes, more than {MAX_KEY_BYTES}",
            value.len()
        ));
    }
    Ok(value.into_owned())
}

fn timestamp(name: &str, value: Option<Cow<'_, str>>) -> Result<Micros, String> {
    let value = value.ok_or_else(|| format!("missing field `{name}`"))?;
    time::parse(&value).map_err(|e| format!("field `{name}`: {e}"))
}

fn action(event_type: &str) -> Option<Action> {
    // Accept the documented spelling and its obvious variants ("user_created",
    // "USER CREATED"): producers differ, the meaning does not.
    let normalized: String = event_type
        .trim()
        .chars()
        .map(|c| {
            if c == '_' || c == '-' {
                ' '
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    match normalized.as_str() {
        "user created" => Some(Action::Created),
        "user updated" => Some(Action::Updated),
        "user deleted" => Some(Action::Deleted),
        _ => None,
    }
}

fn user_event(raw: RawUser<'_>) -> Result<UserEvent, String> {
    let id = required_key("id", raw.id)?;
    let event_type = raw.event_type.ok_or("missing field `event_type`")?;
    let action = action(&event_type).ok_or_else(|| {
        format!(
            "unknown event_type {:?}: expected \"User Created\", \"User Updated\" or \"User Deleted\"",
            event_type.chars().take(64).collect::<String>()
        )
    })?;
    let at = timestamp("received_at", raw.received_at)?;
    let fields = [
        raw.username,
        raw.user_email,
        raw.user_type,
        raw.organization_name,
    ]
    .map(|f| f.map(Cow::into_owned));
    Ok(UserEvent {
        id,
        action,
        at,
        fields,
    })
}

fn org_event(raw: RawOrg<'_>) -> Result<OrgEvent, String> {
    let key = required_key("organization_key", raw.organization_key)?;
    let name = required_key("organization_name", raw.organization_name)?;
    let created_at = timestamp("created_at", raw.created_at)?;
    let version = match (raw.updated_at, raw.received_at) {
        (Some(t), _) => timestamp("updated_at", Some(t))?,
        (None, Some(t)) => timestamp("received_at", Some(t))?,
        (None, None) => created_at,
    };
    Ok(OrgEvent {
        key,
        name,
        tier: raw.organization_tier.map(Cow::into_owned),
        created_at,
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(source: Source, value: &str) -> (Vec<Event>, Vec<Refusal>) {
        let (mut out, mut refused) = (Vec::new(), Vec::new());
        decode(source, value.as_bytes(), &mut out, &mut refused);
        (out, refused)
    }

    #[test]
    fn seed_user_event_decodes() {
        let (events, refused) = run(
            Source::Users,
            r#"{"id":"069f","event_type":"User Created","username":"Snake","user_email":"s@o.com",
               "user_type":"Admin","organization_name":"Metal Gear Solid","received_at":"2020-12-08 20:03:16.759617"}"#,
        );
        assert!(refused.is_empty(), "{refused:?}");
        let Event::User(u) = &events[0] else {
            panic!("not a user event: {events:?}")
        };
        assert_eq!(u.id, "069f");
        assert_eq!(u.action, Action::Created);
        assert_eq!(
            u.fields[ORGANIZATION_NAME].as_deref(),
            Some("Metal Gear Solid")
        );
        assert_eq!(u.at, time::parse("2020-12-08 20:03:16.759617").unwrap());
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
        assert_eq!(o.version, time::parse("2019-01-01T00:00:00Z").unwrap());
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
