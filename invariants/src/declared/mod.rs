//! Declared domains: a service team's aggregates, commands, invariants and conservation laws,
//! written in a TOML file with CEL expressions (docs/DOMAINS.md), compiled once at start and
//! decided by the same writer, with the same guarantees, as the built-in domains.
//!
//! A declared command decides in a fixed order, the same for every domain:
//! 1. the preconditions that read only `params` and `now`, in file order;
//! 2. each target in order: that it names no aggregate an earlier target names, its existence
//!    (`must = "exist"` / `"not_exist"`), then its own `checks`;
//! 3. the preconditions that read a target's fields, in file order;
//! 4. the effects, every expression reading the state before the command (so effects on
//!    several fields see the same inputs whatever their order);
//! 5. the field limits (string lengths, map sizes) and every invariant of each written target's
//!    kind, on the state after the command.
//!
//! The first check that fails refuses the command with its code. Arithmetic is checked
//! throughout: an overflow refuses the command with the core code `overflow`, a division by zero
//! or a missing map key with `evaluation_error`. Nothing here reads a clock: `now` is the commit
//! time the writer passes in.
//!
//! The event a command commits carries its parameters and, for each target, the effect it had
//! (the fields created or changed, a deletion, or nothing for a target only read), so that
//! [`apply`] folds it without the definition and the audit can decide it again under the rules
//! the log recorded for it and compare.

mod compile;
pub mod expr;
mod file;
mod set;

pub use expr::{Type, Value};
pub use set::{DomainSet, RULES_FILE_MARK, Resolved};

use crate::domain::{AggregateId, LawScope, RejectCode, Rejection, Violation};
use crate::registry::Aggregate;
use expr::{EvalError, Expr};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Most aggregates one declared command may target.
pub const TARGETS_MAX: usize = 8;

/// The rejection code of an expression that failed other than by overflow (a division by zero,
/// a missing map key).
pub const EVALUATION_ERROR: &str = "evaluation_error";
/// The rejection code of a command whose targets name one aggregate twice.
pub const DUPLICATE_TARGET: &str = "duplicate_target";
/// The rejection code of a state that would break a field's declared limit.
pub const FIELD_LIMIT: &str = "field_limit";

/// A definition that does not load, with where and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

impl std::error::Error for LoadError {}

/// One loaded definition file.
#[derive(Debug)]
pub struct DomainDef {
    pub name: String,
    pub description: String,
    /// The file it was loaded from, as given (for errors and `GET /v1/domains`).
    pub file: String,
    /// The file's text exactly: what the log records and the audit recompiles.
    pub text: String,
    pub kinds: Vec<Arc<KindDef>>,
    pub commands: Vec<Arc<CommandDef>>,
    pub laws: Vec<LawDef>,
}

impl DomainDef {
    /// Compiles the definition `text` read from `file`.
    pub fn compile(file: &str, text: &str) -> Result<Self, LoadError> {
        compile::compile(file, text)
    }
}

#[derive(Debug)]
pub struct FieldDef {
    pub name: Name,
    pub ty: Type,
    pub default: Value,
    /// Strings (and map keys): most bytes.
    pub max_len: u32,
    /// Maps: most entries.
    pub max_entries: u32,
}

