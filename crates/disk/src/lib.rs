//! Per-tenant disk quotas over the SQLite files of the key-value and SQL
//! bindings, and the free-space reserve of the data directory.
//!
//! # What is counted
//!
//! A tenant's stored bytes are the sizes of every file under
//! `DATA_DIR/kv/TENANT/` and `DATA_DIR/sql/TENANT/` ([`STORE_DIRS`]): its
//! namespaces and databases with their `-wal` and `-shm` files. The
//! [`Account`] of a tenant lists those directories once, when the tenant's
//! storage is first used, and measures a file again (three `stat`s) after
//! every write to it, so it always knows what the tenant's files take.
//!
//! # How SQLite itself stops at the quota
//!
//! The writes of one tenant take turns ([`Account::begin_write`]): one write
//! transaction at a time over all of the tenant's files (writes to one file
//! already wait for each other on its connection). The write whose turn it
//! is may grow its file by the tenant's remaining allowance, `quota − stored
//! bytes`, which it sets as the file's `max_page_count` (its current pages
//! plus the allowance in pages, [`sqlite::limit_growth`]) before its
//! transaction starts. When SQLite needs a page beyond that, the statement
//! fails with `SQLITE_FULL` and the transaction is rolled back; the store
//! reports it as [`DiskError::QuotaExceeded`] (`storage_quota_exceeded`).
//! After the write the file is measured again and the turn passes on.
//!
//! Taking turns is what makes one quota over several files exact: two
//! writes to two files can never both spend the same remaining bytes, and
//! the number of files does not matter. The price is that a tenant's writes
//! to different files do not overlap; reads never wait for a turn, and
//! other tenants have turns of their own. A write waiting for its turn
//! stops when its request ends (it checks its pool job every
//! [`TURN_POLL`]).
//!
//! Over the quota the allowance is 0, so a write can still change pages in
//! place or reuse free pages inside its file, but cannot grow the file.
//! Removing a row can need a new page now and then (a b-tree rebalance), so
//! writes that only delete ([`WriteKind::Shrink`]) may take the tenant up to
//! [`delete_headroom`] past its quota (1 MiB, or a 32nd of the quota): a
//! tenant over its quota can delete, and deleting cannot be used to grow
//! without bound. An index built so that most deletes need a page (long
//! entries each followed by a short one) can use the headroom up; even
//! then deleting the entries that take the space (or all rows at once)
//! works, and frees the pages the other deletes need.
//!
//! # Giving space back
//!
//! Files are created with `auto_vacuum = INCREMENTAL` (a file made before
//! that gets one `VACUUM` when it is opened, [`sqlite::configure`]). After a
//! delete, or a write that leaves at least [`RECLAIM_MIN_FREE_PAGES`] free
//! pages, the host runs `PRAGMA incremental_vacuum` in steps of
//! [`RECLAIM_STEP_PAGES`] for at most [`RECLAIM_TIME`], in one transaction,
//! and checkpoints the WAL with `TRUNCATE` so that the file shrinks on disk
//! ([`sqlite::after_write`]). It runs in the same pool job as the write, on
//! the storage pool's thread, so its CPU time is charged to the request that
//! deleted: the tenant pays for reclaiming its own space. A tenant cannot
//! run `VACUUM` itself.
//!
//! # The WAL and temporary files
//!
//! `journal_size_limit` is [`WAL_LIMIT`], and after a write whose WAL is
//! larger, or while the tenant is within [`WAL_LIMIT`] of its quota
//! ([`Account::near_quota`]), the WAL is checkpointed and truncated: between
//! writes a file's WAL is at most [`WAL_LIMIT`], it is counted like every
//! other file, and near the quota pages waiting in a WAL are not counted a
//! second time once they are copied into the database. While one
//! transaction runs, its WAL holds one copy of each page it changes, so a
//! file can briefly take up to its own size again: that transient is what
//! the free-space reserve absorbs. `temp_store = MEMORY`: sorts, indexes
//! built for one statement, materialised subqueries and statement journals
//! never go to disk, and are bounded by SQLite's memory limits instead (the
//! per-call budget and the process heap limit of `cordon-sql`).
//!
//! # The free-space reserve
//!
//! [`FreeSpace`] reads `statvfs` of the data directory (the space an
//! unprivileged process may use), at most once per [`FREE_SPACE_TTL`]. Below
//! the reserve a write that may grow a file is refused before it starts
//! ([`DiskError::ReserveReached`], `storage_disk_full`), and a write may
//! never grow its file by more than the free space above the reserve.
//! Deletes are never refused for it, because they are how space comes back.
//!
//! # One ledger per data directory
//!
//! The key-value and SQL stores are built separately, but a tenant's quota
//! covers both: [`Ledger::shared`] hands every store under one data
//! directory (their common parent) the same [`Ledger`], for as long as any
//! of them lives.

