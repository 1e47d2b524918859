//! A bounded pool of connections to one origin database, shared by every client of that database
//! (proxy clients and worker bindings alike).
//!
//! The pool owns three guarantees the rest of the accelerator relies on:
//! - **Bounded.** At most `size` origin connections exist at once, and at most `max_waiting`
//!   callers wait for one; a caller that waits longer than the acquire timeout gets an error
//!   instead of a hang.
//! - **Clean.** A connection goes back to the idle list only in a known state: idle (no open
//!   transaction) and without session state. A connection whose user left it mid-transaction or
//!   with session state is rolled back and reset with `DISCARD ALL` first; one that fails that,
//!   or saw any I/O or protocol error, is closed, never reused.
//! - **Honest about the origin.** Idle connections are checked for a closed socket (an origin
//!   restart closes them all) before they are handed out, and failures to connect back off
//!   exponentially, so a dead origin costs a fast, clear error rather than a connection storm.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::origin::{OriginConfig, OriginError, ServerConn};
use crate::protocol::{ErrorFields, Severity, TransactionStatus};

/// Most named statements kept prepared on one origin connection; past it the least recently used
/// one is closed. Bounds the origin's memory per connection whatever the clients prepare.
pub const MAX_PREPARED_PER_CONNECTION: usize = 512;
/// First and longest wait between failed attempts to connect to the origin.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Origin connections idle this long are closed, so an idle database does not hold a pool's worth
/// of backends forever.
const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How a pool is sized and how long callers wait.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Origin connections at most.
    pub size: usize,
    /// Callers waiting for a connection at most; the next one is refused at once.
    pub max_waiting: usize,
    /// How long a caller waits for a connection.
    pub acquire_timeout: Duration,
}

/// Why no connection was handed out. Each maps to the SQLSTATE a Postgres client expects.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("too many clients are waiting for a connection to database \"{database}\" (limit {limit})")]
    TooManyWaiting { database: String, limit: usize },
    #[error("timed out after {waited_ms} ms waiting for a connection to database \"{database}\" (all {size} are busy)")]
    AcquireTimeout { database: String, waited_ms: u64, size: usize },
    #[error("the origin of database \"{database}\" is unavailable: {reason}")]
    OriginUnavailable { database: String, reason: String },
}

impl PoolError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            // too_many_connections: the pool is exhausted, retry later.
            PoolError::TooManyWaiting { .. } | PoolError::AcquireTimeout { .. } => "53300",
            // cannot_connect_now
            PoolError::OriginUnavailable { .. } => "57P03",
        }
    }

    pub fn to_error_fields(&self) -> ErrorFields {
        let fields = ErrorFields::new(Severity::Error, self.sqlstate(), self.to_string());
        match self {
            PoolError::OriginUnavailable { .. } => fields.with_hint("retry in a moment; Cordon reconnects with backoff"),
            _ => fields.with_hint("retry later, or raise pool_size / acquire_timeout_ms for this database"),
        }
    }
}

/// Named statements prepared on one origin connection, by their server-side name, with a use
/// stamp for least-recently-used eviction.
#[derive(Debug, Default)]
pub struct PreparedSet {
    names: HashMap<String, u64>,
    clock: u64,
}

impl PreparedSet {
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// Records a use (or a new preparation) of `name`.
    pub fn touch(&mut self, name: &str) {
        self.clock += 1;
        match self.names.get_mut(name) {
            Some(stamp) => *stamp = self.clock,
            None => {
                self.names.insert(name.to_owned(), self.clock);
            }
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.names.remove(name);
    }

    pub fn clear(&mut self) {
        self.names.clear();
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// When full, the least recently used name that is not `keep`, to be closed before another is
    /// prepared.
    pub fn victim(&self, keep: &[&str]) -> Option<String> {
        if self.names.len() < MAX_PREPARED_PER_CONNECTION {
            return None;
        }
        self.names.iter().filter(|(name, _)| !keep.contains(&name.as_str())).min_by_key(|(_, stamp)| **stamp).map(|(name, _)| name.clone())
    }
}

/// An origin connection with what the pooler knows about its server-side state.
pub struct Backend {
    pub conn: ServerConn,
    pub prepared: PreparedSet,
    idle_since: Instant,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend").field("id", &self.conn.id()).field("prepared", &self.prepared.len()).finish()
    }
}

/// What must happen to a connection when its user gives it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Idle and without session state: straight back to the idle list.
    Clean,
    /// Possibly mid-transaction or with session state: `ROLLBACK` if needed, then `DISCARD ALL`.
    Reset,
    /// Broken or out of sync with the protocol: close it.
    Discard,
}

