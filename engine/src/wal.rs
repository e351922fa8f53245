//! Keel's own check of RocksDB's write-ahead log, run before RocksDB replays it.
//!
//! RocksDB's replay (in `TolerateCorruptedTailRecords` mode, which [`crate::RocksStorage`]
//! sets) refuses a bad record checksum anywhere, but it has two blind spots this check closes,
//! and its error does not say where the damage is:
//!
//! - A record whose length field was damaged so that it reaches past the end of the file looks
//!   exactly like a record torn by a crash mid-write, and RocksDB drops it and everything after
//!   it in that block silently. A torn record has an incomplete payload, so no prefix of what
//!   is there matches its checksum; a damaged length field leaves a complete payload behind it
//!   whose checksum still matches. This check tries every prefix and reports the latter.
//! - A record header that reads as all zeros (the pre-allocation filler RocksDB skips) in the
//!   middle of data makes RocksDB skip the rest of that 32 KiB block silently.
//!
//! The format (RocksDB `db/log_format.h`, stable since LevelDB): the file is a sequence of
//! 32 KiB blocks; each physical record is `crc32c masked (4, little endian) | length (2, LE) |
//! type (1) | payload`, the checksum covering type and payload; a logical record larger than
//! what is left of a block is split into FIRST, MIDDLE.., LAST fragments; fewer than 7 bytes
//! left at the end of a block are a zero trailer. Keel never recycles log files, so the
//! recyclable record types (11-byte header) are damage here.
//!
//! What a torn tail may legitimately be: with one synced write per batch, the only record a
//! crash can leave incomplete is the one being written, which was not acknowledged. So the
//! check accepts, at the very end of a file only: a partial header, a record whose payload is
//! cut short (no prefix matches its checksum), or a fragmented record whose later fragments
//! are missing. Everything else is [`StorageError`] of kind corruption naming file and offset.

use crate::storage::StorageError;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

const BLOCK_BYTES: usize = 32 * 1024;
const HEADER_BYTES: usize = 7;

const ZERO_TYPE: u8 = 0;
const FULL_TYPE: u8 = 1;
const FIRST_TYPE: u8 = 2;
const MIDDLE_TYPE: u8 = 3;
const LAST_TYPE: u8 = 4;
const RECYCLABLE_TYPES: std::ops::RangeInclusive<u8> = 5..=8;
const RECYCLABLE_UDT_TYPE: u8 = 11;
const RECYCLABLE_PREDECESSOR_TYPE: u8 = 131;

/// What the check found in one log file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalFileCheck {
    pub path: PathBuf,
    pub bytes: u64,
    /// Whole physical records with a matching checksum.
    pub records: u64,
    /// Where a torn final record begins, if the file ends inside one.
    pub torn_tail_at: Option<u64>,
}

/// The write-ahead log files of the store in `dir` (`NNNNNN.log`), oldest first.
pub fn wal_files(dir: &Path) -> Result<Vec<PathBuf>, StorageError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // A store being created has no directory yet, hence no log.
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StorageError::Io(format!("listing {}: {e}", dir.display()))),
    };
    let mut numbered = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| StorageError::Io(format!("listing {}: {e}", dir.display())))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
            continue;
        };
        if let Ok(number) = stem.parse::<u64>() {
            numbered.push((number, entry.path()));
        }
    }
    numbered.sort();
    Ok(numbered.into_iter().map(|(_, path)| path).collect())
}

/// Checks every write-ahead log file of the store in `dir`. A file that disappears while this
/// runs (a live primary deleting an obsolete log under a secondary) is skipped.
pub fn check_dir(dir: &Path) -> Result<Vec<WalFileCheck>, StorageError> {
    let mut checked = Vec::new();
    for path in wal_files(dir)? {
        match File::open(&path) {
            Ok(file) => checked.push(check_file(&path, file)?),
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(StorageError::Io(format!("opening {}: {e}", path.display()))),
        }
    }
    Ok(checked)
}

