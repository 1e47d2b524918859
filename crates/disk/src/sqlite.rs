//! The SQLite side of the scheme in the crate docs: the settings every
//! tenant file gets, the growth limit a write runs under, and what the host
//! does after a write. Every function runs the host's own statements on a
//! connection the caller holds; a caller with an authorizer lets them
//! through.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::{RECLAIM_MIN_FREE_PAGES, RECLAIM_STEP_PAGES, RECLAIM_TIME, WAL_LIMIT, WriteKind, sqlite_files};

/// SQLite's largest `max_page_count`.
const MAX_PAGE_COUNT: u64 = 0xffff_fffe;

/// Settings every tenant file gets when it is opened, before its schema
/// exists: temporary storage in memory, the WAL limit, and
/// `auto_vacuum = INCREMENTAL`. A file that has content but no auto-vacuum
/// (made before the host gave space back) gets one `VACUUM` here, so that
/// its space can be given back from then on; if that fails (for lack of
/// space), the file keeps working without it and a warning says so.
pub fn configure(conn: &Connection, path: &Path) -> rusqlite::Result<()> {
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update_and_check(None, "journal_size_limit", i64::try_from(WAL_LIMIT).unwrap_or(i64::MAX), |_| Ok(()))?;
    let mode: i64 = conn.pragma_query_value(None, "auto_vacuum", |r| r.get(0))?;
    if mode == 2 {
        return Ok(());
    }
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    if page_count(conn)? == 0 {
        // A new file: the setting takes effect with the first table.
        return Ok(());
    }
    // VACUUM builds the new file in a temporary database; in memory it
    // would need the file's whole size of SQLite's heap.
    conn.pragma_update(None, "temp_store", "FILE")?;
    let started = Instant::now();
    let vacuumed = conn.execute_batch("VACUUM");
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    match vacuumed {
        Ok(()) => tracing::info!(path = %path.display(), took_ms = started.elapsed().as_millis() as u64, "turned on incremental vacuum"),
        Err(e) => tracing::warn!(
            path = %path.display(),
            error = %e,
            "cannot turn on incremental vacuum; deleted data keeps its space in this file until it is vacuumed"
        ),
    }
    Ok(())
}

pub fn page_size(conn: &Connection) -> rusqlite::Result<u64> {
    pragma_u64(conn, "page_size")
}

/// Pages of the database as the connection sees it (in a transaction:
/// with the transaction's changes).
pub fn page_count(conn: &Connection) -> rusqlite::Result<u64> {
    pragma_u64(conn, "page_count")
}

pub fn freelist_count(conn: &Connection) -> rusqlite::Result<u64> {
    pragma_u64(conn, "freelist_count")
}

