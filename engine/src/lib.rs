//! Keel's storage engine: the committed log, batch headers, the hash chain, aggregate state and
//! the command-id index, over a [`Storage`] (RocksDB in production).
//!
//! The engine knows nothing of HTTP or of any particular domain: events, states and command
//! outcomes are opaque bytes it is handed. What it owns is the shape of a commit: everything a
//! batch changes goes into ONE write with `sync = true`, the batch header chains a BLAKE3 hash to
//! the previous batch, and a failed sync poisons the engine for good (no retry-and-ack).
//! It is not the writer: the sequencer decides what to commit and is the only caller of
//! [`Engine::commit`]. Readers get a [`Reader`].

mod chain;
pub mod format;
mod memory;
pub mod message;
mod outbox;
mod rocks;
mod storage;
pub mod wal;

pub use chain::{ChainError, ChainSummary, verify_chain};
pub use format::{BatchHeader, ChainTip, FORMAT_VERSION, FormatError};
pub use memory::{FaultPlan, MemoryStorage};
pub use message::{BatchMessage, decode_batch_message, encode_batch_message};
pub use outbox::META_PUBLISH_CURSOR;
pub use rocks::{LockProbe, RocksStorage, Verified};
pub use storage::{Cf, Storage, StorageError, StorageErrorKind, Visit, WriteSet};

use format::{BatchHasher, META_FORMAT_VERSION, META_TIP, seq_key};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the engine is poisoned by an earlier failed commit; restart to recover")]
    Poisoned,
    #[error("the store is corrupt: {0}")]
    Corrupt(String),
    #[error("the store has format version {found}, this build reads version {expected}")]
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
    poisoned: Arc<AtomicBool>,
}

/// What one commit will write, built by the writer between [`Engine::begin`] and
/// [`Engine::commit`]. Reused across batches to keep its buffers.
#[derive(Default)]
pub struct PendingBatch {
    set: WriteSet,
    batch_seq: u64,
    first_event: u64,
    next_event: u64,
    committed_at_us: u64,
    /// Indices into `set` of the event puts, in sequence order.
    events: Vec<usize>,
}

impl PendingBatch {
    /// The sequence the batch gets if it commits with at least one event.
    pub fn batch_seq(&self) -> u64 {
        self.batch_seq
    }

    pub fn committed_at_us(&self) -> u64 {
        self.committed_at_us
    }

    pub fn event_count(&self) -> usize {
        self.events.len()
    }

    /// The sequence the next pushed event gets.
    pub fn next_event_seq(&self) -> u64 {
        self.next_event
    }

    /// Appends an event whose domain payload `payload` writes; returns its sequence.
    pub fn push_event(&mut self, payload: impl FnOnce(&mut Vec<u8>)) -> u64 {
        let seq = self.next_event;
        let batch = self.batch_seq;
        let index = self.set.put_with(Cf::Events, &seq_key(seq), |out| {
            out.extend_from_slice(&seq_key(batch));
            payload(out);
        });
        self.events.push(index);
        self.next_event += 1;
        seq
    }

    /// Drops the events pushed after the first `keep` (an atomic request rolling back).
    /// Only events may be pushed between the mark and the rollback.
    pub fn truncate_events(&mut self, keep: usize) {
        assert!(keep <= self.events.len());
        if let Some(&first_dropped) = self.events.get(keep) {
            assert_eq!(first_dropped + (self.events.len() - keep), self.set.len());
            self.set.truncate(first_dropped);
            self.events.truncate(keep);
            self.next_event = self.first_event + keep as u64;
        }
    }

    /// Records an aggregate's new state, written by `value`.
    pub fn put_state(&mut self, aggregate_id: &[u8], value: impl FnOnce(&mut Vec<u8>)) {
        self.set.put_with(Cf::State, aggregate_id, value);
    }

