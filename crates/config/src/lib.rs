//! `cordon.toml`: the one place where an operator says what Cordon serves and
//! how tightly each worker is confined; and the specs of what a tenant
//! deploys, whatever they are read from.
//!
//! A worker ([`WorkerSpec`]) and a database ([`DatabaseSpec`]) are plain
//! specs with their own validation, whose errors ([`SpecError`]) carry a
//! [`KeyPath`] inside the spec. Two front ends read them: the TOML file
//! ([`Config::load`]), whose errors point at file, line, column and key,
//! and JSON documents ([`json`]), whose errors are JSON pointers. The
//! workers of `cordon.toml` are its first deployment.
//!
//! Loading is strict. Unknown keys, wrong types, out-of-range limits,
//! duplicate names and conflicting routes are errors, each with a hint on
//! how to fix it. A worker is identified by its tenant and its name: names
//! are unique within a tenant, routes across all tenants. All relative
//! paths are resolved against the directory of the config file, so a
//! config means the same thing whatever the working directory.

mod grants;
pub mod json;
mod postgres;
mod raw;
mod spec;
mod validate;
mod worker;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use grants::{BINDING_MAX_LEN, Grants, KvGrant, PostgresGrant, SqlGrant, is_valid_binding};
pub use postgres::{
    DEFAULT_HANDSHAKE_TIMEOUT_MS, DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_ADDRESS, DEFAULT_TENANT_ORIGIN_CONNECTIONS,
    DatabaseCache, DatabaseCacheSpec, DatabaseConfig, DatabaseContext, DatabaseSpec, DatabaseUser, ENV_NAME_MAX_LEN, OriginAuthMethods,
    OriginTlsMode, OriginUrl, PostgresProxyConfig, ProxyTls, check_databases, is_valid_env_name,
};
pub use spec::{ErrorKind, KeyPath, Segment, SpecError, SpecErrors};
pub use validate::{NAME_MAX_LEN, is_valid_name};
pub use worker::{LimitsSpec, WorkerContext, WorkerSpec, check_worker_among, check_workers};

/// A loaded and validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from.
    pub source: PathBuf,
    pub server: ServerConfig,
    pub security: SecurityConfig,
    pub sandbox: SandboxConfig,
    pub storage: StorageConfig,
    /// `[postgres_proxy]`; `None` when the section is absent.
    pub postgres_proxy: Option<PostgresProxyConfig>,
    /// `[[database]]`, in file order; `(tenant, name)` is unique.
    pub databases: Vec<DatabaseConfig>,
    /// `[[tenant]]`, in file order: the tenants whose quotas differ from
    /// the defaults. Every name is unique and is the tenant of a worker.
    pub tenants: Vec<TenantConfig>,
    /// `[[worker]]`, in file order; `(tenant, name)` is unique, and so is
    /// every route across all of them.
    pub workers: Vec<WorkerConfig>,
}

/// One `[[tenant]]`: quotas of one tenant, over all its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantConfig {
    pub name: String,
    /// Instances of this tenant's workers that may exist at once; always
    /// less than `sandbox.max_instances`.
    pub max_instances: u32,
    /// Bytes this tenant's instances may hold at once (linear memory and
    /// host-side buffers), in MiB; `None` for `sandbox.tenant_memory_budget_mb`.
    pub memory_budget_mb: Option<u64>,
    /// Bytes this tenant may store across all its key-value namespaces and
    /// SQL databases, in MiB: its `storage_quota_mb`, or
    /// `storage.tenant_quota_mb`.
    pub storage_quota_mb: u64,
    /// Its own `max_idle_connections`, in place of
    /// `server.max_idle_connections_per_tenant`; see
    /// [`Config::tenant_max_idle_connections`].
    pub max_idle_connections: Option<usize>,
    /// Its own `worker_log_bytes_per_second`, in place of
    /// `server.worker_log_bytes_per_second`.
    pub worker_log_bytes_per_second: Option<u64>,
    /// Its own `max_outbound_connections`, in place of
    /// `server.max_outbound_connections_per_tenant`.
    pub max_outbound_connections: Option<u32>,
    /// Requests that may wait for one of its instance slots at once: its
    /// `max_queued`, or `sandbox.tenant_max_queued`.
    pub max_queued: u32,
    /// Its share of the guest threads relative to other tenants: its
    /// `cpu_weight`, or `sandbox.tenant_cpu_weight`.
    pub cpu_weight: u32,
}

