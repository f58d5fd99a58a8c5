//! The end-to-end tests' oracle: the answers the README's "Event rules" give, written
//! from those rules alone. It shares no code with the reducer (no `logq_reducer`, no
//! `logq_abi`): it sorts each entity's events and applies the rules one by one, where
//! the reducer merges states in a semilattice. `logq_reducer::Batch` stays the
//! reference of the differential tests, not of these.
//!
//! Input: each topic's values in the order they were produced, keyed (as `logq
//! produce` keys them by default), so all of an entity's events are in one partition
//! and a later value in the list is a later offset: on equal event times it wins.

use std::collections::BTreeMap;

use serde_json::Value;

/// One user's live record while the rules are applied in order.
#[derive(Default, Clone)]
struct Live {
    fields: BTreeMap<&'static str, String>,
    created_at: String,
    updated_at: String,
}

const USER_FIELDS: [&str; 4] = ["username", "user_email", "user_type", "organization_name"];

/// `GET /users/{id}` for every visible user: `id` -> answer.
///
/// # Panics
/// On an event that is not what the README accepts (the tests feed only good events
/// through here; refused records are the dead-letter tests' business).
pub fn answers(users: &[String], organizations: &[String]) -> BTreeMap<String, Value> {
    let orgs = organizations_by_name(organizations);
    // id -> its events as (event time, place in the log, event).
    let mut by_id: BTreeMap<String, Vec<(String, usize, Value)>> = BTreeMap::new();
    for (place, value) in users.iter().enumerate() {
        for event in events(value) {
            let id = text(&event, "id").expect("user event without id");
            let at = event_time(&text(&event, "received_at").expect("received_at"));
            by_id.entry(id).or_default().push((at, place, event));
        }
    }
    let mut out = BTreeMap::new();
    for (id, mut history) in by_id {
        // "Newer" is a later event time; equal times: the later in the log.
        history.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        let mut live: Option<Live> = None;
        for (at, _, event) in history {
            let kind = text(&event, "event_type").expect("event_type");
            match normalise_type(&kind).as_str() {
                // Created carries the whole record: nothing from before survives.
                "user created" => {
                    let mut user = Live {
                        created_at: at.clone(),
                        updated_at: at,
                        ..Live::default()
                    };
                    set_given(&mut user, &event);
                    live = Some(user);
                }
                // Updated changes the given fields of a live user only.
                "user updated" => {
                    if let Some(user) = &mut live {
                        set_given(user, &event);
                        user.updated_at = at;
                    }
                }
                "user deleted" => live = None,
                other => panic!("the oracle got an event type the README refuses: {other}"),
            }
        }
        let Some(user) = live else { continue };
        let mut answer = serde_json::json!({ "id": id });
        for name in USER_FIELDS {
            answer[name] = user
                .fields
                .get(name)
                .map_or(Value::Null, |v| v.clone().into());
        }
        answer["created_at"] = user.created_at.into();
        answer["updated_at"] = user.updated_at.into();
        answer["organization"] = user
            .fields
            .get("organization_name")
            .and_then(|name| orgs.get(name))
            .cloned()
            .unwrap_or(Value::Null);
        out.insert(id, answer);
    }
    out
}

/// The organization each name joins to: per key the newest event (by `updated_at`,
/// else `received_at`, else `created_at`; equal times: the later in the log), and of
/// two keys with one name, the smallest key.
fn organizations_by_name(organizations: &[String]) -> BTreeMap<String, Value> {
    let mut by_key: BTreeMap<String, (String, usize, Value)> = BTreeMap::new();
    for (place, value) in organizations.iter().enumerate() {
        for event in events(value) {
            let key = text(&event, "organization_key").expect("organization_key");
            let version = ["updated_at", "received_at", "created_at"]
                .iter()
                .find_map(|f| text(&event, f))
                .map(|t| event_time(&t))
                .expect("an organization event has created_at");
            let newer = by_key
                .get(&key)
                .is_none_or(|(v, p, _)| (&version, place) > (v, *p));
            if newer {
                by_key.insert(key, (version, place, event));
            }
        }
    }
    let mut by_name: BTreeMap<String, Value> = BTreeMap::new();
    // Keys in ascending order: the first key seen for a name is the smallest.
    for (key, (_, _, event)) in by_key {
        let name = text(&event, "organization_name").expect("organization_name");
        by_name.entry(name.clone()).or_insert_with(|| {
            serde_json::json!({
                "organization_key": key,
                "organization_name": name,
                "organization_tier": text(&event, "organization_tier"),
                "created_at": event_time(&text(&event, "created_at").expect("created_at")),
            })
        });
    }
    by_name
}

/// A record value is one event or an array of events.
fn events(value: &str) -> Vec<Value> {
    match serde_json::from_str(value).expect("the oracle gets valid JSON") {
        Value::Array(items) => items,
        one => vec![one],
    }
}

