//! The domain rules as data: given events / when command / then event or rejection.
//!
//! Every case starts from a store built by folding its `given` events through
//! `keel_invariants::apply`, decides its `when` envelope through `keel_invariants::decide` against
//! the aggregates the command targets, and checks the outcome. An accepted case also names the
//! full aggregate (version and state) of every target after the event is applied, and the harness
//! checks that nothing else in the store moved.

#![allow(clippy::unwrap_used, reason = "a panic in a test is a test failure")]

use keel_invariants::inventory::{self, Sku};
use keel_invariants::ledger::{self, Account};
use keel_invariants::{
    Aggregate, AggregateId, Command, Envelope, Event, RejectCode, Rejection, State, apply,
    check_invariants, decide,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};

type Store = HashMap<AggregateId, Aggregate>;

const I64_MAX: u64 = i64::MAX as u64;

// ---------------------------------------------------------------------------------------------
// Ids, commands, events and states, spelled short so the tables read as prose.

fn acct(name: &str) -> AggregateId {
    AggregateId::new(ledger::KIND, name)
}

fn sku(name: &str) -> AggregateId {
    AggregateId::new(inventory::KIND, name)
}

fn memo(text: Option<&str>) -> Option<String> {
    text.map(str::to_owned)
}

fn envelope(command: Command) -> Envelope {
    Envelope {
        id: None,
        expected_version: None,
        command,
    }
}

fn expecting(version: u64, mut envelope: Envelope) -> Envelope {
    envelope.expected_version = Some(version);
    envelope
}

fn open_account(name: &str, overdraft_limit: u64) -> Envelope {
    envelope(Command::new(ledger::Command::OpenAccount {
        account: acct(name),
        overdraft_limit,
    }))
}

fn deposit(name: &str, amount: u64, note: Option<&str>) -> Envelope {
    envelope(Command::new(ledger::Command::Deposit {
        account: acct(name),
        amount,
        memo: memo(note),
    }))
}

fn withdraw(name: &str, amount: u64, note: Option<&str>) -> Envelope {
    envelope(Command::new(ledger::Command::Withdraw {
        account: acct(name),
        amount,
        memo: memo(note),
    }))
}

fn transfer(from: &str, to: &str, amount: u64, note: Option<&str>) -> Envelope {
    envelope(Command::new(ledger::Command::Transfer {
        from: acct(from),
        to: acct(to),
        amount,
        memo: memo(note),
    }))
}

fn close_account(name: &str) -> Envelope {
    envelope(Command::new(ledger::Command::CloseAccount {
        account: acct(name),
    }))
}

fn create_sku(name: &str, on_hand: u64) -> Envelope {
    envelope(Command::new(inventory::Command::CreateSku {
        sku: sku(name),
        on_hand,
    }))
}

fn restock(name: &str, qty: u64) -> Envelope {
    envelope(Command::new(inventory::Command::Restock {
        sku: sku(name),
        qty,
    }))
}

fn reserve(name: &str, qty: u64, order: &str) -> Envelope {
    envelope(Command::new(inventory::Command::Reserve {
        sku: sku(name),
        qty,
        order: order.to_owned(),
    }))
}

fn release(name: &str, order: &str) -> Envelope {
    envelope(Command::new(inventory::Command::Release {
        sku: sku(name),
        order: order.to_owned(),
    }))
}

fn ship(name: &str, order: &str) -> Envelope {
    envelope(Command::new(inventory::Command::Ship {
        sku: sku(name),
        order: order.to_owned(),
    }))
}

fn opened(name: &str, overdraft_limit: u64) -> Event {
    Event::new(ledger::Event::AccountOpened {
        account: acct(name),
        overdraft_limit,
    })
}

fn deposited(name: &str, amount: u64, note: Option<&str>) -> Event {
    Event::new(ledger::Event::Deposited {
        account: acct(name),
        amount,
        memo: memo(note),
    })
}

fn withdrew(name: &str, amount: u64, note: Option<&str>) -> Event {
    Event::new(ledger::Event::Withdrew {
        account: acct(name),
        amount,
        memo: memo(note),
    })
}

fn transferred(from: &str, to: &str, amount: u64, note: Option<&str>) -> Event {
    Event::new(ledger::Event::Transferred {
        from: acct(from),
        to: acct(to),
        amount,
        memo: memo(note),
    })
}

fn closed(name: &str) -> Event {
    Event::new(ledger::Event::AccountClosed {
        account: acct(name),
    })
}

fn sku_created(name: &str, on_hand: u64) -> Event {
    Event::new(inventory::Event::SkuCreated {
        sku: sku(name),
        on_hand,
    })
}

fn restocked(name: &str, qty: u64) -> Event {
    Event::new(inventory::Event::Restocked {
        sku: sku(name),
        qty,
    })
}

