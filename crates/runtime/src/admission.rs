//! Instances in flight, per tenant and per worker: the quota a request must
//! pass before its instance is created.
//!
//! An [`InstanceSlot`] is taken at admission and lives in the instance's
//! `Store`, so it is given back when the store is dropped: not when the
//! response has been sent, and not when the client goes away. A guest that
//! answers at once and keeps running until its wall-clock limit holds its
//! slot all that time.
//!
//! Every tenant's quota is less than `sandbox.max_instances` (the config
//! refuses anything else), so a tenant at its quota always leaves slots of
//! the shared pool to the others.
//!
//! A request that finds its tenant at its quota waits in the tenant's queue
//! for a slot, in arrival order, if the queue has room (`max_queued`); the
//! wait counts towards its wall-clock limit. Past the queue it is refused at
//! once with `tenant_overloaded`. A queued request holds no instance and no
//! memory budget, only its place.
//!
//! The same goes for memory: each tenant has a [`Budget`] below the
//! process's, and every instance is charged its fiber stack and bookkeeping
//! at admission, then its linear memory and host-side buffers as they grow
//! (see `cordon-memory`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::scheduler::{Scheduler, ShareSnapshot, TenantShare};

use cordon_memory::Budget;
use cordon_memory::host::{HostMemory, WorstCase};
use serde::Serialize;

/// A counter of instances in flight with a limit, the requests queued for
/// one of them, and how often it refused.
#[derive(Debug)]
pub struct Slots {
    limit: u32,
    in_flight: AtomicU32,
    refused: AtomicU64,
    /// Requests that may wait for a slot at once; 0 refuses at once.
    max_queued: u32,
    queued: AtomicU32,
    /// Signalled when a slot is given back while requests wait.
    freed: Notify,
}

impl Slots {
    /// Slots without a queue: a request past `limit` is refused at once.
    pub fn new(limit: u32) -> Arc<Self> {
        Self::with_queue(limit, 0)
    }

    /// Slots with a queue of `max_queued` requests.
    pub fn with_queue(limit: u32, max_queued: u32) -> Arc<Self> {
        Arc::new(Self {
            limit,
            in_flight: AtomicU32::new(0),
            refused: AtomicU64::new(0),
            max_queued,
            queued: AtomicU32::new(0),
            freed: Notify::new(),
        })
    }

    /// Takes one slot unless all `limit` are taken.
    fn try_take(&self) -> bool {
        self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.limit).then_some(n + 1)).is_ok()
    }

    fn give_back(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if self.queued.load(Ordering::Acquire) > 0 {
            self.freed.notify_one();
        }
    }

    /// Takes a place in the queue unless it is full.
    fn try_queue(&self) -> bool {
        self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max_queued).then_some(n + 1)).is_ok()
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> SlotsSnapshot {
        SlotsSnapshot {
            max_instances: self.limit,
            in_flight: self.in_flight(),
            refused: self.refused.load(Ordering::Relaxed),
            max_queued: self.max_queued,
            queued: self.queued.load(Ordering::Acquire),
        }
    }
}

/// A quota's state, as shown on `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SlotsSnapshot {
    pub max_instances: u32,
    pub in_flight: u32,
    /// Requests refused because this quota and its queue were full, since
    /// start.
    pub refused: u64,
    pub max_queued: u32,
    /// Requests waiting for a slot now.
    pub queued: u32,
}

/// The quotas of every tenant, built once from the config.
#[derive(Debug)]
pub struct Admission {
    tenants: HashMap<String, Arc<Slots>>,
    memory: MemoryBudgets,
    /// The guest threads, and every tenant's share of them.
    scheduler: Arc<Scheduler>,
    shares: HashMap<String, Arc<TenantShare>>,
}

