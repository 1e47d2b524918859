//! The HTTP front door. It accepts connections, parses and validates each
//! request strictly (its own HTTP/1.1 layer, so that every refusal is a JSON
//! error with a request id and no ambiguous framing reaches a worker),
//! routes by host and path prefix, runs the worker through the runtime, and
//! logs one line per request. A second listener serves the admin endpoint.
//!
//! Invariants: a request is answered only by the worker its host and path
//! route to; every response carries `x-request-id`; a panic while serving a
//! request answers that request 500 and affects no other.

mod admin;
mod error;
mod http1;
mod panic;
mod proxy;
mod request_log;
mod router;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cordon_config::Config;
use cordon_runtime::Runtime;
use http::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use http1::{ConnLimits, ConnSlots, KeptAlive, Service, TaskTracker, serve_connection};

/// Connections the admin listener serves at once.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// After the grace period, how long the requests that were cut off get to
/// hand their log lines to the request log. Their guests are aborted when
/// the grace period ends, so this is only the time to queue a line.
const LOGGING_AFTER_GRACE: Duration = Duration::from_millis(200);

/// A request as a [`RequestFilter`] sees it, after routing.
pub struct RequestSummary<'a> {
    pub method: &'a http::Method,
    pub host: &'a str,
    pub path: &'a str,
    pub tenant: &'a str,
    pub worker: &'a str,
}

