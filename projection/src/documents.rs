//! The MongoDB documents of the projection (docs/PROJECTION.md is the reference): one per event
//! in `events`, one per aggregate in `aggregates`, one per consumer in `checkpoints`. Field
//! names and shapes follow the HTTP API's JSON, so what an analyst reads in MongoDB looks like
//! what `GET /v1/events` and `GET /v1/aggregates/{id}` answer.
//!
//! Integers are BSON Int64. A `u64` above `i64::MAX` (possible only for an SKU's `on_hand`) is
//! stored as Decimal128 so that it stays exact; sequences never get there.

use keel_invariants::declared::{DeclaredEvent, DeclaredState, Effect, Value};
use keel_invariants::{Aggregate, Event, LoggedEvent, State, inventory, ledger};
use mongodb::bson::{Bson, DateTime, Decimal128, Document, doc};
use std::collections::BTreeMap;

/// A document that does not have the shape the projector writes (edited by hand, or written
/// by another program).
#[derive(Debug, thiserror::Error)]
#[error("aggregate document `{id}`: {detail}")]
pub struct DocumentError {
    pub id: String,
    pub detail: String,
}

/// A `u64` as BSON: Int64 when it fits, else an exact Decimal128.
pub fn u64_bson(value: u64) -> Bson {
    match i64::try_from(value) {
        Ok(v) => Bson::Int64(v),
        Err(_) => value
            .to_string()
            .parse::<Decimal128>()
            .map_or(Bson::Double(value as f64), Bson::Decimal128),
    }
}

/// The inverse of [`u64_bson`], also accepting Int32 (what a hand-written or another driver's
/// document may hold).
pub fn bson_u64(value: &Bson) -> Option<u64> {
    match value {
        Bson::Int32(v) => u64::try_from(*v).ok(),
        Bson::Int64(v) => u64::try_from(*v).ok(),
        Bson::Decimal128(d) => d.to_string().parse().ok(),
        _ => None,
    }
}

/// A signed integer, whichever integer type the server chose to return it as.
pub fn bson_i64(value: &Bson) -> Option<i64> {
    match value {
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Int64(v) => Some(*v),
        _ => None,
    }
}

/// Commit time (µs since the epoch) as a BSON date (millisecond precision, what BSON has).
pub fn datetime_us(us: u64) -> DateTime {
    DateTime::from_millis(i64::try_from(us / 1000).unwrap_or(i64::MAX))
}

/// The `events` document of one committed event.
pub fn event_document(
    seq: u64,
    batch: u64,
    committed_at_us: u64,
    logged: &LoggedEvent,
) -> Document {
    let event = &logged.event;
    let aggregates: Vec<Bson> = event
        .targets()
        .iter()
        .map(|id| Bson::String(id.as_str().to_owned()))
        .collect();
    doc! {
        "_id": u64_bson(seq),
        "batch": u64_bson(batch),
        "type": event.type_name(),
        "aggregates": aggregates,
        "command_id": logged.command_id.clone().map_or(Bson::Null, Bson::String),
        "data": event_data(event),
        "committed_at": datetime_us(committed_at_us),
    }
}

/// One domain's documents: how its events and states render, and how a state reads back. The
/// generic code routes by an event's or state's stored tag ([`DOMAINS`] is in tag order) and
/// by an aggregate document's kind.
trait DomainDocuments: Sync {
    /// The `data` of an event of this domain (`None`: another domain's).
    fn event_data(&self, event: &Event) -> Option<Document>;
    /// Adds a state's fields to its aggregate document (`false`: another domain's).
    fn state_fields(&self, state: &State, document: &mut Document) -> bool;
    /// Reads back a state of aggregate kind `kind` (`None`: not this domain's kind).
    fn parse_state(&self, kind: &str, document: &Document) -> Option<Result<State, String>>;
}

/// Every domain's documents, by stored tag (ledger 0, inventory 1, declared 2). A declared
/// domain reads back any kind the built-in ones do not own, so it comes last.
static DOMAINS: [&dyn DomainDocuments; 3] =
    [&LedgerDocuments, &InventoryDocuments, &DeclaredDocuments];

fn domain_of_tag(tag: u32) -> Option<&'static dyn DomainDocuments> {
    usize::try_from(tag)
        .ok()
        .and_then(|t| DOMAINS.get(t))
        .copied()
}

/// The event's fields, as `data` in `GET /v1/events`.
fn event_data(event: &Event) -> Document {
    domain_of_tag(event.tag())
        .and_then(|d| d.event_data(event))
        .unwrap_or_default()
}

fn memo(memo: &Option<String>) -> Bson {
    memo.clone().map_or(Bson::Null, Bson::String)
}

struct LedgerDocuments;

