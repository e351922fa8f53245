//! The ledger and the inventory written as declared domains (examples/domains/) decide exactly
//! as the built-in ones: on the same random command sequences, the same accept/reject answers,
//! the same rejection codes, and the same states and versions after every command.
//!
//! Commands are drawn within what the HTTP edge lets through (amounts 1 to 2^63-1, names the
//! edge accepts), over a handful of aggregates so that sequences collide: opening twice,
//! transferring to oneself, overdrawing, closing with money in, reserving twice for one order.

#![allow(clippy::unwrap_used, reason = "a panic in a test is a test failure")]

use keel_invariants::declared::{DeclaredCommand, DeclaredState, DomainSet, Value};
use keel_invariants::{
    Aggregate, AggregateId, Command, Envelope, Event, Rejection, State, apply, decide_at,
    inventory, ledger,
};
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

type Store = HashMap<AggregateId, Aggregate>;

const ACCOUNTS: [&str; 3] = ["alice", "bob", "carol"];
const SKUS: [&str; 2] = ["A-17", "B-2"];
const ORDERS: [&str; 3] = ["o-1", "o-2", "o-3"];
const I64_MAX: u64 = i64::MAX as u64;

fn examples() -> Arc<DomainSet> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/domains/");
    let files: Vec<(String, String)> = ["ledger.toml", "inventory.toml"]
        .iter()
        .map(|name| {
            let path = format!("{root}{name}");
            let text = std::fs::read_to_string(&path).unwrap();
            (path, text)
        })
        .collect();
    Arc::new(DomainSet::load(&files).unwrap())
}

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 1..=1_000u64,
        1 => Just(I64_MAX),
        1 => Just(I64_MAX - 1),
        1 => 1..=I64_MAX,
    ]
}

fn limit() -> impl Strategy<Value = u64> {
    prop_oneof![4 => Just(0u64), 4 => 0..=1_000u64, 1 => Just(I64_MAX), 1 => 0..=I64_MAX]
}

fn name(names: &'static [&'static str]) -> impl Strategy<Value = &'static str> {
    prop::sample::select(names)
}

/// One built-in command, with the expected version it carries (if any).
#[derive(Clone, Debug)]
enum Cmd {
    Ledger(ledger::Command),
    Inventory(inventory::Command),
}

fn ledger_command() -> impl Strategy<Value = ledger::Command> {
    use ledger::Command as L;
    let id = || name(&ACCOUNTS).prop_map(|n| AggregateId::new(ledger::KIND, n));
    let memo = prop::option::of("[a-z]{0,6}");
    prop_oneof![
        2 => (id(), limit()).prop_map(|(account, overdraft_limit)| L::OpenAccount { account, overdraft_limit }),
        3 => (id(), amount(), memo.clone()).prop_map(|(account, amount, memo)| L::Deposit { account, amount, memo }),
        3 => (id(), amount(), memo.clone()).prop_map(|(account, amount, memo)| L::Withdraw { account, amount, memo }),
        4 => (id(), id(), amount(), memo).prop_map(|(from, to, amount, memo)| L::Transfer { from, to, amount, memo }),
        1 => id().prop_map(|account| L::CloseAccount { account }),
    ]
}

fn inventory_command() -> impl Strategy<Value = inventory::Command> {
    use inventory::Command as I;
    let id = || name(&SKUS).prop_map(|n| AggregateId::new(inventory::KIND, n));
    let order = || name(&ORDERS).prop_map(str::to_owned);
    let qty = || prop_oneof![8 => 1..=50u64, 1 => Just(I64_MAX), 1 => 1..=I64_MAX];
    prop_oneof![
        2 => (id(), prop_oneof![3 => 0..=100u64, 1 => Just(I64_MAX)]).prop_map(|(sku, on_hand)| I::CreateSku { sku, on_hand }),
        2 => (id(), qty()).prop_map(|(sku, qty)| I::Restock { sku, qty }),
        4 => (id(), qty(), order()).prop_map(|(sku, qty, order)| I::Reserve { sku, qty, order }),
        2 => (id(), order()).prop_map(|(sku, order)| I::Release { sku, order }),
        2 => (id(), order()).prop_map(|(sku, order)| I::Ship { sku, order }),
    ]
}

