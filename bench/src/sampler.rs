//! The metrics sampler: scrapes the server's `GET /metrics` every few seconds during a load and
//! writes one CSV row per scrape, with the server process's CPU and RSS from `/proc`.
//!
//! Rates, fsync percentiles and the mean batch size are computed over the interval since the
//! previous scrape (the difference of two cumulative histograms), so a row says what happened
//! in those seconds, not since the server started.

use crate::target;
use anyhow::Context;
use reqwest::Url;
use serde::Serialize;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// One sample of a Prometheus text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A parsed `/metrics` body.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
}

/// A cumulative histogram: `(upper bound, cumulative count)` ascending, with `+Inf` last.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

/// Parses Prometheus text format 0.0.4. Comments, blank lines and lines that do not parse are
/// skipped (a scrape is evidence, not a contract worth aborting a run over).
pub fn parse_exposition(text: &str) -> Exposition {
    let samples = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(parse_sample_line)
        .collect();
    Exposition { samples }
}

fn parse_sample_line(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if rest.starts_with('{') {
        let (parsed, after) = parse_labels(&rest[1..])?;
        labels = parsed;
        rest = after;
    }
    let value_text = rest.split_whitespace().next()?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `a="x",b="y\"z"}` and returns the labels and what follows the `}`.
fn parse_labels(text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = text.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_owned();
        rest = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key, value));
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
}

impl Exposition {
    /// The sum of `name` over all its label sets; `None` when absent.
    pub fn sum(&self, name: &str) -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for s in self.samples.iter().filter(|s| s.name == name) {
            found = true;
            total += s.value;
        }
        found.then_some(total)
    }

    /// The histogram `name` (`name_bucket`, `name_sum`, `name_count`), summed over label sets.
    pub fn histogram(&self, name: &str) -> Option<HistogramSnapshot> {
        let bucket_name = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for s in self.samples.iter().filter(|s| s.name == bucket_name) {
            let le = s.labels.iter().find(|(k, _)| k == "le")?;
            let bound = if le.1 == "+Inf" {
                f64::INFINITY
            } else {
                le.1.parse().ok()?
            };
            match buckets.iter_mut().find(|(b, _)| *b == bound) {
                Some(bucket) => bucket.1 += s.value,
                None => buckets.push((bound, s.value)),
            }
        }
        if buckets.is_empty() {
            return None;
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(HistogramSnapshot {
            buckets,
            sum: self.sum(&format!("{name}_sum")).unwrap_or(0.0),
            count: self.sum(&format!("{name}_count")).unwrap_or(0.0),
        })
    }

    /// A summary's precomputed quantile (`name{quantile="0.99"}`), for servers exporting
    /// summaries instead of histograms.
    pub fn summary_quantile(&self, name: &str, quantile: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels
                        .iter()
                        .any(|(k, v)| k == "quantile" && v == quantile)
            })
            .map(|s| s.value)
    }
}

impl HistogramSnapshot {
    /// What was observed since `earlier` (bucket by bucket). Falls back to `self` when the
    /// counters went backwards (the server restarted).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        if earlier.count > self.count || earlier.buckets.len() != self.buckets.len() {
            return self.clone();
        }
        let buckets = self
            .buckets
            .iter()
            .zip(&earlier.buckets)
            .map(|(now, then)| (now.0, (now.1 - then.1).max(0.0)))
            .collect();
        HistogramSnapshot {
            buckets,
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// The `q` quantile, interpolated linearly inside its bucket as Prometheus'
    /// `histogram_quantile` does. `None` without observations. A quantile in the `+Inf` bucket
    /// answers the highest finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let mut lower_bound = 0.0;
        let mut lower_count = 0.0;
        for &(bound, count) in &self.buckets {
            if count >= rank {
                if bound.is_infinite() {
                    return Some(lower_bound);
                }
                let in_bucket = count - lower_count;
                if in_bucket <= 0.0 {
                    return Some(bound);
                }
                return Some(
                    lower_bound + (bound - lower_bound) * (rank - lower_count) / in_bucket,
                );
            }
            lower_bound = bound;
            lower_count = count;
        }
        Some(lower_bound)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }
}

/// CPU time and resident memory of a process, from `/proc/PID/stat` and `/proc/PID/status`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcSample {
    pub cpu_ticks: u64,
    pub rss_bytes: u64,
}