impl FieldDef {
    /// Whether `value` is within the field's declared limits (its type is the compiler's).
    fn check(&self, value: &Value) -> Result<(), String> {
        let too_long = |s: &str| s.len() > self.max_len as usize;
        match value {
            Value::String(s) if too_long(s) => Err(format!(
                "field `{}` would hold {} bytes, above its max_len {}",
                self.name,
                s.len(),
                self.max_len
            )),
            Value::Map(m) if m.len() > self.max_entries as usize => Err(format!(
                "field `{}` would hold {} entries, above its max_entries {}",
                self.name,
                m.len(),
                self.max_entries
            )),
            Value::Map(m) => match m
                .iter()
                .find(|(k, v)| too_long(k) || matches!(v, Value::String(s) if too_long(s)))
            {
                Some((k, _)) => Err(format!(
                    "field `{}`: entry {} is above max_len {}",
                    self.name,
                    crate::declared::short(k),
                    self.max_len
                )),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

/// `text` quoted, cut to 64 bytes at a character boundary.
fn short(text: &str) -> String {
    if text.len() <= 64 {
        return format!("`{text}`");
    }
    let mut end = 64;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("`{}...` ({} bytes)", &text[..end], text.len())
}

/// A name from a definition (a field, parameter, domain, command or event name), shared
/// rather than copied: the writer clones states and events on its hot path, and a shared name
/// costs a reference count where a `String` costs an allocation. Encoded as a plain string, so
/// the stored bytes are those of a `String`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(Arc<str>);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Name {
    fn from(name: &str) -> Self {
        Self(name.into())
    }
}

impl From<String> for Name {
    fn from(name: String) -> Self {
        Self(name.into())
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::from)
    }
}

/// An aggregate kind of a declared domain: its ids are `<kind>:<name>`.
#[derive(Debug)]
pub struct KindDef {
    pub domain: String,
    pub name: String,
    pub description: String,
    pub fields: Vec<FieldDef>,
    /// Read through `<kind>.<field>`, one slot per field in order.
    pub invariants: Vec<Check>,
}

impl KindDef {
    /// The value of every field of `state` in declaration order (defaults where absent).
    fn env(&self, state: Option<&DeclaredState>, env: &mut Vec<Value>) {
        for field in &self.fields {
            let value = state.and_then(|s| s.fields.get(&field.name));
            env.push(value.cloned().unwrap_or_else(|| field.default.clone()));
        }
    }

    /// Every field limit and invariant on `state`.
    pub fn check(&self, state: &DeclaredState) -> Result<(), Violation> {
        if state.deleted {
            return Ok(());
        }
        if let Some(unknown) = state
            .fields
            .keys()
            .find(|k| !self.fields.iter().any(|f| f.name == **k))
        {
            return Err(Violation {
                invariant: format!("{}: known fields", self.name).into(),
                detail: format!("field {} is not declared", short(unknown)),
            });
        }
        let mut env = Vec::with_capacity(self.fields.len());
        self.env(Some(state), &mut env);
        for (field, value) in self.fields.iter().zip(&env) {
            if value.type_of() != field.ty && !matches!(value, Value::Map(m) if m.is_empty()) {
                return Err(Violation {
                    invariant: format!("{}.{}: {}", self.name, field.name, field.ty.name()).into(),
                    detail: format!("holds a {}", value.type_of().name()),
                });
            }
            if let Err(detail) = field.check(value) {
                return Err(Violation {
                    invariant: format!("{}.{}: limits", self.name, field.name).into(),
                    detail,
                });
            }
        }
        for invariant in &self.invariants {
            match invariant.expr.eval_bool(&env) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(Violation {
                        invariant: invariant.code.clone().into(),
                        detail: invariant.describe(&env),
                    });
                }
                Err(e) => {
                    return Err(Violation {
                        invariant: invariant.code.clone().into(),
                        detail: format!("`{}` fails to evaluate: {e}", invariant.source),
                    });
                }
            }
        }
        Ok(())
    }
}

/// A boolean rule with the code that refuses when it is false.
#[derive(Debug)]
pub struct Check {
    pub code: String,
    /// The expression as written, for messages and `GET /v1/domains`.
    pub source: String,
    expr: Expr,
    message: Option<Expr>,
}

impl Check {
    fn describe(&self, env: &[Value]) -> String {
        match self.message.as_ref().map(|m| m.eval(env)) {
            Some(Ok(Value::String(text))) => text,
            _ => format!("`{}` does not hold", self.source),
        }
    }

    /// Passes, or the rejection the check answers.
    fn run(&self, env: &[Value]) -> Result<(), Rejection> {
        match self.expr.eval_bool(env) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Rejection::new(
                RejectCode::Rule(self.code.clone()),
                self.describe(env),
            )),
            Err(e) => Err(evaluation_rejection(&e, &self.source)),
        }
    }
}

fn evaluation_rejection(error: &EvalError, source: &str) -> Rejection {
    match error {
        EvalError::Overflow(_) | EvalError::ConversionOutOfRange(_) => {
            Rejection::new(RejectCode::Overflow, format!("`{source}`: {error}"))
        }
        _ => Rejection::new(
            RejectCode::Rule(EVALUATION_ERROR.to_string()),
            format!("`{source}`: {error}"),
        ),
    }
}

/// What a parameter holds.
#[derive(Debug)]
pub enum ParamType {
    /// An aggregate of this kind, named by the client (`"AF1"`): the target id is
    /// `<kind>:<name>`, the expressions see the name as a string.
    Id(Arc<KindDef>),
    Value(Type),
}

impl ParamType {
    pub fn value_type(&self) -> Type {
        match self {
            ParamType::Id(_) => Type::String,
            ParamType::Value(t) => t.clone(),
        }
    }

