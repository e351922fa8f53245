//! What the publisher and the projector agree on about NATS: connection options and the
//! JetStream stream's settings (deploy/nats/README.md lists them for operators).

use async_nats::jetstream::{
    self, ErrorCode,
    context::{GetStreamError, GetStreamErrorKind},
    stream::{
        Config as StreamConfig, DiscardPolicy, LastRawMessageErrorKind, RetentionPolicy,
        StorageType,
    },
};
use async_nats::{Client, ConnectError, ConnectOptions};
use keel_engine::BatchHeader;
use std::time::Duration;

/// The header that carries a batch's sequence; JetStream deduplicates on it.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// How long JetStream remembers message ids to drop a resend. A publisher restart resends at
/// most what was acknowledged but not yet recorded in its cursor (a fraction of a second of
/// batches); two minutes covers that with a wide margin.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long the stream keeps a batch. Keel's log is the source of truth, so the stream only
/// has to cover projector downtime; a projector further behind repairs from the source.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The stream's size bound (the oldest batches go first when it is reached). JetStream
/// reserves it from the server's `max_file_store` when the stream is created (which defaults to
/// 75% of the free disk), so it must be modest; a projector that falls further behind than the
/// stream reaches repairs from the source.
pub const STREAM_MAX_BYTES: i64 = 4 << 30;
/// The largest message the stream accepts; the server's `max_payload` must allow it too. A
/// larger batch is published as an empty placeholder and projected from the source.
pub const STREAM_MAX_MESSAGE_BYTES: i32 = 64 << 20;

/// The stream's retention bounds. `keel serve` (the publisher, which owns the stream) applies
/// the operator's values at every start; the projector creates the stream with the defaults
/// only when it starts first, and never changes an existing stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    pub max_age: Duration,
    pub max_bytes: i64,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_age: STREAM_MAX_AGE,
            max_bytes: STREAM_MAX_BYTES,
        }
    }
}

/// The stream Keel publishes to, with every setting explicit rather than a server default.
pub fn stream_config(name: &str, subject: &str, limits: StreamLimits) -> StreamConfig {
    StreamConfig {
        name: name.to_owned(),
        description: Some(
            "Keel committed batches, one message per batch (docs/PROJECTION.md)".into(),
        ),
        subjects: vec![subject.to_owned()],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        max_age: limits.max_age,
        max_bytes: limits.max_bytes,
        max_messages: -1,
        max_messages_per_subject: -1,
        max_message_size: STREAM_MAX_MESSAGE_BYTES,
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: 1,
        // Gap repair and the tests read single messages directly.
        allow_direct: true,
        // Deleting or purging messages is allowed (operators trimming the stream, the gap
        // test): the projector repairs any hole from the source.
        deny_purge: false,
        deny_delete: false,
        ..StreamConfig::default()
    }
}

/// The last batch the stream holds: the newest message on `subject`, its batch sequence from
/// `Nats-Msg-Id` and, when its body is a batch message that verifies, its header (a placeholder
/// for an oversized batch has none). `None` when the stream does not exist or holds nothing on
/// `subject` (a new deployment, or everything aged out).
///
/// It is a witness of the store's true tip: the publisher sends only committed batches, so a
/// store whose tip is below it lost batches it had committed and published.
pub async fn last_published(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> Result<Option<Published>, WitnessError> {
    let stream = match js.get_stream(stream).await {
        Ok(stream) => stream,
        Err(e) if stream_not_found(&e) => return Ok(None),
        Err(e) => return Err(WitnessError(format!("stream `{stream}`: {e}"))),
    };
    let message = match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => message,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(e) => {
            return Err(WitnessError(format!("last message on `{subject}`: {e}")));
        }
    };
    let id = message
        .headers
        .get(MSG_ID_HEADER)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    let batch = id.parse::<u64>().map_err(|_| {
        WitnessError(format!(
            "the last message on `{subject}` (stream sequence {}) has {MSG_ID_HEADER} {id:?}, not a batch sequence",
            message.sequence
        ))
    })?;
    let header = keel_engine::decode_batch_message(&message.payload)
        .ok()
        .map(|m| m.header)
        .filter(|h| h.seq == batch);
    let layout = message
        .payload
        .strip_prefix(keel_engine::message::BATCH_MESSAGE_MAGIC.as_slice())
        .and_then(|rest| rest.first().copied());
    Ok(Some(Published {
        batch,
        header,
        layout,
    }))
}

/// Connects to `url` and reads [`last_published`] (`keel audit --nats-url`). The connection is
/// retried in the background; the caller bounds the wait.
pub async fn last_published_at(
    url: &str,
    stream: &str,
    subject: &str,
) -> Result<Option<Published>, WitnessError> {
    let client = connect(url, "keel-audit")
        .await
        .map_err(|e| WitnessError(format!("NATS URL `{url}`: {e}")))?;
    last_published(&jetstream::new(client), stream, subject).await
}

fn stream_not_found(error: &GetStreamError) -> bool {
    matches!(error.kind(), GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// What [`last_published`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    pub batch: u64,
    pub header: Option<BatchHeader>,
    /// The layout byte of a Keel batch message (`None`: not a Keel message at all).
    pub layout: Option<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("reading the JetStream stream's last batch: {0}")]
pub struct WitnessError(String);

/// Connects to `url` in the background: the call returns at once and the client keeps trying
/// (and reconnecting after an outage) with a capped backoff, forever. Fails only on a URL that
/// does not parse.
pub async fn connect(url: &str, name: &str) -> Result<Client, ConnectError> {
    ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)))
        .ping_interval(Duration::from_secs(10))
        .reconnect_delay_callback(reconnect_delay)
        .connect(url)
        .await
}

/// 100 ms, doubling, at most 2 s: an outage costs at most ~2 s of extra lag after it ends.
fn reconnect_delay(attempts: usize) -> Duration {
    let exponent = u32::try_from(attempts.min(5)).unwrap_or(5);
    Duration::from_millis(100 * 2u64.pow(exponent)).min(Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_is_capped() {
        assert_eq!(reconnect_delay(0), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3), Duration::from_millis(800));
        assert_eq!(reconnect_delay(1000), Duration::from_secs(2));
    }
}
