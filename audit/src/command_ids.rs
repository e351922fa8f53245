//! The `command_index` check: the command-id index against the events that carry command ids.
//!
//! Both sides are reduced to (fingerprint, seq) records, sorted and merge-joined: sequential
//! work and 32 bytes per id. A hash map of the ids themselves cost an allocation and two
//! cache misses per id and dominated audits of stores where every command carries an id.
//! Names are read back only for the divergences the report keeps.

use super::{AuditError, Check, Divergence, PROGRESS_EVERY, Phase, Progress, Run};
use keel_engine::Cf;
use keel_invariants::{CommandOutcome, LoggedEvent, RejectCode, codec};
use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::Instant;

/// A 128-bit fingerprint of a command id: two SipHash-1-3 digests under keys drawn at random
/// for this process. Two distinct ids share one with probability 2^-128, and without the keys
/// nobody can craft a pair that does.
#[derive(Clone)]
pub(super) struct Fingerprints(RandomState, RandomState);

impl Fingerprints {
    pub(super) fn new() -> Self {
        Self(RandomState::new(), RandomState::new())
    }

    pub(super) fn of(&self, id: &[u8]) -> u128 {
        (u128::from(self.0.hash_one(id)) << 64) | u128::from(self.1.hash_one(id))
    }
}

/// An event that carries a command id.
#[derive(Clone, Copy, Debug)]
pub(super) struct Carried {
    pub(super) fp: u128,
    pub(super) seq: u64,
    pub(super) batch: u64,
}

/// An entry of the command-id index.
#[derive(Clone, Debug)]
struct Indexed {
    fp: u128,
    outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Committed(u64),
    Rejected(RejectCode),
}

impl Outcome {
    fn describe(self) -> String {
        match self {
            Outcome::Committed(seq) => format!("committed at seq {seq}"),
            Outcome::Rejected(code) => format!("rejected ({})", code.as_str()),
        }
    }
}

