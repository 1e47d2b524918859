//! The keys the vault derives from one master key, and the files a rotation
//! of the master key goes through.
//!
//! Nothing is sealed with the master key itself (formats 1 and 2 did, and
//! are read only to be upgraded). HKDF-SHA256 (RFC 5869) derives:
//! - the **store key**, which seals the vault's own records (the key check
//!   and the versions record): `info = "cordon-vault-store-v1"`;
//! - one **tenant key** per tenant, which seals that tenant's secrets:
//!   `salt = the tenant's random 32-byte salt`, `info = "cordon-vault-tenant-v1\0" tenant`.
//!   Replacing a tenant's salt re-keys that tenant alone; deleting it
//!   destroys the key, which is how a removed tenant is crypto-shredded;
//! - a **key id** for any of these keys: 8 bytes of `HKDF(key, info =
//!   "cordon-vault-key-id-v1")`, in hex. It names a key without revealing
//!   it, so that each record can say which key sealed it.
//!
//! A rotation of the master key kept in the key file writes the new key to
//! `master.key.next` (0600, synced) before the store is re-encrypted in one
//! transaction, and renames it over `master.key` afterwards. Whatever the
//! process is killed at, one of the two files holds the key the store is
//! sealed with, and [`super::Vault::open`] finishes a rotation that committed
//! but did not rename.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use chacha20poly1305::KeyInit as _;
use chacha20poly1305::XChaCha20Poly1305;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{KEY_LEN, KeySource, MASTER_KEY_FILE, MasterKey, VaultError, os_random, read_key_file};

/// The file a new master key is written to before the store is re-encrypted
/// with it.
pub const NEXT_MASTER_KEY_FILE: &str = "master.key.next";
/// Held (`flock`) by a rotation for its whole length, so that two rotations
/// never write `master.key.next` at once.
const ROTATION_LOCK_FILE: &str = "rotation.lock";
/// The salt of each tenant's key.
pub(super) const SALT_LEN: usize = 32;

const STORE_INFO: &[u8] = b"cordon-vault-store-v1";
const TENANT_INFO: &[u8] = b"cordon-vault-tenant-v1\0";
const KEY_ID_INFO: &[u8] = b"cordon-vault-key-id-v1";

/// The public name of a key: 16 hex digits, one-way.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct KeyId(String);

