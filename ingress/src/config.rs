//! The `keel` command line: one config per command, from flags and environment, parsed once.

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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the HTTP API over the store in --data.
    Serve(ServeConfig),
    /// Prove the store in --data is what its committed log says and that every invariant holds.
    Audit(crate::audit_cmd::AuditArgs),
    /// Project the batches published to NATS JetStream into MongoDB (docs/PROJECTION.md).
    Project(ProjectArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ServeConfig {
    /// Data directory of the RocksDB store (created if missing).
    #[arg(long, env = "KEEL_DATA", default_value = "./data")]
    pub data: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "KEEL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
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
    /// Largest request body in bytes; larger bodies get 413.
    #[arg(long, env = "KEEL_BODY_BYTES_MAX", default_value_t = 16 << 20)]
    pub body_bytes_max: usize,
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
}

impl ServeConfig {
    pub fn sequencer(&self) -> keel_sequencer::Config {
        keel_sequencer::Config {
            batch_items_max: self.batch_items_max as usize,
            queue_depth_max: self.queue_depth_max as usize,
            queue_items_max: (self.queue_items_max as usize).max(self.batch_items_max as usize),
            linger: Duration::from_micros(self.linger_us),
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