fn sequence() -> impl Strategy<Value = Vec<(Cmd, Option<u64>)>> {
    let command = prop_oneof![
        ledger_command().prop_map(Cmd::Ledger),
        inventory_command().prop_map(Cmd::Inventory),
    ];
    let version = prop_oneof![6 => Just(None), 1 => (0..4u64).prop_map(Some)];
    prop::collection::vec((command, version), 1..150)
}

/// The declared command `type_name` with `params` by name (absent optional ones at their
/// defaults), its targets built from its id parameters.
fn declared(set: &DomainSet, type_name: &str, params: &[(&str, Value)]) -> Command {
    let keel_invariants::declared::Resolved::Command(def) = set.resolve(type_name) else {
        panic!("{type_name} is not a declared command")
    };
    let values: Vec<Value> = def
        .params
        .iter()
        .map(|p| {
            params
                .iter()
                .find(|(n, _)| p.name == *n)
                .map_or_else(|| p.absent(), |(_, v)| v.clone())
        })
        .collect();
    let targets = def
        .targets
        .iter()
        .map(|t| {
            let Value::String(name) = &values[t.param_index] else {
                panic!("id parameter is a string")
            };
            AggregateId::new(&t.kind.name, name)
        })
        .collect();
    Command::new(DeclaredCommand {
        def: Arc::clone(def),
        params: values,
        targets,
    })
}

fn s(text: &str) -> Value {
    Value::String(text.to_owned())
}

fn translate(set: &DomainSet, cmd: &Cmd) -> Command {
    use inventory::Command as I;
    use ledger::Command as L;
    let memo = |m: &Option<String>| m.as_deref().map(s);
    let with_memo = |mut params: Vec<(&'static str, Value)>, m: &Option<String>| {
        if let Some(m) = memo(m) {
            params.push(("memo", m));
        }
        params
    };
    match cmd {
        Cmd::Ledger(L::OpenAccount {
            account,
            overdraft_limit,
        }) => declared(
            set,
            "cel_ledger.open_account",
            &[
                ("account", s(account.name())),
                ("overdraft_limit", Value::Uint(*overdraft_limit)),
            ],
        ),
        Cmd::Ledger(L::Deposit {
            account,
            amount,
            memo,
        }) => declared(
            set,
            "cel_ledger.deposit",
            &with_memo(
                vec![
                    ("account", s(account.name())),
                    ("amount", Value::Uint(*amount)),
                ],
                memo,
            ),
        ),
        Cmd::Ledger(L::Withdraw {
            account,
            amount,
            memo,
        }) => declared(
            set,
            "cel_ledger.withdraw",
            &with_memo(
                vec![
                    ("account", s(account.name())),
                    ("amount", Value::Uint(*amount)),
                ],
                memo,
            ),
        ),
        Cmd::Ledger(L::Transfer {
            from,
            to,
            amount,
            memo,
        }) => declared(
            set,
            "cel_ledger.transfer",
            &with_memo(
                vec![
                    ("from", s(from.name())),
                    ("to", s(to.name())),
                    ("amount", Value::Uint(*amount)),
                ],
                memo,
            ),
        ),
        Cmd::Ledger(L::CloseAccount { account }) => declared(
            set,
            "cel_ledger.close_account",
            &[("account", s(account.name()))],
        ),
        Cmd::Inventory(I::CreateSku { sku, on_hand }) => declared(
            set,
            "cel_inventory.create_sku",
            &[("sku", s(sku.name())), ("on_hand", Value::Uint(*on_hand))],
        ),
        Cmd::Inventory(I::Restock { sku, qty }) => declared(
            set,
            "cel_inventory.restock",
            &[("sku", s(sku.name())), ("qty", Value::Uint(*qty))],
        ),
        Cmd::Inventory(I::Reserve { sku, qty, order }) => declared(
            set,
            "cel_inventory.reserve",
            &[
                ("sku", s(sku.name())),
                ("qty", Value::Uint(*qty)),
                ("order", s(order)),
            ],
        ),
        Cmd::Inventory(I::Release { sku, order }) => declared(
            set,
            "cel_inventory.release",
            &[("sku", s(sku.name())), ("order", s(order))],
        ),
        Cmd::Inventory(I::Ship { sku, order }) => declared(
            set,
            "cel_inventory.ship",
            &[("sku", s(sku.name())), ("order", s(order))],
        ),
    }
}

