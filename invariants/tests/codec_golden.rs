//! The stored format, pinned byte for byte.
//!
//! The expected bytes were worked out by hand from the postcard wire format, not copied from the
//! encoder: unsigned integers are LEB128 varints (7 bits per byte, low first, high bit = more),
//! signed integers are zigzag-mapped (`n >= 0 -> 2n`, `n < 0 -> -2n - 1`) and then varints,
//! strings are a varint byte length then UTF-8, `Option` is a `00`/`01` tag then the value,
//! `bool` is `00`/`01`, an enum is its variant index as a varint then its fields, a struct is its
//! fields in declaration order with no framing, and a map is a varint length then key, value
//! pairs in order. Reordering an enum variant, changing a field's type or order, or switching
//! the encoding makes these tests fail: that is a stored-format change and needs a migration.

#![allow(clippy::unwrap_used, reason = "a panic in a test is a test failure")]

use keel_invariants::codec::{
    decode_aggregate, decode_event, decode_outcome, encode_aggregate, encode_event,
    encode_event_parts, encode_outcome,
};
use keel_invariants::inventory::{self, Sku};
use keel_invariants::ledger::{self, Account};
use keel_invariants::{
    Aggregate, AggregateId, CommandOutcome, Event, LoggedEvent, RejectCode, Rejection, State,
};
use std::collections::BTreeMap;

/// Parses a hex literal that may contain spaces, newlines and `|` separators for readability.
fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    assert_eq!(digits.len() % 2, 0, "odd number of hex digits in {text:?}");
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

/// Encodes, compares with the hand-computed bytes, and decodes the bytes back to the value.
fn assert_event_bytes(event: &LoggedEvent, expected_hex: &str) {
    let expected = hex(expected_hex);
    let mut bytes = Vec::new();
    encode_event(event, &mut bytes);
    assert_eq!(bytes, expected, "encoding of {event:?} changed");
    // The writer's path: the command's id and the event, never built into a LoggedEvent.
    let mut parts = Vec::new();
    encode_event_parts(event.command_id.as_deref(), &event.event, &mut parts);
    assert_eq!(parts, expected, "encode_event_parts of {event:?}");
    assert_eq!(
        &decode_event(&expected).unwrap(),
        event,
        "decoding the pinned bytes"
    );
}

fn assert_aggregate_bytes(aggregate: &Aggregate, expected_hex: &str) {
    let expected = hex(expected_hex);
    let mut bytes = Vec::new();
    encode_aggregate(aggregate, &mut bytes);
    assert_eq!(bytes, expected, "encoding of {aggregate:?} changed");
    assert_eq!(
        &decode_aggregate(&expected).unwrap(),
        aggregate,
        "decoding the pinned bytes"
    );
}

#[test]
fn logged_ledger_deposited_with_command_id_and_no_memo_has_pinned_bytes() {
    let event = LoggedEvent {
        command_id: Some("c-1".to_owned()),
        event: Event::new(ledger::Event::Deposited {
            account: AggregateId::new(ledger::KIND, "alice"),
            amount: 300,
            memo: None,
        }),
    };
    assert_event_bytes(
        &event,
        "01 | 03 63 2d 31 \
         | 00 \
         | 01 \
         | 0d 61 63 63 6f 75 6e 74 3a 61 6c 69 63 65 \
         | ac 02 \
         | 00",
    );
    // 01                         command_id: Some
    // 03 "c-1"                   length 3, then the bytes
    // 00                         Event::Ledger (variant 0 of the registry)
    // 01                         ledger::Event::Deposited (variant 1)
    // 0d "account:alice"         length 13, then the bytes
    // ac 02                      amount 300 = 0b10_0101100: 0x2c | 0x80 (more), then 0x02
    // 00                         memo: None
}

