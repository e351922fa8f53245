//! Test harness: real servers on free loopback ports, stopped on drop.
//!
//! - [`Nats`]: `nats-server` with JetStream (its own store directory, `sync_interval: always`),
//!   or the server at `NATS_URL` when that is set;
//! - [`Mongo`]: `nx-27017` (a MongoDB wire-protocol server on SQLite), in memory or on a file,
//!   or the server at `MONGO_URL` when that is set;
//! - [`Keel`]: a real `keel serve --nats-url ...` process; [`ProjectorProcess`]: `keel project`.
//!
//! Every test uses its own stream, subject and database names, so tests can share external
//! servers. Tests that must stop and restart a server skip that step (and say so) when the
//! server is external.
#![allow(dead_code)] // each test binary uses a different part of the harness

use anyhow::{Context, bail, ensure};
use keel_engine::decode_batch_message;
use mongodb::bson::{Bson, Document, doc};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A free loopback port (bound and released; the server binds it right after).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Names unique to one test run, so tests can share external servers.
#[derive(Clone, Debug)]
pub struct Names {
    pub stream: String,
    pub subject: String,
    pub db: String,
    pub durable: String,
}

impl Names {
    pub fn new(test: &str) -> Self {
        let unique = format!("{}_{}", test, std::process::id());
        Self {
            stream: format!("KEEL_{}", unique.to_uppercase()),
            subject: format!("keel.{unique}.batches"),
            db: format!("keel_{unique}"),
            durable: format!("projector_{unique}"),
        }
    }
}

/// A JetStream server.
pub struct Nats {
    child: Option<Child>,
    port: u16,
    dir: Option<TempDir>,
    external: Option<String>,
}

impl Nats {
    pub fn start() -> Self {
        if let Ok(url) = std::env::var("NATS_URL") {
            return Self {
                child: None,
                port: 0,
                dir: None,
                external: Some(url),
            };
        }
        let dir = tempfile::tempdir().expect("nats temp dir");
        let mut nats = Self {
            child: None,
            port: free_port(),
            dir: Some(dir),
            external: None,
        };
        nats.spawn();
        nats
    }

    fn spawn(&mut self) {
        let dir = self
            .dir
            .as_ref()
            .expect("a local server has a directory")
            .path();
        let store = dir.join("jetstream");
        // `sync_interval: always`: every acknowledged message is fsynced (docs: deploy/nats).
        // max_payload stays at NATS's 1 MiB default, so a test can exceed it on purpose.
        let config = format!(
            "listen: 127.0.0.1:{}\nserver_name: keel_test_{}\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
            self.port,
            self.port,
            store.display()
        );
        let config_path = dir.join("nats.conf");
        std::fs::write(&config_path, config).expect("write nats.conf");
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server (install it with `make deps-test`)");
        self.child = Some(child);
        wait_listening(self.port, "nats-server");
    }

    pub fn url(&self) -> String {
        self.external
            .clone()
            .unwrap_or_else(|| format!("nats://127.0.0.1:{}", self.port))
    }

    pub fn is_external(&self) -> bool {
        self.external.is_some()
    }

    /// SIGKILL: an outage without a goodbye.
    pub fn stop(&mut self) {
        stop_child(&mut self.child);
    }

    /// Starts again on the same port and store.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server before restarting it");
        self.spawn();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// A MongoDB wire-protocol server.
pub struct Mongo {
    child: Option<Child>,
    port: u16,
    dir: Option<TempDir>,
    on_file: bool,
    external: Option<String>,
}

impl Mongo {
    /// nx-27017 in memory: fast, loses everything when stopped.
    pub fn start_memory() -> Self {
        Self::start(false)
    }

    /// nx-27017 on a SQLite file: survives a stop and restart.
    pub fn start_file() -> Self {
        Self::start(true)
    }

    fn start(on_file: bool) -> Self {
        if let Ok(url) = std::env::var("MONGO_URL") {
            return Self {
                child: None,
                port: 0,
                dir: None,
                on_file,
                external: Some(url),
            };
        }
        let dir = tempfile::tempdir().expect("mongo temp dir");
        let mut mongo = Self {
            child: None,
            port: free_port(),
            dir: Some(dir),
            on_file,
            external: None,
        };
        mongo.spawn();
        mongo
    }

