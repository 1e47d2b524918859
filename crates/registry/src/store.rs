//! The durable record behind the live registry: `DATA_DIR/registry.sqlite3`
//! and the components in `DATA_DIR/components/<sha256>.wasm`.
//!
//! - A component is written to a temporary file, synced, and renamed to its
//!   SHA-256; only then can a version name it. A file is never rewritten,
//!   and reading one checks its hash.
//! - Versions are numbered per worker from 1 and never reused. At least
//!   `keep` (by default [`MIN_KEPT_VERSIONS`]) of each worker's newest
//!   versions are kept, and so is every version its active deployment
//!   serves; older ones, and components no version names, are removed.
//! - Every change is one `IMMEDIATE` transaction with `synchronous = FULL`:
//!   on disk when the call returns. Several processes may share the files.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};
use sha2::{Digest as _, Sha256};

use crate::deployment::Deployment;

/// The registry's database in the data directory.
pub const DATABASE_FILE: &str = "registry.sqlite3";
/// The directory of stored components in the data directory.
pub const COMPONENTS_DIR: &str = "components";
/// The fewest versions of each worker that are kept.
pub const MIN_KEPT_VERSIONS: usize = 100;
/// How long a change waits for another process's.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const FORMAT_VERSION: i64 = 1;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS workers (
        tenant TEXT NOT NULL,
        worker TEXT NOT NULL,
        next_version INTEGER NOT NULL,
        deployment TEXT,
        disabled INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, worker)
    ) STRICT;
    CREATE TABLE IF NOT EXISTS versions (
        tenant TEXT NOT NULL,
        worker TEXT NOT NULL,
        version INTEGER NOT NULL,
        component TEXT NOT NULL,
        spec TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        PRIMARY KEY (tenant, worker, version)
    ) STRICT;
    PRAGMA user_version = 1;";

/// A component's SHA-256, in lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComponentHash(String);

impl ComponentHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> ComponentHash {
        ComponentHash(Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ComponentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One immutable version of a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    pub tenant: String,
    pub worker: String,
    pub version: u64,
    pub component: ComponentHash,
    /// The spec it was deployed with, in the caller's serialised form:
    /// routes, limits, grants, variables and secret names, never a value.
    pub spec: String,
    pub created_ms: u64,
    /// Who created it.
    pub actor: String,
}

/// A worker and what it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRecord {
    pub tenant: String,
    pub worker: String,
    /// `None` until its first deployment.
    pub deployment: Option<Deployment>,
    pub disabled: bool,
}

/// Errors of the registry store.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Open(#[from] cordon_disk::sqlite::OpenError),
    #[error(transparent)]
    NotPrivate(#[from] cordon_disk::private_dir::NotPrivate),
    #[error("the registry database {}: {source}", path.display())]
    Database { path: PathBuf, source: rusqlite::Error },
    #[error("cannot {action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the registry database {} has format version {version}, newer than this Cordon understands ({FORMAT_VERSION}); upgrade Cordon", path.display())]
    NewerFormat { path: PathBuf, version: i64 },
    #[error("there is no worker `{worker}` of tenant `{tenant}`")]
    NoSuchWorker { tenant: String, worker: String },
    #[error(
        "worker `{worker}` of tenant `{tenant}` has no version {version} (it was never created, or was removed as older than the versions kept)"
    )]
    NoSuchVersion { tenant: String, worker: String, version: u64 },
    #[error("component {hash} is not stored; store it before creating a version that names it")]
    NoSuchComponent { hash: ComponentHash },
    #[error("the stored component {} does not match its hash: the file was damaged or replaced", path.display())]
    ComponentDamaged { path: PathBuf },
    #[error("the registry record of worker `{worker}` of tenant `{tenant}` is damaged: {problem}")]
    Damaged { tenant: String, worker: String, problem: String },
}

/// The registry's record. One connection behind a mutex; other processes
/// may use the same files.
pub struct RegistryStore {
    conn: Mutex<Connection>,
    path: PathBuf,
    components: PathBuf,
    keep: usize,
    /// How old a component file that no version names must be before it is
    /// removed ([`UNNAMED_GRACE`]).
    unnamed_grace: Duration,
}

/// How long a stored component may stay unnamed before it is removed: the
/// time between storing it and creating the version that names it.
pub const UNNAMED_GRACE: Duration = Duration::from_secs(600);

