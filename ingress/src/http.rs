//! The axum router: handlers, error answers, overload answers.

use crate::wire::{self, BatchResponse, WireError, quote};
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use keel_invariants::AggregateId;
use keel_sequencer::{ReadError, Sequencer, SubmitError};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The bounds of request handling (docs/API.md "Bounds"; the flags of `keel serve`).
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Largest request body in bytes; larger bodies get 413.
    pub body_bytes_max: usize,
    /// How long reading a request body may take; slower bodies get 408.
    pub body_read_timeout: Duration,
    /// Most request bodies read and parsed at once (each holds up to `body_bytes_max` bytes).
    pub parse_concurrency_max: usize,
    /// How long a request waits for a parse slot before 503 `overloaded`.
    pub parse_wait_max: Duration,
    /// Most store reads (`GET /v1/aggregates`, `/v1/events`, `/v1/batches`) at once; more get
    /// 503 `overloaded` at once.
    pub read_concurrency_max: usize,
    /// How long a store read may take before 503 `read_timeout`.
    pub read_timeout: Duration,
    /// Seconds a client is told to wait after a 503 for overload.
    pub retry_after_secs: u32,
    /// Most live subscriptions (`GET /v1/subscribe`) open at once.
    pub subscribers_max: usize,
    /// Deliveries (a batch, or several sent together) waiting to be sent to one subscriber
    /// before it is ended as too slow.
    pub subscriber_buffer_batches: usize,
    /// Most subscriber wake-ups per second, over all subscribers (the hub's pacing).
    pub subscriber_wakeups_per_sec: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            body_bytes_max: 16 << 20,
            body_read_timeout: Duration::from_secs(10),
            parse_concurrency_max: 4,
            parse_wait_max: PARSE_WAIT_MAX,
            read_concurrency_max: 8,
            read_timeout: Duration::from_secs(5),
            retry_after_secs: 1,
            subscribers_max: 4096,
            subscriber_buffer_batches: 64,
            subscriber_wakeups_per_sec: 20_000,
        }
    }
}

/// How long a request waits for a parse slot: long enough to ride out a burst (parsing a full
/// 16 MiB body takes tens of milliseconds), short enough that overload is answered fast.
pub const PARSE_WAIT_MAX: Duration = Duration::from_secs(1);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub sequencer: Arc<Sequencer>,
    pub metrics: PrometheusHandle,
    pub limits: HttpLimits,
    /// The API keys, when `--auth-keys` is given; `None`: no authentication.
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// The fan-out of committed batches to `GET /v1/subscribe`.
    pub subscriptions: Arc<crate::subscribe::Hub>,
    parse_permits: Arc<Semaphore>,
    read_permits: Arc<Semaphore>,
}

impl AppState {
    pub fn new(sequencer: Arc<Sequencer>, metrics: PrometheusHandle, limits: HttpLimits) -> Self {
        assert!(limits.parse_concurrency_max > 0 && limits.read_concurrency_max > 0);
        let subscriptions = Arc::new(crate::subscribe::Hub::new(
            Arc::clone(&sequencer),
            crate::subscribe::SubscribeLimits {
                subscribers_max: limits.subscribers_max,
                buffer_batches: limits.subscriber_buffer_batches,
                wakeups_per_sec: limits.subscriber_wakeups_per_sec,
                catch_up_reads_max: limits.read_concurrency_max,
                retry_after_secs: limits.retry_after_secs,
            },
        ));
        Self {
            sequencer,
            metrics,
            subscriptions,
            parse_permits: Arc::new(Semaphore::new(limits.parse_concurrency_max)),
            read_permits: Arc::new(Semaphore::new(limits.read_concurrency_max)),
            limits,
            auth: None,
        }
    }

    /// Requires API keys on every route but the health checks (`None`: no authentication).
    pub fn with_auth(self, auth: Option<Arc<crate::auth::Auth>>) -> Self {
        Self { auth, ..self }
    }
}

/// The routes, grouped by the scope an API key needs for them (docs/API.md, "Authentication").
/// `GET /v1/domains`: the declared domains the server decides under, with every command's
/// parameters, targets, rules and rejection codes, and the hash of the rule set in force.
async fn get_domains(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(crate::wire::declared::domains_json(
        &state.sequencer.config().domains,
    ))
}

