//! The projector (`keel project`): a durable JetStream pull consumer that applies every
//! committed batch, in batch order, to MongoDB, and acks a message only after MongoDB confirmed
//! the writes that contain it.
//!
//! Exactly-once effect over at-least-once delivery:
//! - batches are applied strictly in sequence: the next one must be `checkpoint + 1`. A lower
//!   one is a duplicate (acked, skipped). A higher one means batches are missing from the
//!   stream (JetStream can lose acknowledged messages; operators can delete them): the
//!   projector fetches the missing ones from the source (`GET /v1/batches/{seq}`), verifies
//!   them, and applies them first;
//! - every batch must link to the previous one (its `prev_hash`), so a stream or source of
//!   another store is refused instead of being mixed in;
//! - aggregate states are computed here, by folding each event through the domain's `apply`
//!   into an in-memory copy of the aggregate (loaded from MongoDB the first time it is touched),
//!   and only events newer than the aggregate's stored `last_seq` are applied;
//! - the writes of a round (events, then aggregates, then the checkpoint) are idempotent
//!   ([`crate::store`]), so a crash anywhere in between is repaired by doing the round again.
//!
//! MongoDB, NATS or the source unreachable: the projector waits and retries with a capped
//! backoff, without acking and without losing its place.

use crate::backoff::{Backoff, Shutdown};
use crate::documents::{self, Checkpoint, DocumentError};
use crate::nats;
use crate::source::{Source, SourceError};
use crate::store::{CheckpointWrite, Store, StoreError};
use async_nats::jetstream::consumer::pull::{self, MessagesError};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, ReplayPolicy};
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, AckKind, ErrorCode, Message};
use futures_util::StreamExt;
use keel_engine::{BatchHeader, BatchMessage};
use keel_invariants::{Aggregate, LoggedEvent, codec};
use mongodb::bson::Document;
use std::collections::{BTreeSet, HashMap};
use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// Everything `keel project` is told.
#[derive(Clone, Debug)]
pub struct ProjectorConfig {
    pub nats_url: String,
    pub mongo_url: String,
    pub mongo_db: String,
    /// The Keel server whose `GET /v1/batches/{seq}` repairs gaps.
    pub source_url: String,
    /// How the source is reached (https CA certificate, API key).
    pub source_client: crate::http_client::ClientOptions,
    pub stream: String,
    /// The stream's subject, used only if the projector has to create the stream itself.
    pub subject: String,
    /// The durable consumer's name; also the `_id` of this projector's checkpoint document.
    pub durable: String,
    /// Drop the projection and the consumer, and project from the start of history.
    pub rebuild: bool,
    /// Most messages delivered and not yet acked (the consumer's `max_ack_pending`).
    pub ack_pending_max: usize,
    /// Most events applied in one round of MongoDB writes.
    pub round_events_max: usize,
    /// After this long without a message, ask the source whether batches were committed that
    /// never arrived (a lost last message, a long NATS outage). Zero disables it.
    pub idle_probe: Duration,
}

impl ProjectorConfig {
    /// The defaults of `keel project` for the given endpoints.
    pub fn new(nats_url: &str, mongo_url: &str, source_url: &str) -> Self {
        Self {
            nats_url: nats_url.to_owned(),
            mongo_url: mongo_url.to_owned(),
            mongo_db: "keel".into(),
            source_url: source_url.to_owned(),
            source_client: crate::http_client::ClientOptions::default(),
            stream: "KEEL".into(),
            subject: "keel.batches".into(),
            durable: "keel-projector".into(),
            rebuild: false,
            ack_pending_max: 1024,
            round_events_max: 10_000,
            idle_probe: Duration::from_secs(10),
        }
    }
}

/// Why the projector stopped for good. Outages are not errors: they are waited out.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(
        "batch {batch} does not follow the projection's last batch ({detail}): the stream or the \
         source belongs to another Keel store than this projection; run `keel project --rebuild`"
    )]
    Diverged { batch: u64, detail: String },
    #[error("event {seq} does not decode with this build's domain: {detail}")]
    Undecodable { seq: u64, detail: String },
    #[error("the projection holds a document this projector cannot read: {0}")]
    Document(#[from] DocumentError),
}

