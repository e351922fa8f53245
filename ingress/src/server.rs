//! The connection loop of `keel serve`: accepts TCP connections up to a bound, serves each with
//! hyper's HTTP/1 server under a header read timeout, and on shutdown drains open connections for
//! a bounded time before dropping what is left.
//!
//! `axum::serve` sets no timer, so hyper's header read timeout never applied (a client that sent
//! half a request head held its connection forever), and its graceful shutdown waits for every
//! connection without a bound (SIGTERM hung while a client held a half-sent request).

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::lane::{Movable, Prefixed, Relocate, read_head};

/// The bounds of the connection loop (`keel serve` flags; ARCHITECTURE.md "Bounds").
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Most open connections; one more is closed as soon as it is accepted.
    pub connections_max: usize,
    /// How long a connection may take to send a request head; also how long an idle keep-alive
    /// connection is kept.
    pub header_read_timeout: Duration,
    /// How long open connections may take to finish after shutdown begins.
    pub shutdown_drain: Duration,
}

/// Serves `app` on `listener` (over TLS when `tls` is given) until `shutdown` resolves; then
/// stops accepting, lets open connections finish their current request for at most
/// `shutdown_drain`, and drops the rest. Returns once no connection task is left (a connection
/// moved to the `lane` is aborted with its task here, and the lane lets go of it at once).
///
/// With a `lane` (the subscription lane, `crate::lane`), a connection whose first request is
/// `GET /v1/subscribe` (over TLS: after the handshake) is served on the lane's runtime; every
/// other connection is served here.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<crate::tls::Tls>>,
    lane: Option<Handle>,
    limits: &ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    assert!(limits.connections_max > 0);
    let permits = Arc::new(Semaphore::new(limits.connections_max));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut http = http1::Builder::new();
    // Half-close: a client may shut down its sending side after the request and still get the
    // answer (without it hyper drops the connection, and the answer, on that EOF).
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .half_close(true);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = done {
                    tracing::error!(%error, "a connection task failed");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                        // Over the bound: close at once rather than queue (a slow client must
                        // not make others wait behind it).
                        metrics::counter!("keel_http_refused_total", "reason" => "connections")
                            .increment(1);
                        drop(stream);
                        continue;
                    };
                    let connection = Connection {
                        http: http.clone(),
                        watcher: graceful.watcher(),
                        app: app.clone(),
                        permit,
                    };
                    match &tls {
                        None => connections.spawn(connection.serve(
                            stream,
                            lane.clone(),
                            limits.header_read_timeout,
                        )),
                        Some(tls) => connections.spawn(connection.serve_tls(
                            stream,
                            tls.acceptor(),
                            lane.clone(),
                            limits.header_read_timeout,
                        )),
                    };
                }
                Err(error) => accept_failed(error).await,
            },
        }
    }
    drop(listener);
    drain(graceful, connections, limits.shutdown_drain).await;
}

/// One accepted connection: what serving it needs, and its permit, held until it ends.
struct Connection {
    http: http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
    app: Router,
    permit: OwnedSemaphorePermit,
}

impl Connection {
    /// Plain HTTP.
    async fn serve(self, stream: TcpStream, lane: Option<Handle>, head_timeout: Duration) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let deadline = tokio::time::Instant::now() + head_timeout;
        self.serve_routed(Movable::new(stream), lane, deadline)
            .await;
    }

    /// HTTPS: the handshake must finish within the header read timeout (a client that opens a
    /// connection and sends nothing holds it no longer than one that sends half a request).
    async fn serve_tls(
        self,
        stream: TcpStream,
        acceptor: tokio_rustls::TlsAcceptor,
        lane: Option<Handle>,
        head_timeout: Duration,
    ) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        // The handshake and the routing read share one deadline.
        let deadline = tokio::time::Instant::now() + head_timeout;
        let handshake = acceptor.accept(Movable::new(stream));
        match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(tls)) => self.serve_routed(tls, lane, deadline).await,
            Ok(Err(error)) => {
                metrics::counter!("keel_tls_handshake_failures_total").increment(1);
                tracing::debug!(%error, "TLS handshake failed");
            }
            Err(_) => {
                metrics::counter!("keel_tls_handshake_failures_total").increment(1);
                tracing::debug!("TLS handshake timed out");
            }
        }
    }

    /// With a `lane`: reads the first bytes of the first request (by `deadline`: the header
    /// read timeout after the connection was accepted) and serves the connection on the lane
    /// when they open a subscription, here otherwise; hyper reads those bytes again from
    /// [`Prefixed`], under its own header read timeout.
    async fn serve_routed<I>(self, mut io: I, lane: Option<Handle>, deadline: tokio::time::Instant)
    where
        I: Relocate + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(lane) = lane else {
            return self.serve_io(io).await;
        };
        // `None`: closed, or silent for the header read timeout; hyper would drop it too.
        let Some(head) = read_head(&mut io, deadline).await else {
            return;
        };
        let subscription = head.opens_subscription;
        let io = Prefixed::new(head.bytes, io);
        if subscription {
            self.serve_on(&lane, io).await;
        } else {
            self.serve_io(io).await;
        }
    }

    /// Serves the connection on the lane's runtime, without keep-alive (a request after the
    /// subscription, such as a write after a 503, goes on a new connection, at the writes'
    /// priority); this task waits for it (and aborts it when aborted itself, as the drain does).
    async fn serve_on<I>(mut self, lane: &Handle, mut io: Prefixed<I>)
    where
        I: Relocate + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let socket = match io.inner_mut().movable().detach() {
            Ok(socket) => socket,
            Err(error) => {
                tracing::debug!(%error, "cannot move a connection to the subscription lane");
                return;
            }
        };
        metrics::counter!("keel_subscribe_lane_connections_total").increment(1);
        self.http.keep_alive(false);
        let mut task = AbortOnDrop(lane.spawn(async move {
            // Registers the socket with the lane's reactor.
            match io.inner_mut().movable().attach(socket) {
                Ok(()) => self.serve_io(io).await,
                Err(error) => tracing::debug!(%error, "cannot serve a connection on the lane"),
            }
        }));
        if let Err(error) = task.await_done().await {
            tracing::error!(%error, "a subscription connection task failed");
        }
    }

    async fn serve_io<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let connection = self
            .http
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(self.app));
        let connection = self.watcher.watch(connection);
        metrics::gauge!("keel_http_connections").increment(1.0);
        if let Err(error) = connection.await {
            // Timeouts, resets and malformed request heads end up here; none is a server fault.
            tracing::debug!(%error, "connection ended with an error");
        }
        metrics::gauge!("keel_http_connections").decrement(1.0);
        drop(self.permit);
    }
}

/// A task on another runtime, aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    async fn await_done(&mut self) -> Result<(), tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Asks every connection to finish its current request and close; after `bound`, drops the
/// connections still open (a client holding a half-sent request cannot delay shutdown).
async fn drain(graceful: GracefulShutdown, mut connections: JoinSet<()>, bound: Duration) {
    let open = connections.len();
    tracing::info!(
        open,
        bound_secs = bound.as_secs_f64(),
        "draining connections"
    );
    if tokio::time::timeout(bound, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            still_open = connections.len(),
            "connections did not finish within the drain bound; closing them"
        );
    }
    // Aborts what is left and waits until every task (and its clone of the app) is gone.
    connections.shutdown().await;
}

/// Accept errors such as EMFILE would spin the loop; wait a moment (as hyper 0.14 and axum do)
/// unless the error was one peer's.
async fn accept_failed(error: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