/// `[server]`: listeners, the data directory and the gateway's input limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Cap on the bytes of a request head (request line and headers); past it
    /// the gateway answers 431.
    pub max_header_bytes: usize,
    /// Time a client has to send a complete request head (slowloris defence).
    pub header_read_timeout_ms: u64,
    /// Time an idle keep-alive connection is kept open.
    pub keep_alive_timeout_ms: u64,
    /// On SIGTERM/SIGINT, time that requests in flight get to finish.
    pub shutdown_grace_ms: u64,
    /// Connections served at once; further ones wait in the accept queue.
    pub max_connections: usize,
    /// Connections served at once from one client address (IP); further
    /// ones from that address are closed as soon as they are accepted.
    pub max_connections_per_address: usize,
    /// Keep-alive connections that one tenant's responses may hold open,
    /// for a tenant without its own `[[tenant]] max_idle_connections`: a
    /// connection counts against the tenant whose worker it last carried a
    /// response of, until its next request arrives or it closes. A
    /// response beyond it closes its connection. At most `max_connections`.
    pub max_idle_connections_per_tenant: usize,
    /// Outbound connections one tenant holds open at once, over all its
    /// workers and requests; a subrequest beyond it fails at once.
    pub max_outbound_connections_per_tenant: u32,
    /// Name lookups for outbound requests in flight at once, over the
    /// whole process.
    pub max_name_lookups: u32,
    /// Name lookups for outbound requests in flight at once for one
    /// tenant, over all its workers; a further one waits for one of them.
    pub max_name_lookups_per_tenant: u32,
    /// Bytes of worker output (stdout and stderr) one tenant may have
    /// logged per second, with a burst of one second's worth; past it the
    /// tenant's output is dropped and counted, so that one tenant cannot
    /// flood the log or fill the disk.
    pub worker_log_bytes_per_second: u64,
    /// The request header whose value makes a split deployment sticky: the
    /// same value always reaches the same version. Lowercase; `None` for
    /// none (requests of a split are placed at random).
    pub version_key_header: Option<String>,
}

/// `[security]`: process-wide hardening switches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityConfig {
    pub memory_protection_keys: MemoryProtectionKeys,
    /// Refuse a `[[database]]` whose origin URL has `sslmode=disable` and a
    /// host that is not loopback. When `false`, such an origin is allowed
    /// and named in [`Config::warnings`].
    pub require_postgres_origin_tls: bool,
}

/// Whether linear memories are additionally isolated with the CPU's memory
/// protection keys (Intel PKU / MPK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryProtectionKeys {
    /// Use them where the CPU and kernel support them; fall back otherwise.
    Auto,
    /// Refuse to start where they are not available.
    Required,
    /// Never use them.
    Off,
}

impl fmt::Display for MemoryProtectionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Required => "required",
            Self::Off => "off",
        })
    }
}

/// `[sandbox]`: sizing of the pooling instance allocator, shared by all workers.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxConfig {
    /// Instances that may exist at once across all workers: the number of
    /// slots the pooling allocator reserves. A request beyond it gets 503.
    pub max_instances: u32,
    /// Instances one tenant's workers may have at once, for a tenant without
    /// its own `[[tenant]] max_instances`. Always less than `max_instances`,
    /// so that one tenant cannot take every slot.
    pub tenant_max_instances: u32,
    /// Maximum native stack that wasm code may use, in KiB. Deeper recursion
    /// traps with a stack overflow.
    pub max_wasm_stack_kb: u32,
    /// The engine's ceiling on one linear memory, in MiB: every instance
    /// slot is sized for it, and no worker's `memory_mb` may exceed it. Set
    /// once at start (`sandbox.max_memory_mb`; by default the largest
    /// `memory_mb` of the file's workers, at least 128).
    pub max_memory_mb: u64,
    /// The engine's ceiling on the elements of one table.
    pub max_table_elements: u32,
    /// The largest component a worker may have, in bytes.
    pub max_component_bytes: u64,
    /// Bytes all instances together may hold (linear memory, tables, fiber
    /// stacks and host-side buffers), in MiB; `None` for half of the memory
    /// the host has for the process (RAM, or its cgroup limit when lower).
    pub memory_budget_mb: Option<u64>,
    /// The budget of a tenant without its own `[[tenant]] memory_budget_mb`,
    /// in MiB; `None` for a quarter of `memory_budget_mb`.
    pub tenant_memory_budget_mb: Option<u64>,
    /// How many times the host's memory the worst case of the configured
    /// limits may be; above it the configuration is refused at start.
    pub memory_overcommit: f64,
    /// Threads that run guest code, apart from the network's; `None` for
    /// one per core.
    pub guest_threads: Option<usize>,
    /// Requests of a tenant without its own `[[tenant]] max_queued` that may
    /// wait for an instance slot when the tenant has all its instances in
    /// flight. Past it requests get 503 `tenant_overloaded`.
    pub tenant_max_queued: u32,
    /// The CPU weight of a tenant without its own `[[tenant]] cpu_weight`:
    /// busy tenants share the guest threads in proportion to their weights.
    pub tenant_cpu_weight: u32,
}

