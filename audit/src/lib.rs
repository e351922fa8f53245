//! Keel's integrity audit (`keel audit`): proves that a store is exactly what its committed log
//! says, that every invariant holds, and optionally that a running server serves that log and
//! that the MongoDB projection equals it.
//!
//! It opens a [`Snapshot`] (read-only when no server holds the store, a RocksDB secondary
//! instance when one does), then runs, in one pass over the log and one over each other key
//! space, the checks named by [`Check`]: `chain`, the hash chain ([`keel_engine::verify_chain`]);
//! `state`, a replay of every event from genesis through [`keel_invariants::apply`] compared with
//! the stored state of every aggregate; `invariant`, every invariant on every stored aggregate;
//! `command_index`, the command-id index against the events that carry ids;
//! `conservation`, the laws every domain declares ([`keel_invariants::Conservation`]), summed
//! straight from the events and not through `apply`. `projection` ([`projection`]) compares the
//! MongoDB projection with the [`LogState`] this audit hands back, and `served_log`
//! what a server serves with the snapshot (`keel audit --url`).
//!
//! It writes nothing and reports what it finds as [`Divergence`]s with their location; only a
//! store it cannot read at all is an [`AuditError`]. It is not a repair tool, holds no
//! domain-specific code (the domains declare their laws), and knows no wire format: the
//! `keel` binary parses the flags and hands it the server's event rendering.

pub mod command;
mod command_ids;
mod declared_laws;
pub mod projection;
mod replay;
mod served_log;
mod snapshot;

use command_ids::Fingerprints;
use keel_engine::format::{self, META_CHECKPOINT, META_FORMAT_VERSION, META_TIP, hex, seq_key};
use keel_engine::{
    BatchHeader, Cf, ChainError, ChainTip, CheckpointMark, FORMAT_VERSION, LogVisitor, RecordView,
    Storage, StorageError, verify_log,
};
use keel_invariants::{Aggregate, Law, LawScope, RejectCode, codec};
pub use replay::{AggregateAt, LogState};
use replay::{CHUNKS_IN_FLIGHT, Chunk, Feeder, Replay, Replayed};
use snapshot::OnePass;
pub use snapshot::{Snapshot, SnapshotMode};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

/// Why no verdict could be reached: the store cannot be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    NotAStore(String),
    #[error(
        "the store has format version {found}; this build audits format version {expected}{}",
        if *found < *expected { " (upgrade it with `keel upgrade --data DIR`, then audit)" } else { "" }
    )]
    UnsupportedFormat { found: u32, expected: u32 },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Which check found a divergence. Each has one stable name ([`Check::as_str`]), used in the
/// text summary, the JSON report (`checks`, a divergence's `check`) and docs/AUDIT.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Check {
    /// `snapshot`: the snapshot is not one point in time (its tip and its log disagree).
    Snapshot,
    /// `chain`: the hash chain: headers, links, hashes, event sequences, the stored tip.
    Chain,
    /// `state`: the replay: an undecodable event, or a stored aggregate that differs from, is missing
    /// from or is not in the replay.
    State,
    /// `invariant`: a stored aggregate breaks an invariant of its domain.
    Invariant,
    /// `command_index`: the command-id index disagrees with the events that carry ids.
    CommandIndex,
    /// `conservation`: a conservation law of a domain does not hold.
    Conservation,
    /// `projection`: the MongoDB projection differs from the log (`keel audit --mongo-url`).
    Projection,
    /// `storage`: RocksDB itself reports corruption (a checksum mismatch) while reading.
    Storage,
    /// `served_log`: what a server serves over HTTP differs from the snapshot (`keel audit --url`).
    ServedLog,
}

