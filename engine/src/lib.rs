//! Keel's storage engine: the committed log (one record per batch, chained by BLAKE3), the
//! checkpoint of aggregate state and of the command-id index, over a [`Storage`] (RocksDB in
//! production).
//!
//! The engine knows nothing of HTTP or of any particular domain: events, rejections, states
//! and command outcomes are opaque bytes it is handed. What it owns is the shape of a commit:
//! a batch is ONE log record (everything the batch decided, docs/FORMAT.md) written with the
//! new tip in ONE write with `sync = true`, and a failed write poisons the engine for good (no
//! retry-and-ack). State is not written by a commit: the writer keeps it in memory and hands
//! the aggregates it changed to a [`Checkpointer`] now and then, which writes them in the
//! background; recovery is the last checkpoint plus the log after it.
//! It is not the writer: the sequencer decides what to commit and is the only caller of
//! [`Engine::commit`]. Readers get a [`Reader`].

mod chain;
pub mod format;
mod memory;
pub mod message;
mod outbox;
pub mod record;
mod rocks;
mod storage;
mod upgrade;
pub mod v1;
pub mod wal;

pub use chain::{ChainError, ChainSummary, LogVisitor, verify_chain, verify_log};
pub use format::{ChainTip, CheckpointMark, FORMAT_VERSION, FormatError};
pub use memory::{FaultPlan, MemoryStorage};
pub use message::{BatchMessage, decode_batch_message, encode_batch_message};
pub use outbox::META_PUBLISH_CURSOR;
pub use record::{BatchHeader, RecordView, RuleSet};
pub use rocks::{COMMAND_IDS_RUNS_MAX, INGEST_DIR, LockProbe, RocksStorage, Verified};
pub use storage::{Cf, Storage, StorageError, StorageErrorKind, TableReaders, Visit, WriteSet};
pub use upgrade::{UpgradeSummary, upgrade_v1};

use format::{META_CHECKPOINT, META_FORMAT_VERSION, META_RULES_RECORD, META_TIP, seq_key};
use record::{RecordParts, SUBMITTER_BYTES_MAX, SUBMITTERS_MAX, push_frame};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the engine is poisoned by an earlier failed commit; restart to recover")]
    Poisoned,
    #[error("the store is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "the store has format version {found}, this build reads version {expected}{}",
        if *found < *expected { "; upgrade it with `keel upgrade --data DIR` (it keeps the old store)" } else { "" }
    )]
    UnsupportedFormat { found: u32, expected: u32 },
}

impl EngineError {
    /// The store is damaged: RocksDB found bad bytes, or Keel found records that disagree.
    /// Not transient: restarting will not help, the store needs repair or restoring.
    pub fn is_corruption(&self) -> bool {
        match self {
            EngineError::Storage(e) => e.is_corruption(),
            EngineError::Corrupt(_) => true,
            EngineError::Poisoned | EngineError::UnsupportedFormat { .. } => false,
        }
    }
}

impl From<FormatError> for EngineError {
    fn from(e: FormatError) -> Self {
        EngineError::Corrupt(e.0)
    }
}

/// The writer's handle on the store. Not `Clone`: there is one writer.
pub struct Engine {
    storage: Arc<dyn Storage>,
    tip: ChainTip,
    /// The rules the next batches are decided under.
    rules: RuleSet,
    /// The rule set the last record names: a record under another one carries its text.
    last_rule_set: Option<[u8; 32]>,
    poisoned: Arc<AtomicBool>,
    /// Held by a checkpoint across its ingestion and its mark, and by [`Reader::checkpoint`]:
    /// a copy of the store never falls between the two (see [`Checkpointer::write_ingesting`]).
    checkpoint_gate: Arc<Mutex<()>>,
}

