//! Model-specific registers every vCPU starts with.
//!
//! What Linux expects: the SYSENTER/SYSCALL MSRs cleared (it programs them itself),
//! `IA32_MISC_ENABLE` with fast strings enabled (as firmware leaves it; Linux reads it to
//! decide whether `rep movs` is fast), and MTRRs enabled with write-back as the default type —
//! without that Linux maps all RAM uncached when it honours MTRRs (`MTRRdefType` = 0 means
//! "MTRRs disabled, everything UC").

use kvm_bindings::{kvm_msr_entry, Msrs};

/// Errors from building the MSR list.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The fam wrapper could not hold the entries.
    #[error("Cannot build the MSR list: too many entries")]
    TooManyEntries,
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// STAR: SYSCALL segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// LSTAR: 64-bit SYSCALL target.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// CSTAR: compat-mode SYSCALL target.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SYSCALL_MASK (FMASK): RFLAGS cleared by SYSCALL.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// KERNEL_GS_BASE: swapped in by SWAPGS.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast-string operations enabled.
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// MTRRdefType bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back.
pub const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// The boot MSR values as plain entries (index, value), in the order they are set.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let entry = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// The boot MSRs as the fam wrapper `VcpuFd::set_msrs` takes. `set_msrs` returns how many
/// were written; anything less than `boot_msr_entries().len()` means the host refused one.
pub fn boot_msrs() -> Result<Msrs> {
    Msrs::from_entries(&boot_msr_entries()).map_err(|_| Error::TooManyEntries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(msrs: &Msrs, index: u32) -> Option<u64> {
        msrs.as_slice()
            .iter()
            .find(|e| e.index == index)
            .map(|e| e.data)
    }

    #[test]
    fn test_boot_msrs_contains_every_entry() {
        let msrs = boot_msrs().unwrap();

        assert_eq!(msrs.as_slice().len(), boot_msr_entries().len());
    }

    #[test]
    fn test_boot_msrs_mtrr_default_write_back_enabled() {
        let msrs = boot_msrs().unwrap();

        assert_eq!(value(&msrs, MSR_MTRR_DEF_TYPE), Some(0x806));
    }

    #[test]
    fn test_boot_msrs_fast_strings_enabled() {
        let msrs = boot_msrs().unwrap();

        assert_eq!(value(&msrs, MSR_IA32_MISC_ENABLE), Some(1));
    }

    #[test]
    fn test_boot_msrs_syscall_msrs_cleared() {
        let msrs = boot_msrs().unwrap();

        for index in [
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_SYSCALL_MASK,
            MSR_KERNEL_GS_BASE,
        ] {
            assert_eq!(value(&msrs, index), Some(0), "{index:#x}");
        }
    }
}
