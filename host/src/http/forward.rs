//! Any host answers any id (`--sharded`): a read of a user whose partition another
//! host holds is forwarded there over a pooled keep-alive connection, and the answer
//! passed back as it came, with `X-Logq-Served-By` naming the host that answered.
//! `X-Logq-Forwarded` marks a forwarded request, so it is never forwarded again;
//! `?redirect=1` gets a `307` to the holder instead. No holder known: `503` with
//! `Retry-After`, never a `404` from a host that does not hold the partition.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;

use super::api::Api;
use super::reads::{Conditions, MIN_POSITION};
use super::reply::error;
use crate::cluster::Cluster;

/// Marks a request one host forwarded to another.
pub const FORWARDED: &str = "x-logq-forwarded";
/// Names the host that answered.
pub const SERVED_BY: &str = "x-logq-served-by";
/// Marks an answer a standby gave (its holder could not answer): how many records
/// behind the partition's end it was at its last measure.
pub const STANDBY: &str = "x-logq-standby-lag";
/// The answer headers passed back.
const RETURNED: [&str; 5] = [
    "content-type",
    "etag",
    "x-logq-position",
    SERVED_BY,
    STANDBY,
];
/// Longest a forwarded read may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Idle keep-alive connections per host.
static POOL: Mutex<Option<HashMap<String, Vec<BufReader<TcpStream>>>>> = Mutex::new(None);

/// Where a read of user `id` goes: `None` to answer here (this host holds its
/// partition, or hosts do not share partitions); else the forwarded (or redirected,
/// or refused) answer.
pub async fn elsewhere(
    api: &Api,
    id: &str,
    path_and_query: &str,
    forwarded: bool,
    conditions: &Conditions,
) -> Option<Response> {
    let cluster = api.cluster.as_ref()?;
    let Some(p) = cluster.partition_of(id) else {
        return Some(not_joined());
    };
    if cluster.serves(p) {
        if !cluster.is_behind(p) {
            return None;
        }
        // Just moved here and still being folded from its beginning: what this host
        // has of its users may be older than what the last holder answered. That
        // holder may still answer for them (it lingers), or a standby of it, which
        // has folded it all along.
        let stand_in = cluster.lingerer(p).or_else(|| cluster.standby_of(p));
        return Some(match stand_in {
            Some(l) if !forwarded => send(cluster, &l, p, path_and_query, conditions)
                .await
                .unwrap_or_else(|_| catching_up(p)),
            _ => catching_up(p),
        });
    }
    if cluster.lingers(p) {
        // Given up here, and its new holder not caught up yet: answered from here.
        return None;
    }
    if forwarded && cluster.answers_as_standby(p) {
        // Sent here as to a standby (the holder could not answer).
        return None;
    }
    if forwarded {
        // The sender thought this host holds it: the share moved meanwhile.
        return Some(unavailable(&format!(
            "users/{p} moved between hosts while this read was forwarded; try again"
        )));
    }
    let Some(holder) = cluster.holder(p) else {
        // Between two rounds of a rebalance nobody holds it; the host that gave it
        // up may still answer for it, or a standby (a host died).
        if let Some(l) = cluster.lingerer(p) {
            let answer = send(cluster, &l, p, path_and_query, conditions).await;
            return Some(answer.unwrap_or_else(|why| unavailable(&why)));
        }
        if cluster.answers_as_standby(p) {
            return None;
        }
        if let Some(s) = cluster.standby_of(p) {
            let answer = send(cluster, &s, p, path_and_query, conditions).await;
            return Some(answer.unwrap_or_else(|why| unavailable(&why)));
        }
        return Some(unavailable(&format!(
            "no host is known to hold users/{p} now (a host left or joined, and the group is moving its partitions); try again"
        )));
    };
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let (wanted, kept): (Vec<&str>, Vec<&str>) = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .partition(|pair| *pair == "redirect=1");
    if !wanted.is_empty() {
        let query = if kept.is_empty() {
            String::new()
        } else {
            format!("?{}", kept.join("&"))
        };
        return Some(redirect(&format!("{}{path}{query}", holder.url)));
    }
    // The holder is still folding it: the host that gave it up answers meanwhile.
    // Whichever is asked first, the other is asked when the first cannot be reached
    // (it just stopped, and its adverts are not stale yet).
    // A standby stands in the same way when there is no such host.
    let stand_in = cluster.lingerer(p).or_else(|| cluster.standby_of(p));
    if stand_in.is_none() && holder.behind.contains(&p) && cluster.answers_as_standby(p) {
        // The holder is rebuilding it and this host stands by for it.
        return None;
    }
    let (first, then) = match stand_in {
        Some(l) if holder.behind.contains(&p) => (l, Some(holder)),
        other => (holder, other),
    };
    let answer = match send(cluster, &first, p, path_and_query, conditions).await {
        Err(why) => match then.filter(|t| t.instance != first.instance) {
            Some(t) => send(cluster, &t, p, path_and_query, conditions)
                .await
                .map_err(|also| format!("{why}; {also}")),
            // The holder died (its advert not stale yet): this host stands by for it.
            None if cluster.answers_as_standby(p) => return None,
            None => Err(why),
        },
        ok => ok,
    };
    Some(answer.unwrap_or_else(|why| unavailable(&why)))
}

