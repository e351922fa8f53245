//! From a definition file to a compiled domain: every name resolved, every expression
//! type-checked against the scope it runs in, every error tied to the file's line.

use super::expr::{Expr, Limits, Scope, Type, Value};
use super::file::{CommandFile, DomainFile, FieldFile, KindFile, LawFile, ParamFile};
use super::{
    Action, Check, CommandDef, DomainDef, FieldDef, KindDef, LawDef, LoadError, Must, ParamDef,
    ParamType, TARGETS_MAX, TargetDef,
};
use crate::LawScope;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;
use toml::Spanned;

/// Longest name of a domain, kind, command, parameter, field or code.
const NAME_BYTES_MAX: usize = 32;
/// A string field's or parameter's length bound when the file gives none, and the largest it
/// may give.
const STRING_BYTES_DEFAULT: u32 = 256;
const STRING_BYTES_MAX: u32 = 65_536;
/// A map field's entry bound when the file gives none, and the largest it may give.
const MAP_ENTRIES_DEFAULT: u32 = 64;
const MAP_ENTRIES_MAX: u32 = 1024;
/// Most of each per definition, so that one file cannot make the writer's work unbounded.
const FIELDS_MAX: usize = 64;
const PARAMS_MAX: usize = 32;
const CHECKS_MAX: usize = 64;

/// Names the expressions use for themselves; a parameter, target or kind cannot take them.
const RESERVED: &[&str] = &[
    "params",
    "now",
    "in",
    "true",
    "false",
    "null",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
    "int",
    "uint",
    "string",
    "bool",
    "size",
    "sum",
    "has",
    "duration",
    "timestamp",
];

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
    limits: Limits,
}

impl Ctx<'_> {
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> LoadError {
        let (line, column) = line_column(self.text, span.start);
        LoadError {
            file: self.file.to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    fn name(&self, name: &Spanned<String>, what: &str) -> Result<String, LoadError> {
        let value = name.get_ref();
        let ok = value.len() <= NAME_BYTES_MAX
            && value.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            return Err(self.error(
                name.span(),
                format!(
                    "{what} `{value}` is not a name: use a lowercase letter, then lowercase letters, digits or `_`, at most {NAME_BYTES_MAX} bytes"
                ),
            ));
        }
        Ok(value.clone())
    }

    fn binding(&self, name: &Spanned<String>, what: &str) -> Result<String, LoadError> {
        let value = self.name(name, what)?;
        if RESERVED.contains(&value.as_str()) {
            return Err(self.error(
                name.span(),
                format!("{what} `{value}` is a reserved word of the expressions"),
            ));
        }
        Ok(value)
    }

    fn expr(
        &self,
        source: &Spanned<String>,
        scope: &Scope,
        expected: &Type,
        what: &str,
    ) -> Result<Expr, LoadError> {
        Expr::compile(source.get_ref(), scope, expected, &self.limits).map_err(|e| {
            // The expression's text starts after the opening quote; escapes inside the string
            // can shift the column, never the line of a single-line string.
            let start = source.span().start + 1 + e.offset;
            self.error(start..start, format!("{what}: {}", e.message))
        })
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Parses `text` (the contents of `file`) and compiles the domain it defines.
pub(super) fn compile(file: &str, text: &str) -> Result<DomainDef, LoadError> {
    let ctx = Ctx {
        file,
        text,
        limits: Limits::default(),
    };
    let parsed: DomainFile = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        ctx.error(span, e.message().to_string())
    })?;
    let name = ctx.name(&parsed.name, "domain")?;
    let mut kinds = Vec::new();
    for (kind_name, kind) in &parsed.kinds {
        kinds.push(Arc::new(compile_kind(&ctx, &name, kind_name, kind)?));
    }
    let mut commands = Vec::new();
    for (command_name, command) in &parsed.commands {
        commands.push(Arc::new(compile_command(
            &ctx,
            &name,
            &kinds,
            command_name,
            command,
        )?));
    }
    if commands.is_empty() {
        return Err(ctx.error(
            parsed.name.span(),
            format!("domain `{name}` defines no command"),
        ));
    }
    let mut laws = Vec::new();
    for law in &parsed.laws {
        laws.push(compile_law(&ctx, &name, &kinds, &commands, law)?);
    }
    Ok(DomainDef {
        name,
        description: parsed.description,
        file: file.to_string(),
        text: text.to_string(),
        kinds,
        commands,
        laws,
    })
}

