//! The registry of domains: the enums the sequencer, engine records and audit speak, each
//! routing to the domain module that owns the variant.

use crate::domain::{
    AggregateId, Conservation, Domain, LawScope, RejectCode, Rejection, Targets, Violation,
};
use crate::inventory::{self, Inventory};
use crate::ledger::{self, Ledger};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Ledger(ledger::Command),
    Inventory(inventory::Command),
}

/// Never reorder or remove variants: the position is the stored encoding (docs/FORMAT.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Ledger(ledger::Event),
    Inventory(inventory::Event),
}

/// Never reorder or remove variants: the position is the stored encoding (docs/FORMAT.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Account(ledger::Account),
    Sku(inventory::Sku),
}

/// An aggregate's state and version. Version 0 means "does not exist"; every event that touches
/// an aggregate adds one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregate {
    pub version: u64,
    pub state: State,
}

/// A command as submitted: the command, its optional client command id (idempotency key) and
/// its optional expected version of the primary aggregate (optimistic concurrency).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub id: Option<String>,
    pub expected_version: Option<u64>,
    pub command: Command,
}

/// What the committed log stores for one event: the event and the command id that caused it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedEvent {
    pub command_id: Option<String>,
    pub event: Event,
}

/// What the committed log keeps for a command rejected with an id (format 2): the answer a
/// retry with the same id must get, so that the log alone rebuilds the command-id index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedRejection {
    pub command_id: String,
    pub rejection: Rejection,
}

/// What happened to a command that carried an id: the answer a retry with the same id gets.
/// Never reorder or remove variants: the position is the stored encoding (docs/FORMAT.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    Committed { seq: u64 },
    Rejected(Rejection),
}

impl Command {
    pub fn targets(&self) -> Targets<'_> {
        match self {
            Self::Ledger(c) => Ledger::targets(c),
            Self::Inventory(c) => Inventory::targets(c),
        }
    }
}

impl Event {
    pub fn targets(&self) -> Targets<'_> {
        match self {
            Self::Ledger(e) => Ledger::event_targets(e),
            Self::Inventory(e) => Inventory::event_targets(e),
        }
    }

    /// The stable snake_case event type name (`transferred`, `reserved`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Ledger(e) => e.type_name(),
            Self::Inventory(e) => e.type_name(),
        }
    }
}

/// Decides `envelope` against the current aggregates it targets (`None` where absent).
///
/// Checks `expected_version` against the primary aggregate first (absent = version 0), then
/// lets the owning domain decide.
pub fn decide(
    envelope: &Envelope,
    primary: Option<&Aggregate>,
    secondary: Option<&Aggregate>,
) -> Result<Event, Rejection> {
    if let Some(expected) = envelope.expected_version {
        let found = primary.map_or(0, |a| a.version);
        if found != expected {
            let id = envelope.command.targets().primary;
            return Err(Rejection::new(
                RejectCode::VersionConflict,
                format!("{id} is at version {found}, expected {expected}"),
            ));
        }
    }
    let kind = match &envelope.command {
        Command::Ledger(_) => ledger::KIND,
        Command::Inventory(_) => inventory::KIND,
    };
    if let Some(id) = envelope
        .command
        .targets()
        .iter()
        .find(|id| id.kind() != kind)
    {
        return Err(Rejection::new(
            RejectCode::WrongKind,
            format!("{id} is not a `{kind}` aggregate id"),
        ));
    }
    match &envelope.command {
        Command::Ledger(c) => {
            let targets = Ledger::targets(c);
            let p = account(targets.primary, primary)?;
            let s = match targets.secondary {
                Some(id) => account(id, secondary)?,
                None => None,
            };
            Ledger::decide(c, p, s).map(Event::Ledger)
        }
        Command::Inventory(c) => {
            let p = sku(Inventory::targets(c).primary, primary)?;
            Inventory::decide(c, p, None).map(Event::Inventory)
        }
    }
}

