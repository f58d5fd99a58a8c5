//! Command-line and environment configuration, parsed once in `main` and passed down
//! by value. Every flag is also an environment variable. A leaf: it imports nothing
//! of the crate, so every module may read it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// `logq`: the latest joined state of every user, from a Kafka-API log, over HTTP.
#[derive(Debug, Parser)]
#[command(name = "logq", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume the topics, fold them with the reducer, serve the state over HTTP.
    Run(Box<RunConfig>),
    /// Produce events from a JSON array file or JSON lines (like `rpk topic produce`).
    Produce(ProduceConfig),
    /// Zero-setup demo: an in-memory development broker, the sample data, and `run`.
    Dev(Box<DevConfig>),
    /// Work with reducer components offline.
    #[command(subcommand)]
    Reducer(ReducerCommand),
    /// Why a user's (or an organization's) answer is what it is: which event set each
    /// field, from a running host (`GET /users/ID?explain=1`), as a table; with
    /// `--records`, the records themselves, read from the broker.
    Explain(ExplainConfig),
}

/// Everything `logq explain` needs.
#[derive(Debug, Clone, Args)]
pub struct ExplainConfig {
    /// The user id (or, with `--organization`, the organization key).
    pub id: String,
    /// Explain an organization instead of a user.
    #[arg(long)]
    pub organization: bool,
    /// The host, `http://HOST:PORT`.
    #[arg(long, env = "LOGQ_HOST", default_value = "http://127.0.0.1:8080")]
    pub host: String,
    /// Also print each cited record as it is in the log (read from `--brokers`).
    #[arg(long)]
    pub records: bool,
    /// The broker, for `--records`.
    #[command(flatten)]
    pub kafka: KafkaConfig,
}

