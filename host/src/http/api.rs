//! What the handlers share: the handle on the service ([`Api`]) and id decoding. A leaf
//! of `http/`, so the route modules import it and not each other.

use std::sync::Arc;
use std::time::Duration;

use warp::http::{HeaderValue, StatusCode};

use super::admin::Admin;
use super::reply::error;
use super::samples::StatusFeed;
use crate::broker::{Positions, Topics};
use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::state::StateStore;

/// A finished response that ends a request early (boxed: a response is large, and
/// this travels in `Result`s).
pub type Failure = Box<warp::reply::Response>;

/// Ids and keys longer than this are refused with 400 before any lookup.
pub const MAX_ID_BYTES: usize = 1024;

/// What the handlers read.
#[derive(Clone)]
pub struct Api {
    /// The folded state.
    pub store: Arc<StateStore>,
    /// Counters and readiness.
    pub metrics: Arc<Metrics>,
    /// The admin side: reducers and who may change them.
    pub admin: Arc<Admin>,
    /// Positions and waiting for them.
    pub reads: Reads,
    /// The status page's samples.
    pub status: Arc<StatusFeed>,
    /// With `--sharded`: who holds which users; `None`: this host holds them all.
    pub cluster: Option<Arc<Cluster>>,
}

/// How reads are answered.
#[derive(Debug, Clone)]
pub struct Reads {
    /// The topics, for position tokens.
    pub topics: Topics,
    /// Longest a read waits for the position it requires.
    pub wait_max: Duration,
    /// With the re-key stage: its progress, which says what a position of the
    /// producers' users topic is in the internal one (read-your-writes through it).
    pub stage: Option<Arc<crate::broker::rekey::Written>>,
    /// The last position's `X-Logq-Position` value, rendered once for every read
    /// at that position.
    pub tokens: Arc<TokenCache>,
}

/// The store's position as an `X-Logq-Position` value, kept until the position
/// moves: every read carries it, and most reads between two batches share one.
#[derive(Debug, Default)]
pub struct TokenCache(std::sync::Mutex<Option<(Positions, Option<HeaderValue>)>>);

impl Reads {
    /// The store's position now, as a header value. Take it before reading the
    /// answer it goes with: the answer then reflects at least that much.
    /// `None` only where a topic's name cannot go in a header (Kafka's names can).
    pub fn position_header(&self, store: &StateStore) -> Option<HeaderValue> {
        store.with_position(|at| {
            let mut cached = self.tokens.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((position, value)) = cached.as_ref()
                && position == at
            {
                return value.clone();
            }
            let value = HeaderValue::from_str(&self.topics.token(at)).ok();
            *cached = Some((at.clone(), value.clone()));
            value
        })
    }
}

/// A path segment, percent-decoded and checked for length.
pub fn decoded(what: &str, raw: &str) -> Result<String, Failure> {
    let Some(id) = percent_decode(raw) else {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the {what} id is not valid percent-encoded UTF-8"),
        )));
    };
    if id.len() > MAX_ID_BYTES {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "the {what} id is {} bytes; ids are at most {MAX_ID_BYTES}",
                id.len()
            ),
        )));
    }
    Ok(id)
}

/// Decodes `%XX` escapes; `None` for a broken escape or bytes that are not UTF-8.
pub fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
