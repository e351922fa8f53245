//! Keel's single writer: takes submissions from a bounded queue, decides every command against
//! the current state (including earlier commands of the same batch), commits the accepted ones
//! with one write and one fsync per batch, and then answers every submission.
//!
//! This crate owns the write path's order and its bounds. It does not speak HTTP or JSON (that
//! is ingress), does not know how bytes reach the disk (that is the engine), and does not know
//! any domain's rules (that is invariants). Readers get [`Sequencer::aggregate`] and
//! [`Sequencer::events`], served from the engine's durable view, never from the writer's cache.

mod cache;
mod checkpoint;
mod writer;

use keel_engine::{Engine, EngineError, Reader, RuleSet};
pub use keel_engine::{FORMAT_VERSION, LockProbe, UpgradeSummary};
use keel_invariants::{Aggregate, AggregateId, Envelope, LoggedEvent, Rejection, codec};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The writer's bounds. Every one of them is a promise that overload is refused, not queued.
#[derive(Clone, Debug)]
pub struct Config {
    /// Most items one batch (one fsync) holds, and most items one submission may carry.
    pub batch_items_max: usize,
    /// Most submissions waiting in the queue.
    pub queue_depth_max: usize,
    /// Most items waiting in the queue, summed over submissions.
    pub queue_items_max: usize,
    /// How long the writer waits for more submissions after the first one of a batch.
    /// Zero: take what is queued and go (the fsync itself is what lets a queue build).
    pub linger: Duration,
    /// A checkpoint is due after this many committed batches ...
    pub checkpoint_every_batches: u64,
    /// ... or this long after the previous one, whichever comes first.
    pub checkpoint_interval: Duration,
    /// Most aggregates plus command ids changed and not yet handed to a checkpoint: at this
    /// many the writer hands one over at once, waiting for the one in flight if need be. The
    /// bound on the memory the overlay and the recent ids take.
    pub checkpoint_pending_max: usize,
    /// Most aggregates the writer keeps in memory once the checkpoint holds them; the others
    /// are read from the checkpoint, in one multi-get per batch, when a command targets them.
    /// Aggregates changed since the last written checkpoint stay besides (at most
    /// `checkpoint_pending_max` of them).
    pub cache_aggregates_max: usize,
    /// A checkpoint with at least this many command ids writes them as one sorted table file
    /// that RocksDB ingests (no memtable insert, no write-ahead-log byte per id); one with
    /// fewer puts them in its synced write with the states, through the memtable. Each
    /// ingested file lands in level 0 and spans the whole key range, so small ones would make
    /// compactions rewrite the family's base level over and over for little data; the
    /// memtable gathers small checkpoints into 32 MiB flushes instead (docs/FORMAT.md).
    pub checkpoint_ingest_ids_min: usize,
    /// The domains commands are decided under besides the built-in ones (`keel serve
    /// --domain`); their definitions are part of the rules every batch names.
    pub domains: Arc<keel_invariants::declared::DomainSet>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            batch_items_max: 10_000,
            queue_depth_max: 1024,
            queue_items_max: 100_000,
            linger: Duration::ZERO,
            checkpoint_every_batches: 256,
            checkpoint_interval: Duration::from_secs(1),
            checkpoint_pending_max: 1_000_000,
            cache_aggregates_max: 1_000_000,
            checkpoint_ingest_ids_min: 65_536,
            domains: Arc::new(keel_invariants::declared::DomainSet::builtin()),
        }
    }
}

/// How a submission is to be decided.
#[derive(Clone, Debug, Default)]
pub struct Submit {
    /// All or nothing: one rejected command rolls back the submission's others.
    pub atomic: bool,
    /// Decide every command against the committed state and answer exactly as a commit would,
    /// then forget it all: no event, no rejection and no command id is written or remembered,
    /// and the answer names no batch (its `seq`s are the ones the events would have had). A
    /// dry run is decided before the other submissions of its group, so it never sees effects
    /// that are not durable yet.
    pub dry_run: bool,
    /// The API key id the batch's record names.
    pub submitter: Option<Arc<str>>,
}

