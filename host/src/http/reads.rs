//! Reads with a position: every answer says how far into the log it is
//! (`X-Logq-Position`), a read can require a position (`X-Logq-Min-Position` or
//! `?min_position=`) and waits up to `--read-wait-max-ms` for it, answers carry an
//! `ETag` (`If-None-Match` gives 304), and users and organizations can be listed in
//! key order with cursor pagination.

use std::time::Duration;

use futures_util::StreamExt as _;

use serde_json::json;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;

use super::api::{Api, MAX_ID_BYTES, percent_decode};
use super::reply::{error, json_reply};
use crate::broker::Positions;
use crate::broker::position;
use crate::state::{Page, StateStore};

/// Header naming the position an answer reflects.
pub const POSITION: &str = "x-logq-position";
/// Header (or query parameter `min_position`) naming the position a read requires.
pub const MIN_POSITION: &str = "x-logq-min-position";
/// Default page size of a listing.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest page size of a listing.
pub const MAX_LIMIT: usize = 1000;

/// What a request says about consistency.
#[derive(Debug, Default, Clone)]
pub struct Conditions {
    /// `X-Logq-Min-Position`, as sent.
    pub min_position: Option<String>,
    /// `If-None-Match`, as sent.
    pub if_none_match: Option<String>,
}

pub use super::api::Failure;

/// A read's outcome before headers: a JSON body for 200, or a finished response.
pub type Found = Result<String, Failure>;

/// The query parameters of a request, decoded; unknown names are refused.
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses `raw` (`a=1&b=x%20y`), allowing only `allowed` names (and
    /// `min_position`, which every read takes).
    ///
    /// # Errors
    /// A 400 response naming what is wrong.
    pub fn parse(raw: &str, allowed: &[&str]) -> Result<Self, Failure> {
        let mut out = Vec::new();
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| percent_decode(&s.replace('+', " "));
            let (Some(name), Some(value)) = (decode(name), decode(value)) else {
                return Err(bad(format!(
                    "query parameter {pair:?} is not valid percent-encoded UTF-8"
                )));
            };
            if name != "min_position" && !allowed.contains(&name.as_str()) {
                let mut names: Vec<&str> = allowed.to_vec();
                names.push("min_position");
                return Err(bad(format!(
                    "unknown query parameter {name:?}; this route takes {}",
                    names.join(", ")
                )));
            }
            if out.iter().any(|(n, _)| *n == name) {
                return Err(bad(format!("query parameter {name:?} is given twice")));
            }
            out.push((name, value));
        }
        Ok(Self(out))
    }

    /// The value of `name`, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `limit`: 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent.
    ///
    /// # Errors
    /// A 400 response for anything else.
    pub fn limit(&self) -> Result<usize, Failure> {
        match self.get("limit") {
            None => Ok(DEFAULT_LIMIT),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
                _ => Err(bad(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}, got {v:?}"
                ))),
            },
        }
    }

    /// `after`: the cursor (`next` of the previous page), at most an id long.
    ///
    /// # Errors
    /// A 400 response for an over-long cursor.
    pub fn after(&self) -> Result<Option<&str>, Failure> {
        match self.get("after") {
            Some(a) if a.len() > MAX_ID_BYTES => Err(bad(format!(
                "after is {} bytes; cursors are at most {MAX_ID_BYTES}",
                a.len()
            ))),
            other => Ok(other),
        }
    }
}

fn bad(message: String) -> Failure {
    Box::new(error(StatusCode::BAD_REQUEST, "bad_request", message))
}

/// Where a listing page starts and how long it is.
#[derive(Debug, Clone, Copy)]
pub struct PageSpec<'q> {
    /// `limit`.
    pub limit: usize,
    /// `after`.
    pub after: Option<&'q str>,
}

