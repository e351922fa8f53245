//! What the load sends: the setup batches that open accounts and create SKUs, and the request
//! bodies each worker generates from its own seeded RNG.
//!
//! Bodies are written as JSON text straight into a reused buffer instead of through serde
//! values: on a two-core machine the client shares the CPU with the server, and building
//! 250k items/s of `serde_json::Value` would cost the server throughput the bench wants to
//! measure. Every name written is plain ASCII without quotes or escapes, which a test checks by
//! parsing the output.
//!
//! The command `type`s come from [`CommandTypes`], computed once per run: the built-in names, or
//! `<domain>.<command>` for a declared domain (`--domain FILE`, see [`crate::domain`]). What the
//! load sends, command by command and parameter by parameter, is [`Workload::sent_commands`],
//! which a domain file is checked against before anything is sent.

pub use crate::engine_bench::IdShape;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::fmt::Write as _;

/// Balance every benchmark account starts with. With at most [`ACCOUNTS_MAX`] accounts the
/// total money stays below `i64::MAX`, so no balance can overflow, and transfers of 1..=100
/// never drain an account in a run of any practical length.
pub const INITIAL_BALANCE: u64 = 1_000_000_000_000;
/// Most accounts a run may open (see [`INITIAL_BALANCE`]).
pub const ACCOUNTS_MAX: u64 = 5_000_000;
/// Stock every benchmark SKU starts with.
pub const SKU_ON_HAND: u64 = 1_000_000_000_000_000;
pub const SKUS_MAX: u64 = 5_000_000;
/// An amount no account and no SKU can cover: the items `--reject-ratio` designs to fail
/// (`insufficient_funds` for transfers, `insufficient_stock` for reservations).
pub const REJECT_AMOUNT: u64 = i64::MAX as u64;
/// Items per setup request (the server's default `--batch-items-max` is 10,000).
pub const SETUP_BATCH_ITEMS: usize = 1000;
/// Most confirmed reservations a worker holds open before it ships or releases one.
const OPEN_RESERVATIONS_MAX: usize = 10_000;
/// Largest `memo` the API accepts.
pub const MEMO_BYTES_MAX: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mix {
    /// Transfers among the pre-opened accounts.
    Ledger,
    /// Reserve, then ship or release, on the pre-created SKUs.
    Inventory,
    /// Half ledger, half inventory items.
    Mixed,
}

impl Mix {
    pub fn needs_accounts(self) -> bool {
        matches!(self, Mix::Ledger | Mix::Mixed)
    }

    pub fn needs_skus(self) -> bool {
        matches!(self, Mix::Inventory | Mix::Mixed)
    }
}

impl Mix {
    /// The name `--mix` takes.
    pub fn name(self) -> &'static str {
        match self {
            Mix::Ledger => "ledger",
            Mix::Inventory => "inventory",
            Mix::Mixed => "mixed",
        }
    }
}

/// The `type` of each command the load sends: the built-in names, or the qualified names of a
/// declared domain's commands (`cel_ledger.transfer`). Computed once per run, so writing a body
/// only copies them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandTypes {
    pub open_account: String,
    pub deposit: String,
    pub transfer: String,
    pub create_sku: String,
    pub reserve: String,
    pub ship: String,
    pub release: String,
    /// Setup rejections that mean "the store already has it" (a rerun on the same store).
    pub exists_codes: Vec<String>,
}

/// The commands the load knows, as the built-in domains name them.
pub const COMMANDS: [&str; 7] = [
    "open_account",
    "deposit",
    "transfer",
    "create_sku",
    "reserve",
    "ship",
    "release",
];

impl CommandTypes {
    /// The built-in ledger's and inventory's commands.
    pub fn builtin() -> Self {
        Self::named(
            |command| command.to_owned(),
            vec!["account_exists".to_owned(), "sku_exists".to_owned()],
        )
    }

    /// `<domain>.<command>` for every command, and the domain's own "already exists" codes.
    pub fn qualified(domain: &str, exists_codes: Vec<String>) -> Self {
        Self::named(|command| format!("{domain}.{command}"), exists_codes)
    }

