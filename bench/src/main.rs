//! `logq-bench`: every performance figure of logq next to a peer measured in the same
//! run on the same machine (ratios hold where absolute numbers drift). Run it through
//! `bench/run.sh`, which installs the peers and builds the release binary first.

mod broker;
mod fold;
mod history;
mod kit;
mod live;
mod reads;
mod report;
mod soak;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

use report::{Row, Spread};

/// The benchmark suite (see README, "Benchmarks").
#[derive(Parser)]
struct Args {
    /// Events in the generated history.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Distinct user ids.
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// Seed of the history.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Records per reducer call in the fold-engine figure (the host's default).
    #[arg(long, default_value_t = 2000)]
    batch: usize,
    /// Repetitions of every figure measured more than once (both sides alternate;
    /// the median is reported, with the range).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Records per batch of the lanes figure (the host's `--batch-max-records`).
    #[arg(long, default_value_t = 2000)]
    lanes_batch: usize,
    /// Seconds of each wrk run.
    #[arg(long, default_value_t = 10)]
    wrk_secs: u64,
    /// Instead of the suite: a soak of this many seconds (wrk on GET while events
    /// stream in; fails on any error or on memory growing after the warm-up).
    #[arg(long)]
    soak: Option<u64>,
    /// The soak host's `--tombstone-retention` (`never` shows what the churn costs
    /// without expiry: the soak then fails on users stored).
    #[arg(long, default_value = "1h")]
    soak_retention: String,
    /// A reducer written with the kit, for figure 1b: `NAME=PATH[@BUILD_SECONDS]`
    /// (repeatable; bench/run.sh builds the examples and passes them).
    #[arg(long)]
    kit: Vec<kit::Candidate>,
    /// Records folded by each reducer of figure 1b (the JavaScript one is slow).
    #[arg(long, default_value_t = 50_000)]
    kit_records: usize,
    /// Only the fold engine (figure 1), printed; for profiling it.
    #[arg(long)]
    fold_only: bool,
    /// Only the fold engine and the catch-up (figures 1 and 2), printed.
    #[arg(long)]
    catch_up_only: bool,
    /// Where the report and charts go.
    #[arg(long, default_value = "bench/results/latest")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.fold_only || std::env::var_os("LOGQ_BIN").is_some(),
        "LOGQ_BIN is not set: run bench/run.sh, which builds the release binary and sets it"
    );
    report::register_font()?;
    std::fs::create_dir_all(&args.out)?;
    let work = std::env::temp_dir().join(format!("logq-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = match args.soak {
        Some(secs) => soak(&args, secs, &work),
        None => run(&args, &work),
    };
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn soak(args: &Args, secs: u64, work: &std::path::Path) -> anyhow::Result<()> {
    let (events, users) = (args.events.min(200_000), args.users.min(20_000));
    say(format!(
        "soak: {secs} s of wrk while events stream in ({events} events of history)"
    ));
    let s = soak::run(events, users, secs, &args.soak_retention, work)?;
    let warmup = (secs as f64 / 6.0).max(10.0);
    let growth = soak::growth(&s.rss, warmup);
    let (first, last) = (
        s.rss.first().map_or(0, |r| r.1),
        s.rss.last().map_or(0, |r| r.1),
    );
    let stored_growth = soak::stored_growth_rounds(&s.stored, warmup);
    let stored = |i: Option<&(f64, u64)>| i.map_or(0, |s| s.1);
    let pass = s.load.errors == 0
        && growth <= soak::FLAT
        && stored_growth <= soak::STORED_ROUNDS_MAX
        && s.expired > 0.0;
    let mut md = format!(
        "# logq soak\n\n`bench/run.sh --soak {secs}`: wrk ({} threads, {} connections) on random \
         existing ids for {secs} s while a producer streamed {} more user events (the host \
         consumed {} user records in all), {} of them churn: users created and deleted \
         again, two hours of event time per round, with `--tombstone-retention {}`.\n\n\
         | figure | value |\n|---|---|\n\
         | users stored first / last sample | {} / {} |\n\
         | users stored, growth after the warm-up | {:.1} churn rounds (limit {:.0}) |\n\
         | tombstones expired | {} |\n\
         | requests | {} ({} req/s) |\n| errors (non-2xx, socket) | {} |\n| latency p50 / p99 | {:.2} / {:.2} ms |\n\
         | RSS first / last sample | {} / {} MiB |\n| peak RSS, second half vs first half after a {warmup:.0} s warm-up | {:+.1}% (limit {:.0}%) |\n\
         | result | {} |\n\nRSS every second (s, MiB):",
        reads::WRK_THREADS,
        reads::WRK_CONNECTIONS,
        s.produced,
        s.consumed,
        2 * s.churned,
        args.soak_retention,
        stored(s.stored.first()),
        stored(s.stored.last()),
        stored_growth,
        soak::STORED_ROUNDS_MAX,
        s.expired,
        s.load.requests,
        report::format_value(s.load.rps),
        s.load.errors,
        s.load.p50_ms,
        s.load.p99_ms,
        first >> 20,
        last >> 20,
        growth * 100.0,
        soak::FLAT * 100.0,
        if pass { "pass" } else { "**FAIL**" },
    );
    for (t, rss) in &s.rss {
        md.push_str(&format!(" {t:.0}:{}", rss >> 20));
    }
    md.push('\n');
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("soak.md"), &md)?;
    println!("{md}");
    anyhow::ensure!(pass, "the soak failed (errors or memory growth), see above");
    Ok(())
}

