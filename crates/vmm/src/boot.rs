//! Putting the guest image in memory (kernel, initrd, ACPI tables, boot structures) and
//! giving each vCPU its initial state, all through the platform code in `arch`.

use std::fs::File;

use arch::acpi::{AcpiConfig, MmioWindow};
use arch::boot::{BootConfig, KernelEntry};
use arch::cpuid::CpuidConfig;
use arch::e820::MemoryLayout;
use arch::layout::{PCI_MMIO32_SIZE, PCI_MMIO32_START};
use kvm_ioctls::VcpuFd;
use vm_device::GuestMemoryMmap;

use crate::config::VmConfig;
use crate::error::VmmError;

/// Load the kernel and initrd, write the ACPI tables and the boot structures (command line,
/// `hvm_start_info` or zero page) and the boot GDT/page tables. Returns where to start.
pub fn load_guest(
    config: &VmConfig,
    layout: &MemoryLayout,
    mem: &GuestMemoryMmap,
) -> Result<KernelEntry, VmmError> {
    let kernel = load_kernel(config, mem)?;
    let initrd = match &config.initrd {
        Some(path) => {
            let mut f = File::open(path).map_err(|e| VmmError::Initrd {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            Some(
                arch::boot::load_initrd(mem, layout, &kernel, &mut f).map_err(|e| {
                    VmmError::Initrd {
                        path: path.clone(),
                        reason: e.to_string(),
                    }
                })?,
            )
        }
        None => None,
    };
    let acpi = AcpiConfig {
        vcpu_count: config.vcpus,
        pci_mmio32: MmioWindow {
            start: PCI_MMIO32_START,
            size: PCI_MMIO32_SIZE,
        },
        pci_mmio64: MmioWindow {
            start: layout.pci_mmio64_start(),
            size: layout.pci_mmio64_size(),
        },
    };
    let rsdp = arch::acpi::create_acpi_tables(mem, &acpi)
        .map_err(|e| VmmError::Boot(format!("ACPI tables: {e}")))?;
    let boot = BootConfig {
        cmdline: &config.cmdline,
        initrd,
        rsdp_addr: Some(rsdp),
    };
    arch::boot::configure_boot(mem, layout, &kernel, &boot)
        .map_err(|e| VmmError::Boot(e.to_string()))?;

    arch::regs::write_boot_tables(mem, kernel.kind).map_err(|e| VmmError::Boot(e.to_string()))?;
    Ok(kernel)
}

fn load_kernel(config: &VmConfig, mem: &GuestMemoryMmap) -> Result<KernelEntry, VmmError> {
    let kernel_err = |reason: String| VmmError::Kernel {
        path: config.kernel.clone(),
        reason,
    };
    let mut file = File::open(&config.kernel).map_err(|e| kernel_err(e.to_string()))?;
    arch::boot::load_kernel(mem, &mut file).map_err(|e| kernel_err(e.to_string()))
}

/// Set up one vCPU: CPUID, MSRs, LAPIC LINTs, FPU; on the boot vCPU also the entry registers.
pub fn configure_vcpu(
    fd: &VcpuFd,
    id: u32,
    supported: &kvm_bindings::CpuId,
    cpuid_config: &CpuidConfig,
    kernel: &KernelEntry,
) -> Result<(), VmmError> {
    let cpuid = arch::cpuid::vcpu_cpuid(supported, id, cpuid_config)
        .map_err(|e| VmmError::Boot(e.to_string()))?;
    fd.set_cpuid2(&cpuid)
        .map_err(|e| VmmError::vcpu(id, "KVM_SET_CPUID2", e))?;
    let msrs = arch::msr::boot_msrs().map_err(|e| VmmError::Boot(e.to_string()))?;
    let written = fd
        .set_msrs(&msrs)
        .map_err(|e| VmmError::vcpu(id, "KVM_SET_MSRS", e))?;
    if written != msrs.as_slice().len() {
        tracing::warn!(vcpu = id, written, "host refused some boot MSRs");
    }
    let lapic = fd
        .get_lapic()
        .map_err(|e| VmmError::vcpu(id, "KVM_GET_LAPIC", e))?;
    fd.set_lapic(&arch::regs::lapic_with_lint(&lapic))
        .map_err(|e| VmmError::vcpu(id, "KVM_SET_LAPIC", e))?;
    fd.set_fpu(&arch::regs::boot_fpu())
        .map_err(|e| VmmError::vcpu(id, "KVM_SET_FPU", e))?;
    if id == 0 {
        let sregs = fd
            .get_sregs()
            .map_err(|e| VmmError::vcpu(id, "KVM_GET_SREGS", e))?;
        fd.set_sregs(&arch::regs::boot_sregs(kernel.kind, &sregs))
            .map_err(|e| VmmError::vcpu(id, "KVM_SET_SREGS", e))?;
        fd.set_regs(&arch::regs::boot_regs(kernel.kind, kernel.entry_addr))
            .map_err(|e| VmmError::vcpu(id, "KVM_SET_REGS", e))?;
    }
    Ok(())
}