pub mod private_dir;
pub mod sqlite;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use cordon_blocking::{JobContext, StopReason};

/// The directories under the data directory that hold one directory of
/// SQLite files per tenant: key-value namespaces and SQL databases.
pub const STORE_DIRS: &[&str] = &["kv", "sql"];

/// The quota of a tenant the config says nothing about (as
/// `storage.tenant_quota_mb` defaults).
pub const DEFAULT_TENANT_QUOTA: u64 = 1024 << 20;

/// The reserve when the config says nothing (as
/// `storage.free_space_reserve_mb` defaults).
pub const DEFAULT_FREE_SPACE_RESERVE: u64 = 512 << 20;

/// How far past its quota deletes may take a tenant at least, see the
/// module docs and [`delete_headroom`].
pub const DELETE_HEADROOM: u64 = 1 << 20;

/// How far past a quota of `quota` bytes deletes may take a tenant:
/// [`DELETE_HEADROOM`], or a 32nd of the quota when that is more, since
/// the pages deletes can need grow with the size of the indexes.
pub fn delete_headroom(quota: u64) -> u64 {
    (quota / 32).max(DELETE_HEADROOM)
}

/// How long a `statvfs` reading is used before the next one.
pub const FREE_SPACE_TTL: Duration = Duration::from_secs(1);

/// The WAL kept between writes (`journal_size_limit`), in bytes.
pub const WAL_LIMIT: u64 = 4 << 20;

/// Time one reclaim after a write may take.
pub const RECLAIM_TIME: Duration = Duration::from_millis(10);

/// Pages one `incremental_vacuum` step gives back.
pub const RECLAIM_STEP_PAGES: u32 = 64;

/// Free pages a write that did not delete must leave before the host
/// reclaims them; fewer are left for the next writes to reuse.
pub const RECLAIM_MIN_FREE_PAGES: u64 = 256;

/// How often a write waiting for its tenant's turn checks whether its
/// request has ended.
pub const TURN_POLL: Duration = Duration::from_millis(10);

/// Why a write may not grow the tenant's files. The messages go to the
/// guest, start with the error code, and say how to get going again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    #[error(
        "storage_quota_exceeded: the tenant's storage quota of {} is used up ({} stored across its key-value namespaces and SQL databases; storage.tenant_quota_mb, or storage_quota_mb in its [[tenant]]); delete keys or rows to free space: the host gives the space of deleted data back after each delete",
        mib(*quota),
        mib(*used)
    )]
    QuotaExceeded { quota: u64, used: u64 },
    #[error(
        "storage_disk_full: the server's data file system has {} free, which is below its reserve of {} (storage.free_space_reserve_mb); writes are refused until the operator frees space; reads and deletes still work",
        mib(*free),
        mib(*reserve)
    )]
    ReserveReached { free: u64, reserve: u64 },
    /// SQLite ran out of space where no bound of ours explains it: the file
    /// system is full.
    #[error(
        "storage_disk_full: the server's data file system is full; writes fail until the operator frees space; reads and deletes still work"
    )]
    Full,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// What a write may do to the size of its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// It may add data: bounded by the quota and the reserve.
    Grow,
    /// It only removes data: bounded by the quota plus
    /// [`delete_headroom`], and never refused for the reserve.
    Shrink,
}

/// Which bound set an [`Allowance`], and so which error its `SQLITE_FULL`
/// means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Quota,
    Reserve,
}

/// Bytes one write may add to its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub bytes: u64,
    pub bound: Bound,
}

/// The free space of the data directory's file system, read with `statvfs`
/// at most once per [`FREE_SPACE_TTL`], and the reserve to keep.
#[derive(Debug)]
pub struct FreeSpace {
    path: PathBuf,
    reserve: AtomicU64,
    /// The last reading and when it was taken (`None` inside: it failed).
    last: Mutex<Option<(Instant, Option<u64>)>>,
}

impl FreeSpace {
    fn new(path: PathBuf) -> FreeSpace {
        FreeSpace { path, reserve: AtomicU64::new(DEFAULT_FREE_SPACE_RESERVE), last: Mutex::new(None) }
    }

    pub fn reserve(&self) -> u64 {
        self.reserve.load(Ordering::Relaxed)
    }

