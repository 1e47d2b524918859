//! Encrypted secret storage: `<data_dir>/secrets.sqlite3`, every value sealed
//! with XChaCha20-Poly1305 under a key of its tenant's, derived from one
//! master key.
//!
//! Invariants, and the tests below that prove them:
//! - Plaintext never reaches the disk. Values are encrypted before SQLite
//!   sees them, there are no temporary files, and nothing is logged
//!   (`no_file_under_the_data_dir_contains_the_plaintext`). `secure_delete`
//!   zeroes the pages of deleted or overwritten ciphertext as well.
//! - A ciphertext only opens under its own identity: the tenant, worker and
//!   secret name are the associated data, so a row copied or moved to another
//!   worker or name fails to decrypt (`a_row_moved_to_another_worker_or_name_fails_to_decrypt`).
//! - A wrong master key is reported as such, on open, instead of as a pile of
//!   undecryptable rows (`a_wrong_master_key_is_refused_with_a_clear_message`).
//!   A store whose key-check record is missing is checked against a stored
//!   secret instead, and only `put` writes a key check, after checking the
//!   key: reading, listing or deleting with any key never makes that key
//!   the store's (`a_missing_key_check_never_lets_a_wrong_key_in`).
//! - The key file is created 0600 exactly once, and a key file that others
//!   could read is refused (`the_key_file_is_created_0600_and_a_0644_one_is_refused`).
//! - A data directory that another user could write is refused, with the
//!   fix, by every command that opens the key or the store
//!   (`a_data_directory_that_others_can_write_is_refused`).
//! - Secret values are never printed: `Debug` and `Display` are redacted and
//!   the memory is zeroed on drop (`debug_and_display_never_show_a_value`).
//!
//! - A rotated secret cannot be rolled back by putting an older copy of its
//!   row back: every write is a new version, in the associated data and in
//!   a sealed record of the latest versions
//!   (`an_older_copy_of_a_row_put_back_is_refused`). Whoever can replace
//!   the whole database file can still roll every secret back together.
//! - Each tenant's secrets are sealed with a key of its own, derived from
//!   the master key and a per-tenant salt ([`keys`]), and each record names
//!   the key that sealed it. The master key rotates in one transaction, and
//!   a rotation killed at any point leaves a store that opens with the old
//!   key or the new one (`a_key_file_rotation_killed_at_each_step_leaves_a_store_that_opens`,
//!   and `cordon`'s `a_rotation_killed_at_any_point_loses_nothing`). One
//!   tenant can be re-keyed alone (`a_tenant_is_rekeyed_alone`) or
//!   crypto-shredded (`a_shredded_tenant_cannot_be_recovered_from_a_copy_of_its_rows`).
//!
//! On-disk format (`PRAGMA user_version = 3`; formats 1 and 2, which sealed
//! everything with the master key itself, are upgraded on open):
//! - `meta(key TEXT PRIMARY KEY, value BLOB)`: the row `key_check` holds
//!   `nonce (24 bytes) || XChaCha20-Poly1305(KEY_CHECK_PLAINTEXT)` under the
//!   store key with associated data `KEY_CHECK_AAD`, and the row `key_id`
//!   the master key's id; both are written by the first `put`.
//! - `tenant_keys(tenant, salt)`: the random salt of each tenant's key.
//! - `secrets(tenant, worker, name, nonce, ciphertext, version, key_id)`,
//!   primary key `(tenant, worker, name)`: names are plain text (they are in
//!   the config anyway), `nonce` is 24 fresh random bytes per write and
//!   `ciphertext` is the sealed UTF-8 value followed by its 16-byte tag,
//!   under the tenant's key, with associated data
//!   `"cordon-secret-v2\0" tenant "\0" worker "\0" name "\0" version`
//!   (8 bytes, big-endian); each write of a secret adds one to its version.
//!   `key_id` is the id of the tenant key that sealed it.
//! - `meta` row `versions`: `nonce || sealed(lines of tenant \0 worker \0
//!   name \0 version)` under the store key with associated data
//!   `VERSIONS_AAD`: the latest version of every stored secret.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use chacha20poly1305::aead::rand_core::RngCore as _;
use chacha20poly1305::aead::{Aead as _, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use cordon_blocking::{BlockingPool, PoolConfig};
use cordon_config::{is_valid_binding, is_valid_name};
use rusqlite::{Connection, OptionalExtension as _, params};
use zeroize::{Zeroize as _, Zeroizing};

mod keys;

use keys::{KeyId, Keyring};
pub use keys::{NEXT_MASTER_KEY_FILE, RotationLock, next_key_path};

/// Largest secret value, in bytes.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
/// The environment variable that, when set, holds the master key as hex.
pub const MASTER_KEY_ENV: &str = "CORDON_MASTER_KEY";
/// The environment variable that holds the new master key, as hex, when
/// `cordon secret rotate-key` rotates a key that comes from the environment.
pub const NEW_MASTER_KEY_ENV: &str = "CORDON_NEW_MASTER_KEY";
/// The key file in the data directory, used when the variable is not set.
pub const MASTER_KEY_FILE: &str = "master.key";
/// The database in the data directory.
pub const DATABASE_FILE: &str = "secrets.sqlite3";

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const FORMAT_VERSION: i64 = 3;
/// The associated data of format 1, read only to upgrade a store.
const SECRET_AAD_PREFIX_V1: &[u8] = b"cordon-secret-v1\0";
const SECRET_AAD_PREFIX: &[u8] = b"cordon-secret-v2\0";
const VERSIONS_AAD: &[u8] = b"cordon-secret-versions-v1\0";
const KEY_CHECK_AAD: &[u8] = b"cordon-key-check-v1\0";
const KEY_CHECK_PLAINTEXT: &[u8] = b"cordon master key check";
/// How long a reader waits for a key file that another process has just
/// created but not yet written.
const KEY_FILE_WAIT: Duration = Duration::from_secs(2);
/// How long a statement waits for another process's write to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A secret's value. It is never printed: `Debug` and `Display` show
/// `[redacted]`, so a value cannot leak through a log line or an error
/// message by accident, and its memory is zeroed when it is dropped.
#[derive(Clone)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The plaintext. Named so that every place that reads it stands out.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The plaintext, moved out without a copy; still zeroed on drop.
    pub fn into_inner(self) -> Zeroizing<String> {
        self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a master key came from, so that a key mismatch can say which key
/// is wrong and how to change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The `CORDON_MASTER_KEY` environment variable.
    Environment,
    /// An existing key file.
    File(PathBuf),
    /// A key file that did not exist and was created just now.
    Created(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Environment => write!(f, "the {MASTER_KEY_ENV} environment variable"),
            KeySource::File(p) => write!(f, "the key file {}", p.display()),
            KeySource::Created(p) => write!(f, "the key file {}, created just now because it did not exist", p.display()),
        }
    }
}

/// The 32-byte key that every secret is encrypted with. Zeroed on drop and
/// never printed.
pub struct MasterKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    source: KeySource,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey").field("key", &format_args!("[redacted]")).field("source", &self.source).finish()
    }
}

impl MasterKey {
    /// The key from `CORDON_MASTER_KEY` (64 hex characters; anything else is
    /// an error, never a silent fallback to the file), else from
    /// `<data_dir>/master.key`.
    ///
    /// The key file is created with 32 bytes of OS randomness and mode 0600
    /// on first use. It is created with `create_new`, so when two processes
    /// race, exactly one creates it and the other reads that one's key. An
    /// existing key file that group or others can access, or that another
    /// user owns, is refused: whoever can read it can decrypt every secret.
    /// When the secrets database exists but the key file does not, no new key
    /// is created, because it could not decrypt the secrets already stored.
    pub fn load(data_dir: &Path) -> Result<(MasterKey, KeySource), VaultError> {
        Self::load_with_env(std::env::var_os(MASTER_KEY_ENV), data_dir)
    }

    /// Parses the value of `CORDON_MASTER_KEY`: 64 hexadecimal characters.
    pub fn from_env_value(value: &str) -> Result<MasterKey, VaultError> {
        Ok(MasterKey { bytes: parse_hex_key(value.as_bytes())?, source: KeySource::Environment })
    }

    /// Parses the value of `CORDON_NEW_MASTER_KEY`, the key that
    /// `cordon secret rotate-key` re-encrypts the store with when the
    /// current key comes from the environment.
    pub fn new_from_env_value(value: &str) -> Result<MasterKey, VaultError> {
        match parse_hex_key(value.as_bytes()) {
            Ok(bytes) => Ok(MasterKey { bytes, source: KeySource::Environment }),
            Err(VaultError::BadEnvKey { problem }) => Err(VaultError::BadNewKey { problem }),
            Err(e) => Err(e),
        }
    }

    /// Where this key came from.
    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// [`MasterKey::load`] with the environment variable's value passed in:
    /// for a process that has taken its secrets out of the environment, and
    /// for tests.
    pub fn load_with_env(env: Option<std::ffi::OsString>, data_dir: &Path) -> Result<(MasterKey, KeySource), VaultError> {
        if let Some(value) = env {
            let value = Zeroizing::new(value.into_encoded_bytes());
            let key = MasterKey { bytes: parse_hex_key(&value)?, source: KeySource::Environment };
            return Ok((key, KeySource::Environment));
        }
        create_private_dir(data_dir)?;
        let path = data_dir.join(MASTER_KEY_FILE);
        let bytes = match read_key_file(&path)? {
            Some(bytes) => bytes,
            None => return Self::create_key_file(data_dir, path),
        };
        let source = KeySource::File(path);
        Ok((MasterKey { bytes, source: source.clone() }, source))
    }

    fn create_key_file(data_dir: &Path, path: PathBuf) -> Result<(MasterKey, KeySource), VaultError> {
        let database = data_dir.join(DATABASE_FILE);
        if database.exists() {
            return Err(VaultError::MissingMasterKey { key_file: path, database });
        }
        let key_err = |source| VaultError::KeyFile { path: path.clone(), source };
        let mut file = match fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
            Ok(f) => f,
            // Another process created it first: use its key.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let bytes = read_key_file(&path)?.ok_or_else(|| key_err(e))?;
                let source = KeySource::File(path);
                return Ok((MasterKey { bytes, source: source.clone() }, source));
            }
            Err(e) => return Err(key_err(e)),
        };
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        let written = os_random(&mut *bytes)
            .and_then(|()| file.write_all(&*bytes))
            .and_then(|()| file.sync_all())
            .and_then(|()| fs::File::open(data_dir)?.sync_all());
        if let Err(e) = written {
            // An empty or short key file would only be refused later.
            let _ = fs::remove_file(&path);
            return Err(key_err(e));
        }
        let source = KeySource::Created(path);
        Ok((MasterKey { bytes, source: source.clone() }, source))
    }
}

