//! Live changes over Server-Sent Events: `GET /changes` (every change) and
//! `GET /users/{id}/watch` (one user: its current answer, then each change).
//!
//! Event ids are positions (the token after the batch; `token#i` for the i-th change
//! of a batch with several), so `Last-Event-ID` resumes exactly within the window the
//! store keeps; from outside it the stream starts with a `reset` event saying so. A
//! subscriber that falls behind is ended with a `dropped` event giving the reason.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::sse::Event;

use super::Api;
use super::reply::error;
use crate::broker::{Positions, Topics};
use crate::state::changes::{ChangeBatch, Filter, Subscription};

/// Keep-alive comments on an idle stream, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Where a resumed stream starts: the batch's position and the change within it.
type ResumePoint = (Positions, Option<usize>);

/// A parsed `Last-Event-ID`: the batch's position, and the change within it.
fn resume_point(topics: &Topics, id: &str) -> Result<ResumePoint, String> {
    let (token, index) =
        match id.rsplit_once('#') {
            Some((t, i)) => (
                t,
                Some(i.parse().map_err(|_| {
                    format!("Last-Event-ID {id:?} is not an event id of this stream")
                })?),
            ),
            None => (id, None),
        };
    Ok((topics.parse_token(token)?, index))
}

/// One SSE event per change of `batch`, skipping those up to `skip_to` (a resume
/// inside this batch).
fn batch_events(
    topics: &Topics,
    batch: &ChangeBatch,
    skip_to: Option<usize>,
    out: &mut VecDeque<Event>,
) {
    let token = topics.token(&batch.position);
    let several = batch.changes.len() > 1;
    for (i, c) in batch.changes.iter().enumerate() {
        if skip_to.is_some_and(|s| i <= s) {
            continue;
        }
        let id = if several {
            format!("{token}#{i}")
        } else {
            token.clone()
        };
        let kind = match c.kind {
            logq_abi::Kind::User => "user",
            logq_abi::Kind::Organization => "organization",
        };
        let answer: serde_json::Value = c
            .answer
            .as_deref()
            .and_then(|a| serde_json::from_str(a).ok())
            .unwrap_or(serde_json::Value::Null);
        let data = json!({"kind": kind, "key": c.key.as_ref(), "answer": answer});
        out.push_back(
            Event::default()
                .id(id)
                .event("change")
                .data(data.to_string()),
        );
    }
}

fn reset_event(reason: &str) -> Event {
    Event::default()
        .event("reset")
        .data(json!({"reason": reason}).to_string())
}

fn subscribe(
    api: &Api,
    filter: Filter,
    last_event_id: Option<&str>,
) -> Result<(Subscription, Option<ResumePoint>), super::reads::Failure> {
    let resume = match last_event_id {
        Some(id) => Some(
            resume_point(&api.reads.topics, id)
                .map_err(|e| error(StatusCode::BAD_REQUEST, "bad_request", e))?,
        ),
        None => None,
    };
    let sub = api
        .store
        .subscribe(filter, resume.as_ref().map(|r| &r.0))
        .map_err(|e| {
            Box::new(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_subscribers",
                e,
            ))
        })?;
    Ok((sub, resume))
}

/// The stream of a subscription: `first` events, then the live batches turned into
/// events by `each`, then a `dropped` event if the store ended it.
fn stream<F>(sub: Subscription, first: VecDeque<Event>, each: F) -> Response
where
    F: FnMut(&ChangeBatch, &mut VecDeque<Event>) + Send + Sync + 'static,
{
    let Subscription { live, dropped, .. } = sub;
    let state = (first, live, dropped, false, each);
    let events = futures_util::stream::unfold(
        state,
        |(mut queue, mut live, dropped, done, mut each)| async move {
            loop {
                if let Some(e) = queue.pop_front() {
                    return Some((Ok::<_, Infallible>(e), (queue, live, dropped, done, each)));
                }
                if done {
                    return None;
                }
                match live.recv().await {
                    Some(batch) => each(&batch, &mut queue),
                    None => {
                        let reason = dropped
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone()
                            .unwrap_or_else(|| "the host is shutting down".into());
                        let e = Event::default()
                            .event("dropped")
                            .data(json!({"reason": reason}).to_string());
                        return Some((Ok(e), (queue, live, dropped, true, each)));
                    }
                }
            }
        },
    );
    warp::reply::Reply::into_response(warp::sse::reply(
        warp::sse::keep_alive().interval(KEEP_ALIVE).stream(events),
    ))
}

