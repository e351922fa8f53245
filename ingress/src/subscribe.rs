//! `GET /v1/subscribe`: live subscriptions to the committed log over Server-Sent Events.
//!
//! One **hub** task per server follows the writer's notes of durable batches
//! ([`Sequencer::durable_batches`], sent after each fsync returned; the writer does nothing per
//! subscriber). Each round it reads the new events from the store once (up to
//! [`ROUND_EVENTS_MAX`], one batch or several), encodes their SSE frames once into one shared
//! buffer ([`Bytes`]) and hands every live subscriber one delivery with a reference on the
//! subscriber's own channel. Subscribers filtered by aggregate or kind are found through an
//! index (aggregate id or kind -> subscribers) and get slices of the same buffer. Rounds are
//! paced by a wake-up budget (see [`run_hub`]). A subscriber that holds
//! `--subscriber-buffer-batches` deliveries not yet taken is too slow: the hub drops its
//! channel and ends it (a final `resume` event), and never waits; the writer and the other
//! subscribers never wait for one subscriber. In `keel serve` all of this runs on the
//! subscription lane (`crate::lane`).
//!
//! A subscription first catches up from the store (pages of committed events, never past the
//! last batch the hub was told is durable), then joins the hub. Joining records how far the hub
//! has fanned out; whatever lies between the catch-up and that point is read from the store
//! too, and live batches are skipped up to the last event already examined: every event is
//! sent exactly once, in sequence order.

use crate::http::{ApiError, AppState, ERROR_TEXT_BYTES_MAX};
use crate::wire;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Frame;
use keel_invariants::AggregateId;
use keel_sequencer::{CommittedEvent, DurableBatch, Sequencer};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{Semaphore, broadcast, mpsc, watch};

/// A comment line is sent when a subscription has had nothing to send for this long, so that
/// proxies and clients can tell an idle stream from a dead one.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// Most events one store read of a catch-up takes.
const PAGE_EVENTS: usize = 1000;

/// Most events one round of the hub reads, encodes and hands out (more go in the next round).
const ROUND_EVENTS_MAX: usize = 16_384;

/// Longest `kind` or `aggregate` filter accepted (a kind and a 128-byte name).
const FILTER_BYTES_MAX: usize = 256;

/// The bounds of live subscriptions (`keel serve` flags).
#[derive(Clone, Debug)]
pub struct SubscribeLimits {
    /// Most subscriptions open at once; more get 503 `overloaded`.
    pub subscribers_max: usize,
    /// Deliveries (one per round of the hub: one batch, or several together) waiting to be
    /// sent to one subscriber; one more ends it (`too_slow`).
    pub buffer_batches: usize,
    /// Most subscriber wake-ups per second, over all subscribers: after a round that woke `n`
    /// subscribers, the hub starts its next round `n / wakeups_per_sec` seconds later at the
    /// earliest, and the batches committed meanwhile go out together in that round.
    pub wakeups_per_sec: u32,
    /// Store reads of catch-ups running at once (more wait their turn).
    pub catch_up_reads_max: usize,
    pub retry_after_secs: u32,
}

impl Default for SubscribeLimits {
    fn default() -> Self {
        Self {
            subscribers_max: 4096,
            buffer_batches: 64,
            wakeups_per_sec: 20_000,
            catch_up_reads_max: 8,
            retry_after_secs: 1,
        }
    }
}

/// Why a subscription ended (the `reason` of its final `resume` event).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EndReason {
    TooSlow = 1,
    ShuttingDown = 2,
}

/// Set by the hub, read by the subscription before each thing it sends.
#[derive(Default)]
struct End(AtomicU8);

impl End {
    fn set(&self, reason: EndReason) {
        let _ = self
            .0
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
    }

    fn get(&self) -> Option<EndReason> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(EndReason::TooSlow),
            2 => Some(EndReason::ShuttingDown),
            _ => None,
        }
    }
}

/// Which events a subscription wants: an event passes when any aggregate it touches has the
/// `kind`, and any aggregate it touches is `aggregate` (each only when given).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub kind: Option<String>,
    pub aggregate: Option<String>,
}

impl Filter {
    /// `aggregates` yields the aggregates an event touches (it is called once per filter).
    fn passes<'a, I>(&self, aggregates: impl Fn() -> I) -> bool
    where
        I: Iterator<Item = &'a AggregateId>,
    {
        let kind = self
            .kind
            .as_deref()
            .is_none_or(|kind| aggregates().any(|a| a.kind() == kind));
        let aggregate = self
            .aggregate
            .as_deref()
            .is_none_or(|wanted| aggregates().any(|a| a.as_str() == wanted));
        kind && aggregate
    }

