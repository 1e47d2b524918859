//! The TOML front end, from `raw` to the public types: the checks of the
//! process's own sections (`[server]`, `[security]`, `[sandbox]`,
//! `[storage]`, `[[tenant]]`; `[postgres_proxy]` is in `crate::postgres`),
//! the spec validation of each `[[database]]` and `[[worker]]`, and the
//! errors that point at the offending key: a spec error's key path is
//! looked up in the file parsed with spans (`Validator::span_of`), and a
//! TOML error's key is recovered from the source text (`toml_error`).

use std::cell::OnceCell;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::raw::{RawConfig, RawTenant};
use crate::spec::{Checker, KeyPath, Segment, SpecError, out_of_range};
use crate::worker::check_workers;
use crate::{
    Config, ConfigError, ConfigErrors, DatabaseConfig, DatabaseContext, Location, MemoryProtectionKeys, SandboxConfig, SecurityConfig,
    ServerConfig, StorageBounds, StorageConfig, TenantConfig, WorkerConfig, WorkerContext, check_databases,
};

/// Largest storage quota or reserve, in MiB (1 EiB): only a guard against
/// values that would overflow when turned into bytes.
const MAX_STORAGE_MB: u64 = 1 << 40;

/// Longest worker or tenant name.
pub const NAME_MAX_LEN: usize = 63;

/// Names of workers and tenants: `[a-z0-9_-]`, 1 to 63 characters, so that a
/// name can be used in a file name or a log line without escaping.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX_LEN
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

const DOCS: &str = "docs/config.md";

/// The directory that relative paths in the config at `file` start at.
pub(crate) fn base_dir(file: &Path) -> PathBuf {
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    if base.as_os_str().is_empty() { PathBuf::from(".") } else { base }
}

/// The TOML front end: the process's own sections are checked here, each
/// `[[database]]` and `[[worker]]` is read as its spec and checked by the
/// spec's own validation, and every error's key path is mapped back to
/// file:line:column. The file's workers are validated as one deployment.
/// The default of `sandbox.max_memory_mb` when no worker of the file asks
/// for more: the default `memory_mb`.
const DEFAULT_MAX_MEMORY_MB: u64 = 128;
/// The highest `memory_mb` and `sandbox.max_memory_mb`.
pub(crate) const MAX_MEMORY_MB: u64 = 4096;

pub(crate) fn parse(file: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigErrors(vec![toml_error(file, text, &e)]))?;
    let mut v = Validator { file, text, document: OnceCell::new(), errors: Vec::new() };
    let base = base_dir(file);

    let server = v.server(&raw, &base);
    let security = v.security(&raw);
    let mut sandbox = v.sandbox(&raw);
    let storage = v.storage(&raw);
    let postgres_proxy = raw.postgres_proxy.as_ref().map(|p| v.postgres_proxy(p, &server, &base));

    let database_context = DatabaseContext { base: &base, require_origin_tls: security.require_postgres_origin_tls };
    let database_key = |i: usize| KeyPath::from("database").index(i);
    let mut databases = Vec::with_capacity(raw.databases.len());
    for (i, spec) in raw.databases.iter().enumerate() {
        let mut checker = Checker::default();
        databases.push(spec.check(&database_context, &mut checker));
        v.spec_errors(&database_key(i), checker.errors);
    }
    for (i, e) in check_databases(&raw.databases, &mut databases) {
        v.spec_error(&database_key(i), e);
    }

    let tenants = v.tenants(&raw.tenants, &sandbox, &storage, &server);
    let worker_key = |i: usize| KeyPath::from("worker").index(i);
    let mut workers = Vec::with_capacity(raw.workers.len());
    for (i, spec) in raw.workers.iter().enumerate() {
        let context = worker_context(&spec.tenant, &base, &tenants, &sandbox, &storage, &databases);
        let mut checker = Checker::default();
        workers.push(spec.check(&context, &mut checker));
        v.spec_errors(&worker_key(i), checker.errors);
    }
    for (i, e) in check_workers(&workers) {
        v.spec_error(&worker_key(i), e);
    }
    v.tenants_have_workers(&raw.tenants, &workers);
    if raw.sandbox.max_memory_mb.is_none() {
        sandbox.max_memory_mb = workers.iter().map(|w| w.limits.memory_mb).max().unwrap_or(0).max(DEFAULT_MAX_MEMORY_MB);
    }

    if v.errors.is_empty() {
        Ok(Config { source: file.to_path_buf(), server, security, sandbox, storage, postgres_proxy, databases, tenants, workers })
    } else {
        Err(ConfigErrors(v.errors))
    }
}

/// What a worker of `tenant` is validated against: the tenant's instance
/// and storage quotas (its `[[tenant]]`, or the defaults) and the
/// databases.
pub(crate) fn worker_context<'a>(
    tenant: &str,
    base: &'a Path,
    tenants: &[TenantConfig],
    sandbox: &SandboxConfig,
    storage: &StorageConfig,
    databases: &'a [DatabaseConfig],
) -> WorkerContext<'a> {
    let own = tenants.iter().find(|t| t.name == tenant);
    let storage_quota_mb = own.map_or(storage.tenant_quota_mb, |t| t.storage_quota_mb);
    WorkerContext {
        base,
        max_memory_mb: sandbox.max_memory_mb,
        tenant_max_instances: own.map_or(sandbox.tenant_max_instances, |t| t.max_instances),
        storage: StorageBounds {
            tenant_quota_bytes: storage_quota_mb << 20,
            free_space_reserve_bytes: storage.free_space_reserve_mb << 20,
        },
        databases,
    }
}

