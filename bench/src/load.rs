//! The HTTP load: setup, N workers (closed or open loop), live progress, and the raw results.
//!
//! Every loop here is bounded twice: by the run's deadline and by a request count. Each worker
//! owns one HTTP client with at most one idle connection, and sends one request at a time, so
//! a worker is one keep-alive HTTP/1.1 connection, like one domain service instance would be.

use crate::answer::{self, Tally};
use crate::domain::DomainInfo;
use crate::report::TimelinePoint;
use crate::schedule::{OpenLoop, Schedule, latency_from_intended};
use crate::stats::{LatencyHistogram, us_to_ms};
use crate::target;
use crate::workload::{self, Generator, Workload};
use anyhow::{Context, bail};
use keel_projection::http_client::ClientOptions;
use reqwest::{StatusCode, Url, header};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Transport errors in a row after which a worker gives up (the server is gone).
const TRANSPORT_ERRORS_IN_A_ROW_MAX: u32 = 20;
/// Longest pause after a 429/503, whatever `Retry-After` says.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Pause after a transport error or an overload answer without `Retry-After`.
const BACKOFF_DEFAULT: Duration = Duration::from_millis(100);

/// One load run, parsed and checked at the edge.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub base_url: Url,
    /// https CA certificate and API key (`--ca-cert`, `--api-key`).
    pub client: ClientOptions,
    pub workers: usize,
    pub batch: usize,
    pub duration: Duration,
    /// Most requests over all workers.
    pub requests_max: u64,
    pub atomic: bool,
    pub schedule: Schedule,
    pub workload: Workload,
    /// The declared domain the commands go to (`--domain FILE`); `None`: the built-in ones.
    pub domain: Option<DomainInfo>,
    pub request_timeout: Duration,
    /// Print a progress line on stderr every second.
    pub progress: bool,
}

/// Counters over the whole run (flattened into the result file).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Counters {
    pub items_committed: u64,
    pub items_rejected: u64,
    pub items_replayed: u64,
    pub items_designed_to_reject: u64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    pub http_503: u64,
    pub http_429: u64,
    pub rejected_by_code: BTreeMap<String, u64>,
    pub errors_by_kind: BTreeMap<String, u64>,
}

#[derive(Default)]
struct RecorderState {
    counters: Counters,
    total: LatencyHistogram,
    window: LatencyHistogram,
}

/// Where workers record answers. One lock per request: at a few thousand requests per second
/// that is far below anything measurable, and it keeps the numbers exactly consistent.
#[derive(Default)]
pub struct Recorder {
    state: Mutex<RecorderState>,
}

impl Recorder {
    fn lock(&self) -> MutexGuard<'_, RecorderState> {
        // A worker that panicked while holding the lock left consistent counters behind (each
        // update is a few additions), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn record_ok(&self, latency: Duration, tally: &Tally, designed_rejects: usize) {
        let mut state = self.lock();
        state.total.record(latency);
        state.window.record(latency);
        let c = &mut state.counters;
        c.requests_ok += 1;
        c.items_committed += tally.committed;
        c.items_rejected += tally.rejected;
        c.items_replayed += tally.replayed;
        c.items_designed_to_reject += designed_rejects as u64;
        for (code, n) in &tally.rejected_by_code {
            *c.rejected_by_code.entry(code.clone()).or_default() += n;
        }
    }

    pub fn record_error(&self, kind: &str, status: Option<StatusCode>) {
        let mut state = self.lock();
        let c = &mut state.counters;
        c.requests_failed += 1;
        c.http_503 += u64::from(status == Some(StatusCode::SERVICE_UNAVAILABLE));
        c.http_429 += u64::from(status == Some(StatusCode::TOO_MANY_REQUESTS));
        *c.errors_by_kind.entry(kind.to_owned()).or_default() += 1;
    }

    /// Counters so far, the latency since the last call, and the whole run's latency.
    fn take_window(&self) -> (Counters, LatencyHistogram) {
        let mut state = self.lock();
        let window = state.window.clone();
        state.window.reset();
        (state.counters.clone(), window)
    }

    pub fn finish(&self) -> (Counters, LatencyHistogram) {
        let state = self.lock();
        (state.counters.clone(), state.total.clone())
    }
}

/// What the setup phase did (not part of the measured numbers).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SetupOutcome {
    pub requests: u64,
    pub items: u64,
    /// `account_exists`/`sku_exists`: the store already held them from an earlier run.
    pub already_existed: u64,
    pub duration_s: f64,
}

