//! State off the commit path: the overlay readers see, the checkpoint thread, and recovery.
//!
//! A commit writes only the batch's log record (format 2). The writer keeps every aggregate in
//! memory and, after each commit, publishes the aggregates the batch changed to the
//! [`Published`] overlay, which is what `GET /v1/aggregates` reads before the checkpoint. Every
//! `checkpoint_every_batches` batches or `checkpoint_interval` (whichever first), it hands
//! the aggregates and command ids changed since the last checkpoint, copied, to the
//! checkpoint thread, which writes them with the mark of the batch they stand at in one synced
//! write ([`keel_engine::Checkpointer`]; when the ids are many, they are ingested as one sorted
//! table file first), and then drops from the overlay what the checkpoint now holds. Recovery ([`recover`]) loads the checkpoint and replays the log after
//! its mark.

use crate::cache::{Cache, placeholder};
use crate::{ReadError, Shared};
use keel_engine::{CheckpointMark, Checkpointer, EngineError, Reader, WriteSet};
use keel_invariants::{Aggregate, AggregateId, CommandOutcome, apply, check_invariants, codec};
use std::collections::HashMap;

/// The writer's maps are keyed by client-chosen strings (aggregate ids, command ids): a
/// randomly seeded hasher, foldhash's quality variant (std's SipHash was 15% of the writer's
/// time in a profile).
pub(crate) type Map<K, V> = HashMap<K, V, foldhash::quality::RandomState>;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, RwLock};

/// Command ids decided since some checkpoint, with their outcomes.
pub(crate) type Ids = Map<String, CommandOutcome>;

/// The aggregates changed since the last finished checkpoint, at their last acknowledged
/// state: the overlay `GET /v1/aggregates` reads before the checkpoint. The writer inserts
/// after each commit and before answering (a client reads its own writes); the checkpoint
/// thread removes what a finished checkpoint holds. The lock is held for map operations only,
/// never across a write or an fsync.
#[derive(Default)]
pub(crate) struct Published {
    map: RwLock<Map<AggregateId, (Aggregate, u64)>>,
    /// States evicted by a checkpoint, kept (at most [`SPARE_STATES_MAX`]) so that publishing an
    /// aggregate the overlay no longer holds copies into one in place instead of allocating.
    spare: Mutex<Vec<Aggregate>>,
}

/// How many evicted overlay states [`Published`] keeps for reuse.
const SPARE_STATES_MAX: usize = 65_536;

impl Published {
    pub(crate) fn get(&self, id: &AggregateId) -> Option<Aggregate> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(id).map(|(aggregate, _)| aggregate.clone())
    }

    /// Publishes the state after batch `batch` of every aggregate in `changed` that exists.
    pub(crate) fn publish<'a>(
        &self,
        batch: u64,
        cache: &Cache,
        changed: impl Iterator<Item = &'a AggregateId>,
    ) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        for id in changed {
            if let Some(aggregate) = cache.get(id) {
                match map.get_mut(id) {
                    Some(slot) => {
                        slot.0.clone_from(aggregate);
                        slot.1 = batch;
                    }
                    None => {
                        let copy = match spare.pop() {
                            Some(mut copy) => {
                                copy.clone_from(aggregate);
                                copy
                            }
                            None => aggregate.clone(),
                        };
                        map.insert(id.clone(), (copy, batch));
                    }
                }
            }
        }
        metrics::gauge!("keel_overlay_aggregates").set(map.len() as f64);
    }

    /// Forgets every aggregate last changed at or before `batch` (a checkpoint at `batch`
    /// holds it now).
    /// The evicted states are kept for reuse (see `spare`); their ids are freed here, on the
    /// checkpoint thread, after the lock is released.
    fn evict_through(&self, batch: u64) {
        let mut evicted = Vec::new();
        {
            let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
            evicted.extend(map.extract_if(|_, (_, changed)| *changed <= batch));
            metrics::gauge!("keel_overlay_aggregates").set(map.len() as f64);
        }
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        let room = SPARE_STATES_MAX.saturating_sub(spare.len());
        spare.extend(
            evicted
                .iter_mut()
                .take(room)
                .map(|(_, (aggregate, _))| std::mem::replace(aggregate, placeholder())),
        );
    }
}

/// What the checkpoint thread is given.
pub(crate) enum Work {
    Write(Job),
    /// The ids of a finished checkpoint, which the writer no longer looks up: emptied here
    /// (freeing a checkpoint's worth of ids is not the writer's work) and their table handed
    /// back ([`Done::Emptied`]) for the writer's next `recent`.
    Free(Arc<Ids>),
}

