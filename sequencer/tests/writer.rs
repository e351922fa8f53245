//! The single writer over the fault-injecting memory storage: group commit, atomic requests,
//! idempotency inside and across batches, bounds.
#![allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report

use keel_engine::{Engine, MemoryStorage, Storage};
use keel_invariants::{AggregateId, Command, Envelope, RejectCode, inventory, ledger};
use keel_sequencer::{Config, ItemResult, Reply, Sequencer, Submit, SubmitError};
use std::sync::Arc;
use std::time::Duration;

fn account(name: &str) -> AggregateId {
    AggregateId::new(ledger::KIND, name)
}

fn cmd(id: Option<&str>, command: impl Into<Command>) -> Envelope {
    Envelope {
        id: id.map(String::from),
        expected_version: None,
        command: command.into(),
    }
}

fn open(name: &str) -> Envelope {
    cmd(
        None,
        ledger::Command::OpenAccount {
            account: account(name),
            overdraft_limit: 0,
        },
    )
}

fn deposit(id: Option<&str>, name: &str, amount: u64) -> Envelope {
    cmd(
        id,
        ledger::Command::Deposit {
            account: account(name),
            amount,
            memo: None,
        },
    )
}

fn withdraw(id: Option<&str>, name: &str, amount: u64) -> Envelope {
    cmd(
        id,
        ledger::Command::Withdraw {
            account: account(name),
            amount,
            memo: None,
        },
    )
}

async fn run(s: &Sequencer, commands: Vec<Envelope>, atomic: bool) -> Reply {
    s.submit(commands, atomic).unwrap().await.unwrap().unwrap()
}

async fn dry_run(s: &Sequencer, commands: Vec<Envelope>, atomic: bool) -> Reply {
    let how = Submit {
        atomic,
        dry_run: true,
        submitter: None,
    };
    s.submit_with(commands, how)
        .unwrap()
        .await
        .unwrap()
        .unwrap()
}

fn balance(s: &Sequencer, name: &str) -> Option<i64> {
    s.aggregate(&account(name)).unwrap().map(|a| {
        a.state
            .downcast_ref::<keel_invariants::ledger::Account>()
            .expect("an account")
            .balance
    })
}

fn codes(reply: &Reply) -> Vec<&str> {
    reply
        .results
        .iter()
        .map(|r| match r {
            ItemResult::Committed { .. } => "committed",
            ItemResult::Rejected { rejection, .. } => rejection.code.as_str(),
        })
        .collect()
}

fn start(storage: Arc<MemoryStorage>, config: Config) -> Sequencer {
    Sequencer::start(Engine::open(storage).unwrap(), config).unwrap()
}

#[tokio::test]
async fn concurrent_submissions_share_one_batch_and_one_sync() {
    let storage = Arc::new(MemoryStorage::default());
    let config = Config {
        linger: Duration::from_millis(200),
        ..Config::default()
    };
    let s = start(storage.clone(), config);
    run(&s, vec![open("a")], false).await;
    let syncs_before = storage.syncs();
    let receivers: Vec<_> = (0..20)
        .map(|_| s.submit(vec![deposit(None, "a", 1)], false).unwrap())
        .collect();
    let mut batches = Vec::new();
    for r in receivers {
        batches.push(r.await.unwrap().unwrap().batch);
    }
    assert!(
        batches.iter().all(|b| *b == batches[0]),
        "one group commit: {batches:?}"
    );
    assert_eq!(
        storage.syncs() - syncs_before,
        1,
        "twenty requests, one fsync"
    );
    assert_eq!(balance(&s, "a"), Some(20));
}

#[tokio::test]
async fn later_items_see_earlier_items_of_the_same_batch() {
    let s = start(Arc::new(MemoryStorage::default()), Config::default());
    let reply = run(
        &s,
        vec![
            open("a"),
            deposit(None, "a", 5),
            withdraw(None, "a", 5),
            withdraw(None, "a", 1),
        ],
        false,
    )
    .await;
    assert_eq!(
        codes(&reply),
        ["committed", "committed", "committed", "insufficient_funds"]
    );
    assert_eq!(balance(&s, "a"), Some(0));
}

