//! Batches missing from the stream (deleted messages, the first and the last among them), and a
//! batch too large for the server's `max_payload` (published as an empty placeholder): the
//! projector takes each from the source, and `--rebuild` does it all again from scratch.

mod harness;

use anyhow::{Context, ensure};
use harness::{
    Keel, Mongo, Names, Nats, ProjectorProcess, Shape, Workload, http, load, post, verify,
    wait_converged, wait_published,
};
use mongodb::bson::{Document, doc};
use serde_json::json;
use std::time::Duration;

const SHAPE: Shape = Shape {
    workers: 2,
    requests: 60,
    items: 10,
    pace: Duration::ZERO,
    deadline: Duration::from_secs(60),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_in_the_stream_are_repaired_from_the_source() -> anyhow::Result<()> {
    let names = Names::new("gap");
    let (nats, mongo) = (Nats::start(), Mongo::start_memory());
    let data = tempfile::tempdir()?;
    let keel = Keel::start(data.path(), &nats.url(), &names, &[]);
    let workload = Workload {
        accounts: 20,
        skus: 8,
    };
    let client = http();
    workload.setup(&client, &keel.url).await?;
    load(&keel.url, &workload, 5, SHAPE).await?;
    let big = big_batch(&client, &keel.url, workload.accounts).await?;
    load(&keel.url, &workload, 6, SHAPE).await?;
    let last = wait_published(&client, &keel.url, Duration::from_secs(60)).await?;
    ensure!(
        last > big + 10,
        "expected batches after the big one (big {big}, last {last})"
    );

    // The stream is fresh and the publisher never retried, so stream sequence = batch sequence.
    let js = harness::jetstream(&nats.url()).await?;
    let stream = js.get_stream(&names.stream).await?;
    let placeholder = stream.get_raw_message(big).await?;
    ensure!(
        placeholder.headers.get("Nats-Msg-Id").map(|v| v.as_str())
            == Some(big.to_string().as_str())
    );
    ensure!(
        placeholder.payload.is_empty(),
        "batch {big} exceeds max_payload but was published whole"
    );
    let mid = (big + last) / 2;
    for seq in [1, 5, 6, mid, last] {
        let message = stream.get_raw_message(seq).await?;
        ensure!(
            message.headers.get("Nats-Msg-Id").map(|v| v.as_str())
                == Some(seq.to_string().as_str())
        );
        ensure!(
            stream.delete_message(seq).await?,
            "deleting stream message {seq}"
        );
    }

    let db = mongo.database(&names.db).await;
    let projector = ProjectorProcess::start(&nats.url(), &mongo.url(), &keel.url, &names, &[]);
    wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(120)).await?;
    verify(&db, &keel.url, &workload.ids()).await?;
    ensure!(projector.terminate().success(), "keel project failed");

    // Damage the projection, then rebuild it: only a real drop and replay can pass `verify`.
    let aggregates = db.collection::<Document>("aggregates");
    aggregates
        .update_one(
            doc! {"_id": "account:a0"},
            doc! {"$set": {"balance": 999_999_i64}},
        )
        .await?;
    db.collection::<Document>("events")
        .insert_one(doc! {"_id": 1_000_000_000_i64, "type": "bogus"})
        .await?;
    let rebuild =
        ProjectorProcess::start(&nats.url(), &mongo.url(), &keel.url, &names, &["--rebuild"]);
    rebuild.wait_consuming();
    wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(120)).await?;
    verify(&db, &keel.url, &workload.ids()).await?;
    ensure!(
        rebuild.terminate().success(),
        "keel project --rebuild failed"
    );
    Ok(())
}

/// Commits one batch whose message exceeds NATS's default 1 MiB `max_payload`; returns its seq.
async fn big_batch(client: &reqwest::Client, url: &str, accounts: usize) -> anyhow::Result<u64> {
    let memo = "m".repeat(300);
    let commands: Vec<_> = (0..4000)
        .map(|i| json!({"type": "deposit", "account": format!("a{}", i % accounts), "amount": 1, "memo": memo}))
        .collect();
    let answer = post(client, url, &json!({"commands": commands})).await?;
    answer["batch"].as_u64().context("the big batch committed")
}
