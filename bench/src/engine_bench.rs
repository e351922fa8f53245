//! The in-process engine benchmark: the sequencer and RocksDB without HTTP or JSON.
//!
//! Opens a fresh RocksDB store in a temporary directory, starts the sequencer on it, opens and
//! funds the accounts, then keeps `in_flight` submissions of `batch` transfers queued for the
//! duration. What it measures is Keel's own ceiling on this disk: decide + one WriteBatch + one
//! fsync per batch (several submissions share a batch when they queue up).

use crate::report::{Machine, git_commit};
use crate::stats::{LatencyHistogram, LatencySummaryMs};
use crate::workload::{INITIAL_BALANCE, account_name};
use anyhow::{Context, anyhow, bail};
use keel_invariants::{AggregateId, Command, Envelope, ledger};
use keel_sequencer::{ItemResult, Reply, Sequencer, SubmitError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

#[derive(Clone, Debug, Serialize)]
pub struct EngineConfig {
    /// Parent directory of the temporary store (the disk under test).
    pub dir: PathBuf,
    /// Use this directory as the store and keep it (instead of a temporary one under `dir`).
    pub store: Option<PathBuf>,
    pub batch: usize,
    pub duration_s: f64,
    pub accounts: u64,
    /// Submissions kept queued at once (several make group commit possible).
    pub in_flight: usize,
    /// Most items one commit (one fsync) may hold, as `keel serve --batch-items-max`.
    pub batch_items_max: usize,
    pub payload_bytes: usize,
    pub seed: u64,
    pub submissions_max: u64,
    /// Most aggregates the writer keeps in memory (`keel serve --cache-aggregates-max`).
    pub cache_aggregates_max: usize,
    pub ids: IdShape,
}

/// How the engine bench makes its command ids.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum IdShape {
    /// `e-1`, `e-2`, ...
    #[default]
    Counter,
    /// 32 random hex digits (a UUIDv4's randomness).
    Random,
}

