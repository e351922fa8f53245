//! `keel audit` end to end: the real binary audits a live `keel serve` under concurrent HTTP
//! load (and the server keeps committing and answering), then the stopped store, then a
//! tampered copy; usage and I/O errors exit 2 without a verdict.

use anyhow::{Context, bail, ensure};
use keel_engine::{Cf, RocksStorage, Storage, WriteSet};
use serde_json::{Value, json};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const KEEL: &str = env!("CARGO_BIN_EXE_keel");

/// A `keel serve` process on a free loopback port; killed if the test fails half-way.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    async fn start(data: &Path) -> anyhow::Result<Self> {
        // A port can be taken between probing and binding; try a few.
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let child = Command::new(KEEL)
                .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
                .arg(data)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .context("spawning keel serve")?;
            let mut server = Server {
                child,
                url: format!("http://127.0.0.1:{port}"),
            };
            if server.wait_healthy().await? {
                return Ok(server);
            }
        }
        bail!("keel serve did not become healthy on three ports")
    }

    /// True once `/healthz` answers 200; false if the process exited (port taken).
    async fn wait_healthy(&mut self) -> anyhow::Result<bool> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = client()?;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(false);
            }
            let answer = client.get(format!("{}/healthz", self.url)).send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("keel serve did not answer /healthz within 60 s")
    }

    /// SIGTERM, then wait (bounded) for the clean exit that releases the store.
    fn terminate(mut self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "keel serve exited with {status}");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("keel serve did not stop within 30 s of SIGTERM")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(keel_projection::http_client::builder(&Default::default())?
        .timeout(Duration::from_secs(30))
        .build()?)
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Value> {
    let answer = client
        .post(format!("{url}/v1/batches"))
        .json(body)
        .send()
        .await?;
    let status = answer.status();
    let value: Value = answer.json().await?;
    ensure!(status.is_success(), "POST /v1/batches: {status} {value}");
    Ok(value)
}

fn committed_items(answer: &Value) -> u64 {
    let results = answer["results"]
        .as_array()
        .map_or(&[][..], |r| r.as_slice());
    results
        .iter()
        .filter(|r| r["status"] == "committed" && r["replayed"] != true)
        .count() as u64
}

async fn setup(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let mut commands = Vec::new();
    for a in 0..20 {
        commands.push(json!({"type": "open_account", "id": format!("open-{a}"), "account": format!("a{a}"), "overdraft_limit": 10}));
        commands.push(json!({"type": "deposit", "account": format!("a{a}"), "amount": 1_000_000}));
    }
    for s in 0..4 {
        commands.push(
            json!({"type": "create_sku", "sku": format!("s{s}"), "on_hand": 1_000_000_000u64}),
        );
    }
    let answer = post(client, url, &json!({"commands": commands})).await?;
    ensure!(committed_items(&answer) == 44, "setup: {answer}");
    Ok(())
}

/// One request of worker `w`, number `i`: transfers and a deposit with ids, a reservation and
/// the shipment of the previous one (rejected after a rolled-back request), every command with
/// an id so that a resend is answered from the index; and every seventh request
/// atomic with a withdrawal that cannot succeed, so it rolls back.
fn request(w: u64, i: u64) -> Value {
    let mut commands: Vec<Value> = (0..8)
        .map(|k| {
            let from = (w * 7 + i + k) % 20;
            let to = (from + 1 + k) % 20;
            json!({"type": "transfer", "id": format!("w{w}-{i}-{k}"), "from": format!("a{from}"), "to": format!("a{to}"), "amount": 1 + k})
        })
        .collect();
    let id = |what: &str| format!("w{w}-{i}-{what}");
    commands.push(json!({"type": "deposit", "id": id("dep"), "account": format!("a{}", i % 20), "amount": 3, "memo": format!("w{w} i{i}")}));
    commands.push(json!({"type": "reserve", "id": id("res"), "sku": format!("s{}", i % 4), "qty": 2, "order": format!("w{w}-{i}")}));
    if i > 0 {
        commands.push(json!({"type": "ship", "id": id("ship"), "sku": format!("s{}", (i - 1) % 4), "order": format!("w{w}-{}", i - 1)}));
    }
    let atomic = i % 7 == 6;
    if atomic {
        commands.push(json!({"type": "withdraw", "account": "a0", "amount": 9_000_000_000u64}));
    }
    json!({"commands": commands, "atomic": atomic})
}

/// Posts requests until `stop`, a count or a deadline; every fifth request is sent twice
/// (an idempotent retry). Returns how many items it committed.
async fn worker(
    url: String,
    w: u64,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
) -> anyhow::Result<u64> {
    let client = client()?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut mine = 0;
    for i in 0..20_000 {
        if stop.load(Ordering::Acquire) || Instant::now() > deadline {
            break;
        }
        let body = request(w, i);
        let answer = post(&client, &url, &body).await?;
        if i % 5 == 4 {
            let again = post(&client, &url, &body).await?;
            ensure!(
                committed_items(&again) == 0,
                "a retry committed again: {again}"
            );
        }
        let n = committed_items(&answer);
        mine += n;
        committed.fetch_add(n, Ordering::AcqRel);
    }
    Ok(mine)
}

