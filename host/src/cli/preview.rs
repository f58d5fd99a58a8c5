//! `logq reducer preview FILE --host URL`: asks a running host what swapping in FILE
//! would do to its answers (`PUT /admin/reducer?mode=preview`), waits for the report
//! and prints it. Plain `http://` only: a minimal HTTP/1.1 client, so the binary needs
//! no HTTP client library for one admin call.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// How long a preview may take before the command gives up (the preview goes on).
pub const WAIT: Duration = Duration::from_secs(3600);

/// Submits `component` as a preview to the host at `base` (`http://host:port`) with
/// admin `token`, waits until its history entry has ended, and returns that entry.
///
/// # Errors
/// The host unreachable, the candidate refused (the host's answer is the error), or
/// the preview ending any other way than with a report.
pub fn run(
    base: &str,
    token: &str,
    component: &[u8],
    wait: Duration,
) -> anyhow::Result<serde_json::Value> {
    let (status, body) = call(base, "PUT", "/admin/reducer?mode=preview", token, component)?;
    if status != 202 {
        bail!("the host refused the preview ({status}): {body}");
    }
    let submitted: serde_json::Value =
        serde_json::from_str(&body).context("the host's answer is not JSON")?;
    let id = submitted["swap"]["id"].clone();
    let started = Instant::now();
    loop {
        let (status, body) = call(base, "GET", "/admin/reducer", token, b"")?;
        if status != 200 {
            bail!("GET /admin/reducer: {status}: {body}");
        }
        let described: serde_json::Value = serde_json::from_str(&body)?;
        let entry = described["history"]
            .as_array()
            .and_then(|h| h.iter().find(|e| e["id"] == id))
            .cloned()
            .with_context(|| format!("swap {id} left the history"))?;
        match entry["outcome"].as_str() {
            Some("previewed") => return Ok(entry),
            Some("replaying" | "validating" | "queued") => {}
            other => bail!(
                "the preview ended {}: {}",
                other.unwrap_or("?"),
                entry["reason"].as_str().unwrap_or("no reason given")
            ),
        }
        if started.elapsed() > wait {
            bail!("no report after {wait:?} (the preview goes on; see GET /admin/reducer)");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One request; the status and the body.
fn call(
    base: &str,
    method: &str,
    path: &str,
    token: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    request(base, method, path, Some(token), body)
}

/// One request on a fresh connection (plain `http://`), with the admin token when
/// given; the status and the body.
///
/// # Errors
/// A base that is not `http://HOST:PORT`, the host unreachable, an answer that is not
/// HTTP.
pub fn request(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let authority = base
        .strip_prefix("http://")
        .with_context(|| format!("--host {base:?}: only http://HOST:PORT is supported"))?
        .trim_end_matches('/');
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .with_context(|| format!("{authority} resolves to nothing"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {base}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\n{auth}\
         Connection: close\r\nContent-Type: application/wasm\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    // The host may answer (401, 413) before it has read the whole body.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading the answer of {method} {path}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{method} {path}: not an HTTP answer"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{method} {path}: no status in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Ok((status, body))
}

/// A chunked body, put back together.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_put_back_together_and_only_http_is_taken() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
        let e = call("https://example.com", "GET", "/", "t", b"").unwrap_err();
        assert!(e.to_string().contains("only http://"), "{e}");
    }
}