/// A listing: `limit`, `after` and the route's `extra` parameters, each checked
/// before anything is read.
pub async fn listing(
    api: &Api,
    conditions: Conditions,
    raw_query: &str,
    extra: &[&str],
    list: impl FnOnce(&StateStore, &Query, PageSpec<'_>) -> Found,
) -> Response {
    let mut allowed = vec!["limit", "after"];
    allowed.extend_from_slice(extra);
    let q = match Query::parse(raw_query, &allowed) {
        Ok(q) => q,
        Err(r) => return *r,
    };
    let page = match (q.limit(), q.after()) {
        (Ok(limit), Ok(after)) => PageSpec { limit, after },
        (Err(r), _) | (_, Err(r)) => return *r,
    };
    answer(api, conditions, &q, |s| list(s, &q, page)).await
}

/// Answers a read: waits for the required position (the header, else the query's
/// `min_position`), reads the position, then the answer, and adds `X-Logq-Position`
/// and, on 200, an `ETag` (304 when it matches `If-None-Match`).
pub async fn answer(
    api: &Api,
    conditions: Conditions,
    query: &Query,
    read: impl FnOnce(&StateStore) -> Found,
) -> Response {
    // Both are checked (a malformed one is refused, never ignored); the header wins.
    let mut wanted = None;
    for token in [
        query.get("min_position"),
        conditions.min_position.as_deref(),
    ]
    .into_iter()
    .flatten()
    {
        match api.reads.topics.parse_wanted(token) {
            Ok(w) => wanted = Some(w),
            Err(e) => return *bad(e),
        }
    }
    if let Some((mut ours, input)) = wanted {
        let deadline = std::time::Instant::now() + api.reads.wait_max;
        if !input.is_empty() {
            match through_stage(api, input, deadline).await {
                Ok(more) => {
                    for (p, at) in more {
                        let want = ours.entry(p).or_insert(at);
                        *want = (*want).max(at);
                    }
                }
                Err(r) => return *r,
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if let Err(behind) = reach(&api.store, &ours, left).await {
            return not_reached(api, &behind);
        }
    }
    // The position first: the answer read after it reflects at least that much.
    let at = api.reads.position_header(&api.store);
    respond(at, read(&api.store), conditions.if_none_match.as_deref())
}

/// The response to a read: `found`'s answer with its `ETag` (304 when `if_none_match`
/// matches it) or the failure, and the position `at` taken before it was read.
pub fn respond(at: Option<HeaderValue>, found: Found, if_none_match: Option<&str>) -> Response {
    let mut response = match found {
        Ok(body) => {
            let tag = etag(body.as_bytes());
            if if_none_match.is_some_and(|h| matches(h, &tag)) {
                let mut r = Response::new(String::new().into());
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                insert(&mut r, "etag", &tag);
                r
            } else {
                let mut r = Response::new(body.into());
                r.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/json"));
                insert(&mut r, "etag", &tag);
                r
            }
        }
        Err(r) => *r,
    };
    if let Some(at) = at {
        response.headers_mut().insert(POSITION, at);
    }
    response
}

/// Waits until the store's position has reached `wanted`, at most `max`; the
/// partitions still behind when it gives up.
async fn reach(store: &StateStore, wanted: &Positions, max: Duration) -> Result<(), Positions> {
    let mut rx = store.watch_position();
    let deadline = tokio::time::Instant::now() + max;
    loop {
        let behind = position::behind(&rx.borrow_and_update(), wanted);
        if behind.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => return Err(behind),
        }
    }
}

/// What a position of the producers' users topic (`input`: next offset per partition)
/// requires of the internal topic this host folds: once the re-key stage has
/// committed past it (waited for until `deadline`), the high watermark of every
/// partition this host answers for (see [`crate::broker::rekey::Written`]).
async fn through_stage(
    api: &Api,
    input: std::collections::BTreeMap<i32, i64>,
    deadline: std::time::Instant,
) -> Result<Positions, Failure> {
    let Some(stage) = api.reads.stage.clone() else {
        return Err(bad("this host re-keys no topic".into()));
    };
    let mut partitions: Vec<i32> = Vec::new();
    if let Some(c) = &api.cluster {
        partitions.extend(c.owned());
        partitions.extend(c.standby().keys());
    }
    let topic = stage.input().to_owned();
    let asked = tokio::task::spawn_blocking(move || {
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let timeout = left.clamp(Duration::from_millis(100), Duration::from_secs(5));
            let short = stage.short_of(&input, timeout)?;
            if short.is_empty() {
                return stage.highs(&partitions, timeout).map(Ok);
            }
            if left.is_zero() {
                return Ok(Err(short));
            }
            std::thread::sleep(Duration::from_millis(10).min(left));
        }
    })
    .await;
    match asked
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        Ok(Ok(highs)) => Ok(highs
            .into_iter()
            .map(|(id, high)| {
                let p = crate::broker::Partition {
                    source: logq_abi::Source::Users,
                    id,
                };
                (p, high)
            })
            .collect()),
        Ok(Err(short)) => Err(Box::new(position_not_reached(
            api,
            &format!("the re-key stage did not write the required position of {topic}"),
            short
                .iter()
                .map(|(p, n)| (format!("{topic}/{p}"), *n))
                .collect(),
        ))),
        Err(e) => Err(Box::new(json_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({
                "error": "unavailable",
                "message": format!("the re-key stage's progress could not be read: {e}"),
            }),
        ))),
    }
}