impl std::fmt::Debug for RegistryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl RegistryStore {
    /// Opens (creating if needed) the registry in `data_dir`, keeping at
    /// least `keep` versions of each worker (never fewer than
    /// [`MIN_KEPT_VERSIONS`]). Components that no version names, left by a
    /// change that was interrupted, are removed once they are old enough.
    pub fn open(data_dir: &Path, keep: usize) -> Result<RegistryStore, RegistryError> {
        cordon_disk::private_dir::check(data_dir)?;
        let components = data_dir.join(COMPONENTS_DIR);
        for dir in [data_dir, &components] {
            create_private_dir(dir)?;
        }
        let path = data_dir.join(DATABASE_FILE);
        let mut conn = cordon_disk::sqlite::open_durable(&path, BUSY_TIMEOUT)?;
        let db = |source| RegistryError::Database { path: path.clone(), source };
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(db)?;
        if version > FORMAT_VERSION {
            return Err(RegistryError::NewerFormat { path, version });
        }
        tx.execute_batch(SCHEMA).map_err(db)?;
        tx.commit().map_err(db)?;
        let store =
            RegistryStore { conn: Mutex::new(conn), path, components, keep: keep.max(MIN_KEPT_VERSIONS), unnamed_grace: UNNAMED_GRACE };
        store.remove_unnamed_components()?;
        Ok(store)
    }

