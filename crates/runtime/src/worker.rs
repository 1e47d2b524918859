//! A loaded worker and the life of one request inside it: a new `Store` and
//! a new instance, CPU and wall-clock limits, and a report of what happened.
//! `Worker` is the in-process [`Executor`]: its guests run on this
//! process's guest threads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cordon_config::{Limits, Route, WorkerConfig};
use cordon_egress::{EgressStats, Network, RequestEgress, WorkerEgress};
use serde::Serialize;
use tokio::sync::oneshot;
use wasmtime::component::Linker;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use crate::admission::{Admit, InstanceSlot, QueueWaitError, Refusal, Slots, SlotsSnapshot};
use crate::body::{LimitedRequestBody, ResponseBody};
use crate::cache::CodeSource;
use crate::executor::{Executor, Invocation, InvokeError, InvokeFuture, Outcome, Report, RequestId, Run};
use crate::host::{Host, HostParts};
use crate::meter::CpuMeter;
use crate::scheduler::{Ended, GuestHandle, Scheduler, TenantShare};
use crate::stdio::CapturedOutput;

/// A worker ready to serve: its config and its pre-linked component.
pub struct Worker {
    pub name: String,
    pub tenant: String,
    pub routes: Vec<Route>,
    pub limits: Limits,
    /// What the worker is granted, by name (no values), for `/health`.
    pub grants: GrantSummary,
    pub code_source: CodeSource,
    pub component_sha256: String,
    pre: ProxyPre<Host>,
    /// Instances in flight and memory of this worker's tenant, over all its
    /// workers, and the process's memory.
    quotas: TenantQuotas,
    /// Instances in flight of this worker.
    slots: Arc<Slots>,
    stats: Arc<WorkerStats>,
    egress: Arc<WorkerEgress>,
    caps: Capabilities,
    /// The guests of this worker that may still run, so that a kill switch
    /// can stop them ([`Worker::abort_in_flight`]). Entries of guests that
    /// ended are dropped as new ones come.
    in_flight: Mutex<Vec<crate::scheduler::GuestAborter>>,
}

/// What a worker may use besides its sandbox, opened at startup: the
/// network for its outbound requests, and its key-value, SQL, Postgres and
/// configuration grants.
#[derive(Clone)]
pub(crate) struct Capabilities {
    pub network: Arc<Network>,
    pub kv: Arc<cordon_kv::host::WorkerKv>,
    pub sql: Arc<cordon_sql::host::WorkerSql>,
    pub postgres: Arc<cordon_postgres::host::WorkerPostgres>,
    pub vars: Arc<cordon_vars::host::WorkerVars>,
}

/// What a worker's instances are counted against besides the worker's own
/// limits, and where its guests run.
pub(crate) struct TenantQuotas {
    pub slots: Arc<Slots>,
    /// The tenant's share of the guest threads.
    pub share: Arc<TenantShare>,
    pub scheduler: Arc<Scheduler>,
    pub memory: Arc<cordon_memory::Budget>,
    pub process_memory: Arc<cordon_memory::Budget>,
    /// Charged to every instance at admission: its fiber stack and store.
    pub instance_overhead_bytes: u64,
}

/// What a request has used so far, shared between the guest's task and the
/// gateway: every [`Report`] is built from it, however the request ended.
#[derive(Clone)]
struct Usage {
    meter: Arc<CpuMeter>,
    instantiate_ns: Arc<AtomicU64>,
    stdout: CapturedOutput,
    stderr: CapturedOutput,
    egress: RequestEgress,
}

impl Usage {
    fn new(limits: &Limits, egress: RequestEgress) -> Self {
        Self {
            meter: Arc::default(),
            instantiate_ns: Arc::default(),
            stdout: CapturedOutput::new(limits.max_log_bytes),
            stderr: CapturedOutput::new(limits.max_log_bytes),
            egress,
        }
    }

