//! The accept loop, ours rather than `axum::serve`'s (or tonic's) because a server facing
//! strangers needs three things that those do not expose: a limit on open connections, a
//! deadline for a client to send its request headers (slowloris), and a bounded grace period
//! on shutdown. REST (HTTP/1.1) and gRPC (HTTP/2) share it.
//!
//! Over the limit, a new REST connection is answered `503` with the JSON error shape and
//! closed at once, rather than left waiting in the kernel's backlog; a gRPC one is closed,
//! which its client reports as UNAVAILABLE. On shutdown the listener closes
//! first (new connections are refused), then every open connection finishes the requests it
//! has — queued ones included — and closes; whatever is still running when the grace period
//! ends is cut.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub protocol: Protocol,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// REST: HTTP/1.1 with keep-alive.
    Http1,
    /// gRPC: HTTP/2 only (prior knowledge, as gRPC clients connect without TLS).
    Http2,
}

const OVER_LIMIT_BODY: &str = r#"{"error":{"code":"too_many_connections","message":"the server's connection limit is reached"}}"#;

/// The whole answer to a connection over the limit, with its own request id like every other.
fn over_limit_response() -> Vec<u8> {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nx-request-id: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{OVER_LIMIT_BODY}",
        uuid::Uuid::new_v4(),
        OVER_LIMIT_BODY.len()
    )
    .into_bytes()
}

/// Runs one connection to its end, holding its place under the connection limit meanwhile.
fn spawn_connection<C>(connection: C, peer: std::net::SocketAddr, permit: tokio::sync::OwnedSemaphorePermit)
where
    C: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        drop(permit);
    });
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains within the grace period.
/// Returns whether every connection finished within it.
pub async fn serve(listener: TcpListener, app: Router, limits: ConnectionLimits, shutdown: impl Future<Output = ()>) -> bool {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http1 = http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    // Images are megabytes: a window that grows with the measured bandwidth-delay product
    // instead of HTTP/2's 64 KiB default, which would cap a large upload at a crawl.
    http2.timer(TokioTimer::new()).adaptive_window(true).max_frame_size(1 << 20);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(connection) => connection,
                Err(e) => {
                    // Out of file descriptors and the like: say so, breathe, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            metrics::counter!(crate::metrics::CONNECTIONS_REFUSED).increment(1);
            tracing::warn!(%peer, limit = limits.max_connections, "connection limit reached; refusing");
            if limits.protocol == Protocol::Http2 {
                drop(stream);
                continue;
            }
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&over_limit_response())).await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let io = TokioIo::new(stream);
        match limits.protocol {
            Protocol::Http1 => spawn_connection(graceful.watch(http1.serve_connection(io, service)), peer, permit),
            Protocol::Http2 => spawn_connection(graceful.watch(http2.serve_connection(io, service)), peer, permit),
        }
    }
    drop(listener);
    let open = limits.max_connections - permits.available_permits();
    tracing::info!(open_connections = open, grace_secs = limits.shutdown_grace.as_secs_f32(), "listener closed; draining");
    tokio::select! {
        () = graceful.shutdown() => true,
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("grace period over with requests still running; cutting them");
            false
        }
    }
}
