//! Per-tenant SQLite databases that run statements written by untrusted
//! worker code.
//!
//! Every statement a worker sends is hostile until proven otherwise, so the
//! sandbox is layered and each layer fails closed:
//!
//! 1. **Text checks before SQLite sees anything**: length, parameter count,
//!    NUL bytes, and `VACUUM` (which has no authorizer action code).
//! 2. **One statement per call**: the first statement is prepared; whatever
//!    follows must be whitespace or comments, checked by preparing the tail
//!    with an authorizer that denies *everything*, so the tail can never take
//!    effect (some `PRAGMA`s act while they are being prepared).
//! 3. **The authorizer** ([`check`]) decides every action while a statement is
//!    prepared (and re-prepared, and for statements SQLite prepares on our
//!    behalf while one runs). Denied: `ATTACH`/`DETACH`, every `PRAGMA` outside
//!    a short read-only list, `load_extension` and `fts3_tokenizer`,
//!    transaction control (the host owns transactions), `TEMP` objects (the
//!    connection is shared between requests, so they would leak from one request
//!    into the next), virtual tables other than `fts5`, and any action code
//!    this file does not know. In read-only mode every write action is denied
//!    too. The reason is recorded so the error names what was denied.
//! 4. **Connection settings**: `SQLITE_DBCONFIG_DEFENSIVE` (no way to corrupt
//!    the file from SQL, shadow tables read-only), `trusted_schema=OFF`,
//!    extension loading off at the C level, `SQLITE_LIMIT_ATTACHED = 0`, and
//!    length/variable limits that mirror [`SqlLimits`].
//! 5. **Host-owned transactions**: every `execute` and every `batch` runs in
//!    its own transaction that is rolled back on any error, so a failed
//!    statement never leaves partial writes (`INSERT OR FAIL`, or a
//!    `RETURNING` statement stopped by a limit after it already wrote).
//!    Read-only calls always roll back.
//! 6. **Per-statement limits**: a statement stops at its time budget,
//!    whether SQLite is preparing or running it: a progress handler checks
//!    the deadline between instructions, and the pool's watchdog calls
//!    `sqlite3_interrupt` at the deadline, which also reaches the checks
//!    SQLite makes while it prepares (see [`Database::execute_job`]). The
//!    functions whose one call can take long (`LIKE`, `GLOB`, `instr`,
//!    `replace`) are replaced by versions that stop too
//!    ([`crate::functions`]). Rows and result bytes are counted as they are
//!    read and reading stops at the limit.
//! 7. **Size limits** ([`TENANT_LIMITS`], and `SQLITE_LIMIT_LENGTH` from
//!    [`SqlLimits`]) bound what one statement can make SQLite build: the
//!    depth of expressions (which nested views and subqueries add up to),
//!    compound selects, columns, function arguments, trigger recursion,
//!    `LIKE` patterns, and the size of the compiled program. A statement
//!    over them fails with a clear error before it runs. Memory is bounded
//!    per call ([`SqlLimits::max_memory_bytes`]) and for the whole process
//!    ([`crate::memory`]).
//!
//! 8. **Disk**: a database counts towards its tenant's storage quota,
//!    together with the tenant's other databases and its key-value
//!    namespaces (see `cordon-disk` for the scheme). A statement that writes
//!    takes the tenant's write turn once it is prepared, and runs with the
//!    file's `max_page_count` at what the quota and the free-space reserve
//!    still allow the call; past it SQLite fails the statement, reported as
//!    [`SqlError::Disk`] (`storage_quota_exceeded` or `storage_disk_full`).
//!    A statement whose only writes are deletes and drops may go a little
//!    past the quota, so that a tenant over it can always delete. After a
//!    call that wrote, the host gives freed pages back (incremental vacuum,
//!    bounded in time, in the same job) and measures the file again. Temporary
//!    storage is in memory (`temp_store = MEMORY`), so sorts and
//!    materialised subqueries are bounded by the memory limits of layer 7,
//!    not written to disk.
//!
//! Direct writes to `sqlite_schema` are refused by SQLite itself unless
//! `writable_schema` is on, which the authorizer and `DEFENSIVE` both
//! prevent; the error is reported as [`SqlError::Denied`]. They cannot be
//! denied in the authorizer because `CREATE`/`DROP`/`ALTER` ask to write the
//! schema table through the very same action codes.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cordon_blocking::{BlockingPool, JobContext, PoolConfig, StopReason};
use cordon_disk::{Account, Allowance, DiskError, Ledger, WriteKind, WriteTurn, sqlite as disk};

use rusqlite::config::DbConfig;
use rusqlite::fallible_iterator::FallibleIterator;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Batch, Connection, ErrorCode, OpenFlags, ffi};

use crate::functions::{self, StopSignal};
use crate::memory::{Budget, Stoppable};

/// How long a statement waits for a lock held by another process before it
/// fails with a storage error. Inside the process one mutex serialises all
/// calls, so this only matters when an operator tool has the file open.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Virtual machine instructions between two checks of the statement's
/// deadline: often enough to stop within a millisecond or so, rarely enough
/// to cost nothing measurable.
const PROGRESS_OPS: i32 = 1000;

/// What a result value costs against `max_result_bytes` on top of its text
/// or blob payload, so that a flood of `NULL`s or integers is bounded too.
const VALUE_OVERHEAD: usize = 8;

/// Lower bound for `SQLITE_LIMIT_LENGTH`, so that tiny configured limits do
/// not break SQLite's own bookkeeping (schema text, error messages).
const MIN_VALUE_LIMIT: usize = 64 * 1024;

/// Per-connection bounds on what one statement may make SQLite build, far
/// below SQLite's defaults (which allow, for example, expressions 1,000
/// deep and programs of 250 million instructions). Each is well above
/// what ordinary statements need.
pub const TENANT_LIMITS: &[(Limit, i32)] = &[
    // Expression trees, including the subqueries that nested views add up to.
    (Limit::SQLITE_LIMIT_EXPR_DEPTH, 100),
    (Limit::SQLITE_LIMIT_COMPOUND_SELECT, 50),
    (Limit::SQLITE_LIMIT_COLUMN, 1000),
    (Limit::SQLITE_LIMIT_FUNCTION_ARG, 100),
    (Limit::SQLITE_LIMIT_ATTACHED, 0),
    (Limit::SQLITE_LIMIT_TRIGGER_DEPTH, 10),
    (Limit::SQLITE_LIMIT_LIKE_PATTERN_LENGTH, MAX_PATTERN_BYTES as i32),
    // Instructions of one compiled statement: a view or CASE that expands
    // to a huge program fails while it is being built.
    (Limit::SQLITE_LIMIT_VDBE_OP, 250_000),
    // No helper threads for sorting: the pool's threads are the budget.
    (Limit::SQLITE_LIMIT_WORKER_THREADS, 0),
];

/// Longest `LIKE` or `GLOB` pattern, in bytes.
pub const MAX_PATTERN_BYTES: usize = 1000;

/// `PRAGMA`s a worker may run: they only describe the schema, plus
/// `data_version`, a read-only counter that `fts5` queries internally.
/// Everything else is denied, including reading settings such as
/// `journal_mode`, because some pragmas act as soon as they are prepared and
/// a list of the safe ones is shorter and safer than a list of the dangerous
/// ones.
const SAFE_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "data_version",
];

/// SQL functions that reach outside the database: `load_extension` runs
/// native code from a file, `fts3_tokenizer` takes a raw pointer.
const DENIED_FUNCTIONS: &[&str] = &["load_extension", "fts3_tokenizer"];

/// Virtual table modules a worker may create: full-text search. Other
/// modules are compiled in but either expose internals (`dbstat`) or carry
/// attack surface nobody asked for.
const ALLOWED_MODULES: &[&str] = &["fts5"];

const TRANSACTION_DENIED: &str = "transaction control (BEGIN/COMMIT/ROLLBACK/SAVEPOINT) is not allowed: use batch";
const TEMP_DENIED: &str =
    "temporary tables, indexes, views and triggers are not allowed: the connection is shared, so they would outlive the request";
const SCHEMA_WRITE_DENIED: &str = "writing sqlite_schema directly is not allowed: use CREATE, DROP or ALTER";

/// A value bound to a parameter or read from a result row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// The result of one statement.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RowSet {
    /// Column names, empty for statements that return no rows.
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
    /// Rows inserted, updated or deleted directly by the statement (not by
    /// triggers); 0 for anything else.
    pub rows_affected: u64,
    /// The rowid of the last row an `INSERT` inserted; `None` when the
    /// statement was not an `INSERT` or inserted nothing.
    pub last_insert_rowid: Option<i64>,
}

/// The default of [`SqlLimits::max_memory_bytes`].
pub const DEFAULT_STATEMENT_MEMORY: usize = 64 << 20;

/// Limits of one statement. The host builds them from `[limits]`.
#[derive(Debug, Clone)]
pub struct SqlLimits {
    /// Time one statement may run (`limits.sql_statement_timeout_ms`).
    pub statement_timeout: Duration,
    /// Rows one statement may return (`limits.max_sql_rows`).
    pub max_rows: usize,
    /// Bytes of values one statement may return
    /// (`limits.max_sql_result_bytes`): each value costs 8 bytes plus the
    /// length of its text or blob.
    pub max_result_bytes: usize,
    /// Longest statement text.
    pub max_statement_bytes: usize,
    /// Most parameters one statement may have.
    pub max_params: usize,
    /// Bytes SQLite may allocate for one call, net of what it frees: an
    /// `execute`, or a whole `batch` (`storage.sql_statement_memory_mb`).
    /// Only in force where [`crate::memory::limit_memory`] could wrap
    /// SQLite's allocator.
    pub max_memory_bytes: usize,
    /// The request's memory account, charged with every value of a result
    /// as it is read (on top of `max_result_bytes`), so that the results of
    /// a batch, held together until they reach the guest, stop at the
    /// request's memory limit while they are read.
    pub result_memory: Option<std::sync::Arc<cordon_memory::Account>>,
}

impl Default for SqlLimits {
    fn default() -> Self {
        Self {
            statement_timeout: Duration::from_secs(1),
            max_rows: 10_000,
            max_result_bytes: 4 * 1024 * 1024,
            max_statement_bytes: 100 * 1024,
            max_params: 999,
            max_memory_bytes: DEFAULT_STATEMENT_MEMORY,
            result_memory: None,
        }
    }
}

/// Why a statement did not run, or stopped. Messages are meant for the
/// worker's author: they say what was refused and, where it helps, how to
/// do it instead. They never contain host paths.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SqlError {
    #[error("no SQL statement to run")]
    Empty,
    #[error("one call runs one statement; use batch for several")]
    MultipleStatements,
    #[error("the statement is {len} bytes; at most {max} are allowed")]
    StatementTooLong { len: usize, max: usize },
    #[error("{got} parameters were given; at most {max} are allowed")]
    TooManyParams { got: usize, max: usize },
    #[error("the statement has {expected} parameters but {got} values were given")]
    ParamCount { expected: usize, got: usize },
    #[error("{what}")]
    Denied { what: String },
    #[error("this binding is read-only (read_only = true)")]
    ReadOnly,
    #[error("the statement ran longer than {ms} ms (limits.sql_statement_timeout_ms)")]
    Timeout { ms: u64 },
    #[error(
        "the statement needs more memory or a larger compiled program than one statement may have; split it, or use fewer nested views, subqueries or CASE branches"
    )]
    TooComplex,
    #[error("the statement was stopped because its request ended")]
    Cancelled,
    #[error("the statement was stopped because the server is shutting down")]
    ShuttingDown,
    #[error("the statement returned more than {max} rows (limits.max_sql_rows)")]
    TooManyRows { max: usize },
    #[error("the statement returned more than {max} bytes (limits.max_sql_result_bytes)")]
    ResultTooLarge { max: usize },
    /// The result would take the request over a memory limit.
    #[error("{0}")]
    OverMemory(cordon_memory::OverBudget),
    #[error("`{name}` is not a valid {what} name")]
    InvalidName { what: &'static str, name: String },
    /// Over the tenant's storage quota, or the data directory's free-space
    /// reserve: the message starts with the error code.
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("{0}")]
    Constraint(String),
    #[error("{0}")]
    Invalid(String),
    #[error("storage error: {0}")]
    Storage(String),
}

