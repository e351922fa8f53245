//! The integrity audit against real RocksDB stores written by the real sequencer: a clean store
//! after mixed load is intact; each kind of tampering is detected and located; a live store is
//! audited through a secondary instance while the writer keeps committing.

use keel_audit::{
    self as audit, AuditError, AuditOptions, AuditReport, Check, Divergence, Snapshot, SnapshotMode,
};
use keel_engine::format::{decode_seq_key, seq_key};
use keel_engine::{Cf, Engine, RecordView, RocksStorage, Storage, WriteSet};
use keel_invariants::{
    Aggregate, AggregateId, Command, CommandOutcome, Envelope, LoggedEvent, State,
    check_invariants, codec, inventory, ledger,
};
use keel_sequencer::{Config, ItemResult, Reply, Sequencer};
use std::error::Error;
use std::path::Path;
use std::time::{Duration, Instant};

type TestResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

fn account(name: &str) -> AggregateId {
    AggregateId::new(ledger::KIND, name)
}

fn sku(name: &str) -> AggregateId {
    AggregateId::new(inventory::KIND, name)
}

fn plain(command: Command) -> Envelope {
    Envelope {
        id: None,
        expected_version: None,
        command,
    }
}

fn with_id(id: &str, command: Command) -> Envelope {
    Envelope {
        id: Some(id.to_owned()),
        expected_version: None,
        command,
    }
}

fn open_account(name: &str, overdraft_limit: u64) -> Command {
    Command::new(ledger::Command::OpenAccount {
        account: account(name),
        overdraft_limit,
    })
}

fn deposit(name: &str, amount: u64) -> Command {
    Command::new(ledger::Command::Deposit {
        account: account(name),
        amount,
        memo: Some("pay".into()),
    })
}

fn withdraw(name: &str, amount: u64) -> Command {
    Command::new(ledger::Command::Withdraw {
        account: account(name),
        amount,
        memo: None,
    })
}

fn transfer(from: &str, to: &str, amount: u64) -> Command {
    Command::new(ledger::Command::Transfer {
        from: account(from),
        to: account(to),
        amount,
        memo: None,
    })
}

fn inventory(command: inventory::Command) -> Command {
    Command::new(command)
}

fn submit(sequencer: &Sequencer, commands: Vec<Envelope>, atomic: bool) -> TestResult<Reply> {
    let receiver = sequencer.submit(commands, atomic)?;
    Ok(receiver.blocking_recv()??)
}

fn committed(reply: &Reply) -> usize {
    reply
        .results
        .iter()
        .filter(|r| {
            matches!(
                r,
                ItemResult::Committed {
                    replayed: false,
                    ..
                }
            )
        })
        .count()
}

