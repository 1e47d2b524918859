//! Request and response bodies as they cross the sandbox boundary, each
//! counted against the worker's limit while it streams.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::worker::GuestState;

/// The request body as the guest reads it: at most `limit` bytes, after which
/// the guest's read fails with `HTTP-request-body-size` and `exceeded` is set
/// so the gateway can answer 413.
pub(crate) struct LimitedRequestBody<B> {
    inner: Pin<Box<B>>,
    seen: u64,
    limit: u64,
    exceeded: Arc<AtomicBool>,
}

impl<B> LimitedRequestBody<B> {
    pub(crate) fn new(inner: B, limit: u64, exceeded: Arc<AtomicBool>) -> Self {
        Self { inner: Box::pin(inner), seen: 0, limit, exceeded }
    }
}

impl<B> Body for LimitedRequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.seen > self.limit {
            return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpRequestBodySize(Some(self.seen)))));
        }
        match self.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.seen += data.len() as u64;
                    if self.seen > self.limit {
                        self.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpRequestBodySize(Some(self.seen)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "request body aborted");
                Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpProtocolError)))
            }
            other => other.map(|o| o.map(|r| r.map_err(|_| wasmtime_wasi_http::Error::HttpProtocolError))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a response body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    #[error("the response body exceeds the worker's limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the worker failed while sending the response body")]
    Worker,
}

/// The body of a worker's response, cut off with an error once it passes
/// `max_response_body_bytes`.
pub struct ResponseBody {
    inner: HyperOutgoingBody,
    sent: u64,
    limit: u64,
    guest: Arc<GuestState>,
}

impl ResponseBody {
    pub(crate) fn new(inner: HyperOutgoingBody, limit: u64, guest: Arc<GuestState>) -> Self {
        Self { inner, sent: 0, limit, guest }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.sent > self.limit {
            return Poll::Ready(Some(Err(ResponseBodyError::TooLarge { limit: self.limit })));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                    if self.sent > self.limit {
                        return Poll::Ready(Some(Err(ResponseBodyError::TooLarge { limit: self.limit })));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = ?e, "response body failed");
                Poll::Ready(Some(Err(ResponseBodyError::Worker)))
            }
            // wasi-http reports the body's sender being dropped with the
            // store as a normal end; a guest that trapped or ran out of time
            // mid-body must not produce what looks like a complete response.
            Poll::Ready(None) if self.guest.failed() => Poll::Ready(Some(Err(ResponseBodyError::Worker))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
