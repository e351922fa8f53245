//! The domain API every domain implements, and the values it speaks in.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use std::fmt;

/// An aggregate's id, `<kind>:<name>` (`account:alice`, `sku:A-17`).
///
/// The kind prefix is part of the id so that one key space holds every domain's aggregates and a
/// command can never address an aggregate of the wrong kind.
///
/// Held inline up to 24 bytes (a heap pointer beyond): the writer's maps compare ids on every
/// lookup, and an inline id is compared where the map slot already is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AggregateId(CompactString);

impl AggregateId {
    /// Builds `<kind>:<name>`. The caller validated `name`; `kind` is a domain constant.
    pub fn new(kind: &str, name: &str) -> Self {
        let mut id = CompactString::with_capacity(kind.len() + 1 + name.len());
        id.push_str(kind);
        id.push(':');
        id.push_str(name);
        Self(id)
    }

    /// Wraps an id that already has the `<kind>:<name>` form (read back from storage or a URL).
    pub fn from_full(id: String) -> Self {
        Self(CompactString::from(id))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The part before the first `:`.
    pub fn kind(&self) -> &str {
        self.0.split_once(':').map_or("", |(kind, _)| kind)
    }

    /// The part after the first `:`.
    pub fn name(&self) -> &str {
        self.0
            .split_once(':')
            .map_or(self.as_str(), |(_, name)| name)
    }
}

impl fmt::Display for AggregateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The aggregates one command touches: a primary one (where `expected_version` applies), then
/// any number more (the built-in domains touch at most two; a declared command up to
/// [`crate::declared::TARGETS_MAX`]). Borrowed from the command, so asking costs no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Targets<'a> {
    pub primary: &'a AggregateId,
    pub secondary: Option<&'a AggregateId>,
    /// The targets after the second, in order (empty for the built-in domains).
    pub rest: &'a [AggregateId],
}

impl<'a> Targets<'a> {
    pub fn one(primary: &'a AggregateId) -> Self {
        Self {
            primary,
            secondary: None,
            rest: &[],
        }
    }

    pub fn two(primary: &'a AggregateId, secondary: &'a AggregateId) -> Self {
        Self {
            primary,
            secondary: Some(secondary),
            rest: &[],
        }
    }

    /// The targets of a non-empty list, in order; `None` when `ids` is empty.
    pub fn list(ids: &'a [AggregateId]) -> Option<Self> {
        let (primary, more) = ids.split_first()?;
        let (secondary, rest) = match more.split_first() {
            Some((second, rest)) => (Some(second), rest),
            None => (None, &[][..]),
        };
        Some(Self {
            primary,
            secondary,
            rest,
        })
    }

    pub fn iter(self) -> impl Iterator<Item = &'a AggregateId> {
        std::iter::once(self.primary)
            .chain(self.secondary)
            .chain(self.rest.iter())
    }

    pub fn len(self) -> usize {
        1 + usize::from(self.secondary.is_some()) + self.rest.len()
    }

    /// Never true: a command targets at least its primary aggregate.
    pub fn is_empty(self) -> bool {
        false
    }
}

/// Why a command was refused. The code is stable API; the message is for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub code: RejectCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Every rejection code Keel can answer. Never renumber or rename: codes are stored in the
/// command-id index and sent to clients. The built-in codes are variants; a declared domain's
/// own codes (its definition file names them) are [`RejectCode::Rule`], appended last so that
/// the stored encoding of every built-in code is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectCode {
    /// `expected_version` did not match the primary aggregate's version.
    VersionConflict,
    /// The item was valid, but another item of the same atomic request was rejected.
    AtomicRollback,
    /// An amount or quantity was zero (the edge rejects these too; the domain does not trust it).
    InvalidAmount,
    /// Arithmetic would leave the representable range.
    Overflow,
    /// The aggregate id names an aggregate of another kind (a corrupt or hostile store).
    WrongKind,
    AccountExists,
    AccountNotFound,
    AccountClosed,
    InsufficientFunds,
    SameAccount,
    BalanceNotZero,
    SkuExists,
    SkuNotFound,
    InsufficientStock,
    ReservationExists,
    ReservationNotFound,
    /// A code a declared domain defines (`hold_exists`, `overbooked`): a precondition, an
    /// invariant or a target's existence rule of its definition file refused the command.
    Rule(String),
}

impl RejectCode {
    /// The codes every domain may answer with (the rest of [`RejectCode::ALL`] belong to the
    /// built-in domains, each listing its own through [`crate::DomainRules::reject_codes`]).
    pub const CORE: [RejectCode; 4] = [
        Self::VersionConflict,
        Self::AtomicRollback,
        Self::Overflow,
        Self::WrongKind,
    ];

