//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, Triton's
//! definitions in `proto/grpc_service.proto`), with the standard health service and server
//! reflection, on its own HTTP/2 listener; and live streams' events
//! (`visionserve.streams.v1.Streams`, `proto/streams.proto`, in `streams`).
//!
//! A shell only: every RPC goes through the Open Inference Protocol's shared part that REST V2
//! uses too (`serve::oip`) — the same model lookup, admission, queue, batching, deadline and
//! post-processing, the same metadata, readiness rule, API keys and admin token — and differs
//! only in how it reads the request and writes the answer (`convert`), runs one inference
//! (`infer`, for ModelInfer and every stream frame) and names errors (`status`).

mod convert;
mod infer;
mod service;
mod status;
mod stream;
mod streams;

use std::time::Duration;

use tokio::sync::watch;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use super::AppState;

/// The generated messages, server and client (the bench and tests call the server with it).
pub mod proto {
    tonic::include_proto!("inference");

    /// What server reflection describes: `proto/grpc_service.proto`, compiled.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/inference_descriptor.bin"));

    /// Live streams' events (`proto/streams.proto`).
    pub mod streams {
        tonic::include_proto!("visionserve.streams.v1");

        pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/streams_descriptor.bin"));
    }
}

pub use service::InferenceService;

/// The gRPC settings a server starts with.
#[derive(Debug, Clone, Copy)]
pub struct GrpcOptions {
    /// Largest message accepted, in bytes (RESOURCE_EXHAUSTED above it).
    pub max_message_bytes: usize,
    /// Frames of one stream in flight at once.
    pub stream_max_in_flight: usize,
}

/// The health service's names: `""` (the whole server) and the inference service answer
/// readiness — SERVING once every model is loaded and warm, NOT_SERVING while loading and
/// while draining — and `live` answers liveness: SERVING while the process serves at all.
pub const HEALTH_LIVE: &str = "live";
pub const HEALTH_READY: [&str; 2] = ["", "inference.GRPCInferenceService"];

/// Every gRPC service on one router: inference, health, reflection (v1 and v1alpha, which
/// older `grpcurl` builds ask for). `shutdown` turns readiness to NOT_SERVING when it fires.
pub fn routes(state: AppState, options: GrpcOptions, shutdown: watch::Receiver<bool>) -> axum::Router {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_health(state.clone(), health_reporter, shutdown));
    let descriptors = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(proto::streams::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = descriptors().build_v1().expect("the compiled descriptor sets are valid");
    let reflection_v1alpha = descriptors().build_v1alpha().expect("the compiled descriptor sets are valid");
    let streams = proto::streams::streams_server::StreamsServer::new(streams::StreamsService::new(state.clone()));
    let inference = proto::grpc_inference_service_server::GrpcInferenceServiceServer::new(InferenceService::new(state, options))
        .max_decoding_message_size(options.max_message_bytes)
        .max_encoding_message_size(usize::MAX)
        // tritonclient's `compression_algorithm="gzip"`: requests decompressed within the same
        // message limit (a bomb is RESOURCE_EXHAUSTED, never memory), answers compressed when
        // the client says it accepts gzip.
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    Routes::new(inference)
        .add_service(streams)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare()
        .into_axum_router()
        .layer(axum::middleware::map_response(status::oversized_is_resource_exhausted))
}

/// Keeps the health service in step with the repository's one readiness rule; on shutdown,
/// readiness goes NOT_SERVING so a load balancer stops sending while calls drain.
async fn report_health(state: AppState, reporter: tonic_health::server::HealthReporter, mut shutdown: watch::Receiver<bool>) {
    reporter.set_service_status(HEALTH_LIVE, ServingStatus::Serving).await;
    let mut last = None;
    loop {
        let draining = *shutdown.borrow();
        let ready = !draining && state.repository.readiness().is_ready();
        if last != Some(ready) {
            let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
            for name in HEALTH_READY {
                reporter.set_service_status(name, status).await;
            }
            last = Some(ready);
        }
        if draining {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = shutdown.changed() => {}
        }
    }
}