    fn named(name: impl Fn(&str) -> String, exists_codes: Vec<String>) -> Self {
        Self {
            open_account: name("open_account"),
            deposit: name("deposit"),
            transfer: name("transfer"),
            create_sku: name("create_sku"),
            reserve: name("reserve"),
            ship: name("ship"),
            release: name("release"),
            exists_codes,
        }
    }

    /// Setup rejections that are fine: the store already had the aggregate from an earlier run.
    pub fn is_benign_setup_rejection(&self, code: &str) -> bool {
        self.exists_codes.iter().any(|c| c == code)
    }
}

impl Default for CommandTypes {
    fn default() -> Self {
        Self::builtin()
    }
}

/// What the load writes into one parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// A string (an aggregate's name, an order, a memo) of 1 to `bytes_max` bytes.
    Text { bytes_max: usize },
    /// A JSON integer from `min` to `max`.
    Integer { min: u64, max: u64 },
}

/// One command the load sends (setup included), with every parameter it writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentCommand {
    /// The built-in name (`transfer`); a declared domain must have a command of that name.
    pub command: &'static str,
    pub params: Vec<(&'static str, Sent)>,
}

/// Most orders one worker creates in a run, for the longest order name: more than a week
/// (`DURATION_MAX`) at a million reservations a second.
const ORDERS_PER_WORKER_MAX: u64 = 1_000_000_000_000;

fn decimal_digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

/// The workload, shared by every worker.
#[derive(Clone, Debug)]
pub struct Workload {
    pub mix: Mix,
    pub accounts: u64,
    pub skus: u64,
    pub payload_bytes: usize,
    pub reject_ratio: f64,
    pub seed: u64,
    /// Distinguishes this run's command ids and order ids from any earlier run's on the same
    /// store (command ids are remembered for good; a repeat would only be replayed).
    pub run_id: String,
    /// The `type` each command is sent as.
    pub types: CommandTypes,
    /// The shape of the load's command ids (setup's are always `<run>-setup-...`).
    pub ids: IdShape,
}

impl Workload {
    /// Every command this workload sends with `workers` workers (setup included), and every
    /// parameter with the values it takes, in the order [`Mix`] and [`Generator`] write them.
    pub fn sent_commands(&self, workers: usize) -> Vec<SentCommand> {
        let name = |prefix_bytes: usize, count: u64| Sent::Text {
            bytes_max: prefix_bytes + decimal_digits(count.saturating_sub(1)),
        };
        let reject = self.reject_ratio > 0.0;
        let mut sent = Vec::new();
        if self.mix.needs_accounts() {
            let account = name(1, self.accounts);
            let mut transfer = vec![
                ("from", account),
                ("to", account),
                (
                    "amount",
                    Sent::Integer {
                        min: 1,
                        max: if reject { REJECT_AMOUNT } else { 100 },
                    },
                ),
            ];
            if self.payload_bytes > 0 {
                transfer.push((
                    "memo",
                    Sent::Text {
                        bytes_max: self.payload_bytes.min(MEMO_BYTES_MAX),
                    },
                ));
            }
            let balance = Sent::Integer {
                min: INITIAL_BALANCE,
                max: INITIAL_BALANCE,
            };
            sent.push(SentCommand {
                command: "open_account",
                params: vec![("account", account)],
            });
            sent.push(SentCommand {
                command: "deposit",
                params: vec![("account", account), ("amount", balance)],
            });
            sent.push(SentCommand {
                command: "transfer",
                params: transfer,
            });
        }
        if self.mix.needs_skus() {
            let sku = name(1, self.skus);
            // `o<run>-<worker>-<order>`.
            let order = Sent::Text {
                bytes_max: 1
                    + self.run_id.len()
                    + 1
                    + decimal_digits(workers.saturating_sub(1) as u64)
                    + 1
                    + decimal_digits(ORDERS_PER_WORKER_MAX - 1),
            };
            let qty = Sent::Integer {
                min: 1,
                max: if reject { REJECT_AMOUNT } else { 10 },
            };
            let on_hand = Sent::Integer {
                min: SKU_ON_HAND,
                max: SKU_ON_HAND,
            };
            sent.push(SentCommand {
                command: "create_sku",
                params: vec![("sku", sku), ("on_hand", on_hand)],
            });
            sent.push(SentCommand {
                command: "reserve",
                params: vec![("sku", sku), ("qty", qty), ("order", order)],
            });
            for command in ["ship", "release"] {
                sent.push(SentCommand {
                    command,
                    params: vec![("sku", sku), ("order", order)],
                });
            }
        }
        sent
    }
}