/// What one commit will write, built by the writer between [`Engine::begin`] and
/// [`Engine::commit`]. Reused across batches to keep its buffers.
#[derive(Default)]
pub struct PendingBatch {
    batch_seq: u64,
    first_event: u64,
    next_event: u64,
    committed_at_us: u64,
    /// Framed event payloads, back to back.
    events: Vec<u8>,
    /// The end of each event's frame in `events`.
    event_ends: Vec<usize>,
    /// Framed rejection payloads, back to back.
    rejections: Vec<u8>,
    rejection_count: u32,
    submitters: Vec<String>,
    set: WriteSet,
}

impl PendingBatch {
    /// The sequence the batch gets if it commits.
    pub fn batch_seq(&self) -> u64 {
        self.batch_seq
    }

    pub fn committed_at_us(&self) -> u64 {
        self.committed_at_us
    }

    pub fn event_count(&self) -> usize {
        self.event_ends.len()
    }

    /// The sequence the next pushed event gets.
    pub fn next_event_seq(&self) -> u64 {
        self.next_event
    }

    /// Appends an event whose domain payload `payload` writes; returns its sequence.
    pub fn push_event(&mut self, payload: impl FnOnce(&mut Vec<u8>)) -> u64 {
        let seq = self.next_event;
        push_frame(&mut self.events, payload);
        self.event_ends.push(self.events.len());
        self.next_event += 1;
        seq
    }

    /// Drops the events pushed after the first `keep` (an atomic request rolling back).
    pub fn truncate_events(&mut self, keep: usize) {
        assert!(keep <= self.event_ends.len());
        let end = keep.checked_sub(1).map_or(0, |last| self.event_ends[last]);
        self.events.truncate(end);
        self.event_ends.truncate(keep);
        self.next_event = self.first_event + keep as u64;
    }

    /// Records a rejected command's outcome (written by `payload`), so that the log alone
    /// gives a retry its original answer.
    pub fn push_rejection(&mut self, payload: impl FnOnce(&mut Vec<u8>)) {
        push_frame(&mut self.rejections, payload);
        self.rejection_count += 1;
    }

    /// Names a client (an API key id) that submitted a request of this batch; each id once.
    /// Ids longer than 255 bytes are cut, and at most 65,535 are kept.
    pub fn add_submitter(&mut self, id: &str) {
        let mut cut = id.len().min(SUBMITTER_BYTES_MAX);
        while !id.is_char_boundary(cut) {
            cut -= 1;
        }
        let id = &id[..cut];
        if self.submitters.len() < SUBMITTERS_MAX && !self.submitters.iter().any(|s| s == id) {
            self.submitters.push(id.to_owned());
        }
    }

    /// How many events and logged rejections the batch holds so far.
    pub fn written(&self) -> (usize, u32) {
        (self.event_ends.len(), self.rejection_count)
    }

    /// True when the batch would write nothing: no event and no rejection to keep.
    pub fn is_empty(&self) -> bool {
        self.event_ends.is_empty() && self.rejection_count == 0
    }
}

impl Engine {
    /// Opens the RocksDB store in `dir`, creating it if needed.
    pub fn open_rocksdb(dir: &Path) -> Result<Self, EngineError> {
        Self::open(Arc::new(RocksStorage::open(dir)?))
    }

