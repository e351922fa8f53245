//! `keel-bench subscribe`: live subscriptions (`GET /v1/subscribe`) under a write load.
//!
//! N Server-Sent Events connections subscribe at the current tip (everything, or each one
//! account with `--filter-accounts`), then one writer client (the HTTP load's own worker, open
//! or closed loop) writes transfers. Every delivered event's latency is its receive time minus
//! the `durable_at_us` the server put in its batch's comment (when the writer's fsync of the
//! batch returned), both read from this machine's clock: the bench and the server must run on
//! the same machine. With `--baseline`, the same write load first runs without subscribers, so
//! that the write throughput with and without them is measured on the same server and store.

use crate::load::{self, LoadConfig};
use crate::schedule::{OpenLoop, Schedule};
use crate::stats::{LatencyHistogram, LatencySummaryMs};
use crate::target;
use crate::workload::{self, Mix, Workload};
use anyhow::{Context, bail};
use reqwest::Url;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// How long the subscribers may take to receive what was written after the writer stopped.
const DRAIN_MAX: Duration = Duration::from_secs(15);
/// The drain ends once no event arrived for this long.
const DRAIN_QUIET: Duration = Duration::from_secs(1);
/// Most subscriber connections.
pub const SUBSCRIBERS_MAX: u32 = 10_000;

#[derive(clap::Args, Debug, Clone)]
pub struct SubscribeArgs {
    /// Base URL of the Keel server (loopback unless --allow-remote; latency needs the same
    /// clock, so the same machine).
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "KEEL_BENCH_URL")]
    pub url: String,
    #[arg(long)]
    pub allow_remote: bool,
    /// Subscriber connections.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=i64::from(SUBSCRIBERS_MAX)))]
    pub subscribers: u32,
    /// Each subscriber follows one account (`aggregate=account:a<i mod accounts>`) instead of
    /// everything.
    #[arg(long)]
    pub filter_accounts: bool,
    /// The writer's items per second (open loop); without it the writer goes at full speed.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Items per write request.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch: u32,
    /// How long the writer writes.
    #[arg(long, default_value = "20s", value_parser = crate::cli::parse_duration)]
    pub duration: Duration,
    /// Accounts the transfers move money between (opened in setup).
    #[arg(long, default_value_t = 1000)]
    pub accounts: u64,
    /// First run the same write load without subscribers, for its throughput.
    #[arg(long)]
    pub baseline: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Write the result JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long)]
    pub label: Option<String>,
}

/// What one run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SubscribeReport {
    pub label: Option<String>,
    pub subscribers: u32,
    pub filter_accounts: bool,
    pub rate_items_per_s: Option<f64>,
    pub batch: u32,
    pub duration_s: f64,
    /// Events received over all subscribers.
    pub deliveries: u64,
    /// Deliveries over the time from the writer's start to the last event received.
    pub deliveries_per_s: f64,
    /// Deliveries that had a batch comment (their latency is measured).
    pub deliveries_timed: u64,
    /// Stream bytes received over all subscribers, and per delivered event (what
    /// `keel-bench loopback-fanout --bytes` takes for the same fan-out without Keel).
    pub bytes_received: u64,
    pub bytes_per_delivery: f64,
    pub latency_ms: LatencySummaryMs,
    pub write_items_per_s: f64,
    pub write_items_committed: u64,
    pub write_requests_failed: u64,
    /// The writer alone on the same server before the subscribers connected (`--baseline`).
    pub baseline_write_items_per_s: Option<f64>,
    /// Streams ended by the server with `resume` (too slow), and ended otherwise.
    pub resumes: u64,
    pub streams_ended: u64,
    /// Events received out of order or twice (subscribers following everything).
    pub order_errors: u64,
}

impl SubscribeReport {
    pub fn table(&self) -> String {
        let l = &self.latency_ms;
        let baseline = self
            .baseline_write_items_per_s
            .map_or("-".to_string(), |b| format!("{b:.0}"));
        format!(
            "subscribers            {}{}\n\
             deliveries             {} ({:.0}/s; {} timed; {:.0} bytes each)\n\
             latency ms             p50 {:.3}  p99 {:.3}  p999 {:.3}  max {:.3}\n\
             write items/s          {:.0} (without subscribers: {baseline})\n\
             write requests failed  {}\n\
             resumes / streams ended / order errors  {} / {} / {}\n",
            self.subscribers,
            if self.filter_accounts {
                " (one account each)"
            } else {
                " (everything)"
            },
            self.deliveries,
            self.deliveries_per_s,
            self.deliveries_timed,
            self.bytes_per_delivery,
            l.p50,
            l.p99,
            l.p999,
            l.max,
            self.write_items_per_s,
            self.write_requests_failed,
            self.resumes,
            self.streams_ended,
            self.order_errors,
        )
    }
}

