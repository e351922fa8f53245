//! JSON wire types of the HTTP API (docs/API.md) and their translation to and from the domain.
//! Only this module knows the JSON shape; the domain types are not `Serialize` for its sake.

use keel_invariants::{Aggregate, AggregateId, Command, Envelope, Event, State, inventory, ledger};
use keel_sequencer::{CommittedEvent, ItemResult, Reply};
use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Number, Value, json};
use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

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

/// `POST /v1/batches` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub commands: Commands,
    #[serde(default)]
    pub atomic: bool,
}

/// The command list.
pub struct Commands(pub Vec<RawCommand>);

thread_local! {
    /// The index of the command being parsed on this thread, so a parse error can name it
    /// without wrapping (and so losing the category of) serde_json's error.
    static PARSING_ITEM: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

impl<'de> Deserialize<'de> for Commands {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CommandsVisitor;
        impl<'de> Visitor<'de> for CommandsVisitor {
            type Value = Commands;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of commands")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Commands, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16_384));
                loop {
                    PARSING_ITEM.set(Some(items.len()));
                    match seq.next_element::<RawCommand>()? {
                        Some(item) => items.push(item),
                        None => break,
                    }
                }
                PARSING_ITEM.set(None);
                Ok(Commands(items))
            }
        }
        deserializer.deserialize_seq(CommandsVisitor)
    }
}

/// One command as sent: every field of every command type, checked against the type after
/// parsing. Flat (not an internally tagged enum) so serde parses it in one pass.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawCommand {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<String>,
    expected_version: Option<u64>,
    account: Option<String>,
    overdraft_limit: Option<Number>,
    amount: Option<Number>,
    memo: Option<String>,
    from: Option<String>,
    to: Option<String>,
    sku: Option<String>,
    on_hand: Option<Number>,
    qty: Option<Number>,
    order: Option<String>,
}

/// The fields a command type takes besides `type`, `id` and `expected_version`.
fn fields_of(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "open_account" => &["account", "overdraft_limit"],
        "deposit" | "withdraw" => &["account", "amount", "memo"],
        "transfer" => &["from", "to", "amount", "memo"],
        "close_account" => &["account"],
        "create_sku" => &["sku", "on_hand"],
        "restock" => &["sku", "qty"],
        "reserve" => &["sku", "qty", "order"],
        "release" | "ship" => &["sku", "order"],
        _ => return None,
    })
}

