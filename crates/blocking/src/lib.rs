//! Bounded pools of blocking threads for the work the host does on a
//! guest's behalf (key-value and SQL calls, secret reads).
//!
//! tokio's blocking pool is shared by everything in the process, its queue
//! is unbounded, and a task on it runs to the end even when nobody waits for
//! its result any more. A guest could fill it with slow calls and make every
//! other tenant's calls wait behind them. A [`BlockingPool`] instead has:
//!
//! - **Its own threads**, a fixed number, so one kind of work (SQL) cannot
//!   take the threads of another (key-value).
//! - **A per-tenant cap on threads**: a job starts only while its tenant runs
//!   fewer than `tenant_threads` jobs; the worker threads take the oldest job
//!   whose tenant is under its cap, so one tenant's backlog never stands in
//!   front of another tenant's call.
//! - **A bounded queue**, overall and per tenant. A job that does not fit is
//!   refused at once with [`PoolError`], never left waiting without bound.
//! - **Cancellation**: dropping the [`Job`] (the request ended: its wall-clock
//!   limit passed, or its client went away) removes a queued job without
//!   running it, and stops a running one through the interrupt the job
//!   registered with [`JobContext::set_interrupt`].
//! - **Deadlines**: a running job may set one ([`JobContext::set_deadline`]);
//!   a watchdog thread fires the job's interrupt when it passes, and fires it
//!   again every [`REFIRE`] until the job returns, because an interrupt that
//!   lands between two steps of the job could otherwise be missed.
//! - **Shutdown**: dropping the pool (or [`BlockingPool::shutdown`]) drops
//!   every queued job and interrupts the running ones, so a process that
//!   stops does not wait for storage work queued by requests.
//!
//! The CPU time a job spends on its thread is measured and returned with
//! its result ([`Finished::cpu_time`]), so the caller can charge it to the
//! request that asked for it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How often the watchdog fires the interrupt of a job that was told to stop
/// and is still running.
pub const REFIRE: Duration = Duration::from_millis(10);

/// The size of a pool and what one tenant may hold of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Names the threads (`cordon-<name>-<i>`) and appears in errors.
    pub name: &'static str,
    /// Threads that run jobs.
    pub threads: usize,
    /// Jobs of one tenant that may run at once (at most `threads`).
    pub tenant_threads: usize,
    /// Jobs that may wait for a thread, over all tenants.
    pub queue: usize,
    /// Jobs of one tenant that may wait for a thread.
    pub tenant_queue: usize,
}