impl Check {
    pub const ALL: [Check; 9] = [
        Check::Snapshot,
        Check::Chain,
        Check::State,
        Check::Invariant,
        Check::CommandIndex,
        Check::Conservation,
        Check::Projection,
        Check::Storage,
        Check::ServedLog,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Check::Snapshot => "snapshot",
            Check::Chain => "chain",
            Check::State => "state",
            Check::Invariant => "invariant",
            Check::CommandIndex => "command_index",
            Check::Conservation => "conservation",
            Check::Projection => "projection",
            Check::Storage => "storage",
            Check::ServedLog => "served_log",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One place where the store is not what the log implies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Divergence {
    pub check: Check,
    pub batch: Option<u64>,
    pub seq: Option<u64>,
    pub aggregate: Option<String>,
    pub expected: Option<String>,
    pub found: Option<String>,
    pub detail: String,
}

impl Divergence {
    pub fn new(check: Check, detail: impl Into<String>) -> Self {
        Self {
            check,
            batch: None,
            seq: None,
            aggregate: None,
            expected: None,
            found: None,
            detail: detail.into(),
        }
    }

    pub fn at_batch(mut self, batch: Option<u64>) -> Self {
        self.batch = batch;
        self
    }

    pub fn at_seq(mut self, seq: Option<u64>) -> Self {
        self.seq = seq;
        self
    }

    pub fn on(mut self, aggregate: &str) -> Self {
        self.aggregate = Some(aggregate.to_owned());
        self
    }

    pub fn expected_found(mut self, expected: impl Into<String>, found: impl Into<String>) -> Self {
        self.expected = Some(expected.into());
        self.found = Some(found.into());
        self
    }
}

/// What the audit may spend on reporting.
#[derive(Clone, Copy, Debug)]
pub struct AuditOptions {
    /// Most divergences kept with their detail; all are counted.
    pub max_divergences: usize,
    /// Most audits of a live (secondary) snapshot: when one finds divergences, the snapshot
    /// catches up and the audit runs again, so that a view RocksDB assembled across a
    /// concurrent flush cannot raise a false alarm. Real damage persists and is reported.
    pub live_attempts_max: u32,
    /// An event sequence at which the returned [`LogState`] also knows every aggregate (for
    /// comparing a projection that stands there); `None`: only at the tip.
    pub point: Option<u64>,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            max_divergences: 20,
            live_attempts_max: 3,
            point: None,
        }
    }
}

/// The audit's phases, for progress reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Hash chain and replay, over the event log.
    Chain,
    /// Stored state against the replay, invariants, conservation.
    State,
    /// The command-id index.
    CommandIds,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Chain => "chain+replay",
            Phase::State => "state",
            Phase::CommandIds => "command-id index",
        }
    }
}

/// Where a running audit is: records done in this phase, of `total` (0 when unknown in
/// advance), and the time since the phase began.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
    pub elapsed: Duration,
}

/// How often (in records) the progress callback is called.
const PROGRESS_EVERY: u64 = 1 << 16;

/// The verdict and what it rests on.
#[derive(Clone, Debug)]
pub struct AuditReport {
    /// The tip the audit read first; everything up to it, and nothing else, was audited.
    pub tip: ChainTip,
    pub batches: u64,
    pub events: u64,
    /// Rejections the log keeps (commands rejected with an id).
    pub rejections: u64,
    /// Rule sets the log's batches were decided under.
    pub rule_sets: u64,
    /// Where the checkpoint (`state`, `command_ids`) stands: it is compared with the log's
    /// fold up to this batch.
    pub checkpoint: CheckpointMark,
    /// Stored aggregates (state column family: the checkpoint).
    pub aggregates: u64,
    /// Entries of the command-id index, and how many say committed / rejected.
    pub command_ids: u64,
    pub command_ids_committed: u64,
    pub command_ids_rejected: u64,
    /// Time of the hash chain and replay pass, and of the whole audit.
    pub replay_elapsed: Duration,
    pub elapsed: Duration,
    /// The first divergences, in the order found.
    pub divergences: Vec<Divergence>,
    /// How many divergences each [`Check`] found, indexed like [`Check::ALL`].
    pub divergences_by_check: [u64; Check::ALL.len()],
    /// Audits run (more than one only for a live snapshot that found divergences).
    pub attempts: u32,
    /// Divergences found by each earlier attempt.
    pub earlier_attempts: Vec<u64>,
    /// The conservation laws checked (`conservation`).
    pub laws: Vec<Law>,
    /// The declared domains' conservation laws checked, one entry per version.
    pub declared_laws: Vec<DeclaredLawChecked>,
    /// The rule sets the log's batches were decided under, run by run in log order (a rule set
    /// used, replaced and used again appears twice).
    pub rule_set_runs: Vec<RuleSetSeen>,
    /// Who wrote the log: every API key id the records name, with how many batches name it
    /// (`keel serve --auth-keys`; empty for a server without authentication).
    pub submitters: std::collections::BTreeMap<String, u64>,
    max_divergences: usize,
}

