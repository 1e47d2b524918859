//! The admin listener: `GET /health`, the sandbox posture and the state of
//! every worker. Bound to loopback by default; it discloses configuration
//! and must not face the internet.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use cordon_runtime::Runtime;
use http::{HeaderValue, Method, StatusCode, header};

use crate::error::error_response;
use crate::http1::parse::{Rejection, RequestHead};
use crate::http1::write::Written;
use crate::http1::{Incoming, OutBody, Outgoing, Service};

pub(crate) struct Admin {
    runtime: Arc<Runtime>,
    gateway: serde_json::Value,
}

impl Admin {
    pub fn new(runtime: Arc<Runtime>, gateway: serde_json::Value) -> Self {
        Self { runtime, gateway }
    }

    fn health(&self) -> serde_json::Value {
        // One entry per version served: a split lists each of its versions.
        let snapshot = self.runtime.snapshot();
        let workers: Vec<_> = snapshot
            .workers()
            .flat_map(|d| d.versions().map(move |(version, w)| (d, version, w)))
            .map(|(d, version, w)| {
                let (instances, _) = w.instances();
                serde_json::json!({
                    "name": w.name,
                    "tenant": w.tenant,
                    "version": version,
                    "deployment": d.deployment.to_string(),
                    "disabled": d.disabled,
                    "routes": w.routes.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "component_sha256": w.component_sha256,
                    "code": w.code_source,
                    "limits": w.limits,
                    "grants": w.grants,
                    "stats": w.stats(),
                    // In flight against this worker's own quota, and requests it refused.
                    "instances": instances,
                })
            })
            .collect();
        serde_json::json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "sandbox": self.runtime.posture(),
            "gateway": self.gateway,
            "security": { "egress_denied": self.runtime.egress_denied_total() },
            // Per tenant and database: pool, clients, queries and cache counters, for metrics
            // and metering.
            "postgres": self.runtime.accelerator().map(|a| a.stats()).unwrap_or_default(),
            // Per tenant: instances in flight (admitted, until their store is dropped), the
            // quota, requests waiting for a slot and its limit, and requests refused with
            // tenant_overloaded.
            "tenants": self.runtime.admission().snapshot(),
            // Per tenant: its weight, the guest CPU it used, and its guests running or
            // waiting for one of the guest threads.
            "cpu": {
                "guest_threads": self.runtime.guest_threads(),
                "tenants": self.runtime.cpu_shares(),
            },
            // The bytes all instances hold (linear memory, tables, stacks and host-side
            // buffers) against the process's budget, and each tenant's against its own.
            "memory": {
                "process": self.runtime.admission().memory().process.snapshot(),
                "tenants": self.runtime.admission().memory_snapshot(),
            },
            "workers": workers,
        })
    }
}

impl Service for Admin {
    type Target = ();
    type Pending = ();

    fn admit(&self, _: &RequestHead, _: &str, _: Instant) -> Result<(), Box<Outgoing<()>>> {
        Ok(())
    }

    async fn call(&self, _: (), incoming: Incoming) -> Outgoing<()> {
        let id = &incoming.request_id;
        let response = match (incoming.head.method.clone(), incoming.head.path()) {
            (Method::GET | Method::HEAD, "/health") => {
                let mut bytes = serde_json::to_vec_pretty(&self.health()).unwrap_or_default();
                bytes.push(b'\n');
                let mut r = http::Response::new(OutBody::Full(Some(Bytes::from(bytes))));
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            }
            (_, "/health") => error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET", id),
            (_, path) => error_response(StatusCode::NOT_FOUND, "not_found", &format!("no admin endpoint at `{path}`; try GET /health"), id),
        };
        Outgoing { response, close: false, pending: (), kept_alive: None }
    }

    async fn finish(self: Arc<Self>, _: (), written: Written) {
        tracing::debug!(target: "cordon::admin", status = written.status.as_u16(), "admin request");
    }

    fn panicked(&self, summary: &str, request_id: &str, message: &str) {
        tracing::error!(target: "cordon::admin", request_id, request = summary, panic = message, "admin handler panicked");
    }

    fn rejected(&self, rejection: &Rejection, request_id: &str, peer: std::net::SocketAddr) {
        tracing::debug!(target: "cordon::admin", request_id, peer = %peer, status = rejection.status.as_u16(), reason = %rejection.message, "admin request rejected");
    }
}
