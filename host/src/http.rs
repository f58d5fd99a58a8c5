//! The HTTP API: the only module that touches warp. Routes are built by [`routes`]
//! and every error becomes a JSON body in [`recover`], in one place.

use std::convert::Infallible;
use std::sync::Arc;

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::metrics::Metrics;
use crate::replay::ReplayContext;
use crate::state::StateStore;
use crate::swap::{Mode, Origin, Reducers, SwapError};

/// Limits of the HTTP server itself (below the routes).
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Most connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a request head (and the keep-alive idle limit).
    pub header_timeout: std::time::Duration,
    /// Largest request head, in bytes.
    pub max_header_bytes: usize,
}

/// Serves `routes` on `listener` until `shutdown` resolves, then lets open requests
/// finish for up to `drain`. Slow clients are cut by the head timeout, oversized heads
/// get 431, and connections past the limit get a 503 and are closed, so no client can
/// hold the server's memory or sockets hostage.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    routes: F,
    limits: ServerLimits,
    shutdown: impl std::future::Future<Output = ()>,
    drain: std::time::Duration,
) where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192) + 8192)
        .max_header_size(limits.max_header_bytes);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(too_busy(stream));
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(warp::service(routes.clone()));
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!("HTTP connection: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("open HTTP connections dropped after {drain:?}");
    }
}

