//! The KVM state of one vCPU: registers, FPU/XSAVE, LAPIC, MSRs, pending events and run state.
//!
//! Save and restore follow the ordering rules Firecracker and Cloud Hypervisor learnt from
//! the KVM sources (see [`save_vcpu`] and [`restore_vcpu`]). The MSRs saved are the ones
//! [`snapshot_msr_list`] found this host's KVM both reads and writes back, so a save never
//! trips over an MSR the host lists but refuses (on `kvm_pvm` hosts all 40 of
//! `KVM_GET_MSR_INDEX_LIST` work, but writes to `IA32_TSC` are silently ignored there: the
//! guest TSC jumps after a restore, and guest time stays continuous through kvmclock, see
//! [`super::vm_state`]).

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::{ioctl, PersistError, Result};

/// IA32_TSC: always saved; restoring it has no effect on `kvm_pvm` hosts.
pub const MSR_IA32_TSC: u32 = 0x10;
/// kvmclock wall-clock page address (`MSR_KVM_WALL_CLOCK_NEW`).
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// kvmclock per-vCPU time page address and enable bit (`MSR_KVM_SYSTEM_TIME_NEW`).
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// Size of the LAPIC register page in `kvm_lapic_state`.
pub const LAPIC_BYTES: usize = 1024;
/// Size of the pre-5.17 `kvm_xsave` area (`KVM_GET_XSAVE`).
const XSAVE_LEGACY_BYTES: usize = std::mem::size_of::<kvm_xsave>();

/// The legacy FPU state (`kvm_fpu`, which kvm-bindings does not serialise), field by field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers ST0–ST7 (80 bits each, padded to 16 bytes).
    pub fpr: [[u8; 16]; 8],
    /// x87 control word.
    pub fcw: u16,
    /// x87 status word.
    pub fsw: u16,
    /// Abridged x87 tag word.
    pub ftwx: u8,
    /// Last x87 opcode.
    pub last_opcode: u16,
    /// Last x87 instruction pointer.
    pub last_ip: u64,
    /// Last x87 data pointer.
    pub last_dp: u64,
    /// XMM0–XMM15.
    pub xmm: [[u8; 16]; 16],
    /// SSE control/status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM holds for one vCPU, serialisable for a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given (`KVM_GET_CPUID2`); restored first, since which MSRs and
    /// XSAVE components are valid depends on it. Empty: keep the CPUID the caller set.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Run state (runnable, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// Legacy x87/SSE state (also inside `xsave`; kept for hosts and tools without XSAVE).
    pub fpu: FpuState,
    /// The XSAVE area as `KVM_GET_XSAVE2` returns it (`KVM_CAP_XSAVE2` bytes, at least 4096),
    /// in 32-bit words.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers DR0–DR3, DR6, DR7.
    pub debugregs: kvm_debugregs,
    /// The LAPIC register page (1024 bytes).
    pub lapic: Vec<u8>,
    /// (index, value) of each MSR of [`snapshot_msr_list`], in that order.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exception/interrupt/NMI/SMI and interrupt shadow.
    pub vcpu_events: kvm_vcpu_events,
}

impl VcpuState {
    /// The saved value of MSR `index`, if it was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|(i, _)| *i == index).map(|(_, v)| *v)
    }
}

/// Finish an I/O or MMIO exit before the vCPU's state is saved.
///
/// After a `KVM_EXIT_IO`/`KVM_EXIT_MMIO` exit the instruction is only complete (RIP advanced,
/// an `in` value written to the register) once userspace enters `KVM_RUN` again. Saving
/// before that would make the restored guest repeat the instruction or lose the `in` value.
/// This enters `KVM_RUN` with `immediate_exit` set, which completes the pending operation and
/// returns `EINTR` without running guest code (the KVM API documentation's recipe). Call it
/// on the vCPU thread, after the last exit was handled.
///
/// Measured on `kvm_pvm`: an emulated `out` is already complete at its exit, but an `in`
/// value only reaches RAX here (without this call the restored guest reads 0). On VT-x/SVM
/// hosts the fast-PIO `out` path also finishes (advances RIP) only on re-entry.
pub fn complete_pending_io(vcpu: &mut VcpuFd) -> Result<()> {
    vcpu.set_kvm_immediate_exit(1);
    let outcome = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(PersistError::PendingIo(e.to_string())),
        Ok(exit) => Err(PersistError::PendingIo(format!(
            "it returned {exit:?}: handle that exit and call again"
        ))),
    };
    vcpu.set_kvm_immediate_exit(0);
    outcome
}

