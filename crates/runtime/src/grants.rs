//! The capabilities, in one table: for each, the interfaces it defines, how
//! it is linked (once, for every worker), whether a worker's config grants
//! it, and the config section that would. Every capability is linked for
//! every worker, so the check that a component imports only what its worker
//! was granted happens here, at load time, and names that section.

use cordon_config::WorkerConfig;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use crate::LoadError;
use crate::host::Host;

/// One capability crate's entry.
pub(crate) struct Capability {
    interfaces: &'static [&'static str],
    /// Adds its host functions to the linker every worker shares.
    link: fn(&mut Linker<Host>) -> wasmtime::Result<()>,
    granted: fn(&WorkerConfig) -> bool,
    section: &'static str,
}

pub(crate) const CAPABILITIES: &[Capability] = &[
    Capability {
        interfaces: cordon_kv::host::INTERFACES,
        link: crate::host::link_kv,
        granted: |w| !w.grants.kv.is_empty(),
        section: "a [[worker.kv]] grant",
    },
    Capability {
        interfaces: cordon_sql::host::INTERFACES,
        link: crate::host::link_sql,
        granted: |w| !w.grants.sql.is_empty(),
        section: "a [[worker.sql]] grant",
    },
    Capability {
        interfaces: cordon_postgres::host::INTERFACES,
        link: crate::host::link_postgres,
        granted: |w| !w.grants.postgres.is_empty(),
        section: "a [[worker.postgres]] grant",
    },
    Capability {
        interfaces: cordon_vars::host::INTERFACES,
        link: crate::host::link_vars,
        granted: |w| !w.grants.vars.is_empty() || !w.grants.secrets.is_empty(),
        section: "[worker.vars] or secrets = [...]",
    },
];

/// Links every capability of the table.
pub(crate) fn link_all(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    CAPABILITIES.iter().try_for_each(|c| (c.link)(linker))
}

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

/// Refuses a component that the engine, as sized at start, cannot run:
/// larger than `sandbox.max_component_mb`, with more memories or tables
/// than an instance slot holds, or a table or initial memory larger than
/// the slots' ceilings. Checked before the worker is served, so a deploy
/// is refused with the ceiling's name rather than failing its requests.
pub(crate) fn check_ceilings(component: &Component, bytes: u64, sandbox: &cordon_config::SandboxConfig) -> Result<(), LoadError> {
    let over = |ceiling, what, limit: u64, needed: u64| {
        Err(LoadError::OverCeiling(Box::new(crate::cache::OverCeiling { ceiling, what, limit, needed })))
    };
    if bytes > sandbox.max_component_bytes {
        return over("sandbox.max_component_mb", "bytes of component", sandbox.max_component_bytes >> 20, bytes);
    }
    let Some(needs) = component.resources_required() else { return Ok(()) };
    if needs.num_memories > crate::policy::MEMORIES_PER_COMPONENT {
        return over(
            "the memories per instance",
            "linear memories",
            crate::policy::MEMORIES_PER_COMPONENT.into(),
            needs.num_memories.into(),
        );
    }
    if needs.num_tables > crate::policy::TABLES_PER_COMPONENT {
        return over("the tables per instance", "tables", crate::policy::TABLES_PER_COMPONENT.into(), needs.num_tables.into());
    }
    if let Some(elements) = needs.max_initial_table_size
        && elements > u64::from(sandbox.max_table_elements)
    {
        return over("sandbox.max_table_elements", "table elements", sandbox.max_table_elements.into(), elements);
    }
    if let Some(pages) = needs.max_initial_memory_size
        && pages.saturating_mul(64 * 1024) > sandbox.max_memory_mb << 20
    {
        return over("sandbox.max_memory_mb", "MiB of initial linear memory", sandbox.max_memory_mb, pages.saturating_mul(64 * 1024) >> 20);
    }
    Ok(())
}
