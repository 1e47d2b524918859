//! Outbound HTTP (`wasi:http/outgoing-handler`). Linked so that standard
//! `wasi:http/proxy` components load, but every request is denied with
//! `HTTP-request-denied`: no worker reaches the network.

use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// The hooks of a worker with no egress grant.
#[derive(Default)]
pub(crate) struct DenyAllOutbound;

type ResponseIo = Box<dyn Future<Output = Result<(), Error>> + Send>;

impl WasiHttpHooks for DenyAllOutbound {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Result<(http::Response<WasiBody>, ResponseIo), Error>> + Send> {
        tracing::warn!(target: "cordon::security", event = "egress_denied", uri = %request.uri(), reason = "no outbound access is granted");
        Box::new(async { Err(Error::HttpRequestDenied) })
    }
}
