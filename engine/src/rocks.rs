//! [`Storage`] over RocksDB: one column family per [`Cf`], every write a single `WriteBatch`.

use crate::storage::{Cf, Entry, Storage, StorageError, TableReaders, Visit, WriteSet};
use crate::wal;
use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, DBRecoveryMode,
    FlushOptions, IngestExternalFileOptions, Options, ReadOptions, SstFileWriter, WriteBatch,
    WriteOptions, checkpoint::Checkpoint,
};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A RocksDB store. Shared by the writer and every reader (RocksDB is safe for that).
pub struct RocksStorage {
    db: DB,
    /// The column families this store has: [`Cf::ALL`], and format 1's families in a store of
    /// format 1 (opened so that the format check can refuse it by name, and `keel upgrade`
    /// can read it).
    families: Vec<Cf>,
    /// Where [`Storage::ingest`] builds its table files: `INGEST_DIR` inside the store (a hard
    /// link moves a file into the store only within one file system). Emptied at every open.
    ingest_dir: PathBuf,
    /// Numbers the table files this process builds.
    ingested: AtomicU64,
    /// False for a read-only or secondary instance, which must not ingest (nor create anything
    /// in the primary's directory).
    writable: bool,
}

/// The directory inside a store where [`Storage::ingest`] writes its table files before
/// RocksDB takes them in. It holds nothing between two ingestions but the leftovers of one a
/// crash interrupted, which the next read-write open deletes.
pub const INGEST_DIR: &str = "ingest";

