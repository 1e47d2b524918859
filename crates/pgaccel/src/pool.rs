//! A bounded pool of connections to one origin database, shared by every client of that database
//! (proxy clients and worker bindings alike).
//!
//! The pool owns three guarantees the rest of the accelerator relies on:
//! - **Bounded.** At most `size` origin connections exist at once, and at most `max_waiting`
//!   callers wait for one; a caller that waits longer than the acquire timeout gets an error
//!   instead of a hang. A connection counts from the moment it is opened until its backend is
//!   confirmed gone: one dropped in the middle of an exchange (a timeout, a client gone) is
//!   cancelled, told to terminate, and keeps its place until the origin closes it, and a backend
//!   that ignores both is ended with `pg_terminate_backend` from a connection of its own (at most
//!   one such connection per [`OriginGroup`] at a time: the "cancel headroom").
//! - **Per tenant.** The pools of one tenant on one origin server share an [`OriginGroup`], whose
//!   limit bounds their connections together; a pool that needs a connection while the group is
//!   full closes another pool's idle one first.
//! - **Deadline.** Every exchange is watched: a statement that runs past the pool's statement
//!   deadline (the database's `statement_timeout_ms` plus slack) is cancelled and its connection
//!   discarded, whatever the session set its own `statement_timeout` to.
//! - **Clean.** A connection goes back to the idle list only in a known state: idle (no open
//!   transaction) and in exactly the session state it was opened in, as read by the probe of
//!   [`crate::session_state`] and compared with the state read right after connecting, together
//!   with every ParameterStatus the origin reported. A connection whose state differs, or whose
//!   user left it mid-transaction, is rolled back and reset with `DISCARD ALL` and probed again;
//!   one that fails that, or saw any I/O or protocol error, is closed, never reused.
//! - **Honest about the origin.** Idle connections are checked for a closed socket (an origin
//!   restart closes them all) before they are handed out, and failures to connect back off
//!   exponentially, so a dead origin costs a fast, clear error rather than a connection storm.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::origin::{OriginConfig, OriginError, ServerConn, send_cancel};
use crate::protocol::{ErrorFields, Frame, Severity, TransactionStatus};
use crate::session_state::{self, SessionState};

/// Most named statements kept prepared on one origin connection; past it the least recently used
/// one is closed. Bounds the origin's memory per connection whatever the clients prepare.
pub const MAX_PREPARED_PER_CONNECTION: usize = 512;
/// First and longest wait between failed attempts to connect to the origin.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Origin connections idle this long are closed, so an idle database does not hold a pool's worth
/// of backends forever.
const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Added to the statement timeout for the pool's own deadline, so that the origin's timeout
/// fires first whenever it is in force.
pub const STATEMENT_DEADLINE_SLACK: Duration = Duration::from_secs(1);
/// After the pool cancels a statement past its deadline, how long the origin has to end it before
/// the exchange fails and the connection is discarded.
const CANCEL_GRACE: Duration = Duration::from_secs(2);
/// How long a discarded connection's backend has to close after cancel and Terminate, before it
/// is ended with `pg_terminate_backend`; and the longest wait between later attempts.
const CONFIRM_WAIT: Duration = Duration::from_secs(2);
const CONFIRM_RETRY_MAX: Duration = Duration::from_secs(30);
/// Bound on the probe and reset queries run on release.
const RELEASE_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// How a pool is sized and how long callers wait.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Origin connections at most.
    pub size: usize,
    /// Callers waiting for a connection at most; the next one is refused at once.
    pub max_waiting: usize,
    /// How long a caller waits for a connection.
    pub acquire_timeout: Duration,
    /// The pool's own limit on one statement: past it the statement is cancelled and its
    /// connection discarded. `None` when the database sets no statement timeout.
    pub statement_deadline: Option<Duration>,
}