/// Writes a store with both domains, rejections, atomic requests (committed and rolled back),
/// idempotent retries and group-committed submissions, then closes it.
fn load_mixed(dir: &Path) -> TestResult {
    let sequencer = Sequencer::start(Engine::open_rocksdb(dir)?, Config::default())?;
    let mut opens: Vec<Envelope> = (0..6)
        .map(|i| {
            with_id(
                &format!("open-a{i}"),
                open_account(&format!("a{i}"), if i == 0 { 50 } else { 0 }),
            )
        })
        .collect();
    for s in ["s0", "s1", "s2"] {
        opens.push(plain(inventory(inventory::Command::CreateSku {
            sku: sku(s),
            on_hand: 20,
        })));
    }
    assert_eq!(committed(&submit(&sequencer, opens, false)?), 9);
    let deposits = (0..6)
        .map(|i| {
            with_id(
                &format!("dep-{i}"),
                deposit(&format!("a{i}"), 100 * (i + 1)),
            )
        })
        .collect();
    assert_eq!(committed(&submit(&sequencer, deposits, false)?), 6);
    let mixed = vec![
        with_id("tr-1", transfer("a1", "a2", 30)),
        plain(withdraw("a3", 40)),
        with_id("rej-1", withdraw("a1", 1_000_000)),
        plain(deposit("ghost", 5)),
        plain(transfer("a2", "a2", 1)),
        plain(withdraw("a0", 150)),
    ];
    assert_eq!(committed(&submit(&sequencer, mixed, false)?), 3);
    let atomic_ok = vec![
        with_id("atomic-ok", transfer("a4", "a5", 10)),
        plain(inventory(inventory::Command::Reserve {
            sku: sku("s0"),
            qty: 5,
            order: "o1".into(),
        })),
    ];
    assert_eq!(committed(&submit(&sequencer, atomic_ok, true)?), 2);
    let atomic_rolled_back = vec![
        with_id("atomic-x", transfer("a3", "a4", 10)),
        plain(withdraw("a4", 999_999)),
    ];
    assert_eq!(committed(&submit(&sequencer, atomic_rolled_back, true)?), 0);
    // Retries of a committed and of a rejected id: answered from the index, nothing written.
    let retries = vec![
        with_id("dep-0", deposit("a0", 100)),
        with_id("rej-1", withdraw("a1", 1_000_000)),
    ];
    let reply = submit(&sequencer, retries, false)?;
    assert!(reply.results.iter().all(|r| matches!(
        r,
        ItemResult::Committed { replayed: true, .. } | ItemResult::Rejected { replayed: true, .. }
    )));
    let stock = vec![
        plain(inventory(inventory::Command::Restock {
            sku: sku("s1"),
            qty: 10,
        })),
        plain(inventory(inventory::Command::Reserve {
            sku: sku("s1"),
            qty: 3,
            order: "o2".into(),
        })),
        plain(inventory(inventory::Command::Release {
            sku: sku("s1"),
            order: "o2".into(),
        })),
        plain(inventory(inventory::Command::Reserve {
            sku: sku("s1"),
            qty: 4,
            order: "o3".into(),
        })),
        plain(inventory(inventory::Command::Ship {
            sku: sku("s1"),
            order: "o3".into(),
        })),
        plain(inventory(inventory::Command::Reserve {
            sku: sku("s2"),
            qty: 1000,
            order: "o4".into(),
        })),
    ];
    assert_eq!(committed(&submit(&sequencer, stock, false)?), 5);
    let close = vec![
        with_id("open-a9", open_account("a9", 0)),
        plain(Command::new(ledger::Command::CloseAccount {
            account: account("a9"),
        })),
    ];
    assert_eq!(committed(&submit(&sequencer, close, false)?), 2);
    // Several submissions in flight at once, so batches hold more than one request.
    let mut receivers = Vec::new();
    for i in 0..8u64 {
        let commands = vec![
            with_id(&format!("grp-{i}"), transfer("a5", "a1", 1 + i)),
            plain(deposit("a2", 7)),
        ];
        receivers.push(sequencer.submit(commands, false)?);
    }
    for receiver in receivers {
        assert_eq!(committed(&receiver.blocking_recv()??), 2);
    }
    sequencer.shutdown();
    Ok(())
}

fn audit_stopped(dir: &Path) -> TestResult<AuditReport> {
    let snapshot = Snapshot::open(dir)?;
    assert_eq!(
        snapshot.mode(),
        SnapshotMode::ReadOnly,
        "a stopped store opens read-only"
    );
    Ok(audit::audit_snapshot(
        &snapshot,
        &AuditOptions::default(),
        &mut |_| {},
    )?)
}

/// A fresh store with the mixed load, opened read-write for tampering.
fn tamper_target() -> TestResult<(tempfile::TempDir, RocksStorage)> {
    let dir = tempfile::tempdir()?;
    load_mixed(dir.path())?;
    assert!(
        audit_stopped(dir.path())?.ok(),
        "the store is intact before tampering"
    );
    let storage = RocksStorage::open(dir.path())?;
    Ok((dir, storage))
}

fn put(storage: &RocksStorage, cf: Cf, key: &[u8], value: &[u8]) -> TestResult {
    let mut set = WriteSet::default();
    set.put(cf, key, value);
    Ok(storage.write(&set, true)?)
}

/// One event as stored.
struct Stored {
    seq: u64,
    batch: u64,
    logged: LoggedEvent,
}

/// Every event as stored, decoded.
fn events(storage: &dyn Storage) -> TestResult<Vec<Stored>> {
    let mut raw = Vec::new();
    storage.scan(Cf::Log, &[], &mut |key, value| {
        raw.push((key.to_vec(), value.to_vec()));
        true
    })?;
    let mut out = Vec::new();
    for (key, value) in raw {
        let batch = decode_seq_key(&key)?;
        let view = RecordView::decode(batch, &value)?;
        for (seq, payload) in view.events() {
            out.push(Stored {
                seq,
                batch,
                logged: codec::decode_event(payload)?,
            });
        }
    }
    Ok(out)
}