/// Runs `keel audit` with `args`; returns the output.
async fn keel_audit(args: Vec<String>) -> anyhow::Result<Output> {
    let output = tokio::process::Command::new(KEEL)
        .arg("audit")
        .args(&args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .context("running keel audit")?;
    Ok(output)
}

fn last_line(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

fn explain(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn args(data: &Path, more: &[&str]) -> Vec<String> {
    let mut args = vec!["--data".to_owned(), data.display().to_string()];
    args.extend(more.iter().map(|s| (*s).to_owned()));
    args
}

/// Audits the live store while two workers keep writing; checks the verdict, the report and
/// that the server kept committing and answering.
async fn audit_live(
    server: &Server,
    data: &Path,
    json_path: &Path,
    committed: &AtomicU64,
) -> anyhow::Result<()> {
    let before = committed.load(Ordering::Acquire);
    let output = keel_audit(args(data, &["--json", &json_path.display().to_string()])).await?;
    ensure!(
        output.status.code() == Some(0) && last_line(&output) == "INTEGRITY_OK",
        "live audit: {}",
        explain(&output)
    );
    let report = read_json(json_path)?;
    ensure!(
        report["ok"] == true && report["snapshot"]["mode"] == "secondary",
        "live report: {report:#}"
    );
    ensure!(
        report["counts"]["events"].as_u64() > Some(44),
        "the snapshot holds the load: {report:#}"
    );
    ensure!(report["divergences"] == json!([]), "{report:#}");
    let output = keel_audit(args(
        data,
        &[
            "--url",
            &server.url,
            "--json",
            &json_path.display().to_string(),
        ],
    ))
    .await?;
    ensure!(
        output.status.code() == Some(0) && last_line(&output) == "INTEGRITY_OK",
        "audit --url: {}",
        explain(&output)
    );
    let report = read_json(json_path)?;
    ensure!(
        report["served_log"]["events_compared"] == report["counts"]["events"],
        "{report:#}"
    );
    let after = committed.load(Ordering::Acquire);
    ensure!(
        after > before,
        "the server committed nothing while audited ({before} -> {after})"
    );
    let health = client()?
        .get(format!("{}/healthz", server.url))
        .send()
        .await?;
    ensure!(health.status().is_success(), "the server stopped answering");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audits_a_live_server_under_load_then_the_stopped_store_then_a_tampered_one()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data: PathBuf = dir.path().join("data");
    let json_path = dir.path().join("report.json");
    let server = Server::start(&data).await?;
    setup(&client()?, &server.url).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..2)
        .map(|w| {
            tokio::spawn(worker(
                server.url.clone(),
                w,
                Arc::clone(&stop),
                Arc::clone(&committed),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while committed.load(Ordering::Acquire) < 500 {
        ensure!(
            Instant::now() < deadline,
            "the load committed under 500 items in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let live = audit_live(&server, &data, &json_path, &committed).await;
    stop.store(true, Ordering::Release);
    for w in workers {
        w.await??;
    }
    live?;
    server.terminate()?;

    let output = keel_audit(args(&data, &["--json", &json_path.display().to_string()])).await?;
    ensure!(
        output.status.code() == Some(0) && last_line(&output) == "INTEGRITY_OK",
        "stopped: {}",
        explain(&output)
    );
    let report = read_json(&json_path)?;
    ensure!(report["snapshot"]["mode"] == "read_only", "{report:#}");

    tamper_state_byte(&data, "account:a3")?;
    let output = keel_audit(args(&data, &["--json", &json_path.display().to_string()])).await?;
    ensure!(
        output.status.code() == Some(1) && last_line(&output) == "INTEGRITY_FAILED",
        "tampered: {}",
        explain(&output)
    );
    let report = read_json(&json_path)?;
    let located = report["divergences"].as_array().is_some_and(|ds| {
        ds.iter()
            .any(|d| d["check"] == "state" && d["aggregate"] == "account:a3" && d["seq"].is_u64())
    });
    ensure!(
        report["ok"] == false && located,
        "the tampered aggregate is not named: {report:#}"
    );
    Ok(())
}

/// Flips the last byte (the `closed` flag) of an aggregate's stored state in a stopped store.
fn tamper_state_byte(data: &Path, id: &str) -> anyhow::Result<()> {
    let storage = RocksStorage::open(data)?;
    let mut value = storage
        .get(Cf::State, id.as_bytes())?
        .context("the aggregate is stored")?;
    let last = value.len() - 1;
    value[last] ^= 0x01;
    let mut set = WriteSet::default();
    set.put(Cf::State, id.as_bytes(), &value);
    storage.write(&set, true)?;
    Ok(())
}

#[tokio::test]
async fn usage_and_io_errors_exit_2_without_a_verdict() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (args(&missing, &[]), "is not a directory"),
        (args(dir.path(), &[]), "not a Keel store"),
        (
            args(dir.path(), &["--mongo-url", "http://127.0.0.1:1"]),
            "--mongo-url http://127.0.0.1:1",
        ),
        (
            vec!["--url".into(), "http://127.0.0.1:1".into()],
            "--data DIR is required",
        ),
        (
            args(dir.path(), &["--max-divergences", "many"]),
            "invalid value",
        ),
    ];
    for (case, message) in cases {
        let output = keel_audit(case.clone()).await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.code() == Some(2),
            "{case:?}: {}",
            explain(&output)
        );
        ensure!(
            stderr.contains(message),
            "{case:?}: stderr lacks {message:?}: {}",
            explain(&output)
        );
        ensure!(
            !String::from_utf8_lossy(&output.stdout).contains("INTEGRITY_"),
            "{case:?}: a verdict without an audit"
        );
    }
    ensure!(!missing.exists(), "the audit created the missing directory");
    Ok(())
}