fn reserved(name: &str, qty: u64, order: &str) -> Event {
    Event::new(inventory::Event::Reserved {
        sku: sku(name),
        qty,
        order: order.to_owned(),
    })
}

fn released(name: &str, qty: u64, order: &str) -> Event {
    Event::new(inventory::Event::Released {
        sku: sku(name),
        qty,
        order: order.to_owned(),
    })
}

fn shipped(name: &str, qty: u64, order: &str) -> Event {
    Event::new(inventory::Event::Shipped {
        sku: sku(name),
        qty,
        order: order.to_owned(),
    })
}

fn account_state(balance: i64, overdraft_limit: u64, closed: bool) -> State {
    State::new(Account {
        balance,
        overdraft_limit,
        closed,
    })
}

fn sku_state(on_hand: u64, reserved: u64, reservations: &[(&str, u64)]) -> State {
    let reservations: BTreeMap<String, u64> = reservations
        .iter()
        .map(|(order, qty)| ((*order).to_owned(), *qty))
        .collect();
    State::new(Sku {
        on_hand,
        reserved,
        reservations,
    })
}

// ---------------------------------------------------------------------------------------------
// The harness.

/// One aggregate expected after an accepted event: its id, version and state.
struct After {
    id: AggregateId,
    version: u64,
    state: State,
}

fn after(id: AggregateId, version: u64, state: State) -> After {
    After { id, version, state }
}

enum Then {
    /// The command is accepted with exactly this event; applying it leaves exactly these
    /// aggregates at its targets (in target order).
    Accepted(Event, Vec<After>),
    Rejected(RejectCode),
}

struct Case {
    name: &'static str,
    given: Vec<Event>,
    when: Envelope,
    then: Then,
}

fn case(name: &'static str, given: Vec<Event>, when: Envelope, then: Then) -> Case {
    Case {
        name,
        given,
        when,
        then,
    }
}

fn accepted(event: Event, afters: Vec<After>) -> Then {
    Then::Accepted(event, afters)
}

fn rejected(code: RejectCode) -> Then {
    Then::Rejected(code)
}

/// Folds `event` into every aggregate it targets, as the sequencer does.
fn apply_to(store: &mut Store, event: &Event) {
    let ids: Vec<AggregateId> = event.targets().iter().cloned().collect();
    for (target, id) in ids.into_iter().enumerate() {
        let previous = store.remove(&id);
        let next = apply(event, target, previous);
        store.insert(id, next);
    }
}

fn given(events: &[Event]) -> Store {
    let mut store = Store::new();
    for event in events {
        apply_to(&mut store, event);
    }
    store
}

fn when(store: &Store, envelope: &Envelope) -> Result<Event, Rejection> {
    let targets = envelope.command.targets();
    decide(
        envelope,
        store.get(targets.primary),
        targets.secondary.and_then(|id| store.get(id)),
    )
}

/// Decides the case's command against `store` and checks the outcome; returns the rejection
/// code or the accepted event's type name, for the coverage checks.
fn check_case(name: &str, mut store: Store, envelope: &Envelope, then: &Then) -> String {
    let outcome = when(&store, envelope);
    match (then, outcome) {
        (Then::Rejected(code), Err(rejection)) => {
            assert_eq!(
                rejection.code, *code,
                "{name}: wrong code ({})",
                rejection.message
            );
            assert!(
                !rejection.message.is_empty(),
                "{name}: a rejection explains itself"
            );
            code.as_str().to_owned()
        }
        (Then::Accepted(expected, afters), Ok(event)) => {
            assert_eq!(&event, expected, "{name}: wrong event");
            let before = store.clone();
            apply_to(&mut store, &event);
            check_after(name, &before, &store, &event, afters);
            event.type_name().to_owned()
        }
        (Then::Rejected(code), Ok(event)) => {
            panic!("{name}: expected rejection {code:?}, got accepted {event:?}")
        }
        (Then::Accepted(expected, _), Err(rejection)) => {
            panic!("{name}: expected {expected:?}, got rejection {rejection:?}")
        }
    }
}