impl DomainDocuments for LedgerDocuments {
    fn event_data(&self, event: &Event) -> Option<Document> {
        use ledger::Event as L;
        Some(match event.downcast_ref::<L>()? {
            L::AccountOpened {
                account,
                overdraft_limit,
            } => doc! {"account": account.name(), "overdraft_limit": u64_bson(*overdraft_limit)},
            L::Deposited {
                account,
                amount,
                memo: m,
            }
            | L::Withdrew {
                account,
                amount,
                memo: m,
            } => doc! {"account": account.name(), "amount": u64_bson(*amount), "memo": memo(m)},
            L::Transferred {
                from,
                to,
                amount,
                memo: m,
            } => {
                doc! {"from": from.name(), "to": to.name(), "amount": u64_bson(*amount), "memo": memo(m)}
            }
            L::AccountClosed { account } => doc! {"account": account.name()},
        })
    }

    fn state_fields(&self, state: &State, document: &mut Document) -> bool {
        let Some(a) = state.downcast_ref::<ledger::Account>() else {
            return false;
        };
        document.insert("balance", Bson::Int64(a.balance));
        document.insert("overdraft_limit", u64_bson(a.overdraft_limit));
        document.insert("closed", a.closed);
        true
    }

    fn parse_state(&self, kind: &str, document: &Document) -> Option<Result<State, String>> {
        (kind == ledger::KIND).then(|| {
            Ok(State::new(ledger::Account {
                balance: document
                    .get("balance")
                    .and_then(bson_i64)
                    .ok_or("`balance` is not an integer")?,
                overdraft_limit: number(document, "overdraft_limit")?,
                closed: document
                    .get_bool("closed")
                    .map_err(|e| format!("`closed`: {e}"))?,
            }))
        })
    }
}

struct InventoryDocuments;

impl DomainDocuments for InventoryDocuments {
    fn event_data(&self, event: &Event) -> Option<Document> {
        use inventory::Event as I;
        Some(match event.downcast_ref::<I>()? {
            I::SkuCreated { sku, on_hand } => {
                doc! {"sku": sku.name(), "on_hand": u64_bson(*on_hand)}
            }
            I::Restocked { sku, qty } => doc! {"sku": sku.name(), "qty": u64_bson(*qty)},
            I::Reserved { sku, qty, order }
            | I::Released { sku, qty, order }
            | I::Shipped { sku, qty, order } => {
                doc! {"sku": sku.name(), "qty": u64_bson(*qty), "order": order.as_str()}
            }
        })
    }

    fn state_fields(&self, state: &State, document: &mut Document) -> bool {
        let Some(s) = state.downcast_ref::<inventory::Sku>() else {
            return false;
        };
        document.insert("on_hand", u64_bson(s.on_hand));
        document.insert("reserved", u64_bson(s.reserved));
        document.insert("available", u64_bson(s.on_hand.saturating_sub(s.reserved)));
        let reservations: Document = s
            .reservations
            .iter()
            .map(|(o, q)| (o.clone(), u64_bson(*q)))
            .collect();
        document.insert("reservations", reservations);
        true
    }

    fn parse_state(&self, kind: &str, document: &Document) -> Option<Result<State, String>> {
        (kind == inventory::KIND).then(|| {
            let mut reservations = BTreeMap::new();
            let stored = document
                .get_document("reservations")
                .map_err(|e| format!("`reservations`: {e}"))?;
            for (order, qty) in stored {
                let qty = bson_u64(qty)
                    .ok_or_else(|| format!("reservation `{order}` is not an integer"))?;
                reservations.insert(order.clone(), qty);
            }
            Ok(State::new(inventory::Sku {
                on_hand: number(document, "on_hand")?,
                reserved: number(document, "reserved")?,
                reservations,
            }))
        })
    }
}

struct DeclaredDocuments;

impl DomainDocuments for DeclaredDocuments {
    fn event_data(&self, event: &Event) -> Option<Document> {
        let e = event.downcast_ref::<DeclaredEvent>()?;
        let params: Document = e
            .params
            .iter()
            .map(|(k, v)| (k.to_string(), value_bson(v)))
            .collect();
        let effects: Vec<Bson> = e
            .effects
            .iter()
            .map(|effect| match effect {
                Effect::Create(fields) => Bson::Document(doc! {"create": fields_document(fields)}),
                Effect::Update(fields) => Bson::Document(doc! {"update": fields_document(fields)}),
                Effect::Delete => Bson::String("delete".into()),
                Effect::Read => Bson::String("read".into()),
            })
            .collect();
        Some(
            doc! {"domain": e.domain.as_str(), "command": e.command.as_str(), "params": params, "effects": effects},
        )
    }

