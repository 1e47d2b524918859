//! The compiled-code cache: native code for each component, compiled once and
//! kept under `<data_dir>/cache/components`.
//!
//! Trust model (docs/SECURITY.md, "Compiled-code cache"): loading a cached
//! artifact maps native code into the process without re-verifying it, so
//! whoever can write the cache directory can run code as Cordon. The cache
//! therefore lives in a directory that Cordon creates with mode 0700 and
//! refuses to use if it is owned by another user or writable by group or
//! others. Entries are written to a temporary file and renamed into place, so
//! a crash never leaves a half-written entry under a valid name, and each
//! entry carries a SHA-256 of its contents that is checked before use, so a
//! corrupted file is recompiled instead of loaded. The key is derived from the
//! component's SHA-256 and the engine's compatibility hash (wasmtime version,
//! target and every setting that affects code generation), so a changed
//! component or engine never reuses stale code.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

const MAGIC: &[u8; 8] = b"CORDONC1";
const HEADER_LEN: usize = MAGIC.len() + 32;

/// Where a worker's native code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeSource {
    /// Loaded from the cache without compiling.
    Cache,
    /// Compiled at startup (and stored in the cache, if there is one).
    Compiled,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot create the cache directory {}: {source}", path.display())]
    Create { path: PathBuf, source: std::io::Error },
    #[error(
        "the cache directory {} is {problem}; compiled code loaded from it would run as Cordon, \
         so it must be owned by Cordon's user and closed to everyone else. Fix it with \
         `chown $(id -u) {0} && chmod 700 {0}`, or remove it so that Cordon recreates it",
        path.display()
    )]
    Unsafe { path: PathBuf, problem: String },
    #[error("cannot write a cache entry in {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "the data directory {} is in use by another Cordon process; stop it, or give this one its own server.data_dir",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error("cannot lock the data directory {}: {source}", path.display())]
    Lock { path: PathBuf, source: std::io::Error },
    #[error("the lock {} is held, but does not name its holder's pid; the server may be starting, or be an older Cordon", path.display())]
    NoHolderPid { path: PathBuf },
}

/// Exclusive use of a data directory, for as long as this value lives: an
/// advisory lock on `<data_dir>/lock`, released by the kernel when the
/// process exits however it exits. The file holds the holder's pid, so that
/// `cordon reload` can find the server to signal ([`DataDirLock::holder`]).
pub struct DataDirLock {
    _file: fs::File,
}

/// How often, and how far apart, taking a busy lock is tried again: a
/// [`DataDirLock::holder`] probe holds a shared lock for an instant, which
/// must not make a server that starts at that moment fail as if the
/// directory were in use.
const LOCK_ATTEMPTS: u32 = 5;
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

impl DataDirLock {
    pub fn acquire(data_dir: &Path) -> Result<Self, CacheError> {
        let path = data_dir.join("lock");
        let lock_err = |source| CacheError::Lock { path: path.clone(), source };
        let mut file = fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path).map_err(lock_err)?;
        let mut attempt = 1;
        while let Err(e) = flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(lock_err(e));
            }
            if attempt == LOCK_ATTEMPTS {
                return Err(CacheError::InUse { path: data_dir.to_path_buf() });
            }
            attempt += 1;
            std::thread::sleep(LOCK_RETRY);
        }
        // Only now: until the lock is ours, the file names its holder.
        file.set_len(0).and_then(|()| writeln!(file, "{}", std::process::id())).map_err(lock_err)?;
        Ok(Self { _file: file })
    }

    /// The pid of the process that holds `data_dir`'s lock, or `None` when
    /// no process does. Takes the lock shared for an instant to find out.
    pub fn holder(data_dir: &Path) -> Result<Option<u32>, CacheError> {
        let path = data_dir.join("lock");
        let lock_err = |source| CacheError::Lock { path: path.clone(), source };
        let mut file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(lock_err(e)),
        };
        match flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
            // Free: nobody holds it, and closing the file lets it go again.
            Ok(()) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {}
            Err(e) => return Err(lock_err(e)),
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).map_err(lock_err)?;
        // Empty for the instant between a holder's lock and its write.
        text.trim().parse().map(Some).map_err(|_| CacheError::NoHolderPid { path })
    }
}