/// The raw outcome of a load: what the report is made of.
pub struct LoadOutcome {
    pub setup: SetupOutcome,
    pub counters: Counters,
    pub latency: LatencyHistogram,
    pub elapsed: Duration,
    pub timeline: Vec<TimelinePoint>,
}

pub fn http_client(timeout: Duration, options: &ClientOptions) -> anyhow::Result<reqwest::Client> {
    keel_projection::http_client::builder(options)?
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .timeout(timeout)
        .build()
        .context("building an HTTP client")
}

/// Checks the server answers `/healthz`, so a wrong URL fails in a second with a clear message.
pub async fn check_health(base_url: &Url, options: &ClientOptions) -> anyhow::Result<()> {
    let client = http_client(Duration::from_secs(5), options)?;
    let url = target::endpoint(base_url, "/healthz");
    let response = client
        .get(url.clone())
        .send()
        .await
        .with_context(|| format!("no Keel server answers at {base_url} (GET {url})"))?;
    if !response.status().is_success() {
        bail!(
            "GET {url} answered HTTP {}: the server is not healthy",
            response.status()
        );
    }
    Ok(())
}

/// Opens and funds the accounts and creates the SKUs the workload uses.
pub async fn run_setup(config: &LoadConfig) -> anyhow::Result<SetupOutcome> {
    let started = Instant::now();
    let client = http_client(config.request_timeout, &config.client)?;
    let url = target::endpoint(&config.base_url, "/v1/batches");
    let mut outcome = SetupOutcome::default();
    for body in workload::setup_bodies(&config.workload) {
        let items = body.matches("\"type\":").count();
        let response = client
            .post(url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("setup: POST {url}"))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("setup: reading the answer of {url}"))?;
        if status != StatusCode::OK {
            let code = answer::error_code(&bytes).unwrap_or_default();
            let hint = match &config.domain {
                Some(domain) if code == "unknown_command_type" => format!(
                    " (is the server started with `--domain {}`? The commands are domain `{}`'s)",
                    domain.file, domain.name
                ),
                _ => String::new(),
            };
            bail!(
                "setup: POST {url} answered HTTP {status} {code}: {}{hint}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let tally =
            answer::tally_batch_answer(&bytes, items).map_err(|e| anyhow::anyhow!("setup: {e}"))?;
        for (code, n) in &tally.rejected_by_code {
            if !config.workload.types.is_benign_setup_rejection(code) {
                bail!(
                    "setup: {n} items were rejected with `{code}`; the store is not fit for this workload"
                );
            }
            outcome.already_existed += n;
        }
        outcome.requests += 1;
        outcome.items += items as u64;
    }
    outcome.duration_s = started.elapsed().as_secs_f64();
    Ok(outcome)
}

/// Runs the measured load (after setup) and returns its raw outcome.
pub async fn run_load(config: Arc<LoadConfig>, setup: SetupOutcome) -> anyhow::Result<LoadOutcome> {
    assert!(config.workers > 0 && config.batch > 0);
    let recorder = Arc::new(Recorder::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let deadline = started + config.duration;
    let progress = tokio::spawn(progress_loop(
        Arc::clone(&recorder),
        started,
        config.duration,
        config.progress,
        stop_rx.clone(),
    ));
    let mut workers = Vec::with_capacity(config.workers);
    for worker in 0..config.workers {
        let requests = requests_for_worker(config.requests_max, config.workers, worker);
        workers.push(tokio::spawn(worker_loop(
            worker,
            requests,
            Arc::clone(&config),
            Arc::clone(&recorder),
            started,
            deadline,
        )));
    }
    let mut failures = Vec::new();
    for handle in workers {
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => failures.push(format!("{error:#}")),
            Err(join) => failures.push(format!("a worker task failed: {join}")),
        }
    }
    let elapsed = started.elapsed();
    let _ = stop_tx.send(true);
    let timeline = progress.await.unwrap_or_default();
    if let Some(first) = failures.first() {
        bail!(
            "{} of {} workers could not run: {first}",
            failures.len(),
            config.workers
        );
    }
    let (counters, latency) = recorder.finish();
    Ok(LoadOutcome {
        setup,
        counters,
        latency,
        elapsed,
        timeline,
    })
}

/// Worker `worker`'s share of `requests_max`.
pub fn requests_for_worker(requests_max: u64, workers: usize, worker: usize) -> u64 {
    let workers = workers as u64;
    let worker = worker as u64;
    requests_max / workers + u64::from(worker < requests_max % workers)
}

async fn worker_loop(
    worker: usize,
    requests_max: u64,
    config: Arc<LoadConfig>,
    recorder: Arc<Recorder>,
    started: Instant,
    deadline: Instant,
) -> anyhow::Result<()> {
    let client = http_client(config.request_timeout, &config.client)?;
    let url = target::endpoint(&config.base_url, "/v1/batches");
    let mut generator = Generator::new(&config.workload, worker);
    let mut transport_errors_in_a_row = 0u32;
    for n in 0..requests_max {
        if Instant::now() >= deadline {
            break;
        }
        // The body is written before the clock starts: client-side JSON writing is not
        // server latency (in the open loop it is done while waiting for the due time).
        let body = generator.next_body(config.batch, config.atomic).to_owned();
        let designed_rejects = generator.designed_rejects();
        let intended = match config.schedule {
            Schedule::Closed => Instant::now(),
            Schedule::Open(open) => intended_time(open, started, worker, n),
        };
        if intended >= deadline {
            break;
        }
        tokio::time::sleep_until(intended.into()).await;
        let sent = client
            .post(url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let pause = match sent {
            Ok(response) => {
                transport_errors_in_a_row = 0;
                let answered = handle_response(response, config.batch, &mut generator).await;
                match answered {
                    Answered::Ok(tally) => {
                        let latency = latency_from_intended(intended - started, started.elapsed());
                        recorder.record_ok(latency, &tally, designed_rejects);
                        None
                    }
                    Answered::Failed {
                        kind,
                        status,
                        pause,
                    } => {
                        recorder.record_error(&kind, status);
                        pause
                    }
                }
            }
            Err(error) => {
                transport_errors_in_a_row += 1;
                recorder.record_error(transport_error_kind(&error), None);
                if transport_errors_in_a_row >= TRANSPORT_ERRORS_IN_A_ROW_MAX {
                    eprintln!(
                        "worker {worker}: {transport_errors_in_a_row} transport errors in a row, stopping: {error}"
                    );
                    break;
                }
                Some(BACKOFF_DEFAULT)
            }
        };
        if let Some(pause) = pause {
            let until = (Instant::now() + pause).min(deadline);
            tokio::time::sleep_until(until.into()).await;
        }
    }
    Ok(())
}

fn intended_time(open: OpenLoop, started: Instant, worker: usize, n: u64) -> Instant {
    started + open.intended_offset(open.request_index(worker, n))
}

enum Answered {
    Ok(Tally),
    Failed {
        kind: String,
        status: Option<StatusCode>,
        pause: Option<Duration>,
    },
}

async fn handle_response(
    response: reqwest::Response,
    items: usize,
    generator: &mut Generator,
) -> Answered {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let bytes = match response.bytes().await {
        Ok(bytes) => bytes,
        Err(error) => {
            return Answered::Failed {
                kind: transport_error_kind(&error).to_owned(),
                status: Some(status),
                pause: None,
            };
        }
    };
    if status == StatusCode::OK {
        return match answer::tally_batch_answer(&bytes, items) {
            Ok(tally) => {
                generator.confirm(|position| {
                    tally.committed_mask.get(position).copied().unwrap_or(false)
                });
                Answered::Ok(tally)
            }
            Err(_) => Answered::Failed {
                kind: "bad_answer".into(),
                status: Some(status),
                pause: None,
            },
        };
    }
    let code = answer::error_code(&bytes).unwrap_or_else(|| "no_code".into());
    let overload =
        status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS;
    let pause = overload.then(|| retry_after.unwrap_or(BACKOFF_DEFAULT).min(BACKOFF_MAX));
    Answered::Failed {
        kind: format!("http_{}_{code}", status.as_u16()),
        status: Some(status),
        pause,
    }
}

fn transport_error_kind(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else if error.is_body() || error.is_decode() {
        "body"
    } else {
        "transport"
    }
}

/// Once a second: a timeline point, and a progress line on stderr. Ends at the stop signal,
/// or at the latest an hour after the planned duration.
async fn progress_loop(
    recorder: Arc<Recorder>,
    started: Instant,
    duration: Duration,
    print: bool,
    mut stop: watch::Receiver<bool>,
) -> Vec<TimelinePoint> {
    let mut timeline = Vec::new();
    let mut previous = Counters::default();
    let mut previous_at = started;
    let mut ticker = tokio::time::interval_at(
        (started + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ticks_max = duration.as_secs() + 3600;
    for _ in 0..ticks_max {
        let stopping = tokio::select! {
            _ = ticker.tick() => false,
            _ = stop.changed() => true,
        } || *stop.borrow();
        let now = Instant::now();
        let (counters, window) = recorder.take_window();
        let point = timeline_point(
            &previous,
            &counters,
            &window,
            now - previous_at,
            now - started,
        );
        // The last fraction of a second at the stop is too short for a meaningful rate (its
        // items are in the totals); a full second always makes a point.
        let meaningful = !stopping || now - previous_at >= Duration::from_millis(500);
        if meaningful {
            if print {
                eprintln!("{}", progress_line(&point, &counters));
            }
            timeline.push(point);
        }
        previous = counters;
        previous_at = now;
        if stopping {
            break;
        }
    }
    timeline
}

fn timeline_point(
    previous: &Counters,
    now: &Counters,
    window: &LatencyHistogram,
    interval: Duration,
    since_start: Duration,
) -> TimelinePoint {
    let secs = interval.as_secs_f64().max(1e-3);
    let per_sec = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
    TimelinePoint {
        t_s: since_start.as_secs_f64(),
        items_per_sec: per_sec(now.items_committed, previous.items_committed),
        rejected_per_sec: per_sec(now.items_rejected, previous.items_rejected),
        batches_per_sec: per_sec(now.requests_ok, previous.requests_ok),
        p50_ms: us_to_ms(window.quantile_us(0.5) as f64),
        p99_ms: us_to_ms(window.quantile_us(0.99) as f64),
        max_ms: us_to_ms(if window.is_empty() {
            0.0
        } else {
            window.max_us() as f64
        }),
        errors: now.requests_failed.saturating_sub(previous.requests_failed),
        http_503: now.http_503.saturating_sub(previous.http_503),
    }
}

fn progress_line(point: &TimelinePoint, total: &Counters) -> String {
    format!(
        "[{:>6.1}s] {:>10.0} items/s  {:>7.1} req/s  p99 {:>8.3} ms  rejected/s {:>8.0}  errors {} (total {})  503s {}",
        point.t_s,
        point.items_per_sec,
        point.batches_per_sec,
        point.p99_ms,
        point.rejected_per_sec,
        point.errors,
        total.requests_failed,
        total.http_503,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn request_budget_is_split_exactly() {
        for (max, workers) in [(10u64, 3usize), (1, 4), (0, 2), (1_000_003, 64)] {
            let shares: Vec<u64> = (0..workers)
                .map(|w| requests_for_worker(max, workers, w))
                .collect();
            assert_eq!(shares.iter().sum::<u64>(), max);
            assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn recorder_counts_and_windows() {
        let r = Recorder::default();
        let mut tally = Tally {
            committed: 90,
            rejected: 10,
            ..Tally::default()
        };
        tally
            .rejected_by_code
            .insert("insufficient_funds".into(), 10);
        r.record_ok(Duration::from_millis(3), &tally, 10);
        r.record_error("http_503_overloaded", Some(StatusCode::SERVICE_UNAVAILABLE));
        let (counters, window) = r.take_window();
        assert_eq!(window.len(), 1);
        assert_eq!(
            (
                counters.items_committed,
                counters.items_rejected,
                counters.http_503
            ),
            (90, 10, 1)
        );
        assert_eq!(counters.errors_by_kind["http_503_overloaded"], 1);
        assert_eq!(r.take_window().1.len(), 0, "the window resets");
        assert_eq!(r.finish().1.len(), 1, "the total does not");
    }

    #[test]
    fn timeline_points_are_rates_over_their_interval() {
        let before = Counters {
            items_committed: 1000,
            requests_ok: 1,
            ..Counters::default()
        };
        let after = Counters {
            items_committed: 3000,
            requests_ok: 3,
            requests_failed: 1,
            ..Counters::default()
        };
        let mut window = LatencyHistogram::new();
        window.record(Duration::from_millis(4));
        let p = timeline_point(
            &before,
            &after,
            &window,
            Duration::from_millis(500),
            Duration::from_secs(3),
        );
        assert_eq!(p.items_per_sec, 4000.0);
        assert_eq!(p.batches_per_sec, 4.0);
        assert_eq!(p.errors, 1);
        assert!((p.p99_ms - 4.0).abs() < 0.01);
        assert!(progress_line(&p, &after).contains("4000 items/s"));
    }
}
