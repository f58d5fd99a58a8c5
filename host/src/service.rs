//! `logq run` as a library call: builds every part, wires them in data-path order,
//! and runs until shutdown. The only module that knows all the others.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::broker::Topics;
use crate::broker::group::{Joining, Member};
use crate::broker::members::MembersLog;
use crate::cluster::Cluster;
use crate::config::RunConfig;
use crate::consumer::{Consumer, Sharing};
use crate::fold::{DEFAULT_REDUCER, Limits, Reducer, Runtime};
use crate::metrics::Metrics;
use crate::reducers::canary::canary;
use crate::reducers::replay::Setup;
use crate::reducers::{Active, Origin, Registry};
use crate::state::Writer;
use crate::{broker, http, reducers};

/// Longest the HTTP server waits for open connections after shutdown starts.
const HTTP_DRAIN: Duration = Duration::from_secs(5);

/// Runs the service until `shutdown` completes: loads the reducer, reads the topics
/// from a snapshot's offsets or the earliest into memory, follows them, and serves
/// HTTP on `listener`.
///
/// # Errors
/// When the reducer cannot be loaded, the Kafka clients cannot be created, or a task
/// dies. Bad records never end it.
pub async fn run(
    config: RunConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut config = config;
    // Before anything reads `users_topic`: with the stage, the hosts fold its output.
    let rekey = start_rekey(&mut config).await?;
    // Bad client settings (an unknown `-X KEY=VALUE`) end the process here, with
    // librdkafka's words as the error, before anything starts.
    let client = Consumer::client(&config)?;
    let runtime = Runtime::new(Limits::from(&config.limits), config.cache.dir())
        .context("creating the wasm runtime")?;
    let (reducer, startup_bytes) = load_reducer(&config, &runtime).await?;
    let (commands, command_rx) = std::sync::mpsc::channel();
    let topics = Topics::from(&config);
    let reads = http::Reads {
        topics: Topics::from(&config),
        wait_max: std::time::Duration::from_millis(config.read_wait_max_ms),
        stage: match &config.rekeyed_from {
            Some(from) => Some(Arc::new(broker::rekey::Written::new(
                &config.kafka,
                &config.rekey_group(),
                from,
                &config.users_topic,
            )?)),
            None => None,
        },
        tokens: Arc::default(),
    };
    // The consumer loop writes the store; everything else reads it.
    let writer = Writer::new_store();
    writer.set_retention(config.tombstone_retention.micros());
    let store = Arc::clone(writer.store());
    let registry = Arc::new(Registry::new(
        runtime,
        store.clone(),
        Arc::new(Active::new(reducer, Origin::Startup)),
        commands,
        Setup {
            kafka: config.kafka.clone(),
            group_id: config.group_id.clone(),
            topics,
            batch_max_records: config.batch_max_records,
            batch_max_bytes: config.batch_bytes(),
            time_limit: std::time::Duration::from_millis(config.limits.reducer_time_limit_ms),
            tombstone_retention_micros: config.tombstone_retention.micros(),
        },
    ));
    let metrics = Arc::new(Metrics::new(config.topics()));
    if let Some(rekey) = &rekey {
        metrics.show_rekey(rekey.stats());
    }
    let stop = Arc::new(AtomicBool::new(false));

    // Best effort, in the background: a slow or absent broker must not delay start-up.
    tokio::spawn(create_dead_letter_topics(config.clone()));

    let watcher = match (&config.reducer, config.watch_reducer) {
        (Some(path), true) => Some(
            reducers::watch::spawn(path.clone(), registry.clone(), stop.clone())
                .context("spawning the reducer watcher")?,
        ),
        _ => None,
    };
    let limits = http::ServerLimits {
        max_connections: config.http_max_connections.max(1),
        header_timeout: Duration::from_millis(config.http_header_timeout_ms.max(1)),
        max_header_bytes: config.http_max_header_bytes,
    };
    let status_topics = logq_abi::Source::ALL.map(|s| config.dead_letter_topic(s));
    // The group's adverts go on after the loop stops, while this host hands over.
    let members_stop = Arc::new(AtomicBool::new(false));
    let sharing = if config.sharded {
        Some(join_group(&config, members_stop.clone()).await?)
    } else {
        None
    };
    let cluster = sharing.as_ref().map(|(s, _)| s.cluster.clone());
    // Hosts that share partitions share their swaps too (see `http::group`).
    let control: Arc<dyn http::SwapControl> = match &cluster {
        Some(cluster) => {
            let group = http::group::GroupSwaps::new(
                registry.clone(),
                cluster.clone(),
                config.admin_token.clone(),
                &startup_bytes,
            );
            tokio::spawn(group.clone().follow(stop.clone()));
            group
        }
        None => registry.clone(),
    };
    drop(startup_bytes);
    let admin = http::Admin {
        control,
        token: config.admin_token.clone(),
        max_body_bytes: config.admin_max_body_bytes,
    };
    let mut consumer = Consumer::new(
        config,
        registry.clone(),
        writer,
        metrics.clone(),
        stop.clone(),
        command_rx,
    );
    let members_thread = match sharing {
        Some((sharing, thread)) => {
            consumer = consumer.with_sharing(sharing);
            if let Some(rekey) = &rekey {
                consumer = consumer.with_stage(rekey.stats());
            }
            Some(thread)
        }
        None => None,
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let consumer_thread = std::thread::Builder::new()
        .name("logq-consumer".into())
        .spawn(move || {
            let result = consumer.run(client);
            let _ = done_tx.send(());
            result
        })
        .context("spawning the consumer thread")?;

    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let api = http::Api {
        store,
        metrics,
        admin: Arc::new(admin),
        reads,
        status: Arc::new(http::StatusFeed::new(status_topics)),
        cluster: cluster.clone(),
    };
    let status = api.status.clone();
    let sampler = tokio::spawn(http::status::run(api.clone()));
    let routes = http::routes(api.clone());
    let server = tokio::spawn(http::serve(
        listener,
        routes,
        http::plain_reads(api),
        limits,
        async move {
            let _ = http_stop_rx.await;
        },
        HTTP_DRAIN,
    ));

    let mut done_rx = done_rx;
    let ended_alone = tokio::select! {
        () = shutdown => {
            tracing::info!("shutting down");
            false
        }
        _ = &mut done_rx => {
            tracing::error!("the consumer loop ended on its own");
            true
        }
    };
    // The consumer thread finishes the batch it is folding, then leaves.
    stop.store(true, Ordering::Relaxed);
    registry.cancel_replay();
    sampler.abort();
    if let Some(cluster) = &cluster {
        // Left the group with its last commit; the users of its partitions answer
        // from here until the hosts that took them have caught up.
        if !ended_alone {
            let _ = tokio::time::timeout(Duration::from_secs(30), &mut done_rx).await;
        }
        hand_over(cluster).await;
    }
    members_stop.store(true, Ordering::Relaxed);
    status.close();
    let _ = http_stop_tx.send(());
    if tokio::time::timeout(HTTP_DRAIN + Duration::from_secs(1), server)
        .await
        .is_err()
    {
        tracing::warn!("the HTTP server did not stop after {HTTP_DRAIN:?}");
    }
    let joined = tokio::task::spawn_blocking(move || {
        if let Some(w) = watcher {
            let _ = w.join();
        }
        let joined = consumer_thread.join();
        if let Some(m) = members_thread {
            let _ = m.join();
        }
        joined
    })
    .await
    .context("joining the consumer thread")?;
    // Leaves its group with its last commit (at most 10 s).
    drop(rekey);
    match joined {
        Ok(result) => result.map_err(|e| anyhow::anyhow!("the consumer loop stopped: {e}")),
        Err(_) => anyhow::bail!("the consumer thread panicked"),
    }
}

/// Longest a stopping host keeps answering for the partitions it gave up.
const HAND_OVER_MAX: Duration = Duration::from_secs(5);

/// Waits (at most [`HAND_OVER_MAX`]) until every partition this host gave up is
/// caught up at its new holder, answering for them meanwhile; at once when no other
/// host is there to take them.
async fn hand_over(cluster: &Cluster) {
    let started = std::time::Instant::now();
    loop {
        let _ = cluster.handed_over();
        if !cluster.lingers_any() || !cluster.has_peers() {
            return;
        }
        if started.elapsed() >= HAND_OVER_MAX {
            tracing::warn!("stopping before the hosts that took this host's partitions caught up");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `--sharded`: the members topic (created if missing), this host's view of the
/// group (kept current on a thread of its own until `stop`) and its membership.
async fn join_group(
    config: &RunConfig,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(Sharing, std::thread::JoinHandle<()>)> {
    let topic = config.members_topic();
    tokio::time::timeout(
        Duration::from_secs(15),
        broker::admin::create_topics(&config.kafka, &[(topic.clone(), 1)]),
    )
    .await
    .map_err(|_| anyhow::anyhow!("creating the members topic {topic}: the broker did not answer"))?
    .with_context(|| format!("creating the members topic {topic}"))?;
    let cluster = Cluster::new(&config.instance(), &config.advertised());
    cluster.set_max_standby_lag(config.max_standby_lag);
    let log = MembersLog::open(&config.kafka, &topic)?;
    let thread = cluster.run(log, stop);
    let (member, news) = Member::join(
        &config.kafka,
        &Joining {
            group: config.group_id.clone(),
            instance: config.instance(),
            topic: config.users_topic.clone(),
            session_timeout: Duration::from_millis(config.session_timeout_ms.max(1)),
        },
    )?;
    tracing::info!(
        "sharing the partitions of {} in group {} as {} ({})",
        config.users_topic,
        config.group_id,
        config.instance(),
        config.advertised()
    );
    Ok((
        Sharing::new(
            member,
            news,
            cluster,
            Duration::from_millis(config.session_timeout_ms.max(1)),
        )
        .with_standbys(config.standbys),
        thread,
    ))
}

/// `--sharded` without `--keyed-input`: creates `<group-id>.<users>.by-id` if missing (with
/// `--rekey-partitions`, else as many partitions as the users topic), starts this
/// host's member of the re-key stage (see [`broker::rekey`]), and points the fold at
/// the internal topic: from here on `users_topic` names it, and `rekeyed_from` the
/// topic the producers write.
async fn start_rekey(config: &mut RunConfig) -> anyhow::Result<Option<broker::rekey::Rekey>> {
    if !config.sharded || config.keyed_input {
        return Ok(None);
    }
    let from = config.users_topic.clone();
    // Named for the group (as Kafka Streams names its repartition topics): two groups
    // re-keying one users topic must not write into one internal topic.
    let to = format!("{}.{from}.by-id", config.group_id);
    let asked = Duration::from_secs(15);
    let partitions = match config.rekey_partitions {
        Some(n) => {
            anyhow::ensure!(n >= 1, "--rekey-partitions must be at least 1, got {n}");
            n
        }
        None => tokio::time::timeout(asked, broker::admin::partitions(&config.kafka, &from))
            .await
            .map_err(|_| {
                anyhow::anyhow!("reading the partitions of {from}: the broker did not answer")
            })?
            .with_context(|| format!("reading the partitions of {from}"))?
            .ok_or_else(|| anyhow::Error::from(broker::KafkaError::MissingTopic(from.clone())))?,
    };
    tokio::time::timeout(
        asked,
        broker::admin::create_topics(&config.kafka, &[(to.clone(), partitions)]),
    )
    .await
    .map_err(|_| anyhow::anyhow!("creating the re-keyed topic {to}: the broker did not answer"))?
    .with_context(|| format!("creating the re-keyed topic {to}"))?;
    let stage = broker::rekey::Rekey::start(
        &config.kafka,
        broker::rekey::Rekeying {
            group: config.rekey_group(),
            instance: config.instance(),
            from: from.clone(),
            to: to.clone(),
            dlq: config.dlq_topic(&from),
            session_timeout: Duration::from_millis(config.session_timeout_ms.max(1)),
        },
    )
    .context("starting the re-key stage")?;
    tracing::info!(
        "re-keying {from} into {to} (group {})",
        config.rekey_group()
    );
    config.users_topic = to;
    config.rekeyed_from = Some(from);
    Ok(Some(stage))
}

/// The start-up reducer, compiled and through its canary, and its bytes.
async fn load_reducer(config: &RunConfig, runtime: &Runtime) -> anyhow::Result<(Reducer, Vec<u8>)> {
    let bytes = match &config.reducer {
        Some(path) => tokio::fs::read(path)
            .await
            .with_context(|| format!("reading reducer {}", path.display()))?,
        None => DEFAULT_REDUCER.to_vec(),
    };
    let runtime = runtime.clone();
    let name = config.reducer.as_ref().map_or_else(
        || "built-in reducer".to_string(),
        |p| p.display().to_string(),
    );
    // Compiling takes a while; keep it off the async workers. The start-up reducer
    // passes the same canary as a hot swap: one that loops or traps on the sample data
    // is refused here, with the reason, instead of dead-lettering every record.
    let (reducer, bytes) = tokio::task::spawn_blocking(move || {
        let reducer = runtime.load(&bytes).map_err(anyhow::Error::from)?;
        canary(&reducer, &[]).map_err(|e| anyhow::anyhow!("canary failed: {e}"))?;
        anyhow::Ok((reducer, bytes))
    })
    .await
    .context("compiling the reducer")?
    .with_context(|| format!("loading {name}"))?;
    tracing::info!("reducer loaded: {name}");
    Ok((reducer, bytes))
}

/// Dead letters need somewhere to go: create the DLQ topics when the broker allows
/// it. A failure here is not fatal (the topics may be managed elsewhere); a dead
/// letter that cannot be delivered is logged and counted.
async fn create_dead_letter_topics(config: RunConfig) {
    let topics: Vec<(String, i32)> = logq_abi::Source::ALL
        .iter()
        .map(|s| (config.dead_letter_topic(*s), 1))
        .collect();
    match tokio::time::timeout(
        Duration::from_secs(15),
        broker::admin::create_topics(&config.kafka, &topics),
    )
    .await
    {
        Ok(Ok(())) => tracing::info!("dead-letter topics ready"),
        Ok(Err(e)) => tracing::warn!("dead-letter topics: {e}"),
        Err(_) => tracing::warn!("dead-letter topics: the broker did not answer in time"),
    }
}

/// Completes on Ctrl-C or SIGTERM (what container runtimes send).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
