//! The guest threads and the fair scheduler that decides which guest runs
//! on them.
//!
//! Guests do not run on the threads that serve the network. They run on a
//! pool of their own threads (`sandbox.guest_threads`), so that accepting,
//! reading, parsing and writing never wait behind guest code: a guest that
//! always has more to do keeps a guest thread busy, never a network thread.
//! The network threads hand a guest over by queueing it here, and the guest
//! hands its response back through a channel. Host work a guest waits for
//! (key-value, SQL, Postgres, name lookups, outbound requests) runs on other
//! threads; a waiting guest holds no guest thread.
//!
//! Which guest runs next is decided per tenant, not per request. Each
//! tenant has a virtual runtime: the guest CPU time it used, divided by its
//! weight. A guest thread that comes free takes the oldest waiting guest of
//! the tenant with the least virtual runtime, and runs it until it yields
//! (at every epoch tick, see `policy::EPOCH_TICK`) or waits. So a tenant
//! with 64 guests in flight gets no more CPU than a tenant with one, while
//! both want it, and weights 3:1 give 3:1. A tenant that was idle comes
//! back with a virtual runtime at most [`RETURN_CREDIT`] below the least
//! one waiting: it runs next, but cannot bank its idle time to shut the
//! others out later. The scheduler is work-conserving: a thread never idles
//! while any guest waits.
//!
//! A tenant that arrives while every guest thread runs another tenant that
//! is ahead of it does not wait for the next tick: the scheduler preempts
//! (it advances the engine's epoch, so every running guest yields at its
//! next check, within microseconds) and the newcomer runs next. This is
//! rate-limited to once per [`PREEMPT_INTERVAL`], so that a tenant cannot
//! make the others yield at will.
//!
//! The CPU time of each run is measured here, on the guest thread, and
//! charged both to the tenant (for the next decision) and to the request's
//! [`CpuMeter`] (for its `cpu_ms` limit), so queueing costs a request wall
//! time, never CPU time.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::oneshot;

use crate::meter::CpuMeter;

/// The weight of a tenant without one of its own (`sandbox.tenant_cpu_weight`
/// sets another default).
pub const DEFAULT_WEIGHT: u32 = 100;

/// How far below the least waiting virtual runtime a tenant that was idle
/// comes back, in nanoseconds of CPU at the default weight: two epoch ticks,
/// enough to run next, too little to bank idle time.
pub const RETURN_CREDIT: Duration = Duration::from_millis(2);

/// The least time between two preemptions.
pub const PREEMPT_INTERVAL: Duration = Duration::from_micros(250);

type GuestFuture = Pin<Box<dyn Future<Output = crate::executor::Outcome> + Send>>;

/// Makes every running guest yield at its next check: advances the engine's
/// epoch.
pub type Preempt = Box<dyn Fn() + Send + Sync>;

/// The guest threads and their run queues.
pub struct Scheduler {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a guest is queued and a thread is idle.
    work: Condvar,
    /// Signalled when a guest thread ends.
    stopped: Condvar,
    preempt: Option<Preempt>,
}

#[derive(Default)]
struct State {
    tenants: Vec<TenantQueue>,
    /// Tenants with a guest waiting, by virtual runtime.
    ready: BTreeSet<(u64, usize)>,
    /// The virtual runtime of the tenant picked last: where a tenant that
    /// comes back from idle starts from.
    floor: u64,
    /// Guests to drop (aborted while waiting): before any other work.
    aborted: VecDeque<Arc<Task>>,
    idle_threads: usize,
    /// The tenant each guest thread is running, by thread.
    running: Vec<Option<usize>>,
    last_preempt: Option<std::time::Instant>,
    stopping: bool,
    /// Guest threads that have not ended.
    threads_running: usize,
}

struct TenantQueue {
    weight: u32,
    /// CPU nanoseconds used, scaled by `DEFAULT_WEIGHT / weight`.
    vruntime: u64,
    waiting: VecDeque<Arc<Task>>,
}

