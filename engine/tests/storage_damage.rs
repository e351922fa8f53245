//! Storage damage is never silent (issue: one flipped byte in the middle of the write-ahead log
//! made RocksDB's default point-in-time recovery drop 3,580 of 6,000 acknowledged deposits and
//! open without a word). A store is written through the engine, closed without a flush (the log
//! holds every batch, as after kill -9), then damaged: a flipped byte in the log or in a table
//! file must make every open fail with a corruption error naming the file and the offset; a
//! log cut inside its final record (the write a crash interrupted, never acknowledged) must
//! open with every earlier batch.
#![allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report

use keel_engine::{
    BatchHeader, Engine, EngineError, PendingBatch, RocksStorage, StorageError, verify_chain,
};
use std::path::{Path, PathBuf};

const BATCHES: u64 = 40;

/// Commits one batch of `events` events of `event_bytes` each; returns its header.
fn commit(engine: &mut Engine, n: u64, events: usize, event_bytes: usize) -> BatchHeader {
    let mut pending = PendingBatch::default();
    engine.begin(&mut pending, 1_000 + n);
    for e in 0..events {
        pending.push_event(|out| {
            out.extend(std::iter::repeat_n((n as u8) ^ (e as u8), event_bytes));
        });
    }
    pending.push_rejection(|out| out.extend_from_slice(format!("command-{n}").as_bytes()));
    engine.commit(&mut pending).unwrap().unwrap()
}

