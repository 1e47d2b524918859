//! The sandbox policy: every process-wide setting of the wasmtime `Engine`,
//! decided once at startup, and the posture report that says what is in force.
//!
//! Invariants set here (see docs/SECURITY.md for the tests that prove them):
//! - instances come from the pooling allocator, each linear memory in its own
//!   4 GiB reservation with guard regions around it, so an out-of-bounds
//!   access faults instead of reading a neighbour;
//! - memory is initialised copy-on-write from the compiled image and reset
//!   between instances, so nothing of one request's memory is visible to the next;
//! - memory protection keys are used where the CPU has them (`auto`) or
//!   demanded (`required`);
//! - wasm threads and shared memory are off; Cranelift's Spectre mitigations
//!   keep their defaults (on);
//! - epoch interruption is on, which is how CPU limits are enforced.

use cordon_config::{MemoryProtectionKeys, SandboxConfig, SecurityConfig};
use serde::Serialize;
use wasmtime::{Enabled, InstanceAllocationStrategy, PoolingAllocationConfig};

/// The part of a guest's fiber stack above the wasm stack, for the host
/// frames of the calls it makes.
pub const HOST_STACK_BYTES: u64 = 1 << 20;

/// Virtual address space reserved per linear memory. With 4 GiB, every
/// 32-bit address a guest can form stays inside its own reservation, so
/// bounds checks are replaced by the guard region.
pub const MEMORY_RESERVATION_BYTES: u64 = 4 << 30;
/// Unmapped bytes after each reservation (and before it, see
/// `guard_before_linear_memory`).
pub const MEMORY_GUARD_BYTES: u64 = 32 << 20;
/// How often the epoch advances; the granularity of CPU-limit checks.
pub const EPOCH_TICK: std::time::Duration = std::time::Duration::from_millis(1);
/// Resolution of every clock a guest sees.
pub const CLOCK_RESOLUTION_NS: u64 = 1_000_000;

/// Core instances, memories and tables a component may have; sized for
/// components built by current toolchains (a main module plus adapter shims).
const CORE_INSTANCES_PER_COMPONENT: u32 = 32;
pub(crate) const MEMORIES_PER_COMPONENT: u32 = 2;
pub(crate) const TABLES_PER_COMPONENT: u32 = 8;

/// Bytes of each linear memory (and table) kept mapped when its slot is
/// reused. Where the kernel offers `PAGEMAP_SCAN` (Linux 6.7+), only the
/// pages an instance actually dirtied are reset, by copying the original
/// contents back; elsewhere the lowest bytes are reset with `memset`. Either
/// way the next instance sees exactly the initial image, without a page
/// fault for every page it touches again.
const KEEP_RESIDENT_BYTES: usize = 2 << 20;
/// Slots whose pages are returned to the kernel in one batch.
const DECOMMIT_BATCH: usize = 16;

/// Why the engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "memory protection keys are required (security.memory_protection_keys = \"required\"), \
         but this CPU or kernel does not support them (no `pku`/`ospke` CPU flag). \
         Run on a CPU with PKU (Intel Skylake-SP or later, AMD Zen 3 or later), \
         or set memory_protection_keys = \"auto\" to fall back to guard pages alone"
    )]
    MemoryProtectionKeysUnavailable,
    #[error("the sandbox engine could not be created: {0}")]
    Engine(String),
}