/// `logq reducer ...`.
#[derive(Debug, Subcommand)]
pub enum ReducerCommand {
    /// Runs the same validation as a hot swap (compile, world, canary) and prints the
    /// verdict as JSON; exits 1 when the reducer would be refused.
    Check {
        /// The component (`.wasm`).
        file: PathBuf,
        /// Limits the canary runs under.
        #[command(flatten)]
        limits: LimitsConfig,
        /// Where compiled reducers are cached.
        #[command(flatten)]
        cache: CacheConfig,
    },
    /// Asks a running host what swapping FILE in would do to its answers: a preview
    /// (`PUT /admin/reducer?mode=preview`), waited for and printed as JSON; exits 1
    /// when the host refuses it or it ends without a report.
    Preview {
        /// The component (`.wasm`).
        file: PathBuf,
        /// The host, `http://HOST:PORT`.
        #[arg(long, env = "LOGQ_HOST", default_value = "http://127.0.0.1:8080")]
        host: String,
        /// Its admin token.
        #[arg(long, env = "LOGQ_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Writes a reducer project from a template that builds as it is.
    New {
        /// The project's name (and folder): lower-case letters, digits, '-', '_'.
        name: String,
        /// What to write it in.
        #[arg(long, value_enum, default_value = "rust")]
        lang: Lang,
        /// Where to create the project folder.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The `sdk/` folder of a logq checkout, for a Rust project (default: the
        /// checkout this binary was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Builds the project in DIR into `DIR/reducer.wasm` (Rust: cargo for wasm32 and
    /// component encoding; JavaScript: npm and ComponentizeJS), then runs the checks
    /// of `reducer check` and prints the verdict; exits 1 when it would be refused.
    Build {
        /// The project folder.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Where to write the component (default: `DIR/reducer.wasm`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Limits the canary runs under.
        #[command(flatten)]
        limits: LimitsConfig,
        /// Where compiled reducers are cached.
        #[command(flatten)]
        cache: CacheConfig,
    },
}

/// What a reducer project is written in (`logq reducer new --lang`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust, with `logq-reducer-sdk`.
    Rust,
    /// JavaScript, with `logq.js` and ComponentizeJS.
    Js,
}

/// How to reach the broker. Shared by every subcommand that talks to Kafka.
#[derive(Debug, Clone, Args)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    #[arg(long, env = "LOGQ_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Extra librdkafka settings, `key=value`, repeatable (e.g. `-X security.protocol=SASL_SSL`).
    /// From the environment: comma-separated.
    #[arg(short = 'X', value_name = "KEY=VALUE", env = "LOGQ_KAFKA_CONFIG", value_delimiter = ',', value_parser = parse_key_value)]
    pub extra: Vec<(String, String)>,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Everything `logq run` needs.
#[derive(Debug, Clone, Args)]
pub struct RunConfig {
    /// The broker.
    #[command(flatten)]
    pub kafka: KafkaConfig,
    /// Consumer group id. The host reads every partition itself (each replica holds the
    /// whole state); the group is used to commit progress so tools can show lag.
    #[arg(long, env = "LOGQ_GROUP_ID", default_value = "logq")]
    pub group_id: String,
    /// Topic of user events.
    #[arg(long, env = "LOGQ_USERS_TOPIC", default_value = "users")]
    pub users_topic: String,
    /// Topic of organization events.
    #[arg(
        long,
        env = "LOGQ_ORGANIZATIONS_TOPIC",
        default_value = "organizations"
    )]
    pub organizations_topic: String,
    /// Dead-letter topic of a topic: its name plus this suffix.
    #[arg(long, env = "LOGQ_DLQ_SUFFIX", default_value = ".dlq")]
    pub dlq_suffix: String,
    /// Reducer component (`.wasm`); the built-in default reducer when not given.
    #[arg(long, env = "LOGQ_REDUCER")]
    pub reducer: Option<PathBuf>,
    /// HTTP listen address.
    #[arg(long, env = "LOGQ_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Limits of every reducer call.
    #[command(flatten)]
    pub limits: LimitsConfig,
    /// Most records in one batch. Batches are sized to take an eighth of the reducer's
    /// time limit at the speed it folded the last one, within this bound; while
    /// following the topics live they hold what has arrived.
    // 65,536: a catch-up batch then holds more than one event of many entities, each
    // decoded, folded and rendered once per batch (1M events over 100k users: a
    // batch of 16,384 touches 15k users, one of 65,536 48k), and the lanes wait for
    // each other and for the loop thread a quarter as often. `logq-bench
    // --catch-up-compare`, 2 lanes, the sizes in turn, 3 rounds: 446-457k events/s
    // against 396-404k with 16,384 (0.52 of the plain consumer against 0.46);
    // 262,144 (with the bytes bound raised) gave 6% more again for four times the
    // buffers.
    #[arg(long, env = "LOGQ_BATCH_MAX_RECORDS", default_value_t = 65_536)]
    pub batch_max_records: usize,
    /// Most record bytes in one batch (a larger single record still goes alone); no
    /// more than a sixteenth of the reducer's memory limit either.
    #[arg(long, env = "LOGQ_BATCH_MAX_BYTES", default_value_t = 16 << 20)]
    pub batch_max_bytes: usize,
    /// Reducer instances folding one batch at once, each on its own thread (records
    /// go to a lane by a hash of their key). Default: the cores available. The state
    /// is the same whatever the number.
    #[arg(long, env = "LOGQ_FOLD_LANES", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub fold_lanes: Option<u16>,
    /// Bearer token for the admin endpoints (`/admin/...`). Without it they answer 403.
    #[arg(long, env = "LOGQ_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Largest reducer upload `PUT /admin/reducer` accepts, in bytes. 32 MiB: a
    /// JavaScript reducer carries its engine (about 12 MB).
    #[arg(long, env = "LOGQ_ADMIN_MAX_BODY_BYTES", default_value_t = 32 << 20)]
    pub admin_max_body_bytes: u64,
    /// Most HTTP connections open at once; more are answered 503 and closed.
    #[arg(long, env = "LOGQ_HTTP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub http_max_connections: usize,
    /// A client must send a request's headers within this many milliseconds (also
    /// the idle limit of a kept-alive connection); slower ones are disconnected.
    #[arg(long, env = "LOGQ_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_header_timeout_ms: u64,
    /// Largest request head (request line plus headers) in bytes; larger ones get 431.
    #[arg(long, env = "LOGQ_HTTP_MAX_HEADER_BYTES", default_value_t = 16 << 10)]
    pub http_max_header_bytes: usize,
    /// Watch the `--reducer` file and swap it in (forward mode) when it changes.
    #[arg(long, env = "LOGQ_WATCH_REDUCER", default_value_t = true, action = clap::ArgAction::Set)]
    pub watch_reducer: bool,
    #[command(flatten)]
    /// Where compiled reducers are cached.
    pub cache: CacheConfig,
    /// Directory for state snapshots; on start the newest valid one is loaded and the
    /// topics are read on from its offsets. Without it the state is rebuilt from the
    /// earliest offsets. With `--sharded`, a file per partition: a partition the group
    /// gives this host is restored from its own snapshot of it.
    #[arg(long, env = "LOGQ_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Seconds between snapshots (only with `--state-dir`; one is also written on exit).
    #[arg(long, env = "LOGQ_SNAPSHOT_INTERVAL_SECS", default_value_t = 30)]
    pub snapshot_interval_secs: u64,
    /// Longest a read that requires a position (`X-Logq-Min-Position`) waits for the
    /// state to reach it before answering 503, in milliseconds.
    #[arg(long, env = "LOGQ_READ_WAIT_MAX_MS", default_value_t = 2000)]
    pub read_wait_max_ms: u64,
    /// How long, in event time, a deleted user's tombstone is kept after its newest
    /// event (e.g. `7d`, `12h`; `never` keeps tombstones for ever). Measured against
    /// the newest event time folded, not the wall clock.
    #[arg(long, env = "LOGQ_TOMBSTONE_RETENTION", default_value = "7d", value_parser = parse_retention)]
    pub tombstone_retention: Retention,
    /// Share the users topic's partitions with the other hosts of `--group-id`
    /// through the broker's consumer group: each host folds and holds only the users
    /// of its partitions (organizations: all, on every host) and forwards a read of
    /// any other user to its holder. Users' events must be keyed by `id` with Kafka's
    /// (murmur2) partitioner, as `logq produce` and the Java clients do. Off: every
    /// host holds everything.
    #[arg(long, env = "LOGQ_SHARDED")]
    pub sharded: bool,
    /// With `--sharded`: the URL other hosts reach this one's HTTP API at (default:
    /// `http://` and `--listen`).
    #[arg(long, env = "LOGQ_ADVERTISE")]
    pub advertise: Option<String>,
    /// With `--sharded`: this host's stable member id (`group.instance.id`): a
    /// restart within the session timeout keeps its partitions (default: the
    /// advertised address).
    #[arg(long, env = "LOGQ_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// With `--sharded`: a host silent for this long is thought dead and its
    /// partitions go to the others.
    #[arg(long, env = "LOGQ_SESSION_TIMEOUT_MS", default_value_t = 6_000)]
    pub session_timeout_ms: u64,
    /// With `--sharded`: users' events are keyed by `id` with Kafka's (murmur2)
    /// partitioner already, as `logq produce` and the Java clients key them; the
    /// hosts read the users topic itself. Without it, a re-key stage puts each user's
    /// events into `<group-id>.<users-topic>.by-id` first and the hosts read that.
    #[arg(long, env = "LOGQ_KEYED_INPUT")]
    pub keyed_input: bool,
    /// With `--sharded` (and no `--keyed-input`): partitions of `<group-id>.<users-topic>.by-id`
    /// when this host creates it, which bounds how many hosts share the users
    /// (default: as many as the users topic has). An existing topic keeps its own.
    #[arg(long, env = "LOGQ_REKEY_PARTITIONS")]
    pub rekey_partitions: Option<i32>,
    /// With `--sharded`: how many other hosts also fold each partition, as
    /// standbys (chosen by rendezvous hash over the hosts): a read whose holder died
    /// is answered at once by one of them, and a partition the group moves to its
    /// standby is not folded again from its beginning. They commit nothing and send
    /// no dead letter until the partition is theirs.
    #[arg(long, env = "LOGQ_STANDBYS", default_value_t = 0)]
    pub standbys: usize,
    /// With `--standbys`: a standby answers only while at most this many records
    /// behind the partition's end (measured every second).
    #[arg(long, env = "LOGQ_MAX_STANDBY_LAG", default_value_t = 1000)]
    pub max_standby_lag: i64,
    /// Set by `run` in sharded mode with the re-key stage: the users topic the stage
    /// reads (`users_topic` then names the internal topic the hosts fold).
    #[arg(skip)]
    pub rekeyed_from: Option<String>,
}