/// The process's memory budget and every tenant's.
#[derive(Debug)]
pub struct MemoryBudgets {
    pub process: Arc<Budget>,
    tenants: HashMap<String, Arc<Budget>>,
    /// A tenant's budget when neither its `[[tenant]]` table nor
    /// `sandbox.tenant_memory_budget_mb` sets one.
    default_tenant_bytes: u64,
    /// Charged to every instance at admission, outside its own limit: its
    /// fiber stack and the store's bookkeeping.
    pub instance_overhead_bytes: u64,
}

/// The process's budget when `sandbox.memory_budget_mb` is unset is the
/// usable host memory divided by this: the rest is for the stores, the
/// caches, the kernel's socket buffers and the page cache.
pub const PROCESS_SHARE_DIVISOR: u64 = 2;

/// What an instance's store, instance and resource table hold besides its
/// memories and stack, charged with the stack.
pub const INSTANCE_BOOKKEEPING_BYTES: u64 = 64 * 1024;

/// Why the configured memory cannot be served.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MemoryConfigError {
    #[error(transparent)]
    DoesNotFit(#[from] cordon_memory::host::DoesNotFit),
    #[error(
        "tenant `{tenant}` has a memory budget of {tenant_mib} MiB, not below the server's budget of {process_mib} MiB; lower it (sandbox.tenant_memory_budget_mb or its [[tenant]] memory_budget_mb) so that one tenant cannot hold all the memory"
    )]
    TenantNotBelowProcess { tenant: String, tenant_mib: u64, process_mib: u64 },
}

impl MemoryBudgets {
    /// Sizes the budgets from the config and `host`, and refuses a config
    /// whose worst case does not fit in the host's memory.
    pub fn from_config(config: &cordon_config::Config, host: Option<HostMemory>) -> Result<MemoryBudgets, MemoryConfigError> {
        let sandbox = &config.sandbox;
        let mib = |n: u64| n.saturating_mul(1 << 20);
        let stack = u64::from(sandbox.max_wasm_stack_kb) * 1024 + crate::policy::HOST_STACK_BYTES;
        let instance_overhead_bytes = stack + INSTANCE_BOOKKEEPING_BYTES;
        let all_instances = u64::from(sandbox.max_instances).saturating_mul(mib(config.max_worker_memory_mb()) + instance_overhead_bytes);
        let process_bytes = match (sandbox.memory_budget_mb, host) {
            (Some(mb), _) => mib(mb),
            (None, Some(host)) => host.usable_bytes() / PROCESS_SHARE_DIVISOR,
            // No way to know the host's memory: the instances' own worst case.
            (None, None) => all_instances,
        }
        .min(all_instances);
        if let Some(host) = host {
            let worst = WorstCase {
                terms: vec![
                    (
                        "instances (sandbox.memory_budget_mb, or sandbox.max_instances × the largest memory_mb and stack)".into(),
                        process_bytes,
                    ),
                    ("SQLite (storage.sqlite_heap_limit_mb)".into(), mib(config.storage.sqlite_heap_limit_mb)),
                ],
            };
            worst.check(&host, sandbox.memory_overcommit)?;
        }
        let default_tenant_bytes = sandbox.tenant_memory_budget_mb.map_or(process_bytes / 4, mib);
        let mut tenants = HashMap::new();
        for w in &config.workers {
            let bytes =
                config.tenants.iter().find(|t| t.name == w.tenant).and_then(|t| t.memory_budget_mb).map_or(default_tenant_bytes, mib);
            if bytes >= process_bytes {
                return Err(MemoryConfigError::TenantNotBelowProcess {
                    tenant: w.tenant.clone(),
                    tenant_mib: bytes >> 20,
                    process_mib: process_bytes >> 20,
                });
            }
            tenants.entry(w.tenant.clone()).or_insert_with(|| Budget::new(bytes));
        }
        Ok(MemoryBudgets { process: Budget::new(process_bytes), tenants, default_tenant_bytes, instance_overhead_bytes })
    }

    /// The budget of `tenant`; one the config does not know gets the default.
    pub(crate) fn tenant(&mut self, tenant: &str) -> Arc<Budget> {
        self.tenants.entry(tenant.to_string()).or_insert_with(|| Budget::new(self.default_tenant_bytes)).clone()
    }
}

