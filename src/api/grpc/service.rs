//! `inference.GRPCInferenceService`: thin handlers over what REST already does.

use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::convert;
use super::proto::grpc_inference_service_server::GrpcInferenceService;
use super::proto::model_metadata_response::TensorMetadata;
use super::proto::repository_index_response::ModelIndex;
use super::proto::*;
use super::status::{bearer, refusal, request_context, to_status};
use super::stream::{self, ResponseStream};
use super::GrpcOptions;
use crate::api::admin::{self, repository_index};
use crate::api::auth::{check_admin_token, check_api_key};
use crate::api::inference::RequestContext;
use crate::api::metrics_route::InferenceTracker;
use crate::api::v2::{self, TensorSpec};
use crate::api::AppState;
use crate::error::ApiError;

pub struct InferenceService {
    state: AppState,
    options: GrpcOptions,
}

impl InferenceService {
    pub fn new(state: AppState, options: GrpcOptions) -> InferenceService {
        InferenceService { state, options }
    }

    fn require_api_key(&self, metadata: &MetadataMap) -> Result<(), Status> {
        check_api_key(&self.state, bearer(metadata)).map_err(|r| refusal(r, "inference"))
    }

    fn require_admin_token(&self, metadata: &MetadataMap) -> Result<(), Status> {
        check_admin_token(&self.state, bearer(metadata)).map_err(|r| refusal(r, "the model repository"))
    }
}

/// gRPC's empty version means the model's default version, as a route without one does.
fn version(version: &str) -> Option<&str> {
    Some(version).filter(|v| !v.is_empty())
}

/// One inference, as ModelInfer and every frame of ModelStreamInfer run it: the shared V2
/// path, counted in the request metrics under `protocol="grpc"`, and the per-stage timings
/// (REST's `x-*-time-ms` headers) as response metadata.
pub(super) async fn infer_one(
    state: &AppState,
    request: ModelInferRequest,
    context: &RequestContext,
) -> Result<(ModelInferResponse, MetadataMap), Status> {
    let tracker = InferenceTracker::start(&request.model_name, "grpc");
    let name = request.model_name.clone();
    let version_name = request.model_version.clone();
    let answer = async {
        // Unknown model and version are NOT_FOUND whatever the request holds, as on REST.
        v2::check_exists(state, &name, version(&version_name))?;
        let request = convert::infer_request(request).map_err(ApiError::BadRequest)?;
        v2::infer_tensors(state, &name, version(&version_name), request, context).await
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

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: self.state.repository.readiness().is_ready() }))
    }

    /// An unknown model or version is not ready (not an error), as Triton answers and as
    /// `is_model_ready` over HTTP reads REST's 404: the same client call gives the same answer.
    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(ModelReadyResponse { ready: v2::is_model_ready(&self.state, &request.name, version(&request.version)) }))
    }

    async fn server_metadata(&self, _: Request<ServerMetadataRequest>) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "visionserve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: v2::EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(&self, request: Request<ModelMetadataRequest>) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let metadata = v2::model_metadata_of(&self.state, &request.name, version(&request.version)).map_err(to_status)?;
        let tensors = |specs: Vec<TensorSpec>| {
            specs
                .into_iter()
                .map(|t| TensorMetadata { name: t.name, datatype: t.datatype.to_string(), shape: t.shape })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: metadata.name,
            versions: metadata.versions,
            platform: metadata.platform.to_string(),
            inputs: tensors(metadata.inputs),
            outputs: tensors(metadata.outputs),
        }))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        self.require_api_key(request.metadata())?;
        let context = request_context(request.metadata(), self.state.limits.request_timeout_ms)?;
        let headers = request.metadata().clone().into_headers();
        let request = request.into_inner();
        let span = request_span("ModelInfer", &request.model_name, &context, &headers);
        let (message, metadata) = infer_one(&self.state, request, &context).instrument(span.clone()).await?;
        span.record("status", 200i64);
        let mut response = Response::new(message);
        *response.metadata_mut() = metadata;
        Ok(response)
    }

    type ModelStreamInferStream = ResponseStream;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        self.require_api_key(request.metadata())?;
        // The call's own deadline (grpc-timeout) bounds every frame; each frame also has the
        // server's default from the moment it arrives.
        let call = request_context(request.metadata(), self.state.limits.request_timeout_ms)?;
        let headers = request.metadata().clone().into_headers();
        let frames = stream::answer_in_order(self.state.clone(), request.into_inner(), call.deadline, headers, self.options.stream_max_in_flight);
        Ok(Response::new(frames))
    }

    async fn repository_index(&self, request: Request<RepositoryIndexRequest>) -> Result<Response<RepositoryIndexResponse>, Status> {
        self.require_admin_token(request.metadata())?;
        let models = repository_index(&self.state, request.into_inner().ready)
            .await
            .into_iter()
            .map(|row| ModelIndex {
                name: row.name,
                version: row.version.unwrap_or_default(),
                state: row.state.to_string(),
                reason: row.reason.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.require_admin_token(request.metadata())?;
        let name = request.into_inner().model_name;
        admin::load(&self.state, name).await.map_err(|e| to_status(ApiError::BadRequest(e)))?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.require_admin_token(request.metadata())?;
        let name = request.into_inner().model_name;
        admin::unload(&self.state, &name, None).map_err(|e| to_status(e.into()))?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}
