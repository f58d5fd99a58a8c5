//! `logq produce`: turns a JSON array file or JSON lines into one record per event.

use std::io::Read;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::broker::producer::RecordProducer;
use crate::config::ProduceConfig;

/// One record to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record value.
    pub value: Vec<u8>,
}

/// Which field keys the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyBy {
    /// `id`, else `organization_key`.
    Default,
    /// This field.
    Field(String),
    /// No key.
    None,
}

/// Splits `text` into records: a JSON array gives one record per element; otherwise
/// every JSON value in turn (JSON lines, or objects one after another) is a record,
/// and an array among them is split too.
///
/// # Errors
/// Invalid JSON, with its line and column. Nothing is produced then.
pub fn parse_events(text: &str, key_by: &KeyBy) -> anyhow::Result<Vec<Outgoing>> {
    let mut out = Vec::new();
    let stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    for value in stream {
        let value = value.context("input is not valid JSON")?;
        match value {
            serde_json::Value::Array(items) => {
                for item in items {
                    out.push(outgoing(item, key_by)?);
                }
            }
            other => out.push(outgoing(other, key_by)?),
        }
    }
    Ok(out)
}

/// Every non-empty line as it is: for producing deliberately bad records.
pub fn raw_lines(text: &str) -> Vec<Outgoing> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Outgoing {
            key: None,
            value: l.as_bytes().to_vec(),
        })
        .collect()
}

fn outgoing(event: serde_json::Value, key_by: &KeyBy) -> anyhow::Result<Outgoing> {
    let field = |name: &str| match event.get(name) {
        Some(serde_json::Value::String(s)) => Some(s.as_bytes().to_vec()),
        Some(serde_json::Value::Null) | None => None,
        Some(other) => Some(other.to_string().into_bytes()),
    };
    let key = match key_by {
        KeyBy::Default => field("id").or_else(|| field("organization_key")),
        KeyBy::Field(name) => {
            Some(field(name).with_context(|| format!("an event has no field {name:?}: {event}"))?)
        }
        KeyBy::None => None,
    };
    Ok(Outgoing {
        key,
        value: serde_json::to_vec(&event)?,
    })
}

/// What `logq produce` delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produced {
    /// Records the broker acknowledged.
    pub records: u64,
    /// The position they reached (a token for `X-Logq-Min-Position`).
    pub position: String,
}

/// Runs `logq produce`; returns what the broker acknowledged.
///
/// # Errors
/// Unreadable or invalid input, an unreachable broker, or any record not delivered.
pub fn run(config: &ProduceConfig) -> anyhow::Result<Produced> {
    let text = match config.file.as_deref() {
        Some(path) if path.as_os_str() != "-" => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        _ => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading standard input")?;
            s
        }
    };
    let key_by = match (&config.key_field, config.no_key) {
        (_, true) => KeyBy::None,
        (Some(f), false) => KeyBy::Field(f.clone()),
        (None, false) => KeyBy::Default,
    };
    let records = if config.raw_lines {
        raw_lines(&text)
    } else {
        parse_events(&text, &key_by)?
    };
    let producer = RecordProducer::new(&config.kafka)?;
    producer.check(&config.kafka.brokers, &config.topic, Duration::from_secs(5))?;
    for r in &records {
        producer
            .send(&config.topic, r.key.as_deref(), &r.value, &[])
            .with_context(|| format!("producing to {}", config.topic))?;
    }
    producer
        .flush(Duration::from_secs(30))
        .context("waiting for the broker to acknowledge")?;
    let d = producer.deliveries();
    let failed = d.failed.load(std::sync::atomic::Ordering::Relaxed);
    if failed > 0 {
        bail!(
            "{failed} of {} records were not delivered: {}",
            records.len(),
            d.last_error().unwrap_or_default()
        );
    }
    Ok(Produced {
        records: d.delivered.load(std::sync::atomic::Ordering::Relaxed),
        position: d.position(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_file_and_json_lines_give_one_record_per_event() {
        let array = r#"[{"id":"a","x":1},{"organization_key":"k"}]"#;
        let lines = "{\"id\":\"a\",\"x\":1}\n\n{\"organization_key\":\"k\"}\n";
        let a = parse_events(array, &KeyBy::Default).unwrap();
        assert_eq!(a, parse_events(lines, &KeyBy::Default).unwrap());
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].key.as_deref(), Some(&b"a"[..]));
        assert_eq!(a[1].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(a[0].value, br#"{"id":"a","x":1}"#);
    }

    #[test]
    fn key_options() {
        let text = r#"{"id":"a","n":7}"#;
        assert_eq!(parse_events(text, &KeyBy::None).unwrap()[0].key, None);
        assert_eq!(
            parse_events(text, &KeyBy::Field("n".into())).unwrap()[0]
                .key
                .as_deref(),
            Some(&b"7"[..])
        );
        assert!(parse_events(text, &KeyBy::Field("missing".into())).is_err());
    }

    #[test]
    fn invalid_json_is_an_error_with_position() {
        let e = parse_events("{\"id\":\"a\"}\n{oops}", &KeyBy::Default).unwrap_err();
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
    }

    #[test]
    fn raw_lines_keep_bytes_as_they_are() {
        let r = raw_lines("not json\n\n{\"id\":1}\n");
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].value, b"not json");
    }
}
