//! The writer's aggregates, bounded: hot ones in memory, the rest in the checkpoint.
//!
//! While every aggregate of the store fits the bound, the cache holds them all and is
//! *complete*: a miss means "does not exist", and deciding costs no read. Once the store holds
//! more, the cache keeps at most `max` aggregates that the checkpoint already holds (plus the
//! ones changed since the last written checkpoint, which only a checkpoint may release; their
//! number is bounded by `checkpoint_pending_max`). Before a batch is decided, [`Cache::prefetch`]
//! reads every aggregate its commands target that is not here from the checkpoint in one
//! multi-get, so that deciding itself never reads the store.
//!
//! Eviction ([`Cache::evict`]) runs between batches. It removes only aggregates whose current
//! state a *written* checkpoint holds (changed at or before its batch), so that reading one back
//! gives exactly the state it was evicted with. Second chance: first the ones not used since the
//! previous eviction, then any clean one.
//!
//! An entry's stamps share one `u64` (the batch that last changed it, and the eviction period
//! that last used it), so that an entry is one word more than the aggregate itself: the
//! complete cache is the hot path of every benchmark, and its size is its speed.

use crate::ReadError;
use crate::checkpoint::Map;
use keel_invariants::{Aggregate, AggregateId, codec};

/// One cached aggregate with its stamps.
pub(crate) struct Entry {
    aggregate: Aggregate,
    /// The batch that last changed it (0: as the checkpoint holds it) in the high 48 bits; the
    /// eviction period that last read or changed it in the low 16.
    stamp: u64,
}

/// Bits of [`Entry::stamp`] that hold the eviction period.
const PERIOD_BITS: u32 = 16;
/// Batches from here on are not stamped exactly, so nothing is evicted any more (2^48 batches:
/// centuries at ten thousand batches a second).
const CHANGED_MAX: u64 = (1 << (64 - PERIOD_BITS)) - 1;

impl Entry {
    fn stamp(changed: u64, period: u16) -> u64 {
        (changed.min(CHANGED_MAX) << PERIOD_BITS) | u64::from(period)
    }

    fn changed(&self) -> u64 {
        self.stamp >> PERIOD_BITS
    }

    fn period(&self) -> u16 {
        self.stamp as u16
    }

    fn touch(&mut self, period: u16) {
        self.stamp = Entry::stamp(self.changed(), period);
    }
}

/// What [`Cache::update`] tells about the aggregate it changed, from the entry's stamp (so that
/// the writer keeps its lists of changed aggregates without a hash set of its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Changed {
    /// Not changed before in the current batch.
    pub(crate) first_in_batch: bool,
    /// Not changed since the changes last handed to a checkpoint (see [`Cache::handed`]).
    pub(crate) first_since_handed: bool,
}

/// What [`Cache::update`] keeps to undo a change: the entry as it was (`None`: absent).
pub(crate) struct Undo {
    id: AggregateId,
    previous: Option<(Aggregate, u64)>,
}

pub(crate) struct Cache {
    map: Map<AggregateId, Entry>,
    /// Most aggregates kept once the checkpoint holds them (`--cache-aggregates-max`).
    max: usize,
    /// Every aggregate of the store is here: a miss means "absent", no prefetch is needed.
    complete: bool,
    /// The batch being decided (the tip's plus one): what a change is stamped with.
    batch: u64,
    /// The eviction period (eviction runs counted, wrapping): an entry not used in the current
    /// one when eviction runs goes first.
    period: u16,
    /// Ids of the batch being prefetched that are not here (kept for its allocation).
    missing: Vec<AggregateId>,
    /// Changes made in batches up to this one have been handed to a checkpoint (or were
    /// checkpointed before recovery): an aggregate changed after it is in the writer's list
    /// of changes for the next checkpoint.
    handed: u64,
}

impl Cache {
    /// An empty, complete cache (an empty store) of at most `max` clean aggregates.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            map: Map::default(),
            max: max.max(1),
            complete: true,
            batch: 0,
            period: 0,
            missing: Vec::new(),
            handed: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether every aggregate of the store is here.
    pub(crate) fn is_complete(&self) -> bool {
        self.complete
    }

