//! visionserve: libtorch vision models behind REST and gRPC.
//!
//! Layers, top to bottom, each importing only those below it: `api` (protocol shells for /v1,
//! V2 REST, gRPC and TorchServe, none importing another) → `serve` (the serving core: lookup,
//! admission, decoding, the queue, `tasks::finish`, the cache, pipelines, the Open Inference
//! Protocol's shared part) → `repository` (model folders, versions, status, lifecycle, the one
//! readiness rule) → `engine` (the pool of inference threads owning libtorch state; its rules
//! in `engine::policy`) → `tasks` (the one post-processing path: top-k, NMS, masks) and `image`
//! (decode, preprocess), both plain Rust → `model_config` (a model's `config.toml`). `render`
//! draws `tasks`' results.

pub mod api;
pub mod cache;
pub mod config;
pub mod connections;
pub mod engine;
pub mod error;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod image;
pub mod logging;
pub mod metrics;
pub mod model_config;
pub mod pipeline;
pub mod render;
pub mod repository;
pub mod serve;
pub mod tasks;
pub mod telemetry;
pub mod tls;
pub mod video;

use std::sync::Arc;

use tokio::net::TcpListener;

use api::{AppState, RequestLimits};
use config::ServerConfig;
use repository::ModelRepository;

/// Scans the repository, starts listening at once (liveness answers while models load) for
/// REST and, unless turned off, gRPC, loads and warms the models on a background thread, and
/// serves until SIGINT or SIGTERM, which drains both listeners.
pub async fn serve(config: ServerConfig) -> Result<(), Box<dyn std::error::Error>> {
    if config.inference_threads > 0 {
        engine::set_inference_threads(config.inference_threads);
    }
    // The cores Rust sees are the cgroup's CPU quota when one is set (a container's CPU
    // limit), so the defaults below follow the limit, not the node's core count.
    tracing::info!(
        cores = std::thread::available_parallelism().map_or(1, |n| n.get()),
        inference_threads = engine::inference_thread_count(),
        preprocess_threads = config.preprocess_thread_count(),
        "thread pools sized"
    );
    for library in &config.op_libraries {
        engine::ops::load_op_library(library)?;
        tracing::info!(library = %library.display(), "operator library loaded");
    }
    let mut repository = ModelRepository::scan(&config.model_repository, &config.models)?;
    let on_demand = repository::OnDemandPolicy {
        max_loaded_models: config.max_loaded_models,
        memory_budget_bytes: config.memory_budget_mb.map(|mb| mb * 1024 * 1024),
    };
    if on_demand.is_active() {
        tracing::info!(max_models = ?on_demand.max_loaded_models, budget_bytes = ?on_demand.memory_budget_bytes, "models load on demand; pinned ones at start");
    }
    repository.set_on_demand(on_demand);
    let repository = Arc::new(repository);
    let names: Vec<String> = repository.families().iter().map(|f| f.name.clone()).collect();
    tracing::info!(repository = %config.model_repository.display(), models = ?names, "repository scanned");

    let loader = Arc::clone(&repository);
    std::thread::Builder::new().name("model-loader".into()).spawn(move || loader.load_all())?;
    if let Some(settings) = config.poll_settings() {
        repository::poll::spawn(Arc::clone(&repository), settings, config.models.clone())?;
    }

    let limits = RequestLimits {
        max_body_bytes: config.max_body_bytes,
        max_image_pixels: config.max_image_pixels,
        max_images_per_request: config.max_images_per_request,
        request_timeout_ms: config.request_timeout_ms,
        refusal_delay_ms: config.refusal_delay_ms,
    };
    let repository_for_drain = Arc::clone(&repository);
    let state = AppState::builder(repository, limits)
        .cpu_threads(config.preprocess_thread_count())
        .api_keys(config.load_api_keys()?)
        .admin_token(config.load_admin_token()?)
        .response_cache_bytes(config.response_cache_bytes)
        .video(config.video_settings())
        .streams(config.stream_settings()?)
        .build();
    if !state.streams.settings.allow.is_empty() {
        tracing::info!(allowed = ?config.streams_allow, "live streams on");
    }
    let streams = Arc::clone(&state.streams);
    if state.cache.is_some() {
        tracing::info!(bytes = config.response_cache_bytes, "response cache on");
    }
    let tls = match config.tls_files() {
        None => None,
        Some(files) => {
            let tls = tls::Tls::load(files)?;
            tls.spawn_renewal_watch();
            Some(tls)
        }
    };
    let listener = TcpListener::bind(config.addr).await?;
    let local = listener.local_addr()?;
    match &tls {
        None => tracing::info!("listening on http://{local}"),
        Some(tls) => tracing::info!(
            mutual = tls.requires_client_certificate(),
            valid_until = %tls::format_time(tls.not_after()),
            "listening on https://{local}"
        ),
    }
    if !state.api_keys.is_empty() {
        tracing::info!(keys = state.api_keys.len(), "inference routes require an API key");
    }
    if state.admin_token.is_some() {
        tracing::info!("management API on; it requires the admin token");
    }
    // One signal drains both listeners.
    let (shutdown_sender, shutdown) = tokio::sync::watch::channel(false);
    let draining = Arc::clone(&repository_for_drain);
    let shutdown_delay = std::time::Duration::from_secs(config.shutdown_delay_secs);
    tokio::spawn(async move {
        shutdown_signal().await;
        // Readiness off first, listeners closed after the delay: a balancer that polls
        // readiness moves its traffic away before a connection is refused or cut.
        draining.begin_draining();
        if !shutdown_delay.is_zero() {
            tracing::info!(delay_secs = shutdown_delay.as_secs(), "readiness off; serving on until the listeners close");
            tokio::time::sleep(shutdown_delay).await;
        }
        // A stream's subscribers would hold their connections open past the drain.
        streams.stop_all();
        let _ = shutdown_sender.send(true);
    });
    let limits = connections::ConnectionLimits {
        protocol: connections::Protocol::Http1,
        max_connections: config.max_connections,
        header_read_timeout: std::time::Duration::from_secs(config.header_read_timeout_secs),
        shutdown_grace: std::time::Duration::from_secs(config.shutdown_grace_secs),
    };
    let grpc = match config.grpc_addr.0 {
        None => None,
        Some(addr) => {
            let grpc_listener = TcpListener::bind(addr).await?;
            let scheme = if tls.is_some() { "grpcs" } else { "grpc" };
            tracing::info!("listening on {scheme}://{}", grpc_listener.local_addr()?);
            let options = api::grpc::GrpcOptions {
                max_message_bytes: config.grpc_message_limit(),
                stream_max_in_flight: config.grpc_stream_max_in_flight,
            };
            let routes = api::grpc::routes(state.clone(), options, shutdown.clone());
            let limits = connections::ConnectionLimits { protocol: connections::Protocol::Http2, ..limits };
            Some(tokio::spawn(connections::serve(grpc_listener, routes, limits, tls.clone(), fired(shutdown.clone()))))
        }
    };
    let mut app = api::router(state)
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(std::time::Duration::from_secs(config.body_timeout_secs)));
    if let Some(cors) = cors_layer(&config.browser_origins())? {
        app = app.layer(cors);
    }
    let rest_drained = connections::serve(listener, app, limits, tls, fired(shutdown)).await;
    let grpc_drained = match grpc {
        Some(task) => task.await.unwrap_or(false),
        None => true,
    };
    if rest_drained && grpc_drained {
        tracing::info!("shut down");
        Ok(())
    } else {
        Err("shutdown grace period over before every request finished".into())
    }
}