/// The answer to a connection past the limit.
async fn too_busy(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt as _;
    let body = r#"{"error":"busy","message":"too many open connections; retry shortly"}"#;
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let _ = stream.write_all(reply.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// The OpenAPI document of this API, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

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
}

/// What the admin endpoints need.
pub struct Admin {
    /// The reducers.
    pub reducers: Arc<Reducers>,
    /// What a replay needs.
    pub replay: ReplayContext,
    /// The bearer token; `None` disables the admin endpoints (403).
    pub token: Option<String>,
    /// Largest accepted upload.
    pub max_body_bytes: u64,
}

/// A refusal of an admin request, turned into JSON by [`recover`].
#[derive(Debug)]
struct AdminRefusal {
    code: StatusCode,
    kind: &'static str,
    message: String,
}

impl warp::reject::Reject for AdminRefusal {}

fn refuse(code: StatusCode, kind: &'static str, message: impl Into<String>) -> Rejection {
    warp::reject::custom(AdminRefusal {
        code,
        kind,
        message: message.into(),
    })
}

/// Compares in time that does not depend on where the inputs differ: both sides are
/// hashed first, so not even the length leaks.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (crate::runtime::sha256_hex(a), crate::runtime::sha256_hex(b));
    a.bytes()
        .zip(b.bytes())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Lets the request through only with `Authorization: Bearer <token>`.
fn authorized(api: Api) -> impl Filter<Extract = (Arc<Admin>,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization").and_then(move |header: Option<String>| {
        let admin = api.admin.clone();
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

fn admin_routes(api: Api) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let max_body = api.admin.max_body_bytes;
    let auth = authorized(api);
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
                    Some(other) => {
                        return Err(refuse(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            format!("mode {other:?}: use forward or replay"),
                        ));
                    }
                };
                let result = tokio::task::spawn_blocking(move || {
                    admin
                        .reducers
                        .submit(&body, Origin::Http, mode, &admin.replay)
                })
                .await
                .map_err(|e| {
                    refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                })?;
                swap_reply(
                    result,
                    if mode == Mode::Replay {
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
        .map(|admin: Arc<Admin>| json_reply(StatusCode::OK, &admin.reducers.describe()));
    let rollback = warp::path!("admin" / "reducer" / "rollback")
        .and(warp::post())
        .and(auth.clone())
        .and_then(|admin: Arc<Admin>| async move {
            let result = tokio::task::spawn_blocking(move || admin.reducers.rollback())
                .await
                .map_err(|e| {
                    refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                })?;
            swap_reply(result, StatusCode::OK)
        });
    let cancel = warp::path!("admin" / "reducer" / "replay")
        .and(warp::delete())
        .and(auth)
        .and_then(|admin: Arc<Admin>| async move {
            if admin.reducers.cancel_replay() {
                Ok(json_reply(StatusCode::OK, &json!({"cancelled": true})))
            } else {
                Err(refuse(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no replay is running",
                ))
            }
        });
    put.or(get).unify().or(rollback).unify().or(cancel).unify()
}

fn swap_reply(
    result: Result<crate::swap::Submitted, SwapError>,
    ok: StatusCode,
) -> Result<Response, Rejection> {
    match result {
        Ok(done) => Ok(json_reply(ok, &json!(done))),
        Err(e) => {
            let (code, kind) = match &e {
                SwapError::NotWasm(_) => (StatusCode::BAD_REQUEST, "not_wasm"),
                SwapError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_reducer"),
                SwapError::Canary(_) => (StatusCode::UNPROCESSABLE_ENTITY, "canary_failed"),
                SwapError::Busy(_) | SwapError::NoPrevious => (StatusCode::CONFLICT, "conflict"),
            };
            Err(refuse(code, kind, e.to_string()))
        }
    }
}

/// Every route of the service, errors included: the filter never rejects.
pub fn routes(api: Api) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let with = {
        let api = api.clone();
        warp::any().map(move || api.clone())
    };
    let user = warp::path!("users" / String)
        .and(with.clone())
        .map(|id: String, api: Api| entity("user", &id, |id| api.store.user(id)));
    let organization =
        warp::path!("organizations" / String)
            .and(with.clone())
            .map(|key: String, api: Api| {
                entity("organization", &key, |key| {
                    api.store.organization(key).map(|v| v.to_string())
                })
            });
    let healthz =
        warp::path!("healthz").map(|| json_reply(StatusCode::OK, &json!({"status": "ok"})));
    let openapi = warp::path!("openapi.json").map(|| {
        let mut r = Response::new(OPENAPI.into());
        r.headers_mut().insert(
            "content-type",
            warp::http::HeaderValue::from_static("application/json"),
        );
        r
    });
    let readyz = warp::path!("readyz").and(with.clone()).map(|api: Api| {
        let (ready, status) = api.metrics.status();
        let code = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_reply(
            code,
            &json!({"ready": ready, "status": status, "lag": api.metrics.total_lag()}),
        )
    });
    let admin = admin_routes(api);
    let metrics = warp::path!("metrics").and(with).map(|api: Api| {
        let body = api.metrics.render(api.store.sizes());
        let mut r = Response::new(body.into());
        r.headers_mut().insert(
            "content-type",
            warp::http::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        r
    });
    let public = warp::get().and(
        user.or(organization)
            .unify()
            .or(healthz)
            .unify()
            .or(openapi)
            .unify()
            .or(readyz)
            .unify()
            .or(metrics)
            .unify(),
    );
    warp::path::full()
        // Reads first: they are nearly all the traffic.
        .and(public.or(admin).unify().recover(recover).unify())
        .map(|path: warp::path::FullPath, response: Response| {
            if response.status() != StatusCode::METHOD_NOT_ALLOWED {
                return response;
            }
            // RFC 9110: a 405 names the methods the resource does allow.
            let allow = allowed_methods(path.as_str());
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} allows {allow}", path.as_str()),
            );
            r.headers_mut()
                .insert("allow", warp::http::HeaderValue::from_static(allow));
            r
        })
}

/// The methods a path allows (for the `Allow` header of a 405).
fn allowed_methods(path: &str) -> &'static str {
    match path.trim_end_matches('/') {
        "/admin/reducer" => "GET, PUT",
        "/admin/reducer/rollback" => "POST",
        "/admin/reducer/replay" => "DELETE",
        _ => "GET",
    }
}