pub const COMMAND_TYPES: &str = "open_account, deposit, withdraw, transfer, close_account, create_sku, restock, reserve, release, ship";

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
    fn positive(&self, field: &str, value: Option<Number>) -> Result<u64, WireError> {
        let n = self.count(field, value)?;
        if n == 0 {
            return Err(self.error(
                "invalid_amount",
                format!("field `{field}` must be greater than 0"),
            ));
        }
        Ok(n)
    }

    /// A non-negative integer that fits in i64.
    fn count(&self, field: &str, value: Option<Number>) -> Result<u64, WireError> {
        let number = self.required(field, value)?;
        match number.as_u64() {
            Some(n) if i64::try_from(n).is_ok() => Ok(n),
            _ => Err(self.error(
                "invalid_amount",
                format!(
                    "field `{field}` is {number}; it must be an integer from 0 to {}",
                    i64::MAX
                ),
            )),
        }
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
    fn present(&self) -> impl Iterator<Item = &'static str> {
        [
            ("account", self.account.is_some()),
            ("overdraft_limit", self.overdraft_limit.is_some()),
            ("amount", self.amount.is_some()),
            ("memo", self.memo.is_some()),
            ("from", self.from.is_some()),
            ("to", self.to.is_some()),
            ("sku", self.sku.is_some()),
            ("on_hand", self.on_hand.is_some()),
            ("qty", self.qty.is_some()),
            ("order", self.order.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, present)| present.then_some(name))
    }

    /// Validates the command at `index` and builds its envelope.
    pub fn into_envelope(mut self, index: usize) -> Result<Envelope, WireError> {
        let kind = self.kind.take().ok_or_else(|| {
            WireError::new(
                "missing_field",
                format!("commands[{index}]: field `type` is required"),
            )
        })?;
        let item = Item { index, kind: &kind };
        let allowed = fields_of(&kind).ok_or_else(|| {
            WireError::new(
                "unknown_command_type",
                format!("commands[{index}]: unknown command type `{kind}`; expected one of {COMMAND_TYPES}"),
            )
        })?;
        if let Some(extra) = self.present().find(|f| !allowed.contains(f)) {
            return Err(item.error(
                "unexpected_field",
                format!("field `{extra}` does not belong to this command type"),
            ));
        }
        let id = match self.id.take() {
            Some(id) => {
                check_name(&id)
                    .map_err(|why| item.error("invalid_name", format!("field `id` {why}")))?;
                Some(id)
            }
            None => None,
        };
        let expected_version = self.expected_version;
        let command = self.command(&item)?;
        Ok(Envelope {
            id,
            expected_version,
            command,
        })
    }

    fn command(self, item: &Item<'_>) -> Result<Command, WireError> {
        use inventory::Command as I;
        use ledger::Command as L;
        let account = |v| item.aggregate(ledger::KIND, "account", v);
        let sku = |v| item.aggregate(inventory::KIND, "sku", v);
        Ok(match item.kind {
            "open_account" => Command::Ledger(L::OpenAccount {
                account: account(self.account)?,
                overdraft_limit: match self.overdraft_limit {
                    Some(n) => item.count("overdraft_limit", Some(n))?,
                    None => 0,
                },
            }),
            "deposit" => Command::Ledger(L::Deposit {
                account: account(self.account)?,
                amount: item.positive("amount", self.amount)?,
                memo: item.memo(self.memo)?,
            }),
            "withdraw" => Command::Ledger(L::Withdraw {
                account: account(self.account)?,
                amount: item.positive("amount", self.amount)?,
                memo: item.memo(self.memo)?,
            }),
            "transfer" => Command::Ledger(L::Transfer {
                from: item.aggregate(ledger::KIND, "from", self.from)?,
                to: item.aggregate(ledger::KIND, "to", self.to)?,
                amount: item.positive("amount", self.amount)?,
                memo: item.memo(self.memo)?,
            }),
            "close_account" => Command::Ledger(L::CloseAccount {
                account: account(self.account)?,
            }),
            "create_sku" => Command::Inventory(I::CreateSku {
                sku: sku(self.sku)?,
                on_hand: item.count("on_hand", self.on_hand)?,
            }),
            "restock" => Command::Inventory(I::Restock {
                sku: sku(self.sku)?,
                qty: item.positive("qty", self.qty)?,
            }),
            "reserve" => Command::Inventory(I::Reserve {
                sku: sku(self.sku)?,
                qty: item.positive("qty", self.qty)?,
                order: item.name("order", self.order)?,
            }),
            "release" => Command::Inventory(I::Release {
                sku: sku(self.sku)?,
                order: item.name("order", self.order)?,
            }),
            "ship" => Command::Inventory(I::Ship {
                sku: sku(self.sku)?,
                order: item.name("order", self.order)?,
            }),
            other => {
                return Err(item.error(
                    "unknown_command_type",
                    format!("unknown command type `{other}`"),
                ));
            }
        })
    }
}

