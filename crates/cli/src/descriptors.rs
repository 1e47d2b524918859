//! File descriptors: at start, the soft `RLIMIT_NOFILE` is raised to the
//! hard limit, and the most descriptors the configured limits let the
//! process hold is checked against it. A configuration that could run out
//! is refused, so that accepting a connection, the admin listener and the
//! data directory never fail with "too many open files" under load.

use cordon_config::Config;

/// Connections the admin listener serves at once (the gateway's own cap)
/// plus its listening socket and the main one.
const LISTENERS_AND_ADMIN: u64 = 64 + 2;

/// Descriptors kept for everything not counted by a limit of its own: the
/// data directory and its lock, the code cache, standard streams, the epoll
/// and event descriptors of the async runtimes, the TLS roots, `/proc`.
const RESERVE: u64 = 256;

/// Files each worker's storage may hold open: a key-value database and an
/// SQL database, each with its journal and shared-memory file, for each
/// connection of the storage pools.
const PER_WORKER_FILES: u64 = 16;

/// The most descriptors the configured limits let the process hold, by use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorBudget {
    /// `server.max_connections`, plus the admin listener's.
    pub inbound: u64,
    /// Outbound sockets: every instance at its subrequest limit, or every
    /// tenant at its outbound connection cap, whichever is smaller.
    pub outbound: u64,
    /// `server.max_name_lookups` sockets to name servers.
    pub lookups: u64,
    /// Postgres: pooled server connections, proxy clients and handshakes.
    pub postgres: u64,
    /// Storage files of the workers, and the fixed reserve.
    pub reserve: u64,
}

impl DescriptorBudget {
    pub fn of(config: &Config) -> DescriptorBudget {
        let s = &config.server;
        let max_subrequests = config.workers.iter().map(|w| u64::from(w.limits.max_subrequests)).max().unwrap_or(0);
        let mut tenants: Vec<&str> = config.workers.iter().map(|w| w.tenant.as_str()).collect();
        tenants.sort_unstable();
        tenants.dedup();
        let by_instances = u64::from(config.sandbox.max_instances) * max_subrequests;
        let by_tenants: u64 = tenants.iter().map(|t| u64::from(config.tenant_max_outbound_connections(t))).sum();
        let postgres = config.databases.iter().map(|d| u64::from(d.pool_size) + u64::from(d.max_client_connections)).sum::<u64>()
            + config.postgres_proxy.as_ref().map_or(0, |p| u64::from(p.max_handshakes) + 1);
        DescriptorBudget {
            inbound: s.max_connections as u64 + LISTENERS_AND_ADMIN,
            outbound: by_instances.min(by_tenants),
            lookups: u64::from(s.max_name_lookups),
            postgres,
            reserve: RESERVE + PER_WORKER_FILES * config.workers.len() as u64,
        }
    }

    pub fn total(&self) -> u64 {
        self.inbound + self.outbound + self.lookups + self.postgres + self.reserve
    }

    /// `Err` with the numbers and the fix when `limit` cannot hold the budget.
    pub fn check(&self, limit: u64, hard: u64) -> anyhow::Result<()> {
        if self.total() <= limit {
            return Ok(());
        }
        anyhow::bail!(
            "the configured limits may need {} file descriptors, but the process may open only {limit} (RLIMIT_NOFILE, hard limit {hard}): \
             {} for client connections (server.max_connections, plus the admin listener), \
             {} outbound (sandbox.max_instances × limits.max_subrequests, or the sum over tenants of server.max_outbound_connections_per_tenant or their [[tenant]] max_outbound_connections, whichever is smaller), \
             {} for name lookups (server.max_name_lookups), {} for Postgres (pool_size, max_client_connections, max_handshakes), \
             {} reserved for the data directory and storage; \
             raise the hard limit (LimitNOFILE= in a systemd unit, `ulimit -Hn` in a shell) or lower these limits",
            self.total(),
            self.inbound,
            self.outbound,
            self.lookups,
            self.postgres,
            self.reserve,
        )
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (or to the kernel's
/// `nr_open` if the hard limit is unlimited) and returns `(soft, hard)`.
pub fn raise_limit() -> anyhow::Result<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        anyhow::bail!("cannot read the file descriptor limit: {}", std::io::Error::last_os_error());
    }
    let mut target = limit.rlim_max;
    if target == libc::RLIM_INFINITY {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse::<u64>().ok());
        target = nr_open.unwrap_or(1 << 20);
    }
    if limit.rlim_cur < target {
        let raised = libc::rlimit { rlim_cur: target, rlim_max: limit.rlim_max };
        // SAFETY: `raised` is a valid rlimit; raising the soft limit up to
        // the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = target;
        } else {
            tracing::warn!(error = %std::io::Error::last_os_error(), soft = limit.rlim_cur, "cannot raise the file descriptor limit");
        }
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str, workers: &[(&str, &str)]) -> Config {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w.wasm"), b"").unwrap();
        let mut text = format!("[server]\ndata_dir = \"data\"\n{extra}\n");
        for (name, tenant) in workers {
            text.push_str(&format!(
                "[[worker]]\nname = \"{name}\"\ntenant = \"{tenant}\"\ncomponent = \"w.wasm\"\nroutes = [\"{name}.example/\"]\n"
            ));
        }
        Config::parse(&dir.path().join("cordon.toml"), &text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn the_outbound_sockets_are_bounded_by_the_smaller_of_the_two_caps() {
        let budget = DescriptorBudget::of(&config("", &[("a", "t1"), ("b", "t1"), ("c", "t2")]));
        // Two tenants × 256 is smaller than 1,000 instances × 50 subrequests.
        assert_eq!(budget.outbound, 2 * 256);
        assert_eq!(budget.inbound, 10_000 + 66);
        assert_eq!(budget.lookups, 1024);
        assert_eq!(budget.reserve, 256 + 3 * 16);
        let budget = DescriptorBudget::of(&config("[sandbox]\nmax_instances = 2", &[("a", "t1"), ("c", "t2")]));
        assert_eq!(budget.outbound, 2 * 50);
        // A tenant's own cap counts for that tenant.
        let budget =
            DescriptorBudget::of(&config("[[tenant]]\nname = \"t1\"\nmax_outbound_connections = 1000", &[("a", "t1"), ("c", "t2")]));
        assert_eq!(budget.outbound, 1000 + 256);
    }

    #[test]
    fn a_budget_over_the_limit_is_refused_with_the_numbers_and_the_fix() {
        let budget = DescriptorBudget::of(&config("", &[("a", "t1")]));
        assert!(budget.check(budget.total(), budget.total()).is_ok());
        // systemd's default soft limit for a service.
        let e = budget.check(1024, 524_288).unwrap_err().to_string();
        for part in [
            &format!("may need {} file descriptors", budget.total()),
            "may open only 1024",
            "10066 for client connections (server.max_connections",
            "server.max_outbound_connections_per_tenant",
            "LimitNOFILE=",
        ] {
            assert!(e.contains(part), "{part:?} not in {e}");
        }
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let (soft, hard) = raise_limit().unwrap();
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `limit` is a valid, writable rlimit for the call to fill.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        assert_eq!((limit.rlim_cur, limit.rlim_max), (soft, hard));
        assert!(hard == libc::RLIM_INFINITY || soft == hard);
    }
}
