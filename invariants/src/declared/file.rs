//! The definition file's shape (TOML, docs/DOMAINS.md): what serde reads before anything is
//! compiled. Every table refuses unknown keys, and every expression keeps its span so that an
//! error names the file's line.

use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DomainFile {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub kinds: BTreeMap<Spanned<String>, KindFile>,
    #[serde(default)]
    pub commands: BTreeMap<Spanned<String>, CommandFile>,
    #[serde(default)]
    pub laws: Vec<LawFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KindFile {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub fields: BTreeMap<Spanned<String>, FieldFile>,
    #[serde(default)]
    pub invariants: Vec<InvariantFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FieldFile {
    #[serde(rename = "type")]
    pub ty: Spanned<String>,
    pub default: Option<Spanned<toml::Value>>,
    /// Strings: most bytes.
    pub max_len: Option<u32>,
    /// Maps: most entries.
    pub max_entries: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InvariantFile {
    pub code: Spanned<String>,
    pub check: Spanned<String>,
    pub message: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CommandFile {
    #[serde(default)]
    pub description: String,
    /// The event's name in the log and the stream (the command's name when absent).
    pub event: Option<Spanned<String>>,
    #[serde(default)]
    pub params: BTreeMap<Spanned<String>, ParamFile>,
    #[serde(default)]
    pub targets: Vec<TargetFile>,
    #[serde(default)]
    pub preconditions: Vec<PreconditionFile>,
    /// Per target (by its parameter name): field name -> expression.
    #[serde(default)]
    pub effects: BTreeMap<Spanned<String>, BTreeMap<Spanned<String>, Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ParamFile {
    #[serde(rename = "type")]
    pub ty: Spanned<String>,
    /// For `type = "id"`: the aggregate kind the id names.
    pub kind: Option<Spanned<String>>,
    #[serde(default)]
    pub optional: bool,
    pub default: Option<Spanned<toml::Value>>,
    pub min: Option<Spanned<i64>>,
    pub max: Option<Spanned<toml::Value>>,
    pub max_len: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TargetFile {
    pub param: Spanned<String>,
    /// `exist` or `not_exist`.
    pub must: Spanned<String>,
    /// `create`, `update`, `delete` or `read`; from `must` and the effects when absent.
    pub action: Option<Spanned<String>>,
    /// The rejection code when `must` does not hold (`<kind>_not_found` / `<kind>_exists`).
    pub code: Option<Spanned<String>>,
    /// Checks run right after this target's existence check, before the next target's: they
    /// may read the parameters, `now` and the fields of this and earlier targets.
    #[serde(default)]
    pub checks: Vec<PreconditionFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PreconditionFile {
    pub check: Spanned<String>,
    pub code: Spanned<String>,
    pub message: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LawFile {
    pub name: Spanned<String>,
    #[serde(default)]
    pub statement: String,
    pub kind: Spanned<String>,
    /// `total` or `per_aggregate`.
    pub scope: Spanned<String>,
    /// An int or uint expression over the kind's fields (`<kind>.<field>`).
    pub quantity: Spanned<String>,
    /// Per command: per target parameter, the int expression it adds, over `params` and the
    /// target's fields before the command (`<param>.<field>`).
    #[serde(default)]
    pub flows: BTreeMap<Spanned<String>, BTreeMap<Spanned<String>, Spanned<String>>>,
}
