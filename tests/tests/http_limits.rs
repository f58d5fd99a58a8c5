//! The HTTP server's own limits through the real binary's flags (`--http-max-*`,
//! `--http-header-timeout-ms`), and what hostile or malformed requests get back: a
//! clear status and a JSON error that names no internals. The in-process tests of
//! `host/src/http` cover the same server with its defaults; these prove the flags
//! reach it.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use logq_e2e::{Broker, Host, eventually, get, request_with};

const MAX_CONNECTIONS: usize = 3;
const HEADER_TIMEOUT: Duration = Duration::from_millis(1500);
const MAX_HEADER_BYTES: usize = 2048;

fn host(broker: &Broker) -> Host {
    broker.create_default_topics();
    let host = Host::start(
        broker,
        &[
            "--http-max-connections",
            &MAX_CONNECTIONS.to_string(),
            "--http-header-timeout-ms",
            &HEADER_TIMEOUT.as_millis().to_string(),
            "--http-max-header-bytes",
            &MAX_HEADER_BYTES.to_string(),
        ],
    );
    host.wait_ready(Duration::from_secs(120));
    host
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connects");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    s
}

/// Everything the server sends until it closes the connection, and when it closed.
fn until_closed(mut s: TcpStream) -> (String, Instant) {
    let mut raw = Vec::new();
    // A reset instead of an orderly close ends the read too.
    let _ = s.read_to_end(&mut raw);
    (String::from_utf8_lossy(&raw).into_owned(), Instant::now())
}

#[test]
fn the_flags_set_the_head_size_the_head_timeout_and_the_connection_cap() {
    let broker = Broker::start();
    let host = host(&broker);

    // Head size: a head over the flag's 2 KiB gets 431 (the default, 16 KiB, would
    // take it); one under it is served.
    let big = "x".repeat(3 * 1024);
    let refused = request_with(host.addr, "GET", "/healthz", &[("X-Pad", &big)], b"")
        .expect("an answer to an oversized head");
    assert_eq!(refused.status, 431, "{refused:?}");
    let small = "x".repeat(1024);
    let served =
        request_with(host.addr, "GET", "/healthz", &[("X-Pad", &small)], b"").expect("an answer");
    assert_eq!(served.status, 200, "{served:?}");

    // Head timeout: a client that starts a request and never finishes its head is
    // disconnected after the flag's 1.5 s (the default would wait 10 s).
    let mut slow = connect(host.addr);
    let started = Instant::now();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("half a head");
    let (sent, closed) = until_closed(slow);
    let after = closed - started;
    assert!(
        after >= HEADER_TIMEOUT - Duration::from_millis(200) && after < Duration::from_secs(6),
        "the slow client was cut after {after:?} (sent back {sent:?})"
    );
    assert!(!sent.contains("200 OK"), "{sent:?}");

    // Connection cap: with three connections open (idle, well within the head
    // timeout), a fourth is answered 503 with a JSON reason and closed.
    let held: Vec<TcpStream> = (0..MAX_CONNECTIONS).map(|_| connect(host.addr)).collect();
    // The server takes a connection's permit when it accepts it: wait until all three
    // are accepted, seen as the fourth being refused.
    let busy = eventually(
        Duration::from_secs(30),
        "a connection past the cap to be refused",
        || {
            let r = get(host.addr, "/healthz").ok()?;
            (r.status == 503).then_some(r)
        },
    );
    let body = busy.json();
    assert_eq!(body["error"], "busy", "{body}");
    assert_eq!(busy.header("retry-after"), Some("1"));
    drop(held);
    // Once they are closed, requests are served again.
    eventually(
        Duration::from_secs(30),
        "requests served after the held connections close",
        || (get(host.addr, "/healthz").ok()?.status == 200).then_some(()),
    );
}

/// Method, path, headers, and the status it must get.
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], u16);

#[test]
fn malformed_and_hostile_requests_get_a_clear_error_that_names_no_internals() {
    let broker = Broker::start();
    let host = host(&broker);
    let long_id = format!("/users/{}", "a".repeat(1500));
    let wrong_token: &[(&str, &str)] = &[("Authorization", "Bearer wrong")];
    let cases: [Case<'_>; 7] = [
        ("GET", "/users/%FF%FE", &[], 400),
        ("GET", "/no/such/route", &[], 404),
        ("DELETE", "/users/someone", &[], 405),
        ("GET", "/users?limit=many", &[], 400),
        ("GET", "/users/someone?min_position=users/0@x", &[], 400),
        ("PUT", "/admin/reducer", wrong_token, 403),
        ("GET", &long_id, &[], 400),
    ];
    for (method, path, headers, status) in cases {
        let r = request_with(host.addr, method, path, headers, b"")
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let shown = format!(
            "{method} {}: {} {:?}",
            &path[..path.len().min(60)],
            r.status,
            r.body
        );
        assert_eq!(r.status, status, "{shown}");
        let body: serde_json::Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("not a JSON error ({e}): {shown}"));
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "no error code: {shown}"
        );
        for internal in [
            "panicked",
            ".rs:",
            "src/",
            "backtrace",
            "hyper::",
            "warp::",
            "tokio",
            "rdkafka",
            "wasmtime",
            "Rejection(",
        ] {
            assert!(
                !r.body.contains(internal),
                "the error names an internal ({internal}): {shown}"
            );
        }
    }
    // And the host still serves.
    assert_eq!(get(host.addr, "/healthz").expect("served").status, 200);
}