impl RocksStorage {
    /// Opens (or creates) the store at `path` with every column family Keel uses, after
    /// checking its write-ahead log ([`crate::wal`]), and refuses a damaged store: see
    /// [`recovery_options`] and [`RocksStorage::verify_tables`], which this runs before
    /// returning.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let wal_checked = wal::check_dir(path)?;
        let mut db_options = Options::default();
        recovery_options(&mut db_options);
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        // Two background threads: flushes and compactions must not starve the writer on a
        // two-core machine, but must keep up with a sustained write rate.
        db_options.increase_parallelism(2);
        db_options.set_max_background_jobs(2);
        // The write-ahead log is what makes a commit durable; keep it on and flushed by RocksDB
        // itself at every write (sync happens per write via WriteOptions).
        db_options.set_manual_wal_flush(false);
        // A checkpoint (hundreds of thousands of keys, written by the checkpoint thread) must
        // not hold up a commit: with ordered writes, a commit queued behind it waited for all
        // of its memtable inserts (measured: fsync p99 100-190 ms, ~60k items/s). Unordered
        // writes insert into the memtables concurrently, each writer returning after its own
        // inserts; only the write-ahead log stays ordered. What it relaxes (a snapshot may see
        // an earlier write land later) does not touch Keel: commits are issued one after the
        // other by the one writer, a checkpoint's keys are disjoint from a commit's, and the
        // writer keeps a checkpoint's ids in memory until the write returned.
        db_options.set_allow_concurrent_memtable_write(true);
        db_options.set_unordered_write(true);
        let (families, descriptors) = descriptors(path, true);
        let db = DB::open_cf_descriptors(&db_options, path, descriptors)
            .map_err(|e| naming_files(path, e.into()))?;
        let ingest_dir = path.join(INGEST_DIR);
        remove_leftovers(&ingest_dir)?;
        let storage = Self {
            db,
            families,
            ingest_dir,
            ingested: AtomicU64::new(0),
            writable: true,
        };
        let verified = storage.verify_tables().map_err(|e| naming_files(path, e))?;
        tracing::info!(
            wal_files = wal_checked.len(),
            wal_bytes = wal_checked.iter().map(|w| w.bytes).sum::<u64>(),
            torn_tail = ?wal_checked.iter().find_map(|w| w.torn_tail_at.map(|at| (w.path.clone(), at))),
            verified_keys = verified.keys,
            verified_bytes = verified.bytes,
            verify_seconds = verified.elapsed.as_secs_f64(),
            "storage checked: write-ahead log records and every table block verified"
        );
        Ok(storage)
    }

    /// Reads every key of every column family with checksum verification on, so that a
    /// damaged table block is found now, naming its file and offset, and not by whichever read
    /// happens to touch it later. RocksDB verifies a block's checksum whenever it reads it; an
    /// iterator over a column family reads every data block of every table file of it (the
    /// merge walks all levels), and the index, filter and footer of every table are read
    /// when the table is opened (at `DB::open`: `max_open_files` is -1). The cost is one
    /// sequential read of the store at every start (measured in docs/FORMAT.md, "Recovery").
    pub fn verify_tables(&self) -> Result<Verified, StorageError> {
        let started = Instant::now();
        let mut verified = Verified::default();
        for &cf in &self.families {
            let mut options = ReadOptions::default();
            options.set_verify_checksums(true);
            options.fill_cache(false);
            options.set_readahead_size(SCAN_ONCE_READAHEAD_BYTES);
            let mut it = self.db.raw_iterator_cf_opt(self.handle(cf)?, options);
            it.seek_to_first();
            while let (Some(key), Some(value)) = (it.key(), it.value()) {
                verified.keys += 1;
                verified.bytes += (key.len() + value.len()) as u64;
                it.next();
            }
            it.status()?;
        }
        verified.elapsed = started.elapsed();
        Ok(verified)
    }

    /// Opens the store at `path` read-only, for an audit of a stopped store. Nothing in `path`
    /// is created or changed (a read-only instance writes no info log, no MANIFEST, no WAL);
    /// the view is fixed at open: the write-ahead log is replayed into memory once.
    pub fn open_read_only(path: &Path) -> Result<Self, StorageError> {
        existing_store(path)?;
        wal::check_dir(path)?;
        let (families, descriptors) = descriptors(path, false);
        let db = DB::open_cf_descriptors_read_only(&reader_options(), path, descriptors, false)
            .map_err(|e| naming_files(path, e.into()))?;
        Ok(Self::reading(db, families, path))
    }

    /// Opens the store at `primary`, which a live server may be writing, as a RocksDB
    /// secondary instance keeping its own info log in `secondary` (created if missing; never
    /// inside `primary`). The view changes only in [`RocksStorage::catch_up`], so between two
    /// catch-ups it is one point in time; with one WriteBatch per Keel batch that point is a
    /// batch boundary.
    pub fn open_secondary(primary: &Path, secondary: &Path) -> Result<Self, StorageError> {
        existing_store(primary)?;
        // The primary may be writing the newest log right now: its tail is then "torn", which
        // the check accepts; a log it deletes meanwhile is skipped.
        wal::check_dir(primary)?;
        std::fs::create_dir_all(secondary)
            .map_err(|e| StorageError::Io(format!("creating {}: {e}", secondary.display())))?;
        let (families, descriptors) = descriptors(primary, false);
        let db = DB::open_cf_descriptors_as_secondary(
            &reader_options(),
            primary,
            secondary,
            descriptors,
        )
        .map_err(|e| naming_files(primary, e.into()))?;
        Ok(Self::reading(db, families, primary))
    }

    /// Moves a secondary instance's view to the primary's latest durable write (the MANIFEST
    /// and the write-ahead log as they are now).
    pub fn catch_up(&self) -> Result<(), StorageError> {
        Ok(self.db.try_catch_up_with_primary()?)
    }

    /// Like [`Storage::scan`], for one pass over a whole column family (the audit): blocks are
    /// read ahead and not kept in the block cache, where each would cost an insert and evict
    /// what point lookups need. Checksums are verified as always.
    pub fn scan_once(&self, cf: Cf, start: &[u8], visit: Visit<'_>) -> Result<(), StorageError> {
        let mut options = ReadOptions::default();
        options.fill_cache(false);
        options.set_readahead_size(SCAN_ONCE_READAHEAD_BYTES);
        let mut it = self.db.raw_iterator_cf_opt(self.handle(cf)?, options);
        it.seek(start);
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if !visit(key, value) {
                return Ok(());
            }
            it.next();
        }
        Ok(it.status()?)
    }

    /// Deletes one key, synced. The engine never deletes; this exists for repair tools and for
    /// tests that tamper with a stopped store to prove the audit notices.
    pub fn delete(&self, cf: Cf, key: &[u8]) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.handle(cf)?, key);
        let mut options = WriteOptions::default();
        options.set_sync(true);
        options.disable_wal(false);
        Ok(self.db.write_opt(batch, &options)?)
    }

    /// Flushes every column family's memtable to a table file and waits for it. The engine
    /// never needs this (the write-ahead log makes commits durable); tests use it to put data
    /// into table files.
    pub fn flush(&self) -> Result<(), StorageError> {
        for &cf in &self.families {
            self.db.flush_cf(self.handle(cf)?)?;
        }
        Ok(())
    }

    /// Who holds the RocksDB `LOCK` of the store at `path`, read from `/proc/locks` (RocksDB
    /// takes a POSIX record lock on `LOCK` for as long as a read-write instance is open).
    /// Looking costs nothing and changes nothing, unlike probing with a read-write open,
    /// which would recover the WAL and write new files into a stopped store.
    pub fn lock_probe(path: &Path) -> LockProbe {
        let lock = path.join("LOCK");
        let Ok(meta) = std::fs::metadata(&lock) else {
            // RocksDB creates LOCK on its first read-write open; no file, no holder.
            return if path.join("CURRENT").is_file() {
                LockProbe::Free
            } else {
                LockProbe::Unknown
            };
        };
        // The kernel prints the table a page at a time, indexing into lists that other
        // processes change between pages, so one read can skip a line (seen under a loaded
        // test run: a held lock read as free). A lock held throughout shows in some read.
        let mut probe = LockProbe::Unknown;
        for _ in 0..LOCK_TABLE_READS {
            probe = match std::fs::read_to_string("/proc/locks") {
                Ok(table) => lock_holder(&table, meta.dev(), meta.ino()),
                Err(_) => return LockProbe::Unknown,
            };
            if probe != LockProbe::Free {
                break;
            }
        }
        probe
    }

    /// A read-only or secondary instance: it refuses to ingest and leaves the primary's
    /// ingestion directory alone.
    fn reading(db: DB, families: Vec<Cf>, path: &Path) -> Self {
        Self {
            db,
            families,
            ingest_dir: path.join(INGEST_DIR),
            ingested: AtomicU64::new(0),
            writable: false,
        }
    }

    /// Writes `sorted` into a new table file under [`INGEST_DIR`], with the family's own table
    /// options (compression, bloom filter), and syncs it (`SstFileWriter::finish`).
    fn build_table(&self, cf: Cf, sorted: &WriteSet) -> Result<PathBuf, StorageError> {
        std::fs::create_dir_all(&self.ingest_dir).map_err(|e| {
            StorageError::Io(format!("creating {}: {e}", self.ingest_dir.display()))
        })?;
        let number = self.ingested.fetch_add(1, Ordering::Relaxed);
        let file = self
            .ingest_dir
            .join(format!("{}-{number:012}.sst", cf.name()));
        let options = cf_options(cf);
        let mut writer = SstFileWriter::create(&options);
        writer.open(&file)?;
        for (_, key, value) in sorted.iter() {
            writer.put(key, value)?;
        }
        writer.finish()?;
        Ok(file)
    }

    fn handle(&self, cf: Cf) -> Result<&ColumnFamily, StorageError> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| StorageError::Io(format!("column family {} is missing", cf.name())))
    }
}

