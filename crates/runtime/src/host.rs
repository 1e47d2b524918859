//! The state of one instance (`Store<Host>`): WASI with nothing granted but
//! stdio capture and coarse clocks, wasi:http with outbound requests under
//! the worker's egress policy, and the
//! limiter and CPU meter that bound it. Built fresh for every request and
//! dropped with it.

use std::sync::Arc;

use cordon_memory::Account;

use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use cordon_kv::host::{KvView, RequestKv};
use cordon_postgres::host::{PostgresView, RequestPostgres};
use cordon_sql::host::{RequestSql, SqlView};
use cordon_vars::host::{VarsView, WorkerVars};

use crate::clock::{CoarseMonotonicClock, CoarseWallClock};
use crate::meter::CpuMeter;
use crate::outbound::Outbound;
use crate::stdio::CapturedOutput;

/// Most elements a table may grow to.
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Most bytes a guest can ask `wasi:random` for in one call.
const MAX_RANDOM_BYTES: u64 = 64 * 1024;
/// Most host resources (streams, bodies, header fields, requests, buckets)
/// an instance may hold at once.
const MAX_RESOURCES: usize = 10_000;
/// What one table element is charged: a pointer-sized reference.
const TABLE_ELEMENT_BYTES: u64 = std::mem::size_of::<usize>() as u64;

pub(crate) struct Host {
    wasi: WasiCtx,
    kv: RequestKv,
    sql: RequestSql,
    postgres: RequestPostgres,
    vars: Arc<WorkerVars>,
    http: WasiHttpCtx,
    table: ResourceTable,
    outbound: Outbound,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) meter: Arc<CpuMeter>,
    pub(crate) cpu_limit: std::time::Duration,
    /// Counts this instance against its tenant's and worker's quotas until
    /// the store, and with it this host, is dropped.
    _slot: crate::admission::InstanceSlot,
}

pub(crate) struct HostParts {
    pub memory: Arc<Account>,
    pub cpu_limit: std::time::Duration,
    pub stdout: CapturedOutput,
    pub stderr: CapturedOutput,
    pub meter: Arc<CpuMeter>,
    pub egress: cordon_egress::RequestEgress,
    pub kv: RequestKv,
    pub sql: RequestSql,
    pub postgres: RequestPostgres,
    pub vars: Arc<WorkerVars>,
    pub slot: crate::admission::InstanceSlot,
}

impl Host {
    pub(crate) fn new(parts: HostParts) -> Self {
        // Deny by default: no environment, arguments, preopened directories,
        // network or name lookup; stdin is empty.
        let wasi = WasiCtx::builder()
            .stdout(parts.stdout)
            .stderr(parts.stderr)
            .wall_clock(CoarseWallClock)
            .monotonic_clock(CoarseMonotonicClock::new())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES)
            .build();
        Self {
            wasi,
            kv: parts.kv,
            sql: parts.sql,
            postgres: parts.postgres,
            vars: parts.vars,
            http: WasiHttpCtx::new(),
            table: {
                let mut table = ResourceTable::new();
                table.set_max_capacity(MAX_RESOURCES);
                table
            },
            outbound: Outbound(parts.egress),
            limiter: MemoryLimiter { account: parts.memory },
            meter: parts.meter,
            cpu_limit: parts.cpu_limit,
            _slot: parts.slot,
        }
    }
}

impl Host {
    /// The request's memory account: linear memory, tables and host-side
    /// buffers.
    pub(crate) fn memory(&self) -> &Account {
        &self.limiter.account
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

/// The host interfaces every worker is linked against: WASI p2 (with the
/// grants above, i.e. none) and `wasi:http`. An import outside this set makes
/// the component fail to load.
pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<Host>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    crate::host_buffers::add_to_linker(&mut linker)?;
    // Capabilities are linked for every worker, from the one table; each
    // call checks the calling worker's own grants, and `grants::check`
    // refuses at load time a component that imports one its worker was not
    // granted.
    crate::grants::link_all(&mut linker)?;
    Ok(linker)
}

// Each capability's view of the request's state: what its entry in
// `grants::CAPABILITIES` links.
pub(crate) fn link_kv(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    cordon_kv::host::add_to_linker(linker, |h: &mut Host| KvView { state: &mut h.kv, table: &mut h.table })
}

pub(crate) fn link_sql(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    cordon_sql::host::add_to_linker(linker, |h: &mut Host| SqlView { state: &mut h.sql, table: &mut h.table })
}

pub(crate) fn link_vars(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    cordon_vars::host::add_to_linker(linker, |h: &mut Host| VarsView { state: &h.vars })
}

pub(crate) fn link_postgres(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    cordon_postgres::host::add_to_linker(linker, |h: &mut Host| PostgresView { state: &mut h.postgres })
}

/// Charges the linear memories and tables of the whole instance (all its
/// memories together) to the request's memory account: its `memory_mb`,
/// its tenant's budget and the process's. A refused grow returns -1 to the
/// guest, as the spec says; the account remembers which limit refused, so
/// that a trap that follows is reported as that limit rather than a crash.
pub(crate) struct MemoryLimiter {
    account: Arc<Account>,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // Creating a memory is a grow from 0, so the account covers them all.
        Ok(self.account.charge(desired.saturating_sub(current) as u64).is_ok())
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        Ok(self.account.charge(desired.saturating_sub(current) as u64 * TABLE_ELEMENT_BYTES).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cordon_memory::OverBudget;

    #[test]
    fn the_memory_limit_covers_all_memories_and_tables_of_an_instance() {
        let budget = || cordon_memory::Budget::new(1 << 30);
        let account = Arc::new(Account::new(1000, budget(), budget()));
        let mut l = MemoryLimiter { account: account.clone() };
        assert!(l.memory_growing(0, 600, None).unwrap(), "first memory created");
        assert!(l.memory_growing(600, 700, None).unwrap(), "and grown");
        assert!(!l.memory_growing(0, 400, None).unwrap(), "a second memory may not take the total past the limit");
        assert_eq!(account.refused(), Some(OverBudget::Request { limit: 1000 }));
        assert!(l.table_growing(0, 30, None).unwrap(), "a table is charged per element");
        assert_eq!(account.used(), 700 + 30 * TABLE_ELEMENT_BYTES);
        assert!(!l.table_growing(30, 100, None).unwrap(), "and refused past the limit");
        assert!(l.memory_growing(0, 10, None).unwrap(), "what is left may be used");
    }
}