fn step(store: &mut Store, envelope: &Envelope, now: u64) -> Result<Event, Rejection> {
    let result = decide_at(envelope, |id| store.get(id), now);
    if let Ok(event) = &result {
        let ids: Vec<AggregateId> = event.targets().iter().cloned().collect();
        for (target, id) in ids.iter().enumerate() {
            let previous = store.remove(id);
            store.insert(id.clone(), apply(event, target, previous));
        }
    }
    result
}

/// The declared state a built-in state corresponds to, as field values.
fn as_fields(state: &State) -> Vec<(&'static str, Value)> {
    if let Some(a) = state.downcast_ref::<ledger::Account>() {
        return vec![
            ("balance", Value::Int(a.balance)),
            ("closed", Value::Bool(a.closed)),
            ("overdraft_limit", Value::Uint(a.overdraft_limit)),
        ];
    }
    let Some(sku) = state.downcast_ref::<inventory::Sku>() else {
        panic!("a built-in store holds no declared state")
    };
    vec![
        ("on_hand", Value::Uint(sku.on_hand)),
        (
            "reservations",
            Value::Map(
                sku.reservations
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::Uint(*v)))
                    .collect(),
            ),
        ),
        ("reserved", Value::Uint(sku.reserved)),
    ]
}

fn declared_id(id: &AggregateId) -> AggregateId {
    let kind = match id.kind() {
        ledger::KIND => "cel_account",
        inventory::KIND => "cel_sku",
        other => panic!("unexpected kind {other}"),
    };
    AggregateId::new(kind, id.name())
}

fn compare_stores(builtin: &Store, declared: &Store) -> Result<(), TestCaseError> {
    prop_assert_eq!(builtin.len(), declared.len(), "aggregate counts differ");
    for (id, aggregate) in builtin {
        let other = declared.get(&declared_id(id));
        prop_assert!(other.is_some(), "{} is missing from the declared store", id);
        let other = other.unwrap();
        prop_assert_eq!(aggregate.version, other.version, "{} versions differ", id);
        let Some(fields) = other.state.downcast_ref::<DeclaredState>() else {
            return Err(TestCaseError::fail(format!("{id}: not a declared state")));
        };
        let expected = as_fields(&aggregate.state);
        prop_assert_eq!(fields.fields.len(), expected.len(), "{} field count", id);
        for (name, value) in expected {
            prop_assert_eq!(fields.fields.get(name), Some(&value), "{}.{}", id, name);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn declared_ledger_and_inventory_decide_as_the_built_in_ones(commands in sequence()) {
        let set = examples();
        let (mut builtin, mut declared) = (Store::new(), Store::new());
        for (index, (cmd, expected_version)) in commands.iter().enumerate() {
            let b = Envelope {
                id: None,
                expected_version: *expected_version,
                command: match cmd {
                    Cmd::Ledger(c) => Command::new(c.clone()),
                    Cmd::Inventory(c) => Command::new(c.clone()),
                },
            };
            let d = Envelope {
                id: None,
                expected_version: *expected_version,
                command: translate(&set, cmd),
            };
            let now = 1_800_000_000_000_000 + index as u64;
            let (rb, rd) = (step(&mut builtin, &b, now), step(&mut declared, &d, now));
            match (&rb, &rd) {
                (Ok(_), Ok(_)) => {}
                (Err(x), Err(y)) => prop_assert_eq!(
                    x.code.as_str(), y.code.as_str(),
                    "command {} {:?}: built-in says {} ({}), declared says {} ({})",
                    index, cmd, x.code.as_str(), x.message, y.code.as_str(), y.message
                ),
                _ => return Err(TestCaseError::fail(format!(
                    "command {index} {cmd:?}: built-in {rb:?}, declared {rd:?}"
                ))),
            }
            compare_stores(&builtin, &declared)?;
            // Every declared state satisfies its kind's invariants.
            for (id, aggregate) in &declared {
                prop_assert!(set.check_invariants(id, aggregate).is_ok(), "{} breaks an invariant", id);
            }
        }
    }
}
