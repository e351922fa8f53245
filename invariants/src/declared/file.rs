//! The definition file's shape (TOML, docs/DOMAINS.md): what serde reads before anything is
//! compiled. Every table refuses unknown keys, and every expression keeps its span so that an
//! error names the file's line.

use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

// Under `cfg(test)` these types also derive a JSON Schema (docs/domain.schema.json, for editors;
// the tests below keep it current). `Spanned<T>` and `toml::Value` have no schema of their own,
// so each such field names the type its schema shows (`schemars(with = ...)`), and the field
// doc comments become the schema's descriptions.

/// A declared domain: its aggregate kinds, its commands and its conservation laws
/// (docs/DOMAINS.md). Unknown keys are errors everywhere.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(title = "Keel domain definition"))]
#[serde(deny_unknown_fields)]
pub(super) struct DomainFile {
    /// The domain's name, unique among the loaded domains and not `ledger` or `inventory`.
    /// Names (of the domain, kinds, fields, commands, parameters and codes) are a lowercase
    /// letter, then lowercase letters, digits or `_`, at most 32 bytes.
    #[cfg_attr(test, schemars(with = "String"))]
    pub name: Spanned<String>,
    /// What the domain is for, for people (listed by `GET /v1/domains`).
    #[serde(default)]
    pub description: String,
    /// The aggregate kinds, by name: an aggregate of kind `k` has the id `k:<name>`.
    #[serde(default)]
    #[cfg_attr(test, schemars(with = "BTreeMap<String, KindFile>"))]
    pub kinds: BTreeMap<Spanned<String>, KindFile>,
    /// The commands, by name (at least one). A request names one as `<domain>.<command>`, or
    /// `<command>` alone when no other domain or built-in command has that name.
    #[serde(default)]
    #[cfg_attr(test, schemars(with = "BTreeMap<String, CommandFile>"))]
    pub commands: BTreeMap<Spanned<String>, CommandFile>,
    /// Conservation laws: a quantity summed over a kind's aggregates that must equal the flows
    /// of the commands.
    #[serde(default)]
    pub laws: Vec<LawFile>,
}

/// An aggregate kind: its fields and the invariants every state of it keeps.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct KindFile {
    /// What an aggregate of this kind is, for people.
    #[serde(default)]
    pub description: String,
    /// The state's fields, by name (at most 64). `id`, `kind`, `version`, `last_seq`,
    /// `updated_at` and `deleted` are reserved.
    #[serde(default)]
    #[cfg_attr(test, schemars(with = "BTreeMap<String, FieldFile>"))]
    pub fields: BTreeMap<Spanned<String>, FieldFile>,
    /// Checked on every state a command would leave; the first that fails refuses the command
    /// with its code.
    #[serde(default)]
    pub invariants: Vec<InvariantFile>,
}

/// A field of an aggregate's state.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct FieldFile {
    /// `int`, `uint`, `bool`, `string`, `timestamp`, `duration`, or `map(string, T)` with `T`
    /// one of those scalar types.
    #[serde(rename = "type")]
    #[cfg_attr(test, schemars(with = "String"))]
    pub ty: Spanned<String>,
    /// The value a created aggregate has when no effect sets the field (the type's zero when
    /// absent): an integer, `true`/`false`, a string, or `{}` for a map, matching the type
    /// (checked at load). Timestamps and durations take none: they start at zero.
    #[cfg_attr(test, schemars(with = "Option<schema::DefaultValue>"))]
    pub default: Option<Spanned<toml::Value>>,
    /// Strings: most bytes (default 256, at most 65536). Maps: most bytes of a key or a string
    /// value.
    pub max_len: Option<u32>,
    /// Maps: most entries (default 64, at most 1024).
    pub max_entries: Option<u32>,
}

/// A rule every state of the kind keeps.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct InvariantFile {
    /// The rejection code of a command that would break the invariant (a name).
    #[cfg_attr(test, schemars(with = "String"))]
    pub code: Spanned<String>,
    /// A CEL bool expression over the kind's fields (`<kind>.<field>`) that must hold.
    #[cfg_attr(test, schemars(with = "String"))]
    pub check: Spanned<String>,
    /// A CEL string expression over the same fields: the rejection's message.
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub message: Option<Spanned<String>>,
}