/// A tenant as the scheduler knows it: its weight and the guest CPU it
/// used. What it has waiting or running is in the scheduler's state.
#[derive(Debug)]
pub struct TenantShare {
    index: usize,
    weight: u32,
    cpu_ns: AtomicU64,
}

/// A tenant's share of the guest threads, as shown on `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ShareSnapshot {
    pub cpu_weight: u32,
    /// Guest CPU time used since start, in microseconds.
    pub guest_cpu_us: u64,
    /// Guests ready to run that wait for a guest thread.
    pub runnable_waiting: u64,
    /// Guests running on a guest thread now.
    pub running: u64,
}

/// Where a task is. Transitions happen under compare-and-swap, so that a
/// wake and the end of a run never both queue a task.
const IDLE: u8 = 0;
const QUEUED: u8 = 1;
const RUNNING: u8 = 2;
/// Woken while running: queued again once the run ends.
const RUNNING_WOKEN: u8 = 3;
const DONE: u8 = 4;

struct Task {
    state: AtomicU8,
    aborted: std::sync::atomic::AtomicBool,
    future: Mutex<Option<GuestFuture>>,
    meter: Arc<CpuMeter>,
    tenant: Arc<TenantShare>,
    /// Entered while the guest runs, so that what the host does for it
    /// (timers, outbound connections) lives on the network's runtime.
    runtime: tokio::runtime::Handle,
    ended: Mutex<Option<oneshot::Sender<Ended>>>,
    shared: Weak<Shared>,
}

/// How a guest's task ended.
#[derive(Debug)]
pub(crate) enum Ended {
    Finished(crate::executor::Outcome),
    /// Aborted before it finished, or the scheduler stopped.
    Cancelled,
    /// The host panicked while running the guest.
    Panicked(String),
}

/// The handle of a queued guest: abort it, or wait for its end.
/// Stops a guest, if it still exists, like [`GuestHandle::abort`].
pub(crate) struct GuestAborter(Weak<Task>);

impl GuestAborter {
    pub(crate) fn abort(&self) {
        if let Some(task) = self.0.upgrade() {
            task.aborted.store(true, Ordering::Release);
            task.schedule();
        }
    }

    /// Whether the guest has ended and its task is gone.
    pub(crate) fn is_gone(&self) -> bool {
        self.0.strong_count() == 0
    }
}

pub(crate) struct GuestHandle {
    task: Arc<Task>,
    ended: oneshot::Receiver<Ended>,
}

impl GuestHandle {
    /// Stops the guest: it is dropped on a guest thread before any other
    /// guest runs, or when its current run ends.
    pub(crate) fn abort(&self) {
        self.task.aborted.store(true, Ordering::Release);
        self.task.schedule();
    }

    /// A way to stop this guest later that does not keep it alive.
    pub(crate) fn aborter(&self) -> GuestAborter {
        GuestAborter(Arc::downgrade(&self.task))
    }

    /// Ready once the guest has ended and its future has been dropped.
    /// Not polled again after that.
    pub(crate) fn poll_ended(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        Pin::new(&mut self.ended).poll(cx).map(|ended| ended.unwrap_or(Ended::Cancelled))
    }

    /// Waits until the guest has ended and its future has been dropped.
    #[cfg(test)]
    pub(crate) async fn ended(mut self) -> Ended {
        std::future::poll_fn(|cx| self.poll_ended(cx)).await
    }
}