impl SqlError {
    fn denied(what: impl Into<String>) -> Self {
        SqlError::Denied { what: what.into() }
    }
}

/// All SQL databases of this node, opened on first use and kept open.
pub struct Databases {
    root: PathBuf,
    open: Mutex<HashMap<(String, String), Arc<Database>>>,
    pool: Arc<BlockingPool>,
    statement_memory: usize,
    ledger: Arc<Ledger>,
}

/// The SQL pool's default size: statements of one database run one at a
/// time (one connection), so a tenant gains little from more than two
/// threads, and eight threads keep four tenants busy at once.
pub const DEFAULT_POOL: PoolConfig = PoolConfig { name: "sql", threads: 8, tenant_threads: 2, queue: 4096, tenant_queue: 256 };

impl fmt::Debug for Databases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Databases").field("root", &self.root).finish_non_exhaustive()
    }
}

impl Databases {
    /// Databases stored under `root` (the runtime passes `<data_dir>/sql`).
    /// Nothing is touched on disk until a database is opened.
    pub fn new(root: impl Into<PathBuf>) -> Databases {
        Self::with_pool(root, DEFAULT_POOL)
    }

    /// [`Databases::new`] with the statements of all databases running on
    /// a pool of this size. The storage quota is kept by the [`Ledger`] of
    /// `root`'s parent (the data directory), shared with the key-value
    /// namespaces beside it.
    pub fn with_pool(root: impl Into<PathBuf>, pool: PoolConfig) -> Databases {
        let root = root.into();
        let ledger = Ledger::shared(root.parent().unwrap_or(Path::new("")));
        Databases {
            root,
            open: Mutex::new(HashMap::new()),
            pool: Arc::new(BlockingPool::new(pool)),
            statement_memory: DEFAULT_STATEMENT_MEMORY,
            ledger,
        }
    }

    /// The tenants' storage accounts, where quotas and the reserve are set.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Sets [`SqlLimits::max_memory_bytes`] for the workers that open
    /// databases here.
    pub fn with_statement_memory(mut self, bytes: usize) -> Databases {
        self.statement_memory = bytes;
        self
    }

    pub fn statement_memory(&self) -> usize {
        self.statement_memory
    }

    /// The pool the host runs statements on.
    pub fn pool(&self) -> &Arc<BlockingPool> {
        &self.pool
    }

    /// The database `<root>/<tenant>/<database>.sqlite3`, created on first
    /// use (directories 0700, files 0600). The same pair always gives the
    /// same `Arc`, so all workers of a tenant share one connection and its
    /// lock.
    ///
    /// The names were validated with the config, and are validated again
    /// here: they become path components, and a name like `..` must never
    /// reach the file system.
    pub fn open(&self, tenant: &str, database: &str) -> Result<Arc<Database>, SqlError> {
        if !cordon_config::is_valid_name(tenant) {
            return Err(SqlError::InvalidName { what: "tenant", name: tenant.to_owned() });
        }
        if !cordon_config::is_valid_name(database) {
            return Err(SqlError::InvalidName { what: "database", name: database.to_owned() });
        }
        // Held while opening, so two first uses cannot open two connections.
        let mut open = lock(&self.open);
        let key = (tenant.to_owned(), database.to_owned());
        if let Some(db) = open.get(&key) {
            return Ok(Arc::clone(db));
        }
        let label = format!("{tenant}/{database}");
        let path = self.root.join(tenant).join(format!("{database}.sqlite3"));
        let conn = Conn::open(&path).map_err(|e| {
            tracing::error!(database = %label, path = %path.display(), error = %e, "cannot open SQL database");
            e
        })?;
        let files = cordon_disk::sqlite_files(&path);
        let account = self.ledger.account(tenant);
        account.record(&files);
        let db = Arc::new(Database { label, conn: Mutex::new(conn), account, path, files });
        open.insert(key, Arc::clone(&db));
        Ok(db)
    }
}

/// One tenant database: one connection behind a mutex. Calls block, so the
/// host runs them on a blocking thread.
pub struct Database {
    label: String,
    conn: Mutex<Conn>,
    /// The tenant's storage account.
    account: Arc<Account>,
    /// The database file.
    path: PathBuf,
    /// It and its WAL and shared-memory files, as the account measures them.
    files: Vec<PathBuf>,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database").field("label", &self.label).finish_non_exhaustive()
    }
}

impl Database {
    /// Runs exactly one statement with `params` bound to its positional
    /// parameters (`?`, `?N`), in a transaction of its own: if the statement
    /// fails or hits a limit, nothing it wrote is kept.
    pub fn execute(&self, sql: &str, params: &[Value], read_only: bool, limits: &SqlLimits) -> Result<RowSet, SqlError> {
        self.execute_job(None, sql, params, read_only, limits)
    }

    /// [`Database::execute`] as a job of a blocking pool: the pool's
    /// watchdog interrupts the statement at its timeout, even while SQLite
    /// is still preparing it, and when the job is cancelled (its request
    /// ended) or the pool shuts down.
    pub fn execute_job(
        &self,
        job: Option<&JobContext>,
        sql: &str,
        params: &[Value],
        read_only: bool,
        limits: &SqlLimits,
    ) -> Result<RowSet, SqlError> {
        precheck(sql, params, limits)?;
        let conn = self.lock();
        let budget = Budget::start(limits.max_memory_bytes);
        conn.apply_limits(limits)?;
        conn.begin(read_only)?;
        let armed = conn.arm(job);
        let mut growth = Growth::new(&self.account);
        let result = conn.run(sql, params, read_only, limits, job, &mut growth);
        // Before COMMIT: the host's own statements are never interrupted,
        // and do not count against the tenant's memory budget.
        drop(armed);
        drop(budget);
        let result = match result {
            Ok(rows) => conn.finish(read_only).map(|()| rows).map_err(|e| growth.explain(e)),
            Err(e) => {
                conn.rollback();
                Err(e)
            }
        };
        self.after_write(&conn, growth);
        result
    }

    /// Runs the statements in order in one transaction. The first error
    /// rolls back everything and is returned with the index of its
    /// statement; an error while committing (a deferred foreign key) carries
    /// the index of the last statement. An empty batch does nothing.
    ///
    /// Limits apply to each statement on its own, as in `execute`.
    pub fn batch(
        &self,
        statements: &[(String, Vec<Value>)],
        read_only: bool,
        limits: &SqlLimits,
    ) -> Result<Vec<RowSet>, (usize, SqlError)> {
        self.batch_job(None, statements, read_only, limits)
    }

    /// [`Database::batch`] as a job of a blocking pool, see
    /// [`Database::execute_job`]; each statement has its own timeout.
    pub fn batch_job(
        &self,
        job: Option<&JobContext>,
        statements: &[(String, Vec<Value>)],
        read_only: bool,
        limits: &SqlLimits,
    ) -> Result<Vec<RowSet>, (usize, SqlError)> {
        if statements.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.lock();
        let budget = Budget::start(limits.max_memory_bytes);
        conn.apply_limits(limits).map_err(|e| (0, e))?;
        conn.begin(read_only).map_err(|e| (0, e))?;
        let armed = conn.arm(job);
        let mut growth = Growth::new(&self.account);
        let mut results = Vec::with_capacity(statements.len());
        let mut failed = None;
        for (i, (sql, params)) in statements.iter().enumerate() {
            match precheck(sql, params, limits).and_then(|()| conn.run(sql, params, read_only, limits, job, &mut growth)) {
                Ok(rows) => results.push(rows),
                Err(e) => {
                    failed = Some((i, e));
                    break;
                }
            }
        }
        drop(armed);
        drop(budget);
        let result = match failed {
            Some(failed) => {
                conn.rollback();
                Err(failed)
            }
            None => conn.finish(read_only).map(|()| results).map_err(|e| (statements.len() - 1, growth.explain(e))),
        };
        self.after_write(&conn, growth);
        result
    }

    /// After a call that wrote, while the tenant's turn is still held:
    /// gives freed pages back and measures the file again (see the module
    /// docs). Not interrupted by the job, and bounded in time by
    /// `cordon_disk::RECLAIM_TIME`.
    fn after_write(&self, conn: &Conn, growth: Growth<'_>) {
        let Some(turn) = growth.turn else { return };
        self.account.record(&self.files);
        let near_quota = self.account.near_quota();
        match conn.as_host(|c| disk::after_write(c, &self.path, growth.kind, near_quota)) {
            Ok(false) => {}
            Ok(true) => self.account.record(&self.files),
            Err(e) => tracing::warn!(database = %self.label, error = %e, "giving free space back after a write failed"),
        }
        drop(turn);
    }

    /// Locks the connection. A panic while it was held (there should be
    /// none) may have left a transaction open; it is rolled back so that it
    /// cannot leak into this call.
    fn lock(&self) -> MutexGuard<'_, Conn> {
        let conn = self.conn.lock().unwrap_or_else(|poisoned| {
            tracing::warn!(database = %self.label, "SQL connection lock was poisoned; recovering");
            self.conn.clear_poison();
            poisoned.into_inner()
        });
        conn.reset();
        conn
    }
}

/// What the authorizer is doing right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Between calls, and while the tail of a statement is checked: deny
    /// everything and record nothing.
    DenyAll,
    /// The host's own fixed statements (`BEGIN`, `COMMIT`, `ROLLBACK`).
    Host,
    /// A worker's statement.
    Tenant { read_only: bool },
}

/// Why the authorizer denied a worker's statement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Denial {
    ReadOnly,
    Denied(String),
}

/// State shared between the authorizer callback and the code that runs the
/// statement. Only touched with the connection lock held, so the inner mutex
/// is never contended; it exists because the callback must be `Send`.
#[derive(Debug)]
struct AuthState {
    mode: Mode,
    /// The first denial of the current statement.
    denial: Option<Denial>,
    /// The statement inserts into a table at top level, so its
    /// `last_insert_rowid` means something.
    inserts: bool,
    /// The statement may add data (anything that writes but a delete or a
    /// drop), so it is held to the quota without the headroom for deletes.
    grows: bool,
}

/// The authorizer's verdict on one action, before the mode is applied.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Allow,
    /// Allowed, unless the binding is read-only.
    Write,
    Deny(String),
}