fn not_reached(api: &Api, behind: &Positions) -> Response {
    position_not_reached(
        api,
        "the state did not reach the required position",
        api.reads.topics.named(behind),
    )
}

/// 503 `position_not_reached`: `what` did not happen within the longest wait, and how
/// far short each partition (`topic/partition`) still is.
fn position_not_reached(
    api: &Api,
    what: &str,
    behind: std::collections::BTreeMap<String, i64>,
) -> Response {
    let mut r = json_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({
            "error": "position_not_reached",
            "message": format!(
                "{what} within {} ms; retry, or read without it",
                api.reads.wait_max.as_millis()
            ),
            "behind": behind,
            "position": api.reads.topics.token(&api.store.position()),
        }),
    );
    insert(&mut r, "retry-after", "1");
    r
}

/// A strong validator of `body`: a 64-bit hash of it, the same on every replica
/// and run. Eight bytes a step, each folded in by a 128-bit multiply (as wyhash and
/// foldhash do): every read hashes its answer, and FNV-1a's byte a step cost a
/// twentieth of a read.
pub fn etag(body: &[u8]) -> String {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let fold = |a: u64, b: u64| {
        let p = u128::from(a) * u128::from(b);
        (p as u64) ^ ((p >> 64) as u64)
    };
    let mut h = 0xcbf2_9ce4_8422_2325 ^ body.len() as u64;
    let mut words = body.chunks_exact(8);
    for w in &mut words {
        let mut word = [0; 8];
        word.copy_from_slice(w);
        h = fold(h ^ u64::from_le_bytes(word), K);
    }
    let mut last = [0; 8];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    h = fold(h ^ u64::from_le_bytes(last), K);
    h = fold(h, 0x94d0_49bb_1331_11eb);
    format!("\"{h:016x}\"")
}

/// Whether an `If-None-Match` value matches `tag` (`*`, or one of a list; a weak
/// `W/` prefix compares equal, as RFC 9110 asks for this header).
fn matches(header: &str, tag: &str) -> bool {
    header
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == tag)
}

fn insert(r: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

/// How long an export waits for the writer to begin it (one batch, normally).
pub const EXPORT_START_MAX: Duration = Duration::from_secs(10);

/// `GET /export`: every visible user and organization at one position, as NDJSON
/// (`{"user": ...}` lines in id order, then `{"organization": ...}` lines in key
/// order), then one `{"end": {"users": N, "organizations": M}}` line, streamed; the
/// position is in `X-Logq-Position`. Without the `end` line the export is not whole:
/// one cut short (a replay handed over while it ran) ends with an `{"error": ...}`
/// line instead.
pub async fn export(api: &Api) -> Response {
    let Some(begun) = api.store.request_export() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_exports",
            format!(
                "{} exports are running; retry when one has finished",
                crate::state::export::MAX_EXPORTS
            ),
        );
    };
    let begun = match tokio::time::timeout(EXPORT_START_MAX, begun).await {
        Ok(Ok(export)) => export,
        _ => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "export_not_started",
                "the consumer loop did not begin the export (is the broker reachable?); retry"
                    .into(),
            );
        }
    };
    // The writer only froze the users' slots: their ids are read and sorted here,
    // off the consumer loop and the async workers.
    let sorted = tokio::task::spawn_blocking(move || {
        let mut export = begun;
        export.sort();
        export
    })
    .await;
    let Ok(export) = sorted else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "export_failed",
            "sorting the export's keys failed; retry".into(),
        );
    };
    let token = api.reads.topics.token(&export.position);
    let chunks = futures_util::stream::unfold((export, false), |(mut export, failed)| async move {
        if failed {
            return None;
        }
        match export.next_chunk()? {
            Ok(lines) => Some((Ok(bytes::Bytes::from(lines)), (export, false))),
            Err(e) => {
                tracing::warn!("export cut short: {e}");
                let line = json!({"error": "export_cut_short", "message": e.to_string()});
                Some((Ok(bytes::Bytes::from(format!("{line}\n"))), (export, true)))
            }
        }
    });
    let mut r = warp::reply::Reply::into_response(warp::reply::stream(
        chunks.map(|c: Result<bytes::Bytes, std::io::Error>| c),
    ));
    insert(&mut r, "content-type", "application/x-ndjson");
    insert(&mut r, POSITION, &token);
    r
}

