//! MongoDB stopped under load: the projector waits, keeps its place, and converges when the
//! server returns. Two cases: a server that keeps its data (nx-27017 on a file), and one that
//! comes back empty (nx-27017 in memory), which the projector notices by its checkpoint and
//! rebuilds from the stream and the source.

mod harness;

use anyhow::ensure;
use harness::{
    Keel, Mongo, Names, Nats, ProjectorProcess, Shape, Workload, http, load, verify, wait_converged,
};
use std::time::Duration;

async fn outage(test: &str, mut mongo: Mongo) -> anyhow::Result<()> {
    let names = Names::new(test);
    let nats = Nats::start();
    let data = tempfile::tempdir()?;
    let keel = Keel::start(data.path(), &nats.url(), &names, &[]);
    let mut projector = ProjectorProcess::start(&nats.url(), &mongo.url(), &keel.url, &names, &[]);
    let workload = Workload {
        accounts: 30,
        skus: 10,
    };
    workload.setup(&http(), &keel.url).await?;

    let url = keel.url.clone();
    let background = workload.clone();
    let loader = tokio::spawn(async move { load(&url, &background, 3, PACED).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if mongo.is_external() {
        println!(
            "MONGO_URL is set: not stopping an external server; this run only checks convergence"
        );
    } else {
        mongo.stop();
        tokio::time::sleep(Duration::from_secs(3)).await;
        ensure!(
            projector.exited().is_none(),
            "keel project exited while MongoDB was down"
        );
        mongo.restart();
    }
    let report = loader.await??;
    ensure!(report.requests > 200, "load fell short: {report:?}");

    let db = mongo.database(&names.db).await;
    wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(120)).await?;
    verify(&db, &keel.url, &workload.ids()).await?;
    Ok(())
}

/// A steady load for about 7 s (~3,000 commands/s), long enough to span the fault.
const PACED: Shape = Shape {
    workers: 4,
    requests: 100_000,
    items: 20,
    pace: Duration::from_millis(25),
    deadline: Duration::from_secs(7),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_waits_out_a_mongodb_outage() -> anyhow::Result<()> {
    outage("mongo_outage", Mongo::start_file()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_wiped_under_the_projector_is_rebuilt() -> anyhow::Result<()> {
    outage("mongo_wiped", Mongo::start_memory()).await
}