/// Checks one log file read from `file`.
pub fn check_file(path: &Path, mut file: File) -> Result<WalFileCheck, StorageError> {
    let mut scan = Scan {
        path,
        check: WalFileCheck {
            path: path.to_path_buf(),
            bytes: 0,
            records: 0,
            torn_tail_at: None,
        },
        fragment_at: None,
    };
    let mut block = vec![0u8; BLOCK_BYTES];
    let mut block_start = 0u64;
    loop {
        let filled = read_block(&mut file, &mut block)
            .map_err(|e| StorageError::Io(format!("reading {}: {e}", path.display())))?;
        scan.check.bytes += filled as u64;
        let last = filled < BLOCK_BYTES;
        match scan.block(&block[..filled], block_start, last)? {
            BlockEnd::Next if !last => block_start += BLOCK_BYTES as u64,
            BlockEnd::Next => break,
            BlockEnd::Zeros => {
                scan.expect_zeros_to_end(&mut file)?;
                break;
            }
            BlockEnd::Torn(at) => {
                scan.check.torn_tail_at = Some(at);
                return Ok(scan.check);
            }
        }
    }
    // A fragmented record whose later fragments never made it: torn by the crash too.
    scan.check.torn_tail_at = scan.fragment_at;
    Ok(scan.check)
}