impl Scheduler {
    /// Starts `threads` guest threads; `preempt`, when given, makes running
    /// guests yield early for a tenant that arrives behind them.
    pub fn start(threads: usize, preempt: Option<Preempt>) -> Scheduler {
        let threads = threads.max(1);
        let state = State { running: vec![None; threads], threads_running: threads, ..State::default() };
        let shared = Arc::new(Shared { state: Mutex::new(state), work: Condvar::new(), stopped: Condvar::new(), preempt });
        let threads = (0..threads)
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("cordon-guest-{i}"))
                    .spawn(move || shared.run_guests(i))
                    .expect("spawning a guest thread")
            })
            .collect();
        Scheduler { shared, threads }
    }

    /// Registers a tenant with `weight` (at least 1).
    pub fn tenant(&self, weight: u32) -> Arc<TenantShare> {
        let mut state = self.shared.lock();
        let index = state.tenants.len();
        let weight = weight.max(1);
        let share = Arc::new(TenantShare { index, weight, cpu_ns: AtomicU64::new(0) });
        let floor = state.floor;
        state.tenants.push(TenantQueue { weight, vruntime: floor, waiting: VecDeque::new() });
        share
    }

    /// Queues `guest` to run on the guest threads for `tenant`, its CPU
    /// charged to `meter`. Must be called inside a tokio runtime: the guest
    /// runs in its context.
    pub(crate) fn spawn(&self, tenant: &Arc<TenantShare>, meter: Arc<CpuMeter>, guest: GuestFuture) -> GuestHandle {
        let (tx, rx) = oneshot::channel();
        meter.queued();
        let task = Arc::new(Task {
            state: AtomicU8::new(IDLE),
            aborted: std::sync::atomic::AtomicBool::new(false),
            future: Mutex::new(Some(guest)),
            meter,
            tenant: tenant.clone(),
            runtime: tokio::runtime::Handle::current(),
            ended: Mutex::new(Some(tx)),
            shared: Arc::downgrade(&self.shared),
        });
        task.schedule();
        GuestHandle { task, ended: rx }
    }

    /// What `tenant` has used and has waiting or running now.
    pub fn snapshot(&self, tenant: &TenantShare) -> ShareSnapshot {
        let state = self.shared.lock();
        ShareSnapshot {
            cpu_weight: tenant.weight,
            guest_cpu_us: tenant.cpu_ns.load(Ordering::Relaxed) / 1000,
            runnable_waiting: state.tenants[tenant.index].waiting.len() as u64,
            running: state.running.iter().filter(|r| **r == Some(tenant.index)).count() as u64,
        }
    }

    /// The number of guest threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }
}

impl Scheduler {
    /// Stops the guest threads: queued guests are dropped, a guest woken
    /// from now on is dropped where it is woken, and each thread ends once
    /// its current run does. Waits up to `within` for that; a thread still
    /// running then (a host call that does not return) is left to the
    /// process's exit.
    ///
    /// Call it while the network's runtime still runs: a guest must not be
    /// run after the runtime that its timers and sockets live on is gone,
    /// which wakes them all.
    pub fn stop(&self, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        let mut state = self.shared.lock();
        state.stopping = true;
        self.shared.work.notify_all();
        while state.threads_running > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::warn!(threads = state.threads_running, "guest threads still running at shutdown; leaving them");
                return;
            }
            state = self.shared.stopped.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("threads", &self.threads.len()).finish_non_exhaustive()
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop(STOP_WAIT);
        // Joined if they ended; otherwise detached (see `stop`).
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// How long dropping the scheduler waits for its threads.
const STOP_WAIT: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn push(&self, task: Arc<Task>) {
        let mut state = self.lock();
        if state.stopping {
            // No thread will run it again.
            drop(state);
            task.drop_future();
            return;
        }
        if task.aborted.load(Ordering::Acquire) {
            state.aborted.push_back(task);
        } else {
            let floor = state.floor;
            let i = task.tenant.index;
            let t = &mut state.tenants[i];
            let was_empty = t.waiting.is_empty();
            if was_empty {
                // Back from idle: no more credit than RETURN_CREDIT.
                let credit = RETURN_CREDIT.as_nanos() as u64;
                t.vruntime = t.vruntime.max(floor.saturating_sub(credit));
            }
            t.waiting.push_back(task.clone());
            let key = (t.vruntime, i);
            if was_empty {
                state.ready.insert(key);
                self.preempt_for(&mut state, i);
            }
        }
        if state.idle_threads > 0 {
            drop(state);
            self.work.notify_one();
        }
    }

