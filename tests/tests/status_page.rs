//! The status page (`GET /`) in a real browser: headless Debian Chromium driven over
//! WebDriver (chromedriver), against the real host and a real broker.
//!
//! What a user of the page would check: its numbers are the host's (`/metrics`,
//! `/admin/reducer`, the dead-letter topic), its charts move when events arrive, a
//! wrong token is refused, and a swap and a rollback done by clicking take effect
//! for readers. Screenshots go to `target/screenshots/`.

use std::time::{Duration, Instant};

use logq_e2e::webdriver::{Browser, ENTER, absolute};
use logq_e2e::{
    Broker, Host, component, eventually, expected_answers, history, masked, produce, produce_raw,
    read_topic,
};
use serde_json::Value;

const TOKEN: &str = "status-page-token";
const WITHIN: Duration = Duration::from_secs(60);
/// The page gets a sample a second; a few seconds cover a busy machine.
const SOON: Duration = Duration::from_secs(15);

fn metric(host: &Host, name: &str) -> f64 {
    host.metric(name)
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// Waits until the page shows `value` in output `#id` (its exact `data-value`).
fn page_shows(page: &Browser, id: &str, value: f64) {
    page.wait_attribute(&format!("#{id}"), "data-value", SOON, |v| {
        v.parse::<f64>().is_ok_and(|v| v == value)
    });
}

/// The latest value the page drew for series `name` of chart `chart`.
fn drawn(page: &Browser, chart: &str, name: &str) -> Option<f64> {
    page.attribute(
        &format!("#{chart} polyline[data-series='{name}']"),
        "data-last",
    )?
    .parse()
    .ok()
}

/// Clicks `button`, then the confirmation dialog's `answer` (`#confirm-yes` or
/// `#confirm-no`).
fn click_and_answer(page: &Browser, button: &str, answer: &str) {
    page.find(button).click();
    eventually(SOON, "the confirmation dialog", || {
        (page.execute("return document.getElementById('confirm').open", &[]) == Value::Bool(true))
            .then_some(())
    });
    page.find(answer).click();
}

/// Waits until the page shows the host's answer to an action: its status code and
/// text.
fn host_answer(page: &Browser, status: u16) -> String {
    page.wait_attribute("#result", "data-status", WITHIN, |v| {
        v == status.to_string()
    });
    page.find("#result").text()
}

/// `n` as the page writes it: digits grouped by threes with commas (en-US).
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

fn describe(host: &Host) -> Value {
    let r = host.admin("GET", "/admin/reducer", Some(TOKEN), b"");
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// Waits until swap `id` is the active one, with all answers re-rendered by it.
fn wait_active(host: &Host, sha: &str) -> Value {
    eventually(WITHIN, &format!("{sha} active"), || {
        let d = describe(host);
        (d["active"]["sha256"] == sha
            && d["replay"]["phase"]
                .as_str()
                .is_none_or(|p| p != "replaying")
            && d["active"]["answers"]["share_by_active"] == 1.0)
            .then_some(d)
    })
}

#[test]
fn the_status_page_shows_the_hosts_numbers_moves_live_and_swaps_and_rolls_back_by_clicks() {
    let broker = Broker::start();
    broker.create_default_topics();
    let (mut users, orgs) = history(0x57a7, 200, 1_500);
    produce(&broker, "users", &[], users.join("\n").as_bytes());
    produce(&broker, "organizations", &[], orgs.join("\n").as_bytes());
    // Three records no reducer can fold: they become dead letters with a reason.
    produce_raw(
        &broker,
        "users",
        &[
            (Some(b"bad-1"), Some(b"not json")),
            (Some(b"bad-2"), Some(br#"{"event_type": "User Created"}"#)),
            (Some(b"bad-3"), Some(b"[1, 2")),
        ],
    );
    let host = Host::start(&broker, &["--admin-token", TOKEN]);
    host.wait_ready(WITHIN);
    host.wait_consumed("users", users.len() + 3, WITHIN);
    let letters = read_topic(&broker, "users.dlq", 3, WITHIN);
    assert_eq!(letters.len(), 3, "three dead letters in the topic");

    let page = Browser::start(1280, 2200);
    let url = format!("http://{}/", host.addr);
    page.goto(&url);
    page.wait_attribute("#connection", "data-state", SOON, |s| s == "live");
    page.wait_attribute("#ready", "data-ready", SOON, |s| s == "true");

    // 1. The numbers are the host's own: /metrics, /admin/reducer, the DLQ topic.
    for (id, name) in [
        ("users", "logq_users"),
        ("organizations", "logq_organizations"),
        ("tombstones", "logq_tombstones"),
    ] {
        page_shows(&page, id, metric(&host, name));
    }
    assert!(
        metric(&host, "logq_users") > 50.0,
        "the history leaves users to show"
    );
    page_shows(
        &page,
        "dead-letters-total",
        metric(&host, "logq_records_dead_lettered_total{topic=\"users\"}")
            + metric(
                &host,
                "logq_records_dead_lettered_total{topic=\"organizations\"}",
            ),
    );
    let users_box = "#dead-letters .dlq[data-topic='users']";
    page.wait_attribute(&format!("{users_box} .count"), "data-value", SOON, |v| {
        v == "3"
    });
    let mut shown = page.texts(&format!("{users_box} .reason .why"));
    let mut sent: Vec<String> = letters
        .iter()
        .map(|l| l.header("logq.reason").expect("a reason header").to_owned())
        .collect();
    shown.sort();
    sent.sort();
    assert_eq!(
        shown, sent,
        "the page lists the reasons the DLQ records carry"
    );
    // Every partition's lag, row by row, and their sum.
    let lags: Vec<(String, f64)> = host
        .get("/metrics")
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("logq_consumer_lag{topic=\""))
        .map(|l| {
            let (topic, rest) = l.split_once("\",partition=\"").unwrap();
            let (partition, value) = rest.split_once("\"} ").unwrap();
            (format!("{topic}/{partition}"), value.parse().unwrap())
        })
        .collect();
    assert!(lags.len() >= 2, "both topics' partitions: {lags:?}");
    for (partition, lag) in &lags {
        page.wait_attribute(
            &format!("#partitions tr[data-partition='{partition}'] .lag"),
            "data-value",
            SOON,
            |v| v.parse::<f64>().is_ok_and(|v| v == *lag),
        );
    }
    assert_eq!(
        page.find_all("#partitions tr[data-partition]").len(),
        lags.len(),
        "one row per partition"
    );
    page_shows(&page, "lag-total", lags.iter().map(|(_, l)| l).sum());
    let d = describe(&host);
    let startup_sha = d["active"]["sha256"].as_str().unwrap().to_owned();
    page.wait_text("#active-sha", SOON, |t| t == startup_sha);
    assert_eq!(
        page.texts("#active-origin"),
        [d["active"]["origin"].as_str().unwrap()]
    );
    assert_eq!(
        page.texts("#active-loaded"),
        [d["active"]["loaded_at"].as_str().unwrap()]
    );
    let rss_page: f64 = page
        .attribute("#rss", "data-value")
        .unwrap()
        .parse()
        .unwrap();
    let rss_metric = metric(&host, "process_resident_memory_bytes");
    assert!(
        (rss_page - rss_metric).abs() / rss_metric < 0.25,
        "RSS on the page {rss_page} vs /metrics {rss_metric}"
    );
    // The host has folded: the reducers' pool keeps the first pages of the slots it
    // used, for the next instance, and says so.
    let pool = metric(&host, "logq_reducer_pool_resident_bytes");
    assert!(
        pool > 0.0 && pool < rss_metric,
        "pool slots hold {pool} of {rss_metric}"
    );

    // 2. The charts move: idle first, then events and reads arrive.
    eventually(SOON, "an idle ingest chart", || {
        (drawn(&page, "chart-ingest", "events") == Some(0.0)).then_some(())
    });
    let more: Vec<String> = (0..3_000)
        .map(|i| {
            serde_json::json!({"id": format!("live-{i}"), "event_type": "User Created",
                "user_email": format!("live{i}@example.com"), "received_at": "2029-06-01 00:00:00"})
            .to_string()
        })
        .collect();
    produce(&broker, "users", &[], more.join("\n").as_bytes());
    users.extend(more);
    eventually(SOON, "the ingest chart to rise", || {
        drawn(&page, "chart-ingest", "events")
            .filter(|v| *v > 0.0)
            .map(|_| ())
    });
    host.wait_consumed("users", users.len() + 3, WITHIN);
    page_shows(&page, "users", metric(&host, "logq_users"));
    let reads_before = drawn(&page, "chart-reads", "reads");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        assert_eq!(host.get("/users/live-1").status, 200);
    }
    eventually(SOON, "the reads chart to rise", || {
        drawn(&page, "chart-reads", "reads")
            .filter(|v| *v > 0.0)
            .map(|_| ())
    });
    assert_eq!(reads_before, Some(0.0), "nothing read before the loop");
    let p99: f64 = page
        .wait_attribute("#read-p99", "data-value", SOON, |v| !v.is_empty())
        .parse()
        .unwrap();
    assert!(p99 > 0.0 && p99 < 1_000.0, "read p99 {p99} ms");
    page.screenshot("status-1280");

    // 3. Read-only until a token is accepted; a wrong one is refused on the page.
    assert!(page.find("#admin-note").text().contains("Read-only"));
    assert!(!page.find("#swap").enabled(), "no action without a token");
    page.find("#token").send_keys("not-the-token");
    page.find("#token-use").click();
    let refused = host_answer(&page, 401);
    assert!(refused.contains("unauthorized"), "{refused}");
    assert!(
        page.find("#token-state").text().contains("refused"),
        "{}",
        page.find("#token-state").text()
    );
    assert!(!page.find("#rollback").enabled(), "still read-only");
    page.find("#token").clear();
    // Enter in the field submits it: the form works from the keyboard.
    page.find("#token").send_keys(&format!("{TOKEN}{ENTER}"));
    host_answer(&page, 200);
    page.wait_text("#token-state", SOON, |t| t.contains("accepted"));
    assert!(
        page.find("#swap").enabled(),
        "actions enabled with the token"
    );
    assert_eq!(
        page.find("#token").attribute("value").unwrap_or_default(),
        "",
        "the field does not keep the token"
    );
    let stored = page.execute(
        "return JSON.stringify([Object.assign({}, localStorage), Object.assign({}, sessionStorage), document.cookie])",
        &[],
    );
    assert!(
        !stored.as_str().unwrap_or_default().contains(TOKEN),
        "the token is in page memory only: {stored}"
    );

    // 4. Refusals are shown as the host gave them.
    let junk = std::env::temp_dir().join(format!("logq-not-wasm-{}.wasm", std::process::id()));
    std::fs::write(&junk, b"definitely not a component").unwrap();
    page.find("#reducer-file").send_keys(&absolute(&junk));
    click_and_answer(&page, "#swap", "#confirm-yes");
    let answer = host_answer(&page, 400);
    assert!(answer.contains("not_wasm"), "{answer}");
    click_and_answer(&page, "#cancel-replay", "#confirm-yes");
    let answer = host_answer(&page, 404);
    assert!(answer.contains("no replay is running"), "{answer}");

    // 5. A preview by clicks: the page shows the report, whose count is the
    // oracle's (the answers that carry an e-mail), and nothing changes.
    let expected = expected_answers(&users, &orgs);
    let would_change = expected
        .values()
        .filter(|v| masked((*v).clone()) != **v)
        .count();
    assert!(would_change > 20, "{would_change} answers have an e-mail");
    let mask = component("mask-emails-reducer.wasm");
    page.find("#reducer-file").send_keys(&absolute(&mask));
    page.find("input[name='mode'][value='preview']").click();
    page.wait_text("#swap", SOON, |t| t == "Preview…");
    click_and_answer(&page, "#swap", "#confirm-yes");
    let answer = host_answer(&page, 202);
    let preview_id =
        serde_json::from_str::<Value>(answer.split_once('\n').unwrap().1).unwrap()["swap"]["id"]
            .to_string();
    page.wait_attribute("#preview-summary", "data-swap-id", WITHIN, |v| {
        v == preview_id
    });
    assert_eq!(
        page.find("#preview-summary").attribute("data-changed"),
        Some(would_change.to_string())
    );
    let summary = page.find("#preview-summary").text();
    assert!(
        summary.contains(&format!("users: {} changed", grouped(would_change)))
            && summary.contains("dead letters: 0 added, 0 removed"),
        "{summary}"
    );
    let row = page.find(&format!("#history tr[data-swap-id='{preview_id}']"));
    assert_eq!(row.attribute("data-outcome").as_deref(), Some("previewed"));
    assert_eq!(describe(&host)["active"]["sha256"], startup_sha.as_str());
    page.wait_text("#active-sha", SOON, |t| t == startup_sha);
    for (id, want) in expected.iter().take(50) {
        assert_eq!(&host.get(&format!("/users/{id}")).json(), want, "{id}");
    }
    page.screenshot("status-after-preview");

    // 6. A replay swap by clicks: GET shows masked e-mails once it is active.
    let history_before = describe(&host)["history"].as_array().unwrap().len();
    // The file chosen for the preview stays chosen.
    page.find("input[name='mode'][value='replay']").click();
    // Cancelling the confirmation sends nothing: the swap confirmed after it is the
    // only entry the history gains (the page sends in click order).
    click_and_answer(&page, "#swap", "#confirm-no");
    click_and_answer(&page, "#swap", "#confirm-yes");
    let answer = host_answer(&page, 202);
    let mask_sha = serde_json::from_str::<Value>(answer.split_once('\n').unwrap().1).unwrap()
        ["swap"]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(mask_sha, startup_sha);
    wait_active(&host, &mask_sha);
    assert_eq!(
        describe(&host)["history"].as_array().unwrap().len(),
        history_before + 1,
        "a cancelled confirmation sent nothing"
    );
    page.wait_text("#active-sha", SOON, |t| t == mask_sha);
    page.wait_text("#previous-sha", SOON, |t| t == startup_sha);
    for (id, want) in expected.iter().take(50) {
        assert_eq!(
            host.get(&format!("/users/{id}")).json(),
            masked(want.clone()),
            "{id}"
        );
    }
    page.screenshot("status-after-swap");
    // A finished replay's time and rate stop where it ended.
    let ran = describe(&host)["replay"]["elapsed_seconds"]
        .as_f64()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1_200));
    assert_eq!(
        describe(&host)["replay"]["elapsed_seconds"].as_f64(),
        Some(ran),
        "a done replay's clock stopped"
    );
    page.wait_text("#replay-text", SOON, |t| {
        t.contains("done") && t.contains(&format!("{ran:.1} s"))
    });

    // 7. A rollback by clicks: GET shows the original answers again.
    click_and_answer(&page, "#rollback", "#confirm-yes");
    host_answer(&page, 202);
    wait_active(&host, &startup_sha);
    page.wait_text("#active-sha", SOON, |t| t == startup_sha);
    for (id, want) in expected.iter().take(50) {
        assert_eq!(&host.get(&format!("/users/{id}")).json(), want, "{id}");
    }
    let rows = page.find_all("#history tr[data-swap-id]");
    assert_eq!(
        rows.len(),
        describe(&host)["history"].as_array().unwrap().len(),
        "one history row per swap the host records"
    );

    // 8. A phone's width: everything fits without sideways scrolling (tables that
    // cannot scroll inside their own box).
    drop(page);
    let phone = Browser::start_phone(390, 844);
    phone.goto(&url);
    phone.wait_attribute("#ready", "data-ready", SOON, |s| s == "true");
    phone.wait_text("#active-sha", SOON, |t| t == startup_sha);
    let overflow = phone.execute(
        "return [document.documentElement.clientWidth, document.documentElement.scrollWidth]",
        &[],
    );
    assert_eq!(
        overflow,
        serde_json::json!([390, 390]),
        "no horizontal overflow at 390 px"
    );
    phone.screenshot("status-phone");
}

