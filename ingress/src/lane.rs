//! The subscription lane: a second tokio runtime, whose threads run at a lower CPU priority,
//! for everything live subscriptions do (the hub's reads, encoding and fan-out, and serving the
//! subscription connections).
//!
//! A committed batch wakes every subscriber that wants some of it. With a thousand subscribers
//! on the same workers as the write path, those wake-ups and socket writes queue in front of
//! the writer's next request, and the write throughput fell by 80% or more (docs/BENCHMARKS.md,
//! "Live subscriptions"). On the lane, the kernel runs the write path's threads first whenever
//! both want the CPU; subscribers get the rest, and when that is little the hub falls behind
//! and hands out several batches per wake-up, which is cheaper per event. A subscriber that
//! falls too far behind is ended (`too_slow`) and resumes, as before.
//!
//! Which connections go to the lane: the accept loop reads the first bytes of a connection's
//! first request (after the TLS handshake, for HTTPS; [`read_head`]); when they are
//! `GET /v1/subscribe`, the socket moves to the lane's reactor ([`Movable`]) and hyper serves it
//! there, reading those first bytes again ([`Prefixed`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::runtime::{Handle, Runtime};
use tokio::time::Instant;

/// The lane's runtime; shut down (without waiting for its tasks) when dropped.
pub struct Lane {
    runtime: Option<Runtime>,
}

impl Lane {
    /// Starts `threads` worker threads named `keel-subscribe` at niceness `nice` (0: the
    /// process's own priority, 19: the lowest; at 10, a lane thread gets about a tenth of the
    /// CPU time of a write-path thread when both want it). Its blocking threads (store reads)
    /// run at `nice` too.
    pub fn start(threads: usize, nice: i32) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("keel-subscribe")
            .on_thread_start(move || lower_priority(nice))
            .enable_all()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    pub fn handle(&self) -> Option<&Handle> {
        self.runtime.as_ref().map(Runtime::handle)
    }

    /// Stops the lane: drops its tasks and waits up to `bound` for its blocking threads (store
    /// reads in flight), so that nothing of it still reads the store once the caller closes it.
    pub async fn shutdown(mut self, bound: Duration) {
        if let Some(runtime) = self.runtime.take() {
            // `shutdown_timeout` blocks: not on an async worker.
            let stopped = tokio::task::spawn_blocking(move || runtime.shutdown_timeout(bound));
            if let Err(error) = stopped.await {
                tracing::warn!(%error, "subscription lane: stopping it failed");
            }
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Allowed inside an async context, unlike dropping the runtime.
            runtime.shutdown_background();
        }
    }
}

/// Sets the calling thread's niceness (Linux: per thread) to `nice`, unless it already runs at
/// that or lower priority (an unprivileged process cannot raise it back). Lowering the priority
/// needs no privilege; if it fails anyway, the thread runs as it was and says so.
fn lower_priority(nice: i32) {
    let thread = rustix::thread::gettid();
    if rustix::process::getpriority_process(Some(thread)).is_ok_and(|current| current >= nice) {
        return;
    }
    if let Err(error) = rustix::process::setpriority_process(Some(thread), nice) {
        tracing::warn!(%error, "subscription lane: cannot lower the thread's CPU priority");
    }
}

/// The start of a request that opens a subscription.
pub const SUBSCRIBE_HEAD: &[u8] = b"GET /v1/subscribe";

/// The first bytes of a connection's first request, taken to route it (see [`read_head`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    /// What was read: at most [`SUBSCRIBE_HEAD`]'s length; hyper reads it again first.
    pub bytes: Vec<u8>,
    pub opens_subscription: bool,
}

/// Reads from `io` until its bytes are [`SUBSCRIBE_HEAD`] or cannot become it (never more than
/// that many bytes, so the rest of the request stays where it is). `None` when the peer closed
/// before sending anything or `deadline` passed first.
pub async fn read_head<I: AsyncRead + Unpin>(io: &mut I, deadline: Instant) -> Option<Head> {
    let mut bytes = Vec::with_capacity(SUBSCRIBE_HEAD.len());
    let decided = tokio::time::timeout_at(deadline, async {
        let mut chunk = [0u8; SUBSCRIBE_HEAD.len()];
        loop {
            let wanted = SUBSCRIBE_HEAD.len() - bytes.len();
            let read = io.read(&mut chunk[..wanted]).await.ok()?;
            if read == 0 {
                // A closed peer after a few bytes: hyper answers what it got.
                return (!bytes.is_empty()).then_some(false);
            }
            bytes.extend_from_slice(&chunk[..read]);
            if !SUBSCRIBE_HEAD.starts_with(&bytes) {
                return Some(false);
            }
            if bytes.len() == SUBSCRIBE_HEAD.len() {
                return Some(true);
            }
        }
    })
    .await
    .ok()??;
    Some(Head {
        bytes,
        opens_subscription: decided,
    })
}

/// A stream that gives `prefix` (bytes already read from `inner`) before `inner`'s own.
pub struct Prefixed<I> {
    prefix: Vec<u8>,
    given: usize,
    inner: I,
}

impl<I> Prefixed<I> {
    pub fn new(prefix: Vec<u8>, inner: I) -> Self {
        Self {
            prefix,
            given: 0,
            inner,
        }
    }