/// Every target moved up exactly one version to the expected state; nothing else moved.
fn check_after(name: &str, before: &Store, store: &Store, event: &Event, afters: &[After]) {
    let targets: Vec<&AggregateId> = event.targets().iter().collect();
    let expected_ids: Vec<&AggregateId> = afters.iter().map(|a| &a.id).collect();
    assert_eq!(
        targets, expected_ids,
        "{name}: the case must list every target in order"
    );
    for expected in afters {
        let found = &store[&expected.id];
        let previous_version = before.get(&expected.id).map_or(0, |a| a.version);
        assert_eq!(
            found.version,
            previous_version + 1,
            "{name}: {} version step",
            expected.id
        );
        assert_eq!(
            found.version, expected.version,
            "{name}: {} version",
            expected.id
        );
        assert_eq!(found.state, expected.state, "{name}: {} state", expected.id);
        assert_eq!(
            check_invariants(found),
            Ok(()),
            "{name}: {} invariants",
            expected.id
        );
    }
    for (id, aggregate) in before {
        if !targets.contains(&id) {
            assert_eq!(
                store.get(id),
                Some(aggregate),
                "{name}: untouched {id} moved"
            );
        }
    }
    let created = targets
        .iter()
        .filter(|id| !before.contains_key(**id))
        .count();
    assert_eq!(
        store.len(),
        before.len() + created,
        "{name}: only targets are created"
    );
}

fn run(cases: &[Case]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut outcomes = BTreeSet::new();
    for case in cases {
        assert!(names.insert(case.name), "duplicate case name {}", case.name);
        outcomes.insert(check_case(
            case.name,
            given(&case.given),
            &case.when,
            &case.then,
        ));
    }
    outcomes
}

// ---------------------------------------------------------------------------------------------
// Happy paths: every command of both domains, and the edges that are still allowed.