    /// Opens an engine over `storage`: checks the format version (recording it in a new store)
    /// and recovers the chain tip from the last log record, cross-checked with the stored tip,
    /// the event index and the checkpoint mark.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Self, EngineError> {
        check_format(storage.as_ref())?;
        let (tip, last_rule_set) = recover_tip(storage.as_ref())?;
        Ok(Self {
            storage,
            tip,
            rules: RuleSet::default(),
            last_rule_set,
            poisoned: Arc::new(AtomicBool::new(false)),
            checkpoint_gate: Arc::default(),
        })
    }

    /// Decides the next batches under `rules`: each record names their hash, and the first
    /// record under them carries their text.
    pub fn set_rules(&mut self, rules: RuleSet) {
        self.rules = rules;
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    pub fn tip(&self) -> ChainTip {
        self.tip
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub fn reader(&self) -> Reader {
        Reader {
            storage: Arc::clone(&self.storage),
            poisoned: Arc::clone(&self.poisoned),
            checkpoint_gate: Arc::clone(&self.checkpoint_gate),
        }
    }

    /// The handle the background checkpoint thread writes through.
    pub fn checkpointer(&self) -> Checkpointer {
        Checkpointer {
            storage: Arc::clone(&self.storage),
            poisoned: Arc::clone(&self.poisoned),
            checkpoint_gate: Arc::clone(&self.checkpoint_gate),
        }
    }

    /// The stored outcomes of `ids` in the checkpointed command-id index, in order (ids
    /// given sorted are looked up faster: see [`Storage::multi_get`]).
    pub fn command_outcomes(&self, ids: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        self.ensure_healthy()?;
        Ok(self.storage.multi_get(Cf::CommandIds, ids)?)
    }

    /// The checkpointed states of `ids` (id, encoded state), in order.
    pub fn checkpointed_states(&self, ids: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        self.ensure_healthy()?;
        Ok(self.storage.multi_get(Cf::State, ids)?)
    }

    /// Resets `pending` for the next batch, stamped `committed_at_us` (raised to the previous
    /// batch's time if the clock went backwards, so commit times never decrease).
    pub fn begin(&self, pending: &mut PendingBatch, committed_at_us: u64) {
        pending.set.clear();
        pending.events.clear();
        pending.event_ends.clear();
        pending.rejections.clear();
        pending.rejection_count = 0;
        pending.submitters.clear();
        pending.batch_seq = self.tip.last_batch + 1;
        pending.first_event = self.tip.last_event + 1;
        pending.next_event = pending.first_event;
        pending.committed_at_us = committed_at_us.max(self.tip.last_committed_at_us);
    }

    /// Writes `pending` as ONE log record, with the new tip, in ONE write with `sync = true`.
    /// Returns the batch header, or `None` when the batch held nothing to keep (no event, no
    /// rejection with an id) and nothing was written. On a storage error the engine is
    /// poisoned: nothing more is written, and the caller must not acknowledge anything of
    /// this batch.
    pub fn commit(
        &mut self,
        pending: &mut PendingBatch,
    ) -> Result<Option<BatchHeader>, EngineError> {
        self.write_batch(pending, true)
    }

    pub(crate) fn write_batch(
        &mut self,
        pending: &mut PendingBatch,
        sync: bool,
    ) -> Result<Option<BatchHeader>, EngineError> {
        self.ensure_healthy()?;
        assert_eq!(
            pending.batch_seq,
            self.tip.last_batch + 1,
            "pending batch was not begun on this tip"
        );
        assert_eq!(pending.first_event, self.tip.last_event + 1);
        if pending.is_empty() {
            return Ok(None);
        }
        let header = self.seal(pending);
        if let Err(error) = self.storage.write(&pending.set, sync) {
            self.poisoned.store(true, Ordering::Release);
            tracing::error!(%error, batch = pending.batch_seq, "commit failed; engine poisoned");
            return Err(EngineError::Storage(error));
        }
        self.tip = ChainTip::after(&header);
        self.last_rule_set = Some(header.rule_set);
        Ok(Some(header))
    }

    /// Encodes the record of `pending` into its write set, with its event-index entry and the
    /// new tip.
    fn seal(&self, pending: &mut PendingBatch) -> BatchHeader {
        let count = u32::try_from(pending.event_ends.len()).expect("a batch under 2^32 events");
        let first_record_under_rules = self.last_rule_set != Some(self.rules.hash);
        let parts = RecordParts {
            seq: pending.batch_seq,
            first_event: pending.first_event,
            event_count: count,
            events: &pending.events,
            rejection_count: pending.rejection_count,
            rejections: &pending.rejections,
            submitters: &pending.submitters,
            rules_text: if first_record_under_rules {
                &self.rules.text
            } else {
                ""
            },
            committed_at_us: pending.committed_at_us,
            rule_set: self.rules.hash,
            prev_hash: self.tip.last_hash,
        };
        let mut hash = [0u8; 32];
        pending
            .set
            .put_with(Cf::Log, &seq_key(pending.batch_seq), |out| {
                hash = parts.encode(out);
            });
        let header = BatchHeader {
            seq: pending.batch_seq,
            first_event: pending.first_event,
            count,
            rejections: pending.rejection_count,
            committed_at_us: pending.committed_at_us,
            rule_set: self.rules.hash,
            prev_hash: self.tip.last_hash,
            hash,
        };
        assert_eq!(header.last_event() + 1, pending.next_event);
        if count > 0 {
            pending.set.put(
                Cf::EventIndex,
                &seq_key(header.first_event),
                &seq_key(header.seq),
            );
        }
        if first_record_under_rules {
            pending
                .set
                .put(Cf::Meta, META_RULES_RECORD, &header.seq.to_be_bytes());
        }
        pending
            .set
            .put(Cf::Meta, META_TIP, &ChainTip::after(&header).encode());
        header
    }

    /// The hash of the rule set the log's last record names; `None` for an empty log.
    pub fn last_rule_set(&self) -> Option<[u8; 32]> {
        self.last_rule_set
    }

    /// The text of the rule set the log's last record names, and the batch that recorded it;
    /// `None` for an empty log. Read through `meta/rules_record`; a store written before that
    /// key existed is searched from its first record (once: the next record under new rules
    /// writes the key).
    pub fn last_rules_text(&self) -> Result<Option<(u64, String)>, EngineError> {
        let Some(hash) = self.last_rule_set else {
            return Ok(None);
        };
        self.ensure_healthy()?;
        let storage = self.storage.as_ref();
        if let Some(value) = storage.get(Cf::Meta, META_RULES_RECORD)? {
            let seq = format::decode_seq_key(&value)?;
            if let Some(record) = storage.get(Cf::Log, &value)? {
                let view = RecordView::decode(seq, &record)?;
                if view.header.rule_set == hash && !view.rules_text().is_empty() {
                    return Ok(Some((seq, view.rules_text().to_owned())));
                }
            }
            return Err(EngineError::Corrupt(format!(
                "meta/rules_record names batch {seq}, which does not record the text of the rule set the last record names"
            )));
        }
        let mut found = None;
        let mut error = None;
        storage.scan(Cf::Log, &[], &mut |key, value| {
            let view = format::decode_seq_key(key)
                .map_err(EngineError::from)
                .and_then(|seq| Ok((seq, RecordView::decode(seq, value)?)));
            match view {
                Ok((seq, view)) => {
                    if view.header.rule_set == hash && !view.rules_text().is_empty() {
                        found = Some((seq, view.rules_text().to_owned()));
                        return false;
                    }
                    true
                }
                Err(e) => {
                    error = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = error {
            return Err(e);
        }
        match found {
            Some(found) => Ok(Some(found)),
            None => Err(EngineError::Corrupt(format!(
                "no record carries the text of rule set {}, which the last record names",
                format::hex(&hash)
            ))),
        }
    }

    fn ensure_healthy(&self) -> Result<(), EngineError> {
        if self.is_poisoned() {
            return Err(EngineError::Poisoned);
        }
        Ok(())
    }
}

/// Writes checkpoints: the state of the aggregates and the outcomes of the command ids changed
/// since the previous checkpoint, with the mark of the batch they stand at, in ONE write with
/// `sync = true`, on the checkpoint thread (never on the commit path). Durability is not why
/// it syncs (a lost checkpoint only means recovery replays more of the log, which is the
/// truth): a large unsynced write left after the last commit could reach the disk only in
/// part, out of order, in a power cut, and the write-ahead-log check at start accepts damage
/// only in the final record. Shares the engine's poison: a failed write poisons both, and a
/// poisoned engine writes no checkpoint.
#[derive(Clone)]
pub struct Checkpointer {
    storage: Arc<dyn Storage>,
    poisoned: Arc<AtomicBool>,
    checkpoint_gate: Arc<Mutex<()>>,
}

impl Checkpointer {
    /// Writes a checkpoint whose command ids are many: `ids` (their outcomes, keys strictly
    /// ascending) are added to `command_ids` by ingestion ([`Storage::ingest`]: durable on
    /// return, and never a write-ahead-log byte or a memtable insert), then `set` (states) and
    /// the mark are written as by [`Checkpointer::write`]. After a crash between the two the
    /// index may hold ids of batches after the mark: each one is in the synced log with the
    /// same outcome (a checkpoint holds only committed batches), the replay of the log after
    /// the mark decides them again identically, and the audit accepts such entries only when
    /// they agree with the log. Holds the checkpoint gate throughout, so that
    /// [`Reader::checkpoint`] never copies the store between the two.
    pub fn write_ingesting(
        &self,
        ids: &WriteSet,
        set: &mut WriteSet,
        mark: CheckpointMark,
    ) -> Result<(), EngineError> {
        let _gate = self
            .checkpoint_gate
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.poisoned.load(Ordering::Acquire) {
            return Err(EngineError::Poisoned);
        }
        if let Err(error) = self.storage.ingest(Cf::CommandIds, ids) {
            self.poisoned.store(true, Ordering::Release);
            tracing::error!(%error, batch = mark.batch, "checkpoint ingestion of command ids failed; engine poisoned");
            return Err(EngineError::Storage(error));
        }
        self.write(set, mark)
    }

    /// How many sorted runs a lookup in `cf` may look at ([`Storage::sorted_runs`]), for the
    /// metrics: `None` when the store does not say or cannot answer.
    pub fn sorted_runs(&self, cf: Cf) -> Option<u64> {
        self.storage.sorted_runs(cf).ok().flatten()
    }

    /// Memory held for `cf`'s open table files ([`Storage::table_readers`]), for the metrics:
    /// `None` when the store does not say or cannot answer.
    pub fn table_readers(&self, cf: Cf) -> Option<TableReaders> {
        self.storage.table_readers(cf).ok().flatten()
    }

    /// Writes the puts of `set` (into `state` and `command_ids` only) and the mark `mark`.
    pub fn write(&self, set: &mut WriteSet, mark: CheckpointMark) -> Result<(), EngineError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(EngineError::Poisoned);
        }
        debug_assert!(
            set.iter()
                .all(|(cf, _, _)| matches!(cf, Cf::State | Cf::CommandIds))
        );
        set.put(Cf::Meta, META_CHECKPOINT, &mark.encode());
        if let Err(error) = self.storage.write(set, true) {
            self.poisoned.store(true, Ordering::Release);
            tracing::error!(%error, batch = mark.batch, "checkpoint write failed; engine poisoned");
            return Err(EngineError::Storage(error));
        }
        Ok(())
    }
}

fn check_format(storage: &dyn Storage) -> Result<(), EngineError> {
    match storage.get(Cf::Meta, META_FORMAT_VERSION)? {
        Some(value) => {
            let bytes: [u8; 4] = value.as_slice().try_into().map_err(|_| {
                EngineError::Corrupt(format!("format version of {} bytes", value.len()))
            })?;
            let found = u32::from_be_bytes(bytes);
            if found != FORMAT_VERSION {
                return Err(EngineError::UnsupportedFormat {
                    found,
                    expected: FORMAT_VERSION,
                });
            }
            Ok(())
        }
        None => {
            if storage.last(Cf::Log)?.is_some() || storage.last(Cf::State)?.is_some() {
                return Err(EngineError::Corrupt(
                    "data present but no format version".into(),
                ));
            }
            let mut set = WriteSet::default();
            set.put(Cf::Meta, META_FORMAT_VERSION, &FORMAT_VERSION.to_be_bytes());
            Ok(storage.write(&set, true)?)
        }
    }
}

/// Recovers the tip from the last log record (verified) and cross-checks it against the stored
/// tip, the event index and the checkpoint mark: with one write per batch a torn tail is
/// impossible, so any mismatch means the store was damaged outside Keel. Also returns the rule
/// set the last record names.
fn recover_tip(storage: &dyn Storage) -> Result<(ChainTip, Option<[u8; 32]>), EngineError> {
    let stored = storage
        .get(Cf::Meta, META_TIP)?
        .map(|v| ChainTip::decode(&v))
        .transpose()?;
    let last = match storage.last(Cf::Log)? {
        Some((key, value)) => {
            let seq = format::decode_seq_key(&key)?;
            Some(RecordView::decode(seq, &value)?.header)
        }
        None => None,
    };
    let tip = last.as_ref().map(ChainTip::after).unwrap_or_default();
    if stored.unwrap_or_default() != tip {
        return Err(EngineError::Corrupt(format!(
            "stored tip {} disagrees with the last log record ({tip})",
            stored.map_or_else(|| "absent".to_string(), |s| s.to_string())
        )));
    }
    if let Some((key, value)) = storage.last(Cf::EventIndex)? {
        let first = format::decode_seq_key(&key)?;
        let batch = format::decode_seq_key(&value)?;
        let record = storage
            .get(Cf::Log, &value)?
            .ok_or_else(|| {
                EngineError::Corrupt(format!(
                    "the event index names batch {batch} for event {first}, and the log has no such batch"
                ))
            })?;
        let header = RecordView::decode(batch, &record)?.header;
        if header.first_event != first || header.count == 0 || header.last_event() != tip.last_event
        {
            return Err(EngineError::Corrupt(format!(
                "the event index's last entry (event {first} in batch {batch}) disagrees with the log, which ends at event {}",
                tip.last_event
            )));
        }
    } else if tip.last_event != 0 {
        return Err(EngineError::Corrupt(format!(
            "the log holds {} events but the event index is empty",
            tip.last_event
        )));
    }
    let mark = read_checkpoint_mark(storage)?;
    if mark.batch == 0 && storage.last(Cf::State)?.is_some() {
        return Err(EngineError::Corrupt(
            "aggregate state is stored but no checkpoint mark says where it stands".into(),
        ));
    }
    if mark.batch > tip.last_batch {
        return Err(EngineError::Corrupt(format!(
            "the checkpoint stands at batch {}, past the log's end at batch {}",
            mark.batch, tip.last_batch
        )));
    }
    Ok((tip, last.map(|h| h.rule_set)))
}

fn read_checkpoint_mark(storage: &dyn Storage) -> Result<CheckpointMark, EngineError> {
    Ok(storage
        .get(Cf::Meta, META_CHECKPOINT)?
        .map(|v| CheckpointMark::decode(&v))
        .transpose()?
        .unwrap_or_default())
}

/// A read handle shared by HTTP handlers, the publisher and the audit. Refuses to read once the
/// engine is poisoned: after a failed fsync the store may show writes that were never durable.
#[derive(Clone)]
pub struct Reader {
    storage: Arc<dyn Storage>,
    poisoned: Arc<AtomicBool>,
    checkpoint_gate: Arc<Mutex<()>>,
}

/// One committed event as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: u64,
    pub batch: u64,
    /// The batch's commit time, µs since the Unix epoch.
    pub committed_at_us: u64,
    pub payload: Vec<u8>,
}

impl Reader {
    /// A reader over a store nobody writes (an audit snapshot, a stopped server's directory).
    pub fn detached(storage: Arc<dyn Storage>) -> Self {
        Self {
            storage,
            poisoned: Arc::new(AtomicBool::new(false)),
            checkpoint_gate: Arc::default(),
        }
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    fn healthy(&self) -> Result<&dyn Storage, EngineError> {
        if self.is_poisoned() {
            return Err(EngineError::Poisoned);
        }
        Ok(self.storage.as_ref())
    }

    pub fn storage(&self) -> Result<&dyn Storage, EngineError> {
        self.healthy()
    }

    /// The checkpointed state of one aggregate (as of [`Reader::checkpoint_mark`]; the writer's
    /// published overlay holds what changed since).
    pub fn state(&self, aggregate_id: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.healthy()?.get(Cf::State, aggregate_id)?)
    }

    /// Where the checkpoint stands.
    pub fn checkpoint_mark(&self) -> Result<CheckpointMark, EngineError> {
        read_checkpoint_mark(self.healthy()?)
    }

    /// Visits every checkpointed aggregate (id, encoded state) while `visit` returns true.
    pub fn scan_states(&self, visit: Visit<'_>) -> Result<(), EngineError> {
        Ok(self.healthy()?.scan(Cf::State, &[], visit)?)
    }

    /// The durable chain tip.
    pub fn tip(&self) -> Result<ChainTip, EngineError> {
        let value = self.healthy()?.get(Cf::Meta, META_TIP)?;
        Ok(value
            .map(|v| ChainTip::decode(&v))
            .transpose()?
            .unwrap_or_default())
    }

    /// Visits every log record after batch `after`, verified, in order, while `visit` returns
    /// true. A record that does not verify ends the scan with `Corrupt`.
    pub fn scan_log(
        &self,
        after: u64,
        visit: &mut dyn FnMut(&RecordView<'_>) -> bool,
    ) -> Result<(), EngineError> {
        let mut failure = None;
        let mut expected = after + 1;
        let mut previous: Option<BatchHeader> = None;
        self.healthy()?
            .scan(Cf::Log, &seq_key(expected), &mut |key, value| {
                let decoded = format::decode_seq_key(key)
                    .and_then(|seq| {
                        if seq == expected {
                            RecordView::decode(seq, value)
                        } else {
                            Err(FormatError(format!(
                                "batch {expected} is missing: batch {seq} follows"
                            )))
                        }
                    })
                    .and_then(|view| match &previous {
                        Some(p) => chain::link(&ChainTip::after(p), &view.header)
                            .map(|()| view)
                            .map_err(|detail| FormatError(format!("batch {expected}: {detail}"))),
                        None => Ok(view),
                    });
                match decoded {
                    Ok(view) => {
                        expected += 1;
                        previous = Some(view.header);
                        visit(&view)
                    }
                    Err(e) => {
                        failure = Some(e);
                        false
                    }
                }
            })?;
        failure.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Up to `limit` events with sequence greater than `after`, in order.
    pub fn events(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, EngineError> {
        let mut events = Vec::with_capacity(limit.min(4096));
        if limit == 0 {
            return Ok(events);
        }
        let storage = self.healthy()?;
        let wanted = after.saturating_add(1);
        // The batch holding event `wanted`: the last one starting at or before it.
        let start_batch = match storage.at_or_before(Cf::EventIndex, &seq_key(wanted))? {
            Some((_, batch)) => format::decode_seq_key(&batch)?,
            None => 1,
        };
        self.scan_log(start_batch.saturating_sub(1), &mut |view| {
            for (seq, payload) in view.events() {
                if seq < wanted {
                    continue;
                }
                if events.len() >= limit {
                    return false;
                }
                events.push(StoredEvent {
                    seq,
                    batch: view.header.seq,
                    committed_at_us: view.header.committed_at_us,
                    payload: payload.to_vec(),
                });
            }
            events.len() < limit
        })?;
        Ok(events)
    }

    /// The header of batch `seq` (its record verified).
    pub fn batch(&self, seq: u64) -> Result<Option<BatchHeader>, EngineError> {
        let value = self.healthy()?.get(Cf::Log, &seq_key(seq))?;
        Ok(value
            .map(|v| RecordView::decode(seq, &v).map(|view| view.header))
            .transpose()?)
    }

    /// The stored record of batch `seq`, unverified (callers decode it with [`RecordView`]).
    pub fn record(&self, seq: u64) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.healthy()?.get(Cf::Log, &seq_key(seq))?)
    }

    /// Writes a consistent copy of the store into `dir`, for auditing while writes go on.
    /// Waits for a checkpoint being written by ingestion: RocksDB's copy takes the MANIFEST's
    /// size before the write-ahead log's, so a copy made between an ingestion (a MANIFEST
    /// record) and its mark (a write-ahead-log record) could hold the mark without the ids.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), EngineError> {
        let _gate = self
            .checkpoint_gate
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Ok(self.healthy()?.checkpoint(dir)?)
    }
}