/// A page as `{"<name>": [...], "next": cursor or null}`.
pub fn page_body(name: &str, page: &Page) -> String {
    let mut out = String::with_capacity(32 + page.items.iter().map(|i| i.len() + 1).sum::<usize>());
    out.push_str("{\"");
    out.push_str(name);
    out.push_str("\":[");
    out.push_str(&page.items.join(","));
    out.push_str("],\"next\":");
    out.push_str(&json!(page.next).to_string());
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_stable_and_if_none_match_follows_rfc_9110() {
        let tag = etag(b"{\"id\":\"a\"}");
        assert_eq!(tag, etag(b"{\"id\":\"a\"}"));
        assert_ne!(tag, etag(b"{\"id\":\"b\"}"));
        assert!(matches(&tag, &tag));
        assert!(matches(&format!("\"x\", W/{tag}"), &tag));
        assert!(matches("*", &tag));
        assert!(!matches("\"x\"", &tag));
    }

    #[test]
    fn an_etag_changes_with_any_byte_or_the_length_of_the_answer() {
        for len in 0..40 {
            let body: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let tag = etag(&body);
            for i in 0..len {
                let mut changed = body.clone();
                changed[i] ^= 1;
                assert_ne!(etag(&changed), tag, "byte {i} of {len}");
            }
            let mut longer = body.clone();
            longer.push(0);
            assert_ne!(etag(&longer), tag, "a zero byte more after {len}");
        }
    }

    #[test]
    fn query_parameters_are_checked() {
        let q = Query::parse("limit=5&after=a%20b+c", &["limit", "after"]).unwrap();
        assert_eq!(q.limit().unwrap(), 5);
        assert_eq!(q.after().unwrap(), Some("a b c"));
        assert_eq!(
            Query::parse("", &["limit"]).unwrap().limit().unwrap(),
            DEFAULT_LIMIT
        );
        for (raw, status) in [
            ("limit=0", 400),
            ("limit=1001", 400),
            ("limit=x", 400),
            ("limit=-1", 400),
        ] {
            let q = Query::parse(raw, &["limit"]).unwrap();
            assert_eq!(q.limit().unwrap_err().status().as_u16(), status, "{raw}");
        }
        assert!(Query::parse("colour=red", &["limit"]).is_err());
        assert!(Query::parse("limit=1&limit=2", &["limit"]).is_err());
        assert!(Query::parse("limit=%ff", &["limit"]).is_err());
        assert!(Query::parse("min_position=users/0@1", &[]).is_ok());
    }

    #[test]
    fn pages_are_json_with_a_cursor() {
        let page = Page {
            items: vec!["{\"id\":\"a\"}".into(), "{\"id\":\"b\"}".into()],
            next: Some("b".into()),
        };
        let v: serde_json::Value = serde_json::from_str(&page_body("users", &page)).unwrap();
        assert_eq!(v, json!({"users": [{"id": "a"}, {"id": "b"}], "next": "b"}));
        let empty = Page {
            items: vec![],
            next: None,
        };
        assert_eq!(page_body("users", &empty), "{\"users\":[],\"next\":null}");
    }
}