#[tokio::test]
async fn atomic_rollback_keeps_other_submissions_of_the_batch() {
    let storage = Arc::new(MemoryStorage::default());
    let s = start(
        storage.clone(),
        Config {
            linger: Duration::from_millis(200),
            ..Config::default()
        },
    );
    run(&s, vec![open("a")], false).await;
    // Three submissions in one batch: the atomic one in the middle fails and must not take the
    // others with it, nor forget the outcome of an id it merely repeated.
    let first = s.submit(vec![deposit(Some("x"), "a", 10)], false).unwrap();
    let atomic = s
        .submit(
            vec![
                deposit(Some("x"), "a", 10),
                deposit(Some("y"), "a", 1),
                withdraw(None, "a", 1000),
            ],
            true,
        )
        .unwrap();
    let last = s.submit(vec![deposit(None, "a", 100)], false).unwrap();
    let (first, atomic, last) = (
        first.await.unwrap().unwrap(),
        atomic.await.unwrap().unwrap(),
        last.await.unwrap().unwrap(),
    );
    assert_eq!(codes(&first), ["committed"]);
    assert_eq!(
        codes(&atomic),
        ["committed", "atomic_rollback", "insufficient_funds"]
    );
    assert!(matches!(
        atomic.results[0],
        ItemResult::Committed { replayed: true, .. }
    ));
    assert_eq!(atomic.batch, None);
    assert_eq!(codes(&last), ["committed"]);
    assert_eq!(balance(&s, "a"), Some(110));
    // "x" stays recorded (first submission), "y" does not (rolled back).
    let again = run(
        &s,
        vec![deposit(Some("x"), "a", 10), deposit(Some("y"), "a", 1)],
        false,
    )
    .await;
    assert!(matches!(
        again.results[0],
        ItemResult::Committed { replayed: true, .. }
    ));
    assert!(matches!(
        again.results[1],
        ItemResult::Committed {
            replayed: false,
            ..
        }
    ));
    assert_eq!(balance(&s, "a"), Some(111));
    let (events, last_seq) = s.events(0, 100).unwrap();
    assert_eq!(events.len() as u64, last_seq);
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=last_seq).collect::<Vec<_>>(),
        "gapless after a rollback"
    );
}

#[tokio::test]
async fn atomic_rollback_of_an_aggregate_created_in_it() {
    let s = start(Arc::new(MemoryStorage::default()), Config::default());
    let reply = run(
        &s,
        vec![
            open("new"),
            deposit(None, "new", 1),
            withdraw(None, "new", 2),
        ],
        true,
    )
    .await;
    assert_eq!(
        codes(&reply),
        ["atomic_rollback", "atomic_rollback", "insufficient_funds"]
    );
    assert_eq!(balance(&s, "new"), None);
    let reply = run(&s, vec![deposit(None, "new", 1)], false).await;
    assert_eq!(
        codes(&reply),
        ["account_not_found"],
        "the writer's cache forgot it too"
    );
}

#[tokio::test]
async fn rejected_outcomes_are_replayed_too() {
    let s = start(Arc::new(MemoryStorage::default()), Config::default());
    run(&s, vec![open("a")], false).await;
    let first = run(&s, vec![withdraw(Some("w"), "a", 5)], false).await;
    assert_eq!(codes(&first), ["insufficient_funds"]);
    run(&s, vec![deposit(None, "a", 10)], false).await;
    let again = run(&s, vec![withdraw(Some("w"), "a", 5)], false).await;
    match &again.results[0] {
        ItemResult::Rejected {
            rejection,
            replayed: true,
        } => assert_eq!(rejection.code, RejectCode::InsufficientFunds),
        other => panic!("expected the original rejection, got {other:?}"),
    }
    assert_eq!(balance(&s, "a"), Some(10));
}

