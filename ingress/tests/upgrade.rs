//! `keel upgrade` end to end on a real RocksDB store of format 1, written here byte by byte as
//! format 1 wrote it (its five column families, 85-byte headers, `keel.batch.v1` hashes):
//! `keel serve` and `keel audit` refuse it and name the upgrade without changing it; the
//! upgrade keeps it as DIR.v1; the new store audits INTEGRITY_OK and serves the same state; a
//! retry of a command id decided in format 1 (committed or rejected) gets its original answer.

mod common;

use common::{KeelProcess, client};
use keel_engine::format::{ChainTip, seq_key};
use keel_engine::v1::{V1Hasher, V1Header};
use keel_invariants::{
    Aggregate, AggregateId, CommandOutcome, Event, LoggedEvent, RejectCode, Rejection, State,
    codec, ledger,
};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;

const KEEL: &str = env!("CARGO_BIN_EXE_keel");

fn alice() -> AggregateId {
    AggregateId::new(ledger::KIND, "alice")
}

/// A stopped format-1 store: batch 1 opens alice (id `open-1`), batch 2 deposits 50 (`dep-1`)
/// and 25 (no id); `rej-1` was rejected (format 1 kept rejections only in its index).
fn write_v1_store(dir: &Path) {
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let db = rocksdb::DB::open_cf(
        &options,
        dir,
        ["state", "events", "batches", "command_ids", "meta"],
    )
    .expect("a format-1 store");
    let cf = |name: &str| db.cf_handle(name).expect("column family");
    let batches: [Vec<LoggedEvent>; 2] = [
        vec![LoggedEvent {
            command_id: Some("open-1".into()),
            event: Event::new(ledger::Event::AccountOpened {
                account: alice(),
                overdraft_limit: 0,
            }),
        }],
        vec![
            LoggedEvent {
                command_id: Some("dep-1".into()),
                event: Event::new(ledger::Event::Deposited {
                    account: alice(),
                    amount: 50,
                    memo: None,
                }),
            },
            LoggedEvent {
                command_id: None,
                event: Event::new(ledger::Event::Deposited {
                    account: alice(),
                    amount: 25,
                    memo: Some("cash".into()),
                }),
            },
        ],
    ];
    let mut batch = rocksdb::WriteBatch::default();
    batch.put_cf(cf("meta"), b"format_version", 1u32.to_be_bytes());
    let mut tip = ChainTip::default();
    for (i, events) in batches.iter().enumerate() {
        let seq = i as u64 + 1;
        let first = tip.last_event + 1;
        let count = events.len() as u32;
        let at = 1_700_000_000_000_000 + seq;
        let mut hasher = V1Hasher::new(seq, first, count, at, &tip.last_hash);
        for (offset, logged) in events.iter().enumerate() {
            let mut value = seq.to_be_bytes().to_vec();
            codec::encode_event(logged, &mut value);
            hasher.event(first + offset as u64, &value);
            batch.put_cf(cf("events"), seq_key(first + offset as u64), &value);
        }
        let header = V1Header {
            seq,
            first_event: first,
            count,
            committed_at_us: at,
            prev_hash: tip.last_hash,
            hash: hasher.finish(),
        };
        batch.put_cf(cf("batches"), seq_key(seq), header.encode());
        tip = ChainTip {
            last_batch: seq,
            last_event: header.last_event(),
            last_hash: header.hash,
            last_committed_at_us: at,
        };
    }
    batch.put_cf(cf("meta"), b"tip", tip.encode());
    let account = Aggregate {
        version: 3,
        state: State::new(ledger::Account {
            balance: 75,
            overdraft_limit: 0,
            closed: false,
        }),
    };
    let mut value = Vec::new();
    codec::encode_aggregate(&account, &mut value);
    batch.put_cf(cf("state"), alice().as_str().as_bytes(), &value);
    let outcomes = [
        ("open-1", CommandOutcome::Committed { seq: 1 }),
        ("dep-1", CommandOutcome::Committed { seq: 2 }),
        (
            "rej-1",
            CommandOutcome::Rejected(Rejection::new(
                RejectCode::InsufficientFunds,
                "account:alice has 75, cannot withdraw 1000",
            )),
        ),
    ];
    for (id, outcome) in outcomes {
        let mut value = Vec::new();
        codec::encode_outcome(&outcome, &mut value);
        batch.put_cf(cf("command_ids"), id.as_bytes(), &value);
    }
    let mut write = rocksdb::WriteOptions::default();
    write.set_sync(true);
    db.write_opt(batch, &write).expect("written");
}