fn accepted_cases() -> Vec<Case> {
    vec![
        case(
            "open_account opens at zero with its overdraft limit",
            vec![],
            open_account("alice", 100),
            accepted(
                opened("alice", 100),
                vec![after(acct("alice"), 1, account_state(0, 100, false))],
            ),
        ),
        case(
            "open_account accepts an overdraft limit of exactly i64::MAX",
            vec![],
            open_account("alice", I64_MAX),
            accepted(
                opened("alice", I64_MAX),
                vec![after(acct("alice"), 1, account_state(0, I64_MAX, false))],
            ),
        ),
        case(
            "deposit credits the balance and carries the memo",
            vec![opened("alice", 0)],
            deposit("alice", 250, Some("salary")),
            accepted(
                deposited("alice", 250, Some("salary")),
                vec![after(acct("alice"), 2, account_state(250, 0, false))],
            ),
        ),
        case(
            "deposit may bring the balance to exactly i64::MAX",
            vec![opened("alice", 0), deposited("alice", 1, None)],
            deposit("alice", I64_MAX - 1, None),
            accepted(
                deposited("alice", I64_MAX - 1, None),
                vec![after(acct("alice"), 3, account_state(i64::MAX, 0, false))],
            ),
        ),
        case(
            "deposit into an overdrawn account",
            vec![opened("alice", 50), withdrew("alice", 30, None)],
            deposit("alice", 10, None),
            accepted(
                deposited("alice", 10, None),
                vec![after(acct("alice"), 3, account_state(-20, 50, false))],
            ),
        ),
        case(
            "withdraw debits the balance",
            vec![opened("alice", 0), deposited("alice", 250, None)],
            withdraw("alice", 100, Some("rent")),
            accepted(
                withdrew("alice", 100, Some("rent")),
                vec![after(acct("alice"), 3, account_state(150, 0, false))],
            ),
        ),
        case(
            "withdraw may empty the account exactly without an overdraft",
            vec![opened("alice", 0), deposited("alice", 70, None)],
            withdraw("alice", 70, None),
            accepted(
                withdrew("alice", 70, None),
                vec![after(acct("alice"), 3, account_state(0, 0, false))],
            ),
        ),
        case(
            "withdraw may reach exactly -overdraft_limit",
            vec![opened("alice", 100), deposited("alice", 50, None)],
            withdraw("alice", 150, None),
            accepted(
                withdrew("alice", 150, None),
                vec![after(acct("alice"), 3, account_state(-100, 100, false))],
            ),
        ),
        case(
            "withdraw of i64::MAX reaches the floor of an i64::MAX overdraft",
            vec![opened("alice", I64_MAX)],
            withdraw("alice", I64_MAX, None),
            accepted(
                withdrew("alice", I64_MAX, None),
                vec![after(
                    acct("alice"),
                    2,
                    account_state(-i64::MAX, I64_MAX, false),
                )],
            ),
        ),
        case(
            "transfer debits the source and credits the target",
            vec![
                opened("alice", 0),
                deposited("alice", 500, None),
                opened("bob", 0),
            ],
            transfer("alice", "bob", 200, Some("lunch")),
            accepted(
                transferred("alice", "bob", 200, Some("lunch")),
                vec![
                    after(acct("alice"), 3, account_state(300, 0, false)),
                    after(acct("bob"), 2, account_state(200, 0, false)),
                ],
            ),
        ),
        case(
            "transfer may take the source to exactly -overdraft_limit",
            vec![
                opened("alice", 50),
                opened("bob", 0),
                deposited("bob", 5, None),
            ],
            transfer("alice", "bob", 50, None),
            accepted(
                transferred("alice", "bob", 50, None),
                vec![
                    after(acct("alice"), 2, account_state(-50, 50, false)),
                    after(acct("bob"), 3, account_state(55, 0, false)),
                ],
            ),
        ),
        case(
            "close_account closes an account at zero",
            vec![opened("alice", 10)],
            close_account("alice"),
            accepted(
                closed("alice"),
                vec![after(acct("alice"), 2, account_state(0, 10, true))],
            ),
        ),
        case(
            "close_account closes an account that moved money and came back to zero",
            vec![
                opened("alice", 0),
                deposited("alice", 10, None),
                opened("bob", 0),
                transferred("alice", "bob", 10, None),
            ],
            close_account("alice"),
            accepted(
                closed("alice"),
                vec![after(acct("alice"), 4, account_state(0, 0, true))],
            ),
        ),
        case(
            "expected_version Some(0) on an absent aggregate is accepted",
            vec![],
            expecting(0, open_account("alice", 0)),
            accepted(
                opened("alice", 0),
                vec![after(acct("alice"), 1, account_state(0, 0, false))],
            ),
        ),
        case(
            "expected_version equal to the current version is accepted",
            vec![opened("alice", 0), deposited("alice", 5, None)],
            expecting(2, deposit("alice", 5, None)),
            accepted(
                deposited("alice", 5, None),
                vec![after(acct("alice"), 3, account_state(10, 0, false))],
            ),
        ),
        case(
            "transfer's expected_version is the source's, even when the target is further along",
            vec![
                opened("alice", 0),
                deposited("alice", 9, None),
                opened("bob", 0),
                deposited("bob", 1, None),
                deposited("bob", 1, None),
            ],
            expecting(2, transfer("alice", "bob", 9, None)),
            accepted(
                transferred("alice", "bob", 9, None),
                vec![
                    after(acct("alice"), 3, account_state(0, 0, false)),
                    after(acct("bob"), 4, account_state(11, 0, false)),
                ],
            ),
        ),
        case(
            "create_sku creates with its stock on hand and nothing reserved",
            vec![],
            create_sku("A-17", 10),
            accepted(
                sku_created("A-17", 10),
                vec![after(sku("A-17"), 1, sku_state(10, 0, &[]))],
            ),
        ),
        case(
            "create_sku accepts zero stock",
            vec![],
            create_sku("A-17", 0),
            accepted(
                sku_created("A-17", 0),
                vec![after(sku("A-17"), 1, sku_state(0, 0, &[]))],
            ),
        ),
        case(
            "restock adds to on_hand",
            vec![sku_created("A-17", 10), reserved("A-17", 3, "o-1")],
            restock("A-17", 5),
            accepted(
                restocked("A-17", 5),
                vec![after(sku("A-17"), 3, sku_state(15, 3, &[("o-1", 3)]))],
            ),
        ),
        case(
            "restock may bring on_hand to exactly u64::MAX",
            vec![sku_created("A-17", 1)],
            restock("A-17", u64::MAX - 1),
            accepted(
                restocked("A-17", u64::MAX - 1),
                vec![after(sku("A-17"), 2, sku_state(u64::MAX, 0, &[]))],
            ),
        ),
        case(
            "reserve holds stock for an order",
            vec![sku_created("A-17", 10)],
            reserve("A-17", 4, "o-1"),
            accepted(
                reserved("A-17", 4, "o-1"),
                vec![after(sku("A-17"), 2, sku_state(10, 4, &[("o-1", 4)]))],
            ),
        ),
        case(
            "reserve may take exactly the available stock",
            vec![sku_created("A-17", 10), reserved("A-17", 4, "o-1")],
            reserve("A-17", 6, "o-2"),
            accepted(
                reserved("A-17", 6, "o-2"),
                vec![after(
                    sku("A-17"),
                    3,
                    sku_state(10, 10, &[("o-1", 4), ("o-2", 6)]),
                )],
            ),
        ),
        case(
            "reserve again for an order whose reservation was released",
            vec![
                sku_created("A-17", 10),
                reserved("A-17", 4, "o-1"),
                released("A-17", 4, "o-1"),
            ],
            reserve("A-17", 7, "o-1"),
            accepted(
                reserved("A-17", 7, "o-1"),
                vec![after(sku("A-17"), 4, sku_state(10, 7, &[("o-1", 7)]))],
            ),
        ),
        case(
            "release frees the order's reservation with the reserved quantity",
            vec![
                sku_created("A-17", 10),
                reserved("A-17", 4, "o-1"),
                reserved("A-17", 2, "o-2"),
            ],
            release("A-17", "o-1"),
            accepted(
                released("A-17", 4, "o-1"),
                vec![after(sku("A-17"), 4, sku_state(10, 2, &[("o-2", 2)]))],
            ),
        ),
        case(
            "ship removes the reserved quantity from on_hand and the reservation",
            vec![
                sku_created("A-17", 10),
                reserved("A-17", 4, "o-1"),
                reserved("A-17", 3, "o-2"),
            ],
            ship("A-17", "o-1"),
            accepted(
                shipped("A-17", 4, "o-1"),
                vec![after(sku("A-17"), 4, sku_state(6, 3, &[("o-2", 3)]))],
            ),
        ),
        case(
            "inventory expected_version equal to the current version is accepted",
            vec![sku_created("A-17", 1)],
            expecting(1, restock("A-17", 1)),
            accepted(
                restocked("A-17", 1),
                vec![after(sku("A-17"), 2, sku_state(2, 0, &[]))],
            ),
        ),
    ]
}