impl IdShape {
    fn id(self, rng: &mut StdRng, n: u64) -> String {
        match self {
            IdShape::Counter => format!("e-{n}"),
            IdShape::Random => format!("{:032x}", rng.random::<u128>()),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EngineReport {
    pub schema: &'static str,
    pub label: Option<String>,
    pub started_at: String,
    pub duration_s: f64,
    /// Committed items per second.
    pub items_per_sec: f64,
    /// Answered submissions per second (the engine's equivalent of requests).
    pub batches_per_sec: f64,
    /// Durable commits (fsyncs) per second.
    pub commits_per_sec: f64,
    pub items_per_commit_mean: f64,
    /// Per submission, from `submit` to its reply.
    pub latency_ms: LatencySummaryMs,
    pub items_committed: u64,
    pub items_rejected: u64,
    pub submissions: u64,
    pub overloaded: u64,
    /// CPU seconds (user + system) each thread of the process spent during the measured run,
    /// summed by thread name (`keel-sequencer` is the writer; `keel-checkpoint`, RocksDB's
    /// `rocksdb:low`/`rocksdb:high` and the bench's own thread share the other core). Empty
    /// where `/proc` is not readable.
    pub cpu_s_by_thread: BTreeMap<String, f64>,
    /// Sorted runs of the store's `command_ids` family at the end of the run (each one a bloom
    /// filter every command-id lookup checks; `keel_store_sorted_runs` on a server).
    pub command_id_sorted_runs: Option<u64>,
    /// Memory RocksDB holds for `command_ids`' open tables at the end of the run (their bloom
    /// filters and indexes, outside any cache), and the ids they hold (RocksDB's estimate):
    /// the memory per stored id of docs/FORMAT.md, measured (`keel_store_table_readers_bytes`
    /// on a server).
    pub command_id_table_readers: Option<TableReaders>,
    pub parameters: EngineConfig,
    pub machine: Machine,
    pub git_commit: String,
}

struct Tallies {
    latency: LatencyHistogram,
    committed: u64,
    rejected: u64,
    submissions: u64,
    commits: u64,
    last_batch: Option<u64>,
    overloaded: u64,
}

/// Runs the engine benchmark; blocks the calling thread (it makes its own runtime).
pub fn run(
    config: &EngineConfig,
    machine: Machine,
    label: Option<String>,
) -> anyhow::Result<EngineReport> {
    if config.batch == 0 || config.in_flight == 0 || config.accounts < 2 {
        bail!("engine bench needs --batch >= 1, --in-flight >= 1 and --accounts >= 2");
    }
    if config.batch > config.batch_items_max || config.batch_items_max < 1000 {
        bail!("--batch-items-max must be at least 1000 (setup batches) and at least --batch");
    }
    // The temporary directory (if any) lives until the end of this function: the store is
    // closed by `sequencer.shutdown()` before it is removed.
    let (_temporary, store) = store_dir(config)?;
    if std::fs::read_dir(&store)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
    {
        bail!(
            "the store directory {} is not empty; the engine bench needs a fresh store",
            store.display()
        );
    }
    let engine = keel_engine::Engine::open_rocksdb(&store)
        .with_context(|| format!("opening RocksDB in {}", store.display()))?;
    let sequencer = Sequencer::start(
        engine,
        keel_sequencer::Config {
            batch_items_max: config.batch_items_max,
            queue_depth_max: config.in_flight.max(16),
            queue_items_max: config.batch_items_max.max(config.batch * config.in_flight),
            linger: Duration::ZERO,
            cache_aggregates_max: config.cache_aggregates_max,
            ..keel_sequencer::Config::default()
        },
    )
    .context("starting the sequencer")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let started_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let ticks_per_sec = crate::sampler::clock_ticks_per_sec();
    let result = runtime.block_on(async {
        setup(&sequencer, config.accounts).await?;
        let before = thread_cpu_ticks();
        let measured = measure(&sequencer, config).await?;
        Ok::<_, anyhow::Error>((measured, before, thread_cpu_ticks()))
    });
    let storage = sequencer.reader().storage().ok();
    let command_id_sorted_runs = storage
        .as_ref()
        .and_then(|storage| storage.sorted_runs(keel_engine::Cf::CommandIds).ok())
        .flatten();
    let command_id_table_readers = storage
        .as_ref()
        .and_then(|storage| storage.table_readers(keel_engine::Cf::CommandIds).ok())
        .flatten()
        .map(|readers| TableReaders {
            bytes: readers.bytes,
            ids: readers.keys,
        });
    sequencer.shutdown();
    let ((tallies, elapsed), before, after) = result?;
    let cpu_s_by_thread = after
        .into_iter()
        .map(|(name, ticks)| {
            let spent = ticks.saturating_sub(before.get(&name).copied().unwrap_or(0));
            (name, spent as f64 / ticks_per_sec)
        })
        .collect();
    let secs = elapsed.as_secs_f64().max(1e-9);
    Ok(EngineReport {
        schema: crate::report::ENGINE_SCHEMA,
        label,
        started_at,
        duration_s: elapsed.as_secs_f64(),
        items_per_sec: tallies.committed as f64 / secs,
        batches_per_sec: tallies.submissions as f64 / secs,
        commits_per_sec: tallies.commits as f64 / secs,
        items_per_commit_mean: tallies.committed as f64 / (tallies.commits.max(1)) as f64,
        latency_ms: tallies.latency.summary_ms(),
        items_committed: tallies.committed,
        items_rejected: tallies.rejected,
        submissions: tallies.submissions,
        overloaded: tallies.overloaded,
        cpu_s_by_thread,
        command_id_sorted_runs,
        command_id_table_readers,
        parameters: config.clone(),
        machine,
        git_commit: git_commit(),
    })
}

/// Memory RocksDB holds for a family's open tables ([`keel_engine::TableReaders`]).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TableReaders {
    /// Bytes outside any cache: the tables' bloom filters and indexes.
    pub bytes: u64,
    /// Ids the family holds (RocksDB's estimate).
    pub ids: u64,
}

/// `command_ids`' table metadata in memory, and per stored id: "52.1 MB for 12,000,000 ids
/// (4.34 B per id)".
fn table_readers_line(readers: TableReaders) -> String {
    let per_id = if readers.ids == 0 {
        String::new()
    } else {
        format!(
            " ({:.2} B per id)",
            readers.bytes as f64 / readers.ids as f64
        )
    };
    format!(
        "{:.1} MB for {} ids{per_id}",
        readers.bytes as f64 / 1e6,
        crate::report::group(readers.ids as f64)
    )
}

/// CPU time (utime + stime, in clock ticks) of this process's threads, summed by thread name,
/// from `/proc/self/task/*/{comm,stat}`. A thread that ends between two readings drops out of
/// the later one (the writer and the checkpoint thread live as long as the sequencer).
fn thread_cpu_ticks() -> BTreeMap<String, u64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by_name;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue;
        };
        if let Some(ticks) = crate::sampler::parse_proc_stat_ticks(&stat) {
            *by_name.entry(comm.trim().to_owned()).or_insert(0) += ticks;
        }
    }
    by_name
}