impl RunConfig {
    /// With `--sharded`: where other hosts reach this one.
    pub fn advertised(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }

    /// With `--sharded`: this host's member id.
    pub fn instance(&self) -> String {
        self.instance_id.clone().unwrap_or_else(|| {
            self.advertised()
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .to_owned()
        })
    }

    /// With `--sharded`: the members topic of the group.
    pub fn members_topic(&self) -> String {
        format!("{}.members", self.group_id)
    }

    /// With `--sharded` and the re-key stage: the stage's consumer group.
    pub fn rekey_group(&self) -> String {
        format!("{}.rekey", self.group_id)
    }

    /// The bound on a batch's record bytes: `--batch-max-bytes`, and no more than a
    /// sixteenth of the reducer's memory limit (a batch's bytes are held by the
    /// reducer several times over: framed, decoded, with the prior and new states of
    /// its entities). 16 MiB under the default 256 MiB.
    pub fn batch_bytes(&self) -> usize {
        let share = self.limits.reducer_memory_mib.saturating_mul(1 << 20) / 16;
        self.batch_max_bytes
            .min(usize::try_from(share).unwrap_or(usize::MAX))
            .max(1)
    }

    /// `--fold-lanes`, or the cores available.
    pub fn lanes(&self) -> usize {
        self.fold_lanes.map_or_else(
            || std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            usize::from,
        )
    }
}