/// Rewrites the event payloads of batch `batch`'s record with `edit` (which may change,
/// remove or reorder them), keeping the record's layout consistent (event count, frames) but
/// NOT its hash: what someone editing the store without the chain's secret-free BLAKE3 would
/// still have to get past.
fn rewrite_events(
    storage: &RocksStorage,
    batch: u64,
    edit: impl FnOnce(&mut Vec<Vec<u8>>),
) -> TestResult {
    let value = storage.get(Cf::Log, &seq_key(batch))?.ok_or("record")?;
    let view = RecordView::decode(batch, &value)?;
    let mut payloads: Vec<Vec<u8>> = view.events().map(|(_, p)| p.to_vec()).collect();
    let events_len: usize = payloads.iter().map(|p| 4 + p.len()).sum();
    edit(&mut payloads);
    const FIXED: usize = 103;
    let mut out = value[..FIXED].to_vec();
    out[17..21].copy_from_slice(&(payloads.len() as u32).to_be_bytes());
    for p in &payloads {
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p);
    }
    out.extend_from_slice(&value[FIXED + events_len..]);
    put(storage, Cf::Log, &seq_key(batch), &out)
}

/// The last event that touched `id`: (seq, batch).
fn last_touch(storage: &dyn Storage, id: &AggregateId) -> TestResult<(u64, u64)> {
    events(storage)?
        .into_iter()
        .rev()
        .find(|e| e.logged.event.targets().iter().any(|t| t == id))
        .map(|e| (e.seq, e.batch))
        .ok_or_else(|| "no event touches it".into())
}

/// A batch with at least two events that is neither the first nor the last: (batch, events).
fn middle_batch(storage: &dyn Storage) -> TestResult<(u64, Vec<u64>)> {
    let all = events(storage)?;
    let last_batch = all.last().map_or(0, |e| e.batch);
    (2..last_batch)
        .map(|b| {
            (
                b,
                all.iter()
                    .filter(|e| e.batch == b)
                    .map(|e| e.seq)
                    .collect::<Vec<_>>(),
            )
        })
        .find(|(_, seqs)| seqs.len() >= 2)
        .ok_or_else(|| "no middle batch with two events".into())
}

fn assert_found(report: &AuditReport, what: &str, matches: impl Fn(&Divergence) -> bool) {
    assert!(!report.ok(), "{what}: the audit says intact");
    assert!(
        report.divergences.iter().any(matches),
        "{what}: not located; divergences: {:#?}",
        report.divergences
    );
}

#[test]
fn clean_store_after_mixed_load_is_intact() -> TestResult {
    let dir = tempfile::tempdir()?;
    load_mixed(dir.path())?;
    let report = audit_stopped(dir.path())?;
    assert!(report.ok(), "{:#?}", report.divergences);
    assert_eq!(report.aggregates, 10, "6 + 1 accounts, 3 SKUs");
    assert_eq!(report.events, report.tip.last_event);
    assert_eq!(report.batches, report.tip.last_batch);
    assert_eq!(report.events, 9 + 6 + 3 + 2 + 5 + 2 + 16);
    // Ids: 6 opens, 6 deposits, tr-1, rej-1, atomic-ok, open-a9, 8 grp (atomic-x rolled back).
    assert_eq!(report.command_ids, 6 + 6 + 4 + 8);
    assert_eq!(report.command_ids_rejected, 1);
    // Restarting the writer on the store and committing more keeps it intact.
    let sequencer = Sequencer::start(Engine::open_rocksdb(dir.path())?, Config::default())?;
    assert_eq!(
        committed(&submit(
            &sequencer,
            vec![with_id("later", deposit("a3", 1))],
            false
        )?),
        1
    );
    drop(sequencer);
    let report = audit_stopped(dir.path())?;
    assert!(report.ok(), "{:#?}", report.divergences);
    assert_eq!(report.events, 44);
    Ok(())
}

#[test]
fn flipped_byte_of_a_stored_state_is_located() -> TestResult {
    let (dir, storage) = tamper_target()?;
    let id = account("a2");
    let (seq, batch) = last_touch(&storage, &id)?;
    let mut value = storage
        .get(Cf::State, id.as_str().as_bytes())?
        .ok_or("a2 is stored")?;
    let last = value.len() - 1;
    value[last] ^= 0x01; // the `closed` flag: still decodes, now differs
    put(&storage, Cf::State, id.as_str().as_bytes(), &value)?;
    drop(storage);
    let report = audit_stopped(dir.path())?;
    assert_found(&report, "flipped state byte", |d| {
        d.check == Check::State
            && d.aggregate.as_deref() == Some("account:a2")
            && d.seq == Some(seq)
            && d.batch == Some(batch)
    });
    Ok(())
}

