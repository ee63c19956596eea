//! The VMM's error type: every way building or running a VM can fail, worded for the user.

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::memory::MemoryError;
use crate::vm::VmError;

/// Errors from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// KVM could not be opened or the VM created.
    #[error("{0}")]
    Vm(#[from] VmError),
    /// Guest memory could not be set up.
    #[error("{0}")]
    Memory(#[from] MemoryError),
    /// The memory size does not fit the platform layout.
    #[error("Invalid memory layout: {0}")]
    Layout(String),
    /// The kernel could not be loaded.
    #[error("Cannot load kernel {path}: {reason}")]
    Kernel {
        /// The kernel file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The initrd could not be loaded.
    #[error("Cannot load initrd {path}: {reason}")]
    Initrd {
        /// The initrd file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A disk could not be opened or attached.
    #[error("Cannot use disk {path}: {reason}")]
    Disk {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Boot structures (command line, boot params, page tables, CPUID) could not be written.
    #[error("Boot setup failed: {0}")]
    Boot(String),
    /// A device could not be created or placed on a bus.
    #[error("Device setup failed: {0}")]
    Device(String),
    /// Interrupt routing failed.
    #[error("Interrupt setup failed: {0}")]
    Interrupt(#[from] vm_device::InterruptError),
    /// A vCPU ioctl failed during setup.
    #[error("vCPU {id}: {op} failed: {source}")]
    Vcpu {
        /// vCPU index.
        id: u32,
        /// The ioctl.
        op: &'static str,
        /// Its error.
        source: kvm_ioctls::Error,
    },
    /// The vCPU kick signal handler could not be installed.
    #[error("Cannot install the vCPU signal handler: {0}")]
    Signal(String),
    /// A host resource (eventfd, thread) could not be created.
    #[error("Host resource error: {0}")]
    Io(#[source] std::io::Error),
}

impl VmmError {
    /// Shorthand for [`VmmError::Vcpu`].
    pub fn vcpu(id: u32, op: &'static str, source: kvm_ioctls::Error) -> Self {
        Self::Vcpu { id, op, source }
    }

    /// Whether the error is the user's to fix (bad flags, missing or unusable files) rather
    /// than a host or hypervisor failure. Decides the CLI's exit status.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Self::Config(_)
                | Self::Kernel { .. }
                | Self::Initrd { .. }
                | Self::Disk { .. }
                | Self::Layout(_)
        )
    }
}
