//! Sending one subrequest: check the target against the worker's grant,
//! resolve the name once, check every address, connect to a checked address
//! (TLS for `https`), send, and hand back a response whose body is counted
//! and bounded. Every refusal is a security event in the log and a counter.

use std::error::Error as StdError;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use crate::address::ForbiddenRange;
use crate::allowlist::{Allowlist, Scheme};
use crate::host::{TargetHost, parse_host};
use crate::network::{BoxFuture, LookupError, Network};

/// What one request of a worker may do outbound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressLimits {
    /// Outbound requests one request may start (denied attempts included).
    pub max_subrequests: u32,
    /// Time for one subrequest, from its start to the end of its response
    /// body: name lookup, connect, TLS, and the exchange itself.
    pub subrequest_timeout: Duration,
    /// Largest response body of one subrequest.
    pub max_response_bytes: u64,
    /// Body bytes sent and received over all subrequests of one request.
    pub max_total_bytes: u64,
}

/// Why a subrequest was refused or failed. The policy refusals
/// ([`EgressError::is_denial`]) are security events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("{target} is not in this worker's allowed_outbound")]
    NotAllowed { target: String },
    #[error("{target}: {why}")]
    InvalidTarget { target: String, why: String },
    #[error(
        "{target} resolves to {ip}, a {range} address; only an allowed_outbound entry naming that IP or a CIDR containing it can open it"
    )]
    ForbiddenAddress { target: String, ip: IpAddr, range: ForbiddenRange },
    #[error("subrequest limit reached: at most {limit} outbound requests per request (limits.max_subrequests)")]
    TooManySubrequests { limit: u32 },
    #[error("egress byte limit reached: at most {limit} body bytes sent and received per request (limits.max_egress_bytes)")]
    TotalBytesExceeded { limit: u64 },
    #[error("the response body is larger than {limit} bytes (limits.max_subrequest_response_bytes)")]
    ResponseTooLarge { limit: u64 },
    #[error("{phase} timed out (limits.subrequest_timeout_ms is {limit_ms} ms)")]
    Timeout { phase: Phase, limit_ms: u64 },
    #[error("no name server answered for {name} within {after_ms} ms (the resolver's lookup timeout)")]
    LookupTimeout { name: String, after_ms: u64 },
    #[error(
        "name lookup for {name} not started: {limit} lookups {scope} were already in flight until the subrequest's deadline (at most {limit} at once)"
    )]
    TooManyLookups { name: String, limit: u32, scope: &'static str },
    #[error(
        "outbound connection limit reached: this tenant already holds {limit} outbound connections open (server.max_outbound_connections_per_tenant, or its [[tenant]] max_outbound_connections); close finished responses or lower the concurrency of subrequests"
    )]
    TooManyConnections { limit: u32 },
    #[error("no address found for {name}")]
    NameNotFound { name: String },
    #[error("cannot resolve {name}: {message}")]
    Dns { name: String, message: String },
    #[error("connection to {addr} refused")]
    ConnectionRefused { addr: SocketAddr },
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
    #[error("TLS certificate of {host} not accepted: {message}")]
    TlsCertificate { host: String, message: String },
    #[error("TLS handshake with {host} failed: {message}")]
    Tls { host: String, message: String },
    #[error("HTTP exchange failed: {0}")]
    Protocol(String),
}

/// The part of a subrequest that ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Resolve,
    Connect,
    ResponseHead,
    ResponseBody,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Resolve => "name lookup",
            Phase::Connect => "connecting",
            Phase::ResponseHead => "waiting for the response",
            Phase::ResponseBody => "reading the response body",
        })
    }
}

impl EgressError {
    /// A refusal by policy (as opposed to a limit or a failure).
    pub fn is_denial(&self) -> bool {
        matches!(self, Self::NotAllowed { .. } | Self::InvalidTarget { .. } | Self::ForbiddenAddress { .. })
    }

    fn is_limit(&self) -> bool {
        matches!(
            self,
            Self::TooManySubrequests { .. }
                | Self::TotalBytesExceeded { .. }
                | Self::ResponseTooLarge { .. }
                | Self::LookupTimeout { .. }
                | Self::TooManyLookups { .. }
                | Self::TooManyConnections { .. }
                | Self::Timeout { phase: Phase::Resolve, .. }
        )
    }
}