#[tokio::test]
async fn restart_reloads_state_and_index() {
    let storage = Arc::new(MemoryStorage::default());
    {
        let s = start(storage.clone(), Config::default());
        run(&s, vec![open("a"), deposit(Some("d1"), "a", 42)], false).await;
        s.shutdown();
    }
    let s = start(Arc::new(storage.after_power_loss()), Config::default());
    assert_eq!(balance(&s, "a"), Some(42));
    let reply = run(
        &s,
        vec![deposit(Some("d1"), "a", 42), withdraw(None, "a", 42)],
        false,
    )
    .await;
    assert_eq!(
        reply.results[0],
        ItemResult::Committed {
            seq: 2,
            replayed: true
        }
    );
    assert_eq!(
        codes(&reply),
        ["committed", "committed"],
        "the cache was reloaded: 42 is there to withdraw"
    );
}

#[tokio::test]
async fn bounds_are_refused_at_once() {
    let storage = Arc::new(MemoryStorage::default());
    let config = Config {
        batch_items_max: 3,
        queue_items_max: 3,
        queue_depth_max: 1,
        linger: Duration::ZERO,
        ..Config::default()
    };
    let s = start(storage.clone(), config);
    assert_eq!(s.submit(vec![], false).unwrap_err(), SubmitError::Empty);
    let four = vec![open("a"), open("b"), open("c"), open("d")];
    assert_eq!(
        s.submit(four, false).unwrap_err(),
        SubmitError::TooManyItems { items: 4, max: 3 }
    );
    s.shutdown();
    assert_eq!(
        s.submit(vec![open("a")], false).unwrap_err(),
        SubmitError::ShuttingDown
    );
    assert_eq!(
        storage.syncs(),
        1,
        "only the format version was ever written"
    );
    assert_eq!(storage.get(keel_engine::Cf::Meta, b"tip").unwrap(), None);
}

#[tokio::test]
async fn a_dry_run_answers_as_a_commit_would_and_writes_nothing() {
    let storage = Arc::new(MemoryStorage::default());
    let s = start(storage.clone(), Config::default());
    run(&s, vec![open("a"), deposit(Some("d"), "a", 10)], false).await;
    let syncs = storage.syncs();
    let (_, last_seq) = s.events(0, 100).unwrap();
    let reply = dry_run(
        &s,
        vec![
            deposit(Some("d"), "a", 10),
            withdraw(Some("w1"), "a", 8),
            withdraw(Some("w2"), "a", 8),
            open("b"),
            deposit(Some("w1"), "a", 1),
        ],
        false,
    )
    .await;
    assert_eq!(
        codes(&reply),
        [
            "committed",
            "committed",
            "insufficient_funds",
            "committed",
            "committed"
        ],
        "later commands see the earlier ones' effects, as in a commit"
    );
    assert!(matches!(
        reply.results[0],
        ItemResult::Committed { replayed: true, .. }
    ));
    assert_eq!(
        reply.results[1],
        ItemResult::Committed {
            seq: last_seq + 1,
            replayed: false
        },
        "the sequence the event would have had"
    );
    assert!(matches!(
        reply.results[4],
        ItemResult::Committed { replayed: true, .. }
    ));
    assert_eq!(reply.batch, None);
    assert_eq!(storage.syncs(), syncs, "nothing written");
    assert_eq!(s.events(0, 100).unwrap().1, last_seq);
    assert_eq!(balance(&s, "a"), Some(10));
    assert_eq!(balance(&s, "b"), None);
    // Nothing of it is remembered: the writer's cache and its command ids are as before.
    let real = run(
        &s,
        vec![
            withdraw(Some("w1"), "a", 8),
            withdraw(Some("w2"), "a", 8),
            deposit(None, "b", 1),
        ],
        false,
    )
    .await;
    assert_eq!(
        codes(&real),
        ["committed", "insufficient_funds", "account_not_found"]
    );
    assert!(
        real.results
            .iter()
            .all(|r| !matches!(r, ItemResult::Committed { replayed: true, .. }))
    );
    assert_eq!(balance(&s, "a"), Some(2));
}

