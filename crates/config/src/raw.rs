//! The file as written. The process's own sections are serde structs that
//! keep the span of every value that validation may need to point at;
//! workers and databases are read as their plain specs, whose errors carry
//! key paths that `crate::validate` maps back to the file. Nothing here is
//! checked beyond its type; `crate::validate` turns these into the public,
//! validated types.

use serde::Deserialize;
use toml::Spanned;

pub(crate) use crate::postgres::RawPostgresProxy;
use crate::{DatabaseSpec, WorkerSpec};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub security: RawSecurity,
    #[serde(default)]
    pub sandbox: RawSandbox,
    #[serde(default)]
    pub storage: RawStorage,
    pub postgres_proxy: Option<RawPostgresProxy>,
    #[serde(default, rename = "database")]
    pub databases: Vec<DatabaseSpec>,
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<RawTenant>,
    #[serde(default, rename = "worker")]
    pub workers: Vec<WorkerSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTenant {
    pub name: Spanned<String>,
    pub max_instances: Option<Spanned<i64>>,
    pub memory_budget_mb: Option<Spanned<i64>>,
    pub storage_quota_mb: Option<Spanned<i64>>,
    pub max_idle_connections: Option<Spanned<i64>>,
    pub worker_log_bytes_per_second: Option<Spanned<i64>>,
    pub max_outbound_connections: Option<Spanned<i64>>,
    pub max_queued: Option<Spanned<i64>>,
    pub cpu_weight: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub listen: Option<Spanned<String>>,
    pub admin_listen: Option<Spanned<String>>,
    pub data_dir: Option<Spanned<String>>,
    pub max_header_bytes: Option<Spanned<i64>>,
    pub header_read_timeout_ms: Option<Spanned<i64>>,
    pub keep_alive_timeout_ms: Option<Spanned<i64>>,
    pub shutdown_grace_ms: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_address: Option<Spanned<i64>>,
    pub max_idle_connections_per_tenant: Option<Spanned<i64>>,
    pub max_outbound_connections_per_tenant: Option<Spanned<i64>>,
    pub max_name_lookups: Option<Spanned<i64>>,
    pub max_name_lookups_per_tenant: Option<Spanned<i64>>,
    pub worker_log_bytes_per_second: Option<Spanned<i64>>,
    pub version_key_header: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecurity {
    pub memory_protection_keys: Option<Spanned<String>>,
    pub require_postgres_origin_tls: Option<Spanned<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSandbox {
    pub max_instances: Option<Spanned<i64>>,
    pub tenant_max_instances: Option<Spanned<i64>>,
    pub max_wasm_stack_kb: Option<Spanned<i64>>,
    pub max_memory_mb: Option<Spanned<i64>>,
    pub max_table_elements: Option<Spanned<i64>>,
    pub max_component_mb: Option<Spanned<i64>>,
    pub memory_budget_mb: Option<Spanned<i64>>,
    pub tenant_memory_budget_mb: Option<Spanned<i64>>,
    pub memory_overcommit: Option<Spanned<f64>>,
    pub guest_threads: Option<Spanned<i64>>,
    pub tenant_max_queued: Option<Spanned<i64>>,
    pub tenant_cpu_weight: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStorage {
    pub sqlite_heap_limit_mb: Option<Spanned<i64>>,
    pub sql_statement_memory_mb: Option<Spanned<i64>>,
    pub kv_threads: Option<Spanned<i64>>,
    pub sql_threads: Option<Spanned<i64>>,
    pub tenant_threads: Option<Spanned<i64>>,
    pub queue: Option<Spanned<i64>>,
    pub tenant_queue: Option<Spanned<i64>>,
    pub tenant_quota_mb: Option<Spanned<i64>>,
    pub free_space_reserve_mb: Option<Spanned<i64>>,
}
