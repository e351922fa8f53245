//! The domain registry: open command, event and state values, and the object-safe interfaces
//! every domain implements behind them.
//!
//! [`Command`], [`Event`] and [`State`] are not enums of every domain: each holds one domain's
//! own value behind a trait object ([`CommandBody`], [`EventBody`], [`StateBody`]), which knows
//! its targets, how it is decided or folded and how it is stored. A domain is Rust types that
//! implement those three traits plus one [`DomainRules`] value (its name, aggregate kinds,
//! command types, rejection codes, invariants and conservation laws), registered by aggregate
//! kind in [`crate::declared::DomainSet`], the registry the writer, the audit, the projector
//! and the wire are given. The built-in ledger and inventory are two such domains; every
//! domain loaded from a definition file is another ([`crate::declared::DomainDef`]).
//!
//! The stored encoding of an event or a state is its domain's stored tag (a varint) followed by
//! the domain's own postcard encoding of the value: byte for byte what the enums this replaced
//! wrote (docs/FORMAT.md; `tests/codec_golden.rs` pins it). Tags are never reused: ledger 0,
//! inventory 1, every declared domain 2 (a declared event or state names its domain inside).

use crate::codec::DecodeError;
use crate::declared::{DeclaredCommand, DeclaredEvent, DeclaredState};
use crate::domain::{
    AggregateId, Conservation, Domain, LawScope, RejectCode, Rejection, Targets, Violation,
};
use crate::inventory::{self, Inventory};
use crate::ledger::{self, Ledger};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::any::Any;
use std::fmt;

/// What every value behind a registry trait object needs: to be printed, compared with another
/// value of any domain, and downcast to its domain's own type. Implemented for every type that
/// is `Debug + PartialEq`.
pub trait Body: Any + Send + Sync + fmt::Debug {
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
    /// Equal to `other` (false when `other` is of another type).
    fn same_as(&self, other: &dyn Any) -> bool;
}

impl<T: Any + Send + Sync + fmt::Debug + PartialEq> Body for T {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }

    fn same_as(&self, other: &dyn Any) -> bool {
        other.downcast_ref::<T>() == Some(self)
    }
}

/// A domain's command: what it targets and how it is decided.
pub trait CommandBody: Body {
    /// The aggregates it touches, primary first.
    fn targets(&self) -> Targets<'_>;
    /// Decides the command given the current aggregate of each target (`lookup`, `None` where
    /// absent) at commit time `now_us` (µs since the Unix epoch). `expected_version` was
    /// checked before; everything else, a target of the wrong kind included, is the domain's.
    fn decide<'a>(
        &self,
        lookup: &dyn Fn(&AggregateId) -> Option<&'a Aggregate>,
        now_us: u64,
    ) -> Result<Event, Rejection>;
    fn clone_body(&self) -> Box<dyn CommandBody>;
}

/// A domain's event: what it touched, its stable type name, how it folds into each target and
/// how it is stored.
pub trait EventBody: Body {
    /// The stored tag of the domain (see the module doc).
    fn tag(&self) -> u32;
    fn targets(&self) -> Targets<'_>;
    /// The stable snake_case event type name.
    fn type_name(&self) -> &str;
    /// The state of target number `target` (0 = primary) after this event. Cannot fail:
    /// everything that could go wrong was refused when it was decided, and a `previous` state
    /// of another domain (a corrupt store) is replaced, which the audit's comparison reports.
    fn apply(&self, target: usize, previous: Option<State>) -> State;
    /// Appends the domain's own encoding (after the tag).
    fn encode(&self, out: &mut Vec<u8>);
    fn clone_body(&self) -> Box<dyn EventBody>;
}

/// A domain's aggregate state: the invariants it proves on its own and how it is stored.
pub trait StateBody: Body {
    /// The stored tag of the domain (see the module doc).
    fn tag(&self) -> u32;
    /// The invariants the state proves without its definition (a built-in domain's; a declared
    /// state's invariants are its kind's, checked by [`DomainRules::check`]).
    fn check(&self) -> Result<(), Violation>;
    /// Appends the domain's own encoding (after the tag).
    fn encode(&self, out: &mut Vec<u8>);
    fn clone_body(&self) -> Box<dyn StateBody>;
    /// Copies itself into `target` in place when `target` is of its own type (no allocation:
    /// the overlay and checkpoints copy thousands of states per batch); false otherwise.
    fn clone_into_body(&self, target: &mut dyn StateBody) -> bool;
}

