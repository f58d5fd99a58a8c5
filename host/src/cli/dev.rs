//! `logq dev`: the whole service with zero setup, on an in-memory development broker.

use std::time::Duration;

use anyhow::Context as _;

use super::produce::{KeyBy, parse_events};
use crate::broker::mock::DevBroker;
use crate::broker::producer::RecordProducer;
use crate::config::{DevConfig, KafkaConfig};
use crate::reducers::canary::{SAMPLE_ORGANIZATIONS, SAMPLE_USERS};

/// Runs `logq dev` until Ctrl-C / SIGTERM.
///
/// # Errors
/// When the development broker cannot start, an address is taken, or `run` fails.
pub async fn run(dev: DevConfig) -> anyhow::Result<()> {
    let topics = ["users", "organizations", "users.dlq", "organizations.dlq"].map(String::from);
    let broker =
        DevBroker::start(&topics, dev.partitions).context("starting the development broker")?;
    let inner = broker.bootstrap_servers();
    // The mock cluster listens on a port of its own choosing; Kafka clients find it
    // through `--brokers` (127.0.0.1:9092 by default, the address `logq produce`
    // and `rpk` try first): the bootstrap connection is forwarded there, and the
    // broker's metadata then names its own address, also on this machine.
    let public = dev.run.kafka.brokers.clone();
    let kafka_listener = tokio::net::TcpListener::bind(public.as_str())
        .await
        .with_context(|| {
            format!(
                "the development broker's Kafka address {public} is taken or invalid \
                 (another broker there? pass --brokers 127.0.0.1:PORT to use another)"
            )
        })?;
    tokio::spawn(forward(kafka_listener, inner.clone()));
    let kafka = KafkaConfig {
        brokers: inner.clone(),
        extra: dev.run.kafka.extra.clone(),
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
    let mut config = dev.run;
    config.kafka = kafka;
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
    let admin = if config.admin_token.is_some() {
        "admin routes: on (the token given)"
    } else {
        "admin routes: off (pass --admin-token TOKEN or set LOGQ_ADMIN_TOKEN)"
    };
    println!(
        "\nlogq dev: IN-MEMORY DEVELOPMENT BROKER (librdkafka mock cluster) at {public}\n\
         \x20 everything is lost on exit; for development only, not for production.\n\
         \x20 topics: users, organizations (+ .dlq), {} partitions each{}\n\
         \x20 HTTP: http://{http}; {admin}\n\n\
         try:\n\
         \x20 curl -s http://{http}/users/069feb770fe581acc9d3313d59780196\n\
         \x20 curl -s http://{http}/organizations/ff3959a49ac10fc70181bc00e308fbeb\n\
         \x20 curl -s http://{http}/readyz\n\
         \x20 echo '{{\"id\":\"42\",\"event_type\":\"User Created\",\"username\":\"Raiden\",\"organization_name\":\"FOXHOUND\",\"received_at\":\"2021-01-01 00:00:00\"}}' \\\n\
         \x20   | {exe} produce --brokers {public} --topic users\n\
         \x20 curl -s http://{http}/users/42\n\
         \x20 rpk topic produce users --brokers {public}    # any Kafka client works\n",
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

/// Forwards every connection to `listener` to `to` (the mock cluster), both ways,
/// until the process ends.
async fn forward(listener: tokio::net::TcpListener, to: String) {
    loop {
        let (mut client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("development broker: accepting a Kafka client: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let to = to.clone();
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect(to.as_str()).await {
                Ok(mut broker) => {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                }
                Err(e) => tracing::warn!("development broker: forwarding {peer} to {to}: {e}"),
            }
        });
    }
}
