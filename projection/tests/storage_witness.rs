//! A store behind its own published history is data loss, never OK (issue 5). The JetStream
//! stream's last batch and the projection's checkpoint witness the store's true tip: a store
//! restored from an older copy must make `keel serve --nats-url` refuse to start, and
//! `keel audit --nats-url` / `--mongo-url` report INTEGRITY_FAILED, naming both numbers. A
//! store that then takes other writes past the stream's last batch has forked: still refused.

mod harness;

use anyhow::{Context, ensure};
use harness::{
    Keel, Mongo, Names, Nats, ProjectorProcess, Shape, Workload, http, keel_binary, last_batch,
    load, wait_converged, wait_published,
};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SHAPE: Shape = Shape {
    workers: 2,
    requests: 40,
    items: 10,
    pace: Duration::ZERO,
    deadline: Duration::from_secs(60),
};

fn copy_store(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        let name = path.file_name().context("file name")?;
        if path.is_file() && name != "LOCK" {
            std::fs::copy(&path, to.join(name))?;
        }
    }
    Ok(())
}

/// `keel serve` on `data` must exit non-zero without listening; returns its stderr.
fn serve_refuses(data: &Path, nats: &str, names: &Names) -> anyhow::Result<String> {
    let mut child = Command::new(keel_binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(["--nats-url", nats, "--nats-stream", &names.stream])
        .args(["--nats-subject", &names.subject])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("keel serve started on a store behind its published history");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    ensure!(!out.status.success(), "keel serve exited 0");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn audit(data: &Path, extra: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(keel_binary())
        .args(["audit", "--data"])
        .arg(data)
        .args(extra)
        .output()?)
}

fn explain(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_failed(out: &Output, needle: &str) -> anyhow::Result<()> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.code() == Some(1), "{}", explain(out));
    ensure!(
        stdout.lines().last() == Some("INTEGRITY_FAILED") && stdout.contains(needle),
        "expected INTEGRITY_FAILED naming `{needle}`: {}",
        explain(out)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_behind_its_published_history_is_refused_and_fails_the_audit() -> anyhow::Result<()>
{
    let names = Names::new("storage_witness");
    let (nats, mongo) = (Nats::start(), Mongo::start_memory());
    let data = tempfile::tempdir()?;
    let old = tempfile::tempdir()?;
    let client = http();
    let workload = Workload {
        accounts: 10,
        skus: 4,
    };

    // Round 1, stopped cleanly: the copy an operator will later restore by mistake.
    let keel = Keel::start(data.path(), &nats.url(), &names, &[]);
    workload.setup(&client, &keel.url).await?;
    load(&keel.url, &workload, 1, SHAPE).await?;
    wait_published(&client, &keel.url, Duration::from_secs(60)).await?;
    let old_batches = last_batch(&client, &keel.url).await?;
    keel.terminate();
    copy_store(data.path(), old.path())?;

    // Round 2 is published and projected.
    let keel = Keel::start(data.path(), &nats.url(), &names, &[]);
    load(&keel.url, &workload, 2, SHAPE).await?;
    let published = wait_published(&client, &keel.url, Duration::from_secs(60)).await?;
    let projector = ProjectorProcess::start(&nats.url(), &mongo.url(), &keel.url, &names, &[]);
    let db = mongo.database(&names.db).await;
    wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(60)).await?;
    projector.terminate();
    keel.terminate();
    ensure!(published > old_batches, "round 2 committed batches");

    // The full store is at the stream's tip: that is normal, and audits clean with the witness.
    let nats_args = [
        "--nats-url",
        &nats.url(),
        "--nats-stream",
        &names.stream,
        "--nats-subject",
        &names.subject,
    ];
    let out = audit(data.path(), &nats_args)?;
    ensure!(out.status.code() == Some(0), "{}", explain(&out));

    // The old copy is behind the stream: serve refuses, naming both numbers.
    let stderr = serve_refuses(old.path(), &nats.url(), &names)?;
    ensure!(
        stderr.contains("data loss")
            && stderr.contains(&format!("holds batch {published}"))
            && stderr.contains(&format!("ends at batch {old_batches}")),
        "serve's error does not name the loss: {stderr}"
    );
    // The audit says so too: with the stream, and with the projection's checkpoint.
    assert_failed(
        &audit(old.path(), &nats_args)?,
        "behind its published history: data loss",
    )?;
    let mongo_args = [
        "--mongo-url",
        &mongo.url(),
        "--mongo-db",
        &names.db,
        "--mongo-durable",
        &names.durable,
        "--mongo-wait",
        "1s",
    ];
    assert_failed(
        &audit(old.path(), &mongo_args)?,
        "store is behind its projection: data loss",
    )?;

    // The old copy takes other writes without NATS until it is past the stream's last batch:
    // its history forked from the published one, and a start with NATS is refused still.
    let keel = harness_keel_without_nats(old.path());
    let url = keel.1.clone();
    while last_batch(&client, &url).await? <= published {
        let answer = client
            .post(format!("{url}/v1/batches"))
            .json(&json!({"commands": [{"type": "deposit", "account": "a0", "amount": 1}]}))
            .send()
            .await?;
        ensure!(
            answer.status() == 200,
            "deposit refused: {}",
            answer.status()
        );
    }
    drop(keel);
    let stderr = serve_refuses(old.path(), &nats.url(), &names)?;
    ensure!(
        stderr.contains("forked"),
        "serve's error does not name the fork: {stderr}"
    );
    assert_failed(&audit(old.path(), &nats_args)?, "forked")?;
    Ok(())
}

/// `keel serve` without publication, killed on drop; returns the process and its URL.
fn harness_keel_without_nats(data: &Path) -> (KillOnDrop, String) {
    let mut child = Command::new(keel_binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn keel serve");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(url) = line.strip_prefix("keel: listening on ") {
                let _ = tx.send(url.to_owned());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("keel serve listens");
    (KillOnDrop(child), url)
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// After `keel upgrade` the batch hashes change: a stream that still holds the old format's
/// messages (layout 1) must not get the new store's batches published into it, where the
/// projection would follow two histories. `keel serve --nats-url` refuses and says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_another_storage_format_is_refused() -> anyhow::Result<()> {
    let names = Names::new("storage_witness_layout");
    let nats = Nats::start();
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: names.stream.clone(),
        subjects: vec![names.subject.clone()],
        ..Default::default()
    })
    .await?;
    // A format-1 batch message: magic, layout 1, then its 92-byte header (content immaterial).
    let mut payload = b"KEEL\x01".to_vec();
    payload.extend_from_slice(&[0u8; 92]);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "3");
    js.publish_with_headers(names.subject.clone(), headers, payload.into())
        .await?
        .await?;
    let data = tempfile::tempdir()?;
    let stderr = serve_refuses(data.path(), &nats.url(), &names)?;
    ensure!(
        stderr.contains("layout 1") && stderr.contains("re-create the stream"),
        "{stderr}"
    );
    Ok(())
}
