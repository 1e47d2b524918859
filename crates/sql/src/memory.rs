//! SQLite's memory: a process-wide cap, and a budget per tenant call.
//!
//! `sqlite3_hard_heap_limit64` caps the whole process, but one statement
//! that reaches it makes every other tenant's statements fail for lack of
//! memory until it is gone. So SQLite's allocator is wrapped: each call a
//! tenant makes has a budget of bytes that it may allocate (net of what it
//! frees) on its thread, and an allocation past the budget fails, which
//! fails that statement alone ("out of memory", reported as
//! [`crate::database::SqlError::TooComplex`]). Views that expand to
//! thousands of copies of a large `CASE` while SQLite prepares them are
//! stopped this way after a few MiB, long before the process feels it.
//!
//! The same wrapper makes an interrupt reach every part of a statement:
//! SQLite checks for interrupts only at some points while it prepares a
//! statement, and none while it expands views, but it allocates all the
//! time. While a statement is [`Stoppable`], an allocation on its thread
//! fails once the statement was told to stop.
//!
//! The wrapper must be installed before SQLite is first used in the
//! process ([`limit_memory`]); where it is not, budgets have no effect and
//! only the process-wide cap holds.

use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

use std::sync::Arc;

use rusqlite::ffi;

use crate::functions::StopSignal;

thread_local! {
    /// Bytes the call running on this thread may still allocate; `None`
    /// for no budget (the host's own work, other threads).
    static BUDGET: Cell<Option<i64>> = const { Cell::new(None) };
    /// The stop signal of the statement running on this thread.
    static STOP: RefCell<Option<Arc<StopSignal>>> = const { RefCell::new(None) };
}

/// SQLite's own allocator, which the wrapper calls.
struct Original(ffi::sqlite3_mem_methods);

// SAFETY: the methods are plain C functions that SQLite itself calls from
// any thread; `pAppData` is null for the default allocator and, if set, is
// owned by SQLite and only passed back to those functions.
unsafe impl Sync for Original {}
// SAFETY: see `Sync`.
unsafe impl Send for Original {}

static ORIGINAL: OnceLock<Original> = OnceLock::new();

/// What [`limit_memory`] could put in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimits {
    /// The process-wide cap in force, in bytes.
    pub heap_limit: u64,
    /// Whether per-call budgets take effect.
    pub budgets: bool,
}

/// Installs the per-call budgets (if SQLite has not been used yet in this
/// process) and caps SQLite's heap at `heap_bytes`, with a soft limit at
/// half of it that makes SQLite shrink its page caches first. Takes effect
/// once per process; later calls return what the first one did.
pub fn limit_memory(heap_bytes: u64) -> MemoryLimits {
    static SET: OnceLock<MemoryLimits> = OnceLock::new();
    *SET.get_or_init(|| {
        let budgets = install();
        let bytes = i64::try_from(heap_bytes).unwrap_or(i64::MAX);
        // SAFETY: both calls only set a process-wide integer under SQLite's
        // own mutex; they may be made at any time, from any thread.
        unsafe {
            ffi::sqlite3_hard_heap_limit64(bytes);
            ffi::sqlite3_soft_heap_limit64(bytes / 2);
        }
        if !budgets {
            tracing::warn!("SQLite was in use before its allocator could be wrapped: per-statement memory budgets are off");
        }
        MemoryLimits { heap_limit: u64::try_from(bytes).unwrap_or(0), budgets }
    })
}

/// Wraps SQLite's allocator; false if SQLite is already initialized.
fn install() -> bool {
    let mut original = ffi::sqlite3_mem_methods {
        xMalloc: None,
        xFree: None,
        xRealloc: None,
        xSize: None,
        xRoundup: None,
        xInit: None,
        xShutdown: None,
        pAppData: std::ptr::null_mut(),
    };
    // SAFETY: SQLITE_CONFIG_GETMALLOC takes one pointer to a
    // sqlite3_mem_methods, which it fills; `original` is one and outlives
    // the call.
    let rc = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETMALLOC, &raw mut original) };
    if rc != ffi::SQLITE_OK || original.xMalloc.is_none() || original.xSize.is_none() {
        return false;
    }
    if ORIGINAL.set(Original(original)).is_err() {
        return false;
    }
    let Some(Original(original)) = ORIGINAL.get() else { return false };
    let wrapped = ffi::sqlite3_mem_methods {
        xMalloc: Some(budget_malloc),
        xFree: Some(budget_free),
        xRealloc: Some(budget_realloc),
        xSize: original.xSize,
        xRoundup: original.xRoundup,
        xInit: original.xInit,
        xShutdown: original.xShutdown,
        pAppData: original.pAppData,
    };
    // SAFETY: SQLITE_CONFIG_MALLOC takes one pointer to a
    // sqlite3_mem_methods and copies it; it fails with SQLITE_MISUSE once
    // SQLite is initialized, and then nothing changed.
    let rc = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &raw const wrapped) };
    rc == ffi::SQLITE_OK
}