pub(crate) struct Validator<'a> {
    file: &'a Path,
    text: &'a str,
    /// The file parsed again with the span of every key, read only to map
    /// a spec error's key path to its position; `None` inside when it does
    /// not parse, which cannot happen once serde has read it.
    document: OnceCell<Option<Spanned<DeTable<'a>>>>,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    pub(crate) fn error(
        &mut self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
        help: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            location: span.map(|s| location(self.text, s.start)),
            key: Some(key.into()),
            message: message.into(),
            help: help.into(),
        });
    }

    /// A spec's errors, each at the position of its key in this file: the
    /// spec's `prefix` (`worker[2]`) joined with the error's own path.
    fn spec_errors(&mut self, prefix: &KeyPath, errors: Vec<SpecError>) {
        for e in errors {
            self.spec_error(prefix, e);
        }
    }

    fn spec_error(&mut self, prefix: &KeyPath, e: SpecError) {
        let path = prefix.join(&e.path);
        let span = self.span_of(&path);
        self.error(span, path.to_string(), e.message, e.help);
    }

    /// The span of the value at `path`, or, when the key is absent (a
    /// default that conflicts with another value), of the nearest table
    /// or array that holds it.
    fn span_of(&self, path: &KeyPath) -> Option<Range<usize>> {
        let document = self.document.get_or_init(|| DeTable::parse(self.text).ok()).as_ref()?;
        let mut table: Option<&DeTable<'_>> = Some(document.get_ref());
        let mut array: Option<&[Spanned<DeValue<'_>>]> = None;
        let mut found = None;
        for segment in path.segments() {
            let next = match segment {
                Segment::Field(name) => table.and_then(|t| t.iter().find(|(k, _)| k.get_ref().as_ref() == name.as_str())).map(|(_, v)| v),
                Segment::Index(i) => array.and_then(|a| a.get(*i)),
            };
            let Some(value) = next else { break };
            found = Some(value.span());
            (table, array) = match value.get_ref() {
                DeValue::Table(t) => (Some(t), None),
                DeValue::Array(a) => (None, Some(&a[..])),
                _ => (None, None),
            };
        }
        found
    }

    /// An integer key with a default and an inclusive range.
    pub(crate) fn int(&mut self, value: &Option<Spanned<i64>>, key: &str, default: u64, min: u64, max: u64, what: &str) -> u64 {
        let Some(value) = value else { return default };
        let n = *value.get_ref();
        if n < min as i64 || n > max as i64 {
            let (message, help) = out_of_range(n, default, min, max, what);
            self.error(Some(value.span()), key, message, help);
            return default;
        }
        n as u64
    }

    fn addr(&mut self, value: &Option<Spanned<String>>, key: &str, default: &str) -> SocketAddr {
        let default: SocketAddr = default.parse().expect("built-in default address parses");
        let Some(value) = value else { return default };
        self.socket_addr(value, key).unwrap_or(default)
    }

    pub(crate) fn socket_addr(&mut self, value: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        let addr = value.get_ref().parse::<SocketAddr>().ok();
        if addr.is_none() {
            self.error(
                Some(value.span()),
                key,
                format!("`{}` is not an IP address with a port", value.get_ref()),
                "write it as IP:PORT, for example \"127.0.0.1:8080\" or \"[::1]:8080\"",
            );
        }
        addr
    }

    /// An HTTP header name (a token), lowercased.
    fn header_name(&mut self, value: &Option<Spanned<String>>, key: &str) -> Option<String> {
        let v = value.as_ref()?;
        let name = v.get_ref();
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || !name.bytes().all(token) {
            self.error(
                Some(v.span()),
                key,
                format!("`{name}` is not an HTTP header name"),
                "use letters, digits and `-`, for example \"cordon-version-key\"",
            );
            return None;
        }
        Some(name.to_ascii_lowercase())
    }

    fn server(&mut self, raw: &RawConfig, base: &Path) -> ServerConfig {
        let s = &raw.server;
        let listen = self.addr(&s.listen, "server.listen", "127.0.0.1:8080");
        let admin_listen = self.addr(&s.admin_listen, "server.admin_listen", "127.0.0.1:8081");
        if listen == admin_listen && listen.port() != 0 {
            let span = s.admin_listen.as_ref().map(Spanned::span);
            self.error(span, "server.admin_listen", "is the same address as server.listen", "give the admin listener its own port");
        }
        let data_dir = match &s.data_dir {
            Some(d) if d.get_ref().trim().is_empty() => {
                self.error(Some(d.span()), "server.data_dir", "is empty", "name a directory, for example \".cordon\"");
                base.join(".cordon")
            }
            Some(d) => base.join(d.get_ref()),
            None => base.join(".cordon"),
        };
        let max_connections =
            self.int(&s.max_connections, "server.max_connections", 10_000, 1, 1_000_000, "the number of connections served at once")
                as usize;
        ServerConfig {
            listen,
            admin_listen,
            data_dir,
            max_header_bytes: self.int(
                &s.max_header_bytes,
                "server.max_header_bytes",
                16 * 1024,
                1024,
                1024 * 1024,
                "the most bytes a request head may have",
            ) as usize,
            header_read_timeout_ms: self.int(
                &s.header_read_timeout_ms,
                "server.header_read_timeout_ms",
                10_000,
                100,
                600_000,
                "the time a client has to send its request head, in ms",
            ),
            keep_alive_timeout_ms: self.int(
                &s.keep_alive_timeout_ms,
                "server.keep_alive_timeout_ms",
                60_000,
                100,
                3_600_000,
                "the time an idle connection stays open, in ms",
            ),
            shutdown_grace_ms: self.int(
                &s.shutdown_grace_ms,
                "server.shutdown_grace_ms",
                30_000,
                0,
                600_000,
                "the time requests in flight get to finish on shutdown, in ms",
            ),
            max_connections,
            max_connections_per_address: self.int(
                &s.max_connections_per_address,
                "server.max_connections_per_address",
                1000,
                1,
                1_000_000,
                "the number of connections served at once from one client address",
            ) as usize,
            max_idle_connections_per_tenant: self.idle_connections(
                &s.max_idle_connections_per_tenant,
                "server.max_idle_connections_per_tenant",
                max_connections,
            ),
            max_outbound_connections_per_tenant: self
                .outbound_connections(&s.max_outbound_connections_per_tenant, "server.max_outbound_connections_per_tenant"),
            max_name_lookups: self.int(
                &s.max_name_lookups,
                "server.max_name_lookups",
                1024,
                1,
                65_536,
                "the number of name lookups in flight at once",
            ) as u32,
            max_name_lookups_per_tenant: self.int(
                &s.max_name_lookups_per_tenant,
                "server.max_name_lookups_per_tenant",
                16,
                1,
                65_536,
                "the number of name lookups one tenant may have in flight at once",
            ) as u32,
            worker_log_bytes_per_second: self.log_rate(&s.worker_log_bytes_per_second, "server.worker_log_bytes_per_second"),
            version_key_header: self.header_name(&s.version_key_header, "server.version_key_header"),
        }
    }

    fn sandbox(&mut self, raw: &RawConfig) -> SandboxConfig {
        let s = &raw.sandbox;
        let max_instances = self.int(
            &s.max_instances,
            "sandbox.max_instances",
            SandboxConfig::DEFAULT_MAX_INSTANCES.into(),
            2,
            100_000,
            "the number of instances that may run at once",
        ) as u32;
        let default_share = SandboxConfig::default_tenant_max_instances(max_instances);
        let tenant_max_instances = match &s.tenant_max_instances {
            None => default_share,
            Some(value) => self.tenant_share(value, "sandbox.tenant_max_instances", max_instances).unwrap_or(default_share),
        };
        SandboxConfig {
            max_instances,
            tenant_max_instances,
            max_wasm_stack_kb: self.int(
                &s.max_wasm_stack_kb,
                "sandbox.max_wasm_stack_kb",
                512,
                64,
                8192,
                "the native stack wasm code may use, in KiB",
            ) as u32,
            // Unset: the largest the file's workers ask for, once they are read.
            max_memory_mb: if s.max_memory_mb.is_some() {
                self.int(
                    &s.max_memory_mb,
                    "sandbox.max_memory_mb",
                    DEFAULT_MAX_MEMORY_MB,
                    1,
                    MAX_MEMORY_MB,
                    "the largest linear memory of one instance, in MiB",
                )
            } else {
                MAX_MEMORY_MB
            },
            max_table_elements: self.int(
                &s.max_table_elements,
                "sandbox.max_table_elements",
                SandboxConfig::DEFAULT_MAX_TABLE_ELEMENTS.into(),
                1,
                10_000_000,
                "the elements one table of an instance may have",
            ) as u32,
            max_component_bytes: self.int(
                &s.max_component_mb,
                "sandbox.max_component_mb",
                SandboxConfig::DEFAULT_MAX_COMPONENT_MB,
                1,
                1024,
                "the largest component a worker may have, in MiB",
            ) << 20,
            memory_budget_mb: self.memory_mb(&s.memory_budget_mb, "sandbox.memory_budget_mb", "the MiB all instances together may hold"),
            tenant_memory_budget_mb: self.memory_mb(
                &s.tenant_memory_budget_mb,
                "sandbox.tenant_memory_budget_mb",
                "the MiB one tenant's instances may hold",
            ),
            memory_overcommit: self.overcommit(&s.memory_overcommit),
            guest_threads: s.guest_threads.is_some().then(|| {
                self.int(&s.guest_threads, "sandbox.guest_threads", 1, 1, 1024, "the threads that run guest code (default: one per core)")
                    as usize
            }),
            tenant_max_queued: self.max_queued(&s.tenant_max_queued, "sandbox.tenant_max_queued", SandboxConfig::DEFAULT_TENANT_MAX_QUEUED),
            tenant_cpu_weight: self.cpu_weight(&s.tenant_cpu_weight, "sandbox.tenant_cpu_weight", SandboxConfig::DEFAULT_CPU_WEIGHT),
        }
    }

    fn max_queued(&mut self, value: &Option<Spanned<i64>>, key: &str, default: u32) -> u32 {
        self.int(value, key, default.into(), 0, 100_000, "the requests that may wait for an instance slot of a tenant at its limit") as u32
    }

    fn cpu_weight(&mut self, value: &Option<Spanned<i64>>, key: &str, default: u32) -> u32 {
        self.int(
            value,
            key,
            default.into(),
            1,
            SandboxConfig::MAX_CPU_WEIGHT.into(),
            "the tenant's share of the guest threads relative to other tenants",
        ) as u32
    }

    /// An optional memory budget in MiB: unset means derived at start from
    /// the host's memory.
    fn memory_mb(&mut self, value: &Option<Spanned<i64>>, key: &str, what: &str) -> Option<u64> {
        let v = value.as_ref()?;
        let n = *v.get_ref();
        if !(16..=(1 << 24)).contains(&n) {
            self.error(
                Some(v.span()),
                key,
                format!("must be between 16 and {} MiB, got {n}", 1 << 24),
                format!("set it to {what}, or remove it to derive it from the host's memory"),
            );
            return None;
        }
        Some(n as u64)
    }

    fn overcommit(&mut self, value: &Option<Spanned<f64>>) -> f64 {
        let Some(v) = value else { return 1.0 };
        let ratio = *v.get_ref();
        if !(ratio.is_finite() && (1.0..=100.0).contains(&ratio)) {
            self.error(
                Some(v.span()),
                "sandbox.memory_overcommit",
                format!("must be a ratio between 1.0 and 100.0, got {ratio}"),
                "set how many times the host's memory the configured limits may promise (default 1.0: no overcommit)",
            );
            return 1.0;
        }
        ratio
    }

    /// A tenant's instance quota: at least 1 and less than the whole pool,
    /// so that a tenant at its quota always leaves a slot to the others.
    fn tenant_share(&mut self, value: &Spanned<i64>, key: &str, max_instances: u32) -> Option<u32> {
        let n = *value.get_ref();
        if n < 1 || n >= i64::from(max_instances) {
            self.error(
                Some(value.span()),
                key,
                format!("must be at least 1 and less than sandbox.max_instances ({max_instances}), got {n}"),
                format!(
                    "one tenant may not hold every instance slot: set it below {max_instances} (the default is a quarter of the pool, {}), or raise sandbox.max_instances",
                    SandboxConfig::default_tenant_max_instances(max_instances)
                ),
            );
            return None;
        }
        Some(n as u32)
    }

    /// A tenant's cap on outbound connections held open at once.
    fn outbound_connections(&mut self, value: &Option<Spanned<i64>>, key: &str) -> u32 {
        self.int(value, key, 256, 1, 65_536, "the number of outbound connections one tenant may hold open at once") as u32
    }

    /// A tenant's rate of logged worker output, in bytes per second.
    fn log_rate(&mut self, value: &Option<Spanned<i64>>, key: &str) -> u64 {
        self.int(value, key, 262_144, 1024, 1 << 30, "the bytes of worker output one tenant may have logged per second")
    }

    /// A tenant's cap on kept-alive connections: at least 1 and at most
    /// `server.max_connections`; its default is a quarter of them.
    fn idle_connections(&mut self, value: &Option<Spanned<i64>>, key: &str, max_connections: usize) -> usize {
        let default = ServerConfig::default_max_idle_connections_per_tenant(max_connections);
        self.int(value, key, default as u64, 1, max_connections as u64, "the keep-alive connections one tenant's responses may hold open")
            as usize
    }

    fn tenants(&mut self, raw: &[RawTenant], sandbox: &SandboxConfig, storage: &StorageConfig, server: &ServerConfig) -> Vec<TenantConfig> {
        let mut tenants: Vec<TenantConfig> = Vec::with_capacity(raw.len());
        for (i, t) in raw.iter().enumerate() {
            let key = |k: &str| format!("tenant[{i}].{k}");
            self.name(&t.name, &key("name"));
            if let Some(first) = tenants.iter().position(|o| o.name == *t.name.get_ref()) {
                self.error(
                    Some(t.name.span()),
                    key("name"),
                    format!("tenant `{}` is already configured by tenant[{first}]", t.name.get_ref()),
                    "give each tenant one [[tenant]] table",
                );
            }
            let max_instances = match &t.max_instances {
                None => sandbox.tenant_max_instances,
                Some(value) => {
                    self.tenant_share(value, &key("max_instances"), sandbox.max_instances).unwrap_or(sandbox.tenant_max_instances)
                }
            };
            let memory_budget_mb =
                self.memory_mb(&t.memory_budget_mb, &key("memory_budget_mb"), "the MiB this tenant's instances may hold");
            let storage_quota_mb = self.int(
                &t.storage_quota_mb,
                &key("storage_quota_mb"),
                storage.tenant_quota_mb,
                1,
                MAX_STORAGE_MB,
                "the MiB this tenant may store across its key-value namespaces and SQL databases",
            );
            let max_idle_connections = t
                .max_idle_connections
                .is_some()
                .then(|| self.idle_connections(&t.max_idle_connections, &key("max_idle_connections"), server.max_connections));
            let worker_log_bytes_per_second = t
                .worker_log_bytes_per_second
                .is_some()
                .then(|| self.log_rate(&t.worker_log_bytes_per_second, &key("worker_log_bytes_per_second")));
            let max_outbound_connections = t
                .max_outbound_connections
                .is_some()
                .then(|| self.outbound_connections(&t.max_outbound_connections, &key("max_outbound_connections")));
            tenants.push(TenantConfig {
                name: t.name.get_ref().clone(),
                max_instances,
                memory_budget_mb,
                storage_quota_mb,
                max_idle_connections,
                worker_log_bytes_per_second,
                max_outbound_connections,
                max_queued: self.max_queued(&t.max_queued, &key("max_queued"), sandbox.tenant_max_queued),
                cpu_weight: self.cpu_weight(&t.cpu_weight, &key("cpu_weight"), sandbox.tenant_cpu_weight),
            });
        }
        tenants
    }

    /// A `[[tenant]]` that no worker belongs to is most likely a misspelt
    /// name, whose quota would silently not apply.
    fn tenants_have_workers(&mut self, raw: &[RawTenant], workers: &[WorkerConfig]) {
        for (i, t) in raw.iter().enumerate() {
            if !workers.iter().any(|w| w.tenant == *t.name.get_ref()) {
                let known: Vec<&str> = workers.iter().map(|w| w.tenant.as_str()).collect();
                self.error(
                    Some(t.name.span()),
                    format!("tenant[{i}].name"),
                    format!("no worker belongs to tenant `{}`", t.name.get_ref()),
                    if known.is_empty() {
                        "remove this [[tenant]], or add a [[worker]] with this tenant".to_string()
                    } else {
                        format!("use the `tenant` of a [[worker]] ({}), or remove this [[tenant]]", dedup(known).join(", "))
                    },
                );
            }
        }
    }

    fn storage(&mut self, raw: &RawConfig) -> StorageConfig {
        let s = &raw.storage;
        let d = StorageConfig::default();
        let storage = StorageConfig {
            sqlite_heap_limit_mb: self.int(
                &s.sqlite_heap_limit_mb,
                "storage.sqlite_heap_limit_mb",
                d.sqlite_heap_limit_mb,
                64,
                1 << 20,
                "the memory SQLite may use in the whole process, in MiB",
            ),
            sql_statement_memory_mb: self.int(
                &s.sql_statement_memory_mb,
                "storage.sql_statement_memory_mb",
                d.sql_statement_memory_mb,
                1,
                4096,
                "the memory one SQL call may make SQLite allocate, in MiB",
            ),
            kv_threads: self.int(&s.kv_threads, "storage.kv_threads", d.kv_threads as u64, 1, 256, "the threads that run key-value calls")
                as usize,
            sql_threads: self.int(
                &s.sql_threads,
                "storage.sql_threads",
                d.sql_threads as u64,
                1,
                256,
                "the threads that run SQL statements",
            ) as usize,
            tenant_threads: self.int(
                &s.tenant_threads,
                "storage.tenant_threads",
                d.tenant_threads as u64,
                1,
                256,
                "the threads of each pool one tenant may use at once",
            ) as usize,
            queue: self.int(&s.queue, "storage.queue", d.queue as u64, 1, 1_000_000, "the calls that may wait for a thread, per pool")
                as usize,
            tenant_queue: self.int(
                &s.tenant_queue,
                "storage.tenant_queue",
                d.tenant_queue as u64,
                1,
                1_000_000,
                "the calls of one tenant that may wait for a thread, per pool",
            ) as usize,
            tenant_quota_mb: self.int(
                &s.tenant_quota_mb,
                "storage.tenant_quota_mb",
                d.tenant_quota_mb,
                1,
                MAX_STORAGE_MB,
                "the MiB one tenant may store across its key-value namespaces and SQL databases",
            ),
            free_space_reserve_mb: self.int(
                &s.free_space_reserve_mb,
                "storage.free_space_reserve_mb",
                d.free_space_reserve_mb,
                0,
                MAX_STORAGE_MB,
                "the MiB the data directory's file system keeps free (0 = no reserve)",
            ),
        };
        if storage.tenant_threads > storage.kv_threads.min(storage.sql_threads) {
            self.error(
                s.tenant_threads.as_ref().map(Spanned::span),
                "storage.tenant_threads",
                format!(
                    "{} is more than a pool has ({} key-value, {} SQL threads)",
                    storage.tenant_threads, storage.kv_threads, storage.sql_threads
                ),
                "keep it below the pool sizes, so that one tenant cannot take every thread",
            );
        }
        if storage.sql_statement_memory_mb > storage.sqlite_heap_limit_mb / 2 {
            self.error(
                s.sql_statement_memory_mb.as_ref().map(Spanned::span),
                "storage.sql_statement_memory_mb",
                format!(
                    "{} MiB is more than half of storage.sqlite_heap_limit_mb ({} MiB)",
                    storage.sql_statement_memory_mb, storage.sqlite_heap_limit_mb
                ),
                "lower it, or raise storage.sqlite_heap_limit_mb, so that one statement cannot take the memory every tenant shares",
            );
        }
        if storage.tenant_queue > storage.queue {
            self.error(
                s.tenant_queue.as_ref().map(Spanned::span),
                "storage.tenant_queue",
                format!("{} is more than the whole queue ({})", storage.tenant_queue, storage.queue),
                "set it to at most storage.queue",
            );
        }
        storage
    }

    fn security(&mut self, raw: &RawConfig) -> SecurityConfig {
        let mpk = match &raw.security.memory_protection_keys {
            None => MemoryProtectionKeys::Auto,
            Some(v) => match v.get_ref().as_str() {
                "auto" => MemoryProtectionKeys::Auto,
                "required" => MemoryProtectionKeys::Required,
                "off" => MemoryProtectionKeys::Off,
                other => {
                    self.error(
                        Some(v.span()),
                        "security.memory_protection_keys",
                        format!("`{other}` is not a valid setting"),
                        "use \"auto\" (use them where the CPU has them), \"required\" (refuse to start without them) or \"off\"",
                    );
                    MemoryProtectionKeys::Auto
                }
            },
        };
        let require_postgres_origin_tls = raw.security.require_postgres_origin_tls.as_ref().is_some_and(|v| *v.get_ref());
        SecurityConfig { memory_protection_keys: mpk, require_postgres_origin_tls }
    }

    pub(crate) fn name(&mut self, value: &Spanned<String>, key: &str) {
        if !is_valid_name(value.get_ref()) {
            self.error(
                Some(value.span()),
                key,
                format!("`{}` is not a valid name", value.get_ref()),
                format!("use 1 to {NAME_MAX_LEN} characters from a-z, 0-9, `_` and `-`"),
            );
        }
    }
}

