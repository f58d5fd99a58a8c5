//! The HTTP API: the only module that touches warp and hyper, and the last stage of
//! the data path. Routes are built by [`routes`] and every error becomes a JSON body
//! in [`recover`], in one place.
//!
//! - [`server`]: the connection loop and its limits;
//! - [`admin`]: the admin endpoints, against a [`SwapControl`] handle;
//! - [`status`]: the status page and its live samples;
//! - here: the read routes (users, organizations, health, readiness, metrics,
//!   OpenAPI), percent-decoding, and the error mapping.

pub mod admin;
pub mod api;
pub mod explain;
pub mod forward;
pub mod group;
pub mod live;
pub mod reads;
pub mod reply;
pub mod samples;
pub mod server;
pub mod status;

use std::convert::Infallible;
use std::sync::Arc;

use serde_json::json;
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::Response;

pub use admin::{Admin, SwapControl};
pub use api::{Api, MAX_ID_BYTES, Reads};

use crate::state::StateStore;
use api::decoded;
pub use samples::StatusFeed;
pub use server::{ServerLimits, serve};

use reply::{error, json_reply, recover};

/// The OpenAPI document of this API, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route of the service, errors included: the filter never rejects.
pub fn routes(api: Api) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    // Shared by every request: a request takes a reference count, not a copy of
    // the API's handles (a copy, with the topics' names in it, cost a fifth of the
    // GET throughput).
    let api = Arc::new(api);
    let with = {
        let api = Arc::clone(&api);
        warp::any().map(move || Arc::clone(&api))
    };
    let conditions = warp::header::optional::<String>(reads::MIN_POSITION)
        .and(warp::header::optional::<String>("if-none-match"))
        .map(|min_position, if_none_match| reads::Conditions {
            min_position,
            if_none_match,
        });
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    let read = with.clone().and(conditions).and(query);
    let user = warp::path!("users" / String)
        .and(read.clone())
        .and(warp::header::optional::<String>(forward::FORWARDED))
        .then(
            |id: String,
             api: Arc<Api>,
             c: reads::Conditions,
             raw: String,
             forwarded: Option<String>| async move {
                // Only where hosts share partitions: what a forwarded read asks.
                let path = |raw: &str| {
                    if raw.is_empty() {
                        format!("/users/{id}")
                    } else {
                        format!("/users/{id}?{raw}")
                    }
                };
                if api.cluster.is_some() {
                    let user = match decoded("user", &id) {
                        Ok(user) => user,
                        Err(r) => return *r,
                    };
                    if let Some(r) =
                        forward::elsewhere(&api, &user, &path(&raw), forwarded.is_some(), &c).await
                    {
                        return r;
                    }
                }
                // Kept for a second look where hosts share partitions (below).
                let again = api.cluster.as_ref().map(|_| c.clone());
                let mut r = point(
                    &api,
                    c,
                    &raw,
                    "user",
                    &id,
                    |s, id| s.user(id),
                    explain::user,
                )
                .await;
                if let Some(cluster) = &api.cluster {
                    if r.status() == StatusCode::NOT_FOUND
                        && let Ok(user) = decoded("user", &id)
                        && let Some(p) = cluster.partition_of(&user)
                    {
                        if cluster.is_behind(p) {
                            // Held here, but not folded up to date yet (it just
                            // moved to this host): not found may be only not yet.
                            return forward::catching_up(p);
                        }
                        if cluster.lingers(p) && !cluster.owns(p) {
                            // Given up here: a user this host never had may exist
                            // at the new holder, which is not caught up yet.
                            return forward::catching_up(p);
                        }
                        if !cluster.serves(p)
                            && let Some(c) = &again
                        {
                            // It left this host while the read ran (its users are
                            // forgotten): ask where it is now.
                            if let Some(r) =
                                forward::elsewhere(&api, &user, &path(&raw), forwarded.is_some(), c)
                                    .await
                            {
                                return r;
                            }
                        }
                    }
                    if let Ok(me) = warp::http::HeaderValue::from_str(cluster.instance()) {
                        r.headers_mut().insert(forward::SERVED_BY, me);
                    }
                    // Answered here as a standby: say so, and how far behind.
                    if let Ok(user) = decoded("user", &id)
                        && let Some(p) = cluster.partition_of(&user)
                        && !cluster.serves(p)
                        && !cluster.lingers(p)
                        && let Some(lag) = cluster.standby().get(&p)
                    {
                        cluster.count_standby_read();
                        r.headers_mut()
                            .insert(forward::STANDBY, warp::http::HeaderValue::from(*lag));
                    }
                }
                r
            },
        );
    let organization = warp::path!("organizations" / String)
        .and(read.clone())
        .then(
            |key: String, api: Arc<Api>, c: reads::Conditions, raw: String| async move {
                let plain = |s: &StateStore, key: &str| s.organization(key);
                point(
                    &api,
                    c,
                    &raw,
                    "organization",
                    &key,
                    plain,
                    explain::organization,
                )
                .await
            },
        );
    let users = warp::path!("users").and(read.clone()).then(
        |api: Arc<Api>, c: reads::Conditions, raw: String| async move {
            reads::listing(&api, c, &raw, &["organization"], |s, q, page| {
                let users = s.list_users(q.get("organization"), page.after, page.limit);
                Ok(reads::page_body("users", &users))
            })
            .await
        },
    );
    let organizations = warp::path!("organizations").and(read.clone()).then(
        |api: Arc<Api>, c: reads::Conditions, raw: String| async move {
            reads::listing(&api, c, &raw, &[], |s, _, page| {
                let orgs = s.list_organizations(page.after, page.limit);
                Ok(reads::page_body("organizations", &orgs))
            })
            .await
        },
    );
    let members = warp::path!("organizations" / String / "users")
        .and(read)
        .then(
            |key: String, api: Arc<Api>, c: reads::Conditions, raw: String| async move {
                reads::listing(&api, c, &raw, &[], |s, _, page| {
                    let key = decoded("organization", &key)?;
                    match s.members(&key, page.after, page.limit) {
                        Some(users) => Ok(reads::page_body("users", &users)),
                        None => Err(Box::new(not_found("organization", &key))),
                    }
                })
                .await
            },
        );
    let changes = warp::path!("changes")
        .and(with.clone())
        .and(warp::sse::last_event_id::<String>())
        .map(|api: Arc<Api>, last: Option<String>| live::changes(&api, last.as_deref()));
    let watch = warp::path!("users" / String / "watch")
        .and(with.clone())
        .and(warp::sse::last_event_id::<String>())
        .map(
            |raw: String, api: Arc<Api>, last: Option<String>| match decoded("user", &raw) {
                // Watched where the user is folded: a host that does not hold its
                // partition sends the watcher there.
                Ok(id) => forward::holder_of(&api, &id, &format!("/users/{raw}/watch"))
                    .unwrap_or_else(|| live::watch(&api, &id, last.as_deref())),
                Err(r) => *r,
            },
        );
    let export = warp::path!("export")
        .and(with.clone())
        .then(|api: Arc<Api>| async move { reads::export(&api).await });
    let healthz =
        warp::path!("healthz").map(|| json_reply(StatusCode::OK, &json!({"status": "ok"})));
    let cluster = warp::path!("cluster").and(with.clone()).map(|api: Arc<Api>| {
        let view = api.cluster.as_ref().map_or_else(
            || json!({"sharded": false, "message": "this host holds every partition (start with --sharded to share them)"}),
            |c| {
                let mut v = c.view();
                v["sharded"] = true.into();
                v
            },
        );
        json_reply(StatusCode::OK, &view)
    });
    let openapi = warp::path!("openapi.json").map(|| {
        let mut r = Response::new(OPENAPI.into());
        r.headers_mut().insert(
            "content-type",
            warp::http::HeaderValue::from_static("application/json"),
        );
        r
    });
    let page = warp::path::full().and_then(|path: warp::path::FullPath| async move {
        status::asset(path.as_str()).ok_or_else(warp::reject::not_found)
    });
    let status = warp::path!("status")
        .and(with.clone())
        .map(|api: Arc<Api>| status::current(&api));
    let status_stream = warp::path!("status" / "stream")
        .and(with.clone())
        .map(|api: Arc<Api>| status::stream(&api));
    let readyz = warp::path!("readyz").and(with.clone()).map(|api: Arc<Api>| {
        let at = api.store.position();
        let (mut ready, mut status) = api.metrics.readiness();
        // Sharing partitions, a host is ready to answer any id only once it knows
        // where every partition is answered.
        if let Some(cluster) = &api.cluster
            && ready
            && let Some(p) = cluster.unanswered().first()
        {
            ready = false;
            status = format!("learning which host answers for users/{p}");
        }
        let code = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let token = api.reads.topics.token(&at);
        let mut r = json_reply(
            code,
            &json!({"ready": ready, "status": status, "lag": api.metrics.total_lag(), "position": token}),
        );
        if let Ok(v) = warp::http::HeaderValue::from_str(&token) {
            r.headers_mut().insert(reads::POSITION, v);
        }
        r
    });
    let admin = admin::routes(api.admin.clone());
    let metrics = warp::path!("metrics").and(with).map(|api: Arc<Api>| {
        let mut body = api.metrics.render(api.store.sizes());
        if let Some(bytes) = api.admin.control.pool_resident_bytes() {
            body.push_str(&format!(
                "# HELP logq_reducer_pool_resident_bytes Memory the reducers' instance pool keeps resident in slots not in use (up to {} MiB a slot, for the next instance).\n\
                 # TYPE logq_reducer_pool_resident_bytes gauge\nlogq_reducer_pool_resident_bytes {bytes}\n",
                crate::fold::runtime::KEEP_RESIDENT >> 20
            ));
        }
        if let Some(c) = &api.cluster {
            body.push_str(&c.render_metrics());
        }
        let mut r = Response::new(body.into());
        r.headers_mut().insert(
            "content-type",
            warp::http::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        r
    });
    // Boxed in two groups: one chain of this many filters overflows the compiler's
    // recursion limit in release builds.
    let entities = user
        .or(organization)
        .unify()
        .or(users)
        .unify()
        .or(organizations)
        .unify()
        .or(members)
        .unify()
        .boxed();
    let streams = export.or(changes).unify().or(watch).unify().boxed();
    let operators = page.or(status).unify().or(status_stream).unify().boxed();
    let public = warp::get().and(
        entities
            .or(streams)
            .unify()
            .or(healthz)
            .unify()
            .or(cluster)
            .unify()
            .or(openapi)
            .unify()
            .or(readyz)
            .unify()
            .or(metrics)
            .unify()
            .or(operators)
            .unify(),
    );
    let timing = {
        let metrics = api.metrics.clone();
        warp::log::custom(move |info| {
            if is_read(info.method(), info.path()) {
                metrics.read_answered(info.elapsed());
            }
        })
    };
    let cluster = api.cluster.clone();
    warp::path::full()
        // Reads first: they are nearly all the traffic.
        .and(public.or(admin).unify().recover(recover).unify())
        .map(move |path: warp::path::FullPath, mut response: Response| {
            if let Some(cluster) = &cluster
                && response.status().is_success()
                && forward::is_partial(path.as_str())
            {
                forward::mark_partial(cluster, &mut response);
            }
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
        .with(timing)
        .map(warp::Reply::into_response)
}

/// A plain read of one user, `GET /users/{id}` with no query and no conditions on a
/// host that holds every partition, answered without the filter chain: such reads
/// are nearly all the traffic, and warp's chain of routes cost a quarter of each
/// (`logq-bench --reads-only`, the builds in turn: 81-83k requests/s through the
/// chain, 103-107k without). The response is the one [`routes`] gives (a test
/// compares them); anything else, a user not found included, is `None`: the chain
/// answers it.
pub fn plain_read<B>(api: &Api, req: &warp::http::Request<B>) -> Option<Response> {
    if req.method() != warp::http::Method::GET
        || api.cluster.is_some()
        || req.uri().query().is_some()
    {
        return None;
    }
    let raw = req.uri().path().strip_prefix("/users/")?;
    let headers = req.headers();
    if raw.is_empty()
        || raw.contains('/')
        || [reads::MIN_POSITION, "if-none-match", forward::FORWARDED]
            .iter()
            .any(|h| headers.contains_key(*h))
    {
        return None;
    }
    let start = std::time::Instant::now();
    let id = decoded("user", raw).ok()?;
    let at = api.reads.position_header(&api.store);
    let answer = api.store.user(&id)?;
    let response = reads::respond(at, Ok(answer), None);
    api.metrics.read_answered(start.elapsed());
    Some(response)
}

/// [`plain_read`] on `api`, as [`serve`] takes it.
pub fn plain_reads(
    api: Api,
) -> impl Fn(&hyper::Request<hyper::body::Incoming>) -> Option<Response> + Clone + Send + Sync + 'static
{
    let api = Arc::new(api);
    move |req| plain_read(&api, req)
}

/// Whether a request is a read the status page times: a GET of a user, an
/// organization or a listing (not the live streams).
fn is_read(method: &warp::http::Method, path: &str) -> bool {
    method == warp::http::Method::GET
        && (path.starts_with("/users") || path.starts_with("/organizations"))
        && !path.ends_with("/watch")
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

/// Looks up one entity by the raw path segment: its answer, or the error response.
/// One user or organization: its answer, or with `?explain=1` why it is what it is.
async fn point(
    api: &Api,
    conditions: reads::Conditions,
    raw_query: &str,
    what: &str,
    raw_id: &str,
    plain: impl FnOnce(&StateStore, &str) -> Option<String>,
    explained: impl FnOnce(&Api, &StateStore, &str) -> reads::Found,
) -> Response {
    let query = match reads::Query::parse(raw_query, &["explain", "redirect"]) {
        Ok(q) => q,
        Err(r) => return *r,
    };
    let explain = match explain::wanted(query.get("explain")) {
        Ok(e) => e,
        Err(r) => return *r,
    };
    reads::answer(api, conditions, &query, |s| {
        let id = decoded(what, raw_id)?;
        if explain {
            explained(api, s, &id)
        } else {
            plain(s, &id).ok_or_else(|| Box::new(not_found(what, &id)))
        }
    })
    .await
}

fn not_found(what: &str, id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no {what} with id {}", json!(id)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::metrics::Metrics;
    use crate::state::Writer;
    use std::time::Duration;

    use logq_abi::{Entity, Kind};

    use crate::reducers::{Mode, Origin, Outcome, ReducerInfo, Submitted, SwapError, SwapRecord};

    /// The store's writer, as the consumer loop would hold it.
    fn writer(store: &Arc<crate::state::StateStore>) -> Writer {
        Writer::claim(store).expect("no other writer")
    }

    fn api() -> Api {
        let store = Writer::new_store();
        store.apply(
            &[Entity {
                kind: Kind::User,
                key: "snake ü".into(),
            }],
            vec![crate::state::test_update(Some(r#"{"id":"snake ü"}"#), None)],
        );
        Api {
            store: Arc::clone(store.store()),
            metrics: Arc::new(Metrics::new(["users", "organizations"])),
            admin: Arc::new(admin(None, Fake::default())),
            cluster: None,
            status: Arc::new(StatusFeed::new([
                "users-dlq".into(),
                "organizations-dlq".into(),
            ])),
            reads: Reads {
                topics: crate::broker::Topics {
                    users: "users".into(),
                    organizations: "organizations".into(),
                    rekeyed_from: None,
                },
                wait_max: Duration::from_millis(300),
                stage: None,
                tokens: Arc::default(),
            },
        }
    }

    #[tokio::test]
    async fn a_host_that_shares_partitions_answers_404_only_for_what_it_holds_caught_up() {
        let mut api = api();
        let cluster = crate::cluster::Cluster::new("here", "http://127.0.0.1:1");
        api.cluster = Some(cluster.clone());
        let status = |api: &Api, path: &'static str| {
            let routes = routes(api.clone());
            async move {
                warp::test::request()
                    .path(path)
                    .reply(&routes)
                    .await
                    .status()
            }
        };
        // Starting: the partitions are not known yet.
        assert_eq!(
            status(&api, "/users/nobody").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        cluster.set_partitions(1);
        // Held, still being folded: neither a user's answer nor its absence is final.
        cluster.set_owned([0].into(), [0].into(), false);
        for path in ["/users/snake%20%C3%BC", "/users/nobody"] {
            assert_eq!(
                status(&api, path).await,
                StatusCode::SERVICE_UNAVAILABLE,
                "{path}"
            );
        }
        // Caught up: the answer, or a 404 that means it; ready, since every
        // partition (the one) is answered for.
        api.metrics.set_status(true, "caught up");
        cluster.set_owned([0].into(), [].into(), true);
        assert_eq!(status(&api, "/readyz").await, StatusCode::OK);
        assert_eq!(status(&api, "/users/snake%20%C3%BC").await, StatusCode::OK);
        assert_eq!(status(&api, "/users/nobody").await, StatusCode::NOT_FOUND);
        // No longer held, and no other host known to hold it: 503, never 404, and
        // not ready.
        cluster.set_owned([].into(), [].into(), true);
        assert_eq!(
            status(&api, "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        for path in [
            "/users/snake%20%C3%BC",
            "/users/nobody",
            "/users/nobody/watch",
        ] {
            assert_eq!(
                status(&api, path).await,
                StatusCode::SERVICE_UNAVAILABLE,
                "{path}"
            );
        }
    }

    fn at(next: i64) -> crate::broker::Positions {
        let p = crate::broker::Partition {
            source: logq_abi::Source::Users,
            id: 0,
        };
        [(p, next)].into_iter().collect()
    }

    #[tokio::test]
    async fn answers_carry_their_position_and_an_etag_that_gives_304() {
        let api = api();
        writer(&api.store).publish_position(&at(7));
        let r = warp::test::request()
            .path("/users/snake%20%C3%BC")
            .reply(&routes(api.clone()))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[reads::POSITION], "users/0@7");
        let tag = r.headers()["etag"].to_str().unwrap().to_owned();
        let again = warp::test::request()
            .path("/users/snake%20%C3%BC")
            .header("if-none-match", &tag)
            .reply(&routes(api.clone()))
            .await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert!(again.body().is_empty());
        let other = warp::test::request()
            .path("/users/snake%20%C3%BC")
            .header("if-none-match", "\"0000\"")
            .reply(&routes(api.clone()))
            .await;
        assert_eq!(other.status(), StatusCode::OK);
        let missing = warp::test::request()
            .path("/users/nobody")
            .reply(&routes(api.clone()))
            .await;
        assert_eq!(
            missing.headers()[reads::POSITION],
            "users/0@7",
            "a 404 says where it looked"
        );
        let ready = warp::test::request()
            .path("/readyz")
            .reply(&routes(api))
            .await;
        assert_eq!(ready.headers()[reads::POSITION], "users/0@7");
    }

    #[tokio::test]
    async fn a_plain_read_answers_as_the_routes_do_and_leaves_the_rest_to_them() {
        use http_body_util::BodyExt as _;
        let api = api();
        writer(&api.store).publish_position(&at(7));
        let get = |path: &str| warp::http::Request::get(path).body(()).unwrap();
        let path = "/users/snake%20%C3%BC";
        let counted = api.metrics.reads().count;
        let fast = plain_read(&api, &get(path)).expect("a plain read is answered at once");
        assert_eq!(api.metrics.reads().count, counted + 1, "and timed");
        let chain = warp::test::request()
            .path(path)
            .reply(&routes(api.clone()))
            .await;
        assert_eq!(fast.status(), chain.status());
        assert_eq!(fast.headers(), chain.headers());
        assert_eq!(chain.headers()[reads::POSITION], "users/0@7");
        let body = fast.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, chain.body());
        // Everything else goes through the routes.
        for path in [
            "/users/snake%20%C3%BC?explain=1",
            "/users/nobody",
            "/users/",
            "/users/%ff",
            "/users/snake%20%C3%BC/watch",
            "/organizations/snake%20%C3%BC",
            "/users",
        ] {
            assert!(plain_read(&api, &get(path)).is_none(), "{path}");
        }
        for header in [reads::MIN_POSITION, "if-none-match", forward::FORWARDED] {
            let mut r = get(path);
            r.headers_mut()
                .insert(header, warp::http::HeaderValue::from_static("users/0@1"));
            assert!(plain_read(&api, &r).is_none(), "{header}");
        }
        let mut post = get(path);
        *post.method_mut() = warp::http::Method::POST;
        assert!(plain_read(&api, &post).is_none(), "POST");
    }

    #[tokio::test]
    async fn a_read_waits_for_the_position_it_requires_and_gives_up_with_503() {
        let api = api();
        writer(&api.store).publish_position(&at(3));
        // Reached already: answered at once.
        let r = warp::test::request()
            .path("/users/snake%20%C3%BC?min_position=users/0@3")
            .reply(&routes(api.clone()))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        // Reached while it waits.
        let store = api.store.clone();
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            writer(&store).publish_position(&at(5));
        });
        let r = warp::test::request()
            .path("/users/snake%20%C3%BC")
            .header(reads::MIN_POSITION, "users/0@5")
            .reply(&routes(api.clone()))
            .await;
        later.await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[reads::POSITION], "users/0@5");
        // Not reached within --read-wait-max-ms (300 ms here).
        let start = std::time::Instant::now();
        let r = warp::test::request()
            .path("/users/snake%20%C3%BC")
            .header(reads::MIN_POSITION, "users/0@9,users/1@1")
            .reply(&routes(api.clone()))
            .await;
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "1");
        let body: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(body["error"], "position_not_reached");
        assert_eq!(body["behind"], json!({"users/0": 4, "users/1": 1}));
        // A token that is not one is refused, not waited on.
        let (code, body) = get("/users/x?min_position=users@1").await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        let (code, body) = get("/users/x?min_position=payments/0@1").await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        // A malformed query token is refused even when the header is good.
        let r = warp::test::request()
            .path("/users/snake%20%C3%BC?min_position=%C3%A1")
            .header(reads::MIN_POSITION, "users/0@1")
            .reply(&routes(api.clone()))
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn listings_page_and_refuse_bad_parameters() {
        let (code, body) = get("/users?limit=1").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            json!({"users": [{"id": "snake ü", "organization": null}], "next": null})
        );
        let (code, body) = get("/organizations").await;
        assert_eq!(
            (code, body),
            (StatusCode::OK, json!({"organizations": [], "next": null}))
        );
        let (code, _) = get("/organizations/nope/users").await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        for bad in [
            "/users?limit=0",
            "/users?limit=5000",
            "/users?sort=name",
            "/organizations?organization=x",
        ] {
            let (code, body) = get(bad).await;
            assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}: {body}");
            assert!(body["message"].is_string(), "{bad}: {body}");
        }
    }

    /// A swap control that answers from a script and logs what reached it: the HTTP
    /// layer is tested for its mapping, not for validation (the registry's own tests
    /// and the end-to-end tests do that with real components).
    #[derive(Default)]
    struct Fake {
        answers: std::sync::Mutex<std::collections::VecDeque<Result<Submitted, SwapError>>>,
        calls: std::sync::Mutex<Vec<String>>,
    }

    impl Fake {
        fn answering(answers: impl IntoIterator<Item = Result<Submitted, SwapError>>) -> Self {
            Self {
                answers: std::sync::Mutex::new(answers.into_iter().collect()),
                calls: Default::default(),
            }
        }
        fn next(&self, call: String) -> Result<Submitted, SwapError> {
            self.calls.lock().unwrap().push(call);
            self.answers
                .lock()
                .unwrap()
                .pop_front()
                .expect("the test scripted an answer for every call")
        }
    }

    impl SwapControl for Fake {
        fn submit(&self, bytes: &[u8], origin: Origin, mode: Mode) -> Result<Submitted, SwapError> {
            self.next(format!("submit {} bytes {origin:?} {mode:?}", bytes.len()))
        }
        fn rollback(&self) -> Result<Submitted, SwapError> {
            self.next("rollback".into())
        }
        fn cancel_replay(&self) -> bool {
            self.calls.lock().unwrap().push("cancel".into());
            false
        }
        fn describe(&self) -> serde_json::Value {
            json!({"active": {"origin": "startup"}})
        }
    }

    fn submitted(outcome: Outcome, mode: Mode, origin: Origin) -> Submitted {
        Submitted {
            swap: SwapRecord {
                id: 1,
                at: "now".into(),
                sha256: "ab".into(),
                origin,
                mode,
                outcome,
                reason: None,
                compile_ms: 0,
                from_cache: false,
                canary_ms: 0,
                switch_offsets: None,
                stale_answers: None,
                preview: None,
            },
            active: ReducerInfo {
                sha256: "ab".into(),
                size: 1,
                world_version: "3.1.0".into(),
                loaded_at: "now".into(),
                origin,
            },
        }
    }

    fn admin(token: Option<&str>, control: Fake) -> Admin {
        Admin {
            control: Arc::new(control),
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
        api.admin = Arc::new(admin(Some("s3cret"), Fake::default()));
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
    }

    #[tokio::test]
    async fn admin_refusals_map_to_their_status_codes() {
        use crate::fold::ReducerError;
        let fake = Fake::answering([
            Err(SwapError::NotWasm(ReducerError::NotWasm)),
            Err(SwapError::Invalid(ReducerError::Invalid(
                "no export".into(),
            ))),
            Err(SwapError::Canary("on the sample data: trap".into())),
            Err(SwapError::Busy("a replay is in progress".into())),
            Err(SwapError::NoPrevious),
            Err(SwapError::Stopped),
        ]);
        let mut api = api();
        let control = Arc::new(fake);
        api.admin = Arc::new(Admin {
            control: control.clone(),
            token: Some("t".into()),
            max_body_bytes: 1 << 20,
        });
        let auth = Some("Bearer t");
        let expect = [
            ("PUT", "/admin/reducer", StatusCode::BAD_REQUEST, "not_wasm"),
            (
                "PUT",
                "/admin/reducer",
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_reducer",
            ),
            (
                "PUT",
                "/admin/reducer?mode=replay",
                StatusCode::UNPROCESSABLE_ENTITY,
                "canary_failed",
            ),
            (
                "PUT",
                "/admin/reducer?mode=replay",
                StatusCode::CONFLICT,
                "conflict",
            ),
            (
                "POST",
                "/admin/reducer/rollback",
                StatusCode::CONFLICT,
                "conflict",
            ),
            (
                "PUT",
                "/admin/reducer",
                StatusCode::SERVICE_UNAVAILABLE,
                "stopping",
            ),
        ];
        for (method, path, code, kind) in expect {
            let (got, body) = admin_call(&api, method, path, auth, b"\0asm").await;
            assert_eq!(
                (got, body["error"].as_str()),
                (code, Some(kind)),
                "{method} {path}: {body}"
            );
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{body}"
            );
        }
        // Refused before reaching the control: too big, and an unknown mode.
        let big = vec![0u8; (1 << 20) + 1];
        let (code, _) = admin_call(&api, "PUT", "/admin/reducer", auth, &big).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
        let (code, _) =
            admin_call(&api, "PUT", "/admin/reducer?mode=sideways", auth, b"\0asm").await;
        assert_eq!(code, StatusCode::BAD_REQUEST);
        let (code, _) = admin_call(&api, "DELETE", "/admin/reducer/replay", auth, b"").await;
        assert_eq!(code, StatusCode::NOT_FOUND, "no replay runs");
        assert_eq!(
            *control.calls.lock().unwrap(),
            [
                "submit 4 bytes Http Forward",
                "submit 4 bytes Http Forward",
                "submit 4 bytes Http Replay",
                "submit 4 bytes Http Replay",
                "rollback",
                "submit 4 bytes Http Forward",
                "cancel",
            ]
        );
    }

    #[tokio::test]
    async fn forward_swap_is_200_replay_and_rollback_202() {
        let fake = Fake::answering([
            Ok(submitted(Outcome::Active, Mode::Forward, Origin::Http)),
            Ok(submitted(Outcome::Replaying, Mode::Replay, Origin::Http)),
            Ok(submitted(
                Outcome::Replaying,
                Mode::Replay,
                Origin::Rollback,
            )),
        ]);
        let mut api = api();
        api.admin = Arc::new(admin(Some("t"), fake));
        let auth = Some("Bearer t");
        let (code, body) = admin_call(&api, "PUT", "/admin/reducer?mode=forward", auth, b"x").await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert_eq!(body["swap"]["outcome"], "active");
        assert_eq!(body["active"]["origin"], "http");
        let (code, body) = admin_call(&api, "PUT", "/admin/reducer?mode=replay", auth, b"x").await;
        assert_eq!(code, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["swap"]["outcome"], "replaying");
        let (code, body) = admin_call(&api, "POST", "/admin/reducer/rollback", auth, b"").await;
        assert_eq!(code, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["swap"]["origin"], "rollback");
        assert_eq!(body["swap"]["mode"], "replay");
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
            ("/users//x".to_string(), StatusCode::NOT_FOUND),
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

    /// [`exchange`] again until the answer starts with `wanted` or `within` has
    /// passed; the last answer.
    async fn exchange_until(
        addr: std::net::SocketAddr,
        request: &[u8],
        wanted: &str,
        within: Duration,
    ) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            let answer = exchange(addr, request, Duration::from_secs(5)).await;
            if answer.starts_with(wanted) || std::time::Instant::now() > deadline {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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
            |_: &hyper::Request<hyper::body::Incoming>| None,
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
        // Once the server has taken both (however long that takes on a busy machine),
        // a third is refused.
        let busy = exchange_until(addr, get, "HTTP/1.1 503", Duration::from_secs(3)).await;
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
        // The slots are freed as the server notices the closed connections.
        let again = exchange_until(addr, get, "HTTP/1.1 200", Duration::from_secs(5)).await;
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
            "/users",
            "/organizations/{key}",
            "/organizations",
            "/organizations/{key}/users",
            "/users/{id}/watch",
            "/export",
            "/changes",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
            "/admin/reducer",
            "/admin/reducer/rollback",
            "/admin/reducer/replay",
            "/",
            "/status",
            "/status/stream",
        ] {
            assert!(paths.contains_key(path), "{path} is not documented");
        }
    }

    #[tokio::test]
    async fn the_status_page_is_served_from_the_binary_under_a_strict_policy() {
        let api = api();
        for (path, kind, needle) in [
            (
                "/",
                "text/html; charset=utf-8",
                "<script src=\"/ui/status.js\"",
            ),
            (
                "/ui/status.js",
                "text/javascript; charset=utf-8",
                "new EventSource(\"/status/stream\")",
            ),
            ("/ui/status.css", "text/css; charset=utf-8", ".chart"),
        ] {
            let r = warp::test::request()
                .path(path)
                .reply(&routes(api.clone()))
                .await;
            assert_eq!(r.status(), 200, "{path}");
            assert_eq!(r.headers()["content-type"], kind, "{path}");
            let csp = r.headers()["content-security-policy"].to_str().unwrap();
            assert!(
                csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
                "{csp}"
            );
            assert_eq!(r.headers()["x-content-type-options"], "nosniff");
            let body = std::str::from_utf8(r.body()).unwrap();
            assert!(body.contains(needle), "{path} lacks {needle}");
            // Nothing from elsewhere: the only address is the SVG namespace.
            assert_eq!(
                body.replace("http://www.w3.org/2000/svg", "")
                    .matches("://")
                    .count(),
                0,
                "{path} refers to another site"
            );
        }
        let page = warp::test::request()
            .path("/")
            .reply(&routes(api.clone()))
            .await;
        let page = std::str::from_utf8(page.body()).unwrap();
        assert!(
            !page.contains("<script>") && !page.contains(" style="),
            "nothing inline: the policy forbids it"
        );
        let missing = warp::test::request()
            .path("/ui/other.js")
            .reply(&routes(api))
            .await;
        assert_eq!(missing.status(), 404);
    }

    #[tokio::test]
    async fn status_counts_reads_but_not_the_rest_and_shows_the_store() {
        let api = api();
        for path in [
            "/users/snake%20%C3%BC",
            "/users/nobody",
            "/users?limit=5",
            "/organizations",
        ] {
            warp::test::request()
                .path(path)
                .reply(&routes(api.clone()))
                .await;
        }
        for path in ["/metrics", "/healthz", "/status", "/"] {
            warp::test::request()
                .path(path)
                .reply(&routes(api.clone()))
                .await;
        }
        assert_eq!(
            api.metrics.reads().count,
            4,
            "the four reads only, a 404 included"
        );
        let r = warp::test::request()
            .path("/status")
            .reply(&routes(api.clone()))
            .await;
        assert_eq!(r.status(), 200);
        let s: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(s["state"]["users"], 1);
        assert_eq!(s["reads"]["total"], 4);
        assert_eq!(s["ingest"]["topics"][0]["topic"], "users");
        assert_eq!(s["ingest"]["topics"][0]["dead_letter_topic"], "users-dlq");
        assert_eq!(s["admin"]["enabled"], false);
        assert!(
            s["ingest"]["events_per_second"].is_null(),
            "no rate without an earlier sample"
        );
        assert!(s["reducer"]["active"].is_object(), "{s}");
    }

    #[tokio::test]
    async fn the_status_stream_sends_the_recent_points_then_each_sample() {
        let api = api();
        let sampler = tokio::spawn(status::run(api.clone()));
        // Two samples, so the second carries rates.
        tokio::time::sleep(status::INTERVAL * 2 + Duration::from_millis(300)).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ServerLimits {
            max_connections: 4,
            header_timeout: Duration::from_secs(1),
            max_header_bytes: 8192,
        };
        let server = tokio::spawn(serve(
            listener,
            routes(api.clone()),
            |_: &hyper::Request<hyper::body::Incoming>| None,
            limits,
            std::future::pending(),
            Duration::from_secs(1),
        ));
        let text = exchange(
            addr,
            b"GET /status/stream HTTP/1.1\r\nHost: x\r\n\r\n",
            status::INTERVAL * 2,
        )
        .await;
        sampler.abort();
        server.abort();
        let points = text
            .split("event:points\ndata:")
            .nth(1)
            .and_then(|t| t.lines().next())
            .unwrap_or_else(|| panic!("no points event: {text}"));
        let points: serde_json::Value = serde_json::from_str(points).unwrap();
        assert!(points.as_array().unwrap().len() >= 2, "{points}");
        assert_eq!(points[1]["events_per_second"], 0.0, "{points}");
        assert!(
            text.contains("event:sample\ndata:{"),
            "a live sample follows: {text}"
        );
        api.status.close();
        let closed = warp::test::request()
            .path("/status/stream")
            .reply(&routes(api))
            .await;
        assert_eq!(closed.status(), 503, "no new stream once closed");
    }
}
