//! Engine behaviour over both storages: commit, recovery, chain verification, poisoning.
#![allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report

use keel_engine::{
    BatchHeader, Cf, Engine, EngineError, FaultPlan, MemoryStorage, PendingBatch, RocksStorage,
    Storage, WriteSet, verify_chain,
};
use std::sync::Arc;

/// Commits one batch of `events` payloads plus a state put; returns the header.
fn commit(
    engine: &mut Engine,
    at: u64,
    events: &[&[u8]],
) -> Result<Option<BatchHeader>, EngineError> {
    let mut pending = PendingBatch::default();
    engine.begin(&mut pending, at);
    for e in events {
        pending.push_event(|out| out.extend_from_slice(e));
    }
    pending.put_state(b"account:a", |out| out.extend_from_slice(&at.to_be_bytes()));
    engine.commit(&mut pending)
}

fn events_of(storage: &dyn Storage) -> Vec<(u64, u64, Vec<u8>)> {
    let mut seen = Vec::new();
    verify_chain(storage, &mut |seq, batch, payload| {
        seen.push((seq, batch, payload.to_vec()))
    })
    .unwrap();
    seen
}

#[test]
fn commits_chain_and_recover_over_rocksdb() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(RocksStorage::open(dir.path()).unwrap());
    let mut engine = Engine::open(Arc::clone(&storage)).unwrap();
    let h1 = commit(&mut engine, 100, &[b"one", b"two"])
        .unwrap()
        .unwrap();
    let h2 = commit(&mut engine, 50, &[b"three"]).unwrap().unwrap();
    assert_eq!((h1.seq, h1.first_event, h1.count), (1, 1, 2));
    assert_eq!((h2.seq, h2.first_event, h2.count), (2, 3, 1));
    assert_eq!(h2.prev_hash, h1.hash);
    assert_eq!(h2.committed_at_us, 100, "commit time never goes backwards");
    assert_ne!(h1.hash, h2.hash);
    drop(engine);
    drop(storage);

    let engine = Engine::open_rocksdb(dir.path()).unwrap();
    let tip = engine.tip();
    assert_eq!(
        (tip.last_batch, tip.last_event, tip.last_hash),
        (2, 3, h2.hash)
    );
    let reader = engine.reader();
    assert_eq!(reader.batch(2).unwrap(), Some(h2));
    let events = reader.events(1, 10).unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(
        (events[0].seq, events[0].batch, events[0].payload.as_slice()),
        (2, 1, &b"two"[..])
    );
    assert_eq!(
        reader.state(b"account:a").unwrap(),
        Some(50u64.to_be_bytes().to_vec()),
        "the second batch wrote the state"
    );
    let summary = verify_chain(reader.storage().unwrap(), &mut |_, _, _| {}).unwrap();
    assert_eq!((summary.batches, summary.events), (2, 3));
}

#[test]
fn a_batch_without_events_gets_no_header() {
    let storage = Arc::new(MemoryStorage::default());
    let mut engine = Engine::open(storage.clone()).unwrap();
    let mut pending = PendingBatch::default();
    engine.begin(&mut pending, 1);
    pending.put_command(b"c-1", |out| out.push(1));
    assert_eq!(engine.commit(&mut pending).unwrap(), None);
    assert_eq!(engine.tip().last_batch, 0);
    assert_eq!(storage.get(Cf::CommandIds, b"c-1").unwrap(), Some(vec![1]));
    engine.begin(&mut pending, 1);
    assert_eq!(
        engine.commit(&mut pending).unwrap(),
        None,
        "an empty batch writes nothing"
    );
}

#[test]
fn atomic_truncation_drops_only_the_tail_events() {
    let storage = Arc::new(MemoryStorage::default());
    let mut engine = Engine::open(storage.clone()).unwrap();
    let mut pending = PendingBatch::default();
    engine.begin(&mut pending, 1);
    pending.push_event(|out| out.push(1));
    pending.push_event(|out| out.push(2));
    pending.push_event(|out| out.push(3));
    pending.truncate_events(1);
    assert_eq!(
        pending.push_event(|out| out.push(4)),
        2,
        "sequences are reused after a rollback"
    );
    engine.commit(&mut pending).unwrap();
    let payloads: Vec<_> = events_of(storage.as_ref())
        .into_iter()
        .map(|(s, _, p)| (s, p))
        .collect();
    assert_eq!(payloads, [(1, vec![1]), (2, vec![4])]);
}