#[tokio::test]
async fn an_atomic_dry_run_rolls_back_like_an_atomic_commit() {
    let s = start(Arc::new(MemoryStorage::default()), Config::default());
    run(&s, vec![open("a")], false).await;
    let request = || vec![deposit(Some("x"), "a", 5), withdraw(None, "a", 6)];
    let dry = dry_run(&s, request(), true).await;
    let real = run(&s, request(), true).await;
    assert_eq!(codes(&dry), ["atomic_rollback", "insufficient_funds"]);
    assert_eq!(dry.results, real.results, "the same answer as the commit");
    assert_eq!(balance(&s, "a"), Some(0));
}

#[tokio::test]
async fn a_dry_run_sees_only_committed_state_even_in_a_shared_batch() {
    let storage = Arc::new(MemoryStorage::default());
    let s = start(
        storage.clone(),
        Config {
            linger: Duration::from_millis(300),
            ..Config::default()
        },
    );
    run(&s, vec![open("a")], false).await;
    // Queued first, so the writer takes it first; the dry run joins its group while it lingers.
    let real = s.submit(vec![deposit(Some("r"), "a", 5)], false).unwrap();
    let dry = s
        .submit_with(
            vec![withdraw(None, "a", 5), deposit(Some("r"), "a", 5)],
            Submit {
                dry_run: true,
                ..Submit::default()
            },
        )
        .unwrap();
    let later = s.submit(vec![withdraw(None, "a", 5)], false).unwrap();
    let (real, dry, later) = (
        real.await.unwrap().unwrap(),
        dry.await.unwrap().unwrap(),
        later.await.unwrap().unwrap(),
    );
    assert_eq!(codes(&real), ["committed"]);
    assert_eq!(
        codes(&dry),
        ["insufficient_funds", "committed"],
        "the deposit whose fsync had not returned is not seen"
    );
    assert!(
        matches!(
            dry.results[1],
            ItemResult::Committed {
                replayed: false,
                ..
            }
        ),
        "nor is its command id"
    );
    assert_eq!(
        codes(&later),
        ["committed"],
        "the dry run undid nothing real"
    );
    assert_eq!(real.batch, later.batch, "one group");
    assert_eq!(balance(&s, "a"), Some(0));
}

fn sku(name: &str) -> AggregateId {
    AggregateId::new(inventory::KIND, name)
}

/// Every account's balance and every SKU's state as the sequencer reads them (the overlay
/// before a checkpoint, the store after) equal the model.
fn assert_states(s: &Sequencer, balances: &[i64], skus: &[inventory::Sku], when: &str) {
    for (i, expected) in balances.iter().enumerate() {
        assert_eq!(
            balance(s, &format!("a{i}")),
            Some(*expected),
            "account a{i} {when}"
        );
    }
    for (i, expected) in skus.iter().enumerate() {
        let aggregate = s.aggregate(&sku(&format!("s{i}"))).unwrap().unwrap();
        assert_eq!(
            aggregate.state.downcast_ref::<inventory::Sku>(),
            Some(expected),
            "sku s{i} {when}"
        );
    }
}

