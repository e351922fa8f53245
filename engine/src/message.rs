//! The batch message: one committed batch (its header and its events exactly as stored) in one
//! self-checking byte string. It is what the publisher sends to JetStream and what
//! `GET /v1/batches/{seq}` answers, so a projector can take a batch from either and verify it
//! against the hash chain without trusting the transport. docs/PROJECTION.md is the reference.
//!
//! Layout (integers big-endian, like everything the engine writes):
//!
//! | size | field |
//! |---|---|
//! | 4 | magic `KEEL` |
//! | 1 | message layout version = 1 |
//! | 8 | batch sequence |
//! | 8 | first event sequence |
//! | 4 | event count (at least 1) |
//! | 8 | commit time, µs since the Unix epoch |
//! | 32 | previous batch's hash |
//! | 32 | this batch's hash |
//!
//! then, `count` times: event sequence (8), stored value length (4), stored value (the 8-byte
//! batch prefix and the postcard `LoggedEvent`, exactly the `events` column family value).

use crate::StoredEvent;
use crate::format::{BatchHasher, BatchHeader, FormatError, hex, split_event_value};

/// The first bytes of every batch message.
pub const BATCH_MESSAGE_MAGIC: &[u8; 4] = b"KEEL";
/// The layout version this build writes and reads.
pub const BATCH_MESSAGE_VERSION: u8 = 1;
/// Bytes before the first event.
pub const BATCH_MESSAGE_HEADER_LEN: usize = 4 + 1 + 8 + 8 + 4 + 8 + 32 + 32;
/// Bytes of an event's framing (sequence and value length) before its value.
const EVENT_FRAME_LEN: usize = 8 + 4;
/// The shortest stored event value: the batch prefix.
const EVENT_VALUE_MIN: usize = 8;

/// A decoded, hash-verified batch: its header and its events in sequence order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchMessage {
    pub header: BatchHeader,
    pub events: Vec<StoredEvent>,
}

/// Encodes `header` and its `events` (all of them, in order) as a batch message.
///
/// Panics if `events` do not belong to `header`: the caller read both from one committed
/// store, so a mismatch is a bug, not an input error.
pub fn encode_batch_message(header: &BatchHeader, events: &[StoredEvent]) -> Vec<u8> {
    assert_eq!(
        events.len(),
        header.count as usize,
        "batch {}: event count",
        header.seq
    );
    let values: usize = events
        .iter()
        .map(|e| EVENT_FRAME_LEN + EVENT_VALUE_MIN + e.payload.len())
        .sum();
    let mut out = Vec::with_capacity(BATCH_MESSAGE_HEADER_LEN + values);
    out.extend_from_slice(BATCH_MESSAGE_MAGIC);
    out.push(BATCH_MESSAGE_VERSION);
    out.extend_from_slice(&header.seq.to_be_bytes());
    out.extend_from_slice(&header.first_event.to_be_bytes());
    out.extend_from_slice(&header.count.to_be_bytes());
    out.extend_from_slice(&header.committed_at_us.to_be_bytes());
    out.extend_from_slice(&header.prev_hash);
    out.extend_from_slice(&header.hash);
    for (offset, event) in events.iter().enumerate() {
        assert_eq!(
            event.seq,
            header.first_event + offset as u64,
            "batch {}: event order",
            header.seq
        );
        assert_eq!(
            event.batch, header.seq,
            "event {} is not of batch {}",
            event.seq, header.seq
        );
        let len = u32::try_from(EVENT_VALUE_MIN + event.payload.len())
            .unwrap_or_else(|_| panic!("event {} is larger than 4 GiB", event.seq));
        out.extend_from_slice(&event.seq.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&event.batch.to_be_bytes());
        out.extend_from_slice(&event.payload);
    }
    out
}

