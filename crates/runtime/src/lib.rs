//! The sandbox: the wasmtime engine and its policy, the compiled-code cache,
//! and the execution of one request in a fresh instance under limits.
//!
//! Entry points: [`Runtime::start`] loads every worker of a config;
//! [`Runtime::executors`] gives them as [`Executor`]s, the seam the gateway
//! runs requests through. This crate does no network I/O of its own; it is
//! given requests and returns responses.

pub mod admission;
mod body;
mod cache;
mod clock;
mod executor;
mod grants;
mod host;
mod host_buffers;
mod meter;
mod outbound;
pub mod policy;
pub mod registry;
pub mod scheduler;
mod stdio;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cordon_config::{Config, WorkerConfig};
use cordon_pgaccel::accel::Accelerator;
use wasmtime::Engine;
use wasmtime::component::Linker;

pub use admission::{Admission, Admit, InstanceSlot, MemoryBudgets, MemoryConfigError, QueuedRequest, Refusal, SlotsSnapshot};
pub use body::{ResponseBody, ResponseBodyError};
pub use cache::{CacheError, CodeCache, CodeSource, DataDirLock, LoadError};
pub use cordon_egress::Network;
pub use executor::{Executor, Invocation, InvokeError, InvokeFuture, Outcome, Report, RequestId, Run};
pub use policy::{PolicyError, Posture};
pub use stdio::CapturedText;
pub use worker::{GrantSummary, StatsSnapshot, Worker};

use host::Host;
use worker::Capabilities;

/// The storage behind capabilities: key-value namespaces, SQL databases and
/// the secret vault under the data directory, and the Postgres accelerator
/// in front of the tenants' origin databases.
struct Stores {
    kv: cordon_kv::store::Namespaces,
    sql: cordon_sql::database::Databases,
    /// Opened when the first worker granted a secret is loaded: at start, or
    /// when such a worker is deployed later.
    vault: std::sync::Mutex<Option<Arc<cordon_vars::vault::Vault>>>,
    /// `CORDON_MASTER_KEY` as the process started with it (`serve` takes it
    /// out of the environment), for opening the vault later; zeroed on drop.
    master_key_env: Option<zeroize::Zeroizing<String>>,
    data_dir: PathBuf,
    /// One for the process, when there is a `[[database]]`: the worker
    /// binding and the wire-protocol proxy share its pools and caches.
    accel: Option<Arc<Accelerator>>,
}

impl Stores {
    fn open(config: &Config, env: &dyn Fn(&str) -> Option<String>) -> Result<Stores, StartError> {
        let data = &config.server.data_dir;
        // Process-wide, and first: the per-call budgets need SQLite unused.
        let memory = cordon_sql::memory::limit_memory(config.storage.sqlite_heap_limit_mb << 20);
        tracing::info!(heap_limit_bytes = memory.heap_limit, statement_budgets = memory.budgets, "SQLite memory limits set");
        // Building it opens no connection: origins are dialed on first use.
        let accel = if config.databases.is_empty() {
            None
        } else {
            Some(Arc::new(Accelerator::from_config(config, env).map_err(|e| StartError::Postgres(e.to_string()))?))
        };
        let storage = &config.storage;
        let pool = |name, threads| cordon_blocking::PoolConfig {
            name,
            threads,
            tenant_threads: storage.tenant_threads,
            queue: storage.queue,
            tenant_queue: storage.tenant_queue,
        };
        let stores = Stores {
            kv: cordon_kv::store::Namespaces::with_pool(data.join("kv"), pool("kv", storage.kv_threads)),
            sql: cordon_sql::database::Databases::with_pool(data.join("sql"), pool("sql", storage.sql_threads))
                .with_statement_memory(usize::try_from(storage.sql_statement_memory_mb << 20).unwrap_or(usize::MAX)),
            vault: std::sync::Mutex::new(None),
            master_key_env: env(cordon_vars::vault::MASTER_KEY_ENV).map(zeroize::Zeroizing::new),
            data_dir: data.clone(),
            accel,
        };
        // A key that cannot open the store stops the start, not a request.
        if config.workers.iter().any(|w| !w.grants.secrets.is_empty()) {
            stores.vault().map_err(StartError::Secrets)?;
        }
        Ok(stores)
    }