/// How a step ended when it did not succeed.
enum Interrupt {
    Stopped,
    /// The stored checkpoint moved under us: reload it and carry on from there.
    Lost,
    Fatal(ProjectError),
}

impl From<ProjectError> for Interrupt {
    fn from(e: ProjectError) -> Self {
        Interrupt::Fatal(e)
    }
}

/// A failed attempt: worth retrying or not.
enum Failure {
    Transient(String),
    Fatal(ProjectError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Document(e) => Failure::Fatal(e.into()),
            other => Failure::Transient(other.to_string()),
        }
    }
}

impl From<SourceError> for Failure {
    fn from(e: SourceError) -> Self {
        Failure::Transient(e.to_string())
    }
}

fn transient(e: impl Display) -> Failure {
    Failure::Transient(e.to_string())
}

/// Runs `attempt` until it succeeds, a fatal failure, or shutdown, waiting a capped exponential
/// backoff between attempts.
async fn retry<T, F, Fut>(
    shutdown: &mut Shutdown,
    what: &str,
    mut attempt: F,
) -> Result<T, Interrupt>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(Failure::Fatal(e)) => return Err(Interrupt::Fatal(e)),
            Err(Failure::Transient(error)) => {
                let delay = backoff.next_delay();
                metrics::counter!("keel_projector_retries_total").increment(1);
                tracing::warn!(%error, ?delay, "{what} failed; retrying");
                if !shutdown.sleep(delay).await {
                    return Err(Interrupt::Stopped);
                }
            }
        }
    }
}

/// One aggregate as the projector knows it.
struct Cached {
    aggregate: Option<Aggregate>,
    /// The last event applied to it (0: none).
    last_seq: u64,
    /// Commit time of `last_seq`'s batch (set when this projector applied it).
    updated_at_us: u64,
}

/// Batches applied in memory and not yet written.
#[derive(Default)]
struct Round {
    events: Vec<Document>,
    dirty: BTreeSet<String>,
    last: Option<BatchHeader>,
    batches: u64,
}

/// What a delivered message stands for.
enum Incoming {
    Batch(Box<BatchMessage>),
    /// Batch `seq` must be taken from the source (an oversized placeholder, or a body that
    /// does not verify).
    FromSource(u64),
    /// Nothing usable: no verifiable body and no id.
    Unusable,
}

/// Most messages handled in one round.
const CHUNK_MAX: usize = 512;
/// Most bytes one pull request asks for, bounding what waits in memory besides a round. Above
/// NATS's 64 MiB ceiling for one message, so any single message still fits.
const PULL_BYTES_MAX: usize = 128 << 20;
/// Concurrent requests to the source while repairing a gap.
const REPAIR_CONCURRENCY: usize = 8;
/// Most batches one idle probe takes from the source.
const PROBE_BATCHES_MAX: u64 = 10_000;
/// How often progress is logged.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the projector until `shutdown` or a fatal error.
pub async fn run(config: ProjectorConfig, shutdown: Shutdown) -> Result<(), ProjectError> {
    let store = Store::connect(&config.mongo_url, &config.mongo_db, &config.durable)
        .await
        .map_err(|e| ProjectError::Config(format!("MongoDB URL: {e}")))?;
    let source = Source::new(&config.source_url, &config.source_client)
        .map_err(|e| ProjectError::Config(e.to_string()))?;
    let client = nats::connect(&config.nats_url, "keel-projector")
        .await
        .map_err(|e| ProjectError::Config(format!("NATS URL `{}`: {e}", config.nats_url)))?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .build(client);
    let mut projector = Projector {
        config,
        store,
        source,
        js,
        shutdown,
        checkpoint: Checkpoint::default(),
        cache: HashMap::new(),
        progress: Progress::new(),
    };
    match projector.run().await {
        Ok(()) | Err(Interrupt::Stopped) => {
            tracing::info!(batch = projector.checkpoint.last_batch, "projector stopped");
            Ok(())
        }
        Err(Interrupt::Fatal(e)) => Err(e),
        Err(Interrupt::Lost) => {
            // `Projector::run` handles lost rounds itself; this arm only keeps the match total.
            tracing::error!("a lost round escaped the projector loop; stopping");
            Ok(())
        }
    }
}