/// Decides one action of a worker's statement. Deny by default: an action
/// this function does not name is refused.
fn check(action: &AuthAction<'_>) -> Verdict {
    use AuthAction as A;
    match *action {
        A::Select | A::Read { .. } | A::Recursive => Verdict::Allow,
        A::Function { function_name } => {
            if DENIED_FUNCTIONS.iter().any(|f| f.eq_ignore_ascii_case(function_name)) {
                Verdict::Deny(format!("{} is not allowed", function_name.to_ascii_lowercase()))
            } else {
                Verdict::Allow
            }
        }
        A::Pragma { pragma_name, .. } => {
            let name = pragma_name.to_ascii_lowercase();
            if SAFE_PRAGMAS.contains(&name.as_str()) { Verdict::Allow } else { Verdict::Deny(format!("PRAGMA {name} is not allowed")) }
        }
        A::Insert { .. }
        | A::Update { .. }
        | A::Delete { .. }
        | A::CreateTable { .. }
        | A::CreateIndex { .. }
        | A::CreateView { .. }
        | A::CreateTrigger { .. }
        | A::DropTable { .. }
        | A::DropIndex { .. }
        | A::DropView { .. }
        | A::DropTrigger { .. }
        | A::DropTempTable { .. }
        | A::DropTempIndex { .. }
        | A::DropTempView { .. }
        | A::DropTempTrigger { .. }
        | A::AlterTable { .. }
        | A::Reindex { .. }
        | A::Analyze { .. }
        | A::DropVtable { .. } => Verdict::Write,
        A::CreateVtable { module_name, .. } => {
            if ALLOWED_MODULES.iter().any(|m| m.eq_ignore_ascii_case(module_name)) {
                Verdict::Write
            } else {
                Verdict::Deny(format!(
                    "CREATE VIRTUAL TABLE ... USING {module_name} is not allowed (allowed: {})",
                    ALLOWED_MODULES.join(", ")
                ))
            }
        }
        A::CreateTempTable { .. } | A::CreateTempIndex { .. } | A::CreateTempView { .. } | A::CreateTempTrigger { .. } => {
            Verdict::Deny(TEMP_DENIED.to_owned())
        }
        A::Transaction { .. } | A::Savepoint { .. } => Verdict::Deny(TRANSACTION_DENIED.to_owned()),
        A::Attach { .. } => Verdict::Deny("ATTACH is not allowed".to_owned()),
        A::Detach { .. } => Verdict::Deny("DETACH is not allowed".to_owned()),
        // rusqlite reports actions whose arguments it did not expect as
        // `Unknown`: `ATTACH ?` has no file name to show.
        A::Unknown { code, .. } => Verdict::Deny(match code {
            ffi::SQLITE_ATTACH => "ATTACH is not allowed".to_owned(),
            ffi::SQLITE_DETACH => "DETACH is not allowed".to_owned(),
            ffi::SQLITE_TRANSACTION | ffi::SQLITE_SAVEPOINT => TRANSACTION_DENIED.to_owned(),
            _ => format!("this statement is not allowed (authorizer action {code})"),
        }),
        _ => Verdict::Deny("this statement is not allowed".to_owned()),
    }
}

/// The authorizer installed on the connection: applies the mode to
/// [`check`] and records why it denied.
fn authorize(state: &Mutex<AuthState>, ctx: &AuthContext<'_>) -> Authorization {
    let mut state = lock(state);
    let read_only = match state.mode {
        Mode::Host => return Authorization::Allow,
        Mode::DenyAll => return Authorization::Deny,
        Mode::Tenant { read_only } => read_only,
    };
    let denial = match check(&ctx.action) {
        Verdict::Allow => return Authorization::Allow,
        Verdict::Write if !read_only => {
            if let AuthAction::Insert { table_name } = ctx.action
                && ctx.accessor.is_none()
                && !is_schema_table(table_name)
            {
                state.inserts = true;
            }
            if !only_removes(&ctx.action) {
                state.grows = true;
            }
            return Authorization::Allow;
        }
        Verdict::Write => Denial::ReadOnly,
        Verdict::Deny(what) => Denial::Denied(what),
    };
    state.denial.get_or_insert(denial);
    Authorization::Deny
}

/// Write actions that only take data away: a statement made of these (and
/// reads) is a [`WriteKind::Shrink`]. A trigger or a foreign key action
/// that inserts or updates shows up as its own action, and makes the
/// statement a [`WriteKind::Grow`].
fn only_removes(action: &AuthAction<'_>) -> bool {
    use AuthAction as A;
    matches!(
        *action,
        A::Delete { .. }
            | A::DropTable { .. }
            | A::DropIndex { .. }
            | A::DropView { .. }
            | A::DropTrigger { .. }
            | A::DropTempTable { .. }
            | A::DropTempIndex { .. }
            | A::DropTempView { .. }
            | A::DropTempTrigger { .. }
            | A::DropVtable { .. }
    )
}

fn is_schema_table(name: &str) -> bool {
    ["sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"].iter().any(|t| t.eq_ignore_ascii_case(name))
}

/// The connection of one database and the authorizer state it shares.
struct Conn {
    conn: Connection,
    auth: Arc<Mutex<AuthState>>,
    /// Tells the replaced functions that the statement must stop.
    stop: Arc<StopSignal>,
}

/// While it lives, the job's interrupt stops this connection's statement;
/// dropping it removes the interrupt (waiting for a call under way), so
/// that nothing interrupts whoever uses the connection next.
struct Armed<'a> {
    job: Option<&'a JobContext>,
    _stoppable: Option<Stoppable>,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        if let Some(job) = self.job {
            job.clear_interrupt();
            job.set_deadline(None);
        }
    }
}

impl Conn {
    /// Creates the file with owner-only permissions and opens it with every
    /// sandbox setting on. Any setting that does not take fails the open.
    fn open(path: &Path) -> Result<Conn, SqlError> {
        let io = |what: &str, e: std::io::Error| SqlError::Storage(format!("cannot {what} the database: {e}"));
        let dir = path.parent().ok_or_else(|| SqlError::Storage("database path has no directory".to_owned()))?;
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| io("create the directory of", e))?;
        let meta = fs::symlink_metadata(dir).map_err(|e| io("inspect the directory of", e))?;
        if !meta.is_dir() {
            return Err(SqlError::Storage("the database directory is not a directory".to_owned()));
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| io("protect the directory of", e))?;
        cordon_disk::sqlite::create_private_file(path).map_err(|e| SqlError::Storage(e.to_string()))?;

