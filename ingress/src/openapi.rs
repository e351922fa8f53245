//! The OpenAPI 3.1 document of Keel's HTTP API, generated with utoipa from the handlers' path
//! declarations and the answers' types, served at `GET /v1/openapi.json` and committed as
//! `docs/openapi.json` (a test fails when the two differ; `make openapi` rewrites the file).
//!
//! The request body of `POST /v1/batches` is parsed by hand (wire/de.rs, for exact integers and
//! strict shapes), so its schema is declared here, next to the schemas of the JSON renderings
//! in wire.rs; the answer of a batch ([`crate::wire::BatchResponse`]) is the code's own type.

// The handlers' `#[utoipa::path]` declarations live here, on stand-in functions, so that the
// HTTP module keeps its handlers readable; `paths(...)` below lists them.
#![allow(dead_code)]

use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::openapi::schema::{AdditionalProperties, SchemaType};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ObjectBuilder, OneOfBuilder, RefOr, Schema, Type};
use utoipa::{Modify, OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Keel",
        description = "An invariant-validating, single-writer transaction platform. Every batch is answered only after it is fsynced. Errors are `{\"error\": {\"code\", \"message\"}}`; 503 answers for overload carry `Retry-After` (seconds): retry the same request, with the same command ids, after that long. With `keel serve --auth-keys`, every route but /healthz, /readyz and this document needs `Authorization: Bearer <key>` with the scope named in the route's security requirement (401 without a valid key, 403 without the scope). docs/API.md is the prose reference.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        post_batches,
        get_aggregate,
        get_events,
        get_batch,
        get_subscribe,
        get_domains,
        get_metrics,
        get_healthz,
        get_readyz,
        get_openapi
    ),
    components(schemas(
        BatchRequest,
        Command,
        crate::wire::BatchResponse,
        crate::wire::ItemDto,
        ErrorBody,
        ErrorDetail,
        AggregateJson,
        AccountState,
        SkuState,
        EventJson,
        EventsPage,
        BatchJson,
        LoggedRejectionJson,
        Status,
    )),
    modifiers(&Security, &StrictCommands),
    tags(
        (name = "write", description = "Commands (scope `write`)"),
        (name = "read", description = "Committed state and history (scope `read`)"),
        (name = "operations", description = "Health, metrics, this document"),
    )
)]
pub struct ApiDoc;

/// The document as served and committed: pretty JSON with a final newline.
pub fn document() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description = Some(
            "An API key made with `keel keys add` (`keel_` and 64 hex digits). The security \
             requirement of each operation names the scope the key needs: write, read or admin."
                .into(),
        );
        components.add_security_scheme("api_key", SecurityScheme::Http(scheme));
    }
}

/// Every command object refuses fields it does not have (the server answers `unknown_field` or
/// `unexpected_field`); utoipa does not carry `deny_unknown_fields` into a tagged enum's
/// variants, so it is set here.
struct StrictCommands;

impl Modify for StrictCommands {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        if let Some(RefOr::T(Schema::OneOf(one_of))) = components.schemas.get_mut("Command") {
            for item in &mut one_of.items {
                if let RefOr::T(Schema::Object(object)) = item {
                    object.additional_properties =
                        Some(Box::new(AdditionalProperties::FreeForm(false)));
                }
            }
        }
    }
}

/// Printable ASCII without spaces, 1 to 128 bytes.
const NAME_PATTERN: &str = "^[!-~]{1,128}$";

fn name() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(NAME_PATTERN))
        .min_length(Some(1))
        .max_length(Some(128))
        .into()
}

/// An optional field: `null` is the same as leaving it out.
fn nullable(schema: Schema) -> Schema {
    OneOfBuilder::new()
        .item(schema)
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .into()
}

fn optional_name() -> Schema {
    nullable(name())
}

/// An unsigned 64-bit integer (sequences, versions): 0 to 18446744073709551615.
fn unsigned() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(utoipa::Number::UInt(0)))
        .maximum(Some(utoipa::Number::UInt(usize::MAX)))
        .into()
}

fn optional_unsigned() -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Integer, Type::Null]))
        .minimum(Some(utoipa::Number::UInt(0)))
        .maximum(Some(utoipa::Number::UInt(usize::MAX)))
        .into()
}

/// A batch sequence in a path: 1 to 18446744073709551615.
fn batch_seq() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(utoipa::Number::UInt(1)))
        .maximum(Some(utoipa::Number::UInt(usize::MAX)))
        .into()
}