    /// The secret vault, opened (and the master key read) on first use; no
    /// key is read or created while no worker is granted a secret.
    fn vault(&self) -> Result<Arc<cordon_vars::vault::Vault>, String> {
        let mut vault = self.vault.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = vault.as_ref() {
            return Ok(v.clone());
        }
        let from_env = self.master_key_env.as_ref().map(|k| std::ffi::OsString::from(k.as_str()));
        let (key, source) = cordon_vars::vault::MasterKey::load_with_env(from_env, &self.data_dir).map_err(|e| e.to_string())?;
        tracing::info!(source = ?source, "secret vault master key loaded");
        let opened = Arc::new(cordon_vars::vault::Vault::open(&self.data_dir, key).map_err(|e| e.to_string())?);
        *vault = Some(opened.clone());
        Ok(opened)
    }

    fn capabilities(&self, w: &WorkerConfig, network: &Arc<Network>) -> Result<Capabilities, LoadError> {
        let cap = |what: &str, e: &dyn std::fmt::Display| LoadError::Capability(format!("{what}: {e}"));
        Ok(Capabilities {
            network: network.clone(),
            kv: Arc::new(cordon_kv::host::WorkerKv::open(w, &self.kv).map_err(|e| cap("cannot open a key-value namespace", &e))?),
            sql: Arc::new(cordon_sql::host::WorkerSql::open(w, &self.sql).map_err(|e| cap("cannot open a SQL database", &e))?),
            vars: Arc::new(
                cordon_vars::host::WorkerVars::new(
                    w,
                    if w.grants.secrets.is_empty() { None } else { Some(self.vault().map_err(|e| cap("the secret vault", &e))?) },
                )
                .map_err(|e| cap("secrets", &e))?,
            ),
            postgres: Arc::new(
                cordon_postgres::host::WorkerPostgres::open(w, self.accel.as_ref())
                    .map_err(|e| cap("cannot use a Postgres database", &e))?,
            ),
        })
    }
}

