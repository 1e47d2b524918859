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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use serde::Serialize;

/// A counter of instances in flight with a limit, and how often it refused.
#[derive(Debug)]
pub struct Slots {
    limit: u32,
    in_flight: AtomicU32,
    refused: AtomicU64,
}

impl Slots {
    pub fn new(limit: u32) -> Arc<Self> {
        Arc::new(Self { limit, in_flight: AtomicU32::new(0), refused: AtomicU64::new(0) })
    }

    /// Takes one slot unless all `limit` are taken.
    fn try_take(&self) -> bool {
        self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.limit).then_some(n + 1)).is_ok()
    }

    fn give_back(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> SlotsSnapshot {
        SlotsSnapshot { max_instances: self.limit, in_flight: self.in_flight(), refused: self.refused.load(Ordering::Relaxed) }
    }
}

/// A quota's state, as shown on `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SlotsSnapshot {
    pub max_instances: u32,
    pub in_flight: u32,
    /// Requests refused because this quota was full, since start.
    pub refused: u64,
}

/// The quotas of every tenant, built once from the config.
#[derive(Debug, Default)]
pub struct Admission {
    tenants: HashMap<String, Arc<Slots>>,
}

impl Admission {
    /// One quota per tenant that has a worker, sized by its `[[tenant]]`
    /// table or `sandbox.tenant_max_instances`.
    pub fn from_config(config: &cordon_config::Config) -> Self {
        let mut tenants = HashMap::new();
        for w in &config.workers {
            tenants.entry(w.tenant.clone()).or_insert_with(|| Slots::new(config.tenant_max_instances(&w.tenant)));
        }
        Self { tenants }
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
}

/// Takes a slot of the worker's tenant and one of the worker, or neither.
pub(crate) fn admit(tenant: &Arc<Slots>, worker: &Arc<Slots>) -> Result<InstanceSlot, Refusal> {
    if !tenant.try_take() {
        tenant.refused.fetch_add(1, Ordering::Relaxed);
        return Err(Refusal::Tenant { limit: tenant.limit });
    }
    if !worker.try_take() {
        tenant.give_back();
        worker.refused.fetch_add(1, Ordering::Relaxed);
        return Err(Refusal::Worker { limit: worker.limit });
    }
    Ok(InstanceSlot { tenant: tenant.clone(), worker: worker.clone() })
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this tenant has {limit} instances in flight, its limit; retry shortly")]
    Tenant { limit: u32 },
    #[error("this worker has {limit} instances in flight, its limit; retry shortly")]
    Worker { limit: u32 },
}

impl Refusal {
    /// The error code the client sees.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Tenant { .. } => "tenant_over_capacity",
            Refusal::Worker { .. } => "worker_over_capacity",
        }
    }
}

/// One instance in flight, counted against its tenant and its worker until
/// dropped.
#[derive(Debug)]
pub struct InstanceSlot {
    tenant: Arc<Slots>,
    worker: Arc<Slots>,
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

    #[test]
    fn slots_are_taken_up_to_the_limit_and_given_back_on_drop() {
        let tenant = Slots::new(3);
        let (a, b) = (Slots::new(2), Slots::new(2));
        let first = admit(&tenant, &a).unwrap();
        let second = admit(&tenant, &a).unwrap();
        assert_eq!(admit(&tenant, &a).unwrap_err(), Refusal::Worker { limit: 2 });
        assert_eq!(tenant.in_flight(), 2, "a worker refusal gives the tenant's slot back");
        let third = admit(&tenant, &b).unwrap();
        assert_eq!(admit(&tenant, &b).unwrap_err(), Refusal::Tenant { limit: 3 });
        assert_eq!(tenant.snapshot(), SlotsSnapshot { max_instances: 3, in_flight: 3, refused: 1 });
        assert_eq!((a.snapshot().refused, b.snapshot().refused), (1, 0));
        drop(first);
        assert_eq!((tenant.in_flight(), a.in_flight()), (2, 1));
        let again = admit(&tenant, &a).unwrap();
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
                        if let Ok(slot) = admit(&tenant, &worker) {
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
}
