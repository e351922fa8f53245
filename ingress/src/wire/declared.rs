//! The JSON of declared domains: a command's fields checked against its definition's
//! parameters, and declared states and events rendered with their fields.

use super::{Item, WireError, check_name, quote};
use keel_invariants::declared::{
    CommandDef, DeclaredCommand, DeclaredEvent, DeclaredState, DomainSet, Must, ParamType, Type,
    Value, expr,
};
use keel_invariants::{AggregateId, Command};
use serde_json::{Map, json};
use std::sync::Arc;

/// Builds the command `item` names from its fields as sent.
pub(super) fn command(
    item: &Item<'_>,
    def: Arc<CommandDef>,
    mut fields: Map<String, serde_json::Value>,
) -> Result<Command, WireError> {
    let mut params = Vec::with_capacity(def.params.len());
    let mut targets = Vec::with_capacity(def.targets.len());
    for param in &def.params {
        let value = match fields.remove(param.name.as_str()) {
            None | Some(serde_json::Value::Null) if param.optional => param.absent(),
            None | Some(serde_json::Value::Null) => {
                return Err(item.error(
                    "missing_field",
                    format!("field `{}` is required", param.name),
                ));
            }
            Some(sent) => {
                let value = convert(item, &param.name, &param.ty, &sent)?;
                param.check(&value).map_err(|why| {
                    item.error("invalid_field", format!("field `{}` {why}", param.name))
                })?;
                value
            }
        };
        params.push(value);
    }
    if let Some(extra) = fields.keys().next() {
        let known: Vec<&str> = def.params.iter().map(|p| p.name.as_str()).collect();
        return Err(item.error(
            "unexpected_field",
            format!(
                "field {} does not belong to this command type; its fields are {}",
                quote(extra),
                known.join(", ")
            ),
        ));
    }
    for target in &def.targets {
        let Value::String(name) = &params[target.param_index] else {
            return Err(item.error(
                "invalid_field",
                format!("field `{}` must be a string", target.param),
            ));
        };
        targets.push(AggregateId::new(&target.kind.name, name));
    }
    Ok(Command::new(DeclaredCommand {
        def,
        params,
        targets,
    }))
}

fn convert(
    item: &Item<'_>,
    field: &str,
    ty: &ParamType,
    sent: &serde_json::Value,
) -> Result<Value, WireError> {
    let wrong = |expected: &str| {
        item.error(
            "invalid_field",
            format!("field `{field}` must be {expected}"),
        )
    };
    // Integers: a JSON integer, a whole number a double holds exactly, or a decimal string
    // (for values a JavaScript client cannot hold as a number), as for the built-in commands.
    let integer = || -> Option<i128> {
        match sent {
            serde_json::Value::Number(n) => n
                .as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from))
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0)
                        .map(|f| f as i128)
                }),
            serde_json::Value::String(s) if !s.is_empty() && s.len() <= 20 => s.parse().ok(),
            _ => None,
        }
    };
    Ok(match ty {
        ParamType::Id(kind) => {
            let serde_json::Value::String(name) = sent else {
                return Err(wrong(&format!("the name of a `{}`", kind.name)));
            };
            check_name(name)
                .map_err(|why| item.error("invalid_name", format!("field `{field}` {why}")))?;
            Value::String(name.clone())
        }
        ParamType::Value(Type::Int) => integer()
            .and_then(|n| i64::try_from(n).ok())
            .map(Value::Int)
            .ok_or_else(|| wrong(&format!("an integer from {} to {}", i64::MIN, i64::MAX)))?,
        ParamType::Value(Type::Uint) => integer()
            .and_then(|n| u64::try_from(n).ok())
            .map(Value::Uint)
            .ok_or_else(|| wrong(&format!("an integer from 0 to {}", u64::MAX)))?,
        ParamType::Value(Type::Bool) => match sent {
            serde_json::Value::Bool(b) => Value::Bool(*b),
            _ => return Err(wrong("true or false")),
        },
        ParamType::Value(Type::String) => match sent {
            serde_json::Value::String(s) => Value::String(s.clone()),
            _ => return Err(wrong("a string")),
        },
        ParamType::Value(Type::Timestamp) => match sent {
            serde_json::Value::String(s) => expr::parse_timestamp(s)
                .ok()
                .map(Value::Timestamp)
                .ok_or_else(|| wrong("an RFC 3339 UTC time, e.g. \"2026-12-01T09:30:00Z\""))?,
            _ => return Err(wrong("an RFC 3339 UTC time, e.g. \"2026-12-01T09:30:00Z\"")),
        },
        ParamType::Value(Type::Duration) => match sent {
            serde_json::Value::String(s) => expr::parse_duration(s)
                .ok()
                .map(Value::Duration)
                .ok_or_else(|| wrong("a duration, e.g. \"15m\" or \"1h30m\""))?,
            _ => return Err(wrong("a duration, e.g. \"15m\" or \"1h30m\"")),
        },
        ParamType::Value(Type::Map(_)) => return Err(wrong("a scalar")),
    })
}

