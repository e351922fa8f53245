//! The `keel` command line: one config per command, from flags and environment, parsed once.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "keel", version, about = "Keel: an invariant-validating, single-writer transaction platform")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the HTTP API over the store in --data.
    Serve(ServeConfig),
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
}