    /// Whether a recovery scan may load one more checkpointed aggregate; when not, the cache is
    /// no longer complete and the scan stops.
    pub(crate) fn room_to_load(&mut self) -> bool {
        if self.map.len() < self.max {
            return true;
        }
        self.complete = false;
        false
    }

    /// Adds an aggregate as the checkpoint holds it (recovery, prefetch).
    pub(crate) fn load(&mut self, id: AggregateId, aggregate: Aggregate) {
        self.map.insert(
            id,
            Entry {
                aggregate,
                stamp: Entry::stamp(0, self.period),
            },
        );
    }

    /// Stamps what follows as changed or used in `batch` (the batch being decided or replayed).
    pub(crate) fn begin(&mut self, batch: u64) {
        self.batch = batch;
    }

    /// Takes note that every change made up to `batch` is handed to a checkpoint (or held by
    /// the checkpoint recovery starts from).
    pub(crate) fn handed(&mut self, batch: u64) {
        self.handed = batch;
    }

    pub(crate) fn get(&self, id: &AggregateId) -> Option<&Aggregate> {
        self.map.get(id).map(|entry| &entry.aggregate)
    }

    /// Replaces `id`'s aggregate by `fold(previous)` (`None`: absent), changed in the current
    /// batch; with `undo`, keeps the previous entry there first. One hash lookup when present.
    /// Says whether this is the aggregate's first change in the batch and since the last
    /// hand-over to a checkpoint (an undo puts the stamp back, so a change undone is as if
    /// never made).
    pub(crate) fn update(
        &mut self,
        id: &AggregateId,
        undo: Option<&mut Vec<Undo>>,
        fold: impl FnOnce(Option<Aggregate>) -> Aggregate,
    ) -> Changed {
        let stamp = Entry::stamp(self.batch, self.period);
        let (batch, handed) = (self.batch, self.handed);
        // Past `CHANGED_MAX` stamps are not exact: every change then counts as a first one (a
        // repeat in the writer's lists is harmless; a change left out of a checkpoint is not).
        let changed = |before: u64| Changed {
            first_in_batch: before != batch || before >= CHANGED_MAX,
            first_since_handed: before <= handed || before >= CHANGED_MAX,
        };
        match self.map.get_mut(id) {
            Some(entry) => {
                let seen = changed(entry.changed());
                // Take the aggregate out without cloning it; the placeholder is overwritten
                // at once.
                let previous = std::mem::replace(&mut entry.aggregate, placeholder());
                if let Some(undo) = undo {
                    undo.push(Undo {
                        id: id.clone(),
                        previous: Some((previous.clone(), entry.changed())),
                    });
                }
                entry.aggregate = fold(Some(previous));
                entry.stamp = stamp;
                seen
            }
            None => {
                if let Some(undo) = undo {
                    undo.push(Undo {
                        id: id.clone(),
                        previous: None,
                    });
                }
                let entry = Entry {
                    aggregate: fold(None),
                    stamp,
                };
                self.map.insert(id.clone(), entry);
                // Absent: never changed, or evicted (only once a written checkpoint held it).
                changed(0)
            }
        }
    }

    /// Puts back what an [`Undo`] kept.
    pub(crate) fn restore(&mut self, undo: Undo) {
        match undo.previous {
            Some((aggregate, changed)) => {
                let stamp = Entry::stamp(changed, self.period);
                self.map.insert(undo.id, Entry { aggregate, stamp });
            }
            None => {
                self.map.remove(&undo.id);
            }
        }
    }