struct Progress {
    logged_at: Instant,
    events: u64,
    batches: u64,
}

impl Progress {
    fn new() -> Self {
        Self {
            logged_at: Instant::now(),
            events: 0,
            batches: 0,
        }
    }
}

struct Projector {
    config: ProjectorConfig,
    store: Store,
    source: Source,
    js: jetstream::Context,
    shutdown: Shutdown,
    /// What MongoDB confirmed.
    checkpoint: Checkpoint,
    /// Every aggregate touched since start (or the last reset), as written or about to be.
    cache: HashMap<String, Cached>,
    progress: Progress,
}

impl Projector {
    async fn run(&mut self) -> Result<(), Interrupt> {
        if self.config.rebuild {
            self.rebuild().await?;
        }
        let store = &self.store;
        retry(&mut self.shutdown, "creating MongoDB indexes", || async {
            Ok(store.prepare().await?)
        })
        .await?;
        self.load_checkpoint().await?;
        loop {
            let consumer = self.consumer().await?;
            println!(
                "keel: projector consuming {}/{} after batch {}",
                self.config.stream, self.config.durable, self.checkpoint.last_batch
            );
            match self.consume(&consumer).await {
                Ok(()) => {}
                Err(Interrupt::Lost) => self.reset().await?,
                Err(other) => return Err(other),
            }
        }
    }

    /// `--rebuild`: drop the projection and the durable consumer. A crash in between is safe:
    /// a consumer ahead of an empty projection is caught up from the source.
    async fn rebuild(&mut self) -> Result<(), Interrupt> {
        tracing::warn!(db = %self.config.mongo_db, durable = %self.config.durable, "rebuilding the projection from scratch");
        let store = &self.store;
        retry(&mut self.shutdown, "dropping the projection", || async {
            Ok(store.drop_projection().await?)
        })
        .await?;
        let (js, config) = (&self.js, &self.config);
        retry(&mut self.shutdown, "deleting the durable consumer", || async {
            let stream = js
                .get_or_create_stream(nats::stream_config(
                    &config.stream,
                    &config.subject,
                    nats::StreamLimits::default(),
                ))
                .await
                .map_err(transient)?;
            match stream.delete_consumer(&config.durable).await {
                Ok(_) => Ok(()),
                Err(e) if matches!(e.kind(), ConsumerErrorKind::JetStream(j) if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND) => Ok(()),
                Err(e) => Err(transient(e)),
            }
        })
        .await
    }

    async fn load_checkpoint(&mut self) -> Result<(), Interrupt> {
        let store = &self.store;
        let stored = retry(&mut self.shutdown, "reading the checkpoint", || async {
            Ok(store.checkpoint().await?)
        })
        .await?;
        self.checkpoint = stored.unwrap_or_default();
        Ok(())
    }

    /// The checkpoint moved under us (the projection was dropped or restored): forget what we
    /// hold and continue from what MongoDB has. Gap repair brings back what is missing.
    async fn reset(&mut self) -> Result<(), Interrupt> {
        let before = self.checkpoint.last_batch;
        self.cache.clear();
        // A projection that came back empty lost its indexes too.
        let store = &self.store;
        retry(&mut self.shutdown, "creating MongoDB indexes", || async {
            Ok(store.prepare().await?)
        })
        .await?;
        self.load_checkpoint().await?;
        tracing::warn!(
            before,
            after = self.checkpoint.last_batch,
            "the stored checkpoint moved; continuing from it"
        );
        Ok(())
    }