fn text(event: &Value, field: &str) -> Option<String> {
    event.get(field).and_then(Value::as_str).map(str::to_owned)
}

/// Sets every field the event gives (`null` or absent means "not given").
fn set_given(user: &mut Live, event: &Value) {
    for name in USER_FIELDS {
        if let Some(v) = text(event, name) {
            user.fields.insert(name, v);
        }
    }
}

/// `event_type` ignoring case, `_` and `-`.
fn normalise_type(t: &str) -> String {
    t.trim()
        .chars()
        .map(|c| match c {
            '_' | '-' => ' ',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// An event time as the answers render it (RFC 3339 UTC, microseconds), from the two
/// forms the README accepts: `2020-12-08 20:03:16.759617` (UTC) and RFC 3339 with
/// `Z`. Rendered times are fixed width, so they also sort as text.
pub fn event_time(t: &str) -> String {
    let t = t.trim().trim_end_matches('Z');
    let (date, clock) = t
        .split_once([' ', 'T'])
        .unwrap_or_else(|| panic!("the oracle only knows date and time: {t}"));
    let (whole, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    assert!(fraction.len() <= 6, "more than microseconds: {t}");
    format!("{date}T{whole}.{fraction:0<6}Z")
}

/// `snake@outerheaven.com` -> `s***@outerheaven.com`, as the README describes the proof
/// reducer (`mask-emails`); no `@`: `***`.
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, kind: &str, at: &str, fields: &[(&str, &str)]) -> String {
        let mut e = serde_json::json!({"id": id, "event_type": kind, "received_at": at});
        for (k, v) in fields {
            e[*k] = (*v).into();
        }
        e.to_string()
    }

    fn org(key: &str, name: &str, tier: &str, created: &str) -> String {
        serde_json::json!({"organization_key": key, "organization_name": name,
            "organization_tier": tier, "created_at": created})
        .to_string()
    }

    /// The rules, example by example, as the README states them.
    #[test]
    fn the_readme_rules() {
        let users = [
            // Re-created after a delete: nothing from before survives.
            user(
                "a",
                "User Created",
                "2020-01-01 00:00:01",
                &[("username", "old"), ("user_type", "Admin")],
            ),
            user("a", "User Deleted", "2020-01-01 00:00:02", &[]),
            user(
                "a",
                "user_created",
                "2020-01-01 00:00:03",
                &[("username", "new"), ("organization_name", "MGS")],
            ),
            // Late update: applied in time order, not arrival order.
            user(
                "a",
                "User Updated",
                "2020-01-01 00:00:02.5",
                &[("username", "late")],
            ),
            // Deleted for good; an older Created arriving later does not bring it back.
            user("b", "User Deleted", "2020-01-01 00:00:05", &[]),
            user(
                "b",
                "User Created",
                "2020-01-01 00:00:04",
                &[("username", "b")],
            ),
            // Equal times: the later in the log wins, not the larger value.
            user(
                "c",
                "User Created",
                "2020-01-01T00:00:01Z",
                &[("username", "x")],
            ),
            user(
                "c",
                "User Updated",
                "2020-01-01 00:00:02",
                &[("username", "zulu")],
            ),
            user(
                "c",
                "User Updated",
                "2020-01-01 00:00:02",
                &[("username", "alpha")],
            ),
        ];
        let orgs = [
            org("k2", "MGS", "Large", "2018-01-01 00:00:00"),
            org("k1", "MGS", "Small", "2018-01-01 00:00:00"),
            org("k1", "MGS", "Enterprise", "2018-01-01 00:00:00"),
        ];
        let got = answers(&users, &orgs);
        assert_eq!(got.keys().collect::<Vec<_>>(), ["a", "c"]);
        let a = &got["a"];
        assert_eq!(a["username"], "new");
        assert_eq!(a["user_type"], Value::Null, "Created drops older fields");
        assert_eq!(a["created_at"], "2020-01-01T00:00:03.000000Z");
        assert_eq!(a["updated_at"], "2020-01-01T00:00:03.000000Z");
        assert_eq!(a["organization"]["organization_key"], "k1", "smallest key");
        assert_eq!(
            a["organization"]["organization_tier"], "Enterprise",
            "later in the log"
        );
        assert_eq!(got["c"]["username"], "alpha");
        assert_eq!(got["c"]["organization"], Value::Null);
    }

    #[test]
    fn times_and_masks_render_as_documented() {
        assert_eq!(
            event_time("2020-12-08 20:03:16.759617"),
            "2020-12-08T20:03:16.759617Z"
        );
        assert_eq!(
            event_time("2018-01-24 17:28:09"),
            "2018-01-24T17:28:09.000000Z"
        );
        assert_eq!(
            event_time("2018-01-24T17:28:09.5Z"),
            "2018-01-24T17:28:09.500000Z"
        );
        assert_eq!(mask_email("snake@outerheaven.com"), "s***@outerheaven.com");
    }
}
