//! What the origin's catalog says about one database, for the query cache.
//!
//! The classifier sees only the text of a statement. Whether a cached read stays correct also
//! depends on objects the text does not name: a trigger or a rule that writes other tables when a
//! table is written, a foreign key whose `ON DELETE`/`ON UPDATE` action changes the referencing
//! table, the partitions and children a read of a parent includes, the base tables of a view, a
//! function or operator of the tenant's own that shadows a built-in, and a domain whose checks run
//! on a cast. [`Catalog`] reads these from the origin's catalog over a pooled connection of the
//! database itself and judges every statement against that snapshot:
//!
//! * **Reads** ([`Catalog::check_read`]) are cacheable only when the snapshot is current, every
//!   relation read is known to it and is not a sequence, a foreign table, a table with row-level
//!   security or a view that calls a function that is not an immutable built-in (or reads such a
//!   relation), no function called by an unqualified name exists outside `pg_catalog`, no operator
//!   used (the comparison operators always count as used: sorting, grouping and joins use them
//!   implicitly) is defined outside `pg_catalog` unless it is immutable compiled code, no type cast
//!   to is a domain or a type with user code behind its input or cast, and no parameter value is a
//!   time-relative date/time input (`now`, `today`, `tomorrow`, `yesterday`).
//! * **Writes** ([`Catalog::invalidation`]) of a table expand to every relation the write can
//!   change: the referencing tables of foreign keys with actions, parents and children through
//!   inheritance and partitioning, views over it and the base tables of a written view, all
//!   transitively. A write that can reach a relation with a trigger or a rule (other than a view's
//!   own), or that calls a function, operator or type of the tenant's, invalidates the whole
//!   database, as does any write while the snapshot is not current.
//!
//! # Staying current
//!
//! Every statement that may change the catalog (DDL, and anything the classifier cannot see into,
//! which is what [`Writes::Unknown`] means) advances an epoch when it completes, and in the proxy
//! again when its transaction ends. A snapshot records the epoch when its read started and is
//! current only while the epoch has not moved since: a trigger created right after the catalog
//! was read leaves the snapshot stale, and nothing is cached until a new snapshot, read after the
//! DDL, is in place. Refreshes run in the background, one at a time per database and at least
//! [`MIN_REFRESH_GAP`] apart, when a read finds the snapshot missing, stale, older than
//! [`REFRESH_INTERVAL`], or without a relation it reads. A refresh that finds the catalog changed
//! since the previous snapshot (DDL that did not go through Cordon) invalidates the whole cache.
//! Until then, DDL behind Cordon's back is like a write behind its back: seen after at most
//! [`REFRESH_INTERVAL`] plus the entries' `max_age`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::time::Instant;

use crate::accel::Database;
use crate::cache::QueryCache;
use crate::classify::{Classification, TableRef, Writes, is_time_relative_literal};
use crate::pool::Pool;
use crate::protocol::FrontendMessage;

/// A snapshot older than this is refreshed in the background (and still used meanwhile).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Refreshes of one database start at least this far apart.
pub const MIN_REFRESH_GAP: Duration = Duration::from_millis(100);
/// How long a cacheable read waits for a current snapshot before it goes to the origin uncached.
pub const READ_WAIT: Duration = Duration::from_secs(1);
/// A refresh that takes longer is abandoned; nothing is cached until one succeeds.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed refresh the next one waits this long, and reads do not wait for it.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// Largest catalog answer read; a database whose catalog is larger is never cached.
pub const MAX_CATALOG_BYTES: usize = 16 << 20;

/// Operators every statement may use without naming them: comparisons behind `ORDER BY`,
/// `GROUP BY`, `DISTINCT`, joins, `IN`, `BETWEEN`, `CASE`, and the pattern matches behind `LIKE`,
/// `ILIKE` and `SIMILAR TO`.
const IMPLIED_OPERATORS: &[&str] = &["=", "<>", "<", ">", "<=", ">=", "~~", "!~~", "~~*", "!~~*", "~", "!~", "~*", "!~*"];

