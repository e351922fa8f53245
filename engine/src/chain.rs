//! Verification of the committed log: batch sequences contiguous from 1, each header's hash
//! recomputed from its fields and events and linked to the previous one, event sequences
//! contiguous with no event outside a batch, and the stored tip at the end of it all.

use crate::format::{self, BatchHasher, BatchHeader, ChainTip, META_TIP, hex, seq_key};
use crate::storage::{Cf, Storage, StorageError};

/// What a verified log holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainSummary {
    pub batches: u64,
    pub events: u64,
    pub tip: ChainTip,
}

/// The first place the log is not what its headers promise.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("batch {batch}: {detail}")]
    Batch { batch: u64, detail: String },
    #[error("event {seq}: {detail}")]
    Event { seq: u64, detail: String },
    #[error("chain tip: {0}")]
    Tip(String),
}

/// How many headers are read per round; events are then scanned once per round.
const HEADERS_PER_ROUND: usize = 1024;

/// Verifies the whole log of `storage`; see the module documentation. Calls `on_event` with
/// (seq, batch, payload) for every event in order, so a caller can replay while verifying.
pub fn verify_chain(
    storage: &dyn Storage,
    on_event: &mut dyn FnMut(u64, u64, &[u8]),
) -> Result<ChainSummary, ChainError> {
    let mut tip = ChainTip::default();
    let mut summary = ChainSummary::default();
    loop {
        let headers = read_headers(storage, tip.last_batch)?;
        let Some(first) = headers.first() else { break };
        check_events(storage, &headers, first.first_event, on_event)?;
        for header in &headers {
            link(&tip, header)?;
            tip = ChainTip::after(header);
            summary.batches += 1;
            summary.events += u64::from(header.count);
        }
    }
    let mut beyond = None;
    storage.scan(Cf::Events, &seq_key(tip.last_event + 1), &mut |key, _| {
        beyond = Some(format::decode_seq_key(key).unwrap_or(u64::MAX));
        false
    })?;
    if let Some(seq) = beyond {
        return Err(ChainError::Event {
            seq,
            detail: "event outside any batch".into(),
        });
    }
    let stored = storage
        .get(Cf::Meta, META_TIP)?
        .map(|v| ChainTip::decode(&v));
    match stored {
        Some(Ok(stored)) if stored == tip => {}
        None if tip == ChainTip::default() => {}
        other => {
            return Err(ChainError::Tip(format!(
                "stored {other:?}, log ends at {tip:?}"
            )));
        }
    }
    summary.tip = tip;
    Ok(summary)
}

/// Up to [`HEADERS_PER_ROUND`] headers after batch `after`, checking batch sequences are
/// contiguous.
fn read_headers(storage: &dyn Storage, after: u64) -> Result<Vec<BatchHeader>, ChainError> {
    let mut headers = Vec::new();
    let mut failure = None;
    storage.scan(Cf::Batches, &seq_key(after + 1), &mut |key, value| {
        let expected = after + 1 + headers.len() as u64;
        let decoded = format::decode_seq_key(key)
            .map_err(|e| e.0)
            .and_then(|seq| {
                if seq == expected {
                    BatchHeader::decode(seq, value)
                        .map_err(|e| e.0)
                        .and_then(sane)
                } else {
                    Err(format!("missing: found batch {seq} next"))
                }
            });
        match decoded {
            Ok(header) => headers.push(header),
            Err(detail) => {
                failure = Some(ChainError::Batch {
                    batch: expected,
                    detail,
                })
            }
        }
        failure.is_none() && headers.len() < HEADERS_PER_ROUND
    })?;
    failure.map_or(Ok(headers), Err)
}

/// Refuses a header whose event range is empty or leaves u64, before anything computes its
/// last event (a damaged header must be a finding, not an arithmetic overflow).
fn sane(header: BatchHeader) -> Result<BatchHeader, String> {
    if header.count == 0 {
        return Err("header with zero events".into());
    }
    let end = header.first_event.checked_add(u64::from(header.count));
    if header.first_event == 0 || end.is_none() {
        let (first, count) = (header.first_event, header.count);
        return Err(format!(
            "header covers {count} events from {first}: outside 1..=u64::MAX"
        ));
    }
    Ok(header)
}

/// Checks that `header` follows `tip` and is non-empty.
fn link(tip: &ChainTip, header: &BatchHeader) -> Result<(), ChainError> {
    let fail = |detail: String| {
        Err(ChainError::Batch {
            batch: header.seq,
            detail,
        })
    };
    if header.count == 0 {
        return fail("header with zero events".into());
    }
    if header.prev_hash != tip.last_hash {
        return fail(format!(
            "previous hash {} does not match batch {}'s hash {}",
            hex(&header.prev_hash),
            tip.last_batch,
            hex(&tip.last_hash)
        ));
    }
    if header.first_event != tip.last_event + 1 {
        return fail(format!(
            "first event {} does not follow event {}",
            header.first_event, tip.last_event
        ));
    }
    if header.committed_at_us < tip.last_committed_at_us {
        return fail("commit time goes backwards".into());
    }
    Ok(())
}

/// Scans the events of `headers` (consecutive batches) once, checking each event's sequence
/// and batch, and recomputing each header's hash.
fn check_events(
    storage: &dyn Storage,
    headers: &[BatchHeader],
    first_event: u64,
    on_event: &mut dyn FnMut(u64, u64, &[u8]),
) -> Result<(), ChainError> {
    let mut index = 0;
    let mut expected_seq = first_event;
    let mut hasher = start_hash(&headers[0]);
    let mut failure = None;
    storage.scan(Cf::Events, &seq_key(first_event), &mut |key, value| {
        let header = &headers[index];
        match check_event(header, expected_seq, key, value) {
            Ok(payload) => on_event(expected_seq, header.seq, payload),
            Err(e) => {
                failure = Some(e);
                return false;
            }
        }
        hasher.event(expected_seq, value);
        if expected_seq == header.last_event() {
            let hash = hasher.finish();
            if hash != header.hash {
                failure = Some(ChainError::Batch {
                    batch: header.seq,
                    detail: format!("hash {} recomputes to {}", hex(&header.hash), hex(&hash)),
                });
                return false;
            }
            index += 1;
            match headers.get(index) {
                Some(next) => hasher = start_hash(next),
                None => return false,
            }
        }
        expected_seq += 1;
        true
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    if index < headers.len() {
        return Err(ChainError::Event {
            seq: expected_seq,
            detail: format!(
                "missing (batch {} ends at {})",
                headers[index].seq,
                headers[index].last_event()
            ),
        });
    }
    Ok(())
}

fn start_hash(header: &BatchHeader) -> BatchHasher {
    BatchHasher::new(
        header.seq,
        header.first_event,
        header.count,
        header.committed_at_us,
        &header.prev_hash,
    )
}

fn check_event<'v>(
    header: &BatchHeader,
    expected_seq: u64,
    key: &[u8],
    value: &'v [u8],
) -> Result<&'v [u8], ChainError> {
    let seq = format::decode_seq_key(key).map_err(|e| ChainError::Event {
        seq: expected_seq,
        detail: e.0,
    })?;
    if seq != expected_seq {
        return Err(ChainError::Event {
            seq: expected_seq,
            detail: format!("missing: found event {seq} next"),
        });
    }
    let (batch, payload) =
        format::split_event_value(value).map_err(|e| ChainError::Event { seq, detail: e.0 })?;
    if batch != header.seq {
        return Err(ChainError::Event {
            seq,
            detail: format!(
                "stored as part of batch {batch}, but batch {} covers it",
                header.seq
            ),
        });
    }
    Ok(payload)
}
