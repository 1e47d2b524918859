//! The accelerator as a whole: every configured database with its pool, cache and proxy users,
//! built once from the configuration and shared by the wire-protocol proxy and the worker binding.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use cordon_config::{Config, DatabaseConfig, OriginTlsMode};

use crate::cache::{CacheOutcome, CacheSettings, CacheStats, QueryCache};
use crate::cancel::CancelRegistry;
use crate::catalog::Catalog;
use crate::classifier::Classifier;
use crate::origin::{OriginConfig, OriginError, OriginPassword, OriginTls};
use crate::pool::{OriginGroup, Pool, PoolSettings, PoolStats, STATEMENT_DEADLINE_SLACK};
use crate::scram::{DEFAULT_ITERATIONS, MockAuth, ScramVerifier};
use crate::session_limits::SessionLimits;

/// What can stop the accelerator from starting. Each names the database and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("database \"{tenant}/{database}\": environment variable {variable} ({what}) is not set")]
    MissingEnv { tenant: String, database: String, variable: String, what: &'static str },
    #[error("database \"{tenant}/{database}\": {source}")]
    OriginTls {
        tenant: String,
        database: String,
        #[source]
        source: Box<OriginError>,
    },
}

/// Client-facing limits of one database.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    pub max_client_connections: usize,
    /// A connected client that sends nothing for this long outside a transaction is closed.
    pub idle_client_timeout: Option<Duration>,
    /// A client that holds a transaction open without sending anything for this long is closed,
    /// and its transaction rolled back, so it cannot hold a pooled connection hostage.
    pub idle_in_transaction_timeout: Option<Duration>,
}

/// Per-database counters, for metrics and per-tenant metering.
#[derive(Debug, Default)]
pub struct DatabaseCounters {
    pub client_connections: AtomicU64,
    pub clients_refused: AtomicU64,
    pub auth_failures: AtomicU64,
    pub queries: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_stale_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_coalesced: AtomicU64,
    pub uncacheable: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub cancels: AtomicU64,
    /// Statements refused because they would raise a timeout past the database's maximum.
    pub timeout_changes_refused: AtomicU64,
}