/// One statement that reads the catalog, answering rows of (kind, name, detail); see [`Snapshot`].
const CATALOG_QUERY: &str = r#"/* cordon:no-cache */
WITH nsp AS (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname <> 'pg_catalog'),
compiled AS (SELECT p.oid FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang
             WHERE p.provolatile = 'i' AND l.lanname IN ('c', 'internal'))
SELECT 'k', c.relname::text, '' FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname !~ '^pg_(toast|temp_)'
UNION ALL
SELECT 'u', c.relname::text, '' FROM pg_catalog.pg_class c WHERE c.relrowsecurity OR c.relkind IN ('f', 'S')
UNION ALL
SELECT 'u', v.relname::text, '' FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_class v ON v.oid = r.ev_class
  JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
   AND d.refclassid = 'pg_catalog.pg_proc'::regclass
  JOIN pg_catalog.pg_proc p ON p.oid = d.refobjid
 WHERE p.provolatile <> 'i' OR p.pronamespace IN (SELECT oid FROM nsp)
UNION ALL
SELECT 'u', v.relname::text, '' FROM pg_catalog.pg_class v
 WHERE v.relkind = 'v' AND pg_catalog.pg_get_viewdef(v.oid) ~* '\m(current_[a-z]*|localtime[a-z]*|session_user|user|system_user)\M'
UNION ALL
SELECT 'x', c.relname::text, '' FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal
UNION ALL
SELECT 'x', c.relname::text, '' FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_class c ON c.oid = r.ev_class WHERE r.rulename <> '_RETURN'
UNION ALL
SELECT 'e', p.relname::text, c.relname::text FROM pg_catalog.pg_constraint k
  JOIN pg_catalog.pg_class c ON c.oid = k.conrelid JOIN pg_catalog.pg_class p ON p.oid = k.confrelid
 WHERE k.contype = 'f' AND (k.confdeltype NOT IN ('a', 'r') OR k.confupdtype NOT IN ('a', 'r'))
UNION ALL
SELECT 'i', a.relname::text, b.relname::text FROM pg_catalog.pg_inherits i
  JOIN pg_catalog.pg_class a ON a.oid = i.inhrelid JOIN pg_catalog.pg_class b ON b.oid = i.inhparent
UNION ALL
SELECT 'v', v.relname::text, b.relname::text FROM pg_catalog.pg_rewrite r
  JOIN pg_catalog.pg_class v ON v.oid = r.ev_class AND v.relkind = 'v'
  JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
   AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid <> r.ev_class
  JOIN pg_catalog.pg_class b ON b.oid = d.refobjid
UNION ALL
SELECT DISTINCT 'f', p.proname::text, '' FROM pg_catalog.pg_proc p WHERE p.pronamespace IN (SELECT oid FROM nsp)
UNION ALL
SELECT DISTINCT 'o', o.oprname::text, '' FROM pg_catalog.pg_operator o
 WHERE o.oprnamespace IN (SELECT oid FROM nsp) AND o.oprcode::oid NOT IN (SELECT oid FROM compiled)
UNION ALL
SELECT 't', t.typname::text, t.oid::text FROM pg_catalog.pg_type t
 WHERE t.typnamespace IN (SELECT oid FROM nsp)
   AND (t.typtype = 'd' OR (t.typtype = 'b' AND t.typinput::oid NOT IN (SELECT oid FROM compiled)))
UNION ALL
SELECT 't', a.typname::text, a.oid::text FROM pg_catalog.pg_type a JOIN pg_catalog.pg_type e ON e.oid = a.typelem
 WHERE a.typlen = -1 AND e.typtype = 'd' AND e.typnamespace IN (SELECT oid FROM nsp)
UNION ALL
SELECT 't', t.typname::text, t.oid::text FROM pg_catalog.pg_cast k JOIN pg_catalog.pg_type t ON t.oid = k.casttarget
 WHERE k.castfunc <> 0 AND k.castfunc NOT IN (SELECT p.oid FROM pg_catalog.pg_proc p WHERE p.pronamespace NOT IN (SELECT oid FROM nsp))
   AND k.castfunc NOT IN (SELECT oid FROM compiled)"#;