pub fn account_name(i: u64) -> String {
    format!("a{i}")
}

pub fn sku_name(i: u64) -> String {
    format!("s{i}")
}

/// A JSON batch body being written.
#[derive(Default)]
pub struct Body {
    text: String,
    items: usize,
}

impl Body {
    pub fn begin(&mut self) {
        self.text.clear();
        self.text.push_str("{\"commands\":[");
        self.items = 0;
    }

    /// Starts one command object of `kind` with command id `<run>-<tag>-<n>`.
    fn command(&mut self, kind: &str, run: &str, tag: &str, n: u64) {
        self.open_command(kind, format_args!("{run}-{tag}-{n}"));
    }

    /// Starts one command object of `kind` with a command id of 32 hex digits.
    fn command_random(&mut self, kind: &str, id: u128) {
        self.open_command(kind, format_args!("{id:032x}"));
    }

    /// Starts one command object of `kind` with command id `id`.
    fn open_command(&mut self, kind: &str, id: std::fmt::Arguments<'_>) {
        if self.items > 0 {
            self.text.push(',');
        }
        self.items += 1;
        let _ = write!(self.text, "{{\"type\":\"{kind}\",\"id\":\"{id}\"");
    }

    fn field_str(&mut self, key: &str, value: &str) {
        let _ = write!(self.text, ",\"{key}\":\"{value}\"");
    }

    fn field_u64(&mut self, key: &str, value: u64) {
        let _ = write!(self.text, ",\"{key}\":{value}");
    }

    fn end_command(&mut self) {
        self.text.push('}');
    }

    pub fn finish(&mut self, atomic: bool) -> &str {
        self.text.push_str(if atomic {
            "],\"atomic\":true}"
        } else {
            "],\"atomic\":false}"
        });
        &self.text
    }

    pub fn items(&self) -> usize {
        self.items
    }
}

/// The setup requests: open and fund every account, create every SKU. Each body is at most
/// [`SETUP_BATCH_ITEMS`] items; none is atomic (a rerun against the same store gets
/// `account_exists`/`sku_exists` for the opens and still funds the accounts).
pub fn setup_bodies(workload: &Workload) -> Vec<String> {
    let mut bodies = Vec::new();
    let mut body = Body::default();
    body.begin();
    let run = workload.run_id.as_str();
    let flush = |body: &mut Body, bodies: &mut Vec<String>, force: bool| {
        if body.items() > 0 && (force || body.items() + 2 > SETUP_BATCH_ITEMS) {
            bodies.push(body.finish(false).to_owned());
            body.begin();
        }
    };
    if workload.mix.needs_accounts() {
        for i in 0..workload.accounts {
            let name = account_name(i);
            body.command(&workload.types.open_account, run, "setup-open", i);
            body.field_str("account", &name);
            body.end_command();
            body.command(&workload.types.deposit, run, "setup-fund", i);
            body.field_str("account", &name);
            body.field_u64("amount", INITIAL_BALANCE);
            body.end_command();
            flush(&mut body, &mut bodies, false);
        }
    }
    if workload.mix.needs_skus() {
        for i in 0..workload.skus {
            body.command(&workload.types.create_sku, run, "setup-sku", i);
            body.field_str("sku", &sku_name(i));
            body.field_u64("on_hand", SKU_ON_HAND);
            body.end_command();
            flush(&mut body, &mut bodies, false);
        }
    }
    flush(&mut body, &mut bodies, true);
    bodies
}

/// Where a worker's command ids come from.
enum IdSource {
    /// `<run>-w<worker>-<n>`; the next `n`.
    Counter(u64),
    /// 32 random hex digits (boxed: a generator is 320 bytes).
    Random(Box<StdRng>),
}

