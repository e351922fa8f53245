//! The result JSON, the summary table, machine facts and the side-by-side comparison.
//!
//! The JSON's top-level `items_per_sec` (committed items per second), `batches_per_sec`
//! (answered requests per second) and `latency_ms` (`p50`, `p90`, `p99`, `p999`, `max` per
//! request) are a contract: make scenarios, docs and comparisons read them.

use crate::disk::DataDisk;
use crate::load::{Counters, LoadOutcome, SetupOutcome};
use crate::sampler::SampleRow;
use crate::stats::LatencySummaryMs;
use serde::Serialize;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

pub const LOAD_SCHEMA: &str = "keel-bench.load.v1";
pub const ENGINE_SCHEMA: &str = "keel-bench.engine.v1";

/// One second of the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct TimelinePoint {
    pub t_s: f64,
    pub items_per_sec: f64,
    pub rejected_per_sec: f64,
    pub batches_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: u64,
    pub http_503: u64,
}

/// The machine the numbers come from.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: Option<String>,
    pub kernel: Option<String>,
    pub memory_total_mb: Option<u64>,
    /// 1-minute load average when the run started and ended: a busy machine shows here.
    pub loadavg_1m_start: Option<f64>,
    pub loadavg_1m_end: Option<f64>,
    /// The fio preflight of the data disk (`--preflight-json`), as it wrote it.
    pub disk_fsync: Option<Value>,
    /// The disk the store was on (device, file system, mount point); `None`: not asked for
    /// (no `--data-dir`) or findmnt could not say.
    pub data_disk: Option<DataDisk>,
}