/// Decodes a batch message and verifies it: layout, event numbering, every event's batch
/// prefix, and the BLAKE3 hash recomputed over the header fields and the event values. A
/// message that was truncated, padded or altered anywhere is refused.
pub fn decode_batch_message(bytes: &[u8]) -> Result<BatchMessage, FormatError> {
    let mut cursor = Cursor { bytes, at: 0 };
    let header = decode_header(&mut cursor)?;
    // A hostile count cannot make us allocate more than the bytes could possibly hold.
    let room = (bytes.len() - cursor.at) / (EVENT_FRAME_LEN + EVENT_VALUE_MIN);
    let mut events = Vec::with_capacity((header.count as usize).min(room));
    let mut hasher = BatchHasher::new(
        header.seq,
        header.first_event,
        header.count,
        header.committed_at_us,
        &header.prev_hash,
    );
    for offset in 0..u64::from(header.count) {
        let expected_seq = header.first_event + offset;
        let event = decode_event(&mut cursor, &header, expected_seq, &mut hasher)?;
        events.push(event);
    }
    if cursor.at != bytes.len() {
        return Err(FormatError(format!(
            "batch message {}: {} trailing bytes",
            header.seq,
            bytes.len() - cursor.at
        )));
    }
    let computed = hasher.finish();
    if computed != header.hash {
        return Err(FormatError(format!(
            "batch message {}: hash {} does not match its content (computed {})",
            header.seq,
            hex(&header.hash),
            hex(&computed)
        )));
    }
    Ok(BatchMessage { header, events })
}

fn decode_header(cursor: &mut Cursor<'_>) -> Result<BatchHeader, FormatError> {
    if cursor.bytes.len() < BATCH_MESSAGE_HEADER_LEN {
        return Err(FormatError(format!(
            "batch message of {} bytes, shorter than its {BATCH_MESSAGE_HEADER_LEN}-byte header",
            cursor.bytes.len()
        )));
    }
    if cursor.take(4)? != BATCH_MESSAGE_MAGIC {
        return Err(FormatError("not a Keel batch message (bad magic)".into()));
    }
    let version = cursor.take(1)?[0];
    if version != BATCH_MESSAGE_VERSION {
        return Err(FormatError(format!(
            "batch message layout {version}, this build reads {BATCH_MESSAGE_VERSION}"
        )));
    }
    let seq = cursor.u64()?;
    let first_event = cursor.u64()?;
    let count = cursor.u32()?;
    let committed_at_us = cursor.u64()?;
    let prev_hash = cursor.hash()?;
    let hash = cursor.hash()?;
    if seq == 0 || first_event == 0 || count == 0 {
        return Err(FormatError(format!(
            "batch message {seq}: batch, first event and count must be at least 1 \
             (first event {first_event}, count {count})"
        )));
    }
    if first_event.checked_add(u64::from(count)).is_none() {
        return Err(FormatError(format!(
            "batch message {seq}: event range overflows"
        )));
    }
    Ok(BatchHeader {
        seq,
        first_event,
        count,
        committed_at_us,
        prev_hash,
        hash,
    })
}

fn decode_event(
    cursor: &mut Cursor<'_>,
    header: &BatchHeader,
    expected_seq: u64,
    hasher: &mut BatchHasher,
) -> Result<StoredEvent, FormatError> {
    let seq = cursor.u64()?;
    if seq != expected_seq {
        return Err(FormatError(format!(
            "batch message {}: event {seq} where event {expected_seq} belongs",
            header.seq
        )));
    }
    let len = cursor.u32()? as usize;
    let value = cursor.take(len)?;
    let (batch, payload) = split_event_value(value)?;
    if batch != header.seq {
        return Err(FormatError(format!(
            "batch message {}: event {seq} is stored as part of batch {batch}",
            header.seq
        )));
    }
    hasher.event(seq, value);
    Ok(StoredEvent {
        seq,
        batch,
        payload: payload.to_vec(),
    })
}

