//! `keel upgrade`: rewrites a store of format 1 as a new store of format 2, leaving the old
//! store untouched.
//!
//! Format 1 wrote every event, every changed aggregate and every command-id outcome as its own
//! key; format 2 writes one log record per batch and checkpoints state and ids in the
//! background (docs/FORMAT.md). The upgrade reads format 1's batches in order, verifies its hash
//! chain (a damaged or tampered store is refused, not converted), writes each batch as a
//! format-2 record with the same sequence, events and commit time under the rule set the caller
//! names, and finally writes a checkpoint at the last batch: format 1's state and command-id
//! index, copied. Format 1 kept rejected command ids only in its index, so the new log has no
//! rejections for the upgraded batches; the checkpoint keeps their answers.

use crate::format::{ChainTip, CheckpointMark, FORMAT_VERSION, META_FORMAT_VERSION, seq_key};
use crate::storage::{Cf, Storage, WriteSet};
use crate::v1::{V1Hasher, V1Header, split_event_value};
use crate::{Engine, EngineError, PendingBatch, RuleSet};
use std::sync::Arc;

/// What an upgrade did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpgradeSummary {
    pub batches: u64,
    pub events: u64,
    pub aggregates: u64,
    pub command_ids: u64,
    /// The format-1 tip that was verified and converted.
    pub v1_tip: ChainTip,
    /// The tip of the new store.
    pub tip: ChainTip,
}

/// Puts per checkpoint write while copying state and ids.
const COPY_CHUNK: usize = 50_000;

/// Rewrites the format-1 store `old` into the empty format-2 store `new`, under `rules`.
/// `old` is only read. `progress` is called with the batches done so far.
pub fn upgrade_v1(
    old: &dyn Storage,
    new: Arc<dyn Storage>,
    rules: RuleSet,
    progress: &mut dyn FnMut(u64),
) -> Result<UpgradeSummary, EngineError> {
    check_v1(old)?;
    let mut engine = Engine::open(Arc::clone(&new))?;
    if engine.tip() != ChainTip::default() {
        return Err(EngineError::Corrupt(
            "the target of an upgrade must be a new, empty store".into(),
        ));
    }
    engine.set_rules(rules);
    let mut summary = UpgradeSummary::default();
    let mut pending = PendingBatch::default();
    let mut v1_tip = ChainTip::default();
    while let Some(value) = old.get(Cf::V1Batches, &seq_key(v1_tip.last_batch + 1))? {
        let header = V1Header::decode(v1_tip.last_batch + 1, &value)?;
        check_link(&v1_tip, &header)?;
        engine.begin(&mut pending, header.committed_at_us);
        let mut hasher = V1Hasher::new(
            header.seq,
            header.first_event,
            header.count,
            header.committed_at_us,
            &header.prev_hash,
        );
        let mut next = header.first_event;
        let mut failure = None;
        old.scan(
            Cf::V1Events,
            &seq_key(header.first_event),
            &mut |key, value| {
                if next > header.last_event() {
                    return false;
                }
                let checked = crate::format::decode_seq_key(key)
                    .map_err(|e| e.0)
                    .and_then(|seq| {
                        if seq == next {
                            split_event_value(value).map_err(|e| e.0)
                        } else {
                            Err(format!("event {next} is missing"))
                        }
                    });
                match checked {
                    Ok((batch, payload)) if batch == header.seq => {
                        hasher.event(next, value);
                        pending.push_event(|out| out.extend_from_slice(payload));
                        next += 1;
                        true
                    }
                    Ok((batch, _)) => {
                        failure = Some(format!("event {next} is stored as part of batch {batch}"));
                        false
                    }
                    Err(e) => {
                        failure = Some(e);
                        false
                    }
                }
            },
        )?;
        if let Some(detail) = failure.or_else(|| {
            (next != header.last_event() + 1).then(|| format!("event {next} is missing"))
        }) {
            return Err(EngineError::Corrupt(format!(
                "format-1 batch {}: {detail}; not upgraded",
                header.seq
            )));
        }
        if hasher.finish() != header.hash {
            return Err(EngineError::Corrupt(format!(
                "format-1 batch {}: its hash does not match its events; not upgraded",
                header.seq
            )));
        }
        let written = engine.write_batch(&mut pending, false)?.ok_or_else(|| {
            EngineError::Corrupt(format!("format-1 batch {} has no events", header.seq))
        })?;
        assert_eq!(
            (written.seq, written.first_event, written.count),
            (header.seq, header.first_event, header.count)
        );
        v1_tip = ChainTip {
            last_batch: header.seq,
            last_event: header.last_event(),
            last_hash: header.hash,
            last_committed_at_us: header.committed_at_us,
        };
        summary.batches += 1;
        summary.events += u64::from(header.count);
        if summary.batches.is_multiple_of(10_000) {
            progress(summary.batches);
        }
    }
    check_v1_tip(old, &v1_tip)?;
    let tip = engine.tip();
    let checkpointer = engine.checkpointer();
    summary.aggregates = copy_family(old, &checkpointer, Cf::State, tip)?;
    summary.command_ids = copy_family(old, &checkpointer, Cf::CommandIds, tip)?;
    // One synced write makes every record and checkpoint above durable (the write-ahead log
    // is written in order).
    let mut set = WriteSet::default();
    set.put(Cf::Meta, META_FORMAT_VERSION, &FORMAT_VERSION.to_be_bytes());
    new.write(&set, true)?;
    summary.v1_tip = v1_tip;
    summary.tip = tip;
    progress(summary.batches);
    Ok(summary)
}