/// A worker's grant and its counters since start.
pub struct WorkerEgress {
    tenant: String,
    worker: String,
    allowlist: Allowlist,
    limits: EgressLimits,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    subrequests: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    denied: AtomicU64,
    limited: AtomicU64,
}

/// A worker's outbound counters, for `/health` and metering.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EgressStats {
    /// Subrequests that passed every check and were sent.
    pub subrequests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Attempts refused by policy (security events).
    pub denied: u64,
    /// Attempts and bodies stopped by a limit.
    pub limited: u64,
}

impl WorkerEgress {
    pub fn new(tenant: &str, worker: &str, allowlist: Allowlist, limits: EgressLimits) -> WorkerEgress {
        WorkerEgress { tenant: tenant.to_string(), worker: worker.to_string(), allowlist, limits, stats: Stats::default() }
    }

    pub fn stats(&self) -> EgressStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = &self.stats;
        EgressStats {
            subrequests: get(&s.subrequests),
            bytes_sent: get(&s.bytes_sent),
            bytes_received: get(&s.bytes_received),
            denied: get(&s.denied),
            limited: get(&s.limited),
        }
    }
}

/// What one request has used outbound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EgressUsage {
    /// Outbound requests started, denied ones included.
    pub attempts: u64,
    /// Subrequests that passed every check and were sent.
    pub subrequests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Default)]
struct UsageCounters {
    attempts: AtomicU64,
    subrequests: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    limit_logged: AtomicBool,
}

/// Per-call timeouts a guest may ask for (`wasi:http` request options);
/// each can only shorten the worker's subrequest timeout.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeouts {
    pub connect: Option<Duration>,
    pub first_byte: Option<Duration>,
    pub between_bytes: Option<Duration>,
}

/// The outbound side of one request: built with the request, dropped with it.
#[derive(Clone)]
pub struct RequestEgress(Arc<Shared>);

struct Shared {
    network: Arc<Network>,
    worker: Arc<WorkerEgress>,
    request_id: String,
    usage: UsageCounters,
}

/// Drives the connection after the response head has arrived; the response
/// body makes progress only while it runs.
pub type ConnectionTask = BoxFuture<'static, Result<(), EgressError>>;

type SendResult = Result<(Response<ResponseBody>, ConnectionTask), EgressError>;

/// The origin a subrequest goes to, after parsing.
struct Target {
    scheme: Scheme,
    host: TargetHost,
    port: u16,
}

impl Target {
    fn host_text(&self) -> String {
        match &self.host {
            TargetHost::Name(n) => n.clone(),
            TargetHost::Ip(IpAddr::V4(ip)) => ip.to_string(),
            TargetHost::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
        }
    }

    /// The `Host` header: the checked host, with the port unless it is the
    /// scheme's default.
    fn authority(&self) -> String {
        if self.port == self.scheme.default_port() { self.host_text() } else { format!("{}:{}", self.host_text(), self.port) }
    }

    fn origin(&self) -> String {
        format!("{}://{}:{}", self.scheme, self.host_text(), self.port)
    }
}

/// The target of `uri` as it will be logged: the origin only, never the
/// path or query, which may carry credentials.
fn origin_of(uri: &Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("?");
    let authority = uri.authority().map(|a| a.as_str().rsplit('@').next().unwrap_or_default()).unwrap_or_default();
    format!("{scheme}://{authority}")
}