impl Machine {
    pub fn read(preflight_json: Option<&Path>) -> anyhow::Result<Self> {
        let disk_fsync = match preflight_json {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("reading the preflight result {}: {e}", path.display())
                })?;
                Some(serde_json::from_str(&text).map_err(|e| {
                    anyhow::anyhow!("the preflight result {} is not JSON: {e}", path.display())
                })?)
            }
            None => None,
        };
        Ok(Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: read_trimmed("/proc/cpuinfo").and_then(|s| cpu_model(&s)),
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            memory_total_mb: read_trimmed("/proc/meminfo").and_then(|s| memory_total_mb(&s)),
            loadavg_1m_start: loadavg_1m(),
            loadavg_1m_end: None,
            disk_fsync,
            data_disk: None,
        })
    }

    /// Names the disk `dir` is on (the store's directory or its parent).
    pub fn with_data_dir(mut self, dir: Option<&Path>) -> Self {
        self.data_disk = dir.and_then(DataDisk::of);
        self
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

pub fn memory_total_mb(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

pub fn loadavg_1m() -> Option<f64> {
    read_trimmed("/proc/loadavg")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `git rev-parse HEAD` in the current directory, else `$KEEL_GIT_COMMIT`, else "unknown".
pub fn git_commit() -> String {
    let from_git = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    from_git
        .or_else(|| {
            std::env::var("KEEL_GIT_COMMIT")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The server-side view, summarised from the sampler's rows.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ServerSummary {
    pub samples: usize,
    pub queue_items_max: Option<f64>,
    pub fsync_p99_ms_max: Option<f64>,
    pub fsync_p50_ms_mean: Option<f64>,
    pub batch_items_mean: Option<f64>,
    pub server_cpu_percent_mean: Option<f64>,
    pub server_rss_mb_max: Option<f64>,
    pub bench_cpu_percent_mean: Option<f64>,
}

pub fn summarize_samples(rows: &[SampleRow]) -> ServerSummary {
    let values = |f: fn(&SampleRow) -> Option<f64>| rows.iter().filter_map(f).collect::<Vec<f64>>();
    let max = |v: Vec<f64>| v.into_iter().reduce(f64::max);
    let mean = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    ServerSummary {
        samples: rows.len(),
        queue_items_max: max(values(|r| r.queue_items)),
        fsync_p99_ms_max: max(values(|r| r.fsync_p99_ms)),
        fsync_p50_ms_mean: mean(values(|r| r.fsync_p50_ms)),
        batch_items_mean: mean(values(|r| r.batch_items_mean)),
        server_cpu_percent_mean: mean(values(|r| r.server_cpu_percent)),
        server_rss_mb_max: max(values(|r| r.server_rss_mb)),
        bench_cpu_percent_mean: mean(values(|r| r.bench_cpu_percent)),
    }
}

/// The parameters of a load run, as given.
#[derive(Clone, Debug, Serialize)]
pub struct Parameters {
    pub url: String,
    pub workers: usize,
    pub batch: usize,
    pub duration_s: f64,
    pub requests_max: u64,
    pub mode: &'static str,
    pub rate_items_per_sec: Option<f64>,
    pub mix: crate::workload::Mix,
    /// The declared domain the commands went to (`--domain FILE`): its name and the file;
    /// `null`: the built-in ledger and inventory.
    pub domain: Option<crate::domain::DomainInfo>,
    pub accounts: u64,
    pub skus: u64,
    pub payload_bytes: usize,
    pub atomic: bool,
    pub reject_ratio: f64,
    pub seed: u64,
    /// The shape of the load's command ids (`counter` or `random`).
    pub ids: crate::workload::IdShape,
    pub run_id: String,
    pub sample_interval_s: Option<f64>,
}

/// The result file of one load run.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub schema: &'static str,
    pub label: Option<String>,
    pub started_at: String,
    pub duration_s: f64,
    /// Committed items per second (replays and rejections excluded).
    pub items_per_sec: f64,
    pub rejected_per_sec: f64,
    /// Answered (HTTP 200) requests per second.
    pub batches_per_sec: f64,
    /// Per request, from the (intended) send to the answer; successful requests only.
    pub latency_ms: LatencySummaryMs,
    /// `items_committed`, `requests_ok`, `http_503`, ... at the top level of the file.
    #[serde(flatten)]
    pub counters: Counters,
    pub setup: SetupOutcome,
    pub parameters: Parameters,
    pub machine: Machine,
    pub server: Option<ServerSummary>,
    pub git_commit: String,
    pub timeline: Vec<TimelinePoint>,
}

impl LoadReport {
    pub fn new(
        outcome: &LoadOutcome,
        parameters: Parameters,
        machine: Machine,
        samples: Option<&[SampleRow]>,
        started_at: String,
        label: Option<String>,
    ) -> Self {
        let secs = outcome.elapsed.as_secs_f64().max(1e-9);
        let c: &Counters = &outcome.counters;
        Self {
            schema: LOAD_SCHEMA,
            label,
            started_at,
            duration_s: outcome.elapsed.as_secs_f64(),
            items_per_sec: c.items_committed as f64 / secs,
            rejected_per_sec: c.items_rejected as f64 / secs,
            batches_per_sec: c.requests_ok as f64 / secs,
            latency_ms: outcome.latency.summary_ms(),
            counters: c.clone(),
            setup: outcome.setup.clone(),
            parameters,
            machine,
            server: samples.map(summarize_samples),
            git_commit: git_commit(),
            timeline: outcome.timeline.clone(),
        }
    }

    /// The human summary printed on stdout at the end of a run.
    pub fn table(&self) -> String {
        let p = &self.parameters;
        let l = &self.latency_ms;
        let mode = match p.rate_items_per_sec {
            Some(rate) => format!("open loop at {} items/s", group(rate)),
            None => "closed loop".to_owned(),
        };
        let mut rows = vec![
            (
                "run",
                format!(
                    "{} worker(s) x batch {}, {mode}, {:.1} s{}",
                    p.workers,
                    p.batch,
                    self.duration_s,
                    match p.ids {
                        crate::workload::IdShape::Counter => "",
                        crate::workload::IdShape::Random => ", random command ids",
                    }
                ),
            ),
            ("domain", describe_domain(p.domain.as_ref())),
            ("committed items/s", group(self.items_per_sec)),
            ("rejected items/s", group(self.rejected_per_sec)),
            ("requests/s", format!("{:.1}", self.batches_per_sec)),
            (
                "latency p50 / p90 ms",
                format!("{:.3} / {:.3}", l.p50, l.p90),
            ),
            (
                "latency p99 / p999 ms",
                format!("{:.3} / {:.3}", l.p99, l.p999),
            ),
            ("latency max ms", format!("{:.3}", l.max)),
            (
                "items committed",
                group(self.counters.items_committed as f64),
            ),
            (
                "items rejected",
                format!(
                    "{} ({} designed to be)",
                    group(self.counters.items_rejected as f64),
                    self.counters.items_designed_to_reject
                ),
            ),
            (
                "failed requests",
                format!(
                    "{} (503: {}, 429: {})",
                    self.counters.requests_failed, self.counters.http_503, self.counters.http_429
                ),
            ),
        ];
        rows.push((
            "data disk",
            crate::disk::describe(self.machine.data_disk.as_ref()),
        ));
        if let Some(server) = &self.server {
            let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
            rows.push(("server cpu % (mean)", opt(server.server_cpu_percent_mean)));
            rows.push(("server rss MB (max)", opt(server.server_rss_mb_max)));
            rows.push(("fsync p99 ms (max)", opt(server.fsync_p99_ms_max)));
            rows.push(("items per fsync (mean)", opt(server.batch_items_mean)));
        }
        for (kind, n) in &self.counters.errors_by_kind {
            rows.push(("  error", format!("{kind}: {n}")));
        }
        render_rows(&rows)
    }
}

/// `cel_ledger (examples/domains/ledger.toml)`, or `built-in` without `--domain`.
pub fn describe_domain(domain: Option<&crate::domain::DomainInfo>) -> String {
    domain.map_or_else(
        || "built-in".to_owned(),
        |d| format!("{} ({})", d.name, d.file),
    )
}

fn render_rows(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<width$}  {v}");
    }
    out
}

/// `1234567.8` as `1,234,568`.
pub fn group(value: f64) -> String {
    if !value.is_finite() {
        return value.to_string();
    }
    let rounded = value.round().abs() as u128;
    let digits = rounded.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if value.round() < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

/// A side-by-side table of result files (load or engine), one column per file.
pub fn compare_table(results: &[(String, Value)]) -> String {
    let num = |v: &Value, path: &[&str]| -> Option<f64> {
        let mut cur = v;
        for key in path {
            cur = cur.get(key)?;
        }
        cur.as_f64()
    };
    let rows: [(&str, &[&str], u8); 11] = [
        ("workers", &["parameters", "workers"], 0),
        ("batch", &["parameters", "batch"], 0),
        ("duration s", &["duration_s"], 1),
        ("committed items/s", &["items_per_sec"], 0),
        ("rejected items/s", &["rejected_per_sec"], 0),
        ("requests/s", &["batches_per_sec"], 1),
        ("p50 ms", &["latency_ms", "p50"], 3),
        ("p99 ms", &["latency_ms", "p99"], 3),
        ("p999 ms", &["latency_ms", "p999"], 3),
        ("max ms", &["latency_ms", "max"], 3),
        ("failed requests", &["requests_failed"], 0),
    ];
    let mut table: Vec<Vec<String>> = vec![
        std::iter::once(String::new())
            .chain(results.iter().map(|(n, _)| n.clone()))
            .collect(),
        std::iter::once("domain".to_owned())
            .chain(results.iter().map(|(_, v)| domain_of(v)))
            .collect(),
    ];
    for (label, path, decimals) in rows {
        let mut line = vec![label.to_owned()];
        for (_, v) in results {
            line.push(match num(v, path) {
                Some(x) if decimals == 0 => group(x),
                Some(x) => format!("{x:.prec$}", prec = decimals as usize),
                None => "-".to_owned(),
            });
        }
        table.push(line);
    }
    let columns = table[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            table
                .iter()
                .map(|row| row.get(c).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &table {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c == 0 {
                    format!("{cell:<w$}", w = widths[c])
                } else {
                    format!("{cell:>w$}", w = widths[c])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

/// The domain a result file ran against: its name, `built-in` for a load without `--domain`,
/// `-` for a file that does not say (an engine result, an older load result).
fn domain_of(result: &Value) -> String {
    match result.get("parameters").and_then(|p| p.get("domain")) {
        Some(Value::Null) => "built-in".to_owned(),
        Some(domain) => domain
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned(),
        None => "-".to_owned(),
    }
}

/// The second result's committed items/s over the first's, for `compare --min-ratio`.
#[derive(Clone, Debug, PartialEq)]
pub struct Ratio {
    pub ratio: f64,
    pub min_ratio: f64,
    /// `<second label> / <first label>: <ratio> (<second> / <first> committed items/s; at least
    /// <min>): OK` or `... UNDER THE MINIMUM`.
    pub line: String,
}

impl Ratio {
    pub fn passed(&self) -> bool {
        self.ratio >= self.min_ratio
    }
}

/// The ratio of two results' `items_per_sec` (second / first), checked against `min_ratio`.
pub fn items_ratio(results: &[(String, Value)], min_ratio: f64) -> Result<Ratio, String> {
    let [(base_label, base), (label, other)] = results else {
        return Err(format!(
            "--min-ratio compares exactly two result files (the second over the first), not {}",
            results.len()
        ));
    };
    let items = |label: &str, v: &Value| {
        v.get("items_per_sec")
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| format!("result `{label}` has no items_per_sec"))
    };
    let base_items = items(base_label, base)?;
    let other_items = items(label, other)?;
    if base_items <= 0.0 {
        return Err(format!(
            "result `{base_label}` committed nothing (items_per_sec 0): no ratio"
        ));
    }
    let ratio = other_items / base_items;
    let verdict = if ratio >= min_ratio {
        "OK"
    } else {
        "UNDER THE MINIMUM"
    };
    Ok(Ratio {
        ratio,
        min_ratio,
        line: format!(
            "committed items/s ratio {label} / {base_label}: {ratio:.3} ({} / {}; at least {min_ratio}): {verdict}",
            group(other_items),
            group(base_items),
        ),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ratio_is_second_over_first_and_checked() {
        let builtin = json!({"items_per_sec": 200000.0, "parameters": {"domain": null}});
        let file = json!({"items_per_sec": 150000.0,
                          "parameters": {"domain": {"name": "cel_ledger", "file": "l.toml"}}});
        let results = [("built-in".to_owned(), builtin), ("file".to_owned(), file)];
        let r = items_ratio(&results, 0.5).unwrap();
        assert_eq!(r.ratio, 0.75);
        assert!(r.passed());
        assert_eq!(
            r.line,
            "committed items/s ratio file / built-in: 0.750 (150,000 / 200,000; at least 0.5): OK"
        );
        let r = items_ratio(&results, 0.8).unwrap();
        assert!(
            !r.passed() && r.line.ends_with("UNDER THE MINIMUM"),
            "{}",
            r.line
        );
        let t = compare_table(&results);
        let domain = t.lines().find(|l| l.starts_with("domain")).unwrap();
        assert!(
            domain.contains("built-in") && domain.contains("cel_ledger"),
            "{domain}"
        );
        // Not two files, or nothing to divide by: no ratio.
        assert!(items_ratio(&results[..1], 0.5).is_err());
        let zero = [
            ("a".to_owned(), json!({"items_per_sec": 0.0})),
            ("b".to_owned(), json!({"items_per_sec": 1.0})),
        ];
        assert!(
            items_ratio(&zero, 0.5)
                .unwrap_err()
                .contains("committed nothing")
        );
        let missing = [
            ("a".to_owned(), json!({"items_per_sec": 1.0})),
            ("b".to_owned(), json!({})),
        ];
        assert!(items_ratio(&missing, 0.5).unwrap_err().contains("`b`"));
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(group(0.0), "0");
        assert_eq!(group(999.4), "999");
        assert_eq!(group(1000.0), "1,000");
        assert_eq!(group(254_321.6), "254,322");
        assert_eq!(group(-1_234_567.0), "-1,234,567");
    }

    #[test]
    fn proc_files_parse() {
        assert_eq!(
            cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n").as_deref(),
            Some("AMD EPYC 7B13")
        );
        assert_eq!(
            memory_total_mb("MemTotal:       25165824 kB\nMemFree: 1 kB\n"),
            Some(24576)
        );
        let m = Machine::read(None).unwrap();
        assert!(m.cores >= 1);
        assert!(m.kernel.is_some());
    }

    #[test]
    fn sample_summary_takes_max_and_mean() {
        let rows = vec![
            SampleRow {
                queue_items: Some(10.0),
                server_cpu_percent: Some(50.0),
                ..SampleRow::default()
            },
            SampleRow {
                queue_items: Some(30.0),
                server_cpu_percent: Some(150.0),
                ..SampleRow::default()
            },
            SampleRow::default(),
        ];
        let s = summarize_samples(&rows);
        assert_eq!(s.samples, 3);
        assert_eq!(s.queue_items_max, Some(30.0));
        assert_eq!(s.server_cpu_percent_mean, Some(100.0));
        assert_eq!(s.fsync_p99_ms_max, None);
    }

    #[test]
    fn compare_puts_runs_side_by_side() {
        let a = json!({"parameters": {"workers": 1, "batch": 1000}, "duration_s": 60.0, "items_per_sec": 250000.0,
                       "batches_per_sec": 250.0, "latency_ms": {"p50": 3.5, "p99": 9.25, "max": 20.0}});
        let b = json!({"parameters": {"workers": 1, "batch": 2000}, "items_per_sec": 300000.0});
        let t = compare_table(&[("batch1000".into(), a), ("batch2000".into(), b)]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("batch1000") && lines[0].contains("batch2000"));
        let items = lines
            .iter()
            .find(|l| l.starts_with("committed items/s"))
            .unwrap();
        assert!(
            items.contains("250,000") && items.contains("300,000"),
            "{items}"
        );
        let p99 = lines.iter().find(|l| l.starts_with("p99 ms")).unwrap();
        assert!(
            p99.contains("9.250") && p99.trim_end().ends_with('-'),
            "{p99}"
        );
    }
}