fn location(text: &str, offset: usize) -> Location {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    Location { line, column }
}

/// A syntax or type error from the TOML layer, with the key recovered from
/// the source text: the nearest table header and the key on the error's line.
fn toml_error(file: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_string();
    let span = e.span();
    let (location, key) = match &span {
        Some(span) => (Some(location(text, span.start)), key_at(text, span.clone())),
        None => (None, None),
    };
    let key = key.or_else(|| backticked(&message));
    let help = if message.contains("unknown field") {
        format!("remove this key or fix its spelling; {DOCS} lists every key")
    } else if message.contains("missing field") {
        format!("add this key; {DOCS} describes it")
    } else if message.contains("invalid type") {
        format!("give the value the type that {DOCS} shows for this key")
    } else {
        "fix the TOML syntax at this position".to_string()
    };
    ConfigError { file: file.to_path_buf(), location, key, message, help }
}

fn key_at(text: &str, span: Range<usize>) -> Option<String> {
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = text[line_start..line_end].trim();
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    if line.starts_with('[') {
        return Some(line.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    }
    let key = line.split('=').next()?.trim();
    if key.is_empty() {
        return table;
    }
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_string(),
    })
}

fn dedup(mut names: Vec<&str>) -> Vec<&str> {
    names.sort_unstable();
    names.dedup();
    names
}

fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    Some(message[start..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::Limits;
    use crate::worker::parse_route;
    use crate::{Route, StorageBounds};

    fn errors(text: &str) -> Vec<ConfigError> {
        parse(Path::new("/nonexistent/cordon.toml"), text).unwrap_err().0
    }

    #[test]
    fn routes_parse_host_and_prefix() {
        assert_eq!(parse_route("Hello.Localhost/").unwrap(), Route { host: "hello.localhost".into(), path_prefix: "/".into() });
        assert_eq!(parse_route("localhost/hello/").unwrap(), Route { host: "localhost".into(), path_prefix: "/hello".into() });
        assert!(parse_route("localhost").is_err());
        assert!(parse_route("localhost:8080/").unwrap_err().contains("port"));
        assert!(parse_route("/x").is_err());
        assert!(parse_route("a/../b").is_err());
        assert!(parse_route("a b/").is_err());
    }

    #[test]
    fn storage_has_defaults_and_refuses_a_tenant_share_over_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cordon.toml");
        let config = parse(&file, "").unwrap();
        assert_eq!(config.storage, StorageConfig::default());
        let config =
            parse(&file, "[storage]\nsqlite_heap_limit_mb = 256\nsql_statement_memory_mb = 16\nsql_threads = 4\ntenant_threads = 1\n")
                .unwrap();
        assert_eq!((config.storage.sqlite_heap_limit_mb, config.storage.sql_statement_memory_mb), (256, 16));
        assert_eq!((config.storage.sql_threads, config.storage.tenant_threads, config.storage.kv_threads), (4, 1, 8));
        let e = errors("[storage]\nsql_threads = 2\ntenant_threads = 3\n");
        assert_eq!(e[0].key.as_deref(), Some("storage.tenant_threads"));
        assert!(e[0].help.contains("one tenant cannot take every thread"), "{}", e[0].help);
        let e = errors("[storage]\nsqlite_heap_limit_mb = 64\nsql_statement_memory_mb = 64\n");
        assert_eq!(e[0].key.as_deref(), Some("storage.sql_statement_memory_mb"));
        let e = errors("[storage]\nqueue = 10\ntenant_queue = 11\n");
        assert_eq!(e[0].key.as_deref(), Some("storage.tenant_queue"));
        let e = errors("[storage]\nkv_threads = 0\n");
        assert!(e[0].message.contains("between 1 and 256"), "{}", e[0].message);
    }

    #[test]
    fn unknown_key_points_at_line_and_key() {
        let e = errors("[server]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].location, Some(Location { line: 3, column: 1 }));
        assert_eq!(e[0].key.as_deref(), Some("server.lisen"));
        assert!(e[0].message.contains("unknown field"), "{}", e[0].message);
        assert!(e[0].help.contains("spelling"));
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = errors(
            "[[worker]]\nname = \"a\"\ntenant = \"t\"\ncomponent = \"a.wasm\"\nroutes = [\"x/\"]\n[worker.limits]\ncpu_ms = \"fast\"\n",
        );
        assert_eq!(e[0].key.as_deref(), Some("worker.limits.cpu_ms"));
        assert_eq!(e[0].location.unwrap().line, 7);
    }

    #[test]
    fn semantic_errors_are_all_reported_with_locations() {
        let text = "[server]\nlisten = \"nope\"\n[security]\nmemory_protection_keys = \"maybe\"\n\
                    [[worker]]\nname = \"Bad Name\"\ntenant = \"acme\"\ncomponent = \"missing.wasm\"\nroutes = [\"h:80/\"]\n\
                    [worker.limits]\ncpu_ms = 0\n";
        let e = errors(text);
        let keys: Vec<_> = e.iter().map(|e| e.key.clone().unwrap()).collect();
        for expected in [
            "server.listen",
            "security.memory_protection_keys",
            "worker[0].name",
            "worker[0].component",
            "worker[0].routes[0]",
            "worker[0].limits.cpu_ms",
        ] {
            assert!(keys.iter().any(|k| k == expected), "missing {expected} in {keys:?}");
        }
        let cpu = e.iter().find(|e| e.key.as_deref() == Some("worker[0].limits.cpu_ms")).unwrap();
        assert_eq!(cpu.location.unwrap().line, 11);
        assert!(cpu.to_string().starts_with("/nonexistent/cordon.toml:11:"), "{cpu}");
    }

    #[test]
    fn duplicate_names_and_routes_are_refused() {
        let worker = |name: &str, route: &str| {
            format!("[[worker]]\nname = \"{name}\"\ntenant = \"t\"\ncomponent = \"x.wasm\"\nroutes = [\"{route}\"]\n")
        };
        let text = [worker("a", "h.localhost/"), worker("a", "other/"), worker("b", "H.localhost/")].concat();
        let e = errors(&text);
        assert!(
            e.iter().any(|e| e.key.as_deref() == Some("worker[1].name") && e.message.contains("already the name of worker[0]")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|e| e.key.as_deref() == Some("worker[2].routes") && e.message.contains("already served by worker `a`")),
            "{e:?}"
        );
    }

    #[test]
    fn two_tenants_may_each_have_a_worker_named_api() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.wasm"), b"").unwrap();
        let file = dir.path().join("cordon.toml");
        let worker = |tenant: &str| {
            format!("[[worker]]\nname = \"api\"\ntenant = \"{tenant}\"\ncomponent = \"x.wasm\"\nroutes = [\"{tenant}.localhost/\"]\n")
        };
        let c = parse(&file, &[worker("acme"), worker("globex")].concat()).unwrap();
        let ids: Vec<(&str, &str)> = c.workers.iter().map(|w| (w.tenant.as_str(), w.name.as_str())).collect();
        assert_eq!(ids, [("acme", "api"), ("globex", "api")]);
        assert_eq!(c.worker("globex", "api").map(|w| w.routes[0].to_string()), Some("globex.localhost/".into()));
        assert!(c.worker("initech", "api").is_none());

        // Within one tenant the name is still taken.
        let e = parse(&file, &[worker("acme"), worker("globex"), worker("acme").replace("acme.localhost", "other.localhost")].concat())
            .unwrap_err()
            .0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].key.as_deref(), Some("worker[2].name"));
        assert_eq!(e[0].location, Some(Location { line: 12, column: 8 }));
        assert!(e[0].message.contains("already the name of worker[0]"), "{e:?}");
    }

    #[test]
    fn another_tenants_route_is_refused_without_saying_whose_it_is() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.wasm"), b"").unwrap();
        let file = dir.path().join("cordon.toml");
        let text = "[[worker]]\nname = \"shop\"\ntenant = \"acme\"\ncomponent = \"x.wasm\"\nroutes = [\"shop.example/\"]\n\
                    [[worker]]\nname = \"api\"\ntenant = \"globex\"\ncomponent = \"x.wasm\"\nroutes = [\"api.example/\", \"Shop.example/\"]\n";
        let e = parse(&file, text).unwrap_err().0;
        assert_eq!(e.len(), 1, "{e:?}");
        let taken = &e[0];
        assert_eq!(taken.key.as_deref(), Some("worker[1].routes"));
        assert_eq!(taken.location, Some(Location { line: 10, column: 10 }));
        assert!(taken.message.contains("route `shop.example/` is already served"), "{taken:?}");
        let shown = taken.to_string();
        assert!(!shown.contains("acme") && !shown.contains("`shop`"), "the holder is another tenant's business: {shown}");
    }

    #[test]
    fn a_conflict_with_a_default_points_at_the_table() {
        // pool_size keeps its default of 10, above the group's limit of 5:
        // the key is absent, so the error points at its [[database]].
        let text = "[server]\nlisten = \"127.0.0.1:1\"\n\n[[database]]\nname = \"main\"\ntenant = \"acme\"\n\
                    origin = \"postgres://app@db/app\"\ntenant_origin_connections = 5\n";
        let e = errors(text);
        let pool = e.iter().find(|e| e.key.as_deref() == Some("database[0].pool_size")).unwrap_or_else(|| panic!("{e:?}"));
        assert_eq!(pool.location, Some(Location { line: 4, column: 1 }));
    }

    #[test]
    fn cpu_time_cannot_exceed_wall_time() {
        let text = "[[worker]]\nname = \"a\"\ntenant = \"t\"\ncomponent = \"x.wasm\"\nroutes = [\"h/\"]\n[worker.limits]\nwall_ms = 10\n";
        let e = errors(text);
        let wall =
            e.iter().find(|e| e.key.as_deref() == Some("worker[0].limits.wall_ms")).expect("the default cpu_ms of 50 exceeds wall_ms = 10");
        assert_eq!(wall.location.unwrap().line, 7);
    }

    #[test]
    fn names_are_restricted() {
        assert!(is_valid_name("acme_1-x"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("../etc"));
        assert!(!is_valid_name("Acme"));
        assert!(!is_valid_name(&"a".repeat(64)));
    }

    #[test]
    fn defaults_fill_an_empty_file() {
        let c = parse(Path::new("/srv/cordon.toml"), "").unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:8081");
        assert_eq!(c.server.data_dir, Path::new("/srv/.cordon"));
        assert_eq!(c.security.memory_protection_keys, MemoryProtectionKeys::Auto);
        assert_eq!((c.server.max_name_lookups, c.server.max_name_lookups_per_tenant), (1024, 16));
        assert_eq!(c.server.worker_log_bytes_per_second, 262_144);
        assert!(c.workers.is_empty());
    }

    #[test]
    fn name_lookup_limits_have_ranges() {
        let c = parse(
            Path::new("/srv/cordon.toml"),
            "[server]
max_name_lookups = 64
max_name_lookups_per_tenant = 4
",
        )
        .unwrap();
        assert_eq!((c.server.max_name_lookups, c.server.max_name_lookups_per_tenant), (64, 4));
        let e = errors(
            "[server]
max_name_lookups = 0
max_name_lookups_per_tenant = 100000
",
        );
        assert!(e.iter().any(|e| e.key.as_deref() == Some("server.max_name_lookups")), "{e:?}");
        assert!(e.iter().any(|e| e.key.as_deref() == Some("server.max_name_lookups_per_tenant")), "{e:?}");
    }

    #[test]
    fn the_worker_log_rate_has_a_range() {
        let c = parse(Path::new("/srv/cordon.toml"), "[server]\nworker_log_bytes_per_second = 4096\n").unwrap();
        assert_eq!(c.server.worker_log_bytes_per_second, 4096);
        for bad in ["0", "1023", "2147483648"] {
            let e = errors(&format!("[server]\nworker_log_bytes_per_second = {bad}\n"));
            assert!(e.iter().any(|e| e.key.as_deref() == Some("server.worker_log_bytes_per_second")), "{bad}: {e:?}");
        }
    }

    #[test]
    fn instance_quotas_default_to_a_quarter_of_the_pool_and_stay_below_it() {
        let file = Path::new("/srv/cordon.toml");
        let c = parse(file, "").unwrap();
        assert_eq!((c.sandbox.max_instances, c.sandbox.tenant_max_instances), (1000, 250));
        let c = parse(file, "[sandbox]\nmax_instances = 2\n").unwrap();
        assert_eq!(c.sandbox.tenant_max_instances, 1, "at least one, and still below the pool");
        let e = errors("[sandbox]\nmax_instances = 1\n");
        assert!(e[0].message.contains("between 2 and 100000"), "{}", e[0].message);
        for quota in ["100", "0", "101"] {
            let e = errors(&format!("[sandbox]\nmax_instances = 100\ntenant_max_instances = {quota}\n"));
            assert_eq!(e.len(), 1, "{e:?}");
            assert_eq!(e[0].key.as_deref(), Some("sandbox.tenant_max_instances"));
            assert_eq!(e[0].location, Some(Location { line: 3, column: 24 }));
            assert!(e[0].message.contains("less than sandbox.max_instances (100)"), "{}", e[0].message);
            assert!(e[0].help.contains("one tenant may not hold every instance slot"), "{}", e[0].help);
        }
    }

    #[test]
    fn tenant_tables_override_the_instance_quota_of_their_workers() {
        let dir = tempfile::tempdir().unwrap();
        let component = dir.path().join("x.wasm");
        std::fs::write(&component, b"").unwrap();
        let file = dir.path().join("cordon.toml");
        let worker = |name: &str, tenant: &str, limits: &str| {
            format!("[[worker]]\nname = \"{name}\"\ntenant = \"{tenant}\"\ncomponent = \"x.wasm\"\nroutes = [\"{name}/\"]\n{limits}")
        };
        let text = format!(
            "[sandbox]\nmax_instances = 100\ntenant_max_instances = 10\n[[tenant]]\nname = \"acme\"\nmax_instances = 40\n{}{}{}",
            worker("a", "acme", ""),
            worker("b", "acme", "[worker.limits]\nmax_instances = 5\n"),
            worker("c", "other", ""),
        );
        let c = parse(&file, &text).unwrap();
        let acme = TenantConfig {
            name: "acme".into(),
            max_instances: 40,
            memory_budget_mb: None,
            storage_quota_mb: 1024,
            max_idle_connections: None,
            worker_log_bytes_per_second: None,
            max_outbound_connections: None,
            max_queued: SandboxConfig::DEFAULT_TENANT_MAX_QUEUED,
            cpu_weight: SandboxConfig::DEFAULT_CPU_WEIGHT,
        };
        assert_eq!(c.tenants, vec![acme]);
        assert_eq!((c.tenant_max_instances("acme"), c.tenant_max_instances("other")), (40, 10));
        let limits: Vec<u32> = c.workers.iter().map(|w| w.limits.max_instances).collect();
        assert_eq!(limits, [40, 5, 10], "a worker defaults to its tenant's quota");

        // A worker above its tenant's quota, a quota at the pool, a
        // duplicate and a tenant no worker belongs to: all refused, each
        // at its line.
        let text = format!(
            "[sandbox]\nmax_instances = 100\n[[tenant]]\nname = \"acme\"\nmax_instances = 100\n[[tenant]]\nname = \"acme\"\n[[tenant]]\nname = \"acmee\"\n{}",
            worker("a", "acme", "[worker.limits]\nmax_instances = 26\n"),
        );
        let e = parse(&file, &text).unwrap_err().0;
        let at = |key: &str| e.iter().find(|e| e.key.as_deref() == Some(key)).unwrap_or_else(|| panic!("no error for {key}: {e:?}"));
        assert_eq!(at("tenant[0].max_instances").location.unwrap().line, 5);
        assert!(at("tenant[1].name").message.contains("already configured by tenant[0]"));
        let unknown = at("tenant[2].name");
        assert_eq!(unknown.location.unwrap().line, 9);
        assert!(unknown.message.contains("no worker belongs to tenant `acmee`"), "{}", unknown.message);
        assert!(unknown.help.contains("(acme)"), "{}", unknown.help);
        let worker_limit = at("worker[0].limits.max_instances");
        assert_eq!(worker_limit.location.unwrap().line, 16);
        assert!(worker_limit.message.contains("quota of 25 instances"), "{}", worker_limit.message);
        assert!(worker_limit.to_string().starts_with(&format!("{}:16:17", file.display())), "{worker_limit}");
        let e = errors("[[tenant]]\nname = \"Acme\"\nmemory = 1\n");
        assert!(e[0].message.contains("unknown field"), "{e:?}");
    }

    #[test]
    fn memory_budgets_are_optional_bounded_and_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.wasm"), b"").unwrap();
        let file = dir.path().join("cordon.toml");
        let c = parse(&file, &worker_with("")).unwrap();
        assert_eq!((c.sandbox.memory_budget_mb, c.sandbox.tenant_memory_budget_mb, c.sandbox.memory_overcommit), (None, None, 1.0));
        let text = format!(
            "[sandbox]\nmemory_budget_mb = 4096\ntenant_memory_budget_mb = 512\nmemory_overcommit = 2\n[[tenant]]\nname = \"t\"\nmemory_budget_mb = 1024\n{}",
            worker_with("")
        );
        let c = parse(&file, &text).unwrap();
        assert_eq!(
            (c.sandbox.memory_budget_mb, c.sandbox.tenant_memory_budget_mb, c.sandbox.memory_overcommit),
            (Some(4096), Some(512), 2.0)
        );
        assert_eq!(c.tenants[0].memory_budget_mb, Some(1024));
        let e = errors(&format!("[sandbox]\nmemory_budget_mb = 8\nmemory_overcommit = 0.5\n{}", worker_with("")));
        let at = |key: &str| e.iter().find(|e| e.key.as_deref() == Some(key)).unwrap_or_else(|| panic!("no error for {key}: {e:?}"));
        assert_eq!(at("sandbox.memory_budget_mb").location.unwrap().line, 2);
        assert!(at("sandbox.memory_overcommit").message.contains("between 1.0 and 100.0"));
    }

    #[test]
    fn storage_quotas_default_per_tenant_and_reach_the_workers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.wasm"), b"").unwrap();
        let file = dir.path().join("cordon.toml");
        let worker = |name: &str, tenant: &str| {
            format!("[[worker]]\nname = \"{name}\"\ntenant = \"{tenant}\"\ncomponent = \"x.wasm\"\nroutes = [\"{name}/\"]\n")
        };
        let c = parse(&file, &worker("a", "acme")).unwrap();
        assert_eq!((c.storage.tenant_quota_mb, c.storage.free_space_reserve_mb), (1024, 512));
        assert_eq!(c.workers[0].storage, StorageBounds { tenant_quota_bytes: 1024 << 20, free_space_reserve_bytes: 512 << 20 });

        let text = format!(
            "[storage]\ntenant_quota_mb = 64\nfree_space_reserve_mb = 0\n[[tenant]]\nname = \"acme\"\nstorage_quota_mb = 4\n{}{}",
            worker("a", "acme"),
            worker("b", "other"),
        );
        let c = parse(&file, &text).unwrap();
        assert_eq!((c.tenant_storage_quota_mb("acme"), c.tenant_storage_quota_mb("other")), (4, 64));
        let bounds: Vec<(u64, u64)> =
            c.workers.iter().map(|w| (w.storage.tenant_quota_bytes, w.storage.free_space_reserve_bytes)).collect();
        assert_eq!(bounds, [(4 << 20, 0), (64 << 20, 0)]);

        // Out of range, each at its line and column.
        let text = format!(
            "[storage]\ntenant_quota_mb = 0\nfree_space_reserve_mb = -1\n[[tenant]]\nname = \"acme\"\nstorage_quota_mb = 0\n{}",
            worker("a", "acme"),
        );
        let e = parse(&file, &text).unwrap_err().0;
        let at = |key: &str| e.iter().find(|e| e.key.as_deref() == Some(key)).unwrap_or_else(|| panic!("no error for {key}: {e:?}"));
        assert_eq!(at("storage.tenant_quota_mb").location, Some(Location { line: 2, column: 19 }));
        assert_eq!(at("storage.free_space_reserve_mb").location, Some(Location { line: 3, column: 25 }));
        let tenant = at("tenant[0].storage_quota_mb");
        assert_eq!(tenant.location, Some(Location { line: 6, column: 20 }));
        assert!(tenant.to_string().starts_with(&format!("{}:6:20", file.display())), "{tenant}");
        let e = errors("[storage]\ntenant_quota = 1\n");
        assert!(e[0].message.contains("unknown field"), "{e:?}");
    }

    fn worker_with(extra: &str) -> String {
        format!("[[worker]]\nname = \"a\"\ntenant = \"t\"\ncomponent = \"x.wasm\"\nroutes = [\"h/\"]\n{extra}")
    }

    #[test]
    fn the_engine_ceilings_are_explicit_and_bound_every_worker() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.wasm"), b"").unwrap();
        let file = dir.path().join("cordon.toml");
        // Unset: the largest memory_mb of the file, at least 128.
        let c = parse(&file, &worker_with("")).unwrap();
        assert_eq!((c.sandbox.max_memory_mb, c.sandbox.max_table_elements, c.sandbox.max_component_bytes), (128, 100_000, 128 << 20));
        let c = parse(&file, &worker_with("[worker.limits]\nmemory_mb = 300\n")).unwrap();
        assert_eq!(c.sandbox.max_memory_mb, 300);
        // Set: a worker above it is refused at its memory_mb, naming the ceiling.
        let text = format!(
            "[sandbox]\nmax_memory_mb = 64\nmax_table_elements = 5000\nmax_component_mb = 16\n{}",
            worker_with("[worker.limits]\nmemory_mb = 100\n")
        );
        let e = parse(&file, &text).unwrap_err().0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].key.as_deref(), Some("worker[0].limits.memory_mb"));
        assert!(e[0].message.contains("sandbox.max_memory_mb = 64"), "{}", e[0]);
        let text = format!("[sandbox]\nmax_memory_mb = 64\nmax_table_elements = 5000\nmax_component_mb = 16\n{}", worker_with(""));
        let c = parse(&file, &text).unwrap();
        assert_eq!((c.sandbox.max_memory_mb, c.sandbox.max_table_elements, c.sandbox.max_component_bytes), (64, 5000, 16 << 20));
        let e = parse(&file, &format!("[sandbox]\nmax_table_elements = 0\n{}", worker_with(""))).unwrap_err().0;
        assert_eq!(e[0].key.as_deref(), Some("sandbox.max_table_elements"));
    }

    #[test]
    fn cpu_weights_queues_and_guest_threads_have_defaults_bounds_and_tenant_overrides() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.wasm"), b"").unwrap();
        let file = dir.path().join("cordon.toml");
        let c = parse(&file, &worker_with("")).unwrap();
        assert_eq!((c.sandbox.guest_threads, c.tenant_cpu_weight("t"), c.tenant_max_queued("t")), (None, 100, 128));
        let text = format!(
            "[sandbox]\nguest_threads = 3\ntenant_cpu_weight = 50\ntenant_max_queued = 7\n[[tenant]]\nname = \"t\"\ncpu_weight = 300\nmax_queued = 0\n{}{}",
            worker_with(""),
            "[[worker]]\nname = \"b\"\ntenant = \"u\"\ncomponent = \"x.wasm\"\nroutes = [\"u/\"]\n"
        );
        let c = parse(&file, &text).unwrap();
        assert_eq!(c.sandbox.guest_threads, Some(3));
        assert_eq!((c.tenant_cpu_weight("t"), c.tenant_max_queued("t")), (300, 0));
        assert_eq!((c.tenant_cpu_weight("u"), c.tenant_max_queued("u")), (50, 7), "a tenant without a table gets the defaults");
        let e = errors(&format!(
            "[sandbox]\nguest_threads = 0\ntenant_cpu_weight = 0\n[[tenant]]\nname = \"t\"\ncpu_weight = 10001\nmax_queued = -1\n{}",
            worker_with("")
        ));
        for key in ["sandbox.guest_threads", "sandbox.tenant_cpu_weight", "tenant[0].cpu_weight", "tenant[0].max_queued"] {
            assert!(e.iter().any(|e| e.key.as_deref() == Some(key)), "no error for {key}: {e:?}");
        }
    }

    #[test]
    fn idle_connection_caps_default_to_a_quarter_of_the_slots_and_tenants_override_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.wasm"), b"").unwrap();
        let file = dir.path().join("cordon.toml");
        let workers = "[[worker]]\nname = \"a\"\ntenant = \"acme\"\ncomponent = \"x.wasm\"\nroutes = [\"a/\"]\n\
                       [[worker]]\nname = \"b\"\ntenant = \"other\"\ncomponent = \"x.wasm\"\nroutes = [\"b/\"]\n";
        let c = parse(&file, workers).unwrap();
        assert_eq!(c.server.max_idle_connections_per_tenant, 2500);
        let c =
            parse(&file, &format!("[server]\nmax_connections = 400\n[[tenant]]\nname = \"acme\"\nmax_idle_connections = 50\n{workers}"))
                .unwrap();
        assert_eq!((c.tenant_max_idle_connections("acme"), c.tenant_max_idle_connections("other")), (50, 100));
        let c = parse(&file, &format!("[server]\nmax_idle_connections_per_tenant = 7\n{workers}")).unwrap();
        assert_eq!(c.tenant_max_idle_connections("acme"), 7);

        // Above the connection slots, or zero: refused at the value.
        let text = format!(
            "[server]\nmax_connections = 400\nmax_idle_connections_per_tenant = 401\n[[tenant]]\nname = \"acme\"\nmax_idle_connections = 0\n{workers}"
        );
        let e = parse(&file, &text).unwrap_err().0;
        let at = |key: &str| e.iter().find(|e| e.key.as_deref() == Some(key)).unwrap_or_else(|| panic!("no error for {key}: {e:?}"));
        assert_eq!(
            at("server.max_idle_connections_per_tenant").to_string().lines().next().unwrap(),
            format!("{}:3:35: `server.max_idle_connections_per_tenant`: must be between 1 and 400, got 401", file.display())
        );
        assert_eq!(at("tenant[0].max_idle_connections").location.unwrap().line, 6);
    }

    #[test]
    fn tenants_override_their_log_rate_and_outbound_connections_and_only_theirs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.wasm"), b"").unwrap();
        let file = dir.path().join("cordon.toml");
        let workers = "[[worker]]\nname = \"a\"\ntenant = \"acme\"\ncomponent = \"x.wasm\"\nroutes = [\"a/\"]\n\
                       [[worker]]\nname = \"b\"\ntenant = \"other\"\ncomponent = \"x.wasm\"\nroutes = [\"b/\"]\n";
        let text = format!(
            "[server]\nworker_log_bytes_per_second = 4096\nmax_outbound_connections_per_tenant = 32\n\
             [[tenant]]\nname = \"acme\"\nworker_log_bytes_per_second = 1048576\nmax_outbound_connections = 8\n{workers}"
        );
        let c = parse(&file, &text).unwrap();
        assert_eq!((c.tenant_worker_log_bytes_per_second("acme"), c.tenant_worker_log_bytes_per_second("other")), (1 << 20, 4096));
        assert_eq!((c.tenant_max_outbound_connections("acme"), c.tenant_max_outbound_connections("other")), (8, 32));
        let c = parse(&file, workers).unwrap();
        assert_eq!((c.tenant_worker_log_bytes_per_second("acme"), c.tenant_max_outbound_connections("acme")), (262_144, 256));

        let text = format!("[[tenant]]\nname = \"acme\"\nworker_log_bytes_per_second = 10\nmax_outbound_connections = 0\n{workers}");
        let e = parse(&file, &text).unwrap_err().0;
        let at = |key: &str| e.iter().find(|e| e.key.as_deref() == Some(key)).unwrap_or_else(|| panic!("no error for {key}: {e:?}"));
        let rate = at("tenant[0].worker_log_bytes_per_second");
        assert_eq!(rate.location.unwrap().line, 3);
        assert!(rate.message.contains("between 1024 and 1073741824, got 10"), "{}", rate.message);
        assert_eq!(at("tenant[0].max_outbound_connections").location.unwrap().line, 4);
    }
    #[test]
    fn outbound_entries_are_checked_one_by_one() {
        let e = errors(&worker_with("allowed_outbound = [\"https://api.example.com\", \"http://2130706433:80\", \"ftp://x.example\"]\n"));
        let bad: Vec<_> = e.iter().filter(|e| e.key.as_deref().is_some_and(|k| k.contains("allowed_outbound"))).collect();
        assert_eq!(bad.len(), 2, "{e:?}");
        assert_eq!(bad[0].key.as_deref(), Some("worker[0].allowed_outbound[1]"));
        assert!(bad[0].message.contains("integer"), "{}", bad[0].message);
        assert_eq!(bad[0].location.unwrap().line, 6);
        assert!(bad[0].help.contains("scheme://host[:port]"));
        assert_eq!(bad[1].key.as_deref(), Some("worker[0].allowed_outbound[2]"));
    }

    #[test]
    fn a_bare_star_needs_the_loudly_named_opt_in() {
        let e = errors(&worker_with("allowed_outbound = [\"*\"]\n"));
        let star = e.iter().find(|e| e.key.as_deref() == Some("worker[0].allowed_outbound[0]")).expect("`*` is refused");
        assert!(star.help.contains("allow_any_outbound_dangerously = true"), "{}", star.help);

        let e = errors(&worker_with("allow_any_outbound_dangerously = true\nallowed_outbound = [\"https://a.example\"]\n"));
        assert!(
            e.iter().any(|e| e.key.as_deref() == Some("worker[0].allow_any_outbound_dangerously")),
            "the flag alone is an error: {e:?}"
        );
    }

    #[test]
    fn outbound_limits_have_defaults_and_ranges() {
        let d = Limits::default();
        assert_eq!((d.max_subrequests, d.subrequest_timeout_ms), (50, 10_000));
        let e = errors(&worker_with("[worker.limits]\nmax_subrequests = -1\nsubrequest_timeout_ms = 0\n"));
        assert!(e.iter().any(|e| e.key.as_deref() == Some("worker[0].limits.max_subrequests")));
        assert!(e.iter().any(|e| e.key.as_deref() == Some("worker[0].limits.subrequest_timeout_ms")));
    }

    #[test]
    fn postgres_limits_have_defaults_and_ranges() {
        let d = Limits::default();
        assert_eq!((d.max_postgres_queries, d.max_postgres_result_bytes), (50, 16 << 20));
        let postgres = |e: &ConfigError| e.key.as_deref().is_some_and(|k| k.contains("postgres"));
        // The component does not exist, so there are errors, but none about the limits at their bounds.
        let e = errors(&worker_with("[worker.limits]\nmax_postgres_queries = 10000\nmax_postgres_result_bytes = 1024\n"));
        assert!(!e.iter().any(postgres), "{e:?}");
        let e = errors(&worker_with("[worker.limits]\nmax_postgres_queries = 0\nmax_postgres_result_bytes = 1023\n"));
        assert!(e.iter().any(|e| e.key.as_deref() == Some("worker[0].limits.max_postgres_queries")), "{e:?}");
        assert!(e.iter().any(|e| e.key.as_deref() == Some("worker[0].limits.max_postgres_result_bytes")), "{e:?}");
        let e = errors(&worker_with("[worker.limits]\nmax_postgres_queries = 10001\nmax_postgres_result_bytes = 268435457\n"));
        assert_eq!(e.iter().filter(|e| postgres(e)).count(), 2, "{e:?}");
    }
}
