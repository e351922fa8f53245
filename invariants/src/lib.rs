//! Keel's pure domain: commands, events, aggregate state and the invariants that guard them.
//!
//! This crate decides whether a command may happen and what it changed. It does no IO, owns no
//! clock (time is a parameter where a rule needs it), spawns nothing (but the one joined thread a
//! declared expression is parsed on at load, see [`declared::expr`]) and cannot fail except by
//! returning a [`Rejection`]. It knows nothing of HTTP, JSON or RocksDB: the sequencer calls
//! [`decide`] and [`apply`], the engine stores the bytes [`codec`] produces, and the audit
//! replays events through [`apply`] to prove the stored state.
//!
//! [`Command`], [`Event`] and [`State`] are open: each holds one domain's own value behind an
//! object-safe interface ([`CommandBody`], [`EventBody`], [`StateBody`]), and each domain is one
//! [`DomainRules`] value in the registry ([`declared::DomainSet`], keyed by aggregate kind).
//! Two domains are built in, written as typed [`Domain`] modules: [`ledger`] and [`inventory`].
//! Any other domain is a definition file ([`declared`], docs/DOMAINS.md).

pub mod codec;
pub mod declared;
mod domain;
pub mod inventory;
pub mod ledger;
pub mod registry;

pub use domain::{
    AggregateId, Conservation, Domain, LawScope, RejectCode, Rejection, Targets, Violation,
};
pub use registry::{
    Aggregate, Body, Builtin, Command, CommandBody, CommandOutcome, DomainRules, Envelope, Event,
    EventBody, Law, LawRules, LoggedEvent, LoggedRejection, State, StateBody, apply,
    builtin_domains, check_invariants, conservation_laws, decide, decide_at,
};

/// The rules the built-in domains decide under, as the committed log records them: every log
/// record names the BLAKE3 hash of this text, and the first record under it carries the text
/// (docs/FORMAT.md). Change the version line of a domain whenever its `decide`, `apply`,
/// invariants or rejection codes change meaning, so that history shows which rules decided
/// which batch.
pub const BUILTIN_RULES: &str = "keel built-in domains\n\
ledger v1: open_account, deposit, withdraw, transfer, close_account; balance >= -overdraft_limit\n\
inventory v1: create_sku, restock, reserve, release, ship; reserved <= on_hand, reservations sum to reserved\n";