    /// Call once the guest's future is done (finished, failed or dropped).
    fn report(&self, outcome: Outcome) -> Report {
        Report {
            outcome,
            cpu_time: self.meter.used_after_finish(),
            instantiate_time: Duration::from_nanos(self.instantiate_ns.load(Ordering::Relaxed)),
            thread_wait: self.meter.first_run_after(),
            stdout: self.stdout.take(),
            stderr: self.stderr.take(),
            egress: self.egress.usage(),
        }
    }
}

/// The guest's task. Aborts the guest if the gateway gives up on the request
/// (client gone).
struct AbortOnDrop(Option<GuestHandle>, Usage);

impl AbortOnDrop {
    /// Ready with the report once the guest has ended.
    fn poll_join(&mut self, cx: &mut Context<'_>) -> Poll<Report> {
        let handle = self.0.as_mut().expect("joined once");
        let ended = ready!(handle.poll_ended(cx));
        // Ended: nothing left to abort when this is dropped.
        self.0 = None;
        let outcome = match ended {
            Ended::Finished(outcome) => outcome,
            Ended::Cancelled => Outcome::Failed(InvokeError::Cancelled),
            Ended::Panicked(message) => Outcome::Failed(InvokeError::Internal(format!("request task failed: {message}"))),
        };
        Poll::Ready(self.1.report(outcome))
    }

    async fn join(mut self) -> Report {
        std::future::poll_fn(|cx| self.poll_join(cx)).await
    }

