//! Accepting connections: at most `max_connections` open at once, each closed when a request
//! head does not arrive in full within `header_read_timeout`, all closed gracefully at shutdown.
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
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long connections may take to close after shutdown, beyond the header read timeout: by
/// then hyper has closed every idle or stalled connection, and what is left is a client not
/// reading its response, which is not waited for.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What bounds the server's connections.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
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
        let connection = graceful.watch(
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone())),
        );
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
