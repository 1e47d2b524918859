//! The storage half of the key-value binding: SQLite-backed namespaces.
//!
//! Every (tenant, namespace) pair is its own SQLite file,
//! `<root>/<tenant>/<namespace>.sqlite3`. Separate files mean that no query
//! can ever reach another tenant's rows (there is no `WHERE tenant = ?` to
//! forget), that a busy namespace never holds a lock anybody else waits on,
//! and that an operator can back up or delete one namespace by copying or
//! removing one file.
//!
//! # Durability
//!
//! A write returns only after its transaction is committed with
//! `journal_mode=WAL` and `synchronous=FULL`, which fsyncs the WAL on every
//! commit: once `set` returns, a crash or a power cut cannot lose the value.
//!
//! # Expiry
//!
//! Entries with a TTL stay on disk until purged, but every read filters them
//! out by their `expires_at`, so an expired entry is never visible. They are
//! purged when a namespace is opened (all of them) and by every write (a few
//! of them, inside the write's own transaction): each write removes up to
//! [`PURGE_PER_WRITE`] expired entries while it can create at most a batch of
//! new ones, so expired entries cannot pile up while a namespace is in use,
//! and no single write stalls on a large purge.
//!
//! # Disk quota
//!
//! A namespace's file counts towards its tenant's storage quota, together
//! with the tenant's other namespaces and its SQL databases (see
//! `cordon-disk` for the scheme). Every write takes the tenant's write
//! turn, runs with the file's `max_page_count` set to what the quota and
//! the free-space reserve still allow, and fails with
//! [`KvError::Disk`] (`storage_quota_exceeded` or `storage_disk_full`) when
//! SQLite needs more; reads never check anything, and deletes may go a
//! little past the quota ([`WriteKind::Shrink`]). After a delete the freed
//! pages are given back to the file system, in the same job. A list page
//! that writes a cursor may grow the file by [`LIST_CURSOR_HEADROOM`]
//! whatever the quota, because listing is a read to the guest; cursors are
//! bounded by [`MAX_CURSORS`].
//!
//! # Blocking work
//!
//! Every method blocks; the host runs them on the key-value pool
//! ([`Namespaces::pool`]). Run as a job of that pool, a method arms the
//! job's interrupt on its connection once it holds the connection's lock,
//! so a call whose request ended stops at SQLite's next check instead of
//! finishing for nobody, and removes it before it lets go of the lock, so
//! the interrupt never reaches another call. The connections carry the
//! same size bounds as SQL databases ([`CONNECTION_LIMITS`]), although
//! every statement here is the host's own.
//!
//! # List cursors
//!
//! A cursor is the id of a row in the namespace's `list_cursors` table that
//! holds the last key of the page it ended. The next page resumes strictly
//! after that key, so keys added or removed between pages (the last returned
//! key included) never make the listing skip or repeat a key that existed
//! throughout; an offset would shift under every insert or delete before it.
//! Each page gets a new cursor row and a row is never changed, so a guest
//! that retries a page gets the same page again. Ids come from
//! `AUTOINCREMENT` and are never reused, so a stale cursor is refused instead
//! of silently resuming somewhere else. Cursors are kept for
//! [`CURSOR_TTL`], and at most [`MAX_CURSORS`] per namespace (the oldest go
//! first), so abandoned listings cost a bounded amount of disk.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, DirBuilder, Permissions};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cordon_blocking::{BlockingPool, JobContext, PoolConfig, StopReason};
use cordon_disk::{Account, DiskError, Ledger, WriteKind, sqlite as disk};
use rusqlite::config::DbConfig;
use rusqlite::limits::Limit;
use rusqlite::types::Value;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params, params_from_iter};

/// The key limit, which is not configurable; methods that take no
/// [`KvLimits`] (the reads, `delete`, `increment`) check keys against it.
pub const DEFAULT_MAX_KEY_BYTES: usize = 512;

/// How long a list cursor stays valid: long enough for a slow guest to page
/// through a large namespace, short enough that abandoned cursors go away.
pub const CURSOR_TTL: Duration = Duration::from_secs(60 * 60);

/// Cursors kept per namespace; past it the oldest are dropped, so a guest
/// that lists in a loop cannot grow the file without bound.
pub const MAX_CURSORS: i64 = 10_000;

/// Bytes a list page may add to the file for its cursor, over the quota
/// too (see the module docs): a cursor row is at most a key and two
/// integers.
pub const LIST_CURSOR_HEADROOM: u64 = 64 * 1024;

/// Expired entries one write purges, see the module docs.
pub const PURGE_PER_WRITE: i64 = 16;

/// How long a write waits for another connection to the same file (another
/// Cordon process, or a backup tool) before it fails with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds on what one statement may make SQLite build or hold. The
/// statements are the host's own and small; the value length allows the
/// largest `max_kv_value_bytes` the config accepts.
pub const CONNECTION_LIMITS: &[(Limit, i32)] = &[
    (Limit::SQLITE_LIMIT_LENGTH, (64 << 20) + (1 << 20)),
    (Limit::SQLITE_LIMIT_SQL_LENGTH, 10_000),
    (Limit::SQLITE_LIMIT_EXPR_DEPTH, 100),
    (Limit::SQLITE_LIMIT_COMPOUND_SELECT, 50),
    (Limit::SQLITE_LIMIT_COLUMN, 100),
    (Limit::SQLITE_LIMIT_VARIABLE_NUMBER, 100),
    (Limit::SQLITE_LIMIT_FUNCTION_ARG, 100),
    (Limit::SQLITE_LIMIT_ATTACHED, 0),
    (Limit::SQLITE_LIMIT_TRIGGER_DEPTH, 10),
    (Limit::SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 1000),
    (Limit::SQLITE_LIMIT_VDBE_OP, 250_000),
    (Limit::SQLITE_LIMIT_WORKER_THREADS, 0),
];

/// The key-value pool's default size. One namespace serves one call at a
/// time, so a tenant gains little from more than two threads.
pub const DEFAULT_POOL: PoolConfig = PoolConfig { name: "kv", threads: 8, tenant_threads: 2, queue: 4096, tenant_queue: 256 };

/// The schema this code writes, in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

/// `STRICT` so that a key bound as TEXT by mistake fails loudly instead of
/// being stored under a different type that compares differently: keys are
/// BLOBs so that `ORDER BY key` and the prefix range are plain byte order.
const SCHEMA: &str = "
    CREATE TABLE kv (
        key BLOB PRIMARY KEY NOT NULL,
        value BLOB NOT NULL,
        expires_at INTEGER
    ) WITHOUT ROWID, STRICT;
    CREATE INDEX kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE list_cursors (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        after BLOB NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;
";

/// SQL for "this row has not expired", with the current time as `?now`.
const LIVE: &str = "(expires_at IS NULL OR expires_at > :now)";

/// Limits one operation is checked against; the runtime builds them from the
/// worker's `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLimits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Keys one `list` page returns.
    pub max_list_keys: usize,
}

impl Default for KvLimits {
    fn default() -> Self {
        Self { max_key_bytes: DEFAULT_MAX_KEY_BYTES, max_value_bytes: 1024 * 1024, max_list_keys: 1000 }
    }
}