    pub const ALL: [RejectCode; 16] = [
        Self::VersionConflict,
        Self::AtomicRollback,
        Self::InvalidAmount,
        Self::Overflow,
        Self::WrongKind,
        Self::AccountExists,
        Self::AccountNotFound,
        Self::AccountClosed,
        Self::InsufficientFunds,
        Self::SameAccount,
        Self::BalanceNotZero,
        Self::SkuExists,
        Self::SkuNotFound,
        Self::InsufficientStock,
        Self::ReservationExists,
        Self::ReservationNotFound,
    ];

    /// The stable snake_case code sent on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Rule(code) => code,
            builtin => builtin.builtin_name(),
        }
    }

    /// The code as an owned-or-static string, without allocating for a built-in code.
    pub fn to_cow(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Self::Rule(code) => std::borrow::Cow::Owned(code.clone()),
            builtin => std::borrow::Cow::Borrowed(builtin.builtin_name()),
        }
    }

    fn builtin_name(&self) -> &'static str {
        match self {
            Self::Rule(_) => "rule",
            Self::VersionConflict => "version_conflict",
            Self::AtomicRollback => "atomic_rollback",
            Self::InvalidAmount => "invalid_amount",
            Self::Overflow => "overflow",
            Self::WrongKind => "wrong_kind",
            Self::AccountExists => "account_exists",
            Self::AccountNotFound => "account_not_found",
            Self::AccountClosed => "account_closed",
            Self::InsufficientFunds => "insufficient_funds",
            Self::SameAccount => "same_account",
            Self::BalanceNotZero => "balance_not_zero",
            Self::SkuExists => "sku_exists",
            Self::SkuNotFound => "sku_not_found",
            Self::InsufficientStock => "insufficient_stock",
            Self::ReservationExists => "reservation_exists",
            Self::ReservationNotFound => "reservation_not_found",
        }
    }

    /// Position in [`RejectCode::ALL`], for per-code counters kept in a fixed array; a declared
    /// domain's code counts at `ALL.len()` (one bucket for every declared code).
    pub fn index(&self) -> usize {
        Self::ALL
            .iter()
            .position(|c| c == self)
            .unwrap_or(Self::ALL.len())
    }
}

/// A broken invariant found in a stored or replayed state (the audit's finding, never a
/// decision outcome: decisions reject before an invariant can break).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: std::borrow::Cow<'static, str>,
    pub detail: String,
}

/// Where a [`Conservation`] law is summed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LawScope {
    /// Over all aggregates of the domain together (the ledger's money).
    Total,
    /// For each aggregate on its own (an SKU's stock).
    PerAggregate,
}

impl LawScope {
    pub fn as_str(self) -> &'static str {
        match self {
            LawScope::Total => "total",
            LawScope::PerAggregate => "per_aggregate",
        }
    }
}

/// A conservation law a domain declares for the audit: a quantity read from the aggregates'
/// states equals the sum of the flows their events imply.
///
/// The flows are computed straight from the events' fields, not through [`Domain::apply`], so
/// the law is a second, independent derivation of the state: a bug in `apply`, or a stored
/// state edited consistently with its version, breaks it. Quantities are `i128` so that both
/// signed balances and unsigned stock sum without overflow.
pub struct Conservation<E: 'static, S: 'static> {
    /// Stable short name for reports (`ledger.money`).
    pub name: &'static str,
    /// The law in words, for people reading a report.
    pub statement: &'static str,
    pub scope: LawScope,
    /// How much `event` moves the quantity of its target number `target` (0 = primary).
    pub flow: fn(&E, usize) -> i128,
    /// The quantity as a state holds it.
    pub quantity: fn(&S) -> i128,
}

/// A domain: its commands, the events they produce, the state of its aggregates, and its rules.
///
/// `decide` sees the current state of every aggregate the command targets (in [`Targets`]
/// order, `None` where it does not exist) and returns one event or a rejection. `apply` folds
/// one event into one target's state and cannot fail: everything that could go wrong was
/// refused in `decide`. `check` states the invariants so the audit can prove them, and
/// `conservation` the laws that tie the states to the flows of their events.
pub trait Domain {
    type Command;
    type Event: 'static;
    type State: 'static;

    fn targets(command: &Self::Command) -> Targets<'_>;
    fn decide(
        command: &Self::Command,
        primary: Option<&Self::State>,
        secondary: Option<&Self::State>,
    ) -> Result<Self::Event, Rejection>;
    fn event_targets(event: &Self::Event) -> Targets<'_>;
    /// Folds `event` into the state of its target number `target` (0 = primary). Takes the
    /// state by value so that large states (an SKU's open reservations) are not cloned.
    fn apply(event: &Self::Event, target: usize, state: Option<Self::State>) -> Self::State;
    fn check(state: &Self::State) -> Result<(), Violation>;
    /// The conservation laws the audit proves over the whole log (none unless declared).
    fn conservation() -> &'static [Conservation<Self::Event, Self::State>] {
        &[]
    }
}
