//! The one shape of every error the gateway sends:
//! `{"error": {"code", "message", "request_id"}}`. Messages describe the
//! client's own request or its worker's limits; they never carry host paths,
//! backtraces or anything of another tenant.

use bytes::Bytes;
use cordon_runtime::InvokeError;
use http::{HeaderValue, StatusCode, header};

use crate::http1::OutBody;

pub(crate) fn error_response(status: StatusCode, code: &str, message: &str, request_id: &str) -> http::Response<OutBody> {
    let body = serde_json::json!({ "error": { "code": code, "message": message, "request_id": request_id } });
    let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
    bytes.push(b'\n');
    let mut response = http::Response::new(OutBody::Full(Some(Bytes::from(bytes))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::SERVICE_UNAVAILABLE && is_capacity_code(code) {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
    }
    response
}

/// Seconds a client is asked to wait after a 503 for want of an instance
/// slot or a place in its tenant's queue: slots come free as instances end,
/// within a wall-clock limit.
pub(crate) const RETRY_AFTER_SECONDS: &str = "1";

/// Whether `code` says that no instance slot was free, so that the
/// response carries `Retry-After`.
pub(crate) fn is_capacity_code(code: &str) -> bool {
    matches!(code, "over_capacity" | "tenant_over_capacity" | "tenant_overloaded" | "worker_over_capacity")
}

/// The status and code for a worker that produced no response.
pub(crate) fn invoke_status(e: &InvokeError) -> (StatusCode, &'static str) {
    match e {
        InvokeError::CpuLimitExceeded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "cpu_limit_exceeded"),
        InvokeError::WallTimeExceeded { .. } | InvokeError::QueuedPastWallTime { .. } => {
            (StatusCode::GATEWAY_TIMEOUT, "wall_time_exceeded")
        }
        InvokeError::MemoryLimitExceeded { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "memory_limit_exceeded"),
        InvokeError::Trapped(_) => (StatusCode::INTERNAL_SERVER_ERROR, "worker_crashed"),
        InvokeError::NoResponse => (StatusCode::INTERNAL_SERVER_ERROR, "no_response"),
        InvokeError::WorkerError(_) => (StatusCode::INTERNAL_SERVER_ERROR, "worker_error"),
        InvokeError::ResponseTooLarge { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "response_too_large"),
        InvokeError::OverCapacity => (StatusCode::SERVICE_UNAVAILABLE, "over_capacity"),
        InvokeError::OverQuota(refusal) => (StatusCode::SERVICE_UNAVAILABLE, refusal.code()),
        InvokeError::Cancelled | InvokeError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
    }
}
