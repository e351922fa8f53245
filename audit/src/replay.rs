//! The chain-and-replay pipeline: this thread scans and hashes the log ([`Feeder`]), a second
//! thread decodes every event and folds it into the recomputed aggregates ([`Replay`]).

use super::command_ids::{Carried, Fingerprints};
use super::declared_laws::{self, DeclaredLaws};
use super::{AuditReport, Check, Divergence, Rejected};
use keel_invariants::declared::{DeclaredEvent, DomainSet, Resolved};
use keel_invariants::{Aggregate, Law, LawScope, State, apply, codec, conservation_laws, ledger};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender};

/// Events handed from the chain thread to the replay thread at a time.
pub(super) const CHUNK_EVENTS: usize = 4096;
/// Chunks in flight between the two threads: bounds the audit's memory.
pub(super) const CHUNKS_IN_FLIGHT: usize = 4;

/// Stored events on their way to the replay: payloads back to back in one buffer. Chunks
/// travel back empty to be refilled, so the pipeline allocates nothing per event and every
/// decoded value is allocated and freed on the replay thread.
#[derive(Default)]
pub(super) struct Chunk {
    bytes: Vec<u8>,
    /// (seq, batch, end of the payload in `bytes`).
    events: Vec<(u64, u64, usize)>,
    /// The rules and commit time of each batch whose events are in the chunk, in order.
    batches: Vec<BatchRules>,
}

/// What a declared event is decided again under: its batch's rules and commit time.
#[derive(Clone)]
pub(super) struct BatchRules {
    pub(super) batch: u64,
    pub(super) committed_at_us: u64,
    pub(super) domains: Arc<DomainSet>,
}

impl Chunk {
    fn push(&mut self, seq: u64, batch: u64, payload: &[u8]) {
        self.bytes.extend_from_slice(payload);
        self.events.push((seq, batch, self.bytes.len()));
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64, &[u8])> {
        let starts = std::iter::once(0).chain(self.events.iter().map(|e| e.2));
        self.events
            .iter()
            .zip(starts)
            .map(|(&(seq, batch, end), start)| (seq, batch, &self.bytes[start..end]))
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.events.clear();
        self.batches.clear();
    }
}

/// The chain side of the pipeline: counts the events it is handed and sends them to the
/// replay thread in chunks.
pub(super) struct Feeder {
    tx: SyncSender<Chunk>,
    /// Chunks the replay thread emptied.
    returned: Receiver<Chunk>,
    chunk: Chunk,
    pub(super) events: u64,
    batches: u64,
    /// The last batch fed (events or rejections).
    pub(super) last_batch: u64,
    pub(super) last_seq: u64,
    /// Records that are not events at all, merged into the report afterwards.
    pub(super) found: AuditReport,
    fingerprints: Fingerprints,
    /// Every rejection the log keeps (the `command_index` check).
    rejected: Vec<Rejected>,
    /// Every rule set the log records, by hash, compiled.
    rule_sets: HashMap<[u8; 32], Arc<DomainSet>>,
    /// The rules of the record being fed.
    current: Option<BatchRules>,
    /// The rule sets the records name, run by run, in log order.
    pub(super) seen: Vec<super::RuleSetSeen>,
}

impl Feeder {
    pub(super) fn new(
        tx: SyncSender<Chunk>,
        returned: Receiver<Chunk>,
        max_divergences: usize,
        fingerprints: Fingerprints,
    ) -> Self {
        Self {
            tx,
            returned,
            chunk: Chunk::default(),
            events: 0,
            batches: 0,
            last_batch: 0,
            last_seq: 0,
            found: AuditReport::new(max_divergences),
            fingerprints,
            rejected: Vec::new(),
            rule_sets: HashMap::new(),
            current: None,
            seen: Vec::new(),
        }
    }