/// One latency histogram shared by every subscriber of a run. A histogram of this range is
/// hundreds of kilobytes: one per subscriber (a thousand) made each record a cache miss, 7% of
/// the bench's CPU in scenario c. A record takes the lock once per batch per read.
#[derive(Clone, Default)]
struct SharedLatency(Arc<Mutex<LatencyHistogram>>);

impl SharedLatency {
    fn lock(&self) -> std::sync::MutexGuard<'_, LatencyHistogram> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What one subscriber saw.
#[derive(Default)]
struct SubscriberTally {
    latency: SharedLatency,
    deliveries: u64,
    /// Stream bytes read (SSE framing included, HTTP chunk framing not).
    bytes: u64,
    timed: u64,
    resumes: u64,
    ended: bool,
    order_errors: u64,
    last_receive: Option<Instant>,
}

/// Longest line the parser looks into. The lines it reads (`id:`, `event:`, the batch
/// comment) are far shorter; a longer one is an event's `data:` line, skipped unread.
const LINE_READ_MAX: usize = 96;

/// Reads one SSE stream's bytes, line by line, across chunk boundaries. It is the bench's own
/// hot loop (1M deliveries/s on the same cores as the server), so it finds line ends with
/// `memchr`, keeps at most [`LINE_READ_MAX`] bytes of a line split across chunks, and times a
/// run of events of one batch received in one chunk with one histogram update.
#[derive(Default)]
struct Parser {
    /// The start of a line whose end has not arrived yet (at most [`LINE_READ_MAX`] bytes).
    partial: Vec<u8>,
    /// That line is longer than [`LINE_READ_MAX`]: a `data:` line, not read.
    partial_long: bool,
    durable_at_us: Option<u64>,
    pending_id: Option<u64>,
    last_id: Option<u64>,
    check_order: bool,
}

impl Parser {
    fn feed(&mut self, bytes: &[u8], now_us: u64, tally: &mut SubscriberTally) {
        // Events timed against the current batch comment in this chunk, recorded together.
        let mut timed_run = 0u64;
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', bytes) {
            let piece = &bytes[start..end];
            start = end + 1;
            let line = if self.partial.is_empty() && !self.partial_long {
                parse_line(piece)
            } else {
                let long = self.partial_long || self.partial.len() + piece.len() > LINE_READ_MAX;
                let line = if long {
                    Line::Other
                } else {
                    self.partial.extend_from_slice(piece);
                    parse_line(&self.partial)
                };
                self.partial.clear();
                self.partial_long = false;
                line
            };
            match line {
                Line::Durable(us) => {
                    self.record_run(now_us, &mut timed_run, tally);
                    self.durable_at_us = Some(us);
                }
                Line::Id(id) => self.pending_id = Some(id),
                Line::Event => {
                    if let Some(id) = self.pending_id.take() {
                        self.delivered(id, tally);
                        if self.durable_at_us.is_some() {
                            timed_run += 1;
                        }
                    }
                }
                Line::Resume => tally.resumes += 1,
                Line::Other => {}
            }
        }
        self.record_run(now_us, &mut timed_run, tally);
        let rest = &bytes[start..];
        if self.partial_long || self.partial.len() + rest.len() > LINE_READ_MAX {
            self.partial.clear();
            self.partial_long = true;
        } else {
            self.partial.extend_from_slice(rest);
        }
    }

    fn record_run(&self, now_us: u64, run: &mut u64, tally: &mut SubscriberTally) {
        if let (Some(durable), 1..) = (self.durable_at_us, *run) {
            tally.timed += *run;
            tally
                .latency
                .lock()
                .record_us_n(now_us.saturating_sub(durable), *run);
        }
        *run = 0;
    }

    fn delivered(&mut self, id: u64, tally: &mut SubscriberTally) {
        if self.check_order && self.last_id.is_some_and(|last| id != last + 1) {
            tally.order_errors += 1;
        }
        self.last_id = Some(id);
        tally.deliveries += 1;
    }
}

/// The SSE lines the bench reads.
enum Line {
    /// A batch comment's `durable_at_us`.
    Durable(u64),
    Id(u64),
    /// `event: event`: the event named by the last `id:` was delivered.
    Event,
    /// `event: resume`: the server ended the stream.
    Resume,
    Other,
}

