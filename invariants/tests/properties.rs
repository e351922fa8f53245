//! Properties of the domain and its codec over random command sequences.
//!
//! Commands address a handful of accounts, SKUs and orders so that sequences collide: they open
//! and close the same accounts, transfer to themselves, reserve twice for one order, and use
//! zero, huge and out-of-range amounts. Each sequence runs through `decide` + `apply` the way the
//! sequencer does, and every step and the end state are checked.

#![allow(clippy::unwrap_used, reason = "a panic in a test is a test failure")]

use keel_invariants::codec::{
    decode_aggregate, decode_event, decode_outcome, encode_aggregate, encode_event, encode_outcome,
};
use keel_invariants::inventory::{self, Sku};
use keel_invariants::ledger::{self, Account};
use keel_invariants::{
    Aggregate, AggregateId, Command, CommandOutcome, Envelope, Event, LawScope, LoggedEvent,
    RejectCode, Rejection, State, apply, check_invariants, conservation_laws, decide,
};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};

type Store = HashMap<AggregateId, Aggregate>;

const ACCOUNTS: [&str; 3] = ["alice", "bob", "carol"];
const SKUS: [&str; 2] = ["A-17", "B-2"];
const ORDERS: [&str; 3] = ["o-1", "o-2", "o-3"];
const I64_MAX: u64 = i64::MAX as u64;

// ---------------------------------------------------------------------------------------------
// Strategies.

fn account_id() -> impl Strategy<Value = AggregateId> {
    prop::sample::select(&ACCOUNTS[..]).prop_map(|name| AggregateId::new(ledger::KIND, name))
}

fn sku_id() -> impl Strategy<Value = AggregateId> {
    prop::sample::select(&SKUS[..]).prop_map(|name| AggregateId::new(inventory::KIND, name))
}

fn order() -> impl Strategy<Value = String> {
    prop::sample::select(&ORDERS[..]).prop_map(str::to_owned)
}

/// Mostly small amounts, so that sequences make progress, plus every edge the rules care about.
fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 1..=1_000u64,
        1 => Just(0),
        1 => Just(I64_MAX),
        1 => Just(I64_MAX + 1),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn memo() -> impl Strategy<Value = Option<String>> {
    prop::option::of("[a-z ]{0,8}")
}

fn ledger_command() -> impl Strategy<Value = ledger::Command> {
    use ledger::Command as C;
    prop_oneof![
        2 => (account_id(), amount())
            .prop_map(|(account, overdraft_limit)| C::OpenAccount { account, overdraft_limit }),
        3 => (account_id(), amount(), memo())
            .prop_map(|(account, amount, memo)| C::Deposit { account, amount, memo }),
        3 => (account_id(), amount(), memo())
            .prop_map(|(account, amount, memo)| C::Withdraw { account, amount, memo }),
        3 => (account_id(), account_id(), amount(), memo())
            .prop_map(|(from, to, amount, memo)| C::Transfer { from, to, amount, memo }),
        1 => account_id().prop_map(|account| C::CloseAccount { account }),
    ]
}

fn inventory_command() -> impl Strategy<Value = inventory::Command> {
    use inventory::Command as C;
    prop_oneof![
        1 => (sku_id(), amount()).prop_map(|(sku, on_hand)| C::CreateSku { sku, on_hand }),
        2 => (sku_id(), amount()).prop_map(|(sku, qty)| C::Restock { sku, qty }),
        3 => (sku_id(), amount(), order()).prop_map(|(sku, qty, order)| C::Reserve { sku, qty, order }),
        2 => (sku_id(), order()).prop_map(|(sku, order)| C::Release { sku, order }),
        2 => (sku_id(), order()).prop_map(|(sku, order)| C::Ship { sku, order }),
    ]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    let command = prop_oneof![
        ledger_command().prop_map(Command::from),
        inventory_command().prop_map(Command::from),
    ];
    let expected_version = prop_oneof![6 => Just(None), 1 => (0..6u64).prop_map(Some)];
    let id = prop::option::of("c-[0-9]{1,4}");
    (id, expected_version, command).prop_map(|(id, expected_version, command)| Envelope {
        id,
        expected_version,
        command,
    })
}

fn envelopes() -> impl Strategy<Value = Vec<Envelope>> {
    prop::collection::vec(envelope(), 0..200)
}

// ---------------------------------------------------------------------------------------------
// Running a sequence the way the sequencer does.