/// One domain as the registry knows it. Object-safe: the registry holds `Arc<dyn DomainRules>`
/// keyed by aggregate kind.
pub trait DomainRules: Send + Sync + fmt::Debug {
    /// The domain's name (`ledger`, `seats`).
    fn name(&self) -> &str;
    /// The aggregate kinds it owns (the `<kind>` of `<kind>:<name>`).
    fn kinds(&self) -> Vec<&str>;
    /// The command types it answers to, unqualified.
    fn command_types(&self) -> Vec<&str>;
    /// Its own rejection codes, stable and sorted (the core codes, [`RejectCode::CORE`], are
    /// every domain's).
    fn reject_codes(&self) -> Vec<String>;
    /// Every invariant of `state`, stored under `id` (one of this domain's kinds).
    fn check(&self, id: &AggregateId, state: &State) -> Result<(), Violation>;
    /// The conservation laws the audit proves for it over the whole log. A declared domain's
    /// laws are versioned with its definition and proven by the audit from the rules text.
    fn laws(&self) -> Vec<Law> {
        Vec::new()
    }
}

/// A command of any domain.
pub struct Command(Box<dyn CommandBody>);

/// An event of any domain.
pub struct Event(Box<dyn EventBody>);

/// An aggregate state of any domain.
pub struct State(Box<dyn StateBody>);

macro_rules! open_value {
    ($outer:ident, $body:ident) => {
        impl $outer {
            pub fn new(body: impl $body) -> Self {
                Self(Box::new(body))
            }

            pub fn body(&self) -> &dyn $body {
                &*self.0
            }

            /// The domain's own value, when it is a `T`.
            pub fn downcast_ref<T: Any>(&self) -> Option<&T> {
                (*self.0).as_any().downcast_ref()
            }

            /// The domain's own value, when it is a `T`.
            pub fn downcast_mut<T: Any>(&mut self) -> Option<&mut T> {
                (*self.0).as_any_mut().downcast_mut()
            }

            /// The domain's own value, when it is a `T`; else `self` back.
            pub fn downcast<T: Any>(self) -> Result<T, Self> {
                self.downcast_box().map(|value| *value)
            }

            /// The domain's own value in its box (no allocation), when it is a `T`; else
            /// `self` back.
            pub fn downcast_box<T: Any>(self) -> Result<Box<T>, Self> {
                if (*self.0).as_any().is::<T>() {
                    match self.0.into_any().downcast::<T>() {
                        Ok(value) => Ok(value),
                        Err(_) => unreachable!("checked by is::<T>()"),
                    }
                } else {
                    Err(self)
                }
            }
        }

        impl PartialEq for $outer {
            fn eq(&self, other: &Self) -> bool {
                self.0.same_as((*other.0).as_any())
            }
        }

        impl Eq for $outer {}

        impl fmt::Debug for $outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

open_value!(Command, CommandBody);
open_value!(Event, EventBody);
open_value!(State, StateBody);

impl Clone for Command {
    fn clone(&self) -> Self {
        Self(self.0.clone_body())
    }
}

impl Clone for Event {
    fn clone(&self) -> Self {
        Self(self.0.clone_body())
    }
}

impl Clone for State {
    fn clone(&self) -> Self {
        Self(self.0.clone_body())
    }

    fn clone_from(&mut self, source: &Self) {
        if !source.0.clone_into_body(&mut *self.0) {
            *self = source.clone();
        }
    }
}

/// Copies `source` into `target` in place when `target` holds a `T`.
fn clone_into_same<T: Clone + Any>(source: &T, target: &mut dyn StateBody) -> bool {
    match target.as_any_mut().downcast_mut::<T>() {
        Some(target) => {
            target.clone_from(source);
            true
        }
        None => false,
    }
}

impl Command {
    pub fn targets(&self) -> Targets<'_> {
        self.0.targets()
    }
}

impl Event {
    pub fn targets(&self) -> Targets<'_> {
        self.0.targets()
    }

    /// The stable snake_case event type name (`transferred`, `reserved`, ...; a declared
    /// command's `event` name).
    pub fn type_name(&self) -> &str {
        self.0.type_name()
    }

    pub fn tag(&self) -> u32 {
        self.0.tag()
    }
}