/// Folds `event` into its target number `target` (0 = primary), adding one to the version.
/// Cannot fail: a state of the wrong kind (possible only in a corrupt store) is replaced, and the
/// audit's comparison reports it.
pub fn apply(event: &Event, target: usize, previous: Option<Aggregate>) -> Aggregate {
    let version = previous.as_ref().map_or(0, |a| a.version) + 1;
    let state = match event {
        Event::Ledger(e) => {
            let prev = previous.and_then(|a| match a.state {
                State::Account(s) => Some(s),
                State::Sku(_) => None,
            });
            State::Account(Ledger::apply(e, target, prev))
        }
        Event::Inventory(e) => {
            let prev = previous.and_then(|a| match a.state {
                State::Sku(s) => Some(s),
                State::Account(_) => None,
            });
            State::Sku(Inventory::apply(e, target, prev))
        }
    };
    Aggregate { version, state }
}

/// Every invariant of the aggregate's domain, for the audit and for assertions.
pub fn check_invariants(aggregate: &Aggregate) -> Result<(), Violation> {
    match &aggregate.state {
        State::Account(s) => Ledger::check(s),
        State::Sku(s) => Inventory::check(s),
    }
}

fn account<'a>(
    id: &AggregateId,
    aggregate: Option<&'a Aggregate>,
) -> Result<Option<&'a ledger::Account>, Rejection> {
    match aggregate.map(|a| &a.state) {
        None => Ok(None),
        Some(State::Account(s)) => Ok(Some(s)),
        Some(_) => Err(wrong_kind(id)),
    }
}

fn sku<'a>(
    id: &AggregateId,
    aggregate: Option<&'a Aggregate>,
) -> Result<Option<&'a inventory::Sku>, Rejection> {
    match aggregate.map(|a| &a.state) {
        None => Ok(None),
        Some(State::Sku(s)) => Ok(Some(s)),
        Some(_) => Err(wrong_kind(id)),
    }
}

fn wrong_kind(id: &AggregateId) -> Rejection {
    Rejection::new(
        RejectCode::WrongKind,
        format!("{id} holds an aggregate of another kind"),
    )
}

/// A conservation law of a registered domain (see [`Conservation`]), routed like the other
/// registry types: `flow` and `quantity` answer `None` for events and states of other domains.
#[derive(Clone, Copy)]
pub enum Law {
    Ledger(&'static Conservation<ledger::Event, ledger::Account>),
    Inventory(&'static Conservation<inventory::Event, inventory::Sku>),
}

impl Law {
    pub fn name(self) -> &'static str {
        match self {
            Law::Ledger(law) => law.name,
            Law::Inventory(law) => law.name,
        }
    }

    pub fn statement(self) -> &'static str {
        match self {
            Law::Ledger(law) => law.statement,
            Law::Inventory(law) => law.statement,
        }
    }

    pub fn scope(self) -> LawScope {
        match self {
            Law::Ledger(law) => law.scope,
            Law::Inventory(law) => law.scope,
        }
    }

    /// How much `event` moves the quantity of its target number `target`, when the event
    /// belongs to this law's domain.
    pub fn flow(self, event: &Event, target: usize) -> Option<i128> {
        match (self, event) {
            (Law::Ledger(law), Event::Ledger(e)) => Some((law.flow)(e, target)),
            (Law::Inventory(law), Event::Inventory(e)) => Some((law.flow)(e, target)),
            _ => None,
        }
    }

    /// The quantity `state` holds, when the state belongs to this law's domain.
    pub fn quantity(self, state: &State) -> Option<i128> {
        match (self, state) {
            (Law::Ledger(law), State::Account(s)) => Some((law.quantity)(s)),
            (Law::Inventory(law), State::Sku(s)) => Some((law.quantity)(s)),
            _ => None,
        }
    }
}

impl std::fmt::Debug for Law {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Every conservation law of every registered domain, in a stable order.
pub fn conservation_laws() -> Vec<Law> {
    let ledger = Ledger::conservation().iter().map(Law::Ledger);
    let inventory = Inventory::conservation().iter().map(Law::Inventory);
    ledger.chain(inventory).collect()
}