    /// Free bytes, from a reading at most [`FREE_SPACE_TTL`] old; `None`
    /// when the file system cannot be read (then no reserve is enforced,
    /// and SQLite's own `SQLITE_FULL` is what stops writes; the failure is
    /// logged at most once per [`FREE_SPACE_TTL`]).
    pub fn free(&self) -> Option<u64> {
        let mut last = lock(&self.last);
        if let Some((at, free)) = *last
            && at.elapsed() < FREE_SPACE_TTL
        {
            return free;
        }
        let free = self.read();
        *last = Some((Instant::now(), free));
        free
    }

    /// A reading taken now, which also replaces the cached one.
    pub fn free_now(&self) -> Option<u64> {
        let free = self.read();
        *lock(&self.last) = Some((Instant::now(), free));
        free
    }

    fn read(&self) -> Option<u64> {
        match statvfs_available(&self.path) {
            Ok(free) => Some(free),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read the free space of the data directory");
                None
            }
        }
    }
}

/// Bytes of `path`'s file system that an unprivileged process may still
/// use (`f_bavail × f_frsize`).
pub fn statvfs_available(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the
    // call, and `stat` points to writable memory of the size and alignment
    // of `struct statvfs`, which the call fills on success.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `statvfs` returned 0, so it filled the whole struct.
    let stat = unsafe { stat.assume_init() };
    #[allow(clippy::useless_conversion, reason = "the field types differ between targets")]
    Ok(u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize)))
}

/// The accounts of every tenant under one data directory.
#[derive(Debug)]
pub struct Ledger {
    data_dir: PathBuf,
    free: Arc<FreeSpace>,
    accounts: Mutex<HashMap<String, Arc<Account>>>,
}

impl Ledger {
    /// A ledger of its own, for `data_dir` (tests; the stores use
    /// [`Ledger::shared`]).
    pub fn new(data_dir: impl Into<PathBuf>) -> Ledger {
        let data_dir = data_dir.into();
        Ledger { free: Arc::new(FreeSpace::new(data_dir.clone())), data_dir, accounts: Mutex::new(HashMap::new()) }
    }

    /// The ledger of `data_dir` in this process: the same one for every
    /// caller while any of them holds it. The path is taken as given; the
    /// stores of one data directory build theirs from the same path.
    pub fn shared(data_dir: &Path) -> Arc<Ledger> {
        static LEDGERS: Mutex<Vec<(PathBuf, Weak<Ledger>)>> = Mutex::new(Vec::new());
        let mut ledgers = lock(&LEDGERS);
        ledgers.retain(|(_, ledger)| ledger.strong_count() > 0);
        if let Some(ledger) = ledgers.iter().find(|(path, _)| path == data_dir).and_then(|(_, ledger)| ledger.upgrade()) {
            return ledger;
        }
        let ledger = Arc::new(Ledger::new(data_dir));
        ledgers.push((data_dir.to_path_buf(), Arc::downgrade(&ledger)));
        ledger
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn free_space(&self) -> &FreeSpace {
        &self.free
    }

    /// Sets the reserve (0 = none).
    pub fn set_free_space_reserve(&self, bytes: u64) {
        self.free.reserve.store(bytes, Ordering::Relaxed);
    }

    /// Sets `tenant`'s quota; a tenant never set has [`DEFAULT_TENANT_QUOTA`].
    pub fn set_tenant_quota(&self, tenant: &str, bytes: u64) {
        self.account(tenant).quota.store(bytes, Ordering::Relaxed);
    }

    /// `tenant`'s account, which lists the tenant's directories the first
    /// time it is asked for.
    pub fn account(&self, tenant: &str) -> Arc<Account> {
        let mut accounts = lock(&self.accounts);
        if let Some(account) = accounts.get(tenant) {
            return Arc::clone(account);
        }
        let mut files = HashMap::new();
        for store in STORE_DIRS {
            let dir = self.data_dir.join(store).join(tenant);
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                if let Ok(meta) = entry.metadata()
                    && meta.is_file()
                {
                    files.insert(entry.path(), meta.len());
                }
            }
        }
        let account = Arc::new(Account {
            tenant: tenant.to_owned(),
            quota: AtomicU64::new(DEFAULT_TENANT_QUOTA),
            state: Mutex::new(AccountState { files, writing: false }),
            turn: Condvar::new(),
            free: Arc::clone(&self.free),
        });
        accounts.insert(tenant.to_owned(), Arc::clone(&account));
        account
    }
}

/// One tenant's stored bytes, quota and write turn.
#[derive(Debug)]
pub struct Account {
    tenant: String,
    quota: AtomicU64,
    state: Mutex<AccountState>,
    turn: Condvar,
    free: Arc<FreeSpace>,
}

#[derive(Debug)]
struct AccountState {
    /// Bytes of each of the tenant's files, as last measured.
    files: HashMap<PathBuf, u64>,
    /// A write of the tenant holds its turn.
    writing: bool,
}