/// A declared value as JSON: integers above 2^53 - 1 as decimal strings (as the built-in
/// answers are not, but a declared uint may use its whole range), times in RFC 3339.
pub fn value_json(value: &Value) -> serde_json::Value {
    const EXACT: u64 = 9_007_199_254_740_991;
    match value {
        Value::Int(n) if n.unsigned_abs() <= EXACT => json!(n),
        Value::Int(n) => json!(n.to_string()),
        Value::Uint(n) if *n <= EXACT => json!(n),
        Value::Uint(n) => json!(n.to_string()),
        Value::Bool(b) => json!(b),
        Value::String(s) => json!(s),
        Value::Timestamp(us) => match expr::format_timestamp(*us) {
            Some(text) => json!(text),
            None => json!(us),
        },
        Value::Duration(us) => json!(expr::format_duration(*us)),
        Value::Map(m) => {
            serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), value_json(v))).collect())
        }
    }
}

pub fn state_json(state: &DeclaredState) -> serde_json::Value {
    let mut out: Map<String, serde_json::Value> = state
        .fields
        .iter()
        .map(|(k, v)| (k.to_string(), value_json(v)))
        .collect();
    if state.deleted {
        out.insert("deleted".to_string(), json!(true));
    }
    serde_json::Value::Object(out)
}

/// An event's `data`: its domain, command, parameters by name and each target's effect.
pub fn event_json(event: &DeclaredEvent) -> serde_json::Value {
    json!({
        "domain": event.domain,
        "command": event.command,
        "params": event.params.iter().map(|(k, v)| (k.to_string(), value_json(v))).collect::<Map<_, _>>(),
        "effects": event.effects.iter().map(|e| match e {
            keel_invariants::declared::Effect::Create(fields) => json!({"create": fields.iter().map(|(k, v)| (k.to_string(), value_json(v))).collect::<Map<_, _>>()}),
            keel_invariants::declared::Effect::Update(fields) => json!({"update": fields.iter().map(|(k, v)| (k.to_string(), value_json(v))).collect::<Map<_, _>>()}),
            keel_invariants::declared::Effect::Delete => json!("delete"),
            keel_invariants::declared::Effect::Read => json!("read"),
        }).collect::<Vec<_>>(),
    })
}

/// The `GET /v1/domains` body.
pub fn domains_json(set: &DomainSet) -> serde_json::Value {
    let rules_hash = keel_engine::format::hex(&keel_engine::RuleSet::new(set.rules_text()).hash);
    let domains: Vec<serde_json::Value> = set
        .domains()
        .iter()
        .map(|d| {
            let kinds: Vec<serde_json::Value> = d
                .kinds
                .iter()
                .map(|k| {
                    json!({
                        "name": k.name,
                        "description": k.description,
                        "fields": k.fields.iter().map(|f| json!({
                            "name": f.name,
                            "type": f.ty.name(),
                            "default": value_json(&f.default),
                        })).collect::<Vec<_>>(),
                        "invariants": k.invariants.iter().map(|i| json!({
                            "code": i.code, "check": i.source,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let commands: Vec<serde_json::Value> = d
                .commands
                .iter()
                .map(|c| {
                    let codes = c.reject_codes();
                    json!({
                        "name": c.name,
                        "type": c.qualified(),
                        "event": c.event,
                        "description": c.description,
                        "params": c.params.iter().map(|p| {
                            let mut param = json!({
                                "name": p.name,
                                "type": p.ty.name(),
                                "optional": p.optional,
                            });
                            if let ParamType::Id(kind) = &p.ty {
                                param["kind"] = json!(kind.name);
                            }
                            if let Some(min) = p.min { param["min"] = json!(min.to_string()); }
                            if let Some(max) = p.max { param["max"] = json!(max.to_string()); }
                            if matches!(p.ty, ParamType::Value(Type::String)) { param["max_len"] = json!(p.max_len); }
                            param
                        }).collect::<Vec<_>>(),
                        "targets": c.targets.iter().map(|t| json!({
                            "param": t.param,
                            "kind": t.kind.name,
                            "must": match t.must { Must::Exist => "exist", Must::NotExist => "not_exist" },
                            "action": t.action.as_str(),
                        })).collect::<Vec<_>>(),
                        "rejection_codes": codes,
                    })
                })
                .collect();
            json!({
                "name": d.name,
                "description": d.description,
                "file": d.file,
                "kinds": kinds,
                "commands": commands,
                "laws": d.laws.iter().map(|l| json!({"name": l.name, "statement": l.statement, "kind": l.kind, "scope": l.scope.as_str()})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let builtin: Vec<serde_json::Value> = keel_invariants::builtin_domains()
        .iter()
        .map(|d| {
            json!({
                "name": d.name(),
                "kinds": d.kinds(),
                "commands": d.command_types(),
                "rejection_codes": d.reject_codes(),
                "laws": d.laws().iter().map(|l| json!({"name": l.name(), "statement": l.statement(), "scope": l.scope().as_str()})).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "rule_set": rules_hash,
        "builtin_domains": builtin,
        "core_rejection_codes": ["version_conflict", "atomic_rollback", "overflow", "wrong_kind",
            keel_invariants::declared::EVALUATION_ERROR, keel_invariants::declared::DUPLICATE_TARGET,
            keel_invariants::declared::FIELD_LIMIT],
        "domains": domains,
    })
}