/// Folds `event` into every aggregate it targets; returns the ids it touched.
fn apply_to(store: &mut Store, event: &Event) -> Vec<AggregateId> {
    let ids: Vec<AggregateId> = event.targets().iter().cloned().collect();
    for (target, id) in ids.iter().enumerate() {
        let previous = store.remove(id);
        let next = apply(event, target, previous);
        store.insert(id.clone(), next);
    }
    ids
}

fn decide_in(store: &Store, envelope: &Envelope) -> Result<Event, Rejection> {
    let targets = envelope.command.targets();
    decide(
        envelope,
        store.get(targets.primary),
        targets.secondary.and_then(|id| store.get(id)),
    )
}

/// What a sequence left behind.
#[derive(Default)]
struct Run {
    store: Store,
    log: Vec<LoggedEvent>,
    /// What the command-id index would hold for each command (seq = position in `log`).
    outcomes: Vec<CommandOutcome>,
    events_per_aggregate: HashMap<AggregateId, u64>,
    deposited_total: i128,
    withdrawn_total: i128,
}

/// Runs `envelopes`, checking the per-step properties (a) and (b) as it goes.
fn run(envelopes: &[Envelope]) -> Result<Run, TestCaseError> {
    let mut run = Run::default();
    for envelope in envelopes {
        let before = run.store.clone();
        match decide_in(&run.store, envelope) {
            Ok(event) => accept(&mut run, envelope, event)?,
            Err(rejection) => {
                // (b) A rejection is a value computed from the state alone: it leaves the store
                // as it was, and deciding again gives the same answer.
                prop_assert_ne!(&rejection.code, &RejectCode::AtomicRollback);
                prop_assert_eq!(&run.store, &before);
                prop_assert_eq!(decide_in(&run.store, envelope), Err(rejection.clone()));
                run.outcomes.push(CommandOutcome::Rejected(rejection));
            }
        }
    }
    Ok(run)
}

fn accept(run: &mut Run, envelope: &Envelope, event: Event) -> Result<(), TestCaseError> {
    let command_targets: Vec<&AggregateId> = envelope.command.targets().iter().collect();
    let event_targets: Vec<&AggregateId> = event.targets().iter().collect();
    prop_assert_eq!(
        command_targets,
        event_targets,
        "an event targets what its command did"
    );
    for id in apply_to(&mut run.store, &event) {
        // (a) Every aggregate an accepted event touched still holds its invariants.
        let aggregate = &run.store[&id];
        prop_assert_eq!(
            check_invariants(aggregate),
            Ok(()),
            "{} after {:?}",
            id,
            event
        );
        *run.events_per_aggregate.entry(id).or_default() += 1;
    }
    match event.downcast_ref::<ledger::Event>() {
        Some(ledger::Event::Deposited { amount, .. }) => {
            run.deposited_total += i128::from(*amount);
        }
        Some(ledger::Event::Withdrew { amount, .. }) => {
            run.withdrawn_total += i128::from(*amount);
        }
        _ => {}
    }
    let seq = u64::try_from(run.log.len()).unwrap();
    run.outcomes.push(CommandOutcome::Committed { seq });
    run.log.push(LoggedEvent {
        command_id: envelope.id.clone(),
        event,
    });
    Ok(())
}

fn balance_total(store: &Store) -> i128 {
    store
        .values()
        .map(|aggregate| {
            aggregate
                .state
                .downcast_ref::<ledger::Account>()
                .map_or(0, |account| i128::from(account.balance))
        })
        .sum()
}

fn check_conservation(log: &[LoggedEvent], store: &Store) -> Result<(), TestCaseError> {
    let laws = conservation_laws();
    prop_assert_eq!(
        laws.len(),
        3,
        "ledger.money, inventory.on_hand, inventory.reserved"
    );
    for law in laws {
        let mut flows: HashMap<&AggregateId, i128> = HashMap::new();
        for logged in log {
            for (target, id) in logged.event.targets().iter().enumerate() {
                if let Some(flow) = law.flow(&logged.event, target) {
                    *flows.entry(id).or_default() += flow;
                }
            }
        }
        let quantities: HashMap<&AggregateId, i128> = store
            .iter()
            .filter_map(|(id, a)| law.quantity(&a.state).map(|q| (id, q)))
            .collect();
        match law.scope() {
            LawScope::Total => prop_assert_eq!(
                quantities.values().sum::<i128>(),
                flows.values().sum::<i128>(),
                "{}",
                law.statement()
            ),
            LawScope::PerAggregate => {
                for (id, quantity) in &quantities {
                    let flow = flows.get(id).copied().unwrap_or(0);
                    prop_assert_eq!(*quantity, flow, "{}: {}", law.statement(), id);
                }
            }
        }
    }
    Ok(())
}