/// A decimal number of at most 19 digits, nothing else (the server writes them so).
fn decimal(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 19 {
        return None;
    }
    text.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

fn parse_line(line: &[u8]) -> Line {
    match line.first() {
        Some(b'i') => line
            .strip_prefix(b"id: ")
            .and_then(decimal)
            .map_or(Line::Other, Line::Id),
        Some(b'e') => match line {
            b"event: event" => Line::Event,
            b"event: resume" => Line::Resume,
            _ => Line::Other,
        },
        Some(b':') => line
            .strip_prefix(b": batch ")
            .and_then(|comment| {
                memchr::memmem::find(comment, b" durable_at_us ").map(|p| &comment[p + 15..])
            })
            .and_then(decimal)
            .map_or(Line::Other, Line::Durable),
        _ => Line::Other,
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One subscriber: reads its stream until told to stop or the stream ends.
async fn subscriber(
    client: reqwest::Client,
    url: Url,
    check_order: bool,
    received: Arc<AtomicU64>,
    latency: SharedLatency,
    connected: tokio::sync::mpsc::Sender<anyhow::Result<()>>,
    mut stop: watch::Receiver<bool>,
) -> SubscriberTally {
    let mut tally = SubscriberTally {
        latency,
        ..SubscriberTally::default()
    };
    let response = match client.get(url).send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let _ = connected
                .send(Err(anyhow::anyhow!("subscribe answered {}", r.status())))
                .await;
            return tally;
        }
        Err(e) => {
            let _ = connected.send(Err(e.into())).await;
            return tally;
        }
    };
    let _ = connected.send(Ok(())).await;
    drop(connected);
    let mut response = response;
    let mut parser = Parser {
        check_order,
        ..Parser::default()
    };
    loop {
        let chunk = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            chunk = response.chunk() => chunk,
        };
        match chunk {
            Ok(Some(bytes)) => {
                let before = tally.deliveries;
                tally.bytes += bytes.len() as u64;
                parser.feed(&bytes, now_us(), &mut tally);
                received.fetch_add(tally.deliveries - before, Ordering::Relaxed);
                tally.last_receive = Some(Instant::now());
            }
            Ok(None) | Err(_) => {
                tally.ended = true;
                break;
            }
        }
    }
    tally
}

fn load_config(args: &SubscribeArgs, base_url: &Url, run_id: String) -> anyhow::Result<LoadConfig> {
    let batch = args.batch as usize;
    let schedule = match args.rate {
        None => Schedule::Closed,
        Some(rate) => Schedule::Open(
            OpenLoop::new(rate, batch, 1)
                .ok_or_else(|| anyhow::anyhow!("--rate {rate}: give a positive number"))?,
        ),
    };
    if !(2..=workload::ACCOUNTS_MAX).contains(&args.accounts) {
        bail!("--accounts must be from 2 to {}", workload::ACCOUNTS_MAX);
    }
    Ok(LoadConfig {
        base_url: base_url.clone(),
        client: Default::default(),
        workers: 1,
        batch,
        duration: args.duration,
        requests_max: u64::MAX / 2,
        atomic: false,
        schedule,
        workload: Workload {
            mix: Mix::Ledger,
            accounts: args.accounts,
            skus: 1,
            payload_bytes: 0,
            reject_ratio: 0.0,
            seed: args.seed,
            run_id,
            types: workload::CommandTypes::builtin(),
            ids: workload::IdShape::Counter,
        },
        domain: None,
        request_timeout: Duration::from_secs(30),
        progress: false,
    })
}

/// The run id of the `--baseline` run: never the measured run's (nor any other run's, which
/// has no `-`).
fn baseline_run_id(run_id: &str) -> String {
    format!("{run_id}-baseline")
}

fn with_query(base: &Url, path: &str, query: &str) -> Url {
    let mut url = target::endpoint(base, path);
    url.set_query(Some(query));
    url
}