pub fn router(state: AppState) -> Router {
    use crate::auth::Scope;
    let write = Router::new().route("/v1/batches", post(post_batch));
    let read = Router::new()
        .route("/v1/aggregates/{id}", get(get_aggregate))
        .route("/v1/events", get(get_events))
        .route("/v1/subscribe", get(crate::subscribe::get_subscribe))
        .route("/v1/batches/{seq}", get(crate::batches_route::get_batch))
        .route("/v1/domains", get(get_domains));
    let admin = Router::new().route("/metrics", get(get_metrics));
    let open = Router::new()
        .route("/v1/openapi.json", get(get_openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    let guarded = |routes: Router<AppState>, scope: Scope| match &state.auth {
        Some(auth) => routes.route_layer(axum::middleware::from_fn_with_state(
            crate::auth::Guard {
                auth: Arc::clone(auth),
                scope,
            },
            crate::auth::require,
        )),
        None => routes,
    };
    Router::new()
        .merge(guarded(write, Scope::Write))
        .merge(guarded(read, Scope::Read))
        .merge(guarded(admin, Scope::Admin))
        .merge(open)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        // axum adds the `Allow` header listing the route's methods to this answer.
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("this route does not answer {method}; see the `Allow` header"),
            )
        })
        .with_state(state)
}

/// A JSON error answer: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_secs: Option<u32>,
    /// Answer with `Connection: close`: the request body was not read to its end, so the
    /// connection cannot carry another request.
    close: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
            close: false,
        }
    }

    /// 503 with `Retry-After`: try again shortly.
    pub fn unavailable(
        code: &'static str,
        message: impl Into<String>,
        retry_after_secs: u32,
    ) -> Self {
        Self {
            retry_after_secs: Some(retry_after_secs),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    fn closing(self) -> Self {
        Self {
            close: true,
            ..self
        }
    }

    /// 400 `invalid_path`: a path parameter that cannot be read (e.g. not UTF-8 once
    /// percent-decoded).
    pub fn invalid_path(rejection: &PathRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            keel_sequencer::shorten(rejection.body_text(), ERROR_TEXT_BYTES_MAX),
        )
    }

    fn bad_request(e: WireError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e.code, e.message)
    }

    /// Internal faults: logged with detail, answered generically.
    pub fn internal(context: &str, error: &dyn std::fmt::Display) -> Self {
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
            SubmitError::Overloaded => Self::unavailable("overloaded", message, retry_after_secs),
            SubmitError::ShuttingDown => {
                Self::unavailable("shutting_down", message, retry_after_secs)
            }
            SubmitError::Poisoned => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "engine_poisoned", message)
            }
        }
    }

    pub fn read(e: ReadError) -> Self {
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
        if self.close {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// Longest text of a library's error (a rejection's body text) put in an error message.
pub(crate) const ERROR_TEXT_BYTES_MAX: usize = 160;

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Refuses a body in a coding Keel does not decode: a `Transfer-Encoding` other than `chunked`
/// (hyper removes the chunked framing and would hand the rest, e.g. gzip, over as if plain), or
/// a `Content-Encoding` other than `identity`.
fn check_encoding(headers: &HeaderMap) -> Result<(), ApiError> {
    let codings = |name| {
        headers
            .get_all(name)
            .into_iter()
            .flat_map(|value: &HeaderValue| {
                value
                    .to_str()
                    .unwrap_or("(not ASCII)")
                    .split(',')
                    .map(str::trim)
                    .filter(|coding| !coding.is_empty())
            })
    };
    let refused = codings(header::TRANSFER_ENCODING)
        .find(|coding| !coding.eq_ignore_ascii_case("chunked"))
        .map(|coding| ("Transfer-Encoding", coding))
        .or_else(|| {
            codings(header::CONTENT_ENCODING)
                .find(|coding| !coding.eq_ignore_ascii_case("identity"))
                .map(|coding| ("Content-Encoding", coding))
        });
    match refused {
        None => Ok(()),
        Some((name, coding)) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            format!(
                "{name} {} is not supported; send the body uncompressed (chunked framing is fine)",
                quote(coding)
            ),
        )
        .closing()),
    }
}

/// The query of `POST /v1/batches`. Unknown parameters are refused: a misspelt `dry_run`
/// must not commit.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchQuery {
    #[serde(default)]
    dry_run: bool,
}