#[test]
fn without_an_admin_token_the_page_is_read_only_and_says_why() {
    let broker = Broker::start();
    broker.create_default_topics();
    let host = Host::start(&broker, &[]);
    host.wait_ready(WITHIN);
    let page = Browser::start(1280, 900);
    page.goto(&format!("http://{}/", host.addr));
    page.wait_text("#admin-note", SOON, |t| {
        t.contains("started without --admin-token")
    });
    assert!(!page.find("#token").enabled(), "no token to enter");
    assert!(!page.find("#rollback").enabled(), "no action");
}

#[test]
fn a_sharded_host_shows_the_group_each_host_its_partitions_and_reducer() {
    let broker = Broker::start();
    broker.create_topic("users", 4);
    broker.create_topic("organizations", 1);
    let (users, orgs) = history(0x6a0b, 100, 600);
    produce(&broker, "users", &[], users.join("\n").as_bytes());
    produce(&broker, "organizations", &[], orgs.join("\n").as_bytes());
    let args = [
        "--sharded",
        "--group-id",
        "page",
        "--session-timeout-ms",
        "2000",
        "--standbys",
        "1",
    ];
    let (a, b) = (Host::start(&broker, &args), Host::start(&broker, &args));
    // Each standing by for the other's partitions (two hosts, one standby each).
    let standby = |v: &Value| -> Vec<String> {
        v["standby"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    let views = eventually(WITHIN, "both hosts sharing the partitions", || {
        let views: Vec<Value> = [&a, &b].iter().map(|h| h.get("/cluster").json()).collect();
        let known = views.iter().all(|v| {
            v["others"].as_array().is_some_and(|o| o.len() == 1)
                && v["reducer"] != ""
                && standby(v).len() + logq_e2e::held_in(v) == 4
        });
        (logq_e2e::group_complete(&views, 4) && known).then_some(views)
    });
    let page = Browser::start(1280, 1600);
    page.goto(&format!("http://{}/", a.addr));
    page.wait_attribute("#connection", "data-state", SOON, |s| s == "live");
    // One row per host, this one first, each with the partitions its own /cluster
    // says it holds and the reducer it runs.
    eventually(SOON, "the group section shown", || {
        (page.execute(
            "return document.getElementById('group-section').hidden",
            &[],
        ) == Value::Bool(false))
        .then_some(())
    });
    let rows = eventually(SOON, "a row per host", || {
        let rows = page.find_all("#group tr[data-instance]");
        (rows.len() == 2).then_some(rows)
    });
    for (row, view) in rows.iter().zip(&views) {
        let held: Vec<String> = view["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            row.attribute("data-instance").as_deref(),
            view["instance"].as_str()
        );
        assert_eq!(row.attribute("data-partitions"), Some(held.join(",")));
        assert_eq!(row.attribute("data-standby"), Some(standby(view).join(",")));
        assert!(!standby(view).is_empty());
        assert_eq!(
            row.attribute("data-reducer").as_deref(),
            view["reducer"].as_str()
        );
    }
    assert!(rows[0].text().contains("(this host)"), "{}", rows[0].text());
    // The partitions table lists the lag of what this host reads as its own: every
    // partition of organizations, its own of users (re-keyed by id:
    // `page.users.by-id`, the group's). Those it stands by for are in the group table.
    let listed: Vec<String> = page
        .find_all("#partitions tr[data-partition]")
        .iter()
        .filter_map(|r| r.attribute("data-partition"))
        .filter(|p| p.contains("users"))
        .collect();
    let mut own: Vec<String> = views[0]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| format!("page.users.by-id/{p}"))
        .collect();
    own.sort();
    assert_eq!(listed, own);
    let summary = page.find("#group-summary").text();
    assert!(
        summary.starts_with("2 hosts share the 4 partitions"),
        "{summary}"
    );
    page.screenshot("status-group");
}
