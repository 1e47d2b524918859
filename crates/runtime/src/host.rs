//! The state of one instance (`Store<Host>`): WASI with nothing granted but
//! stdio capture and coarse clocks, wasi:http with outbound requests under
//! the worker's egress policy, and the
//! limiter and CPU meter that bound it. Built fresh for every request and
//! dropped with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
    pub memory_limit_bytes: u64,
    pub cpu_limit: std::time::Duration,
    pub stdout: CapturedOutput,
    pub stderr: CapturedOutput,
    pub meter: Arc<CpuMeter>,
    pub memory_denied: Arc<AtomicBool>,
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
            table: ResourceTable::new(),
            outbound: Outbound(parts.egress),
            limiter: MemoryLimiter {
                max_bytes: usize::try_from(parts.memory_limit_bytes).unwrap_or(usize::MAX),
                used_bytes: 0,
                denied: parts.memory_denied,
            },
            meter: parts.meter,
            cpu_limit: parts.cpu_limit,
            _slot: parts.slot,
        }
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
    // Capabilities are linked for every worker; each call checks the
    // calling worker's own grants, and `grants::check` refuses at load time
    // a component that imports one its worker was not granted.
    cordon_kv::host::add_to_linker(&mut linker, |h: &mut Host| KvView { state: &mut h.kv, table: &mut h.table })?;
    cordon_sql::host::add_to_linker(&mut linker, |h: &mut Host| SqlView { state: &mut h.sql, table: &mut h.table })?;
    cordon_vars::host::add_to_linker(&mut linker, |h: &mut Host| VarsView { state: &h.vars })?;
    cordon_postgres::host::add_to_linker(&mut linker, |h: &mut Host| PostgresView { state: &mut h.postgres })?;
    Ok(linker)
}

/// Caps the linear memory of the whole instance (all its memories together)
/// at the worker's `memory_mb`. A refused grow returns -1 to the guest, as
/// the spec says; the flag lets a trap that follows be reported as the memory
/// limit rather than a bare crash.
pub(crate) struct MemoryLimiter {
    max_bytes: usize,
    used_bytes: usize,
    denied: Arc<AtomicBool>,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // Creating a memory is a grow from 0, so `used_bytes` covers them all.
        let total = self.used_bytes.saturating_sub(current).saturating_add(desired);
        if total > self.max_bytes {
            self.denied.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        self.used_bytes = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_limit_covers_all_memories_of_an_instance() {
        let denied = Arc::new(AtomicBool::new(false));
        let mut l = MemoryLimiter { max_bytes: 100, used_bytes: 0, denied: denied.clone() };
        assert!(l.memory_growing(0, 60, None).unwrap(), "first memory created");
        assert!(l.memory_growing(60, 70, None).unwrap(), "and grown");
        assert!(!l.memory_growing(0, 40, None).unwrap(), "a second memory may not take the total past the limit");
        assert!(denied.load(Ordering::Relaxed));
        assert!(l.memory_growing(0, 30, None).unwrap(), "but may use what is left");
    }
}