/// Why a key-value operation failed. Everything but `Storage` is the guest's
/// doing and says how to fix the call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("the key is {len} bytes; keys may be at most {max} bytes")]
    KeyTooLong { len: usize, max: usize },
    #[error("the key is empty; keys must be at least 1 byte")]
    EmptyKey,
    #[error("the value is {len} bytes; values may be at most {max} bytes (limits.max_kv_value_bytes)")]
    ValueTooLarge { len: usize, max: usize },
    #[error("invalid {what} name {name:?}: use 1 to 63 characters from a-z, 0-9, `_` and `-`")]
    InvalidName { what: &'static str, name: String },
    #[error("the value of key {key:?} is not a decimal number from 0 to 18446744073709551615, so it cannot be incremented")]
    NotANumber { key: String },
    #[error("incrementing key {key:?} would make it larger than 18446744073709551615")]
    Overflow { key: String },
    /// Its own variant because a stale cursor is the guest's to fix (by
    /// listing again), not a storage failure for the operator to look at.
    #[error("list cursor {cursor} is unknown or has expired (cursors last {} minutes); start the listing again without a cursor", CURSOR_TTL.as_secs() / 60)]
    InvalidCursor { cursor: u64 },
    #[error("the call was stopped because its request ended")]
    Cancelled,
    #[error("the call was stopped because the server is shutting down")]
    ShuttingDown,
    /// Over the tenant's storage quota, or the data directory's free-space
    /// reserve: the message starts with the error code.
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("key-value storage failed: {0}")]
    Storage(String),
    /// Reading the values would take the request over a memory limit.
    #[error("{0}")]
    OverMemory(#[from] cordon_memory::OverBudget),
}

/// A key and its value, as the batch operations take and return them.
pub type Entry = (String, Vec<u8>);

/// Milliseconds since the Unix epoch. Injectable so that the TTL tests do not
/// have to sleep.
type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

fn system_clock() -> i64 {
    // A clock before 1970 is broken; treating it as 0 keeps entries alive
    // rather than expiring everything.
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// All namespaces under one root directory, opened at most once each: one
/// connection per file means the per-namespace mutex is all the in-process
/// locking there is, and SQLite's own locking only matters across processes.
pub struct Namespaces {
    root: PathBuf,
    clock: Clock,
    open: Mutex<HashMap<(String, String), Arc<Namespace>>>,
    pool: Arc<BlockingPool>,
    ledger: Arc<Ledger>,
}

impl fmt::Debug for Namespaces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Namespaces").field("root", &self.root).finish_non_exhaustive()
    }
}

impl Namespaces {
    /// Does no I/O, so building the runtime never fails on the KV directory;
    /// problems show up on the first `open`, with the path in the error.
    pub fn new(root: impl Into<PathBuf>) -> Namespaces {
        Self::with_pool(root, DEFAULT_POOL)
    }

    /// [`Namespaces::new`], with the calls of all namespaces running on a
    /// pool of this size.
    /// The storage quota is kept by the [`Ledger`] of `root`'s parent (the
    /// data directory), shared with the SQL databases beside it.
    pub fn with_pool(root: impl Into<PathBuf>, pool: PoolConfig) -> Namespaces {
        let root = root.into();
        let ledger = Ledger::shared(root.parent().unwrap_or(Path::new("")));
        Namespaces {
            root,
            clock: Arc::new(system_clock),
            open: Mutex::new(HashMap::new()),
            pool: Arc::new(BlockingPool::new(pool)),
            ledger,
        }
    }

    #[cfg(test)]
    fn with_clock(root: impl Into<PathBuf>, clock: Clock) -> Namespaces {
        Namespaces { clock, ..Self::new(root) }
    }

    /// The pool the host runs key-value calls on.
    pub fn pool(&self) -> &Arc<BlockingPool> {
        &self.pool
    }

    /// The tenants' storage accounts, where quotas and the reserve are set.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Opens (creating on first use) `<root>/<tenant>/<namespace>.sqlite3`;
    /// the same (tenant, namespace) returns the same shared `Arc`, which stays
    /// open for the life of `self`. Directories are created 0700 and files
    /// 0600, because a namespace holds a tenant's data and nobody else on the
    /// host has a reason to read it.
    pub fn open(&self, tenant: &str, namespace: &str) -> Result<Arc<Namespace>, KvError> {
        // The config validated these names already; checking again here is
        // what guarantees that no name can become a path outside the root.
        check_name("tenant", tenant)?;
        check_name("namespace", namespace)?;
        let id = (tenant.to_owned(), namespace.to_owned());
        // Held while opening, so two callers cannot open the same file twice.
        let mut open = lock(&self.open);
        if let Some(ns) = open.get(&id) {
            return Ok(Arc::clone(ns));
        }
        let ns = Arc::new(Namespace::open(&self.root, tenant, namespace, Arc::clone(&self.clock), self.ledger.account(tenant))?);
        open.insert(id, Arc::clone(&ns));
        Ok(ns)
    }
}

fn check_name(what: &'static str, name: &str) -> Result<(), KvError> {
    if cordon_config::is_valid_name(name) { Ok(()) } else { Err(KvError::InvalidName { what, name: name.to_owned() }) }
}

/// One open namespace. Every method is blocking (callers run it on a
/// blocking thread) and checks its arguments before it touches storage, so
/// an oversized key or value costs no I/O.
pub struct Namespace {
    /// `tenant/namespace`, for error messages.
    label: String,
    clock: Clock,
    conn: Mutex<Connection>,
    /// The tenant's storage account.
    account: Arc<Account>,
    /// The database file.
    path: PathBuf,
    /// It and its WAL and shared-memory files, as the account measures them.
    files: Vec<PathBuf>,
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Namespace").field("label", &self.label).finish_non_exhaustive()
    }
}

impl Namespace {
    fn open(root: &Path, tenant: &str, namespace: &str, clock: Clock, account: Arc<Account>) -> Result<Namespace, KvError> {
        let dir = root.join(tenant);
        create_private_dir(root, false)?;
        create_private_dir(&dir, true)?;
        let path = dir.join(format!("{namespace}.sqlite3"));
        cordon_disk::sqlite::create_private_file(&path).map_err(|e| KvError::Storage(e.to_string()))?;

        let at = |e: rusqlite::Error| KvError::Storage(format!("{}: {e}", path.display()));
        // NOFOLLOW: the file was checked above, and must not be swapped for a
        // symlink in between. NO_MUTEX: our own mutex serialises all use.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW
            | OpenFlags::SQLITE_OPEN_EXRESCODE;
        let mut conn = Connection::open_with_flags(&path, flags).map_err(at)?;
        configure(&conn, &path).map_err(at)?;
        migrate(&mut conn, &path)?;
        // The WAL and shared-memory files get the mode of the database file
        // when SQLite creates them, but may be left over from an older run.
        for suffix in ["-wal", "-shm"] {
            let mut side = path.clone().into_os_string();
            side.push(suffix);
            restrict_existing_file(Path::new(&side))?;
        }

        let now = clock();
        let purged = conn
            .execute("DELETE FROM kv WHERE expires_at <= ?1", [now])
            .and_then(|n| {
                conn.execute("DELETE FROM list_cursors WHERE created_at <= ?1", [now.saturating_sub(cursor_ttl_ms())])?;
                // Gives the pages freed by the purge back to the file system.
                disk::incremental_vacuum(&conn, None)?;
                Ok(n)
            })
            .map_err(at)?;
        tracing::debug!(path = %path.display(), purged, "opened key-value namespace");
        let files = cordon_disk::sqlite_files(&path);
        account.record(&files);
        Ok(Namespace { label: format!("{tenant}/{namespace}"), clock, conn: Mutex::new(conn), account, path, files })
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        check_key(key, DEFAULT_MAX_KEY_BYTES)?;
        let now = (self.clock)();
        self.with_conn(|conn| {
            let sql = format!("SELECT value FROM kv WHERE key = :key AND {LIVE}");
            let mut stmt = conn.prepare_cached(&sql)?;
            Ok(stmt.query_row(rusqlite::named_params! { ":key": key.as_bytes(), ":now": now }, |r| r.get(0)).optional()?)
        })
    }