    pub fn inner_mut(&mut self) -> &mut I {
        &mut self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.given < this.prefix.len() {
            let left = &this.prefix[this.given..];
            let n = left.len().min(buf.remaining());
            buf.put_slice(&left[..n]);
            this.given += n;
            if this.given == this.prefix.len() {
                this.prefix = Vec::new();
                this.given = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TCP socket that can move to another runtime's reactor while something (a TLS session)
/// wraps it: [`Movable::detach`] on the old runtime, [`Movable::attach`] on the new one.
pub struct Movable(Option<TcpStream>);

impl Movable {
    pub fn new(stream: TcpStream) -> Self {
        Self(Some(stream))
    }

    /// Takes the socket off this runtime's reactor.
    pub fn detach(&mut self) -> io::Result<std::net::TcpStream> {
        self.0
            .take()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?
            .into_std()
    }

    /// Registers the socket with the current runtime's reactor.
    pub fn attach(&mut self, socket: std::net::TcpStream) -> io::Result<()> {
        self.0 = Some(TcpStream::from_std(socket)?);
        Ok(())
    }

    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        self.0
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl AsyncRead for Movable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_read(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}

impl AsyncWrite for Movable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_write(cx, data),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_write_vectored(cx, data),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_flush(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_shutdown(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}

/// A connection whose socket can move between runtimes: plain, or TLS over it.
pub trait Relocate {
    fn movable(&mut self) -> &mut Movable;
}

impl Relocate for Movable {
    fn movable(&mut self) -> &mut Movable {
        self
    }
}

impl Relocate for tokio_rustls::server::TlsStream<Movable> {
    fn movable(&mut self) -> &mut Movable {
        self.get_mut().0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::{Movable, Prefixed, read_head};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::Instant;

    /// A connected pair on loopback: (what the client writes to, what the server reads).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// Routes a connection that sent `sent`; returns the decision and everything the server
    /// side then reads through [`Prefixed`] (the whole request, nothing lost or repeated).
    async fn route(sent: &[u8], close: bool) -> (Option<bool>, Vec<u8>) {
        let (mut client, server) = pair().await;
        client.write_all(sent).await.unwrap();
        if close {
            client.shutdown().await.unwrap();
        }
        let mut server = Movable::new(server);
        let Some(head) = read_head(&mut server, Instant::now() + Duration::from_millis(300)).await
        else {
            return (None, Vec::new());
        };
        let decided = head.opens_subscription;
        client.shutdown().await.unwrap_or(());
        let mut all = Vec::new();
        Prefixed::new(head.bytes, server)
            .read_to_end(&mut all)
            .await
            .unwrap();
        (Some(decided), all)
    }

    #[tokio::test]
    async fn a_subscription_is_told_from_other_requests_and_hyper_reads_every_byte() {
        for (sent, close, expected) in [
            (
                &b"GET /v1/subscribe?after=3 HTTP/1.1\r\n\r\n"[..],
                false,
                Some(true),
            ),
            (
                &b"POST /v1/batches HTTP/1.1\r\n\r\n"[..],
                false,
                Some(false),
            ),
            (&b"GET /v1/events HTTP/1.1\r\n\r\n"[..], false, Some(false)),
            // A few bytes, then the peer closes: hyper gets them and answers what it can.
            (&b"GET /v1"[..], true, Some(false)),
            // Closed before a byte.
            (&b""[..], true, None),
            // Could start a subscription, then nothing more within the bound.
            (&b"G"[..], false, None),
        ] {
            let (decided, read) = route(sent, close).await;
            assert_eq!(decided, expected, "{}", String::from_utf8_lossy(sent));
            if decided.is_some() {
                assert_eq!(read, sent);
            }
        }
    }

    #[tokio::test]
    async fn a_request_head_sent_in_pieces_is_recognised_once_enough_has_come() {
        let (mut client, server) = pair().await;
        client.write_all(b"GET /v1/su").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(b"bscribe HTTP/1.1\r\n\r\n").await.unwrap();
            client
        });
        let mut server = Movable::new(server);
        let head = read_head(&mut server, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        assert!(head.opens_subscription);
        assert_eq!(head.bytes, b"GET /v1/subscribe");
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_silent_connection_is_given_up_after_the_head_timeout() {
        let (_client, server) = pair().await;
        let mut server = Movable::new(server);
        let started = std::time::Instant::now();
        assert_eq!(
            read_head(&mut server, Instant::now() + Duration::from_millis(200)).await,
            None
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    /// A socket detached on one runtime and attached on another keeps its bytes.
    #[test]
    fn a_socket_moves_to_another_runtime_with_its_bytes() {
        let first = tokio::runtime::Runtime::new().unwrap();
        let second = tokio::runtime::Runtime::new().unwrap();
        let (mut client, mut server) = first.block_on(async {
            let (client, server) = pair().await;
            (client, Movable::new(server))
        });
        let socket = first.block_on(async {
            client.write_all(b"hello ").await.unwrap();
            server.detach().unwrap()
        });
        drop(first);
        let read = second.block_on(async move {
            server.attach(socket).unwrap();
            let mut client = TcpStream::from_std(client.into_std().unwrap()).unwrap();
            client.write_all(b"world").await.unwrap();
            client.shutdown().await.unwrap();
            let mut all = Vec::new();
            server.read_to_end(&mut all).await.unwrap();
            all
        });
        assert_eq!(read, b"hello world");
    }
}