/// Save the state of a vCPU that is not running (its thread is parked outside `KVM_RUN`, and
/// [`complete_pending_io`] was called after its last exit). `msr_list` comes from
/// [`snapshot_msr_list`].
///
/// Order (as Firecracker's `KvmVcpu::save_state`): `KVM_GET_MP_STATE` first, because it
/// makes KVM process pending INIT/SIPI into the LAPIC and vCPU state, which must happen
/// before anything else is read; `KVM_GET_VCPU_EVENTS` last, because the other GET ioctls
/// may still move pending events into their final place. The vCPU itself is not changed.
pub fn save_vcpu(vcpu: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState> {
    let mp_state = vcpu.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let fpu = vcpu.get_fpu().map_err(ioctl("KVM_GET_FPU"))?;
    let xsave = get_xsave(vcpu)?;
    let xcrs = vcpu.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
    let debugregs = vcpu.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_CPUID2"))?;
    let msrs = get_msrs(vcpu, msr_list)?;
    let vcpu_events = vcpu
        .get_vcpu_events()
        .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        mp_state,
        regs,
        sregs,
        fpu: FpuState::from(&fpu),
        xsave,
        xcrs,
        debugregs,
        lapic: lapic_to_bytes(&lapic),
        msrs,
        vcpu_events,
    })
}