async fn post_batch(
    State(state): State<AppState>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
    query: Result<Query<BatchQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let caller = caller.map(|axum::Extension(caller)| caller.0);
    let answer = match query {
        Ok(Query(query)) => submit_batch(&state, caller, query.dry_run, &headers, body).await,
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!(
                "{} (the one parameter is `dry_run=true|false`)",
                keel_sequencer::shorten(e.body_text(), ERROR_TEXT_BYTES_MAX)
            ),
        )),
    };
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
    caller: Option<Arc<str>>,
    dry_run: bool,
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
    check_encoding(headers)?;
    let declared = declared_length(headers, state.limits.body_bytes_max)?;
    // Refuse at once when the writer is poisoned, before reading the body.
    let retry_after_secs = state.limits.retry_after_secs;
    if state.sequencer.is_poisoned() {
        return Err(ApiError::submit(SubmitError::Poisoned, retry_after_secs));
    }
    let (commands, atomic) = {
        // The permit bounds the bodies held and parsed at once; it is released before the
        // request waits for the writer (the queue has its own bounds).
        let _permit = parse_permit(state).await?;
        let bytes = read_body(body, declared, &state.limits).await?;
        let batch_items_max = state.sequencer.config().batch_items_max;
        wire::parse_batch(&bytes, batch_items_max, &state.sequencer.config().domains)
            .map_err(ApiError::bad_request)?
    };
    let how = keel_sequencer::Submit {
        atomic,
        dry_run,
        submitter: caller,
    };
    let receiver = state
        .sequencer
        .submit_with(commands, how)
        .map_err(|e| ApiError::submit(e, retry_after_secs))?;
    match receiver.await {
        Ok(Ok(reply)) => Ok(BatchResponse::new(reply, dry_run)),
        Ok(Err(e)) => Err(ApiError::submit(e, retry_after_secs)),
        Err(_) => Err(ApiError::submit(
            SubmitError::ShuttingDown,
            retry_after_secs,
        )),
    }
}

/// A parse slot, waited for at most `parse_wait_max`; then 503 `overloaded`.
async fn parse_permit(state: &AppState) -> Result<OwnedSemaphorePermit, ApiError> {
    let permits = Arc::clone(&state.parse_permits);
    match tokio::time::timeout(state.limits.parse_wait_max, permits.acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        Ok(Err(_)) | Err(_) => {
            metrics::counter!("keel_http_refused_total", "reason" => "parse_busy").increment(1);
            Err(ApiError::unavailable(
                "overloaded",
                format!(
                    "{} request bodies are being parsed; retry shortly",
                    state.limits.parse_concurrency_max
                ),
                state.limits.retry_after_secs,
            )
            .closing())
        }
    }
}

fn body_too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the body exceeds {limit} bytes"),
    )
    .closing()
}

/// The body's `Content-Length` (0 when not given), refused with 413 before anything is read
/// when it is over `limit`.
fn declared_length(headers: &HeaderMap, limit: usize) -> Result<usize, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    match usize::try_from(declared) {
        Ok(n) if n <= limit => Ok(n),
        _ => Err(body_too_large(limit)),
    }
}

/// Reads the whole body: at most `body_bytes_max` bytes (413 beyond), within
/// `body_read_timeout` (408), and refuses a body the connection delivered broken (bad chunked
/// framing, fewer bytes than `Content-Length`) with 400 `malformed_body`.
async fn read_body(body: Body, declared: usize, limits: &HttpLimits) -> Result<Vec<u8>, ApiError> {
    let limit = limits.body_bytes_max;
    match tokio::time::timeout(
        limits.body_read_timeout,
        collect_body(body, limit, declared),
    )
    .await
    {
        Ok(Ok(Some(bytes))) => Ok(bytes),
        Ok(Ok(None)) => Err(body_too_large(limit)),
        Ok(Err(error)) => {
            tracing::debug!(%error, "malformed request body");
            Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_body",
                format!(
                    "the body could not be read: {}",
                    keel_sequencer::shorten(error.to_string(), ERROR_TEXT_BYTES_MAX)
                ),
            )
            .closing())
        }
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the body did not arrive within {} ms",
                limits.body_read_timeout.as_millis()
            ),
        )
        .closing()),
    }
}