impl ServerConfig {
    /// The default of `max_idle_connections_per_tenant` is `max_connections`
    /// divided by this: a tenant at its cap leaves three quarters of the
    /// connection slots to the others.
    pub const IDLE_CONNECTIONS_SHARE_DIVISOR: usize = 4;

    /// The default for `max_idle_connections_per_tenant`.
    pub fn default_max_idle_connections_per_tenant(max_connections: usize) -> usize {
        (max_connections / Self::IDLE_CONNECTIONS_SHARE_DIVISOR).max(1)
    }
}

impl SandboxConfig {
    /// The default of `sandbox.max_table_elements`.
    pub const DEFAULT_MAX_TABLE_ELEMENTS: u32 = 100_000;
    /// The default of `sandbox.max_component_mb`.
    pub const DEFAULT_MAX_COMPONENT_MB: u64 = 128;

    pub const DEFAULT_MAX_INSTANCES: u32 = 1000;
    /// The default tenant quota is `max_instances` divided by this, so that
    /// a tenant at its quota leaves three quarters of the pool to others.
    pub const TENANT_SHARE_DIVISOR: u32 = 4;

    /// The default for `tenant_max_instances`: a quarter of the pool, at
    /// least one.
    pub fn default_tenant_max_instances(max_instances: u32) -> u32 {
        (max_instances / Self::TENANT_SHARE_DIVISOR).max(1)
    }

    pub const DEFAULT_TENANT_MAX_QUEUED: u32 = 128;
    pub const DEFAULT_CPU_WEIGHT: u32 = 100;
    pub const MAX_CPU_WEIGHT: u32 = 10_000;
}

/// `[storage]`: the threads and memory the host spends on the tenants'
/// key-value and SQL calls. Key-value and SQL calls each run on a pool of
/// their own threads; a call waits in the pool's queue for a thread, and a
/// call that finds the queue full fails at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// Memory SQLite may allocate in the whole process, in MiB; an
    /// allocation past it fails the statement that asked for it.
    pub sqlite_heap_limit_mb: u64,
    /// Memory SQLite may allocate for one SQL call of a worker (a statement,
    /// or a whole batch), in MiB; past it the call fails.
    pub sql_statement_memory_mb: u64,
    /// Threads of the key-value pool.
    pub kv_threads: usize,
    /// Threads of the SQL pool.
    pub sql_threads: usize,
    /// Threads of each pool that one tenant's calls may use at once.
    pub tenant_threads: usize,
    /// Calls that may wait for a thread, per pool.
    pub queue: usize,
    /// Calls of one tenant that may wait for a thread, per pool.
    pub tenant_queue: usize,
    /// Bytes one tenant may store across all its key-value namespaces and
    /// SQL databases, in MiB, for a tenant without its own
    /// `[[tenant]] storage_quota_mb`; past it writes fail with
    /// `storage_quota_exceeded`, while reads and deletes still work.
    pub tenant_quota_mb: u64,
    /// Free space the data directory's file system keeps, in MiB; below it
    /// key-value and SQL writes fail with `storage_disk_full`, before the
    /// disk is actually full. 0 turns the check off.
    pub free_space_reserve_mb: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            sqlite_heap_limit_mb: 1024,
            sql_statement_memory_mb: 64,
            kv_threads: 8,
            sql_threads: 8,
            tenant_threads: 2,
            queue: 4096,
            tenant_queue: 256,
            tenant_quota_mb: 1024,
            free_space_reserve_mb: 512,
        }
    }
}