fn flock(file: &fs::File, operation: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor the caller owns for the duration of
    // the call; it has no memory-safety preconditions.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// An open cache directory that has passed the ownership and mode checks.
pub struct CodeCache {
    dir: PathBuf,
    _lock: DataDirLock,
}

impl CodeCache {
    /// Opens (creating if needed) `<data_dir>/cache/components`, taking the
    /// data directory's lock for as long as the cache lives.
    pub fn open(data_dir: &Path) -> Result<Self, CacheError> {
        let dir = data_dir.join("cache").join("components");
        for d in [data_dir.to_path_buf(), data_dir.join("cache"), dir.clone()] {
            if !d.exists() {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .recursive(true)
                    .create(&d)
                    .map_err(|source| CacheError::Create { path: d.clone(), source })?;
            }
        }
        // The two directories Cordon owns outright must be private. The data
        // dir itself is checked too: whoever can rename `cache` can replace it.
        for d in [data_dir.join("cache"), dir.clone(), data_dir.to_path_buf()] {
            check_private(&d)?;
        }
        let cache = Self { dir, _lock: DataDirLock::acquire(data_dir)? };
        cache.remove_interrupted_writes();
        Ok(cache)
    }

    /// Temporary files of writes that a crash interrupted. They were never
    /// renamed into place, so nothing refers to them, and the caller holds
    /// the [`DataDirLock`], so no other process is writing one now.
    fn remove_interrupted_writes(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                tracing::info!(file = %name, "removing an interrupted compiled-code cache write");
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// The checks of [`CodeCache::open`] on whatever of the cache's
    /// directories already exists, creating nothing: for `cordon check`.
    pub fn check_existing(data_dir: &Path) -> Result<(), CacheError> {
        for d in [data_dir.join("cache"), data_dir.join("cache").join("components"), data_dir.to_path_buf()] {
            if fs::symlink_metadata(&d).is_ok() {
                check_private(&d)?;
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache key of `wasm` compiled by `engine`.
    pub fn key(engine: &Engine, wasm: &[u8]) -> String {
        let mut h = Sha256::new();
        h.update(b"cordon component cache v1\0");
        h.update(Sha256::digest(wasm));
        let mut engine_hash = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut engine_hash);
        h.update(engine_hash.0.finalize());
        hex(&h.finalize())
    }

    /// The cached native code for `key`, if present and intact. A damaged
    /// entry is removed and reported as absent.
    pub(crate) fn get(&self, key: &str) -> Option<Vec<u8>> {
        let path = self.entry_path(key);
        let bytes = fs::read(&path).ok()?;
        match verify(&bytes) {
            Some(artifact) => Some(artifact.to_vec()),
            None => {
                tracing::warn!(path = %path.display(), "damaged compiled-code cache entry removed; the component will be recompiled");
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores `artifact` under `key`, atomically.
    pub(crate) fn put(&self, key: &str, artifact: &[u8]) -> Result<(), CacheError> {
        let path = self.entry_path(key);
        // Unique per process and call, so concurrent writers never share a
        // temporary file; the rename makes the last one win, intact.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.dir.join(format!(".{key}.{}.{n}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(&Sha256::digest(artifact))?;
            f.write_all(artifact)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|source| {
            let _ = fs::remove_file(&tmp);
            CacheError::Write { path: path.clone(), source }
        })
    }

    fn entry_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.cwasm"))
    }
}

/// The artifact inside a cache entry, if its header and checksum hold.
fn verify(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.len() < HEADER_LEN || &bytes[..MAGIC.len()] != MAGIC {
        return None;
    }
    let (digest, artifact) = bytes[MAGIC.len()..].split_at(32);
    (Sha256::digest(artifact).as_slice() == digest).then_some(artifact)
}

fn check_private(dir: &Path) -> Result<(), CacheError> {
    if !dir.exists() {
        return Err(CacheError::Create { path: dir.to_path_buf(), source: std::io::ErrorKind::NotFound.into() });
    }
    cordon_disk::private_dir::check(dir).map_err(|e| CacheError::Unsafe { path: e.path, problem: e.problem })
}

/// Compiles `wasm`, or loads its native code from `cache`.
pub(crate) fn load_component(engine: &Engine, wasm: &[u8], cache: Option<&CodeCache>) -> Result<(Component, CodeSource), LoadError> {
    check_is_component(wasm)?;
    let key = CodeCache::key(engine, wasm);
    if let Some(cache) = cache
        && let Some(artifact) = cache.get(&key)
    {
        // SAFETY: the artifact comes from a directory that only Cordon's user
        // can write (checked in `CodeCache::open`), was written by
        // `precompile_component` of an engine with the same compatibility hash
        // (part of the key), and its checksum matched. wasmtime additionally
        // checks the artifact's header against this engine.
        match unsafe { Component::deserialize(engine, &artifact) } {
            Ok(component) => return Ok((component, CodeSource::Cache)),
            Err(e) => tracing::warn!(error = %e, "cached native code rejected by the engine; recompiling"),
        }
    }
    let artifact = engine.precompile_component(wasm).map_err(|e| LoadError::Invalid(first_line(&e)))?;
    if let Some(cache) = cache {
        cache.put(&key, &artifact)?;
    }
    // SAFETY: `artifact` was produced just now by this engine's own compiler.
    let component = unsafe { Component::deserialize(engine, &artifact) }.map_err(|e| LoadError::Invalid(first_line(&e)))?;
    Ok((component, CodeSource::Compiled))
}

/// Why a component could not be loaded. Cloneable, because one compiled
/// component may serve several workers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the component file: {0}")]
    Read(std::sync::Arc<std::io::Error>),
    #[error("not a WebAssembly file (it does not start with the `\\0asm` magic); give the path of a .wasm component")]
    NotWasm,
    #[error(
        "a core WebAssembly module, not a component; build the worker for the `wasm32-wasip2` target \
         (or wrap the module with `wasm-tools component new`)"
    )]
    CoreModule,
    #[error("not a valid component: {0}")]
    Invalid(String),
    #[error("the component imports `{0}`, which Cordon does not provide; remove the import or build against the `wasi:http/proxy` world")]
    UnknownImport(String),
    #[error(
        "the component imports `{interface}`, but this worker has no grant for it; add {section} to the worker's config, or remove the import"
    )]
    Ungranted { interface: String, section: &'static str },
    #[error("the component does not export `wasi:http/incoming-handler`; build it against the `wasi:http/proxy` world")]
    NotAProxy(String),
    #[error("{0}")]
    Capability(String),
    /// Past a ceiling the engine was sized with at start.
    #[error(transparent)]
    OverCeiling(Box<OverCeiling>),
    #[error(transparent)]
    Cache(std::sync::Arc<CacheError>),
}

/// What a component needs beyond a ceiling the engine was sized with.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the component needs {needed} {what}, above the engine's ceiling {ceiling} = {limit}; make it smaller, or raise {ceiling} and restart the server"
)]
pub struct OverCeiling {
    pub ceiling: &'static str,
    pub what: &'static str,
    pub limit: u64,
    pub needed: u64,
}