    /// Records a command id's outcome, written by `value`.
    pub fn put_command(&mut self, command_id: &[u8], value: impl FnOnce(&mut Vec<u8>)) {
        self.set.put_with(Cf::CommandIds, command_id, value);
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

impl Engine {
    /// Opens the RocksDB store in `dir`, creating it if needed.
    pub fn open_rocksdb(dir: &Path) -> Result<Self, EngineError> {
        Self::open(Arc::new(RocksStorage::open(dir)?))
    }

    /// Opens an engine over `storage`: checks the format version (recording it in a new store)
    /// and recovers the chain tip, asserting the log has no tail past the last batch header.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Self, EngineError> {
        check_format(storage.as_ref())?;
        let tip = recover_tip(storage.as_ref())?;
        Ok(Self {
            storage,
            tip,
            poisoned: Arc::new(AtomicBool::new(false)),
        })
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
        }
    }

    /// Visits every stored aggregate (id, encoded state), to warm the writer's cache.
    pub fn scan_states(&self, visit: Visit<'_>) -> Result<(), EngineError> {
        Ok(self.storage.scan(Cf::State, &[], visit)?)
    }

    /// The stored outcomes of `ids` in the command-id index, in order.
    pub fn command_outcomes(&self, ids: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        self.ensure_healthy()?;
        Ok(self.storage.multi_get(Cf::CommandIds, ids)?)
    }

    /// Resets `pending` for the next batch, stamped `committed_at_us` (raised to the previous
    /// batch's time if the clock went backwards, so commit times never decrease).
    pub fn begin(&self, pending: &mut PendingBatch, committed_at_us: u64) {
        pending.set.clear();
        pending.events.clear();
        pending.batch_seq = self.tip.last_batch + 1;
        pending.first_event = self.tip.last_event + 1;
        pending.next_event = pending.first_event;
        pending.committed_at_us = committed_at_us.max(self.tip.last_committed_at_us);
    }

    /// Writes `pending` in ONE write with `sync = true`. Returns the batch header when the
    /// batch had events (a batch of only command-id outcomes is written and synced but gets no
    /// header and no sequence). On a storage error the engine is poisoned: nothing more is
    /// written, and the caller must not acknowledge anything of this batch.
    pub fn commit(
        &mut self,
        pending: &mut PendingBatch,
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
        if let Err(error) = self.storage.write(&pending.set, true) {
            self.poisoned.store(true, Ordering::Release);
            tracing::error!(%error, batch = pending.batch_seq, "commit failed; engine poisoned");
            return Err(EngineError::Storage(error));
        }
        if let Some(header) = header {
            self.tip = ChainTip::after(&header);
        }
        Ok(header)
    }

    /// Adds the header and the new tip to `pending` when it holds events.
    fn seal(&self, pending: &mut PendingBatch) -> Option<BatchHeader> {
        let count = u32::try_from(pending.events.len())
            .ok()
            .filter(|c| *c > 0)?;
        let mut hasher = BatchHasher::new(
            pending.batch_seq,
            pending.first_event,
            count,
            pending.committed_at_us,
            &self.tip.last_hash,
        );
        for (offset, &index) in pending.events.iter().enumerate() {
            let (cf, key, value) = pending.set.get(index);
            let seq = pending.first_event + offset as u64;
            debug_assert!(cf == Cf::Events && key == seq_key(seq));
            hasher.event(seq, value);
        }
        let header = BatchHeader {
            seq: pending.batch_seq,
            first_event: pending.first_event,
            count,
            committed_at_us: pending.committed_at_us,
            prev_hash: self.tip.last_hash,
            hash: hasher.finish(),
        };
        assert_eq!(header.last_event() + 1, pending.next_event);
        pending
            .set
            .put(Cf::Batches, &seq_key(header.seq), &header.encode());
        pending
            .set
            .put(Cf::Meta, META_TIP, &ChainTip::after(&header).encode());
        Some(header)
    }