/// The origin connections of one tenant on one origin server (host and port), across all of that
/// tenant's databases there: at most `limit` exist at once.
pub struct OriginGroup {
    label: String,
    limit: usize,
    permits: Arc<Semaphore>,
    pools: Mutex<Vec<Weak<Pool>>>,
    /// One side connection at a time may run `pg_terminate_backend` for a backend that outlived
    /// its cancel: the only connection of the group beyond `limit`.
    terminator: Semaphore,
}

impl fmt::Debug for OriginGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OriginGroup").field("label", &self.label).field("limit", &self.limit).finish_non_exhaustive()
    }
}

impl OriginGroup {
    /// `label` names the group in errors and logs, such as `tenant "acme" on db.internal:5432`.
    pub fn new(label: impl Into<String>, limit: usize) -> Arc<OriginGroup> {
        Arc::new(OriginGroup {
            label: label.into(),
            limit,
            permits: Arc::new(Semaphore::new(limit)),
            pools: Mutex::new(Vec::new()),
            terminator: Semaphore::new(1),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Origin connections of the group open now, those being closed included.
    pub fn open(&self) -> usize {
        self.limit - self.permits.available_permits()
    }

    /// Closes the longest-idle connection of any pool of the group, to make room for another
    /// pool's new one. Returns whether there was one.
    fn evict_idle(&self) -> bool {
        let pools: Vec<Arc<Pool>> = lock(&self.pools).iter().filter_map(Weak::upgrade).collect();
        pools.into_iter().any(Pool::evict_one_idle)
    }
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
    #[error("timed out after {waited_ms} ms waiting for an origin connection: {group} has all {limit} of its connections open")]
    TenantLimit { group: String, waited_ms: u64, limit: usize },
}

impl PoolError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            // too_many_connections: the pool is exhausted, retry later.
            PoolError::TooManyWaiting { .. } | PoolError::AcquireTimeout { .. } | PoolError::TenantLimit { .. } => "53300",
            // cannot_connect_now
            PoolError::OriginUnavailable { .. } => "57P03",
        }
    }