    /// A record begins: its rules text, when it carries one, is compiled (the domains it
    /// defines are what its batch and the next ones under the same hash are decided under).
    pub(super) fn record(&mut self, record: &keel_engine::RecordView<'_>) {
        let hash = record.header.rule_set;
        let text = record.rules_text();
        if !text.is_empty() && !self.rule_sets.contains_key(&hash) {
            match DomainSet::from_rules_text(text) {
                Ok(set) => {
                    self.rule_sets.insert(hash, Arc::new(set));
                }
                Err(e) => {
                    let d = Divergence::new(
                        Check::State,
                        format!("the rules text recorded in this batch does not compile: {e}"),
                    )
                    .at_batch(Some(record.header.seq));
                    self.found.record(d);
                }
            }
        }
        let batch = record.header.seq;
        match self.seen.last_mut() {
            Some(run) if run.hash == hash => {
                run.last_batch = batch;
                run.batches += 1;
            }
            _ => self.seen.push(super::RuleSetSeen {
                hash,
                first_batch: batch,
                last_batch: batch,
                batches: 1,
                domains: self.rule_sets.get(&hash).map(|set| {
                    set.domains()
                        .iter()
                        .map(|d| (d.name.clone(), declared_laws::domain_version(d)))
                        .collect()
                }),
            }),
        }
        self.current = self.rule_sets.get(&hash).map(|domains| BatchRules {
            batch: record.header.seq,
            committed_at_us: record.header.committed_at_us,
            domains: Arc::clone(domains),
        });
    }

    /// The rules of the last record fed (the built-in ones alone when none was recorded).
    pub(super) fn latest_rules(&self) -> Arc<DomainSet> {
        self.current.as_ref().map_or_else(
            || Arc::new(DomainSet::builtin()),
            |r| Arc::clone(&r.domains),
        )
    }

    /// A rejection the log keeps: decoded here (they are few) for the command-id check.
    pub(super) fn rejection(&mut self, batch: u64, payload: &[u8]) {
        if batch != self.last_batch {
            self.batches += 1;
            self.last_batch = batch;
        }
        match codec::decode_rejection(payload) {
            Ok(r) => self.rejected.push(Rejected {
                fp: self.fingerprints.of(r.command_id.as_bytes()),
                code: r.rejection.code,
                batch,
            }),
            Err(e) => {
                let detail = format!("a rejection the log keeps does not decode: {e}");
                let d = Divergence::new(Check::CommandIndex, detail).at_batch(Some(batch));
                self.found.record(d);
            }
        }
    }

    pub(super) fn event(&mut self, seq: u64, batch: u64, payload: &[u8]) {
        self.events += 1;
        self.last_seq = seq;
        if batch != self.last_batch {
            self.batches += 1;
            self.last_batch = batch;
        }
        if let Some(rules) = &self.current
            && rules.batch == batch
            && self.chunk.batches.last().is_none_or(|b| b.batch != batch)
        {
            self.chunk.batches.push(rules.clone());
        }
        self.chunk.push(seq, batch, payload);
        if self.chunk.events.len() == CHUNK_EVENTS {
            self.send();
        }
    }

    fn send(&mut self) {
        let mut next = self.returned.try_recv().unwrap_or_default();
        next.clear();
        let full = std::mem::replace(&mut self.chunk, next);
        // A send fails only when the replay thread is gone, i.e. panicked; its join reports it.
        let _ = self.tx.send(full);
    }

    /// Sends the last chunk and closes the channel: (events, batches, findings, rejections).
    pub(super) fn finish(mut self) -> (u64, u64, AuditReport, Vec<Rejected>) {
        if !self.chunk.events.is_empty() {
            self.send();
        }
        (self.events, self.batches, self.found, self.rejected)
    }
}

/// The replay: every aggregate recomputed from the log, plus what the other checks need from
/// the events.
pub(super) struct Replay {
    /// Keyed by the aggregate id's text so that a decoded event's id looks up without a copy.
    pub(super) aggregates: HashMap<Box<str>, Replayed>,
    /// Every event that carries a command id, by the id's fingerprint (the `command_index` check).
    pub(super) carried: Vec<Carried>,
    /// Every rejection the log keeps (filled in from the chain side after the replay).
    pub(super) rejected: Vec<Rejected>,
    fingerprints: Fingerprints,
    /// The conservation laws of every domain (the `conservation` check), and the flows of the `Total` ones
    /// summed over the log, indexed like `laws`.
    pub(super) laws: Vec<Law>,
    pub(super) total_flows: Vec<i128>,
    /// The declared domains' conservation laws, version by version.
    pub(super) declared_laws: DeclaredLaws,
    /// What the declared laws found, until it is recorded.
    law_findings: Vec<Divergence>,
    /// Per-aggregate flows of the declared event being folded: (target, law version, flow).
    pending_flows: Vec<(usize, usize, i128)>,
    /// An event after this sequence keeps the state it changes as of this point
    /// ([`Replayed::at_point`]); `u64::MAX` keeps none.
    point: u64,
    /// The checkpoint's last event: likewise ([`Replayed::at_checkpoint`]).
    checkpoint: u64,
}