/// The key in `path`, or `None` if there is no such file.
fn read_key_file(path: &Path) -> Result<Option<Zeroizing<[u8; KEY_LEN]>>, VaultError> {
    let key_err = |source| VaultError::KeyFile { path: path.to_path_buf(), source };
    let unsafe_because = |problem: String, fix: String| Err(VaultError::KeyFileUnsafe { path: path.to_path_buf(), problem, fix });
    let deadline = std::time::Instant::now() + KEY_FILE_WAIT;
    loop {
        let mut file = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(key_err(e)),
        };
        // The checks are on the opened file, so they are about the bytes read.
        let meta = file.metadata().map_err(key_err)?;
        if !meta.is_file() {
            return unsafe_because(
                "not a regular file".into(),
                format!("remove it, or replace it with the 32-byte key file: `rm -r {}`", path.display()),
            );
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != euid {
            return unsafe_because(
                format!("owned by uid {}, not by the user Cordon runs as (uid {euid})", meta.uid()),
                format!("`chown {euid} {0} && chmod 600 {0}`", path.display()),
            );
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return unsafe_because(
                format!("accessible to group or others (mode {mode:04o}), and anyone who can read it can decrypt every secret"),
                format!("`chmod 600 {}`", path.display()),
            );
        }
        if meta.len() == KEY_LEN as u64 {
            let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
            file.read_exact(&mut *bytes).map_err(key_err)?;
            return Ok(Some(bytes));
        }
        // A shorter file may be one that another process has just created
        // and is writing now.
        if meta.len() > KEY_LEN as u64 || std::time::Instant::now() >= deadline {
            return Err(VaultError::KeyFileLength { path: path.to_path_buf(), len: meta.len() });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 64 hex characters to 32 bytes. Errors describe the value's shape, never
/// its characters.
fn parse_hex_key(hex: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, VaultError> {
    if hex.len() != 2 * KEY_LEN {
        let problem = if hex.is_empty() { "it is empty".to_string() } else { format!("it is {} bytes long", hex.len()) };
        return Err(VaultError::BadEnvKey { problem });
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
        let (Some(hi), Some(lo)) = (digit(pair[0]), digit(pair[1])) else {
            return Err(VaultError::BadEnvKey { problem: "it contains characters other than 0-9, a-f and A-F".into() });
        };
        *byte = (hi << 4) | lo;
    }
    Ok(bytes)
}

/// Creates `dir` 0700 if it does not exist, and refuses one that another
/// user could write (and so delete the key or roll rows back), with the
/// `chmod` that fixes it; the stores beside the vault are checked too.
fn create_private_dir(dir: &Path) -> Result<(), VaultError> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir)
            .map_err(|source| VaultError::DataDir { path: dir.to_path_buf(), source })?;
    }
    cordon_disk::private_dir::check_data_dir(dir)?;
    Ok(())
}

/// The encrypted secrets of every worker. One SQLite connection behind a
/// mutex; other processes (`cordon secret` while `cordon serve` runs) use
/// the same file concurrently, which SQLite's locking handles.
pub struct Vault {
    conn: Mutex<Connection>,
    /// The keys derived from the master key. Replaced when another process
    /// rotated the master key and this one finds the new key in the key
    /// files ([`Vault::keys_of_store`]).
    keys: RwLock<Arc<Keyring>>,
    /// The versions record as last read, by its nonce: a secret read costs
    /// a 24-byte read and a comparison unless the record changed, rather
    /// than decrypting the record of every secret in the store.
    versions: Mutex<Option<(Vec<u8>, Arc<Versions>)>>,
    path: PathBuf,
    data_dir: PathBuf,
    /// Whether the store's key check opened with this vault's key, at open
    /// or at a put: a key id that differs later means a rotation, not a
    /// wrong key.
    keyed: AtomicBool,
    /// Started on first use, so `cordon secret` starts no threads.
    reads: OnceLock<Arc<BlockingPool>>,
}

/// The pool that serves workers' secret reads: small, because a read is one
/// indexed lookup and a decryption, and of its own, so that neither
/// key-value nor SQL calls can make a secret read wait.
pub const READ_POOL: PoolConfig = PoolConfig { name: "secrets", threads: 2, tenant_threads: 1, queue: 256, tenant_queue: 32 };

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault").field("path", &self.path).finish_non_exhaustive()
    }
}

/// What a re-encryption changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rekeyed {
    /// Secrets sealed again.
    pub secrets: usize,
    /// Tenants given a new key.
    pub tenants: usize,
    /// The master key's id before and after (the same for one tenant).
    pub old_key_id: String,
    pub new_key_id: String,
}

impl Vault {
    /// The pool that runs workers' reads ([`READ_POOL`]).
    pub fn read_pool(&self) -> &Arc<BlockingPool> {
        self.reads.get_or_init(|| Arc::new(BlockingPool::new(READ_POOL)))
    }

    /// The database file of the vault in `data_dir`, whether or not it exists.
    pub fn database_path(data_dir: &Path) -> PathBuf {
        data_dir.join(DATABASE_FILE)
    }

    /// Opens `<data_dir>/secrets.sqlite3`, creating it (mode 0600, and the
    /// data directory 0700) if needed. An open with a key other than the
    /// store's fails with [`VaultError::WrongMasterKey`] instead of failing
    /// on every secret. Opening writes no key check: the first `put` does,
    /// once it has checked the key against what is stored.
    ///
    /// A key from the key file that the store refuses is not the end: if
    /// `master.key.next` opens the store, a rotation committed but was
    /// killed before it replaced the key file, and opening finishes it.
    pub fn open(data_dir: &Path, key: MasterKey) -> Result<Vault, VaultError> {
        create_private_dir(data_dir)?;
        let path = Self::database_path(data_dir);
        // 0600, the WAL, and FULL: a write is on disk when `put` returns.
        let mut conn = cordon_disk::sqlite::open_durable(&path, BUSY_TIMEOUT)?;
        let db_err = |source| VaultError::Database { path: path.clone(), source };
        // The pages of deleted or overwritten ciphertext are zeroed.
        conn.pragma_update(None, "secure_delete", "ON").map_err(db_err)?;

        let from_key_file = matches!(key.source, KeySource::File(_));
        let mut keys = Keyring::new(key);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db_err)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(db_err)?;
        if version > FORMAT_VERSION {
            return Err(VaultError::NewerFormat { path, version });
        }
        if version == 0 {
            tx.execute_batch(SCHEMA).map_err(db_err)?;
        }
        let format = if version == 0 { FORMAT_VERSION } else { version };
        let checked = match check_key(&tx, &keys, &path, format) {
            Err(wrong @ VaultError::WrongMasterKey { .. }) if from_key_file => {
                let Some(next) = keys::next_key(data_dir)? else { return Err(wrong) };
                let next = Keyring::new(next);
                if check_key(&tx, &next, &path, format).is_err() {
                    return Err(wrong);
                }
                keys::promote_next_key(data_dir)?;
                tracing::info!(key_id = %next.id, "finished a master-key rotation that was interrupted after it re-encrypted the secrets");
                keys = next;
                KeyCheck::Matches
            }
            checked => checked?,
        };
        if format < FORMAT_VERSION {
            upgrade(&tx, &keys, format, &path)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(Vault {
            conn: Mutex::new(conn),
            keys: RwLock::new(Arc::new(keys)),
            versions: Mutex::new(None),
            path,
            data_dir: data_dir.to_path_buf(),
            keyed: AtomicBool::new(checked == KeyCheck::Matches),
            reads: OnceLock::new(),
        })
    }

    /// The id of the master key this vault holds.
    pub fn key_id(&self) -> String {
        self.keys().id.to_string()
    }

