//! Why an answer is what it is: a state decoded back into the events that decided it
//! (the `explain` export of the WIT world `explaining-reducer`).
//!
//! Everything comes from the state itself: each field keeps the [`Stamp`] of the event
//! that set it (event time and place in the log), and the creation and deletion stamps
//! decide visibility. The event type is told by the stamps: a field set at the newest
//! "User Created" came with it (Created carries the whole record and drops what came
//! before); a field set later came with a "User Updated".

use crate::event::USER_FIELDS;
use crate::stamp::Stamp;
use crate::state::{OrgState, UserState, push_json_str};
use crate::time;

/// Explains the state of entity `key` of `kind` (0 user, 1 organization) as a JSON
/// object (written by hand: the reducer carries no JSON library).
///
/// # Errors
/// When `state` is not a state of this reducer for that kind, or the kind is unknown.
pub fn explain(kind: u8, key: &str, state: &[u8]) -> Result<String, String> {
    let mut out = String::with_capacity(512);
    match kind {
        0 => user(&mut out, &UserState::decode(state, key)?),
        1 => organization(&mut out, &OrgState::decode(state)?),
        other => return Err(format!("unknown entity kind {other}")),
    }
    Ok(out)
}

/// `{"at", "partition", "offset", "element", "event_type"}`.
fn event(out: &mut String, stamp: Stamp, event_type: &str) {
    out.push_str("{\"at\":\"");
    time::render_into(out, stamp.at);
    out.push_str(&format!(
        "\",\"partition\":{},\"offset\":{},\"element\":{},\"event_type\":\"{event_type}\"}}",
        stamp.pos.partition, stamp.pos.offset, stamp.pos.item
    ));
}

fn maybe_event(out: &mut String, stamp: Option<Stamp>, event_type: &str) {
    match stamp {
        Some(s) => event(out, s, event_type),
        None => out.push_str("null"),
    }
}

fn user(out: &mut String, u: &UserState<'_>) {
    out.push_str(if u.visible() {
        "{\"visible\":true,\"created\":"
    } else {
        "{\"visible\":false,\"created\":"
    });
    maybe_event(out, u.created, "User Created");
    out.push_str(",\"deleted\":");
    maybe_event(out, u.deleted, "User Deleted");
    out.push_str(",\"updated_at\":");
    match u.touched {
        Some(t) => {
            out.push('"');
            time::render_into(out, t);
            out.push('"');
        }
        None => out.push_str("null"),
    }
    out.push_str(",\"fields\":{");
    for (i, (name, field)) in USER_FIELDS.iter().zip(&u.fields).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(name);
        out.push_str("\":");
        let Some(f) = field else {
            out.push_str("null");
            continue;
        };
        // Created carries the whole record: a field with its stamp came with it.
        let kind = if Some(f.at) == u.created {
            "User Created"
        } else {
            "User Updated"
        };
        out.push_str("{\"value\":");
        push_json_str(out, &f.value);
        out.push_str(",\"set_by\":");
        event(out, f.at, kind);
        out.push('}');
    }
    out.push_str("}}");
}

fn organization(out: &mut String, o: &OrgState<'_>) {
    let c = &o.current;
    out.push_str("{\"name\":");
    push_json_str(out, &c.name);
    out.push_str(",\"tier\":");
    match &c.tier {
        Some(t) => {
            push_json_str(out, t);
        }
        None => out.push_str("null"),
    }
    out.push_str(",\"created_at\":\"");
    time::render_into(out, c.created_at);
    out.push_str("\",\"version\":");
    event(out, c.version, "organization event");
    out.push('}');
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::{Batch, Record, Source};

    fn fold(values: &[(i32, i64, &str)]) -> Vec<(u8, String, Vec<u8>)> {
        let records: Vec<Record<'_>> = values
            .iter()
            .map(|(partition, offset, v)| Record {
                source: Source::Users,
                partition: *partition,
                offset: *offset,
                value: v.as_bytes(),
            })
            .collect();
        let batch = Batch::new(&records);
        let updates = batch
            .fold(&vec![None; batch.plan().entities.len()])
            .unwrap();
        batch
            .plan()
            .entities
            .iter()
            .zip(updates)
            .map(|(e, u)| (e.kind as u8, e.key.clone(), u.state.unwrap()))
            .collect()
    }

    #[test]
    fn each_field_names_the_event_that_set_it() {
        let states = fold(&[
            (
                2,
                7,
                r#"[{"id":"a","event_type":"User Created","username":"first","user_type":"Admin","received_at":"2021-01-01 00:00:00"},{"id":"a","event_type":"user_updated","username":"second","received_at":"2021-01-01 00:00:05"}]"#,
            ),
            // Older: changes nothing.
            (
                0,
                3,
                r#"{"id":"a","event_type":"User Updated","username":"old","received_at":"2020-01-01 00:00:00"}"#,
            ),
        ]);
        let (kind, key, state) = &states[0];
        let e: Value = serde_json::from_str(&explain(*kind, key, state).unwrap()).unwrap();
        assert_eq!(e["visible"], true);
        assert_eq!(e["created"]["offset"], 7);
        assert_eq!(e["created"]["element"], 0);
        let username = &e["fields"]["username"];
        assert_eq!(username["value"], "second");
        assert_eq!(username["set_by"]["partition"], 2);
        assert_eq!(username["set_by"]["offset"], 7);
        assert_eq!(username["set_by"]["element"], 1);
        assert_eq!(username["set_by"]["event_type"], "User Updated");
        assert_eq!(username["set_by"]["at"], "2021-01-01T00:00:05.000000Z");
        assert_eq!(
            e["fields"]["user_type"]["set_by"]["event_type"],
            "User Created"
        );
        assert_eq!(e["fields"]["user_email"], Value::Null);
        assert_eq!(e["updated_at"], "2021-01-01T00:00:05.000000Z");
        assert!(explain(0, "a", b"not a state").is_err());
        assert!(explain(9, "a", state).is_err());
    }
}