impl State {
    pub fn tag(&self) -> u32 {
        self.0.tag()
    }

    /// A stand-in that holds a slot while its state is moved out (allocates nothing). It is
    /// of no domain: it must be overwritten before anything reads or stores the slot.
    pub fn vacant() -> Self {
        State(Box::new(Vacant))
    }
}

/// See [`State::vacant`].
#[derive(Debug, PartialEq)]
struct Vacant;

impl StateBody for Vacant {
    fn tag(&self) -> u32 {
        u32::MAX
    }

    fn check(&self) -> Result<(), Violation> {
        Err(Violation {
            invariant: "a state of a domain".into(),
            detail: "a vacant slot was read".to_string(),
        })
    }

    fn encode(&self, _out: &mut Vec<u8>) {
        unreachable!("a vacant slot is overwritten before it is stored")
    }

    fn clone_body(&self) -> Box<dyn StateBody> {
        Box::new(Vacant)
    }

    fn clone_into_body(&self, target: &mut dyn StateBody) -> bool {
        target.as_any().is::<Vacant>()
    }
}

/// An aggregate's state and version. Version 0 means "does not exist"; every event that touches
/// an aggregate adds one.
#[derive(Debug, PartialEq, Eq)]
pub struct Aggregate {
    pub version: u64,
    pub state: State,
}

impl Clone for Aggregate {
    fn clone(&self) -> Self {
        Self {
            version: self.version,
            state: self.state.clone(),
        }
    }

    fn clone_from(&mut self, source: &Self) {
        self.version = source.version;
        self.state.clone_from(&source.state);
    }
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedEvent {
    pub command_id: Option<String>,
    pub event: Event,
}

/// What the committed log keeps for a command rejected with an id (format 2): the answer a
/// retry with the same id must get, so that the log alone rebuilds the command-id index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LoggedRejection {
    pub command_id: String,
    pub rejection: Rejection,
}

/// What happened to a command that carried an id: the answer a retry with the same id gets.
/// Never reorder or remove variants: the position is the stored encoding (docs/FORMAT.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum CommandOutcome {
    Committed { seq: u64 },
    Rejected(Rejection),
}

/// Decides `envelope` against the current aggregates it targets (`None` where absent).
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
///
/// Checks `expected_version` against the primary aggregate first (absent = version 0), then
/// lets the command's domain decide.
pub fn decide_at<'a>(
    envelope: &Envelope,
    lookup: impl Fn(&AggregateId) -> Option<&'a Aggregate>,
    now_us: u64,
) -> Result<Event, Rejection> {
    if let Some(expected) = envelope.expected_version {
        let id = envelope.command.targets().primary;
        let found = lookup(id).map_or(0, |a| a.version);
        if found != expected {
            return Err(Rejection::new(
                RejectCode::VersionConflict,
                format!("{id} is at version {found}, expected {expected}"),
            ));
        }
    }
    envelope.command.0.decide(&lookup, now_us)
}

/// Folds `event` into its target number `target` (0 = primary), adding one to the version.
pub fn apply(event: &Event, target: usize, previous: Option<Aggregate>) -> Aggregate {
    let (version, state) = match previous {
        Some(a) => (a.version + 1, Some(a.state)),
        None => (1, None),
    };
    Aggregate {
        version,
        state: event.0.apply(target, state),
    }
}

/// The invariants the aggregate's state proves on its own (every invariant of a built-in
/// domain). A declared aggregate's invariants are its definition's:
/// [`crate::declared::DomainSet::check_invariants`] checks every domain's, routed by kind.
pub fn check_invariants(aggregate: &Aggregate) -> Result<(), Violation> {
    aggregate.state.0.check()
}

// ---------------------------------------------------------------------------------------------
// The stored encoding.