    /// Stores `value`, replacing any previous value; durable when it returns.
    pub fn put(&self, tenant: &str, worker: &str, name: &str, value: &SecretValue) -> Result<(), VaultError> {
        check_identity(tenant, worker, name)?;
        let len = value.expose().len();
        if len > MAX_SECRET_BYTES {
            return Err(VaultError::TooLarge { len, max: MAX_SECRET_BYTES });
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(|e| self.db_err(e))?;
        let keys = self.keys_of_store(&tx)?;
        // Checked again inside the write: another process may have keyed
        // the store since this one opened it.
        if check_key(&tx, &keys, &self.path, FORMAT_VERSION)? == KeyCheck::Missing {
            write_key_check(&tx, &keys, &self.path)?;
        }
        // Each write of a secret is a new version, sealed into its
        // ciphertext and recorded, sealed, in the store's list of versions.
        let mut versions = Versions::load(&tx, &keys.store, &self.path)?;
        let id = (tenant.to_string(), worker.to_string(), name.to_string());
        let version = versions.0.get(&id).map_or(1, |v| v + 1);
        let tenant_key = tenant_key(&tx, &keys, tenant, &self.path)?;
        let nonce = random_nonce()?;
        let aad = secret_aad(tenant, worker, name, version);
        let sealed =
            tenant_key.cipher.encrypt(&nonce, Payload { msg: value.expose().as_bytes(), aad: &aad }).map_err(|_| VaultError::Encrypt)?;
        tx.execute(
            "INSERT INTO secrets (tenant, worker, name, nonce, ciphertext, version, key_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (tenant, worker, name) DO UPDATE SET
                 nonce = excluded.nonce, ciphertext = excluded.ciphertext, version = excluded.version, key_id = excluded.key_id",
            params![tenant, worker, name, nonce.as_slice(), sealed, version as i64, tenant_key.id.as_str()],
        )
        .map_err(|e| self.db_err(e))?;
        versions.0.insert(id, version);
        versions.save(&tx, &keys.store, &self.path)?;
        tx.commit().map_err(|e| self.db_err(e))?;
        self.keyed.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The value of a secret, or `None` if it is not stored. A stored value
    /// that does not decrypt under this identity is an error, never `None`,
    /// and so is one that is not the latest version written (an older copy
    /// of the row put back).
    pub fn get(&self, tenant: &str, worker: &str, name: &str) -> Result<Option<SecretValue>, VaultError> {
        check_identity(tenant, worker, name)?;
        let conn = self.conn();
        let row = conn
            .query_row(
                &format!("{SELECT_ROWS} WHERE s.tenant = ?1 AND s.worker = ?2 AND s.name = ?3"),
                params![tenant, worker, name],
                StoredRow::read,
            )
            .optional()
            .map_err(|e| self.db_err(e))?;
        let Some(row) = row else { return Ok(None) };
        let undecryptable = || VaultError::Undecryptable { tenant: tenant.into(), worker: worker.into(), name: name.into() };
        let mut keys = self.keys();
        // A record sealed under another key than the one this vault derives
        // for its tenant: the master key was rotated by another process.
        if let Some(salt) = &row.salt
            && keys.tenant(tenant, salt).id.as_str() != row.key_id
        {
            keys = self.keys_of_store(&conn)?;
        }
        let mut plain = row.open(&keys, FORMAT_VERSION).ok_or_else(undecryptable)?;
        // It is this secret's, sealed as `version`: is that the latest?
        let latest = self.latest_versions(&conn, &keys)?.0.get(&(tenant.into(), worker.into(), name.into())).copied();
        drop(conn);
        if latest != Some(row.version) {
            return Err(VaultError::RolledBack {
                tenant: tenant.into(),
                worker: worker.into(),
                name: name.into(),
                version: row.version,
                latest,
            });
        }
        // Moved out, not copied: the String is zeroed by `SecretValue`.
        match String::from_utf8(std::mem::take(&mut *plain)) {
            Ok(s) => Ok(Some(SecretValue::new(s))),
            Err(e) => {
                e.into_bytes().zeroize();
                Err(undecryptable())
            }
        }
    }

    /// The names of a worker's stored secrets, sorted.
    pub fn list(&self, tenant: &str, worker: &str) -> Result<Vec<String>, VaultError> {
        check_worker(tenant, worker)?;
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT name FROM secrets WHERE tenant = ?1 AND worker = ?2 ORDER BY name").map_err(|e| self.db_err(e))?;
        let names = stmt.query_map(params![tenant, worker], |r| r.get(0)).and_then(|rows| rows.collect()).map_err(|e| self.db_err(e))?;
        Ok(names)
    }

    /// Deletes a secret; `false` if it was not stored. Its version record
    /// goes too, so an old copy of the row put back is refused.
    pub fn delete(&self, tenant: &str, worker: &str, name: &str) -> Result<bool, VaultError> {
        check_identity(tenant, worker, name)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(|e| self.db_err(e))?;
        let n = tx
            .execute("DELETE FROM secrets WHERE tenant = ?1 AND worker = ?2 AND name = ?3", params![tenant, worker, name])
            .map_err(|e| self.db_err(e))?;
        // Only when a row went: the key was then checked against the store
        // (opening checks it against a stored secret at least), so the list
        // is never sealed with a key that is not the store's.
        if n > 0 {
            let keys = self.keys_of_store(&tx)?;
            let mut versions = Versions::load(&tx, &keys.store, &self.path)?;
            versions.0.remove(&(tenant.into(), worker.into(), name.into()));
            versions.save(&tx, &keys.store, &self.path)?;
        }
        tx.commit().map_err(|e| self.db_err(e))?;
        Ok(n > 0)
    }

    /// Re-encrypts every secret under `new`, with a new salt for every
    /// tenant, and seals the key check and the versions record with it, all
    /// in one transaction: the store opens with the old key until it
    /// commits and with the new one after. A secret that does not decrypt,
    /// or is not its latest version, stops the rotation, which then changes
    /// nothing. This vault uses `new` from then on.
    pub fn rotate_master_key(&self, new: MasterKey) -> Result<Rekeyed, VaultError> {
        let new = Keyring::new(new);
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(|e| self.db_err(e))?;
        let old = self.keys_of_store(&tx)?;
        check_key(&tx, &old, &self.path, FORMAT_VERSION)?;
        let (secrets, tenants) = reseal(&tx, &old, &new, None, &self.path)?;
        write_key_check(&tx, &new, &self.path)?;
        Versions::load(&tx, &old.store, &self.path)?.save(&tx, &new.store, &self.path)?;
        tx.commit().map_err(|e| self.db_err(e))?;
        self.keyed.store(true, Ordering::Relaxed);
        let rekeyed = Rekeyed { secrets, tenants, old_key_id: old.id.to_string(), new_key_id: new.id.to_string() };
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        *self.versions.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(rekeyed)
    }

    /// Rotates the master key kept in the data directory's key file: a new
    /// random key is written to `master.key.next` and synced, the store is
    /// re-encrypted with it ([`Vault::rotate_master_key`]), and the file
    /// replaces `master.key`. Killed at any point, the store opens with one
    /// of the two files, and [`Vault::open`] finishes the rename. `lock`
    /// must have been taken before this vault was opened.
    pub fn rotate_key_file(&self, lock: &RotationLock) -> Result<Rekeyed, VaultError> {
        let new = keys::write_next_key(&self.data_dir, lock)?;
        let rekeyed = self.rotate_master_key(new)?;
        keys::promote_next_key(&self.data_dir)?;
        Ok(rekeyed)
    }

    /// Gives `tenant` a new key (a new salt) and re-encrypts its secrets
    /// under it, in one transaction. Other tenants' records are untouched.
    pub fn rekey_tenant(&self, tenant: &str) -> Result<Rekeyed, VaultError> {
        self.change_tenant(tenant, |tx, keys| {
            let (secrets, _) = reseal(tx, keys, keys, Some(tenant), &self.path)?;
            if secrets == 0 {
                return Err(VaultError::NoSecretsOfTenant { tenant: tenant.into() });
            }
            Ok(Rekeyed { secrets, tenants: 1, old_key_id: keys.id.to_string(), new_key_id: keys.id.to_string() })
        })
    }

    /// Crypto-shreds `tenant`: deletes its secrets, their versions and its
    /// key's salt in one transaction, then checkpoints the log so that the
    /// zeroed pages (`secure_delete`) replace the old ones in the database
    /// file. A copy of the tenant's records kept anywhere else cannot be
    /// decrypted without the salt, which no longer exists. Returns how many
    /// secrets went.
    pub fn shred_tenant(&self, tenant: &str) -> Result<usize, VaultError> {
        let secrets = self.change_tenant(tenant, |tx, keys| {
            let db_err = |e| self.db_err(e);
            let secrets = tx.execute("DELETE FROM secrets WHERE tenant = ?1", [tenant]).map_err(db_err)?;
            let salts = tx.execute("DELETE FROM tenant_keys WHERE tenant = ?1", [tenant]).map_err(db_err)?;
            if secrets == 0 && salts == 0 {
                return Err(VaultError::NoSecretsOfTenant { tenant: tenant.into() });
            }
            let mut versions = Versions::load(tx, &keys.store, &self.path)?;
            versions.0.retain(|(t, _, _), _| t != tenant);
            versions.save(tx, &keys.store, &self.path)?;
            Ok(secrets)
        })?;
        let conn = self.conn();
        // Readers may hold the log open; what they pin is checkpointed by
        // the next writer, and SQLite truncates the log then.
        let (busy, _, _): (i64, i64, i64) =
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(|e| self.db_err(e))?;
        if busy != 0 {
            tracing::warn!(path = %self.path.display(), "another process was reading the secrets database; its log is truncated at the next checkpoint");
        }
        Ok(secrets)
    }

    /// Runs `change` on `tenant`'s records in one write transaction, with
    /// the keys the store is sealed with (checked first); commits if it
    /// succeeds, changes nothing if it fails.
    fn change_tenant<R>(
        &self,
        tenant: &str,
        change: impl FnOnce(&rusqlite::Transaction<'_>, &Keyring) -> Result<R, VaultError>,
    ) -> Result<R, VaultError> {
        if !is_valid_name(tenant) {
            return Err(VaultError::InvalidName { what: "tenant", name: tenant.into() });
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(|e| self.db_err(e))?;
        let keys = self.keys_of_store(&tx)?;
        check_key(&tx, &keys, &self.path, FORMAT_VERSION)?;
        let result = change(&tx, &keys)?;
        tx.commit().map_err(|e| self.db_err(e))?;
        Ok(result)
    }

    /// The keys that open the store now. Another process may have rotated
    /// the master key since this vault opened: then the key files hold the
    /// new key (this vault's came from them), or the new key is in another
    /// process's environment and this one must be restarted with it.
    fn keys_of_store(&self, conn: &Connection) -> Result<Arc<Keyring>, VaultError> {
        let ours = self.keys();
        let stored: Option<Vec<u8>> =
            conn.query_row("SELECT value FROM meta WHERE key = 'key_id'", [], |r| r.get(0)).optional().map_err(|e| self.db_err(e))?;
        let Some(stored) = stored.map(|id| KeyId::from_stored(String::from_utf8_lossy(&id).into_owned())) else { return Ok(ours) };
        if stored == ours.id {
            return Ok(ours);
        }
        let found = match ours.source {
            KeySource::File(_) | KeySource::Created(_) => keys::find_key_file(&self.data_dir, &stored)?,
            KeySource::Environment => None,
        };
        let Some(found) = found else {
            if !self.keyed.load(Ordering::Relaxed) {
                return Err(VaultError::WrongMasterKey { database: self.path.clone(), key: ours.source.clone() });
            }
            return Err(VaultError::KeyRotated {
                database: self.path.clone(),
                key: ours.source.clone(),
                ours: ours.id.to_string(),
                store: stored.to_string(),
            });
        };
        let found = Arc::new(found);
        tracing::info!(key_id = %found.id, "the secret store's master key was rotated; using the new key");
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = found.clone();
        *self.versions.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(found)
    }

    fn keys(&self) -> Arc<Keyring> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The versions record, decrypted again only when its nonce (fresh at
    /// every save) is not the one read last. A record put back from an older
    /// copy has another nonce, so it is decrypted and checked like any.
    fn latest_versions(&self, conn: &Connection, keys: &Keyring) -> Result<Arc<Versions>, VaultError> {
        let nonce: Option<Vec<u8>> = conn
            .query_row("SELECT substr(value, 1, ?1) FROM meta WHERE key = 'versions'", [NONCE_LEN as i64], |r| r.get(0))
            .optional()
            .map_err(|e| self.db_err(e))?;
        let mut cached = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(nonce), Some((seen, versions))) = (&nonce, cached.as_ref())
            && nonce == seen
        {
            return Ok(versions.clone());
        }
        let (nonce, versions) = Versions::load_with_nonce(conn, &keys.store, &self.path)?;
        let versions = Arc::new(versions);
        *cached = nonce.map(|n| (n, versions.clone()));
        Ok(versions)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done write:
        // every write is one SQLite transaction.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn db_err(&self, source: rusqlite::Error) -> VaultError {
        VaultError::Database { path: self.path.clone(), source }
    }
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) STRICT;
     CREATE TABLE IF NOT EXISTS tenant_keys (tenant TEXT PRIMARY KEY, salt BLOB NOT NULL) STRICT;
     CREATE TABLE IF NOT EXISTS secrets (
         tenant TEXT NOT NULL,
         worker TEXT NOT NULL,
         name TEXT NOT NULL,
         nonce BLOB NOT NULL,
         ciphertext BLOB NOT NULL,
         version INTEGER NOT NULL,
         key_id TEXT NOT NULL,
         PRIMARY KEY (tenant, worker, name)
     ) STRICT;
     PRAGMA user_version = 3;";

/// A stored secret with what is needed to open it. The columns that older
/// formats lack read as constants (see [`select_rows`]).
struct StoredRow {
    tenant: String,
    worker: String,
    name: String,
    version: u64,
    nonce: Vec<u8>,
    sealed: Vec<u8>,
    /// The id of the tenant key that sealed it (format 3).
    key_id: String,
    /// The salt of its tenant's key (format 3), `None` if the tenant has none.
    salt: Option<Vec<u8>>,
}

const SELECT_ROWS: &str = "SELECT s.tenant, s.worker, s.name, s.version, s.nonce, s.ciphertext, s.key_id, k.salt
     FROM secrets s LEFT JOIN tenant_keys k ON k.tenant = s.tenant";

/// The query for every row of a store in `format`.
fn select_rows(format: i64) -> &'static str {
    match format {
        1 => "SELECT tenant, worker, name, 1, nonce, ciphertext, '', NULL FROM secrets s",
        2 => "SELECT tenant, worker, name, version, nonce, ciphertext, '', NULL FROM secrets s",
        _ => SELECT_ROWS,
    }
}

impl StoredRow {
    fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredRow> {
        let version: i64 = r.get(3)?;
        Ok(StoredRow {
            tenant: r.get(0)?,
            worker: r.get(1)?,
            name: r.get(2)?,
            version: version as u64,
            nonce: r.get(4)?,
            sealed: r.get(5)?,
            key_id: r.get(6)?,
            salt: r.get(7)?,
        })
    }

    /// The plaintext, if this row opens under `keys` as `format` sealed it.
    fn open(&self, keys: &Keyring, format: i64) -> Option<Zeroizing<Vec<u8>>> {
        let (tenant, worker, name) = (&self.tenant, &self.worker, &self.name);
        match format {
            1 => open_secret(&keys.legacy, &self.nonce, &self.sealed, &secret_aad_v1(tenant, worker, name)),
            2 => open_secret(&keys.legacy, &self.nonce, &self.sealed, &secret_aad(tenant, worker, name, self.version)),
            _ => {
                let key = keys.tenant(tenant, self.salt.as_deref()?);
                open_secret(&key.cipher, &self.nonce, &self.sealed, &secret_aad(tenant, worker, name, self.version))
            }
        }
    }

    fn undecryptable(&self) -> VaultError {
        VaultError::Undecryptable { tenant: self.tenant.clone(), worker: self.worker.clone(), name: self.name.clone() }
    }
}

/// The key of `tenant`, with a salt created for it if it has none yet.
fn tenant_key(conn: &Connection, keys: &Keyring, tenant: &str, path: &Path) -> Result<keys::TenantKey, VaultError> {
    let db_err = |source| VaultError::Database { path: path.to_path_buf(), source };
    let salt: Option<Vec<u8>> =
        conn.query_row("SELECT salt FROM tenant_keys WHERE tenant = ?1", [tenant], |r| r.get(0)).optional().map_err(db_err)?;
    let salt = match salt {
        Some(salt) => salt,
        None => {
            let salt = keys::new_salt()?;
            conn.execute("INSERT INTO tenant_keys (tenant, salt) VALUES (?1, ?2)", params![tenant, salt.as_slice()]).map_err(db_err)?;
            salt.to_vec()
        }
    };
    Ok(keys.tenant(tenant, &salt))
}

/// Re-encrypts the secrets of `only` (or of every tenant) from `old` to
/// `new`, giving each tenant concerned a new salt, inside the caller's
/// transaction. Every row must open under `old` and be its latest version.
/// Returns how many rows were sealed again, and for how many tenants.
fn reseal(conn: &Connection, old: &Keyring, new: &Keyring, only: Option<&str>, path: &Path) -> Result<(usize, usize), VaultError> {
    let db_err = |source| VaultError::Database { path: path.to_path_buf(), source };
    let latest = Versions::load(conn, &old.store, path)?;
    let rows: Vec<StoredRow> = match only {
        Some(tenant) => {
            conn.prepare(&format!("{SELECT_ROWS} WHERE s.tenant = ?1")).and_then(|mut s| s.query_map([tenant], StoredRow::read)?.collect())
        }
        None => conn.prepare(SELECT_ROWS).and_then(|mut s| s.query_map([], StoredRow::read)?.collect()),
    }
    .map_err(db_err)?;
    let tenants: Vec<String> = match only {
        Some(tenant) => vec![tenant.to_string()],
        None => {
            conn.prepare("SELECT tenant FROM tenant_keys").and_then(|mut s| s.query_map([], |r| r.get(0))?.collect()).map_err(db_err)?
        }
    };
    let mut new_keys = BTreeMap::new();
    for tenant in tenants {
        let salt = keys::new_salt()?;
        conn.execute(
            "INSERT INTO tenant_keys (tenant, salt) VALUES (?1, ?2) ON CONFLICT (tenant) DO UPDATE SET salt = excluded.salt",
            params![tenant, salt.as_slice()],
        )
        .map_err(db_err)?;
        new_keys.insert(tenant.clone(), new.tenant(&tenant, &salt));
    }
    for row in &rows {
        let plain = row.open(old, FORMAT_VERSION).ok_or_else(|| row.undecryptable())?;
        check_latest(&latest, row)?;
        let key = new_keys.get(&row.tenant).ok_or_else(|| row.undecryptable())?;
        seal_row(conn, row, &plain, row.version, key, path)?;
    }
    Ok((rows.len(), new_keys.len()))
}

/// Refuses a row that is not the latest version of its secret.
fn check_latest(latest: &Versions, row: &StoredRow) -> Result<(), VaultError> {
    let recorded = latest.0.get(&(row.tenant.clone(), row.worker.clone(), row.name.clone())).copied();
    if recorded == Some(row.version) {
        return Ok(());
    }
    Err(VaultError::RolledBack {
        tenant: row.tenant.clone(),
        worker: row.worker.clone(),
        name: row.name.clone(),
        version: row.version,
        latest: recorded,
    })
}

/// Writes `plain` back into `row`'s place, sealed as `version` under `key`
/// with a fresh nonce.
fn seal_row(conn: &Connection, row: &StoredRow, plain: &[u8], version: u64, key: &keys::TenantKey, path: &Path) -> Result<(), VaultError> {
    let nonce = random_nonce()?;
    let aad = secret_aad(&row.tenant, &row.worker, &row.name, version);
    let sealed = key.cipher.encrypt(&nonce, Payload { msg: plain, aad: &aad }).map_err(|_| VaultError::Encrypt)?;
    conn.execute(
        "UPDATE secrets SET nonce = ?4, ciphertext = ?5, version = ?6, key_id = ?7 WHERE tenant = ?1 AND worker = ?2 AND name = ?3",
        params![row.tenant, row.worker, row.name, nonce.as_slice(), sealed, version as i64, key.id.as_str()],
    )
    .map_err(|source| VaultError::Database { path: path.to_path_buf(), source })?;
    Ok(())
}

/// Seals the key check with `keys` and records its key id.
fn write_key_check(conn: &Connection, keys: &Keyring, path: &Path) -> Result<(), VaultError> {
    let record = seal_record(&keys.store, KEY_CHECK_PLAINTEXT, KEY_CHECK_AAD)?;
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('key_check', ?1), ('key_id', ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![record, keys.id.as_str().as_bytes()],
    )
    .map_err(|source| VaultError::Database { path: path.to_path_buf(), source })?;
    Ok(())
}

/// What [`check_key`] found.
#[derive(Debug, PartialEq, Eq)]
enum KeyCheck {
    /// The key-check record opens with this key.
    Matches,
    /// There is no key-check record, and no stored secret refuses the key:
    /// the store is empty, or its record was lost and a secret opened.
    Missing,
}

/// Whether `keys` are those of the store behind `conn`, as `format` keyed
/// it: by its key-check record, or, when the record is missing, by one
/// stored secret. A store with secrets but no record is damaged or was
/// edited; a key that cannot open its secrets is refused rather than made
/// the store's.
fn check_key(conn: &Connection, keys: &Keyring, path: &Path, format: i64) -> Result<KeyCheck, VaultError> {
    let db_err = |source| VaultError::Database { path: path.to_path_buf(), source };
    let wrong = || VaultError::WrongMasterKey { database: path.to_path_buf(), key: keys.source.clone() };
    let sealer = if format >= 3 { &keys.store } else { &keys.legacy };
    let check: Option<Vec<u8>> =
        conn.query_row("SELECT value FROM meta WHERE key = 'key_check'", [], |r| r.get(0)).optional().map_err(db_err)?;
    if let Some(record) = check {
        let opened = open_record(sealer, &record, KEY_CHECK_AAD);
        return if opened.is_some_and(|plain| plain.as_slice() == KEY_CHECK_PLAINTEXT) { Ok(KeyCheck::Matches) } else { Err(wrong()) };
    }
    let row = conn.query_row(&format!("{} LIMIT 1", select_rows(format)), [], StoredRow::read).optional().map_err(db_err)?;
    match row {
        None => Ok(KeyCheck::Missing),
        Some(row) if row.open(keys, format).is_some() => Ok(KeyCheck::Missing),
        Some(_) => Err(VaultError::KeyCheckLost { database: path.to_path_buf(), key: keys.source.clone() }),
    }
}

/// `nonce || XChaCha20-Poly1305(plaintext)` under `aad`, with a fresh
/// nonce: how the `meta` records are stored.
fn seal_record(cipher: &XChaCha20Poly1305, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, VaultError> {
    let nonce = random_nonce()?;
    let sealed = cipher.encrypt(&nonce, Payload { msg: plaintext, aad }).map_err(|_| VaultError::Encrypt)?;
    Ok([nonce.as_slice(), &sealed].concat())
}

/// The plaintext of a [`seal_record`] record, or `None` if it does not
/// open under `aad` with this key.
fn open_record(cipher: &XChaCha20Poly1305, record: &[u8], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let (nonce, sealed) = record.split_at_checked(NONCE_LEN)?;
    open_secret(cipher, nonce, sealed, aad)
}

/// The plaintext of a stored secret's `nonce` and `sealed` value under
/// `aad`, zeroed when dropped; `None` if it does not open.
fn open_secret(cipher: &XChaCha20Poly1305, nonce: &[u8], sealed: &[u8], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if nonce.len() != NONCE_LEN {
        return None;
    }
    cipher.decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad }).ok().map(Zeroizing::new)
}

fn random_nonce() -> Result<XNonce, VaultError> {
    let mut nonce = XNonce::default();
    os_random(&mut nonce).map_err(VaultError::Random)?;
    Ok(nonce)
}

/// Fills `buf` from the OS (getrandom), failing rather than panicking.
fn os_random(buf: &mut [u8]) -> std::io::Result<()> {
    OsRng.try_fill_bytes(buf).map_err(|e| std::io::Error::other(e.to_string()))
}

/// Binds a ciphertext to its identity and version. Names never contain NUL
/// (they are validated), so the encoding is unambiguous.
fn secret_aad(tenant: &str, worker: &str, name: &str, version: u64) -> Vec<u8> {
    [SECRET_AAD_PREFIX, tenant.as_bytes(), b"\0", worker.as_bytes(), b"\0", name.as_bytes(), b"\0", &version.to_be_bytes()].concat()
}

/// The associated data of format 1: identity only.
fn secret_aad_v1(tenant: &str, worker: &str, name: &str) -> Vec<u8> {
    [SECRET_AAD_PREFIX_V1, tenant.as_bytes(), b"\0", worker.as_bytes(), b"\0", name.as_bytes()].concat()
}

/// The latest version of every stored secret, kept sealed in the `meta` row
/// `versions` and rewritten in the same transaction as every `put` and
/// `delete`. A row whose version is not the one recorded here (an older copy
/// put back after a rotation, or a deleted one) is refused. Only replacing
/// the whole database file, this record with it, can roll secrets back.
#[derive(Default)]
struct Versions(BTreeMap<(String, String, String), u64>);

impl Versions {
    fn load(conn: &Connection, cipher: &XChaCha20Poly1305, path: &Path) -> Result<Versions, VaultError> {
        Ok(Self::load_with_nonce(conn, cipher, path)?.1)
    }

    /// The record's nonce (fresh at every save, so it names the record's
    /// content) and what it holds; no nonce when there is no record.
    fn load_with_nonce(conn: &Connection, cipher: &XChaCha20Poly1305, path: &Path) -> Result<(Option<Vec<u8>>, Versions), VaultError> {
        let db_err = |source| VaultError::Database { path: path.to_path_buf(), source };
        let damaged = || VaultError::VersionsDamaged { database: path.to_path_buf() };
        let record: Option<Vec<u8>> =
            conn.query_row("SELECT value FROM meta WHERE key = 'versions'", [], |r| r.get(0)).optional().map_err(db_err)?;
        let Some(record) = record else { return Ok((None, Versions::default())) };
        let mut plain = open_record(cipher, &record, VERSIONS_AAD).ok_or_else(damaged)?;
        let text = String::from_utf8(std::mem::take(&mut *plain)).map_err(|_| damaged())?;
        let mut map = BTreeMap::new();
        for line in text.lines() {
            let mut fields = line.split('\0');
            let (Some(t), Some(w), Some(n), Some(v), None) = (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(damaged());
            };
            map.insert((t.to_string(), w.to_string(), n.to_string()), v.parse().map_err(|_| damaged())?);
        }
        Ok((Some(record[..NONCE_LEN].to_vec()), Versions(map)))
    }

    fn save(&self, conn: &Connection, cipher: &XChaCha20Poly1305, path: &Path) -> Result<(), VaultError> {
        let text: String = self.0.iter().map(|((t, w, n), v)| format!("{t}\0{w}\0{n}\0{v}\n")).collect();
        let record = seal_record(cipher, text.as_bytes(), VERSIONS_AAD)?;
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('versions', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [record],
        )
        .map_err(|source| VaultError::Database { path: path.to_path_buf(), source })?;
        Ok(())
    }
}

/// Moves a store of format 1 or 2 to format 3 inside the caller's
/// transaction: each secret is decrypted as its format sealed it (with the
/// master key itself) and sealed again under its tenant's key, and the key
/// check and the versions record are sealed again with the store key. The
/// key was checked before; a secret that does not decrypt stops the
/// upgrade, which then changes nothing. A format-2 store keeps its versions
/// record, so a row that was rolled back before the upgrade is still
/// refused after it.
fn upgrade(conn: &Connection, keys: &Keyring, format: i64, path: &Path) -> Result<(), VaultError> {
    let db_err = |source| VaultError::Database { path: path.to_path_buf(), source };
    let rows: Vec<StoredRow> =
        conn.prepare(select_rows(format)).and_then(|mut s| s.query_map([], StoredRow::read)?.collect()).map_err(db_err)?;
    let mut versions = if format == 2 { Versions::load(conn, &keys.legacy, path)? } else { Versions::default() };
    let keyed: i64 = conn.query_row("SELECT count(*) FROM meta WHERE key = 'key_check'", [], |r| r.get(0)).map_err(db_err)?;
    if format == 1 {
        conn.execute_batch("ALTER TABLE secrets ADD COLUMN version INTEGER NOT NULL DEFAULT 1").map_err(db_err)?;
    }
    conn.execute_batch(
        "ALTER TABLE secrets ADD COLUMN key_id TEXT NOT NULL DEFAULT '';
         CREATE TABLE tenant_keys (tenant TEXT PRIMARY KEY, salt BLOB NOT NULL) STRICT;",
    )
    .map_err(db_err)?;
    let mut tenant_keys = BTreeMap::new();
    for row in &rows {
        let plain = row.open(keys, format).ok_or_else(|| row.undecryptable())?;
        if !tenant_keys.contains_key(&row.tenant) {
            tenant_keys.insert(row.tenant.clone(), tenant_key(conn, keys, &row.tenant, path)?);
        }
        seal_row(conn, row, &plain, row.version, &tenant_keys[&row.tenant], path)?;
        if format == 1 {
            versions.0.insert((row.tenant.clone(), row.worker.clone(), row.name.clone()), row.version);
        }
    }
    if keyed > 0 || !rows.is_empty() {
        write_key_check(conn, keys, path)?;
    }
    if versions.0.is_empty() {
        conn.execute("DELETE FROM meta WHERE key = 'versions'", []).map_err(db_err)?;
    } else {
        versions.save(conn, &keys.store, path)?;
    }
    conn.execute_batch("PRAGMA user_version = 3").map_err(db_err)?;
    tracing::info!(path = %path.display(), from = format, secrets = rows.len(), "the secrets database was upgraded to format 3 (a key per tenant)");
    Ok(())
}
fn check_worker(tenant: &str, worker: &str) -> Result<(), VaultError> {
    if !is_valid_name(tenant) {
        return Err(VaultError::InvalidName { what: "tenant", name: tenant.into() });
    }
    if !is_valid_name(worker) {
        return Err(VaultError::InvalidName { what: "worker", name: worker.into() });
    }
    Ok(())
}

fn check_identity(tenant: &str, worker: &str, name: &str) -> Result<(), VaultError> {
    check_worker(tenant, worker)?;
    if !is_valid_binding(name) {
        return Err(VaultError::InvalidName { what: "secret", name: name.into() });
    }
    Ok(())
}

/// Errors of the vault. None of them ever contains a secret value or key.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(
        "{MASTER_KEY_ENV} must be 64 hexadecimal characters (a 32-byte key), but {problem}; \
         set it to the key the secrets were encrypted with (a new one can be made with `openssl rand -hex 32`), \
         or unset it to use the key file in the data directory"
    )]
    BadEnvKey { problem: String },
    #[error(
        "{NEW_MASTER_KEY_ENV} must be 64 hexadecimal characters (a 32-byte key), but {problem}; make one with \
         `openssl rand -hex 32` and keep it where you keep {MASTER_KEY_ENV} before rotating"
    )]
    BadNewKey { problem: String },
    /// Another process rotated the master key, and this one cannot find
    /// the new key.
    #[error(
        "the master key of {} was rotated (its key id is now {store}, and {key} holds key {ours}); \
         restart with the new key in {MASTER_KEY_ENV}, or restore the key file that holds it",
        database.display()
    )]
    KeyRotated { database: PathBuf, key: KeySource, ours: String, store: String },
    #[error("no secret of tenant `{tenant}` is stored, so there is nothing to re-key or shred")]
    NoSecretsOfTenant { tenant: String },
    #[error("cannot read or create the master key file {}: {source}", path.display())]
    KeyFile { path: PathBuf, source: std::io::Error },
    #[error("the master key file {} is {problem}; fix it with {fix}", path.display())]
    KeyFileUnsafe { path: PathBuf, problem: String, fix: String },
    #[error(
        "the master key file {} is {len} bytes long, but a key is exactly 32 bytes; restore it from a backup, \
         or, if no secret has been stored yet, remove it so that Cordon creates a new one",
        path.display()
    )]
    KeyFileLength { path: PathBuf, len: u64 },
    #[error(
        "secrets are stored in {} but there is no master key: {MASTER_KEY_ENV} is not set and {} does not exist. \
         Set {MASTER_KEY_ENV} or restore the key file to the key the secrets were encrypted with; \
         without it they cannot be read (if they are expendable, remove {0} and its -wal and -shm files)",
        database.display(),
        key_file.display()
    )]
    MissingMasterKey { key_file: PathBuf, database: PathBuf },
    #[error(
        "the master key from {key} does not match the key that the secrets in {} were encrypted with; {}",
        database.display(),
        wrong_key_help(key)
    )]
    WrongMasterKey { database: PathBuf, key: KeySource },
    /// A stored secret is not the latest version written: an older copy of
    /// its row was put back, or it was deleted and put back.
    #[error(
        "the stored secret `{name}` of worker `{worker}` (tenant `{tenant}`) is version {version}, but {}: \
         an older copy of it was put back into the store. Store it again with `cordon secret put`, and find out \
         who could write the data directory",
        match latest { Some(v) => format!("the latest version written is {v}"), None => "no version of it is recorded".to_string() }
    )]
    RolledBack { tenant: String, worker: String, name: String, version: u64, latest: Option<u64> },
    /// The sealed record of the secrets' versions does not open.
    #[error(
        "the record of secret versions in {} cannot be decrypted: the store was damaged or edited; restore it from a \
         backup, or remove it and store the secrets again",
        database.display()
    )]
    VersionsDamaged { database: PathBuf },
    /// The store holds secrets but lost its key-check record, and its
    /// secrets do not open with the key given.
    #[error(
        "the secrets database {} has lost its key-check record (it was damaged or edited), and its secrets do not decrypt \
         with the master key from {key}, so that key is refused and nothing was written. Use the key the secrets were \
         stored with ({}); the next `cordon secret put` with it writes the record again",
        database.display(),
        wrong_key_help(key)
    )]
    KeyCheckLost { database: PathBuf, key: KeySource },
    #[error("cannot create {}: {source}", path.display())]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    NotPrivate(#[from] cordon_disk::private_dir::NotPrivate),
    #[error("cannot open the secrets database: {0}")]
    Open(#[from] cordon_disk::sqlite::OpenError),
    #[error("the secrets database {}: {source}", path.display())]
    Database { path: PathBuf, source: rusqlite::Error },
    #[error("the secrets database {} has format version {version}, newer than this Cordon understands ({FORMAT_VERSION}); upgrade Cordon", path.display())]
    NewerFormat { path: PathBuf, version: i64 },
    #[error("`{name}` is not a valid {what} name")]
    InvalidName { what: &'static str, name: String },
    #[error("the value is {len} bytes; a secret can be at most {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error(
        "the stored secret `{name}` of worker `{worker}` (tenant `{tenant}`) cannot be decrypted: it was damaged, \
         or copied from another worker or name; store it again with `cordon secret put`"
    )]
    Undecryptable { tenant: String, worker: String, name: String },
    #[error("encryption failed")]
    Encrypt,
    #[error("cannot get random bytes from the operating system: {0}")]
    Random(std::io::Error),
}

