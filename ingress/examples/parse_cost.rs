//! What parsing a `POST /v1/batches` body costs, measured on the body `make bench` sends: 1000
//! transfers over 10,000 accounts, each with a command id, in `keel-bench`'s exact layout.
//!
//! `cargo run --release --example parse_cost [ITERATIONS]` prints the mean time per body of
//! Keel's parser (`wire::parse_batch`: JSON to validated envelopes) and, for scale, of
//! `serde_json::from_slice` into an untyped `Value` (tokenizing and allocating alone). The
//! figures, and what they say about replacing serde_json, are in docs/BENCHMARKS.md.

use keel_ingress::wire::parse_batch;
use keel_invariants::declared::DomainSet;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

/// The allocator `keel serve` runs with (ingress/src/main.rs).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A body of `items` transfers in `keel-bench`'s layout (bench/src/workload.rs, `Body`).
fn body(items: u64) -> String {
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut text = String::from("{\"commands\":[");
    for n in 0..items {
        if n > 0 {
            text.push(',');
        }
        let from = next() % 10_000;
        let to = (from + 1 + next() % 9_999) % 10_000;
        let amount = 1 + next() % 100;
        let _ = write!(
            text,
            "{{\"type\":\"transfer\",\"id\":\"20261202T170000Z-w0-{n}\",\"from\":\"a{from}\",\"to\":\"a{to}\",\"amount\":{amount}}}"
        );
    }
    text.push_str("],\"atomic\":false}");
    text
}

fn main() {
    let iterations: u32 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    let body = body(1000);
    let domains = Arc::new(DomainSet::builtin());
    let time = |what: &str, parse: &dyn Fn() -> usize| {
        let mut checksum = 0;
        for _ in 0..iterations / 10 {
            checksum += parse(); // warm-up
        }
        let started = Instant::now();
        for _ in 0..iterations {
            checksum += parse();
        }
        let per_body = started.elapsed() / iterations;
        println!(
            "{what:<44} {:>8.1} us per body, {:>6.0} MB/s ({checksum})",
            per_body.as_secs_f64() * 1e6,
            body.len() as f64 / per_body.as_secs_f64() / 1e6
        );
    };
    println!(
        "body: 1000 transfers with ids, {} bytes; {iterations} iterations",
        body.len()
    );
    time(
        "keel wire::parse_batch (to envelopes)",
        &|| match parse_batch(body.as_bytes(), 10_000, &domains) {
            Ok((envelopes, _)) => envelopes.len(),
            Err(e) => panic!("the body parses: {e:?}"),
        },
    );
    time(
        "serde_json::from_slice::<Value>",
        &|| match serde_json::from_slice::<serde_json::Value>(body.as_bytes()) {
            Ok(value) => value["commands"].as_array().map_or(0, Vec::len),
            Err(e) => panic!("the body parses: {e}"),
        },
    );
}