fn replay(log: &[LoggedEvent]) -> Store {
    let mut store = Store::new();
    for logged in log {
        apply_to(&mut store, &logged.event);
    }
    store
}

// ---------------------------------------------------------------------------------------------
// Codec helpers.

fn encoded_event(event: &LoggedEvent) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_event(event, &mut bytes);
    bytes
}

fn encoded_aggregate(aggregate: &Aggregate) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_aggregate(aggregate, &mut bytes);
    bytes
}

/// Every proper prefix and the record with a trailing byte fail to decode (and do not panic).
fn check_framing<T: std::fmt::Debug, E>(
    bytes: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, E>,
) -> Result<(), TestCaseError> {
    for len in 0..bytes.len() {
        let decoded = decode(&bytes[..len]);
        prop_assert!(
            decoded.is_err(),
            "prefix of {} of {} bytes decoded: {:?}",
            len,
            bytes.len(),
            decoded.ok()
        );
    }
    let mut longer = bytes.to_vec();
    longer.push(0);
    prop_assert!(decode(&longer).is_err(), "a trailing byte was accepted");
    Ok(())
}

fn check_event_codec(event: &LoggedEvent) -> Result<(), TestCaseError> {
    let bytes = encoded_event(event);
    prop_assert_eq!(&decode_event(&bytes).unwrap(), event);
    check_framing(&bytes, decode_event)
}

fn check_outcome_codec(outcome: &CommandOutcome) -> Result<(), TestCaseError> {
    let mut bytes = Vec::new();
    encode_outcome(outcome, &mut bytes);
    prop_assert_eq!(&decode_outcome(&bytes).unwrap(), outcome);
    check_framing(&bytes, decode_outcome)
}

fn check_aggregate_codec(aggregate: &Aggregate) -> Result<(), TestCaseError> {
    let bytes = encoded_aggregate(aggregate);
    prop_assert_eq!(&decode_aggregate(&bytes).unwrap(), aggregate);
    check_framing(&bytes, decode_aggregate)
}

/// Any id, name or order text, including multi-byte UTF-8 and the empty string.
fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn any_id() -> impl Strategy<Value = AggregateId> {
    text().prop_map(AggregateId::from_full)
}

fn any_ledger_event() -> impl Strategy<Value = ledger::Event> {
    use ledger::Event as E;
    let memo = || prop::option::of(text());
    prop_oneof![
        (any_id(), any::<u64>()).prop_map(|(account, overdraft_limit)| E::AccountOpened {
            account,
            overdraft_limit
        }),
        (any_id(), any::<u64>(), memo()).prop_map(|(account, amount, memo)| E::Deposited {
            account,
            amount,
            memo
        }),
        (any_id(), any::<u64>(), memo()).prop_map(|(account, amount, memo)| E::Withdrew {
            account,
            amount,
            memo
        }),
        (any_id(), any_id(), any::<u64>(), memo()).prop_map(|(from, to, amount, memo)| {
            E::Transferred {
                from,
                to,
                amount,
                memo,
            }
        }),
        any_id().prop_map(|account| E::AccountClosed { account }),
    ]
}

fn any_inventory_event() -> impl Strategy<Value = inventory::Event> {
    use inventory::Event as E;
    prop_oneof![
        (any_id(), any::<u64>()).prop_map(|(sku, on_hand)| E::SkuCreated { sku, on_hand }),
        (any_id(), any::<u64>()).prop_map(|(sku, qty)| E::Restocked { sku, qty }),
        (any_id(), any::<u64>(), text()).prop_map(|(sku, qty, order)| E::Reserved {
            sku,
            qty,
            order
        }),
        (any_id(), any::<u64>(), text()).prop_map(|(sku, qty, order)| E::Released {
            sku,
            qty,
            order
        }),
        (any_id(), any::<u64>(), text()).prop_map(|(sku, qty, order)| E::Shipped {
            sku,
            qty,
            order
        }),
    ]
}

fn any_logged_event() -> impl Strategy<Value = LoggedEvent> {
    let event = prop_oneof![
        any_ledger_event().prop_map(Event::from),
        any_inventory_event().prop_map(Event::from),
    ];
    (prop::option::of(text()), event)
        .prop_map(|(command_id, event)| LoggedEvent { command_id, event })
}

