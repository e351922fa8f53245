//! Fault injection: the engine over a storage whose Nth sync fails or loses power. A failed sync
//! poisons the write path: nothing of that batch is acknowledged, every later write and read is
//! refused with 503, and after a restart only acknowledged batches exist.
#![allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report

use axum::body::Body;
use axum::http::{Request, StatusCode};
use keel_engine::{Engine, FaultPlan, MemoryStorage};
use keel_ingress::http::{AppState, HttpLimits, router};
use keel_sequencer::{Config, Sequencer};
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

fn start_app(storage: Arc<MemoryStorage>) -> (axum::Router, Arc<Sequencer>) {
    let engine = Engine::open(storage).unwrap();
    let sequencer = Arc::new(Sequencer::start(engine, Config::default()).unwrap());
    let limits = HttpLimits {
        body_bytes_max: 1 << 20,
        ..HttpLimits::default()
    };
    let state = AppState::new(
        Arc::clone(&sequencer),
        keel_ingress::metrics_handle().unwrap(),
        limits,
    );
    (router(state), sequencer)
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    let request = request
        .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn deposit(n: u64) -> Value {
    json!({"commands": [{"type": "deposit", "account": "a", "amount": n, "id": format!("dep-{n}")}]})
}

#[tokio::test]
async fn failed_fsync_poisons_the_engine_and_acknowledges_nothing() {
    // Sync 1 records the format version, sync 2 opens the account, sync 3 a deposit, sync 4 fails.
    let storage = Arc::new(MemoryStorage::new(FaultPlan {
        fail_sync_at: Some(4),
        power_loss_at: None,
    }));
    let (app, sequencer) = start_app(Arc::clone(&storage));
    let (status, _) = call(
        &app,
        "POST",
        "/v1/batches",
        Some(json!({"commands": [{"type": "open_account", "account": "a"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        call(&app, "POST", "/v1/batches", Some(deposit(1))).await.0,
        StatusCode::OK
    );

    let (status, body) = call(&app, "POST", "/v1/batches", Some(deposit(2))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "engine_poisoned");
    assert!(sequencer.is_poisoned());

    // Everything afterwards is refused at once, reads included: the failed batch may sit in the
    // page cache, and a read must never show what was not durable.
    let (status, body) = call(&app, "POST", "/v1/batches", Some(deposit(3))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("engine_poisoned"))
    );
    let (status, _) = call(&app, "GET", "/v1/aggregates/account:a", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        call(&app, "GET", "/v1/events", None).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        call(&app, "GET", "/healthz", None).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        call(&app, "GET", "/readyz", None).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        storage.syncs(),
        4,
        "no retry of the failed sync, no later write"
    );

    // After a restart, exactly the acknowledged batches are there.
    drop(app);
    sequencer.shutdown();
    let (app, _sequencer) = start_app(Arc::new(storage.after_power_loss()));
    let (status, a) = call(&app, "GET", "/v1/aggregates/account:a", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (a["version"].as_u64(), a["state"]["balance"].as_i64()),
        (Some(2), Some(1))
    );
    let (_, events) = call(&app, "GET", "/v1/events", None).await;
    assert_eq!(events["last_seq"], 2);
    // The unacknowledged deposit was never recorded, so its retry is decided afresh.
    let (_, retry) = call(&app, "POST", "/v1/batches", Some(deposit(2))).await;
    assert_eq!(
        retry["results"][0],
        json!({"status": "committed", "seq": 3})
    );
}

#[tokio::test]
async fn power_loss_during_commit_keeps_exactly_the_acknowledged_batches() {
    for loss_at in 2..=6 {
        let storage = Arc::new(MemoryStorage::new(FaultPlan {
            fail_sync_at: None,
            power_loss_at: Some(loss_at),
        }));
        let (app, sequencer) = start_app(Arc::clone(&storage));
        let (status, _) = call(
            &app,
            "POST",
            "/v1/batches",
            Some(json!({"commands": [{"type": "open_account", "account": "a"}]})),
        )
        .await;
        let mut acked_balance = 0;
        if status == StatusCode::OK {
            for n in 1..=5 {
                let (status, _) = call(&app, "POST", "/v1/batches", Some(deposit(n))).await;
                if status != StatusCode::OK {
                    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
                    break;
                }
                acked_balance += n as i64;
            }
        }
        drop(app);
        sequencer.shutdown();
        let (app, _sequencer) = start_app(Arc::new(storage.after_power_loss()));
        let (status, a) = call(&app, "GET", "/v1/aggregates/account:a", None).await;
        if loss_at == 2 {
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "the unacknowledged open is gone"
            );
        } else {
            assert_eq!(
                a["state"]["balance"].as_i64(),
                Some(acked_balance),
                "power loss at sync {loss_at}"
            );
        }
    }
}

/// A storage whose next commit (a synced write: only the writer thread syncs) panics once
/// armed: stands in for any bug or failed assertion in the writer thread (the invariant check
/// after apply panics the same way).
struct PanickingStorage {
    inner: Arc<MemoryStorage>,
    armed: std::sync::atomic::AtomicBool,
}

impl keel_engine::Storage for PanickingStorage {
    fn write(
        &self,
        set: &keel_engine::WriteSet,
        sync: bool,
    ) -> Result<(), keel_engine::StorageError> {
        if sync && self.armed.load(std::sync::atomic::Ordering::Acquire) {
            panic!("injected writer fault");
        }
        self.inner.write(set, sync)
    }
    fn ingest(
        &self,
        cf: keel_engine::Cf,
        sorted: &keel_engine::WriteSet,
    ) -> Result<(), keel_engine::StorageError> {
        self.inner.ingest(cf, sorted)
    }
    fn get(
        &self,
        cf: keel_engine::Cf,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, keel_engine::StorageError> {
        self.inner.get(cf, key)
    }
    fn multi_get(
        &self,
        cf: keel_engine::Cf,
        keys: &[&[u8]],
    ) -> Result<Vec<Option<Vec<u8>>>, keel_engine::StorageError> {
        self.inner.multi_get(cf, keys)
    }
    fn scan(
        &self,
        cf: keel_engine::Cf,
        start: &[u8],
        visit: keel_engine::Visit<'_>,
    ) -> Result<(), keel_engine::StorageError> {
        self.inner.scan(cf, start, visit)
    }
    fn last(
        &self,
        cf: keel_engine::Cf,
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, keel_engine::StorageError> {
        self.inner.last(cf)
    }
    fn at_or_before(
        &self,
        cf: keel_engine::Cf,
        key: &[u8],
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, keel_engine::StorageError> {
        self.inner.at_or_before(cf, key)
    }
    fn checkpoint(&self, dir: &std::path::Path) -> Result<(), keel_engine::StorageError> {
        self.inner.checkpoint(dir)
    }
}

/// Regression: a panic of the writer thread left every POST answering 503 `Retry-After`
/// forever while `/healthz` and `/readyz` kept answering ok. Now the panic poisons the write
/// path: the waiting request and every later one get `engine_poisoned`, reads and both health
/// checks fail, `writer_failed` tells `keel serve` to exit, and a restart holds exactly the
/// acknowledged batches.
#[tokio::test]
async fn a_writer_panic_poisons_the_write_path_and_fails_the_health_checks() {
    let memory = Arc::new(MemoryStorage::new(FaultPlan::default()));
    let storage = Arc::new(PanickingStorage {
        inner: Arc::clone(&memory),
        armed: std::sync::atomic::AtomicBool::new(false),
    });
    let engine = Engine::open(Arc::clone(&storage) as Arc<dyn keel_engine::Storage>).unwrap();
    let sequencer = Arc::new(Sequencer::start(engine, Config::default()).unwrap());
    let app = router(AppState::new(
        Arc::clone(&sequencer),
        keel_ingress::metrics_handle().unwrap(),
        HttpLimits::default(),
    ));
    let open = json!({"commands": [{"type": "open_account", "account": "a"}]});
    assert_eq!(
        call(&app, "POST", "/v1/batches", Some(open)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, "POST", "/v1/batches", Some(deposit(1))).await.0,
        StatusCode::OK
    );
    assert_eq!(call(&app, "GET", "/readyz", None).await.0, StatusCode::OK);

    storage
        .armed
        .store(true, std::sync::atomic::Ordering::Release);
    let (status, body) = call(&app, "POST", "/v1/batches", Some(deposit(2))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("engine_poisoned")),
        "{body}"
    );
    let reason = tokio::time::timeout(std::time::Duration::from_secs(5), sequencer.writer_failed())
        .await
        .expect("writer_failed resolves after the panic");
    assert!(reason.contains("injected writer fault"), "{reason}");
    assert!(sequencer.is_poisoned());
    for (method, uri, body) in [
        ("POST", "/v1/batches", Some(deposit(3))),
        ("GET", "/v1/aggregates/account:a", None),
        ("GET", "/v1/events", None),
        ("GET", "/healthz", None),
        ("GET", "/readyz", None),
    ] {
        let (status, body) = call(&app, method, uri, body).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("engine_poisoned")),
            "{method} {uri}: {body}"
        );
    }

    drop(app);
    sequencer.shutdown();
    let (app, _sequencer) = start_app(Arc::new(memory.after_power_loss()));
    let (_, a) = call(&app, "GET", "/v1/aggregates/account:a", None).await;
    assert_eq!(
        (a["version"].as_u64(), a["state"]["balance"].as_i64()),
        (Some(2), Some(1)),
        "exactly the acknowledged deposit"
    );
}