/// Counters for metrics and metering. Gauges are derived from the pool's state on read.
#[derive(Debug, Default)]
pub struct PoolCounters {
    pub acquires: AtomicU64,
    pub acquire_wait_micros: AtomicU64,
    pub acquire_max_wait_micros: AtomicU64,
    pub acquire_timeouts: AtomicU64,
    pub refused_waiting: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub resets: AtomicU64,
    pub discarded: AtomicU64,
    pub stale_discarded: AtomicU64,
}

/// A point-in-time view of a pool, for the admin listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    pub size: usize,
    pub open: usize,
    pub idle: usize,
    pub in_use: usize,
    pub waiting: usize,
    pub acquires: u64,
    pub acquire_wait_micros_total: u64,
    pub acquire_wait_micros_max: u64,
    pub acquire_timeouts: u64,
    pub refused_waiting: u64,
    pub connects: u64,
    pub connect_failures: u64,
    pub resets: u64,
    pub discarded: u64,
    pub stale_discarded: u64,
}

#[derive(Debug)]
struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

pub struct Pool {
    database: String,
    origin: OriginConfig,
    settings: PoolSettings,
    idle: Mutex<Vec<Backend>>,
    /// One permit per connection in use, connecting or being reset: bounds the open connections.
    permits: Arc<Semaphore>,
    open: AtomicUsize,
    waiting: AtomicUsize,
    backoff: Mutex<Backoff>,
    /// The origin's ParameterStatus values, reported to proxy clients after they authenticate.
    parameters: Mutex<Vec<(String, String)>>,
    pub counters: PoolCounters,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("database", &self.database).field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl Pool {
    pub fn new(database: &str, origin: OriginConfig, settings: PoolSettings) -> Arc<Pool> {
        Arc::new(Pool {
            database: database.to_owned(),
            origin,
            permits: Arc::new(Semaphore::new(settings.size)),
            settings,
            idle: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            backoff: Mutex::new(Backoff { failures: 0, retry_at: None, last_error: String::new() }),
            parameters: Mutex::new(Vec::new()),
            counters: PoolCounters::default(),
        })
    }

    pub fn origin(&self) -> &OriginConfig {
        &self.origin
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// The origin's ParameterStatus values as last seen on a new connection; empty until one was
    /// opened.
    pub fn parameters(&self) -> Vec<(String, String)> {
        lock(&self.parameters).clone()
    }

    /// Hands out a connection: an idle one that is still open, or a new one while the pool is
    /// below its size; otherwise waits, bounded by the acquire timeout and the waiting limit.
    pub async fn acquire(self: &Arc<Self>) -> Result<PooledConn, PoolError> {
        let started = Instant::now();
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let waiting = self.waiting.fetch_add(1, Ordering::AcqRel) + 1;
                let _waiting = Decrement(&self.waiting);
                if waiting > self.settings.max_waiting {
                    self.counters.refused_waiting.fetch_add(1, Ordering::Relaxed);
                    return Err(PoolError::TooManyWaiting { database: self.database.clone(), limit: self.settings.max_waiting });
                }
                match tokio::time::timeout(self.settings.acquire_timeout, self.permits.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    // The semaphore is never closed; treat it like a timeout all the same.
                    Ok(Err(_)) | Err(_) => {
                        self.counters.acquire_timeouts.fetch_add(1, Ordering::Relaxed);
                        return Err(PoolError::AcquireTimeout {
                            database: self.database.clone(),
                            waited_ms: started.elapsed().as_millis() as u64,
                            size: self.settings.size,
                        });
                    }
                }
            }
        };
        let backend = match self.take_idle() {
            Some(backend) => backend,
            None => self.connect().await?,
        };
        let waited = started.elapsed().as_micros() as u64;
        self.counters.acquires.fetch_add(1, Ordering::Relaxed);
        self.counters.acquire_wait_micros.fetch_add(waited, Ordering::Relaxed);
        self.counters.acquire_max_wait_micros.fetch_max(waited, Ordering::Relaxed);
        Ok(PooledConn { backend: Some(backend), pool: self.clone(), permit: Some(permit), release: Release::Clean, in_flight: false })
    }