    /// The type's name as the file spells it (`id`, `uint`).
    pub fn name(&self) -> String {
        match self {
            ParamType::Id(_) => "id".to_string(),
            ParamType::Value(t) => t.name(),
        }
    }
}

#[derive(Debug)]
pub struct ParamDef {
    pub name: Name,
    pub ty: ParamType,
    pub optional: bool,
    /// The value of an optional parameter the client left out (the type's zero when none).
    pub default: Option<Value>,
    pub min: Option<i128>,
    pub max: Option<i128>,
    /// Strings and id names: most bytes.
    pub max_len: u32,
}

impl ParamDef {
    /// Whether `value` is within the parameter's bounds; the message names the bound.
    pub fn check(&self, value: &Value) -> Result<(), String> {
        let n = match value {
            Value::Int(n) => Some(i128::from(*n)),
            Value::Uint(n) => Some(i128::from(*n)),
            Value::String(s) if s.len() > self.max_len as usize => {
                return Err(format!(
                    "is {} bytes, above its max_len {}",
                    s.len(),
                    self.max_len
                ));
            }
            _ => None,
        };
        if let (Some(n), Some(min)) = (n, self.min)
            && n < min
        {
            return Err(format!("is {n}, below its min {min}"));
        }
        if let (Some(n), Some(max)) = (n, self.max)
            && n > max
        {
            return Err(format!("is {n}, above its max {max}"));
        }
        Ok(())
    }