#[test]
fn every_command_is_accepted_on_its_happy_path_with_the_expected_post_state() {
    let event_types = run(&accepted_cases());
    let every_event_type = BTreeSet::from([
        "account_opened",
        "deposited",
        "withdrew",
        "transferred",
        "account_closed",
        "sku_created",
        "restocked",
        "reserved",
        "released",
        "shipped",
    ]);
    let every_event_type: BTreeSet<String> =
        every_event_type.into_iter().map(str::to_owned).collect();
    assert_eq!(
        event_types, every_event_type,
        "a command of some domain has no happy path case"
    );
}

// ---------------------------------------------------------------------------------------------
// Rejections: every code the domain can produce, and the boundary one step past each edge.

fn rejected_cases() -> Vec<Case> {
    use RejectCode::*;
    let alice = || opened("alice", 0);
    let bob = || opened("bob", 0);
    let a17 = || sku_created("A-17", 10);
    vec![
        // VersionConflict: checked before the domain, against the primary (absent = 0).
        case(
            "expected_version behind the current version",
            vec![alice(), deposited("alice", 1, None)],
            expecting(1, deposit("alice", 1, None)),
            rejected(VersionConflict),
        ),
        case(
            "expected_version ahead of the current version",
            vec![alice()],
            expecting(2, deposit("alice", 1, None)),
            rejected(VersionConflict),
        ),
        case(
            "expected_version Some(0) on an existing aggregate (before account_exists)",
            vec![alice()],
            expecting(0, open_account("alice", 0)),
            rejected(VersionConflict),
        ),
        case(
            "expected_version Some(1) on an absent aggregate (before account_not_found)",
            vec![],
            expecting(1, deposit("alice", 1, None)),
            rejected(VersionConflict),
        ),
        case(
            "transfer's expected_version matching only the target's version (behind the source)",
            vec![
                alice(),
                deposited("alice", 5, None),
                deposited("alice", 5, None),
                bob(),
            ],
            expecting(1, transfer("alice", "bob", 1, None)),
            rejected(VersionConflict),
        ),
        case(
            "transfer's expected_version matching only the target's version (ahead of the source)",
            vec![
                alice(),
                deposited("alice", 5, None),
                bob(),
                deposited("bob", 1, None),
                deposited("bob", 1, None),
            ],
            expecting(3, transfer("alice", "bob", 1, None)),
            rejected(VersionConflict),
        ),
        case(
            "inventory expected_version mismatch",
            vec![a17()],
            expecting(5, restock("A-17", 1)),
            rejected(VersionConflict),
        ),
        // InvalidAmount: zero amounts and quantities.
        case(
            "deposit of zero",
            vec![alice()],
            deposit("alice", 0, None),
            rejected(InvalidAmount),
        ),
        case(
            "withdraw of zero",
            vec![alice()],
            withdraw("alice", 0, None),
            rejected(InvalidAmount),
        ),
        case(
            "transfer of zero",
            vec![alice(), bob()],
            transfer("alice", "bob", 0, None),
            rejected(InvalidAmount),
        ),
        case(
            "restock of zero",
            vec![a17()],
            restock("A-17", 0),
            rejected(InvalidAmount),
        ),
        case(
            "reserve of zero",
            vec![a17()],
            reserve("A-17", 0, "o-1"),
            rejected(InvalidAmount),
        ),
        // Overflow: nothing leaves i64 (balances, overdraft limits) or u64 (stock).
        case(
            "deposit of one onto a balance of i64::MAX",
            vec![alice(), deposited("alice", I64_MAX, None)],
            deposit("alice", 1, None),
            rejected(Overflow),
        ),
        case(
            "deposit of an amount above i64::MAX",
            vec![alice()],
            deposit("alice", I64_MAX + 1, None),
            rejected(Overflow),
        ),
        case(
            "withdraw of an amount above i64::MAX",
            vec![opened("alice", I64_MAX)],
            withdraw("alice", I64_MAX + 1, None),
            rejected(Overflow),
        ),
        case(
            "transfer of an amount above i64::MAX",
            vec![opened("alice", I64_MAX), bob()],
            transfer("alice", "bob", u64::MAX, None),
            rejected(Overflow),
        ),
        case(
            "transfer that would overflow the target's balance",
            vec![
                alice(),
                deposited("alice", 1, None),
                bob(),
                deposited("bob", I64_MAX, None),
            ],
            transfer("alice", "bob", 1, None),
            rejected(Overflow),
        ),
        case(
            "open_account with an overdraft limit above i64::MAX",
            vec![],
            open_account("alice", I64_MAX + 1),
            rejected(Overflow),
        ),
        case(
            "restock that would overflow on_hand",
            vec![sku_created("A-17", u64::MAX)],
            restock("A-17", 1),
            rejected(Overflow),
        ),
        // AccountExists: once opened, never again (closing does not free the id).
        case(
            "open_account twice",
            vec![alice()],
            open_account("alice", 0),
            rejected(AccountExists),
        ),
        case(
            "open_account on a closed account",
            vec![alice(), closed("alice")],
            open_account("alice", 0),
            rejected(AccountExists),
        ),
        // AccountNotFound, for every command that needs an account and both transfer sides.
        case(
            "deposit to an absent account",
            vec![],
            deposit("alice", 1, None),
            rejected(AccountNotFound),
        ),
        case(
            "withdraw from an absent account",
            vec![],
            withdraw("alice", 1, None),
            rejected(AccountNotFound),
        ),
        case(
            "close an absent account",
            vec![],
            close_account("alice"),
            rejected(AccountNotFound),
        ),
        case(
            "transfer from an absent account",
            vec![bob()],
            transfer("alice", "bob", 1, None),
            rejected(AccountNotFound),
        ),
        case(
            "transfer to an absent account",
            vec![alice(), deposited("alice", 5, None)],
            transfer("alice", "bob", 1, None),
            rejected(AccountNotFound),
        ),
        // AccountClosed: a closed account is never used again.
        case(
            "deposit to a closed account",
            vec![alice(), closed("alice")],
            deposit("alice", 1, None),
            rejected(AccountClosed),
        ),
        case(
            "withdraw from a closed account with an overdraft",
            vec![opened("alice", 100), closed("alice")],
            withdraw("alice", 1, None),
            rejected(AccountClosed),
        ),
        case(
            "close a closed account",
            vec![alice(), closed("alice")],
            close_account("alice"),
            rejected(AccountClosed),
        ),
        case(
            "transfer from a closed account",
            vec![opened("alice", 100), closed("alice"), bob()],
            transfer("alice", "bob", 1, None),
            rejected(AccountClosed),
        ),
        case(
            "transfer to a closed account",
            vec![alice(), deposited("alice", 5, None), bob(), closed("bob")],
            transfer("alice", "bob", 1, None),
            rejected(AccountClosed),
        ),
        // InsufficientFunds: one past the overdraft floor.
        case(
            "withdraw of one from an empty account without overdraft",
            vec![alice()],
            withdraw("alice", 1, None),
            rejected(InsufficientFunds),
        ),
        case(
            "withdraw one past -overdraft_limit",
            vec![opened("alice", 100), deposited("alice", 50, None)],
            withdraw("alice", 151, None),
            rejected(InsufficientFunds),
        ),
        case(
            "withdraw of i64::MAX past the floor of an i64::MAX overdraft",
            vec![opened("alice", I64_MAX), withdrew("alice", 1, None)],
            withdraw("alice", I64_MAX, None),
            rejected(InsufficientFunds),
        ),
        case(
            "transfer one past the source's -overdraft_limit",
            vec![opened("alice", 50), bob()],
            transfer("alice", "bob", 51, None),
            rejected(InsufficientFunds),
        ),
        // SameAccount: checked before the accounts are looked at.
        case(
            "transfer to itself",
            vec![alice(), deposited("alice", 5, None)],
            transfer("alice", "alice", 1, None),
            rejected(SameAccount),
        ),
        case(
            "transfer to itself on an absent account",
            vec![],
            transfer("alice", "alice", 1, None),
            rejected(SameAccount),
        ),
        // BalanceNotZero: only a zero balance closes.
        case(
            "close with a positive balance",
            vec![alice(), deposited("alice", 1, None)],
            close_account("alice"),
            rejected(BalanceNotZero),
        ),
        case(
            "close an overdrawn account",
            vec![opened("alice", 10), withdrew("alice", 1, None)],
            close_account("alice"),
            rejected(BalanceNotZero),
        ),
        // SkuExists.
        case(
            "create_sku twice",
            vec![a17()],
            create_sku("A-17", 1),
            rejected(SkuExists),
        ),
        // SkuNotFound, for every command that needs a SKU.
        case(
            "restock an absent sku",
            vec![],
            restock("A-17", 1),
            rejected(SkuNotFound),
        ),
        case(
            "reserve on an absent sku",
            vec![],
            reserve("A-17", 1, "o-1"),
            rejected(SkuNotFound),
        ),
        case(
            "release on an absent sku",
            vec![],
            release("A-17", "o-1"),
            rejected(SkuNotFound),
        ),
        case(
            "ship from an absent sku",
            vec![],
            ship("A-17", "o-1"),
            rejected(SkuNotFound),
        ),
        // InsufficientStock: one past what is on hand and not reserved.
        case(
            "reserve one more than on hand",
            vec![a17()],
            reserve("A-17", 11, "o-1"),
            rejected(InsufficientStock),
        ),
        case(
            "reserve one more than is left unreserved",
            vec![a17(), reserved("A-17", 4, "o-1")],
            reserve("A-17", 7, "o-2"),
            rejected(InsufficientStock),
        ),
        case(
            "reserve stock that was shipped",
            vec![
                a17(),
                reserved("A-17", 10, "o-1"),
                shipped("A-17", 10, "o-1"),
            ],
            reserve("A-17", 1, "o-2"),
            rejected(InsufficientStock),
        ),
        // ReservationExists: one reservation per order and SKU.
        case(
            "reserve twice for one order",
            vec![a17(), reserved("A-17", 1, "o-1")],
            reserve("A-17", 1, "o-1"),
            rejected(ReservationExists),
        ),
        // ReservationNotFound, for release and ship.
        case(
            "release an order that never reserved",
            vec![a17(), reserved("A-17", 1, "o-1")],
            release("A-17", "o-2"),
            rejected(ReservationNotFound),
        ),
        case(
            "ship an order that never reserved",
            vec![a17()],
            ship("A-17", "o-1"),
            rejected(ReservationNotFound),
        ),
        case(
            "ship an order whose reservation was released",
            vec![
                a17(),
                reserved("A-17", 2, "o-1"),
                released("A-17", 2, "o-1"),
            ],
            ship("A-17", "o-1"),
            rejected(ReservationNotFound),
        ),
        case(
            "release an order that already shipped",
            vec![a17(), reserved("A-17", 2, "o-1"), shipped("A-17", 2, "o-1")],
            release("A-17", "o-1"),
            rejected(ReservationNotFound),
        ),
    ]
}

