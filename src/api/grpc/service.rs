//! `inference.GRPCInferenceService`: thin handlers over what REST already does.

use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::convert;
use super::infer::{infer_one, request_span, version};
use super::proto::grpc_inference_service_server::GrpcInferenceService;
use super::proto::model_metadata_response::TensorMetadata;
use super::proto::repository_index_response::ModelIndex;
use super::proto::*;
use super::status::{bearer, refusal, request_context, to_status};
use super::stream::{self, ResponseStream};
use super::GrpcOptions;
use crate::serve::manage::{self, repository_index};
use crate::api::auth::{check_admin_token, check_api_key};
use crate::api::AppState;
use crate::error::ApiError;
use crate::serve::oip::config::model_configuration;
use crate::serve::oip::statistics::statistics;
use crate::serve::oip::{self, TensorSpec, EXTENSIONS};

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
        let found = self.state.repository.lookup(&request.name, version(&request.version));
        Ok(Response::new(ModelReadyResponse { ready: found.is_ok_and(|servable| self.state.repository.is_ready(&servable)) }))
    }

    async fn server_metadata(&self, _: Request<ServerMetadataRequest>) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "visionserve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(&self, request: Request<ModelMetadataRequest>) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let servable = self.state.repository.lookup(&request.name, version(&request.version)).map_err(|e| to_status(e.into()))?;
        let metadata = oip::model_metadata(&self.state, servable).map_err(to_status)?;
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

    async fn model_config(&self, request: Request<ModelConfigRequest>) -> Result<Response<ModelConfigResponse>, Status> {
        let request = request.into_inner();
        let servable = self.state.repository.lookup(&request.name, version(&request.version)).map_err(|e| to_status(e.into()))?;
        let configuration = model_configuration(&self.state, servable).map_err(to_status)?;
        Ok(Response::new(ModelConfigResponse { config: Some(convert::model_config(&configuration)) }))
    }

    /// An empty name asks for every model, an empty version for every version of the one named.
    async fn model_statistics(&self, request: Request<ModelStatisticsRequest>) -> Result<Response<ModelStatisticsResponse>, Status> {
        let request = request.into_inner();
        let name = (!request.name.is_empty()).then_some(request.name.as_str());
        let rows = statistics(&self.state, name, version(&request.version)).map_err(to_status)?;
        Ok(Response::new(convert::model_statistics(rows)))
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
        manage::load(&self.state, name).await.map_err(|e| to_status(ApiError::BadRequest(e)))?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.require_admin_token(request.metadata())?;
        let name = request.into_inner().model_name;
        manage::unload(&self.state, &name, None).map_err(|e| to_status(e.into()))?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}
