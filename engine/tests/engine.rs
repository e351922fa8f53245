//! Engine behaviour over both storages: commit, recovery, chain verification, checkpoints,
//! poisoning, rule sets, the upgrade from format 1.
#![allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report

use keel_engine::format::{ChainTip, seq_key};
use keel_engine::v1::{V1Hasher, V1Header};
use keel_engine::{
    BatchHeader, Cf, CheckpointMark, Engine, EngineError, FaultPlan, MemoryStorage, PendingBatch,
    RocksStorage, RuleSet, Storage, WriteSet, upgrade_v1, verify_chain,
};
use std::sync::Arc;

/// Commits one batch of `events` payloads; returns the header.
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
    let mut set = WriteSet::default();
    set.put(Cf::State, b"account:a", &50u64.to_be_bytes());
    engine
        .checkpointer()
        .write(&mut set, CheckpointMark::at(&engine.tip()))
        .unwrap();
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
    assert_eq!(events[1].committed_at_us, 100);
    assert_eq!(reader.events(0, 1).unwrap()[0].payload, b"one");
    assert!(reader.events(3, 10).unwrap().is_empty());
    assert_eq!(
        reader.state(b"account:a").unwrap(),
        Some(50u64.to_be_bytes().to_vec()),
        "the checkpoint wrote the state"
    );
    assert_eq!(reader.checkpoint_mark().unwrap().batch, 2);
    let summary = verify_chain(reader.storage().unwrap(), &mut |_, _, _| {}).unwrap();
    assert_eq!((summary.batches, summary.events), (2, 3));
}