    fn passes_event(&self, event: &CommittedEvent) -> bool {
        self.passes(|| event.logged.event.targets().iter())
    }
}

/// Consecutive committed events (of one batch or several), encoded once for every subscriber.
struct EncodedChunk {
    /// Each batch's comment (its durable time, when its note was at hand) right before the
    /// batch's first event here, and every event's frame.
    bytes: Bytes,
    /// Where each event's frame starts in `bytes`, and the end of the last.
    starts: Vec<usize>,
    /// For each event, the index of its batch's comment in `comments`.
    batch_of: Vec<usize>,
    /// Each batch's comment: its byte range (empty when the batch's note was not at hand).
    comments: Vec<(usize, usize)>,
    first_seq: u64,
}

impl EncodedChunk {
    fn last_seq(&self) -> u64 {
        self.first_seq + (self.starts.len() as u64 - 2)
    }

    fn event_range(&self, index: usize) -> (usize, usize) {
        (self.starts[index], self.starts[index + 1])
    }
}

/// What the hub hands one subscriber in one round: a chunk, all of it or the events at `only`
/// (indices).
struct Delivery {
    chunk: Arc<EncodedChunk>,
    only: Option<Vec<u32>>,
}

struct Entry {
    /// Bounded at `buffer_batches` deliveries: full means the subscriber is too slow.
    tx: mpsc::Sender<Delivery>,
    filter: Arc<Filter>,
    end: Arc<End>,
    live: bool,
}

/// Every open subscription, and the indexes the hub finds live ones through.
#[derive(Default)]
struct Registry {
    next_id: u64,
    closing: bool,
    /// Live delivery stopped (the store refused a read): no subscription is taken any more.
    failed: bool,
    subscribers: HashMap<u64, Entry>,
    everything: HashSet<u64>,
    by_kind: HashMap<String, HashSet<u64>>,
    by_aggregate: HashMap<String, HashSet<u64>>,
    /// The last event handed to live subscribers (or known to be in the store when the hub
    /// started).
    fanned_out: u64,
}

impl Registry {
    fn index(&mut self, id: u64, filter: &Filter) {
        match (&filter.aggregate, &filter.kind) {
            (Some(aggregate), _) => {
                self.by_aggregate
                    .entry(aggregate.clone())
                    .or_default()
                    .insert(id);
            }
            (None, Some(kind)) => {
                self.by_kind.entry(kind.clone()).or_default().insert(id);
            }
            (None, None) => {
                self.everything.insert(id);
            }
        }
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.subscribers.remove(&id)?;
        fn unindex(map: &mut HashMap<String, HashSet<u64>>, key: &str, id: u64) {
            if let Some(set) = map.get_mut(key) {
                set.remove(&id);
                if set.is_empty() {
                    map.remove(key);
                }
            }
        }
        match (&entry.filter.aggregate, &entry.filter.kind) {
            (Some(aggregate), _) => unindex(&mut self.by_aggregate, aggregate, id),
            (None, Some(kind)) => unindex(&mut self.by_kind, kind, id),
            (None, None) => {
                self.everything.remove(&id);
            }
        }
        metrics::gauge!("keel_subscribers").set(self.subscribers.len() as f64);
        Some(entry)
    }
}

/// The fan-out of committed batches to live subscriptions (see the module's doc).
pub struct Hub {
    sequencer: Arc<Sequencer>,
    limits: SubscribeLimits,
    registry: Mutex<Registry>,
    /// The last event of the last batch the writer said is durable: catch-ups read no further.
    durable_last_event: AtomicU64,
    catch_up_permits: Arc<Semaphore>,
    started: Once,
    stop: watch::Sender<bool>,
}