/// Reads an integer pragma; the statement is cached, because writes ask
/// for these every time.
fn pragma_u64(conn: &Connection, name: &str) -> rusqlite::Result<u64> {
    let n: i64 = conn.prepare_cached(&format!("PRAGMA {name}"))?.query_row([], |r| r.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Lets the database grow by at most `allowance` bytes from its size now:
/// `max_page_count` = its pages plus the allowance in whole pages. SQLite
/// fails a statement that needs a page past it with `SQLITE_FULL`.
pub fn limit_growth(conn: &Connection, allowance: u64) -> rusqlite::Result<()> {
    limit_growth_from(conn, page_count(conn)?, allowance)
}

/// [`limit_growth`] from a size of `pages`: a transaction of several
/// statements limits each from the size it started at, so that together
/// they grow by at most `allowance`. A limit below the pages the database
/// already has stops it where it is.
pub fn limit_growth_from(conn: &Connection, pages: u64, allowance: u64) -> rusqlite::Result<()> {
    let page_size = page_size(conn)?.max(512);
    let limit = pages.saturating_add(allowance / page_size).min(MAX_PAGE_COUNT);
    conn.pragma_update_and_check(None, "max_page_count", i64::try_from(limit).unwrap_or(i64::MAX), |_| Ok(()))
}

/// What the host does after a write of `kind` to the database at `path`,
/// with no transaction open: gives free pages back after a delete (or when
/// many are left, [`RECLAIM_MIN_FREE_PAGES`]), and truncates a WAL larger
/// than [`WAL_LIMIT`], or any WAL while the tenant is `near_quota`
/// ([`crate::Account::near_quota`]). Returns whether it changed the files.
pub fn after_write(conn: &Connection, path: &Path, kind: WriteKind, near_quota: bool) -> rusqlite::Result<bool> {
    let free = freelist_count(conn)?;
    if free > 0 && (kind == WriteKind::Shrink || free >= RECLAIM_MIN_FREE_PAGES) {
        reclaim(conn, RECLAIM_TIME)?;
        return Ok(true);
    }
    let wal = sqlite_files(path).get(1).and_then(|wal| fs::metadata(wal).ok()).map_or(0, |m| m.len());
    if wal > WAL_LIMIT || (near_quota && wal > 0) {
        checkpoint_truncate(conn)?;
        return Ok(true);
    }
    Ok(false)
}

/// Gives free pages back to the file system: `incremental_vacuum` in steps
/// of [`RECLAIM_STEP_PAGES`] until none are left or `budget` has passed,
/// in one transaction (one sync), then a `TRUNCATE` checkpoint, which
/// shrinks the file on disk and empties the WAL. Returns the pages given
/// back.
pub fn reclaim(conn: &Connection, budget: Duration) -> rusqlite::Result<u64> {
    let started = Instant::now();
    let before = page_count(conn)?;
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let stepped = (|| {
        loop {
            incremental_vacuum(conn, Some(RECLAIM_STEP_PAGES))?;
            if freelist_count(conn)? == 0 || started.elapsed() >= budget {
                return Ok(());
            }
        }
    })();
    match stepped {
        Ok(()) => conn.execute_batch("COMMIT")?,
        Err(e) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            return Err(e);
        }
    }
    let after = page_count(conn)?;
    checkpoint_truncate(conn)?;
    Ok(before.saturating_sub(after))
}

/// Runs `PRAGMA incremental_vacuum`, giving back up to `pages` free pages
/// (all of them for `None`). The pragma gives one page back per row it
/// returns, so every row is read.
pub fn incremental_vacuum(conn: &Connection, pages: Option<u32>) -> rusqlite::Result<()> {
    let sql = match pages {
        Some(pages) => format!("PRAGMA incremental_vacuum({})", pages.max(1)),
        None => "PRAGMA incremental_vacuum".to_owned(),
    };
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.raw_query();
    while rows.next()?.is_some() {}
    Ok(())
}

/// Copies the WAL into the database and truncates it to nothing; a reader
/// in another process can make it do less, which is not an error.
pub fn checkpoint_truncate(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
}

/// Why [`open_durable`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io { action: &'static str, path: std::path::PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Sqlite { path: std::path::PathBuf, source: rusqlite::Error },
}

/// Creates `path` as a 0600 file before SQLite opens it, because SQLite
/// would create it with the umask's mode and give its WAL and shared-memory
/// files the same. Refuses a symlink or anything but a regular file, and
/// narrows an existing file that group or others could open.
pub fn create_private_file(path: &Path) -> Result<(), OpenError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let io = |action, source| OpenError::Io { action, path: path.to_path_buf(), source };
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io("open", e))?;
    let meta = file.metadata().map_err(|e| io("inspect", e))?;
    if !meta.is_file() {
        return Err(io("open", std::io::Error::other("not a regular file")));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(|e| io("restrict the permissions of", e))?;
    }
    Ok(())
}

/// Opens a file the host keeps for itself (not a tenant's) with the policy
/// every such file follows: created 0600 ([`create_private_file`]), a busy
/// timeout for other processes' writes, the WAL, and `synchronous = FULL`,
/// so that a transaction is on disk when its commit returns. A file system
/// that refuses the WAL gets a warning: with `FULL`, the rollback journal is
/// as durable, only slower.
pub fn open_durable(path: &Path, busy: Duration) -> Result<Connection, OpenError> {
    create_private_file(path)?;
    let err = |source| OpenError::Sqlite { path: path.to_path_buf(), source };
    let conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(busy).map_err(err)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), journal_mode = %mode, "the file system refused the WAL; writes stay durable, only slower");
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
    Ok(conn)
}
