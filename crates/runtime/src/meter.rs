//! CPU-time accounting for one request.
//!
//! Guest code runs only inside `poll` of the request's future (wasmtime runs
//! it on a fiber that the poll resumes), so the CPU time of a request is the
//! thread CPU time spent inside those polls, which the scheduler's guest
//! threads measure (see `scheduler`). Time spent waiting for I/O or for a
//! guest thread is outside any poll and is not counted. The epoch callback
//! reads the meter while the guest runs and stops it once the limit is
//! passed.
//!
//! Host work done for the request on a blocking pool's thread (key-value and
//! SQL calls) is measured there and added through [`CpuMeter::host`], so it
//! counts against the same limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// CPU time of the calling thread.
pub(crate) fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec, and CLOCK_THREAD_CPUTIME_ID
    // is supported on every Linux kernel Cordon runs on.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[derive(Default)]
pub(crate) struct CpuMeter {
    /// CPU nanoseconds of the polls that have finished.
    finished_ns: AtomicU64,
    /// CPU time of host work on other threads.
    host: cordon_blocking::CpuCharge,
    /// Thread CPU time (ns) when the poll in progress started; 0 when idle.
    poll_started_ns: AtomicU64,
    /// When the guest was first queued for a guest thread.
    queued_at: std::sync::OnceLock<std::time::Instant>,
    /// Wall time from then to its first run, in ns; 0 until it ran.
    first_run_after_ns: AtomicU64,
}

impl CpuMeter {
    /// CPU time used so far, including the poll in progress. Must be called
    /// on the thread running that poll (the epoch callback is).
    pub(crate) fn used(&self) -> Duration {
        let mut ns = self.finished_ns.load(Ordering::Relaxed) + self.host_ns();
        let started = self.poll_started_ns.load(Ordering::Relaxed);
        if started != 0 {
            ns += (thread_cpu_time().as_nanos() as u64).saturating_sub(started);
        }
        Duration::from_nanos(ns)
    }

    /// Where host work on other threads charges its CPU time.
    pub(crate) fn host(&self) -> cordon_blocking::CpuCharge {
        self.host.clone()
    }

    fn host_ns(&self) -> u64 {
        u64::try_from(self.host.total().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The guest is queued for a guest thread for the first time.
    pub(crate) fn queued(&self) {
        let _ = self.queued_at.set(std::time::Instant::now());
    }

    /// How long the guest waited for a guest thread before it first ran.
    pub(crate) fn first_run_after(&self) -> Duration {
        Duration::from_nanos(self.first_run_after_ns.load(Ordering::Relaxed))
    }

    /// Starts charging the calling thread's CPU time: a poll of the guest
    /// begins.
    pub(crate) fn enter(&self) {
        if self.first_run_after_ns.load(Ordering::Relaxed) == 0
            && let Some(queued) = self.queued_at.get()
        {
            self.first_run_after_ns.store((queued.elapsed().as_nanos() as u64).max(1), Ordering::Relaxed);
        }
        // `max(1)` keeps 0 free to mean "no poll in progress".
        self.poll_started_ns.store((thread_cpu_time().as_nanos() as u64).max(1), Ordering::Relaxed);
    }

    /// Ends the poll begun by [`CpuMeter::enter`] on this thread and
    /// returns its CPU nanoseconds.
    pub(crate) fn exit(&self) -> u64 {
        let started = self.poll_started_ns.swap(0, Ordering::Relaxed);
        let spent = (thread_cpu_time().as_nanos() as u64).saturating_sub(started);
        self.finished_ns.fetch_add(spent, Ordering::Relaxed);
        spent
    }
}

impl CpuMeter {
    /// CPU time of the finished polls; for use once the future is done, from
    /// any thread.
    pub(crate) fn used_after_finish(&self) -> Duration {
        Duration::from_nanos(self.finished_ns.load(Ordering::Relaxed).saturating_add(self.host_ns()))
    }
}