#[test]
fn logged_ledger_transferred_without_command_id_has_pinned_bytes() {
    let event = LoggedEvent {
        command_id: None,
        event: Event::new(ledger::Event::Transferred {
            from: AggregateId::new(ledger::KIND, "a"),
            to: AggregateId::new(ledger::KIND, "b"),
            amount: 1_000_000,
            memo: Some("rent".to_owned()),
        }),
    };
    assert_event_bytes(
        &event,
        "00 \
         | 00 \
         | 03 \
         | 09 61 63 63 6f 75 6e 74 3a 61 \
         | 09 61 63 63 6f 75 6e 74 3a 62 \
         | c0 84 3d \
         | 01 04 72 65 6e 74",
    );
    // 00                         command_id: None
    // 00                         Event::Ledger
    // 03                         ledger::Event::Transferred (variant 3)
    // 09 "account:a"             from
    // 09 "account:b"             to
    // c0 84 3d                   amount 1_000_000 = 61 * 128^2 + 4 * 128 + 64:
    //                            0x40 | 0x80, 0x04 | 0x80, 0x3d
    // 01 04 "rent"               memo: Some, length 4, bytes
}

#[test]
fn logged_inventory_reserved_has_pinned_bytes() {
    let event = LoggedEvent {
        command_id: Some("r-9".to_owned()),
        event: Event::new(inventory::Event::Reserved {
            sku: AggregateId::new(inventory::KIND, "A-17"),
            qty: 5,
            order: "o-1".to_owned(),
        }),
    };
    assert_event_bytes(
        &event,
        "01 03 72 2d 39 \
         | 01 \
         | 02 \
         | 08 73 6b 75 3a 41 2d 31 37 \
         | 05 \
         | 03 6f 2d 31",
    );
    // 01 03 "r-9"                command_id: Some, length 3, bytes
    // 01                         Event::Inventory (variant 1 of the registry)
    // 02                         inventory::Event::Reserved (variant 2)
    // 08 "sku:A-17"              sku
    // 05                         qty 5 (one varint byte)
    // 03 "o-1"                   order
}

#[test]
fn account_aggregate_has_pinned_bytes() {
    let aggregate = Aggregate {
        version: 3,
        state: State::new(Account {
            balance: -150,
            overdraft_limit: 200,
            closed: false,
        }),
    };
    assert_aggregate_bytes(&aggregate, "03 | 00 | ab 02 | c8 01 | 00");
    // 03                         version 3
    // 00                         State::Account (variant 0)
    // ab 02                      balance -150, zigzag 2 * 150 - 1 = 299 = 2 * 128 + 43:
    //                            0x2b | 0x80, 0x02 (a u64 field would read 0x96 0x01 instead)
    // c8 01                      overdraft_limit 200 = 1 * 128 + 72: 0x48 | 0x80, 0x01
    // 00                         closed: false
}

#[test]
fn closed_account_aggregate_has_pinned_bytes() {
    let aggregate = Aggregate {
        version: 130,
        state: State::new(Account {
            balance: 0,
            overdraft_limit: 0,
            closed: true,
        }),
    };
    assert_aggregate_bytes(&aggregate, "82 01 | 00 | 00 | 00 | 01");
    // 82 01                      version 130 = 1 * 128 + 2: 0x02 | 0x80, 0x01
    // 00                         State::Account
    // 00                         balance 0 (zigzag 0)
    // 00                         overdraft_limit 0
    // 01                         closed: true
}

#[test]
fn sku_aggregate_with_one_reservation_has_pinned_bytes() {
    let aggregate = Aggregate {
        version: 4,
        state: State::new(Sku {
            on_hand: 10,
            reserved: 5,
            reservations: BTreeMap::from([("o-1".to_owned(), 5)]),
        }),
    };
    assert_aggregate_bytes(&aggregate, "04 | 01 | 0a | 05 | 01 | 03 6f 2d 31 | 05");
    // 04                         version 4
    // 01                         State::Sku (variant 1)
    // 0a                         on_hand 10
    // 05                         reserved 5
    // 01                         reservations: one entry
    // 03 "o-1"                   key: order
    // 05                         value: quantity
}

