//! bench/run-scenario.sh end to end, the way `make bench` runs it but for two seconds: a fresh
//! `keel serve`, the load, SIGTERM, `keel audit`, and the results directory. Also the refusals:
//! a disk slower than FSYNC_MAX_LAT_US, and usage errors. And BENCH_DOMAIN: a scenario against a
//! declared domain file, and `make bench-domain` (built-in vs file, then the ratio).

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
            // The ids keel_client sends (UUIDv4-sized random hex), through the whole path.
            ("BENCH_IDS", "random"),
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
    assert_eq!(result["parameters"]["ids"], "random", "{result}");
    assert_eq!(result["requests_failed"], 0, "{result}");
    assert_eq!(result["items_rejected"], 0, "{result}");
    // The temporary store is removed after the audit.
    assert_eq!(
        std::fs::read_dir(data_root.path()).unwrap().count(),
        0,
        "data left behind"
    );
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn http_scenario_with_a_domain_file_serves_and_loads_it_and_records_it() {
    let results = tempfile::tempdir().unwrap();
    let data_root = tempfile::tempdir().unwrap();
    let out = results.path().join("run");
    // Relative to the repository, not to the current directory (bench/ under cargo test).
    let output = scenario(
        "test-domain",
        &out,
        data_root.path(),
        &[
            ("BENCH_DOMAIN", "examples/domains/ledger.toml"),
            ("BENCH_PREFLIGHT", "0"),
            ("BENCH_WORKERS", "2"),
            ("BENCH_BATCH", "100"),
            ("BENCH_DURATION", "2s"),
            ("BENCH_ACCOUNTS", "100"),
            ("BENCH_REJECT_RATIO", "0.05"),
            ("BENCH_PAYLOAD_BYTES", "16"),
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
    let result = read_json(&out.join("result.json"));
    let domain = &result["parameters"]["domain"];
    assert_eq!(domain["name"], "cel_ledger", "{result}");
    assert!(
        domain["file"]
            .as_str()
            .unwrap()
            .ends_with("examples/domains/ledger.toml"),
        "{domain}"
    );
    assert!(result["items_committed"].as_u64().unwrap() > 0, "{result}");
    // The only rejections are the designed ones, with the file's own code.
    assert_eq!(result["items_rejected"], result["items_designed_to_reject"]);
    let codes: Vec<&String> = result["rejected_by_code"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert!(
        codes.is_empty() || codes == ["insufficient_funds"],
        "{codes:?}"
    );
    assert_eq!(result["requests_failed"], 0, "{result}");
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    assert!(summary.contains("cel_ledger ("), "{summary}");
    let env = std::fs::read_to_string(out.join("scenario.env")).unwrap();
    assert!(
        env.lines()
            .any(|l| l.starts_with("BENCH_DOMAIN=") && l.ends_with("examples/domains/ledger.toml")),
        "{env}"
    );
    assert_eq!(
        std::fs::read(out.join("domain.toml")).unwrap(),
        std::fs::read(repo_root().join("examples/domains/ledger.toml")).unwrap()
    );
}

/// `make bench-domain` end to end (without its build step, for a second each): both runs are
/// audited, the ratio comes from their result.json, and `--min-ratio` fails a low ratio.
#[test]
fn make_bench_domain_runs_both_sides_and_prints_the_ratio() {
    let results = tempfile::tempdir().unwrap();
    let data_root = tempfile::tempdir().unwrap();
    let base = results.path().join("domain");
    let output = Command::new("make")
        .args([
            "-s",
            "-o",
            "bench-build",
            "-f",
            "bench/bench.mk",
            "bench-domain",
        ])
        .arg(format!("RESULTS_DIR={}", base.display()))
        .arg(format!("BENCH_DATA_ROOT={}", data_root.path().display()))
        .arg(format!("KEEL_BIN={}", keel_bin().display()))
        .arg(format!("KEEL_BENCH_BIN={}", keel_bench_bin().display()))
        .args([
            "BENCH_DURATION=1s",
            "BENCH_PREFLIGHT=0",
            "BENCH_ACCOUNTS=100",
            "BENCH_BATCH=100",
            "BENCH_DOMAIN_MIN_RATIO=0",
        ])
        .current_dir(repo_root())
        .env_remove("BENCH_DOMAIN")
        .env_remove("BENCH_WORKERS")
        .env_remove("BENCH_RUN_ID")
        .output()
        .unwrap();
    let all = text(&output);
    assert!(output.status.success(), "bench-domain failed:\n{all}");
    for side in ["builtin", "file"] {
        let verdict = std::fs::read_to_string(base.join(side).join("VERDICT")).unwrap();
        assert!(verdict.starts_with("PASSED"), "{side}: {verdict}");
    }
    assert_eq!(
        read_json(&base.join("builtin/result.json"))["parameters"]["domain"],
        serde_json::Value::Null
    );
    assert_eq!(
        read_json(&base.join("file/result.json"))["parameters"]["domain"]["name"],
        "cel_ledger"
    );
    let compare = std::fs::read_to_string(base.join("compare.txt")).unwrap();
    let last = compare.lines().last().unwrap();
    assert!(
        last.starts_with("committed items/s ratio file / built-in: ") && last.ends_with("OK"),
        "{compare}"
    );
    assert!(compare.lines().any(|l| l.starts_with("committed items/s")));
    assert!(
        all.contains(last),
        "the ratio is printed at the end:\n{all}"
    );
    // The same two results against a minimum no run reaches: exit 1, the line says so.
    let low = Command::new(keel_bench_bin())
        .args(["compare", "--min-ratio", "1000"])
        .arg(format!(
            "built-in={}",
            base.join("builtin/result.json").display()
        ))
        .arg(format!("file={}", base.join("file/result.json").display()))
        .output()
        .unwrap();
    assert_eq!(low.status.code(), Some(1), "{}", text(&low));
    assert!(text(&low).contains("UNDER THE MINIMUM"), "{}", text(&low));
    assert!(
        text(&low).contains("is under --min-ratio 1000"),
        "{}",
        text(&low)
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
            ("BENCH_IDS", "random"),
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
    assert_eq!(result["parameters"]["ids"], "random", "{result}");
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
    let no_file = scenario(
        "x",
        &out,
        data_root.path(),
        &[("BENCH_DOMAIN", "/nonexistent/domain.toml")],
    );
    assert_eq!(no_file.status.code(), Some(2));
    assert!(
        text(&no_file).contains("BENCH_DOMAIN=/nonexistent/domain.toml: no such readable file")
    );
    let engine = scenario(
        "x",
        &out,
        data_root.path(),
        &[
            ("BENCH_KIND", "engine"),
            ("BENCH_DOMAIN", "examples/domains/ledger.toml"),
        ],
    );
    assert_eq!(engine.status.code(), Some(2));
    assert!(text(&engine).contains("BENCH_DOMAIN is for HTTP scenarios"));
}