fn check_v1(old: &dyn Storage) -> Result<(), EngineError> {
    let found = old
        .get(Cf::Meta, META_FORMAT_VERSION)?
        .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
        .map(u32::from_be_bytes);
    match found {
        Some(1) => Ok(()),
        Some(found) => Err(EngineError::UnsupportedFormat { found, expected: 1 }),
        None => Err(EngineError::Corrupt(
            "not a Keel store: no format version".into(),
        )),
    }
}

fn check_link(tip: &ChainTip, header: &V1Header) -> Result<(), EngineError> {
    if header.prev_hash != tip.last_hash || header.first_event != tip.last_event + 1 {
        return Err(EngineError::Corrupt(format!(
            "format-1 batch {} does not follow batch {} (hash chain or event numbering broken); not upgraded",
            header.seq, tip.last_batch
        )));
    }
    Ok(())
}

fn check_v1_tip(old: &dyn Storage, tip: &ChainTip) -> Result<(), EngineError> {
    let stored = old
        .get(Cf::Meta, crate::format::META_TIP)?
        .map(|v| ChainTip::decode(&v))
        .transpose()?
        .unwrap_or_default();
    if stored != *tip {
        return Err(EngineError::Corrupt(format!(
            "format-1 store: its stored tip ({stored}) is not where its log ends ({tip}); not upgraded"
        )));
    }
    if let Some((key, _)) = old.last(Cf::V1Events)? {
        let last = crate::format::decode_seq_key(&key)?;
        if last != tip.last_event {
            return Err(EngineError::Corrupt(format!(
                "format-1 store: event {last} lies past the last batch (event {}); not upgraded",
                tip.last_event
            )));
        }
    }
    Ok(())
}

/// Copies every key of `cf` from `old` into the checkpoint of the new store, in chunks, each
/// marked at `tip`.
fn copy_family(
    old: &dyn Storage,
    checkpointer: &crate::Checkpointer,
    cf: Cf,
    tip: ChainTip,
) -> Result<u64, EngineError> {
    let mut set = WriteSet::default();
    let mut copied = 0u64;
    let mut failure = None;
    old.scan(cf, &[], &mut |key, value| {
        set.put(cf, key, value);
        copied += 1;
        if set.len() >= COPY_CHUNK {
            if let Err(e) = checkpointer.write(&mut set, CheckpointMark::at(&tip)) {
                failure = Some(e);
                return false;
            }
            set.clear();
        }
        true
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    checkpointer.write(&mut set, CheckpointMark::at(&tip))?;
    Ok(copied)
}