fn store_dir(config: &EngineConfig) -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf)> {
    if let Some(store) = &config.store {
        std::fs::create_dir_all(store).with_context(|| format!("creating {}", store.display()))?;
        return Ok((None, store.clone()));
    }
    std::fs::create_dir_all(&config.dir)
        .with_context(|| format!("creating {}", config.dir.display()))?;
    let temporary = tempfile::Builder::new()
        .prefix("keel-engine-bench-")
        .tempdir_in(&config.dir)
        .with_context(|| format!("creating a temporary store in {}", config.dir.display()))?;
    let path = temporary.path().to_owned();
    Ok((Some(temporary), path))
}

fn account_id(i: u64) -> AggregateId {
    AggregateId::new(ledger::KIND, &account_name(i))
}

async fn answer(rx: oneshot::Receiver<Result<Reply, SubmitError>>) -> anyhow::Result<Reply> {
    rx.await
        .map_err(|_| anyhow!("the sequencer dropped a submission"))?
        .map_err(|e| anyhow!("submission failed: {e}"))
}

async fn setup(sequencer: &Sequencer, accounts: u64) -> anyhow::Result<()> {
    let mut commands = Vec::new();
    for i in 0..accounts {
        commands.push(envelope(
            Some(format!("setup-open-{i}")),
            ledger::Command::OpenAccount {
                account: account_id(i),
                overdraft_limit: 0,
            },
        ));
        commands.push(envelope(
            Some(format!("setup-fund-{i}")),
            ledger::Command::Deposit {
                account: account_id(i),
                amount: INITIAL_BALANCE,
                memo: None,
            },
        ));
        if commands.len() >= 1000 || i + 1 == accounts {
            let reply = answer(sequencer.submit(std::mem::take(&mut commands), false)?).await?;
            if let Some(rejected) = reply
                .results
                .iter()
                .find(|r| matches!(r, ItemResult::Rejected { .. }))
            {
                bail!("setup: an item was rejected on a fresh store: {rejected:?}");
            }
        }
    }
    Ok(())
}

fn envelope(id: Option<String>, command: ledger::Command) -> Envelope {
    Envelope {
        id,
        expected_version: None,
        command: Command::new(command),
    }
}

fn transfers(
    rng: &mut StdRng,
    config: &EngineConfig,
    next_id: &mut u64,
    memo: &Option<String>,
) -> Vec<Envelope> {
    (0..config.batch)
        .map(|_| {
            let from = rng.random_range(0..config.accounts);
            let mut to = rng.random_range(0..config.accounts - 1);
            if to >= from {
                to += 1;
            }
            *next_id += 1;
            envelope(
                Some(config.ids.id(rng, *next_id)),
                ledger::Command::Transfer {
                    from: account_id(from),
                    to: account_id(to),
                    amount: rng.random_range(1..=100),
                    memo: memo.clone(),
                },
            )
        })
        .collect()
}

type InFlight = VecDeque<(Instant, oneshot::Receiver<Result<Reply, SubmitError>>)>;