impl IdSource {
    /// Starts the next command object of `kind` in `body`, with the next id.
    fn begin_command(&mut self, body: &mut Body, kind: &str, run: &str, tag: &str) {
        match self {
            IdSource::Counter(next) => {
                body.command(kind, run, tag, *next);
                *next += 1;
            }
            IdSource::Random(rng) => body.command_random(kind, rng.random()),
        }
    }
}

/// FNV-1a of `text`: a stable 64-bit digest (the standard library's hasher may change).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One worker's request generator.
pub struct Generator {
    workload: Workload,
    worker: usize,
    /// `w<worker>`, the middle part of this worker's command ids.
    tag: String,
    rng: StdRng,
    memo: String,
    body: Body,
    ids: IdSource,
    next_order: u64,
    /// Reservations this worker knows are committed, oldest first: (sku, order number).
    open: VecDeque<(u64, u64)>,
    /// Reservations in the request being sent: (item position, sku, order number).
    pending: Vec<(usize, u64, u64)>,
    designed_rejects: usize,
}

impl Generator {
    pub fn new(workload: &Workload, worker: usize) -> Self {
        let seed = workload.seed
            ^ (worker as u64)
                .wrapping_add(1)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self {
            memo: "x".repeat(workload.payload_bytes.min(MEMO_BYTES_MAX)),
            workload: workload.clone(),
            worker,
            tag: format!("w{worker}"),
            rng: StdRng::seed_from_u64(seed),
            body: Body::default(),
            ids: match workload.ids {
                IdShape::Counter => IdSource::Counter(0),
                // Its own generator, so that the requests are the same as with counters, and
                // seeded with the run id too: a later run on the same store sends other ids
                // (a repeated id would only be replayed, not committed).
                IdShape::Random => IdSource::Random(Box::new(StdRng::seed_from_u64(
                    seed ^ fnv1a(&workload.run_id),
                ))),
            },
            next_order: 0,
            open: VecDeque::new(),
            pending: Vec::new(),
            designed_rejects: 0,
        }
    }

    /// Writes the next request of `items` commands and returns its body.
    pub fn next_body(&mut self, items: usize, atomic: bool) -> &str {
        self.body.begin();
        self.pending.clear();
        self.designed_rejects = 0;
        for position in 0..items {
            let ledger = match self.workload.mix {
                Mix::Ledger => true,
                Mix::Inventory => false,
                Mix::Mixed => self.rng.random_bool(0.5),
            };
            let reject = self.workload.reject_ratio > 0.0
                && self.rng.random_bool(self.workload.reject_ratio);
            self.designed_rejects += usize::from(reject);
            if ledger {
                self.transfer(reject);
            } else {
                self.inventory_item(position, reject);
            }
        }
        debug_assert_eq!(self.body.items(), items);
        self.body.finish(atomic)
    }

    /// Items of the last body written to be rejected.
    pub fn designed_rejects(&self) -> usize {
        self.designed_rejects
    }

    /// Learns which items of the last body committed, so later requests ship or release only
    /// reservations that exist.
    pub fn confirm(&mut self, committed: impl Fn(usize) -> bool) {
        for &(position, sku, order) in &self.pending {
            if committed(position) {
                self.open.push_back((sku, order));
            }
        }
        self.pending.clear();
    }

    fn transfer(&mut self, reject: bool) {
        let accounts = self.workload.accounts.max(2);
        let from = self.rng.random_range(0..accounts);
        let mut to = self.rng.random_range(0..accounts - 1);
        if to >= from {
            to += 1;
        }
        let amount = if reject {
            REJECT_AMOUNT
        } else {
            self.rng.random_range(1..=100)
        };
        self.ids.begin_command(
            &mut self.body,
            &self.workload.types.transfer,
            &self.workload.run_id,
            &self.tag,
        );
        self.body.field_str("from", &account_name(from));
        self.body.field_str("to", &account_name(to));
        self.body.field_u64("amount", amount);
        if !self.memo.is_empty() {
            let _ = write!(self.body.text, ",\"memo\":\"{}\"", self.memo);
        }
        self.body.end_command();
    }

