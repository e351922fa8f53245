//! The outbox: what publication needs from the store. The publication cursor (the last batch
//! JetStream acknowledged) lives in `meta/publish_cursor`, and committed batches are read back
//! as self-checking batch messages ([`crate::message`]).
//!
//! The cursor is written WITHOUT fsync on purpose: losing its last updates in a power cut only
//! makes the publisher send a few batches again, which JetStream drops by `Nats-Msg-Id` inside
//! its duplicate window and the projector skips by batch sequence after it. An fsync per ack
//! would compete with the writer's fsync for the disk and buy nothing.

use crate::message::encode_batch_message;
use crate::record::RecordView;
use crate::{Cf, EngineError, Reader, WriteSet};

/// The meta key of the publication cursor: the last published batch, u64 big-endian.
pub const META_PUBLISH_CURSOR: &[u8] = b"publish_cursor";

impl Reader {
    /// The last batch acknowledged by JetStream (0 when nothing was published yet).
    pub fn publish_cursor(&self) -> Result<u64, EngineError> {
        match self.healthy()?.get(Cf::Meta, META_PUBLISH_CURSOR)? {
            None => Ok(0),
            Some(value) => {
                let bytes: [u8; 8] = value.as_slice().try_into().map_err(|_| {
                    EngineError::Corrupt(format!(
                        "publish cursor of {} bytes, expected 8",
                        value.len()
                    ))
                })?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// Records that every batch up to `seq` was acknowledged by JetStream. Not synced (see the
    /// module comment); refused once the engine is poisoned, like every other access.
    pub fn set_publish_cursor(&self, seq: u64) -> Result<(), EngineError> {
        let mut set = WriteSet::default();
        set.put(Cf::Meta, META_PUBLISH_CURSOR, &seq.to_be_bytes());
        Ok(self.healthy()?.write(&set, false)?)
    }

    /// Committed batch `seq` as a batch message, or `None` if no such batch is committed.
    ///
    /// Verifies the stored record (its hash over every byte) before encoding, so that a
    /// damaged store is refused here rather than published (and refused by every projector).
    pub fn batch_message(&self, seq: u64) -> Result<Option<Vec<u8>>, EngineError> {
        let Some(record) = self.record(seq)? else {
            return Ok(None);
        };
        RecordView::decode(seq, &record)?;
        Ok(Some(encode_batch_message(&record)))
    }
}

#[cfg(test)]
mod tests {
    use crate::message::decode_batch_message;
    use crate::{Engine, MemoryStorage, PendingBatch};
    use std::sync::Arc;

    fn engine_with_batches(batches: usize) -> Engine {
        let mut engine = Engine::open(Arc::new(MemoryStorage::default())).expect("open");
        let mut pending = PendingBatch::default();
        for b in 0..batches {
            engine.begin(&mut pending, 1_000 + b as u64);
            for e in 0..=b {
                pending
                    .push_event(|out| out.extend_from_slice(format!("event {b}.{e}").as_bytes()));
            }
            engine.commit(&mut pending).expect("commit");
        }
        engine
    }

    #[test]
    fn cursor_starts_at_zero_and_persists() {
        let engine = engine_with_batches(0);
        let reader = engine.reader();
        assert_eq!(reader.publish_cursor().expect("read"), 0);
        reader.set_publish_cursor(41).expect("write");
        assert_eq!(reader.publish_cursor().expect("read"), 41);
    }

    #[test]
    fn batch_messages_decode_to_the_stored_batch() {
        let engine = engine_with_batches(3);
        let reader = engine.reader();
        for seq in 1..=3 {
            let bytes = reader.batch_message(seq).expect("read").expect("committed");
            let message = decode_batch_message(&bytes).expect("verifies");
            assert_eq!(Some(message.header), reader.batch(seq).expect("header"));
            let stored = reader
                .events(
                    message.header.first_event - 1,
                    message.header.count as usize,
                )
                .expect("events");
            assert_eq!(message.events, stored);
            assert_eq!(stored.len(), seq as usize);
        }
        assert_eq!(reader.batch_message(4).expect("read"), None);
    }
}