impl From<CacheError> for LoadError {
    fn from(e: CacheError) -> Self {
        LoadError::Cache(std::sync::Arc::new(e))
    }
}

fn check_is_component(wasm: &[u8]) -> Result<(), LoadError> {
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        return Err(LoadError::NotWasm);
    }
    // Bytes 4..8: version and layer. Layer 0 is a core module, 1 a component.
    if wasm[6..8] == [0, 0] {
        return Err(LoadError::CoreModule);
    }
    Ok(())
}

fn first_line(e: &wasmtime::Error) -> String {
    // The full chain can include compiler internals; the first line and the
    // root cause say what is wrong with the input.
    let root = e.root_cause().to_string();
    let top = e.to_string();
    if root == top { top } else { format!("{top}: {root}") }
}

struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        unreachable!("only used to feed bytes into SHA-256")
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn entries_round_trip_and_corruption_is_detected() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CodeCache::open(tmp.path()).unwrap();
        let mode = fs::metadata(cache.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        cache.put("k", b"native code").unwrap();
        assert_eq!(cache.get("k").unwrap(), b"native code");
        let path = cache.entry_path("k");
        let mut bytes = fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(cache.get("k").is_none(), "a flipped bit must be caught");
        assert!(!path.exists(), "the damaged entry is removed");
    }

    #[test]
    fn a_data_directory_has_one_owner_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(tmp.path()).unwrap();
        let err = DataDirLock::acquire(tmp.path()).err().expect("a second owner is refused").to_string();
        assert!(err.contains("in use by another Cordon process"), "{err}");
        drop(first);
        DataDirLock::acquire(tmp.path()).expect("free again once the owner is gone");
    }

    #[test]
    fn the_lock_names_its_holder_while_it_is_held() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(DataDirLock::holder(tmp.path()).unwrap(), None, "no lock file yet");
        let lock = DataDirLock::acquire(tmp.path()).unwrap();
        assert_eq!(DataDirLock::holder(tmp.path()).unwrap(), Some(std::process::id()));
        // The probe left the lock to its owner.
        assert!(DataDirLock::acquire(tmp.path()).is_err());
        drop(lock);
        assert_eq!(DataDirLock::holder(tmp.path()).unwrap(), None, "the file names a pid, but nobody holds the lock");
    }

    #[test]
    fn interrupted_writes_are_removed_on_open() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CodeCache::open(tmp.path()).unwrap();
        cache.put("kept", b"code").unwrap();
        let leftover = cache.dir().join(".abc.123.0.tmp");
        fs::write(&leftover, b"half an entry").unwrap();
        drop(cache);
        let cache = CodeCache::open(tmp.path()).unwrap();
        assert!(!leftover.exists());
        assert_eq!(cache.get("kept").unwrap(), b"code");
    }

    #[test]
    fn a_cache_open_to_others_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CodeCache::open(tmp.path()).unwrap();
        fs::set_permissions(cache.dir(), fs::Permissions::from_mode(0o777)).unwrap();
        let err = CodeCache::open(tmp.path()).err().expect("must refuse").to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        assert!(err.contains("chmod 700"), "{err}");
    }

    #[test]
    fn non_components_are_named() {
        assert!(matches!(check_is_component(b"hello world"), Err(LoadError::NotWasm)));
        assert!(matches!(check_is_component(b"\0asm\x01\0\0\0"), Err(LoadError::CoreModule)));
        assert!(check_is_component(b"\0asm\x0d\0\x01\0").is_ok());
    }
}