/// A checkpoint after every batch: the checkpoint thread hands its copies back and the next
/// checkpoint copies into them in place, the overlay reuses the states a checkpoint evicted,
/// and the emptied command-id maps come back. Accounts and SKUs (states of two types) change in
/// a rotating pattern, so a reused copy often held another aggregate, or another type, before.
/// What the sequencer reads, what it recovers after a power loss, and every retried id's answer
/// stay exact.
#[tokio::test]
async fn checkpoints_that_reuse_their_copies_keep_every_state_and_id_exact() {
    const ACCOUNTS: usize = 30;
    const SKUS: usize = 10;
    const ROUNDS: u64 = 40;
    let storage = Arc::new(MemoryStorage::default());
    let config = Config {
        checkpoint_every_batches: 1,
        linger: Duration::ZERO,
        ..Config::default()
    };
    let mut balances = vec![0_i64; ACCOUNTS];
    let mut skus = vec![inventory::Sku::default(); SKUS];
    let mut seqs = Vec::new();
    {
        let s = start(storage.clone(), config.clone());
        let mut setup: Vec<Envelope> = (0..ACCOUNTS).map(|i| open(&format!("a{i}"))).collect();
        setup.extend((0..SKUS).map(|i| {
            cmd(
                None,
                inventory::Command::CreateSku {
                    sku: sku(&format!("s{i}")),
                    on_hand: 100,
                },
            )
        }));
        skus.iter_mut().for_each(|s| s.on_hand = 100);
        run(&s, setup, false).await;
        for round in 0..ROUNDS {
            let mut batch = Vec::new();
            for i in (0..ACCOUNTS).filter(|i| (*i as u64 + round).is_multiple_of(3)) {
                let amount = round * 10 + i as u64 + 1;
                batch.push(deposit(
                    Some(&format!("r{round}-a{i}")),
                    &format!("a{i}"),
                    amount,
                ));
                balances[i] += amount as i64;
            }
            let i = (round as usize) % SKUS;
            let order = format!("o{round}");
            batch.push(cmd(
                Some(&format!("r{round}-s{i}")),
                inventory::Command::Reserve {
                    sku: sku(&format!("s{i}")),
                    qty: 1,
                    order: order.clone(),
                },
            ));
            skus[i].reserved += 1;
            skus[i].reservations.insert(order, 1);
            let reply = run(&s, batch, false).await;
            assert!(
                codes(&reply).iter().all(|c| *c == "committed"),
                "round {round}: {:?}",
                codes(&reply)
            );
            seqs.push(reply.results);
            assert_states(&s, &balances, &skus, &format!("after round {round}"));
        }
        s.shutdown();
    }
    let s = start(Arc::new(storage.after_power_loss()), config);
    assert_states(&s, &balances, &skus, "after a power loss");
    // Every id of every round (their maps were emptied and reused) answers as it did.
    for (round, results) in seqs.iter().enumerate() {
        let round = round as u64;
        let mut retry = Vec::new();
        for i in (0..ACCOUNTS).filter(|i| (*i as u64 + round).is_multiple_of(3)) {
            retry.push(deposit(
                Some(&format!("r{round}-a{i}")),
                &format!("a{i}"),
                1,
            ));
        }
        let i = (round as usize) % SKUS;
        retry.push(cmd(
            Some(&format!("r{round}-s{i}")),
            inventory::Command::Release {
                sku: sku(&format!("s{i}")),
                order: format!("o{round}"),
            },
        ));
        let reply = run(&s, retry, false).await;
        let replayed: Vec<ItemResult> = results
            .iter()
            .map(|r| match r {
                ItemResult::Committed { seq, .. } => ItemResult::Committed {
                    seq: *seq,
                    replayed: true,
                },
                other => other.clone(),
            })
            .collect();
        assert_eq!(reply.results, replayed, "retries of round {round}");
    }
    assert_states(&s, &balances, &skus, "after the retries");
}

/// A cache of 4 aggregates for a store of 100 accounts: the writer evicts after every
/// checkpoint, reads what each batch needs back from the checkpoint in one multi-get, and
/// recovers a store that does not fit its bound; every decision (which depends on balances
/// the cache no longer holds) is the model's, and the memory stays at the bound.
#[tokio::test]
async fn a_cache_smaller_than_the_store_decides_as_the_model() {
    model_run(4, 100, 4, 1).await;
}

/// The same with a checkpoint every third batch: an aggregate changed in several batches
/// between two checkpoints is in the next one once, with its last state.
#[tokio::test]
async fn checkpoints_every_few_batches_decide_as_the_model() {
    model_run(4, 100, 4, 3).await;
    model_run(Config::default().cache_aggregates_max, 100, 2, 3).await;
}