fn parse_target(method: &Method, uri: &Uri) -> Result<Target, EgressError> {
    let invalid = |why: &str| EgressError::InvalidTarget { target: origin_of(uri), why: why.to_string() };
    if method == Method::CONNECT {
        return Err(invalid("CONNECT tunnels are not allowed"));
    }
    let scheme = uri.scheme_str().and_then(Scheme::parse).ok_or_else(|| invalid("the scheme must be http or https"))?;
    let authority = uri.authority().ok_or_else(|| invalid("the request has no host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid("user info in the authority is not allowed; send credentials in a header"));
    }
    let port = match authority.port() {
        None => scheme.default_port(),
        Some(p) => p.as_u16(),
    };
    if port == 0 {
        return Err(invalid("port 0 is not a destination"));
    }
    let host = parse_host(authority.host()).map_err(|e| invalid(&e.to_string()))?;
    Ok(Target { scheme, host, port })
}

impl RequestEgress {
    pub fn new(network: Arc<Network>, worker: Arc<WorkerEgress>, request_id: &str) -> RequestEgress {
        RequestEgress(Arc::new(Shared { network, worker, request_id: request_id.to_string(), usage: UsageCounters::default() }))
    }

    pub fn usage(&self) -> EgressUsage {
        let u = &self.0.usage;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EgressUsage {
            attempts: get(&u.attempts),
            subrequests: get(&u.subrequests),
            bytes_sent: get(&u.bytes_sent),
            bytes_received: get(&u.bytes_received),
        }
    }

    /// Sends `request` if the worker's grant and limits allow it. The policy
    /// checks that need no I/O run before this returns; the rest run in the
    /// returned future.
    pub fn send<B>(&self, request: Request<B>, timeouts: Timeouts) -> BoxFuture<'static, SendResult>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let shared = self.0.clone();
        let checked = shared.admit(&request);
        Box::pin(async move {
            let target = checked?;
            let result = shared.clone().exchange(target, request, timeouts).await;
            if let Err(e) = &result {
                shared.note_failure(e);
            }
            result
        })
    }
}

impl Shared {
    /// The checks before any I/O: the attempt budget, the target's syntax
    /// and the allowlist.
    fn admit<B>(&self, request: &Request<B>) -> Result<Target, EgressError> {
        let limits = &self.worker.limits;
        let attempt = self.usage.attempts.fetch_add(1, Ordering::Relaxed);
        if attempt >= u64::from(limits.max_subrequests) {
            return Err(self.limited(EgressError::TooManySubrequests { limit: limits.max_subrequests }, &origin_of(request.uri())));
        }
        if self.bytes_used() >= limits.max_total_bytes {
            return Err(self.limited(EgressError::TotalBytesExceeded { limit: limits.max_total_bytes }, &origin_of(request.uri())));
        }
        let target = parse_target(request.method(), request.uri()).map_err(|e| self.denied(e, &origin_of(request.uri())))?;
        if self.worker.allowlist.find(target.scheme, &target.host, target.port).is_none() {
            return Err(self.denied(EgressError::NotAllowed { target: target.origin() }, &target.origin()));
        }
        Ok(target)
    }

    fn bytes_used(&self) -> u64 {
        self.usage.bytes_sent.load(Ordering::Relaxed) + self.usage.bytes_received.load(Ordering::Relaxed)
    }

    /// Logs a policy refusal as a security event and counts it.
    fn denied(&self, error: EgressError, target: &str) -> EgressError {
        self.worker.stats.denied.fetch_add(1, Ordering::Relaxed);
        self.network.count_denied();
        self.security_event("egress_denied", "outbound request denied", &error, target);
        error
    }

    /// Logs the first limit a request hits (later ones are only counted, so
    /// a guest cannot flood the log) and counts it.
    fn limited(&self, error: EgressError, target: &str) -> EgressError {
        self.worker.stats.limited.fetch_add(1, Ordering::Relaxed);
        if !self.usage.limit_logged.swap(true, Ordering::Relaxed) {
            self.security_event("egress_limit", "outbound request stopped by a limit", &error, target);
        }
        error
    }

    fn security_event(&self, event: &'static str, message: &'static str, error: &EgressError, target: &str) {
        tracing::warn!(
            target: "cordon::security",
            event,
            tenant = %self.worker.tenant,
            worker = %self.worker.worker,
            request_id = %self.request_id,
            destination = %target,
            reason = %error,
            "{message}"
        );
    }

    fn note_failure(&self, error: &EgressError) {
        if !error.is_denial() && !error.is_limit() {
            tracing::debug!(tenant = %self.worker.tenant, worker = %self.worker.worker, request_id = %self.request_id, error = %error, "subrequest failed");
        }
    }