pub(super) struct Replayed {
    pub(super) aggregate: Aggregate,
    /// The last event that touched it, to locate a divergence.
    pub(super) last_seq: u64,
    pub(super) last_batch: u64,
    /// The flows of the per-aggregate conservation laws into this aggregate, indexed like
    /// [`Replay::laws`]; boxed and only where such a law applies, so that an entry stays small
    /// and the replay's hot map stays in cache.
    pub(super) flows: Option<Box<[i128]>>,
    /// Likewise for the declared laws: (law version, its opening quantity plus the flows).
    pub(super) declared_flows: declared_laws::Flows,
    /// Set when an event after the point first touches it: the aggregate and its last
    /// sequence as of the point (`None` inside: it did not exist yet).
    pub(super) at_point: Option<Box<Option<(Aggregate, u64, u64)>>>,
    /// Likewise for the checkpoint's last event.
    pub(super) at_checkpoint: Option<Box<Option<(Aggregate, u64, u64)>>>,
    /// Whether the state scan found it stored.
    pub(super) seen: bool,
}

impl Replay {
    pub(super) fn new(fingerprints: Fingerprints, point: u64, checkpoint: u64) -> Self {
        let laws = conservation_laws();
        Self {
            aggregates: HashMap::new(),
            carried: Vec::new(),
            rejected: Vec::new(),
            fingerprints,
            total_flows: vec![0; laws.len()],
            laws,
            declared_laws: DeclaredLaws::default(),
            law_findings: Vec::new(),
            pending_flows: Vec::new(),
            point,
            checkpoint,
        }
    }

    /// The replay thread: decodes and folds every chunk until the feeder closes the channel,
    /// handing each emptied chunk back.
    pub(super) fn run(
        rx: Receiver<Chunk>,
        back: SyncSender<Chunk>,
        fingerprints: Fingerprints,
        point: u64,
        checkpoint: u64,
        max_divergences: usize,
    ) -> (Replay, AuditReport) {
        let mut replay = Replay::new(fingerprints, point, checkpoint);
        let mut found = AuditReport::new(max_divergences);
        for chunk in rx {
            let mut rules = chunk.batches.iter().peekable();
            let mut current: Option<&BatchRules> = None;
            for (seq, batch, payload) in chunk.iter() {
                while let Some(next) = rules.peek() {
                    if next.batch > batch {
                        break;
                    }
                    current = rules.next();
                }
                let in_force = current.filter(|r| r.batch == batch);
                replay.event(seq, batch, payload, in_force, &mut found);
            }
            // The feeder allocates a new chunk when none came back in time; never block here.
            let _ = back.try_send(chunk);
        }
        (replay, found)
    }

    fn event(
        &mut self,
        seq: u64,
        batch: u64,
        payload: &[u8],
        rules: Option<&BatchRules>,
        found: &mut AuditReport,
    ) {
        let logged = match codec::decode_event(payload) {
            Ok(logged) => logged,
            Err(e) => {
                let detail = format!("event does not decode: {e}; not replayed");
                let d = Divergence::new(Check::State, detail);
                found.record(d.at_seq(Some(seq)).at_batch(Some(batch)));
                return;
            }
        };
        if let Some(rules) = rules {
            let findings = &mut self.law_findings;
            let aggregates = &mut self.aggregates;
            self.declared_laws
                .rules(&rules.domains, batch, aggregates, findings);
        }
        self.pending_flows.clear();
        if let Some(event) = logged.event.downcast_ref::<DeclaredEvent>() {
            if let Err(detail) = self.decide_again(event, rules) {
                let d = Divergence::new(Check::State, detail);
                found.record(d.at_seq(Some(seq)).at_batch(Some(batch)));
            }
            let mut flows = Vec::new();
            for (target, id) in event.targets.iter().enumerate() {
                let before = self.aggregates.get(id.as_str());
                self.declared_laws.flows(
                    event,
                    target,
                    before,
                    (seq, batch),
                    &mut self.law_findings,
                    &mut flows,
                );
                self.pending_flows
                    .extend(flows.drain(..).map(|(v, flow)| (target, v, flow)));
            }
        }
        for (target, id) in logged.event.targets().iter().enumerate() {
            self.fold(&logged.event, target, id.as_str(), seq, batch);
        }
        if let Some(event) = logged.event.downcast_ref::<DeclaredEvent>() {
            for &(target, v, flow) in &self.pending_flows {
                let replayed = event
                    .targets
                    .get(target)
                    .and_then(|id| self.aggregates.get_mut(id.as_str()));
                if let Some(replayed) = replayed {
                    declared_laws::add(&mut replayed.declared_flows, v, flow);
                }
            }
        }
        for d in self.law_findings.drain(..) {
            found.record(d);
        }
        if let Some(command_id) = &logged.command_id {
            let fp = self.fingerprints.of(command_id.as_bytes());
            self.carried.push(Carried { fp, seq, batch });
        }
    }

