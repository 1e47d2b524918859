//! Outbound HTTP (`wasi:http/outgoing-handler`), which is what `fetch`
//! becomes in every guest language. Each request's subrequests go through
//! its [`RequestEgress`], which enforces the worker's `allowed_outbound` and
//! outbound limits; this module only translates between `wasi:http` and
//! `cordon-egress`, including the error code the guest sees.

use cordon_egress::{EgressError, Phase, RequestEgress, Timeouts};
use http_body_util::BodyExt;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// Bytes a guest may hand to an outgoing body (its response's, or a
/// subrequest's) in one write.
pub(crate) const BODY_CHUNK_BYTES: usize = 64 * 1024;
/// Writes an outgoing body buffers before the guest must wait for the
/// reader.
const BODY_BUFFER_CHUNKS: usize = 1;
/// What one outgoing body can hold in host memory: the chunks its channel
/// buffers (one more than [`BODY_BUFFER_CHUNKS`]) and the one its reader
/// has taken.
pub(crate) const BODY_BUFFER_BYTES: u64 = ((BODY_BUFFER_CHUNKS + 2) * BODY_CHUNK_BYTES) as u64;

/// The `wasi:http` hooks of one request. (Each outgoing body's buffer is
/// charged to the request where the body is made, in `host_buffers`.)
pub(crate) struct Outbound(pub(crate) RequestEgress);

type ResponseIo = Box<dyn Future<Output = Result<(), Error>> + Send>;

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Result<(http::Response<WasiBody>, ResponseIo), Error>> + Send> {
        let timeouts = Timeouts {
            connect: options.and_then(|o| o.connect_timeout),
            first_byte: options.and_then(|o| o.first_byte_timeout),
            between_bytes: options.and_then(|o| o.between_bytes_timeout),
        };
        let sent = self.0.send(request, timeouts);
        Box::new(async move {
            let (response, connection) = sent.await.map_err(error_code)?;
            // A body error reaches a p2 guest only as the text of its stream
            // error (`http-error-code` does not recover a code there), so it
            // carries the message, which names the limit.
            let response = response.map(|body| body.map_err(|e| Error::InternalError(Some(e.to_string()))).boxed_unsync());
            let io: ResponseIo = Box::new(async move { connection.await.map_err(error_code) });
            Ok((response, io))
        })
    }

    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        BODY_BUFFER_CHUNKS
    }

    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        BODY_CHUNK_BYTES
    }
}

/// The `wasi:http` error code for each way a subrequest can fail. Limits
/// without a code of their own carry their message, which names the limit.
fn error_code(e: EgressError) -> Error {
    match e {
        EgressError::NotAllowed { .. } | EgressError::InvalidTarget { .. } => Error::HttpRequestDenied,
        EgressError::ForbiddenAddress { .. } => Error::DestinationIpProhibited,
        EgressError::ResponseTooLarge { limit } => Error::HttpResponseBodySize(Some(limit)),
        EgressError::TooManyConnections { .. } => Error::ConnectionLimitReached,
        EgressError::TooManySubrequests { .. } | EgressError::TotalBytesExceeded { .. } | EgressError::TooManyLookups { .. } => {
            Error::InternalError(Some(e.to_string()))
        }
        EgressError::Timeout { phase: Phase::Resolve, .. } | EgressError::LookupTimeout { .. } => Error::DnsTimeout,
        EgressError::Timeout { phase: Phase::Connect, .. } => Error::ConnectionTimeout,
        EgressError::Timeout { phase: Phase::ResponseHead | Phase::ResponseBody, .. } => Error::HttpResponseTimeout,
        EgressError::NameNotFound { .. } => Error::DnsError { rcode: Some("NXDOMAIN".into()), info_code: None },
        EgressError::Dns { .. } => Error::DnsError { rcode: None, info_code: None },
        EgressError::ConnectionRefused { .. } => Error::ConnectionRefused,
        EgressError::Connect { .. } => Error::DestinationUnavailable,
        EgressError::TlsCertificate { .. } => Error::TlsCertificateError,
        EgressError::Tls { .. } => Error::TlsProtocolError,
        EgressError::Protocol(message) => Error::InternalError(Some(message)),
    }
}