impl Hub {
    pub fn new(sequencer: Arc<Sequencer>, limits: SubscribeLimits) -> Self {
        assert!(limits.subscribers_max > 0 && limits.buffer_batches > 0);
        assert!(limits.wakeups_per_sec > 0);
        assert!(limits.catch_up_reads_max > 0);
        metrics::gauge!("keel_subscribers").set(0.0);
        metrics::counter!("keel_subscriber_overflows_total").increment(0);
        metrics::counter!("keel_subscribe_deliveries_total").increment(0);
        metrics::gauge!("keel_subscribe_hub_lag_events").set(0.0);
        metrics::counter!("keel_subscribe_lane_connections_total").increment(0);
        Self {
            sequencer,
            catch_up_permits: Arc::new(Semaphore::new(limits.catch_up_reads_max)),
            limits,
            registry: Mutex::new(Registry::default()),
            durable_last_event: AtomicU64::new(0),
            started: Once::new(),
            stop: watch::Sender::new(false),
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Nothing panics while holding the lock; if something did, the registry is still a
        // set of senders, safe to go on with.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the hub task in the current tokio runtime (once; later calls do nothing). A
    /// router built in a test starts it with its first subscription.
    pub fn start(self: &Arc<Self>) {
        self.start_on(None);
    }

    /// Starts the hub task on `runtime` (the subscription lane; the current runtime when
    /// `None`), once. `keel serve` starts it on the lane before serving.
    pub fn start_on(self: &Arc<Self>, runtime: Option<&tokio::runtime::Handle>) {
        self.started.call_once(|| {
            // Notes first, then the tip: a batch committed in between is both in the store and
            // noted, and the hub skips what it already counts as delivered.
            let notes = self.sequencer.durable_batches();
            // One read of the tip key, once per process.
            let tip = match self.sequencer.reader().tip() {
                Ok(tip) => tip.last_event,
                Err(error) => {
                    tracing::error!(%error, "subscriptions: cannot read the tip; live delivery is off");
                    return;
                }
            };
            self.durable_last_event.store(tip, Ordering::Release);
            self.registry().fanned_out = tip;
            let hub = run_hub(Arc::clone(self), notes, self.stop.subscribe());
            match runtime {
                Some(runtime) => drop(runtime.spawn(hub)),
                None => drop(tokio::spawn(hub)),
            }
        });
    }

    /// Ends every subscription with `resume` (`shutting_down`) and stops the hub; later
    /// subscriptions get 503 `shutting_down`.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
        let mut registry = self.registry();
        registry.closing = true;
        let ids: Vec<u64> = registry.subscribers.keys().copied().collect();
        for id in ids {
            if let Some(entry) = registry.remove(id) {
                entry.end.set(EndReason::ShuttingDown);
            }
        }
    }

    /// Live delivery cannot go on (the store refused a read, e.g. after a failed commit):
    /// every stream ends (without a `resume`: resuming here would not help) and new
    /// subscriptions are refused.
    fn fail(&self) {
        let mut registry = self.registry();
        registry.failed = true;
        let ids: Vec<u64> = registry.subscribers.keys().copied().collect();
        for id in ids {
            registry.remove(id);
        }
    }

    fn subscribe(self: &Arc<Self>, after: u64, filter: Filter) -> Result<Session, ApiError> {
        let (tx, rx) = mpsc::channel(self.limits.buffer_batches);
        let end = Arc::new(End::default());
        let filter = Arc::new(filter);
        let id = {
            let mut registry = self.registry();
            if registry.failed {
                return Err(ApiError::internal(
                    "subscribe",
                    &"live delivery stopped after a failed store read",
                ));
            }
            if registry.closing {
                return Err(ApiError::unavailable(
                    "shutting_down",
                    "the server is shutting down",
                    self.limits.retry_after_secs,
                ));
            }
            if registry.subscribers.len() >= self.limits.subscribers_max {
                metrics::counter!("keel_http_refused_total", "reason" => "subscribers")
                    .increment(1);
                return Err(ApiError::unavailable(
                    "overloaded",
                    format!(
                        "{} subscriptions are open; retry shortly",
                        self.limits.subscribers_max
                    ),
                    self.limits.retry_after_secs,
                ));
            }
            let id = registry.next_id;
            registry.next_id += 1;
            registry.subscribers.insert(
                id,
                Entry {
                    tx,
                    filter: Arc::clone(&filter),
                    end: Arc::clone(&end),
                    live: false,
                },
            );
            metrics::gauge!("keel_subscribers").set(registry.subscribers.len() as f64);
            id
        };
        Ok(Session {
            registration: Registration {
                hub: Arc::clone(self),
                id,
            },
            rx,
            end,
            filter,
            cursor: after,
            last_delivered: after,
            phase: Phase::CatchUp,
            ready: VecDeque::new(),
            finished: false,
        })
    }

    /// Makes subscription `id` live; returns the last event the hub handed out so far.
    fn join(&self, id: u64) -> u64 {
        let mut registry = self.registry();
        let filter = match registry.subscribers.get_mut(&id) {
            Some(entry) if !entry.live => {
                entry.live = true;
                Arc::clone(&entry.filter)
            }
            _ => return registry.fanned_out,
        };
        registry.index(id, &filter);
        registry.fanned_out
    }

    /// Hands the round's `chunk` (with the aggregates of each of its events) to every live
    /// subscriber that wants some of it, one delivery each, never waiting: a subscriber that
    /// would hold more than `buffer_batches` deliveries not yet taken is ended (`too_slow`).
    /// Returns how many subscribers it woke.
    fn fan_out(&self, chunk: &Arc<EncodedChunk>, targets: &[Vec<AggregateId>]) -> usize {
        let mut registry = self.registry();
        let mut deliveries: Vec<(u64, Option<Vec<u32>>)> =
            registry.everything.iter().map(|&id| (id, None)).collect();
        if !(registry.by_aggregate.is_empty() && registry.by_kind.is_empty()) {
            deliveries.extend(
                filtered_picks(&registry, targets)
                    .into_iter()
                    .map(|(id, only)| (id, Some(only))),
            );
        }
        let mut woken = 0;
        let mut too_slow = Vec::new();
        for (id, only) in deliveries {
            let Some(entry) = registry.subscribers.get(&id) else {
                continue;
            };
            let delivery = Delivery {
                chunk: Arc::clone(chunk),
                only,
            };
            match entry.tx.try_send(delivery) {
                Ok(()) => woken += 1,
                Err(mpsc::error::TrySendError::Full(_)) => too_slow.push(id),
                // Closed: the subscription is going away; its guard unregisters it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        registry.fanned_out = chunk.last_seq();
        for id in too_slow {
            if let Some(entry) = registry.remove(id) {
                entry.end.set(EndReason::TooSlow);
                metrics::counter!("keel_subscriber_overflows_total").increment(1);
            }
        }
        woken
    }
}

/// For each filtered live subscriber, the indices of the batch's events it wants, found through
/// the indexes (never by looking at every subscriber).
fn filtered_picks(registry: &Registry, targets: &[Vec<AggregateId>]) -> HashMap<u64, Vec<u32>> {
    let mut picks: HashMap<u64, Vec<u32>> = HashMap::new();
    for (index, aggregates) in targets.iter().enumerate() {
        let index = index as u32;
        for aggregate in aggregates {
            let by_aggregate = registry.by_aggregate.get(aggregate.as_str());
            let by_kind = registry.by_kind.get(aggregate.kind());
            for &id in by_aggregate.into_iter().chain(by_kind).flatten() {
                let Some(entry) = registry.subscribers.get(&id) else {
                    continue;
                };
                if !entry.filter.passes(|| aggregates.iter()) {
                    continue;
                }
                let wanted = picks.entry(id).or_default();
                if wanted.last() != Some(&index) {
                    wanted.push(index);
                }
            }
        }
    }
    picks
}

/// A note of a durable batch the hub has not handed out yet: when it became durable, and its
/// last event.
#[derive(Clone, Copy)]
struct Noted {
    durable_at_us: u64,
    last_event: u64,
}

/// What the hub knows of durable batches from the writer's notes.
struct Notes {
    receiver: broadcast::Receiver<DurableBatch>,
    /// The last event of the last batch noted.
    last_event: u64,
    /// Batches noted and not yet handed out, by batch sequence (at most [`PENDING_NOTES_MAX`]:
    /// beyond, the oldest go out without their `durable_at_us` comment).
    pending: BTreeMap<u64, Noted>,
}

/// Most notes of batches not yet handed out that the hub keeps (for their comments).
const PENDING_NOTES_MAX: usize = 65_536;

impl Notes {
    /// Takes a note; false when the writer is gone.
    fn take(&mut self, note: Result<DurableBatch, broadcast::error::RecvError>) -> bool {
        match note {
            Ok(note) => {
                self.last_event = self.last_event.max(note.last_event());
                self.pending.insert(
                    note.batch,
                    Noted {
                        durable_at_us: note.durable_at_us,
                        last_event: note.last_event(),
                    },
                );
                if self.pending.len() > PENDING_NOTES_MAX {
                    self.pending.pop_first();
                }
                true
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // The batches are in the store (a later note covers them); only their
                // `durable_at_us` comments are lost.
                tracing::warn!(
                    missed,
                    "subscriptions: the hub fell behind the writer's notes"
                );
                true
            }
            Err(broadcast::error::RecvError::Closed) => false,
        }
    }

    /// Takes every note at hand without waiting; false when the writer is gone.
    fn take_ready(&mut self) -> bool {
        loop {
            let note = match self.receiver.try_recv() {
                Ok(note) => Ok(note),
                Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                    Err(broadcast::error::RecvError::Lagged(missed))
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    Err(broadcast::error::RecvError::Closed)
                }
                Err(broadcast::error::TryRecvError::Empty) => return true,
            };
            if !self.take(note) {
                return false;
            }
        }
    }

    /// Forgets the notes of batches handed out up to event `through`.
    fn handed_out(&mut self, through: u64) {
        self.pending.retain(|_, noted| noted.last_event > through);
    }
}

/// The hub task: takes the writer's notes; each round reads up to [`ROUND_EVENTS_MAX`] events
/// after the last one handed out, encodes them once and hands each live subscriber that wants
/// some of them one delivery.
///
/// Rounds are paced by the wake-up budget (`wakeups_per_sec`): after a round that woke `n`
/// subscribers, the next one starts `n / wakeups_per_sec` seconds after it at the earliest, so
/// that a wide fan-out cannot take the write path's CPU; the batches committed meanwhile go out
/// together in the next round, one wake-up per subscriber. A narrow fan-out (or none) is never
/// delayed, and a hub that is behind goes on without waiting for a new note.
async fn run_hub(
    hub: Arc<Hub>,
    receiver: broadcast::Receiver<DurableBatch>,
    mut stop: watch::Receiver<bool>,
) {
    let per_wakeup = Duration::from_secs(1) / hub.limits.wakeups_per_sec;
    let mut not_before = tokio::time::Instant::now();
    let mut notes = Notes {
        receiver,
        last_event: hub.registry().fanned_out,
        pending: BTreeMap::new(),
    };
    loop {
        if notes.last_event <= hub.registry().fanned_out {
            let note = tokio::select! {
                biased;
                _ = stop.wait_for(|stopped| *stopped) => return,
                note = notes.receiver.recv() => note,
            };
            if !notes.take(note) {
                return;
            }
        }
        if tokio::time::Instant::now() < not_before {
            tokio::select! {
                biased;
                _ = stop.wait_for(|stopped| *stopped) => return,
                () = tokio::time::sleep_until(not_before) => {}
            }
        }
        if !notes.take_ready() {
            return;
        }
        let round_start = tokio::time::Instant::now();
        hub.durable_last_event
            .fetch_max(notes.last_event, Ordering::AcqRel);
        let behind = notes.last_event.saturating_sub(hub.registry().fanned_out);
        metrics::gauge!("keel_subscribe_hub_lag_events").set(behind as f64);
        match deliver_round(&hub, &mut notes).await {
            Ok(woken) => {
                let woken = u32::try_from(woken).unwrap_or(u32::MAX);
                not_before = round_start + per_wakeup.saturating_mul(woken);
            }
            Err(error) => {
                // The store refuses reads when the write path is poisoned (nothing more will be
                // committed) or damaged: live delivery ends here, and every stream with it.
                tracing::error!(%error, "subscriptions: reading committed batches failed; live delivery stops");
                hub.fail();
                return;
            }
        }
    }
}

/// One round: reads up to [`ROUND_EVENTS_MAX`] events after the last one handed out (never
/// past the last noted), encodes them once and fans them out. Returns how many subscribers it
/// woke.
async fn deliver_round(hub: &Arc<Hub>, notes: &mut Notes) -> anyhow::Result<usize> {
    let to = notes.last_event;
    let after = {
        let mut registry = hub.registry();
        if registry.fanned_out >= to {
            return Ok(0);
        }
        if registry.everything.is_empty()
            && registry.by_kind.is_empty()
            && registry.by_aggregate.is_empty()
        {
            // Nobody is live: nothing to read or encode (the writer's CPU is shared). A
            // subscription that joins later fills up to this mark from the store.
            registry.fanned_out = to;
            drop(registry);
            notes.handed_out(to);
            return Ok(0);
        }
        registry.fanned_out
    };
    let sequencer = Arc::clone(&hub.sequencer);
    let durable_at: HashMap<u64, u64> = notes
        .pending
        .iter()
        .map(|(&batch, noted)| (batch, noted.durable_at_us))
        .collect();
    let (chunk, targets) = tokio::task::spawn_blocking(move || {
        if sequencer.is_poisoned() {
            anyhow::bail!("the write path is poisoned");
        }
        let events =
            keel_sequencer::committed_events(sequencer.reader(), after, ROUND_EVENTS_MAX, to)?;
        anyhow::ensure!(
            events.first().is_some_and(|e| e.seq == after + 1),
            "event {} is not in the store though batch notes say it is durable",
            after + 1
        );
        Ok(encode_chunk(&events, &durable_at))
    })
    .await??;
    let chunk = Arc::new(chunk);
    let woken = hub.fan_out(&chunk, &targets);
    notes.handed_out(chunk.last_seq());
    Ok(woken)
}

/// Encodes consecutive events into one [`EncodedChunk`] (each batch's comment when its note is
/// at hand), and the aggregates of every event for the fan-out.
fn encode_chunk(
    events: &[CommittedEvent],
    durable_at: &HashMap<u64, u64>,
) -> (EncodedChunk, Vec<Vec<AggregateId>>) {
    let mut bytes = Vec::with_capacity(events.len() * 320 + 64);
    let mut starts = Vec::with_capacity(events.len() + 1);
    let mut batch_of = Vec::with_capacity(events.len());
    let mut comments: Vec<(usize, usize)> = Vec::new();
    let mut targets = Vec::with_capacity(events.len());
    let mut current = None;
    let mut timestamps = Timestamps::default();
    for event in events {
        if current != Some(event.batch) {
            current = Some(event.batch);
            let start = bytes.len();
            if let Some(us) = durable_at.get(&event.batch) {
                let _ = writeln!(bytes, ": batch {} durable_at_us {us}", event.batch);
            }
            comments.push((start, bytes.len()));
        }
        batch_of.push(comments.len() - 1);
        starts.push(bytes.len());
        encode_event(&mut bytes, event, timestamps.of(event));
        targets.push(event.logged.event.targets().iter().cloned().collect());
    }
    starts.push(bytes.len());
    let chunk = EncodedChunk {
        bytes: Bytes::from(bytes),
        starts,
        batch_of,
        comments,
        first_seq: events.first().map_or(0, |e| e.seq),
    };
    (chunk, targets)
}

/// `id: <seq>\nevent: event\ndata: <the event as GET /v1/events shows it>\n\n`.
/// `committed_at` is the event's timestamp, formatted once per batch by [`Timestamps`].
fn encode_event(out: &mut Vec<u8>, event: &CommittedEvent, committed_at: &str) {
    let _ = write!(out, "id: {}\nevent: event\ndata: ", event.seq);
    // JSON escapes newlines, so the event is one line.
    wire::write_event_json(out, event, committed_at);
    out.extend_from_slice(b"\n\n");
}

/// The last batch's `committed_at`, formatted once for all its events.
#[derive(Default)]
struct Timestamps {
    last: Option<(u64, String)>,
}

impl Timestamps {
    fn of(&mut self, event: &CommittedEvent) -> &str {
        if self
            .last
            .as_ref()
            .is_none_or(|(us, _)| *us != event.committed_at_us)
        {
            let us = event.committed_at_us;
            self.last = Some((us, wire::timestamp(us)));
        }
        self.last.as_ref().map_or("", |(_, text)| text.as_str())
    }
}

fn resume_frame(reason: EndReason, last_delivered: u64) -> Bytes {
    let reason = match reason {
        EndReason::TooSlow => "too_slow",
        EndReason::ShuttingDown => "shutting_down",
    };
    Bytes::from(format!(
        "id: {last_delivered}\nevent: resume\ndata: {{\"reason\":\"{reason}\",\"resume_after\":{last_delivered}}}\n\n"
    ))
}

/// Unregisters its subscription when the stream goes away (client gone, stream ended).
struct Registration {
    hub: Arc<Hub>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.registry().remove(self.id);
    }
}

enum Phase {
    /// Reading the store up to the last batch known durable.
    CatchUp,
    /// Live, but first reading the store up to this event (what the hub handed out before
    /// the subscription joined).
    Fill(u64),
    Live,
}

/// One subscription's state: what it examined and delivered, and where it reads from.
struct Session {
    registration: Registration,
    rx: mpsc::Receiver<Delivery>,
    end: Arc<End>,
    filter: Arc<Filter>,
    /// The last event examined (sent, or skipped by the filter).
    cursor: u64,
    /// The last event sent (what a client resumes after).
    last_delivered: u64,
    phase: Phase,
    ready: VecDeque<Bytes>,
    finished: bool,
}

impl Session {
    fn hub(&self) -> &Arc<Hub> {
        &self.registration.hub
    }

