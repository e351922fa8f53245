//! Declared domains: what a definition file may say and the errors it gets when it says
//! something wrong (file, line, problem), the order a declared command is decided in, and the
//! seat-booking example's rules (holds, expiry, no overbooking, bookings created and deleted).

#![allow(clippy::unwrap_used, reason = "a panic in a test is a test failure")]

use keel_invariants::declared::{
    DeclaredCommand, DeclaredState, DomainSet, Effect, LoadError, Resolved, Value,
};
use keel_invariants::{Aggregate, AggregateId, Command, Envelope, Event, State, apply, decide_at};
use std::collections::HashMap;
use std::sync::Arc;

fn example(name: &str) -> (String, String) {
    let path = format!("{}/../examples/domains/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

fn load_one(text: &str) -> Result<DomainSet, LoadError> {
    DomainSet::load(&[("test.toml".to_owned(), text.to_owned())])
}

fn load_error(text: &str) -> LoadError {
    match load_one(text) {
        Ok(_) => panic!("loaded:\n{text}"),
        Err(e) => e,
    }
}

const COUNTER: &str = r#"
name = "counters"

[kinds.counter]
fields.value = { type = "int" }
fields.limit = { type = "int", default = 10 }

[[kinds.counter.invariants]]
code = "above_limit"
check = "counter.value <= counter.limit"

[commands.create_counter]
params.counter = { type = "id", kind = "counter" }
targets = [{ param = "counter", must = "not_exist" }]

[commands.add]
params.counter = { type = "id", kind = "counter" }
params.by = { type = "int" }
targets = [{ param = "counter", must = "exist" }]
effects.counter = { value = "counter.value + params.by" }
"#;

#[test]
fn every_example_loads_and_the_rules_text_names_them_all() {
    let files: Vec<_> = ["ledger.toml", "inventory.toml", "seats.toml"]
        .iter()
        .map(|n| example(n))
        .collect();
    let set = DomainSet::load(&files).unwrap();
    let names: Vec<&str> = set.domains().iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["cel_inventory", "cel_ledger", "seats"]);
    assert!(set.rules_text().starts_with(keel_invariants::BUILTIN_RULES));
    // The rules text is the same whatever order the files are given in.
    let reversed: Vec<_> = files.iter().rev().cloned().collect();
    assert_eq!(
        DomainSet::load(&reversed).unwrap().rules_text(),
        set.rules_text()
    );
    // The audit recompiles the domains from the rules text alone.
    let again = DomainSet::from_rules_text(set.rules_text()).unwrap();
    assert_eq!(again.rules_text(), set.rules_text());
    assert_eq!(again.domains().len(), 3);
    assert!(
        DomainSet::from_rules_text(keel_invariants::BUILTIN_RULES)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_rules_text_cut_short_is_refused() {
    let set = DomainSet::load(&[example("seats.toml")]).unwrap();
    let text = set.rules_text();
    let cut = &text[..text.len() - 10];
    assert!(DomainSet::from_rules_text(cut).is_err());
}

#[test]
fn errors_name_the_file_line_and_problem() {
    // An unknown key.
    let e = load_error(&COUNTER.replace("fields.limit", "fields.limit.typo = 1\nfields.limit"));
    assert_eq!(e.file, "test.toml");
    assert!(e.line >= 6, "{e}");
    // A type error in an expression, on the line of the expression.
    let text = COUNTER.replace("counter.value + params.by", "counter.value + true");
    let e = load_error(&text);
    let line = text
        .lines()
        .position(|l| l.contains("counter.value + true"))
        .unwrap()
        + 1;
    assert_eq!(e.line, line, "{e}");
    assert!(e.message.contains("effect on `counter.value`"), "{e}");
    // An expression that does not parse.
    let e = load_error(&COUNTER.replace("counter.value <= counter.limit", "counter.value <= ("));
    assert!(e.message.contains("invariant `above_limit`"), "{e}");
    let shown = e.to_string();
    assert!(shown.starts_with("test.toml:"), "{shown}");
    // Mixing int and uint without a conversion.
    let e = load_error(&COUNTER.replace(
        "params.by = { type = \"int\" }",
        "params.by = { type = \"uint\" }",
    ));
    assert!(e.message.contains("int and uint"), "{e}");
    // An unknown name.
    let e = load_error(&COUNTER.replace("counter.value + params.by", "counter.valu + params.by"));
    assert!(e.message.contains("valu"), "{e}");
    // A non-boolean check.
    let e = load_error(&COUNTER.replace("counter.value <= counter.limit", "counter.value"));
    assert!(e.message.contains("expected bool"), "{e}");
    // An unknown type.
    let e = load_error(&COUNTER.replace("type = \"int\", default = 10", "type = \"float\""));
    assert!(e.message.contains("unknown type `float`"), "{e}");
    // A target that is not a parameter.
    let e = load_error(&COUNTER.replace(
        "param = \"counter\", must = \"exist\"",
        "param = \"nope\", must = \"exist\"",
    ));
    assert!(e.message.contains("`nope`"), "{e}");
    // A reserved field name.
    let e = load_error(&COUNTER.replace("fields.limit", "fields.version"));
    assert!(e.message.contains("reserved"), "{e}");
    // A default of the wrong type.
    let e = load_error(&COUNTER.replace("default = 10", "default = \"ten\""));
    assert!(e.message.contains("default"), "{e}");
}

#[test]
fn names_that_clash_are_refused_naming_both_files() {
    let a = ("a.toml".to_owned(), COUNTER.to_owned());
    let b = ("b.toml".to_owned(), COUNTER.to_owned());
    let e = DomainSet::load(&[a.clone(), b]).unwrap_err();
    assert_eq!(e.file, "b.toml");
    assert!(e.message.contains("a.toml"), "{e}");
    // Same kind, another domain name.
    let c = (
        "c.toml".to_owned(),
        COUNTER.replace("\"counters\"", "\"tallies\""),
    );
    let e = DomainSet::load(&[a, c]).unwrap_err();
    assert!(e.message.contains("kind `counter`"), "{e}");
    // A built-in domain's or kind's name.
    let e = load_error(&COUNTER.replace("\"counters\"", "\"ledger\""));
    assert!(e.message.contains("built-in"), "{e}");
    let e = load_error(&COUNTER.replace("counter", "account"));
    assert!(e.message.contains("built-in"), "{e}");
}

#[test]
fn command_types_resolve_qualified_and_unqualified() {
    let set = DomainSet::load(&[example("ledger.toml"), example("seats.toml")]).unwrap();
    assert!(
        matches!(set.resolve("seats.hold_seats"), Resolved::Command(c) if c.name == "hold_seats")
    );
    assert!(matches!(set.resolve("hold_seats"), Resolved::Command(_)));
    // A built-in name reaches the built-in domain; the declared one needs its qualified name.
    assert!(matches!(set.resolve("deposit"), Resolved::None));
    assert!(matches!(
        set.resolve("cel_ledger.deposit"),
        Resolved::Command(_)
    ));
    assert!(matches!(set.resolve("nope.deposit"), Resolved::None));
    // Two domains defining one name: unqualified is ambiguous.
    let other = COUNTER
        .replace("\"counters\"", "\"others\"")
        .replace("counter", "tally");
    let other = other.replace("[commands.add]", "[commands.hold_seats]");
    let set = DomainSet::load(&[example("seats.toml"), ("o.toml".to_owned(), other)]).unwrap();
    assert!(matches!(set.resolve("hold_seats"), Resolved::Ambiguous(names) if names.len() == 2));
}

// ---------------------------------------------------------------------------------------------
// Deciding.

type Store = HashMap<AggregateId, Aggregate>;

struct World {
    set: Arc<DomainSet>,
    store: Store,
    now: u64,
}

const MINUTE: u64 = 60_000_000;
/// 2030-01-01T00:00:00Z, in µs.
const T0: u64 = 1_893_456_000_000_000;

impl World {
    fn seats() -> Self {
        Self {
            set: Arc::new(DomainSet::load(&[example("seats.toml")]).unwrap()),
            store: Store::new(),
            now: T0,
        }
    }

    fn command(&self, type_name: &str, params: &[(&str, Value)]) -> Command {
        let Resolved::Command(def) = self.set.resolve(type_name) else {
            panic!("{type_name}")
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
        for (name, value) in params {
            let param = def.params.iter().find(|p| p.name == *name).unwrap();
            param.check(value).unwrap();
        }
        let targets = def
            .targets
            .iter()
            .map(|t| match &values[t.param_index] {
                Value::String(n) => AggregateId::new(&t.kind.name, n),
                _ => unreachable!(),
            })
            .collect();
        Command::new(DeclaredCommand {
            def: Arc::clone(def),
            params: values,
            targets,
        })
    }

    /// Decides and applies; the code on rejection.
    fn run(&mut self, type_name: &str, params: &[(&str, Value)]) -> Result<Event, String> {
        let envelope = Envelope {
            id: None,
            expected_version: None,
            command: self.command(type_name, params),
        };
        let event = decide_at(&envelope, |id| self.store.get(id), self.now)
            .map_err(|r| r.code.as_str().to_owned())?;
        let ids: Vec<AggregateId> = event.targets().iter().cloned().collect();
        for (target, id) in ids.iter().enumerate() {
            let previous = self.store.remove(id);
            let next = apply(&event, target, previous);
            self.set.check_invariants(id, &next).unwrap();
            self.store.insert(id.clone(), next);
        }
        Ok(event)
    }

    fn fields(&self, id: &str) -> &DeclaredState {
        let state = &self.store[&AggregateId::from_full(id.to_owned())].state;
        state
            .downcast_ref::<DeclaredState>()
            .unwrap_or_else(|| panic!("{state:?}"))
    }

    fn uint(&self, id: &str, field: &str) -> u64 {
        match self.fields(id).fields.get(field) {
            Some(Value::Uint(n)) => *n,
            other => panic!("{id}.{field} = {other:?}"),
        }
    }
}

fn s(text: &str) -> Value {
    Value::String(text.to_owned())
}

fn schedule(w: &mut World, flight: &str, capacity: u64) {
    w.run(
        "schedule_flight",
        &[
            ("flight", s(flight)),
            ("capacity", Value::Uint(capacity)),
            ("departs", Value::Timestamp((T0 + 24 * 60 * MINUTE) as i64)),
        ],
    )
    .unwrap();
}

fn hold(w: &mut World, hold: &str, seats: u64) -> Result<Event, String> {
    w.run(
        "hold_seats",
        &[
            ("flight", s("AF1")),
            ("hold", s(hold)),
            ("seats", Value::Uint(seats)),
        ],
    )
}

#[test]
fn seats_are_never_overbooked() {
    let mut w = World::seats();
    schedule(&mut w, "AF1", 5);
    assert_eq!(
        w.run(
            "schedule_flight",
            &[
                ("flight", s("AF1")),
                ("capacity", Value::Uint(5)),
                ("departs", Value::Timestamp((T0 + MINUTE) as i64)),
            ],
        )
        .unwrap_err(),
        "flight_exists"
    );
    hold(&mut w, "h1", 3).unwrap();
    assert_eq!(hold(&mut w, "h1", 1).unwrap_err(), "hold_exists");
    assert_eq!(hold(&mut w, "h2", 3).unwrap_err(), "sold_out");
    hold(&mut w, "h2", 2).unwrap();
    assert_eq!(w.uint("flight:AF1", "held"), 5);
    assert_eq!(hold(&mut w, "h3", 1).unwrap_err(), "sold_out");
    // Releasing a hold frees its seats.
    w.run("release_hold", &[("flight", s("AF1")), ("hold", s("h2"))])
        .unwrap();
    assert_eq!(w.uint("flight:AF1", "held"), 3);
    assert_eq!(
        w.run("release_hold", &[("flight", s("AF1")), ("hold", s("h2"))])
            .unwrap_err(),
        "hold_not_found"
    );
    assert_eq!(
        w.run("release_hold", &[("flight", s("XX9")), ("hold", s("h2"))])
            .unwrap_err(),
        "flight_not_found"
    );
}

#[test]
fn a_confirmed_hold_becomes_a_booking_and_an_expired_one_cannot() {
    let mut w = World::seats();
    schedule(&mut w, "AF1", 5);
    hold(&mut w, "h1", 2).unwrap();
    let confirm = |w: &mut World, hold: &str, booking: &str| {
        w.run(
            "confirm_hold",
            &[
                ("flight", s("AF1")),
                ("hold", s(hold)),
                ("booking", s(booking)),
                ("passenger", s("Ada")),
            ],
        )
    };
    let event = confirm(&mut w, "h1", "b1").unwrap();
    let Ok(event) = event.downcast::<keel_invariants::declared::DeclaredEvent>() else {
        panic!()
    };
    assert_eq!(event.event, "hold_confirmed");
    assert!(matches!(event.effects[1], Effect::Create(_)));
    assert_eq!(w.uint("flight:AF1", "sold"), 2);
    assert_eq!(w.uint("flight:AF1", "held"), 0);
    assert_eq!(w.uint("booking:b1", "seats"), 2);
    assert_eq!(
        w.fields("booking:b1").fields.get("booked_at"),
        Some(&Value::Timestamp(T0 as i64))
    );
    // The hold is gone; a second confirmation finds nothing.
    assert_eq!(confirm(&mut w, "h1", "b2").unwrap_err(), "hold_not_found");
    // A hold past its 15 minutes cannot be confirmed.
    hold(&mut w, "h2", 1).unwrap();
    w.now += 16 * MINUTE;
    assert_eq!(confirm(&mut w, "h2", "b2").unwrap_err(), "hold_expired");
    // A hold with its own ttl.
    w.run(
        "hold_seats",
        &[
            ("flight", s("AF1")),
            ("hold", s("h3")),
            ("seats", Value::Uint(1)),
            ("ttl", Value::Duration(60 * MINUTE as i64)),
        ],
    )
    .unwrap();
    w.now += 30 * MINUTE;
    confirm(&mut w, "h3", "b3").unwrap();
    // An existing booking id is refused.
    hold(&mut w, "h4", 1).unwrap();
    assert_eq!(confirm(&mut w, "h4", "b1").unwrap_err(), "booking_exists");
}

#[test]
fn cancelling_deletes_the_booking_and_frees_the_seats() {
    let mut w = World::seats();
    schedule(&mut w, "AF1", 2);
    schedule(&mut w, "AF2", 2);
    hold(&mut w, "h1", 2).unwrap();
    w.run(
        "confirm_hold",
        &[
            ("flight", s("AF1")),
            ("hold", s("h1")),
            ("booking", s("b1")),
            ("passenger", s("Ada")),
        ],
    )
    .unwrap();
    assert_eq!(hold(&mut w, "h2", 1).unwrap_err(), "sold_out");
    let cancel = |w: &mut World, flight: &str| {
        w.run(
            "cancel_booking",
            &[("booking", s("b1")), ("flight", s(flight))],
        )
    };
    assert_eq!(cancel(&mut w, "AF2").unwrap_err(), "wrong_flight");
    cancel(&mut w, "AF1").unwrap();
    assert!(w.fields("booking:b1").deleted);
    assert_eq!(w.uint("flight:AF1", "sold"), 0);
    assert_eq!(cancel(&mut w, "AF1").unwrap_err(), "booking_not_found");
    hold(&mut w, "h2", 2).unwrap();
    // The booking id is free again: a deleted aggregate reads as absent, its version goes on.
    let version_before = w.store[&AggregateId::new("booking", "b1")].version;
    w.run(
        "confirm_hold",
        &[
            ("flight", s("AF1")),
            ("hold", s("h2")),
            ("booking", s("b1")),
            ("passenger", s("Bo")),
        ],
    )
    .unwrap();
    assert_eq!(
        w.store[&AggregateId::new("booking", "b1")].version,
        version_before + 1
    );
}

#[test]
fn the_clock_is_the_commit_time_given() {
    let mut w = World::seats();
    let departs = |at: u64| {
        [
            ("flight", s("AF9")),
            ("capacity", Value::Uint(1)),
            ("departs", Value::Timestamp(at as i64)),
        ]
    };
    assert_eq!(
        w.run("schedule_flight", &departs(T0 - 1)).unwrap_err(),
        "departed"
    );
    w.now = T0 - 2;
    w.run("schedule_flight", &departs(T0 - 1)).unwrap();
}

#[test]
fn overflow_and_evaluation_errors_reject_and_commit_nothing() {
    let set = Arc::new(load_one(COUNTER).unwrap());
    let mut w = World {
        set,
        store: Store::new(),
        now: T0,
    };
    w.run("create_counter", &[("counter", s("c"))]).unwrap();
    // The default limit is 10; the invariant refuses 11.
    assert_eq!(
        w.run("add", &[("counter", s("c")), ("by", Value::Int(11))])
            .unwrap_err(),
        "above_limit"
    );
    w.run(
        "add",
        &[("counter", s("c")), ("by", Value::Int(i64::MIN + 5))],
    )
    .unwrap();
    // i64::MIN + 5 - 10 overflows: refused with the core code, nothing applied.
    let before = w.store.clone();
    assert_eq!(
        w.run("add", &[("counter", s("c")), ("by", Value::Int(-10))])
            .unwrap_err(),
        "overflow"
    );
    assert_eq!(w.store, before);
    // A target of another kind is refused as such.
    let mut planted = w.store.clone();
    planted.insert(
        AggregateId::new("counter", "x"),
        Aggregate {
            version: 1,
            state: State::new(keel_invariants::ledger::Account::default()),
        },
    );
    let envelope = Envelope {
        id: None,
        expected_version: None,
        command: w.command("add", &[("counter", s("x")), ("by", Value::Int(1))]),
    };
    let rejection = decide_at(&envelope, |id| planted.get(id), T0).unwrap_err();
    assert_eq!(rejection.code.as_str(), "wrong_kind");
}

#[test]
fn expected_version_applies_to_the_first_target() {
    let mut w = World::seats();
    schedule(&mut w, "AF1", 5);
    let command = w.command(
        "hold_seats",
        &[
            ("flight", s("AF1")),
            ("hold", s("h")),
            ("seats", Value::Uint(1)),
        ],
    );
    let with = |v| Envelope {
        id: None,
        expected_version: Some(v),
        command: command.clone(),
    };
    let err = decide_at(&with(7), |id| w.store.get(id), T0).unwrap_err();
    assert_eq!(err.code.as_str(), "version_conflict");
    assert!(decide_at(&with(1), |id| w.store.get(id), T0).is_ok());
}

#[test]
fn a_map_field_bounds_its_keys_and_string_values_by_max_len() {
    let text = r#"
name = "tags"

[kinds.item]
fields.tags = { type = "map(string, string)", max_len = 4, max_entries = 2 }

[commands.create_item]
params.item = { type = "id", kind = "item" }
targets = [{ param = "item", must = "not_exist" }]

[commands.tag]
params.item = { type = "id", kind = "item" }
params.key = { type = "string", max_len = 100 }
params.value = { type = "string", max_len = 100 }
targets = [{ param = "item", must = "exist" }]
effects.item = { tags = "item.tags.with(params.key, params.value)" }
"#;
    let mut w = World {
        set: Arc::new(load_one(text).unwrap()),
        store: Store::new(),
        now: T0,
    };
    w.run("create_item", &[("item", s("i"))]).unwrap();
    let tag = |key: &str, value: &str| [("item", s("i")), ("key", s(key)), ("value", s(value))];
    w.run("tag", &tag("abcd", "wxyz")).unwrap();
    assert_eq!(w.run("tag", &tag("abcde", "x")).unwrap_err(), "field_limit");
    assert_eq!(w.run("tag", &tag("k", "vwxyz")).unwrap_err(), "field_limit");
    w.run("tag", &tag("k", "v")).unwrap();
    assert_eq!(w.run("tag", &tag("j", "v")).unwrap_err(), "field_limit");
    // max_len above the bound is refused at load, for maps as for strings.
    let error = load_error(&text.replace("max_len = 4,", "max_len = 70000,"));
    assert!(error.message.contains("max_len 70000"), "{error}");
}