pub(super) fn parse_type(text: &str) -> Option<Type> {
    let scalar = |t: &str| match t.trim() {
        "int" => Some(Type::Int),
        "uint" => Some(Type::Uint),
        "bool" => Some(Type::Bool),
        "string" => Some(Type::String),
        "timestamp" => Some(Type::Timestamp),
        "duration" => Some(Type::Duration),
        _ => None,
    };
    let text = text.trim();
    if let Some(inner) = text
        .strip_prefix("map(")
        .and_then(|rest| rest.strip_suffix(')'))
    {
        let (key, value) = inner.split_once(',')?;
        if key.trim() != "string" {
            return None;
        }
        return scalar(value).map(|v| Type::Map(Box::new(v)));
    }
    scalar(text)
}

/// A TOML default converted to `ty`, or why it does not fit.
fn default_value(value: &toml::Value, ty: &Type) -> Result<Value, String> {
    match (ty, value) {
        (Type::Int, toml::Value::Integer(n)) => Ok(Value::Int(*n)),
        (Type::Uint, toml::Value::Integer(n)) => u64::try_from(*n)
            .map(Value::Uint)
            .map_err(|_| format!("{n} is not a uint")),
        (Type::Bool, toml::Value::Boolean(b)) => Ok(Value::Bool(*b)),
        (Type::String, toml::Value::String(s)) => Ok(Value::String(s.clone())),
        (Type::Map(_), toml::Value::Table(t)) if t.is_empty() => Ok(Value::Map(BTreeMap::new())),
        _ => Err(format!(
            "a default of type {} must be {}",
            ty.name(),
            match ty {
                Type::Int | Type::Uint => "an integer",
                Type::Bool => "true or false",
                Type::String => "a string",
                Type::Map(_) => "an empty table `{}`",
                Type::Timestamp | Type::Duration => "left out (the zero value)",
            }
        )),
    }
}

/// Names an aggregate document or answer uses beside the state's fields.
const FIELD_RESERVED: &[&str] = &["id", "kind", "version", "last_seq", "updated_at", "deleted"];

fn compile_field(
    ctx: &Ctx<'_>,
    name: &Spanned<String>,
    field: &FieldFile,
) -> Result<FieldDef, LoadError> {
    let field_name = ctx.binding(name, "field")?;
    if FIELD_RESERVED.contains(&field_name.as_str()) {
        return Err(ctx.error(
            name.span(),
            format!(
                "field `{field_name}` is reserved (aggregate documents use {})",
                FIELD_RESERVED.join(", ")
            ),
        ));
    }
    let ty = parse_type(field.ty.get_ref()).ok_or_else(|| {
        ctx.error(
            field.ty.span(),
            format!(
                "field `{field_name}`: unknown type `{}`; expected int, uint, bool, string, timestamp, duration or map(string, <one of those>)",
                field.ty.get_ref()
            ),
        )
    })?;
    let default = match &field.default {
        Some(value) => default_value(value.get_ref(), &ty)
            .map_err(|why| ctx.error(value.span(), format!("field `{field_name}`: {why}")))?,
        None => Value::default_of(&ty),
    };
    // A map's max_len bounds its keys and string values.
    let max_len = match (&ty, field.max_len) {
        (Type::String | Type::Map(_), Some(n)) if n <= STRING_BYTES_MAX => n,
        (Type::String | Type::Map(_), None) => STRING_BYTES_DEFAULT,
        (Type::String | Type::Map(_), Some(n)) => {
            return Err(ctx.error(
                name.span(),
                format!("field `{field_name}`: max_len {n} is above {STRING_BYTES_MAX}"),
            ));
        }
        (_, Some(_)) => {
            return Err(ctx.error(
                name.span(),
                format!("field `{field_name}`: max_len applies to strings and maps only"),
            ));
        }
        (_, None) => 0,
    };
    let max_entries = match (&ty, field.max_entries) {
        (Type::Map(_), Some(n)) if n <= MAP_ENTRIES_MAX => n,
        (Type::Map(_), None) => MAP_ENTRIES_DEFAULT,
        (Type::Map(_), Some(n)) => {
            return Err(ctx.error(
                name.span(),
                format!("field `{field_name}`: max_entries {n} is above {MAP_ENTRIES_MAX}"),
            ));
        }
        (_, Some(_)) => {
            return Err(ctx.error(
                name.span(),
                format!("field `{field_name}`: max_entries applies to maps only"),
            ));
        }
        (_, None) => 0,
    };
    let def = FieldDef {
        name: field_name.into(),
        ty,
        default,
        max_len,
        max_entries,
    };
    if let Err(why) = def.check(&def.default) {
        return Err(ctx.error(name.span(), why));
    }
    Ok(def)
}

