//! Verification of the committed log: batch sequences contiguous from 1, every record's hash
//! recomputed over all of its bytes and linked to the previous record, event sequences
//! contiguous, commit times never decreasing, the rules text present exactly where a rule set
//! begins, the event index equal to what the log implies, and the stored tip at the end.

use crate::format::{self, ChainTip, META_TIP, hex, seq_key};
use crate::record::{BatchHeader, RecordView, rules_hash};
use crate::storage::{Cf, Storage, StorageError};

/// What a verified log holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainSummary {
    pub batches: u64,
    pub events: u64,
    /// Rejections the log keeps (commands rejected with an id).
    pub rejections: u64,
    /// How many distinct rule sets the log's batches were decided under (a rule set used,
    /// replaced and used again counts twice).
    pub rule_sets: u64,
    pub tip: ChainTip,
}

/// The first place the log is not what its records promise.
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

/// What a caller sees of the log while it is verified, record by record, in order. Called
/// only for records that verified and linked.
pub trait LogVisitor {
    /// A record, before its events and rejections.
    fn record(&mut self, _record: &RecordView<'_>) {}
    /// One event: its sequence, its batch and its payload.
    fn event(&mut self, seq: u64, batch: u64, payload: &[u8]);
    /// One rejection the batch keeps: its batch and its payload.
    fn rejection(&mut self, _batch: u64, _payload: &[u8]) {}
}

impl<F: FnMut(u64, u64, &[u8])> LogVisitor for F {
    fn event(&mut self, seq: u64, batch: u64, payload: &[u8]) {
        self(seq, batch, payload)
    }
}

/// Verifies the whole log of `storage`; see the module documentation. Calls `on_event` with
/// (seq, batch, payload) for every event in order, so a caller can replay while verifying.
pub fn verify_chain(
    storage: &dyn Storage,
    on_event: &mut dyn FnMut(u64, u64, &[u8]),
) -> Result<ChainSummary, ChainError> {
    verify_log(storage, &mut |seq, batch, payload: &[u8]| {
        on_event(seq, batch, payload)
    })
}

/// [`verify_chain`] with a visitor that also sees every record and every rejection.
pub fn verify_log(
    storage: &dyn Storage,
    visitor: &mut dyn LogVisitor,
) -> Result<ChainSummary, ChainError> {
    let mut tip = ChainTip::default();
    let mut summary = ChainSummary::default();
    let mut rule_set: Option<[u8; 32]> = None;
    // (first event, batch) of every batch with events: what the event index must hold.
    let mut index = Vec::new();
    let mut failure = None;
    storage.scan(Cf::Log, &seq_key(1), &mut |key, value| {
        let expected = tip.last_batch + 1;
        let checked = format::decode_seq_key(key)
            .map_err(|e| e.0)
            .and_then(|seq| {
                if seq == expected {
                    // The error names the batch already; ChainError::Batch names it too.
                    let prefix = format!("batch {seq}: ");
                    RecordView::decode(seq, value)
                        .map_err(|e| e.0.strip_prefix(&prefix).unwrap_or(&e.0).to_owned())
                } else {
                    Err(format!("missing: found batch {seq} next"))
                }
            })
            .and_then(|view| link(&tip, &view.header).map(|()| view))
            .and_then(|view| rules(rule_set, &view).map(|()| view));
        let view = match checked {
            Ok(view) => view,
            Err(detail) => {
                failure = Some(ChainError::Batch {
                    batch: expected,
                    detail,
                });
                return false;
            }
        };
        let header = view.header;
        visitor.record(&view);
        for (seq, payload) in view.events() {
            visitor.event(seq, header.seq, payload);
        }
        for payload in view.rejections() {
            visitor.rejection(header.seq, payload);
        }
        if rule_set != Some(header.rule_set) {
            summary.rule_sets += 1;
            rule_set = Some(header.rule_set);
        }
        if header.count > 0 {
            index.push((header.first_event, header.seq));
        }
        tip = ChainTip::after(&header);
        summary.batches += 1;
        summary.events += u64::from(header.count);
        summary.rejections += u64::from(header.rejections);
        true
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    check_index(storage, &index)?;
    let stored = storage
        .get(Cf::Meta, META_TIP)?
        .map(|v| ChainTip::decode(&v));
    match stored {
        Some(Ok(stored)) if stored == tip => {}
        None if tip == ChainTip::default() => {}
        Some(Ok(stored)) => {
            return Err(ChainError::Tip(format!(
                "stored {stored}, the log ends at {tip}"
            )));
        }
        other => {
            return Err(ChainError::Tip(format!(
                "stored {other:?}, the log ends at {tip}"
            )));
        }
    }
    summary.tip = tip;
    Ok(summary)
}

/// Checks that `header` follows `tip` (also what [`crate::Reader::scan_log`] checks between
/// the records it reads).
pub(crate) fn link(tip: &ChainTip, header: &BatchHeader) -> Result<(), String> {
    if header.prev_hash != tip.last_hash {
        return Err(format!(
            "previous hash {} but batch {} has hash {}",
            hex(&header.prev_hash),
            tip.last_batch,
            hex(&tip.last_hash)
        ));
    }
    if header.first_event != tip.last_event + 1 {
        return Err(format!(
            "starts at event {} but the previous batch ended at event {}",
            header.first_event, tip.last_event
        ));
    }
    if header.committed_at_us < tip.last_committed_at_us {
        return Err("commit time goes backwards".into());
    }
    if header.count == 0 && header.rejections == 0 {
        return Err("a record with neither events nor rejections".into());
    }
    Ok(())
}

/// Checks that a record carries its rules text exactly when its rule set differs from the
/// previous record's: every rule set a batch was decided under is in the log.
fn rules(previous: Option<[u8; 32]>, view: &RecordView<'_>) -> Result<(), String> {
    let starts = previous != Some(view.header.rule_set);
    let empty_rules = view.header.rule_set == rules_hash(b"");
    match (starts, view.rules_text().is_empty()) {
        (true, true) if !empty_rules => Err(format!(
            "first batch under rule set {} but carries no rules text",
            hex(&view.header.rule_set)
        )),
        (false, false) => Err("carries a rules text, but its rule set did not change".into()),
        _ => Ok(()),
    }
}

/// Checks that the event index holds exactly `expected`, (first event, batch) in order.
fn check_index(storage: &dyn Storage, expected: &[(u64, u64)]) -> Result<(), ChainError> {
    let mut at = 0;
    let mut failure = None;
    storage.scan(Cf::EventIndex, &[], &mut |key, value| {
        let found = format::decode_seq_key(key).and_then(|first| {
            format::decode_seq_key(value).map(|batch| (first, batch))
        });
        let detail = match (found, expected.get(at)) {
            (Ok(found), Some(&want)) if found == want => {
                at += 1;
                return true;
            }
            (Ok((first, batch)), Some(&(want_first, want_batch))) => format!(
                "the event index has event {first} -> batch {batch} where the log implies event {want_first} -> batch {want_batch}"
            ),
            (Ok((first, batch)), None) => format!(
                "the event index has event {first} -> batch {batch}, past the log's last batch with events"
            ),
            (Err(e), _) => format!("an event index entry does not decode: {e}"),
        };
        let batch = expected.get(at).map_or(0, |&(_, b)| b);
        failure = Some(ChainError::Batch { batch, detail });
        false
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    if let Some(&(first, batch)) = expected.get(at) {
        return Err(ChainError::Batch {
            batch,
            detail: format!("the event index has no entry for its first event {first}"),
        });
    }
    Ok(())
}
