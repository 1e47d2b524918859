//! Key-value stores: `[[worker.kv]] binding = "NAME"` opens as
//! `Store::open("NAME")`. Keys are strings of at most 512 bytes; values are
//! bytes (1 MiB by default, `limits.max_kv_value_bytes`).
//!
//! ```no_run
//! use cordon_sdk::kv::Store;
//! let sessions = Store::open("SESSIONS")?;
//! sessions.set_with_ttl("token:abc", b"user-1", std::time::Duration::from_secs(3600))?;
//! let user = sessions.get_string("token:abc")?;
//! for key in sessions.keys_with_prefix("token:") {
//!     let key = key?;
//! }
//! # Ok::<(), cordon_sdk::Error>(())
//! ```

use std::time::Duration;

use crate::bindings::cordon::kv::ext;
use crate::bindings::wasi::keyvalue::{atomics, batch, store};
use crate::{Error, ErrorKind};

impl From<store::Error> for Error {
    fn from(e: store::Error) -> Error {
        match e {
            store::Error::NoSuchStore => Error::new(ErrorKind::NoSuchBinding, "no such key-value store"),
            store::Error::AccessDenied => Error::new(ErrorKind::Denied, "access denied"),
            store::Error::Other(message) if message.starts_with("no such binding") => Error::new(ErrorKind::NoSuchBinding, message),
            store::Error::Other(message) if message.contains("limit") => Error::new(ErrorKind::LimitExceeded, message),
            store::Error::Other(message) => Error::new(ErrorKind::Other, message),
        }
    }
}

/// An open key-value store.
pub struct Store {
    bucket: store::Bucket,
}

impl Store {
    /// Opens the store granted to this worker under `binding`.
    pub fn open(binding: &str) -> Result<Store, Error> {
        Ok(Store { bucket: store::open(binding)? })
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.bucket.get(key)?)
    }

    /// The value as UTF-8 text (invalid bytes are replaced).
    pub fn get_string(&self, key: &str) -> Result<Option<String>, Error> {
        Ok(self.get(key)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn set(&self, key: &str, value: impl AsRef<[u8]>) -> Result<(), Error> {
        Ok(self.bucket.set(key, value.as_ref())?)
    }

    /// Stores a value that reads as absent once `ttl` (whole seconds, at least one) has passed.
    pub fn set_with_ttl(&self, key: &str, value: impl AsRef<[u8]>, ttl: Duration) -> Result<(), Error> {
        Ok(ext::set_with_ttl(&self.bucket, key, value.as_ref(), ttl.as_secs().max(1))?)
    }

    pub fn delete(&self, key: &str) -> Result<(), Error> {
        Ok(self.bucket.delete(key)?)
    }

    pub fn exists(&self, key: &str) -> Result<bool, Error> {
        Ok(self.bucket.exists(key)?)
    }

    /// Adds `delta` to the number at `key` (0 when absent), atomically, and
    /// returns the new value. The number is stored as decimal text.
    pub fn increment(&self, key: &str, delta: u64) -> Result<u64, Error> {
        Ok(atomics::increment(&self.bucket, key, delta)?)
    }

    /// The values of `keys`, in order; `None` for a missing key.
    pub fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, Error> {
        Ok(batch::get_many(&self.bucket, keys)?.into_iter().map(|e| e.map(|(_, v)| v)).collect())
    }

    /// Sets every entry, or none of them.
    pub fn set_many(&self, entries: &[(String, Vec<u8>)]) -> Result<(), Error> {
        Ok(batch::set_many(&self.bucket, entries)?)
    }

    pub fn delete_many(&self, keys: &[String]) -> Result<(), Error> {
        Ok(batch::delete_many(&self.bucket, keys)?)
    }

    /// One page of keys starting with `prefix`, and the cursor of the next page.
    pub fn list_page(&self, prefix: &str, cursor: Option<u64>) -> Result<(Vec<String>, Option<u64>), Error> {
        let page = ext::list_prefix(&self.bucket, prefix, cursor)?;
        Ok((page.keys, page.cursor))
    }

    /// Every key starting with `prefix`, fetched a page at a time.
    pub fn keys_with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = Result<String, Error>> + 'a {
        let mut page: std::vec::IntoIter<String> = Vec::new().into_iter();
        let mut cursor = None;
        let mut done = false;
        std::iter::from_fn(move || {
            loop {
                if let Some(key) = page.next() {
                    return Some(Ok(key));
                }
                if done {
                    return None;
                }
                match self.list_page(prefix, cursor) {
                    Ok((keys, next)) => {
                        done = next.is_none();
                        cursor = next;
                        page = keys.into_iter();
                    }
                    Err(e) => {
                        done = true;
                        return Some(Err(e));
                    }
                }
            }
        })
    }
}