/// The stored tags of the domains, in the order the enums this registry replaced declared them.
pub const LEDGER_TAG: u32 = 0;
pub const INVENTORY_TAG: u32 = 1;
pub const DECLARED_TAG: u32 = 2;

type Decode<T> = fn(&[u8]) -> Result<(T, &[u8]), DecodeError>;

/// How the values of one stored tag decode.
struct Decoder {
    event: Decode<Event>,
    state: Decode<State>,
}

fn take<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, &[u8]), DecodeError> {
    postcard::take_from_bytes(bytes).map_err(|e| DecodeError(e.to_string()))
}

fn decode_event_as<E: EventBody + DeserializeOwned>(
    bytes: &[u8],
) -> Result<(Event, &[u8]), DecodeError> {
    take::<E>(bytes).map(|(e, rest)| (Event::new(e), rest))
}

fn decode_state_as<S: StateBody + DeserializeOwned>(
    bytes: &[u8],
) -> Result<(State, &[u8]), DecodeError> {
    take::<S>(bytes).map(|(s, rest)| (State::new(s), rest))
}

/// The decoders by stored tag: a tag's position here is its number.
static DECODERS: [Decoder; 3] = [
    Decoder {
        event: decode_event_as::<ledger::Event>,
        state: decode_state_as::<ledger::Account>,
    },
    Decoder {
        event: decode_event_as::<inventory::Event>,
        state: decode_state_as::<inventory::Sku>,
    },
    Decoder {
        event: decode_event_as::<DeclaredEvent>,
        state: decode_state_as::<DeclaredState>,
    },
];

fn decoder(bytes: &[u8]) -> Result<(&'static Decoder, &[u8]), DecodeError> {
    let (tag, rest) = take::<u32>(bytes)?;
    let decoder = usize::try_from(tag)
        .ok()
        .and_then(|t| DECODERS.get(t))
        .ok_or_else(|| DecodeError(format!("unknown domain tag {tag}")))?;
    Ok((decoder, rest))
}

/// Appends `value`'s postcard encoding. Serializing these types into a Vec cannot fail: no map
/// with non-string keys, no unsupported types, and a Vec grows as needed.
pub(crate) fn encode_postcard<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    let result = postcard::to_io(value, &mut *out);
    assert!(
        result.is_ok(),
        "postcard encoding into a Vec failed: {result:?}"
    );
}

impl Event {
    /// Appends the stored encoding: the tag, then the domain's encoding.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        encode_postcard(&self.0.tag(), out);
        self.0.encode(out);
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<(Self, &[u8]), DecodeError> {
        let (decoder, rest) = decoder(bytes)?;
        (decoder.event)(rest)
    }
}

impl State {
    /// Appends the stored encoding: the tag, then the domain's encoding.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        encode_postcard(&self.0.tag(), out);
        self.0.encode(out);
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<(Self, &[u8]), DecodeError> {
        let (decoder, rest) = decoder(bytes)?;
        (decoder.state)(rest)
    }
}

impl LoggedEvent {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        Self::encode_parts(self.command_id.as_deref(), &self.event, out);
    }

    /// postcard writes `Option<&str>` exactly as `Option<String>`.
    pub(crate) fn encode_parts(command_id: Option<&str>, event: &Event, out: &mut Vec<u8>) {
        encode_postcard(&command_id, out);
        event.encode(out);
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<(Self, &[u8]), DecodeError> {
        let (command_id, rest) = take::<Option<String>>(bytes)?;
        let (event, rest) = Event::decode(rest)?;
        Ok((Self { command_id, event }, rest))
    }
}

impl Aggregate {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        encode_postcard(&self.version, out);
        self.state.encode(out);
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<(Self, &[u8]), DecodeError> {
        let (version, rest) = take::<u64>(bytes)?;
        let (state, rest) = State::decode(rest)?;
        Ok((Self { version, state }, rest))
    }
}

// ---------------------------------------------------------------------------------------------
// The built-in domains behind the registry: a typed [`Domain`] implementation, adapted.

