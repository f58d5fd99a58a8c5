//! `GET /users/{id}?explain=1` and `GET /organizations/{key}?explain=1`: the answer
//! with why it is what it is. The per-field provenance comes from the active reducer's
//! `explain` export (WIT 3.2), run on the state the store keeps, never from a second
//! store; the join (which organization key a user's name picked, among which) comes
//! from the store. Without `explain` the plain answer is served unchanged.

use serde_json::{Value, json};
use warp::http::StatusCode;

use super::api::{Api, Failure};
use super::reads::Found;
use super::reply::error;
use crate::state::{Kept, StateStore};
use logq_abi::Kind;

/// What users of a name join: the rule, in the words of the README.
const JOIN_RULE: &str = "users join the organization with their organization_name; of several keys with one name, the smallest";

/// Whether the query asks for an explanation: `explain=1` or `explain=true`.
///
/// # Errors
/// A 400 for any other value.
pub fn wanted(value: Option<&str>) -> Result<bool, Failure> {
    match value {
        None => Ok(false),
        Some("1" | "true") => Ok(true),
        Some(other) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("explain takes 1 or true, got {}", json!(other)),
        ))),
    }
}

/// The explanation of user `id`: its answer (`null` while not visible), the
/// reducer's account of its state, and the organization its name joins.
pub fn user(api: &Api, store: &StateStore, id: &str) -> Found {
    let kept = store.user_kept(id).ok_or_else(|| not_kept("user", id))?;
    let mut body = explained(api, Kind::User, id, &kept, &api.reads.topics.users)?;
    body["organization"] = match kept.join.as_deref() {
        None => Value::Null,
        Some(name) => {
            let keys = store.organizations_named(name);
            let joined = keys.first().cloned();
            let joined_organization = match &joined {
                Some(key) => match store.organization_kept(key) {
                    Some(k) => explained(
                        api,
                        Kind::Organization,
                        key,
                        &k,
                        &api.reads.topics.organizations,
                    )?,
                    None => Value::Null,
                },
                None => Value::Null,
            };
            json!({
                "name": name,
                "keys_with_this_name": keys,
                "joined": joined,
                "rule": JOIN_RULE,
                "joined_organization": joined_organization,
            })
        }
    };
    Ok(body.to_string())
}

/// The explanation of organization `key`, with the keys that share its name and
/// whether users of that name join it.
pub fn organization(api: &Api, store: &StateStore, key: &str) -> Found {
    let kept = store
        .organization_kept(key)
        .ok_or_else(|| not_kept("organization", key))?;
    let mut body = explained(
        api,
        Kind::Organization,
        key,
        &kept,
        &api.reads.topics.organizations,
    )?;
    if let Some(name) = kept.join.as_deref() {
        let keys = store.organizations_named(name);
        body["joined_by_users_named_it"] = (keys.first().map(String::as_str) == Some(key)).into();
        body["keys_with_this_name"] = keys.into();
        body["rule"] = JOIN_RULE.into();
    }
    Ok(body.to_string())
}

/// `{"key", "answer", "topic", "reducer", "provenance"}` for one kept state.
fn explained(api: &Api, kind: Kind, key: &str, kept: &Kept, topic: &str) -> Result<Value, Failure> {
    let Some(active) = api.admin.control.active() else {
        return Err(unsupported("no reducer is loaded"));
    };
    let info = active.info();
    let text = match active.reducer.explain(kind, key, &kept.state) {
        Ok(Some(text)) => text,
        Ok(None) => {
            return Err(unsupported(&format!(
                "the active reducer ({}, logq:reducer/fold@{}) does not export logq:reducer/explain: its answers cannot be explained",
                info.sha256, info.world_version
            )));
        }
        Err(e) => {
            return Err(Box::new(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "explain_failed",
                format!("the active reducer could not explain this state: {e}"),
            )));
        }
    };
    let explain: Value = serde_json::from_str(&text).map_err(|e| {
        Box::new(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "explain_failed",
            format!("the active reducer's explanation is not JSON: {e}"),
        ))
    })?;
    let answer = kept
        .answer
        .as_deref()
        .and_then(|a| serde_json::from_str::<Value>(a).ok())
        .unwrap_or(Value::Null);
    Ok(json!({
        "key": key,
        "answer": answer,
        "topic": topic,
        "reducer": {
            "sha256": info.sha256,
            "rendered_this_state": kept.by == active.id,
        },
        "provenance": explain,
    }))
}

fn not_kept(what: &str, key: &str) -> Failure {
    Box::new(error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no {what} with id {} is kept (never seen, or forgotten)",
            json!(key)
        ),
    ))
}

fn unsupported(why: &str) -> Failure {
    Box::new(error(
        StatusCode::NOT_IMPLEMENTED,
        "not_supported",
        why.to_owned(),
    ))
}
