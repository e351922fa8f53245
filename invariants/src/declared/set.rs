//! The loaded declared domains: names resolved across files, clashes refused, and the rules
//! text the log records (the built-in rules followed by every definition file, framed).

use super::{CommandDef, DeclaredState, DomainDef, KindDef, LawDef, LoadError};
use crate::BUILTIN_RULES;
use crate::domain::{AggregateId, Violation};
use crate::registry::{Aggregate, DomainRules, State};
use std::collections::HashMap;
use std::sync::Arc;

/// The line that opens each definition file inside a rules text:
/// `#### keel domain file <name> <bytes>`, then the file's bytes, then a newline.
pub const RULES_FILE_MARK: &str = "#### keel domain file ";

/// Every domain a server, an audit or a projector works with: the registry, keyed by aggregate
/// kind. It always holds the built-in domains, then every loaded definition file.
#[derive(Debug)]
pub struct DomainSet {
    domains: Vec<Arc<DomainDef>>,
    /// Every domain, built-in first, as the registry routes to them.
    registry: Vec<Arc<dyn DomainRules>>,
    /// Aggregate kind -> position in `registry`.
    by_kind: HashMap<String, usize>,
    rules_text: String,
}

impl Default for DomainSet {
    fn default() -> Self {
        Self::builtin()
    }
}

/// The built-in domains as registry entries.
fn builtin_registry() -> Vec<Arc<dyn DomainRules>> {
    crate::builtin_domains()
        .into_iter()
        .map(|d| Arc::new(Shared(d)) as Arc<dyn DomainRules>)
        .collect()
}

