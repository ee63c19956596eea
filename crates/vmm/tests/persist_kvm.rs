//! Snapshot and restore of KVM state with a real guest: a tiny 64-bit program counts in RCX
//! and writes the count to a port every 8 iterations. It is saved after a few port writes and
//! restored into a brand-new VM (new VmFd, new VcpuFd, copied memory), which must carry on
//! counting from the saved value. Like every KVM test in this project, these fail (never
//! skip) when /dev/kvm is unusable.

use std::sync::Arc;
use std::time::Instant;

use arch::boot::BootProtocol;
use arch::cpuid::{vcpu_cpuid, CpuidConfig, FeatureMask};
use arch::{msr, regs};
use kvm_bindings::{
    kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_device::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm::memory::{create_guest_memory, register_guest_memory};
use vmm::persist::vcpu_state::{
    lapic_from_bytes, lapic_to_bytes, probe_snapshot_msrs, MSR_IA32_TSC, MSR_KVM_SYSTEM_TIME_NEW,
    MSR_KVM_WALL_CLOCK_NEW,
};
use vmm::persist::{
    complete_pending_io, restore_vcpu, restore_vm, save_vcpu, save_vm, snapshot_msr_list,
    PersistError, VcpuState, VmKvmState,
};
use vmm::vm::Hypervisor;
use vmm::VmmError;

const MEM_SIZE: usize = 4 << 20;
const ENTRY: u64 = 0x10_0000;
const PORT: u16 = 0x3f8;
/// Writes every `EVERY` iterations.
const EVERY: u32 = 8;
/// ```text
/// 0:  48 ff c1   loop: inc rcx
/// 3:  f6 c1 07         test cl, 7
/// 6:  75 f8            jnz loop
/// 8:  89 c8            mov eax, ecx
/// 10: ef               out dx, eax        (dx = PORT)
/// 11: eb f3            jmp loop
/// ```
const CODE: [u8; 13] = [
    0x48, 0xff, 0xc1, 0xf6, 0xc1, 0x07, 0x75, 0xf8, 0x89, 0xc8, 0xef, 0xeb, 0xf3,
];
/// LAPIC timer current count: runs down on its own, so never compared.
const APIC_TMCCT: usize = 0x390;

fn require_kvm() {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert!(
        ok,
        "/dev/kvm is missing or not accessible: these tests run real guests and need KVM"
    );
}

struct TestVm {
    vm: Arc<VmFd>,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
}

/// A VM set up the way `vmm::vm` does it (memory slot, TSS, identity map, irqchip, PIT)
/// with one vCPU that has no state yet.
fn empty_vm(hv: &Hypervisor) -> TestVm {
    let mem = create_guest_memory(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let vm = hv
        .create_vm_with(|vm| register_guest_memory(vm, &mem, false).map_err(VmmError::from))
        .unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    TestVm { vm, vcpu, mem }
}

/// A VM whose vCPU starts the counter program in 64-bit mode (CPL0), as `boot.rs` configures
/// a boot vCPU.
fn counter_vm(hv: &Hypervisor) -> TestVm {
    let t = empty_vm(hv);
    t.mem.write_slice(&CODE, GuestAddress(ENTRY)).unwrap();
    regs::write_boot_tables(&t.mem, BootProtocol::Linux64).unwrap();
    let supported = hv.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let config = CpuidConfig {
        vcpu_count: 1,
        hide_pv_hypercalls: true,
        feature_mask: FeatureMask::empty(),
    };
    let vcpu = &t.vcpu;
    vcpu.set_cpuid2(&vcpu_cpuid(&supported, 0, &config).unwrap())
        .unwrap();
    vcpu.set_msrs(&msr::boot_msrs().unwrap()).unwrap();
    vcpu.set_lapic(&regs::lapic_with_lint(&vcpu.get_lapic().unwrap()))
        .unwrap();
    vcpu.set_fpu(&regs::boot_fpu()).unwrap();
    let sregs = regs::boot_sregs(BootProtocol::Linux64, &vcpu.get_sregs().unwrap());
    vcpu.set_sregs(&sregs).unwrap();
    let mut r = regs::boot_regs(BootProtocol::Linux64, GuestAddress(ENTRY));
    r.rcx = 0;
    r.rdx = u64::from(PORT);
    vcpu.set_regs(&r).unwrap();
    t
}

/// Run until `n` writes to [`PORT`]; returns the values written.
fn run_until_outs(vcpu: &mut VcpuFd, n: usize) -> Vec<u32> {
    let mut seen = Vec::new();
    while seen.len() < n {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, data) => {
                assert_eq!(port, PORT);
                seen.push(u32::from_le_bytes(data.try_into().unwrap()));
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
    seen
}

/// Everything a snapshot holds, after a round trip through JSON (as if written by one
/// process and read by another).
struct Snapshot {
    vcpu: VcpuState,
    vm: VmKvmState,
    memory: Vec<u8>,
}

fn take_snapshot(t: &mut TestVm, msr_list: &[u32]) -> Snapshot {
    complete_pending_io(&mut t.vcpu).unwrap();
    let vcpu = save_vcpu(&t.vcpu, msr_list).unwrap();
    let vm = save_vm(&t.vm).unwrap();
    let mut memory = vec![0u8; MEM_SIZE];
    t.mem.read_slice(&mut memory, GuestAddress(0)).unwrap();
    let vcpu_json = serde_json::to_vec(&vcpu).unwrap();
    let vm_json = serde_json::to_vec(&vm).unwrap();
    Snapshot {
        vcpu: serde_json::from_slice(&vcpu_json).unwrap(),
        vm: serde_json::from_slice(&vm_json).unwrap(),
        memory,
    }
}

fn restore_snapshot(hv: &Hypervisor, snap: &Snapshot) -> TestVm {
    let t = empty_vm(hv);
    t.mem.write_slice(&snap.memory, GuestAddress(0)).unwrap();
    restore_vcpu(&t.vcpu, &snap.vcpu).unwrap();
    restore_vm(&t.vm, &snap.vm).unwrap();
    t
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

fn pit_without_load_times(pit: &kvm_pit_state2) -> kvm_pit_state2 {
    let mut p = *pit;
    for c in p.channels.iter_mut() {
        c.count_load_time = 0;
    }
    p
}

/// Give VM-level devices and the LAPIC non-default state, so "restored equals saved" cannot
/// pass by both being at reset values. None of it raises an interrupt.
fn make_devices_distinctive(t: &TestVm) {
    let mut pic = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    t.vm.get_irqchip(&mut pic).unwrap();
    // chip_id selects the PIC member of the union (writing a union field is safe).
    pic.chip.pic.imr = 0xfa;
    pic.chip.pic.irq_base = 0x20;
    pic.chip.pic.elcr = 0x0c;
    t.vm.set_irqchip(&pic).unwrap();

    let mut ioapic = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    t.vm.get_irqchip(&mut ioapic).unwrap();
    // SAFETY: chip_id selects the IOAPIC member of the union.
    unsafe {
        ioapic.chip.ioapic.redirtbl[4].bits = (1 << 16) | 0x34; // masked, vector 0x34
        ioapic.chip.ioapic.redirtbl[9].bits = (1 << 16) | (1 << 15) | 0x39; // masked, level
    }
    t.vm.set_irqchip(&ioapic).unwrap();

    let mut pit = t.vm.get_pit2().unwrap();
    pit.channels[2].count = 0x1234;
    pit.channels[2].mode = 3;
    pit.channels[2].rw_mode = 3;
    t.vm.set_pit2(&pit).unwrap();

    let mut lapic = lapic_to_bytes(&t.vcpu.get_lapic().unwrap());
    let mut put = |off: usize, v: u32| lapic[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(0x80, 0x20); // TPR
    put(0x320, (1 << 16) | 0xec); // LVT timer: masked, vector 0xec
    put(0x3e0, 0xb); // timer divide by 1
    t.vcpu
        .set_lapic(&lapic_from_bytes(&lapic).unwrap())
        .unwrap();
}

#[test]
fn test_persist_msr_list_includes_tsc_and_kvmclock() {
    require_kvm();
    let hv = Hypervisor::open().unwrap();
    let supported = hv.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();

    let probe = probe_snapshot_msrs(&hv.kvm, &supported).unwrap();

    let listed = hv.kvm.get_msr_index_list().unwrap().as_slice().len();
    println!(
        "MSR index list: {listed}; saved: {} {:x?}; refused: {:x?}",
        probe.saved.len(),
        probe.saved,
        probe.refused
    );
    for msr in [
        MSR_IA32_TSC,
        MSR_KVM_WALL_CLOCK_NEW,
        MSR_KVM_SYSTEM_TIME_NEW,
    ] {
        assert!(probe.saved.contains(&msr), "MSR {msr:#x} not saved");
    }
    assert_eq!(snapshot_msr_list(&hv.kvm).unwrap(), probe.saved);
}

#[test]
fn test_persist_counter_guest_continues_in_fresh_vm() {
    require_kvm();
    let hv = Hypervisor::open().unwrap();
    let msr_list = snapshot_msr_list(&hv.kvm).unwrap();
    let mut first = counter_vm(&hv);
    let before = run_until_outs(&mut first.vcpu, 5);
    assert_eq!(before, vec![8, 16, 24, 32, 40]);

    let snap = take_snapshot(&mut first, &msr_list);
    drop(first);
    let mut second = restore_snapshot(&hv, &snap);

    assert_eq!(snap.vcpu.regs.rcx, 40);
    assert_eq!(
        second.vcpu.get_regs().unwrap().rcx,
        40,
        "counter not restored"
    );
    let after = run_until_outs(&mut second.vcpu, 3);
    assert_eq!(
        after,
        vec![48, 56, 64],
        "guest did not continue from the saved count"
    );
    assert_eq!(after[0], before[4] + EVERY);
}

#[test]
fn test_persist_restored_devices_and_vcpu_equal_saved() {
    require_kvm();
    let hv = Hypervisor::open().unwrap();
    let msr_list = snapshot_msr_list(&hv.kvm).unwrap();
    let mut first = counter_vm(&hv);
    make_devices_distinctive(&first);
    run_until_outs(&mut first.vcpu, 2);
    let snap = take_snapshot(&mut first, &msr_list);

    let set_at = Instant::now();
    let second = restore_snapshot(&hv, &snap);
    let clock = second.vm.get_clock().unwrap();
    let elapsed_ns = set_at.elapsed().as_nanos() as u64;
    let back_vm = save_vm(&second.vm).unwrap();
    let back_vcpu = save_vcpu(&second.vcpu, &msr_list).unwrap();

    // VM-level devices: exactly as saved (PIT load times are re-stamped by KVM).
    assert_eq!(json(&back_vm.pic_master), json(&snap.vm.pic_master));
    assert_eq!(json(&back_vm.pic_slave), json(&snap.vm.pic_slave));
    assert_eq!(json(&back_vm.ioapic), json(&snap.vm.ioapic));
    // SAFETY: chip_id selects the PIC member of the union.
    assert_eq!(unsafe { back_vm.pic_master.chip.pic.imr }, 0xfa);
    assert_eq!(
        pit_without_load_times(&back_vm.pit),
        pit_without_load_times(&snap.vm.pit)
    );
    assert_eq!(back_vm.pit.channels[2].count, 0x1234);
    // Guest kvmclock continues from the saved value.
    assert!(
        clock.clock >= snap.vm.clock.clock
            && clock.clock <= snap.vm.clock.clock + elapsed_ns + 50_000_000,
        "clock {} not continuing from saved {} ({elapsed_ns} ns later)",
        clock.clock,
        snap.vm.clock.clock
    );

    // vCPU: every piece reads back as saved (apart from the LAPIC timer count, the TSC the
    // host does not let us set here, and the kvmclock-derived MSRs that track it).
    let mut lapic_saved = snap.vcpu.lapic.clone();
    let mut lapic_back = back_vcpu.lapic.clone();
    lapic_saved[APIC_TMCCT..APIC_TMCCT + 4].fill(0);
    lapic_back[APIC_TMCCT..APIC_TMCCT + 4].fill(0);
    assert_eq!(lapic_back, lapic_saved);
    assert_eq!(lapic_back[0x80], 0x20, "TPR not restored");
    assert_eq!(back_vcpu.regs, snap.vcpu.regs);
    assert_eq!(back_vcpu.sregs, snap.vcpu.sregs);
    assert_eq!(back_vcpu.fpu, snap.vcpu.fpu);
    assert_eq!(back_vcpu.xsave, snap.vcpu.xsave);
    assert_eq!(back_vcpu.xcrs, snap.vcpu.xcrs);
    assert_eq!(back_vcpu.debugregs, snap.vcpu.debugregs);
    assert_eq!(back_vcpu.mp_state, snap.vcpu.mp_state);
    assert_eq!(back_vcpu.vcpu_events, snap.vcpu.vcpu_events);
    assert_eq!(back_vcpu.cpuid, snap.vcpu.cpuid);
    let differing: Vec<(u32, u64, u64)> = snap
        .vcpu
        .msrs
        .iter()
        .zip(&back_vcpu.msrs)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| (a.0, a.1, b.1))
        .collect();
    println!("MSRs differing after restore (index, saved, read back): {differing:x?}");
    assert!(
        differing.iter().all(|d| d.0 == MSR_IA32_TSC),
        "MSRs other than IA32_TSC changed: {differing:x?}"
    );
}

/// Guest-physical address of the vCPU's kvmclock (`pvclock_vcpu_time_info`) page.
const PVCLOCK_GPA: u64 = 0x20_0000;
/// Where the VM's kvmclock starts in these tests: far from where a fresh VM starts (~0).
const CLOCK_START_NS: u64 = 1_000_000_000_000;

/// `system_time` (ns) of the guest's kvmclock page, as KVM last wrote it.
fn pvclock_system_time(mem: &GuestMemoryMmap) -> u64 {
    mem.read_obj(GuestAddress(PVCLOCK_GPA + 16)).unwrap()
}

#[test]
fn test_persist_guest_kvmclock_continues_in_fresh_vm() {
    require_kvm();
    let hv = Hypervisor::open().unwrap();
    let msr_list = snapshot_msr_list(&hv.kvm).unwrap();
    let mut first = counter_vm(&hv);
    first
        .vm
        .set_clock(&kvm_bindings::kvm_clock_data {
            clock: CLOCK_START_NS,
            ..Default::default()
        })
        .unwrap();
    // What a guest's kvmclock driver does: point MSR_KVM_SYSTEM_TIME_NEW at a page, enabled.
    let kvmclock = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: MSR_KVM_SYSTEM_TIME_NEW,
        data: PVCLOCK_GPA | 1,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(first.vcpu.set_msrs(&kvmclock).unwrap(), 1);
    run_until_outs(&mut first.vcpu, 2);
    let guest_time_saved = pvclock_system_time(&first.mem);
    let snap = take_snapshot(&mut first, &msr_list);
    drop(first);

    let mut second = restore_snapshot(&hv, &snap);
    run_until_outs(&mut second.vcpu, 1);
    let guest_time_restored = pvclock_system_time(&second.mem);

    assert_eq!(
        snap.vcpu.msr(MSR_KVM_SYSTEM_TIME_NEW),
        Some(PVCLOCK_GPA | 1)
    );
    assert!(guest_time_saved >= CLOCK_START_NS, "{guest_time_saved}");
    assert!(
        guest_time_restored >= guest_time_saved
            && guest_time_restored - guest_time_saved < 5_000_000_000,
        "guest kvmclock jumped from {guest_time_saved} to {guest_time_restored}"
    );
}

#[test]
fn test_persist_pending_in_is_completed_before_save() {
    require_kvm();
    let hv = Hypervisor::open().unwrap();
    let msr_list = snapshot_msr_list(&hv.kvm).unwrap();
    let mut first = counter_vm(&hv);
    // in eax, dx; out dx, eax; jmp $
    let echo = GuestAddress(ENTRY + 0x100);
    first
        .mem
        .write_slice(&[0xed, 0xef, 0xeb, 0xfe], echo)
        .unwrap();
    let mut r = first.vcpu.get_regs().unwrap();
    r.rip = echo.0;
    first.vcpu.set_regs(&r).unwrap();
    match first.vcpu.run().unwrap() {
        VcpuExit::IoIn(PORT, data) => data.copy_from_slice(&0x1234_5678u32.to_le_bytes()),
        other => panic!("unexpected exit {other:?}"),
    }

    let snap = take_snapshot(&mut first, &msr_list);
    drop(first);
    let mut second = restore_snapshot(&hv, &snap);

    assert_eq!(
        snap.vcpu.regs.rax as u32, 0x1234_5678,
        "IN value not in RAX"
    );
    assert_eq!(snap.vcpu.regs.rip, echo.0 + 1);
    assert_eq!(run_until_outs(&mut second.vcpu, 1), vec![0x1234_5678]);
}

#[test]
fn test_persist_restore_with_corrupted_msr_index_is_error() {
    require_kvm();
    let hv = Hypervisor::open().unwrap();
    let msr_list = snapshot_msr_list(&hv.kvm).unwrap();
    let mut first = counter_vm(&hv);
    let mut snap = take_snapshot(&mut first, &msr_list);
    snap.vcpu.msrs[3].0 = 0xdead_beef;
    let total = snap.vcpu.msrs.len();
    let second = empty_vm(&hv);

    let result = restore_vcpu(&second.vcpu, &snap.vcpu);

    let err = result.expect_err("a non-existent MSR must be refused");
    println!("{err}");
    assert!(
        matches!(
            err,
            PersistError::MsrsRefused {
                op: "KVM_SET_MSRS",
                applied: 3,
                first_refused: 0xdead_beef,
                total: t,
            } if t == total
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("0xdeadbeef"));
}

#[test]
fn test_persist_restore_with_wrong_xsave_or_lapic_size_is_error() {
    require_kvm();
    let hv = Hypervisor::open().unwrap();
    let msr_list = snapshot_msr_list(&hv.kvm).unwrap();
    let mut first = counter_vm(&hv);
    let snap = take_snapshot(&mut first, &msr_list);
    let second = empty_vm(&hv);
    let mut short_xsave = snap.vcpu.clone();
    short_xsave.xsave.truncate(100);
    let mut short_lapic = snap.vcpu.clone();
    short_lapic.lapic.truncate(512);

    let xsave_result = restore_vcpu(&second.vcpu, &short_xsave);
    let lapic_result = restore_vcpu(&second.vcpu, &short_lapic);

    assert!(matches!(
        xsave_result,
        Err(PersistError::BadXsaveSize { saved: 400, .. })
    ));
    assert!(matches!(lapic_result, Err(PersistError::BadLapicSize(512))));
}