/// A worker that failed to load, and why.
#[derive(Debug, thiserror::Error)]
#[error("worker `{worker}` of tenant `{tenant}` ({}): {error}", component.display())]
pub struct WorkerLoadError {
    pub tenant: String,
    pub worker: String,
    pub component: PathBuf,
    pub error: LoadError,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Network(#[from] cordon_egress::NetworkError),
    #[error("cannot open the secret vault: {0}")]
    Secrets(String),
    #[error("cannot start the Postgres accelerator: {0}")]
    Postgres(String),
    #[error(transparent)]
    Memory(#[from] MemoryConfigError),
    #[error(transparent)]
    DataDir(#[from] cordon_disk::private_dir::NotPrivate),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Workers(Vec<WorkerLoadError>),
    #[error("cannot open the registry: {0}")]
    Registry(String),
    #[error(transparent)]
    Deploy(registry::DeployError),
}

/// The engine, its posture, and the live registry of deployed workers.
pub struct Runtime {
    engine: Engine,
    posture: Posture,
    linker: Linker<Host>,
    /// The configuration the runtime started with: the platform that
    /// deployed specs are validated against (tenants' quotas, databases).
    config: Arc<Config>,
    stores: Stores,
    admission: std::sync::Mutex<Admission>,
    /// The guest threads (also reachable through `admission`, without its lock).
    scheduler: Arc<scheduler::Scheduler>,
    network: Arc<Network>,
    live: registry::Live,
    _ticker: EpochTicker,
    /// Held while the runtime lives; it holds the data directory's lock, so
    /// one process owns a data directory at a time.
    cache: CodeCache,
}

impl Runtime {
    /// Builds the engine from the config's policy, then compiles (or loads
    /// from the cache under `data_dir`) every worker's component, in parallel.
    /// Any worker that fails to load fails the start.
    pub fn start(config: &Config) -> Result<Runtime, StartError> {
        Self::start_with_network(config, Arc::new(network(config)?))
    }

    /// [`Runtime::start`], with outbound requests going through `network`
    /// (tests give it a resolver, a dialer or a CA of their own).
    pub fn start_with_network(config: &Config, network: Arc<Network>) -> Result<Runtime, StartError> {
        Self::start_with_env(config, network, &|name| std::env::var(name).ok())
    }

    /// [`Runtime::start_with_network`], with the environment variables that
    /// hold secrets (the master key and the `[[database]]` passwords) read
    /// through `env` instead of the process environment: `serve` gives the
    /// values it took out of it, tests give theirs.
    pub fn start_with_env(config: &Config, network: Arc<Network>, env: &dyn Fn(&str) -> Option<String>) -> Result<Runtime, StartError> {
        let memory = MemoryBudgets::from_config(config, cordon_memory::host::HostMemory::detect())?;
        tracing::info!(
            process_budget_bytes = memory.process.limit(),
            instance_overhead_bytes = memory.instance_overhead_bytes,
            "memory budgets set"
        );
        cordon_disk::private_dir::check_data_dir(&config.server.data_dir)?;
        let (engine, posture) = build_engine(config)?;
        let cache = CodeCache::open(&config.server.data_dir)?;
        let linker = host::linker(&engine).map_err(|e| PolicyError::Engine(e.to_string()))?;
        let stores = Stores::open(config, env)?;
        let threads = config.sandbox.guest_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        let epoch = engine.clone();
        let scheduler = Arc::new(scheduler::Scheduler::start(threads, Some(Box::new(move || epoch.increment_epoch()))));
        tracing::info!(guest_threads = threads, "guest threads started");
        let admission = Admission::from_config(config, memory, scheduler.clone());
        let store = cordon_registry::RegistryStore::open(&config.server.data_dir, cordon_registry::MIN_KEPT_VERSIONS)
            .map_err(|e| StartError::Registry(e.to_string()))?;
        let sticky = config.server.version_key_header.as_deref().and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok());
        let ticker = EpochTicker::start(&engine);
        let runtime = Runtime {
            engine,
            posture,
            linker,
            config: Arc::new(config.clone()),
            stores,
            admission: std::sync::Mutex::new(admission),
            scheduler,
            network,
            live: registry::Live::new(store, sticky),
            _ticker: ticker,
            cache,
        };
        // `cordon.toml` is the first deployment of its workers, and a
        // restart with the same file keeps what was active.
        let synced = runtime.sync_config_workers(&config.workers, true).map_err(StartError::Deploy)?;
        tracing::info!(
            deployed = synced.deployed.len(),
            unchanged = synced.unchanged.len(),
            removed = synced.removed.len(),
            "registry loaded"
        );
        Ok(runtime)
    }

    /// Validates the policy and every component without writing anything:
    /// the posture (or why the engine cannot be built) and one result per
    /// worker.
    pub fn check(config: &Config) -> Result<(Posture, Vec<Result<(), WorkerLoadError>>), StartError> {
        CodeCache::check_existing(&config.server.data_dir)?;
        cordon_disk::private_dir::check_data_dir(&config.server.data_dir)?;
        let memory = MemoryBudgets::from_config(config, cordon_memory::host::HostMemory::detect())?;
        let (engine, posture) = build_engine(config)?;
        let linker = host::linker(&engine).map_err(|e| PolicyError::Engine(e.to_string()))?;
        let network = Arc::new(Network::system()?);
        // Nothing runs: one guest thread.
        let mut admission = Admission::from_config(config, memory, Arc::new(scheduler::Scheduler::start(1, None)));
        let results =
            load_workers(&engine, &linker, &config.workers, &config.sandbox, None, &mut admission, &|_| Ok(Capabilities::none(&network)))
                .into_iter()
                .map(|r| r.map(drop))
                .collect();
        Ok((posture, results))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn posture(&self) -> &Posture {
        &self.posture
    }

    /// The resolver, dialer, TLS trust and lookup slots that outbound
    /// requests go through.
    pub fn network(&self) -> &Arc<Network> {
        &self.network
    }

    /// Every version that the current snapshot serves.
    pub fn workers(&self) -> Vec<Arc<Worker>> {
        self.snapshot().workers().flat_map(|d| d.versions().map(|(_, w)| w.clone()).collect::<Vec<_>>()).collect()
    }

    /// Every tenant's instance quota and what it holds now.
    pub fn admission(&self) -> std::sync::MutexGuard<'_, Admission> {
        self.admission.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The quotas a worker of `config`'s tenant runs under.
    fn quotas(&self, config: &WorkerConfig) -> worker::TenantQuotas {
        let mut admission = self.admission();
        worker::TenantQuotas {
            slots: admission.tenant(&config.tenant, self.config.tenant_max_instances(&config.tenant)),
            share: admission.share(&config.tenant),
            scheduler: self.scheduler.clone(),
            memory: admission.memory_mut().tenant(&config.tenant),
            process_memory: admission.memory().process.clone(),
            instance_overhead_bytes: admission.memory().instance_overhead_bytes,
        }
    }

    /// Stops running guests: queued and waiting ones are dropped, running
    /// ones at the end of their current run (within `within`). Call it
    /// before stopping the async runtime that serves the network, whose
    /// shutdown wakes every guest waiting on a timer or a socket.
    pub fn stop_guests(&self, within: std::time::Duration) {
        self.scheduler.stop(within);
    }

    /// The number of threads that run guest code.
    pub fn guest_threads(&self) -> usize {
        self.scheduler.threads()
    }

    /// Every tenant's share of the guest threads: its weight, the guest CPU
    /// it used and its guests waiting for a thread.
    pub fn cpu_shares(&self) -> std::collections::BTreeMap<String, scheduler::ShareSnapshot> {
        self.admission().cpu_snapshot()
    }

    /// The Postgres accelerator, when the config has a `[[database]]`. The
    /// workers' `cordon:postgres` calls use this instance, so a wire-protocol
    /// proxy started on it shares their pools and caches.
    pub fn accelerator(&self) -> Option<Arc<Accelerator>> {
        self.stores.accel.clone()
    }

    /// Outbound requests refused by policy since start, over all workers.
    pub fn egress_denied_total(&self) -> u64 {
        self.network.denied_total()
    }
}

/// The network outbound requests go through, with the config's lookup
/// limits and every tenant's outbound connection cap (its `[[tenant]]
/// max_outbound_connections`, or the `[server]` default).
pub fn network(config: &Config) -> Result<Network, cordon_egress::NetworkError> {
    let s = &config.server;
    let mut builder = Network::builder()
        .lookup_limits(cordon_egress::LookupLimits { per_tenant: s.max_name_lookups_per_tenant, total: s.max_name_lookups })
        .outbound_connections_per_tenant(s.max_outbound_connections_per_tenant);
    for tenant in &config.tenants {
        if let Some(limit) = tenant.max_outbound_connections {
            builder = builder.outbound_connections_of_tenant(&tenant.name, limit);
        }
    }
    builder.build()
}

fn build_engine(config: &Config) -> Result<(Engine, Posture), PolicyError> {
    let (engine_config, posture) =
        policy::engine_config(&config.security, &config.sandbox, config.max_worker_memory_mb(), policy::cpu_has_memory_protection_keys())?;
    let engine = Engine::new(&engine_config).map_err(|e| PolicyError::Engine(format!("{e:#}")))?;
    Ok((engine, posture))
}

/// Loads the workers: reads every component file, compiles (or loads from
/// the cache) each distinct component once, on up to one thread per core,
/// then links every worker against its component.
fn load_workers(
    engine: &Engine,
    linker: &Linker<Host>,
    workers: &[WorkerConfig],
    sandbox: &cordon_config::SandboxConfig,
    cache: Option<&CodeCache>,
    admission: &mut Admission,
    capabilities: &dyn Fn(&WorkerConfig) -> Result<Capabilities, LoadError>,
) -> Vec<Result<Worker, WorkerLoadError>> {
    let err = |w: &WorkerConfig, error| WorkerLoadError {
        tenant: w.tenant.clone(),
        worker: w.name.clone(),
        component: w.component.clone(),
        error,
    };
    let files: Vec<Result<(Vec<u8>, String), LoadError>> = workers
        .iter()
        .map(|w| {
            let wasm = std::fs::read(&w.component).map_err(|e| LoadError::Read(Arc::new(e)))?;
            let sha = {
                use sha2::Digest;
                cache::hex(&sha2::Sha256::digest(&wasm))
            };
            Ok((wasm, sha))
        })
        .collect();

    // One compilation per distinct component, however many workers use it.
    let mut distinct: Vec<(&str, &[u8])> = Vec::new();
    for (wasm, sha) in files.iter().flatten() {
        if !distinct.iter().any(|(s, _)| *s == sha.as_str()) {
            distinct.push((sha.as_str(), wasm.as_slice()));
        }
    }
    let compiled = parallel_map(&distinct, |(sha, wasm)| {
        let started = std::time::Instant::now();
        let result = cache::load_component(engine, wasm, cache);
        if let Ok((_, source)) = &result {
            tracing::info!(
                component_sha256 = %sha,
                code = ?source,
                ms = started.elapsed().as_millis() as u64,
                "{}",
                match source {
                    CodeSource::Cache => "component loaded from the compiled-code cache",
                    CodeSource::Compiled => "component compiled",
                }
            );
        }
        result
    });

    let quotas: Vec<_> = workers
        .iter()
        .map(|w| worker::TenantQuotas {
            slots: admission.tenant(&w.tenant, w.limits.max_instances),
            share: admission.share(&w.tenant),
            scheduler: admission.scheduler().clone(),
            memory: admission.memory_mut().tenant(&w.tenant),
            process_memory: admission.memory().process.clone(),
            instance_overhead_bytes: admission.memory().instance_overhead_bytes,
        })
        .collect();
    workers
        .iter()
        .zip(&files)
        .zip(quotas)
        .map(|((w, file), quotas)| {
            let (_, sha) = file.as_ref().map_err(|e| err(w, e.clone()))?;
            let i = distinct.iter().position(|(s, _)| s == sha).expect("every readable component was compiled");
            let (component, source) = match &compiled[i] {
                Ok(c) => c.clone(),
                Err(e) => return Err(err(w, e.clone())),
            };
            grants::check(engine, &component, w).map_err(|e| err(w, e))?;
            let bytes = file.as_ref().map_or(0, |(wasm, _)| wasm.len() as u64);
            grants::check_ceilings(&component, bytes, sandbox).map_err(|e| err(w, e))?;
            let caps = capabilities(w).map_err(|e| err(w, e))?;
            let worker = Worker::new(w, linker, &component, source, sha.clone(), caps, quotas).map_err(|e| err(w, e))?;
            tracing::info!(worker = %w.name, tenant = %w.tenant, code = ?source, "worker ready");
            Ok(worker)
        })
        .collect()
}

/// `f` over `items` on up to one thread per core, results in order.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(items.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<Option<R>>> = std::sync::Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter().map(|r| r.expect("every item is mapped")).collect()
}

/// Advances the engine's epoch every [`policy::EPOCH_TICK`]; each tick is a
/// point where running guests check their CPU budget and yield.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: &Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let engine = engine.clone();
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("cordon-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(policy::EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch thread");
        Self { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