/// The first bytes of every event type: `command_id: None` (00), the registry variant, then the
/// domain's variant. Pins every variant position, not only those of the full records above.
#[test]
fn every_event_variant_has_its_pinned_position() {
    let account = || AggregateId::new(ledger::KIND, "a");
    let sku = || AggregateId::new(inventory::KIND, "s");
    let order = || "o".to_owned();
    let cases: [(ledger::Event, &str); 5] = [
        (
            ledger::Event::AccountOpened {
                account: account(),
                overdraft_limit: 0,
            },
            "00 00 00",
        ),
        (
            ledger::Event::Deposited {
                account: account(),
                amount: 1,
                memo: None,
            },
            "00 00 01",
        ),
        (
            ledger::Event::Withdrew {
                account: account(),
                amount: 1,
                memo: None,
            },
            "00 00 02",
        ),
        (
            ledger::Event::Transferred {
                from: account(),
                to: account(),
                amount: 1,
                memo: None,
            },
            "00 00 03",
        ),
        (
            ledger::Event::AccountClosed { account: account() },
            "00 00 04",
        ),
    ];
    let ledger = cases
        .into_iter()
        .map(|(event, prefix)| (Event::new(event), prefix));
    let cases: [(inventory::Event, &str); 5] = [
        (
            inventory::Event::SkuCreated {
                sku: sku(),
                on_hand: 0,
            },
            "00 01 00",
        ),
        (
            inventory::Event::Restocked { sku: sku(), qty: 1 },
            "00 01 01",
        ),
        (
            inventory::Event::Reserved {
                sku: sku(),
                qty: 1,
                order: order(),
            },
            "00 01 02",
        ),
        (
            inventory::Event::Released {
                sku: sku(),
                qty: 1,
                order: order(),
            },
            "00 01 03",
        ),
        (
            inventory::Event::Shipped {
                sku: sku(),
                qty: 1,
                order: order(),
            },
            "00 01 04",
        ),
    ];
    let inventory = cases
        .into_iter()
        .map(|(event, prefix)| (Event::new(event), prefix));
    for (event, prefix) in ledger.chain(inventory) {
        let name = event.type_name().to_owned();
        let mut bytes = Vec::new();
        encode_event(
            &LoggedEvent {
                command_id: None,
                event,
            },
            &mut bytes,
        );
        assert_eq!(bytes[..3], hex(prefix), "{name} moved");
    }
}

fn assert_outcome_bytes(outcome: &CommandOutcome, expected_hex: &str) {
    let expected = hex(expected_hex);
    let mut bytes = Vec::new();
    encode_outcome(outcome, &mut bytes);
    assert_eq!(bytes, expected, "encoding of {outcome:?} changed");
    assert_eq!(
        &decode_outcome(&expected).unwrap(),
        outcome,
        "decoding the pinned bytes"
    );
}

#[test]
fn committed_outcome_has_pinned_bytes() {
    assert_outcome_bytes(&CommandOutcome::Committed { seq: 7 }, "00 | 07");
    // 00                         CommandOutcome::Committed (variant 0)
    // 07                         seq 7
}

#[test]
fn rejected_outcome_of_every_code_has_pinned_bytes() {
    // A stored rejection's code is its variant index. The order of `RejectCode::ALL` is pinned
    // by name in tests/decide.rs (`reject_code_wire_names_never_change`), so together these pin
    // every code's byte: a reordered `RejectCode` would change what an old command-id index
    // answers on retry.
    for (position, code) in RejectCode::ALL.into_iter().enumerate() {
        let outcome = CommandOutcome::Rejected(Rejection::new(code, "no"));
        assert_outcome_bytes(&outcome, &format!("01 | {position:02x} | 02 6e 6f"));
        // 01                     CommandOutcome::Rejected (variant 1)
        // {position}             Rejection.code: the variant index, one varint byte (< 128)
        // 02 "no"                Rejection.message
    }
}