/// The column families to open in the store at `path`: the known families the store has, and,
/// when `create` and the store is new or of the current format, every one of [`Cf::ALL`]
/// (created when missing). A store of format 1 (it has `events`) is opened with its own
/// families only, so that opening it changes nothing: the format check then refuses it by its
/// version and `keel upgrade` reads it. A family of another name makes the open fail (RocksDB
/// refuses to open a store without all of its families): not a store this build knows.
fn descriptors(path: &Path, create: bool) -> (Vec<Cf>, Vec<ColumnFamilyDescriptor>) {
    let existing: Vec<Cf> = DB::list_cf(&Options::default(), path)
        .map(|names| {
            names
                .iter()
                .filter_map(|name| Cf::from_name(name))
                .collect()
        })
        .unwrap_or_default();
    let format_1 = existing.contains(&Cf::V1Events) || existing.contains(&Cf::V1Batches);
    let mut families = if create && !format_1 {
        Cf::ALL.to_vec()
    } else {
        Vec::new()
    };
    for cf in existing {
        if !families.contains(&cf) {
            families.push(cf);
        }
    }
    let descriptors = families
        .iter()
        .map(|&cf| ColumnFamilyDescriptor::new(cf.name(), cf_options(cf)))
        .collect();
    (families, descriptors)
}