impl Admission {
    /// One quota per tenant that has a worker, sized by its `[[tenant]]`
    /// table or `sandbox.tenant_max_instances` and `tenant_max_queued`, its
    /// share of the guest threads of `scheduler` by its `cpu_weight`, and
    /// the memory budgets.
    pub fn from_config(config: &cordon_config::Config, memory: MemoryBudgets, scheduler: Arc<Scheduler>) -> Self {
        let mut tenants = HashMap::new();
        let mut shares = HashMap::new();
        for w in &config.workers {
            tenants
                .entry(w.tenant.clone())
                .or_insert_with(|| Slots::with_queue(config.tenant_max_instances(&w.tenant), config.tenant_max_queued(&w.tenant)));
            shares.entry(w.tenant.clone()).or_insert_with(|| scheduler.tenant(config.tenant_cpu_weight(&w.tenant)));
        }
        Self { tenants, memory, scheduler, shares }
    }

    /// The guest threads.
    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.scheduler
    }

    /// The share of the guest threads of `tenant`; a tenant the config does
    /// not know gets one of the default weight.
    pub(crate) fn share(&mut self, tenant: &str) -> Arc<TenantShare> {
        let scheduler = &self.scheduler;
        self.shares.entry(tenant.to_string()).or_insert_with(|| scheduler.tenant(crate::scheduler::DEFAULT_WEIGHT)).clone()
    }

    /// Every tenant's share of the guest threads, by name.
    pub fn cpu_snapshot(&self) -> std::collections::BTreeMap<String, ShareSnapshot> {
        self.shares.iter().map(|(name, share)| (name.clone(), self.scheduler.snapshot(share))).collect()
    }

    pub fn memory(&self) -> &MemoryBudgets {
        &self.memory
    }

    pub(crate) fn memory_mut(&mut self) -> &mut MemoryBudgets {
        &mut self.memory
    }

    /// The quota of `tenant`; a tenant the config does not know gets a quota
    /// of its own with `limit`.
    pub(crate) fn tenant(&mut self, tenant: &str, limit: u32) -> Arc<Slots> {
        self.tenants.entry(tenant.to_string()).or_insert_with(|| Slots::new(limit)).clone()
    }

    /// Every tenant's quota, by name.
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, SlotsSnapshot> {
        self.tenants.iter().map(|(name, slots)| (name.clone(), slots.snapshot())).collect()
    }

    /// Every tenant's memory budget, by name.
    pub fn memory_snapshot(&self) -> std::collections::BTreeMap<String, cordon_memory::BudgetSnapshot> {
        self.memory.tenants.iter().map(|(name, b)| (name.clone(), b.snapshot())).collect()
    }
}

/// A request's way to an instance: a slot now, or a place in its tenant's
/// queue.
#[derive(Debug)]
pub enum Admit {
    Now(InstanceSlot),
    Queued(QueuedRequest),
}

/// A request waiting in its tenant's queue; leaves it when dropped.
#[derive(Debug)]
pub struct QueuedRequest {
    tenant: Arc<Slots>,
    worker: Arc<Slots>,
    since: Instant,
}

/// A queued request's wall-clock limit ran out before a slot came free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request waited its whole wall-clock limit for one of its tenant's {limit} instance slots")]
pub struct QueueTimeout {
    pub limit: u32,
}

impl QueuedRequest {
    /// Waits, in arrival order, for a slot of the tenant until `deadline`,
    /// then takes the worker's.
    pub async fn wait(self, deadline: Instant) -> Result<InstanceSlot, QueueWaitError> {
        let tenant = &self.tenant;
        loop {
            let freed = tenant.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so that a slot given back between
            // the check and the wait is not missed.
            freed.as_mut().enable();
            if tenant.try_take() {
                break;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                tenant.refused.fetch_add(1, Ordering::Relaxed);
                return Err(QueueWaitError::Timeout(QueueTimeout { limit: tenant.limit }));
            }
        }
        take_worker_slot(tenant, &self.worker, self.since).map_err(QueueWaitError::Refused)
    }