    /// Stores `value` under `key`, replacing any value and TTL it had. With
    /// `ttl`, the entry disappears that long from now (rounded up to a
    /// millisecond; a zero TTL stores an entry that is already expired).
    pub fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>, limits: &KvLimits) -> Result<(), KvError> {
        check_key(key, limits.max_key_bytes)?;
        check_value(value, limits)?;
        let now = (self.clock)();
        let expires_at = ttl.map(|ttl| now.saturating_add(i64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(i64::MAX)));
        self.write(now, WriteKind::Grow, |tx| upsert(tx, key, value, expires_at))
    }

    /// Deleting a key that does not exist is not an error, so a retried
    /// delete succeeds.
    pub fn delete(&self, key: &str) -> Result<(), KvError> {
        check_key(key, DEFAULT_MAX_KEY_BYTES)?;
        let now = (self.clock)();
        self.write(now, WriteKind::Shrink, |tx| delete(tx, key))
    }

    pub fn exists(&self, key: &str) -> Result<bool, KvError> {
        check_key(key, DEFAULT_MAX_KEY_BYTES)?;
        let now = (self.clock)();
        self.with_conn(|conn| {
            let sql = format!("SELECT EXISTS (SELECT 1 FROM kv WHERE key = :key AND {LIVE})");
            let mut stmt = conn.prepare_cached(&sql)?;
            Ok(stmt.query_row(rusqlite::named_params! { ":key": key.as_bytes(), ":now": now }, |r| r.get(0))?)
        })
    }

    /// Keys starting with `prefix` ("" = all), in byte order, at most
    /// `limits.max_list_keys` per page (at least 1, so a listing always makes
    /// progress). `cursor` is what the previous page returned; `None` in the
    /// result means no more keys. See the module docs for why a cursor
    /// survives keys being added and removed between pages. A cursor that
    /// is unknown or older than [`CURSOR_TTL`] is refused with
    /// [`KvError::InvalidCursor`].
    pub fn list(&self, prefix: &str, cursor: Option<u64>, limits: &KvLimits) -> Result<(Vec<String>, Option<u64>), KvError> {
        // A prefix longer than any key cannot match; refusing it keeps the
        // rule "every key argument is checked" without exceptions.
        if prefix.len() > limits.max_key_bytes {
            return Err(KvError::KeyTooLong { len: prefix.len(), max: limits.max_key_bytes });
        }
        let page = limits.max_list_keys.max(1);
        let now = (self.clock)();
        self.with_conn(|conn| {
            // The cursor is written whatever the quota, see the module docs.
            disk::limit_growth(conn, LIST_CURSOR_HEADROOM)?;
            // IMMEDIATE because the page may end by writing a cursor, and a
            // read transaction cannot always be upgraded to a write one.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let after: Option<Vec<u8>> = match cursor {
                None => None,
                Some(id) => {
                    let found = match i64::try_from(id) {
                        Ok(id) => tx
                            .prepare_cached("SELECT after FROM list_cursors WHERE id = ?1 AND created_at > ?2")?
                            .query_row(params![id, now.saturating_sub(cursor_ttl_ms())], |r| r.get(0))
                            .optional()?,
                        Err(_) => None,
                    };
                    Some(found.ok_or(KvError::InvalidCursor { cursor: id })?)
                }
            };

            // One lower bound and one upper bound, so that SQLite walks the
            // primary key index from the resume point and stops at the end
            // of the prefix instead of filtering the whole table.
            let mut sql = String::from("SELECT key FROM kv WHERE ");
            let mut args: Vec<Value> = Vec::with_capacity(4);
            match after {
                Some(after) if after.as_slice() >= prefix.as_bytes() => {
                    sql.push_str("key > ?1");
                    args.push(Value::Blob(after));
                }
                _ => {
                    sql.push_str("key >= ?1");
                    args.push(Value::Blob(prefix.as_bytes().to_vec()));
                }
            }
            if let Some(upper) = prefix_upper_bound(prefix.as_bytes()) {
                sql.push_str(" AND key < ?2");
                args.push(Value::Blob(upper));
            }
            let n = args.len();
            sql.push_str(&format!(" AND (expires_at IS NULL OR expires_at > ?{}) ORDER BY key LIMIT ?{}", n + 1, n + 2));
            args.push(Value::Integer(now));
            // One more than a page tells whether there is a next page.
            args.push(Value::Integer(i64::try_from(page).unwrap_or(i64::MAX - 1).saturating_add(1)));

            let mut keys = {
                let mut stmt = tx.prepare_cached(&sql)?;
                let rows = stmt.query_map(params_from_iter(args), |r| r.get::<_, Vec<u8>>(0))?;
                rows.map(|row| {
                    let bytes = row?;
                    String::from_utf8(bytes).map_err(|_| KvError::Storage("a stored key is not UTF-8".to_owned()))
                })
                .collect::<Result<Vec<String>, KvError>>()?
            };
            let next = if keys.len() > page {
                keys.truncate(page);
                let last = keys.last().map(String::as_bytes).unwrap_or_default();
                tx.execute("INSERT INTO list_cursors (after, created_at) VALUES (?1, ?2)", params![last, now])?;
                let id = tx.last_insert_rowid();
                tx.execute(
                    "DELETE FROM list_cursors WHERE created_at <= ?1 OR id <= ?2",
                    params![now.saturating_sub(cursor_ttl_ms()), id.saturating_sub(MAX_CURSORS)],
                )?;
                // Row ids are positive, so this never fails.
                u64::try_from(id).ok()
            } else {
                None
            };
            tx.commit()?;
            if next.is_some() {
                self.account.record(&self.files);
            }
            Ok((keys, next))
        })
    }

    /// Adds `delta` to the value of `key` (absent or expired = 0) and returns
    /// the new value, stored as ASCII decimal so that `get` returns e.g.
    /// `b"42"` and a guest can mix `increment` with plain reads. A live
    /// value keeps its TTL, as counters with a window (rate limits) expect.
    /// Atomic: the read and the write are one IMMEDIATE transaction, which
    /// also holds against other processes using the same file.
    pub fn increment(&self, key: &str, delta: u64) -> Result<u64, KvError> {
        check_key(key, DEFAULT_MAX_KEY_BYTES)?;
        let now = (self.clock)();
        self.write(now, WriteKind::Grow, |tx| {
            let sql = format!("SELECT value, expires_at FROM kv WHERE key = :key AND {LIVE}");
            let current: Option<(Vec<u8>, Option<i64>)> = tx
                .prepare_cached(&sql)?
                .query_row(rusqlite::named_params! { ":key": key.as_bytes(), ":now": now }, |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let (old, expires_at) = match current {
                None => (0, None),
                Some((value, expires_at)) => {
                    let old = parse_counter(&value).ok_or_else(|| KvError::NotANumber { key: key.to_owned() })?;
                    (old, expires_at)
                }
            };
            let new = old.checked_add(delta).ok_or_else(|| KvError::Overflow { key: key.to_owned() })?;
            upsert(tx, key, new.to_string().as_bytes(), expires_at)?;
            Ok(new)
        })
    }

    /// One entry per key, in the order of `keys`, `None` for keys that are
    /// absent or expired. All values come from one snapshot.
    pub fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Entry>>, KvError> {
        self.get_many_within(keys, |_| Ok(()))
    }

    /// [`Namespace::get_many`], asking `admit` for each value's bytes before
    /// the value is read, so that a batch stops at a memory budget while it
    /// reads rather than after everything is in memory.
    pub fn get_many_within(
        &self,
        keys: &[String],
        mut admit: impl FnMut(usize) -> Result<(), KvError>,
    ) -> Result<Vec<Option<Entry>>, KvError> {
        for key in keys {
            check_key(key, DEFAULT_MAX_KEY_BYTES)?;
        }
        let now = (self.clock)();
        self.with_conn(|conn| {
            let tx = conn.transaction()?;
            let mut values = Vec::with_capacity(keys.len());
            {
                // The length first: SQLite reads a value's overflow pages
                // only when the value itself is asked for.
                let sql = format!("SELECT length(value), value FROM kv WHERE key = :key AND {LIVE}");
                let mut stmt = tx.prepare_cached(&sql)?;
                for key in keys {
                    admit(key.len())?;
                    let mut rows = stmt.query(rusqlite::named_params! { ":key": key.as_bytes(), ":now": now })?;
                    let value = match rows.next()? {
                        None => None,
                        Some(row) => {
                            admit(usize::try_from(row.get::<_, i64>(0)?).unwrap_or(usize::MAX))?;
                            Some(row.get::<_, Vec<u8>>(1)?)
                        }
                    };
                    values.push(value.map(|v| (key.clone(), v)));
                }
            }
            tx.commit()?;
            Ok(values)
        })
    }

    /// All or nothing, in one transaction: every key and value is checked
    /// first, so one oversized value stores none of the batch. Entries get no
    /// TTL; a key given twice ends with its last value.
    pub fn set_many(&self, entries: &[Entry], limits: &KvLimits) -> Result<(), KvError> {
        for (key, value) in entries {
            check_key(key, limits.max_key_bytes)?;
            check_value(value, limits)?;
        }
        let now = (self.clock)();
        self.write(now, WriteKind::Grow, |tx| entries.iter().try_for_each(|(key, value)| upsert(tx, key, value, None)))
    }

    /// All or nothing, in one transaction; absent keys are not an error.
    pub fn delete_many(&self, keys: &[String]) -> Result<(), KvError> {
        for key in keys {
            check_key(key, DEFAULT_MAX_KEY_BYTES)?;
        }
        let now = (self.clock)();
        self.write(now, WriteKind::Shrink, |tx| keys.iter().try_for_each(|key| delete(tx, key)))
    }

    /// Runs `f` in an IMMEDIATE transaction (taking the write lock up front,
    /// so it cannot fail halfway on a lock upgrade), purges a few expired
    /// entries in the same commit, and returns only after the commit is
    /// durable. The write holds its tenant's turn and may grow the file by
    /// what the quota and the reserve allow a write of `kind`; afterwards
    /// the freed pages are given back and the file is measured again (see
    /// the module docs).
    fn write<T>(&self, now: i64, kind: WriteKind, f: impl FnOnce(&Transaction<'_>) -> Result<T, KvError>) -> Result<T, KvError> {
        self.with_conn(|conn| {
            let turn = self.account.begin_write().map_err(stopped)?;
            let allowance = turn.allowance(kind)?;
            disk::limit_growth(conn, allowance.bytes)?;
            let result = (|| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let out = f(&tx)?;
                tx.prepare_cached("DELETE FROM kv WHERE key IN (SELECT key FROM kv WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)")?
                    .execute(params![now, PURGE_PER_WRITE])?;
                tx.commit()?;
                Ok(out)
            })();
            let result = match result {
                Err(KvError::Disk(DiskError::Full)) => Err(KvError::Disk(turn.full_error(&allowance))),
                other => other,
            };
            self.account.record(&self.files);
            match disk::after_write(conn, &self.path, kind, self.account.near_quota()) {
                Ok(false) => {}
                Ok(true) => self.account.record(&self.files),
                Err(e) => tracing::warn!(namespace = %self.label, error = %e, "giving free space back after a write failed"),
            }
            result
        })
    }

    /// Locks the connection and names the namespace in storage errors.
    /// Inside a pool job, the job's interrupt stops `f` while the lock is
    /// held (see the module docs).
    fn with_conn<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T, KvError>) -> Result<T, KvError> {
        let mut conn = self.lock_conn();
        let job = JobContext::current();
        if let Some(job) = &job {
            if let Some(reason) = job.stop_reason() {
                return Err(stopped(reason));
            }
            let handle = conn.get_interrupt_handle();
            job.set_interrupt(move || handle.interrupt());
        }
        let result = f(&mut conn);
        if let Some(job) = &job {
            job.clear_interrupt();
        }
        // An interrupt can also stop the rollback of a failed transaction;
        // none may stay open for the next call.
        if !conn.is_autocommit()
            && let Err(e) = conn.execute_batch("ROLLBACK")
        {
            tracing::warn!(namespace = %self.label, error = %e, "rollback of an unfinished transaction failed");
        }
        match (result, job.and_then(|j| j.stop_reason())) {
            (Err(_), Some(reason)) => Err(stopped(reason)),
            (result, _) => result.map_err(|e| match e {
                KvError::Storage(message) => KvError::Storage(format!("{}: {message}", self.label)),
                other => other,
            }),
        }
    }

    /// A panic while the lock was held (a bug) must not take the namespace
    /// down for good: the panicking transaction was rolled back when it was
    /// dropped during unwinding, so the connection is usable again. If it
    /// somehow was not, it is rolled back here.
    fn lock_conn(&self) -> MutexGuard<'_, Connection> {
        match self.conn.lock() {
            Ok(guard) => guard,
            Err(poisoned) => {
                tracing::warn!(namespace = %self.label, "recovering a key-value namespace after a panic");
                let guard = poisoned.into_inner();
                if !guard.is_autocommit()
                    && let Err(e) = guard.execute_batch("ROLLBACK")
                {
                    tracing::warn!(namespace = %self.label, error = %e, "rollback after a panic failed");
                }
                self.conn.clear_poison();
                guard
            }
        }
    }
}

