//! Format 1, read only by `keel upgrade` ([`crate::upgrade_v1`]): its batch headers, its
//! hash and its event values (docs/FORMAT.md keeps format 1's description for this).

use crate::format::{FormatError, decode_seq_key};

/// Domain separation of format 1's batch hash.
const HASH_CONTEXT: &[u8] = b"keel.batch.v1";

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
pub struct V1Header {
    pub seq: u64,
    pub first_event: u64,
    pub count: u32,
    pub committed_at_us: u64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

const HEADER_LAYOUT_VERSION: u8 = 1;

impl V1Header {
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
/// length and stored value, in order. Feed events with [`V1Hasher::event`].
pub struct V1Hasher(blake3::Hasher);

impl V1Hasher {
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
