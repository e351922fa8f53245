//! `keel audit --mongo-url` (the `projection` check) against a projection built by the real
//! pipeline: `keel serve` -> NATS JetStream -> `keel project` -> MongoDB wire server.
//!
//! A converged projection of a live store is intact; a lagging one is compared at its
//! checkpoint and is intact too; then each edit of the projection (an aggregate's field, a
//! deleted event, an edited event, an extra aggregate, the checkpoint's hash) is found and
//! located, and undoing it makes the audit pass again.

#![allow(clippy::unwrap_used, reason = "a panic in a test is a test failure")]

mod harness;

use anyhow::{Context, ensure};
use harness::{
    Keel, Mongo, Names, Nats, ProjectorProcess, Shape, Workload, http, keel_binary, load,
    wait_converged,
};
use keel_engine::Storage as _;
use mongodb::Database;
use mongodb::bson::{Bson, Document, doc};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Runs `keel audit` on `data` against the projection; returns (exit code, stdout, JSON report).
async fn audit(
    data: &Path,
    mongo: &str,
    names: &Names,
    extra: &[&str],
) -> anyhow::Result<(i32, String, Value)> {
    let report = tempfile::NamedTempFile::new()?;
    let mut args: Vec<String> = [
        "audit",
        "--data",
        &data.display().to_string(),
        "--mongo-url",
        mongo,
        "--mongo-db",
        &names.db,
        "--mongo-durable",
        &names.durable,
        "--max-divergences",
        "50",
        "--json",
        &report.path().display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(keel_binary())
            .args(&args)
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let code = output.status.code().unwrap_or(-1);
    ensure!(
        code == 0 || code == 1,
        "keel audit gave no verdict (exit {code}): {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let json: Value =
        serde_json::from_slice(&std::fs::read(report.path())?).context("the JSON report parses")?;
    Ok((code, stdout, json))
}

fn projection_divergences(report: &Value) -> Vec<&Value> {
    report["divergences"]
        .as_array()
        .map(|all| all.iter().filter(|d| d["check"] == "projection").collect())
        .unwrap_or_default()
}

/// The audit is intact and compared everything up to `point`.
fn assert_intact(code: i32, stdout: &str, report: &Value) {
    assert_eq!(code, 0, "{stdout}\n{report:#}");
    assert_eq!(stdout.lines().last(), Some("INTEGRITY_OK"));
    assert_eq!(report["projection"]["checked"], true);
    assert_eq!(report["projection"]["divergences"], 0);
    assert_eq!(report["checks"]["projection"], 0);
}

/// The audit failed on the projection only, at a divergence `matches` accepts.
fn assert_located(
    what: &str,
    code: i32,
    stdout: &str,
    report: &Value,
    matches: impl Fn(&Value) -> bool,
) {
    assert_eq!(code, 1, "{what}: {stdout}");
    assert_eq!(stdout.lines().last(), Some("INTEGRITY_FAILED"), "{what}");
    let found = projection_divergences(report);
    assert!(
        found.iter().any(|d| matches(d)),
        "{what}: not located; divergences: {found:#?}"
    );
    let total = report["divergences_total"].as_u64().unwrap();
    let projection = report["checks"]["projection"].as_u64().unwrap();
    assert_eq!(
        total, projection,
        "{what}: only the projection differs: {report:#}"
    );
}

/// An integer field, whichever integer type the server returned it as.
fn int(document: &Document, field: &str) -> i64 {
    match document.get(field) {
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Int64(v)) => *v,
        other => panic!("`{field}` is not an integer: {other:?}"),
    }
}

async fn one(db: &Database, collection: &str, filter: Document) -> anyhow::Result<Document> {
    db.collection::<Document>(collection)
        .find_one(filter.clone())
        .await?
        .with_context(|| format!("{collection} has {filter}"))
}

async fn replace(db: &Database, collection: &str, document: &Document) -> anyhow::Result<()> {
    let id = document.get("_id").cloned().unwrap_or(Bson::Null);
    db.collection::<Document>(collection)
        .replace_one(doc! {"_id": id}, document.clone())
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_is_compared_with_the_log_and_every_edit_is_located() -> anyhow::Result<()> {
    let names = Names::new("auditproj");
    let (nats, mongo) = (Nats::start(), Mongo::start_memory());
    let data = tempfile::tempdir()?;
    let keel = Keel::start(data.path(), &nats.url(), &names, &[]);
    let projector = ProjectorProcess::start(&nats.url(), &mongo.url(), &keel.url, &names, &[]);
    let workload = Workload {
        accounts: 20,
        skus: 8,
    };
    workload.setup(&http(), &keel.url).await?;
    let shape = |requests| Shape {
        workers: 4,
        requests,
        items: 20,
        pace: Duration::ZERO,
        deadline: Duration::from_secs(60),
    };
    load(&keel.url, &workload, 1, shape(60)).await?;
    let db = mongo.database(&names.db).await;
    let last = wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(90)).await?;

    // A converged projection of a live store (audited through a secondary instance).
    let (code, stdout, report) = audit(data.path(), &mongo.url(), &names, &[]).await?;
    assert_intact(code, &stdout, &report);
    assert_eq!(report["snapshot"]["mode"], "secondary");
    let projection = &report["projection"];
    assert_eq!(projection["point"], last, "{projection:#}");
    assert_eq!(projection["events_compared"], last, "{projection:#}");
    assert_eq!(
        projection["aggregates_compared"].as_u64(),
        Some(workload.ids().len() as u64),
        "{projection:#}"
    );

    // A lagging projection: compared at its checkpoint, not failed for lagging.
    projector.terminate();
    load(&keel.url, &workload, 2, shape(20)).await?;
    let (code, stdout, report) = audit(
        data.path(),
        &mongo.url(),
        &names,
        &["--mongo-wait", "500ms"],
    )
    .await?;
    assert_intact(code, &stdout, &report);
    let projection = &report["projection"];
    assert_eq!(projection["point"], last, "{projection:#}");
    assert!(
        projection["behind_events"].as_u64() > Some(0),
        "{projection:#}"
    );
    // A made-up aggregate whose last_seq lies between the checkpoint and the tip is not taken
    // for a document the projector moved on: it is found.
    let made_up = doc! {"_id": "account:made-up", "kind": "account", "version": 1_i64,
    "last_seq": (last + 1) as i64, "balance": 5_i64, "overdraft_limit": 0_i64, "closed": false};
    db.collection::<Document>("aggregates")
        .insert_one(made_up)
        .await?;
    let (code, stdout_made_up, report_made_up) =
        audit(data.path(), &mongo.url(), &names, &["--mongo-wait", "0s"]).await?;
    assert_located(
        "made-up aggregate",
        code,
        &stdout_made_up,
        &report_made_up,
        |d| {
            d["aggregate"] == "account:made-up"
                && d["detail"].as_str().unwrap().contains("never creates it")
        },
    );
    db.collection::<Document>("aggregates")
        .delete_one(doc! {"_id": "account:made-up"})
        .await?;
    assert!(
        stdout.contains("events behind the snapshot's tip"),
        "{stdout}"
    );

    // Catch up, stop the server: a stopped store and a converged projection.
    let projector = ProjectorProcess::start(&nats.url(), &mongo.url(), &keel.url, &names, &[]);
    let last = wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(90)).await?;
    keel.terminate();
    projector.terminate();
    let (code, stdout, report) = audit(data.path(), &mongo.url(), &names, &[]).await?;
    assert_intact(code, &stdout, &report);
    assert_eq!(report["snapshot"]["mode"], "read_only");
    assert_eq!(report["projection"]["events_compared"], last);

    // An aggregate document's balance edited.
    let id = workload
        .ids()
        .into_iter()
        .find(|i| i.starts_with("account:"))
        .unwrap();
    let original = one(&db, "aggregates", doc! {"_id": &id}).await?;
    let mut edited = original.clone();
    let balance = int(&original, "balance");
    edited.insert("balance", balance + 1);
    replace(&db, "aggregates", &edited).await?;
    let (code, stdout, report) = audit(data.path(), &mongo.url(), &names, &[]).await?;
    assert_located("edited balance", code, &stdout, &report, |d| {
        d["aggregate"] == id.as_str()
            && d["detail"].as_str().unwrap().contains("`balance`")
            && d["seq"] == int(&original, "last_seq")
    });
    replace(&db, "aggregates", &original).await?;

    // An event document deleted, then one edited.
    let seq = (last / 2) as i64;
    let event = one(&db, "events", doc! {"_id": seq}).await?;
    db.collection::<Document>("events")
        .delete_one(doc! {"_id": seq})
        .await?;
    let (code, stdout, report) = audit(data.path(), &mongo.url(), &names, &[]).await?;
    assert_located("deleted event", code, &stdout, &report, |d| {
        d["seq"] == seq && d["detail"].as_str().unwrap().contains("missing")
    });
    db.collection::<Document>("events")
        .insert_one(event.clone())
        .await?;
    let mut edited = event.clone();
    edited.insert("type", "hand_edited");
    replace(&db, "events", &edited).await?;
    let (code, stdout, report) = audit(data.path(), &mongo.url(), &names, &[]).await?;
    assert_located("edited event", code, &stdout, &report, |d| {
        d["seq"] == seq
            && d["batch"] == int(&event, "batch")
            && d["detail"].as_str().unwrap().contains("`type`")
    });
    replace(&db, "events", &event).await?;

    // An aggregate the log never created.
    let mut extra = original.clone();
    extra.insert("_id", "account:never-opened");
    db.collection::<Document>("aggregates")
        .insert_one(extra)
        .await?;
    let (code, stdout, report) = audit(data.path(), &mongo.url(), &names, &[]).await?;
    assert_located("extra aggregate", code, &stdout, &report, |d| {
        d["aggregate"] == "account:never-opened"
    });
    db.collection::<Document>("aggregates")
        .delete_one(doc! {"_id": "account:never-opened"})
        .await?;

    // The checkpoint's hash edited.
    let checkpoint = one(&db, "checkpoints", doc! {"_id": &names.durable}).await?;
    let mut edited = checkpoint.clone();
    edited.insert("last_hash", "00".repeat(32));
    replace(&db, "checkpoints", &edited).await?;
    let (code, stdout, report) = audit(data.path(), &mongo.url(), &names, &[]).await?;
    assert_located("edited checkpoint", code, &stdout, &report, |d| {
        d["detail"].as_str().unwrap().contains("checkpoint")
            && d["batch"] == int(&checkpoint, "last_batch")
    });
    replace(&db, "checkpoints", &checkpoint).await?;

    // Every edit undone: intact again.
    let (code, stdout, report) = audit(data.path(), &mongo.url(), &names, &[]).await?;
    assert_intact(code, &stdout, &report);

    // A damaged store with --mongo-url: still a verdict (the store's checks name the damage),
    // not an error of the projection's comparison.
    let _ = seq;
    let key = keel_engine::format::seq_key(1);
    let stored = {
        let storage = keel_engine::RocksStorage::open(data.path())?;
        let value = storage
            .get(keel_engine::Cf::Log, &key)?
            .context("batch 1 stored")?;
        let mut set = keel_engine::WriteSet::default();
        set.put(keel_engine::Cf::Log, &key, &value[..value.len() - 3]);
        storage.write(&set, true)?;
        value
    };
    let (code, stdout, report) = audit(data.path(), &mongo.url(), &names, &[]).await?;
    assert_eq!(code, 1, "{stdout}");
    assert!(report["checks"]["chain"].as_u64() > Some(0), "{report:#}");
    assert_eq!(report["projection"]["checked"], true);
    {
        let storage = keel_engine::RocksStorage::open(data.path())?;
        let mut set = keel_engine::WriteSet::default();
        set.put(keel_engine::Cf::Log, &key, &stored);
        storage.write(&set, true)?;
    }
    let (code, stdout, report) = audit(data.path(), &mongo.url(), &names, &[]).await?;
    assert_intact(code, &stdout, &report);

    // No MongoDB at the URL: no verdict (exit 2), and the reason names it.
    let unreachable = format!(
        "mongodb://127.0.0.1:{}/?directConnection=true",
        harness::free_port()
    );
    let store = data.path().display().to_string();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(keel_binary())
            .args(["audit", "--data", &store, "--mongo-url", &unreachable])
            .output()
    })
    .await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("reading checkpoints from mongodb://127.0.0.1:"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains("INTEGRITY_"));
    Ok(())
}