/// A store holding an aggregate of one kind under an id of the other: only a corrupt or hostile
/// store can look like this, so it is planted directly rather than built from events.
fn planted(entries: &[(AggregateId, State)]) -> Store {
    entries
        .iter()
        .map(|(id, state)| {
            (
                id.clone(),
                Aggregate {
                    version: 1,
                    state: state.clone(),
                },
            )
        })
        .collect()
}

#[test]
fn an_aggregate_of_the_wrong_kind_is_rejected_as_wrong_kind() {
    let account_under_sku = || (sku("A-17"), account_state(0, 0, false));
    let sku_under_account = |name| (acct(name), sku_state(10, 0, &[]));
    let alice = (acct("alice"), account_state(5, 0, false));
    let cases: Vec<(&str, Store, Envelope)> = vec![
        (
            "create_sku over an account",
            planted(&[account_under_sku()]),
            create_sku("A-17", 1),
        ),
        (
            "restock an account",
            planted(&[account_under_sku()]),
            restock("A-17", 1),
        ),
        (
            "reserve on an account",
            planted(&[account_under_sku()]),
            reserve("A-17", 1, "o"),
        ),
        (
            "release on an account",
            planted(&[account_under_sku()]),
            release("A-17", "o"),
        ),
        (
            "ship from an account",
            planted(&[account_under_sku()]),
            ship("A-17", "o"),
        ),
        (
            "open_account over a sku",
            planted(&[sku_under_account("alice")]),
            open_account("alice", 0),
        ),
        (
            "deposit to a sku",
            planted(&[sku_under_account("alice")]),
            deposit("alice", 1, None),
        ),
        (
            "withdraw from a sku",
            planted(&[sku_under_account("alice")]),
            withdraw("alice", 1, None),
        ),
        (
            "close a sku",
            planted(&[sku_under_account("alice")]),
            close_account("alice"),
        ),
        (
            "transfer from a sku",
            planted(&[
                sku_under_account("alice"),
                (acct("bob"), account_state(0, 0, false)),
            ]),
            transfer("alice", "bob", 1, None),
        ),
        (
            "transfer to a sku",
            planted(&[alice, sku_under_account("bob")]),
            transfer("alice", "bob", 1, None),
        ),
    ];
    for (name, store, envelope) in cases {
        check_case(name, store, &envelope, &rejected(RejectCode::WrongKind));
    }
}

