//! Key and value encodings of the engine's own records (docs/FORMAT.md is the reference).
//!
//! Integers in keys are big-endian so that byte order is numeric order and sequence scans are
//! ordered. Fixed-layout values are big-endian too, for one rule to remember.

use crate::record::BatchHeader;
use std::fmt;

/// The on-disk format this engine writes and accepts. Bump on any incompatible change.
pub const FORMAT_VERSION: u32 = 2;

/// Meta keys.
pub const META_FORMAT_VERSION: &[u8] = b"format_version";
pub const META_TIP: &[u8] = b"tip";
/// The checkpoint mark: the batch, last event and hash the `state` and `command_ids`
/// families stand at ([`CheckpointMark`]).
pub const META_CHECKPOINT: &[u8] = b"checkpoint";
/// The batch whose record carries the text of the last rule set recorded (u64 BE): what a
/// restart under other rules reads to learn which domains the log was last decided under.
pub const META_RULES_RECORD: &[u8] = b"rules_record";

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

/// Where the checkpoint (`state` and `command_ids`) stands: the state after batch `batch`,
/// whose last event is `last_event` and whose hash is `hash`. All zero: no checkpoint yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointMark {
    pub batch: u64,
    pub last_event: u64,
    pub hash: [u8; 32],
}

impl CheckpointMark {
    pub const ENCODED_LEN: usize = 8 + 8 + 32;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[0..8].copy_from_slice(&self.batch.to_be_bytes());
        out[8..16].copy_from_slice(&self.last_event.to_be_bytes());
        out[16..48].copy_from_slice(&self.hash);
        out
    }

    pub fn decode(value: &[u8]) -> Result<Self, FormatError> {
        if value.len() != Self::ENCODED_LEN {
            return Err(FormatError(format!(
                "checkpoint mark of {} bytes, expected {}",
                value.len(),
                Self::ENCODED_LEN
            )));
        }
        let mut batch = [0u8; 8];
        batch.copy_from_slice(&value[0..8]);
        let mut last_event = [0u8; 8];
        last_event.copy_from_slice(&value[8..16]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&value[16..48]);
        Ok(Self {
            batch: u64::from_be_bytes(batch),
            last_event: u64::from_be_bytes(last_event),
            hash,
        })
    }

    /// The mark of a checkpoint taken at `tip`.
    pub fn at(tip: &ChainTip) -> Self {
        Self {
            batch: tip.last_batch,
            last_event: tip.last_event,
            hash: tip.last_hash,
        }
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
