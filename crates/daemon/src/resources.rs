//! Applying a VM's [`Resources`] to its cgroup, at start and live.

use api::{ApiError, ErrorCode, Resources};

use crate::error::internal;

/// The CFS period used for `cpu.max` (100 ms, the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// The memory cap when none is given: guest RAM plus room for the VMM itself (its threads,
/// device buffers, page tables) so a busy guest never gets its VMM OOM-killed.
pub fn default_memory_limit_mib(memory_mib: u64) -> u64 {
    memory_mib + (memory_mib / 8).max(256)
}

/// Write every limit of `r` to `cg`.
pub fn apply(cg: &cgroups::VmCgroup, r: &Resources, memory_mib: u64) -> Result<(), ApiError> {
    let quota = r
        .cpu_quota_pct
        .map(|pct| (u64::from(pct) * CPU_PERIOD_US / 100, CPU_PERIOD_US));
    cg.set_cpu_quota(quota).map_err(internal)?;
    cg.set_cpu_weight(r.cpu_weight.unwrap_or(100))
        .map_err(internal)?;
    let mem = r
        .memory_limit_mib
        .unwrap_or_else(|| default_memory_limit_mib(memory_mib));
    cg.set_memory_max(Some(mem << 20)).map_err(internal)?;
    cg.set_cpus(&r.pin_cpus)
        .map_err(|e| ApiError::bad_field("resources.pin_cpus", e.to_string()))?;
    Ok(())
}

/// Without cgroups, any limit is refused rather than silently ignored.
pub fn refuse_without_cgroups(r: &Resources) -> Result<(), ApiError> {
    if r == &Resources::default() {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::NotSupported,
        "This daemon runs without cgroups (--no-cgroups), so CPU, memory and pinning limits cannot be enforced: remove them from the VM's resources or restart ferrited with cgroups",
    ))
}
