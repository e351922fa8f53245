//! Storage damage is never silent, end to end with the real binary (issue 5: after kill -9, one
//! byte flipped in the middle of RocksDB's write-ahead log made the next start drop 3,580 of
//! 6,000 acknowledged deposits, and `keel audit` printed INTEGRITY_OK).
//!
//! A `keel serve` takes acknowledged deposits and is killed with SIGKILL; then a byte of the
//! write-ahead log or of a table file is flipped. `keel serve` must refuse to start, naming the
//! file and the offset, and `keel audit` must print INTEGRITY_FAILED and exit 1. A log cut
//! inside its final record (a write the kill interrupted, never acknowledged) must start with
//! every acknowledged deposit.
#![allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report

mod common;

use common::{KeelProcess, client};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const KEEL: &str = env!("CARGO_BIN_EXE_keel");
const REQUESTS: usize = 30;
const ITEMS: usize = 20;

/// Posts `REQUESTS` requests of `ITEMS` deposits, one after the other; returns how many
/// deposits were acknowledged.
async fn deposit(url: &str, tag: &str) -> u64 {
    let c = client();
    let mut acked = 0;
    for r in 0..REQUESTS {
        let commands: Vec<Value> = (0..ITEMS)
            .map(|i| json!({"type": "deposit", "id": format!("{tag}-{r}-{i}"), "account": "acc-0", "amount": 1 + i}))
            .collect();
        let answer: Value = c
            .post(format!("{url}/v1/batches"))
            .json(&json!({"commands": commands}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for result in answer["results"].as_array().unwrap() {
            assert_eq!(result["status"], "committed", "{result}");
            acked += 1;
        }
    }
    acked
}

async fn open_account(url: &str) {
    let answer = client()
        .post(format!("{url}/v1/batches"))
        .json(&json!({"commands": [{"type": "open_account", "account": "acc-0"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
}

/// The events the server at `url` serves (the tip's event sequence).
async fn served_events(url: &str) -> u64 {
    let page: Value = client()
        .get(format!("{url}/v1/events?after=0&limit=10000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    page["events"].as_array().unwrap().len() as u64
}

fn newest_wal(dir: &Path) -> PathBuf {
    keel_engine::wal::wal_files(dir).unwrap().pop().unwrap()
}

fn tables(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sst"))
        .collect();
    found.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    found
}

fn copy_store(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && path.file_name().unwrap() != "LOCK" {
            std::fs::copy(&path, to.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    to
}

fn flip(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x08;
    std::fs::write(path, bytes).unwrap();
}

/// Runs `keel serve` on `data`, which must refuse to start: returns its stderr.
fn serve_refuses(data: &Path, what: &str) -> String {
    let mut child = Command::new(KEEL)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: keel serve started on a damaged store: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{what}: keel serve exited 0");
    assert!(
        !stdout.contains("listening on"),
        "{what}: keel serve listened: {stdout}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn audit(data: &Path) -> Output {
    Command::new(KEEL)
        .args(["audit", "--data"])
        .arg(data)
        .output()
        .unwrap()
}

fn assert_audit_fails(data: &Path, file: &str, what: &str) {
    let out = audit(data);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: keel audit exit code; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(
        stdout.lines().last(),
        Some("INTEGRITY_FAILED"),
        "{what}: {stdout}"
    );
    assert!(
        stdout.contains(file),
        "{what}: the audit does not name {file}:\n{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_the_write_ahead_log_refuses_serve_and_fails_the_audit() {
    let data = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(data.path(), &[]);
    open_account(&keel.url).await;
    let acked = deposit(&keel.url, "wal").await;
    assert_eq!(acked, (REQUESTS * ITEMS) as u64);
    keel.kill9();
    let wal = newest_wal(data.path());
    let bytes = std::fs::metadata(&wal).unwrap().len();
    let name = wal.file_name().unwrap().to_string_lossy().into_owned();
    for offset in [12, bytes / 3, bytes / 2, bytes - 40, bytes - 1] {
        let damaged = copy_store(data.path());
        flip(&damaged.path().join(&name), offset);
        let what = format!("flip at offset {offset} of {name} ({bytes} bytes)");
        let stderr = serve_refuses(damaged.path(), &what);
        assert!(
            stderr.contains(&name) && stderr.contains("offset"),
            "{what}: the error names no file and offset: {stderr}"
        );
        assert_audit_fails(damaged.path(), &name, &what);
    }
    // The undamaged store starts with every acknowledged deposit and audits clean.
    let keel = KeelProcess::start(data.path(), &[]);
    assert_eq!(served_events(&keel.url).await, acked + 1);
    keel.terminate();
    let out = audit(data.path());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_ahead_log_cut_inside_its_final_record_starts_with_every_acknowledged_deposit() {
    let data = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(data.path(), &[]);
    open_account(&keel.url).await;
    let acked = deposit(&keel.url, "acked").await;
    let wal = newest_wal(data.path());
    let before = std::fs::metadata(&wal).unwrap().len();
    // One more request: its write is the one the "kill" interrupts; it counts as never
    // acknowledged (its answer is not looked at).
    let in_flight: Vec<Value> = (0..ITEMS)
        .map(|i| json!({"type": "deposit", "id": format!("torn-{i}"), "account": "acc-0", "amount": 5}))
        .collect();
    let answer = client()
        .post(format!("{}/v1/batches", keel.url))
        .json(&json!({"commands": in_flight}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    keel.kill9();
    let after = std::fs::metadata(&wal).unwrap().len();
    assert!(
        after > before + 8,
        "the final batch is the log's final record"
    );
    for cut in [1, 7, (after - before) / 2, after - before - 1] {
        let torn = copy_store(data.path());
        let path = torn.path().join(wal.file_name().unwrap());
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(before + cut).unwrap();
        drop(file);
        let keel = KeelProcess::start(torn.path(), &[]);
        assert_eq!(
            served_events(&keel.url).await,
            acked + 1,
            "cut {cut} bytes into the final record: every acknowledged deposit (and the account) is served, the torn batch is not"
        );
        keel.terminate();
        let out = audit(torn.path());
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_table_file_refuses_serve_and_fails_the_audit() {
    let data = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(data.path(), &[]);
    open_account(&keel.url).await;
    let mut acked = deposit(&keel.url, "first").await;
    keel.kill9();
    // Recovery flushes what it replayed from the log into table files.
    let keel = KeelProcess::start(data.path(), &[]);
    acked += deposit(&keel.url, "second").await;
    keel.kill9();
    let tables = tables(data.path());
    let largest = tables.last().expect("the restart wrote table files");
    let name = largest.file_name().unwrap().to_string_lossy().into_owned();
    let bytes = std::fs::metadata(largest).unwrap().len();
    for offset in [20, bytes / 2, bytes - 100, bytes - 1] {
        let damaged = copy_store(data.path());
        flip(&damaged.path().join(&name), offset);
        let what = format!("flip at offset {offset} of {name} ({bytes} bytes)");
        let stderr = serve_refuses(damaged.path(), &what);
        assert!(
            stderr.contains(&name),
            "{what}: the error names no file: {stderr}"
        );
        assert_audit_fails(damaged.path(), &name, &what);
    }
    let keel = KeelProcess::start(data.path(), &[]);
    assert_eq!(served_events(&keel.url).await, acked + 1);
    keel.terminate();
}
