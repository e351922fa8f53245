//! bench/run-scenario.sh end to end, the way `make bench` runs it but for two seconds: a fresh
//! `keel serve`, the load, SIGTERM, `keel audit`, and the results directory. Also the refusals:
//! a disk slower than FSYNC_MAX_LAT_US, and usage errors.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use common::{is_png, keel_bench_bin, keel_bin, repo_root};
use std::path::Path;
use std::process::{Command, Output};

fn scenario(name: &str, results: &Path, data_root: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new("bash");
    command
        .arg(repo_root().join("bench/run-scenario.sh"))
        .arg(name)
        .arg(results)
        .env("KEEL_BIN", keel_bin())
        .env("KEEL_BENCH_BIN", keel_bench_bin())
        .env("BENCH_DATA_ROOT", data_root)
        .env_remove("RESULTS_DIR");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn http_scenario_passes_with_integrity_ok_and_leaves_every_artifact() {
    let results = tempfile::tempdir().unwrap();
    let data_root = tempfile::tempdir().unwrap();
    let out = results.path().join("run");
    let output = scenario(
        "test-http",
        &out,
        data_root.path(),
        &[
            ("BENCH_PREFLIGHT", "0"),
            ("BENCH_WORKERS", "2"),
            ("BENCH_BATCH", "100"),
            ("BENCH_DURATION", "2s"),
            ("BENCH_ACCOUNTS", "100"),
            ("BENCH_SAMPLE_INTERVAL", "500ms"),
        ],
    );
    assert!(
        output.status.success(),
        "scenario failed:\n{}",
        text(&output)
    );
    let verdict = std::fs::read_to_string(out.join("VERDICT")).unwrap();
    assert!(verdict.starts_with("PASSED"), "{verdict}");
    let audit = std::fs::read_to_string(out.join("audit.txt")).unwrap();
    assert_eq!(audit.lines().last().map(str::trim), Some("INTEGRITY_OK"));
    for file in [
        "result.json",
        "metrics.csv",
        "summary.txt",
        "server.log",
        "server.pid",
        "scenario.env",
        "progress.log",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    for plot in ["timeline.png", "latency.png", "server.png"] {
        assert!(is_png(&std::fs::read(out.join(plot)).unwrap()), "{plot}");
    }
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("result.json")).unwrap()).unwrap();
    assert!(result["items_per_sec"].as_f64().unwrap() > 0.0);
    // The temporary store is removed after the audit.
    assert_eq!(
        std::fs::read_dir(data_root.path()).unwrap().count(),
        0,
        "data left behind"
    );
}

#[test]
fn engine_scenario_audits_the_in_process_store() {
    let results = tempfile::tempdir().unwrap();
    let data_root = tempfile::tempdir().unwrap();
    let out = results.path().join("engine");
    let output = scenario(
        "test-engine",
        &out,
        data_root.path(),
        &[
            ("BENCH_KIND", "engine"),
            ("BENCH_PREFLIGHT", "0"),
            ("BENCH_BATCH", "100"),
            ("BENCH_DURATION", "1s"),
            ("BENCH_ACCOUNTS", "100"),
        ],
    );
    assert!(
        output.status.success(),
        "scenario failed:\n{}",
        text(&output)
    );
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("result.json")).unwrap()).unwrap();
    assert_eq!(result["schema"], "keel-bench.engine.v1");
    assert!(result["items_per_sec"].as_f64().unwrap() > 0.0);
    let audit = std::fs::read_to_string(out.join("audit.txt")).unwrap();
    assert_eq!(audit.lines().last().map(str::trim), Some("INTEGRITY_OK"));
}

#[test]
fn a_disk_slower_than_the_threshold_stops_the_scenario_before_any_server() {
    let results = tempfile::tempdir().unwrap();
    let data_root = tempfile::tempdir().unwrap();
    let out = results.path().join("slow");
    let output = scenario(
        "test-slow-disk",
        &out,
        data_root.path(),
        &[("FSYNC_MAX_LAT_US", "1"), ("FIO_RUNTIME", "1s")],
    );
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    let verdict = std::fs::read_to_string(out.join("VERDICT")).unwrap();
    assert!(verdict.starts_with("FAILED: preflight"), "{verdict}");
    let preflight = std::fs::read_to_string(out.join("preflight.txt")).unwrap();
    assert!(
        preflight.contains("exceeds FSYNC_MAX_LAT_US 1 us"),
        "{preflight}"
    );
    assert!(
        !out.join("server.log").exists(),
        "a server was started on a disk that failed the preflight"
    );
}

#[test]
fn usage_errors_are_refused_before_anything_runs() {
    let results = tempfile::tempdir().unwrap();
    let data_root = tempfile::tempdir().unwrap();
    let out = results.path().join("x");
    let bad_kind = scenario("x", &out, data_root.path(), &[("BENCH_KIND", "gpu")]);
    assert_eq!(bad_kind.status.code(), Some(2));
    assert!(text(&bad_kind).contains("BENCH_KIND"));
    let bad_name = scenario("../escape", &out, data_root.path(), &[]);
    assert_eq!(bad_name.status.code(), Some(2));
    let missing = scenario(
        "x",
        &out,
        data_root.path(),
        &[("KEEL_BIN", "/nonexistent/keel")],
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing).contains("cargo build --release -p keel-ingress -p keel-bench"));
}
