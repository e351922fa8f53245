//! The storage seam: the few operations the engine needs from a key-value store, so tests can
//! run the same engine over a fault-injecting in-memory store ([`crate::MemoryStorage`]) and
//! production over RocksDB ([`crate::RocksStorage`]).

use std::path::Path;

/// The column families (key spaces) of a Keel store. docs/FORMAT.md describes each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cf {
    /// The checkpoint: aggregate id (UTF-8) -> encoded aggregate state and version, as of the
    /// batch `meta/checkpoint` names. Written in the background, never on the commit path.
    State,
    /// The committed log: batch sequence (u64 big-endian) -> one log record (header, events,
    /// rejections, submitters, rules, hash). A commit writes this record, the tip and, for a
    /// batch with events, one `EventIndex` entry.
    Log,
    /// First event sequence of a batch with events (u64 big-endian) -> its batch sequence
    /// (u64 big-endian): finds the batch holding an event.
    EventIndex,
    /// The checkpointed command-id index: client command id (UTF-8) -> its original outcome.
    CommandIds,
    /// Named values: format version, chain tip, checkpoint mark, publication cursor.
    Meta,
    /// Format 1's event family (event sequence -> batch prefix ++ payload). Present only in a
    /// store of format 1; read by `keel upgrade`.
    V1Events,
    /// Format 1's batch headers (batch sequence -> 85-byte header). Format 1 stores only.
    V1Batches,
}

impl Cf {
    /// The families of the current format, created in every store this build opens.
    pub const ALL: [Cf; 5] = [Cf::State, Cf::Log, Cf::EventIndex, Cf::CommandIds, Cf::Meta];