/// A built-in domain: a typed [`Domain`] with its stored tag, aggregate kind and rules.
pub trait Builtin:
    Domain<Command: CommandBody, Event: EventBody + Clone, State: StateBody + Clone + Default>
    + Sized
    + 'static
{
    const NAME: &'static str;
    const KIND: &'static str;
    const TAG: u32;
    const COMMANDS: &'static [&'static str];
    /// Its own rejection codes.
    const CODES: &'static [RejectCode];
    /// The one value of the domain, for the registry.
    const RULES: &'static dyn DomainRules;
}

/// Decides a built-in command: every target must be of the domain's kind and hold the
/// domain's state (or be absent), then the typed `decide` runs on the first two.
fn decide_builtin<'a, D: Builtin>(
    command: &D::Command,
    lookup: &dyn Fn(&AggregateId) -> Option<&'a Aggregate>,
) -> Result<Event, Rejection> {
    let targets = D::targets(command);
    if let Some(id) = targets.iter().find(|id| id.kind() != D::KIND) {
        return Err(Rejection::new(
            RejectCode::WrongKind,
            format!("{id} is not a `{}` aggregate id", D::KIND),
        ));
    }
    let state = |id: &AggregateId| -> Result<Option<&'a D::State>, Rejection> {
        match lookup(id) {
            None => Ok(None),
            Some(a) => a.state.downcast_ref::<D::State>().map(Some).ok_or_else(|| {
                Rejection::new(
                    RejectCode::WrongKind,
                    format!("{id} holds an aggregate of another kind"),
                )
            }),
        }
    };
    let primary = state(targets.primary)?;
    let secondary = match targets.secondary {
        Some(id) => state(id)?,
        None => None,
    };
    D::decide(command, primary, secondary).map(Event::new)
}

fn apply_builtin<D: Builtin>(event: &D::Event, target: usize, previous: Option<State>) -> State {
    // Fold in the state's own box: an event applied to a cached aggregate allocates nothing.
    match previous.and_then(|s| s.downcast_box::<D::State>().ok()) {
        Some(mut state) => {
            let before = std::mem::take(&mut *state);
            *state = D::apply(event, target, Some(before));
            State(state)
        }
        None => State::new(D::apply(event, target, None)),
    }
}

/// The registry value of a built-in domain.
pub struct BuiltinRules<D>(std::marker::PhantomData<fn() -> D>);

impl<D> fmt::Debug for BuiltinRules<D>
where
    D: Builtin,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "built-in domain {}", D::NAME)
    }
}

impl<D> DomainRules for BuiltinRules<D>
where
    D: Builtin,
{
    fn name(&self) -> &str {
        D::NAME
    }

    fn kinds(&self) -> Vec<&str> {
        vec![D::KIND]
    }

    fn command_types(&self) -> Vec<&str> {
        D::COMMANDS.to_vec()
    }

    fn reject_codes(&self) -> Vec<String> {
        let mut codes: Vec<String> = D::CODES.iter().map(|c| c.as_str().to_string()).collect();
        codes.sort();
        codes
    }

    fn check(&self, id: &AggregateId, state: &State) -> Result<(), Violation> {
        match state.downcast_ref::<D::State>() {
            Some(s) => D::check(s),
            None => Err(Violation {
                invariant: "state of its kind".into(),
                detail: format!("{id} holds a state of another domain: {state:?}"),
            }),
        }
    }

    fn laws(&self) -> Vec<Law> {
        D::conservation().iter().map(|law| Law(law)).collect()
    }
}