/// utime + stime (fields 14 and 15 of `/proc/PID/stat`), in clock ticks. The command name
/// (field 2) may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_proc_stat_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // after_comm starts at field 3 (state): field N is fields[N - 3].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` of `/proc/PID/status`, in bytes.
pub fn parse_proc_status_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `pid` is a number or `self`.
pub fn read_proc(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcSample {
        cpu_ticks: parse_proc_stat_ticks(&stat)?,
        rss_bytes: parse_proc_status_rss(&status)?,
    })
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every mainstream Linux).
pub fn clock_ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// One CSV row. Empty cells where the server did not export a series or `/proc` was unreadable.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SampleRow {
    pub unix_ms: u64,
    pub elapsed_s: f64,
    pub queue_items: Option<f64>,
    pub batches_committed_total: Option<f64>,
    pub items_committed_total: Option<f64>,
    pub items_per_sec: Option<f64>,
    pub batches_per_sec: Option<f64>,
    pub fsync_p50_ms: Option<f64>,
    pub fsync_p99_ms: Option<f64>,
    pub batch_items_mean: Option<f64>,
    pub server_cpu_percent: Option<f64>,
    pub server_rss_mb: Option<f64>,
    pub bench_cpu_percent: Option<f64>,
}

pub const CSV_HEADER: &str = "unix_ms,elapsed_s,queue_items,batches_committed_total,items_committed_total,\
items_per_sec,batches_per_sec,fsync_p50_ms,fsync_p99_ms,batch_items_mean,server_cpu_percent,server_rss_mb,\
bench_cpu_percent";

