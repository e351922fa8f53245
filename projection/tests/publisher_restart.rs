//! The publisher across restarts of `keel serve`: after SIGTERM its cursor covers every batch;
//! after kill -9 it resends from its last recorded cursor and JetStream drops the duplicates
//! by `Nats-Msg-Id`, so the stream holds every batch exactly once. A restart with other
//! stream limits applies them to the existing stream.

mod harness;

use anyhow::ensure;
use harness::{
    Keel, Mongo, Names, Nats, ProjectorProcess, Shape, Workload, free_port, http, last_batch, load,
    verify, wait_converged, wait_published,
};
use std::time::Duration;

const SHAPE: Shape = Shape {
    workers: 4,
    requests: 200,
    items: 20,
    pace: Duration::ZERO,
    deadline: Duration::from_secs(60),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_resend_without_duplicates_or_holes() -> anyhow::Result<()> {
    let names = Names::new("publisher_restart");
    let (nats, mongo) = (Nats::start(), Mongo::start_memory());
    let data = tempfile::tempdir()?;
    let port = free_port();
    let client = http();
    let workload = Workload {
        accounts: 20,
        skus: 8,
    };

    // kill -9 while publishing: whatever the cursor recorded, the rest is sent again.
    let keel = Keel::start_on(data.path(), port, &nats.url(), &names, &[]);
    workload.setup(&client, &keel.url).await?;
    load(&keel.url, &workload, 1, SHAPE).await?;
    wait_published(&client, &keel.url, Duration::from_secs(60)).await?;
    load(&keel.url, &workload, 2, SHAPE).await?;
    keel.kill9();

    // SIGTERM: the publisher sends everything and records its cursor before the process ends.
    let keel = Keel::start_on(data.path(), port, &nats.url(), &names, &[]);
    wait_published(&client, &keel.url, Duration::from_secs(60)).await?;
    load(&keel.url, &workload, 3, SHAPE).await?;
    let batches = last_batch(&client, &keel.url).await?;
    keel.terminate();
    let engine = keel_engine::Engine::open_rocksdb(data.path())?;
    let cursor = engine.reader().publish_cursor()?;
    ensure!(
        cursor == batches,
        "after SIGTERM the cursor is {cursor}, the last batch {batches}"
    );
    // A cursor update lost in a power cut (it is written without fsync): 50 batches go again.
    ensure!(cursor > 50, "too few batches ({cursor}) for the test");
    engine.reader().set_publish_cursor(cursor - 50)?;
    drop(engine);

    // This start also sets other stream limits: the publisher applies them to the existing
    // stream.
    let limits = [
        "--nats-stream-max-age",
        "1h",
        "--nats-stream-max-bytes",
        "256MiB",
    ];
    let keel = Keel::start_on(data.path(), port, &nats.url(), &names, &limits);
    load(&keel.url, &workload, 4, SHAPE).await?;
    let batches = wait_published(&client, &keel.url, Duration::from_secs(60)).await?;
    let js = harness::jetstream(&nats.url()).await?;
    let info = js.get_stream(&names.stream).await?.info().await?.clone();
    let stored = info.state.messages;
    ensure!(
        stored == batches,
        "the stream holds {stored} messages for {batches} batches"
    );
    ensure!(
        info.config.max_age == Duration::from_secs(3600) && info.config.max_bytes == 256 << 20,
        "the stream's limits were not applied: {:?} {}",
        info.config.max_age,
        info.config.max_bytes
    );

    let _projector = ProjectorProcess::start(&nats.url(), &mongo.url(), &keel.url, &names, &[]);
    let db = mongo.database(&names.db).await;
    wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(120)).await?;
    verify(&db, &keel.url, &workload.ids()).await
}