    fn spawn(&mut self) {
        let dir = self
            .dir
            .as_ref()
            .expect("a local server has a directory")
            .path();
        let db = if self.on_file {
            dir.join("projection.db").display().to_string()
        } else {
            "memory".into()
        };
        let child = Command::new("nx-27017")
            .args(["--db", &db, "-p", &self.port.to_string()])
            .arg("--log-file")
            .arg(dir.join("nx.log"))
            .arg("--pid-file")
            .arg(dir.join("nx.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nx-27017 (install it with `make deps-test`)");
        self.child = Some(child);
        wait_listening(self.port, "nx-27017");
    }

    pub fn url(&self) -> String {
        self.external
            .clone()
            .unwrap_or_else(|| format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port))
    }

    pub fn is_external(&self) -> bool {
        self.external.is_some()
    }

    pub fn stop(&mut self) {
        stop_child(&mut self.child);
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server before restarting it");
        self.spawn();
    }

    pub async fn database(&self, name: &str) -> mongodb::Database {
        let client = mongodb::Client::with_uri_str(self.url())
            .await
            .expect("mongo client");
        client.database(name)
    }
}

impl Drop for Mongo {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// The `keel` binary next to the test binary (`target/release/deps/<test>` -> `target/release/keel`).
pub fn keel_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("keel"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --release -p keel-ingress --bin keel`; `make test` does)",
        bin.display()
    );
    bin
}

fn log_level() -> String {
    std::env::var("KEEL_TEST_LOG").unwrap_or_else(|_| "warn".into())
}

/// Waits for a line starting with `prefix` on the child's stdout (and keeps draining it).
fn watch_stdout(child: &mut Child, prefix: &'static str) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(prefix) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    rx
}

/// A `keel serve` process publishing to NATS.
pub struct Keel {
    child: Option<Child>,
    pub url: String,
    pub data: PathBuf,
}

impl Keel {
    pub fn start(data: &Path, nats_url: &str, names: &Names, extra: &[&str]) -> Self {
        Self::start_on(data, 0, nats_url, names, extra)
    }

    /// Starts on a given port (0: any), so a restarted server keeps its URL.
    pub fn start_on(data: &Path, port: u16, nats_url: &str, names: &Names, extra: &[&str]) -> Self {
        let mut child = Command::new(keel_binary())
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--nats-url",
                nats_url,
            ])
            .args([
                "--nats-stream",
                &names.stream,
                "--nats-subject",
                &names.subject,
            ])
            .args(extra)
            .env("RUST_LOG", log_level())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn keel serve");
        let lines = watch_stdout(&mut child, "keel: listening on ");
        let url = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("keel serve did not listen within 60 s");
        Self {
            child: Some(child),
            url,
            data: data.to_path_buf(),
        }
    }

    /// SIGKILL: no drain, the publisher's cursor is whatever it last recorded.
    pub fn kill9(mut self) {
        stop_child(&mut self.child);
    }

    /// SIGTERM and wait: the server drains and the publisher records its cursor.
    pub fn terminate(mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() {
                assert!(
                    Instant::now() < deadline,
                    "keel serve did not stop within 30 s of SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Keel {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// A `keel project` process.
pub struct ProjectorProcess {
    child: Option<Child>,
    consuming: mpsc::Receiver<String>,
}

impl ProjectorProcess {
    pub fn start(nats: &str, mongo: &str, source: &str, names: &Names, extra: &[&str]) -> Self {
        let mut child = Command::new(keel_binary())
            .arg("project")
            .args([
                "--nats-url",
                nats,
                "--mongo-url",
                mongo,
                "--source-url",
                source,
            ])
            .args([
                "--mongo-db",
                &names.db,
                "--nats-stream",
                &names.stream,
                "--nats-subject",
                &names.subject,
            ])
            .args(["--durable", &names.durable])
            // A short idle probe unless the test chooses: a lost last message costs 1 s.
            .args(if extra.contains(&"--idle-probe-secs") {
                &[][..]
            } else {
                &["--idle-probe-secs", "1"][..]
            })
            .args(extra)
            .env("RUST_LOG", log_level())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn keel project");
        let consuming = watch_stdout(&mut child, "keel: projector consuming ");
        Self {
            child: Some(child),
            consuming,
        }
    }

    /// Waits until the projector subscribed (after a rebuild, once the drop is done).
    pub fn wait_consuming(&self) {
        self.consuming
            .recv_timeout(Duration::from_secs(60))
            .expect("keel project did not subscribe within 60 s");
    }

    /// SIGKILL: whatever round was in progress stays half written.
    pub fn kill9(mut self) {
        stop_child(&mut self.child);
    }

    pub fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "keel project did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if the process already ended (it must not, short of a fatal error).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for ProjectorProcess {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

pub fn http() -> reqwest::Client {
    keel_projection::http_client::builder(&Default::default())
        .expect("http client settings")
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// The aggregates a workload uses.
#[derive(Clone, Debug)]
pub struct Workload {
    pub accounts: usize,
    pub skus: usize,
}

impl Workload {
    pub fn ids(&self) -> Vec<String> {
        let accounts = (0..self.accounts).map(|i| format!("account:a{i}"));
        accounts
            .chain((0..self.skus).map(|i| format!("sku:s{i}")))
            .collect()
    }

    /// Opens the accounts and creates the SKUs.
    pub async fn setup(&self, client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
        let mut commands: Vec<Value> = (0..self.accounts)
            .map(|i| json!({"type": "open_account", "account": format!("a{i}"), "overdraft_limit": 1000}))
            .collect();
        commands.extend(
            (0..self.skus).map(
                |i| json!({"type": "create_sku", "sku": format!("s{i}"), "on_hand": 1_000_000}),
            ),
        );
        let answer = post(client, url, &json!({"commands": commands})).await?;
        let committed = answer["results"].as_array().map_or(0, |r| {
            r.iter().filter(|i| i["status"] == "committed").count()
        });
        ensure!(
            committed == self.accounts + self.skus,
            "setup committed {committed} items: {answer}"
        );
        Ok(())
    }

    /// One request of `items` random commands (deterministic from `seed`).
    pub fn request(&self, seed: u64, items: usize) -> Value {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let commands: Vec<Value> = (0..items)
            .map(|n| self.command(&mut rng, seed, n))
            .collect();
        json!({"commands": commands})
    }

    fn command(&self, rng: &mut Rng, seed: u64, n: usize) -> Value {
        let account = |rng: &mut Rng| format!("a{}", rng.below(self.accounts as u64));
        let sku = |rng: &mut Rng| format!("s{}", rng.below(self.skus as u64));
        let amount = 1 + rng.below(50);
        match rng.below(8) {
            0 => {
                json!({"type": "deposit", "account": account(rng), "amount": amount, "memo": "pay"})
            }
            1 => json!({"type": "withdraw", "account": account(rng), "amount": amount}),
            2 | 3 => {
                let (from, to) = (account(rng), account(rng));
                json!({"type": "transfer", "from": from, "to": to, "amount": amount, "id": format!("t-{seed}-{n}")})
            }
            4 => json!({"type": "restock", "sku": sku(rng), "qty": amount}),
            5 => {
                json!({"type": "reserve", "sku": sku(rng), "qty": amount, "order": format!("o{}", rng.below(40))})
            }
            6 => {
                json!({"type": "release", "sku": sku(rng), "order": format!("o{}", rng.below(40))})
            }
            _ => json!({"type": "ship", "sku": sku(rng), "order": format!("o{}", rng.below(40))}),
        }
    }
}

/// xorshift64: deterministic workloads without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// POSTs a batch, retrying a bounded number of times on 503 (overload).
pub async fn post(client: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Value> {
    for _ in 0..50 {
        let response = client
            .post(format!("{url}/v1/batches"))
            .json(body)
            .send()
            .await?;
        if response.status().as_u16() == 503 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        ensure!(
            response.status().is_success(),
            "POST /v1/batches answered {}",
            response.status()
        );
        return Ok(response.json().await?);
    }
    bail!("POST /v1/batches stayed overloaded")
}

/// What a load run committed.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadReport {
    pub requests: u64,
    pub committed: u64,
    pub rejected: u64,
}

/// How a load run is shaped: `requests` requests of `items` commands from `workers` concurrent
/// workers, each pausing `pace` between requests, stopping early at `deadline`.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub workers: u64,
    pub requests: u64,
    pub items: usize,
    pub pace: Duration,
    pub deadline: Duration,
}

/// Sends the load `shape` describes. Every request is answered before this returns.
pub async fn load(
    url: &str,
    workload: &Workload,
    seed: u64,
    shape: Shape,
) -> anyhow::Result<LoadReport> {
    let Shape {
        workers,
        requests,
        items,
        pace,
        deadline,
    } = shape;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let (url, workload, client) = (url.to_owned(), workload.clone(), http());
        tasks.push(tokio::spawn(async move {
            let mut report = LoadReport::default();
            let mut n = worker;
            while n < requests && started.elapsed() < deadline {
                let answer = post(
                    &client,
                    &url,
                    &workload.request(seed * 1_000_003 + n, items),
                )
                .await?;
                report.requests += 1;
                for result in answer["results"].as_array().into_iter().flatten() {
                    match result["status"].as_str() {
                        Some("committed") => report.committed += 1,
                        _ => report.rejected += 1,
                    }
                }
                n += workers;
                if !pace.is_zero() {
                    tokio::time::sleep(pace).await;
                }
            }
            anyhow::Ok(report)
        }));
    }
    let mut total = LoadReport::default();
    for task in tasks {
        let report = task.await??;
        total.requests += report.requests;
        total.committed += report.committed;
        total.rejected += report.rejected;
    }
    Ok(total)
}

/// The committed log's last event sequence.
pub async fn last_seq(client: &reqwest::Client, url: &str) -> anyhow::Result<u64> {
    let page: Value = client
        .get(format!("{url}/v1/events?after=0&limit=1"))
        .send()
        .await?
        .json()
        .await?;
    page["last_seq"].as_u64().context("last_seq")
}

/// The projection's checkpoint: (last_batch, last_seq), zero when absent or unreachable.
pub async fn checkpoint(db: &mongodb::Database, durable: &str) -> (u64, u64) {
    let found = db
        .collection::<Document>("checkpoints")
        .find_one(doc! {"_id": durable})
        .await;
    match found {
        Ok(Some(d)) => {
            let number = |field: &str| {
                d.get(field)
                    .and_then(keel_projection::documents::bson_u64)
                    .unwrap_or(0)
            };
            (number("last_batch"), number("last_seq"))
        }
        _ => (0, 0),
    }
}

/// Waits until the projection's checkpoint reaches the committed log's last event.
pub async fn wait_converged(
    db: &mongodb::Database,
    durable: &str,
    keel_url: &str,
    within: Duration,
) -> anyhow::Result<u64> {
    let client = http();
    let target = last_seq(&client, keel_url).await?;
    let deadline = Instant::now() + within;
    loop {
        let (batch, seq) = checkpoint(db, durable).await;
        if seq == target {
            return Ok(target);
        }
        ensure!(
            seq <= target,
            "the projection is at event {seq}, beyond the log's {target}"
        );
        if Instant::now() > deadline {
            bail!(
                "the projection did not converge within {within:?}: at batch {batch} event {seq}, the log ends at event {target}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Proves the projection equals the engine: every aggregate's version and state, and every
/// committed event exactly once with its batch, type, aggregates, command id, data and time.
pub async fn verify(db: &mongodb::Database, keel_url: &str, ids: &[String]) -> anyhow::Result<()> {
    let client = http();
    verify_aggregates(db, &client, keel_url, ids).await?;
    verify_events(db, &client, keel_url).await
}

async fn verify_aggregates(
    db: &mongodb::Database,
    client: &reqwest::Client,
    url: &str,
    ids: &[String],
) -> anyhow::Result<()> {
    let collection = db.collection::<Document>("aggregates");
    let stored = collection.count_documents(doc! {}).await?;
    ensure!(
        stored == ids.len() as u64,
        "{stored} aggregate documents, expected {}",
        ids.len()
    );
    for id in ids {
        let engine: Value = client
            .get(format!("{url}/v1/aggregates/{id}"))
            .send()
            .await?
            .json()
            .await?;
        let document = collection
            .find_one(doc! {"_id": id})
            .await?
            .with_context(|| format!("{id} not projected"))?;
        let projected = Bson::Document(document).into_relaxed_extjson();
        ensure!(
            projected["version"] == engine["version"],
            "{id}: version {} in MongoDB, {} in Keel",
            projected["version"],
            engine["version"]
        );
        ensure!(projected["kind"] == engine["kind"], "{id}: kind");
        for (field, value) in engine["state"].as_object().context("state")? {
            ensure!(
                &projected[field] == value,
                "{id}: `{field}` is {} in MongoDB, {value} in Keel",
                projected[field]
            );
        }
    }
    Ok(())
}

async fn verify_events(
    db: &mongodb::Database,
    client: &reqwest::Client,
    url: &str,
) -> anyhow::Result<()> {
    use futures_util::TryStreamExt;
    let last = last_seq(client, url).await?;
    let collection = db.collection::<Document>("events");
    let stored = collection.count_documents(doc! {}).await?;
    ensure!(
        stored == last,
        "{stored} event documents, the log has {last} events"
    );
    let mut batch_times: HashMap<u64, i64> = HashMap::new();
    let mut after = 0;
    while after < last {
        let page: Value = client
            .get(format!("{url}/v1/events?after={after}&limit=5000"))
            .send()
            .await?
            .json()
            .await?;
        let events = page["events"].as_array().context("events")?;
        let upper = events
            .last()
            .and_then(|e| e["seq"].as_u64())
            .context("a page of events")?;
        let filter = doc! {"_id": {"$gt": after as i64, "$lte": upper as i64}};
        let documents: Vec<Document> = collection
            .find(filter)
            .sort(doc! {"_id": 1})
            .await?
            .try_collect()
            .await?;
        ensure!(
            documents.len() == events.len(),
            "events {after}..{upper}: {} documents for {} events",
            documents.len(),
            events.len()
        );
        for (event, document) in events.iter().zip(documents) {
            compare_event(client, url, event, document, &mut batch_times).await?;
        }
        after = upper;
    }
    Ok(())
}

async fn compare_event(
    client: &reqwest::Client,
    url: &str,
    event: &Value,
    document: Document,
    batch_times: &mut HashMap<u64, i64>,
) -> anyhow::Result<()> {
    let committed_at = document
        .get_datetime("committed_at")
        .context("committed_at is a date")?
        .timestamp_millis();
    let projected = Bson::Document(document).into_relaxed_extjson();
    let seq = event["seq"].as_u64().context("seq")?;
    ensure!(
        projected["_id"] == event["seq"],
        "event {seq}: _id {}",
        projected["_id"]
    );
    for field in ["batch", "type", "aggregates", "command_id", "data"] {
        ensure!(
            projected[field] == event[field],
            "event {seq}: `{field}` is {} in MongoDB, {} in Keel",
            projected[field],
            event[field]
        );
    }
    let batch = event["batch"].as_u64().context("batch")?;
    if let std::collections::hash_map::Entry::Vacant(entry) = batch_times.entry(batch) {
        let bytes = client
            .get(format!("{url}/v1/batches/{batch}"))
            .send()
            .await?
            .bytes()
            .await?;
        let message =
            decode_batch_message(&bytes).map_err(|e| anyhow::anyhow!("batch {batch}: {e}"))?;
        entry.insert((message.header.committed_at_us / 1000) as i64);
    }
    ensure!(
        batch_times[&batch] == committed_at,
        "event {seq}: committed_at {committed_at} ms, batch says {}",
        batch_times[&batch]
    );
    Ok(())
}

/// A sample of `name` (without labels) from `GET /metrics`.
pub async fn metric(
    client: &reqwest::Client,
    url: &str,
    name: &str,
) -> anyhow::Result<Option<f64>> {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            line.rsplit_once(' ')
                .filter(|(n, _)| *n == name)
                .and_then(|(_, v)| v.parse().ok())
        }))
}

/// The last committed batch.
pub async fn last_batch(client: &reqwest::Client, url: &str) -> anyhow::Result<u64> {
    let last = last_seq(client, url).await?;
    let page: Value = client
        .get(format!(
            "{url}/v1/events?after={}&limit=1",
            last.saturating_sub(1)
        ))
        .send()
        .await?
        .json()
        .await?;
    page["events"][0]["batch"]
        .as_u64()
        .context("the last event's batch")
}

/// Waits until the publisher's cursor (`keel_publish_cursor`) reaches the last batch.
pub async fn wait_published(
    client: &reqwest::Client,
    url: &str,
    within: Duration,
) -> anyhow::Result<u64> {
    let target = last_batch(client, url).await?;
    let deadline = Instant::now() + within;
    loop {
        let cursor = metric(client, url, "keel_publish_cursor")
            .await?
            .unwrap_or(0.0) as u64;
        let lag = metric(client, url, "keel_publish_lag_batches").await?;
        if cursor == target && lag == Some(0.0) {
            return Ok(target);
        }
        if Instant::now() > deadline {
            bail!(
                "the publisher did not catch up within {within:?}: cursor {cursor}, last batch {target}, lag {lag:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A JetStream context for inspecting and damaging the stream.
pub async fn jetstream(nats_url: &str) -> anyhow::Result<async_nats::jetstream::Context> {
    let client = async_nats::connect(nats_url).await?;
    Ok(async_nats::jetstream::new(client))
}