    /// The next piece of the stream, `None` at its end.
    async fn next(mut self) -> Option<(Bytes, Self)> {
        if self.ready.is_empty() {
            self.step().await;
        }
        let bytes = self.ready.pop_front()?;
        Some((bytes, self))
    }

    /// Puts the next pieces into `ready`; leaves it empty at the end of the stream.
    async fn step(&mut self) {
        while self.ready.is_empty() && !self.finished {
            if let Some(reason) = self.end.get() {
                self.finished = true;
                self.ready
                    .push_back(resume_frame(reason, self.last_delivered));
                return;
            }
            let result = match self.phase {
                Phase::CatchUp => {
                    let bound = self.hub().durable_last_event.load(Ordering::Acquire);
                    if self.cursor >= bound {
                        let fanned_out = self.hub().join(self.registration.id);
                        self.phase = if self.cursor < fanned_out {
                            Phase::Fill(fanned_out)
                        } else {
                            Phase::Live
                        };
                        continue;
                    }
                    self.read_page(bound).await
                }
                Phase::Fill(to) if self.cursor >= to => {
                    self.phase = Phase::Live;
                    continue;
                }
                Phase::Fill(to) => self.read_page(to).await,
                Phase::Live => {
                    self.receive().await;
                    Ok(())
                }
            };
            if let Err(error) = result {
                tracing::warn!(%error, "subscription ended: reading the store failed");
                self.finished = true;
            }
        }
    }

