//! JSON wire types of the HTTP API (docs/API.md) and their translation to and from the domain.
//! Only this module knows the JSON shape; the domain types are not `Serialize` for its sake.

use de::{BatchSeed, ParseContext, Quantity, RawCommand};
use keel_invariants::declared::DomainSet;
use keel_invariants::{Aggregate, AggregateId, Envelope, Event, State, inventory, ledger};
use keel_sequencer::{CommittedEvent, ItemResult, Reply};
use serde::Serialize;
use serde::de::DeserializeSeed;
use serde_json::{Value, json};
use std::fmt;
use std::sync::Arc;

mod builtin;
mod de;
pub mod declared;

/// Longest aggregate name, order name or command id, in bytes.
pub const NAME_BYTES_MAX: usize = 128;
/// Longest memo, in bytes.
pub const MEMO_BYTES_MAX: usize = 4096;

/// A request-level error: the whole request is refused and nothing is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub code: &'static str,
    pub message: String,
}

impl WireError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Checks one parsed command against its type and builds the domain envelope.
struct Item<'a> {
    index: usize,
    kind: &'a str,
}

impl Item<'_> {
    fn error(&self, code: &'static str, detail: impl fmt::Display) -> WireError {
        WireError::new(
            code,
            format!("commands[{}] ({}): {detail}", self.index, self.kind),
        )
    }

    fn unknown_type(&self, name: &str) -> WireError {
        self.error(
            "unknown_command_type",
            format!("unknown command type {}", quote(name)),
        )
    }

    fn required<T>(&self, field: &str, value: Option<T>) -> Result<T, WireError> {
        value.ok_or_else(|| self.error("missing_field", format!("field `{field}` is required")))
    }

    fn name(&self, field: &str, value: Option<String>) -> Result<String, WireError> {
        let value = self.required(field, value)?;
        check_name(&value)
            .map_err(|why| self.error("invalid_name", format!("field `{field}` {why}")))?;
        Ok(value)
    }

    fn aggregate(
        &self,
        kind: &str,
        field: &str,
        value: Option<String>,
    ) -> Result<AggregateId, WireError> {
        Ok(AggregateId::new(kind, &self.name(field, value)?))
    }

    /// A positive integer that fits in i64 (amounts and quantities).
    fn positive(&self, field: &str, value: Option<Quantity>) -> Result<u64, WireError> {
        let n = self.count(field, value)?;
        if n == 0 {
            return Err(self.error(
                "invalid_amount",
                format!("field `{field}` must be greater than 0"),
            ));
        }
        Ok(n)
    }

    /// A non-negative integer that fits in i64, sent as a JSON integer or a decimal string.
    fn count(&self, field: &str, value: Option<Quantity>) -> Result<u64, WireError> {
        let shown = match self.required(field, value)? {
            Quantity::Whole(n) if i64::try_from(n).is_ok() => return Ok(n),
            Quantity::Whole(n) => n.to_string(),
            Quantity::Other(shown) => shown,
        };
        Err(self.error(
            "invalid_amount",
            format!(
                "field `{field}` is {shown}; it must be an integer from 0 to {}",
                i64::MAX
            ),
        ))
    }

    fn memo(&self, memo: Option<String>) -> Result<Option<String>, WireError> {
        match memo {
            Some(m) if m.len() > MEMO_BYTES_MAX => Err(self.error(
                "invalid_memo",
                format!(
                    "field `memo` has {} bytes; at most {MEMO_BYTES_MAX} are allowed",
                    m.len()
                ),
            )),
            other => Ok(other),
        }
    }
}

/// Names (aggregate names, orders, command ids): 1 to 128 bytes, printable ASCII, no spaces.
fn check_name(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > NAME_BYTES_MAX {
        return Err(format!(
            "must have 1 to {NAME_BYTES_MAX} bytes, has {}",
            value.len()
        ));
    }
    if let Some(c) = value.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "contains {c:?}; only printable ASCII without spaces is allowed"
        ));
    }
    Ok(())
}

