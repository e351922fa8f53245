//! The publisher: a task inside `keel serve` that follows the outbox cursor over the committed
//! log and publishes every committed batch as ONE JetStream message (body: the batch message,
//! header `Nats-Msg-Id`: the batch sequence).
//!
//! It only reads the store, so it never slows or blocks the writer; when NATS is down or slow
//! the write path commits at full speed and `keel_publish_lag_batches` grows. Up to
//! `inflight_max` publishes are in flight at once; the cursor advances (and is recorded in
//! `meta/publish_cursor`) only over the contiguous prefix of batches JetStream acknowledged. Any
//! failure restarts from the recorded position after a capped backoff: a batch may be sent
//! twice, and JetStream drops the second copy by its message id (the projector would skip it
//! anyway), but none is skipped.

use crate::backoff::{Backoff, Shutdown, ShutdownTrigger, shutdown_channel};
use crate::nats;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, publish::PublishAck};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use keel_engine::{EngineError, Reader};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;

/// How the publisher reaches JetStream.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    pub nats_url: String,
    pub stream: String,
    pub subject: String,
    /// Most publishes awaiting their JetStream ack at once.
    pub inflight_max: usize,
    /// The stream's retention bounds, applied at every start.
    pub limits: crate::nats::StreamLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("NATS URL `{url}`: {detail}")]
    Connect { url: String, detail: String },
    #[error("creating or updating stream `{stream}`: {detail}")]
    Stream { stream: String, detail: String },
    #[error("reading the committed log: {0}")]
    Read(#[from] EngineError),
    #[error("batch {0} is at or below the tip but not in the store")]
    Missing(u64),
    #[error("publishing batch {seq}: {detail}")]
    Publish { seq: u64, detail: String },
    #[error("a blocking read failed: {0}")]
    Task(String),
    #[error(
        "data loss: JetStream stream `{stream}` holds batch {published}, published by this store, but the store ends at batch {store}; \
         the store lost committed batches (restored from an old copy, or damaged); refusing to start. \
         Restore the store to at least batch {published}, or see docs/FORMAT.md, \"Recovery\""
    )]
    DataLoss {
        stream: String,
        published: u64,
        store: u64,
    },
    #[error(
        "JetStream stream `{stream}` holds batch messages of layout {layout}, written by a store of another \
         storage format (before `keel upgrade`); this store's batches have other hashes, so publishing \
         into it would fork the history the projection follows: re-create the stream and rebuild the \
         projection (docs/PROJECTION.md); refusing to publish"
    )]
    OtherLayout { stream: String, layout: u8 },
    #[error(
        "the store's batch {batch} is not the batch {batch} JetStream stream `{stream}` holds \
         (hash {stored} in the store, {published} published): the store's history forked; refusing to publish"
    )]
    Forked {
        stream: String,
        batch: u64,
        stored: String,
        published: String,
    },
}

impl PublishError {
    /// The store is behind or beside the history the stream holds (its own, or a store's of
    /// another format): never retried away.
    pub fn is_data_loss(&self) -> bool {
        matches!(
            self,
            PublishError::DataLoss { .. }
                | PublishError::Forked { .. }
                | PublishError::OtherLayout { .. }
        )
    }
}

/// How long a publish waits for its JetStream ack before the session restarts.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle publisher looks at the chain tip. Reading it is one RocksDB point get.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// How often the cursor is recorded while publishing continuously. Losing it costs a resend.
const PERSIST_INTERVAL: Duration = Duration::from_millis(100);
/// Most batches read from the store in one blocking task.
const READ_CHUNK: u64 = 64;
/// How long [`start`] waits for JetStream to name the stream's last batch. NATS being down
/// must not keep Keel from taking writes, so past this the check is left to the first session.
const WITNESS_WAIT: Duration = Duration::from_secs(5);

/// The running publisher.
pub struct PublisherHandle {
    trigger: ShutdownTrigger,
    task: JoinHandle<()>,
}

impl PublisherHandle {
    /// Stops the publisher: it sends what is committed for up to `grace`, records its cursor
    /// and ends. What it could not send goes out at the next start.
    pub async fn shutdown(self, grace: Duration) {
        self.trigger.trigger();
        let abort = self.task.abort_handle();
        if tokio::time::timeout(grace, self.task).await.is_err() {
            tracing::warn!(
                ?grace,
                "publisher did not finish in time; the rest is published at the next start"
            );
            abort.abort();
        }
    }
}

