//! NATS stopped under load: the write path keeps committing, the publisher's lag grows, and
//! after NATS returns publication and projection catch up with nothing lost or doubled.

mod harness;

use anyhow::ensure;
use harness::{
    Keel, Mongo, Names, Nats, ProjectorProcess, Shape, Workload, http, last_seq, load, metric,
    verify, wait_converged, wait_published,
};
use std::time::Duration;

/// A steady load for about 7 s (~3,000 commands/s), long enough to span the fault.
const PACED: Shape = Shape {
    workers: 4,
    requests: 100_000,
    items: 20,
    pace: Duration::from_millis(25),
    deadline: Duration::from_secs(7),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_and_projection_catch_up_after_a_nats_outage() -> anyhow::Result<()> {
    let names = Names::new("nats_outage");
    let (mut nats, mongo) = (Nats::start(), Mongo::start_memory());
    let data = tempfile::tempdir()?;
    let keel = Keel::start(data.path(), &nats.url(), &names, &[]);
    // No idle probe: after the outage the projection must come through JetStream itself.
    let projector = ProjectorProcess::start(
        &nats.url(),
        &mongo.url(),
        &keel.url,
        &names,
        &["--idle-probe-secs", "0"],
    );
    let workload = Workload {
        accounts: 30,
        skus: 10,
    };
    let client = http();
    workload.setup(&client, &keel.url).await?;

    let url = keel.url.clone();
    let background = workload.clone();
    let loader = tokio::spawn(async move { load(&url, &background, 2, PACED).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;

    if nats.is_external() {
        println!(
            "NATS_URL is set: not stopping an external server; this run only checks convergence"
        );
    } else {
        nats.stop();
        let committed_at_stop = last_seq(&client, &keel.url).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let committed_later = last_seq(&client, &keel.url).await?;
        ensure!(
            committed_later > committed_at_stop,
            "the write path stalled while NATS was down ({committed_at_stop} -> {committed_later})"
        );
        let lag = metric(&client, &keel.url, "keel_publish_lag_batches")
            .await?
            .unwrap_or(0.0);
        ensure!(
            lag > 0.0,
            "keel_publish_lag_batches stayed {lag} while NATS was down"
        );
        nats.restart();
    }

    let report = loader.await??;
    ensure!(report.requests > 200, "load fell short: {report:?}");
    let batches = wait_published(&client, &keel.url, Duration::from_secs(60)).await?;
    let js = harness::jetstream(&nats.url()).await?;
    let mut stream = js.get_stream(&names.stream).await?;
    let stored = stream.info().await?.state.messages;
    ensure!(
        stored == batches,
        "the stream holds {stored} messages for {batches} batches (lost or duplicated)"
    );

    let db = mongo.database(&names.db).await;
    wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(120)).await?;
    verify(&db, &keel.url, &workload.ids()).await?;
    drop(projector);
    Ok(())
}
