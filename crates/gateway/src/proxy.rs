//! The life of a request to a worker, top to bottom: admit (route, check the
//! declared body size, run the request filter), call (hand the request to
//! the worker's fresh instance), finish (account and log once the response
//! is out).

use std::sync::Arc;
use std::time::Instant;

use cordon_runtime::{Admit, Executor, Invocation, Outcome, Report};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use tokio::sync::watch;

use crate::error::{error_response, invoke_status};
use crate::http1::body::RequestBody;
use crate::http1::parse::{Framing, Rejection, RequestHead};
use crate::http1::write::Written;
use crate::http1::{Incoming, KeptAlive, OutBody, Outgoing, Service};
use crate::request_log::{LogRates, RequestLine, RequestLog};
use crate::router::{Router, Target};
use crate::{RequestFilter, RequestSummary};
use arc_swap::ArcSwap;

/// Gives each tenant its count of keep-alive connections.
type KeptAliveOf = dyn Fn(&str) -> Arc<KeptAlive> + Send + Sync;

pub(crate) struct Proxy {
    runtime: Arc<cordon_runtime::Runtime>,
    /// The routes of the registry snapshot seen last, rebuilt when a newer
    /// one is swapped in.
    router: ArcSwap<Router>,
    kept_alive: Box<KeptAliveOf>,
    filter: Option<Arc<dyn RequestFilter>>,
    log: RequestLog,
    /// Turns true when the shutdown grace period ends: `finish` stops
    /// waiting for guests that still run, which aborts them.
    grace_over: watch::Receiver<bool>,
}

/// What `finish` needs to know about a request.
pub(crate) struct Exchange {
    request_id: String,
    method: http::Method,
    host: String,
    path: String,
    received: Instant,
    worker: Option<Arc<dyn Executor<RequestBody>>>,
    /// The count of keep-alive connections of the worker's tenant.
    kept_alive: Option<Arc<KeptAlive>>,
    invocation: Option<Invocation>,
    /// The error code sent, when the gateway answered instead of the worker.
    error: Option<&'static str>,
}

impl Proxy {
    /// `kept_alive` gives each tenant its count of keep-alive connections.
    pub fn new(
        runtime: Arc<cordon_runtime::Runtime>,
        kept_alive: impl Fn(&str) -> Arc<KeptAlive> + Send + Sync + 'static,
        filter: Option<Arc<dyn RequestFilter>>,
        log_rates: LogRates,
        grace_over: watch::Receiver<bool>,
    ) -> Self {
        let router = ArcSwap::from_pointee(Router::new(&runtime.snapshot(), &kept_alive));
        Self { runtime, router, kept_alive: Box::new(kept_alive), filter, log: RequestLog::new(log_rates), grace_over }
    }

    /// The routes of the registry's current snapshot: one atomic load and a
    /// comparison, unless a change was swapped in since the last request.
    fn router(&self) -> Arc<Router> {
        let router = self.router.load_full();
        let snapshot = self.runtime.snapshot();
        if router.generation == snapshot.generation {
            return router;
        }
        let router = Arc::new(Router::new(&snapshot, &*self.kept_alive));
        // A slower request may store an older router after this one; the
        // next request rebuilds again, and each request routes by a
        // snapshot at least as new as the one current when it arrived.
        self.router.store(router.clone());
        router
    }

    fn exchange(head: &RequestHead, request_id: &str, received: Instant, target: Option<&Target>) -> Exchange {
        Exchange {
            request_id: request_id.to_string(),
            method: head.method.clone(),
            host: head.host.clone(),
            path: head.path().to_string(),
            received,
            worker: target.map(|t| t.worker.clone()),
            kept_alive: target.map(|t| t.kept_alive.clone()),
            invocation: None,
            error: None,
        }
    }

    /// A response of the gateway's own. One to a request routed to a worker
    /// counts against its tenant like the worker's would: a refusal must
    /// not be a way around the cap.
    fn refuse(mut exchange: Exchange, status: StatusCode, code: &'static str, message: &str, close: bool) -> Outgoing<Exchange> {
        exchange.error = Some(code);
        let kept_alive = exchange.kept_alive.clone();
        Outgoing { response: error_response(status, code, message, &exchange.request_id), close, pending: exchange, kept_alive }
    }
}

