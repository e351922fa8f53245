//! `GET /v1/batches/{seq}`: one committed batch. By default the binary batch message
//! (docs/PROJECTION.md), the source of truth a projector repairs gaps in the JetStream stream
//! from; with `Accept: application/json`, the same batch verified and rendered as JSON for
//! people and auditors: its header, hashes, rule set, events, logged rejections and the API key
//! ids that submitted its requests ("who wrote this").

use crate::http::{ApiError, AppState, read_store};
use crate::wire::quote;
use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keel_engine::BatchMessage;
use keel_invariants::codec;
use keel_sequencer::CommittedEvent;
use serde_json::{Value, json};

/// The media type of a batch message.
pub const BATCH_MESSAGE_CONTENT_TYPE: &str = "application/octet-stream";

pub async fn get_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    seq: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(seq) = seq.map_err(|e| ApiError::invalid_path(&e))?;
    let seq = seq.parse::<u64>().ok().filter(|s| *s > 0).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "batch sequence {} must be an integer from 1 to 18446744073709551615",
                quote(&seq)
            ),
        )
    })?;
    match read_store(&state, move |sequencer| sequencer.batch_message(seq)).await? {
        Some(bytes) if wants_json(&headers) => {
            let message = keel_engine::decode_batch_message(&bytes)
                .map_err(|e| ApiError::internal("decoding a stored batch", &e))?;
            let json = batch_json(&message).map_err(|e| ApiError::internal("batch json", &e))?;
            Ok(Json(json).into_response())
        }
        Some(bytes) => {
            Ok(([(header::CONTENT_TYPE, BATCH_MESSAGE_CONTENT_TYPE)], bytes).into_response())
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("batch {seq} is not committed"),
        )),
    }
}

/// True when the client asks for JSON (`Accept: application/json`) rather than the binary
/// message (no `Accept`, `*/*` or `application/octet-stream`).
fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|v| v.split(';').next())
        .any(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// A verified batch as JSON (docs/API.md, "GET /v1/batches/{seq}").
pub fn batch_json(message: &BatchMessage) -> Result<Value, codec::DecodeError> {
    let header = &message.header;
    let mut events = Vec::with_capacity(message.events.len());
    for event in &message.events {
        events.push(crate::wire::event_json(&CommittedEvent {
            seq: event.seq,
            batch: event.batch,
            committed_at_us: event.committed_at_us,
            logged: codec::decode_event(&event.payload)?,
        }));
    }
    let mut rejections = Vec::with_capacity(message.rejections.len());
    for bytes in &message.rejections {
        let logged = codec::decode_rejection(bytes)?;
        rejections.push(json!({
            "command_id": logged.command_id,
            "code": logged.rejection.code.as_str(),
            "message": logged.rejection.message,
        }));
    }
    Ok(json!({
        "seq": header.seq,
        "committed_at": crate::wire::timestamp(header.committed_at_us),
        "first_event": header.first_event,
        "event_count": header.count,
        "rejection_count": header.rejections,
        "rule_set": hex::encode(header.rule_set),
        "prev_hash": hex::encode(header.prev_hash),
        "hash": hex::encode(header.hash),
        "submitters": message.submitters,
        "events": events,
        "rejections": rejections,
    }))
}