/// The last committed event's sequence.
async fn tip(client: &reqwest::Client, base: &Url) -> anyhow::Result<u64> {
    let page: serde_json::Value = client
        .get(with_query(base, "/v1/events", "limit=1&after=0"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    page["last_seq"]
        .as_u64()
        .context("GET /v1/events gave no last_seq")
}

/// Opens every subscription at `after`; fails unless all of them are answered 200.
async fn connect_subscribers(
    args: &SubscribeArgs,
    base: &Url,
    after: u64,
    received: &Arc<AtomicU64>,
    latency: &SharedLatency,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<SubscriberTally>>> {
    let subscribers = args.subscribers as usize;
    let client = keel_projection::http_client::builder(&Default::default())?
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()?;
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::channel(subscribers);
    let mut tasks = Vec::with_capacity(subscribers);
    for i in 0..subscribers {
        let query = if args.filter_accounts {
            let account = workload::account_name(i as u64 % args.accounts);
            format!("after={after}&aggregate=account:{account}")
        } else {
            format!("after={after}")
        };
        tasks.push(tokio::spawn(subscriber(
            client.clone(),
            with_query(base, "/v1/subscribe", &query),
            !args.filter_accounts,
            Arc::clone(received),
            latency.clone(),
            connected_tx.clone(),
            stop.clone(),
        )));
    }
    drop(connected_tx);
    for _ in 0..subscribers {
        match tokio::time::timeout(Duration::from_secs(60), connected_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(error))) => bail!("a subscriber could not connect: {error:#}"),
            Ok(None) | Err(_) => bail!("the subscribers did not all connect within 60 s"),
        }
    }
    Ok(tasks)
}

/// Waits until no event arrived for [`DRAIN_QUIET`], at most [`DRAIN_MAX`].
async fn drain(received: &AtomicU64) {
    let deadline = Instant::now() + DRAIN_MAX;
    let mut seen = received.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = received.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= DRAIN_QUIET {
            return;
        }
    }
}

