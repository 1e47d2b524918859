//! The memory the host has for Cordon: the machine's RAM, or the limit of
//! the cgroup the process runs in when that is lower (a container or a
//! systemd `MemoryMax=`). At start, the worst case of the configured limits
//! is compared with it, so that a configuration that could grow the process
//! until the kernel kills it is refused before it serves anything.

use std::path::Path;

/// What the machine and the process's cgroup allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    /// `MemTotal` of `/proc/meminfo`.
    pub ram_bytes: u64,
    /// The lowest `memory.max` (v2) or `memory.limit_in_bytes` (v1) on the
    /// path of the process's cgroup, when one is set.
    pub cgroup_limit_bytes: Option<u64>,
}

impl HostMemory {
    /// Reads `/proc` and `/sys/fs/cgroup`. `None` when `/proc/meminfo` is
    /// unreadable (not Linux).
    pub fn detect() -> Option<HostMemory> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let ram_bytes = parse_mem_total(&meminfo)?;
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Some(HostMemory { ram_bytes, cgroup_limit_bytes: cgroup_limit(Path::new("/sys/fs/cgroup"), &own) })
    }

    /// The memory Cordon may count on: the lower of RAM and the cgroup limit.
    pub fn usable_bytes(&self) -> u64 {
        self.cgroup_limit_bytes.map_or(self.ram_bytes, |c| c.min(self.ram_bytes))
    }

    /// Where [`HostMemory::usable_bytes`] comes from, for messages.
    pub fn source(&self) -> &'static str {
        match self.cgroup_limit_bytes {
            Some(c) if c < self.ram_bytes => "the process's cgroup memory limit",
            _ => "the machine's RAM",
        }
    }
}

/// `MemTotal` in bytes.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.trim_start_matches("MemTotal:").trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// A cgroup memory limit file's value: `max` (or a v1 value near `u64::MAX`)
/// means none.
pub fn parse_limit(text: &str) -> Option<u64> {
    let value: u64 = text.trim().parse().ok()?;
    // cgroup v1 writes "no limit" as the largest page-aligned i64.
    (value < (1 << 62)).then_some(value)
}

/// The lowest limit on the path from the cgroup root to the process's own
/// cgroup, read under `root` (normally `/sys/fs/cgroup`); `own` is the text
/// of `/proc/self/cgroup`.
pub fn cgroup_limit(root: &Path, own: &str) -> Option<u64> {
    let mut lowest: Option<u64> = None;
    let mut keep = |limit: Option<u64>| {
        if let Some(l) = limit {
            lowest = Some(lowest.map_or(l, |x| x.min(l)));
        }
    };
    for line in own.lines() {
        // `hierarchy-id:controllers:path`; v2 has the single line `0::/path`.
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let (dir, file) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut at = dir.clone();
        keep(std::fs::read_to_string(at.join(file)).ok().as_deref().and_then(parse_limit));
        for component in path.trim_start_matches('/').split('/').filter(|c| !c.is_empty() && *c != "..") {
            at.push(component);
            keep(std::fs::read_to_string(at.join(file)).ok().as_deref().and_then(parse_limit));
        }
    }
    lowest
}

/// The terms of the worst case: what the configured limits allow the
/// process's requests and stores to hold at once.
#[derive(Debug, Clone, PartialEq)]
pub struct WorstCase {
    /// `(what, bytes)`, each named by the config keys that set it.
    pub terms: Vec<(String, u64)>,
}

impl WorstCase {
    pub fn total(&self) -> u64 {
        self.terms.iter().fold(0u64, |sum, (_, b)| sum.saturating_add(*b))
    }

    /// Refuses a worst case above `overcommit` times the usable memory.
    pub fn check(&self, host: &HostMemory, overcommit: f64) -> Result<(), DoesNotFit> {
        let allowed = (host.usable_bytes() as f64 * overcommit) as u64;
        let total = self.total();
        if total <= allowed {
            return Ok(());
        }
        Err(DoesNotFit {
            worst_case_mib: total >> 20,
            usable_mib: host.usable_bytes() >> 20,
            origin: host.source(),
            overcommit,
            terms: self.terms.iter().map(|(what, b)| format!("{what}: {} MiB", b >> 20)).collect::<Vec<_>>().join(", "),
        })
    }
}

/// A configuration whose worst case does not fit in the host's memory.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "the configured limits let requests and stores hold up to {worst_case_mib} MiB ({terms}), more than {overcommit} × the {usable_mib} MiB of {origin}; lower sandbox.memory_budget_mb (or storage.sqlite_heap_limit_mb), or set sandbox.memory_overcommit to accept the risk of the kernel killing the server"
)]
pub struct DoesNotFit {
    pub worst_case_mib: u64,
    pub usable_mib: u64,
    pub origin: &'static str,
    pub overcommit: f64,
    pub terms: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_mem_total(text), Some(24_576_000 * 1024));
        assert_eq!(parse_mem_total("MemFree: 3 kB"), None);
    }

    #[test]
    fn max_and_the_v1_sentinel_mean_no_limit() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("3221225472\n"), Some(3 << 30));
    }

    #[test]
    fn the_lowest_limit_on_the_cgroup_path_wins() {
        let root = std::env::temp_dir().join(format!("cordon-cgroup-{}", std::process::id()));
        let svc = root.join("system.slice/cordon.service");
        std::fs::create_dir_all(&svc).unwrap();
        std::fs::write(root.join("system.slice/memory.max"), "4294967296\n").unwrap();
        std::fs::write(svc.join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_limit(&root, "0::/system.slice/cordon.service\n"), Some(4 << 30));
        std::fs::write(svc.join("memory.max"), "1073741824\n").unwrap();
        assert_eq!(cgroup_limit(&root, "0::/system.slice/cordon.service\n"), Some(1 << 30));
        assert_eq!(cgroup_limit(&root, "0::/\n"), None, "the root has no memory.max");

        let v1 = root.join("memory/docker/abc");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "2147483648\n").unwrap();
        assert_eq!(cgroup_limit(&root, "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n"), Some(2 << 30));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_worst_case_over_the_usable_memory_is_refused_unless_overcommitted() {
        let host = HostMemory { ram_bytes: 24 << 30, cgroup_limit_bytes: Some(3 << 30) };
        assert_eq!(host.usable_bytes(), 3 << 30);
        let worst =
            WorstCase { terms: vec![("sandbox.memory_budget_mb".into(), 4 << 30), ("storage.sqlite_heap_limit_mb".into(), 256 << 20)] };
        let e = worst.check(&host, 1.0).unwrap_err();
        assert_eq!((e.worst_case_mib, e.usable_mib, e.origin), (4352, 3072, "the process's cgroup memory limit"));
        assert!(e.to_string().contains("sandbox.memory_overcommit"), "{e}");
        worst.check(&host, 1.5).unwrap();
        assert!(HostMemory::detect().is_some_and(|h| h.usable_bytes() > 0), "this machine's memory is readable");
    }
}