/// A command: what the client sends, the aggregates it targets, the checks it must pass and
/// the effects it has.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct CommandFile {
    /// What the command does, for people.
    #[serde(default)]
    pub description: String,
    /// The event's name in the log and the stream (the command's name when absent).
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub event: Option<Spanned<String>>,
    /// The parameters the client sends, by name (at most 32).
    #[serde(default)]
    #[cfg_attr(test, schemars(with = "BTreeMap<String, ParamFile>"))]
    pub params: BTreeMap<Spanned<String>, ParamFile>,
    /// The aggregates the command reads or writes (1 to 8), each named by an id parameter,
    /// checked in order.
    #[serde(default)]
    pub targets: Vec<TargetFile>,
    /// Checks in file order: those that read only `params` and `now` before the targets, the
    /// others after them.
    #[serde(default)]
    pub preconditions: Vec<PreconditionFile>,
    /// Per target (by its parameter name): field name -> expression.
    #[serde(default)]
    #[cfg_attr(test, schemars(with = "BTreeMap<String, BTreeMap<String, String>>"))]
    pub effects: BTreeMap<Spanned<String>, BTreeMap<Spanned<String>, Spanned<String>>>,
}

/// A command parameter.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct ParamFile {
    /// `id` (the name of an aggregate of `kind`), `int`, `uint`, `bool`, `string`, `timestamp`
    /// or `duration`.
    #[serde(rename = "type")]
    #[cfg_attr(test, schemars(with = "String"))]
    pub ty: Spanned<String>,
    /// For `type = "id"`: the aggregate kind the id names.
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub kind: Option<Spanned<String>>,
    /// The client may leave the parameter out; it then has its `default`, or the type's zero.
    /// An id parameter cannot be optional.
    #[serde(default)]
    pub optional: bool,
    /// The value of an optional parameter left out (needs `optional = true`; not for an id):
    /// an integer, `true`/`false` or a string, matching the type (checked at load).
    #[cfg_attr(test, schemars(with = "Option<schema::ParamDefault>"))]
    pub default: Option<Spanned<toml::Value>>,
    /// int and uint: the smallest value accepted.
    #[cfg_attr(test, schemars(with = "Option<i64>"))]
    pub min: Option<Spanned<i64>>,
    /// int and uint: the largest value accepted; a bound above 2^63-1 is written as a string of
    /// decimal digits.
    #[cfg_attr(test, schemars(with = "Option<schema::Bound>"))]
    pub max: Option<Spanned<toml::Value>>,
    /// Strings: most bytes (default 256, at most 65536).
    pub max_len: Option<u32>,
}

/// An aggregate a command reads or writes.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct TargetFile {
    /// The id parameter that names the aggregate; expressions read its fields as
    /// `<param>.<field>`.
    #[cfg_attr(test, schemars(with = "String"))]
    pub param: Spanned<String>,
    /// `exist` or `not_exist`.
    #[cfg_attr(test, schemars(with = "String"))]
    pub must: Spanned<String>,
    /// `create`, `update`, `delete` or `read`; from `must` and the effects when absent.
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub action: Option<Spanned<String>>,
    /// The rejection code when `must` does not hold (`<kind>_not_found` / `<kind>_exists`).
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub code: Option<Spanned<String>>,
    /// Checks run right after this target's existence check, before the next target's: they
    /// may read the parameters, `now` and the fields of this and earlier targets.
    #[serde(default)]
    pub checks: Vec<PreconditionFile>,
}

/// A check a command must pass.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct PreconditionFile {
    /// A CEL bool expression over `params`, `now` and the targets' fields that must hold.
    #[cfg_attr(test, schemars(with = "String"))]
    pub check: Spanned<String>,
    /// The rejection code when the check fails (a name).
    #[cfg_attr(test, schemars(with = "String"))]
    pub code: Spanned<String>,
    /// A CEL string expression: the rejection's message.
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub message: Option<Spanned<String>>,
}