impl KeyId {
    fn of(key: &[u8; KEY_LEN]) -> KeyId {
        let mut id = [0u8; 8];
        expand(None, key, &[KEY_ID_INFO], &mut id);
        KeyId(id.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// As stored in a record.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(super) fn from_stored(s: String) -> KeyId {
        KeyId(s)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn expand(salt: Option<&[u8]>, ikm: &[u8], info: &[&[u8]], out: &mut [u8]) {
    Hkdf::<Sha256>::new(salt, ikm).expand_multi_info(info, out).expect("HKDF-SHA256 gives up to 8160 bytes; these are at most 32");
}

/// A tenant's key, and its id.
pub(super) struct TenantKey {
    pub cipher: XChaCha20Poly1305,
    pub id: KeyId,
}

/// Everything derived from one master key.
pub(super) struct Keyring {
    /// The master key's id, stored in the `meta` row `key_id`.
    pub id: KeyId,
    master: Zeroizing<[u8; KEY_LEN]>,
    /// Seals the key check and the versions record.
    pub store: XChaCha20Poly1305,
    /// The master key used directly, as formats 1 and 2 did: only to read a
    /// store being upgraded.
    pub legacy: XChaCha20Poly1305,
    pub source: KeySource,
}

impl Keyring {
    pub fn new(key: MasterKey) -> Keyring {
        let mut store = Zeroizing::new([0u8; KEY_LEN]);
        expand(None, key.bytes.as_slice(), &[STORE_INFO], store.as_mut_slice());
        Keyring {
            id: KeyId::of(&key.bytes),
            store: XChaCha20Poly1305::new(store.as_slice().into()),
            legacy: XChaCha20Poly1305::new(key.bytes.as_slice().into()),
            master: key.bytes,
            source: key.source,
        }
    }

    /// The key of `tenant` under `salt`.
    pub fn tenant(&self, tenant: &str, salt: &[u8]) -> TenantKey {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        expand(Some(salt), self.master.as_slice(), &[TENANT_INFO, tenant.as_bytes()], key.as_mut_slice());
        TenantKey { cipher: XChaCha20Poly1305::new(key.as_slice().into()), id: KeyId::of(&key) }
    }
}

/// A fresh random salt for a tenant's key.
pub(super) fn new_salt() -> Result<[u8; SALT_LEN], VaultError> {
    let mut salt = [0u8; SALT_LEN];
    os_random(&mut salt).map_err(VaultError::Random)?;
    Ok(salt)
}

/// The key in `data_dir`'s key file or its `master.key.next` whose id is
/// `id`: what a vault that was opened before another process rotated the
/// master key needs to go on reading. `None` when neither holds it.
pub(super) fn find_key_file(data_dir: &Path, id: &KeyId) -> Result<Option<Keyring>, VaultError> {
    for name in [MASTER_KEY_FILE, NEXT_MASTER_KEY_FILE] {
        let path = data_dir.join(name);
        if let Some(bytes) = read_key_file(&path)? {
            let keys = Keyring::new(MasterKey { bytes, source: KeySource::File(data_dir.join(MASTER_KEY_FILE)) });
            if &keys.id == id {
                return Ok(Some(keys));
            }
        }
    }
    Ok(None)
}

/// The key in `master.key.next`, if there is one: the new key of a rotation
/// that was interrupted, before or after its transaction committed.
pub(super) fn next_key(data_dir: &Path) -> Result<Option<MasterKey>, VaultError> {
    let path = data_dir.join(NEXT_MASTER_KEY_FILE);
    Ok(read_key_file(&path)?.map(|bytes| MasterKey { bytes, source: KeySource::File(data_dir.join(MASTER_KEY_FILE)) }))
}

/// Replaces `master.key` with `master.key.next`, durably. A missing next
/// file is fine: another process finished the rotation first.
pub(super) fn promote_next_key(data_dir: &Path) -> Result<(), VaultError> {
    let (next, current) = (data_dir.join(NEXT_MASTER_KEY_FILE), data_dir.join(MASTER_KEY_FILE));
    let key_err = |source| VaultError::KeyFile { path: current.clone(), source };
    match fs::rename(&next, &current) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(key_err(e)),
    }
    fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(key_err)
}

/// An exclusive hold on a data directory's key rotation.
pub struct RotationLock {
    _file: fs::File,
}

impl RotationLock {
    /// Waits for no other rotation to run in `data_dir`, then holds it.
    pub fn acquire(data_dir: &Path) -> Result<RotationLock, VaultError> {
        let path = data_dir.join(ROTATION_LOCK_FILE);
        let key_err = |source| VaultError::KeyFile { path: path.clone(), source };
        let file = fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(&path).map_err(key_err)?;
        // SAFETY: flock on a descriptor this function owns; the lock is
        // released when the file is closed with the returned value.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(key_err(std::io::Error::last_os_error()));
        }
        Ok(RotationLock { _file: file })
    }
}

/// Writes a new random master key to `master.key.next` (0600, synced, with
/// the directory synced) and returns it. A file left by a rotation that
/// never committed is replaced: the caller holds the [`RotationLock`] and
/// opened the store with its current key, so that file's key seals nothing.
pub(super) fn write_next_key(data_dir: &Path, _lock: &RotationLock) -> Result<MasterKey, VaultError> {
    let path = data_dir.join(NEXT_MASTER_KEY_FILE);
    let key_err = |source| VaultError::KeyFile { path: path.clone(), source };
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(key_err(e)),
    }
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    os_random(bytes.as_mut_slice()).map_err(VaultError::Random)?;
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(key_err)?;
    file.write_all(bytes.as_slice()).and_then(|()| file.sync_all()).and_then(|()| fs::File::open(data_dir)?.sync_all()).map_err(key_err)?;
    Ok(MasterKey { bytes, source: KeySource::File(data_dir.join(MASTER_KEY_FILE)) })
}

/// Where the next key file of `data_dir` is.
pub fn next_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(NEXT_MASTER_KEY_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivations_are_rfc_5869_hkdf_sha256() {
        // RFC 5869, test case 1.
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let mut okm = [0u8; 42];
        expand(Some(&salt), &ikm, &[&info[..5], &info[5..]], &mut okm);
        let hex: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865");
    }

    #[test]
    fn each_tenant_and_salt_gives_its_own_key() {
        let keys = Keyring::new(MasterKey { bytes: Zeroizing::new([7; KEY_LEN]), source: KeySource::Environment });
        let (a, b) = (keys.tenant("acme", &[1; SALT_LEN]), keys.tenant("bravo", &[1; SALT_LEN]));
        let a_again = keys.tenant("acme", &[2; SALT_LEN]);
        assert_ne!(a.id, b.id);
        assert_ne!(a.id, a_again.id);
        assert_eq!(a.id, keys.tenant("acme", &[1; SALT_LEN]).id);
        assert_ne!(keys.id, a.id);
        assert_eq!(keys.id.as_str().len(), 16);
    }
}
