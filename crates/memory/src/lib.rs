//! Memory budgets.
//!
//! Every byte a request makes the host hold is charged to its [`Account`]:
//! the guest's linear memory and tables as they grow, and the host-side
//! buffers made for it (outgoing body channels, header fields, batch
//! results, its fiber stack). An account charges three limits at once, all
//! or nothing:
//!
//! - the request's own (`limits.memory_mb`), so that a request fails with
//!   `memory_limit_exceeded` whichever side allocated;
//! - its tenant's [`Budget`], so that one tenant at its budget leaves the
//!   rest of the process's memory to the others;
//! - the process's [`Budget`], which [`host`] checks at start against the
//!   machine's memory and its cgroup limit.
//!
//! An account gives back everything still charged when it is dropped, which
//! is when the instance's store is dropped: memory is held until the
//! instance is gone, not until the response is sent.

pub mod host;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use serde::Serialize;

/// A limit on bytes held at once, shared by many accounts: a tenant's or
/// the process's.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    refused: AtomicU64,
}

impl Budget {
    pub fn new(limit_bytes: u64) -> Arc<Budget> {
        Arc::new(Budget { limit: limit_bytes, used: AtomicU64::new(0), refused: AtomicU64::new(0) })
    }

    /// Charges `bytes` unless that takes the total past the limit.
    fn try_charge(&self, bytes: u64) -> bool {
        let charged = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(bytes).filter(|total| *total <= self.limit))
            .is_ok();
        if !charged {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        charged
    }

    fn release(&self, bytes: u64) {
        let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(before >= bytes, "a budget gave back more than was charged");
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> BudgetSnapshot {
        BudgetSnapshot { limit_bytes: self.limit, used_bytes: self.used(), refused: self.refused.load(Ordering::Relaxed) }
    }
}

/// A budget's state, as shown on `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BudgetSnapshot {
    pub limit_bytes: u64,
    pub used_bytes: u64,
    /// Charges refused because this budget was full, since start.
    pub refused: u64,
}

/// Which limit refused a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OverBudget {
    #[error("the request would hold more than its memory limit of {} MiB", limit >> 20)]
    Request { limit: u64 },
    #[error("the tenant's requests would hold more than its memory budget of {} MiB; retry shortly", limit >> 20)]
    Tenant { limit: u64 },
    #[error("the server's requests would hold more than its memory budget of {} MiB; retry shortly", limit >> 20)]
    Process { limit: u64 },
}

impl OverBudget {
    fn tag(self) -> u8 {
        match self {
            OverBudget::Request { .. } => 1,
            OverBudget::Tenant { .. } => 2,
            OverBudget::Process { .. } => 3,
        }
    }
}

/// The memory of one request (one instance), charged against the request's
/// own limit, its tenant's budget and the process's.
#[derive(Debug)]
pub struct Account {
    limit: u64,
    /// Bytes charged against `limit`.
    used: AtomicU64,
    /// Bytes charged against the budgets only (the fiber stack and the
    /// instance's bookkeeping, whose per-request bound is fixed by config).
    outside_request: AtomicU64,
    tenant: Arc<Budget>,
    process: Arc<Budget>,
    /// The first limit that refused a charge, as [`OverBudget::tag`].
    refused: AtomicU8,
}

impl Account {
    pub fn new(limit_bytes: u64, tenant: Arc<Budget>, process: Arc<Budget>) -> Account {
        Account {
            limit: limit_bytes,
            used: AtomicU64::new(0),
            outside_request: AtomicU64::new(0),
            tenant,
            process,
            refused: AtomicU8::new(0),
        }
    }

    /// Charges `bytes` against the request's limit and both budgets, or
    /// charges nothing and says which limit refused.
    pub fn charge(&self, bytes: u64) -> Result<(), OverBudget> {
        if self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(bytes).filter(|t| *t <= self.limit)).is_err()
        {
            return Err(self.refuse(OverBudget::Request { limit: self.limit }));
        }
        if let Err(e) = self.charge_budgets(bytes) {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            return Err(e);
        }
        Ok(())
    }

    /// Gives back `bytes` of what [`Account::charge`] took.
    pub fn release(&self, bytes: u64) {
        let bytes = bytes.min(self.used.load(Ordering::Acquire));
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.tenant.release(bytes);
        self.process.release(bytes);
    }

    /// Charges `bytes` against the tenant's and the process's budgets only:
    /// for what every instance holds whatever its code does, such as its
    /// fiber stack. Given back when the account is dropped.
    pub fn charge_outside_request(&self, bytes: u64) -> Result<(), OverBudget> {
        self.charge_budgets(bytes)?;
        self.outside_request.fetch_add(bytes, Ordering::AcqRel);
        Ok(())
    }

    /// [`Account::charge`], given back when the returned guard is dropped:
    /// for buffers that live only as long as one host call.
    pub fn hold(self: &Arc<Self>, bytes: u64) -> Result<Held, OverBudget> {
        self.charge(bytes)?;
        Ok(Held { account: self.clone(), bytes })
    }

    fn charge_budgets(&self, bytes: u64) -> Result<(), OverBudget> {
        if !self.tenant.try_charge(bytes) {
            return Err(self.refuse(OverBudget::Tenant { limit: self.tenant.limit }));
        }
        if !self.process.try_charge(bytes) {
            self.tenant.release(bytes);
            return Err(self.refuse(OverBudget::Process { limit: self.process.limit }));
        }
        Ok(())
    }

    fn refuse(&self, why: OverBudget) -> OverBudget {
        let _ = self.refused.compare_exchange(0, why.tag(), Ordering::AcqRel, Ordering::Acquire);
        why
    }

    /// The first limit that refused a charge of this account, if any.
    pub fn refused(&self) -> Option<OverBudget> {
        match self.refused.load(Ordering::Acquire) {
            1 => Some(OverBudget::Request { limit: self.limit }),
            2 => Some(OverBudget::Tenant { limit: self.tenant.limit }),
            3 => Some(OverBudget::Process { limit: self.process.limit }),
            _ => None,
        }
    }

    /// Bytes charged against the request's own limit.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let bytes = *self.used.get_mut() + *self.outside_request.get_mut();
        self.tenant.release(bytes);
        self.process.release(bytes);
    }
}

/// Bytes charged to an account until dropped.
#[derive(Debug)]
pub struct Held {
    account: Arc<Account>,
    bytes: u64,
}

impl Held {
    /// Charges `more` bytes to the same hold.
    pub fn grow(&mut self, more: u64) -> Result<(), OverBudget> {
        self.account.charge(more)?;
        self.bytes += more;
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.account.release(self.bytes);
    }
}

#[cfg(test)]
mod tests;