/// One checkpoint for the thread to write: copies, so that the writer goes on at once.
pub(crate) struct Job {
    pub(crate) states: Vec<(AggregateId, Aggregate)>,
    pub(crate) ids: Arc<Ids>,
    pub(crate) mark: CheckpointMark,
}

/// What the checkpoint thread hands back to the writer.
pub(crate) enum Done {
    /// The checkpoint at `batch` is written. `states` are its copies, their ids emptied: the
    /// writer copies the next checkpoint's states into them in place.
    Written {
        batch: u64,
        states: Vec<(AggregateId, Aggregate)>,
    },
    /// An emptied id map, with its table.
    Emptied(Ids),
}

/// Fills `out` with `ids` and their encoded outcomes in ascending byte order of the id, as
/// an ingestion takes them. Each id is sorted by its first eight bytes as one integer first,
/// so that most comparisons never follow the pointer to the id's bytes.
fn sorted_ids(ids: &Ids, out: &mut WriteSet) {
    out.clear();
    let mut order: Vec<(u64, &str, &CommandOutcome)> = ids
        .iter()
        .map(|(id, outcome)| (prefix(id.as_bytes()), id.as_str(), outcome))
        .collect();
    order.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| a.1.as_bytes().cmp(b.1.as_bytes()))
    });
    for (_, id, outcome) in order {
        out.put_with(keel_engine::Cf::CommandIds, id.as_bytes(), |bytes| {
            codec::encode_outcome(outcome, bytes)
        });
    }
}

