//! The HTTP API: the only module that touches warp. Routes are built by [`routes`]
//! and every error becomes a JSON body in [`recover`], in one place.

use std::convert::Infallible;
use std::sync::Arc;

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::metrics::Metrics;
use crate::state::StateStore;

/// Ids and keys longer than this are refused with 400 before any lookup.
pub const MAX_ID_BYTES: usize = 1024;

/// What the handlers read.
#[derive(Clone)]
pub struct Api {
    /// The folded state.
    pub store: Arc<StateStore>,
    /// Counters and readiness.
    pub metrics: Arc<Metrics>,
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
    let metrics = warp::path!("metrics").and(with).map(|api: Api| {
        let body = api.metrics.render(api.store.sizes());
        let mut r = Response::new(body.into());
        r.headers_mut().insert(
            "content-type",
            warp::http::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        r
    });
    warp::get()
        .and(
            user.or(organization)
                .unify()
                .or(healthz)
                .unify()
                .or(readyz)
                .unify()
                .or(metrics)
                .unify(),
        )
        .recover(recover)
        .unify()
}

/// Looks up one entity by the raw path segment.
fn entity(what: &str, raw: &str, find: impl FnOnce(&str) -> Option<String>) -> Response {
    let id = match percent_decode(raw) {
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
    let (code, kind, message) = if rejection.is_not_found() {
        (
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route".to_string(),
        )
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "only GET is served here".to_string(),
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
    use crate::runtime::{Entity, Kind, Update};

    fn api() -> Api {
        let store = Arc::new(StateStore::new());
        store.apply(
            &[Entity {
                kind: Kind::User,
                key: "snake ü".into(),
            }],
            vec![Update {
                state: Some(vec![1]),
                view: Some(r#"{"id":"snake ü"}"#.into()),
                join: None,
            }],
        );
        Api {
            store,
            metrics: Arc::new(Metrics::new(["users", "organizations"])),
        }
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
        let body: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(body["error"], "method_not_allowed");
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
}