/// Why a job was not run, or did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("too many {pool} calls are waiting on this server (at most {max}); retry shortly")]
    QueueFull { pool: &'static str, max: usize },
    #[error("this tenant already has {max} {pool} calls waiting (at most {max} per tenant); retry shortly, or make fewer calls at once")]
    TenantQueueFull { pool: &'static str, max: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the {pool} call failed inside the host")]
    Panicked { pool: &'static str },
}

/// Why a running job was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Its [`Job`] was dropped: nobody waits for the result.
    Cancelled,
    /// The deadline it set passed.
    DeadlinePassed,
    /// The pool shuts down.
    Shutdown,
}

impl StopReason {
    fn code(self) -> u8 {
        match self {
            StopReason::Cancelled => 1,
            StopReason::DeadlinePassed => 2,
            StopReason::Shutdown => 3,
        }
    }

    fn from_code(code: u8) -> Option<StopReason> {
        match code {
            1 => Some(StopReason::Cancelled),
            2 => Some(StopReason::DeadlinePassed),
            3 => Some(StopReason::Shutdown),
            _ => None,
        }
    }
}

/// A job's result and the CPU time its thread spent on it.
#[derive(Debug)]
pub struct Finished<T> {
    pub value: T,
    pub cpu_time: Duration,
}

/// CPU time spent on pool threads for one request; the runtime adds it to
/// the request's CPU meter, so host work counts against `cpu_ms`.
#[derive(Debug, Clone, Default)]
pub struct CpuCharge(Arc<AtomicU64>);

impl CpuCharge {
    pub fn add(&self, time: Duration) {
        self.0.fetch_add(u64::try_from(time.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn total(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// Counters of one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    pub running: usize,
    pub queued: usize,
    /// Jobs refused because a queue was full.
    pub rejected_total: u64,
    /// Queued jobs dropped without running because their caller went away.
    pub dropped_total: u64,
    /// Jobs that ran to the end.
    pub completed_total: u64,
}

type Interrupt = Box<dyn Fn() + Send + Sync>;

/// One job's stop flag, interrupt and deadline, shared by the job, its
/// [`Job`] handle and the watchdog.
struct Ticket {
    id: u64,
    stop: AtomicU8,
    inner: Mutex<TicketInner>,
}

#[derive(Default)]
struct TicketInner {
    interrupt: Option<Interrupt>,
    deadline: Option<Instant>,
}

impl Ticket {
    fn stop_reason(&self) -> Option<StopReason> {
        StopReason::from_code(self.stop.load(Ordering::Acquire))
    }

    /// Records the first reason and fires the interrupt.
    fn stop(&self, reason: StopReason) {
        let _ = self.stop.compare_exchange(0, reason.code(), Ordering::AcqRel, Ordering::Acquire);
        self.fire();
    }

    /// Calls the interrupt with the lock held, so that once
    /// [`JobContext::clear_interrupt`] returns, no call of it is under way
    /// (the job may hand what it interrupts to someone else right after).
    fn fire(&self) {
        if let Some(interrupt) = &lock(&self.inner).interrupt {
            interrupt();
        }
    }
}

/// What a running job can do with the pool: register how to stop it, and
/// when. Code deep inside a job finds it with [`JobContext::current`].
#[derive(Clone)]
pub struct JobContext {
    ticket: Arc<Ticket>,
    shared: Arc<Shared>,
}

thread_local! {
    static CURRENT: std::cell::RefCell<Option<JobContext>> = const { std::cell::RefCell::new(None) };
}

impl JobContext {
    /// The job running on this thread, if it is a pool thread running one.
    pub fn current() -> Option<JobContext> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// `interrupt` is called (from another thread) when the job must stop:
    /// its caller went away, its deadline passed or the pool shuts down; and
    /// again every [`REFIRE`] until the job returns. If the job was already
    /// told to stop, it is called at once.
    pub fn set_interrupt(&self, interrupt: impl Fn() + Send + Sync + 'static) {
        lock(&self.ticket.inner).interrupt = Some(Box::new(interrupt));
        if self.ticket.stop_reason().is_some() {
            self.ticket.fire();
        }
    }

    /// Removes the interrupt: what it would stop is over. Waits for a call
    /// of it that is under way.
    pub fn clear_interrupt(&self) {
        lock(&self.ticket.inner).interrupt = None;
    }

    /// The watchdog stops the job at `deadline` (`None`: no deadline).
    /// A job that runs several steps sets one per step.
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        lock(&self.ticket.inner).deadline = deadline;
        if deadline.is_some() {
            // Taking the state lock orders this with the watchdog's wait.
            let _state = lock(&self.shared.state);
            self.shared.watch.notify_one();
        }
    }

    /// Why the job was told to stop, if it was.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.ticket.stop_reason()
    }
}

type Run = Box<dyn FnOnce(&JobContext) + Send>;

struct Queued {
    ticket: Arc<Ticket>,
    tenant: Arc<str>,
    run: Run,
}

#[derive(Default)]
struct TenantLoad {
    running: usize,
    queued: usize,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    tenants: HashMap<Arc<str>, TenantLoad>,
    running: Vec<Arc<Ticket>>,
    shutdown: bool,
    next_id: u64,
}

impl State {
    fn forget_idle_tenant(&mut self, tenant: &str) {
        if self.tenants.get(tenant).is_some_and(|t| t.running == 0 && t.queued == 0) {
            self.tenants.remove(tenant);
        }
    }
}

struct Shared {
    config: PoolConfig,
    state: Mutex<State>,
    /// Signalled when a job is queued or a thread frees up.
    work: Condvar,
    /// Signalled when the watchdog has something new to look at.
    watch: Condvar,
    rejected: AtomicU64,
    dropped: AtomicU64,
    completed: AtomicU64,
}

/// A pool of blocking threads; see the crate docs. Dropping it shuts it
/// down.
pub struct BlockingPool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BlockingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingPool").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

impl BlockingPool {
    /// Starts the pool's threads and its watchdog. Sizes below 1 are taken
    /// as 1, and `tenant_threads` as at most `threads`.
    pub fn new(mut config: PoolConfig) -> BlockingPool {
        config.threads = config.threads.max(1);
        config.tenant_threads = config.tenant_threads.clamp(1, config.threads);
        config.queue = config.queue.max(1);
        config.tenant_queue = config.tenant_queue.clamp(1, config.queue);
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            watch: Condvar::new(),
            rejected: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            completed: AtomicU64::new(0),
        });
        let name = shared.config.name;
        for i in 0..shared.config.threads {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("cordon-{name}-{i}"))
                .spawn(move || work(&shared))
                .expect("spawning a blocking pool thread");
        }
        let watchdog = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("cordon-{name}-watch"))
            .spawn(move || watch(&watchdog))
            .expect("spawning a blocking pool watchdog");
        BlockingPool { shared }
    }

    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    /// Queues `job` for `tenant`. Refused at once when the pool's queue or
    /// the tenant's share of it is full, or the pool is shutting down. The
    /// returned [`Job`] resolves to the job's value; dropping it cancels
    /// the job.
    pub fn spawn<T, F>(&self, tenant: &str, job: F) -> Result<Job<T>, PoolError>
    where
        T: Send + 'static,
        F: FnOnce(&JobContext) -> T + Send + 'static,
    {
        let config = &self.shared.config;
        let (tx, rx) = oneshot::channel();
        let pool = config.name;
        let run: Run = Box::new(move |ctx: &JobContext| {
            let started = thread_cpu_time();
            let value = catch_unwind(AssertUnwindSafe(|| job(ctx)));
            let cpu_time = thread_cpu_time().saturating_sub(started);
            let _ = tx.send(value.map(|value| Finished { value, cpu_time }).map_err(|_| PoolError::Panicked { pool }));
        });
        let mut state = lock(&self.shared.state);
        if state.shutdown {
            return Err(PoolError::ShuttingDown);
        }
        if state.queue.len() >= config.queue {
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(PoolError::QueueFull { pool, max: config.queue });
        }
        if state.tenants.get(tenant).is_some_and(|t| t.queued >= config.tenant_queue) {
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(PoolError::TenantQueueFull { pool, max: config.tenant_queue });
        }
        let tenant: Arc<str> = match state.tenants.get_key_value(tenant) {
            Some((key, _)) => Arc::clone(key),
            None => Arc::from(tenant),
        };
        state.tenants.entry(Arc::clone(&tenant)).or_default().queued += 1;
        state.next_id += 1;
        let ticket = Arc::new(Ticket { id: state.next_id, stop: AtomicU8::new(0), inner: Mutex::new(TicketInner::default()) });
        state.queue.push_back(Queued { ticket: Arc::clone(&ticket), tenant, run });
        drop(state);
        self.shared.work.notify_one();
        Ok(Job { rx, ticket, shared: Arc::clone(&self.shared), done: false })
    }

    /// Drops every queued job (their [`Job`]s resolve to
    /// [`PoolError::ShuttingDown`]) and interrupts the running ones. The
    /// threads end once their job returns; nothing here waits for them.
    pub fn shutdown(&self) {
        let (queued, running) = {
            let mut state = lock(&self.shared.state);
            state.shutdown = true;
            let queued: Vec<Queued> = state.queue.drain(..).collect();
            for q in &queued {
                if let Some(t) = state.tenants.get_mut(&q.tenant) {
                    t.queued = t.queued.saturating_sub(1);
                }
            }
            (queued, state.running.clone())
        };
        // Outside the lock: dropping a job drops what it captured.
        drop(queued);
        for ticket in running {
            ticket.stop(StopReason::Shutdown);
        }
        self.shared.work.notify_all();
        self.shared.watch.notify_all();
    }

    pub fn stats(&self) -> PoolStats {
        let state = lock(&self.shared.state);
        PoolStats {
            running: state.running.len(),
            queued: state.queue.len(),
            rejected_total: self.shared.rejected.load(Ordering::Relaxed),
            dropped_total: self.shared.dropped.load(Ordering::Relaxed),
            completed_total: self.shared.completed.load(Ordering::Relaxed),
        }
    }
}