    fn state_fields(&self, state: &State, document: &mut Document) -> bool {
        let Some(s) = state.downcast_ref::<DeclaredState>() else {
            return false;
        };
        for (name, value) in &s.fields {
            if !AGGREGATE_META.contains(&name.as_str()) {
                document.insert(name.to_string(), value_bson(value));
            }
        }
        if s.deleted {
            document.insert("deleted", true);
        }
        true
    }

    /// Any kind a built-in domain does not own (the kinds of the loaded definitions).
    fn parse_state(&self, _kind: &str, document: &Document) -> Option<Result<State, String>> {
        let mut state = DeclaredState::default();
        for (name, value) in document {
            if AGGREGATE_META.contains(&name.as_str()) {
                continue;
            }
            if name == "deleted" {
                state.deleted = value.as_bool().unwrap_or(false);
                continue;
            }
            let Some(value) = bson_value(value) else {
                return Some(Err(format!("field `{name}` has a type Keel never writes")));
            };
            state.fields.insert(name.as_str().into(), value);
        }
        Some(Ok(State::new(state)))
    }
}

/// A field that must hold a non-negative integer.
fn number(document: &Document, field: &str) -> Result<u64, String> {
    document
        .get(field)
        .and_then(bson_u64)
        .ok_or_else(|| format!("`{field}` is not a non-negative integer"))
}

/// A declared domain's value as BSON: int and uint as Int64 (a uint above `i64::MAX` as
/// Decimal128), timestamps as dates (millisecond precision, what BSON has), durations as Int64
/// microseconds, maps as sub-documents.
pub fn value_bson(value: &Value) -> Bson {
    match value {
        Value::Int(n) => Bson::Int64(*n),
        Value::Uint(n) => u64_bson(*n),
        Value::Bool(b) => Bson::Boolean(*b),
        Value::String(s) => Bson::String(s.clone()),
        Value::Timestamp(us) => Bson::DateTime(DateTime::from_millis(us.div_euclid(1000))),
        Value::Duration(us) => Bson::Int64(*us),
        Value::Map(m) => Bson::Document(fields_document(m)),
    }
}

fn fields_document<K: AsRef<str>>(fields: &BTreeMap<K, Value>) -> Document {
    fields
        .iter()
        .map(|(k, v)| (k.as_ref().to_owned(), value_bson(v)))
        .collect()
}

/// The inverse of [`value_bson`] as far as the document tells: Int64 reads as int, Decimal128
/// as uint, a date as a timestamp. The projector only renders what it reads back, and every
/// value renders to the same BSON as the one it was read from, so the documents stay exact.
fn bson_value(value: &Bson) -> Option<Value> {
    Some(match value {
        Bson::Int32(n) => Value::Int(i64::from(*n)),
        Bson::Int64(n) => Value::Int(*n),
        Bson::Decimal128(d) => Value::Uint(d.to_string().parse().ok()?),
        Bson::Boolean(b) => Value::Bool(*b),
        Bson::String(s) => Value::String(s.clone()),
        Bson::DateTime(t) => Value::Timestamp(t.timestamp_millis().checked_mul(1000)?),
        Bson::Document(d) => Value::Map(
            d.iter()
                .map(|(k, v)| bson_value(v).map(|v| (k.clone(), v)))
                .collect::<Option<_>>()?,
        ),
        _ => return None,
    })
}

/// The fields an aggregate document holds besides its state.
const AGGREGATE_META: &[&str] = &["_id", "kind", "version", "last_seq", "updated_at"];

/// The `aggregates` document: `_id`, `kind`, `version`, `last_seq` (the last event applied),
/// `updated_at` (that event's commit time) and the state's fields flattened.
pub fn aggregate_document(
    id: &str,
    aggregate: &Aggregate,
    last_seq: u64,
    updated_at_us: u64,
) -> Document {
    let kind = id.split_once(':').map_or("", |(kind, _)| kind);
    let mut document = doc! {
        "_id": id,
        "kind": kind,
        "version": u64_bson(aggregate.version),
        "last_seq": u64_bson(last_seq),
        "updated_at": datetime_us(updated_at_us),
    };
    if let Some(domain) = domain_of_tag(aggregate.state.tag()) {
        domain.state_fields(&aggregate.state, &mut document);
    }
    document
}

/// Reads back what [`aggregate_document`] wrote: the aggregate and its `last_seq`.
pub fn parse_aggregate_document(
    document: &Document,
) -> Result<(String, Aggregate, u64), DocumentError> {
    let id = document
        .get_str("_id")
        .map_err(|e| DocumentError {
            id: "?".into(),
            detail: e.to_string(),
        })?
        .to_owned();
    let fail = |detail: String| DocumentError {
        id: id.clone(),
        detail,
    };
    let number = |field: &str| {
        document
            .get(field)
            .and_then(bson_u64)
            .ok_or_else(|| fail(format!("`{field}` is not a non-negative integer")))
    };
    let version = number("version")?;
    let last_seq = number("last_seq")?;
    let kind = document.get_str("kind").map_err(|e| fail(e.to_string()))?;
    let state = DOMAINS
        .iter()
        .find_map(|d| d.parse_state(kind, document))
        .unwrap_or_else(|| Err(format!("no domain reads kind `{kind}`")))
        .map_err(fail)?;
    Ok((id, Aggregate { version, state }, last_seq))
}

