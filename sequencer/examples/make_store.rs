//! Builds a Keel store of at least EVENTS committed events with the real sequencer, in process,
//! for measuring `keel audit` (docs/BENCHMARKS.md, "Audit speed").
//!
//! Usage: `cargo run --release -p keel-sequencer --example make_store -- DIR EVENTS [ITEMS]`
//! where ITEMS (default 1000) is the number of commands per submission. The mix: 10,000
//! accounts and 1,000 SKUs, then transfers (60%), deposits (15%), withdrawals (10%) and
//! inventory reserve/ship/restock (15%); every tenth command carries a command id.

use keel_engine::Engine;
use keel_invariants::{AggregateId, Command, Envelope, inventory, ledger};
use keel_sequencer::{Config, ItemResult, Reply, Sequencer, SubmitError};
use std::collections::VecDeque;
use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;
use tokio::sync::oneshot::Receiver;

const ACCOUNTS: u64 = 10_000;
const SKUS: u64 = 1_000;
/// Submissions in flight, so the writer group-commits several per fsync.
const IN_FLIGHT: usize = 8;

type Pending = Receiver<Result<Reply, SubmitError>>;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: make_store DIR EVENTS [ITEMS_PER_SUBMISSION]";
    let dir = PathBuf::from(args.next().ok_or(usage)?);
    let events: u64 = args.next().ok_or(usage)?.parse()?;
    let items: usize = args.next().map_or(Ok(1000), |s| s.parse())?;
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let sequencer = Sequencer::start(Engine::open_rocksdb(&dir)?, Config::default())?;
    let mut generator = Generator::new();
    let mut in_flight: VecDeque<Pending> = VecDeque::new();
    let mut committed = 0u64;
    let mut setup = generator.setup();
    while committed < events {
        let commands = if setup.is_empty() {
            (0..items).map(|_| generator.next()).collect()
        } else {
            setup.drain(..items.min(setup.len())).collect()
        };
        if in_flight.len() >= IN_FLIGHT {
            committed += wait(in_flight.pop_front())?;
        }
        let pending = submit(&sequencer, commands, &mut in_flight, &mut committed)?;
        in_flight.push_back(pending);
        if committed > 0 && committed % 100_000 < items as u64 {
            eprintln!(
                "make_store: {committed} events in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    while let Some(pending) = in_flight.pop_front() {
        committed += wait(Some(pending))?;
    }
    let tip = sequencer.reader().tip()?;
    sequencer.shutdown();
    println!(
        "make_store: {} events in {} batches in {:.1} s ({} committed by this run) at {}",
        tip.last_event,
        tip.last_batch,
        started.elapsed().as_secs_f64(),
        committed,
        dir.display()
    );
    Ok(())
}

/// Submits `commands`, waiting for the oldest submission while the queue is full.
fn submit(
    sequencer: &Sequencer,
    commands: Vec<Envelope>,
    in_flight: &mut VecDeque<Pending>,
    committed: &mut u64,
) -> Result<Pending, Box<dyn Error>> {
    loop {
        match sequencer.submit(commands.clone(), false) {
            Ok(pending) => return Ok(pending),
            Err(SubmitError::Overloaded) if !in_flight.is_empty() => {
                *committed += wait(in_flight.pop_front())?
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits for one reply; returns how many of its commands committed.
fn wait(pending: Option<Pending>) -> Result<u64, Box<dyn Error>> {
    let Some(pending) = pending else { return Ok(0) };
    let reply = pending.blocking_recv()??;
    Ok(reply
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
        .count() as u64)
}

/// A deterministic command mix (xorshift, so every run builds the same store).
struct Generator {
    state: u64,
    n: u64,
    reserved: VecDeque<(u64, String)>,
}

impl Generator {
    fn new() -> Self {
        Self {
            state: 0x9E37_79B9_7F4A_7C15,
            n: 0,
            reserved: VecDeque::new(),
        }
    }

    fn random(&mut self, below: u64) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state % below
    }

    fn setup(&self) -> Vec<Envelope> {
        let mut commands = Vec::new();
        for a in 0..ACCOUNTS {
            let account = account(a);
            commands.push(plain(Command::new(ledger::Command::OpenAccount {
                account: account.clone(),
                overdraft_limit: 100,
            })));
            commands.push(plain(Command::new(ledger::Command::Deposit {
                account,
                amount: 1_000_000,
                memo: None,
            })));
        }
        for s in 0..SKUS {
            commands.push(plain(Command::new(inventory::Command::CreateSku {
                sku: sku(s),
                on_hand: 1_000_000_000,
            })));
        }
        commands
    }

    fn next(&mut self) -> Envelope {
        self.n += 1;
        let command = match self.random(100) {
            0..60 => {
                let from = self.random(ACCOUNTS);
                let to = (from + 1 + self.random(ACCOUNTS - 1)) % ACCOUNTS;
                let amount = 1 + self.random(100);
                Command::new(ledger::Command::Transfer {
                    from: account(from),
                    to: account(to),
                    amount,
                    memo: None,
                })
            }
            60..75 => {
                let memo = Some(format!("invoice {}", self.n));
                Command::new(ledger::Command::Deposit {
                    account: account(self.random(ACCOUNTS)),
                    amount: 1 + self.random(1000),
                    memo,
                })
            }
            75..85 => Command::new(ledger::Command::Withdraw {
                account: account(self.random(ACCOUNTS)),
                amount: 1 + self.random(50),
                memo: None,
            }),
            _ => self.inventory(),
        };
        let id = self.n.is_multiple_of(10).then(|| format!("cmd-{}", self.n));
        Envelope {
            id,
            expected_version: None,
            command,
        }
    }

    fn inventory(&mut self) -> Command {
        let ship = self.reserved.len() > 1000 || self.random(3) == 0;
        if let Some((s, order)) = ship.then(|| self.reserved.pop_front()).flatten() {
            return Command::new(inventory::Command::Ship { sku: sku(s), order });
        }
        if self.random(10) == 0 {
            return Command::new(inventory::Command::Restock {
                sku: sku(self.random(SKUS)),
                qty: 1 + self.random(100),
            });
        }
        let s = self.random(SKUS);
        let order = format!("order-{}", self.n);
        self.reserved.push_back((s, order.clone()));
        Command::new(inventory::Command::Reserve {
            sku: sku(s),
            qty: 1 + self.random(5),
            order,
        })
    }
}

fn account(n: u64) -> AggregateId {
    AggregateId::new(ledger::KIND, &format!("acct-{n}"))
}

fn sku(n: u64) -> AggregateId {
    AggregateId::new(inventory::KIND, &format!("sku-{n}"))
}

fn plain(command: Command) -> Envelope {
    Envelope {
        id: None,
        expected_version: None,
        command,
    }
}