/// Forwards the read to `to` (which holds partition `p`, or lingers on it).
async fn send(
    cluster: &Cluster,
    to: &crate::cluster::Advert,
    p: i32,
    path_and_query: &str,
    conditions: &Conditions,
) -> Result<Response, String> {
    // What the read requires travels with it.
    let passed: Vec<(&str, String)> = [
        (MIN_POSITION, &conditions.min_position),
        ("if-none-match", &conditions.if_none_match),
    ]
    .into_iter()
    .filter_map(|(name, value)| Some((name, value.clone()?)))
    .collect();
    let authority = to.url.trim_start_matches("http://").to_owned();
    let answer = tokio::time::timeout(
        TIMEOUT,
        get(&authority, path_and_query, &passed, cluster.instance()),
    )
    .await
    .unwrap_or_else(|_| Err("timed out".to_owned()));
    cluster.count_forward(answer.is_ok());
    answer.map_err(|why| {
        format!(
            "the host answering for users/{p} ({}) did not answer: {why}",
            to.instance
        )
    })
}

/// Names the partitions of the users topic an answer covers, when it is only this
/// host's share (listings, export, the change stream: see the README's "More than
/// one host").
pub const PARTIAL: &str = "x-logq-partial";

/// Whether `path` answers with this host's users only when hosts share partitions.
pub fn is_partial(path: &str) -> bool {
    let path = path.trim_end_matches('/');
    path == "/users"
        || path == "/export"
        || path == "/changes"
        || (path.starts_with("/organizations/") && path.ends_with("/users"))
}

/// Adds [`PARTIAL`]: `users/0,1 of 4` (the partitions this host holds, of all).
pub fn mark_partial(cluster: &Cluster, response: &mut Response) {
    let held: Vec<String> = cluster.owned().iter().map(i32::to_string).collect();
    let value = format!("users/{} of {}", held.join(","), cluster.partitions());
    if let Ok(v) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(PARTIAL, v);
    }
}

/// A `307` to the host that holds user `id`'s partition, for `path` there (a `503`
/// while no holder is known); `None` when this host answers for it itself, or
/// hosts do not share partitions.
pub fn holder_of(api: &Api, id: &str, path: &str) -> Option<Response> {
    let cluster = api.cluster.as_ref()?;
    let Some(p) = cluster.partition_of(id) else {
        return Some(not_joined());
    };
    if cluster.serves(p) {
        return None;
    }
    let Some(holder) = cluster.holder(p) else {
        return Some(unavailable(&format!(
            "no host is known to hold users/{p} now; try again"
        )));
    };
    Some(redirect(&format!("{}{path}", holder.url)))
}

/// A `307` to `location`.
fn redirect(location: &str) -> Response {
    let mut r = Response::new(String::new().into());
    *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert("location", v);
    }
    r
}

/// `503` for a user not found in partition `p`, which this host holds but is still
/// folding from its beginning.
pub fn catching_up(p: i32) -> Response {
    unavailable(&format!(
        "users/{p} just moved to this host and is still being folded; try again"
    ))
}

/// `503` from a host that has not learnt the users topic's partitions yet (it is
/// starting): it cannot tell where a user is, and must not say it does not exist.
fn not_joined() -> Response {
    unavailable(
        "this host is starting and does not know yet which host holds which user; try again",
    )
}

fn unavailable(why: &str) -> Response {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        why.to_owned(),
    );
    r.headers_mut()
        .insert("retry-after", HeaderValue::from_static("1"));
    r
}

/// `GET path` at `authority`, on a pooled connection (a stale one is retried once on
/// a fresh connection).
async fn get(
    authority: &str,
    path: &str,
    headers: &[(&str, String)],
    from: &str,
) -> Result<Response, String> {
    let answer = fetch(authority, path, headers, from).await?;
    let mut r = Response::new(answer.body.into());
    *r.status_mut() = StatusCode::from_u16(answer.status).map_err(|e| e.to_string())?;
    for (name, value) in answer.headers {
        if let (Ok(n), Ok(v)) = (
            warp::http::header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            r.headers_mut().insert(n, v);
        }
    }
    Ok(r)
}

/// An answer from another host: its status, the headers passed back, its body.
pub(super) struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// [`get`]'s exchange, the answer as it came.
pub(super) async fn fetch(
    authority: &str,
    path: &str,
    headers: &[(&str, String)],
    from: &str,
) -> Result<Answer, String> {
    let pooled = POOL
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .get_mut(authority)
        .and_then(Vec::pop);
    if let Some(conn) = pooled
        && let Ok(r) = exchange(conn, authority, path, headers, from).await
    {
        return Ok(r);
    }
    let conn = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    let _ = conn.set_nodelay(true);
    exchange(BufReader::new(conn), authority, path, headers, from).await
}

/// One request and its answer on `conn`, which goes back to the pool afterwards.
async fn exchange(
    mut conn: BufReader<TcpStream>,
    authority: &str,
    path: &str,
    headers: &[(&str, String)],
    from: &str,
) -> Result<Answer, String> {
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\n{FORWARDED}: {from}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    conn.get_mut()
        .write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    conn.read_line(&mut line).await.map_err(|e| e.to_string())?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {line:?}"))?;
    let mut length = None;
    let mut keep: Vec<(String, String)> = Vec::new();
    loop {
        line.clear();
        conn.read_line(&mut line).await.map_err(|e| e.to_string())?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_owned());
        if name == "content-length" {
            length = value.parse::<usize>().ok();
        } else if RETURNED.contains(&name.as_str()) {
            keep.push((name, value));
        }
    }
    let length = length.ok_or("an answer without Content-Length")?;
    let mut body = vec![0; length];
    conn.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    POOL.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .entry(authority.to_owned())
        .or_default()
        .push(conn);
    Ok(Answer {
        status,
        headers: keep,
        body,
    })
}