/// The disk bounds of a worker's key-value and SQL writes, resolved from
/// `[storage]` and the `[[tenant]]` of its tenant when the config is loaded,
/// so that the capability crates get them with the rest of the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageBounds {
    /// Bytes the worker's tenant may store across all its key-value
    /// namespaces and SQL databases.
    pub tenant_quota_bytes: u64,
    /// Free bytes the data directory's file system keeps; 0 = no check.
    pub free_space_reserve_bytes: u64,
}

impl Default for StorageBounds {
    fn default() -> Self {
        let storage = StorageConfig::default();
        Self { tenant_quota_bytes: storage.tenant_quota_mb << 20, free_space_reserve_bytes: storage.free_space_reserve_mb << 20 }
    }
}

/// One `[[worker]]`: a tenant's component, where it is routed, and its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Unique within `tenant` only: a worker is `(tenant, name)`.
    pub name: String,
    pub tenant: String,
    /// Absolute path of the component file.
    pub component: PathBuf,
    pub routes: Vec<Route>,
    /// `allowed_outbound`: the origins its subrequests may reach; empty
    /// means none.
    pub allowed_outbound: cordon_egress::Allowlist,
    /// Key-value stores, SQL databases, variables and secrets.
    pub grants: Grants,
    pub limits: Limits,
    /// Its tenant's storage quota and the free-space reserve.
    pub storage: StorageBounds,
}

/// A route: requests whose `Host` (without port) equals `host` and whose path
/// starts with `path_prefix` go to the route's worker. The longest matching
/// prefix wins.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// Lowercase host name, without port.
    pub host: String,
    /// Always starts with `/`.
    pub path_prefix: String,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.host, self.path_prefix)
    }
}

/// A request's count of operations against one of its worker's limits
/// (`max_kv_operations`, `max_sql_statements`, `max_postgres_queries`):
/// the one way a capability counts its calls and refuses past the limit,
/// with a message that names the limit's key.
#[derive(Debug, Clone)]
pub struct OperationBudget {
    used: u64,
    max: u64,
    /// What is counted, for the message: "key-value operation".
    what: &'static str,
    /// The limit's key under `limits`: "max_kv_operations".
    key: &'static str,
}

impl OperationBudget {
    pub const fn new(max: u64, what: &'static str, key: &'static str) -> OperationBudget {
        OperationBudget { used: 0, max, what, key }
    }

    /// Operations counted so far, refused ones included.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Counts `n` more operations; past the limit, the message for the guest.
    pub fn charge(&mut self, n: usize) -> Result<(), String> {
        self.used = self.used.saturating_add(n as u64);
        if self.used > self.max {
            return Err(format!("{} limit reached: at most {} per request (limits.{})", self.what, self.max, self.key));
        }
        Ok(())
    }
}