impl DatabaseCounters {
    /// Counts how the cache answered one lookup.
    pub fn count_cache(&self, outcome: CacheOutcome) {
        let counter = match outcome {
            CacheOutcome::Hit => &self.cache_hits,
            CacheOutcome::StaleHit => &self.cache_stale_hits,
            CacheOutcome::Coalesced => &self.cache_coalesced,
            CacheOutcome::Miss | CacheOutcome::Bypass => &self.cache_misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One `[[database]]`: a tenant's origin database behind a pool and a cache.
#[derive(Debug)]
pub struct Database {
    pub tenant: String,
    pub name: String,
    pub pool: Arc<Pool>,
    /// `None` when `[database.cache] enabled = false`.
    pub cache: Option<Arc<QueryCache>>,
    pub cache_max_entry_bytes: usize,
    /// Proxy users by name, with their SCRAM verifiers (never the passwords).
    pub users: HashMap<String, ScramVerifier>,
    pub limits: ClientLimits,
    /// What the origin's catalog says about the database, for the cache.
    pub catalog: Arc<Catalog>,
    /// The tenant's share of SQL classification.
    pub classifier: Classifier,
    /// The timeouts clients may not raise.
    pub session_limits: SessionLimits,
    /// Proxy clients connected now.
    pub clients: AtomicUsize,
    pub counters: DatabaseCounters,
}

/// A point-in-time view of one database, for the admin listener.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DatabaseStats {
    pub tenant: String,
    pub database: String,
    pub clients: usize,
    pub client_connections_total: u64,
    pub clients_refused: u64,
    pub auth_failures: u64,
    pub queries: u64,
    pub cache_hits: u64,
    pub cache_stale_hits: u64,
    pub cache_misses: u64,
    pub cache_coalesced: u64,
    pub uncacheable: u64,
    pub idle_timeouts: u64,
    pub cancels: u64,
    pub timeout_changes_refused: u64,
    pub pool: PoolStats,
    pub cache: Option<CacheStats>,
}

impl Database {
    /// Builds a database from its configuration, reading passwords from `env`, in a connection
    /// group of its own.
    pub fn from_config(config: &DatabaseConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Database, AccelError> {
        let group = OriginGroup::new(group_label(config), config.tenant_origin_connections as usize);
        Database::in_group(config, env, group)
    }

    /// Like [`Database::from_config`], with the connection group it shares with the tenant's
    /// other databases on the same origin server.
    pub fn in_group(
        config: &DatabaseConfig,
        env: &dyn Fn(&str) -> Option<String>,
        group: Arc<OriginGroup>,
    ) -> Result<Database, AccelError> {
        let missing = |variable: &str, what: &'static str| AccelError::MissingEnv {
            tenant: config.tenant.clone(),
            database: config.name.clone(),
            variable: variable.to_owned(),
            what,
        };
        let password = match &config.origin_password_env {
            Some(variable) => Some(OriginPassword::new(env(variable).ok_or_else(|| missing(variable, "the origin password"))?)),
            None => None,
        };
        let tls = match &config.origin.tls {
            OriginTlsMode::Disable => OriginTls::Disable,
            OriginTlsMode::VerifyFull { root_cert } => OriginTls::verify_full(root_cert.as_deref()).map_err(|source| {
                AccelError::OriginTls { tenant: config.tenant.clone(), database: config.name.clone(), source: Box::new(source) }
            })?,
        };
        let mut options = Vec::new();
        if config.statement_timeout_ms > 0 {
            options.push(("statement_timeout".to_owned(), config.statement_timeout_ms.to_string()));
        }
        if config.idle_in_transaction_timeout_ms > 0 {
            // The origin enforces it too, for transactions the binding holds.
            options.push(("idle_in_transaction_session_timeout".to_owned(), config.idle_in_transaction_timeout_ms.to_string()));
        }
        let origin = OriginConfig {
            host: config.origin.host.clone(),
            port: config.origin.port,
            user: config.origin.user.clone(),
            database: config.origin.database.clone(),
            password,
            tls,
            auth_methods: config.origin_auth_methods,
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            application_name: format!("cordon/{}/{}", config.tenant, config.name),
            options,
        };
        let pool = Pool::in_group(
            &config.name,
            origin,
            PoolSettings {
                size: config.pool_size as usize,
                max_waiting: config.max_waiting_clients as usize,
                acquire_timeout: Duration::from_millis(config.acquire_timeout_ms),
                statement_deadline: (config.statement_timeout_ms > 0)
                    .then(|| Duration::from_millis(config.statement_timeout_ms) + STATEMENT_DEADLINE_SLACK),
            },
            group,
        );
        let mut users = HashMap::new();
        for user in &config.users {
            // Zeroed once the verifier is derived from it.
            let password =
                zeroize::Zeroizing::new(env(&user.password_env).ok_or_else(|| missing(&user.password_env, "a proxy user's password"))?);
            users.insert(user.name.clone(), ScramVerifier::from_password(&password, DEFAULT_ITERATIONS));
        }
        let cache = config.cache.enabled.then(|| {
            Arc::new(QueryCache::new(
                &config.tenant,
                &config.name,
                CacheSettings {
                    max_age: Duration::from_secs(config.cache.max_age_s),
                    stale_while_revalidate: Duration::from_secs(config.cache.stale_while_revalidate_s),
                    max_entry_bytes: config.cache.max_entry_bytes as usize,
                    max_bytes: config.cache.max_bytes,
                },
            ))
        });
        let millis = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        let catalog = Catalog::new(pool.clone(), cache.clone());
        Ok(Database {
            tenant: config.tenant.clone(),
            name: config.name.clone(),
            pool,
            cache,
            cache_max_entry_bytes: config.cache.max_entry_bytes as usize,
            users,
            limits: ClientLimits {
                max_client_connections: config.max_client_connections as usize,
                idle_client_timeout: millis(config.idle_client_timeout_ms),
                idle_in_transaction_timeout: millis(config.idle_in_transaction_timeout_ms),
            },
            catalog,
            classifier: Classifier::for_tenant(&config.tenant),
            session_limits: SessionLimits::new(config.statement_timeout_ms, config.idle_in_transaction_timeout_ms),
            clients: AtomicUsize::new(0),
            counters: DatabaseCounters::default(),
        })
    }

    pub fn stats(&self) -> DatabaseStats {
        let c = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        DatabaseStats {
            tenant: self.tenant.clone(),
            database: self.name.clone(),
            clients: self.clients.load(Ordering::Acquire),
            client_connections_total: load(&c.client_connections),
            clients_refused: load(&c.clients_refused),
            auth_failures: load(&c.auth_failures),
            queries: load(&c.queries),
            cache_hits: load(&c.cache_hits),
            cache_stale_hits: load(&c.cache_stale_hits),
            cache_misses: load(&c.cache_misses),
            cache_coalesced: load(&c.cache_coalesced),
            uncacheable: load(&c.uncacheable),
            idle_timeouts: load(&c.idle_timeouts),
            cancels: load(&c.cancels),
            timeout_changes_refused: load(&c.timeout_changes_refused),
            pool: self.pool.stats(),
            cache: self.cache.as_ref().map(|cache| cache.stats()),
        }
    }
}

fn group_label(config: &DatabaseConfig) -> String {
    format!("tenant \"{}\" on {}:{}", config.tenant, config.origin.host, config.origin.port)
}

/// Every database of the configuration, and what the proxy shares across them.
#[derive(Debug)]
pub struct Accelerator {
    databases: Vec<Arc<Database>>,
    /// Answers SCRAM exchanges for unknown users exactly like for known ones.
    pub(crate) mock: MockAuth,
    pub(crate) cancels: Arc<CancelRegistry>,
}

impl Accelerator {
    /// Builds the accelerator from the configuration; passwords are read with `env` (the process
    /// environment in production).
    pub fn from_config(config: &Config, env: &dyn Fn(&str) -> Option<String>) -> Result<Accelerator, AccelError> {
        // One connection group per tenant and origin server.
        let mut groups: HashMap<(String, String, u16), Arc<OriginGroup>> = HashMap::new();
        let mut databases = Vec::with_capacity(config.databases.len());
        for db in &config.databases {
            let key = (db.tenant.clone(), db.origin.host.clone(), db.origin.port);
            let group =
                groups.entry(key).or_insert_with(|| OriginGroup::new(group_label(db), db.tenant_origin_connections as usize)).clone();
            databases.push(Arc::new(Database::in_group(db, env, group)?));
        }
        Ok(Accelerator::new(databases))
    }

    pub fn new(databases: Vec<Arc<Database>>) -> Accelerator {
        Accelerator { databases, mock: MockAuth::random(DEFAULT_ITERATIONS), cancels: Arc::new(CancelRegistry::default()) }
    }

    pub fn databases(&self) -> &[Arc<Database>] {
        &self.databases
    }

    /// A tenant's database by name, for the worker binding.
    pub fn database(&self, tenant: &str, name: &str) -> Option<&Arc<Database>> {
        self.databases.iter().find(|db| db.tenant == tenant && db.name == name)
    }

    /// The database a proxy client names as its `dbname`: `tenant.name`, or just `name` when no
    /// other tenant has a database of that name.
    pub fn database_for_client(&self, dbname: &str) -> Option<&Arc<Database>> {
        if let Some((tenant, name)) = dbname.split_once('.')
            && let Some(db) = self.database(tenant, name)
        {
            return Some(db);
        }
        let mut matching = self.databases.iter().filter(|db| db.name == dbname);
        let first = matching.next()?;
        matching.next().is_none().then_some(first)
    }

    pub fn stats(&self) -> Vec<DatabaseStats> {
        self.databases.iter().map(|db| db.stats()).collect()
    }

    /// Closes idle origin connections, for shutdown.
    pub fn close_idle(&self) {
        for db in &self.databases {
            db.pool.close_idle();
        }
    }
}