/// Where a consumer's projection stands: the last batch fully applied and its chain link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub last_batch: u64,
    pub last_seq: u64,
    pub last_hash: [u8; 32],
    pub committed_at_us: u64,
}

/// The `checkpoints` document of consumer `name`.
pub fn checkpoint_document(name: &str, checkpoint: &Checkpoint, now: DateTime) -> Document {
    doc! {
        "_id": name,
        "last_batch": u64_bson(checkpoint.last_batch),
        "last_seq": u64_bson(checkpoint.last_seq),
        "last_hash": keel_engine::format::hex(&checkpoint.last_hash),
        "committed_at": datetime_us(checkpoint.committed_at_us),
        "updated_at": now,
    }
}

/// Reads back a checkpoint document. The commit time is only as precise as BSON's dates.
pub fn parse_checkpoint_document(document: &Document) -> Result<Checkpoint, DocumentError> {
    let fail = |detail: String| DocumentError {
        id: "checkpoint".into(),
        detail,
    };
    let number = |field: &str| {
        document
            .get(field)
            .and_then(bson_u64)
            .ok_or_else(|| fail(format!("`{field}` is not a non-negative integer")))
    };
    let hex = document
        .get_str("last_hash")
        .map_err(|e| fail(format!("`last_hash`: {e}")))?;
    let last_hash = parse_hex32(hex)
        .ok_or_else(|| fail(format!("`last_hash` {hex:?} is not 64 hex digits")))?;
    let committed_at = document
        .get_datetime("committed_at")
        .map_err(|e| fail(format!("`committed_at`: {e}")))?;
    Ok(Checkpoint {
        last_batch: number("last_batch")?,
        last_seq: number("last_seq")?,
        last_hash,
        committed_at_us: u64::try_from(committed_at.timestamp_millis())
            .ok()
            .and_then(|ms| ms.checked_mul(1000))
            .ok_or_else(|| fail(format!("`committed_at` {committed_at} is out of range")))?,
    })
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_invariants::AggregateId;

    #[test]
    fn aggregates_read_back_exactly() {
        let account = Aggregate {
            version: 7,
            state: State::new(ledger::Account {
                balance: -40,
                overdraft_limit: 100,
                closed: false,
            }),
        };
        let mut reservations = BTreeMap::new();
        reservations.insert("o-1".to_owned(), 3);
        reservations.insert("o.2".to_owned(), u64::MAX - 5);
        let sku = Aggregate {
            version: 4,
            state: State::new(inventory::Sku {
                on_hand: u64::MAX,
                reserved: u64::MAX - 2,
                reservations,
            }),
        };
        for (id, aggregate) in [("account:alice", account), ("sku:A-17", sku)] {
            let document = aggregate_document(id, &aggregate, 99, 1_700_000_000_123_456);
            let (read_id, read, last_seq) = parse_aggregate_document(&document).expect("parses");
            assert_eq!((read_id.as_str(), &read, last_seq), (id, &aggregate, 99));
        }
    }

    #[test]
    fn checkpoints_read_back() {
        let checkpoint = Checkpoint {
            last_batch: 12,
            last_seq: 345,
            last_hash: [0xAB; 32],
            committed_at_us: 1_700_000_000_123_000,
        };
        let document = checkpoint_document("keel-projector", &checkpoint, DateTime::now());
        assert_eq!(
            parse_checkpoint_document(&document).expect("parses"),
            checkpoint
        );
    }

    #[test]
    fn event_documents_mirror_the_http_api() {
        let logged = LoggedEvent {
            command_id: Some("c-1".into()),
            event: Event::new(ledger::Event::Transferred {
                from: AggregateId::new("account", "alice"),
                to: AggregateId::new("account", "bob"),
                amount: 5,
                memo: None,
            }),
        };
        let document = event_document(4012, 17, 1_000_000, &logged);
        let json = Bson::Document(document).into_relaxed_extjson();
        assert_eq!(
            json,
            serde_json::json!({
                "_id": 4012, "batch": 17, "type": "transferred",
                "aggregates": ["account:alice", "account:bob"], "command_id": "c-1",
                "data": {"from": "alice", "to": "bob", "amount": 5, "memo": null},
                "committed_at": {"$date": "1970-01-01T00:00:01Z"},
            })
        );
    }
}