/// A run of consecutive batches decided under one rule set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSetSeen {
    pub hash: [u8; 32],
    pub first_batch: u64,
    pub last_batch: u64,
    pub batches: u64,
    /// The declared domains it defines besides the built-in ones: (name, the first 8 hex digits
    /// of the hash of its definition text). `None` when the log does not record its text.
    pub domains: Option<Vec<(String, String)>>,
}

/// A version of a declared domain's conservation law that the audit proved (or found broken).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredLawChecked {
    /// `<domain>.<law>`.
    pub name: String,
    pub statement: String,
    pub scope: LawScope,
    /// The first 8 hex digits of the hash of the domain's definition text.
    pub domain_version: String,
    pub from_batch: u64,
    /// The batch whose rules replaced it; `None`: in force at the log's end.
    pub to_batch: Option<u64>,
}

impl AuditReport {
    fn new(max_divergences: usize) -> Self {
        Self {
            tip: ChainTip::default(),
            batches: 0,
            events: 0,
            rejections: 0,
            rule_sets: 0,
            checkpoint: CheckpointMark::default(),
            aggregates: 0,
            command_ids: 0,
            command_ids_committed: 0,
            command_ids_rejected: 0,
            replay_elapsed: Duration::ZERO,
            elapsed: Duration::ZERO,
            divergences: Vec::new(),
            divergences_by_check: [0; Check::ALL.len()],
            attempts: 1,
            earlier_attempts: Vec::new(),
            laws: Vec::new(),
            declared_laws: Vec::new(),
            rule_set_runs: Vec::new(),
            submitters: std::collections::BTreeMap::new(),
            max_divergences,
        }
    }

    pub fn ok(&self) -> bool {
        self.divergences_total() == 0
    }

    pub fn divergences_total(&self) -> u64 {
        self.divergences_by_check.iter().sum()
    }

    pub fn count(&self, check: Check) -> u64 {
        self.divergences_by_check[check.index()]
    }

    /// Replay throughput: events per second of the chain and replay pass.
    pub fn events_per_second(&self) -> f64 {
        let seconds = self.replay_elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.events as f64 / seconds
        } else {
            0.0
        }
    }

    /// Adds the divergences another part of the audit found.
    fn merge(&mut self, other: AuditReport) {
        for (id, batches) in other.submitters {
            *self.submitters.entry(id).or_default() += batches;
        }
        for (mine, theirs) in self
            .divergences_by_check
            .iter_mut()
            .zip(other.divergences_by_check)
        {
            *mine += theirs;
        }
        let room = self.max_divergences.saturating_sub(self.divergences.len());
        self.divergences
            .extend(other.divergences.into_iter().take(room));
    }

    /// Counts one more batch for every key id `record` names as a submitter.
    fn count_submitters(&mut self, record: &RecordView<'_>) {
        for id in record.submitters() {
            match self.submitters.get_mut(id) {
                Some(batches) => *batches += 1,
                None => {
                    self.submitters.insert(id.to_owned(), 1);
                }
            }
        }
    }

    /// True while the report keeps the next divergence with its detail (else only counts it).
    fn keeps_more(&self) -> bool {
        self.divergences.len() < self.max_divergences
    }

    /// Counts `divergence` and keeps it if fewer than the maximum are kept.
    pub fn record(&mut self, divergence: Divergence) {
        self.divergences_by_check[divergence.check.index()] += 1;
        if self.divergences.len() < self.max_divergences {
            self.divergences.push(divergence);
        }
    }
}