/// `<kind>:<name>`: anything with a colon.
fn aggregate_id() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(":"))
        .into()
}

/// Decimal digits without a leading zero, from 1 to 9223372036854775807 (2^63-1): up to 18
/// digits, or 19 digits not above the bound, digit by digit.
macro_rules! digits_up_to_i64_max {
    () => {
        "[1-9][0-9]{0,17}|[1-8][0-9]{18}|9[0-1][0-9]{17}|92[0-1][0-9]{16}|922[0-2][0-9]{15}|\
         9223[0-2][0-9]{14}|92233[0-6][0-9]{13}|922337[0-1][0-9]{12}|92233720[0-2][0-9]{10}|\
         922337203[0-5][0-9]{9}|9223372036[0-7][0-9]{8}|92233720368[0-4][0-9]{7}|\
         922337203685[0-3][0-9]{6}|9223372036854[0-6][0-9]{5}|92233720368547[0-6][0-9]{4}|\
         922337203685477[0-4][0-9]{3}|9223372036854775[0-7][0-9]{2}|922337203685477580[0-6]|\
         9223372036854775807"
    };
}

/// An exact 64-bit quantity: a JSON integer, or a string of decimal digits (docs/API.md,
/// "Large integers").
fn quantity(minimum: i8) -> Schema {
    let number = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
            utoipa::openapi::KnownFormat::Int64,
        )))
        .minimum(Some(utoipa::Number::Int(isize::from(minimum))))
        .maximum(Some(utoipa::Number::Int(isize::MAX)));
    let digits = ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(if minimum == 0 {
            concat!("^(0|", digits_up_to_i64_max!(), ")$")
        } else {
            concat!("^(", digits_up_to_i64_max!(), ")$")
        }))
        .description(Some("decimal digits, at most 9223372036854775807"));
    OneOfBuilder::new().item(number).item(digits).into()
}

fn positive() -> Schema {
    quantity(1)
}

fn non_negative() -> Schema {
    quantity(0)
}

fn memo() -> Schema {
    nullable(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(4096))
            .into(),
    )
}

fn optional_non_negative() -> Schema {
    nullable(quantity(0))
}

/// `POST /v1/batches`: the commands of one request.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to `--batch-items-max` (default 10,000) commands, answered in order.
    #[schema(min_items = 1)]
    pub commands: Vec<Command>,
    /// All commands commit or none does (the others are answered `atomic_rollback`).
    #[serde(default)]
    pub atomic: bool,
}

/// One command. Every command may carry `id` (a client command id: the idempotency key; a
/// retry with the same id gets the original answer, `replayed`) and `expected_version` (the
/// primary aggregate's version must equal it; 0: must not exist).
#[derive(Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Opens `account:<account>`.
    OpenAccount {
        #[schema(schema_with = name)]
        account: String,
        #[schema(schema_with = optional_non_negative)]
        overdraft_limit: Option<String>,
        #[schema(schema_with = optional_name)]
        id: Option<String>,
        #[schema(schema_with = optional_unsigned)]
        expected_version: Option<u64>,
    },
    Deposit {
        #[schema(schema_with = name)]
        account: String,
        #[schema(schema_with = positive)]
        amount: String,
        #[schema(schema_with = memo)]
        memo: Option<String>,
        #[schema(schema_with = optional_name)]
        id: Option<String>,
        #[schema(schema_with = optional_unsigned)]
        expected_version: Option<u64>,
    },
    Withdraw {
        #[schema(schema_with = name)]
        account: String,
        #[schema(schema_with = positive)]
        amount: String,
        #[schema(schema_with = memo)]
        memo: Option<String>,
        #[schema(schema_with = optional_name)]
        id: Option<String>,
        #[schema(schema_with = optional_unsigned)]
        expected_version: Option<u64>,
    },
    Transfer {
        #[schema(schema_with = name)]
        from: String,
        #[schema(schema_with = name)]
        to: String,
        #[schema(schema_with = positive)]
        amount: String,
        #[schema(schema_with = memo)]
        memo: Option<String>,
        #[schema(schema_with = optional_name)]
        id: Option<String>,
        #[schema(schema_with = optional_unsigned)]
        expected_version: Option<u64>,
    },
    CloseAccount {
        #[schema(schema_with = name)]
        account: String,
        #[schema(schema_with = optional_name)]
        id: Option<String>,
        #[schema(schema_with = optional_unsigned)]
        expected_version: Option<u64>,
    },
    CreateSku {
        #[schema(schema_with = name)]
        sku: String,
        #[schema(schema_with = non_negative)]
        on_hand: String,
        #[schema(schema_with = optional_name)]
        id: Option<String>,
        #[schema(schema_with = optional_unsigned)]
        expected_version: Option<u64>,
    },
    Restock {
        #[schema(schema_with = name)]
        sku: String,
        #[schema(schema_with = positive)]
        qty: String,
        #[schema(schema_with = optional_name)]
        id: Option<String>,
        #[schema(schema_with = optional_unsigned)]
        expected_version: Option<u64>,
    },
    Reserve {
        #[schema(schema_with = name)]
        sku: String,
        #[schema(schema_with = positive)]
        qty: String,
        #[schema(schema_with = name)]
        order: String,
        #[schema(schema_with = optional_name)]
        id: Option<String>,
        #[schema(schema_with = optional_unsigned)]
        expected_version: Option<u64>,
    },
    Release {
        #[schema(schema_with = name)]
        sku: String,
        #[schema(schema_with = name)]
        order: String,
        #[schema(schema_with = optional_name)]
        id: Option<String>,
        #[schema(schema_with = optional_unsigned)]
        expected_version: Option<u64>,
    },
    Ship {
        #[schema(schema_with = name)]
        sku: String,
        #[schema(schema_with = name)]
        order: String,
        #[schema(schema_with = optional_name)]
        id: Option<String>,
        #[schema(schema_with = optional_unsigned)]
        expected_version: Option<u64>,
    },
}