    fn timeout(&self, phase: Phase) -> EgressError {
        EgressError::Timeout { phase, limit_ms: self.worker.limits.subrequest_timeout.as_millis() as u64 }
    }

    async fn exchange<B>(self: Arc<Self>, target: Target, request: Request<B>, timeouts: Timeouts) -> SendResult
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let limits = &self.worker.limits;
        let started = Instant::now();
        let deadline = started + limits.subrequest_timeout;
        let within = |d: Option<Duration>| d.map_or(deadline, |d| deadline.min(started + d));

        // Resolve once; these addresses, and only these, are checked and dialed.
        let addrs = match &target.host {
            TargetHost::Ip(ip) => vec![*ip],
            // A lookup that runs out of time, or cannot start because the
            // tenant's lookups are all in flight, is a limit: logged once
            // per request as a security event, and counted.
            TargetHost::Name(name) => match self.network.lookup(&self.worker.tenant, name, deadline).await {
                Err(LookupError::Busy { limit, per_tenant }) => {
                    let scope = if per_tenant { "of this tenant" } else { "of the whole process" };
                    return Err(self.limited(EgressError::TooManyLookups { name: name.clone(), limit, scope }, &target.origin()));
                }
                Err(LookupError::TimedOut { after }) => {
                    let error = EgressError::LookupTimeout { name: name.clone(), after_ms: after.as_millis() as u64 };
                    return Err(self.limited(error, &target.origin()));
                }
                Err(LookupError::Deadline) => return Err(self.limited(self.timeout(Phase::Resolve), &target.origin())),
                Err(LookupError::Failed(e)) => return Err(EgressError::Dns { name: name.clone(), message: e.to_string() }),
                Ok(addrs) if addrs.is_empty() => return Err(EgressError::NameNotFound { name: name.clone() }),
                Ok(addrs) => addrs,
            },
        };
        for ip in &addrs {
            if let Err(range) = self.worker.allowlist.check_address(target.scheme, target.port, *ip) {
                let error = EgressError::ForbiddenAddress { target: target.origin(), ip: *ip, range };
                return Err(self.denied(error, &target.origin()));
            }
        }
        // Held from before the socket exists until the connection task ends
        // (or the exchange fails): one slot per open outbound socket.
        let Some(connection_slot) = self.network.connections.try_acquire(&self.worker.tenant) else {
            let limit = self.network.outbound_connections_of(&self.worker.tenant);
            return Err(self.limited(EgressError::TooManyConnections { limit }, &target.origin()));
        };
        self.worker.stats.subrequests.fetch_add(1, Ordering::Relaxed);
        self.usage.subrequests.fetch_add(1, Ordering::Relaxed);

        let connect_by = within(timeouts.connect);
        let stream =
            tokio::time::timeout_at(connect_by, self.connect(&target, &addrs)).await.map_err(|_| self.timeout(Phase::Connect))??;

        let (mut sender, conn) = tokio::time::timeout_at(connect_by, hyper::client::conn::http1::handshake(TokioIo::new(stream)))
            .await
            .map_err(|_| self.timeout(Phase::Connect))?
            .map_err(|e| from_hyper(&e))?;

        let (mut parts, body) = request.into_parts();
        // Origin-form on the wire, and a `Host` that names the checked target.
        parts.uri = parts.uri.path_and_query().map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        parts.headers.remove(HOST);
        let host = HeaderValue::from_str(&target.authority()).map_err(|e| EgressError::Protocol(e.to_string()))?;
        parts.headers.insert(HOST, host);
        let body = RequestBody { inner: body, shared: self.clone() };
        let request = Request::from_parts(parts, body);

        let mut conn = Box::pin(conn);
        let head_by = within(timeouts.first_byte);
        let send = tokio::time::timeout_at(head_by, sender.send_request(request));
        tokio::pin!(send);
        let mut conn_done = false;
        let response = loop {
            tokio::select! {
                r = &mut send => break r.map_err(|_| self.timeout(Phase::ResponseHead))?.map_err(|e| from_hyper(&e))?,
                c = &mut conn, if !conn_done => {
                    c.map_err(|e| from_hyper(&e))?;
                    conn_done = true;
                }
            }
        };