    /// Waits for the hub's next delivery (or sends a keepalive after [`KEEPALIVE`]).
    async fn receive(&mut self) {
        match tokio::time::timeout(KEEPALIVE, self.rx.recv()).await {
            // A failed commit sends no note: an idle stream learns of it here, and ends (a new
            // subscription would get 503 `engine_poisoned`).
            Err(_) if self.hub().sequencer.is_poisoned() => self.finished = true,
            Err(_) => self.ready.push_back(Bytes::from_static(b": keepalive\n\n")),
            Ok(Some(delivery)) => self.deliver(&delivery),
            // The hub let go of this subscription: it set the reason before (checked next).
            Ok(None) => {
                if self.end.get().is_none() {
                    self.finished = true;
                }
            }
        }
    }

    /// Queues the part of a live delivery after the cursor as one piece (a slice of the shared
    /// chunk, or the wanted events copied together), each batch's comment before its first
    /// event sent.
    fn deliver(&mut self, delivery: &Delivery) {
        let chunk = &delivery.chunk;
        if chunk.last_seq() <= self.cursor {
            return;
        }
        let events = chunk.starts.len() - 1;
        let skip = self.cursor.saturating_sub(chunk.first_seq - 1) as usize;
        if delivery.only.is_none() && skip == 0 {
            // Everything: the whole chunk, which starts with its first batch's comment.
            self.cursor = chunk.last_seq();
            self.last_delivered = chunk.last_seq();
            self.ready.push_back(chunk.bytes.clone());
            metrics::counter!("keel_subscribe_deliveries_total").increment(events as u64);
            return;
        }
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        let mut sent = 0u64;
        let mut last_sent = None;
        let mut comment_sent = None;
        let mut add = |index: usize| {
            let batch = chunk.batch_of[index];
            let comment = (comment_sent != Some(batch)).then(|| chunk.comments[batch]);
            comment_sent = Some(batch);
            for (start, end) in comment.into_iter().chain([chunk.event_range(index)]) {
                match ranges.last_mut() {
                    _ if start == end => {}
                    Some(last) if last.1 == start => last.1 = end,
                    _ => ranges.push((start, end)),
                }
            }
            sent += 1;
            last_sent = Some(chunk.first_seq + index as u64);
        };
        match &delivery.only {
            None => (skip..events).for_each(&mut add),
            Some(only) => only
                .iter()
                .map(|&index| index as usize)
                .filter(|&index| index >= skip)
                .for_each(&mut add),
        }
        self.cursor = chunk.last_seq();
        let Some(last_sent) = last_sent else {
            return;
        };
        // One piece per delivery: a piece is a frame of the response, and a frame costs the
        // connection a chunk header and a write of its own. A filtered subscriber's events are
        // scattered over the chunk, so they are copied together (a few kilobytes).
        let piece = match ranges.as_slice() {
            [(start, end)] => chunk.bytes.slice(*start..*end),
            _ => {
                let length = ranges.iter().map(|(start, end)| end - start).sum();
                let mut piece = Vec::with_capacity(length);
                for (start, end) in ranges {
                    piece.extend_from_slice(&chunk.bytes[start..end]);
                }
                Bytes::from(piece)
            }
        };
        self.ready.push_back(piece);
        self.last_delivered = last_sent;
        metrics::counter!("keel_subscribe_deliveries_total").increment(sent);
    }

