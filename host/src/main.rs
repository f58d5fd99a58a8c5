//! The `logq` binary: parses flags and hands over to the library.

use anyhow::Context as _;
use clap::Parser as _;
use logq::config::{Cli, Command, ReducerCommand};

fn main() -> anyhow::Result<()> {
    // Before the runtime starts any thread.
    logq::memory::tune_malloc();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Run(config) => {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("binding {}", config.listen))?;
            tracing::info!("HTTP on http://{}", listener.local_addr()?);
            logq::run(*config, listener, logq::shutdown_signal()).await
        }
        Command::Produce(config) => {
            let topic = config.topic.clone();
            let done =
                tokio::task::spawn_blocking(move || logq::cli::produce::run(&config)).await??;
            println!("produced {} records to {topic}", done.records);
            // For read-your-writes: GET ... -H "X-Logq-Min-Position: <this>".
            println!("position {}", done.position);
            Ok(())
        }
        Command::Dev(config) => logq::cli::dev::run(*config).await,
        Command::Explain(config) => {
            let text =
                tokio::task::spawn_blocking(move || logq::cli::explain::run(&config)).await??;
            print!("{text}");
            Ok(())
        }
        Command::Reducer(ReducerCommand::Check {
            file,
            limits,
            cache,
        }) => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let verdict = tokio::task::spawn_blocking(move || {
                logq::reducers::canary::check(&bytes, (&limits).into(), cache.dir())
            })
            .await?;
            verdict_out(&verdict)
        }
        Command::Reducer(ReducerCommand::Preview { file, host, token }) => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let entry = tokio::task::spawn_blocking(move || {
                logq::cli::preview::run(&host, &token, &bytes, logq::cli::preview::WAIT)
            })
            .await??;
            println!("{}", serde_json::to_string_pretty(&entry)?);
            Ok(())
        }
        Command::Reducer(ReducerCommand::New {
            name,
            lang,
            dir,
            sdk,
        }) => {
            let made = logq::cli::reducer::new(&name, lang, &dir, sdk.as_deref())?;
            println!("wrote {}", made.display());
            println!(
                "next: edit it, then `logq reducer build {}`",
                made.display()
            );
            Ok(())
        }
        Command::Reducer(ReducerCommand::Build {
            dir,
            out,
            limits,
            cache,
        }) => {
            let built = tokio::task::spawn_blocking(move || {
                logq::cli::reducer::build(&dir, out.as_deref(), (&limits).into(), cache.dir())
            })
            .await??;
            eprintln!(
                "built {} in {:.1} s",
                built.component.display(),
                built.build_seconds
            );
            verdict_out(&built.verdict)
        }
    }
}

/// Prints a hot-swap verdict as JSON; exits 1 when the reducer would be refused.
fn verdict_out(verdict: &logq::reducers::canary::Verdict) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(verdict)?);
    if !verdict.ok {
        std::process::exit(1);
    }
    Ok(())
}
