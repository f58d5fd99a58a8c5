//! Replies and errors: every failure of every route becomes one JSON shape here, and
//! nothing internal (paths, backtraces) leaks into it.

use std::convert::Infallible;

use serde_json::json;
use warp::Rejection;
use warp::http::StatusCode;
use warp::reply::Response;

/// A refusal with its status, turned into JSON by [`recover`].
#[derive(Debug)]
pub struct Refusal {
    code: StatusCode,
    kind: &'static str,
    message: String,
}

impl warp::reject::Reject for Refusal {}

/// A rejection that [`recover`] turns into `code` with a JSON body.
pub fn refuse(code: StatusCode, kind: &'static str, message: impl Into<String>) -> Rejection {
    warp::reject::custom(Refusal {
        code,
        kind,
        message: message.into(),
    })
}

/// A JSON body with `code`.
pub fn json_reply(code: StatusCode, body: &serde_json::Value) -> Response {
    let mut r = Response::new(body.to_string().into());
    *r.status_mut() = code;
    r.headers_mut().insert(
        "content-type",
        warp::http::HeaderValue::from_static("application/json"),
    );
    r
}

/// The JSON error body every failure gets: `{"error": kind, "message": ...}`.
pub fn error(code: StatusCode, kind: &str, message: String) -> Response {
    json_reply(code, &json!({"error": kind, "message": message}))
}

/// Maps every rejection to a JSON error; nothing internal leaks.
pub async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let (code, kind, message) = if let Some(r) = rejection.find::<Refusal>() {
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