    /// Stops the guest, waits until it is gone, and reports `outcome`.
    async fn stop(self, outcome: Outcome) -> Report {
        if let Some(h) = &self.0 {
            h.abort();
        }
        let usage = self.1.clone();
        let _ = self.join().await;
        usage.report(outcome)
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// The in-process side of an [`Invocation`]: the guest's task, or the
/// report of a request that ended before its response head, and the
/// worker's statistics that the report is counted in.
struct InProcess {
    task: Option<AbortOnDrop>,
    report: Option<Report>,
    stats: Arc<WorkerStats>,
}

impl Run for InProcess {
    fn abort(&self) {
        if let Some(AbortOnDrop(Some(handle), _)) = &self.task {
            handle.abort();
        }
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Report> {
        let report = match (self.report.take(), &mut self.task) {
            (Some(report), _) => report,
            (None, Some(task)) => ready!(task.poll_join(cx)),
            (None, None) => unreachable!("an invocation has a task or a report, and is finished once"),
        };
        self.task = None;
        self.stats.record(&report);
        Poll::Ready(report)
    }
}

/// How the guest's run ended, readable by the response body: 0 running,
/// 1 returned normally, 2 failed or was stopped.
#[derive(Default)]
pub(crate) struct GuestState(std::sync::atomic::AtomicU8);

impl GuestState {
    fn set_ended(&self, ok: bool) {
        self.0.store(if ok { 1 } else { 2 }, Ordering::Release);
    }

    /// Whether the guest failed; set before its store is dropped.
    pub(crate) fn failed(&self) -> bool {
        self.0.load(Ordering::Acquire) == 2
    }
}

/// The refusal for a charge that a tenant's or the process's budget refused.
fn memory_refusal(over: cordon_memory::OverBudget) -> Refusal {
    match over {
        cordon_memory::OverBudget::Process { limit } => Refusal::ProcessMemory { limit_mb: limit >> 20 },
        cordon_memory::OverBudget::Tenant { limit } | cordon_memory::OverBudget::Request { limit } => {
            Refusal::TenantMemory { limit_mb: limit >> 20 }
        }
    }
}

/// Raised from the epoch callback when a request passes its CPU limit.
#[derive(Debug, thiserror::Error)]
#[error("CPU-time limit exceeded")]
struct CpuLimitExceeded;

impl Worker {
    pub(crate) fn new(
        config: &WorkerConfig,
        linker: &Linker<Host>,
        component: &wasmtime::component::Component,
        code_source: CodeSource,
        component_sha256: String,
        caps: Capabilities,
        quotas: TenantQuotas,
    ) -> Result<Self, crate::LoadError> {
        let pre = linker.instantiate_pre(component).map_err(|e| {
            let msg = e.to_string();
            match backticked(&msg) {
                Some(name) if msg.contains("imports") => crate::LoadError::UnknownImport(name),
                _ => crate::LoadError::Invalid(msg),
            }
        })?;
        let pre = ProxyPre::new(pre).map_err(|e| crate::LoadError::NotAProxy(e.to_string()))?;
        Ok(Self {
            name: config.name.clone(),
            tenant: config.tenant.clone(),
            routes: config.routes.clone(),
            limits: config.limits.clone(),
            grants: GrantSummary::of(config),
            code_source,
            component_sha256,
            pre,
            quotas,
            slots: Slots::new(config.limits.max_instances),
            stats: Arc::default(),
            egress: Arc::new(WorkerEgress::new(&config.tenant, &config.name, config.allowed_outbound.clone(), config.limits.egress())),
            caps,
            in_flight: Mutex::new(Vec::new()),
        })
    }

    /// The slot of an admitted request: at once, or once its place in the
    /// tenant's queue comes up, within its wall-clock limit.
    async fn slot(&self, admitted: Admit) -> Result<InstanceSlot, InvokeError> {
        match admitted {
            Admit::Now(slot) => Ok(slot),
            Admit::Queued(queued) => {
                let deadline = queued.since() + Duration::from_millis(self.limits.wall_ms);
                queued.wait(deadline).await.map_err(|e| match e {
                    QueueWaitError::Timeout(_) => InvokeError::QueuedPastWallTime { limit_ms: self.limits.wall_ms },
                    QueueWaitError::Refused(refusal) => InvokeError::OverQuota(refusal),
                })
            }
        }
    }

    /// This worker's instances in flight against its own quota, and its
    /// tenant's.
    pub fn instances(&self) -> (SlotsSnapshot, SlotsSnapshot) {
        (self.slots.snapshot(), self.quotas.slots.snapshot())
    }

    /// Runs `request` in a fresh instance of this worker, which holds `slot`
    /// until it is dropped.
    ///
    /// The guest runs in its own task on the guest threads, so that it can
    /// keep streaming the body after the response head is returned here.
    /// The task is bounded by the wall-clock limit, which started when the
    /// request was admitted or queued, and aborted if the returned
    /// [`Invocation`] is dropped.
    async fn invoke_admitted<B>(&self, slot: InstanceSlot, request: http::Request<B>) -> Invocation
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let limits = &self.limits;
        let deadline = slot.since() + Duration::from_millis(limits.wall_ms);
        let request_body_exceeded = Arc::new(AtomicBool::new(false));
        let memory =
            Arc::new(cordon_memory::Account::new(limits.memory_mb << 20, self.quotas.memory.clone(), self.quotas.process_memory.clone()));
        let request_id = request.extensions().get::<RequestId>().map_or("-", |id| id.0.as_str());
        let egress = RequestEgress::new(self.caps.network.clone(), self.egress.clone(), request_id);
        let usage = Usage::new(limits, egress.clone());
        // The stack and store every instance has, before any of it exists:
        // a tenant whose instances hold its budget gets no new one.
        if let Err(over) = memory.charge_outside_request(self.quotas.instance_overhead_bytes) {
            let error = InvokeError::OverQuota(memory_refusal(over));
            let report = usage.report(Outcome::Failed(error.clone()));
            return self.done(Err(error), request_body_exceeded, report);
        }

        let mut store = Store::new(
            self.pre.engine(),
            Host::new(HostParts {
                memory: memory.clone(),
                cpu_limit: Duration::from_millis(limits.cpu_ms),
                stdout: usage.stdout.clone(),
                stderr: usage.stderr.clone(),
                meter: usage.meter.clone(),
                egress,
                kv: cordon_kv::host::RequestKv::new(self.caps.kv.clone(), usage.meter.host(), memory.clone()),
                sql: cordon_sql::host::RequestSql::new(self.caps.sql.clone(), usage.meter.host(), memory.clone()),
                postgres: cordon_postgres::host::RequestPostgres::new(self.caps.postgres.clone()),
                vars: self.caps.vars.clone(),
                slot,
            }),
        );
        store.limiter(|host| &mut host.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            let host = ctx.data();
            if host.meter.used() > host.cpu_limit {
                return Err(CpuLimitExceeded.into());
            }
            // Yield to the executor at every tick, so a busy guest never holds
            // a thread that other requests are waiting for.
            Ok(UpdateDeadline::Yield(1))
        });

        let (head_tx, head_rx) = oneshot::channel();
        let request = request.map(|b| LimitedRequestBody::new(b, limits.max_request_body_bytes, request_body_exceeded.clone()));
        let prepared = (|| -> wasmtime::Result<_> {
            let req = store.data_mut().http().new_incoming_request(Scheme::Http, request)?;
            let out = store.data_mut().http().new_response_outparam(head_tx)?;
            Ok((req, out))
        })();
        let (req, out) = match prepared {
            Ok(v) => v,
            Err(e) => {
                let error = InvokeError::Internal(format!("cannot pass the request to the guest: {e}"));
                let report = usage.report(Outcome::Failed(error.clone()));
                return self.done(Err(error), request_body_exceeded, report);
            }
        };

        let pre = self.pre.clone();
        let instantiate_ns = usage.instantiate_ns.clone();
        let guest_state = Arc::new(GuestState::default());
        let guest_state_in_task = guest_state.clone();
        let guest = async move {
            let run = async {
                let started = Instant::now();
                let proxy = pre.instantiate_async(&mut store).await?;
                instantiate_ns.store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                proxy.wasi_http_incoming_handler().call_handle(&mut store, req, out).await
            };
            let result = tokio::time::timeout_at(deadline, run).await;
            // Record how the guest ended while its store (and with it the
            // sending end of the response body) is still alive: a body that
            // ends because the store was dropped must read as cut off.
            guest_state_in_task.set_ended(matches!(result, Ok(Ok(()))));
            drop(store);
            result
        };
        let limits_in_task = limits.clone();
        let guest = Box::pin(async move {
            match guest.await {
                Ok(Ok(())) => Outcome::Completed,
                Ok(Err(e)) => Outcome::Failed(classify(&e, &limits_in_task, memory.refused())),
                Err(_) => Outcome::Failed(InvokeError::WallTimeExceeded { limit_ms: limits_in_task.wall_ms }),
            }
        });
        let task = self.quotas.scheduler.spawn(&self.quotas.share, usage.meter.clone(), guest);
        {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            in_flight.retain(|g| !g.is_gone());
            in_flight.push(task.aborter());
        }
        let task = AbortOnDrop(Some(task), usage);

        match head_rx.await {
            Ok(Ok(response)) => {
                if let Some(declared) = declared_length(&response)
                    && declared > limits.max_response_body_bytes
                {
                    let error = InvokeError::ResponseTooLarge { declared, limit: limits.max_response_body_bytes };
                    let report = task.stop(Outcome::Failed(error.clone())).await;
                    return self.done(Err(error), request_body_exceeded, report);
                }
                let response = response.map(|body| ResponseBody::new(body, limits.max_response_body_bytes, guest_state));
                let run = InProcess { task: Some(task), report: None, stats: self.stats.clone() };
                Invocation::new(Ok(response), request_body_exceeded.load(Ordering::Relaxed), Box::new(run))
            }
            Ok(Err(code)) => {
                let report = task.join().await;
                let error = InvokeError::WorkerError(format!("{code:?}"));
                self.done(Err(error), request_body_exceeded, report)
            }
            // The guest finished, trapped or ran out of time without setting
            // the response: its report says which.
            Err(_) => {
                let report = task.join().await;
                let error = match &report.outcome {
                    Outcome::Completed => InvokeError::NoResponse,
                    Outcome::Failed(e) => e.clone(),
                };
                self.done(Err(error), request_body_exceeded, report)
            }
        }
    }

    fn done(
        &self,
        response: Result<http::Response<ResponseBody>, InvokeError>,
        request_body_exceeded: Arc<AtomicBool>,
        report: Report,
    ) -> Invocation {
        let run = InProcess { task: None, report: Some(report), stats: self.stats.clone() };
        Invocation::new(response, request_body_exceeded.load(Ordering::Relaxed), Box::new(run))
    }

    /// Stops every guest of this worker that still runs, as if each
    /// client had gone away; each request gets its report as usual. New
    /// requests are not affected.
    pub fn abort_in_flight(&self) -> usize {
        let in_flight = std::mem::take(&mut *self.in_flight.lock().unwrap_or_else(|p| p.into_inner()));
        let running = in_flight.iter().filter(|g| !g.is_gone()).count();
        for guest in &in_flight {
            guest.abort();
        }
        running
    }

    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot { egress: self.egress.stats(), ..self.stats.snapshot() }
    }
}