/// Connects (in the background) and starts publishing from `meta/publish_cursor`. Fails only
/// on a NATS URL that does not parse or a store that cannot be read.
pub async fn start(
    reader: Reader,
    config: PublisherConfig,
) -> Result<PublisherHandle, PublishError> {
    assert!(config.inflight_max > 0, "inflight_max must be positive");
    describe_metrics();
    let client = nats::connect(&config.nats_url, "keel-publisher")
        .await
        .map_err(|e| PublishError::Connect {
            url: config.nats_url.clone(),
            detail: e.to_string(),
        })?;
    let js = jetstream::ContextBuilder::new()
        .timeout(ACK_TIMEOUT)
        .max_ack_inflight(config.inflight_max)
        .backpressure_on_inflight(true)
        .build(client);
    check_witness_at_start(&reader, &js, &config).await?;
    let cursor = Arc::new(AtomicU64::new(reader.publish_cursor()?));
    let (trigger, shutdown) = shutdown_channel();
    tokio::spawn(lag_metrics(
        reader.clone(),
        Arc::clone(&cursor),
        shutdown.clone(),
    ));
    tracing::info!(url = %config.nats_url, stream = %config.stream, subject = %config.subject,
        cursor = cursor.load(Ordering::Acquire), "publisher started");
    let publisher = Publisher {
        reader,
        js,
        config,
        cursor,
    };
    let task = tokio::spawn(publisher.run(shutdown));
    Ok(PublisherHandle { trigger, task })
}

/// Compares the store's tip with the stream's last batch before anything is published or
/// written: a store behind the history it published itself lost committed batches, and
/// starting would reuse their sequence numbers for different batches. When JetStream does not
/// answer within [`WITNESS_WAIT`], the server starts anyway (the write path never depends on
/// NATS) and every publishing session makes the same check before its first publish.
async fn check_witness_at_start(
    reader: &Reader,
    js: &jetstream::Context,
    config: &PublisherConfig,
) -> Result<(), PublishError> {
    let found = tokio::time::timeout(
        WITNESS_WAIT,
        nats::last_published(js, &config.stream, &config.subject),
    )
    .await;
    match found {
        Ok(Ok(published)) => compare_with_witness(reader, published, &config.stream),
        Ok(Err(error)) => {
            tracing::warn!(%error, "the stream's last batch could not be compared with the store's tip at start; the publisher compares it before publishing");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(wait = ?WITNESS_WAIT, "JetStream did not answer: the stream's last batch was not compared with the store's tip at start; the publisher compares it before publishing");
            Ok(())
        }
    }
}

/// The store must hold every batch the stream holds, and the same one (by hash) at the
/// stream's last batch when its message carries the header.
fn compare_with_witness(
    reader: &Reader,
    published: Option<nats::Published>,
    stream: &str,
) -> Result<(), PublishError> {
    let Some(published) = published else {
        return Ok(()); // nothing published (yet, or any more): no witness
    };
    if let Some(layout) = published
        .layout
        .filter(|l| *l != keel_engine::message::BATCH_MESSAGE_VERSION)
    {
        return Err(PublishError::OtherLayout {
            stream: stream.to_owned(),
            layout,
        });
    }
    let tip = reader.tip()?.last_batch;
    if published.batch > tip {
        return Err(PublishError::DataLoss {
            stream: stream.to_owned(),
            published: published.batch,
            store: tip,
        });
    }
    if let Some(header) = published.header {
        let stored = reader.batch(header.seq)?;
        if stored.map(|h| h.hash) != Some(header.hash) {
            return Err(PublishError::Forked {
                stream: stream.to_owned(),
                batch: header.seq,
                stored: stored.map_or_else(|| "none".into(), |h| keel_engine::format::hex(&h.hash)),
                published: keel_engine::format::hex(&header.hash),
            });
        }
    }
    tracing::info!(
        published = published.batch,
        store = tip,
        "the store's tip is at or past the stream's last batch"
    );
    Ok(())
}

fn describe_metrics() {
    metrics::describe_gauge!(
        "keel_publish_lag_batches",
        "committed batches not yet acknowledged by JetStream"
    );
    metrics::describe_gauge!(
        "keel_publish_lag_seconds",
        "age of the oldest committed batch not yet acknowledged by JetStream"
    );
    metrics::describe_gauge!(
        "keel_publish_cursor",
        "last batch acknowledged by JetStream"
    );
    metrics::describe_counter!(
        "keel_published_batches_total",
        "batches acknowledged by JetStream"
    );
    metrics::describe_counter!(
        "keel_publish_errors_total",
        "publishing sessions that failed and were retried"
    );
}