/// Every error answer: a stable `code` and a message for people.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable: e.g. `invalid_request`, `unauthorized`, `forbidden`, `not_found`, `overloaded`.
    pub code: String,
    pub message: String,
}

/// `GET /v1/aggregates/{id}`.
#[derive(Serialize, ToSchema)]
pub struct AggregateJson {
    /// `<kind>:<name>`, e.g. `account:alice`.
    pub id: String,
    /// `account` or `sku`.
    pub kind: String,
    /// Events applied to it so far.
    pub version: u64,
    pub state: AggregateState,
}

#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum AggregateState {
    Account(AccountState),
    Sku(SkuState),
}

#[derive(Serialize, ToSchema)]
pub struct AccountState {
    pub balance: i64,
    pub overdraft_limit: u64,
    pub closed: bool,
}

#[derive(Serialize, ToSchema)]
pub struct SkuState {
    pub on_hand: u64,
    pub reserved: u64,
    pub available: u64,
    /// Open reservations: order → quantity.
    pub reservations: BTreeMap<String, u64>,
}

/// One committed event, as `GET /v1/events`, `GET /v1/subscribe` and the JSON batch render it.
#[derive(Serialize, ToSchema)]
pub struct EventJson {
    /// The event's global sequence.
    pub seq: u64,
    /// The batch (one fsync) that holds it.
    pub batch: u64,
    /// RFC 3339, UTC, microseconds.
    pub committed_at: String,
    /// e.g. `account_opened`, `transferred`, `reserved`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The id of the command that made it, if it carried one.
    pub command_id: Option<String>,
    /// The aggregates it changed, primary first.
    pub aggregates: Vec<String>,
    /// The event's fields (docs/API.md lists them per type).
    pub data: BTreeMap<String, serde_json::Value>,
}

/// `GET /v1/events`.
#[derive(Serialize, ToSchema)]
pub struct EventsPage {
    pub events: Vec<EventJson>,
    /// Pass as `after` to read on.
    pub next_after: u64,
    /// The last committed event's sequence when the page was read.
    pub last_seq: u64,
}

/// `GET /v1/batches/{seq}` with `Accept: application/json`.
#[derive(Serialize, ToSchema)]
pub struct BatchJson {
    pub seq: u64,
    pub committed_at: String,
    pub first_event: u64,
    pub event_count: u32,
    pub rejection_count: u32,
    /// BLAKE3 of the rules the batch was decided under (hex).
    pub rule_set: String,
    /// The previous record's hash and this one's (hex): the hash chain.
    pub prev_hash: String,
    pub hash: String,
    /// The API key ids whose requests the batch holds ("who wrote this").
    pub submitters: Vec<String>,
    pub events: Vec<EventJson>,
    /// Commands rejected with an id: the answer their retries get.
    pub rejections: Vec<LoggedRejectionJson>,
}