/// Looks up one entity by the raw path segment.
fn entity(what: &str, raw: &str, find: impl FnOnce(&str) -> Option<String>) -> Response {
    let decoded = if raw.contains('%') {
        percent_decode(raw).map(std::borrow::Cow::Owned)
    } else {
        Some(std::borrow::Cow::Borrowed(raw))
    };
    let id = match decoded {
        Some(id) => id,
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the {what} id is not valid percent-encoded UTF-8"),
            );
        }
    };
    if id.len() > MAX_ID_BYTES {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "the {what} id is {} bytes; ids are at most {MAX_ID_BYTES}",
                id.len()
            ),
        );
    }
    match find(&id) {
        Some(body) => {
            let mut r = Response::new(body.into());
            r.headers_mut().insert(
                "content-type",
                warp::http::HeaderValue::from_static("application/json"),
            );
            r
        }
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {what} with id {}", json!(id)),
        ),
    }
}

/// Decodes `%XX` escapes; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(raw: &str) -> Option<String> {
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

fn json_reply(code: StatusCode, body: &serde_json::Value) -> Response {
    let mut r = Response::new(body.to_string().into());
    *r.status_mut() = code;
    r.headers_mut().insert(
        "content-type",
        warp::http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(code: StatusCode, kind: &str, message: String) -> Response {
    json_reply(code, &json!({"error": kind, "message": message}))
}

/// Maps every rejection to a JSON error; nothing internal leaks.
async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let (code, kind, message) = if let Some(r) = rejection.find::<AdminRefusal>() {
        (r.code, r.kind, r.message.clone())
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the body is larger than --admin-max-body-bytes".to_string(),
        )
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        (
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "send a Content-Length".to_string(),
        )
    } else if rejection.find::<warp::reject::InvalidQuery>().is_some() {
        (
            StatusCode::BAD_REQUEST,
            "bad_request",
            "invalid query string".to_string(),
        )
    } else if rejection.is_not_found() {
        (
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route".to_string(),
        )
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed".to_string(),
        )
    } else {
        tracing::debug!("unhandled rejection: {rejection:?}");
        (
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the request could not be handled".to_string(),
        )
    };
    Ok(error(code, kind, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::runtime::{Entity, Kind};

    fn api() -> Api {
        let store = Arc::new(StateStore::new());
        store.apply(
            &[Entity {
                kind: Kind::User,
                key: "snake ü".into(),
            }],
            vec![crate::state::test_update(Some(r#"{"id":"snake ü"}"#), None)],
        );
        Api {
            store,
            metrics: Arc::new(Metrics::new(["users", "organizations"])),
            admin: Arc::new(admin(None)),
        }
    }

    fn admin(token: Option<&str>) -> Admin {
        use clap::Parser as _;
        static REDUCER: std::sync::OnceLock<(crate::runtime::Runtime, crate::runtime::Reducer)> =
            std::sync::OnceLock::new();
        let (runtime, reducer) = REDUCER.get_or_init(|| {
            let limits = crate::runtime::Limits {
                memory_bytes: 64 << 20,
                time: std::time::Duration::from_secs(5),
            };
            let runtime = crate::runtime::Runtime::new(limits, None).unwrap();
            let reducer = runtime.load(crate::runtime::DEFAULT_REDUCER).unwrap();
            (runtime, reducer)
        });
        let crate::config::Command::Run(config) =
            crate::config::Cli::try_parse_from(["logq", "run"])
                .unwrap()
                .command
        else {
            unreachable!()
        };
        let config = *config;
        Admin {
            reducers: Arc::new(Reducers::new(
                runtime.clone(),
                reducer.clone(),
                Origin::Startup,
            )),
            replay: ReplayContext {
                config,
                control: std::sync::mpsc::channel().0,
            },
            token: token.map(str::to_owned),
            max_body_bytes: 1 << 20,
        }
    }

    async fn admin_call(
        api: &Api,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: &[u8],
    ) -> (StatusCode, serde_json::Value) {
        let mut req = warp::test::request().method(method).path(path).body(body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.reply(&routes(api.clone())).await;
        let body = serde_json::from_slice(r.body())
            .unwrap_or_else(|e| panic!("{path}: body is not JSON ({e}): {:?}", r.body()));
        (r.status(), body)
    }

    #[tokio::test]
    async fn admin_without_a_configured_token_is_403_and_says_how_to_enable() {
        let api = api();
        let (code, body) = admin_call(&api, "GET", "/admin/reducer", Some("Bearer x"), b"").await;
        assert_eq!(code, StatusCode::FORBIDDEN);
        assert!(
            body["message"].as_str().unwrap().contains("--admin-token"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn admin_token_is_checked() {
        let mut api = api();
        api.admin = Arc::new(admin(Some("s3cret")));
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic s3cret"),
            Some("Bearer s3cre"),
        ] {
            let (code, body) = admin_call(&api, "GET", "/admin/reducer", auth, b"").await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{auth:?}: {body}");
        }
        let (code, body) =
            admin_call(&api, "GET", "/admin/reducer", Some("Bearer s3cret"), b"").await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert_eq!(body["active"]["origin"], "startup");
        assert_eq!(body["active"]["world_version"], "2.0.0");
    }

    #[tokio::test]
    async fn admin_refuses_junk_big_bodies_and_bad_modes() {
        let mut api = api();
        api.admin = Arc::new(admin(Some("t")));
        let auth = Some("Bearer t");
        let (code, body) = admin_call(&api, "PUT", "/admin/reducer", auth, b"hello").await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"], "not_wasm");
        let big = vec![0u8; (1 << 20) + 1];
        let (code, _) = admin_call(&api, "PUT", "/admin/reducer", auth, &big).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
        let (code, _) =
            admin_call(&api, "PUT", "/admin/reducer?mode=sideways", auth, b"\0asm").await;
        assert_eq!(code, StatusCode::BAD_REQUEST);
        let (code, body) =
            admin_call(&api, "PUT", "/admin/reducer", auth, b"\0asm\x0d\0\x01\0").await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let (code, _) = admin_call(&api, "POST", "/admin/reducer/rollback", auth, b"").await;
        assert_eq!(code, StatusCode::CONFLICT, "nothing to roll back to yet");
        let (_, described) = admin_call(&api, "GET", "/admin/reducer", auth, b"").await;
        let outcomes: Vec<&str> = described["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(outcomes, ["rejected", "rejected"], "{described}");
    }

    #[tokio::test]
    async fn forward_swap_then_rollback() {
        let mut api = api();
        api.admin = Arc::new(admin(Some("t")));
        let auth = Some("Bearer t");
        let (code, body) = admin_call(
            &api,
            "PUT",
            "/admin/reducer?mode=forward",
            auth,
            crate::runtime::DEFAULT_REDUCER,
        )
        .await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert_eq!(body["swap"]["outcome"], "active");
        assert_eq!(body["active"]["origin"], "http");
        let (code, body) = admin_call(&api, "POST", "/admin/reducer/rollback", auth, b"").await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert_eq!(body["active"]["origin"], "rollback");
        let (code, _) = admin_call(&api, "DELETE", "/admin/reducer/replay", auth, b"").await;
        assert_eq!(code, StatusCode::NOT_FOUND, "no replay runs");
    }

    async fn get(path: &str) -> (StatusCode, serde_json::Value) {
        let r = warp::test::request().path(path).reply(&routes(api())).await;
        let body = serde_json::from_slice(r.body())
            .unwrap_or_else(|e| panic!("{path}: body is not JSON ({e}): {:?}", r.body()));
        (r.status(), body)
    }

    #[tokio::test]
    async fn user_is_found_by_percent_encoded_unicode_id() {
        let (code, body) = get("/users/snake%20%C3%BC").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["id"], "snake ü");
        assert_eq!(body["organization"], serde_json::Value::Null);
    }

    #[tokio::test]
    async fn unknown_user_is_404_json() {
        let (code, body) = get("/users/nobody").await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "not_found");
        assert!(body["message"].as_str().unwrap().contains("nobody"));
    }

    #[tokio::test]
    async fn weird_ids_are_400_or_404_never_500() {
        let long = "a".repeat(MAX_ID_BYTES + 1);
        let cases = [
            (format!("/users/{long}"), StatusCode::BAD_REQUEST),
            ("/users/%ZZ".to_string(), StatusCode::BAD_REQUEST),
            ("/users/%C3".to_string(), StatusCode::BAD_REQUEST),
            ("/users/%00".to_string(), StatusCode::NOT_FOUND),
            ("/users/".to_string(), StatusCode::NOT_FOUND),
            ("/users/a/b".to_string(), StatusCode::NOT_FOUND),
            (
                "/organizations/%E2%9C%93".to_string(),
                StatusCode::NOT_FOUND,
            ),
            ("/nope".to_string(), StatusCode::NOT_FOUND),
        ];
        for (path, want) in cases {
            let (code, body) = get(&path).await;
            assert_eq!(code, want, "{path}");
            assert!(body["error"].is_string(), "{path}: {body}");
        }
    }

    #[tokio::test]
    async fn wrong_method_is_405_json() {
        let r = warp::test::request()
            .method("POST")
            .path("/users/x")
            .reply(&routes(api()))
            .await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()["allow"], "GET");
        let body: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(body["error"], "method_not_allowed");
        let r = warp::test::request()
            .method("PATCH")
            .path("/admin/reducer")
            .reply(&routes(api()))
            .await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()["allow"], "GET, PUT");
    }

    #[tokio::test]
    async fn readyz_follows_the_ingest_status() {
        let api = api();
        let r = warp::test::request()
            .path("/readyz")
            .reply(&routes(api.clone()))
            .await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        api.metrics.set_status(true, "caught up");
        let r = warp::test::request()
            .path("/readyz")
            .reply(&routes(api.clone()))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let r = warp::test::request()
            .path("/metrics")
            .reply(&routes(api))
            .await;
        assert!(String::from_utf8_lossy(r.body()).contains("logq_ready 1"));
    }

    /// Sends `request` on a new connection and reads until the server closes it (or
    /// `within` passes); returns what came back.
    async fn exchange(addr: std::net::SocketAddr, request: &[u8], within: Duration) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = stream.write_all(request).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(within, stream.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn the_server_bounds_heads_slow_clients_and_connections() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let limits = ServerLimits {
            max_connections: 2,
            header_timeout: Duration::from_millis(300),
            max_header_bytes: 8192,
        };
        let server = tokio::spawn(serve(
            listener,
            routes(api()),
            limits,
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
        ));
        let get = b"GET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n";
        let ok = exchange(addr, get, Duration::from_secs(5)).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

        // An oversized head is refused, not buffered.
        let big = format!(
            "GET /healthz HTTP/1.1\r\nhost: t\r\nx-big: {}\r\n\r\n",
            "a".repeat(20_000)
        );
        let refused = exchange(addr, big.as_bytes(), Duration::from_secs(5)).await;
        assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");

        // Two slow clients take both slots; a third connection is told to come back.
        let slow = || async {
            use tokio::io::AsyncWriteExt as _;
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nho").await.unwrap();
            s
        };
        let started = std::time::Instant::now();
        let (a, b) = (slow().await, slow().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let busy = exchange(addr, get, Duration::from_secs(5)).await;
        assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
        assert!(busy.contains("\"error\":\"busy\""), "{busy}");

        // The head timeout disconnects the slow ones, which frees the slots.
        for mut s in [a, b] {
            use tokio::io::AsyncReadExt as _;
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "a slow client was not cut: {:?}",
                started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let again = exchange(addr, get, Duration::from_secs(5)).await;
        assert!(again.starts_with("HTTP/1.1 200"), "{again}");

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops")
            .unwrap();
    }

    #[tokio::test]
    async fn openapi_document_is_served_and_names_every_route() {
        let r = warp::test::request()
            .path("/openapi.json")
            .reply(&routes(api()))
            .await;
        assert_eq!(r.status(), 200);
        let doc: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for path in [
            "/users/{id}",
            "/organizations/{key}",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
            "/admin/reducer",
            "/admin/reducer/rollback",
            "/admin/reducer/replay",
        ] {
            assert!(paths.contains_key(path), "{path} is not documented");
        }
    }
}