    /// When the request started waiting: its wall-clock limit runs from
    /// then.
    pub fn since(&self) -> Instant {
        self.since
    }
}

impl Drop for QueuedRequest {
    fn drop(&mut self) {
        self.tenant.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a queued request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueWaitError {
    #[error(transparent)]
    Timeout(QueueTimeout),
    #[error(transparent)]
    Refused(Refusal),
}

/// Takes a slot of the worker's tenant and one of the worker, or a place in
/// the tenant's queue, or neither. Requests already queued go first: a new
/// one queues behind them rather than take a slot that comes free.
pub(crate) fn admit(tenant: &Arc<Slots>, worker: &Arc<Slots>) -> Result<Admit, Refusal> {
    let since = Instant::now();
    if tenant.queued.load(Ordering::Acquire) == 0 && tenant.try_take() {
        return take_worker_slot(tenant, worker, since).map(Admit::Now);
    }
    if tenant.try_queue() {
        return Ok(Admit::Queued(QueuedRequest { tenant: tenant.clone(), worker: worker.clone(), since }));
    }
    tenant.refused.fetch_add(1, Ordering::Relaxed);
    Err(Refusal::TenantOverloaded { limit: tenant.limit, max_queued: tenant.max_queued })
}

/// With a slot of `tenant` taken, takes one of `worker` too, or gives the
/// tenant's back.
fn take_worker_slot(tenant: &Arc<Slots>, worker: &Arc<Slots>, since: Instant) -> Result<InstanceSlot, Refusal> {
    if !worker.try_take() {
        tenant.give_back();
        worker.refused.fetch_add(1, Ordering::Relaxed);
        return Err(Refusal::Worker { limit: worker.limit });
    }
    Ok(InstanceSlot { tenant: tenant.clone(), worker: worker.clone(), since })
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The tenant has its quota of instances in flight and its queue full.
    #[error("this tenant has {limit} instances in flight and {max_queued} requests queued, its limits; retry shortly")]
    TenantOverloaded { limit: u32, max_queued: u32 },
    #[error("this worker has {limit} instances in flight, its limit; retry shortly")]
    Worker { limit: u32 },
    /// The tenant's instances hold its whole memory budget.
    #[error("this tenant's instances hold its memory budget of {limit_mb} MiB; retry shortly")]
    TenantMemory { limit_mb: u64 },
    /// All instances together hold the server's memory budget.
    #[error("the server's instances hold its memory budget of {limit_mb} MiB; retry shortly")]
    ProcessMemory { limit_mb: u64 },
}

impl Refusal {
    /// The error code the client sees.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::TenantOverloaded { .. } => "tenant_overloaded",
            Refusal::TenantMemory { .. } => "tenant_over_capacity",
            Refusal::Worker { .. } => "worker_over_capacity",
            Refusal::ProcessMemory { .. } => "over_capacity",
        }
    }
}

/// One instance in flight, counted against its tenant and its worker until
/// dropped.
#[derive(Debug)]
pub struct InstanceSlot {
    tenant: Arc<Slots>,
    worker: Arc<Slots>,
    /// When the request was admitted or began to wait in the queue.
    since: Instant,
}

impl InstanceSlot {
    /// When the request's wall-clock limit started: its admission, or its
    /// arrival in the tenant's queue.
    pub fn since(&self) -> Instant {
        self.since
    }
}

