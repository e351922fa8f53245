//! Keel's HTTP edge and the `keel` binary's commands.
//!
//! This is the only crate that knows HTTP and JSON: it parses and validates requests into the
//! domain's envelopes ([`wire`]), hands them to the sequencer, and turns replies, rejections,
//! overload and faults into JSON answers ([`http`]). It decides nothing and writes nothing
//! itself; it never answers a batch before the sequencer says the batch is durable.

pub mod audit_cmd;
pub mod auth;
pub mod batches_route;
pub mod config;
pub mod http;
pub mod keys_cmd;
pub mod lane;
pub mod openapi;
pub mod server;
pub mod subscribe;
pub mod tls;
pub mod upgrade;
pub mod wire;

use anyhow::Context;
use config::ServeConfig;
use keel_sequencer::Sequencer;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;

/// The process-wide Prometheus recorder, installed once even when several servers (tests)
/// ask for it at the same time.
pub fn metrics_handle() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| install_recorder().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let seconds = [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064,
        0.128, 0.256, 0.512, 1.0, 2.0,
    ];
    let items = [
        1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)?
        .set_buckets_for_metric(Matcher::Full("keel_batch_items".into()), &items)?
        .set_buckets_for_metric(Matcher::Full("keel_batch_requests".into()), &items)?
        .install_recorder()
        .context("installing the Prometheus recorder")
}

/// Registers the series that only move on a rare event (a poisoned engine, a writer panic, a
/// failed publish, a projector retry) at zero, so that they are on /metrics from the start and
/// a dashboard panel on them shows 0 instead of "no data". `increment(0)` registers without
/// overwriting a value already recorded.
fn register_rare_event_metrics(names: &[&'static str]) {
    for &name in names {
        if name.ends_with("_total") {
            metrics::counter!(name).increment(0);
        } else {
            metrics::gauge!(name).increment(0.0);
        }
    }
}

/// Opens the store, starts the writer and serves HTTP until SIGTERM or Ctrl-C; then stops
/// accepting, lets in-flight requests finish for at most `--shutdown-drain-secs` (then drops the
/// connections left), drains the writer and closes RocksDB.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    tracing::info!(
        data = %config.data.display(),
        listen = %config.listen,
        batch_items_max = config.batch_items_max,
        queue_depth_max = config.queue_depth_max,
        queue_items_max = config.queue_items_max,
        linger_us = config.linger_us,
        body_bytes_max = config.body_bytes_max,
        nats_url = config.nats_url.as_deref().map(redact_credentials).as_deref().unwrap_or("(publication off)"),
        nats_stream = %config.nats_stream,
        nats_subject = %config.nats_subject,
        publish_inflight_max = config.publish_inflight_max,
        parse_concurrency_max = config.parse_concurrency_max,
        body_read_timeout_ms = config.body_read_timeout_ms,
        header_read_timeout_ms = config.header_read_timeout_ms,
        connections_max = config.connections_max,
        read_concurrency_max = config.read_concurrency_max,
        read_timeout_ms = config.read_timeout_ms,
        shutdown_drain_secs = config.shutdown_drain_secs,
        auth_keys = config.auth_keys.as_deref().map(|p| p.display().to_string()).as_deref().unwrap_or("(none: no authentication)"),
        tls = config.tls_cert.is_some(),
        subscribers_max = config.subscribers_max,
        subscriber_buffer_batches = config.subscriber_buffer_batches,
        subscriber_wakeups_per_sec = config.subscriber_wakeups_per_sec,
        subscriber_nice = config.subscriber_nice,
        "keel serve starting"
    );
    config.check_exposure()?;
    let auth = match &config.auth_keys {
        Some(path) => {
            let auth = auth::Auth::load(path)?;
            tracing::info!(file = %path.display(), "API keys loaded");
            Some(Arc::new(auth))
        }
        None => None,
    };
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(tls::Tls::load(cert, key)?)),
        _ => None,
    };
    let domains = Arc::new(config.load_domains()?);
    for domain in domains.domains() {
        tracing::info!(
            domain = %domain.name,
            file = %domain.file,
            commands = domain.commands.len(),
            "domain loaded"
        );
    }
    std::fs::create_dir_all(&config.data)
        .with_context(|| format!("creating data directory {}", config.data.display()))?;
    let sequencer = Sequencer::open(&config.data, config.sequencer(domains))
        .with_context(|| format!("opening the store in {}", config.data.display()))?;
    let sequencer = Arc::new(sequencer);
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let metrics = metrics_handle()?;
    register_rare_event_metrics(&["keel_poisoned", "keel_writer_panics_total"]);
    if config.nats_url.is_some() {
        register_rare_event_metrics(&["keel_publish_errors_total"]);
    }
    spawn_metrics_upkeep(metrics.clone());
    let publisher = match config.publisher() {
        Some(publisher) => {
            Some(keel_projection::publisher::start(sequencer.reader().clone(), publisher).await?)
        }
        None => None,
    };
    let state = http::AppState::new(Arc::clone(&sequencer), metrics, config.http_limits())
        .with_auth(auth.clone());
    spawn_reload_on_hangup(auth, tls.clone())?;
    let subscriptions = Arc::clone(&state.subscriptions);
    // Live subscriptions run on their own lower-priority threads (ARCHITECTURE.md, "Live
    // subscriptions"), as many as the machine has cores.
    let lane_threads = std::thread::available_parallelism().map_or(2, usize::from);
    let lane = lane::Lane::start(lane_threads, config.subscriber_nice)
        .context("starting the subscription lane")?;
    subscriptions.start_on(lane.handle());
    let local = listener.local_addr()?;
    // Installed before the line below, so that a SIGTERM right after it drains.
    let stop_signal = shutdown_signal();
    // The writer's death is a stop signal too: the write path is poisoned (every request gets
    // 503 and both health checks fail), and exiting non-zero after the drain lets the
    // supervisor restart keel so that recovery runs (ARCHITECTURE.md, "A writer that dies").
    let writer_failure = std::sync::OnceLock::new();
    let stop = async {
        tokio::select! {
            () = stop_signal => {}
            reason = sequencer.writer_failed() => {
                tracing::error!(reason, "the writer died; stopping so that the supervisor restarts keel");
                let _ = writer_failure.set(reason);
            }
        }
        // Open subscriptions never end by themselves: end them now (a final `resume` event)
        // so that they do not hold the drain.
        subscriptions.shutdown();
    };
    tracing::info!(listen = %local, "serving HTTP");
    // One plain line on stdout for scripts and tests that listen on port 0.
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("keel: listening on {scheme}://{local}");
    server::serve(
        listener,
        http::router(state),
        tls,
        lane.handle().cloned(),
        &config.connection_limits(),
        stop,
    )
    .await;
    lane.shutdown(Duration::from_secs(5)).await;
    tracing::info!("HTTP stopped; draining the write queue");
    let sequencer_for_drain = Arc::clone(&sequencer);
    tokio::task::spawn_blocking(move || sequencer_for_drain.shutdown()).await?;
    if let Some(publisher) = publisher {
        publisher.shutdown(Duration::from_secs(5)).await;
    }
    drop(sequencer);
    if let Some(reason) = writer_failure.get() {
        anyhow::bail!("the writer thread died ({reason}); restart keel serve to recover");
    }
    tracing::info!("keel serve stopped cleanly");
    Ok(())
}