/// How many times [`RocksStorage::lock_probe`] reads the lock table before it calls a lock free.
const LOCK_TABLE_READS: usize = 3;

/// Read-ahead of [`RocksStorage::scan_once`]: large sequential reads for a full scan.
const SCAN_ONCE_READAHEAD_BYTES: usize = 2 << 20;

/// What [`RocksStorage::verify_tables`] read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verified {
    pub keys: u64,
    /// Key and value bytes (uncompressed).
    pub bytes: u64,
    pub elapsed: Duration,
}

/// How every instance (primary, read-only, secondary) treats damage found while opening.
///
/// RocksDB's default WAL recovery mode, point-in-time, stops replaying at the first bad
/// record and opens successfully: one flipped byte in the middle of the log silently dropped
/// every later batch, acknowledged ones included. `TolerateCorruptedTailRecords` refuses a
/// record whose checksum does not match wherever it is, and accepts only an incomplete record
/// at the end of a log (the write a crash interrupted, which with one synced write per batch
/// was never acknowledged). `AbsoluteConsistency` would refuse that too, so a crash in the
/// middle of a write would leave a store that never opens again without manual repair.
/// [`crate::wal`] closes the two gaps of the tolerant mode (a damaged length that looks like a
/// torn tail, zeros hiding data) and names file and offset, which RocksDB's error does not.
/// `paranoid_checks` (RocksDB's default, set explicitly) makes any corruption RocksDB finds
/// at open or in a background job an error instead of a log line.
fn recovery_options(options: &mut Options) {
    options.set_wal_recovery_mode(DBRecoveryMode::TolerateCorruptedTailRecords);
    options.set_paranoid_checks(true);
    // Keel's WAL check knows only non-recycled logs; recycling is off by default, and stays so.
    options.set_recycle_log_file_num(0);
    // Open every table file at open (RocksDB's default): a damaged footer, index or filter is
    // found before anything is served.
    options.set_max_open_files(-1);
}

/// Whether a process holds a store's `LOCK`, as far as this machine can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockProbe {
    /// No process holds it: no server is running on the store.
    Free,
    /// Process `pid` holds it (a live server, as seen in this machine's lock table).
    Held { pid: u32 },
    /// The lock table cannot be read (not Linux, no /proc): assume a server may be live.
    Unknown,
}

/// Finds a POSIX lock on device `dev`, inode `ino` in the text of `/proc/locks`, whose lines
/// read `1: POSIX  ADVISORY  WRITE 4242 fe:00:10117129 0 EOF` (waiters add a `->` token).
fn lock_holder(table: &str, dev: u64, ino: u64) -> LockProbe {
    // Linux's user-space dev_t encoding of major and minor, as /proc/locks prints them (hex).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    for line in table.lines() {
        let fields: Vec<&str> = line.split_whitespace().filter(|f| *f != "->").collect();
        let (Some(kind), Some(pid), Some(place)) = (fields.get(1), fields.get(4), fields.get(5))
        else {
            continue;
        };
        if *kind != "POSIX" && *kind != "OFDLCK" {
            continue;
        }
        let mut parts = place.split(':');
        let parsed = (
            parts.next().and_then(|p| u64::from_str_radix(p, 16).ok()),
            parts.next().and_then(|p| u64::from_str_radix(p, 16).ok()),
            parts.next().and_then(|p| p.parse::<u64>().ok()),
        );
        if parsed == (Some(major), Some(minor), Some(ino)) {
            return LockProbe::Held {
                pid: pid.parse().unwrap_or(0),
            };
        }
    }
    LockProbe::Free
}