    async fn consumer(&mut self) -> Result<PullConsumer, Interrupt> {
        let (js, config) = (&self.js, &self.config);
        let consumer_config = pull::Config {
            durable_name: Some(config.durable.clone()),
            description: Some("Keel MongoDB projector (docs/PROJECTION.md)".into()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            max_deliver: -1,
            max_ack_pending: i64::try_from(config.ack_pending_max).unwrap_or(i64::MAX),
            max_waiting: 64,
            replay_policy: ReplayPolicy::Instant,
            inactive_threshold: Duration::ZERO,
            ..pull::Config::default()
        };
        retry(&mut self.shutdown, "subscribing to JetStream", || async {
            let stream = js
                .get_or_create_stream(nats::stream_config(
                    &config.stream,
                    &config.subject,
                    nats::StreamLimits::default(),
                ))
                .await
                .map_err(transient)?;
            stream
                .get_or_create_consumer(&config.durable, consumer_config.clone())
                .await
                .map_err(transient)
        })
        .await
    }

    /// Takes messages until the subscription fails (the caller subscribes again).
    async fn consume(&mut self, consumer: &PullConsumer) -> Result<(), Interrupt> {
        let batch_max = self.config.ack_pending_max.clamp(1, CHUNK_MAX);
        let messages = match consumer
            .stream()
            .max_messages_per_batch(batch_max)
            .max_bytes_per_batch(PULL_BYTES_MAX)
            .expires(Duration::from_secs(30))
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
        {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "pulling from JetStream failed; subscribing again");
                return if self.shutdown.sleep(Duration::from_secs(1)).await {
                    Ok(())
                } else {
                    Err(Interrupt::Stopped)
                };
            }
        };
        let mut chunks = messages.ready_chunks(CHUNK_MAX);
        let idle = if self.config.idle_probe.is_zero() {
            Duration::from_secs(3600)
        } else {
            self.config.idle_probe
        };
        loop {
            let next = tokio::select! {
                () = self.shutdown.requested() => return Err(Interrupt::Stopped),
                next = tokio::time::timeout(idle, chunks.next()) => next,
            };
            match next {
                Err(_idle) if !self.config.idle_probe.is_zero() => self.probe_source().await?,
                Err(_idle) => {}
                Ok(None) => {
                    tracing::warn!("the JetStream message stream ended; subscribing again");
                    return Ok(());
                }
                Ok(Some(items)) => {
                    if !self.handle(items).await? {
                        return if self.shutdown.sleep(Duration::from_millis(500)).await {
                            Ok(())
                        } else {
                            Err(Interrupt::Stopped)
                        };
                    }
                }
            }
        }
    }

    /// Applies a chunk of delivered messages as one round, then acks them. False when the
    /// chunk carried a subscription error (the caller subscribes again).
    async fn handle(
        &mut self,
        items: Vec<Result<Message, MessagesError>>,
    ) -> Result<bool, Interrupt> {
        let mut messages = Vec::with_capacity(items.len());
        let mut healthy = true;
        for item in items {
            match item {
                Ok(message) => messages.push(message),
                Err(error) => {
                    tracing::warn!(%error, "JetStream delivery error");
                    healthy = false;
                }
            }
        }
        let mut round = Round::default();
        let mut applied = Ok(());
        for message in &messages {
            applied = self.take(incoming(message), &mut round).await;
            if applied.is_ok() && round.events.len() >= self.config.round_events_max {
                applied = self.flush(&mut round).await;
            }
            if applied.is_err() {
                break;
            }
        }
        if applied.is_ok() {
            applied = self.flush(&mut round).await;
        }
        match applied {
            Ok(()) => {
                for message in &messages {
                    if let Err(error) = message.ack().await {
                        tracing::debug!(%error, "ack failed; the message will be redelivered and skipped");
                    }
                }
                Ok(healthy)
            }
            Err(Interrupt::Lost) => {
                for message in &messages {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
                Err(Interrupt::Lost)
            }
            Err(other) => Err(other),
        }
    }

    /// The next batch the projection needs, counting what `round` applied.
    fn next_batch(&self, round: &Round) -> u64 {
        round.last.map_or(self.checkpoint.last_batch, |h| h.seq) + 1
    }

    /// Applies one delivered batch, after repairing any gap before it.
    async fn take(&mut self, incoming: Incoming, round: &mut Round) -> Result<(), Interrupt> {
        let (seq, batch) = match incoming {
            Incoming::Batch(batch) => (batch.header.seq, Some(*batch)),
            Incoming::FromSource(seq) => (seq, None),
            Incoming::Unusable => return Ok(()),
        };
        let next = self.next_batch(round);
        if seq < next {
            return Ok(()); // a duplicate: already applied
        }
        let repair_to = if batch.is_some() { seq - 1 } else { seq };
        if repair_to >= next {
            self.repair(next, repair_to, round).await?;
        }
        match batch {
            Some(batch) => self.apply(batch, round).await,
            None => Ok(()),
        }
    }

    /// Fetches batches `first..=last` from the source and applies them in order.
    async fn repair(&mut self, first: u64, last: u64, round: &mut Round) -> Result<(), Interrupt> {
        tracing::info!(first, last, source = %self.source.url(), "taking batches from the source (missing from the stream, or too large for it)");
        metrics::counter!("keel_projector_repaired_batches_total")
            .increment(last.saturating_sub(first) + 1);
        let (source, shutdown) = (self.source.clone(), self.shutdown.clone());
        let mut fetched = futures_util::stream::iter(first..=last)
            .map(|seq| fetch_required(source.clone(), shutdown.clone(), seq))
            .buffered(REPAIR_CONCURRENCY);
        while let Some(batch) = fetched.next().await {
            self.apply(batch?, round).await?;
            if round.events.len() >= self.config.round_events_max {
                self.flush(round).await?;
            }
        }
        Ok(())
    }

    /// When nothing arrived for a while: take from the source what was committed after the
    /// projection's last batch, if anything. One attempt per batch; errors wait for the next.
    async fn probe_source(&mut self) -> Result<(), Interrupt> {
        let mut round = Round::default();
        let mut taken = 0u64;
        while taken < PROBE_BATCHES_MAX {
            let seq = self.next_batch(&round);
            match self.source.batch(seq).await {
                Ok(Some(batch)) => {
                    self.apply(batch, &mut round).await?;
                    taken += 1;
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::debug!(%error, "idle probe of the source failed");
                    break;
                }
            }
            if round.events.len() >= self.config.round_events_max {
                self.flush(&mut round).await?;
            }
        }
        if taken > 0 {
            tracing::info!(
                taken,
                "nothing arrived from JetStream for a while; took committed batches from the source"
            );
        }
        self.flush(&mut round).await
    }

    /// Applies `batch` (the next one) to the in-memory aggregates and adds it to `round`.
    async fn apply(&mut self, batch: BatchMessage, round: &mut Round) -> Result<(), Interrupt> {
        let header = batch.header;
        self.check_link(&header, round)?;
        let mut events = Vec::with_capacity(batch.events.len());
        for event in batch.events {
            let logged =
                codec::decode_event(&event.payload).map_err(|e| ProjectError::Undecodable {
                    seq: event.seq,
                    detail: e.to_string(),
                })?;
            events.push((event.seq, logged));
        }
        self.load_missing(&events).await?;
        for (seq, logged) in &events {
            self.apply_event(*seq, logged, header.committed_at_us, round);
            round.events.push(documents::event_document(
                *seq,
                header.seq,
                header.committed_at_us,
                logged,
            ));
        }
        round.last = Some(header);
        round.batches += 1;
        Ok(())
    }

    /// A batch must continue the chain exactly where the projection stands.
    fn check_link(&self, header: &BatchHeader, round: &Round) -> Result<(), ProjectError> {
        let (seq, last_event, last_hash) = match round.last {
            Some(h) => (h.seq, h.last_event(), h.hash),
            None => (
                self.checkpoint.last_batch,
                self.checkpoint.last_seq,
                self.checkpoint.last_hash,
            ),
        };
        assert_eq!(header.seq, seq + 1, "only the next batch is applied");
        if header.first_event != last_event + 1 || header.prev_hash != last_hash {
            return Err(ProjectError::Diverged {
                batch: header.seq,
                detail: format!(
                    "it starts at event {} with previous hash {}, the projection ends at event {last_event} with hash {}",
                    header.first_event,
                    keel_engine::format::hex(&header.prev_hash),
                    keel_engine::format::hex(&last_hash)
                ),
            });
        }
        Ok(())
    }

    /// Loads from MongoDB every aggregate `events` touch that is not in memory yet.
    async fn load_missing(&mut self, events: &[(u64, LoggedEvent)]) -> Result<(), Interrupt> {
        let missing: BTreeSet<String> = events
            .iter()
            .flat_map(|(_, logged)| {
                logged
                    .event
                    .targets()
                    .iter()
                    .map(|id| id.as_str().to_owned())
                    .collect::<Vec<_>>()
            })
            .filter(|id| !self.cache.contains_key(id))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = missing.into_iter().collect();
        let store = &self.store;
        let found = retry(&mut self.shutdown, "reading aggregates", || async {
            Ok(store.aggregates(&ids).await?)
        })
        .await?;
        for id in ids {
            self.cache.insert(
                id,
                Cached {
                    aggregate: None,
                    last_seq: 0,
                    updated_at_us: 0,
                },
            );
        }
        for (id, aggregate, last_seq) in found {
            self.cache.insert(
                id,
                Cached {
                    aggregate: Some(aggregate),
                    last_seq,
                    updated_at_us: 0,
                },
            );
        }
        Ok(())
    }

    /// Folds one event into each aggregate it targets that has not seen it yet.
    fn apply_event(
        &mut self,
        seq: u64,
        logged: &LoggedEvent,
        committed_at_us: u64,
        round: &mut Round,
    ) {
        for (target, id) in logged.event.targets().iter().enumerate() {
            let Some(cached) = self.cache.get_mut(id.as_str()) else {
                // `load_missing` put every target in the cache; this is a bug, not an input.
                tracing::error!(%id, seq, "aggregate missing from the projector's cache");
                continue;
            };
            if seq <= cached.last_seq {
                continue; // written by an earlier, interrupted round
            }
            cached.aggregate = Some(keel_invariants::apply(
                &logged.event,
                target,
                cached.aggregate.take(),
            ));
            cached.last_seq = seq;
            cached.updated_at_us = committed_at_us;
            round.dirty.insert(id.as_str().to_owned());
        }
    }

    /// Writes `round` (events, aggregates, then the checkpoint) and empties it.
    async fn flush(&mut self, round: &mut Round) -> Result<(), Interrupt> {
        let Some(last) = round.last else {
            return Ok(());
        };
        let aggregates: Vec<(String, Document, u64)> = round
            .dirty
            .iter()
            .filter_map(|id| {
                let cached = self.cache.get(id)?;
                let aggregate = cached.aggregate.as_ref()?;
                let document = documents::aggregate_document(
                    id,
                    aggregate,
                    cached.last_seq,
                    cached.updated_at_us,
                );
                Some((id.clone(), document, cached.last_seq))
            })
            .collect();
        let checkpoint = Checkpoint {
            last_batch: last.seq,
            last_seq: last.last_event(),
            last_hash: last.hash,
            committed_at_us: last.committed_at_us,
        };
        let previous = self.checkpoint.last_batch;
        let writing = std::time::Instant::now();
        let (store, events) = (&self.store, &round.events);
        retry(&mut self.shutdown, "writing events", || async {
            Ok(store.insert_events(events).await?)
        })
        .await?;
        retry(&mut self.shutdown, "writing aggregates", || async {
            Ok(store.upsert_aggregates(&aggregates).await?)
        })
        .await?;
        let written = retry(&mut self.shutdown, "writing the checkpoint", || async {
            match store.write_checkpoint(previous, &checkpoint).await? {
                CheckpointWrite::Written => Ok(true),
                // Our own earlier attempt may have landed with its answer lost.
                CheckpointWrite::Moved => Ok(store
                    .checkpoint()
                    .await?
                    .is_some_and(|c| c.last_batch == checkpoint.last_batch)),
            }
        })
        .await?;
        if !written {
            return Err(Interrupt::Lost);
        }
        self.checkpoint = checkpoint;
        record_round(round, &checkpoint, writing.elapsed());
        self.log_progress(round);
        *round = Round::default();
        Ok(())
    }

    fn log_progress(&mut self, round: &Round) {
        self.progress.events += round.events.len() as u64;
        self.progress.batches += round.batches;
        let elapsed = self.progress.logged_at.elapsed();
        if elapsed >= PROGRESS_INTERVAL {
            let seconds = elapsed.as_secs_f64();
            tracing::info!(
                batch = self.checkpoint.last_batch,
                event = self.checkpoint.last_seq,
                events_per_s = (self.progress.events as f64 / seconds).round(),
                batches_per_s = (self.progress.batches as f64 / seconds).round(),
                "projected"
            );
            self.progress = Progress::new();
        }
    }
}