/// Load `state` into a vCPU that has never run (freshly created in a VM with the in-kernel
/// irqchip, before the VM's [`super::vm_state::restore_vm`]).
///
/// Order (Firecracker's `KvmVcpu::restore_state`, the same as Cloud Hypervisor's):
/// 1. `KVM_SET_CPUID2`: which MSRs and XSAVE components exist depends on it.
/// 2. `KVM_SET_MP_STATE`: early, as both do (QEMU sets it after the MSRs; KVM takes either
///    order on a vCPU that has not run), so the run state is in place before the LAPIC.
/// 3. `KVM_SET_REGS`, 4. `KVM_SET_SREGS`: SET_REGS clears a pending exception, which
///    VCPU_EVENTS (last) puts back; SREGS carries EFER, CR0/CR4 and the APIC base.
/// 5. `KVM_SET_FPU`, then 6. `KVM_SET_XSAVE`: XSAVE is the superset and has the last word.
/// 7. `KVM_SET_XCRS`, 8. `KVM_SET_DEBUGREGS`.
/// 9. `KVM_SET_LAPIC`: after SREGS (which set the APIC base/mode the page is read in) and
///    before the MSRs (`IA32_TSC_DEADLINE` only sticks on a configured LAPIC).
/// 10. `KVM_SET_MSRS`, in saved order (`IA32_TSC` before `IA32_TSC_DEADLINE`, kvmclock MSRs).
/// 11. `KVM_SET_VCPU_EVENTS`: last, to restore pending exceptions/interrupts/NMIs that the
///     earlier calls may have cleared.
///
/// The sizes of the LAPIC page and XSAVE area are checked before anything is written. An
/// MSR KVM refuses gives [`PersistError::MsrsRefused`] naming it; the vCPU is then partly
/// restored and should be discarded.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<()> {
    let lapic = lapic_from_bytes(&state.lapic)?;
    let xsave_bytes = host_xsave_size()?;
    check_xsave_len(&state.xsave, xsave_bytes)?;
    let cpuid =
        CpuId::from_entries(&state.cpuid).map_err(|_| PersistError::TooManyEntries("CPUID"))?;

    if state.cpuid.is_empty() {
        return Err(PersistError::NoCpuid);
    }
    vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(ioctl("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs).map_err(ioctl("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(ioctl("KVM_SET_SREGS"))?;
    vcpu.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(ioctl("KVM_SET_FPU"))?;
    set_xsave(vcpu, &state.xsave, xsave_bytes)?;
    vcpu.set_xcrs(&state.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    set_msrs(vcpu, &state.msrs)?;
    vcpu.set_vcpu_events(&state.vcpu_events)
        .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// What [`probe_snapshot_msrs`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MsrProbe {
    /// MSRs a vCPU both reads and writes back: the ones to save, in KVM's order.
    pub saved: Vec<u32>,
    /// MSRs KVM lists (or Ferrite wants) but refused to read or to write back.
    pub refused: Vec<u32>,
}

/// The MSRs to save in a snapshot on this host, for vCPUs given the host's supported CPUID.
/// See [`probe_snapshot_msrs`].
pub fn snapshot_msr_list(kvm: &Kvm) -> Result<Vec<u32>> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(probe_snapshot_msrs(kvm, &cpuid)?.saved)
}

/// The MSRs to save for vCPUs with `cpuid`. See [`probe_snapshot_msrs`].
pub fn snapshot_msr_list_for(kvm: &Kvm, cpuid: &CpuId) -> Result<Vec<u32>> {
    Ok(probe_snapshot_msrs(kvm, cpuid)?.saved)
}

/// Probe which MSRs a snapshot can carry: `KVM_GET_MSR_INDEX_LIST` plus `IA32_TSC` and the
/// kvmclock MSRs, each kept only if a scratch vCPU (in a scratch VM with the in-kernel
/// irqchip, given `cpuid`) returns it from `KVM_GET_MSRS` and takes its value back with
/// `KVM_SET_MSRS`. Both ioctls stop at the first MSR they refuse and return how many they
/// processed, so the probe reads the whole list in one call, drops the refused MSR and
/// carries on after it.
pub fn probe_snapshot_msrs(kvm: &Kvm, cpuid: &CpuId) -> Result<MsrProbe> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let mut candidates: Vec<u32> = listed.as_slice().to_vec();
    for wanted in [
        MSR_IA32_TSC,
        MSR_KVM_WALL_CLOCK_NEW,
        MSR_KVM_SYSTEM_TIME_NEW,
    ] {
        if !candidates.contains(&wanted) {
            candidates.push(wanted);
        }
    }

    let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
    let vcpu = vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;
    vcpu.set_cpuid2(cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;

    let mut refused = Vec::new();
    let readable = keep_accepted(&candidates, &mut refused, |entries| {
        let mut msrs = msrs_from(entries)?;
        vcpu.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))
    })?;
    let values = get_msrs(&vcpu, &readable)?;
    let writable = keep_accepted(&readable, &mut refused, |entries| {
        for e in entries.iter_mut() {
            e.data = values
                .iter()
                .find(|(i, _)| *i == e.index)
                .map_or(0, |v| v.1);
        }
        vcpu.set_msrs(&msrs_from(entries)?)
            .map_err(ioctl("KVM_SET_MSRS"))
    })?;
    if writable.is_empty() {
        return Err(PersistError::NoReadableMsrs(candidates.len()));
    }
    if !refused.is_empty() {
        tracing::debug!(?refused, "MSRs left out of snapshots");
    }
    Ok(MsrProbe {
        saved: writable,
        refused,
    })
}

/// Run `op` over `indices` (at most [`KVM_MAX_MSR_ENTRIES`] at a time); `op` returns how many
/// leading entries KVM accepted. The first refused index goes to `refused` and the rest is
/// retried after it. Returns the accepted indices in order.
fn keep_accepted(
    indices: &[u32],
    refused: &mut Vec<u32>,
    mut op: impl FnMut(&mut [kvm_msr_entry]) -> Result<usize>,
) -> Result<Vec<u32>> {
    let mut kept = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let take = rest.len().min(KVM_MAX_MSR_ENTRIES);
        let mut chunk: Vec<kvm_msr_entry> = rest[..take].iter().map(|&i| msr_entry(i, 0)).collect();
        let accepted = op(&mut chunk)?.min(take);
        kept.extend_from_slice(&rest[..accepted]);
        if accepted < take {
            refused.push(rest[accepted]);
            rest = &rest[accepted + 1..];
        } else {
            rest = &rest[take..];
        }
    }
    Ok(kept)
}