/// Fills `block` from `file`; fewer bytes only at the end of the file.
fn read_block(file: &mut File, block: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < block.len() {
        match file.read(&mut block[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

enum BlockEnd {
    Next,
    /// An all-zero header: what follows must be zeros to the end of the file.
    Zeros,
    /// The file ends inside the record that starts at this offset.
    Torn(u64),
}

struct Scan<'a> {
    path: &'a Path,
    check: WalFileCheck,
    /// Where the fragmented record being read began, if one is open.
    fragment_at: Option<u64>,
}

impl Scan<'_> {
    fn block(&mut self, block: &[u8], start: u64, last: bool) -> Result<BlockEnd, StorageError> {
        let mut pos = 0;
        while pos < block.len() {
            let at = start + pos as u64;
            let rest = &block[pos..];
            if rest.len() < HEADER_BYTES {
                // A block's zero trailer, or a header cut short by the crash at the very end.
                return Ok(if last {
                    BlockEnd::Torn(at)
                } else {
                    BlockEnd::Next
                });
            }
            let stored = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let length = usize::from(u16::from_le_bytes([rest[4], rest[5]]));
            let kind = rest[6];
            if kind == ZERO_TYPE && length == 0 && stored == 0 {
                if let Some(i) = rest.iter().position(|b| *b != 0) {
                    return Err(self.damage(
                        at + i as u64,
                        "data after an all-zero record header (RocksDB would skip it)".into(),
                    ));
                }
                return Ok(BlockEnd::Zeros);
            }
            if RECYCLABLE_TYPES.contains(&kind)
                || kind == RECYCLABLE_UDT_TYPE
                || kind == RECYCLABLE_PREDECESSOR_TYPE
            {
                return Err(self.damage(
                    at,
                    format!("recyclable record type {kind}, which Keel never writes"),
                ));
            }
            let expected = unmask(stored);
            if HEADER_BYTES + length > rest.len() {
                if !last {
                    return Err(self.damage(
                        at,
                        format!("record length {length} runs past its 32 KiB block"),
                    ));
                }
                return self.past_the_end(rest, at, expected, length);
            }
            let covered = &rest[HEADER_BYTES - 1..HEADER_BYTES + length];
            if crc32c(covered) != expected {
                return Err(self.damage(
                    at,
                    format!("checksum mismatch in a record of {length} bytes"),
                ));
            }
            self.sequence(kind, at)?;
            self.check.records += 1;
            pos += HEADER_BYTES + length;
        }
        Ok(BlockEnd::Next)
    }

    /// A record at `at` whose length reaches past the end of the file: torn by a crash, unless
    /// a shorter payload matches its checksum (a complete record whose length was damaged).
    fn past_the_end(
        &self,
        rest: &[u8],
        at: u64,
        expected: u32,
        length: usize,
    ) -> Result<BlockEnd, StorageError> {
        let mut crc = Crc32c::new();
        crc.update(&rest[HEADER_BYTES - 1..HEADER_BYTES]);
        for (n, byte) in rest[HEADER_BYTES..].iter().enumerate() {
            crc.update(std::slice::from_ref(byte));
            if crc.value() == expected {
                return Err(self.damage(
                    at,
                    format!(
                        "the length field says {length} bytes, past the end of the file, but the \
                         record's checksum matches its first {} bytes: a complete record with a \
                         damaged length, not a torn write",
                        n + 1
                    ),
                ));
            }
        }
        Ok(BlockEnd::Torn(at))
    }

    /// FULL and FIRST start a record, MIDDLE and LAST continue one; anything else is left to
    /// RocksDB (metadata records such as the compression type).
    fn sequence(&mut self, kind: u8, at: u64) -> Result<(), StorageError> {
        match (kind, self.fragment_at) {
            (FULL_TYPE | FIRST_TYPE, Some(open)) => Err(self.damage(
                at,
                format!("a new record begins while the one at offset {open} has no last fragment"),
            )),
            (FULL_TYPE, None) => Ok(()),
            (FIRST_TYPE, None) => {
                self.fragment_at = Some(at);
                Ok(())
            }
            (MIDDLE_TYPE | LAST_TYPE, None) => Err(self.damage(
                at,
                "a continuation fragment without a first fragment".into(),
            )),
            (MIDDLE_TYPE, Some(_)) => Ok(()),
            (LAST_TYPE, Some(_)) => {
                self.fragment_at = None;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// After an all-zero header (pre-allocated space RocksDB skips) only zeros may follow;
    /// data after it would be records RocksDB silently never replays.
    fn expect_zeros_to_end(&mut self, file: &mut File) -> Result<(), StorageError> {
        let mut buffer = vec![0u8; BLOCK_BYTES];
        loop {
            let n = read_block(file, &mut buffer)
                .map_err(|e| StorageError::Io(format!("reading {}: {e}", self.path.display())))?;
            if let Some(i) = buffer[..n].iter().position(|b| *b != 0) {
                return Err(self.damage(
                    self.check.bytes + i as u64,
                    "data after an all-zero record header (RocksDB would skip it)".into(),
                ));
            }
            self.check.bytes += n as u64;
            if n < BLOCK_BYTES {
                return Ok(());
            }
        }
    }

    fn damage(&self, offset: u64, what: String) -> StorageError {
        StorageError::corruption(format!(
            "Corruption: write-ahead log {} is damaged at offset {offset}: {what}",
            self.path.display()
        ))
    }
}

/// RocksDB stores checksums masked (LevelDB's `crc32c::Mask`), so that a checksum of data that
/// itself holds checksums is not trivially related to them.
fn unmask(masked: u32) -> u32 {
    let rot = masked.wrapping_sub(0xa282_ead8);
    rot.rotate_left(15)
}

#[cfg(test)]
fn mask(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli), slicing by 8. Small enough to keep a dependency out.
struct Crc32c(u32);

const POLY: u32 = 0x82f6_3b78;

const TABLES: [[u32; 256]; 8] = {
    let mut tables = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut k = 0;
        while k < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            k += 1;
        }
        tables[0][i] = crc;
        i += 1;
    }
    let mut t = 1;
    while t < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = tables[t - 1][i];
            tables[t][i] = (prev >> 8) ^ tables[0][(prev & 0xff) as usize];
            i += 1;
        }
        t += 1;
    }
    tables
};

impl Crc32c {
    fn new() -> Self {
        Crc32c(!0)
    }

    fn update(&mut self, mut bytes: &[u8]) {
        let mut crc = self.0;
        while bytes.len() >= 8 {
            let lo = crc ^ u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            crc = TABLES[7][(lo & 0xff) as usize]
                ^ TABLES[6][((lo >> 8) & 0xff) as usize]
                ^ TABLES[5][((lo >> 16) & 0xff) as usize]
                ^ TABLES[4][(lo >> 24) as usize]
                ^ TABLES[3][bytes[4] as usize]
                ^ TABLES[2][bytes[5] as usize]
                ^ TABLES[1][bytes[6] as usize]
                ^ TABLES[0][bytes[7] as usize];
            bytes = &bytes[8..];
        }
        for &b in bytes {
            crc = (crc >> 8) ^ TABLES[0][((crc ^ u32::from(b)) & 0xff) as usize];
        }
        self.0 = crc;
    }

    fn value(&self) -> u32 {
        !self.0
    }
}

fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = Crc32c::new();
    crc.update(bytes);
    crc.value()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn crc32c_matches_the_published_check_values() {
        // RFC 3720 B.4 and the common "123456789" check value.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&ascending), 0x46dd_794e);
        // Byte-at-a-time and sliced agree.
        let mut crc = Crc32c::new();
        for b in b"123456789" {
            crc.update(std::slice::from_ref(b));
        }
        assert_eq!(crc.value(), 0xe306_9283);
        assert_eq!(unmask(mask(0xdead_beef)), 0xdead_beef);
    }

    fn record(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut covered = vec![kind];
        covered.extend_from_slice(payload);
        let mut out = mask(crc32c(&covered)).to_le_bytes().to_vec();
        out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        out.push(kind);
        out.extend_from_slice(payload);
        out
    }

    fn check_bytes(bytes: &[u8]) -> Result<WalFileCheck, StorageError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000007.log");
        File::create(&path).unwrap().write_all(bytes).unwrap();
        check_file(&path, File::open(&path).unwrap())
    }

    fn log_of(records: usize) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut starts = Vec::new();
        for n in 0..records {
            starts.push(bytes.len());
            bytes.extend(record(FULL_TYPE, format!("batch number {n:04}").as_bytes()));
        }
        (bytes, starts)
    }

    #[test]
    fn a_clean_log_and_a_torn_tail_pass() {
        let (bytes, starts) = log_of(10);
        let clean = check_bytes(&bytes).unwrap();
        assert_eq!((clean.records, clean.torn_tail_at), (10, None));
        for cut in [starts[9] + 3, starts[9] + HEADER_BYTES, bytes.len() - 1] {
            let torn = check_bytes(&bytes[..cut]).unwrap();
            assert_eq!(torn.records, 9, "cut at {cut}");
            assert_eq!(torn.torn_tail_at, Some(starts[9] as u64), "cut at {cut}");
        }
    }

    #[test]
    fn every_flipped_byte_is_damage_naming_its_record() {
        let (bytes, starts) = log_of(10);
        for offset in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[offset] ^= 0x10;
            let error = check_bytes(&damaged).expect_err(&format!("flip at {offset} passed"));
            assert!(error.is_corruption());
            let record_at = starts.iter().rev().find(|s| **s <= offset).unwrap();
            assert!(
                error
                    .to_string()
                    .contains(&format!("000007.log is damaged at offset {record_at}:")),
                "flip at {offset}: {error}"
            );
        }
    }

    #[test]
    fn a_length_damaged_past_the_end_is_not_taken_for_a_torn_tail() {
        // The bug: RocksDB drops a record whose length runs past the end of the file as torn.
        let (mut bytes, starts) = log_of(10);
        bytes[starts[9] + 5] = 0x40; // length 16 KiB + ..., past the end of the file
        let error = check_bytes(&bytes).unwrap_err();
        assert!(error.to_string().contains("damaged length"), "{error}");
        let (mut bytes, starts) = log_of(10);
        bytes[starts[4] + 4] = 0xff; // a middle record's length grows past the end
        let error = check_bytes(&bytes).unwrap_err();
        assert!(
            error.to_string().contains(&format!("offset {}", starts[4])),
            "{error}"
        );
    }

    #[test]
    fn fragments_zeros_and_recyclable_records() {
        let first = record(FIRST_TYPE, b"first half");
        let last = record(LAST_TYPE, b"second half");
        let mut joined = first.clone();
        joined.extend(&last);
        assert_eq!(check_bytes(&joined).unwrap().torn_tail_at, None);
        // The last fragment never written: torn.
        assert_eq!(check_bytes(&first).unwrap().torn_tail_at, Some(0));
        // A last fragment alone, a full record inside an open one: damage.
        assert!(check_bytes(&last).is_err());
        let mut open = first.clone();
        open.extend(record(FULL_TYPE, b"x"));
        assert!(check_bytes(&open).is_err());
        // Zeros after the data are pre-allocation; data after zeros is skipped data.
        let (mut bytes, _) = log_of(3);
        bytes.extend([0u8; 100]);
        assert!(check_bytes(&bytes).is_ok());
        let mut hidden = bytes.clone();
        hidden.extend(record(FULL_TYPE, b"never replayed"));
        assert!(check_bytes(&hidden).is_err());
        assert!(check_bytes(&record(5, b"recycled")).is_err());
    }

    #[test]
    fn records_cross_blocks_only_as_fragments() {
        // Fill a block up to 3 bytes before its end: those 3 are the zero trailer.
        let payload = vec![7u8; BLOCK_BYTES - HEADER_BYTES - 3];
        let mut bytes = record(FULL_TYPE, &payload);
        bytes.extend([0u8; 3]);
        bytes.extend(record(FULL_TYPE, b"in the second block"));
        let checked = check_bytes(&bytes).unwrap();
        assert_eq!((checked.records, checked.torn_tail_at), (2, None));
        // A length that runs past a full block is damage, not a torn tail.
        let mut damaged = bytes.clone();
        damaged[5] = 0xff;
        assert!(check_bytes(&damaged).is_err());
    }
}