#[test]
fn flipped_byte_of_an_event_is_located() -> TestResult {
    let (dir, storage) = tamper_target()?;
    let (batch, seqs) = middle_batch(&storage)?;
    let seq = seqs[1];
    let _ = seq;
    rewrite_events(&storage, batch, |payloads| {
        let last = payloads[1].len() - 1;
        payloads[1][last] ^= 0x01;
    })?;
    drop(storage);
    let report = audit_stopped(dir.path())?;
    // A hash covers a whole batch, so the chain names the batch and the events it covers.
    let range = format!("covers events {}..{}", seqs[0], seqs[seqs.len() - 1]);
    assert_found(&report, "flipped event byte", |d| {
        d.check == Check::Chain && d.batch == Some(batch) && d.detail.contains(&range)
    });
    Ok(())
}

#[test]
fn deleted_event_is_located() -> TestResult {
    let (dir, storage) = tamper_target()?;
    let (batch, _) = middle_batch(&storage)?;
    rewrite_events(&storage, batch, |payloads| {
        payloads.remove(0);
    })?;
    drop(storage);
    let report = audit_stopped(dir.path())?;
    assert_found(&report, "deleted event", |d| {
        d.check == Check::Chain && d.batch == Some(batch) && d.detail.contains("hash")
    });
    Ok(())
}

#[test]
fn swapped_events_are_located() -> TestResult {
    let (dir, storage) = tamper_target()?;
    let (batch, _) = middle_batch(&storage)?;
    rewrite_events(&storage, batch, |payloads| {
        assert_ne!(payloads[0], payloads[1]);
        payloads.swap(0, 1);
    })?;
    drop(storage);
    let report = audit_stopped(dir.path())?;
    assert_found(&report, "swapped events", |d| {
        d.check == Check::Chain && d.batch == Some(batch)
    });
    Ok(())
}

#[test]
fn deleted_batch_header_is_located() -> TestResult {
    let (dir, storage) = tamper_target()?;
    let (batch, _) = middle_batch(&storage)?;
    storage.delete(Cf::Log, &seq_key(batch))?;
    drop(storage);
    let report = audit_stopped(dir.path())?;
    assert_found(&report, "deleted record", |d| {
        d.check == Check::Chain && d.batch == Some(batch) && d.detail.contains("missing")
    });
    // The replay reads on past the break: the events of the deleted batch are missing from
    // it, so the checkpointed state of what they touched differs from it.
    assert_found(&report, "deleted record's effects", |d| {
        d.check == Check::State
    });
    Ok(())
}

#[test]
fn repointed_command_id_is_located() -> TestResult {
    let (dir, storage) = tamper_target()?;
    let all = events(&storage)?;
    let (seq, batch) = all
        .iter()
        .find(|e| e.logged.command_id.as_deref() == Some("dep-3"))
        .map(|e| (e.seq, e.batch))
        .ok_or("dep-3 committed")?;
    let other = seq + 1;
    let mut value = Vec::new();
    codec::encode_outcome(&CommandOutcome::Committed { seq: other }, &mut value);
    put(&storage, Cf::CommandIds, b"dep-3", &value)?;
    drop(storage);
    let report = audit_stopped(dir.path())?;
    assert_found(&report, "repointed command id", |d| {
        d.check == Check::CommandIndex
            && d.seq == Some(seq)
            && d.batch == Some(batch)
            && d.detail.contains("dep-3")
            && d.found.as_deref() == Some(format!("committed at seq {other}").as_str())
    });
    Ok(())
}

#[test]
fn decodable_state_that_breaks_an_invariant_is_located() -> TestResult {
    let (dir, storage) = tamper_target()?;
    let id = account("a1");
    let stored = storage
        .get(Cf::State, id.as_str().as_bytes())?
        .ok_or("a1 is stored")?;
    let version = codec::decode_aggregate(&stored)?.version;
    let broken = Aggregate {
        version,
        state: State::new(ledger::Account {
            balance: -1000,
            overdraft_limit: 0,
            closed: false,
        }),
    };
    let mut value = Vec::new();
    codec::encode_aggregate(&broken, &mut value);
    put(&storage, Cf::State, id.as_str().as_bytes(), &value)?;
    drop(storage);
    let report = audit_stopped(dir.path())?;
    assert_found(&report, "invariant", |d| {
        d.check == Check::Invariant && d.aggregate.as_deref() == Some("account:a1")
    });
    assert_found(&report, "state", |d| {
        d.check == Check::State && d.aggregate.as_deref() == Some("account:a1")
    });
    Ok(())
}

