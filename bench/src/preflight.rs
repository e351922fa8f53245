//! The fio preflight: how fast can the data disk make a 4 KiB write durable?
//!
//! Keel's throughput is bounded by one fsync per batch, so a benchmark on a disk with slow or
//! erratic syncs measures the disk, not Keel. The preflight runs
//! `fio --name=fsync --rw=randwrite --bs=4k --direct=1 --sync=1 --size=64m --runtime=10
//! --time_based --directory=DIR --output-format=json`, in a fresh subdirectory of DIR that it
//! removes afterwards, and compares the p99 write+sync latency with a threshold. The p99, not
//! the mean: a batch waits for its own fsync, so the tail is what a client sees.
//!
//! `--direct=1` (O_DIRECT) is refused by some file systems (tmpfs, some overlays). Then the
//! run is repeated without it and the result says so (`direct: false` and a `note`).

use crate::disk::DataDisk;
use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const PREFLIGHT_SCHEMA: &str = "keel-bench.preflight.v1";

#[derive(Clone, Debug)]
pub struct PreflightConfig {
    pub dir: PathBuf,
    pub fsync_max_lat_us: u64,
    pub runtime: Duration,
    pub size: String,
    pub fio: PathBuf,
}

/// What fio measured, as written to the preflight JSON.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PreflightResult {
    pub schema: &'static str,
    pub dir: String,
    /// The disk `dir` is on (device, file system, mount point), as findmnt says.
    pub disk: Option<DataDisk>,
    pub fio_version: Option<String>,
    pub direct: bool,
    pub note: Option<String>,
    pub command: Vec<String>,
    pub write_iops: f64,
    pub fsync_avg_us: f64,
    pub fsync_p50_us: Option<f64>,
    pub fsync_p99_us: f64,
    pub fsync_max_us: Option<f64>,
    /// `FSYNC_MAX_LAT_US`: the most p99 write+sync latency a benchmark accepts.
    pub threshold_us: u64,
    pub passed: bool,
}

/// The latency numbers of one fio run.
#[derive(Clone, Debug, PartialEq)]
pub struct FioNumbers {
    pub fio_version: Option<String>,
    pub iops: f64,
    pub avg_us: f64,
    pub p50_us: Option<f64>,
    pub p99_us: f64,
    pub max_us: Option<f64>,
}

/// Reads fio's `--output-format=json` output. fio may print notes before the JSON, so parsing
/// starts at the first `{`. With `--sync=1` every write is synchronous and its completion
/// latency (`clat_ns`) includes the sync; when fio ran with `--fsync=N` instead, the separate
/// `sync` section is used.
pub fn parse_fio_json(output: &str) -> anyhow::Result<FioNumbers> {
    let start = output
        .find('{')
        .ok_or_else(|| anyhow!("fio printed no JSON"))?;
    let value: Value =
        serde_json::from_str(&output[start..]).context("fio's output is not JSON")?;
    let job = value
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or_else(|| anyhow!("fio's JSON has no jobs"))?;
    if let Some(error) = job.get("error").and_then(Value::as_i64).filter(|e| *e != 0) {
        bail!("fio's job failed with error {error}");
    }
    let write = job
        .get("write")
        .ok_or_else(|| anyhow!("fio's job has no write section"))?;
    let iops = write.get("iops").and_then(Value::as_f64).unwrap_or(0.0);
    let sync_lat = job
        .get("sync")
        .and_then(|s| s.get("lat_ns"))
        .filter(|l| l.get("N").and_then(Value::as_u64).unwrap_or(0) > 0);
    let lat = match sync_lat {
        Some(lat) => lat,
        None => write
            .get("clat_ns")
            .or_else(|| write.get("lat_ns"))
            .ok_or_else(|| anyhow!("no latency in fio's JSON"))?,
    };
    let ns = |key: &str| lat.get(key).and_then(Value::as_f64);
    let percentile = |p: &str| {
        lat.get("percentile")
            .and_then(|ps| ps.get(p))
            .and_then(Value::as_f64)
    };
    let avg_ns = ns("mean").ok_or_else(|| anyhow!("fio's JSON has no mean latency"))?;
    if iops <= 0.0 || avg_ns <= 0.0 {
        bail!("fio completed no writes (iops {iops}, mean latency {avg_ns} ns)");
    }
    let p99_ns = percentile("99.000000")
        .or_else(|| ns("max"))
        .ok_or_else(|| anyhow!("fio's JSON has no p99"))?;
    Ok(FioNumbers {
        fio_version: value
            .get("fio version")
            .and_then(Value::as_str)
            .map(str::to_owned),
        iops,
        avg_us: avg_ns / 1000.0,
        p50_us: percentile("50.000000").map(|v| v / 1000.0),
        p99_us: p99_ns / 1000.0,
        max_us: ns("max").map(|v| v / 1000.0),
    })
}