impl RawCommand {
    /// Validates the command at `index` and builds its envelope.
    fn into_envelope(mut self, index: usize) -> Result<Envelope, WireError> {
        let kind = self.kind.take().ok_or_else(|| {
            WireError::new(
                "missing_field",
                format!("commands[{index}]: field `type` is required"),
            )
        })?;
        let item = Item { index, kind: &kind };
        if let Some((def, fields)) = self.declared.take() {
            return Ok(Envelope {
                id: self.checked_id(&item)?,
                expected_version: self.expected_version,
                command: declared::command(&item, def, fields)?,
            });
        }
        let (domain, allowed) = builtin::command(&kind).ok_or_else(|| {
            WireError::new(
                "unknown_command_type",
                format!(
                    "commands[{index}]: unknown command type {}; expected one of {}",
                    quote(&kind),
                    builtin::command_types()
                ),
            )
        })?;
        if let Some(extra) = self.fields.present().find(|f| !allowed.contains(f)) {
            return Err(item.error(
                "unexpected_field",
                format!("field `{extra}` does not belong to this command type"),
            ));
        }
        let id = self.checked_id(&item)?;
        let expected_version = self.expected_version;
        let command = domain.build(&item, &mut self.fields)?;
        Ok(Envelope {
            id,
            expected_version,
            command,
        })
    }

    /// The client command id, taken out and checked as a name.
    fn checked_id(&mut self, item: &Item<'_>) -> Result<Option<String>, WireError> {
        match self.id.take() {
            Some(id) => {
                check_name(&id)
                    .map_err(|why| item.error("invalid_name", format!("field `id` {why}")))?;
                Ok(Some(id))
            }
            None => Ok(None),
        }
    }
}

/// Parses and validates a whole `POST /v1/batches` body. The command list is refused as soon
/// as it passes `batch_items_max`, so parsing never holds more than that many commands.
pub fn parse_batch(
    body: &[u8],
    batch_items_max: usize,
    domains: &Arc<DomainSet>,
) -> Result<(Vec<Envelope>, bool), WireError> {
    let context = ParseContext::new((!domains.is_empty()).then(|| Arc::clone(domains)));
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let seed = BatchSeed {
        context: &context,
        items_max: batch_items_max,
    };
    let request = seed
        .deserialize(&mut deserializer)
        .and_then(|request| deserializer.end().map(|()| request))
        .map_err(|e| context.error(e))?;
    let commands = request.commands;
    if commands.items == 0 {
        return Err(WireError::new(
            "empty_batch",
            "`commands` is empty; send at least one command",
        ));
    }
    assert!(
        commands.items <= batch_items_max,
        "the parser stops at batch_items_max"
    );
    if let Some(invalid) = commands.invalid {
        return Err(invalid);
    }
    Ok((commands.envelopes, request.atomic))
}

/// Most bytes of client input an error message quotes.
pub const QUOTED_BYTES_MAX: usize = 64;

/// `text` in backticks for an error message; when longer than [`QUOTED_BYTES_MAX`], only its
/// start (cut at a character boundary) and its length, so an error never echoes a megabyte of
/// input back.
pub fn quote(text: &str) -> String {
    if text.len() <= QUOTED_BYTES_MAX {
        return format!("`{text}`");
    }
    // QUOTED_BYTES_MAX + 1 characters hold at least QUOTED_BYTES_MAX + 1 bytes: enough to cut.
    let head: String = text.chars().take(QUOTED_BYTES_MAX + 1).collect();
    format!(
        "`{}` ({} bytes)",
        keel_sequencer::shorten(head, QUOTED_BYTES_MAX),
        text.len()
    )
}

