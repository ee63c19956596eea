//! Putting the guest image in memory (kernel, initrd, ACPI tables, boot structures) and
//! giving each vCPU its initial state, all through the platform code in `arch`.

use std::fs::File;
use std::path::Path;

use arch::acpi::AcpiConfig;
use arch::boot::{BootConfig, InitrdRegion, KernelEntry};
use arch::cpuid::CpuidConfig;
use arch::e820::MemoryLayout;
use kvm_ioctls::VcpuFd;
use vm_device::GuestMemoryMmap;

use crate::config::VmConfig;
use crate::error::{ImageError, VmmError};

/// Load the kernel and initrd, write the ACPI tables and the boot structures (command line,
/// `hvm_start_info` or zero page) and the boot GDT/page tables. Returns where to start.
pub fn load_guest(
    config: &VmConfig,
    layout: &MemoryLayout,
    mem: &GuestMemoryMmap,
) -> Result<KernelEntry, VmmError> {
    let kernel = load_kernel(config, mem)?;
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(path, layout, mem, &kernel)?),
        None => None,
    };
    let acpi = AcpiConfig::new(config.vcpus, layout);
    let rsdp = arch::acpi::create_acpi_tables(mem, &acpi).map_err(VmmError::boot)?;
    let boot = BootConfig {
        cmdline: &config.cmdline,
        initrd,
        rsdp_addr: Some(rsdp),
    };
    arch::boot::configure_boot(mem, layout, &kernel, &boot).map_err(VmmError::boot)?;
    arch::regs::write_boot_tables(mem, kernel.kind).map_err(VmmError::boot)?;
    Ok(kernel)
}

fn load_kernel(config: &VmConfig, mem: &GuestMemoryMmap) -> Result<KernelEntry, VmmError> {
    load_image(&config.kernel, |f| arch::boot::load_kernel(mem, f)).map_err(|source| {
        VmmError::Kernel {
            path: config.kernel.clone(),
            source,
        }
    })
}

fn load_initrd(
    path: &Path,
    layout: &MemoryLayout,
    mem: &GuestMemoryMmap,
    kernel: &KernelEntry,
) -> Result<InitrdRegion, VmmError> {
    load_image(path, |f| arch::boot::load_initrd(mem, layout, kernel, f)).map_err(|source| {
        VmmError::Initrd {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Open the file at `path` and hand it to `load`.
fn load_image<T>(
    path: &Path,
    load: impl FnOnce(&mut File) -> arch::boot::Result<T>,
) -> Result<T, ImageError> {
    let mut file = File::open(path).map_err(ImageError::Open)?;
    Ok(load(&mut file)?)
}

/// Set up one vCPU: CPUID, MSRs, LAPIC LINTs, FPU; on the boot vCPU also the entry registers
/// of `kernel` (none when restoring a snapshot, which sets every register itself).
pub fn configure_vcpu(
    fd: &VcpuFd,
    id: u32,
    supported: &kvm_bindings::CpuId,
    cpuid_config: &CpuidConfig,
    kernel: Option<&KernelEntry>,
) -> Result<(), VmmError> {
    let cpuid = arch::cpuid::vcpu_cpuid(supported, id, cpuid_config).map_err(VmmError::boot)?;
    fd.set_cpuid2(&cpuid)
        .map_err(|e| VmmError::vcpu(id, "KVM_SET_CPUID2", e))?;
    let msrs = arch::msr::boot_msrs().map_err(VmmError::boot)?;
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
    if let (0, Some(kernel)) = (id, kernel) {
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