/// The answer to one submission, sent only after its batch is durable (a dry run's at once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The batch that holds this submission's committed events; `None` when none committed.
    pub batch: Option<u64>,
    /// The batch's commit time, microseconds since the Unix epoch.
    pub committed_at_us: u64,
    /// One result per command, in submission order.
    pub results: Vec<ItemResult>,
}

/// What happened to one command. `replayed` marks an answer repeated for a command id seen
/// before: nothing was written for it this time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ItemResult {
    Committed {
        seq: u64,
        replayed: bool,
    },
    Rejected {
        rejection: Rejection,
        replayed: bool,
    },
}

/// Why a submission was not taken or not answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the submission has no commands")]
    Empty,
    #[error("the submission has {items} commands; at most {max} are allowed")]
    TooManyItems { items: usize, max: usize },
    #[error("the write queue is full; retry later")]
    Overloaded,
    #[error("the writer is shutting down")]
    ShuttingDown,
    #[error(
        "the write path is poisoned (a failed commit or a writer fault) and accepts no writes; restart it"
    )]
    Poisoned,
}

/// An error reading the committed state.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("stored record does not decode: {0}")]
    Decode(#[from] codec::DecodeError),
    /// The store was last written under a domain this server was not started with.
    #[error("{0}")]
    DomainNotLoaded(String),
}

impl ReadError {
    /// True when the read was refused because the engine is poisoned.
    pub fn is_poisoned(&self) -> bool {
        matches!(self, ReadError::Engine(EngineError::Poisoned))
    }
}

/// One committed event as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedEvent {
    pub seq: u64,
    pub batch: u64,
    pub committed_at_us: u64,
    pub logged: LoggedEvent,
}

/// The name of the writer thread (what `top -H`, `perf` and `/proc/*/task/*/comm` show).
pub const WRITER_THREAD: &str = "keel-sequencer";

pub(crate) struct Submission {
    commands: Vec<Envelope>,
    atomic: bool,
    /// Decide and answer, then forget: nothing is written (see [`Submit::dry_run`]).
    dry_run: bool,
    /// Who submitted it (an API key id), recorded in the batch's record.
    submitter: Option<Arc<str>>,
    reply: Responder,
    enqueued_at: Instant,
}

/// The way back to one waiting request. Every request gets an explicit answer: dropped
/// unanswered while the writer thread unwinds from a panic, it answers `Poisoned`; dropped
/// unanswered otherwise (the queue torn down at shutdown), `ShuttingDown`.
pub(crate) struct Responder(Option<oneshot::Sender<Result<Reply, SubmitError>>>);

impl Responder {
    pub(crate) fn send(mut self, answer: Result<Reply, SubmitError>) {
        if let Some(tx) = self.0.take() {
            // The request may have gone (client hung up); nothing to do then.
            let _ = tx.send(answer);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let error = if std::thread::panicking() {
                SubmitError::Poisoned
            } else {
                SubmitError::ShuttingDown
            };
            let _ = tx.send(Err(error));
        }
    }
}

pub(crate) enum Message {
    Submit(Submission),
    /// Answer what is queued, then stop.
    Shutdown,
}

/// State shared between the handle and the writer thread.
pub(crate) struct Shared {
    queued_items: AtomicUsize,
    poisoned: AtomicBool,
    closing: AtomicBool,
    /// Set once, when the writer thread died of a panic: why. Watched by [`Sequencer::writer_failed`].
    failure: tokio::sync::watch::Sender<Option<String>>,
    /// One note per committed batch, sent after its fsync returned (see [`DurableBatch`]).
    durable: tokio::sync::broadcast::Sender<DurableBatch>,
    /// How many aggregates the writer holds in memory, as of its last eviction check.
    cached_aggregates: AtomicUsize,
}

/// A note that batch `batch` is durable: sent by the writer once per committed batch, after
/// `commit` (its fsync) returned and before the batch's requests are answered. The writer does
/// nothing per listener: the channel is bounded and lossy (a listener that falls more than
/// [`DURABLE_NOTES_MAX`] notes behind misses the oldest and is told so), and a listener reads
/// the batch itself from the store. Live subscriptions (`GET /v1/subscribe`) are built on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurableBatch {
    pub batch: u64,
    /// The batch's first event's sequence (when `events` is 0, the next event's).
    pub first_event: u64,
    pub events: u32,
    /// When the writer's fsync of the batch returned, µs since the Unix epoch.
    pub durable_at_us: u64,
}