/// A conservation law.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct LawFile {
    /// The law's name.
    #[cfg_attr(test, schemars(with = "String"))]
    pub name: Spanned<String>,
    /// What the law says, for people.
    #[serde(default)]
    pub statement: String,
    /// The aggregate kind whose quantity is summed.
    #[cfg_attr(test, schemars(with = "String"))]
    pub kind: Spanned<String>,
    /// `total` or `per_aggregate`.
    #[cfg_attr(test, schemars(with = "String"))]
    pub scope: Spanned<String>,
    /// An int or uint expression over the kind's fields (`<kind>.<field>`).
    #[cfg_attr(test, schemars(with = "String"))]
    pub quantity: Spanned<String>,
    /// Per command: per target parameter, the int expression it adds, over `params` and the
    /// target's fields before the command (`<param>.<field>`).
    #[serde(default)]
    #[cfg_attr(test, schemars(with = "BTreeMap<String, BTreeMap<String, String>>"))]
    pub flows: BTreeMap<Spanned<String>, BTreeMap<Spanned<String>, Spanned<String>>>,
}

/// Schemas for the values serde reads as `toml::Value`, which has none of its own: what the
/// loader (compile.rs) then accepts there.
#[cfg(test)]
mod schema {
    use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
    use std::borrow::Cow;

    /// A field's `default`: an integer, a boolean, a string or `{}` (compile.rs's
    /// `default_value`; which one is checked against the field's type at load).
    pub(super) struct DefaultValue;

    impl JsonSchema for DefaultValue {
        fn inline_schema() -> bool {
            true
        }

        fn schema_name() -> Cow<'static, str> {
            Cow::Borrowed("DefaultValue")
        }

        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({
                "type": ["integer", "boolean", "string", "object"],
                "maxProperties": 0,
            })
        }
    }

    /// A parameter's `default`: an integer, a boolean or a string (parameters are not maps).
    pub(super) struct ParamDefault;

    impl JsonSchema for ParamDefault {
        fn inline_schema() -> bool {
            true
        }

        fn schema_name() -> Cow<'static, str> {
            Cow::Borrowed("ParamDefault")
        }

        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({ "type": ["integer", "boolean", "string"] })
        }
    }

    /// A parameter's `max`: an integer, or decimal digits in a string for a uint bound TOML's
    /// integers (at most 2^63-1) cannot write.
    pub(super) struct Bound;

    impl JsonSchema for Bound {
        fn inline_schema() -> bool {
            true
        }

        fn schema_name() -> Cow<'static, str> {
            Cow::Borrowed("Bound")
        }

        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({ "type": ["integer", "string"], "pattern": "^[0-9]+$" })
        }
    }
}

/// docs/domain.schema.json, the JSON Schema editors check domain files with, is generated from
/// the types above and must equal what they generate now; every example file must pass it.
///
/// Validation uses the `jsonschema` crate without its default features (no HTTP, TLS or IDNA
/// stack; the schema has no remote references): real 2020-12 validation, including a check of
/// the schema itself against the meta-schema, for about 25 crates (regex and num among them)
/// built for this crate's unit tests only. A hand-written walk over the keys would have cost no
/// dependency but checked only key names, not types, required keys or the schema's validity.
#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a panic in a test is a test failure")]
mod tests {
    use super::*;
    use schemars::Schema;
    use schemars::generate::SchemaSettings;
    use schemars::transform::RecursiveTransform;
    use serde_json::Value;

    const SCHEMA_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/domain.schema.json");
    const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/domains");
    const SCHEMA_ID: &str = "urn:keel:domain-definition";
    const WRITE_VAR: &str = "KEEL_WRITE_DOMAIN_SCHEMA";

    /// The tables of a file whose keys are names the file chooses (kinds, fields, commands,
    /// parameters, effect and flow targets and fields), as paths with `*` for any name or
    /// index: a key nobody declared is a new name there, and an error everywhere else.
    const NAME_TABLES: &[&str] = &[
        "kinds",
        "kinds.*.fields",
        "commands",
        "commands.*.params",
        "commands.*.effects",
        "commands.*.effects.*",
        "laws.*.flows",
        "laws.*.flows.*",
    ];

