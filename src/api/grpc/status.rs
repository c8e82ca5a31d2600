//! The service's one error, named in gRPC's codes — the counterpart of `ApiError`'s HTTP
//! mapping, written once — and what gRPC reads from a call's metadata: its deadline
//! (`grpc-timeout`), its id and its credentials.

use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Response};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::api::auth::{strip_bearer, Refusal};
use crate::serve::request::{Deadline, RequestContext, MAX_TIMEOUT_MS};
use crate::error::ApiError;

/// `ApiError` → gRPC status, with the same message REST gives. Faults are logged with their
/// detail and answered with the generic message, as on REST.
pub fn to_status(error: ApiError) -> Status {
    error.log();
    let code = match &error {
        ApiError::BadRequest(_) | ApiError::InvalidImage(_) | ApiError::InvalidParameter(_) | ApiError::UnsupportedMediaType(_) => {
            Code::InvalidArgument
        }
        ApiError::Forbidden(_) => Code::PermissionDenied,
        ApiError::NotFound(_) | ApiError::ModelNotFound(_) => Code::NotFound,
        ApiError::MethodNotAllowed(_) | ApiError::NotImplemented(_) => Code::Unimplemented,
        ApiError::PayloadTooLarge(_) => Code::ResourceExhausted,
        ApiError::ModelNotReady { .. } | ApiError::Overloaded(_) => Code::Unavailable,
        ApiError::Conflict(_) => Code::FailedPrecondition,
        ApiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        ApiError::ModelFailed { .. } | ApiError::Internal(_) => Code::Internal,
    };
    Status::new(code, error.to_string())
}

/// A refused credential: none presented is UNAUTHENTICATED, a wrong one (or management being
/// off) PERMISSION_DENIED.
pub fn refusal(refusal: Refusal, what: &str) -> Status {
    match refusal {
        Refusal::Missing => Status::unauthenticated(format!("{what} needs a key: metadata 'authorization: Bearer <key>'")),
        Refusal::Invalid => Status::permission_denied(format!("the key for {what} is not valid")),
        Refusal::ManagementOff => Status::permission_denied(crate::api::auth::MANAGEMENT_OFF),
    }
}

/// The bearer token of the `authorization` metadata, as REST reads the header.
pub fn bearer(metadata: &MetadataMap) -> Option<&str> {
    metadata.get("authorization").and_then(|v| v.to_str().ok()).and_then(strip_bearer)
}

/// The call's deadline — the client's `grpc-timeout` (or REST's `x-request-timeout-ms` as
/// metadata, whichever is shorter), else the server's default — and its id
/// (`x-request-id` metadata if the client sent one, else a new one), as REST's
/// `RequestContext` holds them.
pub fn request_context(metadata: &MetadataMap, default_timeout_ms: u64) -> Result<RequestContext, Status> {
    let started = Instant::now();
    let timeout = match metadata.get("grpc-timeout") {
        None => Duration::from_millis(default_timeout_ms),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(parse_grpc_timeout)
            .ok_or_else(|| Status::invalid_argument("grpc-timeout is not a gRPC timeout (1 to 8 digits and a unit: H M S m u n)"))?,
    };
    // A timeout longer than REST's longest is held to it, as a header would be refused.
    let grpc_ms = (timeout.as_millis() as u64).clamp(1, MAX_TIMEOUT_MS);
    // REST's `x-request-timeout-ms` works as metadata too, read by REST's own rule; the
    // shorter of the two wins.
    let rest = Deadline::from_headers(&metadata.clone().into_headers(), grpc_ms, started).map_err(to_status)?;
    let ms = rest.ms.min(grpc_ms);
    let timeout = Duration::from_millis(ms);
    let request_id = metadata
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    Ok(RequestContext { deadline: Deadline { at: started + timeout, ms }, request_id })
}

/// gRPC's `TimeoutValue TimeoutUnit`: at most 8 ASCII digits, then one of H M S m u n.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// tonic refuses a message over the decoding limit as OUT_OF_RANGE; gRPC's own servers (and
/// the protocol's users) expect RESOURCE_EXHAUSTED. Such a refusal is a trailers-only
/// answer, so its status is in the headers and is renamed here, before anything is sent.
pub async fn oversized_is_resource_exhausted<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    let oversized = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers.get("grpc-message").and_then(|m| m.to_str().ok()).is_some_and(is_oversized_message);
    if oversized {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
    response
}

/// tonic's words for a message over the limit, percent-encoded or not.
fn is_oversized_message(message: &str) -> bool {
    message.contains("message length too large") || message.contains("message%20length%20too%20large")
}

/// The same renaming for an error met inside a stream, where it reaches our code.
pub fn rename_oversized(status: Status) -> Status {
    if status.code() == Code::OutOfRange && is_oversized_message(status.message()) {
        Status::resource_exhausted(status.message().to_string())
    } else {
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_refuse_the_rest() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S", "S1"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn errors_take_the_grpc_code_of_their_kind() {
        assert_eq!(to_status(ApiError::ModelNotFound("m".into())).code(), Code::NotFound);
        assert_eq!(to_status(ApiError::Overloaded("m".into())).code(), Code::Unavailable);
        assert_eq!(to_status(ApiError::InvalidImage("x".into())).code(), Code::InvalidArgument);
        assert_eq!(to_status(ApiError::DeadlineExceeded(5)).code(), Code::DeadlineExceeded);
        let internal = to_status(ApiError::Internal("/secret/path".into()));
        assert_eq!(internal.code(), Code::Internal);
        assert!(!internal.message().contains("secret"), "a fault's detail stays in the log");
    }

    #[test]
    fn only_tonics_size_refusal_is_renamed() {
        let oversized = Status::out_of_range("Error, decoded message length too large: found 9 bytes, the limit is: 8 bytes");
        assert_eq!(rename_oversized(oversized).code(), Code::ResourceExhausted);
        assert_eq!(rename_oversized(Status::out_of_range("other")).code(), Code::OutOfRange);
    }
}
