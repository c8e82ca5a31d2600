//! The one error type of the service, mapped once to an HTTP status and one JSON shape:
//! `{"error": {"code": "...", "message": "..."}}`. Internal faults are logged with their detail
//! and answered with a generic message, so no path or stack trace reaches a client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidImage(String),
    #[error("{0}")]
    NotFound(String),
    #[error("model '{0}' is not in the repository")]
    ModelNotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    InvalidParameter(String),
    #[error("model '{name}' is not ready: {reason}")]
    ModelNotReady { name: String, reason: String },
    /// The request is valid but the model's state does not allow it (scaling an unloaded model).
    #[error("{0}")]
    Conflict(String),
    #[error("model '{0}' has a full queue; retry shortly")]
    Overloaded(String),
    #[error("no answer within the request's deadline of {0} ms")]
    DeadlineExceeded(u64),
    /// The model's forward pass failed on this request's input; the detail goes to the log.
    #[error("model '{model}' failed on this input (the server log has the detail)")]
    ModelFailed { model: String, detail: String },
    #[error("internal error")]
    Internal(String),
    /// The server's operator does not allow it (live streams off, or a source not allowed).
    #[error("{0}")]
    Forbidden(String),
    /// A kind of request this server is not set up for (video without FFmpeg).
    #[error("{0}")]
    NotImplemented(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidImage(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::InvalidParameter(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::ModelNotReady { .. } | ApiError::Overloaded(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::ModelFailed { .. } | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// A stable, machine-readable name for the error, for clients to branch on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidImage(_) => "invalid_image",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::InvalidParameter(_) => "invalid_parameter",
            ApiError::ModelNotReady { .. } => "model_not_ready",
            ApiError::Conflict(_) => "conflict",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::DeadlineExceeded(_) => "deadline_exceeded",
            ApiError::ModelFailed { .. } => "model_failed",
            ApiError::Internal(_) => "internal",
            ApiError::NotImplemented(_) => "not_implemented",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        self.log();
        let body = json!({"error": {"code": self.code(), "message": self.to_string()}});
        let mut response = (status, Json(body)).into_response();
        if matches!(self, ApiError::Overloaded(_) | ApiError::ModelNotReady { .. }) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl ApiError {
    /// Logs an error as every protocol's rendering does: faults with their detail (which never
    /// reaches the client), the client's own mistakes at debug level.
    pub fn log(&self) {
        if let ApiError::Internal(detail) | ApiError::ModelFailed { detail, .. } = self {
            tracing::error!(%detail, "{self}");
        } else {
            tracing::debug!(code = self.code(), message = %self, "request rejected");
        }
    }
}

impl From<crate::tasks::ParamError> for ApiError {
    fn from(e: crate::tasks::ParamError) -> Self {
        ApiError::InvalidParameter(e.0)
    }
}

impl From<crate::tasks::OutputMismatch> for ApiError {
    fn from(e: crate::tasks::OutputMismatch) -> Self {
        ApiError::Internal(e.to_string())
    }
}