impl DurableBatch {
    /// The batch's last event's sequence (the one before it when the batch has none).
    pub fn last_event(&self) -> u64 {
        (self.first_event + u64::from(self.events)).saturating_sub(1)
    }
}

/// Notes of durable batches a listener may fall behind by before it misses some.
pub const DURABLE_NOTES_MAX: usize = 4096;

impl Shared {
    pub(crate) fn poison(&self, error: &str) {
        tracing::error!(error, "write path poisoned; refusing all further writes");
        self.poisoned.store(true, Ordering::Release);
        metrics::gauge!("keel_poisoned").set(1.0);
    }
}

/// Poisons the write path when dropped during a panic. The writer holds one as its first
/// local, so the flag is set before the queue (a parameter, dropped last) is torn down: a
/// request that finds the queue gone already sees `Poisoned`.
pub(crate) struct PoisonOnPanic<'a>(pub(crate) &'a Shared);

impl Drop for PoisonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.poison("the writer thread panicked");
        }
    }
}

/// The handle to the running writer. Cheap to share behind an `Arc`.
pub struct Sequencer {
    config: Config,
    tx: SyncSender<Message>,
    shared: Arc<Shared>,
    reader: Reader,
    published: Arc<checkpoint::Published>,
    thread: Mutex<Option<JoinHandle<()>>>,
    checkpoint_thread: Mutex<Option<JoinHandle<()>>>,
}

impl Sequencer {
    /// Recovers the writer's state (the last checkpoint plus the log after it), decides the
    /// next batches under the built-in domains' rules, and starts the writer thread and the
    /// checkpoint thread.
    pub fn start(mut engine: Engine, config: Config) -> Result<Self, ReadError> {
        assert!(config.batch_items_max > 0 && config.queue_depth_max > 0);
        engine.set_rules(RuleSet::new(config.domains.rules_text()));
        check_recorded_domains(&engine, &config.domains)?;
        let reader = engine.reader();
        let published = Arc::new(checkpoint::Published::default());
        let started = Instant::now();
        let mut recovered = checkpoint::recover(&reader, &published, config.cache_aggregates_max)?;
        tracing::info!(
            aggregates = recovered.cache.len(),
            all_in_memory = recovered.cache.is_complete(),
            checkpoint_batch = recovered.mark.batch,
            replayed_batches = recovered.replayed_batches,
            replayed_events = recovered.replayed_events,
            seconds = started.elapsed().as_secs_f64(),
            "state recovered: checkpoint plus the log after it"
        );
        let (tx, rx) = sync_channel(config.queue_depth_max);
        let shared = Arc::new(Shared {
            queued_items: AtomicUsize::new(0),
            poisoned: AtomicBool::new(engine.is_poisoned()),
            closing: AtomicBool::new(false),
            failure: tokio::sync::watch::Sender::new(None),
            durable: tokio::sync::broadcast::Sender::new(DURABLE_NOTES_MAX),
            cached_aggregates: AtomicUsize::new(recovered.cache.len()),
        });
        let spawn_error =
            |e: std::io::Error| EngineError::Storage(keel_engine::StorageError::Io(e.to_string()));
        // Room for a checkpoint and the ids of the one before it to free.
        let (jobs_tx, jobs_rx) = sync_channel(2);
        let (done_tx, done_rx) = sync_channel(4);
        let checkpoint_thread = {
            let checkpointer = engine.checkpointer();
            let ingest_ids_min = config.checkpoint_ingest_ids_min;
            let published = Arc::clone(&published);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("keel-checkpoint".into())
                .spawn(move || {
                    let run = std::panic::AssertUnwindSafe(|| {
                        checkpoint::run_checkpointer(
                            jobs_rx,
                            done_tx,
                            checkpointer,
                            published,
                            Arc::clone(&shared),
                            ingest_ids_min,
                        )
                    });
                    if let Err(panic) = std::panic::catch_unwind(run) {
                        let reason = panic_reason(panic.as_ref());
                        shared.poison(&format!("the checkpoint thread panicked: {reason}"));
                        shared.failure.send_replace(Some(reason));
                    }
                })
                .map_err(spawn_error)?
        };
        let checkpoints =
            writer::Checkpoints::new(&mut recovered, jobs_tx, done_rx, Arc::clone(&published));
        let writer = writer::Writer::new(
            engine,
            recovered.cache,
            config.clone(),
            Arc::clone(&shared),
            checkpoints,
        );
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn(move || run_writer(writer, rx, &thread_shared))
            .map_err(spawn_error)?;
        Ok(Self {
            config,
            tx,
            shared,
            reader,
            published,
            thread: Mutex::new(Some(thread)),
            checkpoint_thread: Mutex::new(Some(checkpoint_thread)),
        })
    }