#[test]
fn a_batch_of_rejections_gets_a_record_and_an_empty_batch_writes_nothing() {
    let storage = Arc::new(MemoryStorage::default());
    let mut engine = Engine::open(storage.clone()).unwrap();
    let mut pending = PendingBatch::default();
    engine.begin(&mut pending, 1);
    pending.push_rejection(|out| out.extend_from_slice(b"c-1 rejected"));
    let header = engine.commit(&mut pending).unwrap().unwrap();
    assert_eq!((header.seq, header.count, header.rejections), (1, 0, 1));
    assert_eq!(header.first_event, 1, "the next event's sequence");
    assert_eq!(engine.tip().last_event, 0);
    let h2 = commit(&mut engine, 2, &[b"e"]).unwrap().unwrap();
    assert_eq!((h2.seq, h2.first_event), (2, 1));
    let mut rejections = Vec::new();
    struct Collect<'a>(&'a mut Vec<(u64, Vec<u8>)>);
    impl keel_engine::LogVisitor for Collect<'_> {
        fn event(&mut self, _: u64, _: u64, _: &[u8]) {}
        fn rejection(&mut self, batch: u64, payload: &[u8]) {
            self.0.push((batch, payload.to_vec()));
        }
    }
    let summary = keel_engine::verify_log(storage.as_ref(), &mut Collect(&mut rejections)).unwrap();
    assert_eq!(
        (summary.batches, summary.events, summary.rejections),
        (2, 1, 1)
    );
    assert_eq!(rejections, [(1, b"c-1 rejected".to_vec())]);
    engine.begin(&mut pending, 1);
    assert_eq!(
        engine.commit(&mut pending).unwrap(),
        None,
        "an empty batch writes nothing"
    );
    assert_eq!(engine.tip().last_batch, 2);
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
    let mut set = WriteSet::default();
    assert!(matches!(
        engine
            .checkpointer()
            .write(&mut set, CheckpointMark::default()),
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
fn power_loss_keeps_only_synced_batches_and_checkpoints() {
    // Sync 1 is the format version; then each round is a commit and a checkpoint (both sync).
    for loss_at in 2..=9 {
        let storage = Arc::new(MemoryStorage::new(FaultPlan {
            fail_sync_at: None,
            power_loss_at: Some(loss_at),
        }));
        let mut engine = Engine::open(storage.clone()).unwrap();
        let (mut acked, mut checkpointed) = (0, 0);
        for n in 0..5u8 {
            if commit(&mut engine, 1, &[&[n], &[n, n]]).is_err() {
                break;
            }
            acked += 1;
            let mut set = WriteSet::default();
            set.put(Cf::State, b"a", &[n]);
            let mark = CheckpointMark::at(&engine.tip());
            if engine.checkpointer().write(&mut set, mark).is_err() {
                break;
            }
            checkpointed = acked;
        }
        assert_eq!(
            acked,
            loss_at / 2 - 1 + (loss_at % 2),
            "loss at sync {loss_at}"
        );
        let restarted = Arc::new(storage.after_power_loss());
        let engine = Engine::open(restarted.clone()).unwrap();
        assert_eq!(engine.tip().last_batch, acked);
        assert_eq!(events_of(restarted.as_ref()).len() as u64, acked * 2);
        assert_eq!(
            engine.reader().checkpoint_mark().unwrap().batch,
            checkpointed
        );
    }
}

#[test]
fn rules_text_is_recorded_by_the_first_batch_under_it() {
    let storage = Arc::new(MemoryStorage::default());
    let mut engine = Engine::open(storage.clone()).unwrap();
    engine.set_rules(RuleSet::new("rules one"));
    commit(&mut engine, 1, &[b"a"]).unwrap();
    commit(&mut engine, 2, &[b"b"]).unwrap();
    drop(engine);
    let mut engine = Engine::open(storage.clone()).unwrap();
    engine.set_rules(RuleSet::new("rules one"));
    commit(&mut engine, 3, &[b"c"]).unwrap();
    engine.set_rules(RuleSet::new("rules two"));
    commit(&mut engine, 4, &[b"d"]).unwrap();
    let reader = engine.reader();
    let mut texts = Vec::new();
    reader
        .scan_log(0, &mut |view| {
            texts.push(view.rules_text().to_string());
            true
        })
        .unwrap();
    assert_eq!(texts, ["rules one", "", "", "rules two"]);
    let summary = verify_chain(storage.as_ref(), &mut |_, _, _| {}).unwrap();
    assert_eq!(summary.rule_sets, 2);
    assert_eq!(
        reader.batch(4).unwrap().unwrap().rule_set,
        RuleSet::new("rules two").hash
    );
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
    // A flipped byte in an event of batch 2 breaks batch 2's hash.
    assert_tamper_detected(
        |s, set| {
            let mut v = s.get(Cf::Log, &seq_key(2)).unwrap().unwrap();
            v[104] ^= 1;
            set.put(Cf::Log, &seq_key(2), &v);
        },
        "batch 2: log record does not match its hash",
    );
    // A record moved under another key.
    assert_tamper_detected(
        |s, set| {
            let v = s.get(Cf::Log, &seq_key(3)).unwrap().unwrap();
            set.put(Cf::Log, &seq_key(4), &v);
        },
        "batch 4: log record names batch 3",
    );
    // An event index entry the log does not imply.
    assert_tamper_detected(
        |_, set| {
            set.put(Cf::EventIndex, &seq_key(8), &seq_key(3));
        },
        "event index has event 8 -> batch 3",
    );
    // A record replaced by a validly hashed one that does not link.
    assert_tamper_detected(
        |s, set| {
            let mut other = Engine::open(Arc::new(MemoryStorage::default())).unwrap();
            commit(&mut other, 1, &[b"x"]).unwrap();
            let _ = s;
            let forged = other.reader().record(1).unwrap().unwrap();
            set.put(Cf::Log, &seq_key(1), &forged);
        },
        "batch 2: previous hash",
    );
}

#[test]
fn open_refuses_a_store_of_another_format_and_names_the_upgrade() {
    let storage = Arc::new(MemoryStorage::default());
    let mut set = WriteSet::default();
    set.put(Cf::Meta, b"format_version", &1u32.to_be_bytes());
    storage.write(&set, true).unwrap();
    let error = Engine::open(storage).err().unwrap();
    assert!(matches!(
        error,
        EngineError::UnsupportedFormat {
            found: 1,
            expected: 2
        }
    ));
    assert!(error.to_string().contains("keel upgrade --data"), "{error}");
}

#[test]
fn open_refuses_a_log_that_disagrees_with_its_tip_index_or_checkpoint() {
    let damaged: [&dyn Fn(&mut WriteSet); 3] = [
        &|set| {
            set.put(Cf::Meta, b"tip", &ChainTip::default().encode());
        },
        &|set| {
            set.put(Cf::EventIndex, &seq_key(9), &seq_key(1));
        },
        &|set| {
            let mark = CheckpointMark {
                batch: 7,
                ..CheckpointMark::default()
            };
            set.put(Cf::Meta, b"checkpoint", &mark.encode());
        },
    ];
    for damage in damaged {
        let storage = Arc::new(MemoryStorage::default());
        let mut engine = Engine::open(storage.clone()).unwrap();
        commit(&mut engine, 1, &[b"x"]).unwrap();
        let mut set = WriteSet::default();
        damage(&mut set);
        storage.write(&set, true).unwrap();
        assert!(matches!(
            Engine::open(storage),
            Err(EngineError::Corrupt(_))
        ));
    }
}

/// A format-1 store of `batches` batches of two events each, written byte by byte as format 1
/// did, with a state and a command id.
fn v1_store(batches: u64) -> MemoryStorage {
    let storage = MemoryStorage::default();
    let mut set = WriteSet::default();
    set.put(Cf::Meta, b"format_version", &1u32.to_be_bytes());
    let mut tip = ChainTip::default();
    for b in 1..=batches {
        let first = tip.last_event + 1;
        let mut hasher = V1Hasher::new(b, first, 2, 100 * b, &tip.last_hash);
        for e in first..first + 2 {
            let mut value = b.to_be_bytes().to_vec();
            value.extend_from_slice(format!("event {e}").as_bytes());
            hasher.event(e, &value);
            set.put(Cf::V1Events, &seq_key(e), &value);
        }
        let header = V1Header {
            seq: b,
            first_event: first,
            count: 2,
            committed_at_us: 100 * b,
            prev_hash: tip.last_hash,
            hash: hasher.finish(),
        };
        set.put(Cf::V1Batches, &seq_key(b), &header.encode());
        tip = ChainTip {
            last_batch: b,
            last_event: header.last_event(),
            last_hash: header.hash,
            last_committed_at_us: header.committed_at_us,
        };
    }
    set.put(Cf::Meta, b"tip", &tip.encode());
    set.put(Cf::State, b"account:a", b"state");
    set.put(Cf::CommandIds, b"c-1", b"outcome");
    storage.write(&set, true).unwrap();
    storage
}

#[test]
fn upgrade_rewrites_a_verified_format_1_log_and_checkpoints_its_state() {
    let old = v1_store(5);
    let new = Arc::new(MemoryStorage::default());
    let summary = upgrade_v1(&old, new.clone(), RuleSet::new("r"), &mut |_| {}).unwrap();
    assert_eq!((summary.batches, summary.events), (5, 10));
    assert_eq!((summary.aggregates, summary.command_ids), (1, 1));
    let engine = Engine::open(new.clone()).unwrap();
    assert_eq!(engine.tip().last_batch, 5);
    let events = engine.reader().events(0, 100).unwrap();
    assert_eq!(events.len(), 10);
    assert_eq!(
        (events[9].seq, events[9].batch, events[9].committed_at_us),
        (10, 5, 500)
    );
    assert_eq!(events[9].payload, b"event 10");
    assert_eq!(engine.reader().checkpoint_mark().unwrap().batch, 5);
    assert_eq!(
        engine.reader().state(b"account:a").unwrap(),
        Some(b"state".to_vec())
    );
    verify_chain(new.as_ref(), &mut |_, _, _| {}).unwrap();
}

#[test]
fn upgrade_refuses_a_tampered_format_1_store() {
    let old = v1_store(3);
    let mut value = old.get(Cf::V1Events, &seq_key(3)).unwrap().unwrap();
    *value.last_mut().unwrap() ^= 1;
    let mut set = WriteSet::default();
    set.put(Cf::V1Events, &seq_key(3), &value);
    old.write(&set, true).unwrap();
    let error = upgrade_v1(
        &old,
        Arc::new(MemoryStorage::default()),
        RuleSet::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(error.to_string().contains("format-1 batch 2"), "{error}");
}

/// `count` command ids, strictly ascending, each with value `round` and its index.
fn sorted_ids(from: u32, count: u32, round: u8) -> WriteSet {
    let mut set = WriteSet::default();
    for i in from..from + count {
        set.put(
            Cf::CommandIds,
            format!("id-{i:08}").as_bytes(),
            &[round, i as u8],
        );
    }
    set
}

#[test]
fn an_ingestion_is_durable_whole_and_refuses_unsorted_or_foreign_puts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let storage = RocksStorage::open(dir.path()).unwrap();
        storage
            .ingest(Cf::CommandIds, &sorted_ids(0, 5000, 1))
            .unwrap();
        // A later ingestion of a key wins over the earlier one.
        storage
            .ingest(Cf::CommandIds, &sorted_ids(4000, 2000, 2))
            .unwrap();
        storage
            .ingest(Cf::CommandIds, &WriteSet::default())
            .unwrap();
        // A key in the memtable (small checkpoints write ids there): flushed first, and the
        // ingested value, the later one, wins.
        let mut set = WriteSet::default();
        set.put(Cf::CommandIds, b"id-00000100", b"memtable");
        storage.write(&set, true).unwrap();
        storage
            .ingest(Cf::CommandIds, &sorted_ids(100, 1, 3))
            .unwrap();
        assert_eq!(
            storage.get(Cf::CommandIds, b"id-00000100").unwrap(),
            Some(vec![3, 100])
        );

        let mut unsorted = WriteSet::default();
        unsorted.put(Cf::CommandIds, b"b", b"1");
        unsorted.put(Cf::CommandIds, b"a", b"1");
        let error = storage.ingest(Cf::CommandIds, &unsorted).unwrap_err();
        assert!(error.to_string().contains("ascending"), "{error}");
        let mut twice = WriteSet::default();
        twice.put(Cf::CommandIds, b"a", b"1");
        twice.put(Cf::CommandIds, b"a", b"2");
        assert!(storage.ingest(Cf::CommandIds, &twice).is_err());
        let mut foreign = WriteSet::default();
        foreign.put(Cf::State, b"a", b"1");
        let error = storage.ingest(Cf::CommandIds, &foreign).unwrap_err();
        assert!(error.to_string().contains("state"), "{error}");
        assert_eq!(storage.get(Cf::CommandIds, b"a").unwrap(), None);
    }
    // What an interrupted ingestion leaves behind is deleted at the next open.
    let leftovers = dir.path().join(keel_engine::INGEST_DIR);
    std::fs::create_dir_all(&leftovers).unwrap();
    std::fs::write(leftovers.join("command_ids-000000000007.sst"), b"torn").unwrap();
    let storage = RocksStorage::open(dir.path()).unwrap();
    assert!(!leftovers.exists());
    assert_eq!(
        storage.get(Cf::CommandIds, b"id-00000010").unwrap(),
        Some(vec![1, 10])
    );
    assert_eq!(
        storage.get(Cf::CommandIds, b"id-00004001").unwrap(),
        Some(vec![2, 4001u32 as u8])
    );
    assert_eq!(
        storage.get(Cf::CommandIds, b"id-00005999").unwrap(),
        Some(vec![2, 5999u32 as u8])
    );
    let mut count = 0;
    storage
        .scan(Cf::CommandIds, &[], &mut |_, _| {
            count += 1;
            true
        })
        .unwrap();
    assert_eq!(count, 6000);
    assert_eq!(
        storage.get(Cf::CommandIds, b"id-00000100").unwrap(),
        Some(vec![3, 100])
    );
    // The ingested tables pass the start-up check of every block like any other.
    assert_eq!(storage.verify_tables().unwrap().keys, 6000);
    drop(storage);
    // A read-only instance refuses to ingest and creates nothing in the store.
    let reader = RocksStorage::open_read_only(dir.path()).unwrap();
    let error = reader
        .ingest(Cf::CommandIds, &sorted_ids(9000, 1, 1))
        .unwrap_err();
    assert!(error.to_string().contains("read-only"), "{error}");
    assert!(!leftovers.exists());
}

#[test]
fn an_ingestion_survives_a_power_loss_alone_and_a_failed_one_adds_nothing() {
    // Sync 1 is the format version, sync 2 the ingestion, sync 3 the states and the mark.
    let storage = Arc::new(MemoryStorage::new(FaultPlan {
        fail_sync_at: None,
        power_loss_at: Some(3),
    }));
    let engine = Engine::open(storage.clone()).unwrap();
    let mut unsynced = WriteSet::default();
    unsynced.put(Cf::State, b"a", b"unsynced");
    storage.write(&unsynced, false).unwrap();
    let mut set = WriteSet::default();
    set.put(Cf::State, b"b", b"checkpointed");
    let error = engine
        .checkpointer()
        .write_ingesting(
            &sorted_ids(0, 10, 1),
            &mut set,
            CheckpointMark::at(&engine.tip()),
        )
        .unwrap_err();
    assert!(
        error.to_string().contains("power loss at sync 3"),
        "{error}"
    );
    let restarted = storage.after_power_loss();
    // The ingestion is durable; it did not sync the write before it, and the states and the
    // mark after it are lost.
    assert_eq!(
        restarted.get(Cf::CommandIds, b"id-00000003").unwrap(),
        Some(vec![1, 3])
    );
    assert_eq!(restarted.get(Cf::State, b"a").unwrap(), None);
    assert_eq!(restarted.get(Cf::State, b"b").unwrap(), None);
    assert_eq!(restarted.get(Cf::Meta, b"checkpoint").unwrap(), None);

    for plan in [
        FaultPlan {
            fail_sync_at: Some(2),
            power_loss_at: None,
        },
        FaultPlan {
            fail_sync_at: None,
            power_loss_at: Some(2),
        },
    ] {
        let storage = Arc::new(MemoryStorage::new(plan));
        let engine = Engine::open(storage.clone()).unwrap();
        let checkpointer = engine.checkpointer();
        let mark = CheckpointMark::at(&engine.tip());
        let mut set = WriteSet::default();
        set.put(Cf::State, b"b", b"checkpointed");
        assert!(
            checkpointer
                .write_ingesting(&sorted_ids(0, 10, 1), &mut set, mark)
                .is_err()
        );
        assert!(engine.is_poisoned(), "{plan:?}");
        assert_eq!(storage.syncs(), 2, "the states are not written: {plan:?}");
        assert!(matches!(
            checkpointer.write_ingesting(&sorted_ids(20, 1, 1), &mut WriteSet::default(), mark),
            Err(EngineError::Poisoned)
        ));
        assert_eq!(
            storage
                .after_power_loss()
                .get(Cf::CommandIds, b"id-00000003")
                .unwrap(),
            None,
            "{plan:?}"
        );
    }
}

/// `count` ids of ingestion `round` out of `rounds`, interleaved with every other round's, so
/// that each table spans the family's whole key range as a checkpoint's random ids do.
fn interleaved_ids(round: u32, rounds: u32, count: u32) -> WriteSet {
    let mut set = WriteSet::default();
    for i in 0..count {
        let n = i * rounds + round;
        set.put(
            Cf::CommandIds,
            format!("id-{n:08}").as_bytes(),
            &n.to_le_bytes(),
        );
    }
    set
}

/// Every id `interleaved_ids` gave for `rounds` rounds of `count` is found with its value.
fn assert_interleaved_ids(storage: &RocksStorage, rounds: u32, count: u32) {
    let keys: Vec<Vec<u8>> = (0..rounds * count)
        .map(|n| format!("id-{n:08}").into_bytes())
        .collect();
    let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let found = storage.multi_get(Cf::CommandIds, &refs).unwrap();
    for (n, value) in found.into_iter().enumerate() {
        assert_eq!(value, Some((n as u32).to_le_bytes().to_vec()), "id {n}");
    }
}

/// Waits (bounded) until the background compactions brought `command_ids` to half of
/// `COMMAND_IDS_RUNS_MAX` sorted runs or fewer.
fn wait_for_merged_runs(storage: &RocksStorage, what: &str) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let runs = storage.sorted_runs(Cf::CommandIds).unwrap().unwrap();
        if runs <= keel_engine::COMMAND_IDS_RUNS_MAX / 2 {
            return runs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{runs} sorted runs of command_ids {what}: the compactions did not merge them within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn ingested_command_id_tables_are_merged_and_every_id_stays_found() {
    let dir = tempfile::tempdir().unwrap();
    let storage = RocksStorage::open(dir.path()).unwrap();
    assert_eq!(storage.sorted_runs(Cf::CommandIds).unwrap(), Some(0));
    let rounds = 2 * u32::try_from(keel_engine::COMMAND_IDS_RUNS_MAX).unwrap();
    for round in 0..rounds {
        storage
            .ingest(Cf::CommandIds, &interleaved_ids(round, rounds, 1000))
            .unwrap();
    }
    // Each ingested table overlaps all the others, so each one is a sorted run until merged.
    let runs = wait_for_merged_runs(&storage, &format!("after {rounds} ingested tables"));
    assert!(runs >= 1);
    assert_interleaved_ids(&storage, rounds, 1000);
    drop(storage);
    // And across a reopen.
    let storage = RocksStorage::open(dir.path()).unwrap();
    assert_interleaved_ids(&storage, rounds, 1000);
}

#[test]
fn table_readers_report_the_memory_that_grows_with_the_stored_ids() {
    let dir = tempfile::tempdir().unwrap();
    let storage = RocksStorage::open(dir.path()).unwrap();
    let empty = storage.table_readers(Cf::CommandIds).unwrap().unwrap();
    assert_eq!(empty, keel_engine::TableReaders { bytes: 0, keys: 0 });
    storage
        .ingest(Cf::CommandIds, &interleaved_ids(0, 2, 20_000))
        .unwrap();
    let one = storage.table_readers(Cf::CommandIds).unwrap().unwrap();
    assert_eq!(one.keys, 20_000);
    // A table's bloom filter alone is 16 bits per id: at least 2 bytes each.
    assert!(one.bytes >= 2 * 20_000, "{one:?}");
    storage
        .ingest(Cf::CommandIds, &interleaved_ids(1, 2, 20_000))
        .unwrap();
    let two = storage.table_readers(Cf::CommandIds).unwrap().unwrap();
    assert_eq!(two.keys, 40_000);
    assert!(two.bytes > one.bytes, "{one:?} then {two:?}");
    // Other families are reported on their own; a store without tables answers `None`.
    assert_eq!(
        storage.table_readers(Cf::State).unwrap().map(|r| r.keys),
        Some(0)
    );
    assert_eq!(
        MemoryStorage::default()
            .table_readers(Cf::CommandIds)
            .unwrap(),
        None
    );
}
