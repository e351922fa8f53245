//! Crash safety: a real `keel serve` under concurrent load is killed with SIGKILL at random
//! moments, restarted, and the store must hold every acknowledged item, with gapless sequences,
//! whole batches only, and a verifying hash chain.
#![allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report

mod common;

use common::{KeelProcess, client};
use keel_engine::{RocksStorage, verify_chain};
use keel_invariants::{Event, codec, ledger};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ACCOUNTS: usize = 16;
const WORKERS: usize = 4;
const ITEMS_PER_REQUEST: usize = 50;
const ROUNDS: usize = 5;

/// Acknowledged items: command id -> (event seq, account, amount).
type Acked = Arc<Mutex<HashMap<String, (u64, usize, u64)>>>;

fn next_random(state: &mut u64) -> u64 {
    // xorshift64*: enough to spread kill moments; the seed is printed for reproduction.
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

async fn load(url: String, worker: usize, round: usize, acked: Acked) {
    let c = client();
    for request in 0..10_000 {
        let items: Vec<(String, usize, u64)> = (0..ITEMS_PER_REQUEST)
            .map(|i| {
                let n = request * ITEMS_PER_REQUEST + i;
                (
                    format!("r{round}-w{worker}-{n}"),
                    (worker * 7 + n) % ACCOUNTS,
                    (n % 9 + 1) as u64,
                )
            })
            .collect();
        let commands: Vec<Value> = items
            .iter()
            .map(|(id, account, amount)| json!({"type": "deposit", "id": id, "account": format!("acc-{account}"), "amount": amount}))
            .collect();
        let Ok(response) = c
            .post(format!("{url}/v1/batches"))
            .json(&json!({"commands": commands}))
            .send()
            .await
        else {
            return; // the server died: this request is unacknowledged
        };
        if response.status() != 200 {
            return;
        }
        let Ok(body) = response.json::<Value>().await else {
            return;
        };
        let mut acked = acked.lock().unwrap();
        for ((id, account, amount), result) in
            items.into_iter().zip(body["results"].as_array().unwrap())
        {
            assert_eq!(result["status"], "committed", "{result}");
            acked.insert(id, (result["seq"].as_u64().unwrap(), account, amount));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_never_loses_an_acknowledged_item() {
    let dir = tempfile::tempdir().unwrap();
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let acked: Acked = Arc::default();
    {
        let keel = KeelProcess::start(dir.path(), &[]);
        let opens: Vec<Value> = (0..ACCOUNTS)
            .map(|i| json!({"type": "open_account", "account": format!("acc-{i}")}))
            .collect();
        let r = client()
            .post(format!("{}/v1/batches", keel.url))
            .json(&json!({"commands": opens}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        keel.kill9();
    }
    for round in 0..ROUNDS {
        // Every other life ingests every checkpoint's ids (a checkpoint every 4 batches), so
        // kill -9 lands in both kinds of checkpoint, and an ingestion follows ids that small
        // checkpoints left in the memtable.
        let flags: &[&str] = if round % 2 == 1 {
            &[
                "--checkpoint-ingest-ids-min",
                "1",
                "--checkpoint-every-batches",
                "4",
            ]
        } else {
            &[]
        };
        let keel = KeelProcess::start(dir.path(), flags);
        let tasks: Vec<_> = (0..WORKERS)
            .map(|w| tokio::spawn(load(keel.url.clone(), w, round, Arc::clone(&acked))))
            .collect();
        let delay = 150 + next_random(&mut seed) % 600;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        keel.kill9();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("load stops")
                .unwrap();
        }
        eprintln!(
            "round {round}: killed after {delay} ms; {} items acknowledged so far",
            acked.lock().unwrap().len()
        );
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= ROUNDS * ITEMS_PER_REQUEST,
        "the load made progress: {}",
        acked.len()
    );
    verify_store(dir.path(), &acked).await;
}

async fn verify_store(dir: &std::path::Path, acked: &HashMap<String, (u64, usize, u64)>) {
    // Opening runs recovery, which refuses a store with a tail past the last batch header.
    let engine =
        keel_engine::Engine::open_rocksdb(dir).expect("the store reopens after every crash");
    drop(engine);
    let storage = RocksStorage::open(dir).unwrap();
    let mut events: BTreeMap<u64, Event> = BTreeMap::new();
    let mut ids: HashMap<String, u64> = HashMap::new();
    let summary = verify_chain(&storage, &mut |seq, _batch, payload| {
        let logged = codec::decode_event(payload).expect("event decodes");
        if let Some(id) = logged.command_id {
            assert!(
                ids.insert(id, seq).is_none(),
                "a command id committed twice"
            );
        }
        events.insert(seq, logged.event);
    })
    .expect("hash chain verifies, batches and events are gapless, no event outside a batch");
    assert_eq!(summary.events, events.len() as u64);
    assert_eq!(
        events.keys().copied().collect::<Vec<_>>(),
        (1..=summary.events).collect::<Vec<_>>()
    );

    for (id, (seq, account, amount)) in acked {
        assert_eq!(
            ids.get(id),
            Some(seq),
            "acknowledged {id} is in the log at its acknowledged seq"
        );
        let Some(ledger::Event::Deposited {
            account: a,
            amount: m,
            ..
        }) = events
            .get(seq)
            .and_then(|e| e.downcast_ref::<ledger::Event>())
        else {
            panic!("event {seq} of {id} is not the acknowledged deposit");
        };
        assert_eq!((a.name(), *m), (format!("acc-{account}").as_str(), *amount));
    }
    drop(storage);

    // The writer as it recovers (the last checkpoint plus the log after it): a retry of every
    // acknowledged id gets its original answer and writes nothing.
    let sequencer = keel_sequencer::Sequencer::open(dir, keel_sequencer::Config::default())
        .expect("the writer recovers");
    let retries: Vec<(u64, keel_invariants::Envelope)> = acked
        .iter()
        .map(|(id, (seq, account, amount))| {
            let command = ledger::Command::Deposit {
                account: keel_invariants::AggregateId::new(ledger::KIND, &format!("acc-{account}")),
                amount: *amount,
                memo: None,
            };
            let envelope = keel_invariants::Envelope {
                id: Some(id.clone()),
                expected_version: None,
                command: keel_invariants::Command::new(command),
            };
            (*seq, envelope)
        })
        .collect();
    for chunk in retries.chunks(1000) {
        let (seqs, envelopes): (Vec<u64>, Vec<_>) = chunk.iter().cloned().unzip();
        let reply = sequencer
            .submit(envelopes, false)
            .expect("queued")
            .await
            .expect("answered")
            .expect("not refused");
        for (seq, result) in seqs.iter().zip(&reply.results) {
            assert_eq!(
                result,
                &keel_sequencer::ItemResult::Committed {
                    seq: *seq,
                    replayed: true
                },
                "a retry of an acknowledged id gets its original answer"
            );
        }
    }
    assert_eq!(
        sequencer
            .events(summary.events, 10)
            .expect("events")
            .0
            .len(),
        0,
        "the retries wrote nothing"
    );

    // State equals the log: every balance is the sum of the deposits the log holds for it.
    let mut balances: HashMap<String, i64> = HashMap::new();
    for event in events.values() {
        if let Some(ledger::Event::Deposited {
            account, amount, ..
        }) = event.downcast_ref::<ledger::Event>()
        {
            *balances.entry(account.as_str().to_string()).or_default() += *amount as i64;
        }
    }
    for i in 0..ACCOUNTS {
        let id = format!("account:acc-{i}");
        let aggregate = sequencer
            .aggregate(&keel_invariants::AggregateId::new(
                ledger::KIND,
                &format!("acc-{i}"),
            ))
            .expect("readable")
            .expect("account exists");
        let Ok(account) = aggregate.state.downcast::<ledger::Account>() else {
            panic!("{id} is an account")
        };
        assert_eq!(
            account.balance,
            balances.get(&id).copied().unwrap_or(0),
            "{id} balance equals its logged deposits"
        );
    }
}

/// A store of 200 accounts on a server that keeps 8 of them in memory and checkpoints after
/// every batch: every batch of transfers reads most of its accounts back from the RocksDB
/// checkpoint. Every answer (committed, or `insufficient_funds` on a balance only the checkpoint
/// holds) equals a model's, across a kill -9 and a restart with the same small bound; the
/// server reports the reads it made and stays at its bound; the audit proves the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_larger_than_the_cache_decides_exactly_across_kill_9() {
    const ACCOUNTS: usize = 200;
    let flags = [
        "--cache-aggregates-max",
        "8",
        "--checkpoint-every-batches",
        "1",
    ];
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let mut balances = vec![100_i64; ACCOUNTS];
    let mut state = 0x5EED_u64;
    for life in 0..2 {
        let keel = KeelProcess::start(dir.path(), &flags);
        if life == 0 {
            let setup: Vec<Value> = (0..ACCOUNTS)
                .flat_map(|i| {
                    [
                        json!({"type": "open_account", "account": format!("acc-{i}")}),
                        json!({"type": "deposit", "account": format!("acc-{i}"), "amount": 100}),
                    ]
                })
                .collect();
            let r = post(&c, &keel.url, &json!({"commands": setup})).await;
            assert!(
                r["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|r| r["status"] == "committed")
            );
        }
        for round in 0..25 {
            let transfers: Vec<(usize, usize, i64)> = (0..12)
                .map(|_| {
                    let from = (next_random(&mut state) % ACCOUNTS as u64) as usize;
                    let to =
                        (from + 1 + (next_random(&mut state) % (ACCOUNTS as u64 - 1)) as usize)
                            % ACCOUNTS;
                    (from, to, 1 + (next_random(&mut state) % 150) as i64)
                })
                .collect();
            let commands: Vec<Value> = transfers
                .iter()
                .map(|(from, to, amount)| {
                    json!({"type": "transfer", "from": format!("acc-{from}"),
                           "to": format!("acc-{to}"), "amount": amount})
                })
                .collect();
            let answer = post(&c, &keel.url, &json!({"commands": commands})).await;
            for ((from, to, amount), result) in
                transfers.iter().zip(answer["results"].as_array().unwrap())
            {
                if balances[*from] >= *amount {
                    assert_eq!(
                        result["status"], "committed",
                        "life {life} round {round}: {result}"
                    );
                    balances[*from] -= amount;
                    balances[*to] += amount;
                } else {
                    assert_eq!(
                        result["code"], "insufficient_funds",
                        "life {life} round {round}: acc-{from} holds {}: {result}",
                        balances[*from]
                    );
                }
            }
        }
        let metrics = common::get_text(&c, &format!("{}/metrics", keel.url)).await;
        let fetched = metric(&metrics, "keel_cache_fetched_total");
        assert!(
            fetched > 0.0,
            "no aggregate was read back from the checkpoint:\n{metrics}"
        );
        // Idle, the writer checkpoints and evicts down to its bound within a few seconds.
        let mut cached = f64::MAX;
        for _ in 0..100 {
            let text = common::get_text(&c, &format!("{}/metrics", keel.url)).await;
            cached = metric(&text, "keel_cache_aggregates");
            if cached <= 8.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            cached <= 8.0,
            "{cached} aggregates in memory for a bound of 8"
        );
        for (i, expected) in balances.iter().enumerate() {
            let r = c
                .get(format!("{}/v1/aggregates/account:acc-{i}", keel.url))
                .send()
                .await
                .unwrap();
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["state"]["balance"], *expected, "life {life}: acc-{i}");
        }
        keel.kill9();
    }
    let audit = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["audit", "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&audit.stdout);
    assert!(stdout.contains("INTEGRITY_OK"), "{stdout}");
}

async fn post(c: &reqwest::Client, url: &str, body: &Value) -> Value {
    let r = c
        .post(format!("{url}/v1/batches"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// The value of an unlabelled metric in Prometheus text (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}
