//! Loads against a real `keel serve` (release binary, free 127.0.0.1 port, temporary data
//! directory) through the library entry the binary uses, for about two seconds per test.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use clap::Parser;
use common::{Server, is_png};
use keel_bench::cli::{Cli, LoadArgs};
use keel_bench::report::LoadReport;
use keel_bench::sampler::{self, CSV_HEADER};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

fn load_args(extra: &[&str]) -> LoadArgs {
    let cli =
        Cli::try_parse_from(std::iter::once("keel-bench").chain(extra.iter().copied())).unwrap();
    cli.load
}

fn run(args: &LoadArgs) -> LoadReport {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(keel_bench::run_load_command(args))
        .unwrap()
}

fn server_items_committed(url: &str) -> f64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let text = runtime.block_on(async {
        keel_projection::http_client::builder(&Default::default())
            .unwrap()
            .build()
            .unwrap()
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    sampler::parse_exposition(&text)
        .sum("keel_items_committed_total")
        .unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn closed_loop_two_workers_writes_the_documented_results() {
    let mut server = Server::start();
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("result.json");
    let csv = out.path().join("metrics.csv");
    let pid = server.pid().to_string();
    let args = load_args(&[
        "--url",
        &server.url,
        "--workers",
        "2",
        "--batch",
        "100",
        "--duration",
        "2s",
        "--accounts",
        "200",
        "--payload-bytes",
        "64",
        "--json",
        json.to_str().unwrap(),
        "--sample-metrics",
        csv.to_str().unwrap(),
        "--sample-interval",
        "500ms",
        "--server-pid",
        &pid,
        "--plot-dir",
        out.path().to_str().unwrap(),
        "--label",
        "smoke",
        "--quiet",
    ]);
    let report = run(&args);

    assert!(report.counters.items_committed > 0, "nothing committed");
    assert_eq!(
        report.counters.requests_failed, 0,
        "errors: {:?}",
        report.counters.errors_by_kind
    );
    assert_eq!(
        report.counters.items_rejected, 0,
        "rejections: {:?}",
        report.counters.rejected_by_code
    );
    assert_eq!(
        report.counters.items_committed,
        report.counters.requests_ok * 100
    );
    // The server counted exactly what the bench counted, plus setup (200 opens + 200 deposits).
    assert_eq!(
        server_items_committed(&server.url),
        (report.counters.items_committed + 400) as f64
    );

    let v = read_json(&json);
    for key in [
        "items_per_sec",
        "rejected_per_sec",
        "batches_per_sec",
        "duration_s",
    ] {
        assert!(v[key].is_number(), "{key} missing: {v}");
    }
    let latency = &v["latency_ms"];
    let p = |k: &str| {
        latency[k]
            .as_f64()
            .unwrap_or_else(|| panic!("latency_ms.{k} missing"))
    };
    assert!(p("p50") > 0.0 && p("p50") <= p("p90") && p("p90") <= p("p99"));
    assert!(p("p99") <= p("p999") && p("p999") <= p("max"));
    let duration = v["duration_s"].as_f64().unwrap();
    assert!((1.9..10.0).contains(&duration), "duration {duration}");
    let items_per_sec = v["items_per_sec"].as_f64().unwrap();
    assert!(
        (items_per_sec - report.counters.items_committed as f64 / duration).abs()
            < 1e-6 * items_per_sec.max(1.0)
    );
    assert_eq!(v["parameters"]["workers"], 2);
    assert_eq!(v["parameters"]["batch"], 100);
    assert_eq!(v["parameters"]["mode"], "closed");
    assert!(v["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(v["git_commit"].is_string());
    assert!(!v["timeline"].as_array().unwrap().is_empty());
    assert_eq!(v["schema"], "keel-bench.load.v1");

    let csv_text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = csv_text.lines();
    assert_eq!(lines.next(), Some(CSV_HEADER));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert!(rows.len() >= 3, "{csv_text}");
    let columns: Vec<&str> = CSV_HEADER.split(',').collect();
    let cell = |row: &Vec<&str>, name: &str| {
        row[columns.iter().position(|c| *c == name).unwrap()].to_owned()
    };
    let last = rows.last().unwrap();
    assert!(cell(last, "items_committed_total").parse::<f64>().unwrap() > 0.0);
    assert!(cell(last, "server_rss_mb").parse::<f64>().unwrap() > 1.0);
    assert!(rows.iter().any(|r| {
        cell(r, "server_cpu_percent")
            .parse::<f64>()
            .is_ok_and(|c| c > 0.0)
    }));
    assert!(rows.iter().any(|r| {
        cell(r, "fsync_p99_ms")
            .parse::<f64>()
            .is_ok_and(|f| f > 0.0)
    }));

    for name in ["timeline", "latency", "server"] {
        let png = std::fs::read(out.path().join(format!("{name}.png"))).unwrap();
        assert!(is_png(&png), "{name}.png is not a PNG");
        let svg = std::fs::read_to_string(out.path().join(format!("{name}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("smoke"), "{name}.svg");
    }

    let status = server
        .terminate(Duration::from_secs(30))
        .expect("keel serve stops within 30 s of SIGTERM");
    assert!(
        status.success(),
        "keel serve exited {status}; log:\n{}",
        server.log_text()
    );
}

#[test]
fn open_loop_mixed_workload_rejects_exactly_the_designed_items() {
    let server = Server::start();
    let args = load_args(&[
        "--url",
        &server.url,
        "--workers",
        "2",
        "--batch",
        "100",
        "--duration",
        "2s",
        "--rate",
        "20000",
        "--mix",
        "mixed",
        "--accounts",
        "100",
        "--skus",
        "20",
        "--reject-ratio",
        "0.2",
        "--seed",
        "7",
        "--quiet",
    ]);
    let report = run(&args);
    assert_eq!(report.parameters.mode, "open");
    assert_eq!(
        report.counters.requests_failed, 0,
        "errors: {:?}",
        report.counters.errors_by_kind
    );
    assert!(report.counters.items_committed > 0);
    assert!(report.counters.items_rejected > 0);
    assert_eq!(
        report.counters.items_rejected, report.counters.items_designed_to_reject,
        "{:?}",
        report.counters.rejected_by_code
    );
    for code in report.counters.rejected_by_code.keys() {
        assert!(
            ["insufficient_funds", "insufficient_stock"].contains(&code.as_str()),
            "unexpected {code}"
        );
    }
    // The open loop never sends ahead of its schedule: 20,000 items/s in 100-item requests for
    // 2 s is at most 400 requests.
    assert!(
        report.counters.requests_ok <= 400,
        "{} requests",
        report.counters.requests_ok
    );
}

#[test]
fn atomic_requests_with_a_rejected_item_roll_back_whole() {
    let server = Server::start();
    let args = load_args(&[
        "--url",
        &server.url,
        "--workers",
        "1",
        "--batch",
        "10",
        "--duration",
        "1s",
        "--accounts",
        "20",
        "--reject-ratio",
        "0.3",
        "--atomic",
        "--quiet",
    ]);
    let report = run(&args);
    assert_eq!(
        report.counters.requests_failed, 0,
        "errors: {:?}",
        report.counters.errors_by_kind
    );
    assert!(
        report
            .counters
            .rejected_by_code
            .get("atomic_rollback")
            .copied()
            .unwrap_or(0)
            > 0
    );
    // All or nothing: committed items come in whole requests of 10.
    assert_eq!(report.counters.items_committed % 10, 0);
    assert_eq!(
        report.counters.items_committed + report.counters.items_rejected,
        report.counters.requests_ok * 10
    );
}

#[test]
fn the_binary_refuses_a_non_loopback_target_before_sending_anything() {
    let output = std::process::Command::new(common::keel_bench_bin())
        .args(["--url", "http://10.11.12.13:8080", "--duration", "1s"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("only loopback targets"), "{stderr}");
}

#[test]
fn a_missing_server_fails_fast_with_a_clear_message() {
    let port = common::free_port();
    let output = std::process::Command::new(common::keel_bench_bin())
        .args([
            "--url",
            &format!("http://127.0.0.1:{port}"),
            "--duration",
            "1s",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no Keel server answers"), "{stderr}");
}
