//! Measurements shared by the attack tests: the victim's latency and the process's memory.

use std::time::Duration;

/// The process's resident memory in MiB, from `/proc/self/status`.
pub fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib / 1024
}

/// The 99th percentile of `samples` (the largest for fewer than 100).
pub fn p99(samples: &mut [Duration]) -> Duration {
    assert!(!samples.is_empty(), "no latency samples");
    samples.sort();
    let index = ((samples.len() as f64) * 0.99).ceil() as usize;
    samples[index.clamp(1, samples.len()) - 1]
}