/// Turns SQLite errors into [`KvError::Storage`] inside the closures of
/// `with_conn`, which adds the namespace to the message.
impl From<rusqlite::Error> for KvError {
    fn from(e: rusqlite::Error) -> Self {
        // Out of pages: `write` tells the quota from the reserve.
        if e.sqlite_error_code() == Some(ErrorCode::DiskFull) {
            return KvError::Disk(DiskError::Full);
        }
        KvError::Storage(e.to_string())
    }
}

fn stopped(reason: StopReason) -> KvError {
    match reason {
        StopReason::Shutdown => KvError::ShuttingDown,
        StopReason::Cancelled | StopReason::DeadlinePassed => KvError::Cancelled,
    }
}

fn upsert(tx: &Transaction<'_>, key: &str, value: &[u8], expires_at: Option<i64>) -> Result<(), KvError> {
    tx.prepare_cached(
        "INSERT INTO kv (key, value, expires_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
    )?
    .execute(params![key.as_bytes(), value, expires_at])?;
    Ok(())
}

fn delete(tx: &Transaction<'_>, key: &str) -> Result<(), KvError> {
    tx.prepare_cached("DELETE FROM kv WHERE key = ?1")?.execute([key.as_bytes()])?;
    Ok(())
}

fn check_key(key: &str, max: usize) -> Result<(), KvError> {
    if key.is_empty() {
        Err(KvError::EmptyKey)
    } else if key.len() > max {
        Err(KvError::KeyTooLong { len: key.len(), max })
    } else {
        Ok(())
    }
}

fn check_value(value: &[u8], limits: &KvLimits) -> Result<(), KvError> {
    if value.len() > limits.max_value_bytes {
        Err(KvError::ValueTooLarge { len: value.len(), max: limits.max_value_bytes })
    } else {
        Ok(())
    }
}

/// Plain ASCII digits only: `str::parse` would also take a leading `+`,
/// which `get` would then show back to the guest in a form increment never
/// writes.
fn parse_counter(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The smallest byte string greater than every string starting with
/// `prefix`, or `None` when there is none (empty prefix, or all 0xFF).
fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut upper = prefix.to_vec();
    while let Some(last) = upper.pop() {
        if last < u8::MAX {
            upper.push(last + 1);
            return Some(upper);
        }
    }
    None
}

fn cursor_ttl_ms() -> i64 {
    i64::try_from(CURSOR_TTL.as_millis()).unwrap_or(i64::MAX)
}

fn configure(conn: &Connection, path: &Path) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // auto_vacuum=INCREMENTAL (before the first table exists, or with a
    // one-time VACUUM for an older file, which needs to attach a database
    // and so comes before the limits), so that the freed pages of deleted
    // and purged entries can be given back; temporary storage in memory;
    // the WAL limit.
    disk::configure(conn, path)?;
    for &(limit, value) in CONNECTION_LIMITS {
        conn.set_limit(limit, value)?;
    }
    // Nothing in these files is trusted: a schema that was tampered with
    // must not run functions with side effects, or write to shadow tables.
    conn.pragma_update(None, "trusted_schema", false)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Still durable with synchronous=FULL, just slower; happens on file
        // systems without shared memory support.
        tracing::warn!(path = %path.display(), mode, "key-value namespace could not use WAL mode");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), KvError> {
    let at = |e: rusqlite::Error| KvError::Storage(format!("{}: {e}", path.display()));
    // Checked inside the write transaction so that two processes opening a
    // new file at once do not both create the tables.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(at)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(at)?;
    match version {
        0 => {
            tx.execute_batch(SCHEMA).map_err(at)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(at)?;
        }
        SCHEMA_VERSION => {}
        newer => {
            return Err(KvError::Storage(format!(
                "{}: schema version {newer} is newer than this Cordon understands ({SCHEMA_VERSION}); upgrade Cordon",
                path.display()
            )));
        }
    }
    tx.commit().map_err(at)
}

