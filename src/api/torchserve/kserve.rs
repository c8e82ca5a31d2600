//! KServe's V1 protocol as KServe's `pytorch` runtime serves it — that runtime is TorchServe
//! behind its KServe wrapper — so an InferenceService moved here keeps its clients:
//! `POST /v1/models/{name}:predict` with `{"instances": [...]}`, each instance an image as
//! `{"b64": "<base64>"}`, `{"data": "<base64>"}` or a base64 string, answered
//! `{"predictions": [...]}`, one TorchServe handler answer per instance (the top 5 labels of a
//! classifier, a detector's boxes, a segmenter's per-pixel classes; a pipeline's detections
//! with their classifier's top-k). `POST /v1/models/{name}:explain` answers 501: no model here
//! has an explainer. `GET /v1/models/{name}` (the model's description, with `ready`) and
//! `GET /` (`{"status": "alive"}` to API clients) are V1's metadata and liveness.

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{model_answers, pipeline_answers_for};
use crate::api::input::{body_bytes, decode_base64};
use crate::api::AppState;
use crate::error::ApiError;
use crate::repository::Servable;
use crate::serve::{RequestContext, Target};

/// Inference, behind the API keys like every inference route. (`/v1/models/{name}` serves
/// `GET` too, the model's description: one path, two methods.)
pub fn inference_routes() -> Router<AppState> {
    Router::new().route("/v1/models/{name}", post(verb))
}

/// `{name}:predict` or `{name}:explain`: axum's router matches whole segments, so the verb is
/// split off here.
async fn verb(State(state): State<AppState>, Path(target): Path<String>, request: Request) -> Result<Response, ApiError> {
    let headers = request.headers().clone();
    let body = body_bytes(request, &state, state.limits.max_body_bytes).await?;
    let (name, verb) = target
        .rsplit_once(':')
        .ok_or_else(|| ApiError::MethodNotAllowed(format!("POST /v1/models/{target}: KServe V1 is POST /v1/models/{{name}}:predict")))?;
    match verb {
        "predict" => predict(&state, name, &headers, &body).await,
        "explain" => Ok((
            StatusCode::NOT_IMPLEMENTED,
            Json(json!({"error": format!("model '{name}' has no explainer: only :predict is served")})),
        )
            .into_response()),
        other => Err(ApiError::NotFound(format!("KServe V1 has no verb ':{other}' (use :predict)"))),
    }
}

/// The instances' images: `{"b64": …}` (KServe's convention for binary data), `{"data": …}`
/// (TorchServe's) or a base64 string.
fn instance_images(body: &[u8], max_images: usize) -> Result<Vec<axum::body::Bytes>, ApiError> {
    let request: Value = serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("malformed KServe V1 request: {e}")))?;
    let instances = request
        .get("instances")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::BadRequest("a KServe V1 request is {\"instances\": [...]}, one image each".into()))?;
    if instances.is_empty() || instances.len() > max_images {
        return Err(ApiError::BadRequest(format!("{} instances; 1..={max_images} are accepted", instances.len())));
    }
    instances
        .iter()
        .enumerate()
        .map(|(i, instance)| {
            let text = match instance {
                Value::String(text) => Some(text.as_str()),
                Value::Object(fields) => fields.get("b64").or_else(|| fields.get("data")).and_then(Value::as_str),
                _ => None,
            }
            .ok_or_else(|| ApiError::BadRequest(format!("instance {i}: an image is {{\"b64\": \"<base64>\"}}, {{\"data\": \"<base64>\"}} or a base64 string")))?;
            decode_base64(text).map_err(|e| ApiError::BadRequest(format!("instance {i} is not valid base64: {e}")))
        })
        .collect()
}

async fn predict(state: &AppState, name: &str, headers: &axum::http::HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    let context = RequestContext::from_headers(headers, state.limits.request_timeout_ms)?;
    let servable = state.repository.lookup(name, None)?;
    let images = instance_images(body, state.limits.max_images_per_request)?;
    let (predictions, headers) = match servable {
        Servable::Pipeline(pipeline) => pipeline_answers_for(state, &pipeline, images, &context).await?,
        Servable::Model(entry) => {
            let target = Target::resolve(state, entry, &context).await?;
            model_answers(state, &target, images, &context).await?
        }
    };
    Ok((headers, Json(json!({"predictions": predictions}))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_take_kserves_and_torchserves_image_forms() {
        let body = br#"{"instances": [{"b64": "aGk="}, {"data": "aGk="}, "aGk="]}"#;
        let images = instance_images(body, 8).unwrap();
        assert_eq!(images.iter().map(|b| b.as_ref()).collect::<Vec<_>>(), [b"hi", b"hi", b"hi"]);
        for bad in [&br#"{"inputs": []}"#[..], br#"{"instances": []}"#, br#"{"instances": [{"x": 1}]}"#, br#"{"instances": ["%%"]}"#, b"not json"] {
            assert!(matches!(instance_images(bad, 8), Err(ApiError::BadRequest(_))), "{}", String::from_utf8_lossy(bad));
        }
        assert!(instance_images(br#"{"instances": ["aGk=", "aGk="]}"#, 1).is_err(), "over the per-request limit");
    }
}
