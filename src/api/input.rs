//! Getting images and parameters out of a predict request, whatever its form: the raw image as
//! the body, `multipart/form-data` with image parts, or JSON `{"images": ["<base64>", ...]}`.
//! Every failure is an [`ApiError`] with the right 4xx status.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::Value;

use super::AppState;
pub use crate::serve::prepare::decode_base64;
use crate::error::ApiError;

/// Names a multipart text field or JSON key may use to carry a parameter instead of the query.
pub const PARAMETER_NAMES: [&str; 6] =
    ["top_k", "score_threshold", "iou_threshold", "max_detections", "mask_format", "render"];

/// The encoded images of one request, in order, and parameters found in the body.
#[derive(Debug, Default)]
pub struct ImageUploads {
    pub images: Vec<Bytes>,
    pub body_parameters: HashMap<String, String>,
}

impl FromRequest<AppState> for ImageUploads {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.limits.max_body_bytes;
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let essence = content_type.split(';').next().unwrap_or("").trim().to_string();
        let uploads = match essence.as_str() {
            "multipart/form-data" => from_multipart(req, state, limit).await?,
            "application/json" => from_json(&body_bytes(req, state, limit).await?)?,
            // curl's `--data-binary @photo.jpg` labels the body form-urlencoded: take it as the
            // raw image, as TorchServe does; the decoder decides whether it is one.
            "" | "application/octet-stream" | "application/x-www-form-urlencoded" => {
                single(body_bytes(req, state, limit).await?)
            }
            t if t.starts_with("image/") => single(body_bytes(req, state, limit).await?),
            other => {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "content type '{other}' is not accepted: send an image (image/*), multipart/form-data or application/json"
                )))
            }
        };
        if uploads.images.is_empty() {
            return Err(ApiError::BadRequest("the request holds no image".into()));
        }
        if uploads.images.len() > state.limits.max_images_per_request {
            return Err(ApiError::BadRequest(format!(
                "{} images in one request, over the limit of {}",
                uploads.images.len(),
                state.limits.max_images_per_request
            )));
        }
        Ok(uploads)
    }
}

fn single(body: Bytes) -> ImageUploads {
    ImageUploads { images: vec![body], body_parameters: HashMap::new() }
}

/// The whole body: over `limit` is 413, a body that breaks off 400 (every REST shell reads its
/// upload through this).
pub(crate) async fn body_bytes(req: Request, state: &AppState, limit: usize) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::BadRequest(format!("could not read the request body: {}", rejection.body_text()))
        }
    })
}

async fn from_multipart(req: Request, state: &AppState, limit: usize) -> Result<ImageUploads, ApiError> {
    let mut multipart = Multipart::from_request(req, state)
        .await
        .map_err(|r| ApiError::BadRequest(format!("malformed multipart request: {}", r.body_text())))?;
    let mut uploads = ImageUploads::default();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e, limit)),
        };
        let name = field.name().unwrap_or("").to_string();
        let is_file = field.file_name().is_some();
        let bytes = field.bytes().await.map_err(|e| multipart_error(e, limit))?;
        if uploads.images.len() > state.limits.max_images_per_request {
            // Over the limit already: read the rest (bounded by the body limit) without keeping
            // it, so the client gets the 400 instead of a connection closed mid-upload.
            continue;
        }
        if !is_file && PARAMETER_NAMES.contains(&name.as_str()) {
            let text = String::from_utf8(bytes.to_vec())
                .map_err(|_| ApiError::InvalidParameter(format!("parameter '{name}' is not UTF-8 text")))?;
            uploads.body_parameters.insert(name, text);
        } else {
            uploads.images.push(bytes);
        }
    }
    Ok(uploads)
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(limit)
    } else {
        ApiError::BadRequest(format!("malformed multipart request: {}", e.body_text()))
    }
}

#[derive(Deserialize)]
struct JsonBody {
    images: Vec<String>,
    #[serde(flatten)]
    parameters: HashMap<String, Value>,
}

fn from_json(body: &[u8]) -> Result<ImageUploads, ApiError> {
    let parsed: JsonBody = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!("malformed JSON body (expected {{\"images\": [\"<base64>\", ...]}}): {e}"))
    })?;
    let images = parsed
        .images
        .iter()
        .enumerate()
        .map(|(i, text)| decode_base64(text).map_err(|e| ApiError::BadRequest(format!("images[{i}] is not valid base64: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut body_parameters = HashMap::new();
    for (key, value) in parsed.parameters {
        if !PARAMETER_NAMES.contains(&key.as_str()) {
            return Err(ApiError::InvalidParameter(format!("unknown field '{key}' in the JSON body")));
        }
        let text = match value {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            other => return Err(ApiError::InvalidParameter(format!("parameter '{key}' must be a number or string, got {other}"))),
        };
        body_parameters.insert(key, text);
    }
    Ok(ImageUploads { images, body_parameters })
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_with_and_without_padding_and_as_data_url() {
        assert_eq!(&decode_base64("aGk=").unwrap()[..], b"hi");
        assert_eq!(&decode_base64("aGk").unwrap()[..], b"hi");
        assert_eq!(&decode_base64("data:image/png;base64,aGk=").unwrap()[..], b"hi");
        assert!(decode_base64("not base64!").is_err());
    }

    #[test]
    fn json_body_takes_images_and_known_parameters() {
        let uploads = from_json(br#"{"images": ["aGk="], "top_k": 3}"#).unwrap();
        assert_eq!(uploads.images.len(), 1);
        assert_eq!(uploads.body_parameters["top_k"], "3");
        assert!(matches!(from_json(br#"{"images": ["aGk="], "colour": 3}"#), Err(ApiError::InvalidParameter(_))));
        assert!(matches!(from_json(br#"{"image": "aGk="}"#), Err(ApiError::BadRequest(_))));
    }
}