impl Drop for InstanceSlot {
    fn drop(&mut self) {
        self.worker.give_back();
        self.tenant.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slot of a request admitted at once.
    fn now(admitted: Result<Admit, Refusal>) -> InstanceSlot {
        match admitted {
            Ok(Admit::Now(slot)) => slot,
            other => panic!("expected a slot now, got {other:?}"),
        }
    }

    #[test]
    fn slots_are_taken_up_to_the_limit_and_given_back_on_drop() {
        let tenant = Slots::new(3);
        let (a, b) = (Slots::new(2), Slots::new(2));
        let first = now(admit(&tenant, &a));
        let second = now(admit(&tenant, &a));
        assert_eq!(admit(&tenant, &a).unwrap_err(), Refusal::Worker { limit: 2 });
        assert_eq!(tenant.in_flight(), 2, "a worker refusal gives the tenant's slot back");
        let third = now(admit(&tenant, &b));
        assert_eq!(admit(&tenant, &b).unwrap_err(), Refusal::TenantOverloaded { limit: 3, max_queued: 0 });
        assert_eq!(tenant.snapshot(), SlotsSnapshot { max_instances: 3, in_flight: 3, refused: 1, max_queued: 0, queued: 0 });
        assert_eq!((a.snapshot().refused, b.snapshot().refused), (1, 0));
        drop(first);
        assert_eq!((tenant.in_flight(), a.in_flight()), (2, 1));
        let again = now(admit(&tenant, &a));
        drop((second, third, again));
        assert_eq!((tenant.in_flight(), a.in_flight(), b.in_flight()), (0, 0, 0));
    }

    #[test]
    fn concurrent_admissions_never_pass_the_limit() {
        let tenant = Slots::new(5);
        let worker = Slots::new(100);
        let peak = AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if let Ok(Admit::Now(slot)) = admit(&tenant, &worker) {
                            peak.fetch_max(tenant.in_flight(), Ordering::Relaxed);
                            drop(slot);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 5);
        assert_eq!((tenant.in_flight(), worker.in_flight()), (0, 0));
    }

    #[tokio::test]
    async fn a_full_tenant_queues_in_order_up_to_its_queue_then_refuses() {
        let tenant = Slots::with_queue(1, 2);
        let worker = Slots::new(10);
        let first = now(admit(&tenant, &worker));
        let Ok(Admit::Queued(second)) = admit(&tenant, &worker) else { panic!("the second request queues") };
        let Ok(Admit::Queued(third)) = admit(&tenant, &worker) else { panic!("the third request queues") };
        assert_eq!(admit(&tenant, &worker).unwrap_err(), Refusal::TenantOverloaded { limit: 1, max_queued: 2 });
        assert_eq!((tenant.snapshot().queued, tenant.snapshot().refused), (2, 1));
        let far = Instant::now() + std::time::Duration::from_secs(10);
        let second = tokio::spawn(second.wait(far));
        let third = tokio::spawn(third.wait(far));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!second.is_finished() && !third.is_finished(), "nobody gets a slot that is taken");
        drop(first);
        let second = second.await.unwrap().expect("the first in the queue gets the freed slot");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!third.is_finished(), "one freed slot admits one request");
        // A new arrival queues behind the waiting one rather than barge.
        drop(second);
        let third = third.await.unwrap().expect("the next in the queue gets the slot");
        assert_eq!((tenant.in_flight(), tenant.snapshot().queued), (1, 0));
        drop(third);
        assert_eq!(tenant.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_queued_request_gives_up_at_its_deadline_and_leaves_the_queue() {
        let tenant = Slots::with_queue(1, 1);
        let worker = Slots::new(10);
        let _held = now(admit(&tenant, &worker));
        let Ok(Admit::Queued(waiting)) = admit(&tenant, &worker) else { panic!("queues") };
        let started = Instant::now();
        let deadline = waiting.since() + std::time::Duration::from_millis(50);
        assert_eq!(waiting.wait(deadline).await.unwrap_err(), QueueWaitError::Timeout(QueueTimeout { limit: 1 }));
        assert!(started.elapsed() >= std::time::Duration::from_millis(45));
        assert_eq!(tenant.snapshot().queued, 0, "a request that gave up left the queue");
        let Ok(Admit::Queued(_again)) = admit(&tenant, &worker) else { panic!("its place is free again") };
    }
}