/// A tiny deterministic generator (xorshift): the same commands on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn transfer(id: Option<&str>, from: &str, to: &str, amount: u64) -> Envelope {
    cmd(
        id,
        ledger::Command::Transfer {
            from: account(from),
            to: account(to),
            amount,
            memo: None,
        },
    )
}

/// What the model says of one command against `balances` (every account open, no overdraft):
/// the code, and the balances after it when it commits.
fn model_decide(balances: &mut [i64], command: &(u8, usize, usize, u64)) -> &'static str {
    let (kind, a, b, amount) = *command;
    let amount_i = amount as i64;
    match kind {
        0 => {
            balances[a] += amount_i;
            "committed"
        }
        1 if balances[a] >= amount_i => {
            balances[a] -= amount_i;
            "committed"
        }
        1 => "insufficient_funds",
        _ if a == b => "same_account",
        _ if balances[a] >= amount_i => {
            balances[a] -= amount_i;
            balances[b] += amount_i;
            "committed"
        }
        _ => "insufficient_funds",
    }
}

/// On a new store, with a checkpoint every `checkpoint_every_batches` batches and at most
/// `cache_aggregates_max` aggregates in memory: opens `accounts` accounts, then runs `phases`
/// phases of random deposits, withdrawals and transfers (plain, atomic and dry-run submissions) against a model; between phases the
/// sequencer restarts, after a power loss or a clean stop in turn. Every answer, every retried
/// id's answer and every balance equal the model's, and once the writer is idle it holds at
/// most `cache_aggregates_max` aggregates.
async fn model_run(
    cache_aggregates_max: usize,
    accounts: usize,
    phases: usize,
    checkpoint_every_batches: u64,
) {
    let config = Config {
        checkpoint_every_batches,
        cache_aggregates_max,
        linger: Duration::ZERO,
        ..Config::default()
    };
    let mut balances = vec![0_i64; accounts];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut storage = Arc::new(MemoryStorage::default());
    let mut answered: Vec<(Vec<Envelope>, Vec<ItemResult>)> = Vec::new();
    for phase in 0..phases {
        let s = start(storage.clone(), config.clone());
        assert_eq!(
            (0..accounts)
                .map(|i| balance(&s, &format!("a{i}")).unwrap_or(0))
                .collect::<Vec<_>>(),
            balances,
            "phase {phase}: recovered balances"
        );
        if phase == 0 {
            let setup = (0..accounts).map(|i| open(&format!("a{i}"))).collect();
            run(&s, setup, false).await;
        }
        for round in 0..60 {
            let atomic = round % 5 == 4;
            let dry = round % 7 == 6;
            let commands: Vec<(u8, usize, usize, u64)> = (0..5)
                .map(|_| {
                    let kind = rng.below(3) as u8;
                    let a = rng.below(accounts as u64) as usize;
                    let b = rng.below(accounts as u64) as usize;
                    (kind, a, b, 1 + rng.below(60))
                })
                .collect();
            let envelopes: Vec<Envelope> = commands
                .iter()
                .enumerate()
                .map(|(n, (kind, a, b, amount))| {
                    let id = format!("p{phase}-r{round}-{n}");
                    let id = (!dry).then_some(id.as_str());
                    let (a, b) = (format!("a{a}"), format!("a{b}"));
                    match kind {
                        0 => deposit(id, &a, *amount),
                        1 => withdraw(id, &a, *amount),
                        _ => transfer(id, &a, &b, *amount),
                    }
                })
                .collect();
            let mut after = balances.clone();
            let mut expected: Vec<&str> = commands
                .iter()
                .map(|c| model_decide(&mut after, c))
                .collect();
            if atomic && expected.iter().any(|c| *c != "committed") {
                for code in &mut expected {
                    if *code == "committed" {
                        *code = "atomic_rollback";
                    }
                }
                after = balances.clone();
            }
            let reply = if dry {
                dry_run(&s, envelopes.clone(), atomic).await
            } else {
                run(&s, envelopes.clone(), atomic).await
            };
            assert_eq!(
                codes(&reply),
                expected,
                "phase {phase} round {round}: {commands:?}"
            );
            let rolled_back = atomic && expected.iter().any(|c| *c != "committed");
            if !dry {
                balances = after;
            }
            // A rolled-back atomic request uses up none of its ids.
            if !dry && !rolled_back {
                answered.push((envelopes, reply.results));
            }
        }
        // Idle, the writer checkpoints what changed last and then evicts down to the bound.
        let bound = config.cache_aggregates_max.min(accounts);
        let waited = std::time::Instant::now();
        while s.cached_aggregates() > bound && waited.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            s.cached_aggregates() <= bound,
            "phase {phase}: {} aggregates in memory for a bound of {bound}",
            s.cached_aggregates()
        );
        // Every id ever answered answers the same (replayed), from memory or the checkpoint.
        for (envelopes, results) in answered.iter().step_by(7) {
            let reply = run(&s, envelopes.clone(), false).await;
            let replayed: Vec<ItemResult> = results
                .iter()
                .map(|r| match r {
                    ItemResult::Committed { seq, .. } => ItemResult::Committed {
                        seq: *seq,
                        replayed: true,
                    },
                    ItemResult::Rejected { rejection, .. } => ItemResult::Rejected {
                        rejection: rejection.clone(),
                        replayed: true,
                    },
                })
                .collect();
            assert_eq!(reply.results, replayed, "phase {phase}: a retry");
        }
        for (i, expected) in balances.iter().enumerate() {
            assert_eq!(
                balance(&s, &format!("a{i}")),
                Some(*expected),
                "phase {phase}: a{i}"
            );
        }
        s.shutdown();
        if phase % 2 == 0 {
            storage = Arc::new(storage.after_power_loss());
        }
    }
}