impl Drop for BlockingPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A queued or running job. Resolves to its result; dropping it before then
/// cancels the job (see the crate docs).
pub struct Job<T> {
    rx: oneshot::Receiver<Result<Finished<T>, PoolError>>,
    ticket: Arc<Ticket>,
    shared: Arc<Shared>,
    done: bool,
}

impl<T> Future for Job<T> {
    type Output = Result<Finished<T>, PoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                self.done = true;
                // The sender is dropped unsent only when shutdown dropped the job.
                Poll::Ready(result.unwrap_or(Err(PoolError::ShuttingDown)))
            }
        }
    }
}

impl<T> Drop for Job<T> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let removed = {
            let mut state = lock(&self.shared.state);
            match state.queue.iter().position(|q| q.ticket.id == self.ticket.id) {
                Some(i) => {
                    let queued = state.queue.remove(i).expect("the position is in the queue");
                    if let Some(t) = state.tenants.get_mut(&queued.tenant) {
                        t.queued = t.queued.saturating_sub(1);
                    }
                    state.forget_idle_tenant(&queued.tenant);
                    Some(queued)
                }
                None => None,
            }
        };
        match removed {
            Some(queued) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                drop(queued);
            }
            // Running (or just finished): stop it.
            None => {
                self.ticket.stop(StopReason::Cancelled);
                let _state = lock(&self.shared.state);
                self.shared.watch.notify_one();
            }
        }
    }
}

