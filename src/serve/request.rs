//! What every request carries into the core besides its images: its deadline and its id.

use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use crate::error::ApiError;

/// What every protocol reads from a request's headers (or gRPC metadata) before anything
/// else: its deadline and its id (set by the request-id layer), which travels with the job
/// into the executor's logs.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub deadline: Deadline,
    pub request_id: String,
}

impl RequestContext {
    pub fn from_headers(headers: &HeaderMap, default_timeout_ms: u64) -> Result<RequestContext, ApiError> {
        let deadline = Deadline::from_headers(headers, default_timeout_ms, Instant::now())?;
        let request_id = headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
        Ok(RequestContext { deadline, request_id })
    }
}

/// When a request must be answered by: the server default, or `x-request-timeout-ms`.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: Instant,
    pub ms: u64,
}

/// The longest deadline a request may ask for: ten minutes, on every protocol.
pub const MAX_TIMEOUT_MS: u64 = 600_000;

impl Deadline {
    pub fn from_headers(headers: &HeaderMap, default_ms: u64, started: Instant) -> Result<Deadline, ApiError> {
        let ms = match headers.get("x-request-timeout-ms") {
            None => default_ms,
            Some(value) => value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|ms| (1..=MAX_TIMEOUT_MS).contains(ms))
                .ok_or_else(|| {
                    ApiError::InvalidParameter(format!("header 'x-request-timeout-ms' must be an integer within 1..={MAX_TIMEOUT_MS}"))
                })?,
        };
        Ok(Deadline { at: started + Duration::from_millis(ms), ms })
    }

    /// `ms` from now (a video frame's, from when it is read).
    pub fn from_now(ms: u64) -> Deadline {
        Deadline { at: Instant::now() + Duration::from_millis(ms), ms }
    }

    /// The earlier of this deadline and `ms` from now (a stream frame within its call's).
    pub fn within(self, ms: u64) -> Deadline {
        let now = Instant::now();
        let at = (now + Duration::from_millis(ms)).min(self.at);
        Deadline { at, ms: at.saturating_duration_since(now).as_millis().max(1) as u64 }
    }
}