fn compile_kind(
    ctx: &Ctx<'_>,
    domain: &str,
    name: &Spanned<String>,
    kind: &KindFile,
) -> Result<KindDef, LoadError> {
    let kind_name = ctx.binding(name, "kind")?;
    if kind.fields.len() > FIELDS_MAX {
        return Err(ctx.error(
            name.span(),
            format!("kind `{kind_name}` has more than {FIELDS_MAX} fields"),
        ));
    }
    let mut fields = Vec::new();
    for (field_name, field) in &kind.fields {
        fields.push(compile_field(ctx, field_name, field)?);
    }
    let mut scope = Scope::new();
    for field in &fields {
        scope
            .field(&kind_name, &field.name, field.ty.clone())
            .map_err(|why| ctx.error(name.span(), why))?;
    }
    if kind.invariants.len() > CHECKS_MAX {
        return Err(ctx.error(
            name.span(),
            format!("kind `{kind_name}` has more than {CHECKS_MAX} invariants"),
        ));
    }
    let mut invariants = Vec::new();
    for invariant in &kind.invariants {
        let code = ctx.name(&invariant.code, "code")?;
        let what = format!("invariant `{code}` of kind `{kind_name}`");
        invariants.push(Check {
            expr: ctx.expr(&invariant.check, &scope, &Type::Bool, &what)?,
            message: match &invariant.message {
                Some(m) => Some(ctx.expr(m, &scope, &Type::String, &what)?),
                None => None,
            },
            source: invariant.check.get_ref().clone(),
            code,
        });
    }
    Ok(KindDef {
        domain: domain.to_string(),
        name: kind_name,
        description: kind.description.clone(),
        fields,
        invariants,
    })
}

fn compile_param(
    ctx: &Ctx<'_>,
    kinds: &[Arc<KindDef>],
    name: &Spanned<String>,
    param: &ParamFile,
) -> Result<ParamDef, LoadError> {
    let param_name = ctx.binding(name, "parameter")?;
    let ty = if param.ty.get_ref() == "id" {
        let kind = param.kind.as_ref().ok_or_else(|| {
            ctx.error(
                param.ty.span(),
                format!("parameter `{param_name}`: an id parameter names its `kind`"),
            )
        })?;
        let known = kinds.iter().find(|k| k.name == *kind.get_ref());
        let known = known.ok_or_else(|| {
            ctx.error(
                kind.span(),
                format!(
                    "parameter `{param_name}`: kind `{}` is not defined in this file",
                    kind.get_ref()
                ),
            )
        })?;
        ParamType::Id(Arc::clone(known))
    } else {
        if let Some(kind) = &param.kind {
            return Err(ctx.error(
                kind.span(),
                format!("parameter `{param_name}`: only an id parameter has a `kind`"),
            ));
        }
        let ty = parse_type(param.ty.get_ref())
            .filter(|t| !matches!(t, Type::Map(_)))
            .ok_or_else(|| {
                ctx.error(
                    param.ty.span(),
                    format!(
                        "parameter `{param_name}`: unknown type `{}`; expected id, int, uint, bool, string, timestamp or duration",
                        param.ty.get_ref()
                    ),
                )
            })?;
        ParamType::Value(ty)
    };
    let numeric = matches!(ty, ParamType::Value(Type::Int | Type::Uint));
    let bound = |value: &Option<Spanned<toml::Value>>| -> Result<Option<i128>, LoadError> {
        match value {
            None => Ok(None),
            Some(v) if !numeric => Err(ctx.error(
                v.span(),
                format!("parameter `{param_name}`: min and max apply to int and uint only"),
            )),
            Some(v) => match v.get_ref() {
                toml::Value::Integer(n) => Ok(Some(i128::from(*n))),
                // TOML integers stop at i64::MAX; a larger uint bound is written as a string.
                toml::Value::String(s) => {
                    s.parse::<u64>().map(|n| Some(i128::from(n))).map_err(|_| {
                        ctx.error(
                            v.span(),
                            format!("parameter `{param_name}`: `{s}` is not an integer"),
                        )
                    })
                }
                _ => Err(ctx.error(
                    v.span(),
                    format!("parameter `{param_name}`: a bound is an integer"),
                )),
            },
        }
    };
    let min = match &param.min {
        Some(m) => bound(&Some(Spanned::new(
            m.span(),
            toml::Value::Integer(*m.get_ref()),
        )))?,
        None => None,
    };
    let max = bound(&param.max)?;
    let max_len = match (&ty, param.max_len) {
        (ParamType::Value(Type::String), Some(n)) if n <= STRING_BYTES_MAX => n,
        (ParamType::Value(Type::String), None) => STRING_BYTES_DEFAULT,
        // The edge checks an id's name (1 to 128 bytes of printable ASCII).
        (ParamType::Id(_), None) => 128,
        (ParamType::Value(Type::String), Some(n)) => {
            return Err(ctx.error(
                name.span(),
                format!("parameter `{param_name}`: max_len {n} is above {STRING_BYTES_MAX}"),
            ));
        }
        (_, Some(_)) => {
            return Err(ctx.error(
                name.span(),
                format!("parameter `{param_name}`: max_len applies to strings only"),
            ));
        }
        (_, None) => 0,
    };
    let default = match (&param.default, &ty) {
        (None, _) => None,
        (Some(v), ParamType::Value(t)) => Some(
            default_value(v.get_ref(), t)
                .map_err(|why| ctx.error(v.span(), format!("parameter `{param_name}`: {why}")))?,
        ),
        (Some(v), ParamType::Id(_)) => {
            return Err(ctx.error(
                v.span(),
                format!("parameter `{param_name}`: an id parameter has no default"),
            ));
        }
    };
    if default.is_some() && !param.optional {
        return Err(ctx.error(
            name.span(),
            format!("parameter `{param_name}`: a default needs `optional = true`"),
        ));
    }
    if param.optional && matches!(ty, ParamType::Id(_)) {
        return Err(ctx.error(
            name.span(),
            format!("parameter `{param_name}`: an id parameter cannot be optional"),
        ));
    }
    Ok(ParamDef {
        name: param_name.into(),
        ty,
        optional: param.optional,
        default,
        min,
        max,
        max_len,
    })
}