    pub fn to_error_fields(&self) -> ErrorFields {
        let fields = ErrorFields::new(Severity::Error, self.sqlstate(), self.to_string());
        match self {
            PoolError::OriginUnavailable { .. } => fields.with_hint("retry in a moment; Cordon reconnects with backoff"),
            PoolError::TenantLimit { .. } => fields
                .with_hint("retry later, or raise tenant_origin_connections (the limit of the tenant's databases on this origin together)"),
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
    /// The session state read right after connecting, and the ParameterStatus values then: the
    /// state every user of the connection must find, and leave.
    baseline: SessionState,
    baseline_parameters: Vec<(String, String)>,
    /// The connection's place in its [`OriginGroup`], given back when it is closed.
    _group_permit: OwnedSemaphorePermit,
}

impl Backend {
    /// The digest of the session state the connection was opened in, for cache keys.
    pub fn state_key(&self) -> String {
        self.baseline.key()
    }

    fn parameters_changed(&self) -> bool {
        self.conn.parameters() != self.baseline_parameters.as_slice()
    }
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
    /// Released connections whose session state (or a reported parameter) had changed.
    pub state_resets: AtomicU64,
    /// CancelRequests sent for connections discarded in the middle of an exchange.
    pub discard_cancels: AtomicU64,
    /// Statements cancelled by the pool's own deadline.
    pub deadline_cancels: AtomicU64,
    /// Backends ended with `pg_terminate_backend` after they ignored cancel and Terminate.
    pub terminated: AtomicU64,
    /// Acquires refused because the tenant's connections on the origin were all open.
    pub tenant_limited: AtomicU64,
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
    /// Connections being closed (cancelled, waiting for their backend to exit); part of `open`.
    pub closing: usize,
    pub state_resets: u64,
    pub discard_cancels: u64,
    pub deadline_cancels: u64,
    pub terminated: u64,
    pub tenant_limited: u64,
    /// Origin connections open now across the tenant's databases on this origin, and their limit.
    pub tenant_origin_open: usize,
    pub tenant_origin_limit: usize,
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
    /// One permit per connection in use, connecting, being probed or reset, or being closed:
    /// bounds the open connections.
    permits: Arc<Semaphore>,
    group: Arc<OriginGroup>,
    open: AtomicUsize,
    closing: AtomicUsize,
    waiting: AtomicUsize,
    backoff: Mutex<Backoff>,
    /// The origin's ParameterStatus values, reported to proxy clients after they authenticate.
    parameters: Mutex<Vec<(String, String)>>,
    /// The digest of the session state of the newest connection: what cache keys are made with.
    state_key: Mutex<String>,
    pub counters: PoolCounters,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("database", &self.database).field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool with a group of its own, limited to its size.
    pub fn new(database: &str, origin: OriginConfig, settings: PoolSettings) -> Arc<Pool> {
        let group = OriginGroup::new(format!("database \"{database}\""), settings.size);
        Pool::in_group(database, origin, settings, group)
    }

    /// A pool whose connections also count against `group`.
    pub fn in_group(database: &str, origin: OriginConfig, settings: PoolSettings, group: Arc<OriginGroup>) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            database: database.to_owned(),
            origin,
            permits: Arc::new(Semaphore::new(settings.size)),
            group: group.clone(),
            settings,
            idle: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            closing: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            backoff: Mutex::new(Backoff { failures: 0, retry_at: None, last_error: String::new() }),
            parameters: Mutex::new(Vec::new()),
            state_key: Mutex::new(String::new()),
            counters: PoolCounters::default(),
        });
        lock(&group.pools).push(Arc::downgrade(&pool));
        pool
    }

    pub fn group(&self) -> &Arc<OriginGroup> {
        &self.group
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

    /// The digest of the session state connections of this pool are opened in (empty before the
    /// first one), for cache keys: a result is stored only when it was computed on a connection
    /// in that state, so a change of the origin's defaults (`ALTER ROLE ... SET search_path`)
    /// changes the keys.
    pub fn state_key(&self) -> String {
        lock(&self.state_key).clone()
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
            None => {
                let group_permit = self.group_permit(started).await?;
                self.connect(group_permit).await?
            }
        };
        let waited = started.elapsed().as_micros() as u64;
        self.counters.acquires.fetch_add(1, Ordering::Relaxed);
        self.counters.acquire_wait_micros.fetch_add(waited, Ordering::Relaxed);
        self.counters.acquire_max_wait_micros.fetch_max(waited, Ordering::Relaxed);
        Ok(PooledConn {
            backend: Some(backend),
            pool: self.clone(),
            permit: Some(permit),
            release: Release::Clean,
            in_flight: false,
            probe_pending: false,
            // Idle connections were checked before they went back; new ones right after opening.
            verified: true,
            probe_resets: false,
            statement_started: Instant::now(),
            deadline_cancelled: false,
            cancel_pending: false,
        })
    }

    /// A place in the tenant's group for a new connection: at once if the group has room, else
    /// after closing an idle connection of another of its pools, else when one is closed, within
    /// what is left of the acquire timeout.
    async fn group_permit(&self, started: Instant) -> Result<OwnedSemaphorePermit, PoolError> {
        if let Ok(permit) = self.group.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        self.group.evict_idle();
        let remaining = self.settings.acquire_timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(remaining, self.group.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) | Err(_) => {
                self.counters.tenant_limited.fetch_add(1, Ordering::Relaxed);
                Err(PoolError::TenantLimit {
                    group: self.group.label.clone(),
                    waited_ms: started.elapsed().as_millis() as u64,
                    limit: self.group.limit,
                })
            }
        }
    }

    /// Closes the longest-idle connection, if any, for another pool of the group.
    fn evict_one_idle(self: Arc<Self>) -> bool {
        let backend = {
            let mut idle = lock(&self.idle);
            if idle.is_empty() {
                return false;
            }
            idle.remove(0)
        };
        self.retire(backend, None, false);
        true
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

    async fn connect(&self, group_permit: OwnedSemaphorePermit) -> Result<Backend, PoolError> {
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
        let opened = async {
            let mut conn = ServerConn::connect(&self.origin).await?;
            let probed = tokio::time::timeout(self.origin.connect_timeout, session_state::probe(&mut conn, true, false)).await;
            let (state, _) = probed.map_err(|_| OriginError::Timeout("reading the session state of a new connection"))??;
            Ok::<_, OriginError>((conn, state))
        };
        match opened.await {
            Ok((conn, baseline)) => {
                *lock(&self.backoff) = Backoff { failures: 0, retry_at: None, last_error: String::new() };
                *lock(&self.parameters) = conn.parameters().to_vec();
                *lock(&self.state_key) = baseline.key();
                self.open.fetch_add(1, Ordering::AcqRel);
                let baseline_parameters = conn.parameters().to_vec();
                Ok(Backend {
                    conn,
                    prepared: PreparedSet::default(),
                    idle_since: Instant::now(),
                    baseline,
                    baseline_parameters,
                    _group_permit: group_permit,
                })
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

    /// Closes a connection for good, keeping its place in the pool (`permit`) and in the group
    /// until its backend is confirmed gone. `busy` when a statement may still be running on it:
    /// it is cancelled first.
    fn retire(self: Arc<Self>, backend: Backend, permit: Option<OwnedSemaphorePermit>, busy: bool) {
        self.counters.discarded.fetch_add(1, Ordering::Relaxed);
        self.closing.fetch_add(1, Ordering::AcqRel);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    self.close_confirmed(backend, busy).await;
                    drop(permit);
                });
            }
            // No runtime (the process is shutting down): the socket closes with the backend.
            Err(_) => {
                self.closing.fetch_sub(1, Ordering::AcqRel);
                self.open.fetch_sub(1, Ordering::AcqRel);
                drop(backend);
            }
        }
    }

    async fn close_confirmed(&self, mut backend: Backend, busy: bool) {
        let (process_id, secret_key) = backend.conn.backend_key();
        if busy {
            self.counters.discard_cancels.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = send_cancel(&self.origin, process_id, secret_key).await {
                tracing::warn!(target: "cordon::pgaccel", database = %self.database, error = %describe_origin_error(&error), "cancelling the statement of a discarded connection failed");
            }
        }
        let mut wait = CONFIRM_WAIT;
        while !backend.conn.terminate_and_confirm(wait).await {
            // Still running: a statement that catches its cancel, or a backend stuck on a lock
            // that outlives the wait. End it from a connection of its own, one per group at a time.
            tracing::warn!(target: "cordon::pgaccel", database = %self.database, backend_pid = process_id, "a discarded connection's backend is still running after cancel; terminating it");
            if let Ok(_terminator) = self.group.terminator.acquire().await {
                match self.terminate_backend(process_id).await {
                    Ok(()) => {
                        self.counters.terminated.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        tracing::warn!(target: "cordon::pgaccel", database = %self.database, error = %describe_origin_error(&error), "pg_terminate_backend failed");
                    }
                }
            }
            wait = (wait * 2).min(CONFIRM_RETRY_MAX);
        }
        self.closing.fetch_sub(1, Ordering::AcqRel);
        self.open.fetch_sub(1, Ordering::AcqRel);
        drop(backend);
    }

    async fn terminate_backend(&self, process_id: i32) -> Result<(), OriginError> {
        let deadline = self.origin.connect_timeout.max(RELEASE_QUERY_TIMEOUT);
        let outcome = tokio::time::timeout(deadline, async {
            let mut side = ServerConn::connect(&self.origin).await?;
            let result = side.simple_query(&format!("SELECT pg_catalog.pg_terminate_backend({process_id})")).await;
            side.terminate_and_confirm(CONFIRM_WAIT).await;
            result.map(|_| ())
        })
        .await;
        outcome.unwrap_or(Err(OriginError::Timeout("terminating a backend that ignored its cancel")))
    }

    /// Closes every idle connection, for shutdown.
    pub fn close_idle(&self) {
        let drained: Vec<Backend> = std::mem::take(&mut *lock(&self.idle));
        self.open.fetch_sub(drained.len(), Ordering::AcqRel);
    }

    /// Origin connections open now, counting those being closed until their backend is gone.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
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
            closing: self.closing.load(Ordering::Acquire),
            state_resets: c.state_resets.load(Ordering::Relaxed),
            discard_cancels: c.discard_cancels.load(Ordering::Relaxed),
            deadline_cancels: c.deadline_cancels.load(Ordering::Relaxed),
            terminated: c.terminated.load(Ordering::Relaxed),
            tenant_limited: c.tenant_limited.load(Ordering::Relaxed),
            tenant_origin_open: self.group.open(),
            tenant_origin_limit: self.group.limit,
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
    /// then is out of step with the protocol, and may still be running a statement; it is
    /// cancelled and closed, not reset.
    in_flight: bool,
    /// A session state probe was queued behind the request; its answer is still to be read.
    probe_pending: bool,
    /// The probe ran after the last exchange and found the connection as it was opened.
    verified: bool,
    /// The probe queued last is followed by `RESET ALL`.
    probe_resets: bool,
    /// When the statement now running on the origin started, as far as the pool can tell: the
    /// start of the exchange or the end of the previous statement.
    statement_started: Instant,
    /// The pool's deadline passed and the statement was cancelled: the connection is discarded
    /// on release.
    deadline_cancelled: bool,
    /// A cancel sent for the deadline has not yet ended the statement.
    cancel_pending: bool,
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
    /// a COMMIT it issued itself. A connection the pool's deadline cancelled stays discarded.
    pub fn set_release(&mut self, release: Release) {
        self.release = if self.deadline_cancelled { Release::Discard } else { release };
    }

    pub fn release_mode(&self) -> Release {
        self.release
    }

    /// Marks the start of a request/response exchange; see [`PooledConn::end_exchange`].
    pub fn begin_exchange(&mut self) {
        self.in_flight = true;
        self.verified = false;
        self.statement_started = Instant::now();
    }

    /// Marks that the response was read up to its ReadyForQuery (or its last expected message).
    /// With a probe queued behind it, the exchange ends when the probe's answer is read.
    pub fn end_exchange(&mut self) {
        if !self.probe_pending {
            self.in_flight = false;
        }
    }

    /// The pool this connection came from.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Reads one message from the origin, under the pool's statement deadline: when the statement
    /// has run longer than the deadline, it is cancelled and the connection marked for discard;
    /// when it still has not ended `CANCEL_GRACE` later, the read fails.
    pub async fn read_frame(&mut self) -> Result<Frame, OriginError> {
        let Some(limit) = self.pool.settings.statement_deadline else {
            return self.backend_mut().conn.read_frame().await;
        };
        loop {
            let deadline = self.statement_started + limit + if self.cancel_pending { CANCEL_GRACE } else { Duration::ZERO };
            let read = tokio::time::timeout_at(deadline.into(), self.backend_mut().conn.read_frame()).await;
            match read {
                Ok(Ok(frame)) => {
                    // The end of one statement is the start of the next; a cancelled one has
                    // ended once the origin is ready again.
                    if frame.tag == b'Z' {
                        self.cancel_pending = false;
                    }
                    if matches!(frame.tag, b'C' | b'E' | b'I' | b'Z' | b's') && !self.cancel_pending {
                        self.statement_started = Instant::now();
                    }
                    return Ok(frame);
                }
                Ok(Err(error)) => return Err(error),
                Err(_) if !self.cancel_pending => {
                    self.cancel_pending = true;
                    self.deadline_cancelled = true;
                    self.mark(Release::Discard);
                    self.pool.counters.deadline_cancels.fetch_add(1, Ordering::Relaxed);
                    let (process_id, secret_key) = self.conn.backend_key();
                    tracing::warn!(target: "cordon::pgaccel", database = %self.pool.database, backend_pid = process_id, limit_ms = limit.as_millis() as u64, "a statement ran past the pool's deadline; cancelling it");
                    if let Err(error) = send_cancel(&self.pool.origin, process_id, secret_key).await {
                        tracing::warn!(target: "cordon::pgaccel", database = %self.pool.database, error = %describe_origin_error(&error), "cancelling a statement past the deadline failed");
                    }
                }
                Err(_) => {
                    return Err(OriginError::Timeout(
                        "for a statement that ran past the statement timeout and did not stop when cancelled",
                    ));
                }
            }
        }
    }

    /// Queues the session state probe, and `RESET ALL` after it, behind what is in the write
    /// buffer, to be sent with it; [`PooledConn::finish_probe`] reads its answer after the
    /// request's. A clean answer then proves the connection is as it was opened.
    pub fn queue_probe(&mut self) -> Result<(), OriginError> {
        session_state::queue(&mut self.backend_mut().conn, false, true)?;
        self.probe_pending = true;
        self.probe_resets = true;
        Ok(())
    }

    /// Reads the answer of the queued probe. Returns whether the connection is idle and exactly
    /// as it was opened; if not, it is marked for reset.
    pub async fn finish_probe(&mut self) -> Result<bool, OriginError> {
        let resets = self.probe_resets;
        let outcome = tokio::time::timeout(RELEASE_QUERY_TIMEOUT, session_state::read(&mut self.backend_mut().conn, resets)).await;
        let (state, status) = match outcome {
            Ok(Ok(read)) => read,
            Ok(Err(error)) => {
                self.mark(Release::Discard);
                return Err(error);
            }
            Err(_) => {
                self.mark(Release::Discard);
                return Err(OriginError::Timeout("reading the session state"));
            }
        };
        self.probe_pending = false;
        self.in_flight = false;
        let backend = self.backend.as_ref().expect("a PooledConn holds its backend until dropped");
        let clean = status == TransactionStatus::Idle && state == backend.baseline && !backend.parameters_changed();
        if clean {
            // Without the RESET ALL, settings Postgres does not list may still differ.
            self.verified = self.probe_resets;
        } else {
            self.pool.counters.state_resets.fetch_add(1, Ordering::Relaxed);
            self.mark(Release::Reset);
        }
        Ok(clean)
    }

    /// Runs the session state probe and the reset of unlisted settings now, on a connection
    /// between exchanges. Returns whether the connection is as it was opened; if not, it is
    /// marked for a full reset.
    pub async fn probe(&mut self) -> Result<bool, OriginError> {
        self.begin_exchange();
        self.queue_probe()?;
        if let Err(error) = self.backend_mut().conn.flush().await {
            self.mark(Release::Discard);
            return Err(error);
        }
        self.finish_probe().await
    }

    /// Runs one simple-protocol query (such as `BEGIN` or `COMMIT`) under the pool's deadline and
    /// returns the final transaction status; an ErrorResponse is returned after ReadyForQuery, so
    /// the connection stays in step.
    pub async fn simple_query(&mut self, sql: &str) -> Result<TransactionStatus, OriginError> {
        crate::protocol::FrontendMessage::Query(sql.to_owned()).encode(self.backend_mut().conn.write_buf())?;
        self.begin_exchange();
        self.backend_mut().conn.flush().await?;
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'Z' => {
                    let status = TransactionStatus::from_ready_for_query(&frame)?;
                    self.end_exchange();
                    return match error {
                        Some(fields) => Err(OriginError::Server(fields)),
                        None => Ok(status),
                    };
                }
                b'E' => {
                    let fields = ErrorFields::parse(&frame.body)?;
                    if matches!(fields.severity, Severity::Fatal | Severity::Panic) {
                        return Err(OriginError::Server(fields));
                    }
                    error.get_or_insert(fields);
                }
                // Statements run here never copy; a COPY would wait for data forever.
                b'G' | b'W' => return Err(OriginError::Protocol("unexpected COPY in a control statement".into())),
                _ => {}
            }
        }
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
        let pool = self.pool.clone();
        if self.in_flight || self.release == Release::Discard {
            // Possibly mid-statement: cancelled, and counted until its backend is gone.
            pool.retire(backend, permit, true);
            return;
        }
        if self.release == Release::Clean && self.verified {
            pool.put_back(backend);
            drop(permit);
            return;
        }
        // Checking or resetting talks to the origin, so it runs on its own task; the permit stays
        // held until it is done, so the pool never exceeds its size meanwhile.
        let reset_first = self.release == Release::Reset;
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    release(pool, backend, permit, reset_first).await;
                });
            }
            Err(_) => pool.retire(backend, permit, false),
        }
    }
}