    /// The value of an absent optional parameter.
    pub fn absent(&self) -> Value {
        self.default
            .clone()
            .unwrap_or_else(|| Value::default_of(&self.ty.value_type()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Must {
    Exist,
    NotExist,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Create,
    Update,
    Delete,
    Read,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Read => "read",
        }
    }
}

#[derive(Debug)]
pub struct TargetDef {
    /// The id parameter naming the target; also the target's name in expressions.
    pub param: String,
    pub param_index: usize,
    pub kind: Arc<KindDef>,
    pub must: Must,
    pub action: Action,
    /// The code when `must` does not hold.
    pub code: String,
    /// The target's first slot in the command's scope.
    slot_base: usize,
    /// (field index, expression) for each field the command sets.
    effects: Vec<(usize, Expr)>,
    /// Run right after this target's existence check.
    checks: Vec<Check>,
}

impl TargetDef {
    /// The checks run right after this target's existence check.
    pub fn checks(&self) -> &[Check] {
        &self.checks
    }
}

#[derive(Debug)]
pub struct CommandDef {
    pub domain: Name,
    pub name: Name,
    pub event: Name,
    pub description: String,
    pub params: Vec<ParamDef>,
    pub targets: Vec<TargetDef>,
    param_checks: Vec<Check>,
    state_checks: Vec<Check>,
    /// Slots of the scope: params, `now`, every target's fields.
    slots: usize,
}

impl CommandDef {
    /// `<domain>.<command>`, the name that is never ambiguous.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.domain, self.name)
    }

    /// Every rejection code of the definition this command can answer with (sorted, once).
    pub fn reject_codes(&self) -> Vec<&str> {
        let mut codes: Vec<&str> = self
            .targets
            .iter()
            .map(|t| t.code.as_str())
            .chain(
                self.targets
                    .iter()
                    .flat_map(|t| t.checks().iter().map(|k| k.code.as_str())),
            )
            .chain(self.preconditions().map(|p| p.code.as_str()))
            .chain(
                self.targets
                    .iter()
                    .flat_map(|t| t.kind.invariants.iter().map(|i| i.code.as_str())),
            )
            .collect();
        codes.sort_unstable();
        codes.dedup();
        codes
    }

    /// Every precondition, parameter-only ones first (the order they run in).
    pub fn preconditions(&self) -> impl Iterator<Item = &Check> {
        self.param_checks.iter().chain(&self.state_checks)
    }

    /// Decides the command against the current aggregates, given in target order (`None` where
    /// absent), at commit time `now_us`.
    pub fn decide(
        &self,
        params: &[Value],
        ids: &[AggregateId],
        states: &[Option<&Aggregate>],
        now_us: u64,
    ) -> Result<DeclaredEvent, Rejection> {
        let effects = self.decide_effects(params, ids, states, now_us)?;
        Ok(DeclaredEvent {
            domain: self.domain.clone(),
            command: self.name.clone(),
            event: self.event.clone(),
            params: self
                .params
                .iter()
                .zip(params)
                .map(|(p, v)| (p.name.clone(), v.clone()))
                .collect(),
            targets: ids.to_vec(),
            effects,
        })
    }

    /// The effect on each target, or the rejection.
    pub fn decide_effects(
        &self,
        params: &[Value],
        ids: &[AggregateId],
        states: &[Option<&Aggregate>],
        now_us: u64,
    ) -> Result<Vec<Effect>, Rejection> {
        if params.len() != self.params.len()
            || ids.len() != self.targets.len()
            || states.len() != self.targets.len()
        {
            return Err(Rejection::new(
                RejectCode::Rule(EVALUATION_ERROR.to_string()),
                format!(
                    "{} takes {} parameters and {} targets",
                    self.qualified(),
                    self.params.len(),
                    self.targets.len()
                ),
            ));
        }
        let mut env = Vec::with_capacity(self.slots);
        env.extend_from_slice(params);
        env.push(Value::Timestamp(i64::try_from(now_us).unwrap_or(i64::MAX)));
        for check in &self.param_checks {
            check.run(&env)?;
        }
        for (index, (target, id)) in self.targets.iter().zip(ids).enumerate() {
            if ids[..index].contains(id) {
                return Err(Rejection::new(
                    RejectCode::Rule(DUPLICATE_TARGET.to_string()),
                    format!("{id} is named by two targets of {}", self.qualified()),
                ));
            }
            if id.kind() != target.kind.name {
                return Err(Rejection::new(
                    RejectCode::WrongKind,
                    format!("{id} is not a `{}` aggregate id", target.kind.name),
                ));
            }
            let state = match states[index].map(|a| a.state.downcast_ref::<DeclaredState>()) {
                None => None,
                Some(Some(s)) if s.deleted => None,
                Some(Some(s)) => Some(s),
                Some(None) => {
                    return Err(Rejection::new(
                        RejectCode::WrongKind,
                        format!("{id} holds an aggregate of another kind"),
                    ));
                }
            };
            match (target.must, state.is_some()) {
                (Must::Exist, false) => {
                    return Err(Rejection::new(
                        RejectCode::Rule(target.code.clone()),
                        format!("{id} does not exist"),
                    ));
                }
                (Must::NotExist, true) => {
                    return Err(Rejection::new(
                        RejectCode::Rule(target.code.clone()),
                        format!("{id} already exists"),
                    ));
                }
                _ => {}
            }
            debug_assert_eq!(env.len(), target.slot_base);
            target.kind.env(state, &mut env);
            for check in &target.checks {
                check.run(&env)?;
            }
        }
        for check in &self.state_checks {
            check.run(&env)?;
        }
        let mut effects = Vec::with_capacity(self.targets.len());
        let mut evaluated = Vec::new();
        let mut after = Vec::new();
        for (target, id) in self.targets.iter().zip(ids) {
            let fields = &target.kind.fields;
            let create = match target.action {
                Action::Create => true,
                Action::Update => false,
                Action::Delete => {
                    effects.push(Effect::Delete);
                    continue;
                }
                Action::Read => {
                    effects.push(Effect::Read);
                    continue;
                }
            };
            evaluated.clear();
            for (field, expr) in &target.effects {
                let value = expr
                    .eval(&env)
                    .map_err(|e| evaluation_rejection(&e, "effect"))?;
                evaluated.push((*field, value));
            }
            // The fields the command leaves, in declaration order, without building the state:
            // a created aggregate's defaults, or the target's fields before (its slots in the
            // environment, defaults where absent), with the effects' values in place.
            after.clear();
            if create {
                after.extend(fields.iter().map(|f| f.default.clone()));
            } else {
                after.extend_from_slice(&env[target.slot_base..target.slot_base + fields.len()]);
            }
            for (field, value) in &evaluated {
                after[*field] = value.clone();
            }
            for (field, value) in fields.iter().zip(&after) {
                if let Err(why) = field.check(value) {
                    return Err(Rejection::new(
                        RejectCode::Rule(FIELD_LIMIT.to_string()),
                        format!("{id}: {why}"),
                    ));
                }
            }
            for invariant in &target.kind.invariants {
                invariant.run(&after).map_err(|mut r| {
                    r.message = format!("{id}: {}", r.message);
                    r
                })?;
            }
            let changed: BTreeMap<Name, Value> = if create {
                fields
                    .iter()
                    .map(|f| f.name.clone())
                    .zip(after.drain(..))
                    .collect()
            } else {
                evaluated
                    .drain(..)
                    .map(|(field, value)| (fields[field].name.clone(), value))
                    .collect()
            };
            effects.push(if create {
                Effect::Create(changed)
            } else {
                Effect::Update(changed)
            });
        }
        Ok(effects)
    }
}

/// A conservation law of a declared domain, proved by the audit.
#[derive(Debug)]
pub struct LawDef {
    /// `<domain>.<law>`.
    pub name: String,
    pub statement: String,
    pub kind: String,
    pub scope: LawScope,
    quantity: Expr,
    /// Per command name: (target index, flow expression over `params`).
    flows: BTreeMap<String, Vec<(usize, Expr)>>,
}

impl LawDef {
    /// How much `event` moves the quantity of its target number `target`; `None` when the
    /// event is of another domain's command or the target is of another kind.
    pub fn flow(
        &self,
        kind: &KindDef,
        event: &DeclaredEvent,
        target: usize,
        before: Option<&DeclaredState>,
    ) -> Option<Result<i128, String>> {
        let id = event.targets.get(target)?;
        if id.kind() != self.kind {
            return None;
        }
        let Some(flows) = self.flows.get(event.command.as_str()) else {
            return Some(Ok(0));
        };
        let Some((_, expr)) = flows.iter().find(|(t, _)| *t == target) else {
            return Some(Ok(0));
        };
        let mut env: Vec<Value> = event.params.iter().map(|(_, v)| v.clone()).collect();
        kind.env(before.filter(|s| !s.deleted), &mut env);
        Some(match expr.eval(&env) {
            Ok(Value::Int(n)) => Ok(i128::from(n)),
            Ok(other) => Err(format!("flow is a {}", other.type_of().name())),
            Err(e) => Err(e.to_string()),
        })
    }

