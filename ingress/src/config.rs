//! The `keel` command line: one config per command, from flags and environment, parsed once.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "keel",
    version,
    about = "Keel: an invariant-validating, single-writer transaction platform"
)]
pub struct Cli {
    /// Log lines on stderr as text (for people; colours only on a terminal) or JSON (one object
    /// per line, for log shippers).
    #[arg(long, global = true, env = "KEEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How `keel` writes its log lines (`--log-format`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the HTTP API over the store in --data.
    Serve(ServeConfig),
    /// Prove the store in --data is what its committed log says and that every invariant holds.
    Audit(crate::audit_cmd::AuditArgs),
    /// Project the batches published to NATS JetStream into MongoDB (docs/PROJECTION.md).
    Project(ProjectArgs),
    /// Print the OpenAPI 3.1 document of the HTTP API (docs/openapi.json) on stdout.
    Openapi,
    /// Manage the API keys `keel serve --auth-keys` accepts (docs/API.md, "Authentication").
    Keys(crate::keys_cmd::KeysArgs),
    /// Rewrite a store of an older format (1) in the current format (2), keeping the old one
    /// as DIR.v1 (docs/FORMAT.md, "Upgrading from format 1").
    Upgrade(UpgradeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct UpgradeArgs {
    /// Data directory of the store to upgrade (stopped: no server may hold it).
    #[arg(long, env = "KEEL_DATA")]
    pub data: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct ServeConfig {
    /// Data directory of the RocksDB store (created if missing).
    #[arg(long, env = "KEEL_DATA", default_value = "./data")]
    pub data: PathBuf,
    /// Address to listen on. Without --auth-keys only a loopback address is accepted, unless
    /// --insecure-listen-any says otherwise.
    #[arg(long, env = "KEEL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// API key file (`keel keys add`): every route but the health checks and the OpenAPI
    /// document then needs `Authorization: Bearer <key>` with the route's scope. Reloaded on
    /// SIGHUP.
    #[arg(long, env = "KEEL_AUTH_KEYS")]
    pub auth_keys: Option<PathBuf>,
    /// Listen on a non-loopback address without --auth-keys: anyone who reaches the port may
    /// write. Must be said explicitly.
    #[arg(long, env = "KEEL_INSECURE_LISTEN_ANY")]
    pub insecure_listen_any: bool,
    /// PEM certificate chain: serve HTTPS instead of HTTP (with --tls-key). Reloaded on SIGHUP.
    #[arg(long, env = "KEEL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "KEEL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A domain definition file (TOML with CEL expressions, docs/DOMAINS.md) to decide commands
    /// under besides the built-in domains; repeat the flag for more (the environment variable
    /// takes a comma-separated list). The files' text is recorded in the log.
    #[arg(long = "domain", env = "KEEL_DOMAINS", value_delimiter = ',')]
    pub domains: Vec<PathBuf>,
    /// Most commands per request, and per batch (one fsync).
    #[arg(long, env = "KEEL_BATCH_ITEMS_MAX", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_items_max: u32,
    /// Most requests waiting for the writer; more are refused with 503 and Retry-After.
    #[arg(long, env = "KEEL_QUEUE_DEPTH_MAX", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_depth_max: u32,
    /// Most commands waiting for the writer, over all queued requests.
    #[arg(long, env = "KEEL_QUEUE_ITEMS_MAX", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_items_max: u32,
    /// How long the writer waits for more requests before committing a batch, in microseconds.
    #[arg(long, env = "KEEL_LINGER_US", default_value_t = 0)]
    pub linger_us: u64,
    /// A checkpoint of state and command ids is written (in the background, off the commit
    /// path) after this many committed batches ...
    #[arg(long, env = "KEEL_CHECKPOINT_EVERY_BATCHES", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub checkpoint_every_batches: u64,
    /// ... or this many milliseconds after the previous one, whichever comes first.
    #[arg(long, env = "KEEL_CHECKPOINT_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub checkpoint_interval_ms: u64,
    /// Most aggregates plus command ids changed and not yet checkpointed; at this many the
    /// writer waits for the checkpoint in flight (bounds the memory of recent changes).
    #[arg(long, env = "KEEL_CHECKPOINT_PENDING_MAX", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub checkpoint_pending_max: u64,
    /// A checkpoint with at least this many command ids writes them as one sorted table file
    /// that RocksDB ingests (no memtable insert or write-ahead-log byte per id); one with fewer
    /// writes them through the memtable with its states (docs/FORMAT.md, "What a checkpoint
    /// writes").
    #[arg(long, env = "KEEL_CHECKPOINT_INGEST_IDS_MIN", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub checkpoint_ingest_ids_min: u64,
    /// Most aggregates the writer keeps in memory once a checkpoint holds them. A store with
    /// more runs too: a batch's missing aggregates are read from the checkpoint in one
    /// multi-get before it is decided (aggregates changed since the last checkpoint stay in
    /// memory besides, at most --checkpoint-pending-max).
    #[arg(long, env = "KEEL_CACHE_AGGREGATES_MAX", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub cache_aggregates_max: u64,
    /// Largest request body in bytes; larger bodies get 413.
    #[arg(long, env = "KEEL_BODY_BYTES_MAX", default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    pub body_bytes_max: u64,
    /// Most request bodies read and parsed at once; a request waits up to 1 s for a slot, then
    /// gets 503. Worst-case parse memory is about this many times 2 x --body-bytes-max.
    #[arg(long, env = "KEEL_PARSE_CONCURRENCY_MAX", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub parse_concurrency_max: u32,
    /// How long reading one request body may take, in milliseconds; slower bodies get 408.
    #[arg(long, env = "KEEL_BODY_READ_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_read_timeout_ms: u64,
    /// How long a connection may take to send a request's headers, in milliseconds (also how
    /// long an idle keep-alive connection stays open); then it is closed.
    #[arg(long, env = "KEEL_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_ms: u64,
    /// Most open client connections; a connection over the bound is closed at once.
    #[arg(long, env = "KEEL_CONNECTIONS_MAX", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections_max: u32,
    /// Most store reads (GET aggregates, events, batches) at once; more get 503 at once.
    #[arg(long, env = "KEEL_READ_CONCURRENCY_MAX", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub read_concurrency_max: u32,
    /// How long a store read may take before it is answered 503 `read_timeout`, in milliseconds.
    #[arg(long, env = "KEEL_READ_TIMEOUT_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub read_timeout_ms: u64,
    /// On SIGTERM, how long open connections may take to finish their requests, in seconds;
    /// then they are closed and the store is shut down.
    #[arg(long, env = "KEEL_SHUTDOWN_DRAIN_SECS", default_value_t = 10)]
    pub shutdown_drain_secs: u64,
    /// Most live subscriptions (`GET /v1/subscribe`) open at once; more get 503 `overloaded`.
    #[arg(long, env = "KEEL_SUBSCRIBERS_MAX", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub subscribers_max: u32,
    /// Deliveries waiting to be sent to one subscriber (each one committed batch, or several
    /// consecutive ones of at most 16,384 events together when the fan-out is paced); a
    /// subscriber that falls further behind is ended with a `resume` event (`too_slow`) and
    /// resumes from where it was.
    #[arg(long, env = "KEEL_SUBSCRIBER_BUFFER_BATCHES", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub subscriber_buffer_batches: u32,
    /// Most subscriber wake-ups per second, over all subscribers. After handing out batches to
    /// `n` subscribers, the fan-out waits `n / this` seconds before the next hand-out, and the
    /// batches committed meanwhile go out together: a wide fan-out coalesces batches instead of
    /// taking the write path's CPU. Raise it on a machine with more cores.
    #[arg(long, env = "KEEL_SUBSCRIBER_WAKEUPS_PER_SEC", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub subscriber_wakeups_per_sec: u32,
    /// CPU niceness of the threads that serve live subscriptions (the subscription lane), from
    /// 0 (the same priority as writes) to 19 (the lowest). Above 0, a CPU-bound write load runs
    /// first and subscribers fall behind instead (never losing an event); 0 shares the CPU.
    #[arg(long, env = "KEEL_SUBSCRIBER_NICE", default_value_t = 19, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub subscriber_nice: i32,
    /// NATS server URL; when set, every committed batch is published to JetStream.
    #[arg(long, env = "KEEL_NATS_URL")]
    pub nats_url: Option<String>,
    /// JetStream stream the batches are published to (created or updated on start).
    #[arg(long, env = "KEEL_NATS_STREAM", default_value = "KEEL")]
    pub nats_stream: String,
    /// Subject of the batch messages.
    #[arg(long, env = "KEEL_NATS_SUBJECT", default_value = "keel.batches")]
    pub nats_subject: String,
    /// Most publishes awaiting their JetStream ack at once.
    #[arg(long, env = "KEEL_PUBLISH_INFLIGHT_MAX", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub publish_inflight_max: u32,
    /// How long the stream keeps a batch (at least 2 minutes, its duplicate window); applied to
    /// the stream at every start.
    #[arg(long, env = "KEEL_NATS_STREAM_MAX_AGE", default_value = "7days", value_parser = parse_stream_age)]
    pub nats_stream_max_age: Duration,
    /// The stream's size bound, e.g. `4GiB`, `512MiB` or bytes (at least 64MiB, its largest
    /// message); JetStream reserves it from the server's `max_file_store`.
    #[arg(long, env = "KEEL_NATS_STREAM_MAX_BYTES", default_value = "4GiB", value_parser = parse_stream_bytes)]
    pub nats_stream_max_bytes: i64,
}

fn parse_stream_age(text: &str) -> Result<Duration, String> {
    let age = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if age < keel_projection::nats::DUPLICATE_WINDOW {
        return Err(format!(
            "{text} is shorter than the stream's duplicate window ({} s)",
            keel_projection::nats::DUPLICATE_WINDOW.as_secs()
        ));
    }
    Ok(age)
}

/// A byte size: digits with an optional `KiB`, `MiB`, `GiB` or `TiB`.
fn parse_stream_bytes(text: &str) -> Result<i64, String> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let shift = match &text[digits.len()..] {
        "" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        unit => {
            return Err(format!(
                "unknown unit `{unit}` (use KiB, MiB, GiB, TiB or bytes)"
            ));
        }
    };
    let number: i64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 4GiB"))?;
    let bytes = number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text} is too large"))?;
    let least = i64::from(keel_projection::nats::STREAM_MAX_MESSAGE_BYTES);
    if bytes < least {
        return Err(format!(
            "{text} is below the stream's largest message ({} MiB)",
            least >> 20
        ));
    }
    Ok(bytes)
}

impl ServeConfig {
    /// Refuses a listen address that exposes an unauthenticated server to the network, unless
    /// that was asked for.
    pub fn check_exposure(&self) -> anyhow::Result<()> {
        if self.auth_keys.is_none() && !self.listen.ip().is_loopback() && !self.insecure_listen_any
        {
            anyhow::bail!(
                "--listen {} is not a loopback address and no --auth-keys is given: anyone who \
                 reaches the port could write. Give --auth-keys FILE (see `keel keys add`), or \
                 --insecure-listen-any to serve without authentication on purpose",
                self.listen
            );
        }
        Ok(())
    }

