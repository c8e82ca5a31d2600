//! The Open Inference Protocol over gRPC against the real binary: a port-0 server over the
//! test models and the client generated from `proto/grpc_service.proto`. ModelInfer answers
//! what REST answers, metadata and readiness follow the repository, and errors and credentials
//! take the gRPC codes a Triton client expects. (`tests/python/test_grpc.py` drives the same
//! server with `tritonclient.grpc`.)

mod common;

use std::sync::OnceLock;

use common::{client, jpeg, test_models, Server};
use tonic::Code;
use visionserve::api::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use visionserve::api::grpc::proto::model_infer_request::InferInputTensor;
use visionserve::api::grpc::proto::{InferTensorContents, ModelInferRequest, ModelMetadataRequest, ModelReadyRequest};

static SERVER: OnceLock<Server> = OnceLock::new();

/// The shared server; started (with blocking HTTP checks) off the test's async runtime.
async fn server() -> &'static Server {
    tokio::task::spawn_blocking(|| Server::shared(&SERVER, &["resnet18"])).await.unwrap()
}

fn image_request(model: &str, image: Vec<u8>) -> ModelInferRequest {
    let contents = InferTensorContents { bytes_contents: vec![image.into()], ..Default::default() };
    ModelInferRequest {
        model_name: model.into(),
        id: "frame-1".into(),
        inputs: vec![InferInputTensor {
            name: "image".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            contents: Some(contents),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn connect(url: String) -> GrpcInferenceServiceClient<tonic::transport::Channel> {
    GrpcInferenceServiceClient::connect(url).await.expect("connecting to the gRPC listener")
}

#[tokio::test(flavor = "multi_thread")]
async fn model_infer_answers_what_rest_answers() {
    let server = server().await;
    let photo = jpeg(96, 80, 7);
    let rest: serde_json::Value = {
        let body = photo.clone();
        let url = server.url("/v1/models/resnet18/predict?top_k=1");
        tokio::task::spawn_blocking(move || client().post(url).header("content-type", "image/jpeg").body(body).send().unwrap().json().unwrap())
            .await
            .unwrap()
    };
    let best_rest = rest["results"][0]["predictions"][0]["index"].as_u64().expect("a top-1 index");

    let mut grpc = connect(server.grpc_url()).await;
    let response = grpc.model_infer(image_request("resnet18", photo)).await.expect("ModelInfer").into_inner();
    assert_eq!((response.model_name.as_str(), response.id.as_str()), ("resnet18", "frame-1"));
    let scores = response.outputs.iter().position(|o| o.name == "scores").expect("a scores output");
    assert_eq!(response.outputs[scores].datatype, "FP32");
    let values: Vec<f32> =
        response.raw_output_contents[scores].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(values.len() as i64, response.outputs[scores].shape.iter().product::<i64>());
    let best_grpc = values.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u64).unwrap();
    assert_eq!(best_grpc, best_rest, "gRPC and /v1 disagree on the top class");
    let sum: f32 = values.iter().sum();
    assert!((sum - 1.0).abs() < 1e-3, "scores are softmax probabilities, summed to {sum}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_and_readiness_follow_the_repository() {
    let mut grpc = connect(server().await.grpc_url()).await;
    let metadata = grpc
        .model_metadata(ModelMetadataRequest { name: "resnet18".into(), version: String::new() })
        .await
        .expect("ModelMetadata")
        .into_inner();
    assert_eq!(metadata.inputs[0].name, "image");
    assert_eq!(metadata.inputs[0].datatype, "UINT8");
    assert!(metadata.outputs.iter().any(|o| o.name == "scores"), "{:?}", metadata.outputs);
    let ready = |name: &str| ModelReadyRequest { name: name.into(), version: String::new() };
    assert!(grpc.model_ready(ready("resnet18")).await.unwrap().into_inner().ready);
    // Unknown is not ready rather than an error, as Triton answers.
    assert!(!grpc.model_ready(ready("ghost")).await.unwrap().into_inner().ready);
    let missing = grpc.model_metadata(ModelMetadataRequest { name: "ghost".into(), version: String::new() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_take_their_grpc_codes() {
    let mut grpc = connect(server().await.grpc_url()).await;
    let unknown = grpc.model_infer(image_request("ghost", jpeg(8, 8, 1))).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let not_an_image = grpc.model_infer(image_request("resnet18", b"not an image".to_vec())).await.unwrap_err();
    assert_eq!(not_an_image.code(), Code::InvalidArgument, "{not_an_image:?}");
    let mut wrong_type = image_request("resnet18", jpeg(8, 8, 1));
    wrong_type.inputs[0].datatype = "INT8".into();
    let wrong_type = grpc.model_infer(wrong_type).await.unwrap_err();
    assert_eq!(wrong_type.code(), Code::InvalidArgument, "{wrong_type:?}");
    assert!(wrong_type.message().contains("INT8"), "{}", wrong_type.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_key_rule_is_the_same_as_rest() {
    let repo = test_models();
    let server = tokio::task::spawn_blocking(move || {
        Server::start_ready(&["--model-repository", repo.to_str().unwrap(), "--models", "resnet18", "--api-keys", "grpc-key"])
    })
    .await
    .unwrap();
    let mut grpc = connect(server.grpc_url()).await;
    let refused = grpc.model_infer(image_request("resnet18", jpeg(32, 32, 3))).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let mut wrong = tonic::Request::new(image_request("resnet18", jpeg(32, 32, 3)));
    wrong.metadata_mut().insert("authorization", "Bearer not-the-key".parse().unwrap());
    assert_eq!(grpc.model_infer(wrong).await.unwrap_err().code(), Code::PermissionDenied);
    let mut right = tonic::Request::new(image_request("resnet18", jpeg(32, 32, 3)));
    right.metadata_mut().insert("authorization", "Bearer grpc-key".parse().unwrap());
    grpc.model_infer(right).await.expect("the right key is let in");
    // Metadata stays open, as on REST.
    grpc.model_metadata(ModelMetadataRequest { name: "resnet18".into(), version: String::new() }).await.expect("metadata is open");
    tokio::task::spawn_blocking(move || drop(server)).await.unwrap();
}