    /// The RocksDB column family name.
    pub fn name(self) -> &'static str {
        match self {
            Cf::State => "state",
            Cf::Log => "log",
            Cf::EventIndex => "event_index",
            Cf::CommandIds => "command_ids",
            Cf::Meta => "meta",
            Cf::V1Events => "events",
            Cf::V1Batches => "batches",
        }
    }

    /// The family called `name`, of this format or of format 1.
    pub fn from_name(name: &str) -> Option<Cf> {
        [
            Cf::State,
            Cf::Log,
            Cf::EventIndex,
            Cf::CommandIds,
            Cf::Meta,
            Cf::V1Events,
            Cf::V1Batches,
        ]
        .into_iter()
        .find(|cf| cf.name() == name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The store reported a failure of kind `kind` (RocksDB's status code, kept as a type so
    /// that nobody has to classify an error by its text). Corruption messages name the damaged
    /// file and, where it is known, the offset.
    #[error("{message}")]
    Store {
        kind: StorageErrorKind,
        message: String,
    },
    /// An I/O failure of Keel's own around the store (a directory, a thread, an injected fault).
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("{0} is not supported by this storage")]
    Unsupported(&'static str),
}

impl StorageError {
    /// Damaged bytes: a checksum mismatch or a malformed record in a table file, the
    /// write-ahead log or the MANIFEST. Never a reason to retry; the store needs repair.
    pub fn corruption(message: impl Into<String>) -> Self {
        StorageError::Store {
            kind: StorageErrorKind::Corruption,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> StorageErrorKind {
        match self {
            StorageError::Store { kind, .. } => *kind,
            StorageError::Io(_) => StorageErrorKind::Io,
            StorageError::Unsupported(_) => StorageErrorKind::NotSupported,
        }
    }

    pub fn is_corruption(&self) -> bool {
        self.kind() == StorageErrorKind::Corruption
    }
}

/// What kind of failure a [`StorageError`] is: RocksDB's status codes, the ones Keel tells
/// apart, and `Other` for the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StorageErrorKind {
    /// Stored bytes are damaged.
    Corruption,
    /// The operating system failed a read, a write or an fsync.
    Io,
    NotFound,
    NotSupported,
    InvalidArgument,
    /// Busy, timed out, try again, aborted, shutting down: transient or refused.
    Busy,
    Other,
}

impl From<rocksdb::Error> for StorageError {
    fn from(error: rocksdb::Error) -> Self {
        use rocksdb::ErrorKind as K;
        // `rocksdb::Error::kind` is the crate's mapping of the C++ `Status` code (the C API
        // hands the code over only as the message's prefix); it is done once, here.
        let kind = match error.kind() {
            K::Corruption => StorageErrorKind::Corruption,
            K::IOError => StorageErrorKind::Io,
            K::NotFound => StorageErrorKind::NotFound,
            K::NotSupported => StorageErrorKind::NotSupported,
            K::InvalidArgument => StorageErrorKind::InvalidArgument,
            K::Busy | K::TimedOut | K::TryAgain | K::Aborted | K::ShutdownInProgress => {
                StorageErrorKind::Busy
            }
            K::MergeInProgress
            | K::Incomplete
            | K::Expired
            | K::CompactionTooLarge
            | K::ColumnFamilyDropped
            | K::Unknown => StorageErrorKind::Other,
        };
        StorageError::Store {
            kind,
            message: error.into_string(),
        }
    }
}

/// A set of puts applied atomically by [`Storage::write`]. Keys and values live in one buffer so
/// that building a batch of thousands of records costs a handful of allocations, not thousands.
#[derive(Default, Debug, Clone)]
pub struct WriteSet {
    bytes: Vec<u8>,
    puts: Vec<Put>,
}

#[derive(Debug, Clone, Copy)]
struct Put {
    cf: Cf,
    key_start: usize,
    value_start: usize,
    value_end: usize,
}

impl WriteSet {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.puts.clear();
    }

    /// Drops every put from number `len` on (and the bytes they used).
    pub fn truncate(&mut self, len: usize) {
        if let Some(first) = self.puts.get(len) {
            self.bytes.truncate(first.key_start);
            self.puts.truncate(len);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.puts.is_empty()
    }

    pub fn len(&self) -> usize {
        self.puts.len()
    }

    /// Total key and value bytes.
    pub fn bytes_len(&self) -> usize {
        self.bytes.len()
    }

    /// Adds a put whose value is written by `value` straight into the shared buffer; returns
    /// the index of the put.
    pub fn put_with(&mut self, cf: Cf, key: &[u8], value: impl FnOnce(&mut Vec<u8>)) -> usize {
        let key_start = self.bytes.len();
        self.bytes.extend_from_slice(key);
        let value_start = self.bytes.len();
        value(&mut self.bytes);
        let value_end = self.bytes.len();
        self.puts.push(Put {
            cf,
            key_start,
            value_start,
            value_end,
        });
        self.puts.len() - 1
    }

    pub fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) -> usize {
        self.put_with(cf, key, |out| out.extend_from_slice(value))
    }

    /// The put number `index`: its column family, key and value.
    pub fn get(&self, index: usize) -> (Cf, &[u8], &[u8]) {
        let p = self.puts[index];
        (
            p.cf,
            &self.bytes[p.key_start..p.value_start],
            &self.bytes[p.value_start..p.value_end],
        )
    }

    pub fn iter(&self) -> impl Iterator<Item = (Cf, &[u8], &[u8])> {
        (0..self.puts.len()).map(|i| self.get(i))
    }
}

/// Refuses what [`Storage::ingest`] does not accept: a put into another family, or keys not
/// strictly ascending (RocksDB's table writer refuses those too).
pub(crate) fn check_sorted(cf: Cf, sorted: &WriteSet) -> Result<(), StorageError> {
    let mut previous: Option<&[u8]> = None;
    for (put_cf, key, _) in sorted.iter() {
        if put_cf != cf {
            return Err(StorageError::Io(format!(
                "an ingestion into {} holds a put into {}",
                cf.name(),
                put_cf.name()
            )));
        }
        if previous.is_some_and(|p| p >= key) {
            return Err(StorageError::Io(format!(
                "an ingestion into {} is not in strictly ascending key order",
                cf.name()
            )));
        }
        previous = Some(key);
    }
    Ok(())
}

/// A key and its value, owned.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Continue or stop a scan.
pub type Visit<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> bool;

/// What a store keeps in memory for a family's open table files ([`Storage::table_readers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableReaders {
    /// Bytes held outside any cache (RocksDB: the files' bloom filters and indexes,
    /// `rocksdb.estimate-table-readers-mem`).
    pub bytes: u64,
    /// The family's keys, estimated (RocksDB: `rocksdb.estimate-num-keys`, memtables included).
    pub keys: u64,
}

/// What the engine needs from a store. Implementations are shared between the writer and
/// readers, so every method takes `&self`.
pub trait Storage: Send + Sync {
    /// Applies every put of `set` atomically. With `sync`, returns only once the puts are
    /// durable; an error means they may or may not be, and the caller must stop writing.
    fn write(&self, set: &WriteSet, sync: bool) -> Result<(), StorageError>;
    /// Adds the puts of `sorted` (every one in `cf`, keys strictly ascending) to `cf` at once
    /// and durably, outside the write-ahead log: on return a crash keeps all of them; on an
    /// error none is visible and the caller must stop writing. RocksDB writes them as one
    /// sorted table file and ingests it (no memtable inserts, no write-ahead-log bytes).
    fn ingest(&self, cf: Cf, sorted: &WriteSet) -> Result<(), StorageError>;
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Point lookups of many keys at once, answers in the order of `keys`. Keys given in
    /// ascending order are looked up faster by RocksDB (no sort of its own).
    fn multi_get(&self, cf: Cf, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StorageError>;
    /// Visits the keys `>= start` in order while `visit` returns true.
    fn scan(&self, cf: Cf, start: &[u8], visit: Visit<'_>) -> Result<(), StorageError>;
    /// The greatest key and its value.
    fn last(&self, cf: Cf) -> Result<Option<Entry>, StorageError>;
    /// The greatest key `<= key` and its value.
    fn at_or_before(&self, cf: Cf, key: &[u8]) -> Result<Option<Entry>, StorageError>;
    /// Writes a consistent, openable copy of the store into `dir` (which must not exist).
    fn checkpoint(&self, dir: &Path) -> Result<(), StorageError>;
    /// How many sorted runs a point lookup in `cf` may have to look at (RocksDB: one per
    /// level-0 table file, one per other non-empty level); `None` where the store has no such
    /// structure. What `keel_store_sorted_runs` reports: a family whose runs only grow would make
    /// every command-id lookup slower.
    fn sorted_runs(&self, _cf: Cf) -> Result<Option<u64>, StorageError> {
        Ok(None)
    }
    /// The memory the store holds for `cf`'s open table files, outside any cache, and how many
    /// keys the family holds; `None` where the store has no such structure. What
    /// `keel_store_table_readers_bytes` reports: the part of the process's memory that grows
    /// with the stored command ids (docs/FORMAT.md, "Command ids: memory and retention").
    fn table_readers(&self, _cf: Cf) -> Result<Option<TableReaders>, StorageError> {
        Ok(None)
    }
}