impl AccountState {
    fn used(&self) -> u64 {
        self.files.values().sum()
    }
}

impl Account {
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn quota(&self) -> u64 {
        self.quota.load(Ordering::Relaxed)
    }

    /// Bytes the tenant's files take, as last measured.
    pub fn used(&self) -> u64 {
        lock(&self.state).used()
    }

    /// The tenant's files are within [`WAL_LIMIT`] of its quota: a WAL
    /// is then truncated after every write, so that bytes only waiting in a
    /// WAL to be copied into the database are not counted twice.
    pub fn near_quota(&self) -> bool {
        self.used().saturating_add(WAL_LIMIT) > self.quota()
    }

    /// Waits for the tenant's write turn. Inside a pool job the wait ends
    /// when the job is told to stop, with the reason.
    pub fn begin_write(&self) -> Result<WriteTurn<'_>, StopReason> {
        let job = JobContext::current();
        let mut state = lock(&self.state);
        while state.writing {
            if let Some(reason) = job.as_ref().and_then(JobContext::stop_reason) {
                return Err(reason);
            }
            state = self.turn.wait_timeout(state, TURN_POLL).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        }
        state.writing = true;
        Ok(WriteTurn { account: self })
    }

    /// Measures `files` again (a file that is gone counts 0). Needs no
    /// turn: a store calls it after opening a file, too.
    pub fn record(&self, files: &[PathBuf]) {
        let sizes: Vec<(PathBuf, Option<u64>)> = files.iter().map(|f| (f.clone(), fs::metadata(f).ok().map(|m| m.len()))).collect();
        let mut state = lock(&self.state);
        for (file, size) in sizes {
            match size {
                Some(size) => {
                    state.files.insert(file, size);
                }
                None => {
                    state.files.remove(&file);
                }
            }
        }
    }

    /// The allowance of a write of `kind` with the account at `used`.
    fn allowance(&self, kind: WriteKind, used: u64) -> Result<Allowance, DiskError> {
        let cap = match kind {
            WriteKind::Grow => self.quota(),
            WriteKind::Shrink => self.quota().saturating_add(delete_headroom(self.quota())),
        };
        let quota_left = Allowance { bytes: cap.saturating_sub(used), bound: Bound::Quota };
        let reserve = self.free.reserve();
        if kind == WriteKind::Shrink || reserve == 0 {
            return Ok(quota_left);
        }
        let Some(free) = self.free.free() else { return Ok(quota_left) };
        if free < reserve {
            return Err(DiskError::ReserveReached { free, reserve });
        }
        let disk_left = free - reserve;
        Ok(if disk_left < quota_left.bytes { Allowance { bytes: disk_left, bound: Bound::Reserve } } else { quota_left })
    }
}

/// The tenant's write turn; dropping it passes the turn on.
#[derive(Debug)]
pub struct WriteTurn<'a> {
    account: &'a Account,
}

impl WriteTurn<'_> {
    pub fn account(&self) -> &Account {
        self.account
    }

    /// Bytes a write of `kind` may add to its file now. A growing write
    /// below the free-space reserve is refused.
    pub fn allowance(&self, kind: WriteKind) -> Result<Allowance, DiskError> {
        self.account.allowance(kind, self.account.used())
    }

    /// What a `SQLITE_FULL` of a write that had `allowance` means: the file
    /// system is checked again, so a disk that really is full is reported
    /// as such.
    pub fn full_error(&self, allowance: &Allowance) -> DiskError {
        let reserve = self.account.free.reserve();
        match self.account.free.free_now() {
            Some(free) if free < reserve || allowance.bound == Bound::Reserve => DiskError::ReserveReached { free, reserve },
            // Less than a page or so left: no bound of ours, the disk.
            Some(free) if free < 64 * 1024 => DiskError::Full,
            _ => DiskError::QuotaExceeded { quota: self.account.quota(), used: self.account.used() },
        }
    }
}

impl Drop for WriteTurn<'_> {
    fn drop(&mut self) {
        lock(&self.account.state).writing = false;
        self.account.turn.notify_one();
    }
}

/// The files of the SQLite database at `path`: it, its WAL and its shared
/// memory index.
pub fn sqlite_files(path: &Path) -> Vec<PathBuf> {
    let with = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    vec![path.to_path_buf(), with("-wal"), with("-shm")]
}

/// The state under these mutexes stays consistent whatever a panicking
/// holder did (each update is one assignment).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| {
        mutex.clear_poison();
        poisoned.into_inner()
    })
}

#[cfg(test)]
mod tests;
