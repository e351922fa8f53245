//! The in-process engine benchmark on a real RocksDB store for one second.

#![allow(clippy::unwrap_used)] // tests may unwrap

use keel_bench::engine_bench::{EngineConfig, IdShape, run};
use keel_bench::report::Machine;

#[test]
fn engine_bench_commits_transfers_and_reports_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let config = EngineConfig {
        dir: dir.path().to_owned(),
        store: Some(store.clone()),
        batch: 100,
        duration_s: 1.0,
        accounts: 100,
        in_flight: 4,
        batch_items_max: 10_000,
        payload_bytes: 32,
        seed: 1,
        submissions_max: 100_000,
        cache_aggregates_max: 1_000_000,
        ids: IdShape::Random,
    };
    let report = run(&config, Machine::read(None).unwrap(), Some("test".into())).unwrap();
    assert!(report.items_committed > 0);
    assert_eq!(report.items_rejected, 0);
    assert_eq!(report.items_committed, report.submissions * 100);
    assert!(report.commits_per_sec > 0.0);
    // Random ids: every one fresh, every item committed (a repeat would replay, not commit).
    assert!(report.command_id_sorted_runs.is_some());
    // The memory of command_ids' tables is reported; the run's ids may all still be waiting
    // for a checkpoint, so only its presence is certain.
    assert!(report.command_id_table_readers.is_some());
    assert!(report.table().contains("command_ids in memory"));
    // A commit holds at least one whole submission.
    assert!(
        report.items_per_commit_mean >= 100.0,
        "{}",
        report.items_per_commit_mean
    );
    assert!(report.latency_ms.p50 > 0.0 && report.latency_ms.p50 <= report.latency_ms.max);
    // The writer thread did the deciding: it is named and its CPU time counted.
    let writer = report
        .cpu_s_by_thread
        .get(keel_sequencer::WRITER_THREAD)
        .copied();
    assert!(
        writer.is_some_and(|cpu| cpu > 0.0),
        "{:?}",
        report.cpu_s_by_thread
    );
    assert!(report.table().contains("writer CPU per item"));
    let v = serde_json::to_value(&report).unwrap();
    for key in ["items_per_sec", "batches_per_sec", "latency_ms"] {
        assert!(!v[key].is_null(), "{key}");
    }
    assert!(
        std::fs::read_dir(&store).unwrap().count() > 0,
        "the kept store is empty"
    );

    // A second run refuses the now non-empty store instead of mixing two runs.
    let error = run(&config, Machine::read(None).unwrap(), None)
        .unwrap_err()
        .to_string();
    assert!(error.contains("not empty"), "{error}");
}

#[test]
fn engine_bench_bounds_by_submission_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        dir: dir.path().to_owned(),
        store: None,
        batch: 10,
        duration_s: 30.0,
        accounts: 10,
        in_flight: 2,
        batch_items_max: 1000,
        payload_bytes: 0,
        seed: 1,
        submissions_max: 5,
        cache_aggregates_max: 1_000_000,
        ids: IdShape::Counter,
    };
    let started = std::time::Instant::now();
    let report = run(&config, Machine::read(None).unwrap(), None).unwrap();
    assert_eq!(report.submissions, 5);
    assert_eq!(report.items_committed, 50);
    assert!(
        started.elapsed().as_secs() < 20,
        "the count bound did not stop the run"
    );
    // The temporary store is removed.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