/// Names and meanings of the projector's metrics (served by `keel project --metrics-listen`).
pub fn describe_metrics() {
    metrics::describe_gauge!(
        "keel_projector_checkpoint_batch",
        "last batch the projection holds whole (its checkpoint)"
    );
    metrics::describe_gauge!(
        "keel_projector_checkpoint_event",
        "last event sequence the projection holds whole"
    );
    metrics::describe_gauge!(
        "keel_projector_lag_seconds",
        "age of the checkpoint's batch when it was written: commit in Keel to visible in MongoDB"
    );
    metrics::describe_counter!(
        "keel_projector_events_total",
        "events written to MongoDB (a repeated round after a crash counts again)"
    );
    metrics::describe_counter!("keel_projector_batches_total", "batches written to MongoDB");
    metrics::describe_counter!(
        "keel_projector_retries_total",
        "MongoDB, NATS or source operations retried after a transient failure"
    );
    metrics::describe_counter!(
        "keel_projector_repaired_batches_total",
        "batches taken from Keel's HTTP API instead of the stream (gaps, oversized batches)"
    );
    metrics::describe_histogram!(
        "keel_projector_round_seconds",
        "time to write one round (events, aggregates, checkpoint) to MongoDB"
    );
}

/// The metrics of a round just written.
fn record_round(round: &Round, checkpoint: &Checkpoint, writing: Duration) {
    metrics::gauge!("keel_projector_checkpoint_batch").set(checkpoint.last_batch as f64);
    metrics::gauge!("keel_projector_checkpoint_event").set(checkpoint.last_seq as f64);
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let lag = now_us.saturating_sub(checkpoint.committed_at_us) as f64 / 1e6;
    metrics::gauge!("keel_projector_lag_seconds").set(lag);
    metrics::counter!("keel_projector_events_total").increment(round.events.len() as u64);
    metrics::counter!("keel_projector_batches_total").increment(round.batches);
    metrics::histogram!("keel_projector_round_seconds").record(writing.as_secs_f64());
}

