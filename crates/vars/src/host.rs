//! `wasi:config/store` for guests: the worker's `[worker.vars]` and the
//! secrets granted to it by name in `secrets = [...]`. Secret values are
//! read from the vault on each call and decrypted only then, so plaintext
//! lives in the host no longer than the call.

use std::collections::BTreeMap;
use std::sync::Arc;

use std::mem::MaybeUninit;

use cordon_config::WorkerConfig;
use wasmtime::StoreContextMut;
use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LowerContext};
use wasmtime::component::{ComponentType, Linker, Lower};
use zeroize::Zeroizing;

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
    async fn secret(&self, name: &str) -> Result<Option<GuestString>, store::Error> {
        let Some(vault) = self.vault.clone() else { return Ok(None) };
        let (tenant, worker, name) = (self.tenant.clone(), self.worker.clone(), name.to_string());
        // On the vault's own pool, under the tenant's share of it; a read
        // whose request ended is dropped from the queue.
        let pool = Arc::clone(vault.read_pool());
        let read = pool.spawn(&self.tenant.clone(), move |_: &cordon_blocking::JobContext| {
            vault.get(&tenant, &worker, &name).map(|v| v.map(|s| GuestString(s.into_inner())))
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

/// The interface name that [`add_to_linker`] defines.
const STORE_INTERFACE: &str = "wasi:config/store@0.2.0-rc.1";

/// `wasi:config/store`'s two functions, defined by hand rather than through
/// the generated bindings so that what they return is a [`GuestString`]:
/// the plaintext of a secret is zeroed as soon as wasmtime has copied it
/// into the guest, instead of being freed as an ordinary `String`.
pub fn add_to_linker<T: Send + 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> VarsView<'_>) -> wasmtime::Result<()> {
    let mut store = linker.instance(STORE_INTERFACE)?;
    store.func_wrap_async("get", move |mut cx: StoreContextMut<'_, T>, (key,): (String,)| {
        Box::new(async move { Ok((get(cx.data_mut()).get(key).await,)) })
    })?;
    store.func_wrap_async("get-all", move |mut cx: StoreContextMut<'_, T>, (): ()| {
        Box::new(async move { Ok((get(cx.data_mut()).get_all().await,)) })
    })?;
    Ok(())
}

impl VarsView<'_> {
    async fn get(&self, key: String) -> Result<Option<GuestString>, store::Error> {
        if let Some(value) = self.state.vars.get(&key) {
            return Ok(Some(GuestString::from(value.clone())));
        }
        if self.state.secrets.contains(&key) {
            return self.state.secret(&key).await;
        }
        Ok(None)
    }

    async fn get_all(&self) -> Result<Vec<(GuestString, GuestString)>, store::Error> {
        let mut all: Vec<(GuestString, GuestString)> =
            self.state.vars.iter().map(|(k, v)| (GuestString::from(k.clone()), GuestString::from(v.clone()))).collect();
        for name in &self.state.secrets {
            if let Some(value) = self.state.secret(name).await? {
                all.push((GuestString::from(name.clone()), value));
            }
        }
        Ok(all)
    }
}

/// A `string` handed to a guest that is zeroed when dropped. Wasmtime
/// lowers a function's results into the guest's memory and then drops
/// them, so the host's copy of a secret lives no longer than the call.
pub struct GuestString(Zeroizing<String>);

impl From<String> for GuestString {
    fn from(s: String) -> Self {
        GuestString(Zeroizing::new(s))
    }
}

// SAFETY: every item forwards to `String`'s own implementation, so the
// lowered form, the canonical ABI and the type check are exactly those of a
// `string`; no invariant of the trait depends on anything else.
unsafe impl ComponentType for GuestString {
    type Lower = <String as ComponentType>::Lower;
    const ABI: CanonicalAbiInfo = <String as ComponentType>::ABI;
    const MAY_REQUIRE_REALLOC: bool = <String as ComponentType>::MAY_REQUIRE_REALLOC;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <String as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: lowering forwards to `String`'s, which writes exactly the
// `Self::Lower` values and memory that a `string` occupies.
unsafe impl Lower for GuestString {
    fn linear_lower_to_flat<U>(
        &self,
        cx: &mut LowerContext<'_, U>,
        ty: InterfaceType,
        dst: &mut MaybeUninit<Self::Lower>,
    ) -> wasmtime::Result<()> {
        <String as Lower>::linear_lower_to_flat(&self.0, cx, ty, dst)
    }

    fn linear_lower_to_memory<U>(&self, cx: &mut LowerContext<'_, U>, ty: InterfaceType, offset: usize) -> wasmtime::Result<()> {
        <String as Lower>::linear_lower_to_memory(&self.0, cx, ty, offset)
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