/// `GET /changes`.
pub fn changes(api: &Api, last_event_id: Option<&str>) -> Response {
    let (sub, resume) = match subscribe(api, Filter::All, last_event_id) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let topics = api.reads.topics.clone();
    let mut first = VecDeque::new();
    if let Some(reason) = &sub.reset {
        first.push_back(reset_event(reason));
    }
    for batch in &sub.backlog {
        let skip = resume
            .as_ref()
            .filter(|(at, _)| *at == batch.position)
            .map(|(_, i)| i.unwrap_or(usize::MAX));
        batch_events(&topics, batch, skip, &mut first);
    }
    stream(sub, first, move |batch, out| {
        batch_events(&topics, batch, None, out)
    })
}

/// What a watcher last sent, to send only changes.
struct Watched {
    id: Arc<str>,
    last: Option<String>,
}

impl Watched {
    /// The event for `answer` at `token`, unless it is what was sent last.
    fn event(&mut self, answer: Option<String>, token: String) -> Option<Event> {
        if answer == self.last {
            return None;
        }
        self.last.clone_from(&answer);
        Some(match answer {
            Some(a) => Event::default().id(token).event("user").data(a),
            None => Event::default()
                .id(token)
                .event("deleted")
                .data(json!({"id": self.id.as_ref()}).to_string()),
        })
    }

    fn organization_name(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(self.last.as_deref()?).ok()?;
        v["organization_name"].as_str().map(str::to_owned)
    }
}

/// The user's answer in `batch`, if the batch changed the user, or its organization
/// (re-read from the store then).
fn user_in(api: &Api, w: &Watched, batch: &ChangeBatch) -> Option<Option<String>> {
    if let Some(c) = batch
        .changes
        .iter()
        .find(|c| c.kind == logq_abi::Kind::User && *c.key == *w.id)
    {
        return Some(c.answer.clone());
    }
    let name = w.organization_name()?;
    batch
        .changes
        .iter()
        .any(|c| c.kind == logq_abi::Kind::Organization && c.name.as_deref() == Some(name.as_str()))
        .then(|| api.store.user(&w.id))
}

/// `GET /users/{id}/watch`.
pub fn watch(api: &Api, id: &str, last_event_id: Option<&str>) -> Response {
    let (sub, resume) = match subscribe(api, Filter::User(id.into()), last_event_id) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let topics = api.reads.topics.clone();
    let mut w = Watched {
        id: id.into(),
        last: None,
    };
    let mut first = VecDeque::new();
    match (&resume, &sub.reset) {
        // A clean resume: only what changed after the client's last event.
        (Some(_), None) => {
            let uid = w.id.clone();
            let mine = move |b: &ChangeBatch| {
                b.changes
                    .iter()
                    .find(|c| c.kind == logq_abi::Kind::User && *c.key == *uid)
                    .map(|c| c.answer.clone())
            };
            if sub.backlog.iter().any(|b| mine(b).is_some()) {
                // The user's own changes after the resume point, in order (the batch
                // at the point itself was seen: only remembered).
                for batch in &sub.backlog {
                    let Some(answer) = mine(batch) else { continue };
                    if resume.as_ref().is_some_and(|(at, _)| *at == batch.position) {
                        w.last = answer;
                    } else if let Some(e) = w.event(answer, topics.token(&batch.position)) {
                        first.push_back(e);
                    }
                }
            } else {
                // Nothing of its own changed; if its organization did, the current
                // answer once.
                let token = sub.backlog.last().map(|b| topics.token(&b.position));
                w.last.clone_from(&sub.current);
                let org_changed = w.organization_name().is_some_and(|name| {
                    sub.backlog.iter().any(|b| {
                        b.changes.iter().any(|c| {
                            c.kind == logq_abi::Kind::Organization
                                && c.name.as_deref() == Some(name.as_str())
                        })
                    })
                });
                if let (true, Some(token), Some(a)) = (org_changed, token, sub.current.clone()) {
                    first.push_back(Event::default().id(token).event("user").data(a));
                }
            }
        }
        (resumed, reset) => {
            if let (Some(_), Some(reason)) = (resumed, reset) {
                first.push_back(reset_event(reason));
            }
            let token = topics.token(&sub.position);
            let e = match sub.current.clone() {
                Some(a) => {
                    w.last = Some(a.clone());
                    Event::default().id(token).event("user").data(a)
                }
                None => Event::default()
                    .id(token)
                    .event("absent")
                    .data(json!({"id": id}).to_string()),
            };
            first.push_back(e);
        }
    }
    let api = api.clone();
    stream(sub, first, move |batch, out| {
        if let Some(e) =
            user_in(&api, &w, batch).and_then(|a| w.event(a, topics.token(&batch.position)))
        {
            out.push_back(e);
        }
    })
}