    /// Fits a schema to TOML and to editors. TOML has no null: a value is left out by leaving
    /// out its key, which the schema already says by not requiring it, so the `null` schemars
    /// adds for an `Option` goes. A description's lines are a doc comment's wrapping: they are
    /// joined (a blank line still parts paragraphs).
    fn for_toml(schema: &mut Schema) {
        let Some(object) = schema.as_object_mut() else {
            return;
        };
        if let Some(Value::String(text)) = object.get_mut("description") {
            *text = text
                .split("\n\n")
                .map(|paragraph| paragraph.split('\n').collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join("\n\n");
        }
        if let Some(Value::Array(types)) = object.get_mut("type") {
            types.retain(|t| t != "null");
            if types.len() == 1 {
                let only = types.remove(0);
                object.insert("type".to_owned(), only);
            }
        }
        if let Some(Value::Array(options)) = object.get_mut("anyOf") {
            options.retain(|o| o.get("type").is_none_or(|t| t != "null"));
            if options.len() == 1 {
                let only = options.remove(0);
                object.remove("anyOf");
                if let Value::Object(only) = only {
                    for (key, value) in only {
                        object.entry(key).or_insert(value);
                    }
                }
            }
        }
    }

    /// Objects with their keys sorted, whatever serde_json's `preserve_order` (another crate of
    /// the workspace turns it on), so that the text is the same in every build.
    fn sorted(value: Value) -> Value {
        match value {
            Value::Object(object) => {
                let mut entries: Vec<(String, Value)> = object.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
            other => other,
        }
    }

    fn domain_schema() -> Value {
        let mut schema = SchemaSettings::draft2020_12()
            .with_transform(RecursiveTransform(for_toml))
            .into_generator()
            .into_root_schema_for::<DomainFile>();
        schema.insert("$id".to_owned(), SCHEMA_ID.into());
        sorted(schema.to_value())
    }

    fn domain_schema_text() -> String {
        let mut text = serde_json::to_string_pretty(&domain_schema()).unwrap();
        text.push('\n');
        text
    }

    fn validator() -> jsonschema::Validator {
        let schema = domain_schema();
        if let Err(e) = jsonschema::meta::validate(&schema) {
            panic!("the domain schema is not a valid JSON Schema: {e}");
        }
        jsonschema::validator_for(&schema).unwrap()
    }

    fn errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
        validator
            .iter_errors(instance)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect()
    }

    /// A TOML document as JSON, the way an editor's TOML support checks it.
    fn toml_to_json(text: &str) -> Value {
        serde_json::to_value(toml::from_str::<toml::Table>(text).unwrap()).unwrap()
    }

    #[test]
    fn domain_schema_is_current() {
        let text = domain_schema_text();
        if std::env::var_os(WRITE_VAR).is_some_and(|v| !v.is_empty() && v != "0") {
            std::fs::write(SCHEMA_PATH, &text).unwrap();
            return;
        }
        let checked_in = std::fs::read_to_string(SCHEMA_PATH).unwrap_or_default();
        if checked_in != text {
            let line = checked_in
                .lines()
                .zip(text.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| checked_in.lines().count().min(text.lines().count()))
                + 1;
            panic!(
                "docs/domain.schema.json differs from the schema of declared/file.rs's types \
                 (from line {line}); regenerate it with \
                 `{WRITE_VAR}=1 cargo test -p keel-invariants domain_schema` and review the diff"
            );
        }
    }

    #[test]
    fn domain_schema_names_itself_and_refuses_unknown_keys_everywhere() {
        let schema = domain_schema();
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        assert_eq!(schema["$id"], SCHEMA_ID);
        assert_eq!(schema["title"], "Keel domain definition");
        // Every table of the file's shape (the root and each definition) denies unknown keys,
        // as serde does.
        let defs = schema["$defs"].as_object().unwrap();
        assert!(defs.len() >= 8, "{defs:?}");
        for (name, def) in
            std::iter::once(("root", &schema)).chain(defs.iter().map(|(n, d)| (n.as_str(), d)))
        {
            assert_eq!(def["type"], "object", "{name}");
            assert_eq!(def["additionalProperties"], false, "{name}");
            for (key, property) in def["properties"].as_object().unwrap() {
                assert!(
                    property.get("description").is_some_and(Value::is_string),
                    "{name}.{key} has no description: give the field a doc comment"
                );
            }
        }
        assert!(!domain_schema_text().contains("null"), "TOML has no null");
    }

    /// Walks every table of `node` (a file as JSON at `path`, whose shape is `pattern`) and adds
    /// a misspelled copy of each of its keys: the schema must refuse it, unless the table is
    /// one of names. Returns how many documents it checked.
    fn misspell_every_key(
        validator: &jsonschema::Validator,
        root: &Value,
        pointer: &str,
        pattern: &str,
        file: &str,
    ) -> usize {
        let mut checked = 0;
        match root.pointer(pointer) {
            Some(Value::Object(table)) => {
                let names = NAME_TABLES.contains(&pattern);
                for (key, value) in table {
                    let mut changed = root.clone();
                    let target = changed
                        .pointer_mut(pointer)
                        .unwrap()
                        .as_object_mut()
                        .unwrap();
                    target.insert(format!("{key}_misspelled"), value.clone());
                    let refused = !validator.is_valid(&changed);
                    assert_eq!(
                        refused,
                        !names,
                        "{file}: a key `{key}_misspelled` beside `{key}` in `{pattern}` was {}",
                        if refused { "refused" } else { "accepted" }
                    );
                    checked += 1;
                    let child = format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1"));
                    let child_pattern = match (pattern, names) {
                        ("", _) => key.clone(),
                        (_, true) => format!("{pattern}.*"),
                        (_, false) => format!("{pattern}.{key}"),
                    };
                    checked += misspell_every_key(validator, root, &child, &child_pattern, file);
                }
            }
            Some(Value::Array(items)) => {
                for i in 0..items.len() {
                    let child = format!("{pointer}/{i}");
                    let child_pattern = format!("{pattern}.*");
                    checked += misspell_every_key(validator, root, &child, &child_pattern, file);
                }
            }
            _ => {}
        }
        checked
    }

    #[test]
    fn domain_schema_accepts_the_examples_and_refuses_misspelled_keys_in_them() {
        let validator = validator();
        let mut files = 0;
        for entry in std::fs::read_dir(EXAMPLES).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let file = path.display().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            // serde reads it as the loader does (that it then loads is tests/declared.rs's).
            if let Err(e) = toml::from_str::<DomainFile>(&text) {
                panic!("{file}: {e}");
            }
            let instance = toml_to_json(&text);
            let errors = errors(&validator, &instance);
            assert!(errors.is_empty(), "{file}: {errors:#?}");
            let checked = misspell_every_key(&validator, &instance, "", "", &file);
            assert!(checked >= 20, "{file}: {checked} keys");
            files += 1;
        }
        assert!(files >= 3, "{files} example files in {EXAMPLES}");
    }

