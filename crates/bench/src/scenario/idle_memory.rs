//! VMM memory overhead: the smaps of a ready, idle guest's VMM minus the guest RAM mapping,
//! and the CPU time the VMM burns while its guest is idle.

use std::time::{Duration, Instant};

use crate::child::{CommandSpec, VmmProcess};
use crate::cpu_time::process_cpu_time;
use crate::error::{BenchError, Result};
use crate::scenario::{wait_ready, RunConfig};
use crate::smaps::{self, MemoryUse};

/// What one idle guest's VMM uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdleSample {
    /// Memory split into guest RAM and VMM overhead.
    pub memory: MemoryUse,
    /// CPU milliseconds per second the VMM (all threads, vCPUs included) used while idle.
    pub cpu_ms_per_s: f64,
}

/// Boot an idle guest, wait until it is ready plus the settle time, read its VMM's smaps, then
/// measure its CPU use over `cfg.idle_window`.
pub fn memory_once(command: &dyn Fn(&str) -> CommandSpec, cfg: &RunConfig) -> Result<IdleSample> {
    let mut p = VmmProcess::spawn(&command(&cfg.cmdline(&cfg.idle_cmds)), cfg.hard_timeout)?;
    wait_ready(&mut p, cfg)?;
    std::thread::sleep(cfg.settle);
    let pid = p.pid();
    // The process must still be the live VMM when smaps is read.
    if let Some(exit) = p.wait_exit(std::time::Instant::now()) {
        return Err(BenchError::EarlyExit {
            status: exit.status,
            waiting_for: "the memory measurement".to_string(),
            stderr: p.stderr_tail(),
        });
    }
    let memory = smaps::measure(pid, cfg.guest.memory_mib << 20);
    let cpu_ms_per_s = memory
        .as_ref()
        .ok()
        .and_then(|_| idle_cpu(pid, cfg.idle_window));
    p.kill();
    let memory = memory?;
    let cpu_ms_per_s = cpu_ms_per_s.ok_or_else(|| BenchError::EarlyExit {
        status: "gone".to_string(),
        waiting_for: "the idle CPU measurement".to_string(),
        stderr: p.stderr_tail(),
    })?;
    Ok(IdleSample {
        memory,
        cpu_ms_per_s,
    })
}

/// CPU ms per wall second of `pid` over `window`.
fn idle_cpu(pid: u32, window: Duration) -> Option<f64> {
    let t0 = Instant::now();
    let c0 = process_cpu_time(pid)?;
    std::thread::sleep(window);
    let c1 = process_cpu_time(pid)?;
    let wall = t0.elapsed().as_secs_f64();
    Some(c1.saturating_sub(c0).as_secs_f64() * 1e3 / wall)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::test_support::{config, sh};

    #[test]
    fn test_memory_once_process_without_ram_mapping_error() {
        // Arrange
        let vmm = sh("echo 'FERRITE-TESTGUEST READY'; exec sleep 100");
        let cfg = config();

        // Act
        let r = memory_once(&vmm, &cfg);

        // Assert
        assert!(matches!(r, Err(BenchError::NoGuestRamMapping(_))));
    }

    #[test]
    fn test_memory_once_guest_exits_early_error() {
        // Arrange
        let vmm = sh("echo 'FERRITE-TESTGUEST READY'");
        let mut cfg = config();
        cfg.settle = std::time::Duration::from_millis(200);

        // Act
        let r = memory_once(&vmm, &cfg);

        // Assert
        assert!(matches!(r, Err(BenchError::EarlyExit { .. })));
    }
}
