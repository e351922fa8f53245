//! Measures the projection: catch-up throughput (events/s, batches/s) and lag at a steady load,
//! with real servers started by the test harness (nats-server, nx-27017 unless `NATS_URL` /
//! `MONGO_URL` point elsewhere, `keel serve`, `keel project`).
//!
//! ```sh
//! cargo build --release -p keel-ingress --bin keel
//! cargo run --release -p keel-projection --example projection_bench -- \
//!     --catchup-events 60000 --items 50 --rate 1000 --seconds 30
//! ```
//!
//! 1. Catch-up: with no projector running, commit `--catchup-events` items (4 workers, `--items`
//!    per request) and let the publisher put them on the stream; then start `keel project` and
//!    time it until its checkpoint reaches the log's end.
//! 2. Steady: send `--rate` items/s for `--seconds` seconds while the projector runs; every
//!    500 ms sample the log's last event and the projector's checkpoint. Lag in events is
//!    `last_seq - checkpoint.last_seq`; lag in seconds is `now - checkpoint.committed_at` while
//!    behind (0 when caught up), an upper bound on the age of the oldest unprojected event.

#[path = "../tests/harness/mod.rs"]
mod harness;

use anyhow::{Context, ensure};
use harness::{
    Keel, Mongo, Names, Nats, ProjectorProcess, Shape, Workload, checkpoint, http, last_seq, load,
    post,
};
use mongodb::bson::{Document, doc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Args {
    catchup_events: u64,
    items: usize,
    rate: u64,
    seconds: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        catchup_events: 60_000,
        items: 50,
        rate: 1000,
        seconds: 30,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value: u64 = it
            .next()
            .with_context(|| format!("{flag} needs a value"))?
            .parse()?;
        match flag.as_str() {
            "--catchup-events" => args.catchup_events = value,
            "--items" => args.items = usize::try_from(value)?,
            "--rate" => args.rate = value,
            "--seconds" => args.seconds = value,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    ensure!(
        args.items > 0 && args.rate > 0,
        "--items and --rate must be positive"
    );
    Ok(args)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let names = Names::new("bench");
    let (nats, mongo) = (Nats::start(), Mongo::start_memory());
    let data = tempfile::tempdir()?;
    let keel = Keel::start(data.path(), &nats.url(), &names, &[]);
    let workload = Workload {
        accounts: 1000,
        skus: 200,
    };
    let client = http();
    workload.setup(&client, &keel.url).await?;
    let db = mongo.database(&names.db).await;

    let requests = args.catchup_events.div_ceil(args.items as u64);
    let report = load(
        &keel.url,
        &workload,
        11,
        Shape {
            workers: 4,
            requests,
            items: args.items,
            pace: Duration::ZERO,
            deadline: Duration::from_secs(600),
        },
    )
    .await?;
    let batches = harness::wait_published(&client, &keel.url, Duration::from_secs(300)).await?;
    let events = last_seq(&client, &keel.url).await?;
    println!(
        "catch-up: {events} events in {batches} batches committed ({report:?}); starting the projector"
    );
    let started = Instant::now();
    let projector = ProjectorProcess::start(
        &nats.url(),
        &mongo.url(),
        &keel.url,
        &names,
        &["--idle-probe-secs", "0"],
    );
    harness::wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(1800)).await?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "catch-up: projected {events} events / {batches} batches in {seconds:.1} s = {:.0} events/s, {:.0} batches/s",
        events as f64 / seconds,
        batches as f64 / seconds
    );

    steady(&args, &keel.url, &workload, &db, &names.durable).await?;
    drop(projector);
    Ok(())
}

/// Sends `rate` items/s for `seconds` s and samples the projection's lag.
async fn steady(
    args: &Args,
    url: &str,
    workload: &Workload,
    db: &mongodb::Database,
    durable: &str,
) -> anyhow::Result<()> {
    let interval = Duration::from_secs_f64(args.items as f64 / args.rate as f64);
    let (url_owned, workload, items, seconds) =
        (url.to_owned(), workload.clone(), args.items, args.seconds);
    let sender = tokio::spawn(async move {
        let client = http();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (started, mut sent, mut n) = (Instant::now(), 0u64, 0u64);
        while started.elapsed() < Duration::from_secs(seconds) {
            tick.tick().await;
            post(&client, &url_owned, &workload.request(7_000_000 + n, items)).await?;
            sent += items as u64;
            n += 1;
        }
        anyhow::Ok((sent, started.elapsed()))
    });
    let client = http();
    let (mut lag_events, mut lag_seconds) = (Vec::new(), Vec::new());
    let first = last_seq(&client, url).await?;
    while !sender.is_finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let log = last_seq(&client, url).await?;
        let (_, projected) = checkpoint(db, durable).await;
        lag_events.push(log.saturating_sub(projected));
        lag_seconds.push(if projected >= log {
            0.0
        } else {
            checkpoint_age(db, durable).await?
        });
    }
    let (sent, elapsed) = sender.await??;
    let last = last_seq(&client, url).await?;
    println!(
        "steady: offered {} items/s, committed {} events in {:.1} s = {:.0} events/s; {} lag samples",
        args.rate,
        last - first,
        elapsed.as_secs_f64(),
        (last - first) as f64 / elapsed.as_secs_f64(),
        lag_events.len()
    );
    println!("steady: sent {sent} items");
    lag_events.sort_unstable();
    lag_seconds.sort_by(f64::total_cmp);
    let pick = |n: usize, p: f64| ((n as f64 - 1.0) * p).round() as usize;
    for (p, label) in [(0.5, "p50"), (0.99, "p99"), (1.0, "max")] {
        let (i, j) = (pick(lag_events.len(), p), pick(lag_seconds.len(), p));
        println!(
            "steady: lag {label}: {} events, {:.2} s",
            lag_events.get(i).unwrap_or(&0),
            lag_seconds.get(j).unwrap_or(&0.0)
        );
    }
    let drained = Instant::now();
    harness::wait_converged(db, durable, url, Duration::from_secs(600)).await?;
    println!(
        "steady: projection caught up {:.2} s after the load stopped",
        drained.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Seconds since the commit of the projection's last batch.
async fn checkpoint_age(db: &mongodb::Database, durable: &str) -> anyhow::Result<f64> {
    let found = db
        .collection::<Document>("checkpoints")
        .find_one(doc! {"_id": durable})
        .await?;
    let committed = found
        .and_then(|d| {
            d.get_datetime("committed_at")
                .ok()
                .map(|t| t.timestamp_millis())
        })
        .unwrap_or(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    Ok((now - committed).max(0) as f64 / 1000.0)
}