/// Parses and validates a whole `POST /v1/batches` body.
pub fn parse_batch(
    body: &[u8],
    batch_items_max: usize,
) -> Result<(Vec<Envelope>, bool), WireError> {
    PARSING_ITEM.set(None);
    let request: BatchRequest =
        serde_json::from_slice(body).map_err(|e| json_error(e, PARSING_ITEM.take()))?;
    let items = request.commands.0.len();
    if items == 0 {
        return Err(WireError::new(
            "empty_batch",
            "`commands` is empty; send at least one command",
        ));
    }
    if items > batch_items_max {
        return Err(WireError::new(
            "too_many_items",
            format!(
                "`commands` has {items} items; at most {batch_items_max} are allowed per request"
            ),
        ));
    }
    let envelopes = request
        .commands
        .0
        .into_iter()
        .enumerate()
        .map(|(index, raw)| raw.into_envelope(index))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((envelopes, request.atomic))
}

/// Classifies a parse error; `item` is the command being parsed when it happened.
fn json_error(e: serde_json::Error, item: Option<usize>) -> WireError {
    use serde_json::error::Category;
    let message = e.to_string();
    let code = match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            return WireError::new("invalid_json", message);
        }
        Category::Data if message.starts_with("unknown field") => "unknown_field",
        Category::Data if message.starts_with("missing field") => "missing_field",
        Category::Data => "invalid_request",
    };
    match item {
        Some(index) => WireError::new(code, format!("commands[{index}]: {message}")),
        None => WireError::new(code, message),
    }
}

/// RFC 3339 UTC with microseconds.
pub fn timestamp(us: u64) -> String {
    humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(us)).to_string()
}

#[derive(Serialize)]
pub struct BatchResponse {
    pub batch: Option<u64>,
    pub committed_at: String,
    pub results: Vec<ItemDto>,
}

#[derive(Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ItemDto {
    Committed {
        seq: u64,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        replayed: bool,
    },
    Rejected {
        code: &'static str,
        message: String,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        replayed: bool,
    },
}

impl From<Reply> for BatchResponse {
    fn from(reply: Reply) -> Self {
        let results = reply
            .results
            .into_iter()
            .map(|r| match r {
                ItemResult::Committed { seq, replayed } => ItemDto::Committed { seq, replayed },
                ItemResult::Rejected {
                    rejection,
                    replayed,
                } => ItemDto::Rejected {
                    code: rejection.code.as_str(),
                    message: rejection.message,
                    replayed,
                },
            })
            .collect();
        Self {
            batch: reply.batch,
            committed_at: timestamp(reply.committed_at_us),
            results,
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
    match state {
        State::Account(a) => json!({
            "balance": a.balance,
            "overdraft_limit": a.overdraft_limit,
            "closed": a.closed,
        }),
        State::Sku(s) => json!({
            "on_hand": s.on_hand,
            "reserved": s.reserved,
            "available": s.on_hand.saturating_sub(s.reserved),
            "reservations": s.reservations,
        }),
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

fn event_data(event: &Event) -> Value {
    use inventory::Event as I;
    use ledger::Event as L;
    match event {
        Event::Ledger(L::AccountOpened {
            account,
            overdraft_limit,
        }) => {
            json!({"account": account.name(), "overdraft_limit": overdraft_limit})
        }
        Event::Ledger(
            L::Deposited {
                account,
                amount,
                memo,
            }
            | L::Withdrew {
                account,
                amount,
                memo,
            },
        ) => {
            json!({"account": account.name(), "amount": amount, "memo": memo})
        }
        Event::Ledger(L::Transferred {
            from,
            to,
            amount,
            memo,
        }) => {
            json!({"from": from.name(), "to": to.name(), "amount": amount, "memo": memo})
        }
        Event::Ledger(L::AccountClosed { account }) => json!({"account": account.name()}),
        Event::Inventory(I::SkuCreated { sku, on_hand }) => {
            json!({"sku": sku.name(), "on_hand": on_hand})
        }
        Event::Inventory(I::Restocked { sku, qty }) => json!({"sku": sku.name(), "qty": qty}),
        Event::Inventory(
            I::Reserved { sku, qty, order }
            | I::Released { sku, qty, order }
            | I::Shipped { sku, qty, order },
        ) => {
            json!({"sku": sku.name(), "qty": qty, "order": order})
        }
    }
}
