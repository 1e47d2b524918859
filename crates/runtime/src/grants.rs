//! Which capability interfaces a worker's config grants. Every capability
//! is linked for every worker, so the check that a component imports only
//! what its worker was granted happens here, at load time, and names the
//! config section that would grant the import.

use cordon_config::WorkerConfig;
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::LoadError;

/// One capability: its interfaces, whether a worker has it, and the config
/// that grants it.
struct Capability {
    interfaces: &'static [&'static str],
    granted: fn(&WorkerConfig) -> bool,
    section: &'static str,
}

const CAPABILITIES: &[Capability] = &[
    Capability { interfaces: cordon_kv::host::INTERFACES, granted: |w| !w.grants.kv.is_empty(), section: "a [[worker.kv]] grant" },
    Capability { interfaces: cordon_sql::host::INTERFACES, granted: |w| !w.grants.sql.is_empty(), section: "a [[worker.sql]] grant" },
    Capability {
        interfaces: cordon_postgres::host::INTERFACES,
        granted: |w| !w.grants.postgres.is_empty(),
        section: "a [[worker.postgres]] grant",
    },
    Capability {
        interfaces: cordon_vars::host::INTERFACES,
        granted: |w| !w.grants.vars.is_empty() || !w.grants.secrets.is_empty(),
        section: "[worker.vars] or secrets = [...]",
    },
];

/// `package:name/interface` without its `@version`.
fn unversioned(name: &str) -> &str {
    name.split('@').next().unwrap_or(name)
}

/// Refuses a component that imports a capability its worker was not granted.
pub(crate) fn check(engine: &Engine, component: &Component, worker: &WorkerConfig) -> Result<(), LoadError> {
    for (import, _) in component.component_type().imports(engine) {
        let name = unversioned(import);
        let Some(cap) = CAPABILITIES.iter().find(|c| c.interfaces.iter().any(|i| unversioned(i) == name)) else { continue };
        if !(cap.granted)(worker) {
            return Err(LoadError::Ungranted { interface: import.to_string(), section: cap.section });
        }
    }
    Ok(())
}