    #[test]
    fn domain_schema_and_serde_refuse_the_same_unknown_keys() {
        const FILE: &str = r#"
name = "d"

[kinds.k]
fields.f = { type = "int", default = 1 }

[[kinds.k.invariants]]
code = "c"
check = "k.f > 0"

[commands.touch]
params.id = { type = "id", kind = "k" }
params.by = { type = "int", optional = true, default = 1, min = 1, max = "9223372036854775808" }
targets = [{ param = "id", must = "exist" }]
preconditions = [{ check = "params.by > 0", code = "bad" }]
effects.id = { f = "id.f + params.by" }

[[laws]]
name = "l"
kind = "k"
scope = "total"
quantity = "k.f"
flows.touch = { id = "params.by" }
"#;
        let validator = validator();
        toml::from_str::<DomainFile>(FILE).unwrap();
        let errors = errors(&validator, &toml_to_json(FILE));
        assert!(errors.is_empty(), "{errors:#?}");
        let typos = [
            ("name = \"d\"", "name = \"d\"\ndescripton = \"\""),
            ("[kinds.k]", "[kinds.k]\nfeilds.g = { type = \"int\" }"),
            ("type = \"int\", default = 1", "type = \"int\", defualt = 1"),
            ("code = \"c\"", "code = \"c\"\nmesage = \"''\""),
            ("[commands.touch]", "[commands.touch]\nevnet = \"touched\""),
            ("kind = \"k\" }", "kind = \"k\", optinal = false }"),
            (
                "must = \"exist\" }",
                "must = \"exist\", acton = \"update\" }",
            ),
            ("code = \"bad\" }", "code = \"bad\", mesage = \"''\" }"),
            ("scope = \"total\"", "scope = \"total\"\nstatment = \"\""),
        ];
        for (from, to) in typos {
            assert!(FILE.contains(from), "{from}");
            let text = FILE.replacen(from, to, 1);
            assert!(
                toml::from_str::<DomainFile>(&text).is_err(),
                "serde read {to}"
            );
            assert!(
                !validator.is_valid(&toml_to_json(&text)),
                "the schema accepts {to}"
            );
        }
        // A value of the wrong type, too.
        let text = FILE.replacen("default = 1 }", "default = 1.5 }", 1);
        assert!(!validator.is_valid(&toml_to_json(&text)), "a float default");
    }
}