/// A pool thread: runs the oldest job whose tenant is under its cap.
fn work(shared: &Arc<Shared>) {
    let cap = shared.config.tenant_threads;
    let mut state = lock(&shared.state);
    loop {
        if state.shutdown {
            return;
        }
        let next = state.queue.iter().position(|q| state.tenants.get(&q.tenant).is_none_or(|t| t.running < cap));
        let Some(i) = next else {
            state = shared.work.wait(state).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        let job = state.queue.remove(i).expect("the position is in the queue");
        let load = state.tenants.entry(Arc::clone(&job.tenant)).or_default();
        load.queued = load.queued.saturating_sub(1);
        load.running += 1;
        state.running.push(Arc::clone(&job.ticket));
        drop(state);

        let Queued { ticket, tenant, run } = job;
        let ctx = JobContext { ticket: Arc::clone(&ticket), shared: Arc::clone(shared) };
        CURRENT.with(|c| *c.borrow_mut() = Some(ctx.clone()));
        run(&ctx);
        CURRENT.with(|c| *c.borrow_mut() = None);
        drop(ctx);
        shared.completed.fetch_add(1, Ordering::Relaxed);
        lock(&ticket.inner).interrupt = None;

        state = lock(&shared.state);
        state.running.retain(|t| t.id != ticket.id);
        if let Some(t) = state.tenants.get_mut(&tenant) {
            t.running = t.running.saturating_sub(1);
        }
        state.forget_idle_tenant(&tenant);
        if !state.queue.is_empty() {
            // A job of this tenant may have been waiting for the cap.
            shared.work.notify_all();
        }
    }
}

/// The watchdog: stops running jobs whose deadline passed, and fires the
/// interrupt of stopped jobs again until they return.
fn watch(shared: &Shared) {
    let mut state = lock(&shared.state);
    loop {
        if state.shutdown && state.running.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        for ticket in &state.running {
            // Read first: the guard must be gone before `stop` fires the interrupt.
            let deadline = lock(&ticket.inner).deadline;
            let at = match ticket.stop_reason() {
                Some(_) => {
                    ticket.fire();
                    now + REFIRE
                }
                None => match deadline {
                    None => continue,
                    Some(at) if at > now => at,
                    Some(_) => {
                        ticket.stop(StopReason::DeadlinePassed);
                        now + REFIRE
                    }
                },
            };
            wake = Some(wake.map_or(at, |w| w.min(at)));
        }
        state = match wake {
            None if state.shutdown => return,
            None => shared.watch.wait(state).unwrap_or_else(|p| p.into_inner()),
            Some(at) => shared.watch.wait_timeout(state, at.saturating_duration_since(Instant::now())).unwrap_or_else(|p| p.into_inner()).0,
        };
    }
}

/// CPU time of the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec, and CLOCK_THREAD_CPUTIME_ID
    // is supported on every Linux kernel Cordon runs on.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

/// The state here stays consistent whatever a panicking holder did (jobs
/// run outside the lock, under `catch_unwind`).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests;
