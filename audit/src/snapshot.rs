//! The point in time an audit sees: a stopped store opened read-only, or a live one opened
//! as a RocksDB secondary instance (docs/AUDIT.md, "Stopped and live stores").

use super::AuditError;
use keel_engine::format::{META_TIP, seq_key};
use keel_engine::{
    BatchHeader, Cf, ChainTip, LockProbe, Reader, RocksStorage, Storage, StorageError, Visit,
    WriteSet,
};
use keel_sequencer::{CommittedEvent, ReadError, committed_events};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// How the snapshot was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotMode {
    /// No process holds the store: opened read-only, nothing in it is changed.
    ReadOnly,
    /// A process holds the store (`holder_pid`), or nobody could tell (`None`): opened as a
    /// RocksDB secondary instance, frozen at one catch-up with the live server.
    Secondary { holder_pid: Option<u32> },
}

impl SnapshotMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotMode::ReadOnly => "read_only",
            SnapshotMode::Secondary { .. } => "secondary",
        }
    }

    /// One line for people.
    pub fn describe(self) -> String {
        match self {
            SnapshotMode::ReadOnly => "read-only (no process holds the store)".into(),
            SnapshotMode::Secondary {
                holder_pid: Some(pid),
            } => {
                format!("secondary instance (process {pid} holds the store: a live server)")
            }
            SnapshotMode::Secondary { holder_pid: None } => {
                "secondary instance (the lock table cannot be read; assuming a live server)".into()
            }
        }
    }
}

/// A consistent, unchanging view of a store to audit.
///
/// Field order matters: the store closes before its scratch directory is removed.
pub struct Snapshot {
    pub(super) storage: Arc<RocksStorage>,
    mode: SnapshotMode,
    _scratch: Option<ScratchDir>,
}

impl Snapshot {
    /// Opens `dir`: read-only when no process holds its RocksDB `LOCK`, else as a secondary
    /// instance whose info log lives in a scratch directory removed on drop.
    pub fn open(dir: &Path) -> Result<Self, AuditError> {
        if !dir.is_dir() {
            return Err(AuditError::NotAStore(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        if !dir.join("CURRENT").is_file() {
            return Err(AuditError::NotAStore(format!(
                "{} is not a Keel store (no RocksDB CURRENT file)",
                dir.display()
            )));
        }
        let holder_pid = match RocksStorage::lock_probe(dir) {
            LockProbe::Free => {
                let storage = Arc::new(RocksStorage::open_read_only(dir).map_err(not_a_store)?);
                return Ok(Self {
                    storage,
                    mode: SnapshotMode::ReadOnly,
                    _scratch: None,
                });
            }
            LockProbe::Held { pid } => Some(pid),
            LockProbe::Unknown => None,
        };
        let scratch = ScratchDir::create()?;
        let storage = RocksStorage::open_secondary(dir, &scratch.0).map_err(not_a_store)?;
        let mode = SnapshotMode::Secondary { holder_pid };
        Ok(Self {
            storage: Arc::new(storage),
            mode,
            _scratch: Some(scratch),
        })
    }

    pub fn mode(&self) -> SnapshotMode {
        self.mode
    }

    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// Moves a secondary snapshot to the server's latest commit; a read-only one stays put.
    pub fn catch_up(&self) -> Result<(), AuditError> {
        match self.mode {
            SnapshotMode::ReadOnly => Ok(()),
            SnapshotMode::Secondary { .. } => Ok(self.storage.catch_up()?),
        }
    }

    /// The stored tip, the point an audit of this snapshot stops at (the default, genesis,
    /// when there is none or it does not decode: the audit itself reports that).
    pub fn tip(&self) -> Result<ChainTip, AuditError> {
        let stored = self.storage.get(Cf::Meta, META_TIP)?;
        Ok(stored
            .and_then(|value| ChainTip::decode(&value).ok())
            .unwrap_or_default())
    }

    /// The header of batch `batch`, if stored and decodable.
    pub fn batch_header(&self, batch: u64) -> Result<Option<BatchHeader>, AuditError> {
        let stored = self.storage.get(Cf::Log, &seq_key(batch))?;
        Ok(stored.and_then(|value| {
            keel_engine::RecordView::decode(batch, &value)
                .ok()
                .map(|view| view.header)
        }))
    }

    /// Up to `limit` events after sequence `after`, decoded as the server's
    /// `GET /v1/events` reads them (for comparing what a server serves with the snapshot).
    pub fn events(&self, after: u64, limit: usize) -> Result<Vec<CommittedEvent>, ReadError> {
        let storage: Arc<dyn Storage> = self.storage.clone();
        committed_events(&Reader::detached(storage), after, limit, u64::MAX)
    }
}

fn not_a_store(error: StorageError) -> AuditError {
    if error.is_corruption() {
        return AuditError::Storage(error); // a finding, not a reason to give up on a verdict
    }
    AuditError::NotAStore(format!("cannot open the store: {error}"))
}

/// A directory of our own under the system temp dir, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create() -> Result<Self, AuditError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!("keel-audit-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(|e| StorageError::Io(format!("creating {}: {e}", path.display())))?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Best effort: a leftover scratch directory holds only RocksDB's info log.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A snapshot's storage as the audit reads it: every scan is one pass over a column family
/// ([`RocksStorage::scan_once`]), and writes are refused outright.
pub(super) struct OnePass<'a>(pub(super) &'a RocksStorage);

impl Storage for OnePass<'_> {
    fn write(&self, _set: &WriteSet, _sync: bool) -> Result<(), StorageError> {
        Err(StorageError::Unsupported("writing during an audit"))
    }

    fn ingest(&self, _cf: Cf, _sorted: &WriteSet) -> Result<(), StorageError> {
        Err(StorageError::Unsupported("writing during an audit"))
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.0.get(cf, key)
    }

    fn multi_get(&self, cf: Cf, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StorageError> {
        self.0.multi_get(cf, keys)
    }

    fn scan(&self, cf: Cf, start: &[u8], visit: Visit<'_>) -> Result<(), StorageError> {
        self.0.scan_once(cf, start, visit)
    }

    fn last(&self, cf: Cf) -> Result<Option<(Vec<u8>, Vec<u8>)>, StorageError> {
        self.0.last(cf)
    }

    fn at_or_before(&self, cf: Cf, key: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>, StorageError> {
        self.0.at_or_before(cf, key)
    }

    fn checkpoint(&self, dir: &Path) -> Result<(), StorageError> {
        self.0.checkpoint(dir)
    }
}
