//! The VMM's error type: every way building or running a VM can fail, worded for the user.
//!
//! Every variant keeps what caused it as its `source()`, and no message repeats its source:
//! print the whole chain (`top: cause: cause`) to show the user everything.

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::memory::MemoryError;
use crate::vm::VmError;

/// Errors from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM could not be opened or the VM created.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Dirty-page tracking could not be set up.
    #[error(transparent)]
    Dirty(#[from] crate::dirty::DirtyError),
    /// The memory size does not fit the platform layout.
    #[error("Invalid memory layout")]
    Layout(#[source] arch::e820::Error),
    /// The kernel could not be loaded.
    #[error("Cannot load kernel {path}")]
    Kernel {
        /// The kernel file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: ImageError,
    },
    /// The initrd could not be loaded.
    #[error("Cannot load initrd {path}")]
    Initrd {
        /// The initrd file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: ImageError,
    },
    /// A disk image could not be opened (the disk crate's message names the image).
    #[error(transparent)]
    DiskOpen(disk::DiskError),
    /// A disk image is locked by someone else.
    #[error(
        "Disk image {path} is locked by another VM or process: stop that one, or pass ,readonly to both"
    )]
    DiskLocked {
        /// The image file.
        path: PathBuf,
    },
    /// An opened disk image is unusable as a virtio-blk disk.
    #[error("Cannot use disk {path}")]
    Disk {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: virtio::VirtioError,
    },
    /// The virtio-blk PCI function for a disk could not be created.
    #[error("Cannot create the virtio-blk device for {path}")]
    DiskDevice {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: virtio::VirtioError,
    },
    /// Boot structures (command line, boot params, ACPI, page tables, CPUID, MSRs) could not
    /// be written.
    #[error("Boot setup failed")]
    Boot(#[source] arch::Error),
    /// A legacy device could not be created.
    #[error("Cannot set up the legacy devices")]
    LegacyDevices(#[source] devices::DeviceError),
    /// A device could not be placed on a bus.
    #[error("Cannot place a device on a bus")]
    Bus(#[source] vm_device::BusError),
    /// A PCI function could not be plugged in.
    #[error("Cannot set up PCI")]
    Pci(#[source] pci::PciError),
    /// Interrupt routing failed.
    #[error("Interrupt setup failed")]
    Interrupt(#[from] vm_device::InterruptError),
    /// A vCPU ioctl failed during setup.
    #[error("vCPU {id}: {op} failed")]
    Vcpu {
        /// vCPU index.
        id: u32,
        /// The ioctl.
        op: &'static str,
        /// Its error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A snapshot cannot be read or does not fit the VM.
    #[error("Cannot restore the snapshot")]
    Restore(#[from] crate::vm_snapshot::VmSnapshotError),
    /// A virtio function refused its saved state.
    #[error("Cannot restore the state of virtio function {index}")]
    RestoreDevice {
        /// Position among the virtio functions (PCI slot order).
        index: usize,
        /// Why.
        #[source]
        source: virtio::VirtioError,
    },
    /// Cannot install the vCPU kick signal handler.
    #[error("Cannot install the vCPU signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// A host resource (eventfd, thread) could not be created.
    #[error("Host resource error")]
    Io(#[source] std::io::Error),
    /// A virtio device could not be created or plugged in.
    #[error("Cannot set up device {device}")]
    DeviceSetup {
        /// Which device ("net0", "vsock").
        device: String,
        /// Why.
        #[source]
        source: virtio::VirtioError,
    },
    /// A device's host side (TAP, socket, file) could not be opened; `reason` says what to fix.
    #[error("Cannot open the host side of {device}: {reason}")]
    DeviceOpen {
        /// Which device ("net0", "vsock").
        device: String,
        /// What went wrong and how to fix it.
        reason: String,
        /// The OS error, if any.
        #[source]
        source: Option<std::io::Error>,
    },
    /// The VM generation ID could not be chosen or written.
    #[error(transparent)]
    GenerationId(#[from] crate::vmgenid::VmGenIdError),
    /// A snapshot cannot be restored as a clone with the identity given.
    #[error(transparent)]
    Clone(#[from] crate::clone::CloneError),
    /// An incoming migration failed before the guest ran here.
    #[error("Incoming migration failed; the guest did not run here: {0}")]
    Migration(String),
    /// A feature this build does not have.
    #[error("Not supported: {0}")]
    NotSupported(&'static str),
}

/// Why a kernel or initrd file could not be loaded (the cause of [`VmmError::Kernel`] and
/// [`VmmError::Initrd`]).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be opened.
    #[error("Cannot open the file")]
    Open(#[source] std::io::Error),
    /// The platform code rejected the image.
    #[error(transparent)]
    Load(#[from] arch::boot::Error),
}

impl VmmError {
    /// Shorthand for [`VmmError::Vcpu`].
    pub fn vcpu(id: u32, op: &'static str, source: kvm_ioctls::Error) -> Self {
        Self::Vcpu { id, op, source }
    }

    /// Shorthand for [`VmmError::Boot`] from any of `arch`'s module errors.
    pub fn boot(source: impl Into<arch::Error>) -> Self {
        Self::Boot(source.into())
    }

    /// Whether the error is the user's to fix (bad flags, missing or unusable files) rather
    /// than a host or hypervisor failure. Decides the CLI's exit status.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Self::Config(_)
                | Self::Kernel { .. }
                | Self::Initrd { .. }
                | Self::DiskOpen(_)
                | Self::DiskLocked { .. }
                | Self::Disk { .. }
                | Self::Layout(_)
                | Self::DeviceOpen { .. }
                | Self::NotSupported(_)
                | Self::Restore(_)
                | Self::Clone(_)
        )
    }
}

/// `err` and all its causes on one line, `top: cause: cause`. A cause whose text the line
/// already holds (a message that repeats its source) is left out, and line breaks inside a
/// message become spaces.
pub fn chain_to_line(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_chain_to_line_kernel_error_lists_every_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short read");
        let err = VmmError::Kernel {
            path: "vmlinux".into(),
            source: ImageError::Load(arch::boot::Error::ReadKernel(io)),
        };

        let line = chain_to_line(&err);

        assert_eq!(
            line,
            "Cannot load kernel vmlinux: Cannot read the kernel image: short read"
        );
    }

    #[test]
    fn test_chain_to_line_cause_repeated_in_message_is_printed_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("Outer failed: {0}")]
        struct Repeating(#[source] std::io::Error);
        let err = Repeating(std::io::Error::other("inner"));

        let line = chain_to_line(&err);

        assert_eq!(line, "Outer failed: inner");
    }

    #[test]
    fn test_chain_to_line_multiline_message_becomes_one_line() {
        let err = std::io::Error::other("first\n  second\n");

        let line = chain_to_line(&err);

        assert_eq!(line, "first second");
    }

    #[test]
    fn test_is_user_error_config_yes_vcpu_no() {
        let config = VmmError::Config(ConfigError::VcpusZero);
        let vcpu = VmmError::vcpu(0, "KVM_RUN", kvm_ioctls::Error::new(libc::EINVAL));

        assert!(config.is_user_error());
        assert!(!vcpu.is_user_error());
    }
}