        // No SQLITE_OPEN_URI: the path is a plain file name. NO_MUTEX: our
        // own mutex serialises the connection.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| map_error(e, None))?;
        let conn = Conn {
            conn,
            auth: Arc::new(Mutex::new(AuthState { mode: Mode::DenyAll, denial: None, inserts: false, grows: false })),
            stop: StopSignal::new(),
        };
        conn.configure(path).map_err(|e| match e {
            SqlError::Storage(_) => e,
            other => SqlError::Storage(other.to_string()),
        })?;
        Ok(conn)
    }

    fn configure(&self, path: &Path) -> Result<(), SqlError> {
        let conn = &self.conn;
        let sqlite = |e| map_error(e, None);
        // First: an older file's one-time VACUUM attaches a database, which
        // the limits below forbid. See `cordon_disk::sqlite::configure`.
        disk::configure(conn, path).map_err(sqlite)?;
        for (config, on) in [
            (DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true),
            (DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false),
            (DbConfig::SQLITE_DBCONFIG_ENABLE_FTS3_TOKENIZER, false),
            (DbConfig::SQLITE_DBCONFIG_ENABLE_ATTACH_CREATE, false),
            (DbConfig::SQLITE_DBCONFIG_ENABLE_ATTACH_WRITE, false),
            (DbConfig::SQLITE_DBCONFIG_ENABLE_FKEY, true),
        ] {
            if conn.set_db_config(config, on).map_err(sqlite)? != on {
                return Err(SqlError::Storage(format!("SQLite refused to set {config:?}")));
            }
        }
        for &(limit, value) in TENANT_LIMITS {
            conn.set_limit(limit, value).map_err(sqlite)?;
            if conn.limit(limit).map_err(sqlite)? != value {
                return Err(SqlError::Storage(format!("SQLite refused to set {limit:?} to {value}")));
            }
        }
        functions::register(conn, &self.stop, MAX_PATTERN_BYTES).map_err(sqlite)?;
        self.disable_extension_loading()?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite)?;
        let journal: String = conn.query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0)).map_err(sqlite)?;
        if !journal.eq_ignore_ascii_case("wal") {
            return Err(SqlError::Storage(format!("cannot use WAL mode (journal mode is {journal})")));
        }
        conn.execute_batch("PRAGMA synchronous=FULL").map_err(sqlite)?;
        let state = Arc::clone(&self.auth);
        conn.authorizer(Some(move |ctx: AuthContext<'_>| authorize(&state, &ctx)));
        Ok(())
    }

    /// Extension loading is off by default and `load_extension()` is denied
    /// by the authorizer; this turns it off explicitly at the C level too, so
    /// that neither depends on a default.
    fn disable_extension_loading(&self) -> Result<(), SqlError> {
        // SAFETY: `handle` is the live connection owned by `self.conn`, used
        // only on this thread for the duration of the call and not closed by
        // it; `sqlite3_enable_load_extension` only sets two flags on it.
        let rc = unsafe { ffi::sqlite3_enable_load_extension(self.conn.handle(), 0) };
        if rc == ffi::SQLITE_OK { Ok(()) } else { Err(SqlError::Storage(format!("cannot disable extension loading (SQLite error {rc})"))) }
    }

    fn state(&self) -> MutexGuard<'_, AuthState> {
        lock(&self.auth)
    }

    fn set_mode(&self, mode: Mode) {
        self.state().mode = mode;
    }

    /// Puts the connection back into its resting state between calls.
    fn reset(&self) {
        self.conn.progress_handler(0, None::<fn() -> bool>);
        self.set_mode(Mode::DenyAll);
        self.rollback();
    }

    /// Runs `f` with the authorizer letting everything through and no
    /// progress handler: for the host's own statements between calls.
    fn as_host<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        self.conn.progress_handler(0, None::<fn() -> bool>);
        self.set_mode(Mode::Host);
        let result = f(&self.conn);
        self.set_mode(Mode::DenyAll);
        result
    }

    /// Runs one of the host's fixed statements, which the authorizer lets
    /// through because transactions are the host's business.
    fn host(&self, sql: &str) -> Result<(), SqlError> {
        self.conn.progress_handler(0, None::<fn() -> bool>);
        self.set_mode(Mode::Host);
        let result = self.conn.execute_batch(sql);
        self.set_mode(Mode::DenyAll);
        result.map_err(|e| map_error(e, None))
    }

    /// `IMMEDIATE` takes the write lock up front, so a write later in the
    /// transaction cannot fail because another process wrote in between.
    fn begin(&self, read_only: bool) -> Result<(), SqlError> {
        self.host(if read_only { "BEGIN DEFERRED" } else { "BEGIN IMMEDIATE" })
    }

    /// Ends a successful call: read-only calls roll back (nothing can have
    /// been written, and this makes sure), others commit.
    fn finish(&self, read_only: bool) -> Result<(), SqlError> {
        if read_only {
            self.rollback();
            return Ok(());
        }
        let result = self.host("COMMIT");
        if result.is_err() {
            self.rollback();
        }
        result
    }

    /// Rolls back the open transaction, if any. SQLite rolls back by itself
    /// after some errors (an interrupted write, a full disk), hence the check.
    fn rollback(&self) {
        if !self.conn.is_autocommit()
            && let Err(e) = self.host("ROLLBACK")
        {
            tracing::error!(error = %e, "cannot roll back SQL transaction");
        }
    }

    /// Mirrors the limits in SQLite, as a second line behind [`precheck`]
    /// and for the SQL SQLite prepares on a statement's behalf.
    fn apply_limits(&self, limits: &SqlLimits) -> Result<(), SqlError> {
        let clamp = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
        let value_limit = limits.max_result_bytes.max(limits.max_statement_bytes).max(MIN_VALUE_LIMIT);
        for (limit, value) in [
            (Limit::SQLITE_LIMIT_SQL_LENGTH, clamp(limits.max_statement_bytes)),
            (Limit::SQLITE_LIMIT_VARIABLE_NUMBER, clamp(limits.max_params)),
            (Limit::SQLITE_LIMIT_LENGTH, clamp(value_limit)),
        ] {
            self.conn.set_limit(limit, value).map_err(|e| map_error(e, None))?;
        }
        Ok(())
    }

    /// Installs the job's interrupt for the statements that follow, until
    /// the returned guard is dropped.
    fn arm<'a>(&self, job: Option<&'a JobContext>) -> Armed<'a> {
        let Some(job) = job else { return Armed { job, _stoppable: None } };
        self.stop.arm(None);
        let handle = self.conn.get_interrupt_handle();
        let stop = Arc::clone(&self.stop);
        job.set_interrupt(move || {
            stop.stop();
            handle.interrupt();
        });
        // SQLite does not look for interrupts while it expands views, but
        // it allocates: once stopped, its allocations on this thread fail.
        Armed { job: Some(job), _stoppable: Some(Stoppable::start(&self.stop)) }
    }

    /// Runs one worker statement inside the transaction the caller opened.
    fn run(
        &self,
        sql: &str,
        params: &[Value],
        read_only: bool,
        limits: &SqlLimits,
        job: Option<&JobContext>,
        growth: &mut Growth<'_>,
    ) -> Result<RowSet, SqlError> {
        if let Some(reason) = job.and_then(JobContext::stop_reason) {
            return Err(stopped(reason, limits));
        }
        // A timeout too large to add to now means no deadline, not a panic.
        let deadline = Instant::now().checked_add(limits.statement_timeout);
        // The watchdog interrupts at the deadline, during prepare too; the
        // progress handler checks it between instructions; the replaced
        // functions check it inside a long call.
        self.stop.arm(deadline);
        if let Some(job) = job {
            job.set_deadline(deadline);
        }
        if let Some(deadline) = deadline {
            let stop = Arc::clone(&self.stop);
            self.conn.progress_handler(PROGRESS_OPS, Some(move || Instant::now() >= deadline || stop.should_stop()));
        }
        {
            let mut state = self.state();
            state.mode = Mode::Tenant { read_only };
            state.denial = None;
            state.inserts = false;
            state.grows = false;
        }
        let result = self.run_statement(sql, params, read_only, limits, growth).map_err(|e| growth.explain(e));
        self.conn.progress_handler(0, None::<fn() -> bool>);
        self.set_mode(Mode::DenyAll);
        // Whatever SQLite made of the interrupt (an interrupted prepare can
        // also fail as out of memory), the reason is the job's.
        match (result, job.and_then(JobContext::stop_reason)) {
            (Err(_), Some(reason)) => Err(stopped(reason, limits)),
            (result, _) => result,
        }
    }

    fn run_statement(
        &self,
        sql: &str,
        params: &[Value],
        read_only: bool,
        limits: &SqlLimits,
        growth: &mut Growth<'_>,
    ) -> Result<RowSet, SqlError> {
        // `Connection::prepare` would also prepare the tail, with the worker's
        // authorizer mode, and report a denial or a syntax error in the tail
        // instead of "several statements". `Batch` prepares one statement at a
        // time and keeps the tail for us.
        let mut statements = Batch::new(&self.conn, sql);
        let mut stmt = match statements.next() {
            Ok(Some(stmt)) => stmt,
            Ok(None) => return Err(SqlError::Empty),
            Err(e) => return Err(self.error(e, limits)),
        };
        // Anything but whitespace and comments after the first statement
        // prepares to a statement (or fails to); either way it is refused.
        // The authorizer denies everything meanwhile, so preparing the tail
        // cannot act (a PRAGMA acts while it is prepared).
        self.set_mode(Mode::DenyAll);
        let tail = statements.next();
        self.set_mode(Mode::Tenant { read_only });
        if !matches!(tail, Ok(None)) {
            return Err(SqlError::MultipleStatements);
        }
        drop(tail);

        // The authorizer already denied each write action; this also covers
        // whatever writes without one.
        if read_only && !stmt.readonly() {
            return Err(SqlError::ReadOnly);
        }
        if !stmt.readonly() {
            let kind = if self.state().grows { WriteKind::Grow } else { WriteKind::Shrink };
            self.set_mode(Mode::Host);
            let limited = growth.before_statement(&self.conn, kind);
            self.set_mode(Mode::Tenant { read_only });
            limited.map_err(|e| match e {
                GrowthError::Stopped(reason) => stopped(reason, limits),
                GrowthError::Disk(e) => SqlError::Disk(e),
                GrowthError::Sqlite(e) => map_error(e, None),
            })?;
        }
        let expected = stmt.parameter_count();
        for i in 1..=expected {
            if let Some(name) = stmt.parameter_name(i)
                && !name.starts_with('?')
            {
                return Err(SqlError::Invalid(format!("named parameter {name} is not supported: use ? or ?N")));
            }
        }
        if expected != params.len() {
            return Err(SqlError::ParamCount { expected, got: params.len() });
        }
        for (i, value) in params.iter().enumerate() {
            stmt.raw_bind_parameter(i + 1, bind(value)).map_err(|e| self.error(e, limits))?;
        }

        let columns: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
        let changes_before = self.conn.total_changes();
        let mut budget = limits.max_result_bytes;
        let mut out = Vec::new();
        let mut rows = stmt.raw_query();
        loop {
            let row = match rows.next() {
                Ok(Some(row)) => row,
                Ok(None) => break,
                Err(e) => return Err(self.error(e, limits)),
            };
            if out.len() >= limits.max_rows {
                return Err(SqlError::TooManyRows { max: limits.max_rows });
            }
            let mut values = Vec::with_capacity(columns.len());
            for i in 0..columns.len() {
                let value = row.get_ref(i).map_err(|e| self.error(e, limits))?;
                let cost = VALUE_OVERHEAD
                    + match value {
                        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => bytes.len(),
                        _ => 0,
                    };
                budget = budget.checked_sub(cost).ok_or(SqlError::ResultTooLarge { max: limits.max_result_bytes })?;
                if let Some(memory) = &limits.result_memory {
                    memory.charge(cost as u64).map_err(SqlError::OverMemory)?;
                }
                values.push(read(value));
            }
            out.push(values);
        }
        drop(rows);

        // `changes()` keeps the count of the last INSERT/UPDATE/DELETE, so it
        // is only this statement's if the statement changed something.
        let rows_affected = if self.conn.total_changes() != changes_before { self.conn.changes() } else { 0 };
        let inserts = self.state().inserts;
        let last_insert_rowid = (inserts && rows_affected > 0).then(|| self.conn.last_insert_rowid());
        Ok(RowSet { columns, rows: out, rows_affected, last_insert_rowid })
    }

    /// Maps an error of a worker statement, preferring the authorizer's
    /// reason over SQLite's generic "not authorized".
    fn error(&self, e: rusqlite::Error, limits: &SqlLimits) -> SqlError {
        match self.state().denial.clone() {
            Some(Denial::ReadOnly) => SqlError::ReadOnly,
            Some(Denial::Denied(what)) => SqlError::Denied { what },
            None => map_error(e, Some(limits)),
        }
    }
}

/// What one call may add to its database: it takes the tenant's write turn
/// at its first statement that writes and keeps it until the call is over;
/// every writing statement runs with the file's `max_page_count` at the
/// size the call started at plus what the quota and the reserve allow a
/// statement of its kind.
struct Growth<'a> {
    account: &'a Account,
    turn: Option<WriteTurn<'a>>,
    /// The pages of the database when the turn was taken.
    start_pages: u64,
    /// The allowance of the last writing statement.
    allowance: Option<Allowance>,
    /// `Grow` once any statement of the call may add data.
    kind: WriteKind,
}

enum GrowthError {
    Stopped(StopReason),
    Disk(DiskError),
    Sqlite(rusqlite::Error),
}

impl<'a> Growth<'a> {
    fn new(account: &'a Account) -> Growth<'a> {
        Growth { account, turn: None, start_pages: 0, allowance: None, kind: WriteKind::Shrink }
    }

    /// Before a statement that writes: waits for the turn (the first time)
    /// and sets the file's limit. Runs the host's own pragmas on `conn`.
    fn before_statement(&mut self, conn: &Connection, kind: WriteKind) -> Result<(), GrowthError> {
        if self.turn.is_none() {
            self.turn = Some(self.account.begin_write().map_err(GrowthError::Stopped)?);
            self.start_pages = disk::page_count(conn).map_err(GrowthError::Sqlite)?;
        }
        let Some(turn) = &self.turn else { unreachable!("the turn was taken above") };
        let allowance = turn.allowance(kind).map_err(GrowthError::Disk)?;
        disk::limit_growth_from(conn, self.start_pages, allowance.bytes).map_err(GrowthError::Sqlite)?;
        self.allowance = Some(allowance);
        if kind == WriteKind::Grow {
            self.kind = WriteKind::Grow;
        }
        Ok(())
    }

    /// Says which bound a `SQLITE_FULL` of this call hit.
    fn explain(&self, e: SqlError) -> SqlError {
        match (e, &self.turn, &self.allowance) {
            (SqlError::Disk(DiskError::Full), Some(turn), Some(allowance)) => SqlError::Disk(turn.full_error(allowance)),
            (e, _, _) => e,
        }
    }
}

/// The error of a statement stopped by its job.
fn stopped(reason: StopReason, limits: &SqlLimits) -> SqlError {
    match reason {
        StopReason::DeadlinePassed => SqlError::Timeout { ms: timeout_ms(limits) },
        StopReason::Cancelled => SqlError::Cancelled,
        StopReason::Shutdown => SqlError::ShuttingDown,
    }
}

fn timeout_ms(limits: &SqlLimits) -> u64 {
    u64::try_from(limits.statement_timeout.as_millis()).unwrap_or(u64::MAX)
}

/// Cheap checks on the text before the connection is locked.
fn precheck(sql: &str, params: &[Value], limits: &SqlLimits) -> Result<(), SqlError> {
    if sql.len() > limits.max_statement_bytes {
        return Err(SqlError::StatementTooLong { len: sql.len(), max: limits.max_statement_bytes });
    }
    if params.len() > limits.max_params {
        return Err(SqlError::TooManyParams { got: params.len(), max: limits.max_params });
    }
    // SQLite stops reading at a NUL, so whatever follows would be silently
    // ignored rather than refused.
    if sql.contains('\0') {
        return Err(SqlError::Invalid("the statement contains a NUL byte".to_owned()));
    }
    // VACUUM has no authorizer action, and VACUUM INTO writes a file
    // anywhere. It would also fail on the ATTACH it runs internally and
    // inside our transaction; this gives the reason.
    if first_keyword(sql).eq_ignore_ascii_case("vacuum") {
        return Err(SqlError::denied("VACUUM is not allowed: the host gives the space of deleted rows back after each delete"));
    }
    Ok(())
}

/// The first word of a statement, after whitespace and comments.
fn first_keyword(sql: &str) -> &str {
    let mut rest = sql;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_ascii_whitespace());
        if let Some(comment) = rest.strip_prefix("--") {
            rest = comment.find('\n').map_or("", |end| &comment[end..]);
        } else if let Some(comment) = rest.strip_prefix("/*") {
            rest = comment.find("*/").map_or("", |end| &comment[end + 2..]);
        } else {
            break;
        }
    }
    let end = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
    &rest[..end]
}

fn bind(value: &Value) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(match value {
        Value::Null => ValueRef::Null,
        Value::Integer(i) => ValueRef::Integer(*i),
        Value::Real(f) => ValueRef::Real(*f),
        Value::Text(s) => ValueRef::Text(s.as_bytes()),
        Value::Blob(b) => ValueRef::Blob(b),
    })
}

/// Text that is not UTF-8 (a blob cast to text) is converted lossily rather
/// than failing the whole result.
fn read(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(f) => Value::Real(f),
        ValueRef::Text(bytes) => Value::Text(String::from_utf8_lossy(bytes).into_owned()),
        ValueRef::Blob(bytes) => Value::Blob(bytes.to_vec()),
    }
}