/// A tombstone retention in event time: `never`, or a duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(pub Option<std::time::Duration>);

impl Retention {
    /// In microseconds, 0 for never (what [`crate::state::Writer::set_retention`]
    /// takes).
    pub fn micros(self) -> i64 {
        self.0
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
    }
}

fn parse_retention(s: &str) -> Result<Retention, String> {
    if s.trim().eq_ignore_ascii_case("never") {
        return Ok(Retention(None));
    }
    match humantime::parse_duration(s.trim()) {
        Ok(d) if d.is_zero() => Err(
            "a retention of 0 would forget deletions at once: give a duration, or `never`".into(),
        ),
        Ok(d) => Ok(Retention(Some(d))),
        Err(e) => Err(format!("{e} (for example `7d`, `12h` or `never`)")),
    }
}

/// The on-disk cache of compiled reducers.
#[derive(Debug, Clone, Args)]
pub struct CacheConfig {
    /// Directory for compiled reducers, by sha256 (default: `$XDG_CACHE_HOME/logq` or
    /// `~/.cache/logq`).
    #[arg(long, env = "LOGQ_COMPILE_CACHE_DIR")]
    pub compile_cache_dir: Option<PathBuf>,
    /// Do not cache compiled reducers on disk.
    #[arg(long, env = "LOGQ_NO_COMPILE_CACHE")]
    pub no_compile_cache: bool,
}

impl CacheConfig {
    /// The cache directory to use, if any.
    pub fn dir(&self) -> Option<PathBuf> {
        if self.no_compile_cache {
            return None;
        }
        self.compile_cache_dir.clone().or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(base.join("logq"))
        })
    }
}

/// Limits of reducer calls, shared by `run` and `reducer check`.
#[derive(Debug, Clone, Args)]
pub struct LimitsConfig {
    /// Hard memory limit of one reducer instance, in MiB.
    #[arg(long, env = "LOGQ_REDUCER_MEMORY_MIB", default_value_t = 256)]
    pub reducer_memory_mib: u64,
    /// Hard time limit of one call into the reducer, in milliseconds.
    #[arg(long, env = "LOGQ_REDUCER_TIME_LIMIT_MS", default_value_t = 2000)]
    pub reducer_time_limit_ms: u64,
}

impl RunConfig {
    /// The topics consumed, users first.
    pub fn topics(&self) -> [&str; 2] {
        [&self.users_topic, &self.organizations_topic]
    }

    /// The dead-letter topic for `topic`.
    pub fn dlq_topic(&self, topic: &str) -> String {
        format!("{topic}{}", self.dlq_suffix)
    }

    /// The dead-letter topic of stream `source`: that of its topic, or for re-keyed
    /// users that of the users topic the producers write (both stages send there).
    pub fn dead_letter_topic(&self, source: logq_abi::Source) -> String {
        match (source, &self.rekeyed_from) {
            (logq_abi::Source::Users, Some(from)) => self.dlq_topic(from),
            (logq_abi::Source::Users, None) => self.dlq_topic(&self.users_topic),
            (logq_abi::Source::Organizations, _) => self.dlq_topic(&self.organizations_topic),
        }
    }
}

