//! The axum router: handlers, error answers, overload answers.

use crate::wire::{self, BatchResponse, WireError};
use axum::Json;
use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel_invariants::AggregateId;
use keel_sequencer::{ReadError, Sequencer, SubmitError};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub sequencer: Arc<Sequencer>,
    pub metrics: PrometheusHandle,
    pub body_bytes_max: usize,
    /// Seconds a client is told to wait after a 503 for overload.
    pub retry_after_secs: u32,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/batches", post(post_batch))
        .route("/v1/aggregates/{id}", get(get_aggregate))
        .route("/v1/events", get(get_events))
        .route("/v1/batches/{seq}", get(crate::batches_route::get_batch))
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(state)
}

/// A JSON error answer: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_secs: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    fn bad_request(e: WireError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e.code, e.message)
    }

    /// Internal faults: logged with detail, answered generically.
    fn internal(context: &str, error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, context, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }

    fn submit(e: SubmitError, retry_after_secs: u32) -> Self {
        let message = e.to_string();
        match e {
            SubmitError::Empty => Self::new(StatusCode::BAD_REQUEST, "empty_batch", message),
            SubmitError::TooManyItems { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "too_many_items", message)
            }
            SubmitError::Overloaded => Self {
                retry_after_secs: Some(retry_after_secs),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
            },
            SubmitError::ShuttingDown => Self {
                retry_after_secs: Some(retry_after_secs),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
            },
            SubmitError::Poisoned => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "engine_poisoned", message)
            }
        }
    }

    fn read(e: ReadError) -> Self {
        if e.is_poisoned() {
            return Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "engine_poisoned",
                e.to_string(),
            );
        }
        Self::internal("read", &e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

async fn post_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let answer = submit_batch(&state, &headers, body).await;
    let status = match &answer {
        Ok(_) => "ok",
        Err(e) if e.status.is_client_error() => "client_error",
        Err(_) => "server_error",
    };
    metrics::histogram!("keel_request_seconds", "route" => "/v1/batches", "outcome" => status)
        .record(started.elapsed().as_secs_f64());
    answer.map(|r| Json(r).into_response())
}

async fn submit_batch(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<BatchResponse, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the batch as `Content-Type: application/json`",
        ));
    }
    // Refuse at once when the writer is overloaded or poisoned, before reading the body.
    if state.sequencer.is_poisoned() {
        return Err(ApiError::submit(
            SubmitError::Poisoned,
            state.retry_after_secs,
        ));
    }
    let bytes = to_bytes(body, state.body_bytes_max).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body exceeds {} bytes", state.body_bytes_max),
        )
    })?;
    let batch_items_max = state.sequencer.config().batch_items_max;
    let (commands, atomic) =
        wire::parse_batch(&bytes, batch_items_max).map_err(ApiError::bad_request)?;
    let receiver = state
        .sequencer
        .submit(commands, atomic)
        .map_err(|e| ApiError::submit(e, state.retry_after_secs))?;
    match receiver.await {
        Ok(Ok(reply)) => Ok(BatchResponse::from(reply)),
        Ok(Err(e)) => Err(ApiError::submit(e, state.retry_after_secs)),
        Err(_) => Err(ApiError::submit(
            SubmitError::ShuttingDown,
            state.retry_after_secs,
        )),
    }
}

async fn get_aggregate(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if !id.contains(':') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            format!("aggregate id `{id}` must look like `<kind>:<name>`, e.g. `account:alice`"),
        ));
    }
    let id = AggregateId::from_full(id);
    match state.sequencer.aggregate(&id).map_err(ApiError::read)? {
        Some(aggregate) => Ok(Json(wire::aggregate_json(&id, &aggregate)).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("aggregate `{id}` does not exist"),
        )),
    }
}

/// Most events one `GET /v1/events` returns.
pub const EVENTS_LIMIT_MAX: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

async fn get_events(
    State(state): State<AppState>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > EVENTS_LIMIT_MAX {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("`limit` must be from 1 to {EVENTS_LIMIT_MAX}"),
        ));
    }
    let sequencer = Arc::clone(&state.sequencer);
    let (events, last_seq) =
        tokio::task::spawn_blocking(move || sequencer.events(query.after, limit))
            .await
            .map_err(|e| ApiError::internal("events task", &e))?
            .map_err(ApiError::read)?;
    let next_after = events.last().map_or(query.after, |e| e.seq);
    let events: Vec<_> = events.iter().map(wire::event_json).collect();
    Ok(
        Json(json!({"events": events, "next_after": next_after, "last_seq": last_seq}))
            .into_response(),
    )
}

async fn get_metrics(State(state): State<AppState>) -> Response {
    metrics::gauge!("keel_queue_items").set(state.sequencer.queued_items() as f64);
    let body = state.metrics.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Alive: the process answers and the write path is not poisoned (a poisoned engine needs a
/// restart, which is what a failing liveness check asks for).
async fn healthz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if state.sequencer.is_poisoned() {
        return Err(ApiError::submit(
            SubmitError::Poisoned,
            state.retry_after_secs,
        ));
    }
    Ok(Json(json!({"status": "ok"})))
}

/// Ready: writes are accepted now (not poisoned, not shutting down, queue not full).
async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let sequencer = &state.sequencer;
    if sequencer.is_poisoned() {
        return Err(ApiError::submit(
            SubmitError::Poisoned,
            state.retry_after_secs,
        ));
    }
    if sequencer.is_closing() {
        return Err(ApiError::submit(
            SubmitError::ShuttingDown,
            state.retry_after_secs,
        ));
    }
    if sequencer.queued_items() >= sequencer.config().queue_items_max {
        return Err(ApiError::submit(
            SubmitError::Overloaded,
            state.retry_after_secs,
        ));
    }
    Ok(Json(
        json!({"status": "ready", "queued_items": sequencer.queued_items()}),
    ))
}