/// Maps a SQLite error to what the worker is told. `limits` is `None` for
/// the host's own statements, which are never interrupted.
fn map_error(e: rusqlite::Error, limits: Option<&SqlLimits>) -> SqlError {
    use rusqlite::Error as E;
    let (error, message) = match e {
        E::SqliteFailure(error, message) => (error, message),
        E::SqlInputError { error, msg, .. } => (error, Some(msg)),
        E::MultipleStatement => return SqlError::MultipleStatements,
        E::InvalidParameterCount(got, expected) => return SqlError::ParamCount { expected, got },
        E::NulError(_) => return SqlError::Invalid("the statement contains a NUL byte".to_owned()),
        other => return SqlError::Storage(other.to_string()),
    };
    let message = message.unwrap_or_else(|| error.to_string());
    match error.code {
        ErrorCode::OperationInterrupted => SqlError::Timeout { ms: limits.map_or(0, timeout_ms) },
        // In a tenant statement, running out of memory means the statement
        // reached a bound: the program size (SQLITE_LIMIT_VDBE_OP fails as
        // out of memory) or the process's heap limit.
        ErrorCode::OutOfMemory if limits.is_some() => SqlError::TooComplex,
        // Out of pages: the statement's `Growth` tells the quota from the
        // reserve.
        ErrorCode::DiskFull => SqlError::Disk(DiskError::Full),
        ErrorCode::ConstraintViolation => SqlError::Constraint(message),
        ErrorCode::AuthorizationForStatementDenied => SqlError::denied(format!("not allowed: {message}")),
        ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
            SqlError::Storage(format!("the database is locked by another writer ({message}); try again"))
        }
        ErrorCode::SystemIoFailure
        | ErrorCode::DatabaseCorrupt
        | ErrorCode::NotADatabase
        | ErrorCode::CannotOpen
        | ErrorCode::PermissionDenied
        | ErrorCode::ReadOnly
        | ErrorCode::OutOfMemory
        | ErrorCode::FileLockingProtocolFailed
        | ErrorCode::NoLargeFileSupport
        | ErrorCode::InternalMalfunction
        | ErrorCode::ApiMisuse => SqlError::Storage(message),
        // SQLite refuses writes to the schema table unless writable_schema
        // is on, which is never the case here.
        _ if message.starts_with("table sqlite_") && message.ends_with("may not be modified") => SqlError::denied(SCHEMA_WRITE_DENIED),
        _ => SqlError::Invalid(message),
    }
}