macro_rules! builtin_bodies {
    ($domain:ty, $command:ty, $event:ty, $state:ty) => {
        impl CommandBody for $command {
            fn targets(&self) -> Targets<'_> {
                <$domain as Domain>::targets(self)
            }

            fn decide<'a>(
                &self,
                lookup: &dyn Fn(&AggregateId) -> Option<&'a Aggregate>,
                _now_us: u64,
            ) -> Result<Event, Rejection> {
                decide_builtin::<$domain>(self, lookup)
            }

            fn clone_body(&self) -> Box<dyn CommandBody> {
                Box::new(self.clone())
            }
        }

        impl From<$command> for Command {
            fn from(command: $command) -> Self {
                Command::new(command)
            }
        }

        impl EventBody for $event {
            fn tag(&self) -> u32 {
                <$domain as Builtin>::TAG
            }

            fn targets(&self) -> Targets<'_> {
                <$domain as Domain>::event_targets(self)
            }

            fn type_name(&self) -> &str {
                <$event>::type_name(self)
            }

            fn apply(&self, target: usize, previous: Option<State>) -> State {
                apply_builtin::<$domain>(self, target, previous)
            }

            fn encode(&self, out: &mut Vec<u8>) {
                encode_postcard(self, out);
            }

            fn clone_body(&self) -> Box<dyn EventBody> {
                Box::new(self.clone())
            }
        }

        impl From<$event> for Event {
            fn from(event: $event) -> Self {
                Event::new(event)
            }
        }

        impl StateBody for $state {
            fn tag(&self) -> u32 {
                <$domain as Builtin>::TAG
            }

            fn check(&self) -> Result<(), Violation> {
                <$domain as Domain>::check(self)
            }

            fn encode(&self, out: &mut Vec<u8>) {
                encode_postcard(self, out);
            }

            fn clone_body(&self) -> Box<dyn StateBody> {
                Box::new(self.clone())
            }

            fn clone_into_body(&self, target: &mut dyn StateBody) -> bool {
                clone_into_same(self, target)
            }
        }

        impl From<$state> for State {
            fn from(state: $state) -> Self {
                State::new(state)
            }
        }
    };
}

builtin_bodies!(Ledger, ledger::Command, ledger::Event, ledger::Account);
builtin_bodies!(
    Inventory,
    inventory::Command,
    inventory::Event,
    inventory::Sku
);

static LEDGER_RULES: BuiltinRules<Ledger> = BuiltinRules(std::marker::PhantomData);
static INVENTORY_RULES: BuiltinRules<Inventory> = BuiltinRules(std::marker::PhantomData);

impl Builtin for Ledger {
    const NAME: &'static str = "ledger";
    const KIND: &'static str = ledger::KIND;
    const TAG: u32 = LEDGER_TAG;
    const COMMANDS: &'static [&'static str] = &[
        "open_account",
        "deposit",
        "withdraw",
        "transfer",
        "close_account",
    ];
    const CODES: &'static [RejectCode] = &[
        RejectCode::InvalidAmount,
        RejectCode::AccountExists,
        RejectCode::AccountNotFound,
        RejectCode::AccountClosed,
        RejectCode::InsufficientFunds,
        RejectCode::SameAccount,
        RejectCode::BalanceNotZero,
    ];
    const RULES: &'static dyn DomainRules = &LEDGER_RULES;
}

impl Builtin for Inventory {
    const NAME: &'static str = "inventory";
    const KIND: &'static str = inventory::KIND;
    const TAG: u32 = INVENTORY_TAG;
    const COMMANDS: &'static [&'static str] =
        &["create_sku", "restock", "reserve", "release", "ship"];
    const CODES: &'static [RejectCode] = &[
        RejectCode::InvalidAmount,
        RejectCode::SkuExists,
        RejectCode::SkuNotFound,
        RejectCode::InsufficientStock,
        RejectCode::ReservationExists,
        RejectCode::ReservationNotFound,
    ];
    const RULES: &'static dyn DomainRules = &INVENTORY_RULES;
}

/// The built-in domains, in stored-tag order.
pub fn builtin_domains() -> [&'static dyn DomainRules; 2] {
    [Ledger::RULES, Inventory::RULES]
}

/// Whether a built-in domain has a command type `name` (without building any list: asked for
/// every declared command a request names).
pub fn is_builtin_command(name: &str) -> bool {
    Ledger::COMMANDS.contains(&name) || Inventory::COMMANDS.contains(&name)
}

// ---------------------------------------------------------------------------------------------
// Declared domains behind the registry.

