//! The three measurements, each one guest boot per call, and what they share.

pub mod boot;
pub mod daemon;
pub mod disk;
pub mod exits;
pub mod idle_memory;
pub mod interrupt;
pub mod migrate;
pub mod net;
pub mod snapshot;

use std::time::{Duration, Instant};

use crate::child::{Line, VmmProcess};
use crate::error::Result;
use crate::vmm::GuestSpec;

/// Settings every scenario uses.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The guest and its size.
    pub guest: GuestSpec,
    /// The line (substring) the guest prints when it is ready for commands.
    pub ready_marker: String,
    /// Extra kernel command-line words put before `cmds=...`.
    pub cmdline_extra: String,
    /// Deadline from spawn to the ready marker.
    pub boot_timeout: Duration,
    /// How long to wait for a process exit after `poweroff` before giving up on it.
    pub exit_grace: Duration,
    /// Deadline for one benchmark command's answer.
    pub command_timeout: Duration,
    /// The watchdog kills any child this long after spawn, whatever it is doing.
    pub hard_timeout: Duration,
    /// Port writes per `bench-pio`.
    pub pio_count: u64,
    /// MMIO writes per `bench-mmio`.
    pub mmio_count: u64,
    /// `cmds=` value of the idle guest measured for memory (empty: no `cmds=` at all).
    pub idle_cmds: String,
    /// Time between the ready marker and reading smaps.
    pub settle: Duration,
    /// Window over which the idle VMM's CPU use is measured.
    pub idle_window: Duration,
}

impl RunConfig {
    /// Kernel command line running `cmds` (`;`-separated); no `cmds=` if `cmds` is empty.
    pub fn cmdline(&self, cmds: &str) -> String {
        let mut words = Vec::new();
        if !self.cmdline_extra.is_empty() {
            words.push(self.cmdline_extra.clone());
        }
        if !cmds.is_empty() {
            words.push(format!("cmds=\"{cmds}\""));
        }
        words.join(" ")
    }
}

/// Wait for the guest's ready marker, at most `cfg.boot_timeout` after spawn; every scenario
/// starts this way.
pub fn wait_ready(p: &mut VmmProcess, cfg: &RunConfig) -> Result<Line> {
    let (ready, _) = p.wait_line(p.start() + cfg.boot_timeout, "the ready marker", |l| {
        l.contains(cfg.ready_marker.as_str())
    })?;
    Ok(ready)
}

/// Milliseconds from `from` to `to`.
pub fn ms_between(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1e3
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::child::CommandSpec;
    use std::path::PathBuf;

    /// A fake VMM: ignores the kernel command line and runs `script` with `/bin/sh -c`.
    pub fn sh(script: &'static str) -> impl Fn(&str) -> CommandSpec {
        move |_cmdline: &str| CommandSpec {
            program: PathBuf::from("/bin/sh"),
            args: vec!["-c".into(), script.into()],
        }
    }

    /// A config with short timeouts for scenario tests against fake VMMs.
    pub fn config() -> RunConfig {
        RunConfig {
            guest: GuestSpec {
                kernel: PathBuf::from("/g.elf"),
                memory_mib: 16,
                cpus: 1,
            },
            ready_marker: "FERRITE-TESTGUEST READY".into(),
            cmdline_extra: String::new(),
            boot_timeout: Duration::from_secs(10),
            exit_grace: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
            hard_timeout: Duration::from_secs(30),
            pio_count: 1000,
            mmio_count: 500,
            idle_cmds: String::new(),
            settle: Duration::from_millis(10),
            idle_window: Duration::from_millis(50),
        }
    }

    #[test]
    fn test_cmdline_extra_and_cmds_quoted() {
        // Arrange
        let mut cfg = config();
        cfg.cmdline_extra = "console=ttyS0".into();

        // Act
        let line = cfg.cmdline("bench-pio 5;poweroff");

        // Assert
        assert_eq!(line, "console=ttyS0 cmds=\"bench-pio 5;poweroff\"");
    }

    #[test]
    fn test_cmdline_empty_cmds_no_cmds_word() {
        // Arrange
        let cfg = config();

        // Act
        let line = cfg.cmdline("");

        // Assert
        assert_eq!(line, "");
    }
}
