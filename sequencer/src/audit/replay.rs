//! The chain-and-replay pipeline: this thread scans and hashes the log ([`Feeder`]), a second
//! thread decodes every event and folds it into the recomputed aggregates ([`Replay`]).

use super::command_ids::{Carried, Fingerprints};
use super::{AuditReport, Check, Divergence};
use keel_invariants::{Aggregate, Event, State, apply, codec, inventory, ledger};
use std::collections::HashMap;
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
    last_batch: u64,
    pub(super) last_seq: u64,
    /// Records that are not events at all, merged into the report afterwards.
    pub(super) found: AuditReport,
}

impl Feeder {
    pub(super) fn new(
        tx: SyncSender<Chunk>,
        returned: Receiver<Chunk>,
        max_divergences: usize,
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
        }
    }

    pub(super) fn event(&mut self, seq: u64, batch: u64, payload: &[u8]) {
        self.events += 1;
        self.last_seq = seq;
        if batch != self.last_batch {
            self.batches += 1;
            self.last_batch = batch;
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

    /// Sends the last chunk and closes the channel: (events, batches, findings).
    pub(super) fn finish(mut self) -> (u64, u64, AuditReport) {
        if !self.chunk.events.is_empty() {
            self.send();
        }
        (self.events, self.batches, self.found)
    }
}

/// The replay: every aggregate recomputed from the log, plus what the other checks need from
/// the events.
pub(super) struct Replay {
    /// Keyed by the aggregate id's text so that a decoded event's id looks up without a copy.
    pub(super) aggregates: HashMap<Box<str>, Replayed>,
    /// Every event that carries a command id, by the id's fingerprint (check 4).
    pub(super) carried: Vec<Carried>,
    fingerprints: Fingerprints,
    pub(super) deposited: u128,
    pub(super) withdrawn: u128,
}

pub(super) struct Replayed {
    pub(super) aggregate: Aggregate,
    /// The last event that touched it, to locate a divergence.
    pub(super) last_seq: u64,
    pub(super) last_batch: u64,
    /// Boxed, and only for SKUs: a small entry keeps the replay's hot map in cache.
    pub(super) flow: Option<Box<SkuFlow>>,
    /// Whether the state scan found it stored.
    pub(super) seen: bool,
}

impl Replay {
    pub(super) fn new(fingerprints: Fingerprints) -> Self {
        Self {
            aggregates: HashMap::new(),
            carried: Vec::new(),
            fingerprints,
            deposited: 0,
            withdrawn: 0,
        }
    }

    /// The replay thread: decodes and folds every chunk until the feeder closes the channel,
    /// handing each emptied chunk back.
    pub(super) fn run(
        rx: Receiver<Chunk>,
        back: SyncSender<Chunk>,
        fingerprints: Fingerprints,
        max_divergences: usize,
    ) -> (Replay, AuditReport) {
        let mut replay = Replay::new(fingerprints);
        let mut found = AuditReport::new(max_divergences);
        for chunk in rx {
            for (seq, batch, payload) in chunk.iter() {
                replay.event(seq, batch, payload, &mut found);
            }
            // The feeder allocates a new chunk when none came back in time; never block here.
            let _ = back.try_send(chunk);
        }
        (replay, found)
    }

    fn event(&mut self, seq: u64, batch: u64, payload: &[u8], found: &mut AuditReport) {
        let logged = match codec::decode_event(payload) {
            Ok(logged) => logged,
            Err(e) => {
                let detail = format!("event does not decode: {e}; not replayed");
                let d = Divergence::new(Check::State, detail);
                found.record(d.at_seq(Some(seq)).at_batch(Some(batch)));
                return;
            }
        };
        self.count_money(&logged.event);
        for (target, id) in logged.event.targets().iter().enumerate() {
            self.fold(&logged.event, target, id.as_str(), seq, batch);
        }
        if let Some(command_id) = &logged.command_id {
            let fp = self.fingerprints.of(command_id.as_bytes());
            self.carried.push(Carried { fp, seq, batch });
        }
    }

    fn fold(&mut self, event: &Event, target: usize, id: &str, seq: u64, batch: u64) {
        if let Some(replayed) = self.aggregates.get_mut(id) {
            // Move the aggregate out (no clone of an SKU's reservations); put the next one back.
            let placeholder = Aggregate {
                version: 0,
                state: State::Account(ledger::Account::default()),
            };
            let previous = std::mem::replace(&mut replayed.aggregate, placeholder);
            replayed.aggregate = apply(event, target, Some(previous));
            replayed.last_seq = seq;
            replayed.last_batch = batch;
            SkuFlow::record(&mut replayed.flow, event);
            return;
        }
        let mut flow = None;
        SkuFlow::record(&mut flow, event);
        let aggregate = apply(event, target, None);
        let replayed = Replayed {
            aggregate,
            last_seq: seq,
            last_batch: batch,
            flow,
            seen: false,
        };
        self.aggregates.insert(id.into(), replayed);
    }

    fn count_money(&mut self, event: &Event) {
        match event {
            Event::Ledger(ledger::Event::Deposited { amount, .. }) => {
                self.deposited += u128::from(*amount)
            }
            Event::Ledger(ledger::Event::Withdrew { amount, .. }) => {
                self.withdrawn += u128::from(*amount)
            }
            _ => {}
        }
    }
}

/// An SKU's stock and reservation flows, summed straight from its events (not through
/// `apply`), for the inventory's conservation law.
#[derive(Default)]
pub(super) struct SkuFlow {
    stock_in: u128,
    stock_out: u128,
    reserved_in: u128,
    reserved_out: u128,
}

impl SkuFlow {
    /// Adds `event` to the flows in `slot` when it is an inventory event.
    fn record(slot: &mut Option<Box<SkuFlow>>, event: &Event) {
        if let Event::Inventory(event) = event {
            slot.get_or_insert_with(Box::default).add(event);
        }
    }

    fn add(&mut self, event: &inventory::Event) {
        use inventory::Event as I;
        match event {
            I::SkuCreated { on_hand, .. } => self.stock_in += u128::from(*on_hand),
            I::Restocked { qty, .. } => self.stock_in += u128::from(*qty),
            I::Reserved { qty, .. } => self.reserved_in += u128::from(*qty),
            I::Released { qty, .. } => self.reserved_out += u128::from(*qty),
            I::Shipped { qty, .. } => {
                self.reserved_out += u128::from(*qty);
                self.stock_out += u128::from(*qty);
            }
        }
    }

    /// on_hand == created + restocked - shipped; reserved == reserved - released - shipped.
    pub(super) fn check(&self, sku: &inventory::Sku) -> Vec<Divergence> {
        let net = |a: u128, b: u128| {
            i128::try_from(a)
                .unwrap_or(i128::MAX)
                .saturating_sub(i128::try_from(b).unwrap_or(i128::MAX))
        };
        let on_hand = net(self.stock_in, self.stock_out);
        let reserved = net(self.reserved_in, self.reserved_out);
        let mut found = Vec::new();
        if on_hand != i128::from(sku.on_hand) {
            let detail = "inventory: on_hand is not created + restocked - shipped";
            found.push(Divergence::new(Check::Conservation, detail).expected_found(
                format!("on_hand {on_hand}"),
                format!("on_hand {}", sku.on_hand),
            ));
        }
        if reserved != i128::from(sku.reserved) {
            let detail = "inventory: reserved is not the sum of the open reservations (reserved - released - shipped)";
            found.push(Divergence::new(Check::Conservation, detail).expected_found(
                format!("reserved {reserved}"),
                format!("reserved {}", sku.reserved),
            ));
        }
        found
    }
}