#[test]
fn every_domain_reject_code_is_produced_by_some_rejected_case() {
    let mut produced = run(&rejected_cases());
    // WrongKind needs a planted store; its own test above covers it.
    produced.insert(RejectCode::WrongKind.as_str().to_owned());
    let domain_codes: BTreeSet<String> = RejectCode::ALL
        .iter()
        .filter(|code| **code != RejectCode::AtomicRollback)
        .map(|code| code.as_str().to_owned())
        .collect();
    assert_eq!(
        produced, domain_codes,
        "some reject code has no case, or a case has a new code"
    );
}

// ---------------------------------------------------------------------------------------------
// The reject codes themselves: stable wire strings and counter indexes.

#[test]
fn atomic_rollback_is_the_sequencers_code_with_its_wire_name() {
    assert_eq!(RejectCode::AtomicRollback.as_str(), "atomic_rollback");
}

#[test]
fn reject_code_wire_names_never_change() {
    // Stored in the command-id index and sent to clients: a rename or reorder is a breaking
    // change that must show up here.
    let names: Vec<&str> = RejectCode::ALL.iter().map(|code| code.as_str()).collect();
    assert_eq!(
        names,
        [
            "version_conflict",
            "atomic_rollback",
            "invalid_amount",
            "overflow",
            "wrong_kind",
            "account_exists",
            "account_not_found",
            "account_closed",
            "insufficient_funds",
            "same_account",
            "balance_not_zero",
            "sku_exists",
            "sku_not_found",
            "insufficient_stock",
            "reservation_exists",
            "reservation_not_found",
        ]
    );
}