/// Everything `logq produce` needs.
#[derive(Debug, Clone, Args)]
pub struct ProduceConfig {
    /// The broker.
    #[command(flatten)]
    pub kafka: KafkaConfig,
    /// Topic to produce to.
    #[arg(long, short = 't', env = "LOGQ_TOPIC")]
    pub topic: String,
    /// File to read (a JSON array, or JSON values one after another such as JSON
    /// lines); standard input when absent or `-`.
    pub file: Option<PathBuf>,
    /// Field whose value keys each record. Default: `id`, else `organization_key`.
    #[arg(long, conflicts_with = "no_key")]
    pub key_field: Option<String>,
    /// Produce records without a key (as `rpk topic produce` does).
    #[arg(long)]
    pub no_key: bool,
    /// Produce each non-empty line as it is, without parsing it: for testing how the
    /// service handles bad records.
    #[arg(long)]
    pub raw_lines: bool,
}

/// Everything `logq dev` needs: the development broker's shape, and every flag of
/// `logq run` (admin token, reducer, limits, ...), which apply as they do there.
#[derive(Debug, Clone, Args)]
pub struct DevConfig {
    /// Partitions per topic on the development broker.
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    /// Start with empty topics instead of the sample data.
    #[arg(long)]
    pub no_sample_data: bool,
    /// The service's settings, as `logq run` takes them. `--brokers` is where the
    /// development broker listens for Kafka clients (`logq produce`, `rpk`): one
    /// `host:port`, `127.0.0.1:9092` by default.
    #[command(flatten)]
    pub run: RunConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_passthrough_parses_and_rejects_junk() {
        let cli = Cli::try_parse_from([
            "logq",
            "run",
            "-X",
            "security.protocol=SASL_SSL",
            "-X",
            "sasl.password=a=b",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(
            run.kafka.extra,
            [
                ("security.protocol".to_string(), "SASL_SSL".to_string()),
                ("sasl.password".to_string(), "a=b".to_string())
            ]
        );
        assert!(Cli::try_parse_from(["logq", "run", "-X", "novalue"]).is_err());
        assert_eq!(run.dlq_topic("users"), "users.dlq");
    }

    #[test]
    fn tombstone_retention_is_a_duration_or_never() {
        assert_eq!(
            parse_retention("7d").unwrap().micros(),
            7 * 86_400 * 1_000_000
        );
        assert_eq!(parse_retention("90s").unwrap().micros(), 90_000_000);
        assert_eq!(parse_retention("never").unwrap(), Retention(None));
        assert_eq!(parse_retention("never").unwrap().micros(), 0);
        assert!(parse_retention("0s").unwrap_err().contains("never"));
        assert!(parse_retention("soon").unwrap_err().contains("7d"));
    }

    fn run(args: &[&str]) -> RunConfig {
        let cli = Cli::try_parse_from(["logq", "run"].iter().chain(args)).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        *run
    }

    #[test]
    fn batch_bytes_are_bounded_by_the_memory_limit_and_lanes_by_the_range() {
        assert_eq!(run(&[]).batch_bytes(), 16 << 20);
        assert_eq!(run(&["--reducer-memory-mib", "64"]).batch_bytes(), 4 << 20);
        assert_eq!(run(&["--batch-max-bytes", "1000"]).batch_bytes(), 1000);
        assert_eq!(run(&["--fold-lanes", "3"]).lanes(), 3);
        assert!(run(&[]).lanes() >= 1);
        assert!(Cli::try_parse_from(["logq", "run", "--fold-lanes", "0"]).is_err());
        assert!(Cli::try_parse_from(["logq", "run", "--fold-lanes", "65"]).is_err());
    }

    #[test]
    fn dev_takes_the_flags_of_run() {
        let cli = Cli::try_parse_from([
            "logq",
            "dev",
            "--admin-token",
            "x",
            "--reducer",
            "r.wasm",
            "--partitions",
            "2",
            "--listen",
            "127.0.0.1:1",
        ])
        .unwrap();
        let Command::Dev(dev) = cli.command else {
            panic!("not dev")
        };
        assert_eq!(dev.run.admin_token.as_deref(), Some("x"));
        assert_eq!(dev.run.reducer, Some(PathBuf::from("r.wasm")));
        assert_eq!(dev.partitions, 2);
        assert_eq!(dev.run.listen.port(), 1);
    }

    #[test]
    fn produce_key_options_conflict() {
        assert!(
            Cli::try_parse_from([
                "logq",
                "produce",
                "-t",
                "u",
                "--no-key",
                "--key-field",
                "id"
            ])
            .is_err()
        );
    }
}
