//! Splitting one users-topic record into its users' events: what the re-key stage
//! needs of a record (its events and each one's `id`), nothing the fold judges.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;

/// One user's events of an input record.
#[derive(Debug, PartialEq, Eq)]
pub struct UserEvents<'a> {
    /// The user's id: the record's key.
    pub id: Cow<'a, str>,
    /// Positions of the events in the input record, in its order.
    pub elements: Vec<usize>,
    /// The record's value: the one event as it came, or a JSON array of them.
    pub value: Cow<'a, [u8]>,
}

/// An input record split by user.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Split<'a> {
    /// Each user's events, users in the order they first appear.
    pub users: Vec<UserEvents<'a>>,
    /// Why events cannot be routed: by position in the array (`None`: the whole
    /// record).
    pub refused: Vec<(Option<usize>, String)>,
}

impl Split<'_> {
    fn refused(reason: impl Into<String>) -> Self {
        Self {
            users: Vec::new(),
            refused: vec![(None, reason.into())],
        }
    }

    /// The reasons, as the fold's dead letters give them (`; `-separated, each
    /// event's prefixed `event N: `).
    pub fn reason(&self) -> String {
        self.refused
            .iter()
            .map(|(at, why)| match at {
                Some(i) => format!("event {i}: {why}"),
                None => why.clone(),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The refused positions, comma-separated (empty when the whole record is).
    pub fn refused_positions(&self) -> String {
        self.refused
            .iter()
            .filter_map(|(at, _)| at.map(|i| i.to_string()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What routing needs of an event: its `id`, a string. Everything else is the fold's
/// to judge.
#[derive(Deserialize)]
struct Keyed<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
}

/// The id of one event, or why it has none a partition can be found from.
fn id_of(event: &RawValue) -> Result<Cow<'_, str>, String> {
    if !event.get().starts_with('{') {
        return Err("not a JSON object".into());
    }
    match serde_json::from_str::<Keyed<'_>>(event.get()) {
        Ok(Keyed { id: Some(id) }) => Ok(id),
        Ok(Keyed { id: None }) => Err("missing field `id`".into()),
        Err(e) if e.is_data() => Err(format!("field `id`: {e}")),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

/// Splits a record's value (one JSON event or an array of them, as the README says)
/// into its users' events.
pub fn split(value: &[u8]) -> Split<'_> {
    if value.is_empty() {
        return Split::refused("record value is empty");
    }
    let raw: &RawValue = match serde_json::from_slice(value) {
        Ok(raw) => raw,
        Err(e) => return Split::refused(format!("invalid JSON: {e}")),
    };
    let text = raw.get();
    if text.starts_with('{') {
        return match id_of(raw) {
            Ok(id) => Split {
                users: vec![UserEvents {
                    id,
                    elements: vec![0],
                    value: Cow::Borrowed(text.as_bytes()),
                }],
                refused: Vec::new(),
            },
            Err(why) => Split::refused(why),
        };
    }
    if !text.starts_with('[') {
        return Split::refused("not a JSON object or array");
    }
    let events: Vec<&RawValue> = match serde_json::from_str(text) {
        Ok(events) => events,
        Err(e) => return Split::refused(format!("invalid JSON: {e}")),
    };
    if events.is_empty() {
        return Split::refused("empty JSON array");
    }
    let mut out = Split::default();
    let mut grouped: Vec<(Cow<'_, str>, Vec<usize>)> = Vec::new();
    let mut index: HashMap<Cow<'_, str>, usize> = HashMap::new();
    for (i, event) in events.iter().enumerate() {
        match id_of(event) {
            Ok(id) => {
                let next = grouped.len();
                let at = *index.entry(id.clone()).or_insert(next);
                if at == next {
                    grouped.push((id, Vec::new()));
                }
                grouped[at].1.push(i);
            }
            Err(why) => out.refused.push((Some(i), why)),
        }
    }
    out.users = grouped
        .into_iter()
        .map(|(id, elements)| {
            let value = if let [only] = elements[..] {
                Cow::Borrowed(events[only].get().as_bytes())
            } else {
                let mut joined = Vec::with_capacity(2 + elements.len() * 64);
                joined.push(b'[');
                for (n, i) in elements.iter().enumerate() {
                    if n > 0 {
                        joined.push(b',');
                    }
                    joined.extend_from_slice(events[*i].get().as_bytes());
                }
                joined.push(b']');
                Cow::Owned(joined)
            };
            UserEvents {
                id,
                elements,
                value,
            }
        })
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids<'a>(s: &'a Split<'a>) -> Vec<(&'a str, Vec<usize>, &'a str)> {
        s.users
            .iter()
            .map(|u| {
                (
                    u.id.as_ref(),
                    u.elements.clone(),
                    std::str::from_utf8(&u.value).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn one_event_goes_on_as_it_came() {
        let value = br#" {"id":"a","event_type":"User Created"} "#;
        let s = split(value);
        assert_eq!(
            ids(&s),
            [("a", vec![0], r#"{"id":"a","event_type":"User Created"}"#)]
        );
        assert!(s.refused.is_empty());
    }

    #[test]
    fn an_array_is_split_by_user_keeping_each_users_order() {
        let value = br#"[{"id":"a","n":1}, {"id":"b","n":2},{"id":"a","n":3},{"id":"c\u0041"}]"#;
        let s = split(value);
        assert_eq!(
            ids(&s),
            [
                ("a", vec![0, 2], r#"[{"id":"a","n":1},{"id":"a","n":3}]"#),
                ("b", vec![1], r#"{"id":"b","n":2}"#),
                // An escaped id is the id it spells.
                ("cA", vec![3], r#"{"id":"c\u0041"}"#),
            ]
        );
        assert!(s.refused.is_empty());
    }

    #[test]
    fn what_cannot_be_routed_is_refused_with_the_folds_words() {
        let whole = |v: &[u8]| split(v).reason();
        assert_eq!(whole(b""), "record value is empty");
        assert!(whole(b"{not json").starts_with("invalid JSON"));
        assert!(whole(&[0xff, 0xfe]).starts_with("invalid JSON"));
        assert_eq!(whole(b"[]"), "empty JSON array");
        assert_eq!(whole(b"42"), "not a JSON object or array");
        assert_eq!(
            whole(br#"{"event_type":"User Created"}"#),
            "missing field `id`"
        );
        assert_eq!(whole(br#"{"id":null}"#), "missing field `id`");
        assert!(whole(br#"{"id":7}"#).starts_with("field `id`: invalid type"));
        assert!(whole(br#"{"id":"a","id":"b"}"#).contains("duplicate field `id`"));

        let mixed = split(br#"[{"id":"a"}, 5, {"x":1}, {"id":"b"}]"#);
        assert_eq!(
            ids(&mixed)
                .iter()
                .map(|(id, e, _)| (*id, e.clone()))
                .collect::<Vec<_>>(),
            [("a", vec![0]), ("b", vec![3])]
        );
        assert_eq!(
            mixed.reason(),
            "event 1: not a JSON object; event 2: missing field `id`"
        );
        assert_eq!(mixed.refused_positions(), "1,2");
    }
}
