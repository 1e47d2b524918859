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
    response
}

/// The status and code for a worker that produced no response.
pub(crate) fn invoke_status(e: &InvokeError) -> (StatusCode, &'static str) {
    match e {
        InvokeError::CpuLimitExceeded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "cpu_limit_exceeded"),
        InvokeError::WallTimeExceeded { .. } => (StatusCode::GATEWAY_TIMEOUT, "wall_time_exceeded"),
        InvokeError::MemoryLimitExceeded { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "memory_limit_exceeded"),
        InvokeError::Trapped(_) => (StatusCode::INTERNAL_SERVER_ERROR, "worker_crashed"),
        InvokeError::NoResponse => (StatusCode::INTERNAL_SERVER_ERROR, "no_response"),
        InvokeError::WorkerError(_) => (StatusCode::INTERNAL_SERVER_ERROR, "worker_error"),
        InvokeError::ResponseTooLarge { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "response_too_large"),
        InvokeError::OverCapacity => (StatusCode::SERVICE_UNAVAILABLE, "over_capacity"),
        InvokeError::Cancelled | InvokeError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
    }
}