fn compile_command(
    ctx: &Ctx<'_>,
    domain: &str,
    kinds: &[Arc<KindDef>],
    name: &Spanned<String>,
    command: &CommandFile,
) -> Result<CommandDef, LoadError> {
    let command_name = ctx.name(name, "command")?;
    let event = match &command.event {
        Some(e) => ctx.name(e, "event")?,
        None => command_name.clone(),
    };
    if command.params.len() > PARAMS_MAX {
        return Err(ctx.error(
            name.span(),
            format!("command `{command_name}` has more than {PARAMS_MAX} parameters"),
        ));
    }
    let mut params = Vec::new();
    for (param_name, param) in &command.params {
        params.push(compile_param(ctx, kinds, param_name, param)?);
    }
    // The scope: every parameter, then `now`, then each target's fields.
    let mut scope = Scope::new();
    for param in &params {
        scope
            .field("params", &param.name, param.ty.value_type())
            .map_err(|why| ctx.error(name.span(), why))?;
    }
    scope
        .var("now", Type::Timestamp)
        .map_err(|why| ctx.error(name.span(), why))?;
    let params_scope = scope.clone();
    if command.targets.is_empty() || command.targets.len() > TARGETS_MAX {
        return Err(ctx.error(
            name.span(),
            format!("command `{command_name}` needs 1 to {TARGETS_MAX} targets"),
        ));
    }
    let mut targets: Vec<TargetDef> = Vec::new();
    for target in &command.targets {
        let param_index = params
            .iter()
            .position(|p| p.name == *target.param.get_ref())
            .ok_or_else(|| {
                ctx.error(
                    target.param.span(),
                    format!(
                        "target `{}` is not a parameter of `{command_name}`",
                        target.param.get_ref()
                    ),
                )
            })?;
        let ParamType::Id(kind) = &params[param_index].ty else {
            return Err(ctx.error(
                target.param.span(),
                format!("target `{}` is not an id parameter", target.param.get_ref()),
            ));
        };
        if targets.iter().any(|t| t.param_index == param_index) {
            return Err(ctx.error(
                target.param.span(),
                format!("target `{}` is listed twice", target.param.get_ref()),
            ));
        }
        let must = match target.must.get_ref().as_str() {
            "exist" => Must::Exist,
            "not_exist" => Must::NotExist,
            other => {
                return Err(ctx.error(
                    target.must.span(),
                    format!("must = `{other}`: expected `exist` or `not_exist`"),
                ));
            }
        };
        let has_effects = command
            .effects
            .keys()
            .any(|k| k.get_ref() == target.param.get_ref());
        let action = match target.action.as_ref().map(|a| a.get_ref().as_str()) {
            None if must == Must::NotExist => Action::Create,
            None if has_effects => Action::Update,
            None => Action::Read,
            Some("create") => Action::Create,
            Some("update") => Action::Update,
            Some("delete") => Action::Delete,
            Some("read") => Action::Read,
            Some(other) => {
                return Err(ctx.error(
                    target.action.as_ref().map_or(0..0, Spanned::span),
                    format!("action = `{other}`: expected create, update, delete or read"),
                ));
            }
        };
        if (action == Action::Create) != (must == Must::NotExist) {
            return Err(ctx.error(
                target.must.span(),
                format!(
                    "target `{}`: a target is created exactly when it must not exist",
                    target.param.get_ref()
                ),
            ));
        }
        if matches!(action, Action::Delete | Action::Read) && has_effects {
            return Err(ctx.error(
                target.param.span(),
                format!(
                    "target `{}`: a {} target has no effects",
                    target.param.get_ref(),
                    if action == Action::Delete {
                        "deleted"
                    } else {
                        "read"
                    }
                ),
            ));
        }
        let code = match &target.code {
            Some(code) => ctx.name(code, "code")?,
            None if must == Must::Exist => format!("{}_not_found", kind.name),
            None => format!("{}_exists", kind.name),
        };
        let slot_base = scope.len();
        for field in &kind.fields {
            scope
                .field(target.param.get_ref(), &field.name, field.ty.clone())
                .map_err(|why| ctx.error(target.param.span(), why))?;
        }
        // The scope so far holds the parameters, `now` and the targets up to this one: what a
        // target check may read (a later target's fields are not known yet).
        let mut checks = Vec::new();
        for (index, pre) in target.checks.iter().enumerate() {
            let code = ctx.name(&pre.code, "code")?;
            let what = format!(
                "check {index} (`{code}`) of target `{}` of `{command_name}`",
                target.param.get_ref()
            );
            checks.push(Check {
                expr: ctx.expr(&pre.check, &scope, &Type::Bool, &what)?,
                message: match &pre.message {
                    Some(m) => Some(ctx.expr(m, &scope, &Type::String, &what)?),
                    None => None,
                },
                source: pre.check.get_ref().clone(),
                code,
            });
        }
        targets.push(TargetDef {
            checks,
            param: target.param.get_ref().clone(),
            param_index,
            kind: Arc::clone(kind),
            must,
            action,
            code,
            slot_base,
            effects: Vec::new(),
        });
    }
    for (target_name, fields) in &command.effects {
        let Some(target) = targets
            .iter_mut()
            .find(|t| t.param == *target_name.get_ref())
        else {
            return Err(ctx.error(
                target_name.span(),
                format!(
                    "effects name `{}`, which is not a target of `{command_name}`",
                    target_name.get_ref()
                ),
            ));
        };
        for (field_name, source) in fields {
            let Some(index) = target
                .kind
                .fields
                .iter()
                .position(|f| f.name == *field_name.get_ref())
            else {
                return Err(ctx.error(
                    field_name.span(),
                    format!(
                        "kind `{}` has no field `{}`",
                        target.kind.name,
                        field_name.get_ref()
                    ),
                ));
            };
            let ty = target.kind.fields[index].ty.clone();
            let what = format!(
                "effect on `{}.{}` of `{command_name}`",
                target.param,
                field_name.get_ref()
            );
            target
                .effects
                .push((index, ctx.expr(source, &scope, &ty, &what)?));
        }
    }
    if command.preconditions.len() > CHECKS_MAX {
        return Err(ctx.error(
            name.span(),
            format!("command `{command_name}` has more than {CHECKS_MAX} preconditions"),
        ));
    }
    let params_slots = params_scope.len();
    let mut param_checks = Vec::new();
    let mut state_checks = Vec::new();
    for (index, pre) in command.preconditions.iter().enumerate() {
        let code = ctx.name(&pre.code, "code")?;
        let what = format!("precondition {index} (`{code}`) of `{command_name}`");
        let check = Check {
            expr: ctx.expr(&pre.check, &scope, &Type::Bool, &what)?,
            message: match &pre.message {
                Some(m) => Some(ctx.expr(m, &scope, &Type::String, &what)?),
                None => None,
            },
            source: pre.check.get_ref().clone(),
            code,
        };
        let reads_state = check
            .expr
            .slots()
            .into_iter()
            .chain(check.message.iter().flat_map(Expr::slots))
            .any(|slot| slot.0 >= params_slots);
        if reads_state {
            state_checks.push(check);
        } else {
            param_checks.push(check);
        }
    }
    Ok(CommandDef {
        domain: domain.into(),
        name: command_name.into(),
        event: event.into(),
        description: command.description.clone(),
        params,
        targets,
        param_checks,
        state_checks,
        slots: scope.len(),
    })
}