impl SampleRow {
    pub fn to_csv(&self) -> String {
        let mut line = format!("{},{:.3}", self.unix_ms, self.elapsed_s);
        for cell in [
            self.queue_items,
            self.batches_committed_total,
            self.items_committed_total,
            self.items_per_sec,
            self.batches_per_sec,
            self.fsync_p50_ms,
            self.fsync_p99_ms,
            self.batch_items_mean,
            self.server_cpu_percent,
            self.server_rss_mb,
            self.bench_cpu_percent,
        ] {
            line.push(',');
            if let Some(v) = cell {
                let _ = write!(line, "{}", round3(v));
            }
        }
        line
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// What the previous scrape saw, to compute per-interval values.
#[derive(Clone, Debug, Default)]
pub struct Previous {
    at: Option<Instant>,
    batches: Option<f64>,
    items: Option<f64>,
    fsync: Option<HistogramSnapshot>,
    batch_items: Option<HistogramSnapshot>,
    server: Option<ProcSample>,
    bench: Option<ProcSample>,
}

/// Turns one scrape (and the process samples taken with it) into a row, updating `previous`.
pub fn row_from_scrape(
    exposition: &Exposition,
    server: Option<ProcSample>,
    bench: Option<ProcSample>,
    now: Instant,
    started: Instant,
    ticks_per_sec: f64,
    previous: &mut Previous,
) -> SampleRow {
    let elapsed_since_prev = previous
        .at
        .map(|at| now.duration_since(at).as_secs_f64())
        .filter(|s| *s > 0.0);
    let rate = |now_v: Option<f64>, then: Option<f64>| match (now_v, then, elapsed_since_prev) {
        (Some(n), Some(t), Some(secs)) if n >= t => Some((n - t) / secs),
        _ => None,
    };
    let cpu = |now_p: Option<ProcSample>, then: Option<ProcSample>| match (
        now_p,
        then,
        elapsed_since_prev,
    ) {
        (Some(n), Some(t), Some(secs)) if n.cpu_ticks >= t.cpu_ticks => {
            Some((n.cpu_ticks - t.cpu_ticks) as f64 / ticks_per_sec / secs * 100.0)
        }
        _ => None,
    };
    let batches = exposition.sum("keel_batches_committed_total");
    let items = exposition.sum("keel_items_committed_total");
    let fsync = exposition.histogram("keel_fsync_seconds");
    let batch_items = exposition.histogram("keel_batch_items");
    let interval =
        |now_h: &Option<HistogramSnapshot>, then: &Option<HistogramSnapshot>| match (now_h, then) {
            (Some(n), Some(t)) => Some(n.since(t)),
            (Some(n), None) => Some(n.clone()),
            _ => None,
        };
    let fsync_interval = interval(&fsync, &previous.fsync);
    let fsync_quantile = |q: f64, label: &str| {
        fsync_interval
            .as_ref()
            .and_then(|h| h.quantile(q))
            .or_else(|| exposition.summary_quantile("keel_fsync_seconds", label))
            .map(|secs| secs * 1000.0)
    };
    let row = SampleRow {
        unix_ms: unix_ms(),
        elapsed_s: now.duration_since(started).as_secs_f64(),
        queue_items: exposition.sum("keel_queue_items"),
        batches_committed_total: batches,
        items_committed_total: items,
        items_per_sec: rate(items, previous.items),
        batches_per_sec: rate(batches, previous.batches),
        fsync_p50_ms: fsync_quantile(0.5, "0.5"),
        fsync_p99_ms: fsync_quantile(0.99, "0.99"),
        batch_items_mean: interval(&batch_items, &previous.batch_items).and_then(|h| h.mean()),
        server_cpu_percent: cpu(server, previous.server),
        server_rss_mb: server.map(|p| p.rss_bytes as f64 / (1024.0 * 1024.0)),
        bench_cpu_percent: cpu(bench, previous.bench),
    };
    *previous = Previous {
        at: Some(now),
        batches,
        items,
        fsync,
        batch_items,
        server,
        bench,
    };
    row
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What the sampler needs.
#[derive(Clone, Debug)]
pub struct SamplerConfig {
    pub base_url: Url,
    /// How the server is reached (scraping /metrics needs the `admin` scope).
    pub client: keel_projection::http_client::ClientOptions,
    pub csv: PathBuf,
    pub interval: Duration,
    pub server_pid: Option<u32>,
    /// Hard bound on scrapes, whatever the stop signal does.
    pub samples_max: u64,
}

/// Scrapes until `stop` turns true (or `samples_max`), one last time at the stop, and returns
/// the rows it wrote.
pub async fn run(
    config: SamplerConfig,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<SampleRow>> {
    let client = keel_projection::http_client::builder(&config.client)?
        .timeout(Duration::from_secs(5))
        .build()
        .context("building the sampler's HTTP client")?;
    let metrics_url = target::endpoint(&config.base_url, "/metrics");
    let mut file = create_csv(&config.csv)?;
    let server_pid = config.server_pid.map(|p| p.to_string());
    let ticks = clock_ticks_per_sec();
    let started = Instant::now();
    let mut previous = Previous::default();
    let mut rows = Vec::new();
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..config.samples_max {
        let stopping = tokio::select! {
            _ = ticker.tick() => false,
            _ = stop.changed() => true,
        } || *stop.borrow();
        // A last scrape right after a regular one would compute rates over a sliver of time.
        let last_row_s = rows
            .last()
            .map_or(f64::NEG_INFINITY, |r: &SampleRow| r.elapsed_s);
        if stopping
            && started.elapsed().as_secs_f64() - last_row_s < config.interval.as_secs_f64() / 2.0
        {
            break;
        }
        let exposition = match scrape(&client, &metrics_url).await {
            Ok(exposition) => exposition,
            Err(error) => {
                eprintln!("sampler: {error:#}");
                Exposition::default()
            }
        };
        let server = server_pid.as_deref().and_then(read_proc);
        let row = row_from_scrape(
            &exposition,
            server,
            read_proc("self"),
            Instant::now(),
            started,
            ticks,
            &mut previous,
        );
        writeln!(file, "{}", row.to_csv())
            .with_context(|| format!("writing {}", config.csv.display()))?;
        file.flush()
            .with_context(|| format!("writing {}", config.csv.display()))?;
        rows.push(row);
        if stopping {
            break;
        }
    }
    Ok(rows)
}

fn create_csv(path: &Path) -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut file = std::io::BufWriter::new(file);
    writeln!(file, "{CSV_HEADER}").with_context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

async fn scrape(client: &reqwest::Client, url: &Url) -> anyhow::Result<Exposition> {
    let response = client
        .get(url.clone())
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if !response.status().is_success() {
        anyhow::bail!("GET {url}: HTTP {}", response.status());
    }
    let text = response
        .text()
        .await
        .with_context(|| format!("reading {url}"))?;
    Ok(parse_exposition(&text))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# HELP keel_items_committed_total items committed
# TYPE keel_items_committed_total counter
keel_items_committed_total 120000
keel_batches_committed_total 120
keel_items_rejected_total{code="insufficient_funds"} 7
keel_items_rejected_total{code="same_account"} 3
# TYPE keel_queue_items gauge
keel_queue_items 2000
# TYPE keel_fsync_seconds histogram
keel_fsync_seconds_bucket{le="0.001"} 0
keel_fsync_seconds_bucket{le="0.002"} 60
keel_fsync_seconds_bucket{le="0.004"} 110
keel_fsync_seconds_bucket{le="0.008"} 120
keel_fsync_seconds_bucket{le="+Inf"} 120
keel_fsync_seconds_sum 0.3
keel_fsync_seconds_count 120
keel_batch_items_bucket{le="500"} 0
keel_batch_items_bucket{le="1000"} 120
keel_batch_items_bucket{le="+Inf"} 120
keel_batch_items_sum 120000
keel_batch_items_count 120
keel_request_seconds_bucket{route="/v1/batches",outcome="ok",le="0.001"} 1
keel_request_seconds{route="/v1/batches",outcome="a \"quoted\", value",quantile="0.99"} 0.5
"#;

    #[test]
    fn parses_counters_gauges_and_labels() {
        let e = parse_exposition(SAMPLE);
        assert_eq!(e.sum("keel_items_committed_total"), Some(120_000.0));
        assert_eq!(e.sum("keel_items_rejected_total"), Some(10.0));
        assert_eq!(e.sum("keel_queue_items"), Some(2000.0));
        assert_eq!(e.sum("keel_missing"), None);
        let quoted = e
            .samples
            .iter()
            .find(|s| s.name == "keel_request_seconds")
            .unwrap();
        assert_eq!(
            quoted.labels[1],
            ("outcome".to_owned(), "a \"quoted\", value".to_owned())
        );
        assert_eq!(
            e.summary_quantile("keel_request_seconds", "0.99"),
            Some(0.5)
        );
    }

    #[test]
    fn histogram_quantiles_interpolate_inside_buckets() {
        let h = parse_exposition(SAMPLE)
            .histogram("keel_fsync_seconds")
            .unwrap();
        assert_eq!(h.count, 120.0);
        // p50: rank 60 is the top of the (1 ms, 2 ms] bucket.
        assert!((h.quantile(0.5).unwrap() - 0.002).abs() < 1e-9);
        // p99: rank 118.8 is 8.8/10 into the (4 ms, 8 ms] bucket.
        assert!((h.quantile(0.99).unwrap() - (0.004 + 0.004 * 0.88)).abs() < 1e-9);
        assert!((h.mean().unwrap() - 0.0025).abs() < 1e-9);
        let items = parse_exposition(SAMPLE)
            .histogram("keel_batch_items")
            .unwrap();
        assert_eq!(items.mean(), Some(1000.0));
    }

    #[test]
    fn quantile_in_the_inf_bucket_answers_the_last_finite_bound() {
        let h = HistogramSnapshot {
            buckets: vec![(1.0, 1.0), (f64::INFINITY, 10.0)],
            sum: 0.0,
            count: 10.0,
        };
        assert_eq!(h.quantile(0.99), Some(1.0));
        assert_eq!(HistogramSnapshot::default().quantile(0.5), None);
    }

    #[test]
    fn interval_histogram_is_the_difference() {
        let before = HistogramSnapshot {
            buckets: vec![(1.0, 10.0), (f64::INFINITY, 10.0)],
            sum: 5.0,
            count: 10.0,
        };
        let after = HistogramSnapshot {
            buckets: vec![(1.0, 10.0), (f64::INFINITY, 15.0)],
            sum: 20.0,
            count: 15.0,
        };
        let d = after.since(&before);
        assert_eq!(d.buckets, vec![(1.0, 0.0), (f64::INFINITY, 5.0)]);
        assert_eq!(d.mean(), Some(3.0));
        // A restarted server (counters went down) gives the new cumulative values.
        assert_eq!(before.since(&after), before);
    }

    #[test]
    fn proc_stat_and_status_parse_even_with_odd_command_names() {
        let stat = "4242 (keel (serve) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 9 0 100 \
                    1000000 2000 18446744073709551615";
        assert_eq!(parse_proc_stat_ticks(stat), Some(300));
        let status = "Name:\tkeel\nVmPeak:\t  900 kB\nVmRSS:\t   2048 kB\nThreads:\t9\n";
        assert_eq!(parse_proc_status_rss(status), Some(2048 * 1024));
        assert_eq!(parse_proc_stat_ticks("garbage"), None);
        assert!(read_proc("self").is_some_and(|p| p.rss_bytes > 0));
    }

    #[test]
    fn rows_compute_rates_over_the_interval() {
        let started = Instant::now();
        let mut previous = Previous::default();
        let first = parse_exposition(SAMPLE);
        let server0 = Some(ProcSample {
            cpu_ticks: 1000,
            rss_bytes: 64 << 20,
        });
        let row0 = row_from_scrape(
            &first,
            server0,
            None,
            started,
            started,
            100.0,
            &mut previous,
        );
        assert_eq!(row0.items_per_sec, None);
        assert_eq!(row0.queue_items, Some(2000.0));
        assert_eq!(row0.server_rss_mb, Some(64.0));
        let later = SAMPLE
            .replace(
                "keel_items_committed_total 120000",
                "keel_items_committed_total 320000",
            )
            .replace(
                "keel_batches_committed_total 120",
                "keel_batches_committed_total 320",
            );
        let server1 = Some(ProcSample {
            cpu_ticks: 1150,
            rss_bytes: 64 << 20,
        });
        let at = started + Duration::from_secs(2);
        let row1 = row_from_scrape(
            &parse_exposition(&later),
            server1,
            None,
            at,
            started,
            100.0,
            &mut previous,
        );
        assert_eq!(row1.items_per_sec, Some(100_000.0));
        assert_eq!(row1.batches_per_sec, Some(100.0));
        assert_eq!(row1.server_cpu_percent, Some(75.0));
        assert_eq!(row1.elapsed_s, 2.0);
        let csv = row1.to_csv();
        assert_eq!(csv.split(',').count(), CSV_HEADER.split(',').count());
        assert!(
            csv.ends_with(','),
            "missing bench cpu is an empty cell: {csv}"
        );
    }
}
