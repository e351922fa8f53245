//! The registry of domains: the enums the sequencer, engine records and audit speak, each
//! routing to the domain module that owns the variant.

use crate::declared::{DeclaredCommand, DeclaredEvent, DeclaredState};
use crate::domain::{
    AggregateId, Conservation, Domain, LawScope, RejectCode, Rejection, Targets, Violation,
};
use crate::inventory::{self, Inventory};
use crate::ledger::{self, Ledger};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Ledger(ledger::Command),
    Inventory(inventory::Command),
    /// A command of a domain loaded from a definition file (`keel serve --domain`).
    Declared(DeclaredCommand),
}

/// Never reorder or remove variants: the position is the stored encoding (docs/FORMAT.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Ledger(ledger::Event),
    Inventory(inventory::Event),
    Declared(Box<DeclaredEvent>),
}

/// Never reorder or remove variants: the position is the stored encoding (docs/FORMAT.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Account(ledger::Account),
    Sku(inventory::Sku),
    Declared(DeclaredState),
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
            Self::Declared(c) => declared_targets(&c.targets),
        }
    }
}

/// A declared command's or event's target list; never empty (the definition has at least one
/// target and the wire fills each), and a malformed stored event with none is refused by the
/// codec before it gets here.
fn declared_targets(ids: &[AggregateId]) -> Targets<'_> {
    static NONE: std::sync::OnceLock<AggregateId> = std::sync::OnceLock::new();
    Targets::list(ids)
        .unwrap_or_else(|| Targets::one(NONE.get_or_init(|| AggregateId::from_full(String::new()))))
}

impl Event {
    pub fn targets(&self) -> Targets<'_> {
        match self {
            Self::Ledger(e) => Ledger::event_targets(e),
            Self::Inventory(e) => Inventory::event_targets(e),
            Self::Declared(e) => declared_targets(&e.targets),
        }
    }

    /// The stable snake_case event type name (`transferred`, `reserved`, ...; a declared
    /// command's `event` name).
    pub fn type_name(&self) -> &str {
        match self {
            Self::Ledger(e) => e.type_name(),
            Self::Inventory(e) => e.type_name(),
            Self::Declared(e) => &e.event,
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
    let targets = envelope.command.targets();
    decide_at(
        envelope,
        |id| {
            if id == targets.primary {
                primary
            } else if Some(id) == targets.secondary {
                secondary
            } else {
                None
            }
        },
        0,
    )
}

/// Decides `envelope` at commit time `now_us` (µs since the Unix epoch; only declared domains
/// read it), with `lookup` giving the current aggregate of each target (`None` where absent).
pub fn decide_at<'a>(
    envelope: &Envelope,
    lookup: impl Fn(&AggregateId) -> Option<&'a Aggregate>,
    now_us: u64,
) -> Result<Event, Rejection> {
    let targets = envelope.command.targets();
    let primary = lookup(targets.primary);
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
        Command::Declared(c) => {
            let mut states = [None; crate::declared::TARGETS_MAX];
            for (slot, id) in states.iter_mut().zip(&c.targets) {
                *slot = lookup(id);
            }
            let states = &states[..c.targets.len().min(crate::declared::TARGETS_MAX)];
            return c
                .def
                .decide(&c.params, &c.targets, states, now_us)
                .map(|e| Event::Declared(Box::new(e)));
        }
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
                Some(id) => account(id, lookup(id))?,
                None => None,
            };
            Ledger::decide(c, p, s).map(Event::Ledger)
        }
        Command::Inventory(c) => {
            let p = sku(Inventory::targets(c).primary, primary)?;
            Inventory::decide(c, p, None).map(Event::Inventory)
        }
        Command::Declared(_) => unreachable!("declared commands returned above"),
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
                _ => None,
            });
            State::Account(Ledger::apply(e, target, prev))
        }
        Event::Inventory(e) => {
            let prev = previous.and_then(|a| match a.state {
                State::Sku(s) => Some(s),
                _ => None,
            });
            State::Sku(Inventory::apply(e, target, prev))
        }
        Event::Declared(e) => {
            let prev = previous.and_then(|a| match a.state {
                State::Declared(s) => Some(s),
                _ => None,
            });
            let effect = e
                .effects
                .get(target)
                .unwrap_or(&crate::declared::Effect::Read);
            State::Declared(effect.fold(prev))
        }
    };
    Aggregate { version, state }
}

/// Every invariant of the aggregate's built-in domain, for the audit and for assertions. A
/// declared aggregate's invariants are its definition's:
/// [`crate::declared::DomainSet::check_invariants`] checks both.
pub fn check_invariants(aggregate: &Aggregate) -> Result<(), Violation> {
    match &aggregate.state {
        State::Account(s) => Ledger::check(s),
        State::Sku(s) => Inventory::check(s),
        State::Declared(_) => Ok(()),
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