#[test]
fn failed_sync_poisons_and_nothing_more_is_written() {
    let storage = Arc::new(MemoryStorage::new(FaultPlan {
        fail_sync_at: Some(3),
        power_loss_at: None,
    }));
    let mut engine = Engine::open(storage.clone()).unwrap(); // sync 1: format version
    commit(&mut engine, 1, &[b"a"]).unwrap(); // sync 2
    assert!(matches!(
        commit(&mut engine, 2, &[b"b"]),
        Err(EngineError::Storage(_))
    )); // sync 3 fails
    assert!(engine.is_poisoned());
    assert!(matches!(
        commit(&mut engine, 3, &[b"c"]),
        Err(EngineError::Poisoned)
    ));
    assert!(matches!(
        engine.reader().events(0, 10),
        Err(EngineError::Poisoned)
    ));
    assert_eq!(storage.syncs(), 3, "the failed sync is not retried");
    let restarted = Arc::new(storage.after_power_loss());
    let engine = Engine::open(restarted.clone()).unwrap();
    assert_eq!(
        engine.tip().last_batch,
        1,
        "only the acknowledged batch survives"
    );
    assert_eq!(events_of(restarted.as_ref()).len(), 1);
}

#[test]
fn power_loss_keeps_only_synced_batches() {
    for loss_at in 2..=5 {
        let storage = Arc::new(MemoryStorage::new(FaultPlan {
            fail_sync_at: None,
            power_loss_at: Some(loss_at),
        }));
        let mut engine = Engine::open(storage.clone()).unwrap();
        let mut acked = 0;
        for n in 0..5u8 {
            if commit(&mut engine, 1, &[&[n], &[n, n]]).is_err() {
                break;
            }
            acked += 1;
        }
        assert_eq!(acked, loss_at - 2);
        let restarted = Arc::new(storage.after_power_loss());
        let engine = Engine::open(restarted.clone()).unwrap();
        assert_eq!(engine.tip().last_batch, acked);
        assert_eq!(events_of(restarted.as_ref()).len() as u64, acked * 2);
    }
}

/// Tampers with a committed store through `set` and expects `verify_chain` to name `needle`.
fn assert_tamper_detected(tamper: impl FnOnce(&MemoryStorage, &mut WriteSet), needle: &str) {
    let storage = Arc::new(MemoryStorage::default());
    let mut engine = Engine::open(storage.clone()).unwrap();
    for n in 0..3u8 {
        commit(&mut engine, 1, &[&[n; 4], &[n; 5]]).unwrap();
    }
    let mut set = WriteSet::default();
    tamper(&storage, &mut set);
    storage.write(&set, true).unwrap();
    let error = verify_chain(storage.as_ref(), &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(needle),
        "{error:?} should contain {needle:?}"
    );
}

#[test]
fn verify_chain_locates_tampering() {
    // A flipped byte in event 4 (batch 2) breaks batch 2's hash.
    assert_tamper_detected(
        |s, set| {
            let mut v = s.get(Cf::Events, &4u64.to_be_bytes()).unwrap().unwrap();
            *v.last_mut().unwrap() ^= 1;
            set.put(Cf::Events, &4u64.to_be_bytes(), &v);
        },
        "batch 2: hash",
    );
    // An event past the last batch.
    assert_tamper_detected(
        |_, set| {
            set.put(Cf::Events, &7u64.to_be_bytes(), &3u64.to_be_bytes());
        },
        "event 7: event outside any batch",
    );
    // An event claiming another batch.
    assert_tamper_detected(
        |s, set| {
            let mut v = s.get(Cf::Events, &3u64.to_be_bytes()).unwrap().unwrap();
            v[..8].copy_from_slice(&3u64.to_be_bytes());
            set.put(Cf::Events, &3u64.to_be_bytes(), &v);
        },
        "event 3: stored as part of batch 3",
    );
    // A header whose previous hash was rewritten.
    assert_tamper_detected(
        |s, set| {
            let mut v = s.get(Cf::Batches, &3u64.to_be_bytes()).unwrap().unwrap();
            v[30] ^= 0xff;
            set.put(Cf::Batches, &3u64.to_be_bytes(), &v);
        },
        "batch 3",
    );
}

#[test]
fn open_refuses_a_store_of_another_format() {
    let storage = Arc::new(MemoryStorage::default());
    let mut set = WriteSet::default();
    set.put(Cf::Meta, b"format_version", &99u32.to_be_bytes());
    storage.write(&set, true).unwrap();
    assert!(matches!(
        Engine::open(storage),
        Err(EngineError::UnsupportedFormat {
            found: 99,
            expected: 1
        })
    ));
}

#[test]
fn open_refuses_a_tip_that_disagrees_with_the_log() {
    let storage = Arc::new(MemoryStorage::default());
    let mut engine = Engine::open(storage.clone()).unwrap();
    commit(&mut engine, 1, &[b"x"]).unwrap();
    let mut set = WriteSet::default();
    set.put(Cf::Events, &2u64.to_be_bytes(), &1u64.to_be_bytes()); // a tail past the last header
    storage.write(&set, true).unwrap();
    assert!(matches!(
        Engine::open(storage),
        Err(EngineError::Corrupt(_))
    ));
}