struct Publisher {
    reader: Reader,
    js: jetstream::Context,
    config: PublisherConfig,
    /// The last acknowledged batch, shared with the lag metrics.
    cursor: Arc<AtomicU64>,
}

/// Where a session stands: acknowledged, recorded, and the next batch to send.
struct Progress {
    acked: u64,
    persisted: u64,
    persisted_at: Instant,
    next: u64,
}

impl Publisher {
    async fn run(self, mut shutdown: Shutdown) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match self.session(&mut shutdown, &mut backoff).await {
                Ok(()) => return,
                Err(error) => {
                    metrics::counter!("keel_publish_errors_total").increment(1);
                    let delay = backoff.next_delay();
                    if error.is_data_loss() {
                        tracing::error!(%error, ?delay, "nothing is published over a stream that is ahead of the store");
                    } else {
                        tracing::warn!(%error, ?delay, "publishing failed; retrying from the cursor");
                    }
                    if shutdown.is_requested() || !shutdown.sleep(delay).await {
                        return;
                    }
                }
            }
        }
    }

    /// Publishes from the recorded cursor until shutdown (after sending everything committed)
    /// or the first failure. Whatever was acknowledged is recorded either way, so a failure
    /// does not make the next session resend it.
    async fn session(
        &self,
        shutdown: &mut Shutdown,
        backoff: &mut Backoff,
    ) -> Result<(), PublishError> {
        self.ensure_stream().await?;
        let published = nats::last_published(&self.js, &self.config.stream, &self.config.subject)
            .await
            .map_err(|e| PublishError::Stream {
                stream: self.config.stream.clone(),
                detail: e.to_string(),
            })?;
        compare_with_witness(&self.reader, published, &self.config.stream)?;
        let acked = self.reader.publish_cursor()?;
        let mut progress = Progress {
            acked,
            persisted: acked,
            persisted_at: Instant::now(),
            next: acked + 1,
        };
        let result = self.publish_loop(shutdown, backoff, &mut progress).await;
        let persisted = self.persist(&mut progress);
        result.and(persisted)
    }

    async fn publish_loop(
        &self,
        shutdown: &mut Shutdown,
        backoff: &mut Backoff,
        progress: &mut Progress,
    ) -> Result<(), PublishError> {
        let mut inflight = FuturesOrdered::new();
        loop {
            let stopping = shutdown.is_requested();
            let tip = self.reader.tip()?.last_batch;
            if stopping && inflight.is_empty() && progress.next > tip {
                return Ok(());
            }
            self.fill(&mut inflight, progress, tip).await?;
            tokio::select! {
                Some(acked) = inflight.next() => {
                    self.acknowledged(acked, progress)?;
                    backoff.reset();
                    if progress.persisted_at.elapsed() >= PERSIST_INTERVAL || inflight.is_empty() {
                        self.persist(progress)?;
                    }
                }
                () = tokio::time::sleep(POLL_INTERVAL), if inflight.len() < self.config.inflight_max => {}
                () = shutdown.requested(), if !stopping => {}
            }
        }
    }

    /// Sends committed batches after `progress.next` while the in-flight window has room.
    async fn fill(
        &self,
        inflight: &mut FuturesOrdered<PendingAck>,
        progress: &mut Progress,
        tip: u64,
    ) -> Result<(), PublishError> {
        let room = self.config.inflight_max.saturating_sub(inflight.len()) as u64;
        if room == 0 || progress.next > tip {
            return Ok(());
        }
        let last = tip.min(progress.next + room.min(READ_CHUNK) - 1);
        for (seq, payload) in self.read(progress.next, last).await? {
            let ack = self.publish(seq, payload).await?;
            inflight.push_back(pending_ack(seq, ack));
            progress.next = seq + 1;
        }
        Ok(())
    }

    /// Records an acknowledged batch; they arrive in order, so it extends the prefix.
    fn acknowledged(
        &self,
        (seq, ack): AckResult,
        progress: &mut Progress,
    ) -> Result<(), PublishError> {
        let ack = ack.map_err(|e| PublishError::Publish {
            seq,
            detail: e.to_string(),
        })?;
        if ack.stream != self.config.stream {
            return Err(PublishError::Publish {
                seq,
                detail: format!(
                    "acknowledged by stream `{}`, not `{}`",
                    ack.stream, self.config.stream
                ),
            });
        }
        assert_eq!(
            seq,
            progress.acked + 1,
            "acks are consumed in publish order"
        );
        progress.acked = seq;
        self.cursor.store(seq, Ordering::Release);
        metrics::counter!("keel_published_batches_total").increment(1);
        Ok(())
    }

    fn persist(&self, progress: &mut Progress) -> Result<(), PublishError> {
        if progress.acked > progress.persisted {
            self.reader.set_publish_cursor(progress.acked)?;
            progress.persisted = progress.acked;
        }
        progress.persisted_at = Instant::now();
        Ok(())
    }

    async fn ensure_stream(&self) -> Result<(), PublishError> {
        let config = nats::stream_config(
            &self.config.stream,
            &self.config.subject,
            self.config.limits,
        );
        self.js
            .create_or_update_stream(config)
            .await
            .map(|_| ())
            .map_err(|e| PublishError::Stream {
                stream: self.config.stream.clone(),
                detail: e.to_string(),
            })
    }

    /// Batch messages `first..=last`, read in a blocking task (a large batch is a long scan).
    async fn read(&self, first: u64, last: u64) -> Result<Vec<(u64, Vec<u8>)>, PublishError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            (first..=last)
                .map(|seq| match reader.batch_message(seq) {
                    Ok(Some(bytes)) => Ok((seq, bytes)),
                    Ok(None) => Err(PublishError::Missing(seq)),
                    Err(e) => Err(PublishError::Read(e)),
                })
                .collect()
        })
        .await
        .map_err(|e| PublishError::Task(e.to_string()))?
    }

    /// Sends one batch. A message larger than the server's `max_payload` is replaced by an
    /// empty placeholder with the same id: the projector takes that batch from the source.
    async fn publish(&self, seq: u64, payload: Vec<u8>) -> Result<PublishAckFuture, PublishError> {
        let id = seq.to_string();
        let subject = self.config.subject.clone();
        let message = PublishMessage::build()
            .payload(Bytes::from(payload))
            .message_id(&id);
        match self.js.send_publish(subject.clone(), message).await {
            Ok(ack) => Ok(ack),
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                tracing::warn!(
                    batch = seq,
                    "batch message exceeds the server's max_payload; publishing a placeholder"
                );
                let placeholder = PublishMessage::build()
                    .payload(Bytes::new())
                    .message_id(&id);
                self.js
                    .send_publish(subject, placeholder)
                    .await
                    .map_err(|e| PublishError::Publish {
                        seq,
                        detail: e.to_string(),
                    })
            }
            Err(e) => Err(PublishError::Publish {
                seq,
                detail: e.to_string(),
            }),
        }
    }
}

