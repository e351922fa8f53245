//! `keel-bench loopback-fanout`: the floor under `keel-bench subscribe` on this host.
//!
//! The same fan-out as a subscription scenario, with nothing of Keel in it: writer threads
//! (as many as the subscription lane has: one per core) write `--bytes` to each of
//! `--connections` loopback TCP connections, `--rounds-per-sec` times a second, and readers on
//! a tokio runtime (as the subscription bench's readers are) only count the bytes. A
//! connection's latency in a round is the time from the round's due instant to the moment its
//! reader has the round's last byte. No HTTP, no SSE, no JSON, no store: whatever
//! p99 this prints, a subscription server moving the same bytes on the same cores cannot beat.

use crate::stats::{LatencyHistogram, LatencySummaryMs};
use anyhow::{Context, bail};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

#[derive(clap::Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Loopback connections written to (the subscribers).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub connections: u32,
    /// Bytes written to each connection per round (a delivery: 100 events of about 270 bytes
    /// each are 27,000).
    #[arg(long, default_value_t = 27_000, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub bytes: u32,
    /// Rounds per second (the committed batches per second).
    #[arg(long, default_value_t = 10.0)]
    pub rounds_per_sec: f64,
    /// Threads writing the rounds, each to its share of the connections (default: one per
    /// core, as the subscription lane).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub writer_threads: Option<u32>,
    /// Rounds in all; the run stops after them.
    #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rounds: u32,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct FanoutReport {
    pub connections: u32,
    pub bytes: u32,
    pub rounds: u32,
    pub rounds_per_sec: f64,
    pub writer_threads: u32,
    /// Bytes per second over the run.
    pub bytes_per_s: f64,
    pub latency_ms: LatencySummaryMs,
}

impl FanoutReport {
    pub fn table(&self) -> String {
        let l = &self.latency_ms;
        format!(
            "loopback fan-out       {} connections x {} bytes, {} rounds at {}/s, {} writer threads ({:.0} MB/s)\n\
             latency ms             p50 {:.3}  p99 {:.3}  p999 {:.3}  max {:.3}\n",
            self.connections,
            self.bytes,
            self.rounds,
            self.rounds_per_sec,
            self.writer_threads,
            self.bytes_per_s / 1e6,
            l.p50,
            l.p99,
            l.p999,
            l.max,
        )
    }
}

/// Every bound is checked before a socket opens; the run itself lasts `rounds / rate` plus
/// the last round's delivery (at most 60 s more).
pub fn run(args: &FanoutArgs) -> anyhow::Result<FanoutReport> {
    if !(args.rounds_per_sec.is_finite()
        && args.rounds_per_sec > 0.0
        && args.rounds_per_sec <= 10_000.0)
    {
        bail!("--rounds-per-sec must be above 0 and at most 10000");
    }
    let connections = args.connections as usize;
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    let address = listener.local_addr()?;
    let mut readers = Vec::with_capacity(connections);
    let mut writers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let reader = TcpStream::connect(address).context("connecting on loopback")?;
        let (writer, _) = listener.accept().context("accepting on loopback")?;
        writer.set_nodelay(true)?;
        reader.set_nonblocking(true)?;
        readers.push(reader);
        writers.push(writer);
    }
    let writer_threads = args
        .writer_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() as u32));
    let rounds = u64::from(args.rounds);
    let period_us = (1e6 / args.rounds_per_sec) as u64;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let bytes = u64::from(args.bytes);
    let total = bytes * rounds;
    // Round r is due at `epoch + first_us + r * period_us`.
    let epoch = Instant::now();
    let first_us = 100_000;
    let tasks = {
        let _guard = runtime.enter();
        readers
            .into_iter()
            .map(|std_stream| {
                let stream = tokio::net::TcpStream::from_std(std_stream);
                let rounds = Rounds {
                    bytes,
                    total,
                    epoch,
                    first_us,
                    period_us,
                };
                runtime.spawn(async move { read_rounds(stream?, rounds).await })
            })
            .collect::<Vec<_>>()
    };
    let payload = vec![b'x'; args.bytes as usize];
    let share = connections.div_ceil(writer_threads as usize);
    std::thread::scope(|scope| {
        let handles: Vec<_> = writers
            .chunks_mut(share)
            .map(|mine| {
                let payload = &payload;
                scope.spawn(move || -> anyhow::Result<()> {
                    for round in 0..rounds {
                        let due = epoch + Duration::from_micros(first_us + round * period_us);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        for writer in mine.iter_mut() {
                            writer.write_all(payload).context("writing on loopback")?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| bail!("a writer thread panicked"))
        })
    })?;
    let mut latency = LatencyHistogram::new();
    runtime.block_on(async {
        for task in tasks {
            let histogram = tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .context("a reader did not get its bytes within 60 s")???;
            latency.add(&histogram);
        }
        anyhow::Ok(())
    })?;
    let elapsed = epoch.elapsed().as_secs_f64() - first_us as f64 / 1e6;
    Ok(FanoutReport {
        connections: args.connections,
        bytes: args.bytes,
        rounds: args.rounds,
        rounds_per_sec: args.rounds_per_sec,
        writer_threads,
        bytes_per_s: (total * connections as u64) as f64 / elapsed,
        latency_ms: latency.summary_ms(),
    })
}

/// The schedule the readers time the rounds by.
#[derive(Clone, Copy)]
struct Rounds {
    /// Bytes per connection per round.
    bytes: u64,
    /// Bytes per connection over the run.
    total: u64,
    epoch: Instant,
    first_us: u64,
    period_us: u64,
}

/// Reads the run's bytes; each time a round's last byte arrives, records its latency from the
/// round's due instant.
async fn read_rounds(
    mut stream: tokio::net::TcpStream,
    rounds: Rounds,
) -> anyhow::Result<LatencyHistogram> {
    let mut latency = LatencyHistogram::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut seen = 0u64;
    while seen < rounds.total {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            bail!("the writer closed after {seen} of {} bytes", rounds.total);
        }
        let now = rounds.epoch.elapsed().as_micros() as u64;
        let before = seen / rounds.bytes;
        seen += n as u64;
        for round in before..seen / rounds.bytes {
            let due = rounds.first_us + round * rounds.period_us;
            latency.record_us(now.saturating_sub(due));
        }
    }
    Ok(latency)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_gets_every_round_timed() {
        let args = FanoutArgs {
            connections: 8,
            bytes: 100_000,
            rounds_per_sec: 200.0,
            writer_threads: Some(3),
            rounds: 5,
        };
        let report = run(&args).unwrap();
        assert!(report.latency_ms.count == 40, "{report:?}");
        assert!(report.latency_ms.max > 0.0);
    }
}