pub fn fio_args(dir: &Path, runtime: Duration, size: &str, direct: bool) -> Vec<String> {
    let mut args = vec![
        "--name=fsync".to_owned(),
        "--rw=randwrite".to_owned(),
        "--bs=4k".to_owned(),
    ];
    if direct {
        args.push("--direct=1".to_owned());
    }
    args.extend([
        "--sync=1".to_owned(),
        format!("--size={size}"),
        format!("--runtime={}", runtime.as_secs().max(1)),
        "--time_based".to_owned(),
        format!("--directory={}", dir.display()),
        "--output-format=json".to_owned(),
    ]);
    args
}

/// Runs the preflight; `Ok` holds the result whether or not it passed.
pub fn run(config: &PreflightConfig) -> anyhow::Result<PreflightResult> {
    std::fs::create_dir_all(&config.dir)
        .with_context(|| format!("creating {}", config.dir.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix(".keel-preflight-")
        .tempdir_in(&config.dir)
        .with_context(|| format!("creating a scratch directory in {}", config.dir.display()))?;
    let direct_args = fio_args(scratch.path(), config.runtime, &config.size, true);
    let (numbers, args, direct, note) = match run_fio(config, &direct_args) {
        Ok(numbers) => (numbers, direct_args, true, None),
        Err(direct_error) => {
            let note = format!(
                "fio with --direct=1 failed ({direct_error:#}); measured again WITHOUT --direct (buffered writes \
                 with O_SYNC): the file system probably refuses O_DIRECT (tmpfs/overlay?)"
            );
            eprintln!("preflight: {note}");
            let args = fio_args(scratch.path(), config.runtime, &config.size, false);
            let numbers = run_fio(config, &args).context("fio failed without --direct too")?;
            (numbers, args, false, Some(note))
        }
    };
    let passed = numbers.p99_us <= config.fsync_max_lat_us as f64;
    let mut command = vec![config.fio.display().to_string()];
    command.extend(args);
    Ok(PreflightResult {
        schema: PREFLIGHT_SCHEMA,
        dir: config.dir.display().to_string(),
        disk: DataDisk::of(&config.dir),
        fio_version: numbers.fio_version,
        direct,
        note,
        command,
        write_iops: numbers.iops,
        fsync_avg_us: numbers.avg_us,
        fsync_p50_us: numbers.p50_us,
        fsync_p99_us: numbers.p99_us,
        fsync_max_us: numbers.max_us,
        threshold_us: config.fsync_max_lat_us,
        passed,
    })
}

/// Runs fio with `args`, bounded by its runtime plus a minute (it lays out the file first).
fn run_fio(config: &PreflightConfig, args: &[String]) -> anyhow::Result<FioNumbers> {
    let mut child = Command::new(&config.fio)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!(
                "`{}` not found: install fio (`apt-get install fio`; `make preflight` does it)",
                config.fio.display()
            ),
            _ => anyhow!("starting {}: {e}", config.fio.display()),
        })?;
    let limit = config.runtime + Duration::from_secs(60);
    let started = Instant::now();
    loop {
        if child.try_wait().context("waiting for fio")?.is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "fio did not finish within {} s; the disk may be hung",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().context("reading fio's output")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "fio exited with {}: {}",
            output.status,
            first_lines(&format!("{stderr}\n{stdout}"), 4)
        );
    }
    parse_fio_json(&stdout)
}

