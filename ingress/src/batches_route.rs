//! `GET /v1/batches/{seq}`: one committed batch as a binary batch message (docs/PROJECTION.md),
//! the source of truth a projector repairs gaps in the JetStream stream from.

use crate::http::{ApiError, AppState, read_store};
use crate::wire::quote;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The media type of a batch message.
pub const BATCH_MESSAGE_CONTENT_TYPE: &str = "application/octet-stream";

pub async fn get_batch(
    State(state): State<AppState>,
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
