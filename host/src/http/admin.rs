//! The admin endpoints: bearer-token auth (constant time), reducer upload (forward or
//! replay), rollback, replay cancel, and the description of it all. They act through a
//! [`SwapControl`] handle and never touch the consumer loop.

use std::sync::Arc;

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::reply::{json_reply, refuse};
use crate::fold::sha256_hex;
use crate::reducers::{Active, Mode, Origin, Registry, Submitted, SwapError};

/// What the admin endpoints act on: the reducers' registry in the service, a fake in
/// the HTTP tests (which build the API without a runtime or a component).
pub trait SwapControl: Send + Sync {
    /// Validates and swaps in (forward) or starts a replay.
    ///
    /// # Errors
    /// Why nothing changed.
    fn submit(&self, bytes: &[u8], origin: Origin, mode: Mode) -> Result<Submitted, SwapError>;
    /// Back to the previous reducer.
    ///
    /// # Errors
    /// Why nothing changed.
    fn rollback(&self) -> Result<Submitted, SwapError>;
    /// Cancels a running replay; `false` when none runs.
    fn cancel_replay(&self) -> bool;
    /// What `GET /admin/reducer` shows.
    fn describe(&self) -> serde_json::Value;
    /// The active reducer, for `?explain=1`; `None` where there is none (the HTTP
    /// tests' fake).
    fn active(&self) -> Option<Arc<Active>> {
        None
    }
    /// The component `sha256`, where this host keeps it for the other hosts of its
    /// group (`--sharded`); `None` elsewhere.
    fn component(&self, sha256: &str) -> Option<Arc<[u8]>> {
        let _ = sha256;
        None
    }
    /// Bytes the reducers' instance pool keeps resident between calls; `None` where
    /// there is no runtime (the HTTP tests' fake).
    fn pool_resident_bytes(&self) -> Option<usize> {
        None
    }
}

impl SwapControl for Registry {
    fn submit(&self, bytes: &[u8], origin: Origin, mode: Mode) -> Result<Submitted, SwapError> {
        Registry::submit(self, bytes, origin, mode)
    }
    fn rollback(&self) -> Result<Submitted, SwapError> {
        Registry::rollback(self)
    }
    fn cancel_replay(&self) -> bool {
        Registry::cancel_replay(self)
    }
    fn describe(&self) -> serde_json::Value {
        Registry::describe(self)
    }
    fn pool_resident_bytes(&self) -> Option<usize> {
        Some(Registry::pool_resident_bytes(self))
    }
    fn active(&self) -> Option<Arc<Active>> {
        Some(Registry::current(self))
    }
}

/// What the admin endpoints need.
pub struct Admin {
    /// The swaps.
    pub control: Arc<dyn SwapControl>,
    /// The bearer token; `None` disables the admin endpoints (403).
    pub token: Option<String>,
    /// Largest accepted upload.
    pub max_body_bytes: u64,
}

/// Compares in time that does not depend on where the inputs differ: both sides are
/// hashed first, so not even the length leaks.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (sha256_hex(a), sha256_hex(b));
    a.bytes()
        .zip(b.bytes())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Lets the request through only with `Authorization: Bearer <token>`.
fn authorized(
    admin: Arc<Admin>,
) -> impl Filter<Extract = (Arc<Admin>,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization").and_then(move |header: Option<String>| {
        let admin = admin.clone();
        async move {
            let Some(token) = admin.token.as_deref() else {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    "admin_disabled",
                    "admin endpoints are disabled: start logq with --admin-token (or LOGQ_ADMIN_TOKEN) to enable them",
                ));
            };
            let given = header.as_deref().and_then(|h| {
                let (scheme, rest) = h.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
            match given {
                Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(admin),
                _ => Err(refuse(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "send Authorization: Bearer <admin token>",
                )),
            }
        }
    })
}

#[derive(serde::Deserialize)]
struct ModeQuery {
    mode: Option<String>,
}

/// The admin routes (all behind the token).
pub fn routes(admin: Arc<Admin>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let max_body = admin.max_body_bytes;
    let auth = authorized(admin);
    let put = warp::path!("admin" / "reducer")
        .and(warp::put())
        .and(auth.clone())
        .and(warp::query::<ModeQuery>())
        .and(warp::body::content_length_limit(max_body))
        .and(warp::body::bytes())
        .and_then(
            |admin: Arc<Admin>, q: ModeQuery, body: warp::hyper::body::Bytes| async move {
                let mode = match q.mode.as_deref() {
                    None | Some("forward") => Mode::Forward,
                    Some("replay") => Mode::Replay,
                    Some("preview") => Mode::Preview,
                    Some(other) => {
                        return Err(refuse(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            format!("mode {other:?}: use forward, replay or preview"),
                        ));
                    }
                };
                let result = tokio::task::spawn_blocking(move || {
                    admin.control.submit(&body, Origin::Http, mode)
                })
                .await
                .map_err(|e| {
                    refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                })?;
                swap_reply(
                    result,
                    if mode != Mode::Forward {
                        StatusCode::ACCEPTED
                    } else {
                        StatusCode::OK
                    },
                )
            },
        );
    let get = warp::path!("admin" / "reducer")
        .and(warp::get())
        .and(auth.clone())
        .map(|admin: Arc<Admin>| json_reply(StatusCode::OK, &admin.control.describe()));
    let rollback = warp::path!("admin" / "reducer" / "rollback")
        .and(warp::post())
        .and(auth.clone())
        .and_then(|admin: Arc<Admin>| async move {
            let result = tokio::task::spawn_blocking(move || admin.control.rollback())
                .await
                .map_err(|e| {
                    refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                })?;
            swap_reply(result, StatusCode::ACCEPTED)
        });
    let cancel = warp::path!("admin" / "reducer" / "replay")
        .and(warp::delete())
        .and(auth.clone())
        .and_then(|admin: Arc<Admin>| async move {
            if admin.control.cancel_replay() {
                Ok(json_reply(StatusCode::OK, &json!({"cancelled": true})))
            } else {
                Err(refuse(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no replay is running",
                ))
            }
        });
    let component = warp::path!("admin" / "reducer" / "components" / String)
        .and(warp::get())
        .and(auth)
        .and_then(|sha256: String, admin: Arc<Admin>| async move {
            match admin.control.component(&sha256) {
                Some(bytes) => {
                    let mut r = Response::new(bytes.to_vec().into());
                    r.headers_mut().insert(
                        "content-type",
                        warp::http::HeaderValue::from_static("application/wasm"),
                    );
                    Ok(r)
                }
                None => Err(refuse(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("this host keeps no component {sha256:?} (only hosts that share partitions keep them, for each other)"),
                )),
            }
        });
    put.or(get)
        .unify()
        .or(rollback)
        .unify()
        .or(cancel)
        .unify()
        .or(component)
        .unify()
}

fn swap_reply(result: Result<Submitted, SwapError>, ok: StatusCode) -> Result<Response, Rejection> {
    match result {
        Ok(done) => Ok(json_reply(ok, &json!(done))),
        Err(e) => {
            let (code, kind) = match &e {
                SwapError::NotWasm(_) => (StatusCode::BAD_REQUEST, "not_wasm"),
                SwapError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_reducer"),
                SwapError::Canary(_) => (StatusCode::UNPROCESSABLE_ENTITY, "canary_failed"),
                SwapError::Busy(_) | SwapError::NoPrevious => (StatusCode::CONFLICT, "conflict"),
                SwapError::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
            };
            Err(refuse(code, kind, e.to_string()))
        }
    }
}
