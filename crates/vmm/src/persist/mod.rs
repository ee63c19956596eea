//! The KVM part of a VM snapshot: the state of every vCPU ([`vcpu_state`]) and of the
//! VM-level in-kernel devices and clock ([`vm_state`]), saved from one VM and restored into
//! a fresh one (possibly in another process).
//!
//! A whole snapshot is taken with every vCPU paused, in this order:
//!
//! ```text
//! // once per host/process (probe the MSRs this KVM lets a VMM read):
//! let msr_list = persist::vcpu_state::snapshot_msr_list(&kvm)?;
//! // per vCPU, after its thread left KVM_RUN:
//! persist::vcpu_state::complete_pending_io(&mut vcpu)?;   // finish a pending IN/OUT/MMIO
//! let vcpu_state = persist::vcpu_state::save_vcpu(&vcpu, &msr_list)?;
//! let vm_state = persist::vm_state::save_vm(&vm)?;          // + guest memory, devices
//!
//! // restore into a fresh VM created like vm.rs does (memory slots, irqchip, PIT):
//! persist::vcpu_state::restore_vcpu(&new_vcpu, &vcpu_state)?; // every vCPU first
//! persist::vm_state::restore_vm(&new_vm, &vm_state)?;         // then irqchip, PIT, clock
//! ```
//!
//! Guest memory and the userspace devices are saved elsewhere; this module only covers what
//! lives inside KVM.

pub mod vcpu_state;
pub mod vm_state;

pub use vcpu_state::{
    complete_pending_io, probe_snapshot_msrs, restore_vcpu, save_vcpu, snapshot_msr_list,
    snapshot_msr_list_for, MsrProbe, VcpuState,
};
pub use vm_state::{restore_vm, save_vm, VmKvmState};

/// Errors saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The saved vCPU state has no CPUID table (a restored vCPU gets no other).
    #[error("Saved vCPU state has no CPUID entries")]
    NoCpuid,
    /// A saved LAPIC register page has the wrong size.
    #[error("Saved LAPIC register page is {0} bytes (need 1024)")]
    BadLapicSize(usize),
    /// A saved FPU/XSAVE area does not fit this host's XSAVE layout.
    #[error("Saved XSAVE area is {saved} bytes, this host's KVM_GET_XSAVE2 size is {host}")]
    BadXsaveSize {
        /// Bytes in the saved state.
        saved: usize,
        /// Bytes this host's KVM uses.
        host: usize,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// What KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM processed only part of an MSR list.
    #[error("{op} applied {applied} of {total} MSRs (first refused: {first_refused:#x})")]
    MsrsRefused {
        /// `KVM_GET_MSRS` or `KVM_SET_MSRS`.
        op: &'static str,
        /// MSRs processed before the first refusal.
        applied: usize,
        /// MSRs requested.
        total: usize,
        /// Index of the first MSR KVM refused.
        first_refused: u32,
    },
    /// The host offers no MSR this VMM can read back.
    #[error("KVM_GET_MSRS could read none of the {0} MSRs of KVM_GET_MSR_INDEX_LIST")]
    NoReadableMsrs(usize),
    /// `KVM_RUN` to finish a pending I/O exit returned something other than `EINTR`.
    #[error("KVM_RUN with immediate_exit did not return EINTR ({0})")]
    PendingIo(String),
    /// A fam-struct wrapper could not be built.
    #[error("Cannot build the {0} list for KVM")]
    TooManyEntries(&'static str),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, PersistError>;

/// Maps a kvm-ioctls error to [`PersistError::Ioctl`] for `op`.
pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |source| PersistError::Ioctl { op, source }
}