/// Why a filter refused a request.
pub struct FilterRejection {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// A check that runs after routing and before the worker: the place for
/// admission rules such as rate limits.
pub trait RequestFilter: Send + Sync + 'static {
    fn check(&self, request: &RequestSummary<'_>) -> Result<(), FilterRejection>;
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Bound listeners, ready to serve.
pub struct Gateway {
    listener: TcpListener,
    admin_listener: TcpListener,
    runtime: Arc<Runtime>,
    limits: ConnLimits,
    max_connections: usize,
    max_connections_per_address: usize,
    shutdown_grace: Duration,
    log_rates: request_log::LogRates,
    /// Each `[[tenant]]`'s cap on the keep-alive connections its responses
    /// hold, and the default for any other tenant.
    max_idle_connections: (std::collections::HashMap<String, usize>, usize),
    filter: Option<Arc<dyn RequestFilter>>,
    gateway_report: serde_json::Value,
}

impl Gateway {
    /// Binds `server.listen` and `server.admin_listen`.
    pub async fn bind(config: &Config, runtime: Arc<Runtime>) -> Result<Gateway, GatewayError> {
        let s = &config.server;
        let bind = |addr: SocketAddr| async move { TcpListener::bind(addr).await.map_err(|source| GatewayError::Bind { addr, source }) };
        let listener = bind(s.listen).await?;
        let admin_listener = bind(s.admin_listen).await?;
        let limits = ConnLimits {
            max_header_bytes: s.max_header_bytes,
            header_read_timeout: Duration::from_millis(s.header_read_timeout_ms),
            keep_alive_timeout: Duration::from_millis(s.keep_alive_timeout_ms),
            slots: Arc::new(ConnSlots::new(s.max_connections)),
        };
        let gateway_report = serde_json::json!({
            "max_header_bytes": s.max_header_bytes,
            "header_read_timeout_ms": s.header_read_timeout_ms,
            "keep_alive_timeout_ms": s.keep_alive_timeout_ms,
            "max_connections": s.max_connections,
            "max_connections_per_address": s.max_connections_per_address,
            "max_idle_connections_per_tenant": s.max_idle_connections_per_tenant,
            "shutdown_grace_ms": s.shutdown_grace_ms,
        });
        let max_idle_connections = (
            config.tenants.iter().map(|t| (t.name.clone(), config.tenant_max_idle_connections(&t.name))).collect(),
            s.max_idle_connections_per_tenant,
        );
        let log_rates = request_log::LogRates {
            default: s.worker_log_bytes_per_second,
            tenants: config.tenants.iter().map(|t| (t.name.clone(), config.tenant_worker_log_bytes_per_second(&t.name))).collect(),
        };
        Ok(Gateway {
            listener,
            admin_listener,
            runtime,
            limits,
            max_connections: s.max_connections,
            max_connections_per_address: s.max_connections_per_address,
            shutdown_grace: Duration::from_millis(s.shutdown_grace_ms),
            log_rates,
            max_idle_connections,
            filter: None,
            gateway_report,
        })
    }

    /// Installs a filter that every routed request passes before its worker runs.
    pub fn with_request_filter(mut self, filter: Arc<dyn RequestFilter>) -> Self {
        self.filter = Some(filter);
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves; then stops accepting, lets requests
    /// in flight finish within the grace period, and returns at most
    /// [`LOGGING_AFTER_GRACE`] after the grace period: every connection and
    /// every guest still running then is aborted, which drops the storage
    /// calls they queued and interrupts the ones running.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let (tx, rx) = watch::channel(false);
        let (grace_over_tx, grace_over) = watch::channel(false);
        // One count per tenant, shared by its workers' routes.
        // One count per tenant, made the first time a route of the tenant is
        // built and kept while the gateway runs.
        let kept_alive: std::sync::Mutex<std::collections::HashMap<String, Arc<KeptAlive>>> = Default::default();
        let (max_idle, default_max_idle) = self.max_idle_connections.clone();
        let kept_alive_of = move |tenant: &str| {
            let mut counts = kept_alive.lock().unwrap_or_else(|p| p.into_inner());
            let max = max_idle.get(tenant).copied().unwrap_or(default_max_idle);
            counts.entry(tenant.to_string()).or_insert_with(|| Arc::new(KeptAlive::new(max))).clone()
        };
        let proxy =
            Arc::new(proxy::Proxy::new(self.runtime.clone(), kept_alive_of, self.filter.clone(), self.log_rates.clone(), grace_over));
        let admin = Arc::new(admin::Admin::new(self.runtime.clone(), self.gateway_report.clone()));
        let grace = self.shutdown_grace;
        let main_slots = (self.max_connections, self.max_connections_per_address);
        let main = tokio::spawn(accept_loop(self.listener, proxy, self.limits.clone(), rx.clone(), main_slots, grace));
        let admin_slots = (ADMIN_MAX_CONNECTIONS, ADMIN_MAX_CONNECTIONS);
        let admin = tokio::spawn(accept_loop(self.admin_listener, admin, self.limits, rx, admin_slots, grace));
        shutdown.await;
        let _ = tx.send(true);
        tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down: no new connections; requests in flight may finish");
        // Guests still running after their response (they may until their
        // wall_ms) are aborted with the connections when the grace ends.
        let grace_ends = tokio::time::Instant::now() + grace;
        let abort_guests = tokio::spawn(async move {
            tokio::time::sleep_until(grace_ends).await;
            let _ = grace_over_tx.send(true);
        });
        let _ = main.await;
        let _ = admin.await;
        abort_guests.abort();
        tracing::info!("shut down");
    }
}

async fn accept_loop<S: Service>(
    listener: TcpListener,
    service: Arc<S>,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
    (max_connections, max_per_address): (usize, usize),
    grace: Duration,
) {
    let mut limits = limits;
    limits.slots = Arc::new(ConnSlots::new(max_connections));
    let slots = limits.slots.clone();
    let addresses = Arc::new(AddressCounts::default());
    let mut connections = JoinSet::new();
    let finishing = TaskTracker::default();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            slot = slots.semaphore.clone().acquire_owned() => {
                let Ok(slot) = slot else { break };
                tokio::select! {
                    _ = shutdown.changed() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => {
                            let Some(address) = addresses.clone().enter(peer.ip(), max_per_address) else {
                                refuse_over_address_cap(&stream, max_per_address);
                                continue;
                            };
                            // The slots are running low: idle keep-alive
                            // connections make room for this one and the next.
                            slots.close_idle();
                            let (service, limits, shutdown, finishing) = (service.clone(), limits.clone(), shutdown.clone(), finishing.clone());
                            connections.spawn(async move {
                                serve_connection(stream, service, limits, shutdown, finishing).await;
                                drop((slot, address));
                            });
                        }
                        Err(e) => {
                            // Out of file descriptors, most likely: back off
                            // rather than spin.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
        }
    }
    // Connections the kernel completed before shutdown are still in the
    // backlog: take them, so that one whose request has already arrived is
    // answered rather than reset. Idle ones close at once.
    while let Some(stream) = accept_now(&listener) {
        let (service, limits, shutdown, finishing) = (service.clone(), limits.clone(), shutdown.clone(), finishing.clone());
        connections.spawn(serve_connection(stream, service, limits, shutdown, finishing));
    }
    drop(listener);
    let deadline = tokio::time::Instant::now() + grace;
    let drained = tokio::time::timeout_at(deadline, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(open = connections.len(), "grace period over; closing the remaining connections");
        connections.abort_all();
    }
    // The last requests' log lines and statistics: their guests may run
    // until the grace period ends, and are aborted then.
    if tokio::time::timeout_at(deadline + LOGGING_AFTER_GRACE, finishing.idle()).await.is_err() {
        tracing::warn!("grace period over before every request was logged");
    }
}

/// Connections open now, by client address.
#[derive(Default)]
struct AddressCounts(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl AddressCounts {
    /// Counts a connection from `ip`, or `None` if `ip` already has `max`.
    fn enter(self: Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<AddressGuard> {
        let mut counts = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        drop(counts);
        Some(AddressGuard { counts: self, ip })
    }
}

struct AddressGuard {
    counts: Arc<AddressCounts>,
    ip: std::net::IpAddr,
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Answers a connection over its address's cap with a 503 if the socket
/// takes it at once, and closes it: it never waits, and holds no slot.
fn refuse_over_address_cap(stream: &tokio::net::TcpStream, max: usize) {
    let request_id = http1::new_request_id();
    let body = serde_json::json!({"error": {
        "code": "too_many_connections",
        "message": format!("this client address already has {max} open connections (server.max_connections_per_address); reuse one or close some"),
        "request_id": request_id,
    }})
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncache-control: no-store\r\nx-request-id: {request_id}\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(response.as_bytes());
    tracing::debug!(peer = ?stream.peer_addr().ok(), max, "connection over the per-address cap closed");
}

/// A connection already waiting in the backlog, without waiting for one.
fn accept_now(listener: &TcpListener) -> Option<tokio::net::TcpStream> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match listener.poll_accept(&mut cx) {
        std::task::Poll::Ready(Ok((stream, _))) => Some(stream),
        _ => None,
    }
}