fn keel(args: &[&str]) -> std::process::Output {
    Command::new(KEEL)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run keel")
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn a_format_1_store_is_refused_then_upgraded_and_keeps_every_answer() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    write_v1_store(&data);
    let store = data.to_str().expect("UTF-8 path");

    // Refused by name, and left as it was (no new column family: format 1 still opens it).
    let serve = keel(&["serve", "--data", store, "--listen", "127.0.0.1:0"]);
    assert!(!serve.status.success());
    assert!(
        text(&serve).contains("keel upgrade --data"),
        "{}",
        text(&serve)
    );
    let audit = keel(&["audit", "--data", store]);
    assert_eq!(audit.status.code(), Some(2), "{}", text(&audit));
    assert!(
        text(&audit).contains("keel upgrade --data"),
        "{}",
        text(&audit)
    );
    let families = rocksdb::DB::list_cf(&rocksdb::Options::default(), &data).expect("families");
    assert!(
        !families.iter().any(|f| f == "log"),
        "opening a format-1 store created {families:?}"
    );

    let upgrade = keel(&["upgrade", "--data", store]);
    assert!(upgrade.status.success(), "{}", text(&upgrade));
    assert!(
        text(&upgrade).contains("2 batches, 3 events, 1 aggregates, 3 command ids"),
        "{}",
        text(&upgrade)
    );
    assert!(root.path().join("data.v1").join("CURRENT").is_file());
    let again = keel(&["upgrade", "--data", store]);
    assert!(
        !again.status.success(),
        "a second upgrade must not overwrite data.v1"
    );

    let audit = keel(&["audit", "--data", store]);
    assert!(audit.status.success(), "{}", text(&audit));
    assert!(text(&audit).contains("INTEGRITY_OK"), "{}", text(&audit));

    let server = KeelProcess::start(&data, &[]);
    let http = client();
    let state: Value = http
        .get(format!("{}/v1/aggregates/account:alice", server.url))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(state["version"], 3, "{state}");
    assert_eq!(state["state"]["balance"], 75, "{state}");
    let retry = json!({"commands": [
        {"type": "deposit", "id": "dep-1", "account": "alice", "amount": 50},
        {"type": "withdraw", "id": "rej-1", "account": "alice", "amount": 1000},
        {"type": "deposit", "id": "dep-2", "account": "alice", "amount": 5},
    ]});
    let answer: Value = http
        .post(format!("{}/v1/batches", server.url))
        .json(&retry)
        .send()
        .await
        .expect("POST")
        .json()
        .await
        .expect("JSON");
    let results = &answer["results"];
    assert_eq!(
        (
            &results[0]["status"],
            &results[0]["seq"],
            &results[0]["replayed"]
        ),
        (&json!("committed"), &json!(2), &json!(true)),
        "{answer}"
    );
    assert_eq!(
        (&results[1]["code"], &results[1]["replayed"]),
        (&json!("insufficient_funds"), &json!(true)),
        "{answer}"
    );
    assert_eq!(
        (&results[2]["status"], &results[2]["seq"]),
        (&json!("committed"), &json!(4)),
        "{answer}"
    );
    assert!(server.terminate().success());
    let audit = keel(&["audit", "--data", store]);
    assert!(text(&audit).contains("INTEGRITY_OK"), "{}", text(&audit));
}
