//! Secrets passed in environment variables (the master key, origin and proxy
//! passwords) leave the environment as soon as `serve` has read them, and the
//! process cannot be dumped.
//!
//! Removing a variable from the environment is not enough: `/proc/PID/environ`
//! shows the block the process was started with, not the current `environ`
//! array. So each secret's bytes are overwritten in place before the variable
//! is removed, and the values live on only in zeroising memory.

use std::collections::BTreeMap;
use std::ffi::CStr;

use cordon_config::Config;
use zeroize::Zeroizing;

/// The values of the secret-bearing variables, taken out of the process's
/// environment.
pub struct SecretEnv {
    values: BTreeMap<String, Zeroizing<String>>,
}

impl SecretEnv {
    /// The names of the variables `config` reads a secret from.
    pub fn names(config: &Config) -> Vec<String> {
        let mut names = vec![cordon_vars::vault::MASTER_KEY_ENV.to_string()];
        for db in &config.databases {
            names.extend(db.origin_password_env.iter().cloned());
            names.extend(db.users.iter().map(|u| u.password_env.clone()));
        }
        names.sort();
        names.dedup();
        names
    }

    /// Takes each of `names` out of the environment: its value is kept here,
    /// its bytes in the environment block are overwritten, and the variable
    /// is removed.
    ///
    /// # Safety
    ///
    /// No other thread may read or change the environment during the call:
    /// call it before the runtime, the engine or any resolver starts
    /// threads.
    pub unsafe fn take(names: &[String]) -> SecretEnv {
        let mut values = BTreeMap::new();
        for name in names {
            // SAFETY: the caller guarantees no other thread touches the
            // environment meanwhile.
            if let Some(value) = unsafe { take_one(name) } {
                values.insert(name.clone(), value);
            }
        }
        SecretEnv { values }
    }

    /// A copy of the value of `name`, if it was set.
    pub fn get(&self, name: &str) -> Option<String> {
        self.values.get(name).map(|v| v.to_string())
    }
}

/// Copies the value of `name` out, overwrites every `name=value` entry in
/// the environment block with zeros after the `=`, and removes the variable.
///
/// # Safety
///
/// As [`SecretEnv::take`].
unsafe fn take_one(name: &str) -> Option<Zeroizing<String>> {
    let prefix = format!("{name}=");
    let mut value = None;
    // SAFETY: `environ` is the C library's NULL-terminated array of
    // NUL-terminated "NAME=value" strings; nobody changes it meanwhile (the
    // caller's guarantee), and each string is writable memory of this
    // process (the initial block on the stack, or a copy made by setenv).
    unsafe {
        let mut entry = libc::environ;
        while !entry.is_null() && !(*entry).is_null() {
            let text = CStr::from_ptr(*entry);
            let bytes = text.to_bytes();
            if bytes.starts_with(prefix.as_bytes()) {
                let found = &bytes[prefix.len()..];
                if value.is_none() {
                    value = Some(Zeroizing::new(String::from_utf8_lossy(found).into_owned()));
                }
                let start = (*entry).add(prefix.len()).cast::<u8>();
                std::ptr::write_bytes(start, 0, found.len());
            }
            entry = entry.add(1);
        }
        std::env::remove_var(name);
    }
    value
}

/// Makes the process non-dumpable and its core-file limit zero, so that a
/// crash or another process of the same user cannot read the keys and
/// passwords in its memory (`PR_SET_DUMPABLE` also forbids `ptrace` by
/// unprivileged processes of the same user). Returns what could not be set.
pub fn forbid_core_dumps() -> Vec<String> {
    let mut failed = Vec::new();
    let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit only reads the struct passed by reference.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) } != 0 {
        failed.push(format!("RLIMIT_CORE: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: PR_SET_DUMPABLE takes one integer argument; the others are
    // ignored.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        failed.push(format!("PR_SET_DUMPABLE: {}", std::io::Error::last_os_error()));
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_variable_is_kept_here_and_gone_from_the_environment() {
        let name = "CORDON_TEST_SECRET_ENV";
        // SAFETY: no other test in this binary touches this variable, and
        // none reads the environment while this one runs.
        unsafe { std::env::set_var(name, "s3cr3t-value") };
        let taken = unsafe { SecretEnv::take(&[name.to_string(), "CORDON_TEST_UNSET".to_string()]) };
        assert_eq!(taken.get(name).as_deref(), Some("s3cr3t-value"));
        assert_eq!(taken.get("CORDON_TEST_UNSET"), None);
        assert!(std::env::var_os(name).is_none());
    }
}