/// What one read of the catalog found. Names are relation, function, operator and type names,
/// lowercased and without their schema: a name that stands for several objects takes the most
/// restrictive answer of them all.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Relations of the database (tables, partitioned tables, views, materialized views, foreign
    /// tables, sequences) outside the system schemas.
    known: HashSet<String>,
    /// Relations whose reads are never cached.
    uncacheable: HashSet<String>,
    /// Relations a write to which runs a trigger or a rule.
    runs_code: HashSet<String>,
    /// `a -> b`: a write to `a` may change what a read of `b` returns.
    affects: HashMap<String, Vec<String>>,
    functions: HashSet<String>,
    operators: HashSet<String>,
    types: HashSet<String>,
    type_oids: HashSet<u32>,
}

impl Snapshot {
    /// Builds a snapshot from the catalog query's rows.
    fn from_rows(rows: impl IntoIterator<Item = (String, String, String)>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let mut views: Vec<(String, String)> = Vec::new();
        for (kind, name, detail) in rows {
            let (name, detail_name) = (name.to_lowercase(), detail.to_lowercase());
            match kind.as_str() {
                "k" => {
                    snapshot.known.insert(name);
                }
                "u" => {
                    snapshot.uncacheable.insert(name);
                }
                "x" => {
                    snapshot.runs_code.insert(name);
                }
                "e" => snapshot.edge(name, detail_name),
                "i" => {
                    // Child and parent change each other's reads (a parent's read includes its
                    // children; an update through the parent moves rows between partitions).
                    snapshot.edge(name.clone(), detail_name.clone());
                    snapshot.edge(detail_name, name);
                }
                "v" => views.push((name, detail_name)),
                "f" => {
                    snapshot.functions.insert(name);
                }
                "o" => {
                    snapshot.operators.insert(name);
                }
                "t" => {
                    snapshot.types.insert(name);
                    if let Ok(oid) = detail.parse() {
                        snapshot.type_oids.insert(oid);
                    }
                }
                _ => {}
            }
        }
        for (view, base) in &views {
            // A write to a base changes the view; a write to an updatable view writes its base.
            snapshot.edge(base.clone(), view.clone());
            snapshot.edge(view.clone(), base.clone());
        }
        for targets in snapshot.affects.values_mut() {
            targets.sort_unstable();
        }
        // A view over an uncacheable relation is uncacheable too, through any depth of views.
        loop {
            let before = snapshot.uncacheable.len();
            for (view, base) in &views {
                if snapshot.uncacheable.contains(base) {
                    snapshot.uncacheable.insert(view.clone());
                }
            }
            if snapshot.uncacheable.len() == before {
                break;
            }
        }
        snapshot
    }

    fn edge(&mut self, from: String, to: String) {
        let targets = self.affects.entry(from).or_default();
        if !targets.contains(&to) {
            targets.push(to);
        }
    }

    /// Why a read may not be cached under this snapshot, if it may not.
    fn read_refusal(&self, class: &Classification, param_types: &[u32]) -> Option<String> {
        for table in &class.reads {
            let name = table.name.to_lowercase();
            if !self.known.contains(&name) {
                return Some(format!("reads {table}, which the catalog does not list"));
            }
            if self.uncacheable.contains(&name) {
                return Some(format!("reads {table}, a sequence, foreign table, table with row security or view over volatile functions"));
            }
        }
        if let Some(reason) = self.user_code(class) {
            return Some(reason);
        }
        if param_types.iter().any(|oid| self.type_oids.contains(oid)) {
            return Some("a parameter is declared with a domain or a type with user code".to_owned());
        }
        None
    }

    /// The tenant's own code the statement may run although the classifier took it for built-ins.
    fn user_code(&self, class: &Classification) -> Option<String> {
        if let Some(function) = class.functions.iter().find(|f| self.functions.contains(&f.to_lowercase())) {
            return Some(format!("calls {function}(), which the database also defines outside pg_catalog"));
        }
        let implied = IMPLIED_OPERATORS.iter().copied();
        if let Some(operator) = class.operators.iter().map(String::as_str).chain(implied).find(|op| self.operators.contains(*op)) {
            return Some(format!("uses the operator {operator}, which the database defines outside pg_catalog"));
        }
        if let Some(name) = class.types.iter().find(|t| self.types.contains(&t.to_lowercase())) {
            return Some(format!("casts to {name}, a domain or a type with user code"));
        }
        None
    }