    /// Opens (or creates) the RocksDB store in `dir` and starts the writer over it.
    pub fn open(dir: &std::path::Path, config: Config) -> Result<Self, ReadError> {
        let engine = Engine::open_rocksdb(dir)?;
        tracing::info!(tip = %engine.tip(), "store opened");
        Self::start(engine, config)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// How many aggregates the writer holds in memory (as of its last check between batches):
    /// at most [`Config::cache_aggregates_max`] plus those changed since the last written
    /// checkpoint.
    pub fn cached_aggregates(&self) -> usize {
        self.shared.cached_aggregates.load(Ordering::Relaxed)
    }

    /// Queues `commands` for the writer, or refuses at once. The receiver yields the reply
    /// after the batch holding them is durable.
    pub fn submit(
        &self,
        commands: Vec<Envelope>,
        atomic: bool,
    ) -> Result<oneshot::Receiver<Result<Reply, SubmitError>>, SubmitError> {
        self.submit_as(commands, atomic, None)
    }

    /// [`Sequencer::submit`] on behalf of `submitter` (an API key id), which the record of the
    /// batch that decides the commands names.
    pub fn submit_as(
        &self,
        commands: Vec<Envelope>,
        atomic: bool,
        submitter: Option<Arc<str>>,
    ) -> Result<oneshot::Receiver<Result<Reply, SubmitError>>, SubmitError> {
        self.submit_with(
            commands,
            Submit {
                atomic,
                dry_run: false,
                submitter,
            },
        )
    }

    /// Queues `commands` as `how` says, or refuses at once. The queue's bounds hold for dry
    /// runs too: they take the writer's time like any submission.
    pub fn submit_with(
        &self,
        commands: Vec<Envelope>,
        how: Submit,
    ) -> Result<oneshot::Receiver<Result<Reply, SubmitError>>, SubmitError> {
        let Submit {
            atomic,
            dry_run,
            submitter,
        } = how;
        let items = commands.len();
        if items == 0 {
            return Err(SubmitError::Empty);
        }
        if items > self.config.batch_items_max {
            return Err(SubmitError::TooManyItems {
                items,
                max: self.config.batch_items_max,
            });
        }
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Err(SubmitError::Poisoned);
        }
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        self.reserve(items)?;
        let (reply, rx) = oneshot::channel();
        let submission = Submission {
            commands,
            atomic,
            dry_run,
            submitter,
            reply: Responder(Some(reply)),
            enqueued_at: Instant::now(),
        };
        match self.tx.try_send(Message::Submit(submission)) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.shared.queued_items.fetch_sub(items, Ordering::AcqRel);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Overloaded,
                    TrySendError::Disconnected(_) if self.is_poisoned() => SubmitError::Poisoned,
                    TrySendError::Disconnected(_) => SubmitError::ShuttingDown,
                })
            }
        }
    }

    /// Counts `items` into the queue if they fit under `queue_items_max`.
    fn reserve(&self, items: usize) -> Result<(), SubmitError> {
        let max = self.config.queue_items_max;
        self.shared
            .queued_items
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued + items <= max).then_some(queued + items)
            })
            .map(|_| ())
            .map_err(|_| SubmitError::Overloaded)
    }

    /// Items waiting in the queue now.
    pub fn queued_items(&self) -> usize {
        self.shared.queued_items.load(Ordering::Acquire)
    }

    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    /// Resolves if the writer thread dies of a panic (a bug, or a failed invariant assertion),
    /// with the panic's message. The write path is poisoned by then: every waiting and later
    /// request is answered `Poisoned`, nothing of the batch being decided was written. The
    /// policy of `keel serve` is to stop and exit non-zero, so that its supervisor restarts it
    /// and recovery runs; this future is how it learns. Never resolves otherwise.
    pub async fn writer_failed(&self) -> String {
        let mut failure = self.shared.failure.subscribe();
        let reason = failure
            .wait_for(Option::is_some)
            .await
            .map(|reason| reason.clone().unwrap_or_default());
        match reason {
            Ok(reason) => reason,
            // The sender lives in `Shared`, as long as `self`: unreachable, but never spin.
            Err(_) => std::future::pending().await,
        }
    }

    /// Notes of every batch committed from now on, each sent after the batch's fsync returned
    /// (see [`DurableBatch`]). Batches committed before this call are in the store.
    pub fn durable_batches(&self) -> tokio::sync::broadcast::Receiver<DurableBatch> {
        self.shared.durable.subscribe()
    }

    /// True once [`Sequencer::shutdown`] began.
    pub fn is_closing(&self) -> bool {
        self.shared.closing.load(Ordering::Acquire)
    }

    /// Stops taking submissions, lets the writer answer everything queued, and waits for it
    /// to close the engine. Idempotent.
    pub fn shutdown(&self) {
        self.shared.closing.store(true, Ordering::Release);
        let thread = self.thread.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(thread) = thread {
            // The queue may be full; a blocking send waits for the writer to make room.
            let _ = self.tx.send(Message::Shutdown);
            if thread.join().is_err() {
                tracing::error!("the sequencer thread panicked while stopping");
            }
        }
        // The writer dropped the job queue on its way out (or died, which drops it too).
        let checkpoint_thread = self
            .checkpoint_thread
            .lock()
            .map(|mut t| t.take())
            .unwrap_or(None);
        if let Some(thread) = checkpoint_thread
            && thread.join().is_err()
        {
            tracing::error!("the checkpoint thread panicked");
        }
    }

    /// Reads are refused once the write path is poisoned, whatever poisoned it: the engine
    /// refuses them itself after a failed commit, and after a writer panic nobody knows how far
    /// the batch being written got, so nothing read now may be shown as committed.
    fn check_readable(&self) -> Result<(), ReadError> {
        if self.is_poisoned() {
            return Err(ReadError::Engine(EngineError::Poisoned));
        }
        Ok(())
    }

    /// The read handle on the committed store.
    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    /// The committed state of aggregate `id`: from the overlay of aggregates changed since the
    /// last checkpoint (published after each commit, never before its fsync), else from the
    /// checkpoint.
    pub fn aggregate(&self, id: &AggregateId) -> Result<Option<Aggregate>, ReadError> {
        self.check_readable()?;
        if let Some(aggregate) = self.published.get(id) {
            return Ok(Some(aggregate));
        }
        match self.reader.state(id.as_str().as_bytes())? {
            Some(bytes) => Ok(Some(codec::decode_aggregate(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` committed events after sequence `after`, and the last committed sequence.
    pub fn events(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<CommittedEvent>, u64), ReadError> {
        self.check_readable()?;
        let tip = self.reader.tip()?;
        // Events committed after the tip was read are left for the next page.
        let events = committed_events(&self.reader, after, limit, tip.last_event)?;
        Ok((events, tip.last_event))
    }

    /// Committed batch `seq` as a hash-verified batch message (docs/PROJECTION.md), the source
    /// a projector repairs gaps from; `None` when no such batch is committed.
    pub fn batch_message(&self, seq: u64) -> Result<Option<Vec<u8>>, ReadError> {
        self.check_readable()?;
        Ok(self.reader.batch_message(seq)?)
    }
}

/// The writer thread's body: runs the writer and, if it panics, records why. The panic has
/// already poisoned the write path and answered every waiting request (see [`PoisonOnPanic`],
/// [`Responder`]); the engine was dropped (RocksDB closed) while unwinding.
fn run_writer(writer: writer::Writer, rx: std::sync::mpsc::Receiver<Message>, shared: &Shared) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run(rx)));
    if let Err(panic) = outcome {
        let reason = panic_reason(panic.as_ref());
        tracing::error!(reason, "the writer thread died; the write path is poisoned");
        metrics::counter!("keel_writer_panics_total").increment(1);
        shared.failure.send_replace(Some(reason));
    }
}

/// Refuses to decide under rules that drop a declared domain the log was last decided under:
/// its aggregates would be left with no rules, their commands refused as unknown, and a client
/// would read a domain the server says does not exist. A changed definition of the same domain
/// is fine (the log records the new version). Costs one read at start, and only when the rules
/// changed.
fn check_recorded_domains(
    engine: &Engine,
    domains: &keel_invariants::declared::DomainSet,
) -> Result<(), ReadError> {
    if engine
        .last_rule_set()
        .is_none_or(|hash| hash == engine.rules().hash)
    {
        return Ok(());
    }
    let Some((batch, text)) = engine.last_rules_text()? else {
        return Ok(());
    };
    let recorded = keel_invariants::declared::DomainSet::recorded_files(&text).map_err(|e| {
        EngineError::Corrupt(format!(
            "the rules text batch {batch} records does not read: {e}"
        ))
    })?;
    let missing: Vec<&str> = recorded
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !domains.domains().iter().any(|d| d.name == *name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing.iter().map(|n| format!("`{n}`")).collect();
    Err(ReadError::DomainNotLoaded(format!(
        "this store was last written under the domain(s) {} (their definition is recorded in batch {batch}), \
         and this server was not started with them: pass `--domain FILE` (or KEEL_DOMAINS) for each. \
         A changed definition is fine: the log records the new version. The store is left as it is.",
        names.join(", ")
    )))
}

/// Rewrites the format-1 store at `old` (only read) as a new format-2 store at `new` (created),
/// under the built-in domains' rules: `keel upgrade` (docs/FORMAT.md). `progress` gets the
/// batches done so far.
pub fn upgrade_v1_store(
    old: &std::path::Path,
    new: &std::path::Path,
    progress: &mut dyn FnMut(u64),
) -> Result<keel_engine::UpgradeSummary, EngineError> {
    let old = keel_engine::RocksStorage::open_read_only(old)?;
    let new: Arc<dyn keel_engine::Storage> = Arc::new(keel_engine::RocksStorage::open(new)?);
    keel_engine::upgrade_v1(
        &old,
        new,
        RuleSet::new(keel_invariants::BUILTIN_RULES),
        progress,
    )
}

/// Whether a process holds the store at `dir` open for writing (see
/// [`keel_engine::RocksStorage::lock_probe`]).
pub fn store_lock(dir: &std::path::Path) -> keel_engine::LockProbe {
    keel_engine::RocksStorage::lock_probe(dir)
}

fn panic_reason(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Up to `limit` events after `after` and up to `last`, decoded, each with its batch's commit
/// time: what `GET /v1/events` serves, and what the audit (`keel-audit`) compares a server and
/// a projection with. One reader for both, so the audit sees events exactly as they are served.
pub fn committed_events(
    reader: &Reader,
    after: u64,
    limit: usize,
    last: u64,
) -> Result<Vec<CommittedEvent>, ReadError> {
    let stored = reader.events(after, limit)?;
    let mut events = Vec::with_capacity(stored.len());
    for event in stored.into_iter().take_while(|e| e.seq <= last) {
        events.push(CommittedEvent {
            seq: event.seq,
            batch: event.batch,
            committed_at_us: event.committed_at_us,
            logged: codec::decode_event(&event.payload)?,
        });
    }
    Ok(events)
}

impl Drop for Sequencer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `text` cut to at most `max` bytes at a character boundary, with `...` when cut: how a
/// report or an error message shows a long value (the audit's reports and the HTTP errors
/// that quote input share it).
pub fn shorten(mut text: String, max: usize) -> String {
    if text.len() > max {
        let cut = (0..=max)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push_str("...");
    }
    text
}
