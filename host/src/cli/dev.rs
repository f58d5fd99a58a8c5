//! `logq dev`: the whole service with zero setup, on an in-memory development broker.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;

use super::produce::{KeyBy, parse_events};
use crate::broker::mock::DevBroker;
use crate::broker::producer::RecordProducer;
use crate::config::{Cli, Command, DevConfig, KafkaConfig, RunConfig};
use crate::reducers::canary::{SAMPLE_ORGANIZATIONS, SAMPLE_USERS};

/// Runs `logq dev` until Ctrl-C / SIGTERM.
///
/// # Errors
/// When the development broker cannot start, the port is taken, or `run` fails.
pub async fn run(dev: DevConfig) -> anyhow::Result<()> {
    let topics = ["users", "organizations", "users.dlq", "organizations.dlq"].map(String::from);
    let broker =
        DevBroker::start(&topics, dev.partitions).context("starting the development broker")?;
    let bootstrap = broker.bootstrap_servers();
    let kafka = KafkaConfig {
        brokers: bootstrap.clone(),
        extra: Vec::new(),
    };
    if !dev.no_sample_data {
        let producer = RecordProducer::new(&kafka)?;
        for (topic, text) in [
            ("users", SAMPLE_USERS),
            ("organizations", SAMPLE_ORGANIZATIONS),
        ] {
            for r in parse_events(text, &KeyBy::Default)? {
                producer.send(topic, r.key.as_deref(), &r.value, &[])?;
            }
        }
        producer.flush(Duration::from_secs(10))?;
    }
    let listen = dev.listen.to_string();
    let config = run_config(&bootstrap, &listen)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "binding {} (pass --listen to use another address)",
                config.listen
            )
        })?;
    let http = listener.local_addr()?;
    // The path of this very binary, so the line works without `logq` on PATH.
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "logq".into());
    println!(
        "\nlogq dev: IN-MEMORY DEVELOPMENT BROKER (librdkafka mock cluster) at {bootstrap}\n\
         \x20 everything is lost on exit; for development only, not for production.\n\
         \x20 topics: users, organizations (+ .dlq), {} partitions each{}\n\
         \x20 HTTP: http://{http}\n\n\
         try:\n\
         \x20 curl -s http://{http}/users/069feb770fe581acc9d3313d59780196\n\
         \x20 curl -s http://{http}/organizations/ff3959a49ac10fc70181bc00e308fbeb\n\
         \x20 curl -s http://{http}/readyz\n\
         \x20 echo '{{\"id\":\"42\",\"event_type\":\"User Created\",\"username\":\"Raiden\",\"organization_name\":\"FOXHOUND\",\"received_at\":\"2021-01-01 00:00:00\"}}' \\\n\
         \x20   | {exe} produce --brokers {bootstrap} --topic users\n\
         \x20 curl -s http://{http}/users/42\n",
        dev.partitions,
        if dev.no_sample_data {
            ""
        } else {
            "; sample data loaded"
        },
    );
    let result = crate::service::run(config, listener, crate::service::shutdown_signal()).await;
    drop(broker);
    result
}

/// The `run` configuration for the development broker, with every other setting at
/// its documented default (or its environment variable).
fn run_config(bootstrap: &str, listen: &str) -> anyhow::Result<RunConfig> {
    let cli = Cli::try_parse_from(["logq", "run", "--brokers", bootstrap, "--listen", listen])?;
    match cli.command {
        Command::Run(config) => Ok(*config),
        _ => anyhow::bail!("internal: `run` did not parse as run"),
    }
}