#[derive(Serialize, ToSchema)]
pub struct LoggedRejectionJson {
    pub command_id: String,
    pub code: String,
    pub message: String,
}

/// `/healthz`, `/readyz`.
#[derive(Serialize, ToSchema)]
pub struct Status {
    /// `ok` or `ready`.
    pub status: String,
    /// `/readyz` only: commands waiting for the writer.
    pub queued_items: Option<u64>,
}

/// The query of `GET /v1/events`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// Events after this sequence (default 0).
    #[param(schema_with = unsigned)]
    pub after: Option<u64>,
    /// Most events returned, 1 to 10000 (default 100).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u64>,
}

/// The path of `GET /v1/aggregates/{id}`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AggregatePath {
    /// `<kind>:<name>`, e.g. `account:alice`.
    #[param(schema_with = aggregate_id)]
    pub id: String,
}

/// The path of `GET /v1/batches/{seq}`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct BatchPath {
    /// The batch sequence.
    #[param(schema_with = batch_seq)]
    pub seq: u64,
}

/// The query of `GET /v1/subscribe`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubscribeParams {
    /// Events after this sequence (default 0); a `Last-Event-ID` header takes precedence.
    #[param(schema_with = unsigned)]
    pub after: Option<u64>,
    /// Only events that change an aggregate of this kind (`account`, `sku`).
    pub kind: Option<String>,
    /// Only events that change this aggregate (`<kind>:<name>`).
    pub aggregate: Option<String>,
}

/// The query of `POST /v1/batches`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BatchQuery {
    /// `true`: decide every command against the committed state and answer exactly as a commit
    /// would, writing nothing (`dry_run: true` in the answer, `batch` null). Default `false`.
    pub dry_run: Option<bool>,
}

#[utoipa::path(
    post, path = "/v1/batches", tag = "write",
    params(BatchQuery),
    request_body(content = BatchRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Every command answered, in order, after the batch's fsync (a dry run's at once, nothing written)", body = crate::wire::BatchResponse),
        (status = 400, description = "The request is not a valid batch (`invalid_request`, `invalid_amount`, `invalid_name`, `empty_batch`, `too_many_items`, `malformed_body`, ...) or a bad query (`invalid_query`); nothing is committed", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the `write` scope", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "The body is over `--body-bytes-max`", body = ErrorBody),
        (status = 415, description = "Not `application/json`, or an encoded body", body = ErrorBody),
        (status = 503, description = "Overloaded or shutting down (`Retry-After`), or poisoned (restart)", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying with the same command ids"))),
    ),
    security(("api_key" = ["write"]))
)]
fn post_batches() {}

#[utoipa::path(
    get, path = "/v1/aggregates/{id}", tag = "read",
    params(AggregatePath),
    responses(
        (status = 200, description = "The aggregate's committed state", body = AggregateJson),
        (status = 400, description = "Not a `<kind>:<name>` id", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such aggregate", body = ErrorBody),
        (status = 503, description = "Too many reads at once, or a read timeout (`Retry-After`)", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
    ),
    security(("api_key" = ["read"]))
)]
fn get_aggregate() {}

#[utoipa::path(
    get, path = "/v1/events", tag = "read",
    params(EventsParams),
    responses(
        (status = 200, description = "Committed events after `after`, in order", body = EventsPage),
        (status = 400, description = "Bad query (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 503, description = "Too many reads at once, or a read timeout (`Retry-After`)", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
    ),
    security(("api_key" = ["read"]))
)]
fn get_events() {}

#[utoipa::path(
    get, path = "/v1/batches/{seq}", tag = "read",
    params(BatchPath),
    responses(
        (status = 200, description = "The committed batch: the binary batch message (docs/PROJECTION.md) by default, JSON with `Accept: application/json`",
            content(
                (Vec<u8> = "application/octet-stream"),
                (BatchJson = "application/json"),
            )),
        (status = 400, description = "Not a batch sequence", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "Not committed", body = ErrorBody),
        (status = 503, description = "Too many reads at once, or a read timeout (`Retry-After`)", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
    ),
    security(("api_key" = ["read"]))
)]
fn get_batch() {}