#[test]
fn record_with_an_impossible_event_range_is_a_finding_not_a_panic() -> TestResult {
    let (dir, storage) = tamper_target()?;
    let (batch, _) = middle_batch(&storage)?;
    let mut value = storage.get(Cf::Log, &seq_key(batch))?.ok_or("record")?;
    value[9..17].copy_from_slice(&0u64.to_be_bytes()); // first event 0
    value[17..21].copy_from_slice(&u32::MAX.to_be_bytes());
    put(&storage, Cf::Log, &seq_key(batch), &value)?;
    drop(storage);
    let report = audit_stopped(dir.path())?;
    assert_found(&report, "impossible range", |d| {
        d.check == Check::Chain && d.batch == Some(batch)
    });
    Ok(())
}

#[test]
fn missing_directory_and_foreign_directory_are_errors_not_verdicts() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nope");
    assert!(matches!(
        Snapshot::open(&missing),
        Err(AuditError::NotAStore(_))
    ));
    assert!(!missing.exists(), "opening must not create the directory");
    std::fs::write(dir.path().join("hello.txt"), "not a store")?;
    assert!(matches!(
        Snapshot::open(dir.path()),
        Err(AuditError::NotAStore(_))
    ));
    Ok(())
}

#[test]
fn live_store_is_audited_through_a_secondary_while_writes_continue() -> TestResult {
    let dir = tempfile::tempdir()?;
    load_mixed(dir.path())?;
    let sequencer = Sequencer::start(Engine::open_rocksdb(dir.path())?, Config::default())?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let committed_during = std::thread::scope(|scope| -> TestResult<(AuditReport, u64)> {
        let writer = scope.spawn(|| -> TestResult<u64> {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut items = 0;
            for i in 0..20_000u64 {
                if stop.load(std::sync::atomic::Ordering::Acquire) || Instant::now() > deadline {
                    break;
                }
                let commands = (0..20)
                    .map(|j| with_id(&format!("live-{i}-{j}"), transfer("a5", "a2", 1)))
                    .collect::<Vec<_>>();
                let reply = submit(&sequencer, commands, false)?;
                let back = submit(&sequencer, vec![plain(transfer("a2", "a5", 20))], false)?;
                items += (committed(&reply) + committed(&back)) as u64;
            }
            Ok(items)
        });
        wait_for_tip_past(&sequencer, 43)?;
        let snapshot = Snapshot::open(dir.path())?;
        assert_eq!(
            snapshot.mode(),
            SnapshotMode::Secondary {
                holder_pid: Some(std::process::id())
            }
        );
        let report = audit::audit_snapshot(&snapshot, &AuditOptions::default(), &mut |_| {})?;
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, std::sync::atomic::Ordering::Release);
        let items = writer.join().map_err(|_| "writer panicked")??;
        Ok((report, items))
    })?;
    let (report, items) = committed_during;
    assert!(report.ok(), "{:#?}", report.divergences);
    assert!(report.events > 43, "the snapshot includes some live writes");
    let tip_after = sequencer.reader().tip()?;
    assert!(
        items > 0 && tip_after.last_event > report.tip.last_event,
        "writes continued past the snapshot"
    );
    drop(sequencer);
    let report = audit_stopped(dir.path())?;
    assert!(report.ok(), "{:#?}", report.divergences);
    Ok(())
}