    /// Makes every aggregate `ids` names available to [`Cache::get`] for the batch being
    /// decided: when the cache is complete there is nothing to do; otherwise the ones here are
    /// stamped used and the others are read from the checkpoint with one call of `fetch` (a
    /// multi-get, in order). Returns how many were read.
    pub(crate) fn prefetch<'a>(
        &mut self,
        ids: impl Iterator<Item = &'a AggregateId>,
        fetch: impl FnOnce(&[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, ReadError>,
    ) -> Result<usize, ReadError> {
        if self.complete {
            return Ok(0);
        }
        let period = self.period;
        self.missing.clear();
        for id in ids {
            match self.map.get_mut(id) {
                Some(entry) => entry.touch(period),
                None => self.missing.push(id.clone()),
            }
        }
        if self.missing.is_empty() {
            return Ok(0);
        }
        self.missing.sort_unstable();
        self.missing.dedup();
        // Taken out while `self` takes what was read (put back for its allocation).
        let missing = std::mem::take(&mut self.missing);
        let keys: Vec<&[u8]> = missing.iter().map(|id| id.as_str().as_bytes()).collect();
        let mut fetched = 0;
        for (id, value) in missing.iter().zip(fetch(&keys)?) {
            if let Some(bytes) = value {
                self.load(id.clone(), codec::decode_aggregate(&bytes)?);
                fetched += 1;
            }
        }
        drop(keys);
        self.missing = missing;
        metrics::counter!("keel_cache_fetched_total").increment(fetched as u64);
        Ok(fetched)
    }

    /// When more than `max` aggregates are here, removes clean ones (changed at or before
    /// `checkpointed`, the batch of the last written checkpoint) down to 15/16 of `max`: first
    /// the ones not used since the previous eviction, then any clean one. Runs between batches
    /// (the next batch prefetches what it needs). Returns how many were removed.
    pub(crate) fn evict(&mut self, checkpointed: u64) -> usize {
        if self.map.len() <= self.max || checkpointed >= CHANGED_MAX {
            return 0;
        }
        let target = self.max - self.max / 16;
        let excess = self.map.len() - target;
        let period = self.period;
        let mut evicted = self
            .map
            .extract_if(|_, entry| entry.changed() <= checkpointed && entry.period() != period)
            .take(excess)
            .count();
        if evicted < excess {
            evicted += self
                .map
                .extract_if(|_, entry| entry.changed() <= checkpointed)
                .take(excess - evicted)
                .count();
        }
        self.period = self.period.wrapping_add(1);
        if evicted > 0 {
            self.complete = false;
            metrics::counter!("keel_cache_evicted_total").increment(evicted as u64);
        }
        evicted
    }
}

/// A placeholder aggregate to move a cached one out without cloning it.
pub(crate) fn placeholder() -> Aggregate {
    Aggregate {
        version: 0,
        state: keel_invariants::State::vacant(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use keel_invariants::{State, ledger};

    fn id(n: usize) -> AggregateId {
        AggregateId::new(ledger::KIND, &format!("a{n}"))
    }

    fn account(balance: i64) -> Aggregate {
        Aggregate {
            version: 1,
            state: State::new(ledger::Account {
                balance,
                ..ledger::Account::default()
            }),
        }
    }

    /// Evicts only what a written checkpoint holds, the ones not used since the previous
    /// eviction first, down to 15/16 of the bound.
    #[test]
    fn eviction_keeps_what_no_checkpoint_holds_and_prefers_the_unused() {
        let mut cache = Cache::new(16);
        cache.begin(1);
        for n in 0..16 {
            cache.update(&id(n), None, |_| account(n as i64));
        }
        assert_eq!(cache.evict(0), 0, "at the bound: nothing to do");
        cache.begin(2);
        for n in 16..32 {
            cache.update(&id(n), None, |_| account(n as i64));
        }
        assert_eq!(cache.evict(0), 0, "no change is in a written checkpoint");
        assert!(cache.is_complete());
        cache.begin(3);
        assert_eq!(
            cache.evict(1),
            16,
            "batch 1's; batch 2's are in no written checkpoint"
        );
        assert!(!cache.is_complete());
        for n in 16..32 {
            assert!(cache.get(&id(n)).is_some(), "a{n} was changed in batch 2");
        }
        // Batch 4 reads a16..a19 and creates a40..a43.
        cache.begin(4);
        let read: Vec<AggregateId> = (16..20).map(id).collect();
        let fetched = cache
            .prefetch(read.iter(), |_| panic!("all of them are here"))
            .unwrap();
        assert_eq!(fetched, 0);
        for n in 40..44 {
            cache.update(&id(n), None, |_| account(0));
        }
        assert_eq!(cache.evict(4), 5, "down to 15 again");
        for n in (16..20).chain(40..44) {
            assert!(cache.get(&id(n)).is_some(), "a{n} was used in batch 4");
        }
        let kept = (20..32).filter(|n| cache.get(&id(*n)).is_some()).count();
        assert_eq!(kept, 7, "the unused went");
    }

    /// A prefetch reads only what is missing, once per id, and leaves an absent id absent.
    #[test]
    fn prefetch_reads_what_is_missing_once() {
        let mut cache = Cache::new(4);
        cache.begin(1);
        for n in 0..5 {
            cache.update(&id(n), None, |_| account(n as i64));
        }
        cache.begin(2);
        assert_eq!(cache.evict(1), 1);
        let gone: Vec<usize> = (0..5).filter(|n| cache.get(&id(*n)).is_none()).collect();
        assert_eq!(gone.len(), 1);
        let wanted = [id(gone[0]), id(1000), id(gone[0]), id(99)];
        let mut asked = Vec::new();
        let fetched = cache
            .prefetch(wanted.iter(), |keys| {
                asked = keys.iter().map(|k| k.to_vec()).collect();
                Ok(keys
                    .iter()
                    .map(|k| {
                        (*k == id(gone[0]).as_str().as_bytes()).then(|| {
                            let mut out = Vec::new();
                            codec::encode_aggregate(&account(7), &mut out);
                            out
                        })
                    })
                    .collect())
            })
            .unwrap();
        assert_eq!(fetched, 1);
        assert_eq!(asked.len(), 3, "each missing id once");
        assert_eq!(cache.get(&id(gone[0])), Some(&account(7)));
        assert!(cache.get(&id(99)).is_none(), "absent stays absent");
    }

    /// `update` tells a first change in the batch and since the last hand-over to a
    /// checkpoint, from the stamps alone; an undone change does not count.
    #[test]
    fn update_tells_first_changes() {
        let first = |in_batch, since_handed| Changed {
            first_in_batch: in_batch,
            first_since_handed: since_handed,
        };
        let change = |cache: &mut Cache, n: usize, undo: Option<&mut Vec<Undo>>| {
            cache.update(&id(n), undo, |_| account(n as i64))
        };
        let mut cache = Cache::new(16);
        cache.begin(1);
        assert_eq!(change(&mut cache, 0, None), first(true, true));
        assert_eq!(change(&mut cache, 0, None), first(false, false));
        cache.begin(2);
        assert_eq!(
            change(&mut cache, 0, None),
            first(true, false),
            "changed in batch 1, not handed yet"
        );
        cache.handed(2);
        cache.begin(3);
        let mut undo = Vec::new();
        assert_eq!(change(&mut cache, 0, Some(&mut undo)), first(true, true));
        assert_eq!(change(&mut cache, 1, Some(&mut undo)), first(true, true));
        for u in undo.drain(..).rev() {
            cache.restore(u);
        }
        assert_eq!(change(&mut cache, 0, None), first(true, true), "undone");
        assert_eq!(change(&mut cache, 1, None), first(true, true), "undone");
        // Loaded from the checkpoint (evicted once a written checkpoint held it): a first.
        cache.load(id(2), account(8));
        assert_eq!(change(&mut cache, 2, None), first(true, true));
        // Past the exact stamps every change counts as a first one.
        cache.begin(CHANGED_MAX + 5);
        change(&mut cache, 0, None);
        assert_eq!(change(&mut cache, 0, None), first(true, true));
    }

    /// An undo restores the entry and its stamp, so a rolled-back change does not pin it.
    #[test]
    fn undo_restores_the_entry_and_its_stamp() {
        let mut cache = Cache::new(1);
        cache.begin(1);
        cache.update(&id(0), None, |_| account(1));
        cache.begin(2);
        let mut undo = Vec::new();
        cache.update(&id(0), Some(&mut undo), |_| account(2));
        cache.update(&id(1), Some(&mut undo), |_| account(3));
        for u in undo.drain(..).rev() {
            cache.restore(u);
        }
        assert_eq!(cache.get(&id(0)), Some(&account(1)));
        assert!(cache.get(&id(1)).is_none());
        cache.begin(3);
        cache.update(&id(2), None, |_| account(4));
        cache.begin(4);
        assert_eq!(cache.evict(1), 1, "a0 is as batch 1's checkpoint holds it");
        assert!(cache.get(&id(0)).is_none());
    }
}