    /// The most recently used idle connection whose socket is still open. Closed ones (the origin
    /// restarted or timed them out) are dropped on the way, so no broken connection is handed out.
    fn take_idle(&self) -> Option<Backend> {
        loop {
            let mut backend = lock(&self.idle).pop()?;
            if backend.idle_since.elapsed() < SERVER_IDLE_TIMEOUT && !backend.conn.is_broken() {
                return Some(backend);
            }
            self.counters.stale_discarded.fetch_add(1, Ordering::Relaxed);
            self.open.fetch_sub(1, Ordering::AcqRel);
        }
    }

    async fn connect(&self) -> Result<Backend, PoolError> {
        {
            let backoff = lock(&self.backoff);
            if let Some(retry_at) = backoff.retry_at
                && Instant::now() < retry_at
            {
                let wait = retry_at - Instant::now();
                return Err(PoolError::OriginUnavailable {
                    database: self.database.clone(),
                    reason: format!("{}; next attempt in {} ms", backoff.last_error, wait.as_millis()),
                });
            }
        }
        self.counters.connects.fetch_add(1, Ordering::Relaxed);
        match ServerConn::connect(&self.origin).await {
            Ok(conn) => {
                *lock(&self.backoff) = Backoff { failures: 0, retry_at: None, last_error: String::new() };
                *lock(&self.parameters) = conn.parameters().to_vec();
                self.open.fetch_add(1, Ordering::AcqRel);
                Ok(Backend { conn, prepared: PreparedSet::default(), idle_since: Instant::now() })
            }
            Err(error) => {
                self.counters.connect_failures.fetch_add(1, Ordering::Relaxed);
                let reason = describe_origin_error(&error);
                let mut backoff = lock(&self.backoff);
                backoff.failures = backoff.failures.saturating_add(1);
                let delay = BACKOFF_MIN.saturating_mul(1u32 << backoff.failures.min(16).saturating_sub(1)).min(BACKOFF_MAX);
                backoff.retry_at = Some(Instant::now() + delay);
                backoff.last_error = reason.clone();
                tracing::warn!(target: "cordon::pgaccel", database = %self.database, origin = %self.origin_label(), error = %reason, retry_ms = delay.as_millis() as u64, "cannot connect to the origin");
                Err(PoolError::OriginUnavailable { database: self.database.clone(), reason })
            }
        }
    }

    fn origin_label(&self) -> String {
        format!("{}:{}/{}", self.origin.host, self.origin.port, self.origin.database)
    }

    fn put_back(&self, mut backend: Backend) {
        backend.idle_since = Instant::now();
        lock(&self.idle).push(backend);
    }

    fn discard(&self, backend: Backend) {
        self.counters.discarded.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_sub(1, Ordering::AcqRel);
        drop(backend);
    }

    /// Closes every idle connection, for shutdown.
    pub fn close_idle(&self) {
        let drained: Vec<Backend> = std::mem::take(&mut *lock(&self.idle));
        self.open.fetch_sub(drained.len(), Ordering::AcqRel);
    }

    pub fn stats(&self) -> PoolStats {
        let idle = lock(&self.idle).len();
        let open = self.open.load(Ordering::Acquire);
        let c = &self.counters;
        PoolStats {
            size: self.settings.size,
            open,
            idle,
            in_use: self.settings.size - self.permits.available_permits(),
            waiting: self.waiting.load(Ordering::Acquire),
            acquires: c.acquires.load(Ordering::Relaxed),
            acquire_wait_micros_total: c.acquire_wait_micros.load(Ordering::Relaxed),
            acquire_wait_micros_max: c.acquire_max_wait_micros.load(Ordering::Relaxed),
            acquire_timeouts: c.acquire_timeouts.load(Ordering::Relaxed),
            refused_waiting: c.refused_waiting.load(Ordering::Relaxed),
            connects: c.connects.load(Ordering::Relaxed),
            connect_failures: c.connect_failures.load(Ordering::Relaxed),
            resets: c.resets.load(Ordering::Relaxed),
            discarded: c.discarded.load(Ordering::Relaxed),
            stale_discarded: c.stale_discarded.load(Ordering::Relaxed),
        }
    }
}

/// A connection on loan from a pool. Dropping it gives it back, as its [`Release`] says.
pub struct PooledConn {
    backend: Option<Backend>,
    pool: Arc<Pool>,
    permit: Option<OwnedSemaphorePermit>,
    release: Release,
    /// Set while a request is on the wire and its response not fully read: a connection dropped
    /// then is out of step with the protocol and is closed, not reset.
    in_flight: bool,
}

impl fmt::Debug for PooledConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledConn").field("backend", &self.backend).field("release", &self.release).finish()
    }
}

