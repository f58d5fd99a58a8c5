//! `logq explain ID --host URL`: why an answer is what it is, as a table. Asks the host
//! (`GET /users/ID?explain=1`) which event set each field and which organization key
//! the user's name joined; with `--records`, reads each cited record from the broker
//! by partition and offset and prints it, so a wrong answer leads to the record that
//! caused it in one command.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::broker::consumer::read_at;
use crate::config::ExplainConfig;

/// Asks the host and renders the answer (and, with `--records`, the records).
///
/// # Errors
/// The host unreachable or refusing (its answer is the error), or the broker not
/// reachable with `--records`.
pub fn run(config: &ExplainConfig) -> anyhow::Result<String> {
    let route = if config.organization {
        "organizations"
    } else {
        "users"
    };
    let path = format!("/{route}/{}?explain=1", encode(&config.id));
    let (status, body) = super::preview::request(&config.host, "GET", &path, None, b"")?;
    if status != 200 {
        bail!("GET {path}: {status}: {body}");
    }
    let explained: Value = serde_json::from_str(&body).context("the host's answer is not JSON")?;
    let mut out = String::new();
    let cited = if config.organization {
        organization(&mut out, &explained)
    } else {
        user(&mut out, &explained)
    };
    if config.records {
        let places: Vec<(String, i32, i64)> =
            cited.iter().map(|c| (c.0.clone(), c.1, c.2)).collect();
        let values = read_at(&config.kafka, &places, Duration::from_secs(10))
            .with_context(|| format!("reading the cited records from {}", config.kafka.brokers))?;
        let _ = writeln!(out, "\nrecords:");
        for ((topic, partition, offset), value) in places.iter().zip(values) {
            let shown = value.map_or_else(
                || "(not in the log any more: compacted or deleted)".to_owned(),
                |v| String::from_utf8_lossy(&v).into_owned(),
            );
            let _ = writeln!(out, "{topic}/{partition}@{offset}: {shown}");
        }
    }
    Ok(out)
}

/// (topic, partition, offset) of each record a table cites, in order, each once.
type Cited = Vec<(String, i32, i64)>;

fn place(topic: &str, event: &Value) -> Option<(String, i32, i64, String)> {
    let partition = i32::try_from(event["partition"].as_i64()?).ok()?;
    let offset = event["offset"].as_i64()?;
    let element = event["element"].as_i64().unwrap_or(0);
    Some((
        topic.to_owned(),
        partition,
        offset,
        format!("{topic}/{partition}@{offset}#{element}"),
    ))
}

fn row(out: &mut String, cited: &mut Cited, what: &str, value: &str, topic: &str, event: &Value) {
    let (kind, at, at_place) = match place(topic, event) {
        Some((t, p, o, shown)) => {
            if !cited.contains(&(t.clone(), p, o)) {
                cited.push((t, p, o));
            }
            (
                event["event_type"].as_str().unwrap_or("?").to_owned(),
                event["at"].as_str().unwrap_or("?").to_owned(),
                shown,
            )
        }
        None => ("-".into(), "-".into(), "-".into()),
    };
    let _ = writeln!(out, "{what:<18} {value:<24} {kind:<18} {at:<28} {at_place}");
}

fn user(out: &mut String, e: &Value) -> Cited {
    let topic = e["topic"].as_str().unwrap_or("users");
    let p = &e["provenance"];
    let visible = if p["visible"] == true {
        "visible"
    } else {
        "not visible (404)"
    };
    let _ = writeln!(
        out,
        "user {}: {visible}; reducer {}",
        e["key"].as_str().unwrap_or("?"),
        short(e["reducer"]["sha256"].as_str().unwrap_or("?"))
    );
    let _ = writeln!(
        out,
        "{:<18} {:<24} {:<18} {:<28} topic/partition@offset#element",
        "field", "value", "set by", "event time"
    );
    let mut cited = Vec::new();
    for (name, stamp) in [("(created)", &p["created"]), ("(deleted)", &p["deleted"])] {
        row(out, &mut cited, name, "", topic, stamp);
    }
    if let Some(fields) = p["fields"].as_object() {
        for (name, f) in fields {
            let value = f["value"].as_str().map_or("null".to_owned(), str::to_owned);
            row(out, &mut cited, name, &value, topic, &f["set_by"]);
        }
    }
    let o = &e["organization"];
    if let Some(name) = o["name"].as_str() {
        let keys = o["keys_with_this_name"].as_array().map_or(0, Vec::len);
        let joined = o["joined"]
            .as_str()
            .unwrap_or("none (no organization has this name yet)");
        let _ = writeln!(
            out,
            "\norganization_name {name:?} joins {joined} ({keys} key(s) with this name; the smallest wins)"
        );
        let j = &o["joined_organization"];
        if let Some(version) = j["provenance"].get("version") {
            let t = j["topic"].as_str().unwrap_or("organizations");
            let tier = j["provenance"]["tier"].as_str().unwrap_or("null");
            row(out, &mut cited, "(organization)", tier, t, version);
        }
    }
    cited
}

fn organization(out: &mut String, e: &Value) -> Cited {
    let topic = e["topic"].as_str().unwrap_or("organizations");
    let p = &e["provenance"];
    let _ = writeln!(
        out,
        "organization {} ({:?}); joined by users of that name: {}; reducer {}",
        e["key"].as_str().unwrap_or("?"),
        p["name"].as_str().unwrap_or("?"),
        e["joined_by_users_named_it"],
        short(e["reducer"]["sha256"].as_str().unwrap_or("?"))
    );
    let mut cited = Vec::new();
    let tier = p["tier"].as_str().unwrap_or("null");
    row(out, &mut cited, "(version)", tier, topic, &p["version"]);
    cited
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// Percent-encodes everything but unreserved bytes, for a path segment.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