/// The model run with every aggregate in memory (the default bound): the same answers.
#[tokio::test]
async fn a_cache_that_holds_the_store_decides_as_the_model() {
    model_run(Config::default().cache_aggregates_max, 100, 4, 1).await;
}

/// A command-id index whose merges fell behind (more sorted runs than
/// `COMMAND_IDS_RUNS_MAX`) holds the checkpoints back, never the commits, until
/// `--checkpoint-pending-max` makes the writer wait; once the merges caught up the checkpoint is
/// written.
#[tokio::test]
async fn a_checkpoint_waits_for_the_command_id_merges_to_catch_up() {
    let storage = Arc::new(MemoryStorage::default());
    storage.set_command_id_runs(Some(keel_engine::COMMAND_IDS_RUNS_MAX + 1));
    let config = Config {
        checkpoint_every_batches: 1,
        linger: Duration::ZERO,
        ..Config::default()
    };
    let s = start(storage.clone(), config);
    let mut opening = open("a");
    opening.id = Some("open-a".into());
    run(&s, vec![opening], false).await;
    for i in 0..5 {
        let reply = run(&s, vec![deposit(Some(&format!("d{i}")), "a", 1)], false).await;
        assert_eq!(codes(&reply), ["committed"]);
    }
    // Every batch had ids, so no checkpoint could be written; the commits were answered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.reader().checkpoint_mark().unwrap().batch, 0);
    assert_eq!(balance(&s, "a"), Some(5));

    storage.set_command_id_runs(Some(keel_engine::COMMAND_IDS_RUNS_MAX));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.reader().checkpoint_mark().unwrap().batch < 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint after the merges caught up: mark {:?}",
            s.reader().checkpoint_mark().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A retry of a checkpointed id still gets its original answer.
    let reply = run(&s, vec![deposit(Some("d0"), "a", 1)], false).await;
    assert_eq!(balance(&s, "a"), Some(5));
    assert!(matches!(reply.results[0], ItemResult::Committed { .. }));
}