impl PooledConn {
    /// Raises what must happen on release: a connection once marked for reset or discard is never
    /// handed back clean.
    pub fn mark(&mut self, release: Release) {
        self.release = match (self.release, release) {
            (Release::Discard, _) | (_, Release::Discard) => Release::Discard,
            (Release::Reset, _) | (_, Release::Reset) => Release::Reset,
            _ => Release::Clean,
        };
    }

    /// Sets what happens on release, for a user that knows the connection's state, such as after
    /// a COMMIT it issued itself.
    pub fn set_release(&mut self, release: Release) {
        self.release = release;
    }

    pub fn release_mode(&self) -> Release {
        self.release
    }

    /// Marks the start of a request/response exchange; see [`PooledConn::end_exchange`].
    pub fn begin_exchange(&mut self) {
        self.in_flight = true;
    }

    /// Marks that the response was read up to its ReadyForQuery (or its last expected message).
    pub fn end_exchange(&mut self) {
        self.in_flight = false;
    }

    /// The pool this connection came from.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    fn backend_mut(&mut self) -> &mut Backend {
        self.backend.as_mut().expect("a PooledConn holds its backend until dropped")
    }
}

impl std::ops::Deref for PooledConn {
    type Target = Backend;
    fn deref(&self) -> &Backend {
        self.backend.as_ref().expect("a PooledConn holds its backend until dropped")
    }
}

impl std::ops::DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut Backend {
        self.backend_mut()
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        let Some(backend) = self.backend.take() else { return };
        let permit = self.permit.take();
        let release = if self.in_flight { Release::Discard } else { self.release };
        match release {
            Release::Clean => {
                self.pool.put_back(backend);
                drop(permit);
            }
            Release::Discard => {
                self.pool.discard(backend);
                drop(permit);
            }
            Release::Reset => {
                // The reset talks to the origin, so it runs on its own task; the permit stays
                // held until it is done, so the pool never exceeds its size meanwhile.
                let pool = self.pool.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(handle) => {
                        handle.spawn(async move {
                            reset(pool, backend).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        pool.discard(backend);
                        drop(permit);
                    }
                }
            }
        }
    }
}

/// Rolls back whatever transaction a departed user left open and clears all session state
/// (`DISCARD ALL` also drops prepared statements, temporary tables, advisory locks, LISTEN
/// registrations, and resets `SET ROLE` and `SET SESSION AUTHORIZATION`, which `RESET ALL`
/// would leave in place). Anything unexpected closes the connection instead.
async fn reset(pool: Arc<Pool>, mut backend: Backend) {
    pool.counters.resets.fetch_add(1, Ordering::Relaxed);
    let deadline = pool.origin.connect_timeout.max(Duration::from_secs(5));
    let outcome = tokio::time::timeout(deadline, async {
        // ROLLBACK outside a transaction only warns, so it is safe whatever the state was.
        backend.conn.simple_query("ROLLBACK").await?;
        backend.conn.simple_query("DISCARD ALL").await
    })
    .await;
    match outcome {
        Ok(Ok(TransactionStatus::Idle)) => {
            backend.prepared.clear();
            pool.put_back(backend);
        }
        Ok(Ok(status)) => {
            tracing::warn!(target: "cordon::pgaccel", database = %pool.database, ?status, "connection not idle after reset; closing it");
            pool.discard(backend);
        }
        Ok(Err(error)) => {
            tracing::warn!(target: "cordon::pgaccel", database = %pool.database, error = %describe_origin_error(&error), "connection reset failed; closing it");
            pool.discard(backend);
        }
        Err(_) => {
            tracing::warn!(target: "cordon::pgaccel", database = %pool.database, "connection reset timed out; closing it");
            pool.discard(backend);
        }
    }
}

/// An origin error in words safe for clients and logs: origin messages pass through, Cordon's own
/// credential problems are named without detail.
pub fn describe_origin_error(error: &OriginError) -> String {
    match error {
        OriginError::Server(fields) => format!("{} ({})", fields.message, fields.code),
        other => other.to_string(),
    }
}

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Locks a mutex, recovering from poisoning: every critical section here leaves its data valid.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_set_evicts_the_least_recently_used() {
        let mut set = PreparedSet::default();
        for i in 0..MAX_PREPARED_PER_CONNECTION {
            set.touch(&format!("s{i}"));
        }
        set.touch("s0");
        assert_eq!(set.victim(&[]).as_deref(), Some("s1"));
        assert_eq!(set.victim(&["s1"]).as_deref(), Some("s2"));
        set.remove("s1");
        assert_eq!(set.victim(&[]), None, "below the limit nothing is evicted");
    }
}
