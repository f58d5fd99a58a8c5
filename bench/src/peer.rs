//! The peer a user would pick instead of logq: a hand-written Rust folder. An rdkafka
//! consumer on one thread hands batches of record values to a fold thread, which
//! decodes them with serde (borrowed strings), parses times to integers and applies the
//! README's event rules natively to `HashMap`s of users and organizations (a fast
//! hasher, no wasm, no hot swap, no HTTP). What it costs next to logq is the honest
//! price of a sandboxed, swappable fold.
//!
//! It runs as its own process (`logq-bench --peer-folder BOOTSTRAP ...`), so its
//! resident memory is its own: it reads until it has seen the records it was told
//! to expect, prints `caught-up SECONDS`, `rss BYTES` and `users N`, and with
//! `--peer-answers FILE` writes every visible user's answer there (`id\tjson` lines)
//! for the bench to compare with logq's. `--peer-no-fold` reads and hands over
//! batches without folding: its read rate shows that the peer's consumer side is
//! not what limits it.
//!
//! Rules covered: everything the bench history exercises (creations, partial
//! updates, deletions and re-creations, late and duplicated events, organization
//! replacements by `updated_at`, the join by name to the smallest key, equal times
//! decided by partition, offset and array element). Not covered: tombstone expiry
//! (the bench history spans 14 hours of event time, well inside the 7-day default).

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::Message as _;
use serde::Deserialize;

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// What decides "newer": event time, then partition, offset and array element.
type Stamp = (i64, i32, i64, u32);

/// One batch of record values, copied out of the client once.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    /// (end in `bytes`, organizations?, partition, offset)
    records: Vec<(usize, bool, i32, i64)>,
}

#[derive(Deserialize)]
struct UserEvent<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    #[serde(borrow)]
    received_at: Cow<'a, str>,
    #[serde(borrow, default)]
    username: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user_email: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    organization_name: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct OrganizationEvent<'a> {
    #[serde(borrow)]
    organization_key: Cow<'a, str>,
    #[serde(borrow, default)]
    organization_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    organization_tier: Option<Cow<'a, str>>,
    #[serde(borrow)]
    created_at: Cow<'a, str>,
    #[serde(borrow, default)]
    updated_at: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    received_at: Option<Cow<'a, str>>,
}

/// A field and the event that set it.
type Field = Option<(Stamp, Box<str>)>;

#[derive(Default)]
struct User {
    created: Option<Stamp>,
    deleted: Option<Stamp>,
    updated: Option<Stamp>,
    /// username, user_email, user_type, organization_name
    fields: [Field; 4],
}

struct Organization {
    stamp: Stamp,
    name: Box<str>,
    tier: Option<Box<str>>,
    created_at: i64,
}

