//! The API against its own OpenAPI document, in the default test run: the host's
//! `/openapi.json` drives generated requests to every operation (hostile and unicode
//! ids, bad and good query values, position tokens, `If-None-Match`, admin calls
//! with no, a wrong and the right token, bodies that are not components, methods the
//! document does not list). Each answer must be one the document lists for that
//! operation, JSON where it says JSON, with the top-level fields its schema
//! requires; no 5xx but a documented 503; a method it does not list gets 405 with
//! `Allow`. The in-repo counterpart of `scripts/api-check.sh` (schemathesis, not in
//! CI): fewer checks, no Python, seconds. The three event-stream routes never end a
//! response and are covered by pipeline.rs and status_page.rs.

use std::collections::BTreeSet;
use std::time::Duration;

use logq_e2e::{Broker, Host, Rng, percent_encode, produce, request_with, root};
use serde_json::Value;

const TOKEN: &str = "conformance-token";
const STREAMS: [&str; 3] = ["/users/{id}/watch", "/changes", "/status/stream"];

/// `#/components/...` references resolved against the document.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => {
            let mut at = doc;
            for part in r.trim_start_matches("#/").split('/') {
                at = &at[part];
            }
            resolve(doc, at)
        }
        None => v,
    }
}

fn pick<'a>(rng: &mut Rng, from: &[&'a str]) -> &'a str {
    from[rng.below(from.len() as u64) as usize]
}

#[test]
fn every_operation_answers_as_its_openapi_document_says() {
    let broker = Broker::start();
    broker.create_default_topics();
    let data = |f: &str| root().join("data").join(f).to_string_lossy().into_owned();
    produce(&broker, "users", &[data("users.json").as_str()], b"");
    produce(
        &broker,
        "organizations",
        &[data("organizations.json").as_str()],
        b"",
    );
    let host = Host::start(
        &broker,
        &["--admin-token", TOKEN, "--read-wait-max-ms", "200"],
    );
    host.wait_ready(Duration::from_secs(120));
    let doc = host.get("/openapi.json").json();
    let position = host
        .get("/users")
        .header("x-logq-position")
        .unwrap_or("users/0@0")
        .to_owned();
    let ids = [
        "069feb770fe581acc9d3313d59780196",
        "nobody",
        "ñandú/é",
        "../../etc/passwd",
        "' OR 1=1 --",
        "🦀",
        "\u{0}nul",
        &"x".repeat(300),
    ];
    let queries: [&str; 9] = [
        "1",
        "0",
        "-1",
        "1001",
        "abc",
        "",
        "%ZZ",
        "users/0@0",
        &"q".repeat(2_000),
    ];
    let mut rng = Rng(0xa11_0a11);
    let mut seen = BTreeSet::new();
    let mut requests = 0;
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        if STREAMS.contains(&path.as_str()) {
            continue;
        }
        let documented: BTreeSet<String> = ops
            .as_object()
            .unwrap()
            .keys()
            .filter(|m| *m != "parameters")
            .map(|m| m.to_uppercase())
            .collect();
        for (method, op) in ops.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let method = method.to_uppercase();
            let params: Vec<&Value> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| resolve(&doc, p))
                .collect();
            let secured = op.get("security").is_some();
            for _ in 0..40 {
                let mut url = path.clone();
                let mut query = Vec::new();
                let mut headers: Vec<(String, String)> = Vec::new();
                let mut conditional = false;
                for p in &params {
                    let name = p["name"].as_str().unwrap();
                    match p["in"].as_str().unwrap() {
                        "path" => {
                            url = url.replace(
                                &format!("{{{name}}}"),
                                &percent_encode(pick(&mut rng, &ids)),
                            );
                        }
                        "query" if rng.below(3) == 0 => {
                            let v = if name == "min_position" && rng.below(2) == 0 {
                                position.clone()
                            } else if name == "mode" {
                                pick(&mut rng, &["forward", "replay", "preview", "sideways"])
                                    .to_owned()
                            } else {
                                pick(&mut rng, &queries).to_owned()
                            };
                            // Some values go raw (a bad escape stays bad).
                            let v = if v.starts_with('%') {
                                v
                            } else {
                                percent_encode(&v)
                            };
                            query.push(format!("{name}={v}"));
                        }
                        "header" if rng.below(3) == 0 => {
                            conditional |= name == "If-None-Match";
                            let v = match rng.below(3) {
                                0 => position.clone(),
                                1 => "\"not-a-tag\"".to_owned(),
                                _ => "garbage".to_owned(),
                            };
                            headers.push((name.to_owned(), v));
                        }
                        _ => {}
                    }
                }
                if rng.below(6) == 0 {
                    query.push("unknown=1".to_owned());
                }
                if !query.is_empty() {
                    url = format!("{url}?{}", query.join("&"));
                }
                if secured {
                    match rng.below(3) {
                        0 => {}
                        1 => headers.push(("Authorization".into(), "Bearer wrong".into())),
                        _ => headers.push(("Authorization".into(), format!("Bearer {TOKEN}"))),
                    }
                }
                let body: Vec<u8> = if method == "PUT" {
                    (0..rng.below(64)).map(|_| rng.below(256) as u8).collect()
                } else {
                    Vec::new()
                };
                let h: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(a, b)| (a.as_str(), b.as_str()))
                    .collect();
                let r = request_with(host.addr, &method, &url, &h, &body)
                    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
                requests += 1;
                let status = r.status.to_string();
                let what = format!("{method} {url} {headers:?} -> {} {}", r.status, r.body);
                let Some(answer) = op["responses"].get(&status).map(|a| resolve(&doc, a)) else {
                    panic!("undocumented status: {what}");
                };
                assert!(
                    r.status != 304 || conditional,
                    "304 without If-None-Match: {what}"
                );
                seen.insert(format!("{method} {path} {status}"));
                let Some(schema) = answer["content"]["application/json"].get("schema") else {
                    continue;
                };
                assert!(
                    r.header("content-type")
                        .is_some_and(|c| c.starts_with("application/json")),
                    "documented as JSON: {what}"
                );
                let json: Value = serde_json::from_str(&r.body)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {what}"));
                for field in resolve(&doc, schema)["required"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let field = field.as_str().unwrap();
                    assert!(json.get(field).is_some(), "missing {field}: {what}");
                }
            }
        }
        // A method the document does not list for this path.
        let url = path.replace("{id}", "x").replace("{key}", "x");
        let r = request_with(host.addr, "PATCH", &url, &[], b"").unwrap();
        assert_eq!(r.status, 405, "PATCH {url}: {}", r.body);
        let allow: BTreeSet<String> = r
            .header("allow")
            .unwrap_or_else(|| panic!("405 without Allow: {url}"))
            .split(',')
            .map(|m| m.trim().to_owned())
            .filter(|m| m != "HEAD")
            .collect();
        assert!(
            documented.is_subset(&allow),
            "{url}: Allow {allow:?}, documented {documented:?}"
        );
    }
    // The generated requests reached more than the happy path: errors and refusals.
    for needed in [
        "GET /users/{id} 200",
        "GET /users/{id} 404",
        "GET /users 400",
        "GET /admin/reducer 401",
        "PUT /admin/reducer 400",
    ] {
        assert!(seen.contains(needed), "{needed} never answered: {seen:?}");
    }
    println!("{requests} requests, {} distinct answers", seen.len());
}
