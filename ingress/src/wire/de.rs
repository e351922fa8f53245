//! The request body's deserializers, written by hand instead of derived, for three reasons:
//!
//! - Only the documented object shapes are accepted. A derived struct also accepts a JSON array
//!   of its fields in order (`[[{...}], false]`), which no client means and which made positional
//!   garbage commit.
//! - The command list stops at `--batch-items-max`: a 16 MiB body of `{}` items is refused after
//!   the first item too many, not after 5.6 million of them were built.
//! - Errors the visitors find carry their code as a value ([`ParseContext`]), not as message
//!   text for the caller to match, and quote client input only as a short prefix.
//!
//! Each field is parsed straight into its slot: no intermediate `serde_json::Value`, no extra
//! allocation per field (this is the request hot path).

use super::builtin::{self, FieldType, Fields, Slot};
use super::{WireError, quote};
use keel_invariants::Envelope;
use keel_invariants::declared::{CommandDef, DomainSet, Resolved};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::cell::Cell;
use std::fmt;
use std::sync::{Arc, LazyLock};

/// What a visitor knows about a failure that serde's error type cannot carry: the command being
/// parsed, and an error the visitors classified themselves.
#[derive(Default)]
pub(super) struct ParseContext {
    item: Cell<Option<usize>>,
    failure: Cell<Option<WireError>>,
    /// The declared domains, when any is loaded: each command is then read as an object
    /// first, and parsed by its declared command's definition or as a built-in one.
    pub domains: Option<Arc<DomainSet>>,
}

impl ParseContext {
    pub(super) fn new(domains: Option<Arc<DomainSet>>) -> Self {
        Self {
            domains,
            ..Self::default()
        }
    }

    /// Records a classified failure and returns the serde error that unwinds the parse.
    fn fail<E: de::Error>(&self, code: &'static str, message: String) -> E {
        self.failure.set(Some(WireError::new(code, message)));
        E::custom(code)
    }

    /// The request error for a failed parse: the visitors' own failure when they recorded one,
    /// else serde_json's error classified by its category; named by the command it happened in.
    pub(super) fn error(&self, e: serde_json::Error) -> WireError {
        let error = self.failure.take().unwrap_or_else(|| json_error(&e));
        match self.item.get() {
            Some(index) => {
                WireError::new(error.code, format!("commands[{index}]: {}", error.message))
            }
            None => error,
        }
    }
}

/// Longest part of a serde_json error message kept (its text can hold client input verbatim, e.g.
/// `invalid type: string "<the whole string>"`).
const JSON_MESSAGE_BYTES_MAX: usize = 160;

fn json_error(e: &serde_json::Error) -> WireError {
    use serde_json::error::Category;
    let code = match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => "invalid_json",
        Category::Data => "invalid_request",
    };
    let text = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    let head = text.strip_suffix(&position).unwrap_or(&text);
    let head = keel_sequencer::shorten(head.to_owned(), JSON_MESSAGE_BYTES_MAX);
    let position = if e.line() == 0 { "" } else { &position };
    WireError::new(code, format!("{head}{position}"))
}

/// A parsed `POST /v1/batches` body: its commands as envelopes, each validated as soon as it
/// was read (so the list holds envelopes, not the wider raw commands), or the first command
/// that failed validation.
pub(super) struct BatchRequest {
    pub commands: Commands,
    pub atomic: bool,
}

/// The command list of a body.
#[derive(Default)]
pub(super) struct Commands {
    /// How many commands the list holds.
    pub items: usize,
    /// Their envelopes, in order, up to the first invalid command.
    pub envelopes: Vec<Envelope>,
    /// The first command that failed validation. The list is still read to its end, so that a
    /// malformed body is reported as such even when a command before the damage is invalid.
    pub invalid: Option<WireError>,
}

/// Parses a batch body: one object `{"commands": [...], "atomic": bool}`.
pub(super) struct BatchSeed<'a> {
    pub context: &'a ParseContext,
    pub items_max: usize,
}

#[derive(Clone, Copy)]
enum BatchField {
    Commands,
    Atomic,
}

const BATCH_FIELDS: &[(&str, BatchField)] = &[
    ("commands", BatchField::Commands),
    ("atomic", BatchField::Atomic),
];