/// Reads fixed-size fields front to back, refusing to run past the end.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], FormatError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| {
                FormatError(format!(
                    "batch message truncated: {len} bytes needed at offset {}, {} present",
                    self.at,
                    self.bytes.len()
                ))
            })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn hash(&mut self) -> Result<[u8; 32], FormatError> {
        self.array()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A header and events that hash correctly, as the engine would have committed them.
    fn sealed(
        seq: u64,
        first_event: u64,
        committed_at_us: u64,
        prev: [u8; 32],
        payloads: &[Vec<u8>],
    ) -> (BatchHeader, Vec<StoredEvent>) {
        let count = u32::try_from(payloads.len()).expect("small test batch");
        let mut hasher = BatchHasher::new(seq, first_event, count, committed_at_us, &prev);
        let events: Vec<StoredEvent> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| StoredEvent {
                seq: first_event + i as u64,
                batch: seq,
                payload: p.clone(),
            })
            .collect();
        for e in &events {
            let mut value = seq.to_be_bytes().to_vec();
            value.extend_from_slice(&e.payload);
            hasher.event(e.seq, &value);
        }
        let header = BatchHeader {
            seq,
            first_event,
            count,
            committed_at_us,
            prev_hash: prev,
            hash: hasher.finish(),
        };
        (header, events)
    }

    fn batch_strategy() -> impl Strategy<Value = (BatchHeader, Vec<StoredEvent>)> {
        (
            1u64..1_000_000,
            1u64..1_000_000_000,
            any::<u64>(),
            any::<[u8; 32]>(),
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..16),
        )
            .prop_map(|(seq, first, at, prev, payloads)| sealed(seq, first, at, prev, &payloads))
    }

    proptest! {
        #[test]
        fn round_trips((header, events) in batch_strategy()) {
            let bytes = encode_batch_message(&header, &events);
            let decoded = decode_batch_message(&bytes).expect("a sealed batch decodes");
            prop_assert_eq!(decoded.header, header);
            prop_assert_eq!(decoded.events, events);
        }

        #[test]
        fn refuses_every_truncation((header, events) in batch_strategy(), cut in any::<prop::sample::Index>()) {
            let bytes = encode_batch_message(&header, &events);
            let len = cut.index(bytes.len());
            prop_assert!(decode_batch_message(&bytes[..len]).is_err(), "a message cut to {} of {} bytes decoded", len, bytes.len());
        }

        #[test]
        fn refuses_any_flipped_bit((header, events) in batch_strategy(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = encode_batch_message(&header, &events);
            let at = at.index(bytes.len());
            bytes[at] ^= 1 << bit;
            prop_assert!(decode_batch_message(&bytes).is_err(), "a message with byte {} altered decoded", at);
        }
    }

    #[test]
    fn refuses_trailing_bytes() {
        let (header, events) = sealed(3, 10, 42, [7; 32], &[vec![1, 2, 3]]);
        let mut bytes = encode_batch_message(&header, &events);
        bytes.push(0);
        assert!(decode_batch_message(&bytes).is_err());
    }

    #[test]
    fn layout_is_pinned() {
        let (header, events) = sealed(2, 5, 1_000_000, [0; 32], &[vec![0xAA]]);
        let bytes = encode_batch_message(&header, &events);
        assert_eq!(&bytes[..5], b"KEEL\x01");
        assert_eq!(&bytes[5..13], &2u64.to_be_bytes());
        assert_eq!(&bytes[13..21], &5u64.to_be_bytes());
        assert_eq!(&bytes[21..25], &1u32.to_be_bytes());
        assert_eq!(&bytes[25..33], &1_000_000u64.to_be_bytes());
        assert_eq!(bytes.len(), BATCH_MESSAGE_HEADER_LEN + 8 + 4 + 8 + 1);
        let event = &bytes[BATCH_MESSAGE_HEADER_LEN..];
        assert_eq!(&event[..8], &5u64.to_be_bytes());
        assert_eq!(&event[8..12], &9u32.to_be_bytes());
        assert_eq!(&event[12..20], &2u64.to_be_bytes());
        assert_eq!(event[20], 0xAA);
    }
}
