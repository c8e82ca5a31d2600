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
//!
//! With TLS on (`crate::tls`), each accepted connection completes its handshake within the
//! header deadline before HTTP starts, with the configuration in force at that moment, so a
//! renewed certificate reaches new connections while open ones keep theirs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::tls::Tls;

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
    /// gRPC: HTTP/2 only (prior knowledge without TLS, `h2` by ALPN with it).
    Http2,
}

const OVER_LIMIT_BODY: &str = r#"{"error":{"code":"too_many_connections","message":"the server's connection limit is reached"}}"#;

/// Answers a connection that will not be served with one JSON error, its own request id like
/// every other answer, and closes it; a client that does not read within a second is dropped.
async fn answer_and_close(mut stream: tokio::net::TcpStream, status: &str, extra_headers: &str, body: &str) {
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra_headers}x-request-id: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        uuid::Uuid::new_v4(),
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Runs one connection to its end, holding its place under the connection limit meanwhile.
async fn run_connection<C, E>(connection: C, peer: std::net::SocketAddr, permit: tokio::sync::OwnedSemaphorePermit)
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    if let Err(e) = connection.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
    drop(permit);
}

/// Whether the client opened with a letter (`GET`, `POST`: a plain HTTP request line) where a
/// TLS client opens with a handshake record (0x16). Anything else is left to the handshake.
async fn looks_like_plain_http(stream: &tokio::net::TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(1) if first[0].is_ascii_alphabetic())
}

const PLAIN_HTTP_BODY: &str = r#"{"error":{"code":"tls_required","message":"this port speaks HTTPS; call it with https://"}}"#;

fn handshake_failed(protocol: Protocol, peer: std::net::SocketAddr, why: &str) {
    let listener = match protocol {
        Protocol::Http1 => "rest",
        Protocol::Http2 => "grpc",
    };
    metrics::counter!(crate::metrics::TLS_HANDSHAKE_FAILURES, "listener" => listener).increment(1);
    tracing::debug!(%peer, listener, error = why, "TLS handshake failed");
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains within the grace period.
/// Returns whether every connection finished within it.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    tls: Option<Arc<Tls>>,
    shutdown: impl Future<Output = ()>,
) -> bool {
    // Under mutual TLS, what a connection without a client certificate is served: the probes only.
    let anonymous_app = tls.as_ref().filter(|t| t.requires_client_certificate()).map(|_| {
        let protocol = limits.protocol;
        app.clone().layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| async move {
            if crate::tls::anonymous_may_call(protocol, request.uri().path()) {
                return next.run(request).await;
            }
            // Read (a bounded part of) what the client is sending before answering: an answer
            // given mid-upload closes the connection under the client, which then reports a
            // broken connection instead of this 401.
            let _ = axum::body::to_bytes(request.into_body(), crate::tls::REFUSED_BODY_READ_BYTES).await;
            crate::tls::client_certificate_required(protocol)
        }))
    });
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    // HTTP/1.1 with upgrades, so a WebSocket (`/v1/streams/{id}/ws`) can take its connection
    // over: hyper-util's builder, as only its upgradeable connection drains gracefully.
    let mut http1 = auto::Builder::new(TokioExecutor::new()).http1_only();
    http1.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
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
            // A plain-text 503 means nothing to a client expecting a TLS handshake.
            if limits.protocol == Protocol::Http2 || tls.is_some() {
                drop(stream);
                continue;
            }
            tokio::spawn(answer_and_close(stream, "503 Service Unavailable", "retry-after: 1\r\n", OVER_LIMIT_BODY));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Some(tls) = &tls else {
            let service = TowerToHyperService::new(app.clone());
            let io = TokioIo::new(stream);
            match limits.protocol {
                Protocol::Http1 => {
                    let (watcher, http1) = (graceful.watcher(), http1.clone());
                    tokio::spawn(async move { run_connection(watcher.watch(http1.serve_connection_with_upgrades(io, service)), peer, permit).await });
                }
                Protocol::Http2 => {
                    tokio::spawn(run_connection(graceful.watch(http2.serve_connection(io, service)), peer, permit));
                }
            }
            continue;
        };
        // The handshake runs on the connection's own task, so a slow one holds up nobody.
        let acceptor = tls.acceptor(limits.protocol);
        let watcher = graceful.watcher();
        let (app, anonymous_app, http1, http2) = (app.clone(), anonymous_app.clone(), http1.clone(), http2.clone());
        tokio::spawn(async move {
            let handshake = async {
                if limits.protocol == Protocol::Http1 && looks_like_plain_http(&stream).await {
                    // A `http://` call to the TLS port gets a readable answer, not a closed socket.
                    answer_and_close(stream, "400 Bad Request", "", PLAIN_HTTP_BODY).await;
                    return Err(std::io::Error::other("a plain-HTTP request on the TLS port (answered 400)"));
                }
                acceptor.accept(stream).await
            };
            let stream = match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return handshake_failed(limits.protocol, peer, &e.to_string()),
                Err(_) => return handshake_failed(limits.protocol, peer, "timed out"),
            };
            let has_client_certificate = stream.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
            let app = match anonymous_app {
                Some(anonymous) if !has_client_certificate => anonymous,
                _ => app,
            };
            let service = TowerToHyperService::new(app);
            let io = TokioIo::new(stream);
            match limits.protocol {
                Protocol::Http1 => run_connection(watcher.watch(http1.serve_connection_with_upgrades(io, service)), peer, permit).await,
                Protocol::Http2 => run_connection(watcher.watch(http2.serve_connection(io, service)), peer, permit).await,
            }
        });
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
