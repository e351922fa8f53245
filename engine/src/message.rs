//! The batch message: one committed batch in one self-checking byte string. It is what the
//! publisher sends to JetStream and what `GET /v1/batches/{seq}` answers, so a projector can
//! take a batch from either and verify it against the hash chain without trusting the
//! transport. docs/PROJECTION.md is the reference.
//!
//! Layout: the magic `KEEL`, the message layout version (1 byte, = 2), then the batch's log
//! record exactly as stored ([`crate::record`], docs/FORMAT.md): header, events, rejections,
//! submitters, rules text and the BLAKE3 hash over all of it.

use crate::StoredEvent;
use crate::format::FormatError;
use crate::record::{BatchHeader, RECORD_FIXED_LEN, RecordView};

/// The first bytes of every batch message.
pub const BATCH_MESSAGE_MAGIC: &[u8; 4] = b"KEEL";
/// The layout version this build writes and reads.
pub const BATCH_MESSAGE_VERSION: u8 = 2;
/// Bytes before the record.
pub const BATCH_MESSAGE_PREFIX_LEN: usize = 4 + 1;

/// A decoded, hash-verified batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchMessage {
    pub header: BatchHeader,
    /// Its events, in sequence order.
    pub events: Vec<StoredEvent>,
    /// The payloads of the rejections the batch keeps (opaque to the engine).
    pub rejections: Vec<Vec<u8>>,
    /// The key ids of the clients that submitted the batch's requests.
    pub submitters: Vec<String>,
    /// The rules text, when this is the first batch under its rule set; empty otherwise.
    pub rules_text: String,
}

/// The batch message of a stored log record.
pub fn encode_batch_message(record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(BATCH_MESSAGE_PREFIX_LEN + record.len());
    out.extend_from_slice(BATCH_MESSAGE_MAGIC);
    out.push(BATCH_MESSAGE_VERSION);
    out.extend_from_slice(record);
    out
}

/// Decodes a batch message and verifies it: magic, layout, every length of the record and
/// the BLAKE3 hash over all of it. A message truncated, padded or altered anywhere is refused.
pub fn decode_batch_message(bytes: &[u8]) -> Result<BatchMessage, FormatError> {
    if bytes.len() < BATCH_MESSAGE_PREFIX_LEN + RECORD_FIXED_LEN {
        return Err(FormatError(format!(
            "batch message of {} bytes, shorter than its header",
            bytes.len()
        )));
    }
    if &bytes[..4] != BATCH_MESSAGE_MAGIC {
        return Err(FormatError("not a Keel batch message (bad magic)".into()));
    }
    if bytes[4] != BATCH_MESSAGE_VERSION {
        return Err(FormatError(format!(
            "batch message layout {}, this build reads {BATCH_MESSAGE_VERSION}",
            bytes[4]
        )));
    }
    let record = &bytes[BATCH_MESSAGE_PREFIX_LEN..];
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&record[1..9]);
    let view = RecordView::decode(u64::from_be_bytes(seq), record)
        .map_err(|e| FormatError(format!("batch message: {e}")))?;
    Ok(BatchMessage {
        header: view.header,
        events: view
            .events()
            .map(|(seq, payload)| StoredEvent {
                seq,
                batch: view.header.seq,
                committed_at_us: view.header.committed_at_us,
                payload: payload.to_vec(),
            })
            .collect(),
        rejections: view.rejections().map(<[u8]>::to_vec).collect(),
        submitters: view.submitters().into_iter().map(str::to_owned).collect(),
        rules_text: view.rules_text().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Engine, MemoryStorage, PendingBatch, RuleSet};
    use proptest::prelude::*;
    use std::sync::Arc;

    /// The stored record of one committed batch of `payloads` (and one rejection).
    fn committed(payloads: &[Vec<u8>]) -> Vec<u8> {
        let mut engine = Engine::open(Arc::new(MemoryStorage::default())).expect("open");
        engine.set_rules(RuleSet::new("rules v1"));
        let mut pending = PendingBatch::default();
        engine.begin(&mut pending, 5);
        for p in payloads {
            pending.push_event(|out| out.extend_from_slice(p));
        }
        pending.push_rejection(|out| out.extend_from_slice(b"no"));
        pending.add_submitter("key-1");
        engine.commit(&mut pending).expect("commit");
        engine.reader().record(1).expect("read").expect("stored")
    }

    proptest! {
        #[test]
        fn round_trips(payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let record = committed(&payloads);
            let message = decode_batch_message(&encode_batch_message(&record)).expect("decodes");
            prop_assert_eq!(message.header.seq, 1);
            prop_assert_eq!(message.events.iter().map(|e| e.payload.clone()).collect::<Vec<_>>(), payloads);
            prop_assert_eq!(message.rejections, vec![b"no".to_vec()]);
            prop_assert_eq!(message.submitters, vec!["key-1".to_string()]);
            prop_assert_eq!(message.rules_text, "rules v1");
        }

        #[test]
        fn refuses_every_truncation_and_any_flipped_bit(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..8),
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut bytes = encode_batch_message(&committed(&payloads));
            let at = at.index(bytes.len());
            prop_assert!(decode_batch_message(&bytes[..at]).is_err(), "cut to {} of {} bytes", at, bytes.len());
            bytes[at] ^= 1 << bit;
            prop_assert!(decode_batch_message(&bytes).is_err(), "byte {} altered", at);
        }
    }

    #[test]
    fn refuses_trailing_bytes() {
        let mut bytes = encode_batch_message(&committed(&[vec![1, 2, 3]]));
        bytes.push(0);
        assert!(decode_batch_message(&bytes).is_err());
    }

    #[test]
    fn layout_is_pinned() {
        let bytes = encode_batch_message(&committed(&[vec![0xAA]]));
        assert_eq!(&bytes[..5], b"KEEL\x02");
        assert_eq!(bytes[5], 2, "the record's own layout");
        assert_eq!(&bytes[6..14], &1u64.to_be_bytes());
    }
}