/// Gives a connection back to the idle list once it is proven to be in the state it was opened
/// in. A connection that is not, or whose user left it mid-transaction, is reset first: rolled
/// back, and cleared with `DISCARD ALL` (which also drops prepared statements, temporary tables,
/// advisory locks, LISTEN registrations, and resets `SET ROLE` and `SET SESSION AUTHORIZATION`,
/// which `RESET ALL` would leave in place; settings return to the values the pool sent at
/// startup). A connection still not as it was opened is closed.
async fn release(pool: Arc<Pool>, mut backend: Backend, permit: Option<OwnedSemaphorePermit>, reset_first: bool) {
    let state_matches = |backend: &mut Backend, outcome: Result<Result<(SessionState, TransactionStatus), OriginError>, _>| match outcome {
        Ok(Ok((state, TransactionStatus::Idle))) => Ok(state == backend.baseline && !backend.parameters_changed()),
        Ok(Ok((_, status))) => Err(format!("connection not idle ({status:?})")),
        Ok(Err(error)) => Err(describe_origin_error(&error)),
        Err(_) => Err("timed out".to_owned()),
    };
    if !reset_first {
        let outcome = tokio::time::timeout(RELEASE_QUERY_TIMEOUT, session_state::probe(&mut backend.conn, false, true)).await;
        match state_matches(&mut backend, outcome) {
            Ok(true) => {
                pool.put_back(backend);
                drop(permit);
                return;
            }
            Ok(false) => {
                pool.counters.state_resets.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(target: "cordon::pgaccel", database = %pool.database, "a released connection's session state changed; resetting it");
            }
            Err(reason) => {
                tracing::warn!(target: "cordon::pgaccel", database = %pool.database, reason = %reason, "checking a released connection failed; closing it");
                pool.retire(backend, permit, true);
                return;
            }
        }
    }
    pool.counters.resets.fetch_add(1, Ordering::Relaxed);
    let outcome = tokio::time::timeout(RELEASE_QUERY_TIMEOUT, async {
        // ROLLBACK outside a transaction only warns, so it is safe whatever the state was.
        backend.conn.simple_query("ROLLBACK").await?;
        backend.conn.simple_query("DISCARD ALL").await?;
        // DISCARD ALL dropped the prepared probe.
        session_state::probe(&mut backend.conn, true, false).await
    })
    .await;
    match state_matches(&mut backend, outcome) {
        Ok(true) => {
            backend.prepared.clear();
            pool.put_back(backend);
            drop(permit);
        }
        Ok(false) => {
            tracing::warn!(target: "cordon::pgaccel", database = %pool.database, "connection not back in its opening state after DISCARD ALL; closing it");
            pool.retire(backend, permit, false);
        }
        Err(reason) => {
            tracing::warn!(target: "cordon::pgaccel", database = %pool.database, reason = %reason, "connection reset failed; closing it");
            pool.retire(backend, permit, true);
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