fn say(what: impl AsRef<str>) {
    eprintln!("[logq-bench] {}", what.as_ref());
}

fn run(args: &Args, work: &std::path::Path) -> anyhow::Result<()> {
    say(format!(
        "generating {} events over {} users (seed {})",
        args.events, args.users, args.seed
    ));
    let history = history::generate(args.seed, args.events, args.users);
    let avg_bytes = history.bytes() / history.len().max(1);
    let mut rows = Vec::new();

    // 1. Fold engine.
    say("fold engine: native vs wasm");
    let f = fold::run(&history, args.batch, args.runs)?;
    let (native, wasm) = (Spread::of(&f.native), Spread::of(&f.wasm));
    let slowdown = native.median / wasm.median;
    rows.push(Row {
        figure: "1. Fold engine, no broker (events/s, one core)".into(),
        ours: format!("wasm {}", wasm.show()),
        peer: format!("same fold native {}", native.show()),
        ratio: wasm.median / native.median,
        target: "wasm >= 500k/s and within 1.25x of native (ratio >= 0.80)".into(),
        pass: Some(wasm.median >= 5e5 && slowdown <= 1.25),
    });
    say(format!("  native {}, wasm {}", native.show(), wasm.show()));
    say(format!("fold in lanes: 1 vs 2, batches of {}", args.lanes_batch));
    let l = fold::lanes(&history, args.lanes_batch, args.runs)?;
    let (one, two) = (Spread::of(&l.runs[0]), Spread::of(&l.runs[1]));
    rows.push(Row {
        figure: format!(
            "1c. The host's fold path (lanes, store, one apply a batch of {}), no broker (events/s)",
            args.lanes_batch
        ),
        ours: format!("2 lanes {}", two.show()),
        peer: format!("1 lane {}", one.show()),
        ratio: two.median / one.median,
        target: ">= 1.7".into(),
        pass: Some(two.median / one.median >= 1.7),
    });
    say(format!("  1 lane {}, 2 lanes {}", one.show(), two.show()));
    if !args.kit.is_empty() {
        say("fold engine: reducers written with the kit");
        let measured = kit::run(&history, &args.kit, args.batch, args.kit_records, args.runs)?;
        let default = measured[0].events_per_second;
        for m in &measured {
            say(format!(
                "  {}: {:.0} events/s, {} bytes, compile {:.0} ms, build {}",
                m.name,
                m.events_per_second,
                m.size,
                m.compile_ms,
                m.build_seconds
                    .map_or_else(|| "-".to_owned(), |s| format!("{s:.1} s"))
            ));
        }
        for m in &measured[1..] {
            rows.push(Row {
                figure: format!(
                    "1b. Fold engine, a reducer written with the kit: {} (events/s, one core, first {} records)",
                    m.name, args.kit_records
                ),
                ours: format!(
                    "{}; component {:.1} MB, compile {:.0} ms, build {}",
                    report::format_value(m.events_per_second),
                    m.size as f64 / 1e6,
                    m.compile_ms,
                    m.build_seconds
                        .map_or_else(|| "-".to_owned(), |s| format!("{s:.0} s"))
                ),
                peer: format!(
                    "default reducer {}; {:.2} MB, compile {:.0} ms",
                    report::format_value(default),
                    measured[0].size as f64 / 1e6,
                    measured[0].compile_ms
                ),
                ratio: m.events_per_second / default,
                target: "reported (no target)".into(),
                pass: None,
            });
        }
    }
    if args.fold_only {
        return Ok(());
    }

    // 2. End to end from the broker.
    say("loading the broker");
    let loaded = broker::load(&history);
    let cache = work.join("compile-cache");
    let state = work.join("state");
    let cache_arg = cache.to_string_lossy().into_owned();
    let state_arg = state.to_string_lossy().into_owned();
    // A cold start first (compiles the reducer into the cache), reported as start-up.
    let cold = broker::start_host(&loaded, "bench-cold", &["--compile-cache-dir", &cache_arg]);
    let cold_after = cold.ready_after;
    drop(cold);
    // Then the plain consumer, logq with 1 lane and logq with 2, in turn, each run.
    let rate = |d: Duration| loaded.records as f64 / d.as_secs_f64();
    let (mut raw_runs, mut lane_runs) = (Vec::new(), [Vec::new(), Vec::new()]);
    for run in 0..args.runs.max(1) {
        raw_runs.push(rate(broker::raw_consumer(&loaded)?.0));
        for (i, lanes) in ["1", "2"].into_iter().enumerate() {
            let host = broker::start_host(
                &loaded,
                &format!("bench-lanes-{lanes}-{run}"),
                &["--compile-cache-dir", &cache_arg, "--fold-lanes", lanes],
            );
            lane_runs[i].push(rate(host.ready_after));
        }
    }
    let raw = Spread::of(&raw_runs);
    let caught = [Spread::of(&lane_runs[0]), Spread::of(&lane_runs[1])];
    say(format!(
        "  plain consumer {}/s; logq 1 lane {}/s, 2 lanes {}/s",
        raw.show(),
        caught[0].show(),
        caught[1].show()
    ));
    for (i, spread) in caught.iter().enumerate() {
        rows.push(Row {
            figure: format!(
                "2. Catch-up from the broker, earliest to ready, {} (events/s)",
                ["1 lane", "2 lanes"][i]
            ),
            ours: format!("logq {}", spread.show()),
            peer: format!("plain rdkafka consumer {}", raw.show()),
            ratio: spread.median / raw.median,
            target: ">= 0.5".into(),
            pass: Some(spread.median / raw.median >= 0.5),
        });
    }
    if args.catch_up_only {
        return Ok(());
    }
    // The host the other figures use: default lanes, with a state directory.
    let host = broker::start_host(
        &loaded,
        "bench-warm",
        &[
            "--compile-cache-dir",
            &cache_arg,
            "--state-dir",
            &state_arg,
            "--snapshot-interval-secs",
            "86400",
        ],
    );

    // 4. Memory (before the reads add their own buffers).
    std::thread::sleep(Duration::from_secs(2));
    let rss_full = broker::rss(host.host.pid())?;
    let visible = broker::metric(&host.host, "logq_users")?;
    let stored = broker::metric(&host.host, "logq_users_stored")?;
    let state_bytes = broker::metric(&host.host, "logq_user_state_bytes")?;
    let empty = broker::start_host(
        &loaded,
        "bench-empty",
        &[
            "--compile-cache-dir",
            &cache_arg,
            "--users-topic",
            "empty-users",
            "--organizations-topic",
            "empty-organizations",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let rss_empty = broker::rss(empty.host.pid())?;
    drop(empty);

    // Answers: a sample checked against the native fold, and their sizes.
    say("checking a sample of answers against the native fold");
    let expected = logq_e2e::expected_answers(&history.users, &history.organizations);
    anyhow::ensure!(
        expected.len() as f64 == visible,
        "the host shows {visible} users, the native fold {}",
        expected.len()
    );
    let step = (expected.len() / 2000).max(1);
    let mut sizes = Vec::new();
    let mut paths = Vec::new();
    for (id, want) in expected.iter().step_by(step) {
        let r = host.host.get(&format!("/users/{id}"));
        anyhow::ensure!(r.status == 200, "GET /users/{id}: {}", r.status);
        anyhow::ensure!(
            r.json() == *want,
            "GET /users/{id} differs from the native fold"
        );
        sizes.push((r.body.len(), paths.len()));
        paths.push(format!("/users/{id}"));
    }
    sizes.sort_unstable();
    let avg_answer = sizes.iter().map(|s| s.0).sum::<usize>() as f64 / sizes.len().max(1) as f64;
    let per_user = (rss_full.saturating_sub(rss_empty)) as f64 / visible.max(1.0);
    // What the store itself holds: keys and states, plus the hash-table slot of each
    // stored user (key pointer and entry, 56 bytes, at hashbrown's 7/8 load).
    let store_per_user = (state_bytes + stored * 64.0) / visible.max(1.0);
    rows.push(Row {
        figure: "4. Resident memory per live user / answer size".into(),
        ours: format!(
            "{per_user:.0} B/user (RSS {} MiB, empty host {} MiB, {visible} live of {stored} stored users); \
             the store itself: {store_per_user:.0} B/user ({:.2}x)",
            rss_full >> 20,
            rss_empty >> 20,
            store_per_user / avg_answer.max(1.0),
        ),
        peer: format!("the answer itself: {avg_answer:.0} B"),
        ratio: per_user / avg_answer,
        target: "<= 1.5 (lower is better)".into(),
        pass: Some(per_user / avg_answer <= 1.5),
    });

    // 3. Reads.
    say("reads: wrk against logq, then against nginx");
    let script = reads::script(work, &paths)?;
    let port = host.host.addr.port();
    let idle = reads::wrk(port, &script, args.wrk_secs)?;
    // The same reads while a producer streams a fifth of the history again.
    let more = history::generate(args.seed + 1, args.events / 5, args.users);
    let bootstrap = loaded.broker.bootstrap.clone();
    let producer = std::thread::spawn(move || broker::produce_updates(&bootstrap, &more));
    std::thread::sleep(Duration::from_millis(500));
    let busy = reads::wrk(port, &script, args.wrk_secs)?;
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer thread panicked"))??;
    let consumed_during =
        broker::metric(&host.host, "logq_records_consumed_total{topic=\"users\"}")?;
    // nginx serves the answer of median size.
    let median = sizes.get(sizes.len() / 2).map_or(0, |s| s.1);
    let answer = host.host.get(&paths[median]).body;
    let nginx = reads::Nginx::start(work, answer.as_bytes())?;
    let peer = reads::wrk(nginx.port, &script, args.wrk_secs)?;
    drop(nginx);
    for (name, load) in [("idle", idle), ("during ingest", busy)] {
        let ratio = load.rps / peer.rps;
        rows.push(Row {
            figure: format!("3. GET /users/{{id}}, random ids, {name} (requests/s)"),
            ours: format!(
                "{} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors of {}",
                report::format_value(load.rps),
                load.p50_ms,
                load.p99_ms,
                load.errors,
                load.requests
            ),
            peer: format!(
                "nginx, static {} B file: {} req/s, p99 {:.2} ms",
                answer.len(),
                report::format_value(peer.rps),
                peer.p99_ms
            ),
            ratio,
            target: ">= 0.8, p99 <= 2 ms, 0 errors".into(),
            pass: Some(ratio >= 0.8 && load.p99_ms <= 2.0 && load.errors == 0),
        });
    }
    say(format!(
        "  logq {:.0} req/s idle, {:.0} during ingest; nginx {:.0}",
        idle.rps, busy.rps, peer.rps
    ));

    // 6. Reads with a position, the export, live changes.
    say("reads with positions, export, live changes");
    let ids: Vec<String> = expected.keys().step_by(step).cloned().collect();
    let more = history::generate(args.seed + 2, args.events / 10, args.users);
    let l = live::run(&host.host, &loaded.broker.bootstrap, &ids, &more)?;
    rows.push(Row {
        figure: "6a. GET right after a produce, with its position (ms)".into(),
        ours: format!(
            "p50 {:.2}, p99 {:.2} ({} reads, each saw its write)",
            l.bounded_ms.0, l.bounded_ms.1, l.reads
        ),
        peer: format!(
            "the same GET without a position: p50 {:.2}, p99 {:.2}",
            l.plain_ms.0, l.plain_ms.1
        ),
        ratio: l.bounded_ms.1 / l.plain_ms.1.max(1e-9),
        target: "reported (added latency = the wait for the fold)".into(),
        pass: None,
    });
    rows.push(Row {
        figure: "6b. GET /export while events stream in (users/s)".into(),
        ours: format!(
            "{} users/s ({} users); ingest meanwhile {} events/s",
            report::format_value(l.export_users_per_s),
            l.exported,
            report::format_value(l.ingest_during_export.0)
        ),
        peer: format!(
            "ingest in the second after: {} events/s",
            report::format_value(l.ingest_during_export.1)
        ),
        ratio: l.ingest_during_export.0 / l.ingest_during_export.1.max(1e-9),
        target: "reported (ingest not held by the export)".into(),
        pass: None,
    });
    rows.push(Row {
        figure: format!("6c. Changes to {} SSE subscribers (changes/s)", l.watchers),
        ours: format!(
            "{} changes/s delivered in all, {} subscribers dropped",
            report::format_value(l.changes_per_s),
            l.dropped
        ),
        peer: format!(
            "ingest meanwhile {} events/s",
            report::format_value(l.ingest_with_watchers)
        ),
        ratio: l.changes_per_s / (l.ingest_with_watchers * l.watchers as f64).max(1e-9),
        target: "reported".into(),
        pass: None,
    });
    say(format!(
        "  bounded read p50 {:.2} ms, export {:.0} users/s, {:.0} changes/s to {} subscribers",
        l.bounded_ms.0, l.export_users_per_s, l.changes_per_s, l.watchers
    ));

    // 5. Start-up: cold (full replay) and from the snapshot written at shutdown.
    let status = host.host.terminate();
    anyhow::ensure!(status.success(), "logq exited with {status} on SIGTERM");
    let from_snapshot = broker::start_host(
        &loaded,
        "bench-warm",
        &["--compile-cache-dir", &cache_arg, "--state-dir", &state_arg],
    );
    let snap_after = from_snapshot.ready_after;
    let total_users = broker::metric(&from_snapshot.host, "logq_users")?;
    anyhow::ensure!(total_users > 0.0, "no users after restoring the snapshot");
    drop(from_snapshot);
    rows.push(Row {
        figure: "5. Start-up to ready, full history, no snapshot (s)".into(),
        ours: format!("{:.2} s", cold_after.as_secs_f64()),
        peer: format!(
            "raw consumer reads it all in {:.2} s",
            loaded.records as f64 / raw.median
        ),
        ratio: rate(cold_after) / raw.median,
        target: "reported".into(),
        pass: None,
    });
    rows.push(Row {
        figure: "5. Start-up to ready from the --state-dir snapshot (s)".into(),
        ours: format!("{:.2} s", snap_after.as_secs_f64()),
        peer: format!("full replay {:.2} s", cold_after.as_secs_f64()),
        ratio: cold_after.as_secs_f64() / snap_after.as_secs_f64(),
        target: "reported".into(),
        pass: None,
    });

    // Charts and the report.
    let out = &args.out;
    report::bars(
        &out.join("fold.png"),
        "1. Fold engine, events/s on one core",
        "events/s",
        &[("native".into(), native.median), ("wasm".into(), wasm.median)],
    )?;
    report::bars(
        &out.join("catch-up.png"),
        "2. Catch-up from the broker, events/s",
        "events/s",
        &[
            ("plain rdkafka consumer".into(), raw.median),
            ("logq, 1 lane".into(), caught[0].median),
            ("logq, 2 lanes".into(), caught[1].median),
        ],
    )?;
    report::bars(
        &out.join("reads.png"),
        "3. GET /users/{id}, requests/s (wrk)",
        "requests/s",
        &[
            ("nginx static file".into(), peer.rps),
            ("logq idle".into(), idle.rps),
            ("logq during ingest".into(), busy.rps),
        ],
    )?;
    report::bars(
        &out.join("latency.png"),
        "3. GET /users/{id}, p99 latency (wrk)",
        "ms",
        &[
            ("nginx static file".into(), peer.p99_ms),
            ("logq idle".into(), idle.p99_ms),
            ("logq during ingest".into(), busy.p99_ms),
        ],
    )?;
    report::bars(
        &out.join("startup.png"),
        "5. Start-up to ready, seconds",
        "s",
        &[
            ("raw consumer read-all".into(), loaded.records as f64 / raw.median),
            ("logq full replay".into(), cold_after.as_secs_f64()),
            ("logq from snapshot".into(), snap_after.as_secs_f64()),
        ],
    )?;
    let ratio_rows: Vec<(String, f64, Option<f64>)> = vec![
        ("1. wasm / native fold".into(), wasm.median / native.median, Some(0.8)),
        (
            "2. catch-up (2 lanes) / raw consumer".into(),
            caught[1].median / raw.median,
            Some(0.5),
        ),
        ("3. GET idle / nginx".into(), idle.rps / peer.rps, Some(0.8)),
        (
            "3. GET during ingest / nginx".into(),
            busy.rps / peer.rps,
            Some(0.8),
        ),
        (
            "4. answer size / memory per user".into(),
            avg_answer / per_user,
            Some(1.0 / 1.5),
        ),
    ];
    report::ratios(&out.join("ratios.png"), &ratio_rows)?;
    let setup = format!(
        "Generated history: {} records ({} user events incl. duplicates, {} organization events), \
         {} user ids, seed {}, {avg_bytes} bytes an event on average. Broker: nisshi, memory storage, \
         `users` with {} partitions. Release build. wrk: {} threads, {} connections, {} s a run, \
         {} random existing ids; during ingest a producer wrote the updates among {} more generated \
         user events at the same time (the host had consumed {consumed_during} user records by the end). \
         Command: `bench/run.sh --events {} --users {}`.",
        history.len(),
        history.users.len(),
        history.organizations.len(),
        args.users,
        args.seed,
        broker::USER_PARTITIONS,
        reads::WRK_THREADS,
        reads::WRK_CONNECTIONS,
        args.wrk_secs,
        paths.len(),
        args.events / 5,
        args.events,
        args.users,
    );
    let charts = [
        "ratios.png",
        "fold.png",
        "catch-up.png",
        "reads.png",
        "latency.png",
        "startup.png",
    ];
    let md = report::markdown(&rows, &report::machine(), &setup, &charts);
    std::fs::write(out.join("results.md"), &md).context("writing results.md")?;
    println!("{md}");
    say(format!("report and charts in {}", out.display()));
    Ok(())
}