/// RocksDB names the damaged file in most corruption messages ("block checksum mismatch ... in
/// /data/000012.sst offset 0 size 92", "Footer at 1401 checksum mismatch in /data/000008.sst")
/// but not in all: damage that still passes a block checksum and then fails to parse says
/// "properties unsorted  The file MANIFEST-000014 may be corrupted". Where a corruption names
/// no table or log file, this adds the store's, so the error says where to look.
fn naming_files(path: &Path, error: StorageError) -> StorageError {
    let StorageError::Store { kind, message } = &error else {
        return error;
    };
    if *kind != crate::StorageErrorKind::Corruption
        || message.contains(".sst")
        || message.contains(".log")
    {
        return error;
    }
    let mut files: Vec<String> = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".sst") || name.ends_with(".log"))
        .collect();
    files.sort();
    StorageError::corruption(format!(
        "{message} (RocksDB names no table file; the store {} holds {})",
        path.display(),
        files.join(", ")
    ))
}

/// Deletes what an interrupted ingestion left in `dir` (a table file never taken in: its
/// contents are in the log, and the next checkpoint writes them again).
fn remove_leftovers(dir: &Path) -> Result<(), StorageError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StorageError::Io(format!(
            "removing the leftovers of an interrupted ingestion in {}: {e}",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// A directory that holds a RocksDB store. Checked before opening because RocksDB's open
/// creates a missing directory even for a read-only or secondary instance.
fn existing_store(path: &Path) -> Result<(), StorageError> {
    if !path.join("CURRENT").is_file() {
        return Err(StorageError::Io(format!(
            "{} is not a RocksDB store (no CURRENT file)",
            path.display()
        )));
    }
    Ok(())
}

/// Options of the read-only and secondary instances. `max_open_files = -1` keeps every table
/// file open from the moment it is seen: the primary may delete a compacted file while the
/// audit still reads it, and an open descriptor keeps its content readable (RocksDB's
/// documented requirement for secondaries).
fn reader_options() -> Options {
    let mut options = Options::default();
    recovery_options(&mut options);
    options.create_if_missing(false);
    options.create_missing_column_families(false);
    options.set_max_open_files(-1);
    options
}

/// Per column family tuning.
///
/// Format 1 inserted three random keys per item into memtables on the commit path (state,
/// command id, event), and profiling showed those skiplist inserts were most of the writer's
/// CPU. Format 2 writes one key per batch on the commit path (`log`, sequential), plus the tip
/// and, for a batch with events, one `event_index` key; `state` and `command_ids` are written
/// by the checkpointer thread, once per aggregate or id per checkpoint, coalesced. Memtable
/// and table bloom filters make the writer's per-batch command-id lookups, almost always
/// misses, cheap.
fn cf_options(cf: Cf) -> Options {
    let mut options = Options::default();
    options.set_compression_type(DBCompressionType::Lz4);
    match cf {
        Cf::State | Cf::CommandIds => {
            // Written only by checkpoints, in the background; read by point lookups (the
            // writer's per-batch command-id multi-get, almost always a miss, and reads of
            // aggregates not changed since the last checkpoint).
            options.set_write_buffer_size(32 << 20);
            options.set_memtable_whole_key_filtering(true);
            options.set_memtable_prefix_bloom_ratio(0.1);
            let mut table = BlockBasedOptions::default();
            table.set_bloom_filter(bloom_bits_per_key(cf), false);
            table.set_whole_key_filtering(true);
            options.set_block_based_table_factory(&table);
            if cf == Cf::CommandIds {
                options.set_level_zero_slowdown_writes_trigger(COMMAND_IDS_L0_SLOWDOWN);
                options.set_level_zero_stop_writes_trigger(COMMAND_IDS_L0_STOP);
            }
        }
        Cf::Log | Cf::EventIndex | Cf::Meta | Cf::V1Events | Cf::V1Batches => {
            options.set_write_buffer_size(64 << 20)
        }
    }
    options
}

/// Bloom filter bits per key of a family's tables. `command_ids` gets more: the writer looks
/// up every fresh command id, a miss, in every sorted run whose key range holds it (all of
/// them, for random ids), and each false positive reads, checks and decompresses a data block.
/// At 10 bits (~1% false positives per run) those reads were a large part of the writer's
/// lookups under random ids; 16 bits (~0.1%) cost 0.75 byte more per id (docs/FORMAT.md,
/// "Command ids: memory and retention").
fn bloom_bits_per_key(cf: Cf) -> f64 {
    if cf == Cf::CommandIds { 16.0 } else { 10.0 }
}

/// Most sorted runs of `command_ids` a checkpoint adds ids to: above it, the checkpoint thread
/// waits for RocksDB's compactions (`keel_checkpoint_merge_wait_seconds`), the writer's pending
/// changes grow to `--checkpoint-pending-max`, then the writer waits for the checkpoint and the
/// queue answers 503: when the index's compactions fall behind, the back-pressure stays on
/// Keel's own bounds, and a lookup checks at most this many bloom filters. RocksDB's own
/// level-0 triggers for the family sit above it ([`COMMAND_IDS_L0_SLOWDOWN`],
/// [`COMMAND_IDS_L0_STOP`]), because RocksDB slows down or stops *every* write of the store,
/// the commits included, when one family has too many level-0 files (docs/FORMAT.md).
pub const COMMAND_IDS_RUNS_MAX: u64 = 24;
/// RocksDB's level-0 file count at which it slows every write of the store down (its default,
/// 20, is below [`COMMAND_IDS_RUNS_MAX`]).
const COMMAND_IDS_L0_SLOWDOWN: i32 = 48;
/// RocksDB's level-0 file count at which it stops every write of the store (default 36).
const COMMAND_IDS_L0_STOP: i32 = 64;

impl Storage for RocksStorage {
    fn write(&self, set: &WriteSet, sync: bool) -> Result<(), StorageError> {
        let mut batch = WriteBatch::with_capacity_bytes(set.bytes_len() + 32 * set.len());
        for (cf, key, value) in set.iter() {
            batch.put_cf(self.handle(cf)?, key, value);
        }
        let mut options = WriteOptions::default();
        // Explicit, not a library default: `sync` is the durability contract of this call.
        options.set_sync(sync);
        options.disable_wal(false);
        Ok(self.db.write_opt(batch, &options)?)
    }

    /// One table file per call, built and synced here, then moved into the store by RocksDB's
    /// ingestion, which syncs the file and the directory and records it in the MANIFEST
    /// (synced) before it returns. While it assigns the file its sequence number RocksDB holds
    /// other writes back (a commit waits for that, one MANIFEST write, not for the table).
    /// Checkpoints with few ids, and `keel upgrade`, write `command_ids` through the memtable:
    /// a family whose memtables hold anything is flushed first, as an ordinary flush that
    /// writes go on beside, because an ingestion that overlaps a memtable would flush it itself
    /// with every write held back until the flush ends.
    fn ingest(&self, cf: Cf, sorted: &WriteSet) -> Result<(), StorageError> {
        if !self.writable {
            return Err(StorageError::Unsupported(
                "ingestion by a read-only or secondary instance",
            ));
        }
        crate::storage::check_sorted(cf, sorted)?;
        if sorted.is_empty() {
            return Ok(());
        }
        let handle = self.handle(cf)?;
        let unflushed = |property: &str| {
            self.db
                .property_int_value_cf(handle, property)
                .map(|n| n.unwrap_or(0))
        };
        if unflushed("rocksdb.num-entries-active-mem-table")?
            + unflushed("rocksdb.num-entries-imm-mem-tables")?
            > 0
        {
            let mut flush = FlushOptions::default();
            flush.set_wait(true);
            self.db.flush_cf_opt(handle, &flush)?;
        }
        let file = self.build_table(cf, sorted)?;
        let mut options = IngestExternalFileOptions::default();
        options.set_move_files(true);
        // Assigning a sequence number above the memtable's is what makes a later ingestion of
        // the same key win; explicit, not a library default.
        options.set_allow_global_seqno(true);
        options.set_allow_blocking_flush(true);
        let ingested = self
            .db
            .ingest_external_file_cf_opts(handle, &options, vec![&file]);
        // Moved files are unlinked by RocksDB; a failed ingestion leaves its file here.
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(file = %file.display(), error = %e, "ingested table file not removed");
            }
            _ => {}
        }
        Ok(ingested?)
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let value = self.db.get_pinned_cf(self.handle(cf)?, key)?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn multi_get(&self, cf: Cf, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StorageError> {
        let handle = self.handle(cf)?;
        // Keys the caller already sorted (bytewise, RocksDB's order) skip RocksDB's own sort,
        // which compares through its comparator object (8% of the writer's time in a profile
        // of the per-batch command-id lookup).
        let sorted = keys.is_sorted();
        self.db
            .batched_multi_get_cf(handle, keys.iter().copied(), sorted)
            .into_iter()
            .map(|r| r.map(|v| v.map(|v| v.to_vec())).map_err(StorageError::from))
            .collect()
    }

    fn scan(&self, cf: Cf, start: &[u8], visit: Visit<'_>) -> Result<(), StorageError> {
        let mut it = self.db.raw_iterator_cf(self.handle(cf)?);
        it.seek(start);
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if !visit(key, value) {
                return Ok(());
            }
            it.next();
        }
        Ok(it.status()?)
    }

    fn last(&self, cf: Cf) -> Result<Option<Entry>, StorageError> {
        let mut it = self.db.raw_iterator_cf(self.handle(cf)?);
        it.seek_to_last();
        let found = match (it.key(), it.value()) {
            (Some(k), Some(v)) => Some((k.to_vec(), v.to_vec())),
            _ => None,
        };
        it.status()?;
        Ok(found)
    }

    fn at_or_before(&self, cf: Cf, key: &[u8]) -> Result<Option<Entry>, StorageError> {
        let mut it = self.db.raw_iterator_cf(self.handle(cf)?);
        it.seek_for_prev(key);
        let found = match (it.key(), it.value()) {
            (Some(k), Some(v)) => Some((k.to_vec(), v.to_vec())),
            _ => None,
        };
        it.status()?;
        Ok(found)
    }

    fn checkpoint(&self, dir: &Path) -> Result<(), StorageError> {
        Ok(Checkpoint::new(&self.db)?.create_checkpoint(dir)?)
    }

    fn sorted_runs(&self, cf: Cf) -> Result<Option<u64>, StorageError> {
        let handle = self.handle(cf)?;
        let mut runs = 0;
        // RocksDB answers for the levels the family has (7 by default) and nothing past them.
        for level in 0.. {
            let property = format!("rocksdb.num-files-at-level{level}");
            match self.db.property_int_value_cf(handle, property.as_str())? {
                None => break,
                Some(files) if level == 0 => runs += files,
                Some(files) => runs += u64::from(files > 0),
            }
        }
        Ok(Some(runs))
    }

    fn table_readers(&self, cf: Cf) -> Result<Option<TableReaders>, StorageError> {
        let handle = self.handle(cf)?;
        let property = |name: &str| self.db.property_int_value_cf(handle, name);
        Ok(
            match (
                property("rocksdb.estimate-table-readers-mem")?,
                property("rocksdb.estimate-num-keys")?,
            ) {
                (Some(bytes), Some(keys)) => Some(TableReaders { bytes, keys }),
                _ => None,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{LockProbe, lock_holder};

    #[test]
    fn lock_holder_finds_a_posix_lock_on_the_inode() {
        // st_dev 0xfe00 is major 0xfe, minor 0 (a virtio disk).
        let table = "1: FLOCK  ADVISORY  WRITE 2618 fe:00:10117129 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 4242 fe:00:777 0 EOF\n\
                     2: -> POSIX  ADVISORY  WRITE 4343 fe:00:777 0 EOF\n";
        assert_eq!(
            lock_holder(table, 0xfe00, 777),
            LockProbe::Held { pid: 4242 }
        );
        assert_eq!(
            lock_holder(table, 0xfe00, 10117129),
            LockProbe::Free,
            "flock is not RocksDB's lock"
        );
        assert_eq!(
            lock_holder(table, 0xfe01, 777),
            LockProbe::Free,
            "another device"
        );
        assert_eq!(lock_holder("", 0xfe00, 777), LockProbe::Free);
    }
}
