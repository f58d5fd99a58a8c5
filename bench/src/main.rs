//! `logq-bench`: every performance figure of logq next to a peer measured in the same
//! run on the same machine (ratios hold where absolute numbers drift). Run it through
//! `bench/run.sh`, which installs the peers and builds the release binary first.

mod broker;
mod cluster;
mod cpu;
mod fold;
mod history;
mod kit;
mod live;
mod peer;
mod reads;
mod report;
mod soak;
mod visible;

use std::path::PathBuf;
use std::time::{Duration, Instant};

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
    #[arg(long, default_value_t = 65_536)]
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
    /// Events/s of the steady stream of figure 7 (produce -> visible).
    #[arg(long, default_value_t = 10_000.0)]
    visible_rate: f64,
    /// Users of the second memory figure (twice as many events); 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    memory_users: u64,
    /// Only the fold engine and the catch-up (figures 1 and 2), printed.
    #[arg(long)]
    catch_up_only: bool,
    /// Only figure 7 (produce -> visible) after figures 1 and 2, printed.
    #[arg(long)]
    visible_only: bool,
    /// With --visible-only: the host writes a snapshot this often (seconds; 0: no
    /// state directory, as figure 7 of the suite).
    #[arg(long, default_value_t = 0)]
    visible_snapshot_secs: u64,
    /// Only figure 9 (RSS across 10 rollbacks), printed: for work on memory.
    #[arg(long)]
    swaps_only: bool,
    /// Run only figure 11 (three hosts sharing the partitions vs one) and print it.
    #[arg(long)]
    cluster_only: bool,
    /// Only figures 4 and 12 at `--memory-users` ids, printed with where the host's RSS
    /// lies: for work on memory.
    #[arg(long)]
    memory_only: bool,
    /// Only the closed-loop reads of figure 3 (logq and nginx in turn, `--runs`
    /// rounds), printed: for work on the read path.
    #[arg(long)]
    reads_only: bool,
    /// Only catch-up from the broker: the plain consumer, then a host in group
    /// `compare-a-<run>` and one in `compare-b-<run>`, in turn, `--runs` rounds,
    /// printed. For A/B work on the fold path: LOGQ_BIN may be a script that starts
    /// one build or another (or sets other variables) by that group id.
    #[arg(long)]
    catch_up_compare: bool,
    /// Where the report and charts go.
    #[arg(long, default_value = "bench/results/latest")]
    out: PathBuf,
    /// Instead of the suite: be the hand-written Rust folder (the peer of figure 2)
    /// reading from this broker; the suite starts it as its own process.
    #[arg(long, hide = true)]
    peer_folder: Option<String>,
    /// The peer's records to read before it has caught up.
    #[arg(long, hide = true, default_value_t = 0)]
    peer_records: usize,
    /// The peer reads and hands over batches without folding them.
    #[arg(long, hide = true)]
    peer_no_fold: bool,
    /// Where the peer writes its answers.
    #[arg(long, hide = true)]
    peer_answers: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(bootstrap) = &args.peer_folder {
        return peer::run(&peer::Options {
            bootstrap,
            records: args.peer_records,
            no_fold: args.peer_no_fold,
            answers: args.peer_answers.as_deref(),
        });
    }
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
    if args.memory_only {
        let cache = work.join("compile-cache");
        let (row, _listing, host, _loaded) = big_memory(args, &cache.to_string_lossy())?;
        say(format!("{}: {} | {}", row.figure, row.ours, row.peer));
        say("where the host's RSS lies (largest mappings; KiB):");
        for (name, size, rss) in broker::rss_by_mapping(host.host.pid(), 12)? {
            say(format!("  {rss:>9} resident of {size:>10}  {name}"));
        }
        return Ok(());
    }
    say(format!(
        "generating {} events over {} users (seed {})",
        args.events, args.users, args.seed
    ));
    let history = history::generate(args.seed, args.events, args.users);
    if args.cluster_only {
        let loaded = broker::load(&history);
        for row in [
            cluster_row(&loaded, &history)?,
            failover_row(&loaded, &history)?,
            restart_row(&loaded)?,
        ] {
            say(format!("{}: {} | {}", row.figure, row.ours, row.peer));
        }
        return Ok(());
    }
    if args.swaps_only {
        let loaded = broker::load(&history);
        let cache = work.join("compile-cache");
        let s = swap_memory(&loaded, &cache.to_string_lossy(), 10)?;
        say(format!(
            "RSS across 10 rollbacks ({} users): before {} MiB, after: {:?} MiB",
            s.users,
            s.before >> 20,
            s.after.iter().map(|b| b >> 20).collect::<Vec<_>>()
        ));
        for row in [s.row(), preview_row(&s)] {
            say(format!(
                "{}: {} | {} | ratio {:.2}",
                row.figure, row.ours, row.peer, row.ratio
            ));
        }
        return Ok(());
    }
    if args.reads_only {
        return reads_only(args, work, &history);
    }
    if args.catch_up_compare {
        return catch_up_compare(args, work, &history);
    }
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
    say(format!(
        "fold in lanes: 1 vs 2, batches of {}",
        args.lanes_batch
    ));
    let l = fold::lanes(&history, args.lanes_batch, args.runs)?;
    let (one, two) = (Spread::of(&l.runs[0]), Spread::of(&l.runs[1]));
    let cores = [
        Spread::of(&l.cores[0]).median,
        Spread::of(&l.cores[1]).median,
    ];
    rows.push(Row {
        figure: format!(
            "1c. The host's fold path (lanes, store, one apply a batch of {}), no broker (events/s)",
            args.lanes_batch
        ),
        ours: format!(
            "2 lanes {}, {:.2} cores busy",
            two.show(),
            cores[1]
        ),
        peer: format!(
            "1 lane {}, {:.2} cores busy",
            one.show(),
            cores[0]
        ),
        ratio: two.median / one.median,
        target: ">= 1.7".into(),
        pass: Some(two.median / one.median >= 1.7),
    });
    say(format!(
        "  1 lane {} on {:.2} cores, 2 lanes {} on {:.2} cores",
        one.show(),
        cores[0],
        two.show(),
        cores[1]
    ));
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
    // Cores each side took, and the broker beside it: [plain, 1 lane, 2 lanes].
    let (mut consumer_cores, mut broker_cores) =
        ([(); 3].map(|()| Vec::new()), [(); 3].map(|()| Vec::new()));
    let broker_pid = loaded.broker.pid().context("the broker is not running")?;
    // The hand-written Rust folder, folding and (its validity check) only reading.
    let (mut peer_runs, mut peer_read_runs) = (Vec::new(), Vec::new());
    let mut peer_rss = Vec::new();
    let peer_answers = work.join("peer-answers.tsv");
    for run in 0..args.runs.max(1) {
        let (broker_before, own_before) = (cpu::seconds(broker_pid)?, cpu::own_seconds()?);
        let took = broker::raw_consumer(&loaded)?.0;
        raw_runs.push(rate(took));
        consumer_cores[0].push((cpu::own_seconds()? - own_before) / took.as_secs_f64());
        broker_cores[0].push((cpu::seconds(broker_pid)? - broker_before) / took.as_secs_f64());
        let answers = (run == 0).then_some(peer_answers.as_path());
        let folded = peer::spawn(&loaded, false, answers)?;
        peer_runs.push(rate(folded.took));
        peer_rss.push(folded.rss as f64 / folded.users.max(1) as f64);
        peer_read_runs.push(rate(peer::spawn(&loaded, true, None)?.took));
        for (i, lanes) in ["1", "2"].into_iter().enumerate() {
            let broker_before = cpu::seconds(broker_pid)?;
            let host = broker::start_host(
                &loaded,
                &format!("bench-lanes-{lanes}-{run}"),
                &["--compile-cache-dir", &cache_arg, "--fold-lanes", lanes],
            );
            let took = host.ready_after.as_secs_f64();
            lane_runs[i].push(rate(host.ready_after));
            consumer_cores[i + 1].push(cpu::seconds(host.host.pid())? / took);
            broker_cores[i + 1].push((cpu::seconds(broker_pid)? - broker_before) / took);
        }
    }
    let raw = Spread::of(&raw_runs);
    let caught = [Spread::of(&lane_runs[0]), Spread::of(&lane_runs[1])];
    let (folder, folder_read) = (Spread::of(&peer_runs), Spread::of(&peer_read_runs));
    say(format!(
        "  plain consumer {}/s; logq 1 lane {}/s, 2 lanes {}/s; hand-written Rust folder {}/s (reading only {}/s)",
        raw.show(),
        caught[0].show(),
        caught[1].show(),
        folder.show(),
        folder_read.show()
    ));
    rows.push(Row {
        figure: "2. Catch-up, earliest to ready, logq (default lanes) / a hand-written Rust \
                 folder (rdkafka, serde, native rules, fold on its own thread) (events/s)"
            .into(),
        ours: format!("logq 2 lanes {}", caught[1].show()),
        peer: format!(
            "hand-written Rust folder {}; its consumer side alone {} ({:.2} of the plain consumer)",
            folder.show(),
            folder_read.show(),
            folder_read.median / raw.median
        ),
        ratio: caught[1].median / folder.median,
        target: ">= 0.8 (the peer reads at >= 0.8 of the plain consumer)".into(),
        pass: Some(caught[1].median / folder.median >= 0.8),
    });
    let cores = |v: &[Vec<f64>; 3], i: usize| Spread::of(&v[i]).median;
    say(format!(
        "  cores: plain consumer {:.2} + broker {:.2}; logq 1 lane {:.2} + broker {:.2}; 2 lanes {:.2} + broker {:.2}",
        cores(&consumer_cores, 0),
        cores(&broker_cores, 0),
        cores(&consumer_cores, 1),
        cores(&broker_cores, 1),
        cores(&consumer_cores, 2),
        cores(&broker_cores, 2),
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
    rows.push(Row {
        figure: "2. CPU during the catch-up: cores the consumer took + cores the broker took \
                 (user + system time / wall time, medians; no load generator runs then)"
            .into(),
        ours: format!(
            "logq 1 lane {:.2} + {:.2}; 2 lanes {:.2} + {:.2}",
            cores(&consumer_cores, 1),
            cores(&broker_cores, 1),
            cores(&consumer_cores, 2),
            cores(&broker_cores, 2)
        ),
        peer: format!(
            "plain rdkafka consumer {:.2} + {:.2}",
            cores(&consumer_cores, 0),
            cores(&broker_cores, 0)
        ),
        ratio: cores(&consumer_cores, 2) / cores(&consumer_cores, 0),
        target: "reported (no target)".into(),
        pass: None,
    });
    if args.catch_up_only {
        return Ok(());
    }
    if args.visible_only {
        let interval = args.visible_snapshot_secs.to_string();
        let mut host_args = vec!["--compile-cache-dir", cache_arg.as_str()];
        if args.visible_snapshot_secs > 0 {
            host_args.extend([
                "--state-dir",
                state_arg.as_str(),
                "--snapshot-interval-secs",
                interval.as_str(),
            ]);
        }
        let host = broker::start_host(&loaded, "bench-visible", &host_args);
        let ids: Vec<String> = export_answers(&host.host)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let v = figure7(args, &host.host, &loaded, &ids)?;
        say(format!(
            "  produce -> visible at {:.0}/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} probes",
            v.sent_rate, v.ms[0], v.ms[1], v.ms[2], v.probes
        ));
        say(format!("  {}", v.host.summary()));
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

    // 4. Memory (before the reads add their own buffers): plain RSS, nothing taken off.
    std::thread::sleep(Duration::from_secs(2));
    let memory = measure_memory(&host.host)?;

    // Answers: a sample checked against the native fold, and their sizes.
    say("checking a sample of answers against the native fold");
    let expected = logq_e2e::expected_answers(&history.users, &history.organizations);
    anyhow::ensure!(
        expected.len() as f64 == memory.visible,
        "the host shows {} users, the native fold {}",
        memory.visible,
        expected.len()
    );
    let step = (expected.len() / 2000).max(1);
    let mut sample = Vec::new();
    for (id, want) in expected.iter().step_by(step) {
        let r = host.host.get(&format!("/users/{id}"));
        anyhow::ensure!(r.status == 200, "GET /users/{id}: {}", r.status);
        anyhow::ensure!(
            r.json() == *want,
            "GET /users/{id} differs from the native fold"
        );
        sample.push(id.clone());
    }
    // Every live user's answer, as served, from the export (one position).
    let answers = export_answers(&host.host)?;
    anyhow::ensure!(
        answers.len() == expected.len(),
        "the export holds {} users, the native fold {}",
        answers.len(),
        expected.len()
    );
    let avg_answer =
        answers.iter().map(|(_, a)| a.len()).sum::<usize>() as f64 / answers.len().max(1) as f64;
    rows.push(memory.row(avg_answer));
    // The peer did the same work: its answers are logq's, user for user.
    say("checking the hand-written Rust folder's answers against logq's export");
    peer::same_answers(&peer_answers, &answers)?;
    let peer_per_user = Spread::of(&peer_rss).median;
    rows.push(Row {
        figure:
            "4b. RSS per live user: logq / the hand-written Rust folder (same users, its answers \
                 checked equal to logq's)"
                .into(),
        ours: format!("logq {:.0} B", memory.rss as f64 / memory.visible.max(1.0)),
        peer: format!("hand-written Rust folder {peer_per_user:.0} B"),
        ratio: memory.rss as f64 / memory.visible.max(1.0) / peer_per_user.max(1.0),
        target: "reported (the price of the sandboxed, swappable fold)".into(),
        pass: None,
    });

    // 3. Reads: ids drawn uniformly from every live user, both sides.
    say("reads: wrk (closed loop) against logq and nginx, in turn");
    let paths: Vec<String> = answers
        .iter()
        .map(|(id, _)| format!("/users/{id}"))
        .collect();
    let script = reads::script(work, &paths)?;
    let port = host.host.addr.port();
    let nginx = reads::Nginx::start(work, &answers)?;
    let (mut ours_runs, mut nginx_runs) = (Vec::new(), Vec::new());
    for _ in 0..args.runs.max(1) {
        ours_runs.push(reads::wrk(port, &script, args.wrk_secs)?);
        nginx_runs.push(reads::wrk(nginx.port, &script, args.wrk_secs)?);
    }
    let rps = |l: &[reads::Load]| Spread::by(l, |l| l.rps);
    let (idle, peer) = (rps(&ours_runs), rps(&nginx_runs));
    let errors: u64 = ours_runs.iter().map(|l| l.errors).sum();
    let requests: u64 = ours_runs.iter().map(|l| l.requests).sum();
    let wrk_cores = |l: &[reads::Load]| Spread::by(l, |l| l.generator_cores);
    rows.push(Row {
        figure: "3. GET /users/{id}, uniform over all live users, closed loop (requests/s)".into(),
        ours: format!(
            "{} req/s, {errors} errors of {requests}; wrk took {:.2} cores",
            idle.show(),
            wrk_cores(&ours_runs).median
        ),
        peer: format!(
            "nginx, a file per user, tuned: {} req/s, {} errors; wrk took {:.2} cores",
            peer.show(),
            nginx_runs.iter().map(|l| l.errors).sum::<u64>(),
            wrk_cores(&nginx_runs).median
        ),
        ratio: idle.median / peer.median,
        target: ">= 0.8, 0 errors".into(),
        pass: Some(idle.median / peer.median >= 0.8 && errors == 0),
    });
    say(format!(
        "  logq {} req/s; nginx {}",
        idle.show(),
        peer.show()
    ));
    // Latency below saturation, both sides at the same rate: half of the smaller of
    // the two maximums.
    let open_rate = idle.median.min(peer.median) / 2.0;
    say(format!(
        "reads: oha (open loop), both at {} req/s (half the smaller maximum)",
        report::format_value(open_rate)
    ));
    let urls = work.join("urls.txt");
    let (mut ours_lat, mut nginx_lat) = (Vec::new(), Vec::new());
    let url_list = |port: u16| {
        paths
            .iter()
            .map(|p| format!("http://127.0.0.1:{port}{p}\n"))
            .collect::<String>()
    };
    for _ in 0..args.runs.max(1) {
        std::fs::write(&urls, url_list(port))?;
        ours_lat.push(reads::oha(&urls, open_rate, args.wrk_secs)?);
        std::fs::write(&urls, url_list(nginx.port))?;
        nginx_lat.push(reads::oha(&urls, open_rate, args.wrk_secs)?);
    }
    let problems = nginx.problems();
    anyhow::ensure!(
        problems.is_empty(),
        "nginx logged {} problems, the first: {}",
        problems.len(),
        problems[0]
    );
    drop(nginx);
    let quantile = |runs: &[reads::Latency], i: usize| Spread::by(runs, |l| l.ms[i]);
    let (ours_p99, nginx_p99) = (quantile(&ours_lat, 1), quantile(&nginx_lat, 1));
    let lat_errors: u64 = ours_lat.iter().map(|l| l.errors).sum();
    let show_ms = |runs: &[reads::Latency]| {
        format!(
            "at {} req/s (achieved {}): p50 {:.2}, p99 {:.2} [{:.2}-{:.2}], p99.9 {:.2} ms; oha took {:.2} cores",
            report::format_value(runs[0].rate),
            report::format_value(runs[0].achieved),
            quantile(runs, 0).median,
            quantile(runs, 1).median,
            quantile(runs, 1).min,
            quantile(runs, 1).max,
            quantile(runs, 2).median,
            Spread::by(runs, |l| l.generator_cores).median,
        )
    };
    rows.push(Row {
        figure: "3. GET /users/{id} latency, both at half the smaller maximum, open loop, corrected (p99 ms)"
            .into(),
        ours: format!(
            "{}, {lat_errors} errors{}",
            show_ms(&ours_lat),
            ours_lat
                .iter()
                .filter(|l| !l.what.is_empty())
                .map(|l| format!(" ({})", l.what))
                .collect::<String>()
        ),
        peer: format!("nginx {}", show_ms(&nginx_lat)),
        ratio: ours_p99.median / nginx_p99.median,
        target: "p99 <= 1 ms and <= 1.5x nginx's (lower is better)".into(),
        pass: Some(
            ours_p99.median <= 1.0 && ours_p99.median <= 1.5 * nginx_p99.median && lat_errors == 0,
        ),
    });
    say(format!(
        "  logq {}; nginx {}",
        show_ms(&ours_lat),
        show_ms(&nginx_lat)
    ));
    // The same closed-loop reads while a producer streams a fifth of the history again.
    let more = history::generate(args.seed + 1, args.events / 5, args.users);
    let bootstrap = loaded.broker.bootstrap.clone();
    let producer = std::thread::spawn(move || broker::produce_updates(&bootstrap, &more));
    let users_consumed =
        || broker::metric(&host.host, "logq_records_consumed_total{topic=\"users\"}");
    let ingest_from = users_consumed()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while users_consumed()? <= ingest_from {
        anyhow::ensure!(std::time::Instant::now() < deadline, "ingest never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let window_from = users_consumed()?;
    let busy = reads::wrk(port, &script, args.wrk_secs)?;
    let folded_in_window = users_consumed()? - window_from;
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer thread panicked"))??;
    let consumed_during =
        broker::metric(&host.host, "logq_records_consumed_total{topic=\"users\"}")?;
    rows.push(Row {
        figure: "3. GET /users/{id}, uniform, closed loop, during ingest (requests/s)".into(),
        ours: format!(
            "{} req/s, p99 {:.2} ms, {} errors of {}; {} user records folded during the {} s window ({} /s)",
            report::format_value(busy.rps),
            busy.p99_ms,
            busy.errors,
            busy.requests,
            folded_in_window,
            args.wrk_secs,
            report::format_value(folded_in_window / args.wrk_secs.max(1) as f64)
        ),
        peer: format!("nginx idle {} req/s", report::format_value(peer.median)),
        ratio: busy.rps / peer.median,
        target: "reported, 0 errors, ingest overlapping the window".into(),
        pass: Some(busy.errors == 0 && folded_in_window > 0.0),
    });

    // 7. Produce -> visible under a steady stream.
    say(format!(
        "produce -> visible at {} events/s",
        args.visible_rate
    ));
    let ids: Vec<String> = answers.iter().map(|(id, _)| id.clone()).collect();
    let v = figure7(args, &host.host, &loaded, &ids)?;
    rows.push(Row {
        figure: format!(
            "7. Produce -> visible under {} events/s: send to the first GET showing it (p99 ms)",
            report::format_value(v.rate)
        ),
        ours: format!(
            "p50 {:.1}, p99 {:.1}, max {:.1} ms ({} probes; {} events/s sent; {})",
            v.ms[0],
            v.ms[1],
            v.ms[2],
            v.probes,
            report::format_value(v.sent_rate),
            v.host.summary()
        ),
        peer: "none (no peer serves this)".into(),
        ratio: v.ms[1],
        target: "p99 <= 50 ms".into(),
        pass: Some(v.ms[1] <= 50.0),
    });
    say(format!(
        "  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} probes",
        v.ms[0], v.ms[1], v.ms[2], v.probes
    ));
    say(format!("  {}", v.host.summary()));

    // 6. Reads with a position, the export, live changes.
    say("reads with positions, export, live changes");
    let more = history::generate(args.seed + 2, args.events / 10, args.users);
    let l = live::run(&host.host, &loaded.broker.bootstrap, &sample, &more)?;
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
        "  bounded read p50 {:.2} ms, {:.0} changes/s to {} subscribers",
        l.bounded_ms.0, l.changes_per_s, l.watchers
    ));

    // 5. Start-up: cold (full replay) and from the snapshot written at shutdown; the
    // restored host must give the answers the stopped one gave.
    let before: Vec<String> = sample
        .iter()
        .map(|id| host.host.get(&format!("/users/{id}")).body)
        .collect();
    let status = host.host.terminate();
    anyhow::ensure!(status.success(), "logq exited with {status} on SIGTERM");
    let from_snapshot = broker::start_host(
        &loaded,
        "bench-warm",
        &["--compile-cache-dir", &cache_arg, "--state-dir", &state_arg],
    );
    let snap_after = from_snapshot.ready_after;
    for (id, was) in sample.iter().zip(&before) {
        let now = from_snapshot.host.get(&format!("/users/{id}")).body;
        anyhow::ensure!(
            now == *was,
            "GET /users/{id} after restoring the snapshot differs:\n  before: {was}\n  after:  {now}"
        );
    }
    drop(from_snapshot);
    rows.push(Row {
        figure: "5. Start-up to ready, full history, no snapshot (s)".into(),
        ours: format!("{:.2} s", cold_after.as_secs_f64()),
        peer: format!(
            "raw consumer reads it all in {:.2} s",
            loaded.records as f64 / raw.median
        ),
        ratio: rate(cold_after) / raw.median,
        target: ">= 0.6 (events/s to ready / the raw consumer's)".into(),
        pass: Some(rate(cold_after) / raw.median >= 0.6),
    });
    rows.push(Row {
        figure: format!(
            "5. Start-up to ready from the --state-dir snapshot (s; {} sampled answers equal before and after)",
            sample.len()
        ),
        ours: format!("{:.2} s", snap_after.as_secs_f64()),
        peer: format!("full replay {:.2} s", cold_after.as_secs_f64()),
        ratio: cold_after.as_secs_f64() / snap_after.as_secs_f64(),
        target: "reported".into(),
        pass: None,
    });

    // 8. What an idle host holds: empty topics, nothing folded.
    say("idle host: RSS with empty topics");
    let idle_host = broker::start_host(
        &loaded,
        "bench-idle",
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
    let idle_rss = broker::rss(idle_host.host.pid())?;
    drop(idle_host);
    rows.push(Row {
        figure: "8. Idle host RSS, empty topics (MiB)".into(),
        ours: format!("{:.1} MiB", idle_rss as f64 / (1 << 20) as f64),
        peer: "none".into(),
        ratio: idle_rss as f64 / (1 << 20) as f64,
        target: "<= 40 MiB".into(),
        pass: Some(idle_rss <= 40 << 20),
    });
    say(format!("  {} MiB", idle_rss >> 20));

    // 9. Memory across swaps: ten rollbacks (each a replay) on the full history.
    say("RSS across 10 rollbacks");
    let swaps = swap_memory(&loaded, &cache_arg, 10)?;
    rows.push(swaps.row());
    say(format!(
        "  before {} MiB, after: {:?} MiB",
        swaps.before >> 20,
        swaps.after.iter().map(|b| b >> 20).collect::<Vec<_>>()
    ));
    rows.push(preview_row(&swaps));

    // 11. Three hosts sharing the partitions.
    say("three hosts sharing the partitions (--sharded) vs one");
    rows.push(cluster_row(&loaded, &history)?);
    say("one of three sharing hosts killed, with and without a standby");
    rows.push(failover_row(&loaded, &history)?);
    say("a sharing host killed and started again: from its per-partition snapshots");
    rows.push(restart_row(&loaded)?);

    // 4b. Memory at ten times the users, so the slope shows.
    if args.memory_users > 0 {
        say(format!(
            "memory at {} users ({} events)",
            args.memory_users,
            args.memory_users * 2
        ));
        let (row, listing, host, loaded_big) = big_memory(args, &cache_arg)?;
        rows.push(row);
        rows.push(listing);
        // 6b. The export of this large state while events stream in.
        say("export of the large state while events stream in");
        // Four times the history's events (about half of them updates): a stream
        // that outlasts the export, so the seconds before, during and after it all
        // see ingest running, or the figure fails. (Twice ran out in a run where the
        // export took 4.4 s and the host folded 177k records/s meanwhile.)
        let more = history::generate(args.seed + 4, args.events * 4, args.memory_users);
        let e = live::export_under_ingest(&host.host, &loaded_big.broker.bootstrap, &more)?;
        rows.push(Row {
            figure: format!(
                "6b. GET /export of {} users while events stream in (users/s)",
                e.exported
            ),
            ours: format!(
                "{} users/s ({:.1} s); {} user records folded during it ({} /s)",
                report::format_value(e.exported as f64 / e.took),
                e.took,
                e.folded_during,
                report::format_value(e.folded_during / e.took)
            ),
            peer: format!(
                "ingest in the second before: {} /s, after: {} /s ({} records of the stream still to fold then)",
                report::format_value(e.rate_before),
                report::format_value(e.rate_after),
                e.left_after
            ),
            ratio: e.folded_during / e.took / e.rate_before.max(1e-9),
            target: "ingest goes on during the export (records folded during it > 0, and after it)"
                .into(),
            pass: Some(e.folded_during > 0.0 && e.rate_after > 0.0 && e.left_after > 0.0),
        });
        say(format!(
            "  {} users in {:.1} s; {} records folded meanwhile",
            e.exported, e.took, e.folded_during
        ));
    }

    // Charts and the report.
    let out = &args.out;
    report::bars(
        &out.join("fold.png"),
        "1. Fold engine, events/s on one core",
        "events/s",
        &[
            ("native".into(), native.median),
            ("wasm".into(), wasm.median),
        ],
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
        "3. GET /users/{id}, requests/s (wrk, medians)",
        "requests/s",
        &[
            ("nginx, a file per user".into(), peer.median),
            ("logq idle".into(), idle.median),
            ("logq during ingest".into(), busy.rps),
        ],
    )?;
    report::bars(
        &out.join("latency.png"),
        "3. GET at half the maximum, open loop (oha), ms",
        "ms",
        &[
            ("nginx p99".into(), nginx_p99.median),
            ("logq p99".into(), ours_p99.median),
            ("nginx p99.9".into(), quantile(&nginx_lat, 2).median),
            ("logq p99.9".into(), quantile(&ours_lat, 2).median),
        ],
    )?;
    report::bars(
        &out.join("startup.png"),
        "5. Start-up to ready, seconds",
        "s",
        &[
            (
                "raw consumer read-all".into(),
                loaded.records as f64 / raw.median,
            ),
            ("logq full replay".into(), cold_after.as_secs_f64()),
            ("logq from snapshot".into(), snap_after.as_secs_f64()),
        ],
    )?;
    let ratio_rows: Vec<(String, f64, Option<f64>)> = vec![
        (
            "1. wasm / native fold".into(),
            wasm.median / native.median,
            Some(0.8),
        ),
        (
            "2. catch-up (2 lanes) / raw consumer".into(),
            caught[1].median / raw.median,
            Some(0.5),
        ),
        (
            "3. GET / tuned nginx".into(),
            idle.median / peer.median,
            Some(0.8),
        ),
        (
            "3. nginx p99 / logq p99, open loop".into(),
            nginx_p99.median / ours_p99.median,
            Some(1.0 / 1.5),
        ),
        (
            "4. answer size / plain RSS per user".into(),
            avg_answer / (memory.rss as f64 / memory.visible.max(1.0)),
            Some(1.0 / 1.5),
        ),
    ];
    report::ratios(&out.join("ratios.png"), &ratio_rows)?;
    let setup = format!(
        "Generated history: {} records ({} user events incl. duplicates, {} organization events), \
         {} user ids, seed {}, {avg_bytes} bytes an event on average. Broker: nisshi, memory storage, \
         `users` with {} partitions, on the same machine as the host and the load generators \
         (nothing is pinned: broker, host, wrk/oha and the producer share the {} cores). Release \
         build. Figures measured more than once show the median [min-max, n runs], the two sides \
         taking turns. Reads: ids drawn uniformly from all {} live users; wrk {} threads, {} \
         connections, {} s a run; oha {} connections, a fixed rate, the same for both: half the smaller wrk median, \
         latency counted from when each request was due; nginx serves a file per user (sendfile, \
         open_file_cache, keepalive_requests 1000000). During ingest a producer wrote the updates \
         among {} more generated user events (the host had consumed {consumed_during} user \
         records by the end). Command: `bench/run.sh --events {} --users {}`.",
        history.len(),
        history.users.len(),
        history.organizations.len(),
        args.users,
        args.seed,
        broker::USER_PARTITIONS,
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        paths.len(),
        reads::WRK_THREADS,
        reads::WRK_CONNECTIONS,
        args.wrk_secs,
        reads::OHA_CONNECTIONS,
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

/// Figure 4 at `--memory-users` ids (twice as many events) and figure 12 on the same
/// state: their rows, and the host and broker measured (figure 6b goes on with them).
fn big_memory(
    args: &Args,
    cache_arg: &str,
) -> anyhow::Result<(Row, Row, broker::CaughtUp, broker::Loaded)> {
    let big = history::generate(
        args.seed + 3,
        (args.memory_users * 2) as usize,
        args.memory_users,
    );
    let loaded_big = broker::load(&big);
    drop(big);
    let host = broker::start_host(
        &loaded_big,
        "bench-memory",
        &["--compile-cache-dir", cache_arg],
    );
    std::thread::sleep(Duration::from_secs(2));
    let m = measure_memory(&host.host)?;
    let answers = export_answers(&host.host)?;
    anyhow::ensure!(
        answers.len() as f64 == m.visible,
        "the export holds {} users, /metrics says {}",
        answers.len(),
        m.visible
    );
    let avg =
        answers.iter().map(|(_, a)| a.len()).sum::<usize>() as f64 / answers.len().max(1) as f64;
    say(format!(
        "  RSS {} MiB for {} live users",
        m.rss >> 20,
        m.visible
    ));
    let listing = listing_row(&host.host, &answers)?;
    say(format!("{}: {}", listing.figure, listing.ours));
    drop(answers);
    Ok((m.row(avg), listing, host, loaded_big))
}

/// Figure 12: pages of `GET /users` on a large state: 20 pages of 100 after cursors
/// spread over the ids, and 20 of one organization's users.
fn listing_row(host: &logq_e2e::Host, answers: &[(String, Vec<u8>)]) -> anyhow::Result<Row> {
    let mut ids: Vec<&str> = answers.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    let name = answers
        .iter()
        .find_map(|(_, a)| {
            let v: serde_json::Value = serde_json::from_slice(a).ok()?;
            v["organization_name"].as_str().map(str::to_owned)
        })
        .context("no user with an organization_name")?;
    let time = |path: &str| -> anyhow::Result<f64> {
        let start = Instant::now();
        let r = host.get(path);
        anyhow::ensure!(r.status == 200, "GET {path}: {}", r.status);
        anyhow::ensure!(r.body.contains("\"users\""), "GET {path}: {}", r.body);
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    let mut after = Vec::new();
    for i in 0..20 {
        let cursor = ids[i * ids.len() / 20];
        let path = format!(
            "/users?limit=100&after={}",
            logq_e2e::percent_encode(cursor)
        );
        after.push(time(&path)?);
    }
    let mut named = Vec::new();
    for _ in 0..20 {
        let path = format!(
            "/users?limit=100&organization={}",
            logq_e2e::percent_encode(&name)
        );
        named.push(time(&path)?);
    }
    let (after, named) = (Spread::of(&after), Spread::of(&named));
    Ok(Row {
        figure: format!(
            "12. A page of GET /users (100 users) at {} live users (ms)",
            answers.len()
        ),
        ours: format!(
            "after a cursor: p50 {:.2} ms (max {:.2}); of one organization: p50 {:.2} ms (max {:.2})",
            after.median, after.max, named.median, named.max
        ),
        peer: "none".into(),
        ratio: after.median,
        target: "reported (a page should cost the page, not the users kept)".into(),
        pass: None,
    })
}

/// What the memory figure reads from a caught-up host.
struct Memory {
    /// Resident set of the process, bytes.
    rss: u64,
    /// Live (visible) users.
    visible: f64,
    /// Users kept (live and tombstones).
    stored: f64,
    /// Bytes the users' store holds in all (chunks, slots, indexes); `None` from a
    /// build before the metric (comparing with an older binary).
    store_bytes: Option<f64>,
}

/// Plain RSS and the store's counts of `host`.
fn measure_memory(host: &logq_e2e::Host) -> anyhow::Result<Memory> {
    Ok(Memory {
        rss: broker::rss(host.pid())?,
        visible: broker::metric(host, "logq_users")?,
        stored: broker::metric(host, "logq_users_stored")?,
        store_bytes: broker::metric(host, "logq_user_store_bytes").ok(),
    })
}

impl Memory {
    /// The figure's row, given the average answer's size.
    fn row(&self, avg_answer: f64) -> Row {
        let per_user = self.rss as f64 / self.visible.max(1.0);
        // The store itself, as it counts what it holds.
        let store = self.store_bytes.map_or_else(
            || "not counted by this build".to_owned(),
            |b| {
                let per_user = b / self.visible.max(1.0);
                format!(
                    "{per_user:.0} B/user ({:.2}x)",
                    per_user / avg_answer.max(1.0)
                )
            },
        );
        Row {
            figure: format!(
                "4. Plain RSS per live user / answer size, {} live users",
                self.visible
            ),
            ours: format!(
                "{per_user:.0} B/user (RSS {} MiB, nothing subtracted; {} users stored); \
                 the store itself: {store}",
                self.rss >> 20,
                self.stored,
            ),
            peer: format!("the answer itself: {avg_answer:.0} B"),
            ratio: per_user / avg_answer,
            target: "<= 1.5 (lower is better)".into(),
            pass: Some(per_user / avg_answer <= 1.5),
        }
    }
}

/// Figure 10: a swap preview next to a replay (a rollback) of the same history.
/// Figure 11: three hosts sharing the partitions next to one holding everything.
fn cluster_row(loaded: &broker::Loaded, history: &history::History) -> anyhow::Result<Row> {
    let ids: Vec<String> = history
        .users
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .take(2_000)
        .collect();
    let c = cluster::run(loaded, 3, &ids, cluster::Input::Rekeyed)?;
    let keyed = cluster::run(loaded, 3, &ids, cluster::Input::Keyed)?;
    for line in c.bytes.iter().chain(&keyed.bytes) {
        say(format!("  {line}"));
    }
    let ((lp50, lp99), (fp50, fp99)) = c.latencies();
    let max_rss = c.each_rss.iter().copied().max().unwrap_or(0);
    let per_host = max_rss as f64 / c.one_rss.max(1) as f64;
    Ok(Row {
        figure: format!(
            "11. {} hosts sharing the partitions (--sharded) vs one holding all: memory per host, GET forwarded vs local",
            c.hosts
        ),
        ours: format!(
            "with the re-key stage: RSS per host {:?} MiB ({per_host:.2} of one); ready in {:.1} s (with --keyed-input, no stage: {:.1} s, RSS {:?} MiB); GET local p50/p99 {lp50:.2}/{lp99:.2} ms ({}), forwarded {fp50:.2}/{fp99:.2} ms ({}): p99 +{:.2} ms; {} tries answered 503 (a partition still moving) and were retried",
            c.each_rss.iter().map(|b| b >> 20).collect::<Vec<_>>(),
            c.all_ready,
            keyed.all_ready,
            keyed.each_rss.iter().map(|b| b >> 20).collect::<Vec<_>>(),
            c.local_ms.len(),
            c.forwarded_ms.len(),
            fp99 - lp99,
            c.unavailable
        ),
        peer: format!(
            "one host: RSS {} MiB, ready in {:.1} s",
            c.one_rss >> 20,
            c.one_ready
        ),
        ratio: 1.0 / per_host.max(1e-9),
        target: "RSS per host <= 0.4 of one; forwarded p99 - local p99 <= 1 ms".into(),
        pass: Some(per_host <= 0.4 && fp99 - lp99 <= 1.0),
    })
}

/// Figure 11b: a host killed, its partitions read at the survivors until they are
/// held and caught up again, with one standby per partition and without.
fn failover_row(loaded: &broker::Loaded, history: &history::History) -> anyhow::Result<Row> {
    let ids: Vec<String> = history
        .users
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter(|e| e["event_type"] == "User Created")
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .take(2_000)
        .collect();
    let with = cluster::failover(loaded, 1, &ids)?;
    let without = cluster::failover(loaded, 0, &ids)?;
    let share = |f: &cluster::Failover| 100.0 * f.answered as f64 / f.reads.max(1) as f64;
    let say = |f: &cluster::Failover| {
        format!(
            "--standbys {}: held and caught up {:.1} s after the kill ({} of {} partitions moved to their standby); reads of its users meanwhile {:.1}% answered ({} of {}), longest run unanswered {:.2} s; not answered: {:?}",
            f.standbys,
            f.settled,
            f.promoted,
            f.moved,
            share(f),
            f.answered,
            f.reads,
            f.longest_gap,
            f.why
        )
    };
    Ok(Row {
        figure: "11b. One of 3 sharing hosts killed (SIGKILL, 2 s session timeout): its users read at the survivors until its partitions are held and caught up".into(),
        ours: say(&with),
        peer: say(&without),
        // The share answered with a standby (without one it can be 0: no ratio).
        ratio: share(&with) / 100.0,
        target: ">= 99.9% answered, no id unanswerable > 2 s with one standby; a moved partition ready from its standby vs a full replay, side by side".into(),
        pass: Some(share(&with) >= 99.9 && with.longest_gap <= 2.0),
    })
}

/// Figure 11c: partitions given to a host that has snapshots of them, against the
/// same host rebuilding them from the log.
fn restart_row(loaded: &broker::Loaded) -> anyhow::Result<Row> {
    let r = cluster::restart(loaded)?;
    Ok(Row {
        figure: format!(
            "11c. A sharing host holding all {} partitions (--state-dir) killed with SIGKILL and started again as the same member: start to ready (s)",
            r.partitions
        ),
        ours: format!(
            "{:.2} s, {} of {} partitions restored from its own snapshots",
            r.restored, r.from_snapshot, r.partitions
        ),
        peer: format!("{:.2} s rebuilt from the log (its first start)", r.rebuilt),
        ratio: r.rebuilt / r.restored.max(1e-9),
        target: "a moved partition ready from its snapshot <= 1 s for 100k users; reported beside a full replay".into(),
        pass: Some(r.restored <= 1.0 && r.from_snapshot == r.partitions),
    })
}

fn preview_row(s: &SwapMemory) -> Row {
    let rollback = Spread::of(&s.rollback_secs);
    Row {
        figure: format!(
            "10. Swap preview (mask-emails <-> default over the whole history, {} users): request to report (s)",
            s.users
        ),
        ours: format!(
            "{:.2} s; RSS with both states {} MiB; compared in {:.3} s off the loop, which stopped {:.3} s for the handover; {} answers would change",
            s.preview_secs,
            s.preview_rss >> 20,
            s.preview_compare_secs,
            s.preview_loop_secs,
            s.preview_changed
        ),
        peer: format!(
            "a rollback (replay) of the same history: {:.2} s [{:.2}-{:.2}, n={}]",
            rollback.median,
            rollback.min,
            rollback.max,
            s.rollback_secs.len()
        ),
        ratio: rollback.median / s.preview_secs.max(1e-9),
        target: "reported (no peer previews a swap)".into(),
        pass: None,
    }
}

/// RSS of a host before and after each of a run of rollbacks.
struct SwapMemory {
    users: f64,
    before: u64,
    after: Vec<u64>,
    /// What the users' store holds (`logq_user_store_bytes`) before, and after each
    /// rollback: the two reducers' states differ in size.
    store_before: f64,
    store_after: Vec<f64>,
    /// What the reducers' instance pool keeps resident in slots not in use
    /// (`logq_reducer_pool_resident_bytes`), before and after each rollback.
    pool_before: f64,
    pool_after: Vec<f64>,
    /// Seconds from each rollback's request to its `active`.
    rollback_secs: Vec<f64>,
    /// The preview after them: seconds to `previewed`, its report's RSS (both
    /// states held) and the loop's compare time, and the users it found changed.
    preview_secs: f64,
    preview_rss: u64,
    preview_compare_secs: f64,
    preview_loop_secs: f64,
    preview_changed: u64,
}

impl SwapMemory {
    /// Figure 9. The rollbacks alternate: the odd ones (1st, 3rd, ...) go back to the
    /// default reducer, whose states the RSS before was measured with; the even ones
    /// to mask-emails, whose states are larger (its kit keeps a second copy of each
    /// answer). The ratio compares like with like: the last rollback to the default
    /// reducer over the RSS before. Every rollback's RSS is shown, with its store.
    fn row(&self) -> Row {
        let mib = |b: u64| b >> 20;
        let same = self
            .after
            .iter()
            .step_by(2)
            .next_back()
            .copied()
            .unwrap_or(u64::MAX);
        let m = |b: f64| b / f64::from(1 << 20);
        let each = self
            .after
            .iter()
            .zip(self.store_after.iter().zip(&self.pool_after))
            .map(|(r, (s, p))| format!("{} ({:.0}, {:.0})", mib(*r), m(*s), m(*p)))
            .collect::<Vec<_>>()
            .join(", ");
        Row {
            figure: format!(
                "9. RSS after 10 rollbacks / before them, the same reducer's states ({} users)",
                self.users
            ),
            ours: format!(
                "before {} MiB (store {:.0} MiB, reducer pool {:.0} MiB); after each, RSS \
                 (store, pool) in MiB: {each}; the odd rollbacks return to the default \
                 reducer, the even ones to mask-emails, whose states are larger",
                mib(self.before),
                m(self.store_before),
                m(self.pool_before),
            ),
            peer: "none".into(),
            ratio: same as f64 / self.before.max(1) as f64,
            target: "<= 1.2".into(),
            pass: Some(same as f64 <= 1.2 * self.before as f64),
        }
    }
}

/// Starts a host on `loaded`, swaps the mask reducer in (forward), then rolls back
/// `n` times (each a replay of the whole history), measuring RSS before the first and
/// after each, once it is done.
fn swap_memory(loaded: &broker::Loaded, cache_arg: &str, n: usize) -> anyhow::Result<SwapMemory> {
    const TOKEN: &str = "bench-swaps";
    let host = broker::start_host(
        loaded,
        "bench-swaps",
        &["--compile-cache-dir", cache_arg, "--admin-token", TOKEN],
    );
    let host = &host.host;
    std::thread::sleep(Duration::from_secs(2));
    let users = broker::metric(host, "logq_users")?;
    let before = broker::rss(host.pid())?;
    // 0 from a build without the metric (comparing with an older binary).
    let store_bytes = || broker::metric(host, "logq_user_store_bytes").unwrap_or(0.0);
    let pool_bytes = || broker::metric(host, "logq_reducer_pool_resident_bytes").unwrap_or(0.0);
    let (store_before, pool_before) = (store_bytes(), pool_bytes());
    let (mut store_after, mut pool_after) = (Vec::new(), Vec::new());
    let mask = std::fs::read(logq_e2e::component("mask-emails-reducer.wasm"))?;
    let r = host.admin("PUT", "/admin/reducer?mode=forward", Some(TOKEN), &mask);
    anyhow::ensure!(r.status == 200, "forward swap: {} {}", r.status, r.body);
    let mut after = Vec::new();
    let mut rollback_secs = Vec::new();
    // Waits for swap `id` to end as `want`; the entry as it ended.
    let wait = |id: &serde_json::Value, want: &str| -> anyhow::Result<serde_json::Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(600);
        loop {
            let d = host.admin("GET", "/admin/reducer", Some(TOKEN), b"").json();
            let entry = d["history"]
                .as_array()
                .and_then(|h| h.iter().find(|e| e["id"] == *id))
                .cloned()
                .unwrap_or_default();
            match entry["outcome"].as_str() {
                Some(o) if o == want => return Ok(entry),
                Some("failed" | "cancelled" | "superseded" | "rejected") => {
                    anyhow::bail!("swap {id} ended {}: {d}", entry["outcome"])
                }
                _ => {}
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "swap {id} did not end"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    for _ in 0..n {
        let asked = std::time::Instant::now();
        let r = host.admin("POST", "/admin/reducer/rollback", Some(TOKEN), b"");
        anyhow::ensure!(r.status == 202, "rollback: {} {}", r.status, r.body);
        wait(&r.json()["swap"]["id"], "active")?;
        rollback_secs.push(asked.elapsed().as_secs_f64());
        after.push(broker::rss(host.pid())?);
        store_after.push(store_bytes());
        pool_after.push(pool_bytes());
    }
    // A preview of the other reducer than the one active now (the mask reducer after
    // an even number of rollbacks, the default one after an odd number), so that
    // the report has answers to change.
    let other = if n.is_multiple_of(2) {
        std::fs::read(logq_e2e::component("reducer.wasm"))?
    } else {
        mask.clone()
    };
    let asked = std::time::Instant::now();
    let r = host.admin("PUT", "/admin/reducer?mode=preview", Some(TOKEN), &other);
    anyhow::ensure!(r.status == 202, "preview: {} {}", r.status, r.body);
    let entry = wait(&r.json()["swap"]["id"], "previewed")?;
    let preview_secs = asked.elapsed().as_secs_f64();
    let report = &entry["preview"];
    Ok(SwapMemory {
        users,
        before,
        after,
        store_before,
        store_after,
        pool_before,
        pool_after,
        rollback_secs,
        preview_secs,
        preview_rss: report["rss_bytes"].as_u64().unwrap_or(0),
        preview_compare_secs: report["compare_seconds"].as_f64().unwrap_or(0.0),
        preview_loop_secs: report["loop_seconds"].as_f64().unwrap_or(0.0),
        preview_changed: report["users"]["changed"].as_u64().unwrap_or(0),
    })
}

/// `--catch-up-compare`: see there.
fn catch_up_compare(
    args: &Args,
    work: &std::path::Path,
    history: &history::History,
) -> anyhow::Result<()> {
    let loaded = broker::load(history);
    let cache = work.join("compile-cache");
    let cache = cache.to_string_lossy();
    // Compiles the reducer into the cache, as the suite's cold start does.
    drop(broker::start_host(
        &loaded,
        "compare-cold",
        &["--compile-cache-dir", &cache],
    ));
    let rate = |d: Duration| loaded.records as f64 / d.as_secs_f64();
    let mut runs = [(); 3].map(|()| Vec::new());
    for run in 0..args.runs.max(1) {
        runs[0].push(rate(broker::raw_consumer(&loaded)?.0));
        for (i, side) in ["a", "b"].into_iter().enumerate() {
            let host = broker::start_host(
                &loaded,
                &format!("compare-{side}-{run}"),
                &["--compile-cache-dir", &cache],
            );
            runs[i + 1].push(rate(host.ready_after));
        }
        say(format!(
            "  round {run}: plain {:.1}k, a {:.1}k, b {:.1}k events/s",
            runs[0][run] / 1e3,
            runs[1][run] / 1e3,
            runs[2][run] / 1e3
        ));
    }
    let [plain, a, b] = runs.map(|r| Spread::of(&r));
    say(format!(
        "plain {}; a {} ({:.2}); b {} ({:.2}); b / a {:.3}",
        plain.show(),
        a.show(),
        a.median / plain.median,
        b.show(),
        b.median / plain.median,
        b.median / a.median
    ));
    Ok(())
}

/// `--reads-only`: the closed-loop reads of figure 3 alone, on a host that has
/// caught up on the history, logq and nginx in turn.
fn reads_only(
    args: &Args,
    work: &std::path::Path,
    history: &history::History,
) -> anyhow::Result<()> {
    let loaded = broker::load(history);
    let cache = work.join("compile-cache");
    let host = broker::start_host(
        &loaded,
        "bench-reads",
        &["--compile-cache-dir", &cache.to_string_lossy()],
    );
    let answers = export_answers(&host.host)?;
    let paths: Vec<String> = answers
        .iter()
        .map(|(id, _)| format!("/users/{id}"))
        .collect();
    let script = reads::script(work, &paths)?;
    let nginx = reads::Nginx::start(work, &answers)?;
    for _ in 0..args.runs.max(1) {
        let ours = reads::wrk(host.host.addr.port(), &script, args.wrk_secs)?;
        let peer = reads::wrk(nginx.port, &script, args.wrk_secs)?;
        say(format!(
            "  logq {:.0} req/s ({} errors, p99 {:.2} ms); nginx {:.0} req/s; ratio {:.2}",
            ours.rps,
            ours.errors,
            ours.p99_ms,
            peer.rps,
            ours.rps / peer.rps
        ));
    }
    Ok(())
}

/// Every live user's answer as the host serves it, (id, bytes), from one export.
fn export_answers(host: &logq_e2e::Host) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let r = host.get("/export");
    anyhow::ensure!(r.status == 200, "GET /export: {}", r.status);
    let mut out = Vec::new();
    let mut ended = false;
    for line in r.body.lines() {
        if let Some(answer) = line
            .strip_prefix("{\"user\":")
            .and_then(|l| l.strip_suffix('}'))
        {
            let v: serde_json::Value = serde_json::from_str(answer)?;
            let id = v["id"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("an exported user without an id: {answer}"))?;
            out.push((id.to_owned(), answer.as_bytes().to_vec()));
        } else if line.starts_with("{\"end\":") {
            ended = true;
        }
    }
    anyhow::ensure!(ended, "the export did not end whole");
    Ok(out)
}

/// Figure 7 against `host`, with the suite's rate and duration.
fn figure7(
    args: &Args,
    host: &logq_e2e::Host,
    loaded: &broker::Loaded,
    ids: &[String],
) -> anyhow::Result<visible::Visible> {
    visible::run(
        host,
        &loaded.broker.bootstrap,
        ids,
        args.visible_rate,
        args.wrk_secs,
    )
}