fn wrong_key_help(key: &KeySource) -> String {
    match key {
        KeySource::Environment => format!(
            "set {MASTER_KEY_ENV} to the key used before, or unset it if the secrets were stored with the key file in the data directory"
        ),
        KeySource::File(p) => {
            format!(
                "restore {} from a backup, or set {MASTER_KEY_ENV} if the secrets were stored with a key from the environment",
                p.display()
            )
        }
        KeySource::Created(p) => format!(
            "{} was missing and a new key was created; remove it and restore the original key file, or set {MASTER_KEY_ENV}",
            p.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    const KEY_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const KEY_B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    fn key(hex: &str) -> MasterKey {
        MasterKey::from_env_value(hex).unwrap()
    }

    fn secret(s: &str) -> SecretValue {
        SecretValue::new(s.to_string())
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o777
    }

    /// Every file under `dir`, recursively.
    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() { out.extend(files(&path)) } else { out.push(path) }
        }
        out
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn put_get_list_delete_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::open(dir.path(), key(KEY_A)).unwrap();
        assert!(vault.get("acme", "notes", "API_KEY").unwrap().is_none());
        vault.put("acme", "notes", "API_KEY", &secret("one")).unwrap();
        vault.put("acme", "notes", "DB_PASSWORD", &secret("two")).unwrap();
        vault.put("acme", "other", "API_KEY", &secret("three")).unwrap();
        vault.put("globex", "notes", "API_KEY", &secret("four")).unwrap();
        assert_eq!(vault.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "one");
        assert_eq!(vault.get("globex", "notes", "API_KEY").unwrap().unwrap().expose(), "four");
        assert_eq!(vault.list("acme", "notes").unwrap(), ["API_KEY", "DB_PASSWORD"]);
        assert!(vault.list("acme", "nobody").unwrap().is_empty());

        vault.put("acme", "notes", "API_KEY", &secret("one, again")).unwrap();
        assert_eq!(vault.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "one, again");

        assert!(vault.delete("acme", "notes", "API_KEY").unwrap());
        assert!(!vault.delete("acme", "notes", "API_KEY").unwrap());
        assert!(vault.get("acme", "notes", "API_KEY").unwrap().is_none());
        assert_eq!(vault.list("acme", "notes").unwrap(), ["DB_PASSWORD"]);
        assert_eq!(vault.get("acme", "other", "API_KEY").unwrap().unwrap().expose(), "three");

        // Durable across a reopen with the same key.
        drop(vault);
        let vault = Vault::open(dir.path(), key(KEY_A)).unwrap();
        assert_eq!(vault.get("acme", "notes", "DB_PASSWORD").unwrap().unwrap().expose(), "two");
    }

    #[test]
    fn names_and_sizes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::open(dir.path(), key(KEY_A)).unwrap();
        for (tenant, worker, name) in [("Acme", "notes", "K"), ("acme", "no/tes", "K"), ("acme", "notes", "1K"), ("acme", "notes", "")] {
            let err = vault.put(tenant, worker, name, &secret("v")).unwrap_err();
            assert!(matches!(err, VaultError::InvalidName { .. }), "{err}");
            assert!(vault.get(tenant, worker, name).is_err());
        }
        let big = "x".repeat(MAX_SECRET_BYTES);
        vault.put("acme", "notes", "BIG", &secret(&big)).unwrap();
        assert_eq!(vault.get("acme", "notes", "BIG").unwrap().unwrap().expose().len(), MAX_SECRET_BYTES);
        let err = vault.put("acme", "notes", "BIG", &SecretValue::new(format!("{big}y"))).unwrap_err();
        assert!(matches!(err, VaultError::TooLarge { len, .. } if len == MAX_SECRET_BYTES + 1), "{err}");
        assert!(!err.to_string().contains("xxxx"), "{err}");
    }

    #[test]
    fn no_file_under_the_data_dir_contains_the_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (master, _) = MasterKey::load_with_env(None, &data).unwrap();
        let vault = Vault::open(&data, master).unwrap();
        let plain = "sup3r-s3cret-VALUE-xyz";
        let overwritten = "0ld-s3cret-OVERWRITTEN-abc";
        let deleted = "g0ne-s3cret-DELETED-def";
        vault.put("acme", "notes", "API_KEY", &secret(overwritten)).unwrap();
        vault.put("acme", "notes", "API_KEY", &secret(plain)).unwrap();
        vault.put("acme", "notes", "OLD", &secret(deleted)).unwrap();
        assert!(vault.delete("acme", "notes", "OLD").unwrap());

        let check = |when: &str| {
            let all = files(&data);
            assert!(all.iter().any(|p| p.ends_with(DATABASE_FILE)), "{all:?}");
            for path in all {
                let bytes = fs::read(&path).unwrap();
                for needle in [plain, overwritten, deleted] {
                    assert!(!contains(&bytes, needle.as_bytes()), "{when}: {} contains {needle:?}", path.display());
                }
            }
        };
        // With the WAL still holding the writes, then after a checkpoint.
        assert!(data.join(format!("{DATABASE_FILE}-wal")).exists());
        check("while open");
        drop(vault);
        check("after close");
        let vault = Vault::open(&data, key_of(&data)).unwrap();
        assert_eq!(vault.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), plain);
    }

    fn key_of(data: &Path) -> MasterKey {
        MasterKey::load_with_env(None, data).unwrap().0
    }

    #[test]
    fn a_wrong_master_key_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::open(dir.path(), key(KEY_A)).unwrap();
        vault.put("acme", "notes", "API_KEY", &secret("v")).unwrap();
        drop(vault);

        let err = Vault::open(dir.path(), key(KEY_B)).unwrap_err();
        assert!(matches!(err, VaultError::WrongMasterKey { key: KeySource::Environment, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("does not match the key that the secrets in"), "{msg}");
        assert!(msg.contains(MASTER_KEY_ENV) && msg.contains(DATABASE_FILE), "{msg}");
        assert!(!msg.contains(KEY_A) && !msg.contains(KEY_B), "{msg}");

        // A key file that is not the one used before names the file.
        fs::write(dir.path().join(MASTER_KEY_FILE), [7u8; 32]).unwrap();
        fs::set_permissions(dir.path().join(MASTER_KEY_FILE), fs::Permissions::from_mode(0o600)).unwrap();
        let err = Vault::open(dir.path(), key_of(dir.path())).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, VaultError::WrongMasterKey { key: KeySource::File(_), .. }), "{msg}");
        assert!(msg.contains(&format!("the key file {}", dir.path().join(MASTER_KEY_FILE).display())), "{msg}");

        // The right key still works.
        let vault = Vault::open(dir.path(), key(KEY_A)).unwrap();
        assert_eq!(vault.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "v");
    }

    /// The key-check record of the store in `dir`, if any.
    fn key_check_of(dir: &Path) -> Option<Vec<u8>> {
        let conn = Connection::open(dir.join(DATABASE_FILE)).unwrap();
        conn.query_row("SELECT value FROM meta WHERE key = 'key_check'", [], |r| r.get(0)).optional().unwrap()
    }

    #[test]
    fn a_missing_key_check_never_lets_a_wrong_key_in() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::open(dir.path(), key(KEY_A)).unwrap();
        vault.put("acme", "notes", "API_KEY", &secret("v")).unwrap();
        drop(vault);
        // The record is lost (damage, or an edit).
        Connection::open(dir.path().join(DATABASE_FILE)).unwrap().execute("DELETE FROM meta WHERE key = 'key_check'", []).unwrap();

        // Another key is refused, whatever the command: it cannot open the
        // stored secret, and it writes nothing.
        let err = Vault::open(dir.path(), key(KEY_B)).unwrap_err();
        assert!(matches!(err, VaultError::KeyCheckLost { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("lost its key-check record") && msg.contains("nothing was written"), "{msg}");
        assert!(msg.contains(MASTER_KEY_ENV), "the message says which key to use: {msg}");
        assert_eq!(key_check_of(dir.path()), None);

        // The right key opens it; reading, listing and deleting write no record.
        let vault = Vault::open(dir.path(), key(KEY_A)).unwrap();
        assert_eq!(vault.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "v");
        assert_eq!(vault.list("acme", "notes").unwrap(), ["API_KEY"]);
        assert!(!vault.delete("acme", "notes", "OTHER").unwrap());
        assert_eq!(key_check_of(dir.path()), None);
        // A put with the right key writes it again, and then a wrong key is
        // refused by the record.
        vault.put("acme", "notes", "SECOND", &secret("w")).unwrap();
        assert!(key_check_of(dir.path()).is_some());
        drop(vault);
        assert!(matches!(Vault::open(dir.path(), key(KEY_B)).unwrap_err(), VaultError::WrongMasterKey { .. }));
    }

    #[test]
    fn an_empty_store_takes_the_key_of_its_first_put_not_of_a_read() {
        let dir = tempfile::tempdir().unwrap();
        // `cordon secret list` with some key on a new store writes nothing.
        let reader = Vault::open(dir.path(), key(KEY_B)).unwrap();
        assert!(reader.list("acme", "notes").unwrap().is_empty());
        assert_eq!(key_check_of(dir.path()), None);
        // The first put keys the store.
        let writer = Vault::open(dir.path(), key(KEY_A)).unwrap();
        writer.put("acme", "notes", "API_KEY", &secret("v")).unwrap();
        // A writer with another key that opened the store before then is
        // refused at its own put: two keys never mix in one store.
        let err = reader.put("acme", "notes", "OTHER", &secret("x")).unwrap_err();
        assert!(matches!(err, VaultError::WrongMasterKey { .. }), "{err:?}");
        assert_eq!(writer.list("acme", "notes").unwrap(), ["API_KEY"]);
        drop((reader, writer));
        assert!(matches!(Vault::open(dir.path(), key(KEY_B)).unwrap_err(), VaultError::WrongMasterKey { .. }));
    }

    #[test]
    fn a_data_directory_that_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        Vault::open(&data, key(KEY_A)).unwrap().put("acme", "notes", "API_KEY", &secret("v")).unwrap();
        fs::set_permissions(&data, fs::Permissions::from_mode(0o777)).unwrap();
        for err in [Vault::open(&data, key(KEY_A)).unwrap_err(), MasterKey::load_with_env(None, &data).unwrap_err()] {
            let msg = err.to_string();
            assert!(matches!(err, VaultError::NotPrivate(_)), "{msg}");
            assert!(msg.contains("mode 0777") && msg.contains(&format!("chmod 700 {}", data.display())), "{msg}");
        }
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(Vault::open(&data, key(KEY_A)).is_ok());
    }

    #[test]
    fn an_older_copy_of_a_row_put_back_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::open(dir.path(), key(KEY_A)).unwrap();
        vault.put("acme", "notes", "API_KEY", &secret("old")).unwrap();
        let db = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
        let old: (Vec<u8>, Vec<u8>, i64, String) = db
            .query_row("SELECT nonce, ciphertext, version, key_id FROM secrets", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap();
        vault.put("acme", "notes", "API_KEY", &secret("new")).unwrap();
        let put_back = |version: i64| {
            db.execute(
                "INSERT OR REPLACE INTO secrets (tenant, worker, name, nonce, ciphertext, version, key_id)
                 VALUES ('acme', 'notes', 'API_KEY', ?1, ?2, ?3, ?4)",
                params![old.0, old.1, version, old.3],
            )
            .unwrap()
        };
        // The old row as it was: its version is not the latest.
        put_back(old.2);
        let err = vault.get("acme", "notes", "API_KEY").unwrap_err();
        assert!(matches!(err, VaultError::RolledBack { version: 1, latest: Some(2), .. }), "{err:?}");
        assert!(err.to_string().contains("older copy") && err.to_string().contains("cordon secret put"), "{err}");
        // With its version column raised: it no longer decrypts.
        put_back(2);
        assert!(matches!(vault.get("acme", "notes", "API_KEY").unwrap_err(), VaultError::Undecryptable { .. }));
        // Stored again, it is served; deleted, an old copy put back is refused.
        vault.put("acme", "notes", "API_KEY", &secret("newest")).unwrap();
        assert_eq!(vault.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "newest");
        assert!(vault.delete("acme", "notes", "API_KEY").unwrap());
        put_back(old.2);
        assert!(matches!(vault.get("acme", "notes", "API_KEY").unwrap_err(), VaultError::RolledBack { latest: None, .. }));
    }

    #[test]
    fn a_reader_sees_every_new_version_another_process_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = (Vault::open(dir.path(), key(KEY_A)).unwrap(), Vault::open(dir.path(), key(KEY_A)).unwrap());
        for value in ["one", "two", "three"] {
            writer.put("acme", "notes", "API_KEY", &secret(value)).unwrap();
            // The reader's copy of the versions record is replaced, not trusted.
            assert_eq!(reader.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), value);
        }
        assert!(writer.delete("acme", "notes", "API_KEY").unwrap());
        assert!(reader.get("acme", "notes", "API_KEY").unwrap().is_none());
    }

    /// A store as format 1 or 2 wrote it, under `KEY_A` itself, holding
    /// `acme/notes` secrets; format 2 also has its versions record, where
    /// `API_KEY` is at version 3.
    fn legacy_store(dir: &Path, format: i64, secrets: &[(&str, &str)]) {
        use chacha20poly1305::KeyInit as _;
        let cipher = XChaCha20Poly1305::new(key(KEY_A).bytes.as_slice().into());
        let db = Connection::open(dir.join(DATABASE_FILE)).unwrap();
        let version_column = if format == 2 { ", version INTEGER NOT NULL" } else { "" };
        db.execute_batch(&format!(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) STRICT;
             CREATE TABLE secrets (tenant TEXT NOT NULL, worker TEXT NOT NULL, name TEXT NOT NULL, nonce BLOB NOT NULL,
                                   ciphertext BLOB NOT NULL{version_column}, PRIMARY KEY (tenant, worker, name)) STRICT;
             PRAGMA user_version = {format};"
        ))
        .unwrap();
        let seal = |msg: &[u8], aad: &[u8]| {
            let nonce = random_nonce().unwrap();
            (nonce.to_vec(), cipher.encrypt(&nonce, Payload { msg, aad }).unwrap())
        };
        let (n, c) = seal(KEY_CHECK_PLAINTEXT, KEY_CHECK_AAD);
        db.execute("INSERT INTO meta (key, value) VALUES ('key_check', ?1)", [[n, c].concat()]).unwrap();
        let mut versions = Versions::default();
        for (name, value) in secrets {
            let version = if *name == "API_KEY" { 3 } else { 1 };
            if format == 2 {
                let (n, c) = seal(value.as_bytes(), &secret_aad("acme", "notes", name, version));
                db.execute("INSERT INTO secrets VALUES ('acme', 'notes', ?1, ?2, ?3, ?4)", params![name, n, c, version as i64]).unwrap();
                versions.0.insert(("acme".into(), "notes".into(), name.to_string()), version);
            } else {
                let (n, c) = seal(value.as_bytes(), &secret_aad_v1("acme", "notes", name));
                db.execute("INSERT INTO secrets VALUES ('acme', 'notes', ?1, ?2, ?3)", params![name, n, c]).unwrap();
            }
        }
        if format == 2 {
            versions.save(&db, &cipher, dir).unwrap();
        }
    }

    fn format_of(dir: &Path) -> i64 {
        Connection::open(dir.join(DATABASE_FILE)).unwrap().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn format_1_and_2_stores_are_upgraded_and_keep_their_secrets() {
        for format in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            legacy_store(dir.path(), format, &[("API_KEY", "v-a"), ("TOKEN", "v-b")]);
            // A wrong key neither opens nor upgrades it.
            assert!(matches!(Vault::open(dir.path(), key(KEY_B)).unwrap_err(), VaultError::WrongMasterKey { .. }));
            assert_eq!(format_of(dir.path()), format);
            let vault = Vault::open(dir.path(), key(KEY_A)).unwrap();
            assert_eq!(format_of(dir.path()), 3);
            assert_eq!(vault.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "v-a");
            assert_eq!(vault.get("acme", "notes", "TOKEN").unwrap().unwrap().expose(), "v-b");
            // Nothing is sealed with the master key itself any more: every
            // row names its tenant's key, and the tenant has a salt.
            let db = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
            let ids: Vec<String> = db
                .prepare("SELECT DISTINCT key_id FROM secrets")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            assert_eq!(ids.len(), 1);
            assert_eq!(ids[0].len(), 16);
            let salts: i64 = db.query_row("SELECT count(*) FROM tenant_keys WHERE tenant = 'acme'", [], |r| r.get(0)).unwrap();
            assert_eq!(salts, 1);
            // Format 2's versions carry over: the next write of API_KEY is version 4.
            vault.put("acme", "notes", "API_KEY", &secret("v2")).unwrap();
            let version: i64 = db.query_row("SELECT version FROM secrets WHERE name = 'API_KEY'", [], |r| r.get(0)).unwrap();
            assert_eq!(version, if format == 2 { 4 } else { 2 }, "format {format}");
            assert_eq!(vault.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "v2");
        }
    }

    fn key_id_of_row(dir: &Path, tenant: &str, name: &str) -> String {
        Connection::open(dir.join(DATABASE_FILE))
            .unwrap()
            .query_row("SELECT key_id FROM secrets WHERE tenant = ?1 AND name = ?2", [tenant, name], |r| r.get(0))
            .unwrap()
    }

    fn row_of(dir: &Path, tenant: &str) -> (Vec<u8>, Vec<u8>) {
        Connection::open(dir.join(DATABASE_FILE))
            .unwrap()
            .query_row("SELECT nonce, ciphertext FROM secrets WHERE tenant = ?1", [tenant], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
    }

    #[test]
    fn rotating_the_master_key_reseals_everything_and_retires_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::open(dir.path(), key(KEY_A)).unwrap();
        for (tenant, value) in [("acme", "a"), ("globex", "g")] {
            vault.put(tenant, "notes", "API_KEY", &secret(value)).unwrap();
        }
        let before = (key_id_of_row(dir.path(), "acme", "API_KEY"), row_of(dir.path(), "acme"));
        let rekeyed = vault.rotate_master_key(key(KEY_B)).unwrap();
        assert_eq!((rekeyed.secrets, rekeyed.tenants), (2, 2));
        assert_ne!(rekeyed.old_key_id, rekeyed.new_key_id);
        assert_eq!(vault.key_id(), rekeyed.new_key_id);
        assert_ne!(key_id_of_row(dir.path(), "acme", "API_KEY"), before.0);
        assert_ne!(row_of(dir.path(), "acme"), before.1);
        // This vault goes on with the new key; a new open needs it.
        assert_eq!(vault.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "a");
        assert!(matches!(Vault::open(dir.path(), key(KEY_A)).unwrap_err(), VaultError::WrongMasterKey { .. }));
        let reopened = Vault::open(dir.path(), key(KEY_B)).unwrap();
        assert_eq!(reopened.get("globex", "notes", "API_KEY").unwrap().unwrap().expose(), "g");
        // The versions went along: an old row put back is still refused.
        reopened.put("acme", "notes", "API_KEY", &secret("a2")).unwrap();
        assert_eq!(reopened.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "a2");
    }

    #[test]
    fn a_rotation_that_meets_a_damaged_row_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::open(dir.path(), key(KEY_A)).unwrap();
        vault.put("acme", "notes", "API_KEY", &secret("a")).unwrap();
        vault.put("acme", "notes", "TOKEN", &secret("t")).unwrap();
        vault.conn().execute_batch("UPDATE secrets SET ciphertext = CAST(ciphertext || x'00' AS BLOB) WHERE name = 'TOKEN'").unwrap();
        let err = vault.rotate_master_key(key(KEY_B)).unwrap_err();
        assert!(matches!(err, VaultError::Undecryptable { ref name, .. } if name == "TOKEN"), "{err:?}");
        assert!(matches!(Vault::open(dir.path(), key(KEY_B)).unwrap_err(), VaultError::WrongMasterKey { .. }));
        let still = Vault::open(dir.path(), key(KEY_A)).unwrap();
        assert_eq!(still.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "a");
    }

    /// The data directory of a key-file store holding one secret per tenant.
    fn key_file_store() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let vault = Vault::open(&data, MasterKey::load_with_env(None, &data).unwrap().0).unwrap();
        vault.put("acme", "notes", "API_KEY", &secret("a")).unwrap();
        vault.put("globex", "notes", "API_KEY", &secret("g")).unwrap();
        (dir, data)
    }

    fn open_from_files(data: &Path) -> Result<Vault, VaultError> {
        Vault::open(data, MasterKey::load_with_env(None, data)?.0)
    }

    #[test]
    fn a_key_file_rotation_killed_at_each_step_leaves_a_store_that_opens() {
        // Killed after writing master.key.next, before the transaction: the
        // old key still opens the store, and the next rotation replaces the
        // file left behind.
        let (_dir, data) = key_file_store();
        let lock = RotationLock::acquire(&data).unwrap();
        let unused = keys::write_next_key(&data, &lock).unwrap();
        drop(lock);
        let vault = open_from_files(&data).unwrap();
        assert_eq!(vault.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "a");
        assert!(data.join(NEXT_MASTER_KEY_FILE).exists());
        let lock = RotationLock::acquire(&data).unwrap();
        let rekeyed = vault.rotate_key_file(&lock).unwrap();
        assert_ne!(rekeyed.new_key_id, Keyring::new(unused).id.to_string());
        assert!(!data.join(NEXT_MASTER_KEY_FILE).exists());
        assert_eq!(open_from_files(&data).unwrap().get("globex", "notes", "API_KEY").unwrap().unwrap().expose(), "g");
        drop(lock);

        // Killed after the transaction committed, before the rename: the key
        // file's key is refused, master.key.next opens the store, and
        // opening finishes the rotation.
        let (_dir, data) = key_file_store();
        let lock = RotationLock::acquire(&data).unwrap();
        let vault = open_from_files(&data).unwrap();
        let new = keys::write_next_key(&data, &lock).unwrap();
        let rekeyed = vault.rotate_master_key(new).unwrap();
        drop(lock);
        let reopened = open_from_files(&data).unwrap();
        assert_eq!(reopened.key_id(), rekeyed.new_key_id);
        assert!(!data.join(NEXT_MASTER_KEY_FILE).exists());
        assert_eq!(reopened.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "a");
        assert_eq!(open_from_files(&data).unwrap().key_id(), rekeyed.new_key_id);
    }

    #[test]
    fn a_running_vault_follows_a_rotation_made_by_another_process() {
        let (_dir, data) = key_file_store();
        let serving = open_from_files(&data).unwrap();
        let lock = RotationLock::acquire(&data).unwrap();
        let rotated = open_from_files(&data).unwrap().rotate_key_file(&lock).unwrap();
        assert_eq!(serving.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "a");
        assert_eq!(serving.key_id(), rotated.new_key_id);

        // A key from the environment cannot be found again: the error says
        // to restart with the new one.
        let dir = tempfile::tempdir().unwrap();
        let serving = Vault::open(dir.path(), key(KEY_A)).unwrap();
        serving.put("acme", "notes", "API_KEY", &secret("a")).unwrap();
        Vault::open(dir.path(), key(KEY_A)).unwrap().rotate_master_key(key(KEY_B)).unwrap();
        let err = serving.get("acme", "notes", "API_KEY").unwrap_err();
        assert!(matches!(err, VaultError::KeyRotated { .. }), "{err:?}");
        assert!(err.to_string().contains(MASTER_KEY_ENV) && err.to_string().contains("restart"), "{err}");
    }

    #[test]
    fn a_tenant_is_rekeyed_alone() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::open(dir.path(), key(KEY_A)).unwrap();
        vault.put("acme", "notes", "API_KEY", &secret("a")).unwrap();
        vault.put("globex", "notes", "API_KEY", &secret("g")).unwrap();
        let (acme, globex) = ((key_id_of_row(dir.path(), "acme", "API_KEY"), row_of(dir.path(), "acme")), row_of(dir.path(), "globex"));
        let rekeyed = vault.rekey_tenant("acme").unwrap();
        assert_eq!((rekeyed.secrets, rekeyed.tenants), (1, 1));
        assert_ne!(key_id_of_row(dir.path(), "acme", "API_KEY"), acme.0);
        assert_ne!(row_of(dir.path(), "acme"), acme.1);
        assert_eq!(row_of(dir.path(), "globex"), globex, "another tenant's record is untouched");
        assert_eq!(vault.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "a");
        assert_eq!(vault.get("globex", "notes", "API_KEY").unwrap().unwrap().expose(), "g");
        assert!(matches!(vault.rekey_tenant("nobody").unwrap_err(), VaultError::NoSecretsOfTenant { .. }));
    }

    #[test]
    fn a_shredded_tenant_cannot_be_recovered_from_a_copy_of_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::open(dir.path(), key(KEY_A)).unwrap();
        vault.put("acme", "notes", "API_KEY", &secret("a")).unwrap();
        vault.put("globex", "notes", "API_KEY", &secret("g")).unwrap();
        let db = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
        let stolen: (Vec<u8>, Vec<u8>, i64, String) = db
            .query_row("SELECT nonce, ciphertext, version, key_id FROM secrets WHERE tenant = 'acme'", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .unwrap();
        let salt: Vec<u8> = db.query_row("SELECT salt FROM tenant_keys WHERE tenant = 'acme'", [], |r| r.get(0)).unwrap();
        assert_eq!(vault.shred_tenant("acme").unwrap(), 1);
        assert!(vault.get("acme", "notes", "API_KEY").unwrap().is_none());
        assert_eq!(vault.get("globex", "notes", "API_KEY").unwrap().unwrap().expose(), "g");
        // The salt is gone from every file: the tenant's key cannot be
        // derived again, even by whoever holds the master key.
        for file in files(dir.path()) {
            assert!(!contains(&fs::read(&file).unwrap(), &salt), "{} still holds the salt", file.display());
        }
        // A copy of its row put back does not decrypt, even under a new
        // salt made for the same tenant.
        vault.put("acme", "other", "TOKEN", &secret("new")).unwrap();
        db.execute(
            "INSERT INTO secrets (tenant, worker, name, nonce, ciphertext, version, key_id) VALUES ('acme', 'notes', 'API_KEY', ?1, ?2, ?3, ?4)",
            params![stolen.0, stolen.1, stolen.2, stolen.3],
        )
        .unwrap();
        assert!(matches!(vault.get("acme", "notes", "API_KEY"), Err(VaultError::Undecryptable { .. } | VaultError::KeyRotated { .. })));
        assert!(matches!(vault.shred_tenant("nobody").unwrap_err(), VaultError::NoSecretsOfTenant { .. }));
    }

    #[test]
    fn the_key_file_is_created_0600_and_a_0644_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let path = data.join(MASTER_KEY_FILE);
        let (first, source) = MasterKey::load_with_env(None, &data).unwrap();
        assert_eq!(source, KeySource::Created(path.clone()));
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read(&path).unwrap(), first.bytes.as_slice());
        assert_ne!(*first.bytes, [0u8; 32]);

        let (again, source) = MasterKey::load_with_env(None, &data).unwrap();
        assert_eq!(source, KeySource::File(path.clone()));
        assert_eq!(*again.bytes, *first.bytes);

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = MasterKey::load_with_env(None, &data).unwrap_err();
        assert!(matches!(err, VaultError::KeyFileUnsafe { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("mode 0644") && msg.contains(&format!("chmod 600 {}", path.display())), "{msg}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, [1u8; 33]).unwrap();
        let err = MasterKey::load_with_env(None, &data).unwrap_err();
        assert!(matches!(err, VaultError::KeyFileLength { len: 33, .. }), "{err:?}");

        // The environment wins over the file and creates nothing.
        let other = dir.path().join("other");
        let (k, source) = MasterKey::load_with_env(Some(KEY_A.into()), &other).unwrap();
        assert_eq!(source, KeySource::Environment);
        assert_eq!(k.bytes[31], 0x1f);
        assert!(!other.exists());
    }

    #[test]
    fn racing_processes_create_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| *MasterKey::load_with_env(None, dir.path()).unwrap().0.bytes)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]));
    }

    #[test]
    fn a_missing_key_file_with_stored_secrets_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::open(dir.path(), key_of(dir.path())).unwrap();
        vault.put("acme", "notes", "API_KEY", &secret("v")).unwrap();
        drop(vault);
        fs::remove_file(dir.path().join(MASTER_KEY_FILE)).unwrap();
        let err = MasterKey::load_with_env(None, dir.path()).unwrap_err();
        assert!(matches!(err, VaultError::MissingMasterKey { .. }), "{err:?}");
        assert!(!dir.path().join(MASTER_KEY_FILE).exists());
    }

    #[test]
    fn the_environment_key_is_parsed_strictly() {
        assert_eq!(key(KEY_A).bytes[..4], [0, 1, 2, 3]);
        assert_eq!(*key(&KEY_B.to_uppercase()).bytes, *key(KEY_B).bytes);
        for (bad, problem) in [
            ("", "it is empty"),
            (&KEY_A[..63], "63 bytes"),
            (&format!("{KEY_A}0"), "65 bytes"),
            (&format!("{KEY_A}\n"), "65 bytes"),
            (&format!("{}zz", &KEY_A[..62]), "characters other than"),
            (&format!(" {}", &KEY_A[..63]), "characters other than"),
        ] {
            let err = MasterKey::from_env_value(bad).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, VaultError::BadEnvKey { .. }) && msg.contains(problem), "{bad:?}: {msg}");
            assert!(msg.contains("64 hexadecimal characters") && !msg.contains(&KEY_A[..16]), "{msg}");
        }
    }

    #[test]
    fn debug_and_display_never_show_a_value() {
        let value = secret("sup3r-s3cret-VALUE-xyz");
        for shown in [format!("{value:?}"), format!("{value}"), format!("{value:#?}"), format!("{:?}", Some(value.clone()))] {
            assert!(shown.contains("[redacted]") && !shown.contains("sup3r"), "{shown}");
        }
        let master = key(&"ab".repeat(32));
        let shown = format!("{master:?} {master:#?}");
        assert!(shown.contains("[redacted]") && !shown.contains("ab") && !shown.contains("171"), "{shown}");
    }

    #[test]
    fn a_row_moved_to_another_worker_or_name_fails_to_decrypt() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::open(dir.path(), key(KEY_A)).unwrap();
        vault.put("acme", "notes", "API_KEY", &secret("v")).unwrap();
        vault
            .conn()
            .execute_batch(
                "INSERT INTO secrets SELECT tenant, 'thief', name, nonce, ciphertext, version, key_id FROM secrets WHERE worker = 'notes';
             INSERT INTO secrets SELECT tenant, worker, 'OTHER', nonce, ciphertext, version, key_id FROM secrets WHERE worker = 'notes';
             INSERT INTO secrets SELECT 'globex', worker, name, nonce, ciphertext, version, key_id FROM secrets
                 WHERE worker = 'notes' AND name = 'API_KEY';",
            )
            .unwrap();
        for (tenant, worker, name) in [("acme", "thief", "API_KEY"), ("acme", "notes", "OTHER"), ("globex", "notes", "API_KEY")] {
            let err = vault.get(tenant, worker, name).unwrap_err();
            assert!(matches!(err, VaultError::Undecryptable { .. }), "{tenant}/{worker}/{name}: {err:?}");
        }
        assert_eq!(vault.get("acme", "notes", "API_KEY").unwrap().unwrap().expose(), "v");

        // A damaged ciphertext is an error too, not a wrong value.
        vault
            .conn()
            .execute_batch("UPDATE secrets SET ciphertext = CAST(ciphertext || x'00' AS BLOB) WHERE worker = 'notes' AND name = 'API_KEY'")
            .unwrap();
        assert!(matches!(vault.get("acme", "notes", "API_KEY"), Err(VaultError::Undecryptable { .. })));
    }

    #[test]
    fn the_database_is_private_and_the_vault_is_shareable() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Vault>();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a/b");
        let vault = Vault::open(&data, key(KEY_A)).unwrap();
        vault.put("acme", "notes", "API_KEY", &secret("v")).unwrap();
        assert_eq!(mode(&data), 0o700);
        for file in files(&data) {
            assert_eq!(mode(&file), 0o600, "{}", file.display());
        }
        let (journal, sync, secure): (String, i64, i64) = vault
            .conn()
            .query_row("SELECT * FROM pragma_journal_mode, pragma_synchronous, pragma_secure_delete", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((journal.as_str(), sync, secure), ("wal", 2, 1));
    }
}