type AckResult = (
    u64,
    Result<PublishAck, async_nats::jetstream::context::PublishError>,
);

/// A publish whose ack is awaited in publish order, tagged with its batch.
type PendingAck = Pin<Box<dyn Future<Output = AckResult> + Send>>;

fn pending_ack(seq: u64, ack: PublishAckFuture) -> PendingAck {
    Box::pin(async move { (seq, ack.into_future().await) })
}

/// Updates the lag gauges every second, also while NATS is unreachable.
async fn lag_metrics(reader: Reader, cursor: Arc<AtomicU64>, mut shutdown: Shutdown) {
    loop {
        update_lag(&reader, cursor.load(Ordering::Acquire));
        if !shutdown.sleep(Duration::from_secs(1)).await {
            return;
        }
    }
}

fn update_lag(reader: &Reader, cursor: u64) {
    let Ok(tip) = reader.tip() else {
        return; // poisoned: the health endpoints say so
    };
    let lag = tip.last_batch.saturating_sub(cursor);
    let seconds = match lag {
        0 => 0.0,
        _ => reader
            .batch(cursor + 1)
            .ok()
            .flatten()
            .map_or(0.0, |header| {
                let now_us = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                now_us.saturating_sub(header.committed_at_us) as f64 / 1e6
            }),
    };
    metrics::gauge!("keel_publish_lag_batches").set(lag as f64);
    metrics::gauge!("keel_publish_lag_seconds").set(seconds);
    metrics::gauge!("keel_publish_cursor").set(cursor as f64);
}
