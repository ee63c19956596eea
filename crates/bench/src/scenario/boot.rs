//! Boot timeline: spawn → first console byte → ready marker → process exit after `poweroff`.

use crate::child::{CommandSpec, VmmProcess};
use crate::error::Result;
use crate::scenario::{ms_between, wait_ready, RunConfig};

/// One boot, in milliseconds after the timestamp taken just before spawn.
#[derive(Debug, Clone, PartialEq)]
pub struct BootSample {
    /// First byte on the serial console (whoever wrote it: firmware or guest).
    pub first_byte_ms: f64,
    /// The ready marker line.
    pub ready_ms: f64,
    /// Process exit after the guest's `poweroff`, or why there was none.
    pub exit_ms: std::result::Result<f64, String>,
}

/// Boot the guest with `cmds="poweroff"` once and time it.
pub fn boot_once(command: &dyn Fn(&str) -> CommandSpec, cfg: &RunConfig) -> Result<BootSample> {
    let spec = command(&cfg.cmdline("poweroff"));
    let mut p = VmmProcess::spawn(&spec, cfg.hard_timeout)?;
    let start = p.start();
    let ready = wait_ready(&mut p, cfg)?;
    // A complete line arrived, so a first byte did too.
    let first = p.first_byte().unwrap_or(ready.at);
    let exit_ms = match p.wait_exit(ready.at + cfg.exit_grace) {
        Some(exit) if exit.killed => Err("killed by the watchdog".to_string()),
        Some(exit) if exit.status == "exit code 0" => Ok(ms_between(start, exit.at)),
        Some(exit) => Err(format!("ended with {}", exit.status)),
        None => Err(format!(
            "still running {:?} after the ready marker (poweroff not honoured)",
            cfg.exit_grace
        )),
    };
    p.kill();
    Ok(BootSample {
        first_byte_ms: ms_between(start, first),
        ready_ms: ms_between(start, ready.at),
        exit_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::BenchError;
    use crate::scenario::test_support::{config, sh};
    use std::time::Duration;

    #[test]
    fn test_boot_once_guest_powers_off_all_times_ordered() {
        // Arrange
        // The pause before exiting keeps the reader thread's timestamp of the last line ahead
        // of the pidfd thread's exit timestamp even on a loaded host (two threads observe the
        // two events; without a gap their order is up to the scheduler).
        let vmm = sh(
            "printf 'banner\\n'; sleep 0.05; printf 'FERRITE-TESTGUEST READY\\nOK poweroff\\n'; sleep 0.05",
        );
        let cfg = config();

        // Act
        let s = boot_once(&vmm, &cfg).expect("boot");

        // Assert
        let exit = s.exit_ms.expect("exited");
        assert!(s.first_byte_ms <= s.ready_ms);
        assert!(s.ready_ms <= exit);
    }

    #[test]
    fn test_boot_once_no_poweroff_exit_reported_missing() {
        // Arrange
        let vmm = sh("printf 'FERRITE-TESTGUEST READY\\n'; exec sleep 100");
        let mut cfg = config();
        cfg.exit_grace = Duration::from_millis(100);

        // Act
        let s = boot_once(&vmm, &cfg).expect("boot");

        // Assert
        assert!(s.exit_ms.unwrap_err().contains("poweroff not honoured"));
    }

    #[test]
    fn test_boot_once_vmm_fails_error() {
        // Arrange
        let vmm = sh("echo 'no kvm' >&2; exit 1");
        let cfg = config();

        // Act
        let r = boot_once(&vmm, &cfg);

        // Assert
        assert!(matches!(r, Err(BenchError::EarlyExit { .. })));
    }
}
