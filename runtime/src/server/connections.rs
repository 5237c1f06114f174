//! Accepting connections: at most `max_connections` open at once, each closed when a request
//! head does not arrive in full within `header_read_timeout` or when the client stops reading
//! its response for `write_timeout` (`WriteDeadline`), all closed gracefully at shutdown.
//!
//! Written here rather than left to `axum::serve`, which gives hyper no timer (so no header read
//! timeout) and accepts without limit; the pieces are hyper's HTTP/1 connection builder and
//! hyper-util's timer, tower adapter and graceful-shutdown watcher, held together by a tokio
//! semaphore. HTTP/1 only, as before: no client of an OpenAI server needs HTTP/2.
//!
//! Over the limit, new connections wait rather than being refused: the loop accepts only with a
//! free slot, so the kernel holds new connections in the listen backlog and they are served in
//! arrival order as slots free. A client sees latency rather than an error it must retry, and a
//! flood costs the server nothing per connection, where accepting only to refuse would spend an
//! accept, a descriptor and a reply on each connection of exactly the flood being shed. Slots do
//! free: the header read timeout also ends idle keep-alive connections (hyper starts it whenever
//! a connection waits for a request head), so only connections with a request in progress hold
//! one for long.

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

/// How long connections may take to close after shutdown, beyond the header read timeout: by
/// then hyper has closed every idle or stalled connection, and what is left is a client not
/// reading its response, which is not waited for.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What bounds the server's connections.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub write_timeout: Duration,
}

/// Serves `app` on connections from `listener` until `stop` completes, then stops accepting,
/// asks every open connection to close after its current response, and returns once they have
/// closed (or the grace period has passed).
pub(crate) async fn serve_connections(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    stop: impl Future<Output = ()>,
) {
    // Zero would never accept, and the semaphore panics above its maximum.
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_closed) => break, // never closed; stop serving rather than spin if it were
            },
            () = &mut stop => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    handle_accept_error(e).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let connection = graceful.watch(builder.serve_connection(
            TokioIo::new(WriteDeadline::new(stream, limits.write_timeout)),
            TowerToHyperService::new(app.clone()),
        ));
        tokio::spawn(async move {
            // Header timeouts, resets and malformed requests end here: the client's problem.
            if let Err(e) = connection.await {
                tracing::debug!(%peer, "connection closed: {e}");
            }
            drop(slot);
        });
    }
    // Connections still in the backlog are refused by the kernel from here on.
    drop(listener);
    let grace = limits.header_read_timeout + CLOSE_GRACE;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_s = grace.as_secs_f64(),
            "connections still open at shutdown are left behind"
        );
    }
}

/// A connection whose writes fail with `TimedOut` once one has made no progress for `limit`:
/// a client that stops reading its response (a long stream, most often) fills the socket's
/// buffers and would otherwise hold its connection, and its request's sequence, forever; the
/// failed write ends the connection, and dropping the response cancels the request. Written
/// here because hyper has no write timeout. Reads pass through: a stalled request head is
/// hyper's header timeout, a stalled body the body deadline (`routes.rs`).
pub(crate) struct WriteDeadline<T> {
    inner: T,
    limit: Duration,
    /// Armed when a write first returns `Pending`, disarmed by any progress.
    stall: Pin<Box<Sleep>>,
    stalled: bool,
}

impl<T> WriteDeadline<T> {
    pub(crate) fn new(inner: T, limit: Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            stall: Box::pin(tokio::time::sleep(limit)),
            stalled: false,
        }
    }

    /// What a pending write becomes: still pending, or past the deadline an error.
    fn check<R>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            self.stalled = false;
            return poll;
        }
        if !self.stalled {
            self.stalled = true;
            self.stall.as_mut().reset(Instant::now() + self.limit);
        }
        match self.stall.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client read nothing of its response for {:.1} s",
                    self.limit.as_secs_f64()
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, poll)
    }
}

/// Accept errors other than a connection gone before it was accepted are those of the process
/// (most often out of descriptors): log, and wait a second for some to free rather than spin.
async fn handle_accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!("accepting a connection: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that reads nothing: the write fails once the deadline passes, not before.
    #[tokio::test]
    async fn a_write_nobody_reads_fails_at_the_deadline() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let mut guarded = WriteDeadline::new(ours, Duration::from_millis(200));
        let start = std::time::Instant::now();
        let err = guarded.write_all(&[7u8; 4096]).await.unwrap_err();
        let waited = start.elapsed();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(waited >= Duration::from_millis(190), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
    }

    /// A slow reader that keeps making progress is never cut off, though the whole write takes
    /// many times the deadline.
    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_is_served() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut guarded = WriteDeadline::new(ours, Duration::from_millis(150));
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < 2048 {
                tokio::time::sleep(Duration::from_millis(30)).await;
                got += theirs.read(&mut buf).await.unwrap();
            }
            got
        });
        guarded
            .write_all(&[1u8; 2048])
            .await
            .expect("no timeout while the reader reads");
        assert_eq!(reader.await.unwrap(), 2048);
    }
}
