//! The conservation laws of declared domains (`keel serve --domain`), proven per version.
//!
//! A declared law is what its domain's definition text says, and that text can change between
//! restarts. So a law is proven one version at a time: a version comes into force with the
//! first batch whose recorded rules define it with that text, opening with every existing
//! aggregate's quantity as its opening flow (a law added to a domain with history holds from
//! then on), collects the flows of its domain's events while in force, and is checked when the
//! rules change its text (at that batch, against the states just before it) or at the log's end.

use super::replay::Replayed;
use super::{Check, Divergence};
use keel_invariants::LawScope;
use keel_invariants::declared::{
    DeclaredEvent, DeclaredState, DomainDef, DomainSet, KindDef, LawDef,
};
use std::collections::HashMap;
use std::sync::Arc;

/// One version of a declared law.
pub(super) struct LawVersion {
    pub(super) domain: Arc<DomainDef>,
    /// Index into `domain.laws`.
    law: usize,
    /// The first batch whose rules define this version (its opening point: the states just
    /// before that batch's events).
    pub(super) from_batch: u64,
    /// The batch whose rules replaced it (it was checked just before that batch); `None` while
    /// in force at the log's end.
    pub(super) to_batch: Option<u64>,
    /// `Total` scope: the opening quantities plus every flow since.
    total: i128,
}

impl LawVersion {
    pub(super) fn def(&self) -> &LawDef {
        &self.domain.laws[self.law]
    }

    fn kind(&self) -> Option<&KindDef> {
        let name = &self.def().kind;
        self.domain
            .kinds
            .iter()
            .find(|k| k.name == *name)
            .map(|k| k.as_ref())
    }

    /// The first 8 hex digits of the domain's definition hash: names the version.
    pub(super) fn domain_version(&self) -> String {
        domain_version(&self.domain)
    }

    fn describe(&self) -> String {
        let to = self
            .to_batch
            .map_or_else(String::new, |b| format!(" to batch {b}"));
        format!(
            "{} (definition {} of `{}`, in force from batch {}{to}): {}",
            self.def().name,
            self.domain_version(),
            self.domain.name,
            self.from_batch,
            self.def().statement
        )
    }
}