        if let Some(declared) = response.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            && declared > limits.max_response_bytes
        {
            return Err(self.limited(EgressError::ResponseTooLarge { limit: limits.max_response_bytes }, &target.origin()));
        }

        let body_deadline = Box::pin(tokio::time::sleep_until(deadline));
        let idle = timeouts.between_bytes.map(|d| (d, Box::pin(tokio::time::sleep(d))));
        let origin = target.origin();
        let shared = self.clone();
        let response = response.map(|incoming| ResponseBody {
            inner: incoming,
            shared,
            origin,
            received: 0,
            deadline: body_deadline,
            idle,
            finished: false,
        });
        let this = self.clone();
        let task: ConnectionTask = if conn_done {
            Box::pin(async { Ok(()) })
        } else {
            Box::pin(async move {
                let _connection_slot = connection_slot;
                match tokio::time::timeout_at(deadline, conn).await {
                    Err(_) => Err(this.timeout(Phase::ResponseBody)),
                    Ok(r) => r.map_err(|e| from_hyper(&e)),
                }
            })
        };
        Ok((response, task))
    }

    /// Connects to the first of `addrs` that answers, then TLS for `https`.
    async fn connect(&self, target: &Target, addrs: &[IpAddr]) -> Result<Box<dyn Io>, EgressError> {
        let mut last = None;
        let mut stream = None;
        for ip in addrs {
            let addr = SocketAddr::new(*ip, target.port);
            match self.network.dialer.dial(addr).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => last = Some(EgressError::ConnectionRefused { addr }),
                Err(e) => last = Some(EgressError::Connect { addr, message: e.to_string() }),
            }
        }
        let Some(stream) = stream else {
            return Err(last.unwrap_or_else(|| EgressError::Protocol("no address to connect to".into())));
        };
        if target.scheme == Scheme::Http {
            return Ok(Box::new(stream));
        }
        let host = target.host_text();
        let server_name = match &target.host {
            TargetHost::Name(n) => {
                ServerName::try_from(n.clone()).map_err(|e| EgressError::Tls { host: host.clone(), message: e.to_string() })?
            }
            TargetHost::Ip(ip) => ServerName::IpAddress((*ip).into()),
        };
        match self.network.tls.connect(server_name, stream).await {
            Ok(tls) => Ok(Box::new(tls)),
            Err(e) => {
                let message = e.to_string();
                let certificate = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented));
                Err(if certificate { EgressError::TlsCertificate { host, message } } else { EgressError::Tls { host, message } })
            }
        }
    }
}

/// A byte stream to an origin, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Finds a limit error of ours inside a hyper error (a body error that
/// aborted the exchange), or describes the hyper error.
fn from_hyper(e: &hyper::Error) -> EgressError {
    let mut source = StdError::source(e);
    while let Some(s) = source {
        if let Some(ours) = s.downcast_ref::<EgressError>() {
            return ours.clone();
        }
        source = s.source();
    }
    EgressError::Protocol(e.to_string())
}