fn msr_entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

fn msrs_from(entries: &[kvm_msr_entry]) -> Result<Msrs> {
    Msrs::from_entries(entries).map_err(|_| PersistError::TooManyEntries("MSR"))
}

/// Read `list` with `KVM_GET_MSRS`; any MSR KVM refuses is an error naming it.
fn get_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>> {
    let mut out = Vec::with_capacity(list.len());
    for chunk in list.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk.iter().map(|&i| msr_entry(i, 0)).collect();
        let mut msrs = msrs_from(&entries)?;
        let n = vcpu.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        if n < chunk.len() {
            return Err(PersistError::MsrsRefused {
                op: "KVM_GET_MSRS",
                applied: out.len() + n,
                total: list.len(),
                first_refused: chunk[n],
            });
        }
        out.extend(msrs.as_slice().iter().map(|e| (e.index, e.data)));
    }
    Ok(out)
}

/// Write `msrs` with `KVM_SET_MSRS`; any MSR KVM refuses is an error naming it.
fn set_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<()> {
    let mut applied = 0;
    for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk.iter().map(|&(i, v)| msr_entry(i, v)).collect();
        let n = vcpu
            .set_msrs(&msrs_from(&entries)?)
            .map_err(ioctl("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            return Err(PersistError::MsrsRefused {
                op: "KVM_SET_MSRS",
                applied: applied + n,
                total: msrs.len(),
                first_refused: chunk[n].0,
            });
        }
        applied += n;
    }
    Ok(())
}

/// Bytes of the XSAVE area KVM uses in this process: `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)`
/// (0 on kernels before 5.17, which always use the 4096-byte `kvm_xsave`). Cached: the
/// answer only changes if the process enables dynamic XSTATE features (AMX) with
/// `arch_prctl`, which Ferrite never does.
pub fn host_xsave_size() -> Result<usize> {
    static SIZE: OnceLock<usize> = OnceLock::new();
    if let Some(size) = SIZE.get() {
        return Ok(*size);
    }
    let kvm = Kvm::new().map_err(ioctl("open /dev/kvm"))?;
    let reported = usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    Ok(*SIZE.get_or_init(|| reported.max(XSAVE_LEGACY_BYTES)))
}

fn check_xsave_len(words: &[u32], host_bytes: usize) -> Result<()> {
    if words.len() != host_bytes.div_ceil(4) {
        return Err(PersistError::BadXsaveSize {
            saved: words.len() * 4,
            host: host_bytes,
        });
    }
    Ok(())
}

/// Number of 32-bit FAM entries after the 4096-byte header for an XSAVE area of `bytes`.
fn xsave_fam_len(bytes: usize) -> usize {
    bytes.saturating_sub(XSAVE_LEGACY_BYTES).div_ceil(4)
}