    /// Decides a declared event's command again, under the rules its batch names, against the
    /// states the log folds to just before it, at its batch's commit time: it must be accepted
    /// with exactly the effects the log recorded.
    fn decide_again(
        &self,
        event: &DeclaredEvent,
        rules: Option<&BatchRules>,
    ) -> Result<(), String> {
        let Some(rules) = rules else {
            return Err(format!(
                "a {}.{} event in a batch whose rules the log does not record",
                event.domain, event.command
            ));
        };
        let qualified = format!("{}.{}", event.domain, event.command);
        let Resolved::Command(def) = rules.domains.resolve(&qualified) else {
            return Err(format!(
                "a {qualified} event, a command the rules in force do not define"
            ));
        };
        let names_match = def.params.len() == event.params.len()
            && def
                .params
                .iter()
                .zip(&event.params)
                .all(|(p, (n, _))| p.name == *n);
        if !names_match || def.targets.len() != event.targets.len() {
            return Err(format!(
                "a {qualified} event whose parameters or targets are not the definition's"
            ));
        }
        let params: Vec<_> = event.params.iter().map(|(_, v)| v.clone()).collect();
        let states: Vec<Option<&Aggregate>> = event
            .targets
            .iter()
            .map(|id| self.aggregates.get(id.as_str()).map(|r| &r.aggregate))
            .collect();
        match def.decide_effects(&params, &event.targets, &states, rules.committed_at_us) {
            Ok(effects) if effects == event.effects => Ok(()),
            Ok(effects) => Err(format!(
                "{qualified}: the rules recorded for its batch decide other effects: {}",
                keel_sequencer::shorten(format!("{effects:?}"), 300)
            )),
            Err(rejection) => Err(format!(
                "{qualified}: the rules recorded for its batch reject it: {} ({})",
                rejection.code.as_str(),
                keel_sequencer::shorten(rejection.message, 200)
            )),
        }
    }

    fn fold(
        &mut self,
        event: &keel_invariants::Event,
        target: usize,
        id: &str,
        seq: u64,
        batch: u64,
    ) {
        let after_point = seq > self.point;
        let after_checkpoint = seq > self.checkpoint;
        if let Some(replayed) = self.aggregates.get_mut(id) {
            if after_point && replayed.at_point.is_none() {
                let image = (
                    replayed.aggregate.clone(),
                    replayed.last_seq,
                    replayed.last_batch,
                );
                replayed.at_point = Some(Box::new(Some(image)));
            }
            if after_checkpoint && replayed.at_checkpoint.is_none() {
                let image = (
                    replayed.aggregate.clone(),
                    replayed.last_seq,
                    replayed.last_batch,
                );
                replayed.at_checkpoint = Some(Box::new(Some(image)));
            }
            // Move the aggregate out (no clone of an SKU's reservations); put the next one back.
            let placeholder = Aggregate {
                version: 0,
                state: State::new(ledger::Account::default()),
            };
            let previous = std::mem::replace(&mut replayed.aggregate, placeholder);
            replayed.aggregate = apply(event, target, Some(previous));
            replayed.last_seq = seq;
            replayed.last_batch = batch;
            add_flows(
                &self.laws,
                &mut self.total_flows,
                &mut replayed.flows,
                event,
                target,
            );
            return;
        }
        let mut flows = None;
        add_flows(&self.laws, &mut self.total_flows, &mut flows, event, target);
        let replayed = Replayed {
            aggregate: apply(event, target, None),
            last_seq: seq,
            last_batch: batch,
            flows,
            declared_flows: None,
            at_point: after_point.then(|| Box::new(None)),
            at_checkpoint: after_checkpoint.then(|| Box::new(None)),
            seen: false,
        };
        self.aggregates.insert(id.into(), replayed);
    }
}