    /// Preempts the running guests if tenant `i`, newly waiting, is behind
    /// none of the tenants that hold every guest thread.
    fn preempt_for(&self, state: &mut State, i: usize) {
        let Some(preempt) = &self.preempt else { return };
        if state.idle_threads > 0 || state.running.contains(&Some(i)) {
            return;
        }
        let vruntime = state.tenants[i].vruntime;
        if !state.running.iter().flatten().any(|&r| state.tenants[r].vruntime > vruntime) {
            return;
        }
        let now = std::time::Instant::now();
        if state.last_preempt.is_some_and(|at| now.duration_since(at) < PREEMPT_INTERVAL) {
            return;
        }
        state.last_preempt = Some(now);
        preempt();
    }

    /// The next task to run: an aborted one, or the oldest waiting guest of
    /// the tenant with the least virtual runtime.
    fn pop(state: &mut State) -> Option<Arc<Task>> {
        if let Some(task) = state.aborted.pop_front() {
            return Some(task);
        }
        let (vruntime, i) = state.ready.pop_first()?;
        state.floor = state.floor.max(vruntime);
        let t = &mut state.tenants[i];
        let task = t.waiting.pop_front().expect("a ready tenant has a waiting guest");
        if !t.waiting.is_empty() {
            state.ready.insert((vruntime, i));
        }
        Some(task)
    }

    /// Adds `cpu_ns` of guest CPU to the tenant at `i`.
    fn charge(state: &mut State, i: usize, cpu_ns: u64) {
        let t = &mut state.tenants[i];
        let scaled = cpu_ns.saturating_mul(u64::from(DEFAULT_WEIGHT)) / u64::from(t.weight);
        let old = (t.vruntime, i);
        t.vruntime = t.vruntime.saturating_add(scaled);
        if !t.waiting.is_empty() {
            state.ready.remove(&old);
            let new = (state.tenants[i].vruntime, i);
            state.ready.insert(new);
        }
    }

    /// A guest thread's loop: take the next task, run it once, charge it.
    fn run_guests(self: Arc<Self>, thread: usize) {
        let mut charge: Option<(usize, u64)> = None;
        loop {
            let task = {
                let mut state = self.lock();
                state.running[thread] = None;
                if let Some((i, ns)) = charge.take() {
                    Self::charge(&mut state, i, ns);
                }
                let task = loop {
                    // Once stopping, only aborted guests are taken (to be
                    // dropped): a guest that always yields would otherwise
                    // keep its thread to its limits.
                    let next = if state.stopping { state.aborted.pop_front() } else { Self::pop(&mut state) };
                    if let Some(task) = next {
                        break task;
                    }
                    if state.stopping {
                        let left: Vec<_> = state.tenants.iter_mut().flat_map(|t| t.waiting.drain(..)).collect();
                        state.ready.clear();
                        drop(state);
                        for task in left {
                            task.drop_future();
                        }
                        self.lock().threads_running -= 1;
                        self.stopped.notify_all();
                        return;
                    }
                    state.idle_threads += 1;
                    state = self.work.wait(state).unwrap_or_else(|p| p.into_inner());
                    state.idle_threads -= 1;
                };
                state.running[thread] = Some(task.tenant.index);
                task
            };
            if let Some(spent) = task.run() {
                charge = Some((task.tenant.index, spent));
            }
        }
    }
}