async fn measure(
    sequencer: &Sequencer,
    config: &EngineConfig,
) -> anyhow::Result<(Tallies, Duration)> {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let memo = (config.payload_bytes > 0).then(|| "x".repeat(config.payload_bytes.min(4096)));
    let mut tallies = Tallies {
        latency: LatencyHistogram::new(),
        committed: 0,
        rejected: 0,
        submissions: 0,
        commits: 0,
        last_batch: None,
        overloaded: 0,
    };
    let mut in_flight: InFlight = VecDeque::new();
    let mut next_id = 0u64;
    let mut submitted = 0u64;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(config.duration_s.max(0.0));
    let mut ready = transfers(&mut rng, config, &mut next_id, &memo);
    loop {
        while in_flight.len() < config.in_flight
            && submitted < config.submissions_max
            && Instant::now() < deadline
        {
            let commands =
                std::mem::replace(&mut ready, transfers(&mut rng, config, &mut next_id, &memo));
            match sequencer.submit(commands, false) {
                Ok(rx) => {
                    in_flight.push_back((Instant::now(), rx));
                    submitted += 1;
                }
                Err(SubmitError::Overloaded) => {
                    tallies.overloaded += 1;
                    break;
                }
                Err(e) => bail!("submit failed: {e}"),
            }
        }
        let Some((sent, rx)) = in_flight.pop_front() else {
            break;
        };
        let reply = answer(rx).await?;
        tallies.latency.record(sent.elapsed());
        tallies.submissions += 1;
        if reply.batch.is_some() && reply.batch != tallies.last_batch {
            tallies.commits += 1;
            tallies.last_batch = reply.batch;
        }
        for result in &reply.results {
            match result {
                ItemResult::Committed { .. } => tallies.committed += 1,
                ItemResult::Rejected { .. } => tallies.rejected += 1,
            }
        }
    }
    Ok((tallies, started.elapsed()))
}

impl EngineReport {
    /// The writer thread's CPU time per committed item (the figure to compare between builds
    /// on a machine whose speed drifts: it leaves out time spent waiting for the fsync and for
    /// a core), then every thread's CPU seconds, busiest first. Empty without `/proc`.
    fn cpu_lines(&self) -> String {
        let Some(writer) = self.cpu_s_by_thread.get(keel_sequencer::WRITER_THREAD) else {
            return String::new();
        };
        let per_item_us = writer * 1e6 / self.items_committed.max(1) as f64;
        let mut threads: Vec<(&String, &f64)> = self.cpu_s_by_thread.iter().collect();
        threads.sort_by(|a, b| b.1.total_cmp(a.1));
        let threads: Vec<String> = threads
            .iter()
            .filter(|(_, cpu)| **cpu >= 0.01)
            .map(|(name, cpu)| format!("{name} {cpu:.2}"))
            .collect();
        format!(
            "writer CPU per item     {per_item_us:.3} µs  ({writer:.2} s on the writer thread)\n\
             CPU s by thread         {}\n",
            threads.join(", ")
        )
    }

    pub fn table(&self) -> String {
        let l = &self.latency_ms;
        format!(
            "engine (in-process, no HTTP): batch {} x {} in flight, at most {} items per commit, {:.1} s\n\
             committed items/s       {}\n\
             submissions/s           {:.1}\n\
             commits (fsyncs)/s      {:.1}  ({:.0} items per fsync)\n\
             latency p50/p90 ms      {:.3} / {:.3}\n\
             latency p99/p999 ms     {:.3} / {:.3}\n\
             latency max ms          {:.3}\n\
             rejected items          {}\n\
             overloaded submits      {}\n\
             command_ids sorted runs {}\n\
             command_ids in memory   {}\n\
             {}\
             data disk               {}\n",
            self.parameters.batch,
            self.parameters.in_flight,
            self.parameters.batch_items_max,
            self.duration_s,
            crate::report::group(self.items_per_sec),
            self.batches_per_sec,
            self.commits_per_sec,
            self.items_per_commit_mean,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            self.items_rejected,
            self.overloaded,
            self.command_id_sorted_runs
                .map_or_else(|| "unknown".to_owned(), |runs| runs.to_string()),
            self.command_id_table_readers
                .map_or_else(|| "unknown".to_owned(), table_readers_line),
            self.cpu_lines(),
            crate::disk::describe(self.machine.data_disk.as_ref()),
        )
    }
}
