//! `GET /v1/batches/{seq}`: one committed batch as a binary batch message (docs/PROJECTION.md),
//! the source of truth a projector repairs gaps in the JetStream stream from.

use crate::http::{ApiError, AppState};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// The media type of a batch message.
pub const BATCH_MESSAGE_CONTENT_TYPE: &str = "application/octet-stream";

pub async fn get_batch(
    State(state): State<AppState>,
    Path(seq): Path<String>,
) -> Result<Response, ApiError> {
    let seq = seq.parse::<u64>().ok().filter(|s| *s > 0).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("batch sequence `{seq}` must be an integer from 1 to 18446744073709551615"),
        )
    })?;
    let sequencer = Arc::clone(&state.sequencer);
    let message = tokio::task::spawn_blocking(move || sequencer.batch_message(seq))
        .await
        .map_err(|e| internal(&e))?
        .map_err(|e| {
            if e.is_poisoned() {
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "engine_poisoned",
                    e.to_string(),
                );
            }
            internal(&e)
        })?;
    match message {
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

/// Internal faults: logged with detail, answered generically (as every other route does).
fn internal(error: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(%error, context = "batch message", "internal error");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; see the server log",
    )
}