fn newest_wal(dir: &Path) -> PathBuf {
    keel_engine::wal::wal_files(dir).unwrap().pop().unwrap()
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// A store of `BATCHES` committed batches (plus `last`, a final batch of that many events)
/// closed without a flush. Returns the headers and the newest log's size after each commit.
fn written_store(dir: &Path, last: usize) -> (Vec<BatchHeader>, Vec<u64>) {
    let mut engine = Engine::open_rocksdb(dir).unwrap();
    let mut headers = Vec::new();
    let mut wal_sizes = Vec::new();
    for n in 1..=BATCHES {
        let events = if n == BATCHES { last } else { 3 };
        headers.push(commit(&mut engine, n, events, 40));
        wal_sizes.push(size(&newest_wal(dir)));
    }
    drop(engine);
    assert!(
        glob(dir, ".sst").is_empty(),
        "nothing was flushed: every batch is only in the write-ahead log"
    );
    (headers, wal_sizes)
}

fn glob(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    found.sort();
    found
}

/// A copy of the store in `from`, to damage without touching the original.
fn copy_store(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    to
}

fn flip(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x08;
    std::fs::write(path, bytes).unwrap();
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// Where the error must say the damage is.
#[derive(Clone, Copy)]
enum Place {
    /// The file and this offset.
    At(u64),
    /// The file and an offset (the log check names the damaged record's).
    FileAndOffset,
    /// The file (RocksDB names a table file and, for most blocks, an offset: "block checksum
    /// mismatch ... in 000008.sst offset 0 size 1052", "Footer at 1401 checksum mismatch in
    /// 000008.sst", "Bad table magic number ... in 000008.sst").
    File,
}

/// Every way of opening the store refuses it as corrupt, naming `file` (and the offset as
/// `place` says); returns the primary's message.
fn assert_refused(dir: &Path, file: &str, place: Place, what: &str) -> String {
    let error = match Engine::open_rocksdb(dir) {
        Ok(engine) => panic!(
            "{what}: the store opened at batch {} instead of being refused",
            engine.tip().last_batch
        ),
        Err(error) => error,
    };
    assert!(error.is_corruption(), "{what}: not a corruption: {error:?}");
    let message = error.to_string();
    assert!(
        message.contains(file),
        "{what}: {message} does not name {file}"
    );
    match place {
        Place::At(offset) => assert!(
            message.contains(&format!("offset {offset}")),
            "{what}: {message} does not name offset {offset}"
        ),
        Place::FileAndOffset => {
            assert!(
                message.contains("offset"),
                "{what}: {message} names no offset"
            )
        }
        Place::File => {}
    }
    eprintln!("{what}: {message}");
    // The audit's read-only open (a stopped store) refuses it too.
    let read_only = RocksStorage::open_read_only(dir).err();
    let read_only_found = match &read_only {
        Some(e) => e.is_corruption(),
        None => {
            // The read-only open replays the log and reads table metadata; damage inside a
            // data block is found when the audit reads it, which `verify_tables` stands for.
            let storage = RocksStorage::open_read_only(dir).unwrap();
            storage.verify_tables().is_err_and(|e| e.is_corruption())
        }
    };
    assert!(read_only_found, "{what}: a read-only open found nothing");
    message
}

#[test]
fn a_flipped_byte_anywhere_in_the_write_ahead_log_refuses_every_open() {
    let pristine = tempfile::tempdir().unwrap();
    let (headers, wal_sizes) = written_store(pristine.path(), 3);
    let wal = newest_wal(pristine.path());
    let wal_bytes = size(&wal);
    assert_eq!(wal_bytes, *wal_sizes.last().unwrap());
    let middle = wal_sizes[BATCHES as usize / 2 - 1];
    let last = wal_sizes[BATCHES as usize - 2];
    let mut offsets = vec![0, 3, 4, 6, 7, 20];
    // A record in the middle: checksum, length (low, high), type, payload.
    offsets.extend([
        middle,
        middle + 4,
        middle + 5,
        middle + 6,
        middle + 7,
        middle + 60,
    ]);
    // The final record, acknowledged like every other: the same places, and its last byte.
    offsets.extend([
        last,
        last + 4,
        last + 5,
        last + 6,
        last + 7,
        last + 60,
        wal_bytes - 1,
    ]);
    for offset in offsets {
        let damaged = copy_store(pristine.path());
        let wal = newest_wal(damaged.path());
        flip(&wal, offset);
        let record_start = std::iter::once(0)
            .chain(wal_sizes.iter().copied())
            .filter(|start| *start <= offset)
            .max()
            .unwrap();
        let what = format!("flip at offset {offset} of {}", file_name(&wal));
        let message = assert_refused(
            damaged.path(),
            &file_name(&wal),
            Place::FileAndOffset,
            &what,
        );
        assert!(
            message.contains(&format!("offset {record_start}")) || offset < wal_sizes[0],
            "{what}: {message} does not point at the record starting at {record_start}"
        );
    }
    // The undamaged original still opens with every batch.
    let engine = Engine::open_rocksdb(pristine.path()).unwrap();
    assert_eq!(engine.tip().last_hash, headers.last().unwrap().hash);
}

#[test]
fn a_log_cut_inside_its_final_record_opens_with_every_earlier_batch() {
    // A final batch of 400 events of 40 bytes spans two 32 KiB log blocks, so the cut can
    // also fall between its fragments.
    for last_events in [3, 400] {
        let pristine = tempfile::tempdir().unwrap();
        let (headers, wal_sizes) = written_store(pristine.path(), last_events);
        // The final batch stands for the write a crash interrupted: it was never acknowledged.
        let acknowledged = &headers[..BATCHES as usize - 1];
        let start = wal_sizes[BATCHES as usize - 2];
        let end = wal_sizes[BATCHES as usize - 1];
        let length = end - start;
        for cut in [1, 3, 6, 7, 8, length / 3, length / 2, length - 1] {
            let torn = copy_store(pristine.path());
            let wal = newest_wal(torn.path());
            let file = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
            file.set_len(start + cut).unwrap();
            drop(file);
            let what =
                format!("{last_events} events, cut {cut} of {length} bytes into the final record");
            let engine = Engine::open_rocksdb(torn.path())
                .unwrap_or_else(|e| panic!("{what}: refused: {e}"));
            let tip = engine.tip();
            let expected = acknowledged.last().unwrap();
            assert_eq!(
                (tip.last_batch, tip.last_hash),
                (expected.seq, expected.hash),
                "{what}"
            );
            let reader = engine.reader();
            let summary = verify_chain(reader.storage().unwrap(), &mut |_, _, _| {}).unwrap();
            assert_eq!(summary.batches, BATCHES - 1, "{what}");
            for header in acknowledged {
                assert_eq!(reader.batch(header.seq).unwrap().as_ref(), Some(header));
            }
        }
    }
}

#[test]
fn a_damaged_length_in_the_final_record_is_not_taken_for_a_torn_write() {
    // RocksDB alone drops a record whose length runs past the end of the file as torn, and
    // the acknowledged batch in it with it; the log check sees its payload is complete.
    let pristine = tempfile::tempdir().unwrap();
    let (_, wal_sizes) = written_store(pristine.path(), 3);
    let last = wal_sizes[BATCHES as usize - 2];
    let damaged = copy_store(pristine.path());
    let wal = newest_wal(damaged.path());
    let mut bytes = std::fs::read(&wal).unwrap();
    bytes[last as usize + 5] ^= 0x40; // the length's high byte: +16 KiB, past the end
    std::fs::write(&wal, bytes).unwrap();
    let message = assert_refused(
        damaged.path(),
        &file_name(&wal),
        Place::At(last),
        "length flip",
    );
    assert!(message.contains("damaged length"), "{message}");
}

#[test]
fn a_flipped_byte_in_a_table_file_refuses_every_open() {
    let pristine = tempfile::tempdir().unwrap();
    let (headers, _) = written_store(pristine.path(), 3);
    {
        let storage = RocksStorage::open(pristine.path()).unwrap();
        storage.flush().unwrap();
    }
    let tables = glob(pristine.path(), ".sst");
    assert!(!tables.is_empty(), "the flush wrote table files");
    for table in &tables {
        let bytes = size(table);
        for offset in [
            0,
            10,
            bytes / 4,
            bytes / 2,
            bytes * 3 / 4,
            bytes - 60,
            bytes - 20,
            bytes - 1,
        ] {
            let damaged = copy_store(pristine.path());
            let path = damaged.path().join(table.file_name().unwrap());
            flip(&path, offset);
            let what = format!(
                "flip at offset {offset} of {} ({bytes} bytes)",
                file_name(table)
            );
            assert_refused(damaged.path(), &file_name(table), Place::File, &what);
        }
    }
    let engine = Engine::open_rocksdb(pristine.path()).unwrap();
    assert_eq!(engine.tip().last_hash, headers.last().unwrap().hash);
}

#[test]
fn storage_errors_keep_their_kind() {
    // The audit used to tell corruption by `message.starts_with("Corruption")`.
    let damage = StorageError::corruption("a checksum does not match");
    assert!(damage.is_corruption());
    assert!(EngineError::Storage(damage).is_corruption());
    assert!(EngineError::Corrupt("tip disagrees".into()).is_corruption());
    let io = StorageError::Io("Corruption: a message that only looks like one".into());
    assert!(!io.is_corruption(), "the kind is a type, not the text");
    assert!(!EngineError::Poisoned.is_corruption());
}
