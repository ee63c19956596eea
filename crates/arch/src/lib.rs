//! The x86_64 platform Ferrite presents to a guest.
//!
//! Pure, testable pieces: the memory map ([`layout`], [`e820`]), kernel loading and boot
//! structures ([`boot`]), the boot vCPU's registers ([`regs`]), MSRs ([`msr`]), CPUID
//! ([`cpuid`]), the ACPI tables ([`acpi`]) and the legacy MP table ([`mptable`]).
//!
//! The VMM uses them in this order:
//!
//! ```text
//! let layout = e820::MemoryLayout::new(ram_bytes, Some(e820::host_phys_bits()))?;
//! let mem = GuestMemoryMmap::from_ranges(&layout.ram_ranges())?;      // + KVM memory slots
//! let kernel = boot::load_kernel(&mem, &mut kernel_file)?;
//! let initrd = initrd_file.map(|f| boot::load_initrd(&mem, &layout, &kernel, f)).transpose()?;
//! let rsdp = acpi::create_acpi_tables(&mem, &acpi::AcpiConfig { .. })?;
//! mptable::create_mptable(&mem, vcpus)?;                                // optional
//! boot::configure_boot(&mem, &layout, &kernel,
//!     &boot::BootConfig { cmdline, initrd, rsdp_addr: Some(rsdp) })?;
//! regs::write_boot_tables(&mem, kernel.kind)?;
//! // every vCPU i (after KVM_CREATE_IRQCHIP):
//! vcpu.set_cpuid2(&cpuid::vcpu_cpuid(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?, i, &cfg)?)?;
//! vcpu.set_msrs(&msr::boot_msrs()?)?;                   // must return boot_msr_entries().len()
//! vcpu.set_lapic(&regs::lapic_with_lint(&vcpu.get_lapic()?))?;
//! vcpu.set_fpu(&regs::boot_fpu())?;
//! // vCPU 0 only (the others wait for INIT/SIPI from the guest):
//! vcpu.set_sregs(&regs::boot_sregs(kernel.kind, &vcpu.get_sregs()?))?;
//! vcpu.set_regs(&regs::boot_regs(kernel.kind, kernel.entry_addr))?;
//! ```

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod e820;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;

/// Any error from this crate, for callers that do not need to tell the modules apart.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Memory map.
    #[error(transparent)]
    E820(#[from] e820::Error),
    /// Kernel loading and boot structures.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// Boot GDT/IDT/page tables.
    #[error(transparent)]
    Regs(#[from] regs::Error),
    /// MSR list.
    #[error(transparent)]
    Msr(#[from] msr::Error),
    /// CPUID.
    #[error(transparent)]
    Cpuid(#[from] cpuid::Error),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
}