    fn ensure_healthy(&self) -> Result<(), EngineError> {
        if self.is_poisoned() {
            return Err(EngineError::Poisoned);
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
            if storage.last(Cf::Batches)?.is_some() || storage.last(Cf::Events)?.is_some() {
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

/// Recovers the tip from the last batch header and cross-checks it against the stored tip and
/// the last event: with one write per batch, a torn tail is impossible, so any mismatch means
/// the store was damaged outside Keel.
fn recover_tip(storage: &dyn Storage) -> Result<ChainTip, EngineError> {
    let stored = storage
        .get(Cf::Meta, META_TIP)?
        .map(|v| ChainTip::decode(&v))
        .transpose()?;
    let last_header = match storage.last(Cf::Batches)? {
        Some((key, value)) => Some(BatchHeader::decode(format::decode_seq_key(&key)?, &value)?),
        None => None,
    };
    let last_event = match storage.last(Cf::Events)? {
        Some((key, _)) => format::decode_seq_key(&key)?,
        None => 0,
    };
    let tip = last_header
        .as_ref()
        .map(ChainTip::after)
        .unwrap_or_default();
    if stored.unwrap_or_default() != tip {
        return Err(EngineError::Corrupt(format!(
            "stored tip {stored:?} disagrees with the last batch header {last_header:?}"
        )));
    }
    if last_event != tip.last_event {
        return Err(EngineError::Corrupt(format!(
            "last event {last_event} but the last batch ends at event {}",
            tip.last_event
        )));
    }
    Ok(tip)
}

/// A read handle shared by HTTP handlers, the publisher and the audit. Refuses to read once the
/// engine is poisoned: after a failed fsync the store may show writes that were never durable.
#[derive(Clone)]
pub struct Reader {
    storage: Arc<dyn Storage>,
    poisoned: Arc<AtomicBool>,
}

/// One committed event as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: u64,
    pub batch: u64,
    pub payload: Vec<u8>,
}

impl Reader {
    /// A reader over a store nobody writes (an audit snapshot, a stopped server's directory).
    pub fn detached(storage: Arc<dyn Storage>) -> Self {
        Self {
            storage,
            poisoned: Arc::new(AtomicBool::new(false)),
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

    /// The encoded state of one aggregate.
    pub fn state(&self, aggregate_id: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.healthy()?.get(Cf::State, aggregate_id)?)
    }

    /// The durable chain tip.
    pub fn tip(&self) -> Result<ChainTip, EngineError> {
        let value = self.healthy()?.get(Cf::Meta, META_TIP)?;
        Ok(value
            .map(|v| ChainTip::decode(&v))
            .transpose()?
            .unwrap_or_default())
    }

    /// Up to `limit` events with sequence greater than `after`, in order.
    pub fn events(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, EngineError> {
        let mut events = Vec::with_capacity(limit.min(4096));
        let mut failure = None;
        let start = seq_key(after.saturating_add(1));
        self.healthy()?
            .scan(Cf::Events, &start, &mut |key, value| {
                if events.len() >= limit {
                    return false;
                }
                match decode_event(key, value) {
                    Ok(event) => events.push(event),
                    Err(e) => failure = Some(e),
                }
                failure.is_none()
            })?;
        failure.map_or(Ok(events), |e| Err(e.into()))
    }

    /// The header of batch `seq`.
    pub fn batch(&self, seq: u64) -> Result<Option<BatchHeader>, EngineError> {
        let value = self.healthy()?.get(Cf::Batches, &seq_key(seq))?;
        Ok(value.map(|v| BatchHeader::decode(seq, &v)).transpose()?)
    }

    /// Writes a consistent copy of the store into `dir`, for auditing while writes go on.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), EngineError> {
        Ok(self.healthy()?.checkpoint(dir)?)
    }
}

fn decode_event(key: &[u8], value: &[u8]) -> Result<StoredEvent, FormatError> {
    let seq = format::decode_seq_key(key)?;
    let (batch, payload) = format::split_event_value(value)?;
    Ok(StoredEvent {
        seq,
        batch,
        payload: payload.to_vec(),
    })
}
