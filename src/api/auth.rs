//! The two credentials, each a layer on its own sub-router (`api::router`): optional API keys
//! for the inference routes (`/v1/models/*/predict`, `/v2/models/*/infer`, `/predictions/*`),
//! and the admin token for the management routes, off without one. Both are
//! `Authorization: Bearer <…>`; a missing one is 401 (with `WWW-Authenticate: Bearer`), a wrong
//! one 403. Compared in constant time and never logged. Health, metadata, metrics and the web
//! page stay open. gRPC applies the same two rules (`check_api_key`, `check_admin_token`).

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{v2, AppState};

/// Equal without an early exit, so timing does not reveal how much of a key matched.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// A refusal in the shape of the route's protocol: V2's `{"error": "<message>"}` under `/v2`
/// (what Triton's and KServe's clients read), the service's `{"error": {"code", "message"}}`
/// elsewhere.
pub(super) fn refuse(path: &str, status: StatusCode, code: &str, message: &str) -> Response {
    let mut response = if v2::is_v2_path(path) {
        v2::error_response(status, message)
    } else {
        (status, Json(json!({"error": {"code": code, "message": message}}))).into_response()
    };
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(strip_bearer)
}

/// `Bearer <token>` → the token (REST's header and gRPC's `authorization` metadata).
pub fn strip_bearer(value: &str) -> Option<&str> {
    value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).map(str::trim)
}

/// Why a credential was refused; each protocol renders it its own way (REST 401/403, gRPC
/// UNAUTHENTICATED/PERMISSION_DENIED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No credential was presented.
    Missing,
    /// One was, and it is not valid.
    Invalid,
    /// The management API is off: no admin token is configured.
    ManagementOff,
}

/// The one API key rule, for every protocol: open when no keys are configured; otherwise the
/// presented key must equal one of them.
pub fn check_api_key(state: &AppState, presented: Option<&str>) -> Result<(), Refusal> {
    if state.api_keys.is_empty() {
        return Ok(());
    }
    let presented = presented.ok_or(Refusal::Missing)?;
    // Check every key, so the time taken does not depend on which one matched.
    let matched = state.api_keys.iter().fold(false, |found, key| found | constant_time_eq(presented.as_bytes(), key.as_bytes()));
    if matched { Ok(()) } else { Err(Refusal::Invalid) }
}

/// The one admin token rule: management is off without a token, and needs it otherwise.
pub fn check_admin_token(state: &AppState, presented: Option<&str>) -> Result<(), Refusal> {
    let token = state.admin_token.as_deref().ok_or(Refusal::ManagementOff)?;
    let presented = presented.ok_or(Refusal::Missing)?;
    if constant_time_eq(presented.as_bytes(), token.as_bytes()) { Ok(()) } else { Err(Refusal::Invalid) }
}

/// The inference sub-router's layer.
pub async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    match check_api_key(&state, bearer_token(request.headers())) {
        Ok(()) => next.run(request).await,
        Err(Refusal::Invalid) => refuse(&path, StatusCode::FORBIDDEN, "forbidden", "the API key is not valid"),
        Err(_) => refuse(&path, StatusCode::UNAUTHORIZED, "unauthorized", "this route needs an API key: Authorization: Bearer <key>"),
    }
}

/// The management sub-router's layer: the admin token; with none configured, management is off.
pub async fn require_admin_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    match check_admin_token(&state, bearer_token(request.headers())) {
        Ok(()) => next.run(request).await,
        Err(Refusal::ManagementOff) => refuse(&path, StatusCode::FORBIDDEN, "management_disabled", MANAGEMENT_OFF),
        Err(Refusal::Missing) => refuse(
            &path,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "management routes need the admin token: Authorization: Bearer <token>",
        ),
        Err(Refusal::Invalid) => refuse(&path, StatusCode::FORBIDDEN, "forbidden", "the admin token is not valid"),
    }
}

pub const MANAGEMENT_OFF: &str = "the management API is off: start the server with --admin-token or --admin-token-file";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_keys() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