/// Resolves once the shutdown flag is set.
async fn fired(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&set| set).await;
}

/// CORS is off unless origins are configured; `*` allows any origin.
fn cors_layer(origins: &[String]) -> Result<Option<tower_http::cors::CorsLayer>, Box<dyn std::error::Error>> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let parsed = origins
            .iter()
            .map(|o| o.parse().map_err(|_| format!("--cors-origins: '{o}' is not a valid origin")))
            .collect::<Result<Vec<axum::http::HeaderValue>, _>>()?;
        AllowOrigin::list(parsed)
    };
    Ok(Some(CorsLayer::new().allow_origin(allow).allow_methods(Any).allow_headers(Any)))
}

/// `GET /health/ready` over a plain TCP connection (over TLS when `tls`): 0 when the answer
/// is 200, 1 otherwise. A listener on 0.0.0.0 is asked on loopback.
pub fn health_probe(addr: std::net::SocketAddr, tls: bool) -> i32 {
    use std::io::{Read, Write};
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let timeout = std::time::Duration::from_secs(3);
    let request = format!("GET /health/ready HTTP/1.0\r\nHost: {target}\r\n\r\n");
    let answer = std::net::TcpStream::connect_timeout(&target, timeout).and_then(|mut stream| {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        if tls {
            return tls::probe_over_tls(stream, request.as_bytes());
        }
        stream.write_all(request.as_bytes())?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        Ok(head)
    });
    match answer {
        Ok(head) if head.starts_with(b"HTTP/1.") && &head[9..12] == b"200" => 0,
        _ => 1,
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown signal received; draining");
}