impl<'de> DeserializeSeed<'de> for BatchSeed<'_> {
    type Value = BatchRequest;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<BatchRequest, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BatchSeed<'_> {
    type Value = BatchRequest;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"an object {"commands": [...], "atomic": false}"#)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BatchRequest, A::Error> {
        let context = self.context;
        let (mut commands, mut atomic) = (None, None);
        let key = || KeySeed {
            context,
            fields: BATCH_FIELDS,
            owner: "the body",
        };
        while let Some((field, name)) = map.next_key_seed(key())? {
            let duplicate = match field {
                BatchField::Commands => commands
                    .replace(map.next_value_seed(CommandsSeed {
                        context,
                        items_max: self.items_max,
                    })?)
                    .is_some(),
                BatchField::Atomic => atomic.replace(map.next_value::<bool>()?).is_some(),
            };
            if duplicate {
                return Err(duplicate_field(context, name));
            }
        }
        let commands = commands.ok_or_else(|| {
            context.fail::<A::Error>(
                "missing_field",
                "field `commands` is required: {\"commands\": [...]}".to_owned(),
            )
        })?;
        Ok(BatchRequest {
            commands,
            atomic: atomic.unwrap_or(false),
        })
    }
}

fn duplicate_field<E: de::Error>(context: &ParseContext, name: &str) -> E {
    context.fail(
        "invalid_request",
        format!("field `{name}` appears more than once"),
    )
}

/// Parses the command list, refusing the first item past `items_max` without reading further.
struct CommandsSeed<'a> {
    context: &'a ParseContext,
    items_max: usize,
}

impl<'de> DeserializeSeed<'de> for CommandsSeed<'_> {
    type Value = Commands;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for CommandsSeed<'_> {
    type Value = Commands;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of commands")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let context = self.context;
        // The list's length is unknown until it ends; grow as items come (bounded by items_max).
        let mut commands = Commands::default();
        loop {
            context.item.set(Some(commands.items));
            let next = match &context.domains {
                Some(domains) => seq
                    .next_element_seed(ObjectSeed { context })?
                    .map(|object| declared_or_builtin(context, domains, object))
                    .transpose()?,
                None => seq.next_element_seed(CommandSeed { context })?,
            };
            let Some(item) = next else {
                break;
            };
            if commands.items == self.items_max {
                context.item.set(None);
                return Err(context.fail(
                    "too_many_items",
                    format!(
                        "`commands` has more than {max} items; at most {max} are allowed per request",
                        max = self.items_max
                    ),
                ));
            }
            if commands.invalid.is_none() {
                match item.into_envelope(commands.items) {
                    Ok(envelope) => commands.envelopes.push(envelope),
                    Err(error) => commands.invalid = Some(error),
                }
            }
            commands.items += 1;
        }
        context.item.set(None);
        Ok(commands)
    }
}

/// One command as sent: `type`, `id`, `expected_version` and the domain fields in slots (see
/// [`super::builtin`]), checked against the type after parsing. Flat (not an internally tagged
/// enum) so it is parsed in one pass whatever the order of its fields.
#[derive(Default)]
pub(super) struct RawCommand {
    pub kind: Option<String>,
    pub id: Option<String>,
    pub expected_version: Option<u64>,
    pub fields: Fields,
    /// A command of a declared domain: its definition and its fields as sent (`type`, `id` and
    /// `expected_version` already taken out into the fields above).
    pub declared: Option<(Arc<CommandDef>, serde_json::Map<String, serde_json::Value>)>,
}

/// Reads one command as a JSON object, refusing a key that appears twice (which
/// `serde_json::Value` would silently keep the last of).
struct ObjectSeed<'a> {
    context: &'a ParseContext,
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = serde_json::Map<String, serde_json::Value>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_> {
    type Value = serde_json::Map<String, serde_json::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            r#"a command object, e.g. {"type": "deposit", "account": "alice", "amount": 5}"#,
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(self.context.fail(
                    "invalid_request",
                    format!("field {} appears more than once", quote(&key)),
                ));
            }
            let value = map.next_value::<serde_json::Value>()?;
            object.insert(key, value);
        }
        Ok(object)
    }
}