impl CommandBody for DeclaredCommand {
    fn targets(&self) -> Targets<'_> {
        declared_targets(&self.targets)
    }

    fn decide<'a>(
        &self,
        lookup: &dyn Fn(&AggregateId) -> Option<&'a Aggregate>,
        now_us: u64,
    ) -> Result<Event, Rejection> {
        let mut states = [None; crate::declared::TARGETS_MAX];
        for (slot, id) in states.iter_mut().zip(&self.targets) {
            *slot = lookup(id);
        }
        let states = &states[..self.targets.len().min(crate::declared::TARGETS_MAX)];
        self.def
            .decide(&self.params, &self.targets, states, now_us)
            .map(Event::new)
    }

    fn clone_body(&self) -> Box<dyn CommandBody> {
        Box::new(self.clone())
    }
}

impl EventBody for DeclaredEvent {
    fn tag(&self) -> u32 {
        DECLARED_TAG
    }

    fn targets(&self) -> Targets<'_> {
        declared_targets(&self.targets)
    }

    fn type_name(&self) -> &str {
        &self.event
    }

    fn apply(&self, target: usize, previous: Option<State>) -> State {
        let previous = previous.and_then(|s| s.downcast::<DeclaredState>().ok());
        let effect = self
            .effects
            .get(target)
            .unwrap_or(&crate::declared::Effect::Read);
        State::new(effect.fold(previous))
    }

    fn encode(&self, out: &mut Vec<u8>) {
        encode_postcard(self, out);
    }

    fn clone_body(&self) -> Box<dyn EventBody> {
        Box::new(self.clone())
    }
}

impl StateBody for DeclaredState {
    fn tag(&self) -> u32 {
        DECLARED_TAG
    }

    fn check(&self) -> Result<(), Violation> {
        Ok(())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        encode_postcard(self, out);
    }

    fn clone_body(&self) -> Box<dyn StateBody> {
        Box::new(self.clone())
    }

    fn clone_into_body(&self, target: &mut dyn StateBody) -> bool {
        clone_into_same(self, target)
    }
}

impl From<DeclaredCommand> for Command {
    fn from(command: DeclaredCommand) -> Self {
        Command::new(command)
    }
}

impl From<DeclaredEvent> for Event {
    fn from(event: DeclaredEvent) -> Self {
        Event::new(event)
    }
}

impl From<DeclaredState> for State {
    fn from(state: DeclaredState) -> Self {
        State::new(state)
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

// ---------------------------------------------------------------------------------------------
// Conservation laws.

/// A conservation law of any domain (see [`Conservation`]), behind a trait object: `flow` and
/// `quantity` answer `None` for events and states of other domains.
pub trait LawRules: Send + Sync {
    fn name(&self) -> &'static str;
    fn statement(&self) -> &'static str;
    fn scope(&self) -> LawScope;
    fn flow(&self, event: &Event, target: usize) -> Option<i128>;
    fn quantity(&self, state: &State) -> Option<i128>;
}

impl<E: Any, S: Any> LawRules for Conservation<E, S> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn statement(&self) -> &'static str {
        self.statement
    }

    fn scope(&self) -> LawScope {
        self.scope
    }

    fn flow(&self, event: &Event, target: usize) -> Option<i128> {
        event.downcast_ref::<E>().map(|e| (self.flow)(e, target))
    }

    fn quantity(&self, state: &State) -> Option<i128> {
        state.downcast_ref::<S>().map(|s| (self.quantity)(s))
    }
}

/// A conservation law of a registered domain.
#[derive(Clone, Copy)]
pub struct Law(pub &'static dyn LawRules);

impl Law {
    pub fn name(self) -> &'static str {
        self.0.name()
    }

    pub fn statement(self) -> &'static str {
        self.0.statement()
    }

    pub fn scope(self) -> LawScope {
        self.0.scope()
    }

    /// How much `event` moves the quantity of its target number `target`, when the event
    /// belongs to this law's domain.
    pub fn flow(self, event: &Event, target: usize) -> Option<i128> {
        self.0.flow(event, target)
    }

    /// The quantity `state` holds, when the state belongs to this law's domain.
    pub fn quantity(self, state: &State) -> Option<i128> {
        self.0.quantity(state)
    }
}

impl fmt::Debug for Law {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every conservation law of every built-in domain, in a stable order.
pub fn conservation_laws() -> Vec<Law> {
    builtin_domains()
        .into_iter()
        .flat_map(|d| d.laws())
        .collect()
}