/// `[worker.limits]`: what one request of this worker may use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// Instances of this worker that may exist at once, counted from
    /// admission until the instance is dropped; at most its tenant's quota.
    pub max_instances: u32,
    /// CPU time spent running guest code per request; past it the request is
    /// stopped and answered 503.
    pub cpu_ms: u64,
    /// Wall-clock time per request; past it the request is answered 504.
    pub wall_ms: u64,
    /// Linear memory per instance.
    pub memory_mb: u64,
    /// Request body size, enforced while streaming; past it 413.
    pub max_request_body_bytes: u64,
    /// Response body size; past it the response is cut off (or refused with
    /// 502 when the worker declares a larger `content-length` up front).
    pub max_response_body_bytes: u64,
    /// Bytes of stdout and stderr kept per request for the logs.
    pub max_log_bytes: u64,
    /// Outbound requests one request may start, denied attempts included.
    pub max_subrequests: u32,
    /// Time for one outbound request, from lookup to the end of its
    /// response body.
    pub subrequest_timeout_ms: u64,
    /// Largest response body of one outbound request.
    pub max_subrequest_response_bytes: u64,
    /// Body bytes sent and received over all outbound requests of one
    /// request.
    pub max_egress_bytes: u64,
    /// Key-value operations (each key of a batch counts) per request.
    pub max_kv_operations: u64,
    /// Largest value a key-value store accepts.
    pub max_kv_value_bytes: u64,
    /// SQL statements (each statement of a batch counts) per request.
    pub max_sql_statements: u64,
    /// Time one SQL statement may run.
    pub sql_statement_timeout_ms: u64,
    /// Rows one SQL statement may return.
    pub max_sql_rows: u64,
    /// Bytes of values one SQL statement may return.
    pub max_sql_result_bytes: u64,
    /// Postgres statements (each statement of a transaction counts) per
    /// request.
    pub max_postgres_queries: u64,
    /// Largest encoded result of one Postgres call (a transaction's results
    /// together), in bytes.
    pub max_postgres_result_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_instances: SandboxConfig::DEFAULT_MAX_INSTANCES / SandboxConfig::TENANT_SHARE_DIVISOR,
            cpu_ms: 50,
            wall_ms: 30_000,
            memory_mb: 128,
            max_request_body_bytes: 1024 * 1024,
            max_response_body_bytes: 16 * 1024 * 1024,
            max_log_bytes: 64 * 1024,
            max_subrequests: 50,
            subrequest_timeout_ms: 10_000,
            max_subrequest_response_bytes: 16 * 1024 * 1024,
            max_egress_bytes: 64 * 1024 * 1024,
            max_kv_operations: 1000,
            max_kv_value_bytes: 1024 * 1024,
            max_sql_statements: 1000,
            sql_statement_timeout_ms: 1000,
            max_sql_rows: 10_000,
            max_sql_result_bytes: 4 * 1024 * 1024,
            max_postgres_queries: 50,
            max_postgres_result_bytes: 16 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// The outbound part of these limits.
    pub fn egress(&self) -> cordon_egress::EgressLimits {
        cordon_egress::EgressLimits {
            max_subrequests: self.max_subrequests,
            subrequest_timeout: std::time::Duration::from_millis(self.subrequest_timeout_ms),
            max_response_bytes: self.max_subrequest_response_bytes,
            max_total_bytes: self.max_egress_bytes,
        }
    }
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                location: None,
                key: None,
                message: format!("cannot read the config file: {e}"),
                help: "pass an existing file with --config".into(),
            }])
        })?;
        Self::parse(path, &text)
    }

    /// Validates `text` as if it had been read from `path`; relative paths
    /// are resolved against `path`'s directory.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        validate::parse(path, text)
    }

    /// Settings that are valid but weaken confinement or expose traffic:
    /// `cordon check` prints them and `cordon serve` logs them once at
    /// startup. None of them carries a secret.
    pub fn warnings(&self) -> Vec<String> {
        let any_outbound = self.workers.iter().filter(|w| w.allowed_outbound.allows_any()).map(|w| {
            format!(
                "worker `{}` (tenant `{}`) has `*` in allowed_outbound (allow_any_outbound_dangerously = true): it may send requests to any public host; list the origins it needs instead",
                w.name, w.tenant
            )
        });
        let plain_origins = self.databases.iter().filter(|d| d.origin.tls == OriginTlsMode::Disable && !d.origin.is_loopback()).map(|d| {
            format!(
                "database `{}` (tenant `{}`) reaches its origin host `{}` without TLS (sslmode=disable): anyone on the network path can read its traffic and pose as the origin; add sslmode=verify-full to its origin URL, or set security.require_postgres_origin_tls = true to refuse such origins",
                d.name, d.tenant, d.origin.host
            )
        });
        any_outbound.chain(plain_origins).collect()
    }

    /// The worker named `name` of `tenant`.
    pub fn worker(&self, tenant: &str, name: &str) -> Option<&WorkerConfig> {
        self.workers.iter().find(|w| w.tenant == tenant && w.name == name)
    }

    /// What a worker of `tenant` is validated against under this
    /// configuration, for a spec deployed beside the file's workers: its
    /// tenant's quotas, this config's databases, and the config file's
    /// directory for a relative component path (`base`).
    pub fn worker_context<'a>(&'a self, tenant: &str, base: &'a Path) -> WorkerContext<'a> {
        validate::worker_context(tenant, base, &self.tenants, &self.sandbox, &self.storage, &self.databases)
    }

    /// What a database is validated against under this configuration;
    /// relative paths start at `base`.
    pub fn database_context<'a>(&self, base: &'a Path) -> DatabaseContext<'a> {
        DatabaseContext { base, require_origin_tls: self.security.require_postgres_origin_tls }
    }

    /// The `[[database]]` named `name` of `tenant`.
    pub fn database(&self, tenant: &str, name: &str) -> Option<&DatabaseConfig> {
        self.databases.iter().find(|d| d.tenant == tenant && d.name == name)
    }

    /// The instance quota of `tenant`: its `[[tenant]] max_instances`, or
    /// `sandbox.tenant_max_instances`.
    pub fn tenant_max_instances(&self, tenant: &str) -> u32 {
        self.tenants.iter().find(|t| t.name == tenant).map_or(self.sandbox.tenant_max_instances, |t| t.max_instances)
    }

    /// The requests that may wait for an instance slot of `tenant`: its
    /// `[[tenant]] max_queued`, or `sandbox.tenant_max_queued`.
    pub fn tenant_max_queued(&self, tenant: &str) -> u32 {
        self.tenants.iter().find(|t| t.name == tenant).map_or(self.sandbox.tenant_max_queued, |t| t.max_queued)
    }

    /// The CPU weight of `tenant`: its `[[tenant]] cpu_weight`, or
    /// `sandbox.tenant_cpu_weight`.
    pub fn tenant_cpu_weight(&self, tenant: &str) -> u32 {
        self.tenants.iter().find(|t| t.name == tenant).map_or(self.sandbox.tenant_cpu_weight, |t| t.cpu_weight)
    }

    /// The storage quota of `tenant` in MiB: its `[[tenant]]
    /// storage_quota_mb`, or `storage.tenant_quota_mb`.
    pub fn tenant_storage_quota_mb(&self, tenant: &str) -> u64 {
        self.tenants.iter().find(|t| t.name == tenant).map_or(self.storage.tenant_quota_mb, |t| t.storage_quota_mb)
    }

    /// The keep-alive connections `tenant`'s responses may hold open: its
    /// `[[tenant]] max_idle_connections`, or
    /// `server.max_idle_connections_per_tenant`.
    pub fn tenant_max_idle_connections(&self, tenant: &str) -> usize {
        self.tenants
            .iter()
            .find(|t| t.name == tenant)
            .and_then(|t| t.max_idle_connections)
            .unwrap_or(self.server.max_idle_connections_per_tenant)
    }

    /// The bytes of worker output `tenant` may have logged per second: its
    /// `[[tenant]] worker_log_bytes_per_second`, or
    /// `server.worker_log_bytes_per_second`.
    pub fn tenant_worker_log_bytes_per_second(&self, tenant: &str) -> u64 {
        self.tenants
            .iter()
            .find(|t| t.name == tenant)
            .and_then(|t| t.worker_log_bytes_per_second)
            .unwrap_or(self.server.worker_log_bytes_per_second)
    }

    /// The outbound connections `tenant` may hold open at once: its
    /// `[[tenant]] max_outbound_connections`, or
    /// `server.max_outbound_connections_per_tenant`.
    pub fn tenant_max_outbound_connections(&self, tenant: &str) -> u32 {
        self.tenants
            .iter()
            .find(|t| t.name == tenant)
            .and_then(|t| t.max_outbound_connections)
            .unwrap_or(self.server.max_outbound_connections_per_tenant)
    }

    /// The largest `memory_mb` of any worker, which sizes the allocator's
    /// memory slots.
    /// The engine's ceiling on one linear memory, in MiB
    /// (`sandbox.max_memory_mb`).
    pub fn max_worker_memory_mb(&self) -> u64 {
        self.sandbox.max_memory_mb
    }
}

/// Line and column (both 1-based) in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// One problem in a config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub location: Option<Location>,
    /// The key path, for example `worker[0].limits.cpu_ms`.
    pub key: Option<String>,
    pub message: String,
    /// How to fix it.
    pub help: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(loc) = self.location {
            write!(f, ":{}:{}", loc.line, loc.column)?;
        }
        f.write_str(": ")?;
        if let Some(key) = &self.key {
            write!(f, "`{key}`: ")?;
        }
        write!(f, "{}\n  help: {}", self.message, self.help)
    }
}

/// Every problem found in a config file; never empty.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "error: {e}")?;
        }
        Ok(())
    }
}