/// Any aggregate the codec may meet, valid or not: the codec does not judge invariants.
fn any_aggregate() -> impl Strategy<Value = Aggregate> {
    let account = (any::<i64>(), any::<u64>(), any::<bool>()).prop_map(
        |(balance, overdraft_limit, closed)| {
            State::new(Account {
                balance,
                overdraft_limit,
                closed,
            })
        },
    );
    let sku = (
        any::<u64>(),
        any::<u64>(),
        prop::collection::btree_map(text(), any::<u64>(), 0..5),
    )
        .prop_map(
            |(on_hand, reserved, reservations): (u64, u64, BTreeMap<String, u64>)| {
                State::new(Sku {
                    on_hand,
                    reserved,
                    reservations,
                })
            },
        );
    (any::<u64>(), prop_oneof![account, sku])
        .prop_map(|(version, state)| Aggregate { version, state })
}

// ---------------------------------------------------------------------------------------------
// The properties.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (a) and (b) per step (inside `run`), then (c), (d) and (e) on the end state.
    #[test]
    fn random_command_sequences_keep_every_invariant_and_replay_exactly(envelopes in envelopes()) {
        let run = run(&envelopes)?;

        // (c) The log alone rebuilds the store: same states, same versions, nothing extra.
        prop_assert_eq!(&replay(&run.log), &run.store);

        // (d) A version counts the accepted events that targeted the aggregate.
        prop_assert_eq!(run.events_per_aggregate.len(), run.store.len());
        for (id, aggregate) in &run.store {
            prop_assert_eq!(aggregate.version, run.events_per_aggregate[id], "{}", id);
            prop_assert_eq!(check_invariants(aggregate), Ok(()), "{}", id);
        }

        // (e) Money is only created by deposits and destroyed by withdrawals.
        prop_assert_eq!(balance_total(&run.store), run.deposited_total - run.withdrawn_total);

        // (g) Every conservation law the domains declare holds: the flows summed from the log
        // equal the quantities in the end state, in total and per aggregate.
        check_conservation(&run.log, &run.store)?;
    }

    /// (f) on what the domain really produces: every logged event, every end state and every
    /// command outcome.
    #[test]
    fn every_event_and_state_of_a_random_run_round_trips_through_the_codec(
        envelopes in envelopes(),
    ) {
        let run = run(&envelopes)?;
        for logged in &run.log {
            check_event_codec(logged)?;
        }
        for aggregate in run.store.values() {
            check_aggregate_codec(aggregate)?;
        }
        for outcome in &run.outcomes {
            check_outcome_codec(outcome)?;
        }
    }

    /// (f) on arbitrary field values: extreme integers, empty and multi-byte strings.
    #[test]
    fn any_logged_event_round_trips_and_no_proper_prefix_decodes(event in any_logged_event()) {
        check_event_codec(&event)?;
    }

    #[test]
    fn any_aggregate_round_trips_and_no_proper_prefix_decodes(aggregate in any_aggregate()) {
        check_aggregate_codec(&aggregate)?;
    }

    /// A corrupt store must yield an error value, never a panic.
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode_event(&bytes);
        let _ = decode_aggregate(&bytes);
        let _ = decode_outcome(&bytes);
    }
}

/// The random sequences must actually reach the interesting outcomes; otherwise the properties
/// above pass vacuously (for example if every command were rejected as not found).
#[test]
fn random_sequences_reach_every_event_type_and_domain_rejection() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::BTreeSet;

    let mut runner = TestRunner::deterministic();
    let mut event_types = BTreeSet::new();
    let mut codes = BTreeSet::new();
    for _ in 0..64 {
        let envelopes = envelopes().new_tree(&mut runner).unwrap().current();
        let mut store = Store::new();
        for envelope in &envelopes {
            match decide_in(&store, envelope) {
                Ok(event) => {
                    event_types.insert(event.type_name().to_owned());
                    apply_to(&mut store, &event);
                }
                Err(rejection) => {
                    codes.insert(rejection.code.as_str().to_owned());
                }
            }
        }
    }
    assert_eq!(event_types.len(), 10, "reached only {event_types:?}");
    // WrongKind needs a corrupt store and AtomicRollback comes from the sequencer.
    let unreachable = [RejectCode::WrongKind, RejectCode::AtomicRollback];
    for code in RejectCode::ALL
        .iter()
        .filter(|code| !unreachable.contains(code))
    {
        assert!(
            codes.contains(code.as_str()),
            "never produced {code:?}; reached {codes:?}"
        );
    }
}