/// While it lives, the current thread's SQLite allocations are limited to
/// `bytes` more than it frees.
pub(crate) struct Budget {
    previous: Option<i64>,
}

impl Budget {
    pub(crate) fn start(bytes: usize) -> Budget {
        let previous = BUDGET.with(|b| b.replace(Some(i64::try_from(bytes).unwrap_or(i64::MAX))));
        Budget { previous }
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        BUDGET.with(|b| b.set(self.previous));
    }
}

/// While it lives, allocations on the current thread fail once `stop` is
/// set.
pub(crate) struct Stoppable(());

impl Stoppable {
    pub(crate) fn start(stop: &Arc<StopSignal>) -> Stoppable {
        STOP.with(|s| *s.borrow_mut() = Some(Arc::clone(stop)));
        Stoppable(())
    }
}

impl Drop for Stoppable {
    fn drop(&mut self) {
        STOP.with(|s| *s.borrow_mut() = None);
    }
}

/// Takes `n` bytes from this thread's budget; false if they are not there,
/// or the statement on this thread was told to stop.
fn charge(n: i64) -> bool {
    let stopped = STOP.try_with(|s| s.try_borrow().is_ok_and(|s| s.as_ref().is_some_and(|s| s.is_stopped()))).unwrap_or(false);
    if stopped {
        return false;
    }
    BUDGET
        .try_with(|b| match b.get() {
            None => true,
            Some(left) if left >= n => {
                b.set(Some(left - n));
                true
            }
            Some(_) => false,
        })
        .unwrap_or(true)
}

fn refund(n: i64) {
    let _ = BUDGET.try_with(|b| {
        if let Some(left) = b.get() {
            b.set(Some(left.saturating_add(n)));
        }
    });
}

fn original() -> &'static ffi::sqlite3_mem_methods {
    &ORIGINAL.get().expect("the wrapper is only installed after the original is stored").0
}

unsafe extern "C" fn budget_malloc(n: c_int) -> *mut c_void {
    if !charge(i64::from(n)) {
        return std::ptr::null_mut();
    }
    let malloc = original().xMalloc.expect("checked at install");
    // SAFETY: the original allocator's own contract, unchanged.
    let p = unsafe { malloc(n) };
    if p.is_null() {
        refund(i64::from(n));
    }
    p
}

unsafe extern "C" fn budget_free(p: *mut c_void) {
    let methods = original();
    if !p.is_null() {
        let size = methods.xSize.expect("checked at install");
        // SAFETY: `p` came from this allocator and is still live.
        refund(i64::from(unsafe { size(p) }));
    }
    if let Some(free) = methods.xFree {
        // SAFETY: the original allocator's own contract, unchanged.
        unsafe { free(p) }
    }
}

unsafe extern "C" fn budget_realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    let methods = original();
    let size = methods.xSize.expect("checked at install");
    // SAFETY: SQLite never reallocates a null pointer through this method.
    let old = if p.is_null() { 0 } else { i64::from(unsafe { size(p) }) };
    let grow = i64::from(n) - old;
    if grow > 0 && !charge(grow) {
        return std::ptr::null_mut();
    }
    let Some(realloc) = methods.xRealloc else { return std::ptr::null_mut() };
    // SAFETY: the original allocator's own contract, unchanged.
    let q = unsafe { realloc(p, n) };
    if q.is_null() {
        if grow > 0 {
            refund(grow);
        }
    } else if grow < 0 {
        refund(-grow);
    }
    q
}