/// The first eight bytes of `key`, zero-padded, as a big-endian integer: ordering by it and
/// then by the whole key is the byte order of the keys.
fn prefix(key: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = key.len().min(8);
    bytes[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(bytes)
}

/// Before a checkpoint adds command ids: waits while the command-id index has more than
/// [`keel_engine::COMMAND_IDS_RUNS_MAX`] sorted runs, i.e. until RocksDB's merges caught up,
/// so that the writer's id lookups check a bounded number of bloom filters and RocksDB never
/// stalls the commits for the family (see the constant). Meanwhile the writer's pending
/// changes grow to `--checkpoint-pending-max`, where the writer waits for this checkpoint.
/// A closing or poisoned write path does not wait (the final checkpoint of a shutdown goes
/// through; RocksDB's own, higher triggers still hold).
fn wait_for_merges(checkpointer: &Checkpointer, shared: &Shared) {
    let started = std::time::Instant::now();
    let mut waited = false;
    while checkpointer
        .sorted_runs(keel_engine::Cf::CommandIds)
        .is_some_and(|runs| runs > keel_engine::COMMAND_IDS_RUNS_MAX)
    {
        if shared.closing.load(Ordering::Acquire) || shared.poisoned.load(Ordering::Acquire) {
            break;
        }
        waited = true;
        std::thread::sleep(MERGE_POLL);
    }
    if waited {
        metrics::histogram!("keel_checkpoint_merge_wait_seconds")
            .record(started.elapsed().as_secs_f64());
    }
}

/// How often [`wait_for_merges`] looks at the index again.
const MERGE_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// The checkpoint thread: writes each job, then tells the writer which batch is checkpointed.
/// A failed write poisons the write path (the engine poisoned itself already) and ends it.
pub(crate) fn run_checkpointer(
    jobs: Receiver<Work>,
    done: SyncSender<Done>,
    checkpointer: Checkpointer,
    published: Arc<Published>,
    shared: Arc<Shared>,
    ingest_ids_min: usize,
) {
    let mut set = WriteSet::default();
    let mut ids_set = WriteSet::default();
    for work in jobs {
        let job = match work {
            Work::Write(job) => job,
            Work::Free(ids) => {
                // The writer held the last reference; anything else just drops it.
                if let Ok(mut ids) = Arc::try_unwrap(ids) {
                    ids.clear();
                    if done.send(Done::Emptied(ids)).is_err() {
                        return;
                    }
                }
                continue;
            }
        };
        if !job.ids.is_empty() {
            wait_for_merges(&checkpointer, &shared);
        }
        let started = std::time::Instant::now();
        set.clear();
        for (id, aggregate) in &job.states {
            set.put_with(keel_engine::Cf::State, id.as_str().as_bytes(), |out| {
                codec::encode_aggregate(aggregate, out)
            });
        }
        let ingesting = job.ids.len() >= ingest_ids_min.max(1);
        let written = if ingesting {
            // The ids first, the states and the mark after: see
            // `Checkpointer::write_ingesting` for why ids of batches after a stored mark are
            // harmless.
            sorted_ids(&job.ids, &mut ids_set);
            checkpointer.write_ingesting(&ids_set, &mut set, job.mark)
        } else {
            ids_set.clear();
            for (id, outcome) in job.ids.iter() {
                set.put_with(keel_engine::Cf::CommandIds, id.as_bytes(), |out| {
                    codec::encode_outcome(outcome, out)
                });
            }
            checkpointer.write(&mut set, job.mark)
        };
        let bytes = set.bytes_len() + ids_set.bytes_len();
        if let Err(error) = written {
            shared.poison(&format!(
                "checkpoint at batch {} failed: {error}",
                job.mark.batch
            ));
            return;
        }
        published.evict_through(job.mark.batch);
        metrics::counter!("keel_checkpoints_total").increment(1);
        if ingesting {
            metrics::counter!("keel_checkpoint_ingestions_total").increment(1);
        }
        metrics::histogram!("keel_checkpoint_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("keel_checkpoint_bytes").record(bytes as f64);
        metrics::gauge!("keel_checkpoint_batch").set(job.mark.batch as f64);
        if let Some(runs) = checkpointer.sorted_runs(keel_engine::Cf::CommandIds) {
            metrics::gauge!("keel_store_sorted_runs", "family" => "command_ids").set(runs as f64);
        }
        for (cf, family) in [
            (keel_engine::Cf::CommandIds, "command_ids"),
            (keel_engine::Cf::State, "state"),
        ] {
            if let Some(readers) = checkpointer.table_readers(cf) {
                metrics::gauge!("keel_store_table_readers_bytes", "family" => family)
                    .set(readers.bytes as f64);
            }
        }
        tracing::debug!(
            batch = job.mark.batch,
            aggregates = job.states.len(),
            ids = job.ids.len(),
            bytes,
            "checkpoint written"
        );
        let Job {
            mut states,
            ids,
            mark,
        } = job;
        // The writer's reference to the ids is then the last: it hands them back to be freed.
        drop(ids);
        for (id, _) in &mut states {
            *id = AggregateId::from_full(String::new());
        }
        let done_note = Done::Written {
            batch: mark.batch,
            states,
        };
        if done.send(done_note).is_err() {
            return;
        }
    }
}

/// What recovery hands the writer: the aggregates (all of them when they fit the cache's
/// bound), and what the log after the checkpoint changed (to be checkpointed again, and
/// published meanwhile).
pub(crate) struct Recovered {
    pub(crate) cache: Cache,
    /// Each aggregate the replay changed, once.
    pub(crate) dirty: Vec<AggregateId>,
    pub(crate) ids: Ids,
    pub(crate) mark: CheckpointMark,
    pub(crate) replayed_batches: u64,
    pub(crate) replayed_events: u64,
}

/// Loads the checkpoint and replays every log record after its mark: the state and the recent
/// command ids exactly as the writer had them after the last durable batch. Publishes the
/// replayed aggregates to `published`.
///
/// Loads at most `cache_max` checkpointed aggregates; when the store holds more, the cache is
/// not complete and the replay reads the others it needs from the checkpoint.
pub(crate) fn recover(
    reader: &Reader,
    published: &Published,
    cache_max: usize,
) -> Result<Recovered, ReadError> {
    let mut cache = Cache::new(cache_max);
    let mut failure = None;
    reader.scan_states(&mut |key, value| {
        if !cache.room_to_load() {
            return false;
        }
        match codec::decode_aggregate(value) {
            Ok(aggregate) => {
                let id = AggregateId::from_full(String::from_utf8_lossy(key).into_owned());
                cache.load(id, aggregate);
                true
            }
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    let mark = reader.checkpoint_mark()?;
    if mark.batch > 0 {
        let header = reader.batch(mark.batch)?;
        if header.map(|h| (h.hash, h.last_event())) != Some((mark.hash, mark.last_event)) {
            return Err(EngineError::Corrupt(format!(
                "the checkpoint names batch {} with hash {}, which the log does not hold",
                mark.batch,
                keel_engine::format::hex(&mark.hash)
            ))
            .into());
        }
    }
    // What the checkpoint holds needs no new one: the replay's changes are the first since.
    cache.handed(mark.batch);
    let mut recovered = Recovered {
        cache,
        dirty: Vec::new(),
        ids: Ids::default(),
        mark,
        replayed_batches: 0,
        replayed_events: 0,
    };
    let mut replay_failure: Option<ReadError> = None;
    let mut last_batch = mark.batch;
    reader.scan_log(mark.batch, &mut |view| {
        if view.header.seq == mark.batch + 1
            && (view.header.prev_hash != mark.hash
                || view.header.first_event != mark.last_event + 1)
        {
            replay_failure = Some(
                EngineError::Corrupt(format!(
                    "batch {} does not follow the checkpoint's batch {}",
                    view.header.seq, mark.batch
                ))
                .into(),
            );
            return false;
        }
        recovered.replayed_batches += 1;
        recovered.cache.begin(view.header.seq);
        for (seq, payload) in view.events() {
            let logged = match codec::decode_event(payload) {
                Ok(logged) => logged,
                Err(e) => {
                    replay_failure = Some(e.into());
                    return false;
                }
            };
            // A cache that does not hold every aggregate reads the event's targets it lacks
            // from the checkpoint (a log tail is short: point reads are enough).
            let fetched = recovered
                .cache
                .prefetch(logged.event.targets().iter(), |keys| {
                    keys.iter().map(|key| Ok(reader.state(key)?)).collect()
                });
            if let Err(e) = fetched {
                replay_failure = Some(e);
                return false;
            }
            for (index, id) in logged.event.targets().iter().enumerate() {
                let mut violation = None;
                let changed = recovered.cache.update(id, None, |previous| {
                    let next = apply(&logged.event, index, previous);
                    violation = check_invariants(&next).err();
                    next
                });
                if let Some(violation) = violation {
                    replay_failure = Some(
                        EngineError::Corrupt(format!(
                            "replaying event {seq}: invariant `{}` violated on {id}: {}",
                            violation.invariant, violation.detail
                        ))
                        .into(),
                    );
                    return false;
                }
                if changed.first_since_handed {
                    recovered.dirty.push(id.clone());
                }
            }
            if let Some(command_id) = logged.command_id {
                recovered
                    .ids
                    .insert(command_id, CommandOutcome::Committed { seq });
            }
            recovered.replayed_events += 1;
        }
        for payload in view.rejections() {
            match codec::decode_rejection(payload) {
                Ok(r) => {
                    recovered
                        .ids
                        .insert(r.command_id, CommandOutcome::Rejected(r.rejection));
                }
                Err(e) => {
                    replay_failure = Some(e.into());
                    return false;
                }
            }
        }
        last_batch = view.header.seq;
        true
    })?;
    if let Some(e) = replay_failure {
        return Err(e);
    }
    published.publish(last_batch, &recovered.cache, recovered.dirty.iter());
    Ok(recovered)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ids_go_to_the_ingestion_in_byte_order_with_their_outcomes() {
        // Shared eight-byte prefixes, keys shorter than eight bytes and their extensions by a
        // zero byte, bytes above 0x7f (UTF-8), and random ids.
        let mut names: Vec<String> = vec![
            "".into(),
            "a".into(),
            "a\0".into(),
            "a\0\0".into(),
            "ab".into(),
            "abcdefgh".into(),
            "abcdefgh\0".into(),
            "abcdefghi".into(),
            "abcdefgg~".into(),
            "é".into(),
            "zé".into(),
            "\u{7f}".into(),
            "order-0000000001".into(),
            "order-0000000010".into(),
            "order-000000002".into(),
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            names.push(format!("{:x}-{}", state, state % 97));
        }
        let mut ids = Ids::default();
        for (seq, name) in names.iter().enumerate() {
            ids.insert(name.clone(), CommandOutcome::Committed { seq: seq as u64 });
        }
        let mut set = WriteSet::default();
        sorted_ids(&ids, &mut set);
        let mut expected: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
        expected.sort_unstable();
        let keys: Vec<&[u8]> = set.iter().map(|(_, key, _)| key).collect();
        assert_eq!(keys, expected);
        for (cf, key, value) in set.iter() {
            assert_eq!(cf, keel_engine::Cf::CommandIds);
            let name = std::str::from_utf8(key).unwrap();
            assert_eq!(codec::decode_outcome(value).unwrap(), ids[name]);
        }
        // The set is rebuilt, not appended to.
        sorted_ids(&Ids::default(), &mut set);
        assert!(set.is_empty());
    }
}
