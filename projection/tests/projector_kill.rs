//! kill -9 the projector mid-round, again and again under load: after each restart it redoes
//! its last round, and the projection ends equal to the engine, with no event applied twice.

mod harness;

use anyhow::{Context, ensure};
use harness::{
    Keel, Mongo, Names, Nats, ProjectorProcess, Shape, Workload, http, load, verify, wait_converged,
};
use keel_engine::decode_batch_message;
use keel_projection::documents::{self, Checkpoint};
use mongodb::bson::{DateTime, Document, doc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A steady load for about 7 s (~3,000 commands/s), long enough to span the fault.
const PACED: Shape = Shape {
    workers: 4,
    requests: 100_000,
    items: 20,
    pace: Duration::from_millis(25),
    deadline: Duration::from_secs(7),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_projector_mid_round_has_no_double_effect() -> anyhow::Result<()> {
    let names = Names::new("projector_kill");
    let (nats, mongo) = (Nats::start(), Mongo::start_memory());
    let data = tempfile::tempdir()?;
    let keel = Keel::start(data.path(), &nats.url(), &names, &[]);
    let start = || ProjectorProcess::start(&nats.url(), &mongo.url(), &keel.url, &names, &[]);
    let mut projector = start();
    let workload = Workload {
        accounts: 30,
        skus: 10,
    };
    workload.setup(&http(), &keel.url).await?;

    let url = keel.url.clone();
    let background = workload.clone();
    let loader = tokio::spawn(async move { load(&url, &background, 4, PACED).await });
    let mut seed = SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos() as u64 | 1;
    for kill in 0..4 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(400 + seed % 1200);
        tokio::time::sleep(delay).await;
        println!("kill {kill}: kill -9 after {delay:?}");
        projector.kill9();
        projector = start();
    }
    let report = loader.await??;
    ensure!(report.requests > 200, "load fell short: {report:?}");

    let db = mongo.database(&names.db).await;
    wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(120)).await?;
    verify(&db, &keel.url, &workload.ids()).await?;
    drop(projector);
    Ok(())
}

/// The exact state a crash between the writes of a round leaves: events partly inserted,
/// aggregates already at the round's end, checkpoint still before the round. Restarting must
/// redo the round from the source without applying anything twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_cut_before_its_checkpoint_is_redone_without_double_effect() -> anyhow::Result<()> {
    let names = Names::new("cut_round");
    let (nats, mongo) = (Nats::start(), Mongo::start_memory());
    let data = tempfile::tempdir()?;
    let keel = Keel::start(data.path(), &nats.url(), &names, &[]);
    let projector = ProjectorProcess::start(&nats.url(), &mongo.url(), &keel.url, &names, &[]);
    let workload = Workload {
        accounts: 10,
        skus: 5,
    };
    let client = http();
    workload.setup(&client, &keel.url).await?;
    let shape = Shape {
        workers: 2,
        requests: 100,
        items: 20,
        pace: Duration::ZERO,
        deadline: Duration::from_secs(60),
    };
    load(&keel.url, &workload, 9, shape).await?;
    let db = mongo.database(&names.db).await;
    wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(120)).await?;
    ensure!(projector.terminate().success());

    // Move the checkpoint 10 batches back and drop the later half of those batches' events.
    let (last_batch, last_seq) = harness::checkpoint(&db, &names.durable).await;
    let back = last_batch
        .checked_sub(10)
        .filter(|b| *b > 0)
        .context("at least 11 batches")?;
    let bytes = client
        .get(format!("{}/v1/batches/{back}", keel.url))
        .send()
        .await?
        .bytes()
        .await?;
    let header = decode_batch_message(&bytes)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .header;
    let checkpoint = Checkpoint {
        last_batch: back,
        last_seq: header.last_event(),
        last_hash: header.hash,
        committed_at_us: header.committed_at_us,
    };
    let document = documents::checkpoint_document(&names.durable, &checkpoint, DateTime::now());
    db.collection::<Document>("checkpoints")
        .replace_one(doc! {"_id": &names.durable}, document)
        .await?;
    // By `$in`: nx-27017 0.8.1 deletes the wrong documents for `{_id: {$gt: n}}`.
    let cut = (header.last_event() + last_seq) / 2;
    let dropped: Vec<i64> = (cut + 1..=last_seq).map(|seq| seq as i64).collect();
    let deleted = db
        .collection::<Document>("events")
        .delete_many(doc! {"_id": {"$in": &dropped}})
        .await?;
    ensure!(
        deleted.deleted_count == dropped.len() as u64,
        "deleted {} of {} events",
        deleted.deleted_count,
        dropped.len()
    );

    // The consumer acked those batches long ago: they come back through the source.
    let _projector = ProjectorProcess::start(&nats.url(), &mongo.url(), &keel.url, &names, &[]);
    wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(120)).await?;
    verify(&db, &keel.url, &workload.ids()).await?;
    // More batches on the same aggregates: a state applied twice in the projector's memory
    // would now reach MongoDB.
    load(&keel.url, &workload, 10, shape).await?;
    wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(120)).await?;
    verify(&db, &keel.url, &workload.ids()).await
}