fn first_lines(text: &str, n: usize) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(n)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// The human summary of a preflight.
pub fn describe(result: &PreflightResult) -> String {
    let verdict = if result.passed {
        format!(
            "PASS: p99 {:.0} us <= FSYNC_MAX_LAT_US {} us",
            result.fsync_p99_us, result.threshold_us
        )
    } else {
        format!(
            "FAIL: p99 write+fsync latency {:.0} us exceeds FSYNC_MAX_LAT_US {} us. This disk is too slow for a \
             meaningful Keel benchmark (every batch waits for one fsync); use a faster data disk, or raise \
             FSYNC_MAX_LAT_US knowingly.",
            result.fsync_p99_us, result.threshold_us
        )
    };
    format!(
        "fsync preflight on {}{}\n  data disk: {}\n  write IOPS (4 KiB, O_SYNC): {:.0}\n  fsync latency avg: {:.0} us  p50: {}  p99: {:.0} us  max: {}\n  {verdict}\n",
        result.dir,
        if result.direct {
            ""
        } else {
            " (WITHOUT O_DIRECT)"
        },
        crate::disk::describe(result.disk.as_ref()),
        result.write_iops,
        result.fsync_avg_us,
        result
            .fsync_p50_us
            .map_or("-".to_owned(), |v| format!("{v:.0} us")),
        result.fsync_p99_us,
        result
            .fsync_max_us
            .map_or("-".to_owned(), |v| format!("{v:.0} us")),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Trimmed from a real `fio-3.33 --output-format=json` run with `--sync=1`.
    const FIO_OUTPUT: &str = r#"note: both iodepth >= 1 and synchronous I/O engine are selected, queue depth will be capped at 1
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "fsync",
      "error" : 0,
      "write" : {
        "io_bytes" : 41943040,
        "iops" : 1024.5,
        "clat_ns" : {
          "min" : 500000, "max" : 9000000, "mean" : 975000.0, "stddev" : 100.0, "N" : 10240,
          "percentile" : {"50.000000" : 900000, "99.000000" : 2100000, "99.900000" : 5000000}
        },
        "lat_ns" : {"min" : 510000, "max" : 9100000, "mean" : 985000.0, "N" : 10240}
      },
      "sync" : {"total_ios" : 0, "lat_ns" : {"min" : 0, "max" : 0, "mean" : 0.0, "N" : 0}}
    }
  ]
}"#;

    #[test]
    fn parses_write_sync_latency_and_iops() {
        let n = parse_fio_json(FIO_OUTPUT).unwrap();
        assert_eq!(n.fio_version.as_deref(), Some("fio-3.33"));
        assert_eq!(n.iops, 1024.5);
        assert_eq!(n.avg_us, 975.0);
        assert_eq!(n.p50_us, Some(900.0));
        assert_eq!(n.p99_us, 2100.0);
        assert_eq!(n.max_us, Some(9000.0));
    }

    #[test]
    fn prefers_the_sync_section_when_fio_ran_fsync_calls() {
        let with_sync = FIO_OUTPUT.replace(
            r#""sync" : {"total_ios" : 0, "lat_ns" : {"min" : 0, "max" : 0, "mean" : 0.0, "N" : 0}}"#,
            r#""sync" : {"total_ios" : 5, "lat_ns" : {"mean" : 3000000.0, "max": 4000000, "N" : 5,
                "percentile" : {"99.000000" : 4000000}}}"#,
        );
        let n = parse_fio_json(&with_sync).unwrap();
        assert_eq!((n.avg_us, n.p99_us), (3000.0, 4000.0));
    }

    #[test]
    fn failed_or_empty_runs_are_errors() {
        assert!(
            parse_fio_json("fio: looks like your file system does not support direct=1").is_err()
        );
        assert!(parse_fio_json(&FIO_OUTPUT.replace(r#""error" : 0"#, r#""error" : 22"#)).is_err());
        assert!(
            parse_fio_json(&FIO_OUTPUT.replace(r#""iops" : 1024.5"#, r#""iops" : 0"#)).is_err()
        );
    }

    #[test]
    fn the_command_is_the_documented_one() {
        let args = fio_args(
            Path::new("/var/lib/keel"),
            Duration::from_secs(10),
            "64m",
            true,
        )
        .join(" ");
        assert_eq!(
            args,
            "--name=fsync --rw=randwrite --bs=4k --direct=1 --sync=1 --size=64m --runtime=10 --time_based \
             --directory=/var/lib/keel --output-format=json"
        );
        assert!(
            !fio_args(Path::new("/d"), Duration::from_secs(3), "8m", false)
                .join(" ")
                .contains("--direct=")
        );
    }

    #[test]
    fn a_missing_fio_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = PreflightConfig {
            dir: dir.path().to_owned(),
            fsync_max_lat_us: 5000,
            runtime: Duration::from_secs(1),
            size: "1m".into(),
            fio: PathBuf::from("/nonexistent/fio"),
        };
        let error = format!("{:#}", run(&config).unwrap_err());
        assert!(error.contains("install fio"), "{error}");
    }

    #[test]
    fn verdicts_name_the_threshold() {
        let mut r = PreflightResult {
            schema: PREFLIGHT_SCHEMA,
            dir: "/d".into(),
            disk: None,
            fio_version: None,
            direct: true,
            note: None,
            command: vec![],
            write_iops: 100.0,
            fsync_avg_us: 900.0,
            fsync_p50_us: None,
            fsync_p99_us: 6000.0,
            fsync_max_us: None,
            threshold_us: 5000,
            passed: false,
        };
        assert!(
            describe(&r)
                .contains("FAIL: p99 write+fsync latency 6000 us exceeds FSYNC_MAX_LAT_US 5000 us")
        );
        r.passed = true;
        r.fsync_p99_us = 100.0;
        assert!(describe(&r).contains("PASS"));
    }
}