    /// Reads and compiles every `--domain` file; an error names the file, line and problem.
    pub fn load_domains(&self) -> anyhow::Result<keel_invariants::declared::DomainSet> {
        let mut files = Vec::with_capacity(self.domains.len());
        for path in &self.domains {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading domain file {}", path.display()))?;
            files.push((path.display().to_string(), text));
        }
        Ok(keel_invariants::declared::DomainSet::load(&files)?)
    }

    pub fn sequencer(
        &self,
        domains: std::sync::Arc<keel_invariants::declared::DomainSet>,
    ) -> keel_sequencer::Config {
        keel_sequencer::Config {
            domains,
            batch_items_max: self.batch_items_max as usize,
            queue_depth_max: self.queue_depth_max as usize,
            queue_items_max: (self.queue_items_max as usize).max(self.batch_items_max as usize),
            linger: Duration::from_micros(self.linger_us),
            checkpoint_every_batches: self.checkpoint_every_batches,
            checkpoint_interval: Duration::from_millis(self.checkpoint_interval_ms),
            checkpoint_pending_max: self.checkpoint_pending_max as usize,
            cache_aggregates_max: usize::try_from(self.cache_aggregates_max).unwrap_or(usize::MAX),
            checkpoint_ingest_ids_min: usize::try_from(self.checkpoint_ingest_ids_min)
                .unwrap_or(usize::MAX),
        }
    }