impl Task {
    /// Queues the task unless it is queued, running (then it is queued
    /// again when the run ends) or done.
    fn schedule(self: &Arc<Self>) {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let next = match current {
                IDLE => QUEUED,
                RUNNING => RUNNING_WOKEN,
                _ => return,
            };
            match self.state.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) if next == QUEUED => break,
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
        match self.shared.upgrade() {
            Some(shared) => shared.push(self.clone()),
            // The scheduler is gone: nothing will run the guest again.
            None => self.drop_future(),
        }
    }

    /// Drops the guest without running it again, in the runtime's context
    /// (its store may hold timers), and reports it cancelled.
    fn drop_future(&self) {
        let future = lock(&self.future).take();
        let guard = self.runtime.enter();
        drop(future);
        drop(guard);
        self.finish(Ended::Cancelled);
    }

    /// Runs the guest until it yields, waits or ends, and returns the CPU
    /// time it used; `None` when the task was only dropped.
    fn run(self: &Arc<Self>) -> Option<u64> {
        self.state.store(RUNNING, Ordering::Release);
        if self.aborted.load(Ordering::Acquire) {
            self.drop_future();
            return None;
        }
        let mut slot = lock(&self.future);
        let Some(future) = slot.as_mut() else {
            drop(slot);
            self.finish(Ended::Cancelled);
            return None;
        };
        let waker = Waker::from(self.clone());
        let mut cx = Context::from_waker(&waker);
        let _guard = self.runtime.enter();
        self.meter.enter();
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| future.as_mut().poll(&mut cx)));
        let spent = self.meter.exit();
        self.tenant.cpu_ns.fetch_add(spent, Ordering::Relaxed);
        match polled {
            Ok(Poll::Pending) => {
                drop(slot);
                // Queue again if woken during the run (a yield wakes itself).
                if self.state.compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire).is_err() {
                    self.state.store(IDLE, Ordering::Release);
                    self.schedule();
                } else if self.aborted.load(Ordering::Acquire) {
                    // Aborted during the run, after the abort's own wake
                    // found it running and before it went idle.
                    self.schedule();
                }
            }
            Ok(Poll::Ready(outcome)) => {
                let future = slot.take();
                drop(slot);
                drop(future);
                self.finish(Ended::Finished(outcome));
            }
            Err(panic) => {
                let future = slot.take();
                drop(slot);
                drop(future);
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                tracing::error!(panic = %message, "the host panicked while running a guest");
                self.finish(Ended::Panicked(message));
            }
        }
        Some(spent)
    }

    fn finish(&self, ended: Ended) {
        self.state.store(DONE, Ordering::Release);
        if let Some(tx) = lock(&self.ended).take() {
            let _ = tx.send(ended);
        }
    }
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        self.schedule();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.schedule();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    use super::*;
    use crate::executor::Outcome;

    /// A guest that burns CPU in slices of about `slice`, yielding after each
    /// one as an epoch tick would make it, until `stop` is set.
    fn spinner(stop: Arc<AtomicBool>, slice: Duration) -> GuestFuture {
        Box::pin(std::future::poll_fn(move |cx| {
            if stop.load(Ordering::Relaxed) {
                return Poll::Ready(Outcome::Completed);
            }
            let started = Instant::now();
            while started.elapsed() < slice {
                std::hint::black_box(0u64);
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }))
    }

    fn shares(a: &TenantShare, b: &TenantShare) -> f64 {
        let (a, b) = (a.cpu_ns.load(Ordering::Relaxed) as f64, b.cpu_ns.load(Ordering::Relaxed) as f64);
        a / (a + b)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn busy_tenants_get_cpu_by_weight_not_by_guests() {
        for (weights, expected) in [((100, 100), 0.5), ((300, 100), 0.75)] {
            let scheduler = Scheduler::start(2, None);
            let (a, b) = (scheduler.tenant(weights.0), scheduler.tenant(weights.1));
            let stop = Arc::new(AtomicBool::new(false));
            // Two guests of `a` against twelve of `b`.
            let handles: Vec<_> = [(&a, 2), (&b, 12)]
                .into_iter()
                .flat_map(|(t, n)| (0..n).map(move |_| t))
                .map(|t| scheduler.spawn(t, Arc::default(), spinner(stop.clone(), Duration::from_micros(500))))
                .collect();
            tokio::time::sleep(Duration::from_millis(600)).await;
            stop.store(true, Ordering::Relaxed);
            for h in handles {
                assert!(matches!(h.ended().await, Ended::Finished(Outcome::Completed)));
            }
            let share = shares(&a, &b);
            assert!((share - expected).abs() < 0.1, "weights {weights:?}: a got {share:.3}, expected {expected}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_tenant_back_from_idle_runs_next_but_cannot_bank_its_idle_time() {
        let scheduler = Scheduler::start(1, None);
        let (busy, idle) = (scheduler.tenant(DEFAULT_WEIGHT), scheduler.tenant(DEFAULT_WEIGHT));
        let stop = Arc::new(AtomicBool::new(false));
        let hog = scheduler.spawn(&busy, Arc::default(), spinner(stop.clone(), Duration::from_micros(500)));
        tokio::time::sleep(Duration::from_millis(200)).await;
        // One short guest of the idle tenant runs within about a slice.
        let queued = Instant::now();
        let quick = scheduler.spawn(&idle, Arc::default(), Box::pin(async { Outcome::Completed }));
        assert!(matches!(quick.ended().await, Ended::Finished(Outcome::Completed)));
        assert!(queued.elapsed() < Duration::from_millis(50), "waited {:?}", queued.elapsed());
        // A tenant idle for 200 ms then busy shares from then on: it does not
        // run alone for the 200 ms it missed.
        let late = scheduler.spawn(&idle, Arc::default(), spinner(stop.clone(), Duration::from_micros(500)));
        let before = (busy.cpu_ns.load(Ordering::Relaxed), idle.cpu_ns.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = (busy.cpu_ns.load(Ordering::Relaxed), idle.cpu_ns.load(Ordering::Relaxed));
        stop.store(true, Ordering::Relaxed);
        let (b, i) = ((after.0 - before.0) as f64, (after.1 - before.1) as f64);
        assert!(i / (b + i) < 0.7, "the returning tenant took {:.2} of the thread", i / (b + i));
        hog.ended().await;
        late.ended().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_tenant_arriving_behind_a_busy_one_preempts_its_slice() {
        // The epoch as a counter that the busy guest watches, as wasm code
        // checks the engine's.
        let epoch = Arc::new(AtomicU64::new(0));
        let bump = epoch.clone();
        let scheduler = Scheduler::start(
            1,
            Some(Box::new(move || {
                bump.fetch_add(1, Ordering::Relaxed);
            })),
        );
        let (busy, victim) = (scheduler.tenant(DEFAULT_WEIGHT), scheduler.tenant(DEFAULT_WEIGHT));
        let stop = Arc::new(AtomicBool::new(false));
        let (stop_in_guest, epoch_in_guest) = (stop.clone(), epoch.clone());
        // Slices of 20 ms, unless the epoch moves.
        let hog = std::future::poll_fn(move |cx| {
            if stop_in_guest.load(Ordering::Relaxed) {
                return Poll::Ready(Outcome::Completed);
            }
            let (started, at) = (Instant::now(), epoch_in_guest.load(Ordering::Relaxed));
            while started.elapsed() < Duration::from_millis(20) && epoch_in_guest.load(Ordering::Relaxed) == at {
                std::hint::black_box(0u64);
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        let hog = scheduler.spawn(&busy, Arc::default(), Box::pin(hog));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut waits = Vec::new();
        for _ in 0..10 {
            let queued = Instant::now();
            scheduler.spawn(&victim, Arc::default(), Box::pin(async { Outcome::Completed })).ended().await;
            waits.push(queued.elapsed());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.store(true, Ordering::Relaxed);
        hog.ended().await;
        waits.sort();
        assert!(waits[5] < Duration::from_millis(5), "the newcomer waited {waits:?} behind 20 ms slices");
        assert!(epoch.load(Ordering::Relaxed) >= 5, "preempted {} times", epoch.load(Ordering::Relaxed));
    }

    /// A guest whose drop is recorded.
    struct DropFlag(Arc<AtomicBool>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn an_aborted_guest_is_dropped_whether_waiting_running_or_queued() {
        let scheduler = Scheduler::start(1, None);
        let tenant = scheduler.tenant(DEFAULT_WEIGHT);
        // Waiting on something that never comes.
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = DropFlag(dropped.clone());
        let waiting = scheduler.spawn(
            &tenant,
            Arc::default(),
            Box::pin(async move {
                let _flag = flag;
                std::future::pending::<()>().await;
                Outcome::Completed
            }),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiting.abort();
        assert!(matches!(waiting.ended().await, Ended::Cancelled));
        assert!(dropped.load(Ordering::Relaxed));
        // Always ready to run again.
        let stop = Arc::new(AtomicBool::new(false));
        let spinning = scheduler.spawn(&tenant, Arc::default(), spinner(stop.clone(), Duration::from_micros(200)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        spinning.abort();
        assert!(matches!(spinning.ended().await, Ended::Cancelled));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_panic_fails_its_guest_and_the_thread_serves_on() {
        let scheduler = Scheduler::start(1, None);
        let tenant = scheduler.tenant(DEFAULT_WEIGHT);
        let panicking = scheduler.spawn(&tenant, Arc::default(), Box::pin(async { panic!("host bug") }));
        assert!(matches!(panicking.ended().await, Ended::Panicked(m) if m == "host bug"));
        let fine = scheduler.spawn(&tenant, Arc::default(), Box::pin(async { Outcome::Completed }));
        assert!(matches!(fine.ended().await, Ended::Finished(Outcome::Completed)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn stopping_drops_guests_that_would_run_forever() {
        let scheduler = Scheduler::start(2, None);
        let tenant = scheduler.tenant(DEFAULT_WEIGHT);
        let stop = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> =
            (0..4).map(|_| scheduler.spawn(&tenant, Arc::default(), spinner(stop.clone(), Duration::from_micros(200)))).collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        drop(scheduler);
        assert!(started.elapsed() < Duration::from_millis(100), "stopping took {:?}", started.elapsed());
        for h in handles {
            assert!(matches!(h.ended().await, Ended::Cancelled));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_guest_woken_after_stop_is_dropped_not_run() {
        let scheduler = Scheduler::start(1, None);
        let tenant = scheduler.tenant(DEFAULT_WEIGHT);
        let (wake, woken) = tokio::sync::oneshot::channel::<()>();
        let (polls, dropped) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (counter, flag) = (polls.clone(), DropFlag(dropped.clone()));
        let mut woken = Box::pin(woken);
        let guest = std::future::poll_fn(move |cx| {
            let _flag = &flag;
            counter.fetch_add(1, Ordering::Relaxed);
            match woken.as_mut().poll(cx) {
                Poll::Ready(_) => Poll::Ready(Outcome::Completed),
                Poll::Pending => Poll::Pending,
            }
        });
        let handle = scheduler.spawn(&tenant, Arc::default(), Box::pin(guest));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        let started = Instant::now();
        scheduler.stop(Duration::from_secs(1));
        assert!(started.elapsed() < Duration::from_millis(100), "idle threads stop at once");
        // As the network's runtime does when it shuts down: every waiter is woken.
        wake.send(()).unwrap();
        assert!(matches!(handle.ended().await, Ended::Cancelled));
        assert_eq!(polls.load(Ordering::Relaxed), 1, "a guest is never run after stop");
        assert!(dropped.load(Ordering::Relaxed));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn run_time_is_charged_to_the_requests_meter() {
        let scheduler = Scheduler::start(1, None);
        let tenant = scheduler.tenant(DEFAULT_WEIGHT);
        let meter = Arc::new(CpuMeter::default());
        // The guest measures its own CPU time, slice by slice.
        let own = Arc::new(AtomicU64::new(0));
        let own_in_guest = own.clone();
        let mut slices = 0;
        let guest = std::future::poll_fn(move |cx| {
            let started = crate::meter::thread_cpu_time();
            while crate::meter::thread_cpu_time() - started < Duration::from_millis(2) {
                std::hint::black_box(0u64);
            }
            own_in_guest.fetch_add((crate::meter::thread_cpu_time() - started).as_nanos() as u64, Ordering::Relaxed);
            slices += 1;
            if slices == 10 {
                return Poll::Ready(Outcome::Completed);
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        scheduler.spawn(&tenant, meter.clone(), Box::pin(guest)).ended().await;
        let (used, own) = (meter.used_after_finish(), Duration::from_nanos(own.load(Ordering::Relaxed)));
        assert!(used >= own && used < own + Duration::from_millis(2), "charged {used:?} for {own:?} of guest CPU");
        assert_eq!(scheduler.snapshot(&tenant).guest_cpu_us, used.as_micros() as u64);
    }
}