/// What the sandbox enforces, as reported at startup and on `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct Posture {
    pub allocator: AllocatorPosture,
    pub memory_protection_keys: MpkPosture,
    pub guard_pages: GuardPosture,
    pub copy_on_write_memory_init: bool,
    /// How a slot is made clean for its next instance.
    pub slot_reuse: SlotReusePosture,
    pub wasm_threads: bool,
    pub shared_memory: bool,
    pub spectre_mitigations: &'static str,
    pub clock_resolution_ns: u64,
    pub cpu_limit_check_interval_ms: u64,
    pub max_wasm_stack_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AllocatorPosture {
    pub strategy: &'static str,
    pub max_instances: u32,
    pub total_core_instances: u32,
    pub total_memories: u32,
    pub max_memory_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlotReusePosture {
    /// Bytes per memory reset in place (only dirty pages where the kernel
    /// supports `PAGEMAP_SCAN`) instead of being unmapped.
    pub keep_resident_bytes: usize,
    pub dirty_page_scan: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct MpkPosture {
    pub setting: String,
    pub active: bool,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GuardPosture {
    pub enabled: bool,
    pub memory_reservation_bytes: u64,
    pub guard_bytes_after: u64,
    pub guard_before_memory: bool,
    pub signals_based_traps: bool,
}

/// Whether this CPU and kernel offer memory protection keys, as wasmtime
/// detects them.
pub fn cpu_has_memory_protection_keys() -> bool {
    PoolingAllocationConfig::are_memory_protection_keys_available()
}

/// Decides whether MPK will be used, given the setting and what the CPU
/// offers. Separate from detection so that both branches can be tested on
/// any machine.
pub fn decide_mpk(setting: MemoryProtectionKeys, available: bool) -> Result<MpkPosture, PolicyError> {
    let (active, reason) = match (setting, available) {
        (MemoryProtectionKeys::Off, _) => {
            (false, "disabled by security.memory_protection_keys = \"off\"; linear memories are isolated by guard pages".to_string())
        }
        (MemoryProtectionKeys::Auto, true) => (true, "the CPU supports them and security.memory_protection_keys = \"auto\"".to_string()),
        (MemoryProtectionKeys::Auto, false) => (
            false,
            "the CPU or kernel does not support them (no `pku`/`ospke` CPU flag); linear memories are isolated by guard pages".to_string(),
        ),
        (MemoryProtectionKeys::Required, true) => {
            (true, "required by security.memory_protection_keys and supported by the CPU".to_string())
        }
        (MemoryProtectionKeys::Required, false) => return Err(PolicyError::MemoryProtectionKeysUnavailable),
    };
    Ok(MpkPosture { setting: setting.to_string(), active, reason })
}

/// Builds the engine configuration for `sandbox` and `security`, with linear
/// memories capped at `max_memory_mb`.
pub fn engine_config(
    security: &SecurityConfig,
    sandbox: &SandboxConfig,
    max_memory_mb: u64,
    mpk_available: bool,
) -> Result<(wasmtime::Config, Posture), PolicyError> {
    let mpk = decide_mpk(security.memory_protection_keys, mpk_available)?;
    let n = sandbox.max_instances;
    let max_memory_bytes = max_memory_mb << 20;
    let stack = u64::from(sandbox.max_wasm_stack_kb) * 1024;

    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .total_memories(n.saturating_mul(MEMORIES_PER_COMPONENT))
        .total_tables(n.saturating_mul(TABLES_PER_COMPONENT))
        .total_stacks(n)
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .max_memories_per_component(MEMORIES_PER_COMPONENT)
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .max_memory_size(max_memory_bytes as usize)
        .max_component_instance_size(1 << 20)
        .max_core_instance_size(1 << 20)
        .table_elements(sandbox.max_table_elements as usize)
        .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
        .table_keep_resident(KEEP_RESIDENT_BYTES / 8)
        .pagemap_scan(Enabled::Auto)
        .decommit_batch_size(DECOMMIT_BATCH)
        .memory_protection_keys(if mpk.active { Enabled::Yes } else { Enabled::No });

    let mut c = wasmtime::Config::new();
    // The wasm threads proposal is compiled out of this build of wasmtime
    // (no `threads` feature), so no module with shared memory or atomics
    // waiting can load; shared memory is refused here as well.
    c.wasm_component_model(true)
        .shared_memory(false)
        .concurrency_support(false)
        .epoch_interruption(true)
        .max_wasm_stack(stack as usize)
        // The fiber stack holds the wasm stack plus host frames above it.
        .async_stack_size((stack + HOST_STACK_BYTES) as usize)
        .memory_reservation(MEMORY_RESERVATION_BYTES)
        .memory_guard_size(MEMORY_GUARD_BYTES)
        .guard_before_linear_memory(true)
        .memory_init_cow(true)
        .signals_based_traps(true)
        .cranelift_opt_level(wasmtime::OptLevel::Speed)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));

    let posture = Posture {
        allocator: AllocatorPosture {
            strategy: "pooling",
            max_instances: n,
            total_core_instances: n.saturating_mul(CORE_INSTANCES_PER_COMPONENT),
            total_memories: n.saturating_mul(MEMORIES_PER_COMPONENT),
            max_memory_bytes,
        },
        memory_protection_keys: mpk,
        guard_pages: GuardPosture {
            enabled: true,
            memory_reservation_bytes: MEMORY_RESERVATION_BYTES,
            guard_bytes_after: MEMORY_GUARD_BYTES,
            guard_before_memory: true,
            signals_based_traps: true,
        },
        copy_on_write_memory_init: true,
        slot_reuse: SlotReusePosture {
            keep_resident_bytes: KEEP_RESIDENT_BYTES,
            dirty_page_scan: "auto (PAGEMAP_SCAN where the kernel has it)",
        },
        wasm_threads: false,
        shared_memory: false,
        spectre_mitigations: "on (Cranelift defaults)",
        clock_resolution_ns: CLOCK_RESOLUTION_NS,
        cpu_limit_check_interval_ms: EPOCH_TICK.as_millis() as u64,
        max_wasm_stack_bytes: stack,
    };
    Ok((c, posture))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_without_cpu_support_is_refused_with_a_fix() {
        let err = decide_mpk(MemoryProtectionKeys::Required, false).unwrap_err().to_string();
        assert!(err.contains("required"), "{err}");
        assert!(err.contains("pku"), "{err}");
        assert!(err.contains("\"auto\""), "the message names the fallback: {err}");
    }

    #[test]
    fn auto_falls_back_to_guard_pages_and_says_why() {
        let p = decide_mpk(MemoryProtectionKeys::Auto, false).unwrap();
        assert!(!p.active);
        assert!(p.reason.contains("does not support"), "{}", p.reason);
        let p = decide_mpk(MemoryProtectionKeys::Auto, true).unwrap();
        assert!(p.active);
    }

    #[test]
    fn off_is_never_active() {
        assert!(!decide_mpk(MemoryProtectionKeys::Off, true).unwrap().active);
    }

    #[test]
    fn this_machine_reports_detection_consistently() {
        // On a CPU without PKU, `auto` must fall back and `required` must
        // refuse; on one with it, both are active.
        let have = cpu_has_memory_protection_keys();
        assert_eq!(decide_mpk(MemoryProtectionKeys::Auto, have).unwrap().active, have);
        assert_eq!(decide_mpk(MemoryProtectionKeys::Required, have).is_ok(), have);
    }
}