    fn inventory_item(&mut self, position: usize, reject: bool) {
        let settle = !reject
            && !self.open.is_empty()
            && (self.open.len() >= OPEN_RESERVATIONS_MAX || self.rng.random_bool(0.5));
        if settle && let Some((sku, order)) = self.open.pop_front() {
            let kind = if self.rng.random_bool(0.5) {
                &self.workload.types.ship
            } else {
                &self.workload.types.release
            };
            let order = self.order_name(order);
            self.ids
                .begin_command(&mut self.body, kind, &self.workload.run_id, &self.tag);
            self.body.field_str("sku", &sku_name(sku));
            self.body.field_str("order", &order);
            self.body.end_command();
            return;
        }
        let sku = self.rng.random_range(0..self.workload.skus.max(1));
        let qty = if reject {
            REJECT_AMOUNT
        } else {
            self.rng.random_range(1..=10)
        };
        let order = self.next_order;
        self.next_order += 1;
        let order_name = self.order_name(order);
        self.ids.begin_command(
            &mut self.body,
            &self.workload.types.reserve,
            &self.workload.run_id,
            &self.tag,
        );
        self.body.field_str("sku", &sku_name(sku));
        self.body.field_u64("qty", qty);
        self.body.field_str("order", &order_name);
        self.body.end_command();
        if !reject {
            self.pending.push((position, sku, order));
        }
    }

    fn order_name(&self, order: u64) -> String {
        format!("o{}-{}-{}", self.workload.run_id, self.worker, order)
    }
}