fn is_snake_case(name: &str) -> bool {
    !name.is_empty()
        && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        && !name.starts_with('_')
        && !name.ends_with('_')
        && !name.contains("__")
}

#[test]
fn reject_code_wire_names_are_unique_snake_case() {
    let mut seen = BTreeSet::new();
    for code in RejectCode::ALL {
        let name = code.as_str().to_owned();
        assert!(is_snake_case(&name), "{code:?} has wire name {name:?}");
        assert!(
            seen.insert(name.clone()),
            "{code:?} reuses wire name {name:?}"
        );
    }
    assert_eq!(seen.len(), RejectCode::ALL.len());
}

#[test]
fn reject_code_index_is_its_position_in_all() {
    for (position, code) in RejectCode::ALL.into_iter().enumerate() {
        assert_eq!(code.index(), position, "{code:?}");
    }
}

#[test]
fn event_type_names_are_unique_snake_case() {
    let events = [
        opened("a", 0),
        deposited("a", 1, None),
        withdrew("a", 1, None),
        transferred("a", "b", 1, None),
        closed("a"),
        sku_created("s", 0),
        restocked("s", 1),
        reserved("s", 1, "o"),
        released("s", 1, "o"),
        shipped("s", 1, "o"),
    ];
    let names: BTreeSet<&str> = events.iter().map(Event::type_name).collect();
    assert_eq!(
        names.len(),
        events.len(),
        "two event types share a name: {names:?}"
    );
    assert!(names.iter().all(|name| is_snake_case(name)), "{names:?}");
}

/// Regression: a command naming an id of another kind (`OpenAccount` for `sku:x`) used to be
/// decided against whatever lived there; it must be refused before any state is looked at.
#[test]
fn command_with_an_id_of_another_kind_is_wrong_kind() {
    use keel_invariants::{AggregateId, Command, Envelope, RejectCode, decide, inventory, ledger};
    let cases = [
        Command::new(ledger::Command::OpenAccount {
            account: AggregateId::new(inventory::KIND, "x"),
            overdraft_limit: 0,
        }),
        Command::new(ledger::Command::Transfer {
            from: AggregateId::new(ledger::KIND, "a"),
            to: AggregateId::new(inventory::KIND, "b"),
            amount: 1,
            memo: None,
        }),
        Command::new(inventory::Command::CreateSku {
            sku: AggregateId::new(ledger::KIND, "s"),
            on_hand: 1,
        }),
    ];
    for command in cases {
        let envelope = Envelope {
            id: None,
            expected_version: None,
            command,
        };
        let rejection = decide(&envelope, None, None).expect_err("wrong kind must be rejected");
        assert_eq!(rejection.code, RejectCode::WrongKind, "{envelope:?}");
    }
}