/// The whole run: setup, optional baseline, subscribers, the write load, the drain, the report.
pub async fn run(args: &SubscribeArgs) -> anyhow::Result<SubscribeReport> {
    let base = target::checked_base_url(&args.url, args.allow_remote)?;
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let config = Arc::new(load_config(
        args,
        &base,
        workload::run_id_from_millis(millis),
    )?);
    load::check_health(&base, &Default::default()).await?;
    let setup = load::run_setup(&config).await?;
    eprintln!(
        "setup: {} accounts in {:.1} s",
        args.accounts, setup.duration_s
    );
    let baseline = if args.baseline {
        // Its own command ids: with the same ones, every command of the measured run would be
        // a retry of the baseline's, answered from the stored outcomes with no new event.
        let mut alone = (*config).clone();
        alone.workload.run_id = baseline_run_id(&config.workload.run_id);
        let outcome = load::run_load(Arc::new(alone), setup.clone()).await?;
        let rate = outcome.counters.items_committed as f64 / outcome.elapsed.as_secs_f64();
        eprintln!("baseline (no subscribers): {rate:.0} items/s");
        Some(rate)
    } else {
        None
    };
    let client = load::http_client(Duration::from_secs(30), &Default::default())?;
    let after = tip(&client, &base).await?;
    let received = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let latency = SharedLatency::default();
    let tasks = connect_subscribers(args, &base, after, &received, &latency, &stop_rx).await?;
    eprintln!(
        "{} subscribers connected at event {after}",
        args.subscribers
    );
    let started = Instant::now();
    let outcome = load::run_load(Arc::clone(&config), setup).await?;
    let write_elapsed = outcome.elapsed;
    drain(&received).await;
    let _ = stop_tx.send(true);
    let mut total = SubscriberTally::default();
    for task in tasks {
        let tally = task.await.context("a subscriber task failed")?;
        total.deliveries += tally.deliveries;
        total.bytes += tally.bytes;
        total.timed += tally.timed;
        total.resumes += tally.resumes;
        total.ended |= tally.ended;
        total.order_errors += tally.order_errors;
        total.last_receive = total.last_receive.max(tally.last_receive);
        if tally.ended {
            total.ended = true;
        }
    }
    let window = total
        .last_receive
        .map_or(write_elapsed, |last| last.duration_since(started))
        .max(Duration::from_millis(1));
    Ok(SubscribeReport {
        label: args.label.clone(),
        subscribers: args.subscribers,
        filter_accounts: args.filter_accounts,
        rate_items_per_s: args.rate,
        batch: args.batch,
        duration_s: args.duration.as_secs_f64(),
        deliveries: total.deliveries,
        deliveries_per_s: total.deliveries as f64 / window.as_secs_f64(),
        deliveries_timed: total.timed,
        bytes_received: total.bytes,
        bytes_per_delivery: total.bytes as f64 / total.deliveries.max(1) as f64,
        latency_ms: latency.lock().summary_ms(),
        write_items_per_s: outcome.counters.items_committed as f64 / write_elapsed.as_secs_f64(),
        write_items_committed: outcome.counters.items_committed,
        write_requests_failed: outcome.counters.requests_failed,
        baseline_write_items_per_s: baseline,
        resumes: total.resumes,
        streams_ended: u64::from(total.ended),
        order_errors: total.order_errors,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn command_ids(workload: &Workload) -> std::collections::HashSet<String> {
        let mut generator = workload::Generator::new(workload, 0);
        let body: serde_json::Value =
            serde_json::from_str(generator.next_body(1000, false)).expect("a JSON body");
        body["commands"]
            .as_array()
            .expect("commands")
            .iter()
            .map(|c| c["id"].as_str().expect("an id").to_owned())
            .collect()
    }

    /// The measured run once repeated the baseline's command ids, so that every command it
    /// sent was a retry answered from the stored outcomes (no event, nothing to deliver).
    #[test]
    fn the_baseline_run_sends_none_of_the_measured_runs_command_ids() {
        let measured = Workload {
            mix: Mix::Ledger,
            accounts: 1000,
            skus: 1,
            payload_bytes: 0,
            reject_ratio: 0.0,
            seed: 42,
            run_id: workload::run_id_from_millis(1_796_000_000_000),
            types: workload::CommandTypes::builtin(),
            ids: workload::IdShape::Counter,
        };
        let mut alone = measured.clone();
        alone.run_id = baseline_run_id(&measured.run_id);
        let (measured_ids, alone_ids) = (command_ids(&measured), command_ids(&alone));
        assert_eq!(measured_ids.len(), 1000);
        assert_eq!(alone_ids.len(), 1000);
        assert!(measured_ids.is_disjoint(&alone_ids));
    }

    #[test]
    fn the_parser_times_events_by_their_batch_comment_across_chunks() {
        let stream = b": batch 7 durable_at_us 1000\nid: 5\nevent: event\ndata: {}\n\nid: 6\nevent: event\ndata: {\"x\":1}\n\n: keepalive\n\nid: 7\nevent: resume\ndata: {}\n\n";
        for cut in 0..stream.len() {
            let mut tally = SubscriberTally::default();
            let mut parser = Parser {
                last_id: Some(4),
                check_order: true,
                ..Parser::default()
            };
            parser.feed(&stream[..cut], 1500, &mut tally);
            parser.feed(&stream[cut..], 1500, &mut tally);
            assert_eq!(tally.deliveries, 2, "cut at {cut}");
            assert_eq!((tally.timed, tally.resumes, tally.order_errors), (2, 1, 0));
            assert_eq!(tally.latency.lock().quantile_us(0.5), 500);
        }
    }

    /// Realistic events have `data:` lines longer than the parser keeps; split anywhere, even
    /// in three pieces, they are still counted once, in order, and timed by their own batch.
    #[test]
    fn long_data_lines_split_anywhere_are_skipped_and_events_still_counted() {
        let data = format!("{{\"memo\":\"{}\"}}", "x".repeat(2 * LINE_READ_MAX));
        let mut stream = Vec::new();
        for (batch, durable, ids) in [(3u64, 1000u64, 10u64..12), (4, 1400, 12..15)] {
            stream.extend(format!(": batch {batch} durable_at_us {durable}\n").bytes());
            for id in ids {
                stream.extend(format!("id: {id}\nevent: event\ndata: {data}\n\n").bytes());
            }
        }
        let step = 7;
        for first in (0..stream.len()).step_by(step) {
            for second in (first..stream.len()).step_by(step * 5) {
                let mut tally = SubscriberTally::default();
                let mut parser = Parser {
                    last_id: Some(9),
                    check_order: true,
                    ..Parser::default()
                };
                for piece in [&stream[..first], &stream[first..second], &stream[second..]] {
                    parser.feed(piece, 2000, &mut tally);
                }
                let at = format!("cuts at {first}, {second}");
                assert_eq!((tally.deliveries, tally.timed), (5, 5), "{at}");
                assert_eq!((tally.order_errors, tally.resumes), (0, 0), "{at}");
                assert_eq!(parser.last_id, Some(14), "{at}");
                // Two events of batch 3 (1000 us old), three of batch 4 (600 us old).
                assert_eq!(tally.latency.lock().quantile_us(0.3), 600, "{at}");
                assert_eq!(tally.latency.lock().quantile_us(1.0), 1000, "{at}");
            }
        }
    }

    #[test]
    fn only_plain_decimals_are_read() {
        assert_eq!(decimal(b"0"), Some(0));
        assert_eq!(decimal(b"18446744073709551"), Some(18_446_744_073_709_551));
        for bad in [
            &b""[..],
            b" 1",
            b"1 ",
            b"-1",
            b"1x",
            b"12345678901234567890",
        ] {
            assert_eq!(decimal(bad), None, "{bad:?}");
        }
        assert!(matches!(parse_line(b": keepalive"), Line::Other));
        assert!(matches!(parse_line(b"id: 7"), Line::Id(7)));
        assert!(matches!(
            parse_line(b": batch 2 durable_at_us 55"),
            Line::Durable(55)
        ));
    }
}