/// The body's bytes, or `None` once they pass `limit`. The buffer never grows past `limit`:
/// it is sized from `Content-Length` when given, else doubled up to `limit`.
async fn collect_body(
    mut body: Body,
    limit: usize,
    declared: usize,
) -> Result<Option<Vec<u8>>, axum::Error> {
    let mut bytes = Vec::with_capacity(declared.min(limit));
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers carry nothing Keel reads
        };
        let needed = bytes.len() + data.len();
        if needed > limit {
            return Ok(None);
        }
        if needed > bytes.capacity() {
            let target = needed.max(bytes.capacity() * 2).min(limit);
            bytes.reserve_exact(target - bytes.len());
        }
        bytes.extend_from_slice(&data);
    }
    Ok(Some(bytes))
}

/// Runs a store read on the blocking pool, never on an async worker: at most
/// `read_concurrency_max` at once (503 `overloaded` at once beyond), answered within
/// `read_timeout` (503 `read_timeout`; the read itself runs on and keeps its slot until done).
pub async fn read_store<T, F>(state: &AppState, read: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&Sequencer) -> Result<T, ReadError> + Send + 'static,
{
    let limits = &state.limits;
    let Ok(permit) = Arc::clone(&state.read_permits).try_acquire_owned() else {
        metrics::counter!("keel_http_refused_total", "reason" => "read_busy").increment(1);
        return Err(ApiError::unavailable(
            "overloaded",
            format!(
                "{} reads are running; retry shortly",
                limits.read_concurrency_max
            ),
            limits.retry_after_secs,
        ));
    };
    let sequencer = Arc::clone(&state.sequencer);
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        read(&sequencer)
    });
    match tokio::time::timeout(limits.read_timeout, task).await {
        Ok(Ok(answer)) => answer.map_err(ApiError::read),
        Ok(Err(e)) => Err(ApiError::internal("read task", &e)),
        Err(_) => {
            metrics::counter!("keel_http_refused_total", "reason" => "read_timeout").increment(1);
            Err(ApiError::unavailable(
                "read_timeout",
                format!(
                    "the read took longer than {} ms; retry shortly",
                    limits.read_timeout.as_millis()
                ),
                limits.retry_after_secs,
            ))
        }
    }
}

async fn get_aggregate(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::invalid_path(&e))?;
    if !id.contains(':') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            format!(
                "aggregate id {} must look like `<kind>:<name>`, e.g. `account:alice`",
                quote(&id)
            ),
        ));
    }
    let id = AggregateId::from_full(id);
    let key = id.clone();
    match read_store(&state, move |sequencer| sequencer.aggregate(&key)).await? {
        Some(aggregate) => Ok(Json(wire::aggregate_json(&id, &aggregate)).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("aggregate {} does not exist", quote(id.as_str())),
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
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            keel_sequencer::shorten(e.body_text(), ERROR_TEXT_BYTES_MAX),
        )
    })?;
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > EVENTS_LIMIT_MAX {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("`limit` must be from 1 to {EVENTS_LIMIT_MAX}"),
        ));
    }
    let after = query.after;
    let (events, last_seq) =
        read_store(&state, move |sequencer| sequencer.events(after, limit)).await?;
    let next_after = events.last().map_or(after, |e| e.seq);
    let events: Vec<_> = events.iter().map(wire::event_json).collect();
    Ok(
        Json(json!({"events": events, "next_after": next_after, "last_seq": last_seq}))
            .into_response(),
    )
}

/// The OpenAPI document, made once.
async fn get_openapi() -> Response {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let body: &'static str = DOCUMENT.get_or_init(crate::openapi::document);
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
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
            state.limits.retry_after_secs,
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
            state.limits.retry_after_secs,
        ));
    }
    if sequencer.is_closing() {
        return Err(ApiError::submit(
            SubmitError::ShuttingDown,
            state.limits.retry_after_secs,
        ));
    }
    if sequencer.queued_items() >= sequencer.config().queue_items_max {
        return Err(ApiError::submit(
            SubmitError::Overloaded,
            state.limits.retry_after_secs,
        ));
    }
    Ok(Json(
        json!({"status": "ready", "queued_items": sequencer.queued_items()}),
    ))
}
