//! The cost of the invariant check the writer runs after every apply (a real check in release
//! builds since the hardening issue): nanoseconds per `check_invariants` call for an account and
//! for SKUs with 0 to 1,000 open reservations, next to the cost of encoding the same aggregate,
//! which the writer pays for every changed aggregate of every batch anyway.
//!
//! Usage: `$CARGO_TARGET_DIR/release/examples/invariant_check_cost` (docs/BENCHMARKS.md).
//! Bounded: 2,000,000 calls per row at most.

use keel_invariants::{Aggregate, State, check_invariants, codec, inventory, ledger};
use std::hint::black_box;
use std::time::Instant;

fn per_call_ns(calls: u32, mut f: impl FnMut()) -> f64 {
    let started = Instant::now();
    for _ in 0..calls {
        f();
    }
    started.elapsed().as_nanos() as f64 / f64::from(calls)
}

fn row(name: &str, aggregate: &Aggregate, calls: u32) {
    let check = per_call_ns(calls, || {
        black_box(check_invariants(black_box(aggregate)).is_ok());
    });
    let mut out = Vec::with_capacity(64 * 1024);
    let encode = per_call_ns(calls, || {
        out.clear();
        codec::encode_aggregate(black_box(aggregate), &mut out);
        black_box(out.len());
    });
    println!("{name:<28} check {check:>9.1} ns   encode {encode:>9.1} ns");
}

fn main() {
    let account = Aggregate {
        version: 7,
        state: State::new(ledger::Account {
            balance: 1_000,
            overdraft_limit: 10,
            closed: false,
        }),
    };
    row("account", &account, 2_000_000);
    for reservations in [0u64, 10, 100, 1000] {
        let sku = inventory::Sku {
            on_hand: 1_000_000,
            reserved: reservations,
            reservations: (0..reservations)
                .map(|i| (format!("order-{i}"), 1))
                .collect(),
        };
        let aggregate = Aggregate {
            version: 7,
            state: State::new(sku),
        };
        let calls = (2_000_000 / (reservations + 1)).max(2_000) as u32;
        row(
            &format!("sku, {reservations} reservations"),
            &aggregate,
            calls,
        );
    }
}