/// Runs `keel project` until SIGTERM or Ctrl-C, serving its metrics when asked to.
pub async fn project(args: config::ProjectArgs) -> anyhow::Result<()> {
    if let Some(address) = args.metrics_listen {
        let handle = metrics_handle()?;
        keel_projection::projector::describe_metrics();
        register_rare_event_metrics(&[
            "keel_projector_retries_total",
            "keel_projector_repaired_batches_total",
        ]);
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("--metrics-listen {address}"))?;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let body = handle.render();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        body,
                    )
                }
            }),
        );
        tracing::info!(%address, "projector metrics on GET /metrics");
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "the metrics listener stopped");
            }
        });
    }
    keel_projection::project_until(args.projector(), shutdown_signal()).await?;
    Ok(())
}

/// A URL with any `user:password@` part replaced, for logs.
pub fn redact_credentials(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// On SIGHUP, reads the API key file and the TLS certificate and key again. A file that does
/// not load is logged and counted (`keel_reload_errors_total`), and what is in force stays.
fn spawn_reload_on_hangup(
    auth: Option<Arc<auth::Auth>>,
    tls: Option<Arc<tls::Tls>>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    register_rare_event_metrics(&["keel_reload_errors_total"]);
    let mut hangup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP received; reloading API keys and TLS certificate");
            if let Some(auth) = &auth {
                match auth.reload() {
                    Ok(live) => {
                        tracing::info!(file = %auth.path().display(), live, "API keys reloaded")
                    }
                    Err(error) => {
                        metrics::counter!("keel_reload_errors_total").increment(1);
                        tracing::error!(%error, "API keys not reloaded; the keys loaded before stay in force");
                    }
                }
            }
            if let Some(tls) = &tls {
                match tls.reload() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(error) => {
                        metrics::counter!("keel_reload_errors_total").increment(1);
                        tracing::error!(error = %format!("{error:#}"), "TLS certificate not reloaded; the one loaded before stays in force");
                    }
                }
            }
        }
    });
    Ok(())
}

fn spawn_metrics_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

/// Resolves on SIGTERM or Ctrl-C: the stop signal of every long-running `keel` command.
///
/// The handlers are installed when this is called, not when the future is first polled:
/// `keel serve` calls it before it prints its "listening" line, so a SIGTERM sent as soon as
/// that line appears drains instead of killing the process (regression: tokio's `ctrl_c()` and a
/// lazily created `signal()` registered only once the server loop polled them, and a signal
/// arriving between the line and the first poll ended the process without a drain).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = signal(SignalKind::terminate())
        .inspect_err(|error| tracing::error!(%error, "cannot listen for SIGTERM"))
        .ok();
    let interrupt = signal(SignalKind::interrupt())
        .inspect_err(|error| tracing::error!(%error, "cannot listen for Ctrl-C"))
        .ok();
    async move {
        let wait = |signal: Option<tokio::signal::unix::Signal>| async move {
            match signal {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(interrupt) => tracing::info!("Ctrl-C received; shutting down"),
            () = wait(terminate) => tracing::info!("SIGTERM received; shutting down"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact_credentials;

    #[test]
    fn credentials_never_reach_the_log() {
        assert_eq!(
            redact_credentials("nats://user:secret@10.0.0.1:4222"),
            "nats://***@10.0.0.1:4222"
        );
        assert_eq!(
            redact_credentials("nats://127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
        assert_eq!(
            redact_credentials("mongodb://a:b@h/?x=y"),
            "mongodb://***@h/?x=y"
        );
    }
}