/// Waits (bounded) until the writer committed past event `seq`.
fn wait_for_tip_past(sequencer: &Sequencer, seq: u64) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(10);
    while sequencer.reader().tip()?.last_event <= seq {
        if Instant::now() > deadline {
            return Err("the writer made no progress in 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// More events than one chunk of the audit's two-thread pipeline (4096), so chunk boundaries,
/// chunk reuse and the end of the log are exercised; then one late event is deleted.
#[test]
fn log_spanning_many_pipeline_chunks_is_intact_then_a_late_deletion_is_located() -> TestResult {
    let dir = tempfile::tempdir()?;
    let sequencer = Sequencer::start(Engine::open_rocksdb(dir.path())?, Config::default())?;
    let opens = (0..100)
        .map(|a| plain(open_account(&format!("b{a}"), 0)))
        .collect();
    assert_eq!(committed(&submit(&sequencer, opens, false)?), 100);
    for round in 0..15u64 {
        let commands = (0..1000u64)
            .map(|i| {
                with_id(
                    &format!("r{round}-{i}"),
                    deposit(&format!("b{}", (i * 7 + round) % 100), 1 + i),
                )
            })
            .collect();
        assert_eq!(committed(&submit(&sequencer, commands, false)?), 1000);
    }
    drop(sequencer);
    let report = audit_stopped(dir.path())?;
    assert!(report.ok(), "{:#?}", report.divergences);
    assert_eq!(
        (report.events, report.aggregates, report.command_ids),
        (15_100, 100, 15_000)
    );
    let storage = RocksStorage::open(dir.path())?;
    let seq = 12_345;
    let all = events(&storage)?;
    let batch = all
        .iter()
        .find(|e| e.seq == seq)
        .map(|e| e.batch)
        .ok_or("event 12345")?;
    let first = all
        .iter()
        .find(|e| e.batch == batch)
        .map(|e| e.seq)
        .ok_or("its batch")?;
    rewrite_events(&storage, batch, |payloads| {
        payloads.remove((seq - first) as usize);
    })?;
    drop(storage);
    let report = audit_stopped(dir.path())?;
    assert_found(&report, "late deletion", |d| {
        d.check == Check::Chain && d.batch == Some(batch)
    });
    // The later events of the batch move down one sequence in the replay, so their ids and
    // the checkpointed state disagree with it too (more than the report keeps in detail).
    assert!(report.count(Check::CommandIndex) > 0, "{report:#?}");
    assert!(report.count(Check::State) > 0, "{report:#?}");
    assert_eq!(
        report.events, 15_099,
        "the replay covers every event but the deleted one"
    );
    Ok(())
}

/// The other ways the index and the log can disagree: an entry deleted, an entry turned into
/// a rejection, and an event rewritten to carry another command's id (a duplicate).
#[test]
fn unindexed_misrecorded_and_duplicated_command_ids_are_located() -> TestResult {
    let (dir, storage) = tamper_target()?;
    let all = events(&storage)?;
    let carrying = |id: &str| {
        all.iter()
            .find(|e| e.logged.command_id.as_deref() == Some(id))
    };
    let tr = carrying("tr-1").ok_or("tr-1 committed")?;
    storage.delete(Cf::CommandIds, b"tr-1")?;
    let grp = carrying("grp-2").ok_or("grp-2 committed")?;
    let rejected = CommandOutcome::Rejected(keel_invariants::Rejection::new(
        keel_invariants::RejectCode::InsufficientFunds,
        "forged",
    ));
    let mut value = Vec::new();
    codec::encode_outcome(&rejected, &mut value);
    put(&storage, Cf::CommandIds, b"grp-2", &value)?;
    let victim = carrying("grp-5").ok_or("grp-5 committed")?;
    let mut forged = victim.logged.clone();
    forged.command_id = Some("dep-1".into());
    let first_of_batch = all
        .iter()
        .find(|e| e.batch == victim.batch)
        .map(|e| e.seq)
        .ok_or("batch")?;
    rewrite_events(&storage, victim.batch, |payloads| {
        let mut value = Vec::new();
        codec::encode_event(&forged, &mut value);
        payloads[(victim.seq - first_of_batch) as usize] = value;
    })?;
    drop(storage);
    let report = audit_stopped(dir.path())?;
    let index = |d: &Divergence, seq: u64, words: &str| {
        d.check == Check::CommandIndex && d.seq == Some(seq) && d.detail.contains(words)
    };
    assert_found(&report, "deleted entry", |d| {
        index(d, tr.seq, "\"tr-1\"") && d.batch == Some(tr.batch)
    });
    assert_found(&report, "rejected entry", |d| {
        index(d, grp.seq, "\"grp-2\"")
            && d.found.as_deref() == Some("rejected (insufficient_funds)")
    });
    assert_found(&report, "duplicate id", |d| {
        index(d, victim.seq, "\"dep-1\" is carried by events")
    });
    assert_found(&report, "rewritten event", |d| {
        d.check == Check::Chain && d.batch == Some(victim.batch)
    });
    Ok(())
}

/// Format 2 proves the conservation laws on the log's own fold (every aggregate at the tip)
/// and the stored checkpoint equal to that fold: an SKU edited in the store within its
/// invariants is the state check's finding, and the laws still hold for the log.
#[test]
fn sku_edited_within_its_invariants_differs_from_the_fold_the_laws_hold_for() -> TestResult {
    let (dir, storage) = tamper_target()?;
    let id = sku("s1");
    let stored = storage
        .get(Cf::State, id.as_str().as_bytes())?
        .ok_or("s1 is stored")?;
    let mut edited = codec::decode_aggregate(&stored)?;
    let Some(stock) = edited
        .state
        .downcast_mut::<keel_invariants::inventory::Sku>()
    else {
        return Err("s1 is an SKU".into());
    };
    // More stock than the log ever brought in: every invariant still holds.
    stock.on_hand += 5;
    let on_hand = stock.on_hand;
    assert_eq!(check_invariants(&edited), Ok(()));
    let mut value = Vec::new();
    codec::encode_aggregate(&edited, &mut value);
    put(&storage, Cf::State, id.as_str().as_bytes(), &value)?;
    let (seq, batch) = last_touch(&storage, &id)?;
    drop(storage);
    let report = audit_stopped(dir.path())?;
    let names: Vec<&str> = report.laws.iter().map(|l| l.name()).collect();
    assert_eq!(
        names,
        ["ledger.money", "inventory.on_hand", "inventory.reserved"]
    );
    assert_found(&report, "edited SKU", |d| {
        d.check == Check::State
            && d.aggregate.as_deref() == Some("sku:s1")
            && d.found
                .as_deref()
                .is_some_and(|f| f.contains(&format!("on_hand: {on_hand}")))
            && (d.seq, d.batch) == (Some(seq), Some(batch))
    });
    assert_eq!(report.count(Check::Conservation), 0, "{report:#?}");
    Ok(())
}

#[test]
fn log_state_knows_every_aggregate_at_the_tip_and_at_an_earlier_point() -> TestResult {
    let dir = tempfile::tempdir()?;
    load_mixed(dir.path())?;
    let all = {
        let storage = RocksStorage::open_read_only(dir.path())?;
        events(&storage)?
    };
    let tip = all.last().ok_or("events")?.seq;
    for point in [0, 1, tip / 2, tip - 1, tip, tip + 100] {
        let snapshot = Snapshot::open(dir.path())?;
        let options = AuditOptions {
            point: Some(point),
            ..AuditOptions::default()
        };
        let (report, log) = audit::audit_snapshot_with_log(&snapshot, &options, &mut |_| {})?;
        assert!(report.ok(), "{report:#?}");
        assert_eq!(log.point(), point.min(tip));
        // Replay the prefix up to the point by hand, and the whole log.
        let fold = |upto: u64| {
            let mut states: std::collections::HashMap<String, (Aggregate, u64)> =
                std::collections::HashMap::new();
            for e in all.iter().filter(|e| e.seq <= upto) {
                for (target, id) in e.logged.event.targets().iter().enumerate() {
                    let previous = states.remove(id.as_str()).map(|(a, _)| a);
                    let next = keel_invariants::apply(&e.logged.event, target, previous);
                    states.insert(id.as_str().to_owned(), (next, e.seq));
                }
            }
            states
        };
        let at_point = fold(point);
        let at_tip = fold(tip);
        assert_eq!(log.len(), at_tip.len());
        for (id, (aggregate, last_seq)) in &at_tip {
            let found = log.at_tip(id).ok_or("at tip")?;
            assert_eq!((found.aggregate, found.last_seq), (aggregate, *last_seq));
            let expected = at_point.get(id).map(|(a, s)| (a, *s));
            let found = log.at_point(id).map(|at| (at.aggregate, at.last_seq));
            assert_eq!(found, expected, "{id} at point {point}");
        }
        assert_eq!(log.iter_at_point().count(), at_point.len());
    }
    Ok(())
}

/// A power loss at each sync of a run that checkpoints every few batches leaves a store that
/// audits clean, that the writer recovers, and that answers the retry of every acknowledged id
/// with its original outcome. Returns how many of those stores held ids of batches after the
/// checkpoint's mark (a checkpoint that ingests its ids does so before it writes its mark).
/// For each such id, an index entry that disagrees with the log is found.
fn power_loss_at_every_sync(checkpoint_ingest_ids_min: usize) -> TestResult<usize> {
    use keel_engine::{FaultPlan, MemoryStorage};
    use std::sync::Arc;
    let config = || Config {
        checkpoint_every_batches: 3,
        checkpoint_interval: Duration::from_secs(3600),
        checkpoint_ingest_ids_min,
        ..Config::default()
    };
    let round = |r: u64| {
        vec![
            with_id(&format!("d-{r}"), deposit(&format!("a{}", r % 3), r + 1)),
            with_id(
                &format!("x-{r}"),
                withdraw(&format!("a{}", r % 3), 1_000_000),
            ),
        ]
    };
    let opens = || {
        (0..3)
            .map(|i| with_id(&format!("open-{i}"), open_account(&format!("a{i}"), 0)))
            .collect::<Vec<_>>()
    };
    let (mut beyond_mark, mut losses) = (0, 0);
    for loss_at in 2..=40u64 {
        let storage = Arc::new(MemoryStorage::new(FaultPlan {
            fail_sync_at: None,
            power_loss_at: Some(loss_at),
        }));
        let sequencer = Sequencer::start(Engine::open(storage.clone())?, config())?;
        // The batch of each acknowledged submission, and what it answered.
        let mut acked: Vec<(u64, Vec<Envelope>, Reply)> = Vec::new();
        if let Ok(reply) = submit(&sequencer, opens(), false) {
            acked.push((reply.batch.ok_or("the opens commit")?, opens(), reply));
            for r in 0..12 {
                let Ok(reply) = submit(&sequencer, round(r), false) else {
                    break;
                };
                // Each round commits its deposit, so it has a batch of its own.
                acked.push((reply.batch.ok_or("a deposit commits")?, round(r), reply));
            }
        }
        sequencer.shutdown();
        if storage.syncs() < loss_at {
            break; // the run ended before this sync: every point is covered
        }
        losses += 1;
        let restarted = Arc::new(storage.after_power_loss());
        let report = audit::audit(restarted.as_ref(), &AuditOptions::default(), &mut |_| {})?;
        assert!(report.ok(), "loss at sync {loss_at}: {report:#?}");
        let mark = Engine::open(restarted.clone())?
            .reader()
            .checkpoint_mark()?
            .batch;
        for (batch, commands, _) in acked.iter().filter(|(batch, ..)| *batch > mark) {
            let ids: Vec<&str> = commands.iter().filter_map(|c| c.id.as_deref()).collect();
            if restarted.get(Cf::CommandIds, ids[0].as_bytes())?.is_none() {
                continue;
            }
            beyond_mark += 1;
            // Such entries are accepted because they agree with the log: a committed id or a
            // rejected one indexed otherwise is found.
            let forged_rejection = CommandOutcome::Rejected(keel_invariants::Rejection::new(
                keel_invariants::RejectCode::AccountClosed,
                "forged",
            ));
            for (id, forged) in ids
                .iter()
                .zip([forged_rejection, CommandOutcome::Committed { seq: 1 }])
            {
                let store = restarted.after_power_loss();
                let mut value = Vec::new();
                codec::encode_outcome(&forged, &mut value);
                let mut set = WriteSet::default();
                set.put(Cf::CommandIds, id.as_bytes(), &value);
                store.write(&set, true)?;
                let report = audit::audit(&store, &AuditOptions::default(), &mut |_| {})?;
                assert_found(&report, "an id after the mark indexed otherwise", |d| {
                    d.check == Check::CommandIndex
                        && d.batch == Some(*batch)
                        && (d.detail.contains(id) || d.detail.contains("not indexed as rejected"))
                });
            }
        }
        let sequencer = Sequencer::start(Engine::open(restarted.clone())?, config())?;
        for (batch, commands, reply) in acked {
            let again = submit(&sequencer, commands, false)?;
            assert_eq!(again.results.len(), reply.results.len());
            for (first, retry) in reply.results.iter().zip(&again.results) {
                let same = match (first, retry) {
                    (
                        ItemResult::Committed { seq, .. },
                        ItemResult::Committed {
                            seq: s,
                            replayed: true,
                        },
                    ) => seq == s,
                    (
                        ItemResult::Rejected { rejection, .. },
                        ItemResult::Rejected {
                            rejection: r,
                            replayed: true,
                        },
                    ) => rejection.code == r.code,
                    _ => false,
                };
                assert!(
                    same,
                    "loss at sync {loss_at}, batch {batch}: {first:?} then {retry:?}"
                );
            }
        }
        sequencer.shutdown();
        let report = audit::audit(restarted.as_ref(), &AuditOptions::default(), &mut |_| {})?;
        assert!(
            report.ok(),
            "after the retries, loss at {loss_at}: {report:#?}"
        );
    }
    assert!(losses > 10, "the run syncs more than ten times ({losses})");
    Ok(beyond_mark)
}

/// Checkpoints that ingest their ids (here every one): some power loss falls between a
/// checkpoint's ingestion and its mark.
#[test]
fn every_power_loss_with_ingesting_checkpoints_leaves_a_store_that_audits_clean() -> TestResult {
    let beyond_mark = power_loss_at_every_sync(1)?;
    assert!(
        beyond_mark > 0,
        "some power loss falls between a checkpoint's ingestion and its mark"
    );
    Ok(())
}

/// Checkpoints with fewer ids than the ingestion threshold write them with the mark, in one
/// write: no store ever holds ids after its mark.
#[test]
fn every_power_loss_with_small_checkpoints_leaves_a_store_that_audits_clean() -> TestResult {
    assert_eq!(
        power_loss_at_every_sync(Config::default().checkpoint_ingest_ids_min)?,
        0
    );
    Ok(())
}