/// Audits `snapshot`, auditing a live one again after a catch-up when it finds divergences
/// (see [`AuditOptions::live_attempts_max`]).
pub fn audit_snapshot(
    snapshot: &Snapshot,
    options: &AuditOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<AuditReport, AuditError> {
    audit_snapshot_with_log(snapshot, options, progress).map(|(report, _)| report)
}

/// [`audit_snapshot`], also handing back what the log implies for every aggregate.
pub fn audit_snapshot_with_log(
    snapshot: &Snapshot,
    options: &AuditOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(AuditReport, LogState), AuditError> {
    let storage = OnePass(&snapshot.storage);
    let (mut report, mut log) = audit_with_log(&storage, options, progress)?;
    let live = matches!(snapshot.mode(), SnapshotMode::Secondary { .. });
    let mut earlier = Vec::new();
    while live && !report.ok() && 1 + (earlier.len() as u32) < options.live_attempts_max {
        earlier.push(report.divergences_total());
        snapshot.catch_up()?;
        (report, log) = audit_with_log(&storage, options, progress)?;
    }
    report.attempts = 1 + earlier.len() as u32;
    report.earlier_attempts = earlier;
    Ok((report, log))
}

/// Audits `storage`, which nobody writes while this runs.
pub fn audit(
    storage: &dyn Storage,
    options: &AuditOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<AuditReport, AuditError> {
    audit_with_log(storage, options, progress).map(|(report, _)| report)
}

/// [`audit`], also handing back what the log implies for every aggregate.
pub fn audit_with_log(
    storage: &dyn Storage,
    options: &AuditOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(AuditReport, LogState), AuditError> {
    let started = Instant::now();
    check_format(storage)?;
    let fingerprints = Fingerprints::new();
    let point = options.point.unwrap_or(u64::MAX);
    let replay = Replay::new(fingerprints.clone(), point, u64::MAX);
    let mut run = Run {
        storage,
        progress,
        started,
        phase_started: started,
        report: AuditReport::new(options.max_divergences),
        replay,
        point,
        fingerprints,
        domains: std::sync::Arc::new(keel_invariants::declared::DomainSet::builtin()),
    };
    let tip = run.read_tip()?;
    run.report.tip = tip;
    run.report.checkpoint = run.read_checkpoint(&tip)?;
    run.report.laws = run.replay.laws.clone();
    run.chain_and_replay(tip)?;
    run.report.replay_elapsed = started.elapsed();
    run.compare_states()?;
    run.check_command_index()?;
    run.check_conservation();
    run.report.elapsed = started.elapsed();
    let aggregates = std::mem::take(&mut run.replay.aggregates);
    let log = LogState::new(aggregates, point.min(tip.last_event));
    Ok((run.report, log))
}

fn check_format(storage: &dyn Storage) -> Result<(), AuditError> {
    let value = storage.get(Cf::Meta, META_FORMAT_VERSION)?.ok_or_else(|| {
        AuditError::NotAStore(
            "not a Keel store: no format version in the meta column family".into(),
        )
    })?;
    let bytes: [u8; 4] = value.as_slice().try_into().map_err(|_| {
        AuditError::NotAStore(format!(
            "not a Keel store: a format version of {} bytes",
            value.len()
        ))
    })?;
    let found = u32::from_be_bytes(bytes);
    if found != FORMAT_VERSION {
        return Err(AuditError::UnsupportedFormat {
            found,
            expected: FORMAT_VERSION,
        });
    }
    Ok(())
}

/// True when RocksDB reports damage it found itself (a block checksum), which is a finding of
/// the audit, not a reason to give up without a verdict.
///
/// The one place the audit tells corruption from other storage errors, and it does so by the
/// message text RocksDB gives (`Corruption: ...`), because `StorageError` has no kind for it
/// yet; when the engine reports corruption as its own kind, only this function changes.
fn is_corruption(error: &StorageError) -> bool {
    error.is_corruption()
}

/// One audit's working state.
struct Run<'a> {
    storage: &'a dyn Storage,
    progress: &'a mut dyn FnMut(&Progress),
    started: Instant,
    phase_started: Instant,
    report: AuditReport,
    replay: Replay,
    /// See [`AuditOptions::point`] (`u64::MAX`: none).
    point: u64,
    /// Shared by the replay (events' ids) and the command-id check (the index's ids).
    fingerprints: Fingerprints,
    /// The declared domains of the last rule set the log records: the invariants of declared
    /// aggregates are checked under them.
    domains: std::sync::Arc<keel_invariants::declared::DomainSet>,
}

impl Run<'_> {
    /// A storage error: corruption becomes a divergence; anything else ends the audit.
    fn storage_failure(&mut self, error: StorageError) -> Result<(), AuditError> {
        if is_corruption(&error) {
            self.report
                .record(Divergence::new(Check::Storage, error.to_string()));
            return Ok(());
        }
        Err(error.into())
    }

    fn read_tip(&mut self) -> Result<ChainTip, AuditError> {
        match self.storage.get(Cf::Meta, META_TIP) {
            Ok(None) => Ok(ChainTip::default()),
            Ok(Some(value)) => Ok(ChainTip::decode(&value).unwrap_or_else(|e| {
                self.report
                    .record(Divergence::new(Check::Chain, format!("stored tip: {e}")));
                ChainTip::default()
            })),
            Err(e) => self.storage_failure(e).map(|()| ChainTip::default()),
        }
    }

    /// The checkpoint mark; a mark past the tip, or one that does not decode, is a finding
    /// (the state check then compares with the tip).
    fn read_checkpoint(&mut self, tip: &ChainTip) -> Result<CheckpointMark, AuditError> {
        let mark = match self.storage.get(Cf::Meta, META_CHECKPOINT) {
            Ok(None) => return Ok(CheckpointMark::default()),
            Ok(Some(value)) => CheckpointMark::decode(&value),
            Err(e) => return self.storage_failure(e).map(|()| CheckpointMark::default()),
        };
        match mark {
            Ok(mark) if mark.batch <= tip.last_batch => Ok(mark),
            Ok(mark) => {
                let detail = format!(
                    "the checkpoint stands at batch {}, past the log's tip at batch {}",
                    mark.batch, tip.last_batch
                );
                self.report.record(Divergence::new(Check::State, detail));
                Ok(CheckpointMark::at(tip))
            }
            Err(e) => {
                let detail = format!("checkpoint mark: {e}");
                self.report.record(Divergence::new(Check::State, detail));
                Ok(CheckpointMark::at(tip))
            }
        }
    }

    fn tell(&mut self, phase: Phase, done: u64, total: u64) {
        let elapsed = self.phase_started.elapsed();
        (self.progress)(&Progress {
            phase,
            done,
            total,
            elapsed,
        });
    }

    /// Verifies the chain while replaying its events; after a break in the chain, replays
    /// the rest of the log without it so that the other checks still see every event.
    ///
    /// Two threads, one per core: this one scans and hashes (the [`Feeder`]); a second
    /// decodes and folds the events into the [`Replay`]. Bounded chunks between them keep
    /// memory flat however long the log.
    fn chain_and_replay(&mut self, tip: ChainTip) -> Result<(), AuditError> {
        let max = self.report.max_divergences;
        let fingerprints = self.fingerprints.clone();
        let point = self.point;
        let checkpoint = self.report.checkpoint.last_event;
        let (tx, rx) = sync_channel::<Chunk>(CHUNKS_IN_FLIGHT);
        let (back, returned) = sync_channel::<Chunk>(CHUNKS_IN_FLIGHT);
        let (fed, replayed) = std::thread::scope(|scope| -> Result<_, AuditError> {
            let replayer = std::thread::Builder::new()
                .name("keel-audit-replay".into())
                .spawn_scoped(scope, move || {
                    Replay::run(rx, back, fingerprints, point, checkpoint, max)
                })
                .map_err(|e| StorageError::Io(format!("starting the replay thread: {e}")))?;
            let mut feeder = Feeder::new(tx, returned, max, self.fingerprints.clone());
            let fed = self.feed(&mut feeder, tip);
            // Closing the channel (finish, or drop on error) is what ends the replay thread.
            let fed = match fed {
                Ok(whole) => {
                    self.domains = feeder.latest_rules();
                    self.report.rule_set_runs = std::mem::take(&mut feeder.seen);
                    Ok((whole, feeder.finish()))
                }
                Err(e) => {
                    drop(feeder);
                    Err(e)
                }
            };
            Ok((fed, replayer.join()))
        })?;
        // The replay thread only folds decoded values; a panic there is a bug, not a finding.
        let (replay, found) = replayed.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let (whole, (events, batches, fed_found, rejected)) = fed?;
        self.report.merge(fed_found);
        self.report.merge(found);
        self.replay = replay;
        self.replay.rejected = rejected;
        if !whole {
            // After a break the chain's counts stop at the break; count what was replayed.
            self.report.events = events;
            self.report.batches = batches;
        }
        Ok(())
    }

    /// Runs the chain check, feeding every event it delivers to `feeder`, and after a break
    /// feeds the rest of the log. True when the chain was verified whole.
    fn feed(&mut self, feeder: &mut Feeder, tip: ChainTip) -> Result<bool, AuditError> {
        let storage = self.storage;
        let started = self.started;
        let progress = &mut self.progress;
        let mut visitor = Feeding {
            feeder,
            progress: &mut **progress,
            started,
            total: tip.last_event,
        };
        let result = verify_log(storage, &mut visitor);
        match result {
            Ok(summary) => {
                if summary.tip != tip {
                    let detail = "the log ends elsewhere than the tip read first";
                    let d = Divergence::new(Check::Snapshot, detail)
                        .expected_found(describe_tip(&tip), describe_tip(&summary.tip));
                    self.report.record(d);
                }
                self.report.batches = summary.batches;
                self.report.events = summary.events;
                self.report.rejections = summary.rejections;
                self.report.rule_sets = summary.rule_sets;
                return Ok(true);
            }
            Err(ChainError::Storage(e)) => self.storage_failure(e)?,
            Err(e) => {
                let divergence = self.locate(e)?;
                self.report.record(divergence);
            }
        }
        self.feed_rest(feeder).map(|()| false)
    }

    /// Feeds the records after the last one the chain check delivered, trusting nothing but
    /// each record's own layout (the chain is broken anyway; a record whose layout does not
    /// decode is reported and skipped).
    fn feed_rest(&mut self, feeder: &mut Feeder) -> Result<(), AuditError> {
        let start = seq_key(feeder.last_batch.saturating_add(1));
        let result = self.storage.scan(Cf::Log, &start, &mut |key, value| {
            let seq = format::decode_seq_key(key);
            match seq
                .as_ref()
                .map(|seq| RecordView::decode_unverified(*seq, value))
            {
                Ok(Ok(view)) => {
                    feeder.found.count_submitters(&view);
                    for (seq, payload) in view.events() {
                        feeder.event(seq, view.header.seq, payload);
                    }
                    for payload in view.rejections() {
                        feeder.rejection(view.header.seq, payload);
                    }
                }
                Ok(Err(e)) => {
                    let detail = format!("{e}; not replayed");
                    let d = Divergence::new(Check::State, detail).at_batch(seq.ok());
                    feeder.found.record(d);
                }
                Err(_) => {
                    let detail = format!(
                        "log record with key {} does not decode; not replayed",
                        hex(key)
                    );
                    feeder.found.record(Divergence::new(Check::State, detail));
                }
            }
            true
        });
        result.or_else(|e| self.storage_failure(e))
    }

    /// Turns a break in the chain into a divergence naming its batch and, where there is one,
    /// its event.
    fn locate(&mut self, error: ChainError) -> Result<Divergence, AuditError> {
        Ok(match error {
            ChainError::Batch { batch, detail } => {
                let events = match self.header(batch)? {
                    Some(h) => format!(
                        " (its header covers events {}..{})",
                        h.first_event,
                        h.first_event
                            .saturating_add(u64::from(h.count))
                            .saturating_sub(1)
                    ),
                    None => String::new(),
                };
                Divergence::new(Check::Chain, format!("batch {batch}: {detail}{events}"))
                    .at_batch(Some(batch))
            }
            ChainError::Event { seq, detail } => {
                let batch = self.covering_batch(seq)?;
                Divergence::new(Check::Chain, format!("event {seq}: {detail}"))
                    .at_seq(Some(seq))
                    .at_batch(batch)
            }
            ChainError::Tip(detail) => {
                Divergence::new(Check::Chain, format!("chain tip: {detail}"))
            }
            ChainError::Storage(e) => Divergence::new(Check::Storage, e.to_string()),
        })
    }

    fn header(&self, batch: u64) -> Result<Option<BatchHeader>, AuditError> {
        let value = self.storage.get(Cf::Log, &seq_key(batch))?;
        Ok(value.and_then(|v| {
            RecordView::decode_unverified(batch, &v)
                .ok()
                .map(|view| view.header)
        }))
    }

    /// The batch holding event `seq`, by the event index (and checked against its record).
    pub(crate) fn covering_batch(&self, seq: u64) -> Result<Option<u64>, AuditError> {
        let Some((_, batch)) = self.storage.at_or_before(Cf::EventIndex, &seq_key(seq))? else {
            return Ok(None);
        };
        let Ok(batch) = format::decode_seq_key(&batch) else {
            return Ok(None);
        };
        let covers = self.header(batch)?.is_some_and(|h| {
            h.first_event <= seq && seq < h.first_event.saturating_add(u64::from(h.count))
        });
        Ok(covers.then_some(batch))
    }

    /// The payload of event `seq` as the log holds it (`None`: no such event, or its record
    /// does not verify).
    pub(crate) fn event_payload(&self, seq: u64) -> Result<Option<Vec<u8>>, AuditError> {
        let Some(batch) = self.covering_batch(seq)? else {
            return Ok(None);
        };
        let Some(value) = self.storage.get(Cf::Log, &seq_key(batch))? else {
            return Ok(None);
        };
        Ok(RecordView::decode_unverified(batch, &value)
            .ok()
            .and_then(|view| {
                view.events()
                    .find(|(s, _)| *s == seq)
                    .map(|(_, payload)| payload.to_vec())
            }))
    }

    /// Compares every stored aggregate (the checkpoint) with the replay as of the checkpoint's
    /// last event, checks its invariants, then reports what the replay has at that point and
    /// the store lacks.
    fn compare_states(&mut self) -> Result<(), AuditError> {
        let storage = self.storage;
        self.phase_started = Instant::now();
        let total = self.replay.aggregates.len() as u64;
        let mut seen = 0u64;
        let result = storage.scan(Cf::State, &[], &mut |key, value| {
            self.stored_aggregate(key, value);
            seen += 1;
            if seen.is_multiple_of(PROGRESS_EVERY) {
                self.tell(Phase::State, seen, total);
            }
            true
        });
        result.or_else(|e| self.storage_failure(e))?;
        self.report.aggregates = seen;
        self.report_missing_aggregates();
        Ok(())
    }

    fn stored_aggregate(&mut self, key: &[u8], value: &[u8]) {
        let id = String::from_utf8_lossy(key);
        let replayed = self.replay.aggregates.get_mut(id.as_ref());
        let expected = replayed.as_deref().and_then(Replayed::at_checkpoint);
        let (last_seq, last_batch) = expected
            .as_ref()
            .map_or((None, None), |(_, seq, batch)| (Some(*seq), Some(*batch)));
        let stored = match codec::decode_aggregate(value) {
            Ok(stored) => stored,
            Err(e) => {
                if let Some(r) = replayed {
                    r.seen = true;
                }
                let d = Divergence::new(Check::State, format!("stored state does not decode: {e}"))
                    .on(&id)
                    .at_seq(last_seq)
                    .at_batch(last_batch);
                self.report.record(d);
                return;
            }
        };
        let aggregate_id = keel_invariants::AggregateId::from_full(id.to_string());
        if let Err(violation) = self.domains.check_invariants(&aggregate_id, &stored) {
            let d = Divergence::new(Check::Invariant, violation.detail.clone())
                .on(&id)
                .expected_found(violation.invariant, describe(&stored));
            self.report.record(d.at_seq(last_seq).at_batch(last_batch));
        }
        let Some((expected, _, _)) = expected else {
            if let Some(r) = replayed {
                r.seen = true;
            }
            let d = Divergence::new(
                Check::State,
                "stored aggregate that no event up to the checkpoint touches",
            )
            .on(&id)
            .expected_found("absent", describe(&stored));
            self.report.record(d);
            return;
        };
        let differs = *expected != stored;
        let expected = describe(expected);
        if let Some(r) = replayed {
            r.seen = true;
        }
        if differs {
            let d = Divergence::new(
                Check::State,
                "stored state differs from the replay of its events up to the checkpoint",
            )
            .on(&id)
            .at_seq(last_seq)
            .at_batch(last_batch)
            .expected_found(expected, describe(&stored));
            self.report.record(d);
        }
    }

    fn report_missing_aggregates(&mut self) {
        let mut missing: Vec<(&Box<str>, Aggregate, u64, u64)> = self
            .replay
            .aggregates
            .iter()
            .filter(|(_, r)| !r.seen)
            .filter_map(|(id, r)| {
                r.at_checkpoint()
                    .map(|(aggregate, seq, batch)| (id, aggregate.clone(), seq, batch))
            })
            .collect();
        missing.sort_by_key(|(_, _, seq, _)| *seq);
        for (id, aggregate, seq, batch) in missing {
            let d = Divergence::new(
                Check::State,
                "aggregate the log creates by the checkpoint is missing from the store",
            )
            .on(id)
            .at_seq(Some(seq))
            .at_batch(Some(batch))
            .expected_found(describe(&aggregate), "absent");
            self.report.record(d);
        }
    }

    /// Every aggregate as the log leaves it at the tip keeps its invariants, and the
    /// conservation laws hold: per aggregate, its quantity equals the flows of its events; in
    /// total, the quantities summed over every aggregate equal the flows summed over the log.
    fn check_conservation(&mut self) {
        let laws = &self.replay.laws;
        let mut totals = vec![0i128; laws.len()];
        let mut found = Vec::new();
        for (id, replayed) in &self.replay.aggregates {
            let at = (Some(replayed.last_seq), Some(replayed.last_batch));
            let aggregate_id = keel_invariants::AggregateId::from_full(id.to_string());
            if let Err(violation) = self
                .domains
                .check_invariants(&aggregate_id, &replayed.aggregate)
            {
                let d = Divergence::new(
                    Check::Invariant,
                    format!("the log's own fold breaks it: {}", violation.detail),
                )
                .on(id)
                .expected_found(violation.invariant, describe(&replayed.aggregate));
                found.push(d.at_seq(at.0).at_batch(at.1));
            }
            for (i, law) in laws.iter().enumerate() {
                let Some(quantity) = law.quantity(&replayed.aggregate.state) else {
                    continue;
                };
                if law.scope() == LawScope::Total {
                    totals[i] = totals[i].saturating_add(quantity);
                    continue;
                }
                let flow = replayed.flows.as_deref().map_or(0, |flows| flows[i]);
                if flow != quantity {
                    let d = Divergence::new(
                        Check::Conservation,
                        format!("{}: {}", law.name(), law.statement()),
                    )
                    .on(id)
                    .at_seq(at.0)
                    .at_batch(at.1)
                    .expected_found(
                        format!("{flow} (the events' flows)"),
                        format!("{quantity} (the state the events fold to)"),
                    );
                    found.push(d);
                }
            }
        }
        found.sort_by_key(|d| d.seq);
        for d in found {
            self.report.record(d);
        }
        let mut declared = Vec::new();
        let replay = &self.replay;
        replay
            .declared_laws
            .check_in_force(&replay.aggregates, &mut declared);
        for d in declared {
            self.report.record(d);
        }
        self.report.declared_laws = replay
            .declared_laws
            .versions
            .iter()
            .map(|v| DeclaredLawChecked {
                name: v.def().name.clone(),
                statement: v.def().statement.clone(),
                scope: v.def().scope,
                domain_version: v.domain_version(),
                from_batch: v.from_batch,
                to_batch: v.to_batch,
            })
            .collect();
        for (i, law) in self.replay.laws.iter().enumerate() {
            let (flow, state) = (self.replay.total_flows[i], totals[i]);
            if law.scope() == LawScope::Total && flow != state {
                let d = Divergence::new(
                    Check::Conservation,
                    format!("{}: {}", law.name(), law.statement()),
                )
                .expected_found(
                    format!("{flow} (the events' flows)"),
                    format!("{state} (the states the events fold to)"),
                );
                self.report.record(d);
            }
        }
    }
}

/// The chain check's view of the log: events to the replay, rejections to the command-id
/// check, progress to the caller.
struct Feeding<'f, 'p> {
    feeder: &'f mut Feeder,
    progress: &'p mut dyn FnMut(&Progress),
    started: Instant,
    total: u64,
}

impl LogVisitor for Feeding<'_, '_> {
    fn record(&mut self, record: &RecordView<'_>) {
        self.feeder.found.count_submitters(record);
        self.feeder.record(record);
    }

    fn event(&mut self, seq: u64, batch: u64, payload: &[u8]) {
        self.feeder.event(seq, batch, payload);
        if self.feeder.events.is_multiple_of(PROGRESS_EVERY) {
            let elapsed = self.started.elapsed();
            (self.progress)(&Progress {
                phase: Phase::Chain,
                done: self.feeder.events,
                total: self.total,
                elapsed,
            });
        }
    }

    fn rejection(&mut self, batch: u64, payload: &[u8]) {
        self.feeder.rejection(batch, payload);
    }
}

/// A rejection the log keeps, reduced for the command-id check.
#[derive(Clone, Debug)]
pub(crate) struct Rejected {
    pub(crate) fp: u128,
    pub(crate) code: RejectCode,
    pub(crate) batch: u64,
}

/// Longest rendering of an aggregate in a report (an SKU with many reservations is long).
pub use keel_sequencer::shorten;

const DESCRIBE_CHARS_MAX: usize = 400;

fn describe(aggregate: &Aggregate) -> String {
    let text = format!("version {} {:?}", aggregate.version, aggregate.state);
    shorten(text, DESCRIBE_CHARS_MAX)
}

fn describe_tip(tip: &ChainTip) -> String {
    format!(
        "batch {} event {} hash {}",
        tip.last_batch,
        tip.last_event,
        hex(&tip.last_hash)
    )
}
