//! The seam between the gateway and what runs workers' requests.
//!
//! The gateway knows a worker only as an [`Executor`]: its name, tenant,
//! routes and limits; [`Executor::admit`], decided before the request's body
//! is read; then [`Executor::invoke`], whose [`Invocation`] gives the
//! response head and its body stream (or why there is none) and, from
//! [`Invocation::finish`], the [`Report`] that the request log uses. Nothing
//! here says where a guest runs. The one implementation today is
//! [`Worker`](crate::Worker), which runs guests in this process on the guest
//! threads; worker processes under a supervisor would be another, behind
//! the same trait.
//!
//! What the seam costs a request: one boxed future for `invoke` and one
//! boxed [`Run`]. The body streams through it without another task or an
//! allocation per chunk, and the gateway's body type is a type parameter,
//! not a boxed stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use cordon_config::{Limits, Route};
use cordon_egress::EgressUsage;

use crate::admission::{Admit, Refusal};
use crate::body::ResponseBody;
use crate::stdio::CapturedText;

/// What runs one worker's requests, whose bodies are `B`. Admission and its
/// refusals happen here, before the body is read; so do the limits of the
/// request's instance, whatever runs it.
pub trait Executor<B>: Send + Sync + 'static {
    /// The worker's name, as configured.
    fn name(&self) -> &str;

    /// The tenant the worker belongs to.
    fn tenant(&self) -> &str;

    /// The hosts and path prefixes the worker is reached at.
    fn routes(&self) -> &[Route];

    /// The worker's limits (body sizes, CPU and wall-clock time, memory).
    fn limits(&self) -> &Limits;

    /// Whether the worker may take one more request, decided before its body
    /// is read and before any instance exists: an instance slot of the
    /// worker's tenant and of the worker now, a place in the tenant's queue
    /// for one, or a [`Refusal`]. Cheap and synchronous: the connection asks
    /// before it answers `100 Continue`. What it takes is given back when
    /// the [`Admit`], or the instance made with it, is dropped.
    fn admit(&self) -> Result<Admit, Refusal>;

    /// Runs an admitted request: waits for its place in the queue to come up
    /// (within its wall-clock limit, counted from its admission), then hands
    /// it to a fresh instance, reading its body as the guest does. Resolves
    /// once the guest has produced a response head or failed. `Err` when
    /// the request never reached an instance (it waited in the queue for
    /// its whole wall-clock limit, or was refused from it): nothing ran,
    /// nothing is reported or counted.
    fn invoke(&self, admitted: Admit, request: http::Request<B>) -> InvokeFuture<'_>;
}

/// What [`Executor::invoke`] returns.
pub type InvokeFuture<'a> = Pin<Box<dyn Future<Output = Result<Invocation, InvokeError>> + Send + 'a>>;

/// A request handed to its worker: the response, then the report.
pub struct Invocation {
    /// The response head and a streaming body, or why there is none.
    pub response: Result<http::Response<ResponseBody>, InvokeError>,
    request_body_exceeded: bool,
    run: Box<dyn Run>,
}

/// What an executor keeps of a request it has handed to a worker, for
/// [`Invocation`]. Dropping it stops the guest.
pub trait Run: Send {
    /// Stops the guest: the client is gone, nobody reads what it produces.
    /// Its report still comes from [`Run::poll_finish`].
    fn abort(&self);

    /// Ready with the request's report once its guest has ended (bounded by
    /// its wall-clock limit), after counting it in the worker's statistics.
    /// Polled until it is ready, and never after.
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Report>;
}

impl Invocation {
    /// `request_body_exceeded`: whether the guest had read past
    /// `max_request_body_bytes` when its response head came.
    pub fn new(response: Result<http::Response<ResponseBody>, InvokeError>, request_body_exceeded: bool, run: Box<dyn Run>) -> Self {
        Self { response, request_body_exceeded, run }
    }

    /// Whether the guest had read past `max_request_body_bytes` when its
    /// response head came: the gateway answers 413 instead.
    pub fn request_body_exceeded(&self) -> bool {
        self.request_body_exceeded
    }

    /// Stops the guest: the client is gone, nobody reads what it produces.
    pub fn abort(&self) {
        self.run.abort();
    }

    /// Waits for the guest to end (bounded by its wall-clock limit), and
    /// returns what the request cost, already counted in the worker's
    /// statistics. Dropping the invocation instead stops the guest.
    pub async fn finish(mut self) -> Report {
        std::future::poll_fn(|cx| self.run.poll_finish(cx)).await
    }
}

/// The gateway's id for a request, carried in the request's extensions so
/// that the worker's security events and logs name it.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Why a request produced no response from the worker. Each maps to one
/// HTTP status at the gateway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvokeError {
    #[error("the worker used more than its CPU-time limit of {limit_ms} ms")]
    CpuLimitExceeded { limit_ms: u64 },
    #[error("the worker did not finish within its wall-clock limit of {limit_ms} ms")]
    WallTimeExceeded { limit_ms: u64 },
    /// The request waited in its tenant's queue for an instance slot until
    /// its wall-clock limit ran out; no instance was created.
    #[error("the request waited for an instance of its tenant for its whole wall-clock limit of {limit_ms} ms; the tenant is overloaded")]
    QueuedPastWallTime { limit_ms: u64 },
    #[error("the worker exceeded its memory limit of {limit_mb} MiB")]
    MemoryLimitExceeded { limit_mb: u64 },
    #[error("the worker crashed: {0}")]
    Trapped(String),
    #[error("the worker returned without sending a response")]
    NoResponse,
    #[error("the worker answered with an error: {0}")]
    WorkerError(String),
    #[error("the worker declared a {declared}-byte response, over its limit of {limit} bytes")]
    ResponseTooLarge { declared: u64, limit: u64 },
    #[error("the server is at its limit of concurrent instances; retry shortly")]
    OverCapacity,
    /// The tenant or the worker has as many instances in flight as its
    /// quota allows; no instance was created.
    #[error("{0}")]
    OverQuota(Refusal),
    #[error("the client went away before the response was complete")]
    Cancelled,
    #[error("internal error")]
    Internal(String),
}

/// How the guest's run ended, for the request log and the stats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed(InvokeError),
}

/// What one request cost and printed.
#[derive(Debug, Clone)]
pub struct Report {
    pub outcome: Outcome,
    pub cpu_time: Duration,
    pub instantiate_time: Duration,
    /// How long the guest waited for a guest thread before it first ran.
    pub thread_wait: Duration,
    pub stdout: CapturedText,
    pub stderr: CapturedText,
    /// Subrequests and their body bytes.
    pub egress: EgressUsage,
}
