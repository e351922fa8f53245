//! The domain registry: domains keyed by aggregate kind, each with its own codes, invariants
//! and laws; open command, event and state values routed to their domain; the stored tag.

#![allow(clippy::unwrap_used, reason = "a panic in a test is a test failure")]

use keel_invariants::declared::{DeclaredState, DomainSet};
use keel_invariants::{
    Aggregate, AggregateId, Command, Envelope, Event, State, apply, codec, decide, inventory,
    ledger,
};

fn seats() -> DomainSet {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/domains/seats.toml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    DomainSet::load(&[(path.to_string(), text)]).unwrap()
}

fn account(balance: i64, overdraft_limit: u64) -> Aggregate {
    Aggregate {
        version: 1,
        state: State::from(ledger::Account {
            balance,
            overdraft_limit,
            closed: false,
        }),
    }
}

#[test]
fn domains_are_keyed_by_kind_built_in_and_declared_alike() {
    let set = seats();
    let names: Vec<&str> = set.registry().iter().map(|d| d.name()).collect();
    assert_eq!(names, ["ledger", "inventory", "seats"]);
    assert_eq!(set.domain_of_kind("account").unwrap().name(), "ledger");
    assert_eq!(set.domain_of_kind("sku").unwrap().name(), "inventory");
    assert_eq!(set.domain_of_kind("flight").unwrap().name(), "seats");
    assert!(set.domain_of_kind("planet").is_none());
    assert!(DomainSet::builtin().domain_of_kind("flight").is_none());
}

#[test]
fn each_domain_lists_its_own_codes_commands_and_laws() {
    let set = seats();
    let ledger = set.domain_of_kind("account").unwrap();
    let codes = ledger.reject_codes();
    assert!(
        codes.contains(&"insufficient_funds".to_string()),
        "{codes:?}"
    );
    assert!(!codes.contains(&"sku_not_found".to_string()), "{codes:?}");
    assert!(
        !codes.contains(&"version_conflict".to_string()),
        "core, not the ledger's"
    );
    assert!(ledger.command_types().contains(&"transfer"));
    assert_eq!(ledger.laws().len(), 1);
    assert_eq!(set.domain_of_kind("sku").unwrap().laws().len(), 2);
    let seats = set.domain_of_kind("flight").unwrap();
    let codes = seats.reject_codes();
    for code in ["overbooked", "hold_exists", "sold_out"] {
        assert!(codes.contains(&code.to_string()), "{code} not in {codes:?}");
    }
    let mut sorted = codes.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(codes, sorted, "sorted, each once");
}

#[test]
fn invariants_are_checked_by_the_domain_that_owns_the_kind() {
    let set = seats();
    let id = AggregateId::new(ledger::KIND, "alice");
    assert_eq!(set.check_invariants(&id, &account(-5, 10)), Ok(()));
    let broken = set.check_invariants(&id, &account(-11, 10)).unwrap_err();
    assert_eq!(broken.invariant, "balance >= -overdraft_limit");
    // A state of another domain under an account id is a violation, not a pass.
    let declared = Aggregate {
        version: 1,
        state: State::from(DeclaredState::default()),
    };
    let wrong = set.check_invariants(&id, &declared).unwrap_err();
    assert_eq!(wrong.invariant, "state of its kind");
    let flight = AggregateId::new("flight", "AF1");
    let wrong = set.check_invariants(&flight, &account(0, 0)).unwrap_err();
    assert_eq!(wrong.invariant, "state of its kind");
    let planet = AggregateId::new("planet", "mars");
    assert!(set.check_invariants(&planet, &account(0, 0)).is_err());
}

#[test]
fn a_command_is_decided_by_its_own_domain_and_refuses_other_kinds() {
    let transfer = Command::from(ledger::Command::Transfer {
        from: AggregateId::new(ledger::KIND, "a"),
        to: AggregateId::new(inventory::KIND, "b"),
        amount: 1,
        memo: None,
    });
    let envelope = Envelope {
        id: None,
        expected_version: None,
        command: transfer,
    };
    let refused = decide(&envelope, Some(&account(5, 0)), None).unwrap_err();
    assert_eq!(refused.code.as_str(), "wrong_kind");
    // An SKU's state under an account id (a damaged store) is refused too.
    let deposit = Envelope {
        id: None,
        expected_version: None,
        command: Command::from(ledger::Command::Deposit {
            account: AggregateId::new(ledger::KIND, "a"),
            amount: 1,
            memo: None,
        }),
    };
    let sku = Aggregate {
        version: 1,
        state: State::from(inventory::Sku::default()),
    };
    let refused = decide(&deposit, Some(&sku), None).unwrap_err();
    assert_eq!(refused.code.as_str(), "wrong_kind");
    let event = decide(&deposit, Some(&account(5, 0)), None).unwrap();
    assert_eq!(event.type_name(), "deposited");
    let after = apply(&event, 0, Some(account(5, 0)));
    assert_eq!(after.version, 2);
    assert_eq!(
        after
            .state
            .downcast_ref::<ledger::Account>()
            .unwrap()
            .balance,
        6
    );
    // Values compare by domain and content.
    assert_ne!(
        State::from(ledger::Account::default()),
        State::from(inventory::Sku::default())
    );
    assert_eq!(event.clone(), event);
}

#[test]
fn an_unknown_stored_tag_is_an_undecodable_record() {
    let logged = keel_invariants::LoggedEvent {
        command_id: None,
        event: Event::from(ledger::Event::AccountClosed {
            account: AggregateId::new(ledger::KIND, "a"),
        }),
    };
    let mut bytes = Vec::new();
    codec::encode_event(&logged, &mut bytes);
    assert_eq!(
        bytes[1], 0,
        "the ledger's stored tag follows the command id"
    );
    assert_eq!(codec::decode_event(&bytes).unwrap(), logged);
    bytes[1] = 3;
    let error = codec::decode_event(&bytes).unwrap_err();
    assert!(error.0.contains("unknown domain tag 3"), "{error}");
    let mut state = Vec::new();
    codec::encode_aggregate(&account(1, 0), &mut state);
    state[1] = 9;
    assert!(codec::decode_aggregate(&state).is_err());
}

#[test]
fn a_state_copies_in_place_into_one_of_its_own_type_and_replaces_another() {
    let source = account(7, 3);
    let mut target = account(1, 0);
    target.clone_from(&source);
    assert_eq!(target, source);
    let mut other = Aggregate {
        version: 4,
        state: State::from(inventory::Sku::default()),
    };
    other.clone_from(&source);
    assert_eq!(other, source);
    let mut vacant = Aggregate {
        version: 0,
        state: State::vacant(),
    };
    vacant.clone_from(&source);
    assert_eq!(vacant, source);
}

/// The allocation-free check the request parser asks for every declared command agrees with the
/// built-in domains' lists of command types.
#[test]
fn is_builtin_command_agrees_with_the_builtin_domains() {
    let listed: Vec<&str> = keel_invariants::builtin_domains()
        .iter()
        .flat_map(|d| d.command_types())
        .collect();
    assert_eq!(listed.len(), 10, "{listed:?}");
    for name in &listed {
        assert!(
            keel_invariants::registry::is_builtin_command(name),
            "{name}"
        );
    }
    for name in ["", "Transfer", "transfer ", "hold_seats", "ledger.transfer"] {
        assert!(
            !keel_invariants::registry::is_builtin_command(name),
            "{name:?}"
        );
    }
}