fn get_xsave(vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let size = host_xsave_size()?;
    if size <= XSAVE_LEGACY_BYTES {
        let xsave = vcpu.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
        return Ok(xsave.region.to_vec());
    }
    let mut xsave =
        Xsave::new(xsave_fam_len(size)).map_err(|_| PersistError::TooManyEntries("XSAVE"))?;
    // SAFETY: `xsave` holds `size` bytes, the size KVM_CAP_XSAVE2 reports for this process
    // (which enables no dynamic XSTATE features afterwards), so KVM writes inside it.
    unsafe { vcpu.get_xsave2(&mut xsave) }.map_err(ioctl("KVM_GET_XSAVE2"))?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

/// `words` was checked by [`check_xsave_len`] against `size`.
fn set_xsave(vcpu: &VcpuFd, words: &[u32], size: usize) -> Result<()> {
    let (head, tail) = words.split_at(words.len().min(XSAVE_LEGACY_BYTES / 4));
    if size <= XSAVE_LEGACY_BYTES {
        let mut xsave = kvm_xsave::default();
        xsave.region[..head.len()].copy_from_slice(head);
        // SAFETY: this host's KVM reads `size` <= 4096 bytes, all inside `xsave`.
        return unsafe { vcpu.set_xsave(&xsave) }.map_err(ioctl("KVM_SET_XSAVE"));
    }
    let mut xsave = Xsave::from_entries(tail).map_err(|_| PersistError::TooManyEntries("XSAVE"))?;
    // SAFETY: only the fixed-size header is written; the FAM length is left untouched.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(head);
    // SAFETY: `xsave` holds 4096 + 4 * tail.len() bytes, which `check_xsave_len` matched to
    // the size KVM reads in this process.
    unsafe { vcpu.set_xsave2(&xsave) }.map_err(ioctl("KVM_SET_XSAVE2"))
}

/// The LAPIC register page as plain bytes.
pub fn lapic_to_bytes(lapic: &kvm_lapic_state) -> Vec<u8> {
    lapic.regs.iter().map(|&b| b as u8).collect()
}

/// A `kvm_lapic_state` from [`lapic_to_bytes`] output; the length must be 1024.
pub fn lapic_from_bytes(bytes: &[u8]) -> Result<kvm_lapic_state> {
    if bytes.len() != LAPIC_BYTES {
        return Err(PersistError::BadLapicSize(bytes.len()));
    }
    let mut lapic = kvm_lapic_state {
        regs: [0; LAPIC_BYTES],
    };
    for (dst, &src) in lapic.regs.iter_mut().zip(bytes) {
        *dst = src as _;
    }
    Ok(lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_persist_lapic_bytes_round_trip_keeps_high_bytes() {
        let bytes: Vec<u8> = (0..LAPIC_BYTES).map(|i| (i * 7) as u8).collect();

        let lapic = lapic_from_bytes(&bytes).unwrap();

        assert_eq!(lapic_to_bytes(&lapic), bytes);
    }

    #[test]
    fn test_persist_lapic_from_short_bytes_is_error() {
        let result = lapic_from_bytes(&[0; 16]);

        assert!(matches!(result, Err(PersistError::BadLapicSize(16))));
    }

    #[test]
    fn test_persist_fpu_state_round_trip() {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            fsw: 0x1234,
            ftwx: 0x81,
            last_opcode: 0x55,
            last_ip: 0xdead_beef,
            last_dp: 0xfeed,
            mxcsr: 0x1f80,
            xmm: [[0xab; 16]; 16],
            fpr: [[0x11; 16]; 8],
            ..Default::default()
        };

        let back = kvm_fpu::from(&FpuState::from(&fpu));

        assert_eq!(back, fpu);
    }

    #[test]
    fn test_persist_keep_accepted_drops_each_refused_msr_and_continues() {
        let bad = [0x11, 0x33];
        let mut refused = Vec::new();

        let kept = keep_accepted(&[0x10, 0x11, 0x12, 0x33, 0x34], &mut refused, |chunk| {
            Ok(chunk.iter().take_while(|e| !bad.contains(&e.index)).count())
        })
        .unwrap();

        assert_eq!(kept, vec![0x10, 0x12, 0x34]);
        assert_eq!(refused, vec![0x11, 0x33]);
    }

    #[test]
    fn test_persist_xsave_length_mismatch_is_error() {
        let result = check_xsave_len(&[0; 10], 4096);

        assert!(matches!(
            result,
            Err(PersistError::BadXsaveSize {
                saved: 40,
                host: 4096
            })
        ));
    }

    #[test]
    fn test_persist_msrs_refused_message_names_the_msr() {
        let err = PersistError::MsrsRefused {
            op: "KVM_SET_MSRS",
            applied: 3,
            total: 40,
            first_refused: 0xdead_beef,
        };

        assert_eq!(
            err.to_string(),
            "KVM_SET_MSRS applied 3 of 40 MSRs (first refused: 0xdeadbeef)"
        );
    }
}