/// The first 8 hex digits of the BLAKE3 rules hash of a domain's definition text.
pub(super) fn domain_version(domain: &DomainDef) -> String {
    let hash = keel_engine::RuleSet::new(&domain.text).hash;
    hash[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Every version seen, and which are in force.
#[derive(Default)]
pub(super) struct DeclaredLaws {
    pub(super) versions: Vec<LawVersion>,
    in_force: Vec<usize>,
    /// The rule set `in_force` was taken from.
    rules: Option<Arc<DomainSet>>,
}

/// A declared aggregate's state, when `replayed` holds one.
fn declared(replayed: &Replayed) -> Option<&DeclaredState> {
    replayed.aggregate.state.downcast_ref::<DeclaredState>()
}

fn kind_of(id: &str) -> &str {
    id.split_once(':').map_or("", |(kind, _)| kind)
}

impl DeclaredLaws {
    /// Takes the laws of `rules`, in force from `batch`, when they are not the ones in force:
    /// versions whose text is gone are checked and closed, new ones open.
    pub(super) fn rules(
        &mut self,
        rules: &Arc<DomainSet>,
        batch: u64,
        aggregates: &mut HashMap<Box<str>, Replayed>,
        found: &mut Vec<Divergence>,
    ) {
        if self.rules.as_ref().is_some_and(|r| Arc::ptr_eq(r, rules)) {
            return;
        }
        self.rules = Some(Arc::clone(rules));
        let mut next = Vec::new();
        for domain in rules.domains() {
            for law in 0..domain.laws.len() {
                let same = self.in_force.iter().copied().find(|&v| {
                    let version = &self.versions[v];
                    version.law == law
                        && version.domain.name == domain.name
                        && version.domain.text == domain.text
                });
                if let Some(v) = same {
                    next.push(v);
                    continue;
                }
                let v = self.versions.len();
                self.versions.push(LawVersion {
                    domain: Arc::clone(domain),
                    law,
                    from_batch: batch,
                    to_batch: None,
                    total: 0,
                });
                self.open(v, aggregates, found, batch);
                next.push(v);
            }
        }
        let closing: Vec<usize> = self
            .in_force
            .iter()
            .copied()
            .filter(|v| !next.contains(v))
            .collect();
        for v in closing {
            self.versions[v].to_batch = Some(batch);
            self.check(v, aggregates, found);
        }
        self.in_force = next;
    }

    /// Opens version `v`: every aggregate of its kind brings its quantity as opening flow.
    fn open(
        &mut self,
        v: usize,
        aggregates: &mut HashMap<Box<str>, Replayed>,
        found: &mut Vec<Divergence>,
        batch: u64,
    ) {
        let version = &self.versions[v];
        let (law, Some(kind)) = (version.def(), version.kind()) else {
            return;
        };
        let mut total = 0i128;
        for (id, replayed) in aggregates.iter_mut() {
            if kind_of(id) != law.kind {
                continue;
            }
            let Some(state) = declared(replayed) else {
                continue;
            };
            match law.quantity(kind, state) {
                Ok(quantity) if law.scope == LawScope::Total => {
                    total = total.saturating_add(quantity);
                }
                Ok(quantity) => add(&mut replayed.declared_flows, v, quantity),
                Err(e) => found.push(
                    Divergence::new(
                        Check::Conservation,
                        format!(
                            "{}: the quantity does not evaluate: {e}",
                            version.describe()
                        ),
                    )
                    .on(id)
                    .at_batch(Some(batch)),
                ),
            }
        }
        self.versions[v].total = total;
    }

    /// Adds what declared `event` (of batch `batch`, event `seq`) moves for its target number
    /// `target` to every law version in force of its domain; `before` is the target's state
    /// just before the event. Returns the per-aggregate flows, to add to the target once folded.
    pub(super) fn flows(
        &mut self,
        event: &DeclaredEvent,
        target: usize,
        before: Option<&Replayed>,
        at: (u64, u64),
        found: &mut Vec<Divergence>,
        out: &mut Vec<(usize, i128)>,
    ) {
        let before = before.and_then(declared);
        for &v in &self.in_force {
            let version = &mut self.versions[v];
            if event.domain != version.domain.name {
                continue;
            }
            let Some(kind) = version.kind() else {
                continue;
            };
            let law = version.def();
            match law.flow(kind, event, target, before) {
                None => {}
                Some(Ok(flow)) if law.scope == LawScope::Total => {
                    version.total = version.total.saturating_add(flow);
                }
                Some(Ok(flow)) => out.push((v, flow)),
                Some(Err(e)) => {
                    let detail = format!("{}: a flow does not evaluate: {e}", version.describe());
                    let d = Divergence::new(Check::Conservation, detail);
                    found.push(d.at_seq(Some(at.0)).at_batch(Some(at.1)));
                }
            }
        }
    }

    /// Checks every version still in force (the log's end).
    pub(super) fn check_in_force(
        &self,
        aggregates: &HashMap<Box<str>, Replayed>,
        found: &mut Vec<Divergence>,
    ) {
        for &v in &self.in_force {
            self.check(v, aggregates, found);
        }
    }

    /// Version `v` holds over `aggregates` as they are now: per aggregate, its quantity equals
    /// its opening quantity plus its flows; in total, likewise summed over every aggregate.
    fn check(
        &self,
        v: usize,
        aggregates: &HashMap<Box<str>, Replayed>,
        found: &mut Vec<Divergence>,
    ) {
        let version = &self.versions[v];
        let (law, Some(kind)) = (version.def(), version.kind()) else {
            return;
        };
        let at_batch = version.to_batch;
        let mut total = 0i128;
        let mut failures = Vec::new();
        for (id, replayed) in aggregates {
            if kind_of(id) != law.kind {
                continue;
            }
            let Some(state) = declared(replayed) else {
                continue;
            };
            let quantity = match law.quantity(kind, state) {
                Ok(q) => q,
                Err(e) => {
                    let detail = format!(
                        "{}: the quantity does not evaluate: {e}",
                        version.describe()
                    );
                    failures.push(Divergence::new(Check::Conservation, detail).on(id));
                    continue;
                }
            };
            if law.scope == LawScope::Total {
                total = total.saturating_add(quantity);
                continue;
            }
            let flow = flow_of(&replayed.declared_flows, v);
            if flow != quantity {
                let d = Divergence::new(Check::Conservation, version.describe())
                    .on(id)
                    .at_seq(Some(replayed.last_seq))
                    .at_batch(Some(replayed.last_batch))
                    .expected_found(
                        format!("{flow} (the opening quantity plus the events' flows)"),
                        format!("{quantity} (the state the events fold to)"),
                    );
                failures.push(d);
            }
        }
        failures.sort_by_key(|d| d.seq);
        found.extend(failures);
        if law.scope == LawScope::Total && total != version.total {
            let d = Divergence::new(Check::Conservation, version.describe())
                .at_batch(at_batch)
                .expected_found(
                    format!(
                        "{} (the opening quantities plus the events' flows)",
                        version.total
                    ),
                    format!("{total} (the states the events fold to)"),
                );
            found.push(d);
        }
    }
}

/// Per-aggregate flows of the declared law versions: (version, opening quantity plus flows).
/// A boxed slice keeps the replay's entry small; it grows only when a version first touches
/// the aggregate.
pub(super) type Flows = Option<Box<[(usize, i128)]>>;

/// Adds `amount` to version `v`'s per-aggregate flow in `slot`.
pub(super) fn add(slot: &mut Flows, v: usize, amount: i128) {
    if let Some((_, sum)) = slot
        .as_deref_mut()
        .and_then(|flows| flows.iter_mut().find(|(version, _)| *version == v))
    {
        *sum = sum.saturating_add(amount);
        return;
    }
    let mut flows = slot.take().map(Vec::from).unwrap_or_default();
    flows.push((v, amount));
    *slot = Some(flows.into_boxed_slice());
}

fn flow_of(slot: &Flows, v: usize) -> i128 {
    slot.as_deref()
        .and_then(|flows| flows.iter().find(|(version, _)| *version == v))
        .map_or(0, |(_, sum)| *sum)
}
