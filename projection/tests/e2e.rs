//! End to end: HTTP load -> publisher -> NATS JetStream -> projector -> MongoDB, then the
//! projection must equal the engine exactly.

mod harness;

use anyhow::ensure;
use harness::{
    Keel, Mongo, Names, Nats, ProjectorProcess, Shape, Workload, http, load, verify,
    wait_converged, wait_published,
};
use keel_engine::decode_batch_message;
use serde_json::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_event_is_projected_exactly_once() -> anyhow::Result<()> {
    let names = Names::new("e2e");
    let (nats, mongo) = (Nats::start(), Mongo::start_memory());
    let data = tempfile::tempdir()?;
    let keel = Keel::start(data.path(), &nats.url(), &names, &[]);
    let metrics_address = format!("127.0.0.1:{}", harness::free_port());
    let projector = ProjectorProcess::start(
        &nats.url(),
        &mongo.url(),
        &keel.url,
        &names,
        &["--metrics-listen", &metrics_address],
    );
    let workload = Workload {
        accounts: 40,
        skus: 15,
    };
    workload.setup(&http(), &keel.url).await?;

    let report = load(
        &keel.url,
        &workload,
        1,
        Shape {
            workers: 6,
            requests: 300,
            items: 25,
            pace: Duration::ZERO,
            deadline: Duration::from_secs(90),
        },
    )
    .await?;
    ensure!(
        report.requests == 300 && report.committed > 3000,
        "load fell short: {report:?}"
    );

    let db = mongo.database(&names.db).await;
    let last = wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(120)).await?;
    verify(&db, &keel.url, &workload.ids()).await?;

    // The projector's metrics tell where it stands.
    let metrics = http()
        .get(format!("http://{metrics_address}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let value = |name: &str| -> Option<f64> {
        metrics
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    ensure!(
        value("keel_projector_checkpoint_event") == Some(last as f64),
        "checkpoint metric: {metrics}"
    );
    ensure!(
        value("keel_projector_events_total") >= Some(last as f64),
        "events metric: {metrics}"
    );
    ensure!(
        value("keel_projector_lag_seconds").is_some_and(|lag| lag >= 0.0)
            && metrics.contains("keel_projector_round_seconds_count"),
        "lag and round metrics: {metrics}"
    );
    let batches = wait_published(&http(), &keel.url, Duration::from_secs(30)).await?;
    println!("projected {last} events of {batches} batches ({report:?})");

    // The analysts' indexes exist (names vary by server; count them).
    let events_indexes = db
        .collection::<mongodb::bson::Document>("events")
        .list_index_names()
        .await?;
    let aggregates_indexes = db
        .collection::<mongodb::bson::Document>("aggregates")
        .list_index_names()
        .await?;
    ensure!(
        events_indexes.len() == 4 && aggregates_indexes.len() == 2,
        "indexes: {events_indexes:?} {aggregates_indexes:?}"
    );

    let status = projector.terminate();
    ensure!(
        status.success(),
        "keel project exited with {status} on SIGTERM"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_route_serves_verified_batch_messages() -> anyhow::Result<()> {
    let names = Names::new("route");
    let nats = Nats::start();
    let data = tempfile::tempdir()?;
    let keel = Keel::start(data.path(), &nats.url(), &names, &[]);
    let client = http();
    Workload {
        accounts: 3,
        skus: 2,
    }
    .setup(&client, &keel.url)
    .await?;

    let response = client
        .get(format!("{}/v1/batches/1", keel.url))
        .send()
        .await?;
    ensure!(
        response.status() == 200,
        "GET /v1/batches/1: {}",
        response.status()
    );
    ensure!(response.headers()["content-type"] == "application/octet-stream");
    let message =
        decode_batch_message(&response.bytes().await?).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(
        message.header.seq == 1 && message.header.first_event == 1 && message.events.len() == 5
    );

    for (path, status, code) in [
        ("2", 404, "not_found"),
        ("0", 400, "invalid_request"),
        ("x", 400, "invalid_request"),
    ] {
        let response = client
            .get(format!("{}/v1/batches/{path}", keel.url))
            .send()
            .await?;
        ensure!(
            response.status() == status,
            "GET /v1/batches/{path}: {}",
            response.status()
        );
        let body: Value = response.json().await?;
        ensure!(
            body["error"]["code"] == code,
            "GET /v1/batches/{path}: {body}"
        );
    }
    keel.terminate();
    Ok(())
}
