//! A fault-injecting in-memory [`Storage`] for tests.
//!
//! It keeps two copies of the data: what was *written* (what reads see, like a page cache) and
//! what was *synced* (what survives a power loss). A [`FaultPlan`] makes the Nth sync fail, or
//! makes the power fail at the Nth sync; [`MemoryStorage::after_power_loss`] then gives the store
//! a restarted process would find.

use crate::storage::{Cf, Entry, Storage, StorageError, Visit, WriteSet};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

type Tables = HashMap<Cf, BTreeMap<Vec<u8>, Vec<u8>>>;

/// Which sync goes wrong, counting syncing writes from 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// This sync returns an I/O error; its puts are written but not durable (fsyncgate).
    pub fail_sync_at: Option<u64>,
    /// The power fails during this sync: its puts never become durable, the call errors, and
    /// every later call errors too.
    pub power_loss_at: Option<u64>,
}

#[derive(Default)]
struct Inner {
    written: Tables,
    synced: Tables,
    syncs: u64,
    powered_off: bool,
    /// What [`Storage::sorted_runs`] answers for `command_ids` (a test's stand-in for an
    /// LSM tree whose merges fell behind).
    command_id_runs: Option<u64>,
}

/// In-memory storage with injectable sync faults.
#[derive(Default)]
pub struct MemoryStorage {
    inner: Mutex<Inner>,
    plan: FaultPlan,
}

impl MemoryStorage {
    pub fn new(plan: FaultPlan) -> Self {
        Self {
            inner: Mutex::default(),
            plan,
        }
    }

    /// The store as a restarted process finds it after power loss now: only what was synced.
    pub fn after_power_loss(&self) -> MemoryStorage {
        let inner = self.lock();
        let synced = inner.synced.clone();
        MemoryStorage {
            inner: Mutex::new(Inner {
                written: synced.clone(),
                synced,
                ..Inner::default()
            }),
            plan: FaultPlan::default(),
        }
    }

    /// Makes [`Storage::sorted_runs`] of `command_ids` answer `runs` (`None`: no such
    /// structure, the default).
    pub fn set_command_id_runs(&self, runs: Option<u64>) {
        self.lock().command_id_runs = runs;
    }

    /// How many syncing writes were attempted.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock can only come from a test assertion; the data is
        // still consistent (every mutation below is a plain insert), so keep going.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn powered(inner: &Inner) -> Result<(), StorageError> {
        if inner.powered_off {
            return Err(StorageError::Io(
                "injected power loss: the device is gone".into(),
            ));
        }
        Ok(())
    }
}

fn apply(tables: &mut Tables, set: &WriteSet) {
    for (cf, key, value) in set.iter() {
        tables
            .entry(cf)
            .or_default()
            .insert(key.to_vec(), value.to_vec());
    }
}

impl Storage for MemoryStorage {
    fn write(&self, set: &WriteSet, sync: bool) -> Result<(), StorageError> {
        let mut inner = self.lock();
        Self::powered(&inner)?;
        if !sync {
            apply(&mut inner.written, set);
            return Ok(());
        }
        inner.syncs += 1;
        let n = inner.syncs;
        if self.plan.power_loss_at == Some(n) {
            inner.powered_off = true;
            return Err(StorageError::Io(format!("injected power loss at sync {n}")));
        }
        apply(&mut inner.written, set);
        if self.plan.fail_sync_at == Some(n) {
            return Err(StorageError::Io(format!(
                "injected fsync failure at sync {n}"
            )));
        }
        // A sync makes everything written so far durable, not only this set.
        inner.synced = inner.written.clone();
        Ok(())
    }

    /// An ingestion is a syncing write of its own (it counts for the [`FaultPlan`]) that makes
    /// only its own puts durable: like a RocksDB table file, it does not sync the write-ahead
    /// log's unsynced writes. A failed one (injected fsync failure or power loss) adds nothing.
    fn ingest(&self, cf: Cf, sorted: &WriteSet) -> Result<(), StorageError> {
        crate::storage::check_sorted(cf, sorted)?;
        if sorted.is_empty() {
            return Ok(()); // like RocksDB's: nothing to ingest, no sync
        }
        let mut inner = self.lock();
        Self::powered(&inner)?;
        inner.syncs += 1;
        let n = inner.syncs;
        if self.plan.power_loss_at == Some(n) {
            inner.powered_off = true;
            return Err(StorageError::Io(format!(
                "injected power loss at sync {n} (ingestion)"
            )));
        }
        if self.plan.fail_sync_at == Some(n) {
            return Err(StorageError::Io(format!(
                "injected fsync failure at sync {n} (ingestion)"
            )));
        }
        apply(&mut inner.written, sorted);
        apply(&mut inner.synced, sorted);
        Ok(())
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let inner = self.lock();
        Self::powered(&inner)?;
        Ok(inner.written.get(&cf).and_then(|t| t.get(key)).cloned())
    }

    fn multi_get(&self, cf: Cf, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StorageError> {
        let inner = self.lock();
        Self::powered(&inner)?;
        let table = inner.written.get(&cf);
        Ok(keys
            .iter()
            .map(|k| table.and_then(|t| t.get(*k)).cloned())
            .collect())
    }

    fn scan(&self, cf: Cf, start: &[u8], visit: Visit<'_>) -> Result<(), StorageError> {
        let inner = self.lock();
        Self::powered(&inner)?;
        if let Some(table) = inner.written.get(&cf) {
            for (key, value) in table.range(start.to_vec()..) {
                if !visit(key, value) {
                    break;
                }
            }
        }
        Ok(())
    }

    fn last(&self, cf: Cf) -> Result<Option<Entry>, StorageError> {
        let inner = self.lock();
        Self::powered(&inner)?;
        Ok(inner
            .written
            .get(&cf)
            .and_then(|t| t.last_key_value())
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn at_or_before(&self, cf: Cf, key: &[u8]) -> Result<Option<Entry>, StorageError> {
        let inner = self.lock();
        Self::powered(&inner)?;
        Ok(inner
            .written
            .get(&cf)
            .and_then(|t| t.range(..=key.to_vec()).next_back())
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn checkpoint(&self, _dir: &Path) -> Result<(), StorageError> {
        Err(StorageError::Unsupported("checkpoint"))
    }

    fn sorted_runs(&self, cf: Cf) -> Result<Option<u64>, StorageError> {
        Ok(match cf {
            Cf::CommandIds => self.lock().command_id_runs,
            _ => None,
        })
    }
}
