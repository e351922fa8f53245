//! The fio preflight with the real fio (one-second runs on a temporary directory).

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::process::Command;

fn preflight(dir: &std::path::Path, json: &std::path::Path, max_us: &str) -> std::process::Output {
    Command::new(common::keel_bench_bin())
        .args(["--preflight", "--dir"])
        .arg(dir)
        .args([
            "--fio-runtime",
            "1s",
            "--fio-size",
            "4m",
            "--fsync-max-lat-us",
            max_us,
            "--json",
        ])
        .arg(json)
        .output()
        .unwrap()
}

#[test]
fn preflight_measures_the_disk_and_writes_its_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("preflight.json");
    let output = preflight(&dir.path().join("disk"), &json, "100000000");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("PASS") && stdout.contains("write IOPS"),
        "{stdout}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["schema"], "keel-bench.preflight.v1");
    assert!(v["write_iops"].as_f64().unwrap() > 0.0);
    let avg = v["fsync_avg_us"].as_f64().unwrap();
    let p99 = v["fsync_p99_us"].as_f64().unwrap();
    assert!(avg > 0.0 && p99 >= avg * 0.5, "avg {avg} p99 {p99}");
    assert_eq!(v["passed"], true);
    assert_eq!(v["threshold_us"], 100_000_000);
    // fio's scratch directory is gone; only what we asked for is left.
    assert_eq!(
        std::fs::read_dir(dir.path().join("disk")).unwrap().count(),
        0
    );
}

#[test]
fn preflight_fails_with_exit_3_on_a_disk_above_the_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("preflight.json");
    let output = preflight(dir.path(), &json, "1");
    assert_eq!(
        output.status.code(),
        Some(i32::from(keel_bench::EXIT_DISK_TOO_SLOW))
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("FAIL: p99 write+fsync latency"), "{stdout}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["passed"], false);
}

#[test]
fn preflight_without_dir_says_what_is_missing() {
    let output = Command::new(common::keel_bench_bin())
        .arg("--preflight")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--preflight needs --dir"));
}