#[derive(Default)]
struct Folder {
    users: Map<Box<str>, User>,
    organizations: Map<Box<str>, Organization>,
    by_name: Map<Box<str>, BTreeSet<Box<str>>>,
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2020-12-08 20:03:16.759617` (UTC) or RFC 3339, to µs since the epoch.
fn parse_time(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        b.get(r)?.iter().try_fold(0i64, |n, c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let days = days_from_civil(num(0..4)?, num(5..7)?, num(8..10)?);
    let mut micros = ((days * 24 + num(11..13)?) * 60 + num(14..16)?) * 60 * 1_000_000
        + num(17..19)? * 1_000_000;
    let mut at = 19;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let (mut frac, mut digits) = (0i64, 0);
        while let Some(c) = b.get(at).filter(|c| c.is_ascii_digit()) {
            if digits < 6 {
                frac = frac * 10 + i64::from(c - b'0');
                digits += 1;
            }
            at += 1;
        }
        micros += frac * 10i64.pow(6 - digits);
    }
    match b.get(at) {
        None | Some(b'Z' | b'z') => Some(micros),
        Some(sign @ (b'+' | b'-')) => {
            let offset = (num(at + 1..at + 3)? * 60 + num(at + 4..at + 6)?) * 60_000_000;
            Some(if *sign == b'+' {
                micros - offset
            } else {
                micros + offset
            })
        }
        _ => None,
    }
}

/// `event_type`, matched ignoring case, `_` and `-`.
fn kind(t: &str) -> Option<u8> {
    let mut norm = [0u8; 16];
    let mut n = 0;
    for c in t.bytes().filter(|c| !matches!(c, b' ' | b'_' | b'-')) {
        *norm.get_mut(n)? = c.to_ascii_lowercase();
        n += 1;
    }
    match &norm[..n] {
        b"usercreated" => Some(0),
        b"userupdated" => Some(1),
        b"userdeleted" => Some(2),
        _ => None,
    }
}

/// The events of a record value: one JSON object or an array of them (a value that is
/// neither gives none: logq dead-letters it, the peer skips it).
fn events<'a, T: Deserialize<'a>>(value: &'a [u8]) -> Vec<T> {
    if value.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'[') {
        serde_json::from_slice(value).unwrap_or_default()
    } else {
        serde_json::from_slice(value).into_iter().collect()
    }
}

impl Folder {
    fn user(&mut self, e: UserEvent<'_>, place: (i32, i64, u32)) -> Option<()> {
        let stamp = (parse_time(&e.received_at)?, place.0, place.1, place.2);
        let k = kind(&e.event_type)?;
        let user = match self.users.get_mut(e.id.as_ref()) {
            Some(u) => u,
            None => self.users.entry(e.id.as_ref().into()).or_default(),
        };
        let given = [e.username, e.user_email, e.user_type, e.organization_name];
        match k {
            0 => {
                if user.created.is_some_and(|c| c >= stamp) {
                    return Some(());
                }
                user.created = Some(stamp);
                for (field, value) in user.fields.iter_mut().zip(given) {
                    if field.as_ref().is_none_or(|(s, _)| *s < stamp) {
                        *field = value.map(|v| (stamp, v.as_ref().into()));
                    }
                }
            }
            1 => {
                user.updated = user.updated.max(Some(stamp));
                for (field, value) in user.fields.iter_mut().zip(given) {
                    if let Some(v) = value
                        && field.as_ref().is_none_or(|(s, _)| *s < stamp)
                    {
                        *field = Some((stamp, v.as_ref().into()));
                    }
                }
            }
            _ => user.deleted = user.deleted.max(Some(stamp)),
        }
        Some(())
    }

    fn organization(&mut self, e: OrganizationEvent<'_>, place: (i32, i64, u32)) -> Option<()> {
        let created_at = parse_time(&e.created_at)?;
        let newest = match e.updated_at.as_deref().or(e.received_at.as_deref()) {
            Some(t) => parse_time(t)?,
            None => created_at,
        };
        let stamp = (newest, place.0, place.1, place.2);
        let name: Box<str> = e.organization_name.as_deref().unwrap_or_default().into();
        if let Some(old) = self.organizations.get(e.organization_key.as_ref()) {
            if old.stamp >= stamp {
                return Some(());
            }
            if old.name != name
                && let Some(keys) = self.by_name.get_mut(&old.name)
            {
                keys.remove(e.organization_key.as_ref());
            }
        }
        let key: Box<str> = e.organization_key.as_ref().into();
        self.by_name
            .entry(name.clone())
            .or_default()
            .insert(key.clone());
        self.organizations.insert(
            key,
            Organization {
                stamp,
                name,
                tier: e.organization_tier.map(|t| t.as_ref().into()),
                created_at,
            },
        );
        Some(())
    }

    fn record(&mut self, value: &[u8], organizations: bool, partition: i32, offset: i64) {
        let place = |i: usize| (partition, offset, i as u32);
        if organizations {
            for (i, e) in events::<OrganizationEvent<'_>>(value)
                .into_iter()
                .enumerate()
            {
                let _ = self.organization(e, place(i));
            }
        } else {
            for (i, e) in events::<UserEvent<'_>>(value).into_iter().enumerate() {
                let _ = self.user(e, place(i));
            }
        }
    }

    /// Every visible user's answer, as logq renders it.
    fn answers(&self) -> impl Iterator<Item = (&str, serde_json::Value)> {
        let render = logq_reducer::time::render;
        self.users.iter().filter_map(move |(id, u)| {
            let created = u.created?;
            if u.deleted.is_some_and(|d| d > created) {
                return None;
            }
            let field = |i: usize| {
                u.fields[i]
                    .as_ref()
                    .filter(|(s, _)| *s >= created)
                    .map(|(_, v)| v.as_ref())
            };
            let updated = u.updated.filter(|s| *s > created).unwrap_or(created);
            let organization = field(3)
                .and_then(|name| self.by_name.get(name)?.first())
                .and_then(|key| Some((key, self.organizations.get(key)?)))
                .map(|(key, o)| {
                    serde_json::json!({"organization_key": key.as_ref(),
                        "organization_name": o.name.as_ref(), "organization_tier": o.tier.as_deref(),
                        "created_at": render(o.created_at)})
                });
            Some((
                id.as_ref(),
                serde_json::json!({"id": id.as_ref(), "username": field(0), "user_email": field(1),
                    "user_type": field(2), "organization_name": field(3),
                    "created_at": render(created.0), "updated_at": render(updated.0),
                    "organization": organization}),
            ))
        })
    }
}

/// How the peer is run.
pub struct Options<'a> {
    /// Bootstrap servers.
    pub bootstrap: &'a str,
    /// Records to read before it has caught up.
    pub records: usize,
    /// Read and hand over, but do not fold.
    pub no_fold: bool,
    /// Where to write the answers.
    pub answers: Option<&'a std::path::Path>,
}

/// The peer's process: reads, folds, reports on standard output.
///
/// # Errors
/// A broker error, or not all records within ten minutes.
pub fn run(o: &Options<'_>) -> anyhow::Result<()> {
    let start = Instant::now();
    // As logq sets them: a consumer that folds slower than the broker delivers fills
    // librdkafka's local queue, which then pauses fetching for a second by default
    // (`fetch.queue.backoff.ms`); the peer idled most of its time without this.
    let consumer = crate::broker::reading_all(
        o.bootstrap,
        "logq-bench-peer",
        &[
            ("fetch.queue.backoff.ms", "10"),
            ("fetch.wait.max.ms", "10"),
        ],
    )?;
    // Two batches in flight: the consumer fills one while the fold thread folds the other.
    let (tx, rx) = mpsc::sync_channel::<Batch>(2);
    let (back_tx, back_rx) = mpsc::channel::<Batch>();
    let no_fold = o.no_fold;
    let folder = std::thread::spawn(move || {
        let mut folder = Folder::default();
        for batch in rx {
            if !no_fold {
                let mut from = 0;
                for &(end, organizations, partition, offset) in &batch.records {
                    folder.record(&batch.bytes[from..end], organizations, partition, offset);
                    from = end;
                }
            }
            let _ = back_tx.send(batch);
        }
        folder
    });
    let deadline = start + Duration::from_secs(600);
    let (mut seen, mut batch) = (0, Batch::default());
    while seen < o.records {
        anyhow::ensure!(Instant::now() < deadline, "peer stuck at {seen} records");
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                seen += 1;
                batch
                    .bytes
                    .extend_from_slice(m.payload().unwrap_or_default());
                batch.records.push((
                    batch.bytes.len(),
                    m.topic() == "organizations",
                    m.partition(),
                    m.offset(),
                ));
                if batch.records.len() >= 4096 || seen == o.records {
                    let mut next = back_rx.try_recv().unwrap_or_default();
                    next.bytes.clear();
                    next.records.clear();
                    tx.send(std::mem::replace(&mut batch, next))
                        .context("the fold thread ended")?;
                }
            }
            Some(Err(e)) => anyhow::bail!("peer consumer: {e}"),
            None => {}
        }
    }
    drop(tx);
    let folder = folder
        .join()
        .map_err(|_| anyhow::anyhow!("the fold thread panicked"))?;
    let took = start.elapsed();
    drop(back_rx);
    drop(consumer);
    println!("caught-up {}", took.as_secs_f64());
    println!("rss {}", crate::broker::rss(std::process::id())?);
    println!("users {}", folder.answers().count());
    if let Some(path) = o.answers {
        use std::io::Write as _;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (id, answer) in folder.answers() {
            writeln!(out, "{id}\t{answer}")?;
        }
        out.flush()?;
    }
    Ok(())
}

/// What one run of the peer's process reported.
pub struct Ran {
    /// From starting its client to the last record folded.
    pub took: Duration,
    /// Its resident memory then, bytes.
    pub rss: u64,
    /// Visible users it holds.
    pub users: usize,
}

/// Runs the peer as its own process on `loaded`'s topics (this binary, in peer
/// mode); with `answers`, it writes its answers there.
///
/// # Errors
/// When it fails or reports nothing.
pub fn spawn(
    loaded: &crate::broker::Loaded,
    no_fold: bool,
    answers: Option<&std::path::Path>,
) -> anyhow::Result<Ran> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["--peer-folder", &loaded.broker.bootstrap])
        .args(["--peer-records", &loaded.records.to_string()]);
    if no_fold {
        cmd.arg("--peer-no-fold");
    }
    if let Some(path) = answers {
        cmd.arg("--peer-answers").arg(path);
    }
    let out = cmd.output().context("running the peer")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "the peer failed: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |name: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .with_context(|| format!("the peer printed no {name}: {text}"))
    };
    Ok(Ran {
        took: Duration::from_secs_f64(value("caught-up ")?),
        rss: value("rss ")? as u64,
        users: value("users ")? as usize,
    })
}

/// Checks that the peer's answers (written to `file`) are logq's `answers` (id, JSON
/// bytes from its export), the whole set.
///
/// # Errors
/// The first difference.
pub fn same_answers(file: &std::path::Path, answers: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).context("reading the peer's answers")?;
    let mut peer: std::collections::BTreeMap<&str, serde_json::Value> = text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(id, json)| Ok((id, serde_json::from_str(json)?)))
        .collect::<anyhow::Result<_>>()?;
    for (id, bytes) in answers {
        let ours: serde_json::Value = serde_json::from_slice(bytes)?;
        let theirs = peer
            .remove(id.as_str())
            .with_context(|| format!("the peer has no user {id}; logq answers {ours}"))?;
        anyhow::ensure!(
            theirs == ours,
            "user {id}: the peer answers {theirs}, logq {ours}"
        );
    }
    anyhow::ensure!(
        peer.is_empty(),
        "the peer shows {} users logq does not, e.g. {:?}",
        peer.len(),
        peer.keys().next()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_the_readme_says() {
        let t = parse_time("2020-12-08 20:03:16.759617").unwrap();
        assert_eq!(logq_reducer::time::render(t), "2020-12-08T20:03:16.759617Z");
        assert_eq!(parse_time("2020-12-08T22:03:16.759617+02:00"), Some(t));
        assert_eq!(parse_time("2020-12-08T20:03:16.7596171Z"), Some(t));
        assert_eq!(parse_time("2020-12-08 20:03"), None);
    }

    #[test]
    fn the_rules_hold_for_late_and_repeated_events() {
        let mut f = Folder::default();
        let ev = |s: &str, offset: i64, f: &mut Folder| f.record(s.as_bytes(), false, 0, offset);
        ev(
            r#"{"id":"a","event_type":"user_updated","user_type":"Admin","received_at":"2021-01-03 00:00:00"}"#,
            2,
            &mut f,
        );
        ev(
            r#"{"id":"a","event_type":"User Created","username":"x","user_type":"User","received_at":"2021-01-02 00:00:00"}"#,
            1,
            &mut f,
        );
        ev(
            r#"{"id":"a","event_type":"User Created","username":"old","received_at":"2021-01-01 00:00:00"}"#,
            0,
            &mut f,
        );
        let answers: Vec<_> = f.answers().collect();
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].1["username"], "x");
        assert_eq!(answers[0].1["user_type"], "Admin");
        assert_eq!(answers[0].1["updated_at"], "2021-01-03T00:00:00.000000Z");
        ev(
            r#"{"id":"a","event_type":"User Deleted","received_at":"2021-01-02 00:00:00"}"#,
            3,
            &mut f,
        );
        assert_eq!(
            f.answers().count(),
            0,
            "a deletion at the same time, later in the log"
        );
    }
}
