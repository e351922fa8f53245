//! Key and value encodings of the engine's own records (docs/FORMAT.md is the reference).
//!
//! Integers in keys are big-endian so that byte order is numeric order and sequence scans are
//! ordered. Fixed-layout values are big-endian too, for one rule to remember.

use std::fmt;

/// The on-disk format this engine writes and accepts. Bump on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

/// Meta keys.
pub const META_FORMAT_VERSION: &[u8] = b"format_version";
pub const META_TIP: &[u8] = b"tip";

/// Domain separation for the batch hash, so a Keel hash is never confused with another.
const HASH_CONTEXT: &[u8] = b"keel.batch.v1";

/// A value that does not have the layout its key space requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError(pub String);

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FormatError {}

pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub fn decode_seq_key(key: &[u8]) -> Result<u64, FormatError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| FormatError(format!("sequence key of {} bytes, expected 8", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Splits an event value into its batch sequence and the domain payload.
pub fn split_event_value(value: &[u8]) -> Result<(u64, &[u8]), FormatError> {
    if value.len() < 8 {
        return Err(FormatError(format!(
            "event value of {} bytes, shorter than 8",
            value.len()
        )));
    }
    let (batch, payload) = value.split_at(8);
    Ok((decode_seq_key(batch)?, payload))
}

/// A committed batch's header: where its events are, when it committed, and its place in the
/// hash chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub seq: u64,
    pub first_event: u64,
    pub count: u32,
    pub committed_at_us: u64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

const HEADER_LAYOUT_VERSION: u8 = 1;

impl BatchHeader {
    /// layout u8, first_event u64, count u32, committed_at_us u64, prev_hash, hash.
    pub const ENCODED_LEN: usize = 1 + 8 + 4 + 8 + 32 + 32;

    /// The last event's sequence (a committed header has at least one event).
    pub fn last_event(&self) -> u64 {
        self.first_event + u64::from(self.count) - 1
    }

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[0] = HEADER_LAYOUT_VERSION;
        out[1..9].copy_from_slice(&self.first_event.to_be_bytes());
        out[9..13].copy_from_slice(&self.count.to_be_bytes());
        out[13..21].copy_from_slice(&self.committed_at_us.to_be_bytes());
        out[21..53].copy_from_slice(&self.prev_hash);
        out[53..85].copy_from_slice(&self.hash);
        out
    }

    /// Decodes the header stored under batch sequence `seq`.
    pub fn decode(seq: u64, value: &[u8]) -> Result<Self, FormatError> {
        if value.len() != Self::ENCODED_LEN || value[0] != HEADER_LAYOUT_VERSION {
            return Err(FormatError(format!(
                "batch {seq}: header of {} bytes with layout {:?}, expected {} bytes with layout {}",
                value.len(),
                value.first(),
                Self::ENCODED_LEN,
                HEADER_LAYOUT_VERSION
            )));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&value[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let mut count = [0u8; 4];
        count.copy_from_slice(&value[9..13]);
        let mut prev_hash = [0u8; 32];
        prev_hash.copy_from_slice(&value[21..53]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&value[53..85]);
        let header = Self {
            seq,
            first_event: u64_at(1),
            count: u32::from_be_bytes(count),
            committed_at_us: u64_at(13),
            prev_hash,
            hash,
        };
        // A committed batch holds at least one event, numbered from 1, and its last event's
        // sequence fits in u64. Checked here so that no reader computes `first_event - 1` or
        // `last_event()` from a header that breaks this (regression: a damaged header with
        // first event 0 made the outbox subtract below zero).
        let valid = header.first_event > 0
            && header.count > 0
            && header
                .first_event
                .checked_add(u64::from(header.count - 1))
                .is_some();
        if !valid {
            return Err(FormatError(format!(
                "batch {seq}: header names {} events from event {}; a batch holds 1 or more events numbered from 1",
                header.count, header.first_event
            )));
        }
        Ok(header)
    }
}

/// Computes a batch hash: BLAKE3 over the header fields and then every event's sequence,
/// length and stored value, in order. Feed events with [`BatchHasher::event`].
pub struct BatchHasher(blake3::Hasher);

impl BatchHasher {
    pub fn new(
        seq: u64,
        first_event: u64,
        count: u32,
        committed_at_us: u64,
        prev: &[u8; 32],
    ) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(HASH_CONTEXT);
        h.update(&seq.to_be_bytes());
        h.update(&first_event.to_be_bytes());
        h.update(&count.to_be_bytes());
        h.update(&committed_at_us.to_be_bytes());
        h.update(prev);
        Self(h)
    }

    /// Adds one event: its sequence and its full stored value (batch prefix and payload).
    pub fn event(&mut self, seq: u64, value: &[u8]) {
        let len = u32::try_from(value.len()).unwrap_or(u32::MAX);
        self.0.update(&seq.to_be_bytes());
        self.0.update(&len.to_be_bytes());
        self.0.update(value);
    }

    pub fn finish(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

/// The end of the committed log: last batch, last event, last hash, last commit time.
/// All zero for an empty store (the genesis hash is 32 zero bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainTip {
    pub last_batch: u64,
    pub last_event: u64,
    pub last_hash: [u8; 32],
    pub last_committed_at_us: u64,
}

impl ChainTip {
    pub const ENCODED_LEN: usize = 8 + 8 + 32 + 8;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[0..8].copy_from_slice(&self.last_batch.to_be_bytes());
        out[8..16].copy_from_slice(&self.last_event.to_be_bytes());
        out[16..48].copy_from_slice(&self.last_hash);
        out[48..56].copy_from_slice(&self.last_committed_at_us.to_be_bytes());
        out
    }

    pub fn decode(value: &[u8]) -> Result<Self, FormatError> {
        if value.len() != Self::ENCODED_LEN {
            return Err(FormatError(format!(
                "chain tip of {} bytes, expected 56",
                value.len()
            )));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&value[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let mut last_hash = [0u8; 32];
        last_hash.copy_from_slice(&value[16..48]);
        Ok(Self {
            last_batch: u64_at(0),
            last_event: u64_at(8),
            last_hash,
            last_committed_at_us: u64_at(48),
        })
    }

    /// The tip after `header` committed.
    pub fn after(header: &BatchHeader) -> Self {
        Self {
            last_batch: header.seq,
            last_event: header.last_event(),
            last_hash: header.hash,
            last_committed_at_us: header.committed_at_us,
        }
    }
}

/// For logs and messages: the hash in hex (the derived `Debug` prints it as a byte array).
impl fmt::Display for ChainTip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "batch {} event {} hash {} committed_at_us {}",
            self.last_batch,
            self.last_event,
            hex(&self.last_hash),
            self.last_committed_at_us
        )
    }
}

/// Lower-case hex of a hash or key, for messages and reports: the workspace's one hex encoder
/// (the audit's reports, the projection's checkpoints and the engine's errors all use it).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

#[cfg(test)]
mod hex_tests {
    use super::hex;

    #[test]
    fn hex_is_two_lower_case_digits_per_byte_high_nibble_first() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff, 0x12]), "000fa0ff12");
        let all: Vec<u8> = (0..=255).collect();
        let expected: String = all.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&all), expected);
    }
}