    /// Stores `bytes` under their SHA-256, durably; storing the same bytes
    /// again is a no-op.
    pub fn store_component(&self, bytes: &[u8]) -> Result<ComponentHash, RegistryError> {
        let hash = ComponentHash::of(bytes);
        let path = self.component_path(&hash);
        if path.exists() {
            return Ok(hash);
        }
        let tmp = self.components.join(format!(".{}.{}.tmp", hash, std::process::id()));
        let io = |action, source| RegistryError::Io { action, path: tmp.clone(), source };
        let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(|e| io("create", e))?;
        file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| io("write", e))?;
        fs::rename(&tmp, &path).map_err(|e| io("rename", e))?;
        sync_dir(&self.components)?;
        Ok(hash)
    }

    /// Where the component with `hash` is stored.
    pub fn component_path(&self, hash: &ComponentHash) -> PathBuf {
        self.components.join(format!("{hash}.wasm"))
    }

    /// The bytes of a stored component, checked against its hash.
    pub fn read_component(&self, hash: &ComponentHash) -> Result<Vec<u8>, RegistryError> {
        let path = self.component_path(hash);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(RegistryError::NoSuchComponent { hash: hash.clone() }),
            Err(source) => return Err(RegistryError::Io { action: "read", path, source }),
        };
        if &ComponentHash::of(&bytes) != hash {
            return Err(RegistryError::ComponentDamaged { path });
        }
        Ok(bytes)
    }

    /// Records a new version of `(tenant, worker)`, which need not exist
    /// yet; its number is one more than the worker's last. The component
    /// must be stored already.
    pub fn create_version(
        &self,
        tenant: &str,
        worker: &str,
        component: &ComponentHash,
        spec: &str,
        actor: &str,
    ) -> Result<VersionRecord, RegistryError> {
        if !self.component_path(component).exists() {
            return Err(RegistryError::NoSuchComponent { hash: component.clone() });
        }
        let created_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let version = self.change(tenant, worker, |tx| {
            tx.execute(
                "INSERT INTO workers (tenant, worker, next_version) VALUES (?1, ?2, 1) ON CONFLICT DO NOTHING",
                params![tenant, worker],
            )?;
            let version: i64 = tx.query_row(
                "UPDATE workers SET next_version = next_version + 1 WHERE tenant = ?1 AND worker = ?2 RETURNING next_version - 1",
                params![tenant, worker],
                |r| r.get(0),
            )?;
            tx.execute(
                "INSERT INTO versions (tenant, worker, version, component, spec, created_ms, actor) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![tenant, worker, version, component.as_str(), spec, created_ms as i64, actor],
            )?;
            Ok(Ok(version))
        })?;
        Ok(VersionRecord {
            tenant: tenant.into(),
            worker: worker.into(),
            version: version as u64,
            component: component.clone(),
            spec: spec.into(),
            created_ms,
            actor: actor.into(),
        })
    }

    /// One version of a worker, if it is kept.
    pub fn version(&self, tenant: &str, worker: &str, version: u64) -> Result<Option<VersionRecord>, RegistryError> {
        self.conn()
            .query_row(
                "SELECT tenant, worker, version, component, spec, created_ms, actor FROM versions WHERE tenant = ?1 AND worker = ?2 AND version = ?3",
                params![tenant, worker, version as i64],
                read_version,
            )
            .optional()
            .map_err(|e| self.db(e))
    }

    /// The kept versions of a worker, newest first.
    pub fn versions(&self, tenant: &str, worker: &str) -> Result<Vec<VersionRecord>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT tenant, worker, version, component, spec, created_ms, actor FROM versions
                 WHERE tenant = ?1 AND worker = ?2 ORDER BY version DESC",
            )
            .map_err(|e| self.db(e))?;
        stmt.query_map(params![tenant, worker], read_version).and_then(|rows| rows.collect()).map_err(|e| self.db(e))
    }

    /// Makes `deployment` the worker's active one. Every version it names
    /// must be kept; otherwise nothing changes. A disabled worker stays
    /// disabled.
    pub fn deploy(&self, tenant: &str, worker: &str, deployment: &Deployment) -> Result<(), RegistryError> {
        self.change(tenant, worker, |tx| {
            for version in deployment.versions() {
                let kept: Option<i64> = tx
                    .query_row(
                        "SELECT 1 FROM versions WHERE tenant = ?1 AND worker = ?2 AND version = ?3",
                        params![tenant, worker, version as i64],
                        |r| r.get(0),
                    )
                    .optional()?;
                if kept.is_none() {
                    return Ok(Err(RegistryError::NoSuchVersion { tenant: tenant.into(), worker: worker.into(), version }));
                }
            }
            tx.execute(
                "UPDATE workers SET deployment = ?3 WHERE tenant = ?1 AND worker = ?2",
                params![tenant, worker, deployment.encode()],
            )?;
            Ok(Ok(()))
        })
    }

    /// Sets the worker's kill switch. Enabling restores the deployment it had.
    pub fn set_disabled(&self, tenant: &str, worker: &str, disabled: bool) -> Result<(), RegistryError> {
        let n = self
            .conn()
            .execute("UPDATE workers SET disabled = ?3 WHERE tenant = ?1 AND worker = ?2", params![tenant, worker, disabled])
            .map_err(|e| self.db(e))?;
        if n == 0 {
            return Err(RegistryError::NoSuchWorker { tenant: tenant.into(), worker: worker.into() });
        }
        Ok(())
    }

    /// Removes a worker, its versions and its deployment; `false` if there
    /// was no such worker. Its components go unless another version names them.
    pub fn remove_worker(&self, tenant: &str, worker: &str) -> Result<bool, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.db(e))?;
        let n = tx.execute("DELETE FROM workers WHERE tenant = ?1 AND worker = ?2", params![tenant, worker]).map_err(|e| self.db(e))?;
        tx.execute("DELETE FROM versions WHERE tenant = ?1 AND worker = ?2", params![tenant, worker]).map_err(|e| self.db(e))?;
        tx.commit().map_err(|e| self.db(e))?;
        drop(conn);
        self.remove_unnamed_components()?;
        Ok(n > 0)
    }

    /// Every worker with its deployment and kill switch, by tenant and name.
    pub fn workers(&self) -> Result<Vec<WorkerRecord>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT tenant, worker, deployment, disabled FROM workers ORDER BY tenant, worker")
            .map_err(|e| self.db(e))?;
        let rows: Vec<(String, String, Option<String>, bool)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.db(e))?;
        rows.into_iter()
            .map(|(tenant, worker, deployment, disabled)| {
                let deployment = match deployment {
                    None => None,
                    Some(text) => Some(Deployment::decode(&text).ok_or_else(|| RegistryError::Damaged {
                        tenant: tenant.clone(),
                        worker: worker.clone(),
                        problem: format!("its deployment `{text}` is not a valid one"),
                    })?),
                };
                Ok(WorkerRecord { tenant, worker, deployment, disabled })
            })
            .collect()
    }

    /// Runs `change` on one worker's record in one write transaction, then
    /// prunes its old versions and commits; the components that pruning
    /// left unnamed are removed after the commit. `change` returns the
    /// database's errors in its outer result and a refusal, which changes
    /// nothing, in its inner one.
    fn change<R>(
        &self,
        tenant: &str,
        worker: &str,
        change: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<Result<R, RegistryError>>,
    ) -> Result<R, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.db(e))?;
        let result = change(&tx).map_err(|e| self.db(e))??;
        let pruned = self.prune(&tx, tenant, worker)?;
        tx.commit().map_err(|e| self.db(e))?;
        drop(conn);
        if pruned > 0 {
            self.remove_unnamed_components()?;
        }
        Ok(result)
    }

    /// Removes the worker's versions beyond the newest `keep` that its
    /// active deployment does not serve; how many went.
    fn prune(&self, conn: &Connection, tenant: &str, worker: &str) -> Result<usize, RegistryError> {
        let deployment: Option<String> = conn
            .query_row("SELECT deployment FROM workers WHERE tenant = ?1 AND worker = ?2", params![tenant, worker], |r| r.get(0))
            .optional()
            .map_err(|e| self.db(e))?
            .flatten();
        let active: Vec<u64> = deployment.as_deref().and_then(Deployment::decode).map(|d| d.versions().collect()).unwrap_or_default();
        let old: Vec<i64> = conn
            .prepare_cached("SELECT version FROM versions WHERE tenant = ?1 AND worker = ?2 ORDER BY version DESC LIMIT -1 OFFSET ?3")
            .and_then(|mut s| s.query_map(params![tenant, worker, self.keep as i64], |r| r.get(0))?.collect())
            .map_err(|e| self.db(e))?;
        let mut removed = 0;
        for version in old.into_iter().filter(|v| !active.contains(&(*v as u64))) {
            removed += conn
                .execute("DELETE FROM versions WHERE tenant = ?1 AND worker = ?2 AND version = ?3", params![tenant, worker, version])
                .map_err(|e| self.db(e))?;
        }
        Ok(removed)
    }

    /// Deletes the component files (and temporary files) that no version
    /// has named for [`UNNAMED_GRACE`]. Runs after the transaction that
    /// stopped naming them, so a crash in between leaves only a file too
    /// many, removed later.
    fn remove_unnamed_components(&self) -> Result<(), RegistryError> {
        let named: std::collections::HashSet<String> = {
            let conn = self.conn();
            let mut stmt = conn.prepare_cached("SELECT DISTINCT component FROM versions").map_err(|e| self.db(e))?;
            stmt.query_map([], |r| r.get(0)).and_then(|rows| rows.collect()).map_err(|e| self.db(e))?
        };
        let io = |action, source| RegistryError::Io { action, path: self.components.clone(), source };
        for entry in fs::read_dir(&self.components).map_err(|e| io("list", e))? {
            let entry = entry.map_err(|e| io("list", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let named = name.strip_suffix(".wasm").is_some_and(|hash| named.contains(hash));
            // A file that another process has just stored, or is storing,
            // is young and not named yet; one left unnamed is old.
            let age = entry.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok()).unwrap_or_default();
            if !named
                && age >= self.unnamed_grace
                && let Err(source) = fs::remove_file(entry.path())
            {
                tracing::warn!(path = %entry.path().display(), error = %source, "cannot remove a component no version names");
            }
        }
        Ok(())
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // Every change is one transaction: a panic cannot leave half of one.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn db(&self, source: rusqlite::Error) -> RegistryError {
        RegistryError::Database { path: self.path.clone(), source }
    }
}

fn read_version(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRecord> {
    let version: i64 = r.get(2)?;
    let created_ms: i64 = r.get(5)?;
    Ok(VersionRecord {
        tenant: r.get(0)?,
        worker: r.get(1)?,
        version: version as u64,
        component: ComponentHash(r.get(3)?),
        spec: r.get(4)?,
        created_ms: created_ms as u64,
        actor: r.get(6)?,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), RegistryError> {
    use std::os::unix::fs::DirBuilderExt as _;
    if !dir.exists() {
        fs::DirBuilder::new().mode(0o700).recursive(true).create(dir).map_err(|source| RegistryError::Io {
            action: "create",
            path: dir.to_path_buf(),
            source,
        })?;
    }
    cordon_disk::private_dir::check(dir)?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), RegistryError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|source| RegistryError::Io { action: "sync", path: dir.to_path_buf(), source })
}

#[cfg(test)]
mod tests;