    /// The bounds of request handling.
    pub fn http_limits(&self) -> crate::http::HttpLimits {
        crate::http::HttpLimits {
            // At most 1 GiB (the flag's range), so it fits usize everywhere Keel runs.
            body_bytes_max: usize::try_from(self.body_bytes_max).unwrap_or(usize::MAX),
            body_read_timeout: Duration::from_millis(self.body_read_timeout_ms),
            parse_concurrency_max: self.parse_concurrency_max as usize,
            parse_wait_max: crate::http::PARSE_WAIT_MAX,
            read_concurrency_max: self.read_concurrency_max as usize,
            read_timeout: Duration::from_millis(self.read_timeout_ms),
            retry_after_secs: 1,
            subscribers_max: self.subscribers_max as usize,
            subscriber_buffer_batches: self.subscriber_buffer_batches as usize,
            subscriber_wakeups_per_sec: self.subscriber_wakeups_per_sec,
        }
    }

    /// The bounds of the connection loop.
    pub fn connection_limits(&self) -> crate::server::ConnectionLimits {
        crate::server::ConnectionLimits {
            connections_max: self.connections_max as usize,
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            shutdown_drain: Duration::from_secs(self.shutdown_drain_secs),
        }
    }

    /// The publisher's settings, when `--nats-url` is given.
    pub fn publisher(&self) -> Option<keel_projection::PublisherConfig> {
        self.nats_url
            .as_ref()
            .map(|url| keel_projection::PublisherConfig {
                nats_url: url.clone(),
                stream: self.nats_stream.clone(),
                subject: self.nats_subject.clone(),
                inflight_max: self.publish_inflight_max as usize,
                limits: keel_projection::nats::StreamLimits {
                    max_age: self.nats_stream_max_age,
                    max_bytes: self.nats_stream_max_bytes,
                },
            })
    }
}

#[derive(Args, Debug, Clone)]
pub struct ProjectArgs {
    /// NATS server URL.
    #[arg(long, env = "KEEL_NATS_URL")]
    pub nats_url: String,
    /// MongoDB connection string, e.g. `mongodb://127.0.0.1:27017/?directConnection=true`.
    #[arg(long, env = "KEEL_MONGO_URL")]
    pub mongo_url: String,
    /// The Keel server that gaps in the stream are repaired from (`GET /v1/batches/{seq}`).
    #[arg(long, env = "KEEL_SOURCE_URL", default_value = "http://127.0.0.1:8080")]
    pub source_url: String,
    /// PEM certificate(s) to trust for an https --source-url (instead of the system's roots).
    #[arg(long, env = "KEEL_SOURCE_CA_CERT")]
    pub source_ca_cert: Option<PathBuf>,
    /// API key (scope `read`) for --source-url when the server has --auth-keys.
    #[arg(long, env = "KEEL_SOURCE_API_KEY", hide_env_values = true)]
    pub source_api_key: Option<String>,
    /// MongoDB database of the projection.
    #[arg(long, env = "KEEL_MONGO_DB", default_value = "keel")]
    pub mongo_db: String,
    /// JetStream stream the batches are published to.
    #[arg(long, env = "KEEL_NATS_STREAM", default_value = "KEEL")]
    pub nats_stream: String,
    /// Subject of the batch messages (used only if the projector creates the stream).
    #[arg(long, env = "KEEL_NATS_SUBJECT", default_value = "keel.batches")]
    pub nats_subject: String,
    /// Durable consumer name; also the `_id` of the checkpoint document.
    #[arg(long, env = "KEEL_DURABLE", default_value = "keel-projector")]
    pub durable: String,
    /// Drop the projection and the consumer, and project again from the start of history.
    #[arg(long)]
    pub rebuild: bool,
    /// Most messages delivered and not yet acked.
    #[arg(long, env = "KEEL_ACK_PENDING_MAX", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub ack_pending_max: u32,
    /// Most events applied per round of MongoDB writes.
    #[arg(long, env = "KEEL_ROUND_EVENTS_MAX", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub round_events_max: u32,
    /// Seconds without a message after which the source is asked for newer batches (0: never).
    #[arg(long, env = "KEEL_IDLE_PROBE_SECS", default_value_t = 10)]
    pub idle_probe_secs: u64,
    /// Serve the projector's Prometheus metrics on `GET /metrics` at this address (off unless
    /// given).
    #[arg(long, env = "KEEL_PROJECT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl ProjectArgs {
    pub fn projector(&self) -> keel_projection::ProjectorConfig {
        keel_projection::ProjectorConfig {
            nats_url: self.nats_url.clone(),
            mongo_url: self.mongo_url.clone(),
            mongo_db: self.mongo_db.clone(),
            source_url: self.source_url.clone(),
            source_client: keel_projection::http_client::ClientOptions {
                ca_cert: self.source_ca_cert.clone(),
                api_key: self.source_api_key.clone(),
            },
            stream: self.nats_stream.clone(),
            subject: self.nats_subject.clone(),
            durable: self.durable.clone(),
            rebuild: self.rebuild,
            ack_pending_max: self.ack_pending_max as usize,
            round_events_max: self.round_events_max as usize,
            idle_probe: Duration::from_secs(self.idle_probe_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_sizes_parse_with_binary_units_and_refuse_the_rest() {
        assert_eq!(parse_stream_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_stream_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_stream_bytes("67108864"), Ok(64 << 20));
        for bad in ["4GB", "GiB", "-1GiB", "1MiB", "9999999999TiB", ""] {
            assert!(parse_stream_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_ages_cover_the_duplicate_window() {
        assert_eq!(
            parse_stream_age("7days"),
            Ok(Duration::from_secs(7 * 86400))
        );
        assert!(parse_stream_age("1m").is_err());
        assert!(parse_stream_age("soon").is_err());
    }
}