/// A run id: the start time in milliseconds, base 36 (short, unique per run and sortable).
pub fn run_id_from_millis(millis: u128) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut n = millis;
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn workload(mix: Mix) -> Workload {
        Workload {
            mix,
            accounts: 50,
            skus: 5,
            payload_bytes: 16,
            reject_ratio: 0.0,
            seed: 7,
            run_id: "r1".into(),
            types: CommandTypes::builtin(),
            ids: IdShape::Counter,
        }
    }

    fn parse(body: &str) -> Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("invalid JSON ({e}): {body}"))
    }

    #[test]
    fn ledger_body_is_valid_json_with_unique_ids_and_memo() {
        let mut g = Generator::new(&workload(Mix::Ledger), 3);
        let v = parse(g.next_body(100, false));
        assert_eq!(v["atomic"], false);
        let commands = v["commands"].as_array().unwrap();
        assert_eq!(commands.len(), 100);
        let mut ids = std::collections::HashSet::new();
        for c in commands {
            assert_eq!(c["type"], "transfer");
            assert_ne!(c["from"], c["to"]);
            let amount = c["amount"].as_u64().unwrap();
            assert!((1..=100).contains(&amount));
            assert_eq!(c["memo"].as_str().unwrap().len(), 16);
            assert!(ids.insert(c["id"].as_str().unwrap().to_owned()));
        }
        let second = parse(g.next_body(100, true));
        assert_eq!(second["atomic"], true);
        for c in second["commands"].as_array().unwrap() {
            assert!(
                ids.insert(c["id"].as_str().unwrap().to_owned()),
                "ids repeat across requests"
            );
        }
    }

    /// The `id` of every command of a body.
    fn ids_of(body: &str) -> Vec<String> {
        parse(body)["commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn random_ids_are_uuid_sized_hex_unique_and_other_for_another_run() {
        for mix in [Mix::Ledger, Mix::Inventory, Mix::Mixed] {
            let random = Workload {
                ids: IdShape::Random,
                ..workload(mix)
            };
            let mut generator = Generator::new(&random, 0);
            let mut seen = std::collections::HashSet::new();
            for _ in 0..5 {
                let body = generator.next_body(100, false).to_owned();
                // Every reservation confirmed: the inventory mix then ships and releases too.
                generator.confirm(|_| true);
                for id in ids_of(&body) {
                    assert_eq!(id.len(), 32, "{id}");
                    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
                    assert!(seen.insert(id.clone()), "{id} twice");
                }
            }
            assert_eq!(seen.len(), 500);
            // The same seed and run: the same ids, and the same requests as with counters
            // apart from the ids.
            let again = Generator::new(&random, 0).next_body(100, false).to_owned();
            let first = Generator::new(&random, 0).next_body(100, false).to_owned();
            assert_eq!(again, first);
            let counter = Generator::new(&workload(mix), 0)
                .next_body(100, false)
                .to_owned();
            let strip = |body: &str| {
                let mut v = parse(body);
                for c in v["commands"].as_array_mut().unwrap() {
                    c.as_object_mut().unwrap().remove("id");
                }
                v
            };
            assert_eq!(strip(&first), strip(&counter), "{mix:?}");
            assert!(ids_of(&counter)[0].starts_with("r1-w0-"));
            // Another run on the same store (same seed): other ids.
            let later = Workload {
                run_id: "r2".into(),
                ..random.clone()
            };
            let other = Generator::new(&later, 0).next_body(100, false).to_owned();
            let first_ids: std::collections::HashSet<_> = ids_of(&first).into_iter().collect();
            assert!(ids_of(&other).iter().all(|id| !first_ids.contains(id)));
        }
    }

    #[test]
    fn same_seed_same_requests_other_worker_other_requests() {
        let w = workload(Mix::Mixed);
        let a = Generator::new(&w, 0).next_body(50, false).to_owned();
        let b = Generator::new(&w, 0).next_body(50, false).to_owned();
        let c = Generator::new(&w, 1).next_body(50, false).to_owned();
        assert_eq!(a, b);
        assert_ne!(a.replace("-w0-", "-w1-"), c);
    }

    #[test]
    fn reject_ratio_designs_that_share_of_impossible_items() {
        let mut w = workload(Mix::Ledger);
        w.reject_ratio = 0.25;
        let mut g = Generator::new(&w, 0);
        let v = parse(g.next_body(4000, false));
        let impossible = v["commands"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["amount"].as_u64() == Some(REJECT_AMOUNT))
            .count();
        assert_eq!(impossible, g.designed_rejects());
        assert!((800..1200).contains(&impossible), "{impossible} of 4000");
    }

    #[test]
    fn inventory_ships_or_releases_only_confirmed_reservations() {
        let mut g = Generator::new(&workload(Mix::Inventory), 0);
        let first = parse(g.next_body(20, false));
        assert!(
            first["commands"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["type"] == "reserve")
        );
        // Only items 0 and 1 committed: at most those two orders may be settled later.
        g.confirm(|position| position < 2);
        let orders: Vec<String> = first["commands"].as_array().unwrap()[..2]
            .iter()
            .map(|c| c["order"].as_str().unwrap().to_owned())
            .collect();
        let second = parse(g.next_body(200, false));
        let settled: Vec<&Value> = second["commands"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["type"] == "ship" || c["type"] == "release")
            .collect();
        assert!(!settled.is_empty() && settled.len() <= 2);
        for c in settled {
            assert!(orders.contains(&c["order"].as_str().unwrap().to_owned()));
            assert!(c.get("qty").is_none());
        }
    }

    #[test]
    fn setup_opens_funds_and_creates_everything_in_bounded_batches() {
        let mut w = workload(Mix::Mixed);
        w.accounts = 1200;
        w.skus = 700;
        let bodies = setup_bodies(&w);
        let mut opens = 0;
        let mut deposits = 0;
        let mut skus = 0;
        for body in &bodies {
            let v = parse(body);
            let commands = v["commands"].as_array().unwrap();
            assert!(!commands.is_empty() && commands.len() <= SETUP_BATCH_ITEMS);
            for c in commands {
                match c["type"].as_str().unwrap() {
                    "open_account" => opens += 1,
                    "deposit" => {
                        deposits += 1;
                        assert_eq!(c["amount"].as_u64(), Some(INITIAL_BALANCE));
                    }
                    "create_sku" => skus += 1,
                    other => panic!("unexpected {other}"),
                }
            }
        }
        assert_eq!((opens, deposits, skus), (1200, 1200, 700));
    }

    #[test]
    fn a_declared_domain_gets_every_type_qualified_in_setup_and_load() {
        let mut w = workload(Mix::Mixed);
        w.types = CommandTypes::qualified("dom", vec!["dom_exists".into()]);
        w.accounts = 3;
        w.skus = 2;
        let mut types = std::collections::BTreeSet::new();
        for body in setup_bodies(&w) {
            for c in parse(&body)["commands"].as_array().unwrap() {
                types.insert(c["type"].as_str().unwrap().to_owned());
            }
        }
        let mut g = Generator::new(&w, 0);
        for _ in 0..20 {
            let v = parse(g.next_body(50, false));
            for c in v["commands"].as_array().unwrap() {
                types.insert(c["type"].as_str().unwrap().to_owned());
            }
            g.confirm(|_| true);
        }
        let expected: std::collections::BTreeSet<String> =
            COMMANDS.iter().map(|c| format!("dom.{c}")).collect();
        assert_eq!(types, expected);
        assert!(w.types.is_benign_setup_rejection("dom_exists"));
        assert!(!w.types.is_benign_setup_rejection("account_exists"));
        assert!(CommandTypes::builtin().is_benign_setup_rejection("account_exists"));
    }

    /// `sent_commands` (what a domain file is checked against) says exactly what the bodies
    /// hold: every command, every parameter, and values within the ranges it gives.
    #[test]
    fn sent_commands_describe_every_body_written() {
        for (mix, reject_ratio, payload_bytes) in [
            (Mix::Ledger, 0.0, 0),
            (Mix::Ledger, 0.2, 100),
            (Mix::Inventory, 0.2, 0),
            (Mix::Mixed, 0.1, 16),
        ] {
            let mut w = workload(mix);
            w.reject_ratio = reject_ratio;
            w.payload_bytes = payload_bytes;
            w.accounts = 1234;
            w.skus = 99;
            w.run_id = "mzzzzzzz".into();
            let workers = 12;
            let sent = w.sent_commands(workers);
            let mut seen = std::collections::BTreeSet::new();
            let mut bodies = setup_bodies(&w);
            let mut g = Generator::new(&w, workers - 1);
            for _ in 0..30 {
                bodies.push(g.next_body(100, false).to_owned());
                g.confirm(|_| true);
            }
            for body in &bodies {
                for c in parse(body)["commands"].as_array().unwrap() {
                    let c = c.as_object().unwrap();
                    let kind = c["type"].as_str().unwrap();
                    let spec = sent
                        .iter()
                        .find(|s| s.command == kind)
                        .unwrap_or_else(|| panic!("{mix:?}: `{kind}` is not in sent_commands"));
                    seen.insert(kind.to_owned());
                    let keys: Vec<&str> = c
                        .keys()
                        .map(String::as_str)
                        .filter(|k| !matches!(*k, "type" | "id"))
                        .collect();
                    let names: Vec<&str> = spec.params.iter().map(|(n, _)| *n).collect();
                    assert_eq!(
                        {
                            let mut k = keys.clone();
                            k.sort_unstable();
                            k
                        },
                        {
                            let mut n = names.clone();
                            n.sort_unstable();
                            n
                        },
                        "{mix:?} {kind}"
                    );
                    for (name, value) in &spec.params {
                        match (value, &c[*name]) {
                            (Sent::Text { bytes_max }, Value::String(text)) => {
                                assert!(
                                    !text.is_empty() && text.len() <= *bytes_max,
                                    "{kind}.{name}: {text} (max {bytes_max})"
                                );
                            }
                            (Sent::Integer { min, max }, Value::Number(n)) => {
                                let n = n.as_u64().unwrap();
                                assert!((*min..=*max).contains(&n), "{kind}.{name}: {n}");
                            }
                            (spec, sent) => panic!("{kind}.{name}: {spec:?} vs {sent}"),
                        }
                    }
                }
            }
            let all: std::collections::BTreeSet<String> =
                sent.iter().map(|s| s.command.to_owned()).collect();
            assert_eq!(seen, all, "{mix:?}: a listed command was never sent");
        }
    }

    #[test]
    fn money_supply_cannot_overflow() {
        assert!(u128::from(ACCOUNTS_MAX) * u128::from(INITIAL_BALANCE) < i64::MAX as u128);
    }

    #[test]
    fn run_ids_are_base36() {
        assert_eq!(run_id_from_millis(0), "0");
        assert_eq!(run_id_from_millis(35), "z");
        assert_eq!(run_id_from_millis(36), "10");
    }
}