    /// Reads the next page of committed events after the cursor, up to `bound`, from the store
    /// (at most `catch_up_reads_max` such reads at once; more wait).
    async fn read_page(&mut self, bound: u64) -> anyhow::Result<()> {
        let permits = Arc::clone(&self.hub().catch_up_permits);
        let permit = permits.acquire_owned().await?;
        let sequencer = Arc::clone(&self.hub().sequencer);
        let filter = Arc::clone(&self.filter);
        let after = self.cursor;
        let (bytes, sent, last_sent, examined_to) = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            if sequencer.is_poisoned() {
                anyhow::bail!("the write path is poisoned");
            }
            let events =
                keel_sequencer::committed_events(sequencer.reader(), after, PAGE_EVENTS, bound)?;
            // A short page holds every event up to `bound`.
            let examined_to = match events.last() {
                Some(last) if events.len() == PAGE_EVENTS => last.seq,
                _ => bound,
            };
            let mut bytes = Vec::new();
            let mut sent = 0u64;
            let mut last_sent = None;
            let mut timestamps = Timestamps::default();
            for event in events.iter().filter(|e| filter.passes_event(e)) {
                encode_event(&mut bytes, event, timestamps.of(event));
                sent += 1;
                last_sent = Some(event.seq);
            }
            Ok((bytes, sent, last_sent, examined_to))
        })
        .await??;
        self.cursor = examined_to;
        if let Some(last_sent) = last_sent {
            self.last_delivered = last_sent;
            self.ready.push_back(Bytes::from(bytes));
            metrics::counter!("keel_subscribe_deliveries_total").increment(sent);
        }
        Ok(())
    }
}