/// What a delivered message stands for: its verified batch, or the batch to take from the
/// source instead (an empty placeholder or a body that does not verify, named by its id).
fn incoming(message: &Message) -> Incoming {
    if !message.payload.is_empty() {
        match keel_engine::decode_batch_message(&message.payload) {
            Ok(batch) => return Incoming::Batch(Box::new(batch)),
            Err(error) => {
                tracing::warn!(%error, "a JetStream message does not verify; taking its batch from the source")
            }
        }
    }
    let id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(nats::MSG_ID_HEADER))
        .map(|v| v.as_str().to_owned());
    match id
        .and_then(|id| id.parse::<u64>().ok())
        .filter(|seq| *seq > 0)
    {
        Some(seq) => Incoming::FromSource(seq),
        None => {
            tracing::error!(
                "a JetStream message has neither a verifiable body nor a batch id; skipping it (the gap it leaves is repaired)"
            );
            Incoming::Unusable
        }
    }
}

/// Batch `seq` from the source, waiting out outages; the source must have it, since the stream
/// has a later batch.
async fn fetch_required(
    source: Source,
    mut shutdown: Shutdown,
    seq: u64,
) -> Result<BatchMessage, Interrupt> {
    retry(
        &mut shutdown,
        "fetching a batch from the source",
        || async {
            match source.batch(seq).await? {
                Some(batch) => Ok(batch),
                None => Err(Failure::Transient(format!(
                    "the source {} has no batch {seq}, but the stream has a later one",
                    source.url()
                ))),
            }
        },
    )
    .await
}
