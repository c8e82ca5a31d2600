//! One inference over gRPC, as ModelInfer and every frame of ModelStreamInfer run it.

use tonic::metadata::MetadataMap;
use tonic::Status;

use super::convert;
use super::proto::{ModelInferRequest, ModelInferResponse};
use super::status::to_status;
use crate::api::metrics_route::InferenceTracker;
use crate::api::AppState;
use crate::error::ApiError;
use crate::serve::{oip, RequestContext};

/// gRPC's empty version means the model's default version, as a route without one does.
pub(super) fn version(version: &str) -> Option<&str> {
    Some(version).filter(|v| !v.is_empty())
}

/// The Open Inference Protocol's inference (`serve::oip::infer`), counted in the request
/// metrics under `protocol="grpc"`, with the per-stage timings (REST's `x-*-time-ms` headers)
/// as response metadata.
pub(super) async fn infer_one(
    state: &AppState,
    request: ModelInferRequest,
    context: &RequestContext,
) -> Result<(ModelInferResponse, MetadataMap), Status> {
    let tracker = InferenceTracker::start(&request.model_name, "grpc");
    let answer = async {
        // Unknown model and version are NOT_FOUND whatever the request holds, as on REST.
        let servable = state.repository.lookup(&request.model_name, version(&request.model_version))?;
        let request = convert::infer_request(request).map_err(ApiError::BadRequest)?;
        oip::infer(state, servable, request, context).await
    }
    .await;
    tracker.finish(answer.as_ref().map_or_else(|e| e.status().as_u16(), |_| 200));
    let mut answer = answer.map_err(to_status)?;
    let metadata = MetadataMap::from_headers(std::mem::take(&mut answer.timing_headers));
    Ok((convert::infer_response(answer), metadata))
}

/// REST's request span, for a gRPC call or stream frame: its parent is the W3C trace context
/// of the call's metadata.
pub(super) fn request_span(method: &str, model: &str, context: &RequestContext, metadata: &axum::http::HeaderMap) -> tracing::Span {
    let uri = format!("/inference.GRPCInferenceService/{method}");
    let span = crate::api::request_span(&context.request_id, "grpc", &uri, "grpc", model);
    crate::telemetry::adopt(&span, metadata);
    span
}