/// A command read as an object: a declared command's fields are kept for its definition to
/// check; any other command is parsed as a built-in one, exactly as without domains.
fn declared_or_builtin<E: de::Error>(
    context: &ParseContext,
    domains: &DomainSet,
    mut object: serde_json::Map<String, serde_json::Value>,
) -> Result<RawCommand, E> {
    let command = match object.get("type").and_then(|t| t.as_str()) {
        Some(name) => match domains.resolve(name) {
            Resolved::Command(command) => Some(Arc::clone(command)),
            Resolved::Ambiguous(names) => {
                return Err(context.fail(
                    "unknown_command_type",
                    format!(
                        "command type {} is defined by more than one domain; name one of {}",
                        quote(name),
                        names.join(", ")
                    ),
                ));
            }
            // Neither declared nor built-in: say so, rather than refusing its fields one by one.
            Resolved::None if builtin::command(name).is_none() => {
                return Err(context.fail(
                    "unknown_command_type",
                    format!(
                        "unknown command type {}; expected one of {}, {}",
                        quote(name),
                        builtin::command_types(),
                        domains.command_names().join(", ")
                    ),
                ));
            }
            Resolved::None => None,
        },
        None => None,
    };
    let Some(command) = command else {
        let value = serde_json::Value::Object(object);
        return CommandSeed { context }
            .deserialize(value)
            .map_err(|e| E::custom(e.to_string()));
    };
    let kind = object
        .remove("type")
        .and_then(|t| t.as_str().map(str::to_owned));
    let id = match object.remove("id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(id)) => Some(id),
        Some(_) => {
            return Err(context.fail("invalid_request", "field `id` must be a string".to_owned()));
        }
    };
    let expected_version = match object.remove("expected_version") {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => Some(
            Version::deserialize(value)
                .map_err(|e| E::custom(e.to_string()))?
                .0,
        ),
    };
    Ok(RawCommand {
        kind,
        id,
        expected_version,
        declared: Some((command, object)),
        ..RawCommand::default()
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CommandField {
    Type,
    Id,
    ExpectedVersion,
    /// Position in [`builtin::field_table`].
    Domain(usize),
}

impl CommandField {
    /// Its bit in the duplicate check (3 common fields, then at most `FIELDS_MAX`).
    fn bit(self) -> u32 {
        let at = match self {
            Self::Type => 0,
            Self::Id => 1,
            Self::ExpectedVersion => 2,
            Self::Domain(at) => 3 + at,
        };
        1 << at
    }
}

const _: () = assert!(
    3 + builtin::FIELDS_MAX <= 32,
    "the duplicate check is a u32"
);

/// Every field name a built-in command may carry, with its slot.
fn command_fields() -> &'static [(&'static str, CommandField)] {
    static FIELDS: LazyLock<Vec<(&'static str, CommandField)>> = LazyLock::new(|| {
        [
            ("type", CommandField::Type),
            ("id", CommandField::Id),
            ("expected_version", CommandField::ExpectedVersion),
        ]
        .into_iter()
        .chain(
            builtin::field_table()
                .iter()
                .enumerate()
                .map(|(at, (name, _))| (*name, CommandField::Domain(at))),
        )
        .collect()
    });
    &FIELDS
}

struct CommandSeed<'a> {
    context: &'a ParseContext,
}

impl<'de> DeserializeSeed<'de> for CommandSeed<'_> {
    type Value = RawCommand;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<RawCommand, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for CommandSeed<'_> {
    type Value = RawCommand;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            r#"a command object, e.g. {"type": "deposit", "account": "alice", "amount": 5}"#,
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawCommand, A::Error> {
        let context = self.context;
        let mut raw = RawCommand::default();
        let mut seen = 0u32;
        while let Some((field, name)) = map.next_key_seed(KeySeed {
            context,
            fields: command_fields(),
            owner: "a command",
        })? {
            let bit = field.bit();
            if seen & bit != 0 {
                return Err(duplicate_field(context, name));
            }
            seen |= bit;
            raw.set(field, &mut map)?;
        }
        Ok(raw)
    }
}

impl RawCommand {
    /// Parses the value of `field` into its slot.
    fn set<'de, A: MapAccess<'de>>(
        &mut self,
        field: CommandField,
        map: &mut A,
    ) -> Result<(), A::Error> {
        match field {
            CommandField::Type => self.kind = map.next_value()?,
            CommandField::Id => self.id = map.next_value()?,
            CommandField::ExpectedVersion => {
                self.expected_version = map.next_value::<Option<Version>>()?.map(|v| v.0);
            }
            CommandField::Domain(at) => {
                let value = match builtin::field_table().get(at).map(|(_, ty)| *ty) {
                    Some(FieldType::Quantity) => {
                        map.next_value::<Option<Quantity>>()?.map(Slot::Quantity)
                    }
                    _ => map.next_value::<Option<String>>()?.map(Slot::Text),
                };
                self.fields.set(at, value);
            }
        }
        Ok(())
    }
}