fn io_error(path: &Path, doing: &str, e: &std::io::Error) -> KvError {
    KvError::Storage(format!("cannot {doing} {}: {e}", path.display()))
}

/// Creates `dir` (and its parents) 0700. The tenant directory is ours and is
/// tightened to 0700 and must be a real directory; the root may be a symlink
/// to another disk and keeps whatever mode the operator gave it.
fn create_private_dir(dir: &Path, ours: bool) -> Result<(), KvError> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| io_error(dir, "create the directory", &e))?;
    let meta = if ours { fs::symlink_metadata(dir) } else { fs::metadata(dir) };
    let meta = meta.map_err(|e| io_error(dir, "inspect", &e))?;
    if !meta.is_dir() {
        return Err(KvError::Storage(format!("{} is not a directory", dir.display())));
    }
    if ours && meta.permissions().mode() & 0o777 != 0o700 {
        fs::set_permissions(dir, Permissions::from_mode(0o700)).map_err(|e| io_error(dir, "restrict the permissions of", &e))?;
    }
    Ok(())
}

fn restrict_existing_file(path: &Path) -> Result<(), KvError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o777 != 0o600 => {
            fs::set_permissions(path, Permissions::from_mode(0o600)).map_err(|e| io_error(path, "restrict the permissions of", &e))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path, "inspect", &e)),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The map is only ever inserted into after a successful open, so a
    // panic cannot leave it half-updated.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;

    const T0: i64 = 1_700_000_000_000;

    fn manual_clock() -> (Arc<AtomicI64>, Clock) {
        let now = Arc::new(AtomicI64::new(T0));
        let read = Arc::clone(&now);
        (now, Arc::new(move || read.load(Ordering::SeqCst)))
    }

    fn setup() -> (tempfile::TempDir, Namespaces) {
        let dir = tempfile::tempdir().expect("tempdir");
        let namespaces = Namespaces::new(dir.path().join("kv"));
        (dir, namespaces)
    }

    fn limits() -> KvLimits {
        KvLimits::default()
    }

    fn rows_on_disk(ns: &Namespace) -> i64 {
        ns.lock_conn().query_row("SELECT count(*) FROM kv", [], |r| r.get(0)).expect("count")
    }

    /// Fills `ns` with 100 kB values until the quota refuses one; returns
    /// how many were stored.
    fn fill(ns: &Namespace, prefix: &str) -> usize {
        let big = KvLimits { max_value_bytes: 1 << 20, ..limits() };
        for i in 0..1000 {
            match ns.set(&format!("{prefix}{i}"), &[7u8; 100_000], None, &big) {
                Ok(()) => {}
                Err(KvError::Disk(DiskError::QuotaExceeded { .. })) => return i,
                Err(e) => panic!("set {i}: {e}"),
            }
        }
        panic!("the quota never refused a write");
    }

    #[test]
    fn a_quota_holds_across_namespaces_and_deleting_makes_room_again() {
        let (dir, namespaces) = setup();
        let ledger = namespaces.ledger();
        ledger.set_free_space_reserve(0);
        ledger.set_tenant_quota("acme", 2 << 20);
        let a = namespaces.open("acme", "a").expect("open");
        let b = namespaces.open("acme", "b").expect("open");
        let other = namespaces.open("globex", "a").expect("open");
        let account = ledger.account("acme");

        let stored = fill(&a, "k");
        assert!(stored >= 10, "only {stored} values fit in 2 MiB");
        let tenant_bytes = |tenant: &str| -> u64 {
            fs::read_dir(dir.path().join("kv").join(tenant)).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
        };
        assert!(tenant_bytes("acme") <= 2 << 20, "{} bytes on disk", tenant_bytes("acme"));
        assert_eq!(account.used(), tenant_bytes("acme"), "the account matches the disk");

        // The same tenant's other namespace has nothing left either, with
        // a message that names the code and the way out.
        let refused = b.set("x", &[1u8; 100_000], None, &limits()).unwrap_err();
        assert!(matches!(refused, KvError::Disk(DiskError::QuotaExceeded { quota, .. }) if quota == 2 << 20), "{refused:?}");
        let message = refused.to_string();
        assert!(message.starts_with("storage_quota_exceeded: ") && message.contains("delete keys or rows"), "{message}");
        // Another tenant is not affected.
        other.set("x", &[1u8; 100_000], None, &limits()).expect("another tenant writes");

        // Reads work over the quota, and so does listing.
        assert_eq!(a.get("k0"), Ok(Some(vec![7u8; 100_000])));
        assert_eq!(a.get_many(&["k1".to_owned()]).expect("get_many")[0].as_ref().map(|e| e.1.len()), Some(100_000));
        let (page, cursor) = a.list("k", None, &KvLimits { max_list_keys: 2, ..limits() }).expect("list");
        assert_eq!(page.len(), 2);
        a.list("k", cursor, &KvLimits { max_list_keys: 2, ..limits() }).expect("next page");

        // Deletes work, and the space comes back to the file system.
        a.delete("k0").expect("delete over the quota");
        let keys: Vec<String> = (1..stored).map(|i| format!("k{i}")).collect();
        a.delete_many(&keys).expect("delete_many over the quota");
        assert!(account.used() < 1 << 20, "{} bytes still counted", account.used());
        assert!(tenant_bytes("acme") < 1 << 20, "{} bytes on disk", tenant_bytes("acme"));
        b.set("x", &[1u8; 100_000], None, &limits()).expect("room again");
    }

    #[test]
    fn a_namespace_at_its_limit_can_delete_every_key() {
        let (_dir, namespaces) = setup();
        namespaces.ledger().set_free_space_reserve(0);
        namespaces.ledger().set_tenant_quota("acme", 384 << 10);
        let ns = namespaces.open("acme", "a").expect("open");
        // Small values of many lengths fill the pages of the key index: in
        // batches first, then one by one up to the last page.
        let entry = |n: usize| (format!("key:{n:06}:{}", "x".repeat(n % 50)), vec![b'v'; 20 + (n * 37) % 400]);
        let mut n = 0;
        while ns.set_many(&(n..n + 50).map(entry).collect::<Vec<_>>(), &limits()).is_ok() {
            n += 50;
        }
        loop {
            let (key, value) = entry(n);
            match ns.set(&key, &value, None, &limits()) {
                Ok(()) => n += 1,
                Err(KvError::Disk(DiskError::QuotaExceeded { .. })) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(n > 300, "{n}");
        let (keys, _) = ns.list("", None, &KvLimits { max_list_keys: 100_000, ..limits() }).expect("list");
        assert_eq!(keys.len(), n);
        for key in keys.iter().step_by(3) {
            ns.delete(key).expect("every delete works at the limit");
        }
        ns.delete_many(&keys).expect("and the rest at once");
        assert_eq!(ns.list("", None, &limits()).expect("list").0, Vec::<String>::new());
    }

    #[test]
    fn below_the_free_space_reserve_writes_fail_and_reads_and_deletes_work() {
        let (dir, namespaces) = setup();
        let ns = namespaces.open("acme", "a").expect("open");
        ns.set("k", b"v", None, &limits()).expect("set");
        let free = cordon_disk::statvfs_available(dir.path()).expect("statvfs");
        namespaces.ledger().set_free_space_reserve(free + (1 << 30));
        let refused = ns.set("k2", b"v", None, &limits()).unwrap_err();
        assert!(matches!(refused, KvError::Disk(DiskError::ReserveReached { .. })), "{refused:?}");
        assert!(refused.to_string().starts_with("storage_disk_full: "), "{refused}");
        assert!(refused.to_string().contains("storage.free_space_reserve_mb"), "{refused}");
        assert_eq!(ns.get("k"), Ok(Some(b"v".to_vec())));
        ns.delete("k").expect("a delete below the reserve");
        namespaces.ledger().set_free_space_reserve(0);
        ns.set("k2", b"v", None, &limits()).expect("set");
    }

    #[test]
    fn connections_carry_the_size_limits() {
        let (_dir, namespaces) = setup();
        let ns = namespaces.open("acme", "app").unwrap();
        let conn = ns.lock_conn();
        for &(limit, value) in CONNECTION_LIMITS {
            assert_eq!(conn.limit(limit).unwrap(), value, "{limit:?}");
        }
    }

    /// A call whose request ended before it got its namespace writes
    /// nothing, and a queued call whose request ended never runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_of_ended_requests_do_not_run() {
        let (_dir, namespaces) = setup();
        let ns = namespaces.open("acme", "app").unwrap();
        let pool = namespaces.pool();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let runner = Arc::clone(&ns);
        let running = pool
            .spawn("acme", move |_| {
                started_tx.send(()).unwrap();
                let _ = go_rx.recv_timeout(Duration::from_secs(5));
                runner.set("late", b"x", None, &KvLimits::default())
            })
            .unwrap();
        started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // The tenant's other thread, then its queue.
        let (block_tx, block_rx) = std::sync::mpsc::channel::<()>();
        let (blocking_tx, blocking_rx) = std::sync::mpsc::channel();
        let blocker = pool
            .spawn("acme", move |_| {
                blocking_tx.send(()).unwrap();
                let _ = block_rx.recv_timeout(Duration::from_secs(5));
            })
            .unwrap();
        // Taken by a thread, so that only the next call waits in the queue.
        blocking_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let runner = Arc::clone(&ns);
        let queued = pool.spawn("acme", move |_| runner.set("queued", b"x", None, &KvLimits::default())).unwrap();
        assert_eq!(pool.stats().queued, 1);
        drop(queued);
        drop(running);
        go_tx.send(()).unwrap();
        block_tx.send(()).unwrap();
        drop(blocker);
        let give_up = std::time::Instant::now() + Duration::from_secs(5);
        while pool.stats().running > 0 && std::time::Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(ns.get("late").unwrap(), None);
        assert_eq!(ns.get("queued").unwrap(), None);
        assert_eq!(pool.stats().dropped_total, 1);
    }

    #[test]
    fn namespaces_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Namespace>();
        check::<Namespaces>();
        check::<Arc<Namespace>>();
    }

    #[test]
    fn crud_round_trip() {
        let (_dir, namespaces) = setup();
        let ns = namespaces.open("acme", "cache").expect("open");
        assert_eq!(ns.get("greeting"), Ok(None));
        assert_eq!(ns.exists("greeting"), Ok(false));

        ns.set("greeting", b"hello", None, &limits()).expect("set");
        assert_eq!(ns.get("greeting"), Ok(Some(b"hello".to_vec())));
        assert_eq!(ns.exists("greeting"), Ok(true));

        ns.set("greeting", b"", None, &limits()).expect("overwrite with empty value");
        assert_eq!(ns.get("greeting"), Ok(Some(Vec::new())));

        ns.delete("greeting").expect("delete");
        assert_eq!(ns.get("greeting"), Ok(None));
        assert_eq!(ns.exists("greeting"), Ok(false));
        ns.delete("greeting").expect("deleting an absent key is fine");

        let keys = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        ns.set_many(&[("a".to_owned(), b"1".to_vec()), ("c".to_owned(), b"3".to_vec())], &limits()).expect("set_many");
        assert_eq!(ns.get_many(&keys), Ok(vec![Some(("a".to_owned(), b"1".to_vec())), None, Some(("c".to_owned(), b"3".to_vec()))]));
        ns.delete_many(&keys).expect("delete_many");
        assert_eq!(ns.get_many(&keys), Ok(vec![None, None, None]));
    }

    #[test]
    fn same_namespace_is_the_same_arc() {
        let (_dir, namespaces) = setup();
        let a = namespaces.open("acme", "cache").expect("open");
        let b = namespaces.open("acme", "cache").expect("open again");
        let c = namespaces.open("acme", "other").expect("open other");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn key_limit_boundary_on_every_method() {
        let (_dir, namespaces) = setup();
        let ns = namespaces.open("acme", "cache").expect("open");
        let ok = "k".repeat(512);
        let long = "k".repeat(513);
        let too_long = Err(KvError::KeyTooLong { len: 513, max: 512 });

        ns.set(&ok, b"v", None, &limits()).expect("512-byte key");
        assert_eq!(ns.get(&ok), Ok(Some(b"v".to_vec())));
        assert_eq!(ns.increment(&ok, 1), Err(KvError::NotANumber { key: ok.clone() }));

        assert_eq!(ns.set(&long, b"v", None, &limits()), too_long);
        assert_eq!(ns.get(&long), too_long.clone().map(|()| None));
        assert_eq!(ns.exists(&long), too_long.clone().map(|()| false));
        assert_eq!(ns.delete(&long), too_long);
        assert_eq!(ns.increment(&long, 1), too_long.clone().map(|()| 0));
        assert_eq!(ns.get_many(&[ok.clone(), long.clone()]), too_long.clone().map(|()| Vec::new()));
        assert_eq!(ns.set_many(&[(long.clone(), Vec::new())], &limits()), too_long);
        assert_eq!(ns.delete_many(std::slice::from_ref(&long)), too_long);
        assert_eq!(ns.list(&long, None, &limits()), too_long.clone().map(|()| (Vec::new(), None)));

        let message = KvError::KeyTooLong { len: 600, max: 512 }.to_string();
        assert_eq!(message, "the key is 600 bytes; keys may be at most 512 bytes");

        assert_eq!(ns.set("", b"v", None, &limits()), Err(KvError::EmptyKey));
        assert_eq!(ns.get(""), Err(KvError::EmptyKey));
        assert_eq!(ns.increment("", 1), Err(KvError::EmptyKey));
        assert_eq!(rows_on_disk(&ns), 1, "nothing but the 512-byte key was stored");
    }

    #[test]
    fn value_limit_boundary() {
        let (_dir, namespaces) = setup();
        let ns = namespaces.open("acme", "cache").expect("open");
        let max = limits().max_value_bytes;
        assert_eq!(max, 1024 * 1024);

        ns.set("big", &vec![7; max], None, &limits()).expect("a value of exactly the limit");
        assert_eq!(ns.get("big").expect("get").map(|v| v.len()), Some(max));

        let err = ns.set("bigger", &vec![7; max + 1], None, &limits()).expect_err("one byte over");
        assert_eq!(err, KvError::ValueTooLarge { len: max + 1, max });
        let message = err.to_string();
        assert!(message.contains("at most 1048576 bytes") && message.contains("limits.max_kv_value_bytes"), "{message}");
        assert_eq!(ns.get("bigger"), Ok(None));

        let small = KvLimits { max_value_bytes: 4, ..limits() };
        ns.set("k", b"1234", None, &small).expect("4 bytes under a 4-byte limit");
        assert_eq!(ns.set("k", b"12345", None, &small), Err(KvError::ValueTooLarge { len: 5, max: 4 }));
        assert_eq!(ns.get("k"), Ok(Some(b"1234".to_vec())), "a refused set leaves the old value");
    }

    #[test]
    fn expired_entries_are_invisible_everywhere_and_purged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (now, clock) = manual_clock();
        let namespaces = Namespaces::with_clock(dir.path().join("kv"), Arc::clone(&clock));
        let ns = namespaces.open("acme", "cache").expect("open");

        ns.set("session", b"abc", Some(Duration::from_secs(1)), &limits()).expect("set");
        ns.set("counter", b"41", Some(Duration::from_secs(1)), &limits()).expect("set");
        ns.set("forever", b"x", None, &limits()).expect("set");

        now.store(T0 + 999, Ordering::SeqCst);
        assert_eq!(ns.get("session"), Ok(Some(b"abc".to_vec())));
        assert_eq!(ns.increment("counter", 1), Ok(42), "a live counter keeps counting");

        now.store(T0 + 1000, Ordering::SeqCst);
        assert_eq!(ns.get("session"), Ok(None));
        assert_eq!(ns.exists("session"), Ok(false));
        assert_eq!(ns.get_many(&["session".to_owned()]), Ok(vec![None]));
        assert_eq!(ns.list("", None, &limits()), Ok((vec!["forever".to_owned()], None)));
        assert_eq!(ns.increment("counter", 1), Ok(1), "the counter kept its TTL and restarted at 0");
        assert_eq!(ns.get("counter"), Ok(Some(b"1".to_vec())));

        // The increment was a write, so it purged "session"; the restarted
        // counter has no TTL.
        assert_eq!(rows_on_disk(&ns), 2);
        now.store(T0 + 10_000_000, Ordering::SeqCst);
        assert_eq!(ns.get("counter"), Ok(Some(b"1".to_vec())));

        // A set without TTL clears an earlier TTL.
        ns.set("k", b"1", Some(Duration::from_millis(10)), &limits()).expect("set");
        ns.set("k", b"2", None, &limits()).expect("set");
        now.store(T0 + 20_000_000, Ordering::SeqCst);
        assert_eq!(ns.get("k"), Ok(Some(b"2".to_vec())));

        // Opening purges everything expired, writes or not.
        ns.set("gone", b"1", Some(Duration::from_millis(1)), &limits()).expect("set");
        assert_eq!(rows_on_disk(&ns), 4);
        drop(ns);
        drop(namespaces);
        now.store(T0 + 30_000_000, Ordering::SeqCst);
        let namespaces = Namespaces::with_clock(dir.path().join("kv"), clock);
        let ns = namespaces.open("acme", "cache").expect("reopen");
        assert_eq!(rows_on_disk(&ns), 3);
    }

    #[test]
    fn ttl_expires_with_the_real_clock() {
        let (_dir, namespaces) = setup();
        let ns = namespaces.open("acme", "cache").expect("open");
        ns.set("short", b"v", Some(Duration::from_millis(300)), &limits()).expect("set");
        assert_eq!(ns.get("short"), Ok(Some(b"v".to_vec())));
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(ns.get("short"), Ok(None));
        assert_eq!(ns.exists("short"), Ok(false));
    }

    #[test]
    fn list_pages_through_a_prefix_while_keys_change() {
        let (_dir, namespaces) = setup();
        let ns = namespaces.open("acme", "cache").expect("open");
        let original: Vec<String> = (0..25).map(|i| format!("user:{i:03}")).collect();
        for key in &original {
            ns.set(key, b"v", None, &limits()).expect("set");
        }
        for key in ["user", "users", "usez", "apple", "zebra"] {
            ns.set(key, b"v", None, &limits()).expect("set");
        }
        let page = KvLimits { max_list_keys: 4, ..limits() };

        let mut seen: Vec<String> = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let (keys, next) = ns.list("user:", cursor, &page).expect("list");
            assert!(keys.len() <= 4, "page too long: {keys:?}");
            assert!(keys.windows(2).all(|w| w[0] < w[1]), "page not in byte order: {keys:?}");
            seen.extend(keys.iter().cloned());
            pages += 1;
            if pages == 2 {
                // Before the resume point, after it, and the very key the
                // cursor points at.
                ns.set("user:000a", b"v", None, &limits()).expect("add before");
                ns.set("user:020a", b"v", None, &limits()).expect("add after");
                ns.delete(keys.last().expect("a full page")).expect("delete the cursor's key");
                ns.delete("user:010").expect("delete ahead");
            }
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert!(pages >= 6, "expected several pages, got {pages}");
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "a key was repeated: {seen:?}");
        for key in &original {
            if key != "user:010" {
                assert!(seen.contains(key), "{key} was skipped: {seen:?}");
            }
        }
        assert!(!seen.contains(&"user:010".to_owned()), "a key deleted before its page must not appear");
        assert!(seen.contains(&"user:020a".to_owned()), "a key added after the resume point is listed");
        assert!(!seen.contains(&"user:000a".to_owned()), "a key added behind the resume point is not");
        assert!(seen.iter().all(|k| k.starts_with("user:")), "{seen:?}");

        // A retried page is the same page.
        let (first, next) = ns.list("", None, &page).expect("list all");
        let next = next.expect("more pages");
        assert_eq!(first, vec!["apple", "user", "user:000", "user:000a"]);
        let again = |cursor| ns.list("", Some(cursor), &page).expect("list").0;
        assert_eq!(again(next), again(next));
        assert_eq!(again(next), vec!["user:001", "user:002", "user:003", "user:004"]);

        assert_eq!(ns.list("", Some(next + 1000), &page), Err(KvError::InvalidCursor { cursor: next + 1000 }));
        assert_eq!(ns.list("", Some(u64::MAX), &page), Err(KvError::InvalidCursor { cursor: u64::MAX }));
    }

    #[test]
    fn list_is_in_byte_order_and_handles_edge_prefixes() {
        let (_dir, namespaces) = setup();
        let ns = namespaces.open("acme", "cache").expect("open");
        for key in ["é", "b", "a\u{10FFFF}x", "a", "B", "a\u{10FFFF}"] {
            ns.set(key, b"v", None, &limits()).expect("set");
        }
        let (all, next) = ns.list("", None, &limits()).expect("list");
        assert_eq!(next, None);
        assert_eq!(all, vec!["B", "a", "a\u{10FFFF}", "a\u{10FFFF}x", "b", "é"]);
        assert_eq!(ns.list("a\u{10FFFF}", None, &limits()).expect("list").0, vec!["a\u{10FFFF}", "a\u{10FFFF}x"]);
        assert_eq!(ns.list("nothing", None, &limits()), Ok((Vec::new(), None)));

        let two = KvLimits { max_list_keys: 2, ..limits() };
        let (keys, next) = ns.list("a", None, &two).expect("list");
        assert_eq!(keys, vec!["a", "a\u{10FFFF}"]);
        assert_eq!(ns.list("a", next, &two).expect("list"), (vec!["a\u{10FFFF}x".to_owned()], None));
        // An exactly full last page says there is nothing more.
        assert_eq!(ns.list("a\u{10FFFF}", None, &two).expect("list").1, None);

        // A page size of 0 still makes progress.
        let zero = KvLimits { max_list_keys: 0, ..limits() };
        assert_eq!(ns.list("", None, &zero).expect("list").0, vec!["B"]);

        assert_eq!(prefix_upper_bound(b""), None);
        assert_eq!(prefix_upper_bound(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_upper_bound(&[0x61, 0xFF, 0xFF]), Some(vec![0x62]));
        assert_eq!(prefix_upper_bound(&[0xFF]), None);
    }

    #[test]
    fn increment_absent_existing_non_numeric_and_overflow() {
        let (_dir, namespaces) = setup();
        let ns = namespaces.open("acme", "cache").expect("open");
        assert_eq!(ns.increment("hits", 5), Ok(5));
        assert_eq!(ns.increment("hits", 37), Ok(42));
        assert_eq!(ns.get("hits"), Ok(Some(b"42".to_vec())));
        assert_eq!(ns.increment("zero", 0), Ok(0));
        assert_eq!(ns.get("zero"), Ok(Some(b"0".to_vec())));

        ns.set("leading", b"007", None, &limits()).expect("set");
        assert_eq!(ns.increment("leading", 1), Ok(8));

        for bad in [&b"abc"[..], b"", b"+1", b"-1", b" 1", b"1.5", b"18446744073709551616"] {
            ns.set("bad", bad, None, &limits()).expect("set");
            assert_eq!(ns.increment("bad", 1), Err(KvError::NotANumber { key: "bad".to_owned() }), "{bad:?}");
            assert_eq!(ns.get("bad"), Ok(Some(bad.to_vec())), "a refused increment changes nothing");
        }

        ns.set("big", (u64::MAX - 1).to_string().as_bytes(), None, &limits()).expect("set");
        assert_eq!(ns.increment("big", 1), Ok(u64::MAX));
        assert_eq!(ns.increment("big", 1), Err(KvError::Overflow { key: "big".to_owned() }));
        assert_eq!(ns.get("big"), Ok(Some(u64::MAX.to_string().into_bytes())));
    }

    #[test]
    fn set_many_is_all_or_nothing() {
        let (_dir, namespaces) = setup();
        let ns = namespaces.open("acme", "cache").expect("open");
        ns.set("a", b"old", None, &limits()).expect("set");
        let small = KvLimits { max_value_bytes: 8, ..limits() };
        let batch = vec![
            ("a".to_owned(), b"new".to_vec()),
            ("b".to_owned(), b"new".to_vec()),
            ("c".to_owned(), vec![0; 9]),
            ("d".to_owned(), b"new".to_vec()),
        ];
        assert_eq!(ns.set_many(&batch, &small), Err(KvError::ValueTooLarge { len: 9, max: 8 }));
        assert_eq!(ns.get("a"), Ok(Some(b"old".to_vec())));
        assert_eq!(ns.get("b"), Ok(None));
        assert_eq!(ns.get("d"), Ok(None));

        let batch = vec![("a".to_owned(), b"new".to_vec()), (String::new(), b"x".to_vec())];
        assert_eq!(ns.set_many(&batch, &small), Err(KvError::EmptyKey));
        assert_eq!(ns.get("a"), Ok(Some(b"old".to_vec())));

        ns.set_many(&[("a".to_owned(), b"1".to_vec()), ("a".to_owned(), b"2".to_vec())], &small).expect("set_many");
        assert_eq!(ns.get("a"), Ok(Some(b"2".to_vec())), "the last value of a repeated key wins");
    }

    #[test]
    fn tenants_with_the_same_namespace_are_separate() {
        let (dir, namespaces) = setup();
        let acme = namespaces.open("acme", "cache").expect("open");
        let globex = namespaces.open("globex", "cache").expect("open");
        acme.set("k", b"acme", None, &limits()).expect("set");
        assert_eq!(globex.get("k"), Ok(None));
        globex.set("k", b"globex", None, &limits()).expect("set");
        assert_eq!(acme.get("k"), Ok(Some(b"acme".to_vec())));
        assert_eq!(globex.get("k"), Ok(Some(b"globex".to_vec())));
        assert_eq!(acme.list("", None, &limits()), Ok((vec!["k".to_owned()], None)));
        assert!(dir.path().join("kv/acme/cache.sqlite3").is_file());
        assert!(dir.path().join("kv/globex/cache.sqlite3").is_file());
    }

    #[test]
    fn values_survive_dropping_everything_and_reopening() {
        let (dir, namespaces) = setup();
        let ns = namespaces.open("acme", "cache").expect("open");
        ns.set("k", b"durable", None, &limits()).expect("set");
        ns.increment("n", 3).expect("increment");
        drop(ns);
        drop(namespaces);

        let namespaces = Namespaces::new(dir.path().join("kv"));
        let ns = namespaces.open("acme", "cache").expect("reopen");
        assert_eq!(ns.get("k"), Ok(Some(b"durable".to_vec())));
        assert_eq!(ns.get("n"), Ok(Some(b"3".to_vec())));

        let mode: String = ns.lock_conn().query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("journal_mode");
        let sync: i64 = ns.lock_conn().query_row("PRAGMA synchronous", [], |r| r.get(0)).expect("synchronous");
        let trusted: i64 = ns.lock_conn().query_row("PRAGMA trusted_schema", [], |r| r.get(0)).expect("trusted_schema");
        assert_eq!((mode.as_str(), sync, trusted), ("wal", 2, 0), "WAL, synchronous=FULL, trusted_schema=OFF");
        let vacuum: i64 = ns.lock_conn().query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).expect("auto_vacuum");
        assert_eq!(vacuum, 2, "auto_vacuum=INCREMENTAL, so purged space can be given back");
    }

    #[test]
    fn files_are_0600_and_directories_0700() {
        let (dir, namespaces) = setup();
        let ns = namespaces.open("acme", "cache").expect("open");
        ns.set("k", b"v", None, &limits()).expect("set");
        let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        let root = dir.path().join("kv");
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("acme")), 0o700);
        let db = root.join("acme/cache.sqlite3");
        assert_eq!(mode(&db), 0o600);
        let wal = root.join("acme/cache.sqlite3-wal");
        assert!(wal.exists(), "WAL mode keeps a -wal file while open");
        assert_eq!(mode(&wal), 0o600);
        let shm = root.join("acme/cache.sqlite3-shm");
        if shm.exists() {
            assert_eq!(mode(&shm), 0o600);
        }

        // A loosened tenant directory or file is tightened again on open.
        drop(ns);
        drop(namespaces);
        fs::set_permissions(root.join("acme"), Permissions::from_mode(0o755)).expect("chmod");
        fs::set_permissions(&db, Permissions::from_mode(0o644)).expect("chmod");
        let namespaces = Namespaces::new(&root);
        namespaces.open("acme", "cache").expect("reopen");
        assert_eq!(mode(&root.join("acme")), 0o700);
        assert_eq!(mode(&db), 0o600);
    }

    #[test]
    fn concurrent_increments_are_atomic() {
        let (dir, namespaces) = setup();
        // A second `Namespaces` has its own connection to the same file, so
        // half of the threads also race through SQLite's locking.
        let other = Namespaces::new(dir.path().join("kv"));
        let a = namespaces.open("acme", "cache").expect("open");
        let b = other.open("acme", "cache").expect("open");
        std::thread::scope(|s| {
            for t in 0..8 {
                let ns = if t % 2 == 0 { &a } else { &b };
                s.spawn(move || {
                    for _ in 0..25 {
                        ns.increment("counter", 1).expect("increment");
                    }
                });
            }
        });
        assert_eq!(a.get("counter"), Ok(Some(b"200".to_vec())));
        assert_eq!(b.increment("counter", 0), Ok(200));
    }

    #[test]
    fn bad_names_are_refused_before_any_io() {
        let (dir, namespaces) = setup();
        let long = "a".repeat(64);
        for bad in ["../x", "A", "", ".", "..", "a/b", "a\\b", "x\0", "café", long.as_str()] {
            assert_eq!(namespaces.open(bad, "cache").map(|_| ()), Err(KvError::InvalidName { what: "tenant", name: bad.to_owned() }));
            assert_eq!(namespaces.open("acme", bad).map(|_| ()), Err(KvError::InvalidName { what: "namespace", name: bad.to_owned() }));
        }
        assert!(!dir.path().join("kv").exists(), "nothing was created");
        assert!(namespaces.open(&"a".repeat(63), "a-b_c").is_ok());
    }

    #[test]
    fn a_panic_while_locked_does_not_break_the_namespace() {
        let (_dir, namespaces) = setup();
        let ns = namespaces.open("acme", "cache").expect("open");
        ns.set("k", b"v", None, &limits()).expect("set");
        let poisoner = Arc::clone(&ns);
        let joined = std::thread::spawn(move || {
            let conn = poisoner.conn.lock().expect("lock");
            conn.execute_batch("BEGIN IMMEDIATE; DELETE FROM kv;").expect("begin");
            panic!("bug while holding the lock");
        })
        .join();
        assert!(joined.is_err());
        assert!(ns.conn.is_poisoned());
        assert_eq!(ns.get("k"), Ok(Some(b"v".to_vec())), "the half-done transaction was rolled back");
        ns.set("k", b"w", None, &limits()).expect("writes work again");
        assert!(!ns.conn.is_poisoned());
    }
}