#[cfg(test)]
mod chain_tip_display {
    use super::ChainTip;

    /// Issue 13: logs showed the tip's hash as `[171, 205, ...]`; an operator compares hex.
    #[test]
    fn the_tip_shows_its_hash_in_hex() {
        let tip = ChainTip {
            last_batch: 7,
            last_event: 70,
            last_hash: [0xab; 32],
            last_committed_at_us: 5,
        };
        assert_eq!(
            tip.to_string(),
            format!(
                "batch 7 event 70 hash {} committed_at_us 5",
                "ab".repeat(32)
            )
        );
    }
}

#[cfg(test)]
mod tests {
    use super::BatchHeader;

    fn header(first_event: u64, count: u32) -> BatchHeader {
        BatchHeader {
            seq: 7,
            first_event,
            count,
            committed_at_us: 1,
            prev_hash: [1; 32],
            hash: [2; 32],
        }
    }

    #[test]
    fn a_header_round_trips() {
        let h = header(10, 3);
        assert_eq!(BatchHeader::decode(7, &h.encode()), Ok(h));
        assert_eq!(h.last_event(), 12);
    }

    /// Regression: a stored header with first event 0 decoded, and the outbox then computed
    /// `first_event - 1` (an overflow panic in the publisher). Count 0 and a range past u64 are
    /// refused the same way.
    #[test]
    fn a_header_with_an_impossible_event_range_is_refused() {
        for (first_event, count) in [(0, 1), (0, 0), (5, 0), (u64::MAX, 2)] {
            let bytes = header(first_event, count).encode();
            let error = BatchHeader::decode(7, &bytes).expect_err("must be refused");
            assert!(error.0.contains("numbered from 1"), "{error:?}");
        }
        assert!(BatchHeader::decode(7, &header(u64::MAX, 1).encode()).is_ok());
    }
}