impl Run<'_> {
    /// Checks that every event carrying a command id is indexed as committed at its seq, that
    /// no id is carried twice, and that every committed entry is backed by its event.
    ///
    /// The index is the checkpoint's: it must hold every id of the batches up to the
    /// checkpoint's mark, and every rejection the log keeps up to the mark with its code.
    /// Ids of later batches live in the log and the writer's memory until the next checkpoint;
    /// the index may already hold some of them (the checkpoint ingests its ids before it
    /// writes its mark, so a crash or a snapshot between the two leaves them), and each one it
    /// holds must agree with the log like any other.
    pub(super) fn check_command_index(&mut self) -> Result<(), AuditError> {
        self.phase_started = Instant::now();
        let mark = self.report.checkpoint.batch;
        let mut carried = std::mem::take(&mut self.replay.carried);
        carried.sort_unstable_by_key(|c| (c.fp, c.seq));
        self.report_duplicates(&mut carried)?;
        let mut indexed = self.read_index()?;
        indexed.sort_unstable_by_key(|i| i.fp);
        let unbacked = self.join(&carried, &indexed, mark)?;
        self.check_rejections(&indexed, mark);
        self.report_unbacked(unbacked)
    }

    /// Every rejection the log keeps up to `mark` is in the index with its code; one of a later
    /// batch that the index holds is there with its code.
    fn check_rejections(&mut self, indexed: &[Indexed], mark: u64) {
        let rejected = std::mem::take(&mut self.replay.rejected);
        for r in &rejected {
            let found = indexed
                .binary_search_by_key(&r.fp, |i| i.fp)
                .ok()
                .map(|at| indexed[at].outcome.clone());
            let missing_after_mark = r.batch > mark && found.is_none();
            if found != Some(Outcome::Rejected(r.code.clone())) && !missing_after_mark {
                let d = Divergence::new(
                    Check::CommandIndex,
                    format!(
                        "a command rejected in batch {} ({}) is not indexed as rejected",
                        r.batch,
                        r.code.as_str()
                    ),
                )
                .at_batch(Some(r.batch))
                .expected_found(
                    Outcome::Rejected(r.code.clone()).describe(),
                    found.map_or_else(|| "no index entry".to_owned(), Outcome::describe),
                );
                self.report.record(d);
            }
        }
    }

    /// Reports ids carried by more than one event, then keeps the first event of each.
    fn report_duplicates(&mut self, carried: &mut Vec<Carried>) -> Result<(), AuditError> {
        let mut duplicates = Vec::new();
        carried.dedup_by(|later, first| {
            let same = later.fp == first.fp;
            if same {
                duplicates.push((*first, *later));
            }
            same
        });
        for (first, later) in duplicates {
            let id = self.carried_id(later.seq)?;
            let detail = format!(
                "command id {id} is carried by events {} and {}",
                first.seq, later.seq
            );
            let d = Divergence::new(Check::CommandIndex, detail)
                .at_seq(Some(later.seq))
                .at_batch(Some(later.batch))
                .expected_found(
                    format!("only event {}", first.seq),
                    format!("events {} and {}", first.seq, later.seq),
                );
            self.report.record(d);
        }
        Ok(())
    }

    /// Every index entry as a fingerprint and outcome; an undecodable entry is reported here.
    fn read_index(&mut self) -> Result<Vec<Indexed>, AuditError> {
        let storage = self.storage;
        let fingerprints = self.fingerprints.clone();
        let (report, progress, started) =
            (&mut self.report, &mut self.progress, self.phase_started);
        let mut indexed = Vec::new();
        let result = storage.scan(Cf::CommandIds, &[], &mut |key, value| {
            report.command_ids += 1;
            let outcome = match codec::decode_outcome(value) {
                Ok(CommandOutcome::Committed { seq }) => Outcome::Committed(seq),
                Ok(CommandOutcome::Rejected(rejection)) => Outcome::Rejected(rejection.code),
                Err(e) => {
                    let id = String::from_utf8_lossy(key);
                    let detail =
                        format!("command id {id:?}: the stored outcome does not decode: {e}");
                    report.record(Divergence::new(Check::CommandIndex, detail));
                    return true;
                }
            };
            match outcome {
                Outcome::Committed(_) => report.command_ids_committed += 1,
                Outcome::Rejected(_) => report.command_ids_rejected += 1,
            }
            indexed.push(Indexed {
                fp: fingerprints.of(key),
                outcome,
            });
            if report.command_ids.is_multiple_of(PROGRESS_EVERY) {
                let (done, elapsed) = (report.command_ids, started.elapsed());
                progress(&Progress {
                    phase: Phase::CommandIds,
                    done,
                    total: 0,
                    elapsed,
                });
            }
            true
        });
        result.or_else(|e| self.storage_failure(e))?;
        Ok(indexed)
    }

    /// Merge-joins the two sorted sides, reporting every carried id the index names otherwise,
    /// and every carried id of a batch up to `mark` it lacks. Returns the committed entries no
    /// event carries: (fingerprint, seq).
    fn join(
        &mut self,
        carried: &[Carried],
        indexed: &[Indexed],
        mark: u64,
    ) -> Result<Vec<(u128, u64)>, AuditError> {
        let mut unbacked = Vec::new();
        let (mut c, mut i) = (0, 0);
        loop {
            let entry_first = match (carried.get(c), indexed.get(i)) {
                (None, None) => return Ok(unbacked),
                (Some(event), Some(entry)) if event.fp == entry.fp => {
                    if entry.outcome != Outcome::Committed(event.seq) {
                        self.report_misindexed(*event, Some(entry.outcome.clone()))?;
                    }
                    c += 1;
                    i += 1;
                    continue;
                }
                (Some(event), Some(entry)) => entry.fp < event.fp,
                (Some(_), None) => false,
                (None, Some(_)) => true,
            };
            if entry_first {
                if let Outcome::Committed(seq) = indexed[i].outcome {
                    unbacked.push((indexed[i].fp, seq));
                }
                i += 1;
            } else {
                if carried[c].batch <= mark {
                    self.report_misindexed(carried[c], None)?;
                }
                c += 1;
            }
        }
    }

    /// Event `event` carries an id the index records as `found` (`None`: no entry).
    fn report_misindexed(
        &mut self,
        event: Carried,
        found: Option<Outcome>,
    ) -> Result<(), AuditError> {
        let id = self.carried_id(event.seq)?;
        let seq = event.seq;
        let (what, found) = match found {
            Some(outcome) => ("the index says otherwise", outcome.describe()),
            None => ("the index has no entry", "no index entry".to_owned()),
        };
        let d = Divergence::new(
            Check::CommandIndex,
            format!("command id {id}: event {seq} carries it, but {what}"),
        )
        .at_seq(Some(seq))
        .at_batch(Some(event.batch))
        .expected_found(format!("committed at seq {seq}"), found);
        self.report.record(d);
        Ok(())
    }

    /// Reports index entries that say committed at a seq whose event does not carry their id.
    /// Their names take a second scan of the index, done only when the report shows them.
    fn report_unbacked(&mut self, mut unbacked: Vec<(u128, u64)>) -> Result<(), AuditError> {
        if unbacked.is_empty() {
            return Ok(());
        }
        unbacked.sort_unstable_by_key(|(_, seq)| *seq);
        let names = if self.report.keeps_more() {
            self.index_names(&unbacked)?
        } else {
            HashMap::new()
        };
        for (fp, seq) in unbacked {
            let id = names
                .get(&fp)
                .map_or_else(|| "(name not read)".to_owned(), |n| format!("{n:?}"));
            let what = if self.report.keeps_more() {
                self.event_at(seq)?
            } else {
                String::new()
            };
            let detail = format!(
                "command id {id}: the index says it committed as event {seq}, but no event carries it; {what}"
            );
            let batch = if self.report.keeps_more() {
                self.covering_batch(seq)?
            } else {
                None
            };
            let d = Divergence::new(Check::CommandIndex, detail)
                .at_seq(Some(seq))
                .at_batch(batch)
                .expected_found("no index entry", format!("committed at seq {seq}"));
            self.report.record(d);
        }
        Ok(())
    }

    /// The ids of the index entries with the fingerprints in `wanted`.
    fn index_names(&mut self, wanted: &[(u128, u64)]) -> Result<HashMap<u128, String>, AuditError> {
        let wanted: HashMap<u128, u64> = wanted.iter().copied().collect();
        let fingerprints = self.fingerprints.clone();
        let mut names = HashMap::new();
        let result = self.storage.scan(Cf::CommandIds, &[], &mut |key, _| {
            let fp = fingerprints.of(key);
            if wanted.contains_key(&fp) {
                names.insert(fp, String::from_utf8_lossy(key).into_owned());
            }
            names.len() < wanted.len()
        });
        result.or_else(|e| self.storage_failure(e))?;
        Ok(names)
    }

    /// The command id event `seq` carries, quoted, read back for a divergence the report
    /// keeps (one that is only counted needs no name).
    fn carried_id(&mut self, seq: u64) -> Result<String, AuditError> {
        if !self.report.keeps_more() {
            return Ok(String::new());
        }
        let logged = self.read_event(seq)?;
        Ok(match logged.and_then(|l| l.command_id) {
            Some(id) => format!("{id:?}"),
            None => "(unreadable)".to_owned(),
        })
    }

    /// What the log holds at `seq`, for a divergence message.
    fn event_at(&mut self, seq: u64) -> Result<String, AuditError> {
        let value = match self.event_payload(seq) {
            Ok(value) => value,
            Err(AuditError::Storage(e)) => {
                return self.storage_failure(e).map(|()| "it cannot be read".into());
            }
            Err(e) => return Err(e),
        };
        let Some(value) = value else {
            return Ok(format!("there is no event {seq}"));
        };
        Ok(match codec::decode_event(&value) {
            Ok(logged) => format!("event {seq} carries command id {:?}", logged.command_id),
            Err(_) => format!("event {seq} does not decode"),
        })
    }

    fn read_event(&mut self, seq: u64) -> Result<Option<LoggedEvent>, AuditError> {
        match self.event_payload(seq) {
            Ok(value) => Ok(value.and_then(|v| codec::decode_event(&v).ok())),
            Err(AuditError::Storage(e)) => self.storage_failure(e).map(|()| None),
            Err(e) => Err(e),
        }
    }
}