    /// Everything a write to `tables` may change.
    fn reach(&self, tables: &[TableRef]) -> Reach {
        let mut seen: HashSet<String> = HashSet::new();
        let mut queue: VecDeque<String> = tables.iter().map(|t| t.name.to_lowercase()).collect();
        while let Some(name) = queue.pop_front() {
            if seen.contains(&name) {
                continue;
            }
            if self.runs_code.contains(&name) {
                return Reach::RunsCode;
            }
            if !self.known.contains(&name) {
                return Reach::Unlisted;
            }
            for next in self.affects.get(&name).into_iter().flatten() {
                if !seen.contains(next) {
                    queue.push_back(next.clone());
                }
            }
            seen.insert(name);
        }
        let mut names: Vec<String> = seen.into_iter().collect();
        names.sort_unstable();
        Reach::Relations(names)
    }
}

/// What a write to some tables may change.
#[derive(Debug, PartialEq, Eq)]
enum Reach {
    /// These relations, and nothing else.
    Relations(Vec<String>),
    /// A trigger or a rule on a relation it reaches runs the tenant's code.
    RunsCode,
    /// It writes a relation the catalog does not list (created since, or temporary).
    Unlisted,
}

/// What a statement invalidates once it has run, and whether it may have changed the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    pub writes: Writes,
    /// The statement may have changed the catalog (DDL, or code the classifier cannot see into):
    /// the snapshot is stale from now on.
    pub catalog: bool,
}

impl Invalidation {
    /// Nothing to do.
    pub fn is_none(&self) -> bool {
        self.writes == Writes::None && !self.catalog
    }
}

/// The catalog knowledge of one database: the current snapshot and its refreshes.
#[derive(Debug)]
pub struct Catalog {
    pool: Arc<Pool>,
    /// Invalidated as a whole when a refresh finds the catalog changed behind Cordon's back.
    cache: Option<Arc<QueryCache>>,
    state: Mutex<State>,
    /// Woken when a snapshot is installed.
    installed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Advanced by every statement that may have changed the catalog.
    epoch: u64,
    snapshot: Option<Installed>,
    refreshing: bool,
    wanted: bool,
    last_started: Option<Instant>,
    /// Set when the last refresh failed: when the next may start.
    retry_at: Option<Instant>,
    /// Refreshes that ran to the end, whatever they found (for tests and metrics).
    refreshes: u64,
}

#[derive(Debug)]
struct Installed {
    snapshot: Arc<Snapshot>,
    /// The epoch when the read of this snapshot started.
    epoch: u64,
    taken_at: Instant,
}