/// Microseconds since the Unix epoch as RFC 3339 UTC with microseconds
/// (`2026-11-21T22:30:00.123456Z`). Years past 9999, which RFC 3339 cannot write (a clock set far
/// ahead), get ISO 8601's expanded form (`+10000-01-01T00:00:00.000000Z`) instead of a panic.
pub fn timestamp(us: u64) -> String {
    const US_PER_DAY: u64 = 86_400_000_000;
    let (days, in_day) = (us / US_PER_DAY, us % US_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let seconds = in_day / 1_000_000;
    let (hour, minute, second) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    let micros = in_day % 1_000_000;
    let sign = if year > 9999 { "+" } else { "" };
    format!("{sign}{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{micros:06}Z")
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`,
/// for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The answer to `POST /v1/batches`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct BatchResponse {
    /// The batch (one fsync) holding this request's committed events; null when none committed.
    pub batch: Option<u64>,
    /// The batch's commit time (RFC 3339, UTC, microseconds).
    pub committed_at: String,
    /// One per command, in order.
    pub results: Vec<ItemDto>,
    /// Present (true) only for `?dry_run=true`: nothing was written; `batch` is null and each
    /// committed item's `seq` is the one its event would have had.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// What happened to one command. `replayed: true`: the original answer to a command id seen
/// before; nothing was written this time.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ItemDto {
    Committed {
        seq: u64,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        replayed: bool,
    },
    Rejected {
        #[schema(value_type = String)]
        code: std::borrow::Cow<'static, str>,
        message: String,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        replayed: bool,
    },
}

impl BatchResponse {
    pub fn new(reply: Reply, dry_run: bool) -> Self {
        let results = reply
            .results
            .into_iter()
            .map(|r| match r {
                ItemResult::Committed { seq, replayed } => ItemDto::Committed { seq, replayed },
                ItemResult::Rejected {
                    rejection,
                    replayed,
                } => ItemDto::Rejected {
                    code: rejection.code.to_cow(),
                    message: rejection.message,
                    replayed,
                },
            })
            .collect();
        Self {
            batch: reply.batch,
            committed_at: timestamp(reply.committed_at_us),
            results,
            dry_run,
        }
    }
}

/// `GET /v1/aggregates/{id}` body.
pub fn aggregate_json(id: &AggregateId, aggregate: &Aggregate) -> Value {
    json!({
        "id": id.as_str(),
        "kind": id.kind(),
        "version": aggregate.version,
        "state": state_json(&aggregate.state),
    })
}

pub fn state_json(state: &State) -> Value {
    domain_of_tag(state.tag())
        .and_then(|d| d.state_json(state))
        .unwrap_or(Value::Null)
}

/// One domain's JSON: how its events' `data` and its states render. The generic code routes
/// by the stored tag ([`DOMAINS`] is in tag order: ledger 0, inventory 1, declared 2).
trait DomainJson: Sync {
    /// `None`: an event of another domain.
    fn event_data(&self, event: &Event) -> Option<Value>;
    /// `None`: a state of another domain.
    fn state_json(&self, state: &State) -> Option<Value>;
}

static DOMAINS: [&dyn DomainJson; 3] = [&LedgerJson, &InventoryJson, &DeclaredJson];

fn domain_of_tag(tag: u32) -> Option<&'static dyn DomainJson> {
    usize::try_from(tag)
        .ok()
        .and_then(|t| DOMAINS.get(t))
        .copied()
}

struct LedgerJson;

impl DomainJson for LedgerJson {
    fn event_data(&self, event: &Event) -> Option<Value> {
        serde_json::to_value(ledger_data(event.downcast_ref()?)).ok()
    }

    fn state_json(&self, state: &State) -> Option<Value> {
        let a = state.downcast_ref::<ledger::Account>()?;
        Some(json!({
            "balance": a.balance,
            "overdraft_limit": a.overdraft_limit,
            "closed": a.closed,
        }))
    }
}

struct InventoryJson;

impl DomainJson for InventoryJson {
    fn event_data(&self, event: &Event) -> Option<Value> {
        serde_json::to_value(inventory_data(event.downcast_ref()?)).ok()
    }

    fn state_json(&self, state: &State) -> Option<Value> {
        let s = state.downcast_ref::<inventory::Sku>()?;
        Some(json!({
            "on_hand": s.on_hand,
            "reserved": s.reserved,
            "available": s.on_hand.saturating_sub(s.reserved),
            "reservations": s.reservations,
        }))
    }
}

struct DeclaredJson;

impl DomainJson for DeclaredJson {
    fn event_data(&self, event: &Event) -> Option<Value> {
        event
            .downcast_ref::<keel_invariants::declared::DeclaredEvent>()
            .map(declared::event_json)
    }

    fn state_json(&self, state: &State) -> Option<Value> {
        state
            .downcast_ref::<keel_invariants::declared::DeclaredState>()
            .map(declared::state_json)
    }
}

/// One event of `GET /v1/events`.
pub fn event_json(event: &CommittedEvent) -> Value {
    let e = &event.logged.event;
    json!({
        "seq": event.seq,
        "batch": event.batch,
        "committed_at": timestamp(event.committed_at_us),
        "type": e.type_name(),
        "command_id": event.logged.command_id,
        "aggregates": e.targets().iter().map(|id| id.as_str()).collect::<Vec<_>>(),
        "data": event_data(e),
    })
}

/// Writes one event exactly as [`event_json`] serializes it (the same keys in the same order),
/// without building a `Value` for its envelope: the subscription hub encodes every committed
/// event. `committed_at` is [`timestamp`] of the event's `committed_at_us`, shared by a batch.
pub fn write_event_json(out: &mut Vec<u8>, event: &CommittedEvent, committed_at: &str) {
    #[derive(Serialize)]
    struct View<'a> {
        seq: u64,
        batch: u64,
        committed_at: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        command_id: &'a Option<String>,
        aggregates: Vec<&'a str>,
        data: DataOf<'a>,
    }
    let e = &event.logged.event;
    let view = View {
        seq: event.seq,
        batch: event.batch,
        committed_at,
        kind: e.type_name(),
        command_id: &event.logged.command_id,
        aggregates: e.targets().iter().map(|id| id.as_str()).collect(),
        data: DataOf(e),
    };
    // Writing JSON into a Vec cannot fail (no I/O; every key is a string).
    let _ = serde_json::to_writer(out, &view);
}

/// A built-in domain's event `data`: the keys, in order, of `GET /v1/events`. Both the served
/// `Value` ([`DomainJson::event_data`]) and the subscription hub's bytes ([`DataOf`]) come
/// from it.
#[derive(Serialize)]
#[serde(untagged)]
enum BuiltinData<'a> {
    Opened {
        account: &'a str,
        overdraft_limit: u64,
    },
    Moved {
        account: &'a str,
        amount: u64,
        memo: &'a Option<String>,
    },
    Transferred {
        from: &'a str,
        to: &'a str,
        amount: u64,
        memo: &'a Option<String>,
    },
    Closed {
        account: &'a str,
    },
    SkuCreated {
        sku: &'a str,
        on_hand: u64,
    },
    Restocked {
        sku: &'a str,
        qty: u64,
    },
    Order {
        sku: &'a str,
        qty: u64,
        order: &'a str,
    },
}

fn ledger_data(event: &ledger::Event) -> BuiltinData<'_> {
    use ledger::Event as L;
    match event {
        L::AccountOpened {
            account,
            overdraft_limit,
        } => BuiltinData::Opened {
            account: account.name(),
            overdraft_limit: *overdraft_limit,
        },
        L::Deposited {
            account,
            amount,
            memo,
        }
        | L::Withdrew {
            account,
            amount,
            memo,
        } => BuiltinData::Moved {
            account: account.name(),
            amount: *amount,
            memo,
        },
        L::Transferred {
            from,
            to,
            amount,
            memo,
        } => BuiltinData::Transferred {
            from: from.name(),
            to: to.name(),
            amount: *amount,
            memo,
        },
        L::AccountClosed { account } => BuiltinData::Closed {
            account: account.name(),
        },
    }
}

fn inventory_data(event: &inventory::Event) -> BuiltinData<'_> {
    use inventory::Event as I;
    match event {
        I::SkuCreated { sku, on_hand } => BuiltinData::SkuCreated {
            sku: sku.name(),
            on_hand: *on_hand,
        },
        I::Restocked { sku, qty } => BuiltinData::Restocked {
            sku: sku.name(),
            qty: *qty,
        },
        I::Reserved { sku, qty, order }
        | I::Released { sku, qty, order }
        | I::Shipped { sku, qty, order } => BuiltinData::Order {
            sku: sku.name(),
            qty: *qty,
            order,
        },
    }
}

/// An event's `data` as [`event_data`] gives it, serialized straight from the built-in
/// domains' types without a `Value`; declared domains' events go through their `Value`.
struct DataOf<'a>(&'a Event);

impl Serialize for DataOf<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if let Some(event) = self.0.downcast_ref() {
            ledger_data(event).serialize(serializer)
        } else if let Some(event) = self.0.downcast_ref() {
            inventory_data(event).serialize(serializer)
        } else {
            event_data(self.0).serialize(serializer)
        }
    }
}

fn event_data(event: &Event) -> Value {
    domain_of_tag(event.tag())
        .and_then(|d| d.event_data(event))
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The subscription hub writes events with [`write_event_json`]; `GET /v1/events` and
    /// `GET /v1/batches/{seq}` serialize [`event_json`]. The bytes must be the same.
    #[test]
    fn written_events_are_byte_for_byte_the_served_json() {
        let account = |name| AggregateId::new("account", name);
        let sku = AggregateId::new("sku", "s-1");
        let events = [
            Event::new(ledger::Event::Transferred {
                from: account("a1"),
                to: account("b\"2"),
                amount: 7,
                memo: Some("line\nbreak \u{e9} \\ \"quoted\"".into()),
            }),
            Event::new(ledger::Event::AccountOpened {
                account: account("a1"),
                overdraft_limit: u64::MAX,
            }),
            Event::new(ledger::Event::Deposited {
                account: account("a1"),
                amount: 0,
                memo: None,
            }),
            Event::new(inventory::Event::Reserved {
                sku: sku.clone(),
                qty: 3,
                order: "o-9".into(),
            }),
            Event::new(ledger::Event::Withdrew {
                account: account("a1"),
                amount: 5,
                memo: Some(String::new()),
            }),
            Event::new(ledger::Event::AccountClosed {
                account: account("a1"),
            }),
            Event::new(inventory::Event::Restocked {
                sku: sku.clone(),
                qty: 4,
            }),
            Event::new(inventory::Event::Released {
                sku: sku.clone(),
                qty: 2,
                order: "o-9".into(),
            }),
            Event::new(inventory::Event::Shipped {
                sku: sku.clone(),
                qty: 1,
                order: "o-\u{1f4e6}".into(),
            }),
            Event::new(inventory::Event::SkuCreated { sku, on_hand: 1 }),
        ];
        for (i, event) in events.into_iter().enumerate() {
            let committed = CommittedEvent {
                seq: 1000 + i as u64,
                batch: 17,
                committed_at_us: 1_764_547_200_123_456,
                logged: keel_invariants::LoggedEvent {
                    command_id: (i % 2 == 0).then(|| format!("c-{i}")),
                    event,
                },
            };
            let served =
                serde_json::to_vec(&event_json(&committed)).expect("a JSON value serializes");
            let mut written = Vec::new();
            write_event_json(
                &mut written,
                &committed,
                &timestamp(committed.committed_at_us),
            );
            assert_eq!(
                String::from_utf8(written).expect("written JSON is UTF-8"),
                String::from_utf8(served).expect("served JSON is UTF-8")
            );
        }
    }

    fn no_domains() -> Arc<DomainSet> {
        Arc::new(DomainSet::builtin())
    }

    fn code_of(body: &str, items_max: usize) -> (&'static str, String) {
        match parse_batch(body.as_bytes(), items_max, &no_domains()) {
            Err(e) => (e.code, e.message),
            Ok(_) => panic!("accepted: {body}"),
        }
    }

    #[test]
    fn timestamps_match_rfc3339_and_never_panic_past_year_9999() {
        use std::time::{Duration, UNIX_EPOCH};
        let last_rfc3339_us = 253_402_300_799_999_999; // 9999-12-31T23:59:59.999999Z
        for sample in [
            0,
            1,
            951_782_400_000_000,
            1_764_547_200_123_456,
            last_rfc3339_us,
        ] {
            let expected =
                humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(sample));
            assert_eq!(timestamp(sample), expected.to_string());
        }
        // A spread of days over the whole range, leap years and centuries included.
        let mut us = 1u64;
        while us < last_rfc3339_us {
            let expected = humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(us));
            assert_eq!(timestamp(us), expected.to_string(), "{us}");
            us += us / 64 + 86_399_999_977;
        }
        // Regression: humantime panicked here (a clock set past year 9999 killed every read).
        assert_eq!(
            timestamp(last_rfc3339_us + 1),
            "+10000-01-01T00:00:00.000000Z"
        );
        assert!(timestamp(u64::MAX).starts_with("+586524-"));
    }

    #[test]
    fn quotes_are_short_prefixes_cut_at_character_boundaries() {
        assert_eq!(quote("alice"), "`alice`");
        let long = "é".repeat(1000);
        let quoted = quote(&long);
        assert!(quoted.len() < QUOTED_BYTES_MAX + 40, "{quoted}");
        assert!(quoted.ends_with("(2000 bytes)"), "{quoted}");
    }

    /// Regression: derived structs accept a JSON array of their fields, so positional bodies
    /// and commands were accepted and committed.
    #[test]
    fn only_objects_are_requests_and_commands() {
        let open = r#"{"type":"open_account","account":"x"}"#;
        assert!(
            parse_batch(
                format!(r#"{{"commands":[{open}]}}"#).as_bytes(),
                10,
                &no_domains()
            )
            .is_ok()
        );
        for body in [
            format!("[[{open}], false]"),
            r#"{"commands":[["open_account",null,null,"x"]]}"#.to_string(),
            format!(r#"{{"commands":[{open}, ["deposit"]]}}"#),
            r#"{"commands":{"type":"open_account"}}"#.to_string(),
        ] {
            assert_eq!(code_of(&body, 10).0, "invalid_request", "{body}");
        }
    }

    /// Commands are validated as they are read, yet a body reports what it reported when the
    /// whole list was read first: a malformed body is malformed whatever an earlier command
    /// holds, and otherwise the first invalid command is named.
    #[test]
    fn an_invalid_command_is_named_in_list_order_and_a_malformed_body_wins() {
        let open = r#"{"type":"open_account","account":"x"}"#;
        let unknown = r#"{"type":"no_such_command"}"#;
        let no_amount = r#"{"type":"deposit","account":"x"}"#;
        let (code, message) = code_of(
            &format!(r#"{{"commands":[{open},{no_amount},{unknown}]}}"#),
            10,
        );
        assert_eq!(code, "missing_field", "{message}");
        assert!(message.starts_with("commands[1]"), "{message}");
        let (code, message) = code_of(&format!(r#"{{"commands":[{unknown},{no_amount}]}}"#), 10);
        assert_eq!(code, "unknown_command_type", "{message}");
        assert!(message.starts_with("commands[0]"), "{message}");
        // Damage after an invalid command: the body is malformed.
        let (code, message) = code_of(&format!(r#"{{"commands":[{unknown},{open}, oops"#), 10);
        assert_eq!(code, "invalid_json", "{message}");
        // A wrongly typed field after an invalid command: that is the parse's error.
        let (code, message) = code_of(
            &format!(
                r#"{{"commands":[{unknown},{{"type":"deposit","account":"x","amount":[1]}}]}}"#
            ),
            10,
        );
        assert_eq!(code, "invalid_request", "{message}");
        assert!(message.starts_with("commands[1]"), "{message}");
        // Too many items after an invalid one: the bound is what is reported.
        let (code, _) = code_of(&format!(r#"{{"commands":[{unknown},{open},{open}]}}"#), 2);
        assert_eq!(code, "too_many_items");
        // And a valid list gives every envelope, in order.
        let body = format!(
            r#"{{"commands":[{open},{{"type":"deposit","account":"x","amount":5,"id":"d"}}]}}"#
        );
        let (envelopes, atomic) =
            parse_batch(body.as_bytes(), 10, &no_domains()).expect("a valid list parses");
        assert!(!atomic);
        assert_eq!(envelopes.len(), 2);
        assert_eq!(envelopes[1].id.as_deref(), Some("d"));
    }

    /// Regression: the whole command list was built before `too_many_items` was checked.
    #[test]
    fn the_command_list_is_refused_at_the_first_item_too_many() {
        // Garbage after the third item: refusing `too_many_items` proves the parser never got
        // there.
        let (code, message) = code_of(r#"{"commands":[{},{},{}, this is not JSON"#, 2);
        assert_eq!(code, "too_many_items", "{message}");
        assert!(message.contains("at most 2"), "{message}");
        assert_eq!(code_of(r#"{"commands":[{},{}, nope"#, 2).0, "invalid_json");
    }

    #[test]
    fn fields_are_classified_by_type_not_by_message_text() {
        let cases = [
            (
                r#"{"commands":[{"type":"open_account","colour":1}]}"#,
                "unknown_field",
                "commands[0]: unknown field `colour`",
            ),
            (
                r#"{"commands":[],"atomik":true}"#,
                "unknown_field",
                "`atomik`",
            ),
            (r#"{"atomic":true}"#, "missing_field", "`commands`"),
            (
                r#"{"commands":[{"type":"open_account","account":"x","account":"y"}]}"#,
                "invalid_request",
                "`account` appears more than once",
            ),
            (
                r#"{"commands":[{"type":"open_account","account":"x"}],"atomic":true,"atomic":false}"#,
                "invalid_request",
                "`atomic`",
            ),
            (
                r#"{"commands":[{"type":"open_account","account":"x","expected_version":-1}]}"#,
                "invalid_request",
                "commands[0]: invalid value",
            ),
        ];
        for (body, code, needle) in cases {
            let (got, message) = code_of(body, 10);
            assert_eq!(got, code, "{body}: {message}");
            assert!(message.contains(needle), "{body}: {message}");
        }
    }

    #[test]
    fn quantities_are_integers_or_canonical_decimal_strings() {
        let deposit = |amount: &str| {
            format!(r#"{{"commands":[{{"type":"deposit","account":"a","amount":{amount}}}]}}"#)
        };
        for (amount, expected) in [
            ("5", 5),
            (r#""5""#, 5),
            (r#""9007199254740993""#, 9_007_199_254_740_993),
            ("9223372036854775807", i64::MAX as u64),
            (r#""9223372036854775807""#, i64::MAX as u64),
            ("5.0", 5),
            ("11726682655.0", 11_726_682_655),
            ("9007199254740992.0", 1 << 53),
            // Parsed to the nearest double (serde_json's float_roundtrip): the default parser
            // read this as 1835956048059604.8 and refused it (found by the conformance test).
            ("1835956048059605.0", 1_835_956_048_059_605),
        ] {
            let (envelopes, _) =
                parse_batch(deposit(amount).as_bytes(), 10, &no_domains()).expect("accepted");
            let Some(ledger::Command::Deposit { amount: got, .. }) =
                envelopes[0].command.downcast_ref::<ledger::Command>()
            else {
                panic!("not a deposit");
            };
            assert_eq!(*got, expected, "{amount}");
        }
        for amount in [
            r#""0""#,
            r#""01""#,
            r#""-1""#,
            r#""1.0""#,
            r#""1e3""#,
            r#"" 1""#,
            r#""""#,
            r#""9223372036854775808""#,
            r#""99999999999999999999999""#,
            "-1",
            "1.5",
            "1e20",
        ] {
            let (code, message) = code_of(&deposit(amount), 10);
            assert_eq!(code, "invalid_amount", "{amount}: {message}");
        }
    }
}
