//! Variables and secrets: `[worker.vars]` entries and the secrets named in
//! `secrets = [...]` (set with `cordon secret put`), by name.
//!
//! ```no_run
//! let greeting = cordon_sdk::config::get("GREETING")?.unwrap_or_else(|| "hello".into());
//! let api_key = cordon_sdk::config::require("API_KEY")?;
//! # Ok::<(), cordon_sdk::Error>(())
//! ```

use crate::bindings::wasi::config::store;
use crate::{Error, ErrorKind};

impl From<store::Error> for Error {
    fn from(e: store::Error) -> Error {
        match e {
            store::Error::Upstream(message) | store::Error::Io(message) => Error::new(ErrorKind::Other, message),
        }
    }
}

/// The value of variable or secret `key`, or `None` when the worker has none by that name.
pub fn get(key: &str) -> Result<Option<String>, Error> {
    Ok(store::get(key)?)
}

/// Like [`get`], but a missing key is an error that names it.
pub fn require(key: &str) -> Result<String, Error> {
    get(key)?
        .ok_or_else(|| Error::new(ErrorKind::NoSuchBinding, format!("no variable or secret named \"{key}\" is granted to this worker")))
}

/// Every variable and granted secret.
pub fn get_all() -> Result<Vec<(String, String)>, Error> {
    Ok(store::get_all()?)
}