    /// The quantity a state of the law's kind holds.
    pub fn quantity(&self, kind: &KindDef, state: &DeclaredState) -> Result<i128, String> {
        if state.deleted {
            return Ok(0);
        }
        let mut env = Vec::with_capacity(kind.fields.len());
        kind.env(Some(state), &mut env);
        match self.quantity.eval(&env) {
            Ok(Value::Int(n)) => Ok(i128::from(n)),
            Ok(Value::Uint(n)) => Ok(i128::from(n)),
            Ok(other) => Err(format!("quantity is a {}", other.type_of().name())),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A command of a declared domain: its definition, its parameters (in the definition's order,
/// absent optional ones at their defaults) and its targets (in the definition's order).
#[derive(Clone, Debug)]
pub struct DeclaredCommand {
    pub def: Arc<CommandDef>,
    pub params: Vec<Value>,
    pub targets: Vec<AggregateId>,
}

impl PartialEq for DeclaredCommand {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.def, &other.def)
            && self.params == other.params
            && self.targets == other.targets
    }
}

impl Eq for DeclaredCommand {}

/// What a declared command did, as the log stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclaredEvent {
    pub domain: Name,
    pub command: Name,
    pub event: Name,
    /// The parameters by name, in the definition's order (so the log reads without it).
    pub params: Vec<(Name, Value)>,
    pub targets: Vec<AggregateId>,
    /// One per target, in order.
    pub effects: Vec<Effect>,
}

/// What one declared event did to one target. Never reorder variants (stored encoding).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// The aggregate came to be with these fields (every declared field).
    Create(BTreeMap<Name, Value>),
    /// These fields took these values; the others kept theirs.
    Update(BTreeMap<Name, Value>),
    Delete,
    /// Read, not changed (its version still moves: the command depended on it).
    Read,
}

impl Effect {
    /// The state after this effect on `before`.
    pub fn fold(&self, before: Option<DeclaredState>) -> DeclaredState {
        let mut state = before.unwrap_or_default();
        match self {
            Effect::Create(fields) => {
                state.fields = fields.clone();
                state.deleted = false;
            }
            Effect::Update(fields) => {
                for (name, value) in fields {
                    state.fields.insert(name.clone(), value.clone());
                }
            }
            Effect::Delete => {
                state.fields.clear();
                state.deleted = true;
            }
            Effect::Read => {}
        }
        state
    }
}

/// The state of a declared aggregate: its fields by name. A deleted aggregate keeps its
/// version (the log moved it) and reads as absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclaredState {
    pub fields: BTreeMap<Name, Value>,
    pub deleted: bool,
}