/// The guest's request body on its way out, counted against the request's
/// egress bytes.
struct RequestBody<B> {
    inner: B,
    shared: Arc<Shared>,
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let inner = Pin::new(&mut this.inner);
        let frame = ready!(inner.poll_frame(cx)).map(|r| r.map_err(Into::into));
        if let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
        {
            let shared = &this.shared;
            shared.usage.bytes_sent.fetch_add(data.len() as u64, Ordering::Relaxed);
            shared.worker.stats.bytes_sent.fetch_add(data.len() as u64, Ordering::Relaxed);
            let limit = shared.worker.limits.max_total_bytes;
            if shared.bytes_used() > limit {
                let e = shared.limited(EgressError::TotalBytesExceeded { limit }, "request body");
                return Poll::Ready(Some(Err(Box::new(e))));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An origin's response body as the guest reads it: bounded in size, in the
/// request's egress bytes and in time.
pub struct ResponseBody {
    inner: hyper::body::Incoming,
    shared: Arc<Shared>,
    origin: String,
    received: u64,
    deadline: Pin<Box<Sleep>>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    finished: bool,
}

impl ResponseBody {
    fn fail(&mut self, error: EgressError) -> Poll<Option<Result<Frame<Bytes>, EgressError>>> {
        self.finished = true;
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = EgressError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, EgressError>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.finished = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => this.fail(from_hyper(&e)),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.received += n;
                    this.shared.usage.bytes_received.fetch_add(n, Ordering::Relaxed);
                    this.shared.worker.stats.bytes_received.fetch_add(n, Ordering::Relaxed);
                    let limits = &this.shared.worker.limits;
                    if this.received > limits.max_response_bytes {
                        let e = this.shared.limited(EgressError::ResponseTooLarge { limit: limits.max_response_bytes }, &this.origin);
                        return this.fail(e);
                    }
                    if this.shared.bytes_used() > limits.max_total_bytes {
                        let e = this.shared.limited(EgressError::TotalBytesExceeded { limit: limits.max_total_bytes }, &this.origin);
                        return this.fail(e);
                    }
                }
                if let Some((every, sleep)) = &mut this.idle {
                    sleep.as_mut().reset(Instant::now() + *every);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                let idle_over = this.idle.as_mut().is_some_and(|(_, s)| s.as_mut().poll(cx).is_ready());
                if this.deadline.as_mut().poll(cx).is_ready() || idle_over {
                    let e = this.shared.timeout(Phase::ResponseBody);
                    return this.fail(e);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(method: Method, uri: &str) -> Result<Target, EgressError> {
        parse_target(&method, &uri.parse().unwrap())
    }

    #[test]
    fn the_host_header_names_the_checked_target() {
        let t = target(Method::GET, "https://API.example.com/x?y").unwrap();
        assert_eq!((t.authority(), t.origin()), ("api.example.com".into(), "https://api.example.com:443".into()));
        let t = target(Method::GET, "http://127.0.0.1:9000/").unwrap();
        assert_eq!(t.authority(), "127.0.0.1:9000");
        let t = target(Method::GET, "http://[::1]:80/").unwrap();
        assert_eq!((t.authority(), t.origin()), ("[::1]".into(), "http://[::1]:80".into()));
    }

    #[test]
    fn targets_that_hide_their_destination_are_refused() {
        for (method, uri, why) in [
            (Method::CONNECT, "http://api.example.com:443", "CONNECT"),
            (Method::GET, "http://user:pw@api.example.com/", "user info"),
            (Method::GET, "http://api.example.com:0/", "port 0"),
            (Method::GET, "http://2130706433/", "integer"),
            (Method::GET, "http://0x7f.1/", "integer"),
            (Method::GET, "/relative", "scheme"),
        ] {
            let e = target(method, uri).err().unwrap_or_else(|| panic!("{uri} was accepted"));
            assert!(e.is_denial() && e.to_string().contains(why), "{uri}: {e}");
        }
    }

    #[test]
    fn logged_targets_never_carry_paths_or_credentials() {
        let uri: Uri = "https://user:secret@api.example.com/token?key=abc".parse().unwrap();
        assert_eq!(origin_of(&uri), "https://api.example.com");
    }
}

#[cfg(test)]
mod connection_slot_tests {
    use std::convert::Infallible;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    struct NoBody;

    impl Body for NoBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(None)
        }
    }

    /// An origin on loopback that answers `/fast` at once and never answers
    /// anything else, holding the connection open; it counts those on `held`.
    async fn origin() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (held, held_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let held = held.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    if head.starts_with(b"GET /fast ") {
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
                    } else {
                        // Hang until the client goes away.
                        let _ = held.send(());
                        let _ = stream.read(&mut buf).await;
                    }
                });
            }
        });
        (addr, held_rx)
    }

    fn egress(network: &Arc<Network>, tenant: &str, origin: SocketAddr) -> RequestEgress {
        let allowlist = Allowlist::new(&[format!("http://{origin}")], false).unwrap();
        let limits = EgressLimits {
            max_subrequests: 50,
            subrequest_timeout: Duration::from_secs(30),
            max_response_bytes: 1 << 20,
            max_total_bytes: 1 << 20,
        };
        RequestEgress::new(network.clone(), Arc::new(WorkerEgress::new(tenant, "w", allowlist, limits)), "req")
    }

    fn get(origin: SocketAddr, path: &str) -> Request<NoBody> {
        Request::get(format!("http://{origin}{path}")).body(NoBody).unwrap()
    }

    /// Sends `/fast` and reads its response to the end, driving the
    /// connection until it closes.
    async fn fetch_fast(egress: &RequestEgress, origin: SocketAddr) -> Result<(), EgressError> {
        let (response, connection) = egress.send(get(origin, "/fast"), Timeouts::default()).await?;
        let driver = tokio::spawn(connection);
        let mut body = response.into_body();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            frame?;
        }
        driver.await.unwrap()
    }

    #[tokio::test]
    async fn a_tenant_holding_its_outbound_connections_does_not_stop_another() {
        let (origin, mut held) = origin().await;
        let network = Arc::new(Network::builder().outbound_connections_per_tenant(3).build().unwrap());
        let attacker = egress(&network, "attacker", origin);
        // Three subrequests hang on the slow origin, each holding a socket.
        let hanging: Vec<_> = (0..3).map(|_| tokio::spawn(attacker.send(get(origin, "/slow"), Timeouts::default()))).collect();
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(5), held.recv()).await.expect("the slow subrequests reach the origin");
        }
        // A fourth, from another request of the same tenant, is refused at once.
        let refused = tokio::time::timeout(Duration::from_secs(1), fetch_fast(&egress(&network, "attacker", origin), origin))
            .await
            .expect("refused without waiting")
            .unwrap_err();
        assert_eq!(refused, EgressError::TooManyConnections { limit: 3 });
        assert!(refused.to_string().contains("server.max_outbound_connections_per_tenant"), "{refused}");
        assert!(refused.is_limit());
        // Another tenant is not refused, again and again.
        let victim = egress(&network, "victim", origin);
        for _ in 0..10 {
            tokio::time::timeout(Duration::from_secs(2), fetch_fast(&victim, origin)).await.expect("the victim waited").unwrap();
        }
        // The slots come back when the connections close.
        for task in &hanging {
            task.abort();
        }
        for task in hanging {
            let _ = task.await;
        }
        for _ in 0..5 {
            fetch_fast(&attacker, origin).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_tenants_own_outbound_connection_limit_applies_to_that_tenant_only() {
        let (origin, mut held) = origin().await;
        let network =
            Arc::new(Network::builder().outbound_connections_per_tenant(2).outbound_connections_of_tenant("big", 5).build().unwrap());
        assert_eq!((network.outbound_connections_of("big"), network.outbound_connections_of("small")), (5, 2));
        // The tenant with its own limit holds five hanging subrequests; a sixth is refused.
        let big = egress(&network, "big", origin);
        let hanging: Vec<_> = (0..5).map(|_| tokio::spawn(big.send(get(origin, "/slow"), Timeouts::default()))).collect();
        for _ in 0..5 {
            tokio::time::timeout(Duration::from_secs(5), held.recv()).await.expect("the slow subrequests reach the origin");
        }
        let refused =
            tokio::time::timeout(Duration::from_secs(1), fetch_fast(&big, origin)).await.expect("refused without waiting").unwrap_err();
        assert_eq!(refused, EgressError::TooManyConnections { limit: 5 });
        // Another tenant has the default of two, not five.
        let small = egress(&network, "small", origin);
        let small_hanging: Vec<_> = (0..2).map(|_| tokio::spawn(small.send(get(origin, "/slow"), Timeouts::default()))).collect();
        for _ in 0..2 {
            tokio::time::timeout(Duration::from_secs(5), held.recv()).await.expect("the slow subrequests reach the origin");
        }
        let refused =
            tokio::time::timeout(Duration::from_secs(1), fetch_fast(&small, origin)).await.expect("refused without waiting").unwrap_err();
        assert_eq!(refused, EgressError::TooManyConnections { limit: 2 });
        for task in hanging.iter().chain(&small_hanging) {
            task.abort();
        }
    }
}