/// Locks a mutex whatever happened to the last holder: the data it guards
/// here stays consistent (the connection is reset after every lock).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| {
        mutex.clear_poison();
        poisoned.into_inner()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Databases) {
        let dir = tempfile::tempdir().unwrap();
        let dbs = Databases::new(dir.path().join("sql"));
        (dir, dbs)
    }

    fn limits() -> SqlLimits {
        SqlLimits::default()
    }

    fn exec(db: &Database, sql: &str, params: &[Value]) -> Result<RowSet, SqlError> {
        db.execute(sql, params, false, &limits())
    }

    fn ro(db: &Database, sql: &str) -> Result<RowSet, SqlError> {
        db.execute(sql, &[], true, &limits())
    }

    fn count(db: &Database, table: &str) -> i64 {
        match exec(db, &format!("SELECT count(*) FROM {table}"), &[]).unwrap().rows[0][0] {
            Value::Integer(n) => n,
            ref other => panic!("count is {other:?}"),
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(s.to_owned())
    }

    fn denied(result: Result<RowSet, SqlError>, needle: &str) {
        match result {
            Err(SqlError::Denied { what }) => assert!(what.contains(needle), "`{what}` does not mention `{needle}`"),
            other => panic!("expected Denied mentioning `{needle}`, got {other:?}"),
        }
    }

    fn quota_exceeded(result: Result<RowSet, SqlError>) {
        match result {
            Err(SqlError::Disk(e @ DiskError::QuotaExceeded { .. })) => {
                assert!(e.to_string().starts_with("storage_quota_exceeded: "), "{e}")
            }
            other => panic!("expected storage_quota_exceeded, got {other:?}"),
        }
    }

    /// A tenant with a 2 MiB quota and no reserve, with a table `t`.
    fn quota_setup() -> (tempfile::TempDir, Databases, Arc<Database>) {
        let (dir, dbs) = setup();
        dbs.ledger().set_free_space_reserve(0);
        dbs.ledger().set_tenant_quota("acme", 2 << 20);
        let db = dbs.open("acme", "main").unwrap();
        exec(&db, "CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB, s TEXT)", &[]).unwrap();
        (dir, dbs, db)
    }

    fn tenant_bytes(dir: &tempfile::TempDir) -> u64 {
        fs::read_dir(dir.path().join("sql/acme")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
    }

    #[test]
    fn writes_stop_at_the_tenant_quota_whatever_their_shape() {
        let (dir, dbs, db) = quota_setup();
        let other = dbs.open("globex", "main").unwrap();
        let many_rows = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000) INSERT INTO t (s) SELECT printf('%.100c', 'x') FROM n";
        // Big values, one statement at a time.
        let mut stored = 0;
        loop {
            match exec(&db, "INSERT INTO t (b) VALUES (zeroblob(200000))", &[]) {
                Ok(_) => stored += 1,
                Err(e) => {
                    quota_exceeded(Err(e));
                    break;
                }
            }
            assert!(stored < 100);
        }
        assert!(stored >= 5, "{stored}");
        assert!(tenant_bytes(&dir) <= 2 << 20, "{} bytes", tenant_bytes(&dir));
        // Many small rows, an index, a batch, a second database: all
        // stopped, nothing they wrote kept.
        quota_exceeded(exec(&db, many_rows, &[]));
        exec(&db, "DELETE FROM t WHERE id > 2", &[]).unwrap();
        exec(&db, "INSERT INTO t (s) SELECT printf('%.1000c', 'y') FROM t, t AS u, t AS v", &[]).unwrap();
        quota_exceeded(exec(&db, many_rows, &[]));
        let second = dbs.open("acme", "second").unwrap();
        quota_exceeded(second.execute(
            "CREATE TABLE big AS WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000) SELECT printf('%.100c', 'x') AS s FROM n",
            &[],
            false,
            &limits(),
        ));
        quota_exceeded(exec(&db, "CREATE INDEX t_s ON t (s, b)", &[]).and_then(|_| exec(&db, many_rows, &[])));
        let batch: Vec<(String, Vec<Value>)> =
            (0..20).map(|_| ("INSERT INTO t (b) VALUES (zeroblob(200000))".to_owned(), Vec::new())).collect();
        match db.batch(&batch, false, &limits()) {
            Err((_, SqlError::Disk(DiskError::QuotaExceeded { .. }))) => {}
            other => panic!("expected the batch to reach the quota, got {other:?}"),
        }
        assert!(tenant_bytes(&dir) <= 2 << 20, "{} bytes", tenant_bytes(&dir));
        // Another tenant is not affected.
        other.execute("CREATE TABLE t (b BLOB)", &[], false, &limits()).unwrap();
        other.execute("INSERT INTO t VALUES (zeroblob(1000000))", &[], false, &limits()).unwrap();
    }

    #[test]
    fn over_the_quota_reads_and_deletes_work_and_deleting_makes_room() {
        let (dir, _dbs, db) = quota_setup();
        exec(&db, "CREATE INDEX t_s ON t (s)", &[]).unwrap();
        let mut n = 0;
        loop {
            // Rows of many lengths, so that deletes rebalance the index.
            let row = exec(
                &db,
                "INSERT INTO t (s, b) VALUES (printf('%.*c', ?1, 's'), randomblob(?2))",
                &[Value::Integer(20 + (n * 37) % 700), Value::Integer(100 + (n * 53) % 3000)],
            );
            match row {
                Ok(_) => n += 1,
                Err(e) => {
                    quota_exceeded(Err(e));
                    break;
                }
            }
        }
        assert!(n > 100, "{n}");
        assert_eq!(count(&db, "t"), n);
        assert_eq!(ro(&db, "SELECT count(*) FROM t WHERE length(s) > 0").unwrap().rows[0][0], Value::Integer(n));
        // Every delete works at the limit, one row at a time.
        let ids: Vec<i64> = exec(&db, "SELECT id FROM t ORDER BY s", &[])
            .unwrap()
            .rows
            .iter()
            .map(|r| match r[0] {
                Value::Integer(i) => i,
                _ => 0,
            })
            .collect();
        for id in ids.iter().step_by(2) {
            exec(&db, "DELETE FROM t WHERE id = ?", &[Value::Integer(*id)]).expect("a delete over the quota");
        }
        let before = tenant_bytes(&dir);
        exec(&db, "DELETE FROM t", &[]).expect("a bulk delete");
        exec(&db, "DROP INDEX t_s", &[]).expect("a drop");
        // The host gave the pages back: the file shrank, and there is room.
        let after = tenant_bytes(&dir);
        assert!(after < before / 2, "{before} -> {after}");
        exec(&db, "INSERT INTO t (b) VALUES (zeroblob(1000000))", &[]).expect("room again");
    }

    #[test]
    fn temporary_storage_is_in_memory_and_the_wal_is_bounded() {
        let memory = crate::memory::limit_memory(512 << 20);
        let (dir, _dbs, db) = quota_setup();
        let conn = db.lock();
        let get = |name: &str| -> i64 { conn.as_host(|c| c.pragma_query_value(None, name, |r| r.get(0)).unwrap()) };
        assert_eq!(get("temp_store"), 2, "MEMORY");
        assert_eq!(get("auto_vacuum"), 2, "INCREMENTAL");
        assert_eq!(get("journal_size_limit"), cordon_disk::WAL_LIMIT as i64);
        drop(conn);
        // A statement whose temporary index is larger than its memory
        // budget fails instead of spilling to a temporary file.
        let small = SqlLimits { max_memory_bytes: 4 << 20, ..limits() };
        let distinct = db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000) SELECT count(DISTINCT printf('%.200c', 'x') || i) FROM n",
            &[],
            true,
            &small,
        );
        if memory.budgets {
            assert!(matches!(distinct, Err(SqlError::TooComplex)), "{distinct:?}");
        }
        // Rewriting every row of a full database leaves no large WAL behind.
        let mut stored = 0;
        while exec(&db, "INSERT INTO t (b) VALUES (randomblob(100000))", &[]).is_ok() {
            stored += 1;
        }
        assert!(stored > 5);
        exec(&db, "UPDATE t SET b = randomblob(length(b))", &[]).unwrap();
        let wal = fs::metadata(dir.path().join("sql/acme/main.sqlite3-wal")).map_or(0, |m| m.len());
        assert_eq!(wal, 0, "the WAL was truncated near the quota");
    }

    fn with_table(dbs: &Databases) -> Arc<Database> {
        let db = dbs.open("acme", "main").unwrap();
        exec(&db, "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL)", &[]).unwrap();
        exec(&db, "INSERT INTO t (name) VALUES ('a'), ('b')", &[]).unwrap();
        db
    }

    #[test]
    fn database_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Database>();
        assert_send_sync::<Databases>();
    }

    #[test]
    fn crud_round_trips_every_value_type() {
        let (_dir, dbs) = setup();
        let db = dbs.open("acme", "app").unwrap();
        // Untyped columns: no affinity, so every value comes back as stored.
        exec(&db, "CREATE TABLE v (id INTEGER PRIMARY KEY, x)", &[]).unwrap();
        let values = [
            Value::Null,
            Value::Integer(i64::MIN),
            Value::Integer(42),
            Value::Real(-1.5),
            text("héllo \u{1F600}"),
            text(""),
            Value::Blob(vec![0, 255, 1, 0]),
            Value::Blob(Vec::new()),
        ];
        for (i, value) in values.iter().enumerate() {
            let inserted = exec(&db, "INSERT INTO v (x) VALUES (?)", std::slice::from_ref(value)).unwrap();
            assert_eq!(inserted.rows_affected, 1);
            assert_eq!(inserted.last_insert_rowid, Some(i as i64 + 1));
            assert!(inserted.rows.is_empty() && inserted.columns.is_empty());
        }
        let all = exec(&db, "SELECT id, x FROM v ORDER BY id", &[]).unwrap();
        assert_eq!(all.columns, ["id", "x"]);
        let got: Vec<Value> = all.rows.iter().map(|r| r[1].clone()).collect();
        assert_eq!(got, values);
        assert_eq!(all.rows_affected, 0);
        assert_eq!(all.last_insert_rowid, None);

        let updated = exec(&db, "UPDATE v SET x = ?2 WHERE id <= ?1", &[Value::Integer(3), text("z")]).unwrap();
        assert_eq!((updated.rows_affected, updated.last_insert_rowid), (3, None));
        let deleted = exec(&db, "DELETE FROM v WHERE x = ?", &[text("z")]).unwrap();
        assert_eq!(deleted.rows_affected, 3);
        let created = exec(&db, "CREATE TABLE w (a)", &[]).unwrap();
        assert_eq!((created.rows_affected, created.last_insert_rowid), (0, None));
        let returning = exec(&db, "INSERT INTO v (x) VALUES (?) RETURNING id, x", &[Value::Real(2.25)]).unwrap();
        assert_eq!(returning.rows, [[Value::Integer(9), Value::Real(2.25)]]);
        assert_eq!(count(&db, "v"), 6);
    }

    #[test]
    fn parameters_are_bound_never_spliced() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        let evil = "'); DROP TABLE t; --";
        exec(&db, "INSERT INTO t (name) VALUES (?)", &[text(evil)]).unwrap();
        let found = exec(&db, "SELECT name FROM t WHERE name = ?", &[text(evil)]).unwrap();
        assert_eq!(found.rows, [[text(evil)]]);
        let none = exec(&db, "SELECT name FROM t WHERE name = ?1", &[text("a' OR '1'='1")]).unwrap();
        assert!(none.rows.is_empty());
        assert_eq!(count(&db, "t"), 3);
    }

    #[test]
    fn parameter_counts_are_checked() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        assert_eq!(exec(&db, "SELECT ?, ?", &[Value::Null]), Err(SqlError::ParamCount { expected: 2, got: 1 }));
        assert_eq!(exec(&db, "SELECT 1", &[Value::Null]), Err(SqlError::ParamCount { expected: 0, got: 1 }));
        // ?N counts up to the highest N.
        let rows = exec(&db, "SELECT ?3", &[Value::Null, Value::Null, Value::Integer(7)]).unwrap();
        assert_eq!(rows.rows, [[Value::Integer(7)]]);
        assert!(matches!(exec(&db, "SELECT :name", &[Value::Null]), Err(SqlError::Invalid(m)) if m.contains(":name")));
    }

    #[test]
    fn one_statement_per_call() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        for sql in [
            "SELECT 1; SELECT 2",
            "SELECT 1;DROP TABLE t",
            "SELECT 1; ATTACH 'x.db' AS x",
            "SELECT 1; PRAGMA writable_schema=1",
            "SELECT 1; this is not sql",
            "SELECT 1; ; DELETE FROM t",
            "SELECT 1 -- comment\n; VACUUM",
            "INSERT INTO t (name) VALUES ('c'); DELETE FROM t",
        ] {
            assert_eq!(exec(&db, sql, &[]), Err(SqlError::MultipleStatements), "{sql}");
        }
        assert_eq!(count(&db, "t"), 2, "nothing in or before a refused tail ran");
        for sql in ["SELECT 1;", "SELECT 1; -- trailing", "SELECT 1 /* c */ ;  /* more */ \n", "SELECT 1;;", "-- lead\nSELECT 1"] {
            assert_eq!(exec(&db, sql, &[]).unwrap().rows, [[Value::Integer(1)]], "{sql}");
        }
        for sql in ["", "   ", "-- nothing", "/* nothing */ ;"] {
            assert_eq!(exec(&db, sql, &[]), Err(SqlError::Empty), "{sql:?}");
        }
        assert!(matches!(exec(&db, "SELECT 1\0; DROP TABLE t", &[]), Err(SqlError::Invalid(_))));
    }

    #[test]
    fn attach_and_detach_are_denied() {
        let (dir, dbs) = setup();
        let db = with_table(&dbs);
        let other = dir.path().join("other.db");
        denied(exec(&db, &format!("ATTACH '{}' AS o", other.display()), &[]), "ATTACH");
        denied(exec(&db, "ATTACH ? AS o", &[text(&other.display().to_string())]), "ATTACH");
        denied(exec(&db, "ATTACH DATABASE ':memory:' AS m", &[]), "ATTACH");
        denied(exec(&db, "DETACH o", &[]), "DETACH");
        denied(exec(&db, "DETACH ?", &[text("main")]), "DETACH");
        assert!(!other.exists());
    }

    #[test]
    fn extension_loading_is_denied() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        denied(exec(&db, "SELECT load_extension('x')", &[]), "load_extension");
        denied(exec(&db, "SELECT LOAD_EXTENSION(?, 'entry')", &[text("/tmp/x.so")]), "load_extension");
        denied(exec(&db, "SELECT fts3_tokenizer('simple')", &[]), "fts3_tokenizer");
        // Through the schema: a trigger or a default is compiled into the
        // statement that uses it, and checked then (a default is refused by
        // trusted_schema=OFF, a trigger body by the authorizer).
        exec(&db, "CREATE TABLE x (a DEFAULT (load_extension('x')))", &[]).unwrap();
        let default = exec(&db, "INSERT INTO x DEFAULT VALUES", &[]);
        assert!(matches!(default, Err(SqlError::Invalid(ref m)) if m.contains("unsafe use of load_extension")), "{default:?}");
        assert_eq!(count(&db, "x"), 0);
        exec(&db, "CREATE TRIGGER t_ext AFTER INSERT ON t BEGIN SELECT load_extension('x'); END", &[]).unwrap();
        denied(exec(&db, "INSERT INTO t (name) VALUES ('c')", &[]), "load_extension");
        assert_eq!(count(&db, "t"), 2);
    }

    #[test]
    fn pragmas_are_denied_except_schema_introspection() {
        let (dir, dbs) = setup();
        let db = with_table(&dbs);
        denied(exec(&db, "PRAGMA writable_schema=1", &[]), "PRAGMA writable_schema");
        denied(exec(&db, "PRAGMA journal_mode=DELETE", &[]), "PRAGMA journal_mode");
        denied(exec(&db, "PRAGMA Synchronous = OFF", &[]), "PRAGMA synchronous");
        denied(exec(&db, "PRAGMA query_only=1", &[]), "PRAGMA query_only");
        denied(exec(&db, "PRAGMA main.trusted_schema=ON", &[]), "PRAGMA trusted_schema");
        denied(exec(&db, "PRAGMA foreign_keys=OFF", &[]), "PRAGMA foreign_keys");
        denied(exec(&db, "PRAGMA journal_mode", &[]), "PRAGMA journal_mode");
        denied(exec(&db, "SELECT * FROM pragma_compile_options", &[]), "PRAGMA compile_options");

        let info = exec(&db, "PRAGMA table_info(t)", &[]).unwrap();
        assert_eq!(info.rows.len(), 2);
        assert!(info.columns.contains(&"name".to_owned()));
        assert_eq!(ro(&db, "PRAGMA table_info('t')").unwrap().rows.len(), 2);
        let names = exec(&db, "SELECT name FROM pragma_table_info('t') ORDER BY cid", &[]).unwrap();
        assert_eq!(names.rows, [[text("id")], [text("name")]]);
        exec(&db, "PRAGMA index_list(t)", &[]).unwrap();
        exec(&db, "PRAGMA foreign_key_list(t)", &[]).unwrap();

        // The refused pragmas changed nothing.
        drop(db);
        drop(dbs);
        let raw = Connection::open(dir.path().join("sql/acme/main.sqlite3")).unwrap();
        let mode: String = raw.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn transaction_control_is_denied() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        for sql in ["BEGIN", "BEGIN IMMEDIATE", "COMMIT", "END", "ROLLBACK", "SAVEPOINT s", "RELEASE s", "ROLLBACK TO s"] {
            denied(exec(&db, sql, &[]), "transaction control");
        }
        let batch = db.batch(&[("DELETE FROM t".to_owned(), vec![]), ("COMMIT".to_owned(), vec![])], false, &limits());
        assert!(matches!(batch, Err((1, SqlError::Denied { .. }))), "{batch:?}");
        assert_eq!(count(&db, "t"), 2);
    }

    #[test]
    fn schema_table_and_risky_objects_are_denied() {
        let (dir, dbs) = setup();
        let db = with_table(&dbs);
        denied(exec(&db, "UPDATE sqlite_master SET sql = 'CREATE TABLE t (x)' WHERE name = 't'", &[]), "sqlite_schema");
        denied(exec(&db, "DELETE FROM sqlite_schema", &[]), "sqlite_schema");
        denied(exec(&db, "INSERT INTO sqlite_master VALUES ('table', 'x', 'x', 0, 'CREATE TABLE x (a)')", &[]), "sqlite_schema");
        denied(exec(&db, "CREATE TEMP TABLE scratch (a)", &[]), "temporary");
        denied(exec(&db, "CREATE TEMP TRIGGER tr AFTER INSERT ON t BEGIN DELETE FROM t; END", &[]), "temporary");
        denied(exec(&db, "CREATE VIRTUAL TABLE r USING rtree(id, x0, x1)", &[]), "rtree");
        denied(exec(&db, "CREATE VIRTUAL TABLE s USING dbstat", &[]), "dbstat");
        denied(exec(&db, "VACUUM", &[]), "VACUUM");
        let copy = dir.path().join("copy.db");
        denied(exec(&db, &format!("/* x */ vacuum INTO '{}'", copy.display()), &[]), "VACUUM");
        assert!(!copy.exists());
        assert_eq!(count(&db, "t"), 2);
        // Reading the schema is fine.
        let tables = exec(&db, "SELECT name FROM sqlite_schema WHERE type = 'table'", &[]).unwrap();
        assert_eq!(tables.rows, [[text("t")]]);
    }

    #[test]
    fn ordinary_schema_features_work() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        exec(&db, "CREATE INDEX t_name ON t (name)", &[]).unwrap();
        exec(&db, "CREATE VIEW names AS SELECT name FROM t", &[]).unwrap();
        exec(&db, "CREATE TABLE log (msg TEXT)", &[]).unwrap();
        exec(&db, "CREATE TRIGGER t_log AFTER INSERT ON t BEGIN INSERT INTO log VALUES (new.name); END", &[]).unwrap();
        exec(&db, "INSERT INTO t (name) VALUES ('c')", &[]).unwrap();
        assert_eq!(count(&db, "log"), 1);
        assert_eq!(count(&db, "names"), 3);
        exec(&db, "ALTER TABLE log ADD COLUMN at INTEGER", &[]).unwrap();
        exec(&db, "CREATE VIRTUAL TABLE docs USING fts5(body)", &[]).unwrap();
        exec(&db, "INSERT INTO docs (body) VALUES (?)", &[text("the quick brown fox")]).unwrap();
        let hits = exec(&db, "SELECT body FROM docs WHERE docs MATCH ?", &[text("quick")]).unwrap();
        assert_eq!(hits.rows.len(), 1);
        assert_eq!(db.execute("SELECT body FROM docs WHERE docs MATCH 'fox'", &[], true, &limits()).unwrap().rows.len(), 1);
        assert_eq!(ro(&db, "INSERT INTO docs (body) VALUES ('x')"), Err(SqlError::ReadOnly));
        // Shadow tables are read-only to SQL (SQLITE_DBCONFIG_DEFENSIVE).
        assert!(exec(&db, "DELETE FROM docs_data", &[]).is_err());
        exec(&db, "DROP TABLE docs", &[]).unwrap();
        exec(&db, "ANALYZE", &[]).unwrap();
        exec(&db, "DROP VIEW names", &[]).unwrap();
    }

    #[test]
    fn read_only_refuses_writes_and_allows_reads() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        for sql in [
            "INSERT INTO t (name) VALUES ('x')",
            "INSERT INTO t (name) VALUES ('x') RETURNING id",
            "UPDATE t SET name = 'x'",
            "DELETE FROM t",
            "CREATE TABLE u (a)",
            "CREATE INDEX t_name ON t (name)",
            "DROP TABLE t",
            "ALTER TABLE t ADD COLUMN c",
            "REPLACE INTO t (id, name) VALUES (1, 'x')",
        ] {
            assert_eq!(ro(&db, sql), Err(SqlError::ReadOnly), "{sql}");
        }
        let all = ro(&db, "SELECT name FROM t ORDER BY id").unwrap();
        assert_eq!(all.rows, [[text("a")], [text("b")]]);
        let batch = db.batch(
            &[("SELECT count(*) FROM t".to_owned(), vec![]), ("DELETE FROM t WHERE id = ?".to_owned(), vec![Value::Integer(1)])],
            true,
            &limits(),
        );
        assert_eq!(batch, Err((1, SqlError::ReadOnly)));
        assert_eq!(count(&db, "t"), 2);
        let names = exec(&db, "SELECT group_concat(name) FROM t", &[]).unwrap();
        assert_eq!(names.rows, [[text("a,b")]]);
    }

    #[test]
    fn timeout_interrupts_a_runaway_statement() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        let limits = SqlLimits { statement_timeout: Duration::from_millis(100), ..SqlLimits::default() };
        // On another thread, so that a missing interrupt fails the test
        // instead of hanging it.
        let (done, result) = std::sync::mpsc::channel();
        let runner = Arc::clone(&db);
        let runner_limits = limits.clone();
        std::thread::spawn(move || {
            let forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";
            let _ = done.send(runner.execute(forever, &[], false, &runner_limits));
        });
        let result = result.recv_timeout(Duration::from_secs(10)).expect("the statement was not interrupted");
        assert_eq!(result, Err(SqlError::Timeout { ms: 100 }));
        // A runaway write is rolled back and the connection stays usable.
        let writes = "INSERT INTO t (name) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT 'n' || x FROM c";
        assert_eq!(db.execute(writes, &[], false, &limits), Err(SqlError::Timeout { ms: 100 }));
        assert_eq!(count(&db, "t"), 2);
        assert!(SqlError::Timeout { ms: 100 }.to_string().contains("limits.sql_statement_timeout_ms"));
    }

    #[test]
    fn a_batchs_results_stop_at_the_requests_memory_limit_while_they_are_read() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        let budget = || cordon_memory::Budget::new(1 << 30);
        let account = std::sync::Arc::new(cordon_memory::Account::new(3 << 20, budget(), budget()));
        let limits = SqlLimits { result_memory: Some(account.clone()), ..SqlLimits::default() };
        // Each statement is within max_result_bytes (4 MiB); together they
        // are not within the request's 3 MiB.
        let one = ("SELECT zeroblob(1048576)".to_string(), Vec::new());
        let sets = db.batch(&[one.clone(), one.clone()], true, &limits).unwrap();
        assert_eq!(sets.len(), 2);
        assert!(account.used() >= 2 << 20, "the results are charged");
        account.release(account.used());
        let e = db.batch(&vec![one; 4], true, &limits).unwrap_err();
        assert_eq!(e, (2, SqlError::OverMemory(cordon_memory::OverBudget::Request { limit: 3 << 20 })));
        assert!(e.1.to_string().contains("more than its memory limit of 3 MiB"), "{}", e.1);
    }

    #[test]
    fn row_and_byte_limits_stop_reading() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        let series = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) SELECT x FROM c";
        let five = SqlLimits { max_rows: 5, ..SqlLimits::default() };
        assert_eq!(db.execute(series, &[Value::Integer(5)], false, &five).unwrap().rows.len(), 5);
        assert_eq!(db.execute(series, &[Value::Integer(6)], false, &five), Err(SqlError::TooManyRows { max: 5 }));
        assert_eq!(db.execute(series, &[Value::Integer(1_000_000_000)], false, &five), Err(SqlError::TooManyRows { max: 5 }));

        let small = SqlLimits { max_result_bytes: 1000, ..SqlLimits::default() };
        assert_eq!(db.execute("SELECT zeroblob(900)", &[], false, &small).unwrap().rows[0][0], Value::Blob(vec![0; 900]));
        assert_eq!(db.execute("SELECT randomblob(1000)", &[], false, &small), Err(SqlError::ResultTooLarge { max: 1000 }));
        // Many small values add up too.
        assert_eq!(db.execute(series, &[Value::Integer(200)], false, &small), Err(SqlError::ResultTooLarge { max: 1000 }));
        assert!(SqlError::TooManyRows { max: 5 }.to_string().contains("limits.max_sql_rows"));
        assert!(SqlError::ResultTooLarge { max: 5 }.to_string().contains("limits.max_sql_result_bytes"));
    }

    #[test]
    fn statement_length_and_param_limits() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        let tight = SqlLimits { max_statement_bytes: 20, max_params: 2, ..SqlLimits::default() };
        let long = "SELECT 1 + 1 + 1 + 1 + 1";
        assert_eq!(db.execute(long, &[], false, &tight), Err(SqlError::StatementTooLong { len: long.len(), max: 20 }));
        let three = [Value::Integer(1), Value::Integer(2), Value::Integer(3)];
        assert_eq!(db.execute("SELECT ?, ?, ?", &three, false, &tight), Err(SqlError::TooManyParams { got: 3, max: 2 }));
        assert_eq!(db.execute("SELECT ?, ?", &three[..2], false, &tight).unwrap().rows.len(), 1);
        // A parameter number past the limit is refused by SQLite itself.
        assert!(matches!(db.execute("SELECT ?3", &[], false, &tight), Err(SqlError::Invalid(_))));
        // Values are bounded by SQLITE_LIMIT_LENGTH.
        let big = Value::Blob(vec![1; 8 * 1024 * 1024]);
        assert!(matches!(exec(&db, "INSERT INTO t (name) VALUES (?)", &[big]), Err(SqlError::Invalid(m)) if m.contains("too big")));
        assert!(matches!(exec(&db, "SELECT length(zeroblob(100000000))", &[]), Err(SqlError::Invalid(m)) if m.contains("too big")));
    }

    #[test]
    fn failed_statements_leave_no_partial_writes() {
        let (_dir, dbs) = setup();
        let db = dbs.open("acme", "main").unwrap();
        exec(&db, "CREATE TABLE u (x UNIQUE)", &[]).unwrap();
        exec(&db, "INSERT INTO u VALUES (3)", &[]).unwrap();
        // OR FAIL keeps the rows inserted before the failing one, unless the
        // host's transaction rolls them back.
        let partial = exec(&db, "INSERT OR FAIL INTO u SELECT column1 FROM (VALUES (1), (2), (3))", &[]);
        assert!(matches!(partial, Err(SqlError::Constraint(ref m)) if m.contains("UNIQUE")), "{partial:?}");
        assert_eq!(count(&db, "u"), 1);
        // RETURNING writes everything on the first step; stopping at the row
        // limit must not keep those writes.
        let two = SqlLimits { max_rows: 2, ..SqlLimits::default() };
        let returning = db.execute("INSERT INTO u SELECT column1 FROM (VALUES (10), (11), (12)) RETURNING x", &[], false, &two);
        assert_eq!(returning, Err(SqlError::TooManyRows { max: 2 }));
        assert_eq!(count(&db, "u"), 1);
        // Deferred foreign keys fail at COMMIT, which rolls back too.
        exec(&db, "CREATE TABLE p (id INTEGER PRIMARY KEY)", &[]).unwrap();
        exec(&db, "CREATE TABLE c (pid REFERENCES p (id) DEFERRABLE INITIALLY DEFERRED)", &[]).unwrap();
        assert!(matches!(exec(&db, "INSERT INTO c VALUES (5)", &[]), Err(SqlError::Constraint(m)) if m.contains("FOREIGN KEY")));
        assert_eq!(count(&db, "c"), 0);
    }

    #[test]
    fn errors_are_classified() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        assert!(
            matches!(exec(&db, "INSERT INTO t (id, name) VALUES (1, 'dup')", &[]), Err(SqlError::Constraint(m)) if m.contains("UNIQUE"))
        );
        assert!(matches!(exec(&db, "INSERT INTO t (name) VALUES (NULL)", &[]), Err(SqlError::Constraint(m)) if m.contains("NOT NULL")));
        assert!(matches!(exec(&db, "SELEC 1", &[]), Err(SqlError::Invalid(m)) if m.contains("syntax")));
        assert!(matches!(exec(&db, "SELECT * FROM missing", &[]), Err(SqlError::Invalid(m)) if m.contains("no such table")));
    }

    #[test]
    fn batch_is_atomic() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        let batch = |statements: &[(&str, Vec<Value>)]| {
            let owned: Vec<(String, Vec<Value>)> = statements.iter().map(|(s, p)| ((*s).to_owned(), p.clone())).collect();
            db.batch(&owned, false, &limits())
        };
        let failed = batch(&[("INSERT INTO t (name) VALUES (?)", vec![text("c")]), ("INSERT INTO t (name) VALUES (NULL)", vec![])]);
        assert!(matches!(failed, Err((1, SqlError::Constraint(_)))), "{failed:?}");
        assert_eq!(count(&db, "t"), 2);
        let failed = batch(&[("DELETE FROM t", vec![]), ("SELECT 1; SELECT 2", vec![])]);
        assert_eq!(failed, Err((1, SqlError::MultipleStatements)));
        assert_eq!(count(&db, "t"), 2);

        let ok = batch(&[
            ("CREATE TABLE k (v)", vec![]),
            ("INSERT INTO k VALUES (?)", vec![Value::Integer(1)]),
            ("INSERT INTO k VALUES (?)", vec![Value::Integer(2)]),
            ("SELECT sum(v) FROM k", vec![]),
        ])
        .unwrap();
        assert_eq!(ok.len(), 4);
        assert_eq!(ok[2].last_insert_rowid, Some(2));
        assert_eq!(ok[3].rows, [[Value::Integer(3)]]);
        assert_eq!(db.batch(&[], false, &limits()), Ok(Vec::new()));
    }

    #[test]
    fn tenants_are_isolated_and_handles_shared() {
        let (dir, dbs) = setup();
        let a = dbs.open("alpha", "shop").unwrap();
        let b = dbs.open("beta", "shop").unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&a, &dbs.open("alpha", "shop").unwrap()));
        exec(&a, "CREATE TABLE s (v)", &[]).unwrap();
        exec(&a, "INSERT INTO s VALUES ('alpha')", &[]).unwrap();
        assert!(matches!(exec(&b, "SELECT * FROM s", &[]), Err(SqlError::Invalid(_))));
        assert!(dir.path().join("sql/alpha/shop.sqlite3").is_file());
        assert!(dir.path().join("sql/beta/shop.sqlite3").is_file());
    }

    #[test]
    fn invalid_names_are_refused() {
        let (dir, dbs) = setup();
        for (tenant, database) in [("..", "db"), ("acme", "../x"), ("a/b", "db"), ("", "db"), ("Acme", "db"), ("acme", "x.sqlite3")] {
            assert!(matches!(dbs.open(tenant, database), Err(SqlError::InvalidName { .. })), "{tenant}/{database}");
        }
        assert!(!dir.path().join("sql").exists());
    }

    #[test]
    fn data_survives_reopening() {
        let (dir, dbs) = setup();
        let db = with_table(&dbs);
        drop(db);
        drop(dbs);
        let dbs = Databases::new(dir.path().join("sql"));
        let db = dbs.open("acme", "main").unwrap();
        assert_eq!(count(&db, "t"), 2);
    }

    #[test]
    fn files_are_private() {
        let (dir, dbs) = setup();
        let _db = with_table(&dbs);
        let mode = |p: &str| fs::metadata(dir.path().join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("sql/acme/main.sqlite3"), 0o600);
        assert_eq!(mode("sql/acme/main.sqlite3-wal"), 0o600);
        assert_eq!(mode("sql/acme"), 0o700);
        assert_eq!(mode("sql"), 0o700);
    }

    #[test]
    fn poisoned_lock_is_recovered_and_transaction_rolled_back() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        let poisoner = Arc::clone(&db);
        let joined = std::thread::spawn(move || {
            let conn = poisoner.conn.lock().unwrap();
            conn.host("BEGIN IMMEDIATE").unwrap();
            conn.host("DELETE FROM t").unwrap();
            panic!("poison the lock mid-transaction");
        })
        .join();
        assert!(joined.is_err());
        assert_eq!(count(&db, "t"), 2);
        exec(&db, "INSERT INTO t (name) VALUES ('c')", &[]).unwrap();
        assert_eq!(count(&db, "t"), 3);
    }

    /// A batch that creates a view over a `CASE` of `whens` branches and
    /// `levels` views each reading the one below twice, through scalar
    /// subqueries, then reads the last: SQLite expands 2^levels copies of
    /// the `CASE` while it prepares.
    fn view_bomb(whens: usize, levels: usize) -> Vec<(String, Vec<Value>)> {
        let case: String = (0..whens).map(|i| format!(" WHEN {i} THEN 'v{i}'")).collect();
        let mut batch = vec![
            ("CREATE TABLE IF NOT EXISTS bomb (x INTEGER)".to_owned(), vec![]),
            (format!("CREATE VIEW v0 AS SELECT CASE x{case} ELSE 'none' END AS c FROM bomb"), vec![]),
        ];
        for i in 1..=levels {
            let below = i - 1;
            batch.push((format!("CREATE VIEW v{i} AS SELECT (SELECT c FROM v{below}) || (SELECT c FROM v{below} LIMIT 1) AS c"), vec![]));
        }
        batch.push((format!("SELECT c FROM v{levels}"), vec![]));
        batch
    }

    fn pool() -> BlockingPool {
        BlockingPool::new(PoolConfig { name: "sql-test", threads: 2, tenant_threads: 2, queue: 8, tenant_queue: 8 })
    }

    #[test]
    fn size_limits_are_set_on_every_connection_and_refuse_with_clear_errors() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        {
            let conn = db.lock();
            for &(limit, value) in TENANT_LIMITS {
                assert_eq!(conn.conn.limit(limit).unwrap(), value, "{limit:?}");
            }
        }
        let invalid = |sql: &str, needle: &str| match exec(&db, sql, &[]) {
            Err(SqlError::Invalid(m)) => assert!(m.contains(needle), "{m} does not mention {needle}"),
            other => panic!("{needle}: {other:?}"),
        };
        invalid(&format!("SELECT 1{}", " + 1".repeat(150)), "maximum depth 100");
        invalid(&format!("SELECT 1{}", " UNION ALL SELECT 1".repeat(60)), "too many terms in compound SELECT");
        let columns: Vec<String> = (0..1001).map(|i| format!("c{i}")).collect();
        invalid(&format!("CREATE TABLE wide ({})", columns.join(", ")), "too many columns");
        let args: Vec<String> = (0..101).map(|i| i.to_string()).collect();
        invalid(&format!("SELECT max({})", args.join(", ")), "too many arguments");
        invalid(&format!("SELECT 'a' LIKE '{}'", "a".repeat(1001)), "pattern too complex");
        invalid(&format!("SELECT 'a' GLOB '{}'", "a".repeat(1001)), "pattern too complex");
        // Nested subqueries add up to the expression depth too.
        let mut nested = "SELECT 1".to_owned();
        for _ in 0..60 {
            nested = format!("SELECT ({nested}) + 1");
        }
        invalid(&nested, "maximum depth 100");
        // Ordinary statements are far from every limit.
        assert_eq!(
            exec(&db, "SELECT 'abc' LIKE 'a%', 'abc' GLOB 'a*', instr('abc', 'c'), replace('abc', 'b', 'x')", &[]).unwrap().rows,
            [[Value::Integer(1), Value::Integer(1), Value::Integer(3), text("axc")]]
        );
        assert_eq!(count(&db, "t"), 2);
    }

    /// Run in a process of its own (as nextest does), the per-call budget
    /// is in force; otherwise the program-size limit and the watchdog still
    /// stop the bomb. Either way it fails fast, with a clear error, and
    /// the connection keeps working.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nested_views_over_a_large_case_fail_fast_within_their_memory_budget() {
        let memory = crate::memory::limit_memory(512 << 20);
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        let pool = pool();
        for (whens, levels) in [(2000, 24), (200, 30), (20, 40)] {
            // SAFETY: resetting SQLite's process-wide high-water mark only
            // writes one counter under its mutex.
            unsafe { ffi::sqlite3_memory_highwater(1) };
            let t = Instant::now();
            let runner = Arc::clone(&db);
            let result = pool
                .spawn("acme", move |job| runner.batch_job(Some(job), &view_bomb(whens, levels), false, &SqlLimits::default()))
                .unwrap()
                .await
                .unwrap()
                .value;
            let took = t.elapsed();
            // SAFETY: reads one counter under SQLite's mutex.
            let highwater = unsafe { ffi::sqlite3_memory_highwater(0) };
            let error = result.expect_err("the bomb must fail").1;
            eprintln!("({whens}, {levels}): {error:?} after {took:?}, SQLite's memory peaked at {} MiB", highwater >> 20);
            assert!(matches!(error, SqlError::TooComplex | SqlError::Timeout { ms: 1000 }), "{error:?}");
            assert!(took < Duration::from_millis(2500), "({whens}, {levels}) took {took:?}");
            if memory.budgets {
                assert!(highwater < 128 << 20, "SQLite's memory reached {} MiB", highwater >> 20);
            }
            assert!(error.to_string().contains("limits.sql_statement_timeout_ms") || error.to_string().contains("nested views"));
        }
        assert_eq!(count(&db, "t"), 2);
        assert!(exec(&db, "SELECT count(*) FROM sqlite_schema WHERE type = 'view'", &[]).unwrap().rows == [[Value::Integer(0)]]);
    }

    /// Without a memory budget, the watchdog's interrupt stops the bomb
    /// while SQLite prepares it, near the statement timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_watchdog_stops_a_statement_while_it_is_prepared() {
        crate::memory::limit_memory(1 << 30);
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        let pool = pool();
        let limits = SqlLimits { statement_timeout: Duration::from_millis(500), max_memory_bytes: usize::MAX / 2, ..SqlLimits::default() };
        for (whens, levels) in [(2000, 24), (200, 30), (20, 40)] {
            // SAFETY: resetting SQLite's process-wide high-water mark only
            // writes one counter under its mutex.
            unsafe { ffi::sqlite3_memory_highwater(1) };
            let t = Instant::now();
            let runner = Arc::clone(&db);
            let batch_limits = limits.clone();
            let result = pool
                .spawn("acme", move |job| runner.batch_job(Some(job), &view_bomb(whens, levels), false, &batch_limits))
                .unwrap()
                .await
                .unwrap()
                .value;
            let took = t.elapsed();
            // SAFETY: reads one counter under SQLite's mutex.
            let highwater = unsafe { ffi::sqlite3_memory_highwater(0) };
            let error = result.expect_err("the bomb must fail").1;
            eprintln!("({whens}, {levels}): {error:?} after {took:?}, SQLite's memory peaked at {} MiB", highwater >> 20);
            assert!(matches!(error, SqlError::TooComplex | SqlError::Timeout { ms: 500 }), "{error:?}");
            assert!(took < Duration::from_millis(2000), "({whens}, {levels}) took {took:?}");
        }
        assert_eq!(count(&db, "t"), 2);
    }

    #[test]
    fn a_long_function_call_stops_at_the_statement_timeout() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        let limits = SqlLimits { statement_timeout: Duration::from_millis(300), ..SqlLimits::default() };
        for sql in [
            "SELECT printf('%.*c', 4000000, 'a') LIKE ('%' || printf('%.*c', 990, 'a') || 'b')",
            "SELECT printf('%.*c', 4000000, 'a') GLOB ('*' || printf('%.*c', 990, 'a') || 'b')",
            "SELECT printf('%.*c', 4000000, 'a') LIKE ('%' || printf('%.*c', 400, '_') || 'b') ESCAPE '!'",
        ] {
            let t = Instant::now();
            assert_eq!(db.execute(sql, &[], true, &limits), Err(SqlError::Timeout { ms: 300 }), "{sql}");
            assert!(t.elapsed() < Duration::from_millis(1300), "{sql} took {:?}", t.elapsed());
        }
        let t = Instant::now();
        let found = db.execute("SELECT instr(printf('%.*c', 4000000, 'a'), printf('%.*c', 1000000, 'a') || 'b')", &[], true, &limits);
        assert_eq!(found.unwrap().rows, [[Value::Integer(0)]]);
        assert!(t.elapsed() < Duration::from_millis(1300), "{:?}", t.elapsed());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_job_interrupts_its_statement_and_the_connection_is_free_again() {
        let (_dir, dbs) = setup();
        let db = with_table(&dbs);
        let pool = pool();
        let forever = SqlLimits { statement_timeout: Duration::from_secs(600), ..SqlLimits::default() };
        let runner = Arc::clone(&db);
        let job = pool
            .spawn("acme", move |job| {
                let sql = "INSERT INTO t (name) SELECT 'n' || x FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c)";
                runner.execute_job(Some(job), sql, &[], false, &forever)
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(pool.stats().running, 1);
        let t = Instant::now();
        drop(job);
        let runner = Arc::clone(&db);
        let next = pool.spawn("acme", move |job| runner.execute_job(Some(job), "SELECT count(*) FROM t", &[], true, &limits())).unwrap();
        let rows = tokio::time::timeout(Duration::from_secs(5), next).await.expect("the connection was freed").unwrap().value.unwrap();
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // The interrupted insert was rolled back.
        assert_eq!(rows.rows, [[Value::Integer(2)]]);
        // A statement whose job was stopped before it began does not run.
        let runner = Arc::clone(&db);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let job = pool
            .spawn("acme", move |job| {
                started_tx.send(()).unwrap();
                let _ = go_rx.recv_timeout(Duration::from_secs(5));
                runner.execute_job(Some(job), "INSERT INTO t (name) VALUES ('late')", &[], false, &limits())
            })
            .unwrap();
        started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        drop(job);
        go_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(count(&db, "t"), 2);
    }

    #[test]
    fn first_keyword_skips_comments() {
        assert_eq!(first_keyword("  -- x\n /* y */ VACUUM INTO 'f'"), "VACUUM");
        assert_eq!(first_keyword("select 1"), "select");
        assert_eq!(first_keyword("/* unterminated"), "");
        assert_eq!(first_keyword(""), "");
    }
}