fn compile_law(
    ctx: &Ctx<'_>,
    domain: &str,
    kinds: &[Arc<KindDef>],
    commands: &[Arc<CommandDef>],
    law: &LawFile,
) -> Result<LawDef, LoadError> {
    let name = law.name.get_ref().clone();
    let kind = kinds
        .iter()
        .find(|k| k.name == *law.kind.get_ref())
        .ok_or_else(|| {
            ctx.error(
                law.kind.span(),
                format!("law `{name}`: kind `{}` is not defined", law.kind.get_ref()),
            )
        })?;
    let scope = match law.scope.get_ref().as_str() {
        "total" => LawScope::Total,
        "per_aggregate" => LawScope::PerAggregate,
        other => {
            return Err(ctx.error(
                law.scope.span(),
                format!("law `{name}`: scope `{other}`: expected total or per_aggregate"),
            ));
        }
    };
    let mut kind_scope = Scope::new();
    for field in &kind.fields {
        kind_scope
            .field(&kind.name, &field.name, field.ty.clone())
            .map_err(|why| ctx.error(law.kind.span(), why))?;
    }
    let what = format!("quantity of law `{name}`");
    let quantity = Expr::compile(law.quantity.get_ref(), &kind_scope, &Type::Int, &ctx.limits)
        .or_else(|_| ctx.expr(&law.quantity, &kind_scope, &Type::Uint, &what))?;
    let mut flows = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (command_name, per_target) in &law.flows {
        let Some(command) = commands.iter().find(|c| c.name == *command_name.get_ref()) else {
            return Err(ctx.error(
                command_name.span(),
                format!(
                    "law `{name}`: `{}` is not a command of this domain",
                    command_name.get_ref()
                ),
            ));
        };
        seen.insert(command.name.clone());
        let mut target_flows = Vec::new();
        for (target_name, source) in per_target {
            let Some(index) = command
                .targets
                .iter()
                .position(|t| t.param == *target_name.get_ref())
            else {
                return Err(ctx.error(
                    target_name.span(),
                    format!(
                        "law `{name}`: `{}` is not a target of `{}`",
                        target_name.get_ref(),
                        command.name
                    ),
                ));
            };
            if command.targets[index].kind.name != kind.name {
                return Err(ctx.error(
                    target_name.span(),
                    format!(
                        "law `{name}`: target `{}` is a `{}`, the law sums `{}`",
                        target_name.get_ref(),
                        command.targets[index].kind.name,
                        kind.name
                    ),
                ));
            }
            // A flow reads the parameters and its target's fields before the command: the
            // event's own inputs, never the effects it is meant to cross-check.
            let mut flow_scope = Scope::new();
            for param in &command.params {
                flow_scope
                    .field("params", &param.name, param.ty.value_type())
                    .map_err(|why| ctx.error(command_name.span(), why))?;
            }
            for field in &kind.fields {
                flow_scope
                    .field(target_name.get_ref(), &field.name, field.ty.clone())
                    .map_err(|why| ctx.error(target_name.span(), why))?;
            }
            let what = format!("flow of law `{name}` for `{}`", command.name);
            target_flows.push((index, ctx.expr(source, &flow_scope, &Type::Int, &what)?));
        }
        flows.insert(command.name.to_string(), target_flows);
    }
    Ok(LawDef {
        name: format!("{domain}.{name}"),
        statement: law.statement.clone(),
        kind: kind.name.clone(),
        scope,
        quantity,
        flows,
    })
}