impl Catalog {
    /// The catalog of the database behind `pool`. Nothing is read until a statement needs it.
    pub fn new(pool: Arc<Pool>, cache: Option<Arc<QueryCache>>) -> Arc<Catalog> {
        Arc::new(Catalog { pool, cache, state: Mutex::new(State::default()), installed: tokio::sync::Notify::new() })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refreshes that completed so far.
    pub fn refreshes(&self) -> u64 {
        self.lock().refreshes
    }

    /// The snapshot, when it is current; otherwise a refresh is requested and `None` returned.
    fn current(self: &Arc<Self>) -> Option<Arc<Snapshot>> {
        let state = self.lock();
        match &state.snapshot {
            Some(installed) if installed.epoch == state.epoch => {
                let snapshot = installed.snapshot.clone();
                let old = installed.taken_at.elapsed() >= REFRESH_INTERVAL;
                drop(state);
                if old {
                    self.request_refresh();
                }
                Some(snapshot)
            }
            _ => {
                drop(state);
                self.request_refresh();
                None
            }
        }
    }

    /// Why a cacheable-looking read must not be served from or stored in the cache, if it must
    /// not. `params` are the bound values (their format does not matter: text that reads as a
    /// time-relative input is refused either way), `param_types` the declared parameter types.
    ///
    /// Without a current snapshot (the first read, or after DDL) it waits up to [`READ_WAIT`] for
    /// one; this costs the caller's own time only.
    pub async fn check_read(self: &Arc<Self>, class: &Classification, params: &[Option<Bytes>], param_types: &[u32]) -> Result<(), String> {
        let Some(snapshot) = self.wait_current().await else {
            return Err("the catalog is being read".to_owned());
        };
        if let Some(reason) = snapshot.read_refusal(class, param_types) {
            if reason.contains("does not list") {
                // A table created behind Cordon's back: look again (at most every MIN_REFRESH_GAP).
                self.request_refresh();
            }
            return Err(reason);
        }
        let relative = params.iter().flatten().any(|value| std::str::from_utf8(value).is_ok_and(is_time_relative_literal));
        if relative {
            return Err("a parameter is a time-relative date/time input ('now', 'today', ...)".to_owned());
        }
        Ok(())
    }

    async fn wait_current(self: &Arc<Self>) -> Option<Arc<Snapshot>> {
        let deadline = Instant::now() + READ_WAIT;
        loop {
            let installed = self.installed.notified();
            tokio::pin!(installed);
            installed.as_mut().enable();
            if let Some(snapshot) = self.current() {
                return Some(snapshot);
            }
            if self.lock().retry_at.is_some() {
                // The catalog cannot be read now: go to the origin uncached rather than wait.
                return None;
            }
            if tokio::time::timeout_at(deadline, installed).await.is_err() {
                return None;
            }
        }
    }

    /// What a statement that ran invalidates, judged against the current snapshot.
    pub fn invalidation(self: &Arc<Self>, class: &Classification) -> Invalidation {
        let unknown = |catalog| Invalidation { writes: Writes::Unknown, catalog };
        if class.writes == Writes::Unknown {
            return unknown(true);
        }
        let touches_code = !class.functions.is_empty() || !class.operators.is_empty() || !class.types.is_empty();
        if class.writes == Writes::None && !touches_code {
            return Invalidation { writes: Writes::None, catalog: false };
        }
        let (snapshot, current) = {
            let state = self.lock();
            match &state.snapshot {
                Some(installed) => (Some(installed.snapshot.clone()), installed.epoch == state.epoch),
                None => (None, false),
            }
        };
        let Some(snapshot) = snapshot else {
            // Never read: nothing is cached yet. Whatever the classifier could not see into is
            // already `Unknown` above; a shadowing function or operator exists only if DDL
            // created it, and that DDL advanced the epoch.
            return unknown(false);
        };
        if snapshot.user_code(class).is_some() {
            return unknown(true);
        }
        if !current {
            // The tenant's code may hide behind a name the stale snapshot does not know yet; the
            // catalog is already being reread, so only the entries go.
            return unknown(false);
        }
        match &class.writes {
            Writes::Tables(tables) => match snapshot.reach(tables) {
                Reach::Relations(names) => {
                    Invalidation { writes: Writes::Tables(names.iter().map(|n| TableRef::new(None, n)).collect()), catalog: false }
                }
                // A trigger or rule runs the tenant's code, which may do anything.
                Reach::RunsCode => unknown(true),
                Reach::Unlisted => unknown(false),
            },
            _ => Invalidation { writes: Writes::None, catalog: false },
        }
    }

    /// Applies an invalidation: the epoch first (so that a refresh already under way cannot
    /// install a snapshot from before the change), then the cache.
    pub fn apply(&self, invalidation: &Invalidation, cache: Option<&QueryCache>) {
        if invalidation.catalog {
            self.lock().epoch += 1;
        }
        if let Some(cache) = cache {
            cache.invalidate(&invalidation.writes);
        }
    }

    /// Starts a background refresh unless one is running; one that is running runs again.
    fn request_refresh(self: &Arc<Self>) {
        let mut state = self.lock();
        state.wanted = true;
        if state.refreshing {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        state.refreshing = true;
        drop(state);
        let catalog = self.clone();
        runtime.spawn(async move { catalog.refresh_loop().await });
    }

    async fn refresh_loop(self: Arc<Self>) {
        let _running = Running(&self);
        loop {
            let wait = {
                let mut state = self.lock();
                if !state.wanted {
                    return;
                }
                state.wanted = false;
                let earliest = state.last_started.map(|at| at + MIN_REFRESH_GAP).max(state.retry_at);
                earliest.map(|at| at.saturating_duration_since(Instant::now())).unwrap_or_default()
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let epoch = {
                let mut state = self.lock();
                state.last_started = Some(Instant::now());
                state.epoch
            };
            let loaded = tokio::time::timeout(REFRESH_TIMEOUT, load(&self.pool)).await;
            if !matches!(loaded, Ok(Ok(_))) {
                self.lock().retry_at = Some(Instant::now() + RETRY_AFTER_FAILURE);
                // Readers waiting for this refresh go to the origin uncached instead.
                self.installed.notify_waiters();
            }
            match loaded {
                Ok(Ok(snapshot)) => self.install(snapshot, epoch),
                Ok(Err(error)) => {
                    tracing::warn!(target: "cordon::pgaccel", database = %self.pool.origin().database, error = %error, "reading the origin's catalog failed; nothing is cached until it succeeds")
                }
                Err(_) => {
                    tracing::warn!(target: "cordon::pgaccel", database = %self.pool.origin().database, "reading the origin's catalog timed out; nothing is cached until it succeeds")
                }
            }
        }
    }

    fn install(&self, snapshot: Snapshot, epoch: u64) {
        let mut state = self.lock();
        state.refreshes += 1;
        state.retry_at = None;
        let changed = state.snapshot.as_ref().is_some_and(|old| *old.snapshot != snapshot);
        state.snapshot = Some(Installed { snapshot: Arc::new(snapshot), epoch, taken_at: Instant::now() });
        if state.epoch != epoch {
            // Something changed the catalog while it was read: read it again.
            state.wanted = true;
        }
        drop(state);
        // The new snapshot judges writes from now on; what was cached under the old one goes.
        if changed && let Some(cache) = &self.cache {
            cache.invalidate_all();
        }
        self.installed.notify_waiters();
    }
}

/// Marks the refresh as no longer running, also when its task is dropped.
struct Running<'a>(&'a Arc<Catalog>);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.lock().refreshing = false;
    }
}

