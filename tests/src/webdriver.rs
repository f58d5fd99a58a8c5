//! A small W3C WebDriver client for the browser tests: Debian's `chromedriver`
//! driving headless Debian `chromium`, over the harness's plain HTTP/1.1.
//!
//! Written here rather than taken from fantoccini or thirtyfour: the tests need a
//! dozen blocking commands, and those crates bring an async HTTP client stack and a
//! second TLS stack into a build that is already long. The protocol is JSON over
//! HTTP (<https://www.w3.org/TR/webdriver2/>).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::{eventually, free_port, wait_for_port};

/// The key WebDriver uses for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The Enter key, for [`Element::send_keys`].
pub const ENTER: &str = "\u{E007}";

/// Where Debian puts the browser and its driver (`apt-get install chromium
/// chromium-driver`, done by `scripts/setup.sh`).
fn installed(name: &str, path: &str) -> PathBuf {
    let p = PathBuf::from(path);
    assert!(
        p.exists(),
        "{name} is not installed at {path}; run ./scripts/setup.sh \
         (it runs `apt-get install chromium chromium-driver`)"
    );
    p
}

/// A headless Chromium session, driven by its own chromedriver process (both ended
/// on drop).
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    profile: PathBuf,
}

/// An element of the current page.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium at `width` x `height`.
    pub fn start(width: u32, height: u32) -> Self {
        Self::launch(width, height, false)
    }

    /// Like [`Browser::start`], with a phone's viewport of `width` x `height` CSS
    /// pixels (device emulation: a desktop window cannot be made that narrow).
    pub fn start_phone(width: u32, height: u32) -> Self {
        Self::launch(width, height, true)
    }

    /// The flags keep Chromium off the network (this machine has none beyond
    /// loopback) and let it run as root in a container.
    fn launch(width: u32, height: u32, phone: bool) -> Self {
        let chromium = installed("Chromium", "/usr/bin/chromium");
        let chromedriver = installed("ChromeDriver", "/usr/bin/chromedriver");
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let profile =
            std::env::temp_dir().join(format!("logq-chromium-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        let mut browser = Self {
            driver,
            addr,
            session: String::new(),
            profile,
        };
        assert!(
            wait_for_port(port, Duration::from_secs(30)),
            "chromedriver did not listen on {addr}"
        );
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-extensions".into(),
            format!("--user-data-dir={}", browser.profile.display()),
            format!("--window-size={width},{height}"),
        ];
        let mut options = json!({"binary": chromium, "args": args});
        if phone {
            options["mobileEmulation"] = json!({"deviceMetrics": {
                "width": width, "height": height, "pixelRatio": 1, "touch": true,
            }});
        }
        let created = browser.command(
            "POST",
            "/session",
            &json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": options,
            }}}),
        );
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {created}"))
            .to_owned();
        browser
    }

    /// One WebDriver command; its `value`, or a panic with the driver's error.
    fn command(&self, method: &str, path: &str, body: &Value) -> Value {
        let body = if method == "GET" || method == "DELETE" {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let (status, text) = exchange(self.addr, method, path, &body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}: {text}"));
        assert!(
            status == 200,
            "WebDriver {method} {path}: {status} {}",
            v["value"]
        );
        v["value"].clone()
    }

    fn session_command(&self, method: &str, path: &str, body: &Value) -> Value {
        self.command(method, &format!("/session/{}{path}", self.session), body)
    }

    /// Opens `url` and waits for it to load.
    pub fn goto(&self, url: &str) {
        self.session_command("POST", "/url", &json!({"url": url}));
    }

    /// The first element `css` selects, or `None`.
    pub fn try_find(&self, css: &str) -> Option<Element<'_>> {
        let found = self.session_command(
            "POST",
            "/elements",
            &json!({"using": "css selector", "value": css}),
        );
        let id = found.as_array()?.first()?[ELEMENT].as_str()?.to_owned();
        Some(Element { browser: self, id })
    }

    /// The first element `css` selects; panics when there is none.
    pub fn find(&self, css: &str) -> Element<'_> {
        self.try_find(css)
            .unwrap_or_else(|| panic!("no element matches {css:?}"))
    }

    /// Every element `css` selects.
    pub fn find_all(&self, css: &str) -> Vec<Element<'_>> {
        let found = self.session_command(
            "POST",
            "/elements",
            &json!({"using": "css selector", "value": css}),
        );
        found
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str())
                    .map(|id| Element {
                        browser: self,
                        id: id.to_owned(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and
    /// returns what it returns.
    pub fn execute(&self, script: &str, args: &[Value]) -> Value {
        self.session_command(
            "POST",
            "/execute/sync",
            &json!({"script": script, "args": args}),
        )
    }

    /// Attribute `name` of the first element `css` selects, read in one step (the
    /// page redraws live, so a found element can be replaced before a second
    /// command reaches it).
    pub fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let v = self.execute(
            "const e = document.querySelector(arguments[0]); \
             return e ? e.getAttribute(arguments[1]) : null",
            &[css.into(), name.into()],
        );
        v.as_str().map(str::to_owned)
    }

    /// The rendered text of every element `css` selects, read in one step.
    pub fn texts(&self, css: &str) -> Vec<String> {
        let v = self.execute(
            "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText)",
            &[css.into()],
        );
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Polls `css`'s attribute `name` until `check` accepts it; returns it.
    pub fn wait_attribute(
        &self,
        css: &str,
        name: &str,
        within: Duration,
        check: impl Fn(&str) -> bool,
    ) -> String {
        eventually(within, &format!("{css} [{name}] as expected"), || {
            let v = self.attribute(css, name)?;
            check(&v).then_some(v)
        })
    }

    /// Polls `css`'s text until `check` accepts it; returns it.
    pub fn wait_text(&self, css: &str, within: Duration, check: impl Fn(&str) -> bool) -> String {
        eventually(within, &format!("the text of {css} as expected"), || {
            let v = self.texts(css).into_iter().next()?;
            check(&v).then_some(v)
        })
    }

    /// Saves a PNG screenshot of the viewport to `<target>/screenshots/<name>.png`;
    /// returns the path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let data = self.session_command("GET", "/screenshot", &Value::Null);
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().expect("a base64 screenshot"))
            .expect("base64 screenshot");
        let dir = crate::target_dir().join("screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot folder");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("writing the screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = exchange(self.addr, "DELETE", &path, b"");
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Element<'_> {
    fn command(&self, method: &str, what: &str, body: &Value) -> Value {
        self.browser
            .session_command(method, &format!("/element/{}{what}", self.id), body)
    }

    /// Its rendered text.
    pub fn text(&self) -> String {
        self.command("GET", "/text", &Value::Null)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// An attribute (`data-value`, `disabled`, ...), or `None` when it is absent.
    pub fn attribute(&self, name: &str) -> Option<String> {
        let v = self.command("GET", &format!("/attribute/{name}"), &Value::Null);
        v.as_str().map(str::to_owned)
    }

    /// Whether it can be used (not disabled, itself or by its fieldset).
    pub fn enabled(&self) -> bool {
        self.command("GET", "/enabled", &Value::Null)
            .as_bool()
            .unwrap_or(false)
    }

    /// Clicks it, as a user would (the driver scrolls it into view first).
    pub fn click(&self) {
        self.command("POST", "/click", &json!({}));
    }

    /// Types `text` into it; for a file input, `text` is the file's path.
    pub fn send_keys(&self, text: &str) {
        self.command("POST", "/value", &json!({"text": text}));
    }

    /// Empties a text input.
    pub fn clear(&self) {
        self.command("POST", "/clear", &json!({}));
    }
}

/// One request to the driver, read up to its `Content-Length`: chromedriver keeps
/// the connection open whatever the request says, so reading to the end would hang.
fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = None;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let length =
        length.ok_or_else(|| std::io::Error::other("the driver sent no Content-Length"))?;
    let mut buf = vec![0; length];
    reader.read_exact(&mut buf)?;
    Ok((status, String::from_utf8_lossy(&buf).into_owned()))
}

/// `path` made absolute (a file input wants an absolute path).
pub fn absolute(path: &Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .display()
        .to_string()
}
