//! The clocks a guest sees, coarsened to [`CLOCK_RESOLUTION_NS`] so that
//! guest code cannot time cache or branch-predictor side channels with them.
//! The monotonic clock starts at zero for each instance, which also hides how
//! long the host has been running.

use std::time::{Duration, Instant, SystemTime};

use wasmtime_wasi::{HostMonotonicClock, HostWallClock};

use crate::policy::CLOCK_RESOLUTION_NS;

fn coarsen(ns: u128) -> u64 {
    let r = u128::from(CLOCK_RESOLUTION_NS);
    u64::try_from(ns / r * r).unwrap_or(u64::MAX)
}

/// Monotonic time since the instance was created, rounded down.
pub(crate) struct CoarseMonotonicClock {
    origin: Instant,
}

impl CoarseMonotonicClock {
    pub(crate) fn new() -> Self {
        Self { origin: Instant::now() }
    }
}

impl HostMonotonicClock for CoarseMonotonicClock {
    fn resolution(&self) -> u64 {
        CLOCK_RESOLUTION_NS
    }

    fn now(&self) -> u64 {
        coarsen(self.origin.elapsed().as_nanos())
    }
}

/// Wall-clock time, rounded down.
pub(crate) struct CoarseWallClock;

impl HostWallClock for CoarseWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(CLOCK_RESOLUTION_NS)
    }

    fn now(&self) -> Duration {
        let since_epoch = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        Duration::from_nanos(coarsen(since_epoch.as_nanos()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_multiples_of_the_resolution() {
        let m = CoarseMonotonicClock::new();
        std::thread::sleep(Duration::from_micros(1500));
        assert_eq!(m.now() % CLOCK_RESOLUTION_NS, 0);
        assert!(m.now() >= CLOCK_RESOLUTION_NS);
        assert_eq!(CoarseWallClock.now().as_nanos() % u128::from(CLOCK_RESOLUTION_NS), 0);
    }
}