/// Why reading the catalog failed.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("{0}")]
    Origin(String),
    #[error("the catalog's answer is larger than {MAX_CATALOG_BYTES} bytes")]
    TooLarge,
    #[error("malformed answer from the origin")]
    Malformed,
}

/// Reads the catalog on a pooled connection.
async fn load(pool: &Arc<Pool>) -> Result<Snapshot, LoadError> {
    let mut conn = pool.acquire().await.map_err(|e| LoadError::Origin(e.to_error_fields().message))?;
    FrontendMessage::Query(CATALOG_QUERY.to_owned()).encode(conn.conn.write_buf()).map_err(|_| LoadError::Malformed)?;
    let fetched = crate::proxy::collect_response(&mut conn, MAX_CATALOG_BYTES, 0).await.map_err(|e| match e {
        crate::proxy::FetchError::TooLarge => LoadError::TooLarge,
        crate::proxy::FetchError::Pool(fields) => LoadError::Origin(fields.message),
    })?;
    drop(conn);
    let rows = decode_rows(fetched.bytes)?;
    Ok(Snapshot::from_rows(rows))
}

/// The text rows of a simple query's answer (three columns each), or the error it reported.
fn decode_rows(bytes: Bytes) -> Result<Vec<(String, String, String)>, LoadError> {
    let mut buf = BytesMut::from(&bytes[..]);
    let limits = crate::protocol::Limits { max_message_bytes: usize::MAX >> 1, max_read_ahead: usize::MAX >> 1, ..Default::default() };
    let mut rows = Vec::new();
    while let Some(frame) = crate::protocol::decode_frame(&mut buf, &limits).map_err(|_| LoadError::Malformed)? {
        match frame.tag {
            b'E' => {
                let fields = crate::protocol::ErrorFields::parse(&frame.body).map_err(|_| LoadError::Malformed)?;
                return Err(LoadError::Origin(format!("{} (SQLSTATE {})", fields.message, fields.code)));
            }
            b'D' => {
                let mut body = frame.body.clone();
                if body.remaining() < 2 || body.get_i16() != 3 {
                    return Err(LoadError::Malformed);
                }
                let mut column = || -> Result<String, LoadError> {
                    if body.remaining() < 4 {
                        return Err(LoadError::Malformed);
                    }
                    let len = body.get_i32();
                    if len < 0 {
                        return Ok(String::new());
                    }
                    let len = len as usize;
                    if body.remaining() < len {
                        return Err(LoadError::Malformed);
                    }
                    String::from_utf8(body.split_to(len).to_vec()).map_err(|_| LoadError::Malformed)
                };
                rows.push((column()?, column()?, column()?));
            }
            _ => {}
        }
    }
    Ok(rows)
}