type NextPiece = Pin<Box<dyn Future<Output = Option<(Bytes, Session)>> + Send>>;

/// The response body of a subscription: the session's pieces, one frame each, as the
/// connection can take them.
struct SubscriptionBody {
    next: Option<NextPiece>,
}

impl hyper::body::Body for SubscriptionBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let Some(next) = self.next.as_mut() else {
            return Poll::Ready(None);
        };
        match next.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.next = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some((bytes, session))) => {
                self.next = Some(Box::pin(session.next()));
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.next.is_none()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeQuery {
    #[serde(default)]
    after: u64,
    kind: Option<String>,
    aggregate: Option<String>,
}

fn invalid_query(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message)
}

/// The filter of a query, checked: a kind is a name without `:`, an aggregate is a full id.
fn checked_filter(kind: Option<String>, aggregate: Option<String>) -> Result<Filter, ApiError> {
    let bad = |value: &str| {
        value.is_empty()
            || value.len() > FILTER_BYTES_MAX
            || value.bytes().any(|b| !b.is_ascii_graphic())
    };
    if let Some(kind) = &kind
        && (bad(kind) || kind.contains(':'))
    {
        return Err(invalid_query(format!(
            "`kind` {} must be an aggregate kind such as `account`",
            wire::quote(kind)
        )));
    }
    if let Some(aggregate) = &aggregate
        && (bad(aggregate) || !aggregate.contains(':'))
    {
        return Err(invalid_query(format!(
            "`aggregate` {} must be a full aggregate id such as `account:alice`",
            wire::quote(aggregate)
        )));
    }
    Ok(Filter { kind, aggregate })
}

/// The `Last-Event-ID` header, when given: an event sequence.
fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| invalid_query("`Last-Event-ID` must be an event sequence (an integer)"))
}

/// `GET /v1/subscribe?after=SEQ&kind=KIND&aggregate=ID` (docs/API.md).
pub async fn get_subscribe(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<SubscribeQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query
        .map_err(|e| invalid_query(keel_sequencer::shorten(e.body_text(), ERROR_TEXT_BYTES_MAX)))?;
    let after = last_event_id(&headers)?.unwrap_or(query.after);
    let filter = checked_filter(query.kind, query.aggregate)?;
    if state.sequencer.is_poisoned() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "engine_poisoned",
            keel_sequencer::SubmitError::Poisoned.to_string(),
        ));
    }
    let hub = &state.subscriptions;
    hub.start();
    let session = hub.subscribe(after, filter)?;
    let body = SubscriptionBody {
        next: Some(Box::pin(session.next())),
    };
    let mut response = Body::new(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}