/// Parses an object key into one of `fields` (and its static name); any other key fails with
/// `unknown_field`, quoting a short prefix of it.
struct KeySeed<'a, F: 'static> {
    context: &'a ParseContext,
    fields: &'static [(&'static str, F)],
    owner: &'static str,
}

impl<'de, F: Copy + 'static> DeserializeSeed<'de> for KeySeed<'_, F> {
    type Value = (F, &'static str);
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl<'de, F: Copy + 'static> Visitor<'de> for KeySeed<'_, F> {
    type Value = (F, &'static str);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        if let Some((name, field)) = self.fields.iter().find(|(name, _)| *name == key) {
            return Ok((*field, *name));
        }
        let known: Vec<&str> = self.fields.iter().map(|(name, _)| *name).collect();
        Err(self.context.fail(
            "unknown_field",
            format!(
                "unknown field {}; the fields of {} are {}",
                quote(key),
                self.owner,
                known.join(", ")
            ),
        ))
    }
}

/// An integer field as sent: a JSON integer, or a string of decimal digits (for values above
/// 2^53 - 1 that a JavaScript client cannot hold exactly as a number; docs/API.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Quantity {
    /// A non-negative integer, exact.
    Whole(u64),
    /// Anything else that is number-like (negative, fractional, too large, a non-decimal
    /// string), rendered short for the error message.
    Other(String),
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(QuantityVisitor)
    }
}

struct QuantityVisitor;

/// Longest decimal string accepted as a quantity (u64::MAX has 20 digits).
const QUANTITY_DIGITS_MAX: usize = 20;

impl<'de> Visitor<'de> for QuantityVisitor {
    type Value = Quantity;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer, or a string of decimal digits")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Quantity, E> {
        Ok(Quantity::Whole(n))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Quantity, E> {
        Ok(u64::try_from(n).map_or_else(|_| Quantity::Other(n.to_string()), Quantity::Whole))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Quantity, E> {
        // A number written with a zero fraction (`5.0`, as some JSON writers emit whole
        // numbers; JSON Schema's `integer` admits it) is that integer while a double holds it
        // exactly (up to 2^53); a fraction, or a larger double, is not an exact integer.
        const EXACT_MAX: f64 = 9_007_199_254_740_992.0;
        if n.is_finite() && n >= 0.0 && n.fract() == 0.0 && n <= EXACT_MAX {
            return Ok(Quantity::Whole(n as u64));
        }
        let shown =
            serde_json::Number::from_f64(n).map_or_else(|| n.to_string(), |n| n.to_string());
        Ok(Quantity::Other(shown))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Quantity, E> {
        let canonical = !text.is_empty()
            && text.len() <= QUANTITY_DIGITS_MAX
            && text.bytes().all(|b| b.is_ascii_digit())
            && (text == "0" || !text.starts_with('0'));
        Ok(match text.parse::<u64>() {
            Ok(n) if canonical => Quantity::Whole(n),
            _ => Quantity::Other(format!("the string {}", quote(text))),
        })
    }
}

/// `expected_version`: a JSON integer from 0 to 2^64-1, or one written with a zero fraction
/// (`3.0`) while a double holds it exactly (up to 2^53), as for quantities.
struct Version(u64);

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(VersionVisitor)
    }
}

struct VersionVisitor;

impl Visitor<'_> for VersionVisitor {
    type Value = Version;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer from 0 to 18446744073709551615")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Version, E> {
        Ok(Version(n))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Version, E> {
        u64::try_from(n)
            .map(Version)
            .map_err(|_| E::invalid_value(de::Unexpected::Signed(n), &self))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Version, E> {
        const EXACT_MAX: f64 = 9_007_199_254_740_992.0;
        if n.is_finite() && n >= 0.0 && n.fract() == 0.0 && n <= EXACT_MAX {
            return Ok(Version(n as u64));
        }
        Err(E::invalid_type(de::Unexpected::Float(n), &self))
    }
}