/// The in-process executor: admission against the tenant's and the
/// worker's slots, and the guest on this process's guest threads.
impl<B> Executor<B> for Worker
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn tenant(&self) -> &str {
        &self.tenant
    }

    fn routes(&self) -> &[Route] {
        &self.routes
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn admit(&self) -> Result<Admit, Refusal> {
        crate::admission::admit(&self.quotas.slots, &self.slots)
    }

    fn invoke(&self, admitted: Admit, request: http::Request<B>) -> InvokeFuture<'_> {
        Box::pin(async move {
            let slot = self.slot(admitted).await?;
            Ok(self.invoke_admitted(slot, request).await)
        })
    }
}

impl WorkerStats {
    fn record(&self, report: &Report) {
        let s = self;
        s.requests.fetch_add(1, Ordering::Relaxed);
        s.cpu_ns.fetch_add(report.cpu_time.as_nanos() as u64, Ordering::Relaxed);
        if !report.instantiate_time.is_zero() {
            s.instantiations.fetch_add(1, Ordering::Relaxed);
            s.instantiate_ns.fetch_add(report.instantiate_time.as_nanos() as u64, Ordering::Relaxed);
        }
        let counter = match &report.outcome {
            Outcome::Completed => return,
            Outcome::Failed(InvokeError::CpuLimitExceeded { .. }) => &s.cpu_limit_exceeded,
            Outcome::Failed(InvokeError::WallTimeExceeded { .. } | InvokeError::QueuedPastWallTime { .. }) => &s.wall_time_exceeded,
            Outcome::Failed(InvokeError::MemoryLimitExceeded { .. }) => &s.memory_limit_exceeded,
            Outcome::Failed(InvokeError::Trapped(_)) => &s.traps,
            Outcome::Failed(_) => &s.other_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn declared_length<B>(response: &http::Response<B>) -> Option<u64> {
    response.headers().get(http::header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Maps an error from the guest's run to what the client is told. Trap
/// details stay in the logs; the client gets the kind of failure only.
fn classify(e: &wasmtime::Error, limits: &Limits, memory: Option<cordon_memory::OverBudget>) -> InvokeError {
    if e.downcast_ref::<CpuLimitExceeded>().is_some() {
        return InvokeError::CpuLimitExceeded { limit_ms: limits.cpu_ms };
    }
    // A memory limit refused a charge and the guest then failed: the
    // request's own limit is the guest's fault, a tenant's or the server's
    // budget is capacity, to retry.
    let memory_error = |over| match over {
        cordon_memory::OverBudget::Request { .. } => InvokeError::MemoryLimitExceeded { limit_mb: limits.memory_mb },
        other => InvokeError::OverQuota(memory_refusal(other)),
    };
    if let Some(crate::host_buffers::HostMemoryExceeded(over)) = e.downcast_ref::<crate::host_buffers::HostMemoryExceeded>() {
        return memory_error(*over);
    }
    if let Some(trap) = e.downcast_ref::<Trap>() {
        if let Some(over) = memory {
            return memory_error(over);
        }
        let what = match trap {
            Trap::StackOverflow => "stack overflow".to_string(),
            Trap::UnreachableCodeReached => "unreachable code reached (a panic or abort in the worker)".to_string(),
            Trap::MemoryOutOfBounds => "out-of-bounds memory access".to_string(),
            Trap::IntegerDivisionByZero => "integer division by zero".to_string(),
            other => other.to_string(),
        };
        return InvokeError::Trapped(what);
    }
    if e.chain().any(|cause| cause.is::<wasmtime::PoolConcurrencyLimitError>()) {
        return InvokeError::OverCapacity;
    }
    let text = format!("{e:#}");
    if let Some(over) = memory {
        return memory_error(over);
    }
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return InvokeError::Trapped(format!("the worker called exit({})", exit.0));
    }
    tracing::debug!(error = %text, "guest failed");
    InvokeError::Trapped("the worker failed".to_string())
}

fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    Some(message[start..end].to_string())
}

#[derive(Default)]
struct WorkerStats {
    requests: AtomicU64,
    instantiations: AtomicU64,
    instantiate_ns: AtomicU64,
    cpu_ns: AtomicU64,
    cpu_limit_exceeded: AtomicU64,
    wall_time_exceeded: AtomicU64,
    memory_limit_exceeded: AtomicU64,
    traps: AtomicU64,
    other_errors: AtomicU64,
}

/// A worker's counters, as shown on `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub instantiate_us_mean: f64,
    pub cpu_us_mean: f64,
    pub cpu_limit_exceeded: u64,
    pub wall_time_exceeded: u64,
    pub memory_limit_exceeded: u64,
    pub traps: u64,
    pub other_errors: u64,
    /// Outbound requests: sent, bytes, denied by policy, stopped by limits.
    pub egress: EgressStats,
}

impl WorkerStats {
    fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mean_us = |total_ns: u64, n: u64| if n == 0 { 0.0 } else { total_ns as f64 / n as f64 / 1000.0 };
        StatsSnapshot {
            requests: get(&self.requests),
            instantiate_us_mean: mean_us(get(&self.instantiate_ns), get(&self.instantiations)),
            cpu_us_mean: mean_us(get(&self.cpu_ns), get(&self.requests)),
            cpu_limit_exceeded: get(&self.cpu_limit_exceeded),
            wall_time_exceeded: get(&self.wall_time_exceeded),
            memory_limit_exceeded: get(&self.memory_limit_exceeded),
            traps: get(&self.traps),
            other_errors: get(&self.other_errors),
            egress: EgressStats::default(),
        }
    }
}

impl Capabilities {
    /// Grants nothing: for `cordon check`, which validates components
    /// without opening any store.
    pub(crate) fn none(network: &Arc<Network>) -> Capabilities {
        Capabilities {
            network: network.clone(),
            kv: Arc::new(cordon_kv::host::WorkerKv::none()),
            sql: Arc::new(cordon_sql::host::WorkerSql::none()),
            postgres: Arc::new(cordon_postgres::host::WorkerPostgres::none()),
            vars: Arc::new(cordon_vars::host::WorkerVars::none()),
        }
    }
}

/// A worker's grants as the operator may see them: binding and store names,
/// variable and secret names, never a value.
#[derive(Debug, Clone, Serialize)]
pub struct GrantSummary {
    pub kv: Vec<cordon_config::KvGrant>,
    pub sql: Vec<cordon_config::SqlGrant>,
    pub postgres: Vec<cordon_config::PostgresGrant>,
    /// The names of the variables; their values are configuration, not health.
    pub vars: Vec<String>,
    pub secrets: Vec<String>,
}

impl GrantSummary {
    /// The grants as the spec types say them: one declaration, the config's.
    fn of(config: &WorkerConfig) -> GrantSummary {
        let g = &config.grants;
        GrantSummary {
            kv: g.kv.clone(),
            sql: g.sql.clone(),
            postgres: g.postgres.clone(),
            vars: g.vars.keys().cloned().collect(),
            secrets: g.secrets.clone(),
        }
    }
}