#[utoipa::path(
    get, path = "/v1/subscribe", tag = "read",
    params(SubscribeParams, ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event sequence")),
    responses(
        (status = 200, description = "Server-Sent Events: `id: <seq>`, `event: event`, `data: <an event as GET /v1/events renders it>`, each committed event after `after` exactly once, in order, only after its batch's fsync; a final `event: resume` with `{\"reason\", \"resume_after\"}` when the server ends the stream (too slow a reader, shutdown)",
            content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad query (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 503, description = "Too many subscribers (`Retry-After`)", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
    ),
    security(("api_key" = ["read"]))
)]
fn get_subscribe() {}

#[utoipa::path(
    get, path = "/v1/domains", tag = "read",
    description = "The domains loaded with `keel serve --domain` (docs/DOMAINS.md): their kinds with fields and invariants, their commands with parameters, targets and rejection codes, their laws, and `rule_set`, the BLAKE3 hash of the rules in force. A declared command is sent to POST /v1/batches with `\"type\": \"<domain>.<command>\"` (or the bare command name when no other domain or built-in type has it) and its parameters as fields; the `Command` schema of this document covers the built-in commands only.",
    responses(
        (status = 200, description = "The loaded domains", content_type = "application/json", body = Object),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
    ),
    security(("api_key" = ["read"]))
)]
fn get_domains() {}

#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope", body = ErrorBody),
    ),
    security(("api_key" = ["admin"]))
)]
fn get_metrics() {}

#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, description = "Alive", body = Status),
        (status = 503, description = "The write path is poisoned: restart", body = ErrorBody),
    ),
    security(())
)]
fn get_healthz() {}

#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Accepting writes", body = Status),
        (status = 503, description = "Poisoned, shutting down, or the queue is full", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
    ),
    security(())
)]
fn get_readyz() {}

#[utoipa::path(
    get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object)),
    security(())
)]
fn get_openapi() {}

#[cfg(test)]
mod tests {
    #[test]
    fn the_digit_pattern_admits_exactly_1_to_2_pow_63_minus_1() {
        let pattern = concat!("^(", digits_up_to_i64_max!(), ")$");
        assert!(
            !pattern.contains(' ') && !pattern.contains('\\'),
            "{pattern}"
        );
        let matches = |text: &str| {
            // The alternation, checked by hand: each branch is literal prefix, one class, then
            // a run of any digits.
            pattern
                .trim_start_matches("^(")
                .trim_end_matches(")$")
                .split('|')
                .any(|branch| branch_matches(branch, text))
        };
        for n in [
            1u64,
            9,
            10,
            999_999_999_999_999_999,
            1_000_000_000_000_000_000,
            i64::MAX as u64,
            i64::MAX as u64 - 1,
            9_223_372_036_854_775_799,
        ] {
            assert!(matches(&n.to_string()), "{n}");
        }
        for n in [
            0u64,
            i64::MAX as u64 + 1,
            9_223_372_036_854_775_810,
            9_300_000_000_000_000_000,
            u64::MAX,
        ] {
            assert!(!matches(&n.to_string()), "{n}");
        }
    }

    /// One branch like `92[0-1][0-9]{16}` or a literal.
    fn branch_matches(branch: &str, text: &str) -> bool {
        let Some(open) = branch.find('[') else {
            return branch == text;
        };
        let prefix = &branch[..open];
        let class = &branch[open + 1..open + 4];
        let (lo, hi) = (class.as_bytes()[0], class.as_bytes()[2]);
        let rest = &branch[open + 5..];
        let (min_rest, max_rest) = match rest.strip_prefix("[0-9]{") {
            Some(counts) => {
                let counts = counts.trim_end_matches('}');
                match counts.split_once(',') {
                    Some((a, b)) => (a.parse().unwrap_or(0), b.parse().unwrap_or(0)),
                    None => {
                        let n: usize = counts.parse().unwrap_or(0);
                        (n, n)
                    }
                }
            }
            None => (0, 0),
        };
        let Some(tail) = text.strip_prefix(prefix) else {
            return false;
        };
        let bytes = tail.as_bytes();
        !bytes.is_empty()
            && (lo..=hi).contains(&bytes[0])
            && (min_rest..=max_rest).contains(&(bytes.len() - 1))
            && bytes[1..].iter().all(u8::is_ascii_digit)
    }

    #[test]
    fn the_committed_document_is_the_one_the_code_makes() {
        let committed = include_str!("../../docs/openapi.json");
        assert!(
            committed == super::document(),
            "docs/openapi.json differs from the code's OpenAPI document: run `make openapi`"
        );
    }
}