impl Database {
    /// Why a read the classifier found cacheable must not use the cache, if it must not.
    pub(crate) async fn cache_refusal(&self, class: &Classification, params: &[Option<Bytes>], param_types: &[u32]) -> Option<String> {
        self.catalog.check_read(class, params, param_types).await.err()
    }

    /// What a statement that ran invalidates.
    pub(crate) fn invalidation(&self, class: &Classification) -> Invalidation {
        self.catalog.invalidation(class)
    }

    /// Applies an invalidation to this database's catalog and cache.
    pub(crate) fn invalidate(&self, invalidation: &Invalidation) {
        self.catalog.apply(invalidation, self.cache.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::classify;

    fn rows(spec: &[(&str, &str, &str)]) -> Snapshot {
        Snapshot::from_rows(spec.iter().map(|(k, a, b)| (k.to_string(), a.to_string(), b.to_string())))
    }

    fn snapshot() -> Snapshot {
        rows(&[
            ("k", "parent", ""),
            ("k", "child", ""),
            ("k", "grandchild", ""),
            ("k", "plain", ""),
            ("k", "base", ""),
            ("k", "v1", ""),
            ("k", "v2", ""),
            ("k", "Mixed", ""),
            ("k", "audited", ""),
            ("k", "seq", ""),
            ("u", "seq", ""),
            ("k", "nowish", ""),
            ("u", "nowish", ""),
            ("k", "over_nowish", ""),
            ("e", "parent", "child"),
            ("e", "child", "grandchild"),
            ("i", "part1", "measures"),
            ("k", "part1", ""),
            ("k", "measures", ""),
            ("v", "v1", "base"),
            ("v", "v2", "v1"),
            ("v", "over_nowish", "nowish"),
            ("x", "audited", ""),
            ("f", "lower", ""),
            ("o", "@@", ""),
            ("t", "bounded", "16400"),
        ])
    }

    fn reach(snapshot: &Snapshot, sql: &str) -> Reach {
        match classify(sql, false).writes {
            Writes::Tables(tables) => snapshot.reach(&tables),
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn writes_reach_what_keys_inheritance_and_views_link() {
        let s = snapshot();
        let names = |list: &[&str]| {
            let mut v: Vec<String> = list.iter().map(|n| n.to_string()).collect();
            v.sort();
            Reach::Relations(v)
        };
        assert_eq!(reach(&s, "DELETE FROM parent"), names(&["parent", "child", "grandchild"]));
        assert_eq!(reach(&s, "DELETE FROM child"), names(&["child", "grandchild"]), "a key's action runs from the referenced table only");
        assert_eq!(reach(&s, "UPDATE part1 SET v = 1"), names(&["part1", "measures"]));
        assert_eq!(reach(&s, "UPDATE measures SET v = 1"), names(&["part1", "measures"]));
        assert_eq!(reach(&s, "UPDATE base SET v = 1"), names(&["base", "v1", "v2"]));
        assert_eq!(reach(&s, "UPDATE v2 SET v = 1"), names(&["base", "v1", "v2"]));
        assert_eq!(reach(&s, "UPDATE plain SET v = 1"), names(&["plain"]));
        assert_eq!(reach(&s, "UPDATE \"Mixed\" SET v = 1"), names(&["mixed"]));
        assert_eq!(reach(&s, "INSERT INTO audited VALUES (1)"), Reach::RunsCode);
        assert_eq!(reach(&s, "INSERT INTO brand_new VALUES (1)"), Reach::Unlisted);
    }

    #[test]
    fn reads_are_refused_for_user_code_and_unstable_relations() {
        let s = snapshot();
        let refusal = |sql: &str, types: &[u32]| s.read_refusal(&classify(sql, false), types);
        assert_eq!(refusal("SELECT * FROM plain WHERE id = $1", &[]), None);
        assert_eq!(refusal("SELECT * FROM v2", &[]), None);
        assert_eq!(refusal("SELECT pg_catalog.lower(a) FROM plain", &[]), None);
        for sql in [
            "SELECT * FROM unknown_table",
            "SELECT last_value FROM seq",
            "SELECT * FROM over_nowish",
            "SELECT lower(a) FROM plain",
            "SELECT a @@ b FROM plain",
            "SELECT a::bounded FROM plain",
            "SELECT CAST(a AS public.bounded[]) FROM plain",
        ] {
            assert!(refusal(sql, &[]).is_some(), "{sql}");
        }
        assert!(refusal("SELECT $1 FROM plain", &[16400]).is_some());
        // An unsafe comparison operator is used by every statement.
        let eq = rows(&[("k", "plain", ""), ("o", "=", "")]);
        assert!(eq.read_refusal(&classify("SELECT * FROM plain ORDER BY a", false), &[]).is_some());
    }

    #[tokio::test]
    async fn without_a_current_snapshot_writes_invalidate_everything() {
        let origin = crate::origin::OriginConfig {
            host: "127.0.0.1".into(),
            port: 9,
            user: "nobody".into(),
            database: "none".into(),
            password: None,
            tls: crate::origin::OriginTls::Disable,
            auth_methods: Default::default(),
            connect_timeout: Duration::from_millis(100),
            application_name: "test".into(),
            options: Vec::new(),
        };
        let settings =
            crate::pool::PoolSettings { size: 1, max_waiting: 1, acquire_timeout: Duration::from_millis(100), statement_deadline: None };
        let pool = Pool::new("none", origin, settings);
        let catalog = Catalog::new(pool, None);
        let class = classify("UPDATE plain SET v = 1", false);
        assert_eq!(catalog.invalidation(&class), Invalidation { writes: Writes::Unknown, catalog: false });
        catalog.install(snapshot(), 0);
        assert_eq!(
            catalog.invalidation(&class),
            Invalidation { writes: Writes::Tables(vec![TableRef::new(None, "plain")]), catalog: false }
        );
        let ddl = classify("CREATE TRIGGER t AFTER INSERT ON plain FOR EACH ROW EXECUTE FUNCTION f()", false);
        let bump = catalog.invalidation(&ddl);
        assert_eq!(bump, Invalidation { writes: Writes::Unknown, catalog: true });
        catalog.apply(&bump, None);
        // The snapshot predates the DDL: no write is trusted to it, no read is cached.
        assert_eq!(catalog.invalidation(&class), Invalidation { writes: Writes::Unknown, catalog: false });
        assert_eq!(
            catalog.invalidation(&classify("SELECT lower(a) FROM plain", false)),
            Invalidation { writes: Writes::Unknown, catalog: true },
            "the stale snapshot still knows the shadowing function"
        );
        assert!(catalog.check_read(&classify("SELECT * FROM plain", false), &[], &[]).await.is_err());
        // A parameter that reads as the current time is never cached.
        let epoch = catalog.lock().epoch;
        catalog.install(snapshot(), epoch);
        let read = classify("SELECT $1::timestamptz FROM plain", false);
        assert!(catalog.check_read(&read, &[Some(Bytes::from("2024-01-01"))], &[]).await.is_ok());
        for value in ["now", "Today", " tomorrow ", "yesterday"] {
            assert!(catalog.check_read(&read, &[Some(Bytes::from(value))], &[]).await.is_err(), "{value}");
        }
    }
}
