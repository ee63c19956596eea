//! The VMMs under test and the exact command line each one gets for the same guest.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::child::CommandSpec;

/// Which VMM (and machine type) a column of the report is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmmKind {
    /// `ferrite run`.
    Ferrite,
    /// QEMU `-M microvm`.
    QemuMicrovm,
    /// QEMU `-M q35`.
    QemuQ35,
}

impl VmmKind {
    /// Column title in the report.
    pub fn label(self) -> &'static str {
        match self {
            VmmKind::Ferrite => "Ferrite",
            VmmKind::QemuMicrovm => "QEMU microvm",
            VmmKind::QemuQ35 => "QEMU q35",
        }
    }
}

/// The guest every VMM boots in one run.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// PVH ELF kernel (the test guest).
    pub kernel: PathBuf,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub cpus: u32,
}

/// One VMM under test: how to start it with a guest and a kernel command line.
#[derive(Debug, Clone)]
pub struct Vmm {
    /// Which VMM this is.
    pub kind: VmmKind,
    /// Its executable.
    pub program: PathBuf,
    /// QEMU `-M` value (unused for Ferrite).
    pub machine: String,
    /// Extra arguments appended after the common ones (e.g. `-bios`).
    pub extra_args: Vec<String>,
}

impl Vmm {
    /// Why this VMM cannot run here, if it cannot.
    pub fn unavailable_reason(&self) -> Option<String> {
        if !is_executable(&self.program) {
            return Some(format!(
                "{} not found at {}",
                self.kind.label(),
                self.program.display()
            ));
        }
        let mut args = self.extra_args.iter();
        while let Some(arg) = args.next() {
            if arg == "-bios" {
                if let Some(bios) = args.next() {
                    if !Path::new(bios).exists() {
                        return Some(format!("firmware {bios} not found"));
                    }
                }
            }
        }
        None
    }

    /// The command that boots `guest` with `cmdline`.
    pub fn command(&self, guest: &GuestSpec, cmdline: &str) -> CommandSpec {
        let kernel = guest.kernel.display().to_string();
        let args: Vec<String> = match self.kind {
            VmmKind::Ferrite => vec![
                "run".into(),
                "--kernel".into(),
                kernel,
                "--cmdline".into(),
                cmdline.into(),
                "--cpus".into(),
                guest.cpus.to_string(),
                "--memory".into(),
                format!("{}M", guest.memory_mib),
                "--no-reboot".into(),
            ],
            VmmKind::QemuMicrovm | VmmKind::QemuQ35 => vec![
                "-M".into(),
                self.machine.clone(),
                "-accel".into(),
                "kvm".into(),
                "-cpu".into(),
                "host,-arch-capabilities".into(),
                "-smp".into(),
                guest.cpus.to_string(),
                "-m".into(),
                format!("{}M", guest.memory_mib),
                "-no-user-config".into(),
                "-nodefaults".into(),
                "-nographic".into(),
                "-serial".into(),
                "stdio".into(),
                "-no-reboot".into(),
                "-kernel".into(),
                kernel,
                "-append".into(),
                cmdline.into(),
            ],
        };
        let mut args = args;
        args.extend(self.extra_args.iter().cloned());
        CommandSpec {
            program: self.program.clone(),
            args,
        }
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> GuestSpec {
        GuestSpec {
            kernel: PathBuf::from("/g.elf"),
            memory_mib: 512,
            cpus: 1,
        }
    }

    #[test]
    fn test_command_ferrite_uses_run_flags() {
        // Arrange
        let vmm = Vmm {
            kind: VmmKind::Ferrite,
            program: PathBuf::from("/f"),
            machine: String::new(),
            extra_args: vec![],
        };

        // Act
        let c = vmm.command(&guest(), "cmds=\"poweroff\"");

        // Assert
        assert_eq!(
            c.args.join(" "),
            "run --kernel /g.elf --cmdline cmds=\"poweroff\" --cpus 1 --memory 512M --no-reboot"
        );
    }

    #[test]
    fn test_command_qemu_machine_and_extra_args() {
        // Arrange
        let vmm = Vmm {
            kind: VmmKind::QemuQ35,
            program: PathBuf::from("/q"),
            machine: "q35".into(),
            extra_args: vec!["-bios".into(), "/qboot.rom".into()],
        };

        // Act
        let c = vmm.command(&guest(), "x");

        // Assert
        let line = c.args.join(" ");
        assert!(line.starts_with("-M q35 -accel kvm -cpu host,-arch-capabilities"));
        assert!(line.ends_with("-kernel /g.elf -append x -bios /qboot.rom"));
    }

    #[test]
    fn test_unavailable_reason_missing_binary() {
        // Arrange
        let vmm = Vmm {
            kind: VmmKind::QemuMicrovm,
            program: PathBuf::from("/nonexistent/qemu"),
            machine: "microvm".into(),
            extra_args: vec![],
        };

        // Act
        let reason = vmm.unavailable_reason();

        // Assert
        assert!(reason.expect("missing").contains("not found"));
    }
}