/// A request admitted to its worker, holding the instance slot that its
/// instance will hold until it is dropped, or its place in the tenant's
/// queue for one.
pub(crate) struct Admitted {
    target: Target,
    admit: Admit,
}

impl Service for Proxy {
    type Target = Admitted;
    type Pending = Exchange;

    fn admit(&self, head: &RequestHead, request_id: &str, received: Instant) -> Result<Admitted, Box<Outgoing<Exchange>>> {
        let router = self.router();
        let Some(routed) = router.find(&head.host, head.path()) else {
            let message = format!("no worker is routed at `{}{}`", head.host, head.path());
            return Err(Box::new(Self::refuse(
                Self::exchange(head, request_id, received, None),
                StatusCode::NOT_FOUND,
                "not_found",
                &message,
                false,
            )));
        };
        // One version for the whole request, whatever changes meanwhile.
        let (_, worker) = routed.deployed.pick(&head.headers);
        let target = &Target { worker: worker.clone(), kept_alive: routed.kept_alive.clone() };
        let worker = &target.worker;
        let exchange = || Self::exchange(head, request_id, received, Some(target));
        if routed.deployed.disabled {
            let message = format!("worker `{}` is disabled", routed.deployed.name);
            return Err(Box::new(Self::refuse(exchange(), StatusCode::SERVICE_UNAVAILABLE, "worker_disabled", &message, false)));
        }
        let max_body = worker.limits().max_request_body_bytes;
        if let Framing::Length(n) = head.framing
            && n > max_body
        {
            let message = format!("the request body of {n} bytes exceeds this worker's limit of {max_body} bytes");
            return Err(Box::new(Self::refuse(exchange(), StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", &message, true)));
        }
        if let Some(filter) = &self.filter {
            let summary = RequestSummary {
                method: &head.method,
                host: &head.host,
                path: head.path(),
                tenant: worker.tenant(),
                worker: worker.name(),
            };
            if let Err(r) = filter.check(&summary) {
                return Err(Box::new(Self::refuse(exchange(), r.status, r.code, &r.message, false)));
            }
        }
        // Last, so that a request refused above holds no slot even briefly;
        // decided before any instance exists.
        match worker.admit() {
            Ok(admit) => Ok(Admitted { target: target.clone(), admit }),
            Err(refusal) => {
                Err(Box::new(Self::refuse(exchange(), StatusCode::SERVICE_UNAVAILABLE, refusal.code(), &refusal.to_string(), false)))
            }
        }
    }

    async fn call(&self, admitted: Admitted, incoming: Incoming) -> Outgoing<Exchange> {
        let Admitted { target, admit } = admitted;
        let Incoming { head, body, request_id, received } = incoming;
        let mut exchange = Self::exchange(&head, &request_id, received, Some(&target));
        let worker = target.worker;
        let mut request = http::Request::new(body);
        *request.method_mut() = head.method;
        *request.uri_mut() = match head.target.parse() {
            Ok(uri) => uri,
            Err(_) => return Self::refuse(exchange, StatusCode::BAD_REQUEST, "bad_request", "invalid request target", true),
        };
        *request.headers_mut() = forwarded_headers(head.headers, &request_id);
        request.extensions_mut().insert(cordon_runtime::RequestId(request_id.clone()));

        // An error here: the request never reached an instance (it waited
        // in its tenant's queue past its wall-clock limit, or was refused).
        let mut invocation = match worker.invoke(admit, request).await {
            Ok(invocation) => invocation,
            Err(e) => {
                let (status, code) = invoke_status(&e);
                return Self::refuse(exchange, status, code, &e.to_string(), false);
            }
        };
        let response = std::mem::replace(&mut invocation.response, Err(cordon_runtime::InvokeError::NoResponse));
        let body_exceeded = invocation.request_body_exceeded();
        exchange.invocation = Some(invocation);
        if body_exceeded {
            let message = format!("the request body exceeds this worker's limit of {} bytes", worker.limits().max_request_body_bytes);
            return Self::refuse(exchange, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", &message, true);
        }
        match response {
            // An interim status cannot end an exchange: the client would wait
            // for the real response and misread the next one.
            Ok(response) if response.status().is_informational() => {
                let message =
                    format!("the worker answered with the interim status {}; a final response needs 200-599", response.status().as_u16());
                Self::refuse(exchange, StatusCode::INTERNAL_SERVER_ERROR, "invalid_response", &message, false)
            }
            Ok(response) => {
                let kept_alive = exchange.kept_alive.clone();
                Outgoing { response: response.map(OutBody::Worker), close: false, pending: exchange, kept_alive }
            }
            Err(e) => {
                let (status, code) = invoke_status(&e);
                let message = match &e {
                    cordon_runtime::InvokeError::Internal(_) => "internal error".to_string(),
                    other => other.to_string(),
                };
                Self::refuse(exchange, status, code, &message, false)
            }
        }
    }

    async fn finish(self: Arc<Self>, exchange: Exchange, written: Written) {
        let duration = exchange.received.elapsed();
        let mut cut_at_shutdown = false;
        let report = match exchange.invocation {
            Some(invocation) => {
                if !written.complete {
                    invocation.abort();
                }
                let mut grace_over = self.grace_over.clone();
                let grace_ends = async move {
                    // A dropped sender means no shutdown is coming.
                    if grace_over.wait_for(|over| *over).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                // Biased: a guest already done is joined without ever
                // registering on the signal.
                tokio::select! {
                    biased;
                    report = invocation.finish() => Some(report),
                    // Dropping the invocation aborts its guest.
                    () = grace_ends => {
                        cut_at_shutdown = true;
                        None
                    }
                }
            }
            None => None,
        };
        let outcome = match (&report, exchange.error) {
            (_, Some(code)) => code.to_string(),
            _ if cut_at_shutdown => "aborted_at_shutdown".to_string(),
            (Some(Report { outcome: Outcome::Failed(e), .. }), None) => invoke_status(e).1.to_string(),
            _ if written.error.is_some() => "response_incomplete".to_string(),
            _ => "ok".to_string(),
        };
        let (tenant, worker) = exchange.worker.as_ref().map_or(("-", "-"), |w| (w.tenant(), w.name()));
        // Formatting and writing happen on the log thread; this only queues.
        let line = RequestLine {
            request_id: exchange.request_id,
            tenant: tenant.to_string(),
            worker: worker.to_string(),
            method: exchange.method.to_string(),
            host: exchange.host,
            path: exchange.path,
            status: written.status.as_u16(),
            outcome,
            cpu_us: report.as_ref().map_or(0, |r| r.cpu_time.as_micros() as u64),
            thread_wait_us: report.as_ref().map_or(0, |r| r.thread_wait.as_micros() as u64),
            duration_us: duration.as_micros() as u64,
            bytes_out: written.body_bytes,
            subrequests: report.as_ref().map_or(0, |r| r.egress.subrequests),
            egress_bytes: report.as_ref().map_or(0, |r| r.egress.bytes_sent + r.egress.bytes_received),
            write_error: written.error.as_ref().map(|e| e.to_string()),
        };
        let none = cordon_runtime::CapturedText::default();
        let (stdout, stderr) = report.as_ref().map_or((&none, &none), |r| (&r.stdout, &r.stderr));
        self.log.submit(line, [("stdout", stdout), ("stderr", stderr)]);
    }

    fn panicked(&self, summary: &str, request_id: &str, message: &str) {
        tracing::error!(target: "cordon::request", request_id, request = summary, panic = message, status = 500, "request handler panicked; answered 500");
    }

    fn rejected(&self, rejection: &Rejection, request_id: &str, peer: std::net::SocketAddr) {
        tracing::info!(target: "cordon::request", request_id, peer = %peer, status = rejection.status.as_u16(), outcome = rejection.code, reason = %rejection.message, "request rejected");
    }
}

/// The request headers a worker sees: the client's, less hop-by-hop fields
/// (and those the `Connection` header names), with Cordon's `x-request-id`.
fn forwarded_headers(mut headers: HeaderMap, request_id: &str) -> HeaderMap {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "expect", "x-request-id"] {
        headers.remove(name);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    headers
}
