//! Checks the boot state `arch` produces against the real KVM of this host: KVM accepts the
//! CPUID, MSRs, LAPIC, FPU and special registers, and a vCPU started in the PVH or 64-bit
//! entry state runs a few instructions (port write, `hlt`) with the right registers.
//! Like every KVM test in this project, fails (never skips) when /dev/kvm is unusable.

use arch::boot::BootProtocol;
use arch::cpuid::{vcpu_cpuid, CpuidConfig, FeatureMask};
use arch::e820::MemoryLayout;
use arch::layout::{PVH_INFO_START, ZERO_PAGE_START};
use arch::{msr, regs};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const ENTRY: u64 = 0x10_0000;
/// mov dx, 0x3f8; mov al, 'A'; out dx, al; hlt (same bytes in 32- and 64-bit mode).
const CODE: [u8; 8] = [0x66, 0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0xf4];

fn kvm() -> Kvm {
    Kvm::new().expect("/dev/kvm is missing or not accessible: these tests need KVM")
}

fn vm_with_memory(kvm: &Kvm) -> (VmFd, GuestMemoryMmap<()>) {
    let layout = MemoryLayout::new(128 << 20, None).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&layout.ram_ranges()).unwrap();
    let vm = kvm.create_vm().unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: layout.low_ram_end(),
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the mapping belongs to `mem`, which outlives the VM in each test.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    (vm, mem)
}

fn run_to_halt(kind: BootProtocol) -> kvm_bindings::kvm_regs {
    let kvm = kvm();
    let (vm, mem) = vm_with_memory(&kvm);
    mem.write_slice(&CODE, GuestAddress(ENTRY)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let config = CpuidConfig {
        vcpu_count: 1,
        hide_pv_hypercalls: true,
        feature_mask: FeatureMask::empty(),
    };
    vcpu.set_cpuid2(&vcpu_cpuid(&supported, 0, &config).unwrap())
        .unwrap();
    let msrs = msr::boot_msrs().unwrap();
    assert_eq!(vcpu.set_msrs(&msrs).unwrap(), msrs.as_slice().len());
    vcpu.set_fpu(&regs::boot_fpu()).unwrap();
    regs::write_boot_tables(&mem, kind).unwrap();
    let sregs = regs::boot_sregs(kind, &vcpu.get_sregs().unwrap());
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&regs::boot_regs(kind, GuestAddress(ENTRY)))
        .unwrap();

    let mut out = Vec::new();
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, data) => out.push((port, data.to_vec())),
            VcpuExit::Hlt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(out, vec![(0x3f8, vec![b'A'])]);
    let final_sregs = vcpu.get_sregs().unwrap();
    assert_eq!(final_sregs.cs.selector, sregs.cs.selector);
    assert_eq!(
        final_sregs.efer & regs::EFER_LMA,
        sregs.efer & regs::EFER_LMA
    );
    vcpu.get_regs().unwrap()
}

#[test]
fn test_kvm_linux64_entry_runs_to_halt() {
    let state = run_to_halt(BootProtocol::Linux64);

    assert_eq!(state.rsi, ZERO_PAGE_START);
    assert_eq!(state.rip, ENTRY + CODE.len() as u64);
}

#[test]
fn test_kvm_pvh_entry_runs_to_halt() {
    let state = run_to_halt(BootProtocol::Pvh);

    assert_eq!(state.rbx, PVH_INFO_START);
    assert_eq!(state.rip, ENTRY + CODE.len() as u64);
}

#[test]
fn test_kvm_accepts_cpuid_and_lapic_for_many_vcpus() {
    let kvm = kvm();
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let config = CpuidConfig {
        vcpu_count: 4,
        hide_pv_hypercalls: true,
        feature_mask: "-avx2,-x2apic,-pdpe1gb,-xsave".parse().unwrap(),
    };

    for id in 0..4u32 {
        let vcpu = vm.create_vcpu(u64::from(id)).unwrap();
        let cpuid = vcpu_cpuid(&supported, id, &config).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        let lapic = regs::lapic_with_lint(&vcpu.get_lapic().unwrap());
        vcpu.set_lapic(&lapic).unwrap();

        let back = vcpu.get_lapic().unwrap();
        let lvt = |off: usize| {
            u32::from_le_bytes([
                back.regs[off] as u8,
                back.regs[off + 1] as u8,
                back.regs[off + 2] as u8,
                back.regs[off + 3] as u8,
            ])
        };
        assert_eq!((lvt(0x350) >> 8) & 7, 7, "LINT0 ExtINT");
        assert_eq!((lvt(0x360) >> 8) & 7, 4, "LINT1 NMI");
        let got = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = got
            .as_slice()
            .iter()
            .find(|e| e.function == 1)
            .copied()
            .unwrap();
        assert_eq!(leaf1.ebx >> 24, id);
    }
}