/// A `'static` domain (a built-in one) held by the registry like a loaded one.
#[derive(Debug)]
struct Shared(&'static dyn DomainRules);

impl DomainRules for Shared {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn kinds(&self) -> Vec<&str> {
        self.0.kinds()
    }

    fn command_types(&self) -> Vec<&str> {
        self.0.command_types()
    }

    fn reject_codes(&self) -> Vec<String> {
        self.0.reject_codes()
    }

    fn check(&self, id: &AggregateId, state: &State) -> Result<(), Violation> {
        self.0.check(id, state)
    }

    fn laws(&self) -> Vec<crate::Law> {
        self.0.laws()
    }
}

/// How a command type resolved.
pub enum Resolved<'a> {
    /// Not a declared command (a built-in type, or unknown).
    None,
    Command(&'a Arc<CommandDef>),
    /// An unqualified name two domains define.
    Ambiguous(Vec<String>),
}

impl DomainSet {
    /// The built-in domains alone.
    pub fn builtin() -> Self {
        Self::assemble(Vec::new(), BUILTIN_RULES.to_string())
    }

    fn assemble(domains: Vec<Arc<DomainDef>>, rules_text: String) -> Self {
        let mut registry = builtin_registry();
        registry.extend(
            domains
                .iter()
                .map(|d| Arc::clone(d) as Arc<dyn DomainRules>),
        );
        let mut by_kind = HashMap::new();
        for (at, domain) in registry.iter().enumerate() {
            for kind in domain.kinds() {
                by_kind.insert(kind.to_string(), at);
            }
        }
        Self {
            domains,
            registry,
            by_kind,
            rules_text,
        }
    }

    /// Every domain, built-in ones first.
    pub fn registry(&self) -> &[Arc<dyn DomainRules>] {
        &self.registry
    }

    /// The domain that owns aggregate kind `kind`.
    pub fn domain_of_kind(&self, kind: &str) -> Option<&Arc<dyn DomainRules>> {
        self.by_kind.get(kind).and_then(|at| self.registry.get(*at))
    }

    /// Compiles every `(file, text)` and checks them together: a domain, kind or (qualified)
    /// command name defined twice, or one a built-in domain owns, is refused naming the file.
    pub fn load(files: &[(String, String)]) -> Result<Self, LoadError> {
        let mut domains: Vec<Arc<DomainDef>> = Vec::new();
        for (file, text) in files {
            let domain = DomainDef::compile(file, text)?;
            let clash = |message: String| LoadError {
                file: file.clone(),
                line: 1,
                column: 1,
                message,
            };
            let builtin = crate::builtin_domains();
            if builtin.iter().any(|b| b.name() == domain.name) {
                return Err(clash(format!(
                    "domain `{}` is a built-in domain's name",
                    domain.name
                )));
            }
            if let Some(other) = domains.iter().find(|d| d.name == domain.name) {
                return Err(clash(format!(
                    "domain `{}` is also defined by {}",
                    domain.name, other.file
                )));
            }
            for kind in &domain.kinds {
                if builtin
                    .iter()
                    .any(|b| b.kinds().contains(&kind.name.as_str()))
                {
                    return Err(clash(format!(
                        "kind `{}` belongs to a built-in domain",
                        kind.name
                    )));
                }
                if let Some(other) = domains
                    .iter()
                    .find(|d| d.kinds.iter().any(|k| k.name == kind.name))
                {
                    return Err(clash(format!(
                        "kind `{}` is also defined by domain `{}` ({})",
                        kind.name, other.name, other.file
                    )));
                }
            }
            domains.push(Arc::new(domain));
        }
        domains.sort_by(|a, b| a.name.cmp(&b.name));
        let mut rules_text = BUILTIN_RULES.to_string();
        for domain in &domains {
            rules_text.push_str(RULES_FILE_MARK);
            rules_text.push_str(&domain.name);
            rules_text.push(' ');
            rules_text.push_str(&domain.text.len().to_string());
            rules_text.push('\n');
            rules_text.push_str(&domain.text);
            rules_text.push('\n');
        }
        Ok(Self::assemble(domains, rules_text))
    }

    /// The declared domains a log's rules text records (the audit's view of a rule set).
    pub fn from_rules_text(text: &str) -> Result<Self, LoadError> {
        let files: Vec<(String, String)> = Self::recorded_files(text)?
            .into_iter()
            .map(|(name, file)| (format!("<log: domain {name}>"), file.to_owned()))
            .collect();
        Self::load(&files)
    }

    /// The definition files a rules text records, as (domain name, file text), without
    /// compiling them.
    pub fn recorded_files(text: &str) -> Result<Vec<(&str, &str)>, LoadError> {
        let fail = |message: String| LoadError {
            file: "<rules text in the log>".to_string(),
            line: 1,
            column: 1,
            message,
        };
        let mut files = Vec::new();
        let mut rest = match text.find(RULES_FILE_MARK) {
            Some(start) => &text[start..],
            None => "",
        };
        while let Some(after) = rest.strip_prefix(RULES_FILE_MARK) {
            let (header, body) = after
                .split_once('\n')
                .ok_or_else(|| fail("a domain file mark has no end of line".to_string()))?;
            let (name, len) = header
                .rsplit_once(' ')
                .ok_or_else(|| fail(format!("domain file mark `{header}` has no length")))?;
            let len: usize = len
                .parse()
                .map_err(|_| fail(format!("domain file mark `{header}` has no length")))?;
            let file = body
                .get(..len)
                .ok_or_else(|| fail(format!("domain file `{name}` is cut short")))?;
            files.push((name, file));
            rest = body
                .get(len..)
                .and_then(|r| r.strip_prefix('\n'))
                .ok_or_else(|| {
                    fail(format!("domain file `{name}` is not followed by a newline"))
                })?;
        }
        if !rest.is_empty() {
            return Err(fail("text after the last domain file".to_string()));
        }
        Ok(files)
    }

    /// The rules text every batch committed under this set names (by hash) and the log
    /// records once.
    pub fn rules_text(&self) -> &str {
        &self.rules_text
    }

    pub fn domains(&self) -> &[Arc<DomainDef>] {
        &self.domains
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// The declared command a request's `type` names: `<domain>.<command>`, or `<command>`
    /// when exactly one loaded domain defines it and no built-in type has that name.
    pub fn resolve(&self, type_name: &str) -> Resolved<'_> {
        if let Some((domain, command)) = type_name.split_once('.') {
            return self
                .domains
                .iter()
                .find(|d| d.name == domain)
                .and_then(|d| d.commands.iter().find(|c| c.name == command))
                .map_or(Resolved::None, Resolved::Command);
        }
        if crate::registry::is_builtin_command(type_name) {
            return Resolved::None;
        }
        let mut found = self
            .domains
            .iter()
            .flat_map(|d| d.commands.iter())
            .filter(|c| c.name == type_name);
        match (found.next(), found.next()) {
            (None, _) => Resolved::None,
            (Some(command), None) => Resolved::Command(command),
            (Some(a), Some(b)) => {
                let mut names = vec![a.qualified(), b.qualified()];
                names.extend(found.map(|c| c.qualified()));
                Resolved::Ambiguous(names)
            }
        }
    }

    /// Every command type a request may name, for error messages.
    pub fn command_names(&self) -> Vec<String> {
        self.domains
            .iter()
            .flat_map(|d| d.commands.iter())
            .map(|c| c.qualified())
            .collect()
    }

    /// The declared kind an aggregate id names.
    pub fn kind(&self, kind: &str) -> Option<&Arc<KindDef>> {
        self.domains
            .iter()
            .flat_map(|d| d.kinds.iter())
            .find(|k| k.name == kind)
    }

    /// Every law of every declared domain.
    pub fn laws(&self) -> impl Iterator<Item = &LawDef> {
        self.domains.iter().flat_map(|d| d.laws.iter())
    }

    /// Every invariant of `aggregate` (stored under `id`), checked by the domain that owns the
    /// id's kind. A kind no domain owns is a violation.
    pub fn check_invariants(
        &self,
        id: &AggregateId,
        aggregate: &Aggregate,
    ) -> Result<(), Violation> {
        match self.domain_of_kind(id.kind()) {
            Some(domain) => domain.check(id, &aggregate.state),
            None => Err(Violation {
                invariant: "declared kind".into(),
                detail: format!(
                    "{id} is of kind `{}`, which no domain in the rules defines",
                    id.kind()
                ),
            }),
        }
    }
}

impl DomainRules for DomainDef {
    fn name(&self) -> &str {
        &self.name
    }

    fn kinds(&self) -> Vec<&str> {
        self.kinds.iter().map(|k| k.name.as_str()).collect()
    }

    fn command_types(&self) -> Vec<&str> {
        self.commands.iter().map(|c| c.name.as_str()).collect()
    }

    fn reject_codes(&self) -> Vec<String> {
        let mut codes: Vec<String> = self
            .commands
            .iter()
            .flat_map(|c| c.reject_codes())
            .map(str::to_string)
            .collect();
        codes.sort_unstable();
        codes.dedup();
        codes
    }

    fn check(&self, id: &AggregateId, state: &State) -> Result<(), Violation> {
        let Some(kind) = self.kinds.iter().find(|k| k.name == id.kind()) else {
            return Err(Violation {
                invariant: "declared kind".into(),
                detail: format!("{id} is not of a kind of domain `{}`", self.name),
            });
        };
        match state.downcast_ref::<DeclaredState>() {
            Some(state) => kind.check(state),
            None => Err(Violation {
                invariant: "state of its kind".into(),
                detail: format!("{id} holds a state of another domain: {state:?}"),
            }),
        }
    }
}