impl Replayed {
    /// The aggregate, its last event and batch as of the checkpoint's last event (`None`: it
    /// did not exist yet).
    pub(super) fn at_checkpoint(&self) -> Option<(&Aggregate, u64, u64)> {
        match self.at_checkpoint.as_deref() {
            None => Some((&self.aggregate, self.last_seq, self.last_batch)),
            Some(image) => image.as_ref().map(|(a, seq, batch)| (a, *seq, *batch)),
        }
    }
}

/// Adds what `event` moves for its target number `target` to every conservation law of the
/// event's domain: to the log's totals, or to the aggregate's own flows.
fn add_flows(
    laws: &[Law],
    totals: &mut [i128],
    slot: &mut Option<Box<[i128]>>,
    event: &keel_invariants::Event,
    target: usize,
) {
    for (i, law) in laws.iter().enumerate() {
        let Some(flow) = law.flow(event, target) else {
            continue;
        };
        let sum = match law.scope() {
            LawScope::Total => &mut totals[i],
            LawScope::PerAggregate => {
                &mut slot.get_or_insert_with(|| vec![0; laws.len()].into_boxed_slice())[i]
            }
        };
        *sum = sum.saturating_add(flow);
    }
}

/// What the log implies for every aggregate, kept after an audit (for comparing a projection
/// with it): the state at the audited tip, and at an earlier point
/// ([`super::AuditOptions::point`]).
pub struct LogState {
    aggregates: HashMap<Box<str>, Replayed>,
    point: u64,
}

/// An aggregate as the log leaves it at some point, and the last event that touched it.
#[derive(Clone, Copy, Debug)]
pub struct AggregateAt<'a> {
    pub aggregate: &'a Aggregate,
    pub last_seq: u64,
    pub last_batch: u64,
}

impl LogState {
    pub(super) fn new(aggregates: HashMap<Box<str>, Replayed>, point: u64) -> Self {
        Self { aggregates, point }
    }

    /// The event sequence [`LogState::at_point`] answers for (at most the audited tip).
    pub fn point(&self) -> u64 {
        self.point
    }

    /// How many aggregates the log creates up to the tip.
    pub fn len(&self) -> usize {
        self.aggregates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.aggregates.is_empty()
    }

    /// The aggregate at the audited tip.
    pub fn at_tip(&self, id: &str) -> Option<AggregateAt<'_>> {
        self.aggregates.get(id).map(|r| AggregateAt {
            aggregate: &r.aggregate,
            last_seq: r.last_seq,
            last_batch: r.last_batch,
        })
    }

    /// The aggregate as of the point (`None`: it did not exist yet).
    pub fn at_point(&self, id: &str) -> Option<AggregateAt<'_>> {
        self.aggregates.get(id).and_then(Self::as_of_point)
    }

    /// Every aggregate that exists at the point, in no particular order.
    pub fn iter_at_point(&self) -> impl Iterator<Item = (&str, AggregateAt<'_>)> {
        self.aggregates
            .iter()
            .filter_map(|(id, r)| Self::as_of_point(r).map(|at| (id.as_ref(), at)))
    }

    fn as_of_point(r: &Replayed) -> Option<AggregateAt<'_>> {
        match r.at_point.as_deref() {
            None => Some(AggregateAt {
                aggregate: &r.aggregate,
                last_seq: r.last_seq,
                last_batch: r.last_batch,
            }),
            Some(image) => image
                .as_ref()
                .map(|(aggregate, last_seq, last_batch)| AggregateAt {
                    aggregate,
                    last_seq: *last_seq,
                    last_batch: *last_batch,
                }),
        }
    }
}
