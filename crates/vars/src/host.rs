//! `wasi:config/store` for guests: the worker's `[worker.vars]` and the
//! secrets granted to it by name in `secrets = [...]`. Secret values are
//! read from the vault on each call and decrypted only then, so plaintext
//! lives in the host no longer than the call.

use std::collections::BTreeMap;
use std::sync::Arc;

use cordon_config::WorkerConfig;
use wasmtime::component::{HasData, Linker};

use crate::vault::{Vault, VaultError};

mod generated {
    wasmtime::component::bindgen!({
        path: "../../wit/config",
        world: "wasi:config/imports",
        imports: { default: async | trappable },
    });
}

use generated::wasi::config::store;

/// The WIT interfaces this capability implements; a component importing
/// them needs `[worker.vars]` or `secrets`.
pub const INTERFACES: &[&str] = &["wasi:config/store@0.2.0-rc.1"];

/// A worker's variables and secret grants.
pub struct WorkerVars {
    tenant: String,
    worker: String,
    vars: BTreeMap<String, String>,
    secrets: Vec<String>,
    vault: Option<Arc<Vault>>,
}

/// Why a worker's secrets cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum VarsError {
    #[error(
        "secret `{name}` is granted to this worker but has no value: run `cordon secret put --config FILE --tenant {tenant} --worker {worker} {name}`"
    )]
    MissingSecret { tenant: String, worker: String, name: String },
    #[error(transparent)]
    Vault(#[from] VaultError),
}

impl WorkerVars {
    /// Decrypts every granted secret once and drops it, so that a missing
    /// value or a record that cannot be decrypted stops the start, with its
    /// fix, rather than failing the worker's requests later.
    pub fn new(worker: &WorkerConfig, vault: Option<Arc<Vault>>) -> Result<WorkerVars, VarsError> {
        let secrets = worker.grants.secrets.clone();
        for name in &secrets {
            let value = match &vault {
                Some(v) => v.get(&worker.tenant, &worker.name, name)?,
                None => None,
            };
            // Zeroed as it is dropped.
            if value.is_none() {
                return Err(VarsError::MissingSecret { tenant: worker.tenant.clone(), worker: worker.name.clone(), name: name.clone() });
            }
        }
        Ok(WorkerVars { tenant: worker.tenant.clone(), worker: worker.name.clone(), vars: worker.grants.vars.clone(), secrets, vault })
    }

    /// No variables and no secrets.
    pub fn none() -> WorkerVars {
        WorkerVars { tenant: String::new(), worker: String::new(), vars: BTreeMap::new(), secrets: Vec::new(), vault: None }
    }

    /// Reads and decrypts one granted secret.
    async fn secret(&self, name: &str) -> Result<Option<String>, store::Error> {
        let Some(vault) = self.vault.clone() else { return Ok(None) };
        let (tenant, worker, name) = (self.tenant.clone(), self.worker.clone(), name.to_string());
        // On the vault's own pool, under the tenant's share of it; a read
        // whose request ended is dropped from the queue.
        let pool = Arc::clone(vault.read_pool());
        let read = pool.spawn(&self.tenant.clone(), move |_: &cordon_blocking::JobContext| {
            vault.get(&tenant, &worker, &name).map(|v| v.map(|s| s.expose().to_string()))
        });
        let read = match read {
            Ok(read) => read.await,
            Err(e) => return Err(store::Error::Upstream(format!("secret read refused: {e}"))),
        };
        match read {
            Ok(done) => done.value.map_err(|e| {
                tracing::error!(tenant = %self.tenant, worker = %self.worker, error = %e, "cannot read a secret");
                store::Error::Upstream("the secret store is unavailable".to_string())
            }),
            Err(e) => Err(store::Error::Upstream(format!("the secret store is unavailable: {e}"))),
        }
    }
}

pub struct VarsView<'a> {
    pub state: &'a WorkerVars,
}

struct Vars;

impl HasData for Vars {
    type Data<'a> = VarsView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> VarsView<'_>) -> wasmtime::Result<()> {
    generated::Imports::add_to_linker::<T, Vars>(linker, get)
}

impl store::Host for VarsView<'_> {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<String>, store::Error>> {
        if let Some(value) = self.state.vars.get(&key) {
            return Ok(Ok(Some(value.clone())));
        }
        if self.state.secrets.contains(&key) {
            return Ok(self.state.secret(&key).await);
        }
        Ok(Ok(None))
    }

    async fn get_all(&mut self) -> wasmtime::Result<Result<Vec<(String, String)>, store::Error>> {
        let mut all: Vec<(String, String)> = self.state.vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for name in &self.state.secrets {
            match self.state.secret(name).await {
                Ok(Some(value)) => all.push((name.clone(), value)),
                Ok(None) => {}
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(all))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::vault::{MasterKey, SecretValue};

    const KEY: &str = "0101010101010101010101010101010101010101010101010101010101010101";

    fn app_granted_api_key(dir: &Path) -> WorkerConfig {
        std::fs::write(dir.join("x.wasm"), b"").unwrap();
        let text = "[[worker]]\nname = \"app\"\ntenant = \"acme\"\ncomponent = \"x.wasm\"\nroutes = [\"h/\"]\nsecrets = [\"API_KEY\"]\n";
        cordon_config::Config::parse(&dir.join("cordon.toml"), text).unwrap().workers.remove(0)
    }

    #[test]
    fn a_granted_secret_that_cannot_be_decrypted_stops_the_start_with_its_fix() {
        let dir = tempfile::tempdir().unwrap();
        let worker = app_granted_api_key(dir.path());
        let data = dir.path().join("data");
        let vault = Arc::new(Vault::open(&data, MasterKey::from_env_value(KEY).unwrap()).unwrap());
        // Stored for another worker, then moved to this one: it exists, but
        // its associated data says it is not this worker's.
        vault.put("acme", "other", "API_KEY", &SecretValue::new("v".into())).unwrap();
        rusqlite::Connection::open(Vault::database_path(&data))
            .unwrap()
            .execute("UPDATE secrets SET worker = 'app' WHERE worker = 'other'", [])
            .unwrap();
        let err = WorkerVars::new(&worker, Some(vault.clone())).err().expect("the start is refused");
        assert!(matches!(err, VarsError::Vault(VaultError::Undecryptable { .. })), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("cannot be decrypted") && msg.contains("cordon secret put"), "{msg}");
        // Stored again, it starts.
        vault.put("acme", "app", "API_KEY", &SecretValue::new("v".into())).unwrap();
        assert!(WorkerVars::new(&worker, Some(vault)).is_ok());
    }
}
