//! The repair hook for emulating hosts.
//!
//! On `kvm_pvm` hosts guest kernel code is emulated by KVM, and some instructions make KVM give
//! up with `KVM_EXIT_INTERNAL_ERROR` / `KVM_INTERNAL_ERROR_EMULATION` while the vCPU stays
//! resumable. This module finishes those instructions in the VMM: it decodes the bytes at RIP,
//! performs the instruction against the vCPU state and guest memory, advances RIP, and reports
//! any exception or interrupt the instruction raises so the caller can inject it.

pub mod decode;
pub mod operand;
pub mod pagewalk;
pub mod soft_exception;
pub mod stats;

pub use operand::{cpu_mode, fetch_insn, gpr, linear_rip, operand_address, paging};
pub use stats::{RepairKind, RepairStats};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_xcrs};
use vm_device::GuestMemoryMmap;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use decode::{CpuMode, DecodeError, Op};
use pagewalk::WalkError;

const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_OF: u64 = 1 << 11;
const RFLAGS_AC: u64 = 1 << 18;
const CR4_OSXSAVE: u64 = 1 << 18;
/// MXCSR bits a guest may set (MXCSR_MASK without DAZ restrictions).
const MXCSR_MASK: u32 = 0xffff;

/// Exception vectors used by repairs.
const VEC_DB: u8 = 1;
const VEC_BP: u8 = 3;
const VEC_OF: u8 = 4;
const VEC_UD: u8 = 6;
const VEC_GP: u8 = 13;

/// An event the repaired instruction raises in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injection {
    /// A hardware exception (vector < 32), with error code if the vector has one.
    Exception {
        /// Vector.
        vector: u8,
        /// Error code pushed by the CPU.
        error_code: Option<u32>,
    },
    /// A software interrupt (`int n`): delivered through the IDT gate `vector`.
    SoftInterrupt {
        /// Vector.
        vector: u8,
    },
    /// A page fault: CR2 must be set to `address` before injecting #PF.
    PageFault {
        /// Faulting linear address.
        address: u64,
        /// #PF error code.
        error_code: u32,
    },
}

/// What a successful repair did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repaired {
    /// The instruction kind.
    pub kind: RepairKind,
    /// Event to inject after the registers are written back.
    pub inject: Option<Injection>,
}

/// Why an emulation failure could not be repaired.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepairError {
    /// The bytes do not decode to a supported instruction.
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// A memory operand or the instruction itself is outside guest RAM.
    #[error("{0}")]
    Memory(WalkError),
    /// Reading or writing vCPU state failed.
    #[error("vCPU state access failed: {0}")]
    Vcpu(String),
    /// The host CPU lacks an instruction the repair needs.
    #[error("Host CPU lacks {0}")]
    HostCpu(&'static str),
    /// A form of a supported instruction the repair hook does not implement.
    #[error("Unsupported form: {0}")]
    UnsupportedForm(&'static str),
}

/// The vCPU state a repair may need beyond the general registers (implemented by `VcpuFd`, and
/// by a fake in tests).
pub trait RepairVcpu {
    /// `KVM_GET_FPU`.
    fn get_fpu(&self) -> Result<kvm_fpu, String>;
    /// `KVM_SET_FPU`.
    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), String>;
    /// `KVM_GET_XCRS`.
    fn get_xcrs(&self) -> Result<kvm_xcrs, String>;
    /// `KVM_SET_XCRS`; an error means the value is invalid (the guest gets #GP).
    fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<(), String>;
}

impl RepairVcpu for kvm_ioctls::VcpuFd {
    fn get_fpu(&self) -> Result<kvm_fpu, String> {
        kvm_ioctls::VcpuFd::get_fpu(self).map_err(|e| e.to_string())
    }
    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), String> {
        kvm_ioctls::VcpuFd::set_fpu(self, fpu).map_err(|e| e.to_string())
    }
    fn get_xcrs(&self) -> Result<kvm_xcrs, String> {
        kvm_ioctls::VcpuFd::get_xcrs(self).map_err(|e| e.to_string())
    }
    fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<(), String> {
        kvm_ioctls::VcpuFd::set_xcrs(self, xcrs).map_err(|e| e.to_string())
    }
}

fn gp0() -> Injection {
    Injection::Exception {
        vector: VEC_GP,
        error_code: Some(0),
    }
}

/// Turn a translation failure into the #PF the guest would have taken, or an error.
fn fault(err: WalkError, write: bool) -> Result<Injection, RepairError> {
    let write_bit = if write { 2 } else { 0 };
    match err {
        WalkError::NotPresent(address) => Ok(Injection::PageFault {
            address,
            error_code: write_bit,
        }),
        WalkError::ReadOnly(address) => Ok(Injection::PageFault {
            address,
            error_code: write_bit | 1,
        }),
        WalkError::NotRam(_) => Err(RepairError::Memory(err)),
    }
}

/// Repair the instruction in `insn` (the bytes at RIP). On success `regs` holds the state to
/// write back (RIP advanced unless the instruction faulted) and the result says what to inject.
pub fn repair(
    insn: &[u8],
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    mem: &GuestMemoryMmap,
    vcpu: &dyn RepairVcpu,
) -> Result<Repaired, RepairError> {
    let mode = cpu_mode(sregs);
    let decoded = decode::decode(insn, mode)?;
    let next_rip = match mode {
        CpuMode::Bits64 => regs.rip.wrapping_add(decoded.len as u64),
        _ => regs.rip.wrapping_add(decoded.len as u64) & 0xffff_ffff,
    };
    let pg = paging(sregs);
    let exc = |vector: u8| Injection::Exception {
        vector,
        error_code: None,
    };
    // Faulting instructions leave RIP on the instruction; traps and completed ones advance it.
    let (kind, inject, advance) = match decoded.op {
        Op::Int3 => (RepairKind::Int3, Some(exc(VEC_BP)), true),
        Op::Int1 => (RepairKind::Int1, Some(exc(VEC_DB)), true),
        Op::IntN(vector) => (
            RepairKind::IntN,
            Some(Injection::SoftInterrupt { vector }),
            true,
        ),
        Op::Into => {
            let of = regs.rflags & RFLAGS_OF != 0;
            (RepairKind::Into, of.then(|| exc(VEC_OF)), true)
        }
        Op::Fwait => (RepairKind::Fwait, None, true),
        Op::Clac => {
            regs.rflags &= !RFLAGS_AC;
            (RepairKind::Clac, None, true)
        }
        Op::Stac => {
            regs.rflags |= RFLAGS_AC;
            (RepairKind::Stac, None, true)
        }
        Op::Xgetbv | Op::Xsetbv => {
            let kind = if decoded.op == Op::Xgetbv {
                RepairKind::Xgetbv
            } else {
                RepairKind::Xsetbv
            };
            if sregs.cr4 & CR4_OSXSAVE == 0 {
                (kind, Some(exc(VEC_UD)), false)
            } else if decoded.op == Op::Xgetbv {
                match xgetbv(vcpu, regs)? {
                    true => (kind, None, true),
                    false => (kind, Some(gp0()), false),
                }
            } else {
                match xsetbv(vcpu, regs)? {
                    true => (kind, None, true),
                    false => (kind, Some(gp0()), false),
                }
            }
        }
        Op::Ldmxcsr(m) => {
            let addr = operand_address(&m, regs, sregs, mode, next_rip);
            let mut buf = [0u8; 4];
            match pagewalk::read_virt(mem, &pg, addr, &mut buf) {
                Err(e) => (RepairKind::Ldmxcsr, Some(fault(e, false)?), false),
                Ok(()) => {
                    let value = u32::from_le_bytes(buf);
                    if value & !MXCSR_MASK != 0 {
                        (RepairKind::Ldmxcsr, Some(gp0()), false)
                    } else {
                        let mut fpu = vcpu.get_fpu().map_err(RepairError::Vcpu)?;
                        fpu.mxcsr = value;
                        vcpu.set_fpu(&fpu).map_err(RepairError::Vcpu)?;
                        (RepairKind::Ldmxcsr, None, true)
                    }
                }
            }
        }
        Op::Stmxcsr(m) => {
            let addr = operand_address(&m, regs, sregs, mode, next_rip);
            let fpu = vcpu.get_fpu().map_err(RepairError::Vcpu)?;
            match pagewalk::write_virt(mem, &pg, addr, &fpu.mxcsr.to_le_bytes()) {
                Err(e) => (RepairKind::Stmxcsr, Some(fault(e, true)?), false),
                Ok(()) => (RepairKind::Stmxcsr, None, true),
            }
        }
        Op::Iret(size) => match iret(size, regs, sregs, mem)? {
            None => (RepairKind::Iret, None, false),
            Some(inj) => (RepairKind::Iret, Some(inj), false),
        },
        Op::Cmpxchg16b(m) => {
            let addr = operand_address(&m, regs, sregs, mode, next_rip);
            if !addr.is_multiple_of(16) {
                (RepairKind::Cmpxchg16b, Some(gp0()), false)
            } else {
                match pagewalk::translate(mem, &pg, addr, true) {
                    Err(e) => (RepairKind::Cmpxchg16b, Some(fault(e, true)?), false),
                    Ok(gpa) => {
                        cmpxchg16b(mem, gpa, regs)?;
                        (RepairKind::Cmpxchg16b, None, true)
                    }
                }
            }
        }
    };
    if advance {
        regs.rip = next_rip;
    }
    Ok(Repaired { kind, inject })
}

/// RFLAGS bits `iret` may load at CPL 0 (everything architectural except VM and bit 1).
const IRET_FLAGS_MASK: u64 = 0x003d_7fd5;
const RFLAGS_NT: u64 = 1 << 14;

/// Same-privilege `iretd` (32-bit protected mode) or `iretq` (64-bit mode): pop RIP, CS,
/// RFLAGS (and RSP, SS for iretq). Returns an injection if reading the stack faults. Sets RIP
/// itself (the caller must not advance it). Privilege changes, task returns and virtual-8086
/// returns are refused.
fn iret(
    size: u8,
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    mem: &GuestMemoryMmap,
) -> Result<Option<Injection>, RepairError> {
    if regs.rflags & RFLAGS_NT != 0 {
        return Err(RepairError::UnsupportedForm(
            "iret with NT set (task return)",
        ));
    }
    let words = if size == 8 { 5 } else { 3 };
    let mut frame = [0u8; 40];
    let len = words * usize::from(size);
    let sp = if size == 8 {
        regs.rsp
    } else {
        sregs.ss.base.wrapping_add(regs.rsp & 0xffff_ffff) & 0xffff_ffff
    };
    if let Err(e) = pagewalk::read_virt(mem, &paging(sregs), sp, &mut frame[..len]) {
        return fault(e, false).map(Some);
    }
    let word = |i: usize| -> u64 {
        let at = i * usize::from(size);
        let mut b = [0u8; 8];
        b[..usize::from(size)].copy_from_slice(&frame[at..at + usize::from(size)]);
        u64::from_le_bytes(b)
    };
    let (rip, cs, rflags) = (word(0), word(1) & 0xffff, word(2));
    if cs != u64::from(sregs.cs.selector) {
        return Err(RepairError::UnsupportedForm("iret to another code segment"));
    }
    if size == 8 {
        let (rsp, ss) = (word(3), word(4) & 0xffff);
        if ss != u64::from(sregs.ss.selector) {
            return Err(RepairError::UnsupportedForm(
                "iretq to another stack segment",
            ));
        }
        regs.rsp = rsp;
    } else {
        regs.rsp = (regs.rsp & !0xffff_ffff) | (regs.rsp.wrapping_add(12) & 0xffff_ffff);
    }
    regs.rip = rip;
    regs.rflags = (rflags & IRET_FLAGS_MASK) | 2;
    Ok(None)
}

/// `xgetbv`: EDX:EAX = XCR[ECX]. Returns false for an XCR the vCPU does not have.
fn xgetbv(vcpu: &dyn RepairVcpu, regs: &mut kvm_regs) -> Result<bool, RepairError> {
    let xcrs = vcpu.get_xcrs().map_err(RepairError::Vcpu)?;
    let index = regs.rcx as u32;
    let n = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
    match xcrs.xcrs[..n].iter().find(|x| x.xcr == index) {
        Some(x) => {
            regs.rax = x.value & 0xffff_ffff;
            regs.rdx = x.value >> 32;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// `xsetbv`: XCR[ECX] = EDX:EAX. Returns false if KVM rejects the value.
fn xsetbv(vcpu: &dyn RepairVcpu, regs: &kvm_regs) -> Result<bool, RepairError> {
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = regs.rcx as u32;
    xcrs.xcrs[0].value = ((regs.rdx & 0xffff_ffff) << 32) | (regs.rax & 0xffff_ffff);
    Ok(vcpu.set_xcrs(&xcrs).is_ok())
}

/// Atomic 16-byte compare-exchange on guest-physical `gpa` (16-byte aligned), with
/// `cmpxchg16b`'s register and ZF semantics.
fn cmpxchg16b(mem: &GuestMemoryMmap, gpa: u64, regs: &mut kvm_regs) -> Result<(), RepairError> {
    let not_ram = || RepairError::Memory(WalkError::NotRam(gpa));
    let (region, offset) = mem.to_region_addr(GuestAddress(gpa)).ok_or_else(not_ram)?;
    if offset
        .0
        .checked_add(16)
        .is_none_or(|end| end > region.len())
    {
        return Err(not_ram());
    }
    let host = region.get_host_address(offset).map_err(|_| not_ram())?;
    let expected = (u128::from(regs.rdx) << 64) | u128::from(regs.rax);
    let new = (u128::from(regs.rcx) << 64) | u128::from(regs.rbx);
    if !std::arch::is_x86_feature_detected!("cmpxchg16b") {
        return Err(RepairError::HostCpu("cmpxchg16b"));
    }
    // SAFETY: `host` points at 16 bytes inside a live guest-memory mapping (checked above),
    // 16-byte aligned because guest regions are page aligned and `gpa` is 16-byte aligned; the
    // host CPU supports cmpxchg16b (checked above). Other vCPUs may access the bytes
    // concurrently, which is exactly why the real atomic instruction is used.
    let old = unsafe { host_cmpxchg16b(host.cast::<u128>(), expected, new) };
    region.bitmap().mark_dirty(offset.0 as usize, 16);
    if old == expected {
        regs.rflags |= RFLAGS_ZF;
    } else {
        regs.rflags &= !RFLAGS_ZF;
        regs.rax = old as u64;
        regs.rdx = (old >> 64) as u64;
    }
    Ok(())
}

/// `lock cmpxchg16b [dst]`; returns the value memory held before.
///
/// # Safety
/// `dst` must be valid for 16 bytes, 16-byte aligned, and the CPU must support cmpxchg16b.
unsafe fn host_cmpxchg16b(dst: *mut u128, old: u128, new: u128) -> u128 {
    let mut lo = old as u64;
    let mut hi = (old >> 64) as u64;
    // SAFETY: per the function contract. RBX is reserved by LLVM, so the new low half is
    // swapped into it around the instruction and restored afterwards.
    unsafe {
        std::arch::asm!(
            "xchg {new_lo}, rbx",
            "lock cmpxchg16b xmmword ptr [{dst}]",
            "xchg {new_lo}, rbx",
            new_lo = inout(reg) new as u64 => _,
            dst = in(reg) dst,
            inout("rax") lo,
            inout("rdx") hi,
            in("rcx") (new >> 64) as u64,
            options(nostack),
        );
    }
    (u128::from(hi) << 64) | u128::from(lo)
}

#[cfg(test)]
mod tests {
    use super::pagewalk::tests::long_mode_memory;
    use super::pagewalk::Paging;
    use super::*;
    use std::cell::RefCell;
    use vm_memory::Bytes;

    #[derive(Default)]
    struct FakeVcpu {
        fpu: RefCell<kvm_fpu>,
        xcr0: RefCell<u64>,
    }

    impl RepairVcpu for FakeVcpu {
        fn get_fpu(&self) -> Result<kvm_fpu, String> {
            Ok(*self.fpu.borrow())
        }
        fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), String> {
            *self.fpu.borrow_mut() = *fpu;
            Ok(())
        }
        fn get_xcrs(&self) -> Result<kvm_xcrs, String> {
            let mut x = kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            };
            x.xcrs[0].value = *self.xcr0.borrow();
            Ok(x)
        }
        fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<(), String> {
            if xcrs.xcrs[0].xcr != 0 || xcrs.xcrs[0].value & 1 == 0 {
                return Err("invalid".into());
            }
            *self.xcr0.borrow_mut() = xcrs.xcrs[0].value;
            Ok(())
        }
    }

    fn long_mode_sregs(paging: &Paging) -> kvm_sregs {
        let mut s = kvm_sregs {
            cr0: paging.cr0,
            cr3: paging.cr3,
            cr4: paging.cr4 | CR4_OSXSAVE,
            efer: paging.efer,
            ..Default::default()
        };
        s.cs.l = 1;
        s
    }

    fn regs_at(rip: u64) -> kvm_regs {
        kvm_regs {
            rip,
            rflags: 2,
            ..Default::default()
        }
    }

    /// A 64-bit guest: identity/high-half page tables in `mem`, long-mode `sregs` and a fake
    /// vCPU for the FPU/XCR state.
    struct LongMode {
        mem: GuestMemoryMmap,
        sregs: kvm_sregs,
        vcpu: FakeVcpu,
    }

    impl LongMode {
        fn new() -> Self {
            let (mem, paging) = long_mode_memory();
            Self {
                mem,
                sregs: long_mode_sregs(&paging),
                vcpu: FakeVcpu::default(),
            }
        }

        fn repair(&self, insn: &[u8], regs: &mut kvm_regs) -> Result<Repaired, RepairError> {
            repair(insn, regs, &self.sregs, &self.mem, &self.vcpu)
        }

        /// Put an `iretq` frame (rip, cs, rflags, rsp, ss) at guest-physical `addr`.
        fn write_iret_frame(&self, addr: u64, frame: [u64; 5]) {
            for (i, v) in frame.iter().enumerate() {
                self.mem
                    .write_obj(*v, GuestAddress(addr + 8 * i as u64))
                    .unwrap();
            }
        }
    }

    #[test]
    fn test_repair_int3_advances_rip_and_injects_bp() {
        let vm = LongMode::new();
        let mut regs = regs_at(0x1000);
        let r = vm.repair(&[0xcc], &mut regs).unwrap();
        assert_eq!(regs.rip, 0x1001);
        assert_eq!(r.kind, RepairKind::Int3);
        assert_eq!(
            r.inject,
            Some(Injection::Exception {
                vector: 3,
                error_code: None
            })
        );
    }

    #[test]
    fn test_repair_int_n_injects_soft_interrupt() {
        let vm = LongMode::new();
        let mut regs = regs_at(0x1000);
        let r = vm.repair(&[0xcd, 0x80], &mut regs).unwrap();
        assert_eq!(regs.rip, 0x1002);
        assert_eq!(r.inject, Some(Injection::SoftInterrupt { vector: 0x80 }));
    }

    #[test]
    fn test_repair_fwait_with_prefix_skips_whole_instruction() {
        let vm = LongMode::new();
        let mut regs = regs_at(0x1000);
        let r = vm.repair(&[0x66, 0x9b], &mut regs).unwrap();
        assert_eq!(regs.rip, 0x1002);
        assert_eq!(r.inject, None);
    }

    #[test]
    fn test_repair_cmpxchg16b_equal_stores_and_sets_zf() {
        let vm = LongMode::new();
        let gva = 0xffff_8000_0020_0010u64;
        vm.mem
            .write_obj(0x1111u64, GuestAddress(0x50_0010))
            .unwrap();
        vm.mem
            .write_obj(0x2222u64, GuestAddress(0x50_0018))
            .unwrap();
        let mut regs = regs_at(0x1000);
        regs.rdi = gva;
        regs.rax = 0x1111;
        regs.rdx = 0x2222;
        regs.rbx = 0xaaaa;
        regs.rcx = 0xbbbb;
        // lock cmpxchg16b [rdi]
        let r = vm
            .repair(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f], &mut regs)
            .unwrap();
        assert_eq!(r.kind, RepairKind::Cmpxchg16b);
        assert_eq!(regs.rip, 0x1005);
        assert_ne!(regs.rflags & RFLAGS_ZF, 0);
        assert_eq!(
            vm.mem.read_obj::<u64>(GuestAddress(0x50_0010)).unwrap(),
            0xaaaa
        );
        assert_eq!(
            vm.mem.read_obj::<u64>(GuestAddress(0x50_0018)).unwrap(),
            0xbbbb
        );
    }

    #[test]
    fn test_repair_cmpxchg16b_mismatch_loads_rdx_rax_and_clears_zf() {
        let vm = LongMode::new();
        vm.mem.write_obj(5u64, GuestAddress(0x100)).unwrap();
        vm.mem.write_obj(6u64, GuestAddress(0x108)).unwrap();
        let mut regs = regs_at(0x1000);
        regs.rflags |= RFLAGS_ZF;
        regs.rsi = 0x80;
        // cmpxchg16b [rsi + 0x80] (modrm mod=10 reg=1 rm=110, disp32)
        vm.repair(&[0x48, 0x0f, 0xc7, 0x8e, 0x80, 0, 0, 0], &mut regs)
            .unwrap();
        assert_eq!(regs.rflags & RFLAGS_ZF, 0);
        assert_eq!((regs.rax, regs.rdx), (5, 6));
        assert_eq!(vm.mem.read_obj::<u64>(GuestAddress(0x100)).unwrap(), 5);
    }

    #[test]
    fn test_repair_cmpxchg16b_misaligned_injects_gp() {
        let vm = LongMode::new();
        let mut regs = regs_at(0x1000);
        regs.rdi = 0x108 - 0x8 + 0x4;
        let r = vm.repair(&[0x48, 0x0f, 0xc7, 0x0f], &mut regs).unwrap();
        assert_eq!(r.inject, Some(gp0()));
        assert_eq!(regs.rip, 0x1000);
    }

    #[test]
    fn test_repair_ldmxcsr_loads_from_guest_memory() {
        let vm = LongMode::new();
        vm.mem
            .write_obj(0x1f80u32 | 0x40, GuestAddress(0x10_2000))
            .unwrap();
        let mut regs = regs_at(0x1000);
        regs.rax = 0x10_2000;
        vm.repair(&[0x0f, 0xae, 0x10], &mut regs).unwrap();
        assert_eq!(vm.vcpu.fpu.borrow().mxcsr, 0x1fc0);
        assert_eq!(regs.rip, 0x1003);
    }

    #[test]
    fn test_repair_ldmxcsr_reserved_bits_inject_gp() {
        let vm = LongMode::new();
        vm.mem
            .write_obj(0x1_0000u32, GuestAddress(0x10_2000))
            .unwrap();
        let mut regs = regs_at(0x1000);
        regs.rax = 0x10_2000;
        let r = vm.repair(&[0x0f, 0xae, 0x10], &mut regs).unwrap();
        assert_eq!(r.inject, Some(gp0()));
    }

    #[test]
    fn test_repair_stmxcsr_to_unmapped_page_injects_pf() {
        let vm = LongMode::new();
        let mut regs = regs_at(0x1000);
        regs.rbx = 0x4000_0000;
        let r = vm.repair(&[0x0f, 0xae, 0x1b], &mut regs).unwrap();
        assert_eq!(
            r.inject,
            Some(Injection::PageFault {
                address: 0x4000_0000,
                error_code: 2
            })
        );
        assert_eq!(regs.rip, 0x1000);
    }

    #[test]
    fn test_repair_stmxcsr_writes_mxcsr() {
        let vm = LongMode::new();
        vm.vcpu.fpu.borrow_mut().mxcsr = 0x1f80;
        let mut regs = regs_at(0x1000);
        regs.rbx = 0x10_3000;
        vm.repair(&[0x0f, 0xae, 0x1b], &mut regs).unwrap();
        assert_eq!(
            vm.mem.read_obj::<u32>(GuestAddress(0x10_3000)).unwrap(),
            0x1f80
        );
    }

    #[test]
    fn test_repair_xgetbv_xsetbv_roundtrip() {
        let vm = LongMode::new();
        let mut regs = regs_at(0x1000);
        regs.rax = 7;
        vm.repair(&[0x0f, 0x01, 0xd1], &mut regs).unwrap();
        assert_eq!(*vm.vcpu.xcr0.borrow(), 7);
        regs.rax = 0;
        vm.repair(&[0x0f, 0x01, 0xd0], &mut regs).unwrap();
        assert_eq!((regs.rax, regs.rdx, regs.rip), (7, 0, 0x1006));
    }

    #[test]
    fn test_repair_xsetbv_invalid_value_injects_gp() {
        let vm = LongMode::new();
        let mut regs = regs_at(0x1000);
        let r = vm.repair(&[0x0f, 0x01, 0xd1], &mut regs).unwrap();
        assert_eq!(r.inject, Some(gp0()));
    }

    #[test]
    fn test_repair_iretq_same_privilege_pops_frame() {
        let mut vm = LongMode::new();
        vm.sregs.cs.selector = 0x10;
        vm.sregs.ss.selector = 0x18;
        vm.write_iret_frame(0x10_7000, [0x1234, 0x10, 0x246, 0x10_8000, 0x18]);
        let mut regs = regs_at(0x1000);
        regs.rsp = 0x10_7000;
        let r = vm.repair(&[0x48, 0xcf], &mut regs).unwrap();
        assert_eq!(r.kind, RepairKind::Iret);
        assert_eq!(
            (regs.rip, regs.rflags, regs.rsp),
            (0x1234, 0x246, 0x10_8000)
        );
    }

    #[test]
    fn test_repair_iret_to_other_cs_is_refused() {
        let mut vm = LongMode::new();
        vm.sregs.cs.selector = 0x10;
        vm.write_iret_frame(0x10_7000, [0x1234, 0x33, 0x246, 0x10_8000, 0x2b]);
        let mut regs = regs_at(0x1000);
        regs.rsp = 0x10_7000;
        let err = vm.repair(&[0x48, 0xcf], &mut regs);
        assert!(matches!(err, Err(RepairError::UnsupportedForm(_))));
        assert_eq!(regs.rip, 0x1000);
    }

    #[test]
    fn test_repair_unknown_instruction_is_error() {
        let vm = LongMode::new();
        let mut regs = regs_at(0x1000);
        let err = vm.repair(&[0x0f, 0x0b], &mut regs);
        assert_eq!(err, Err(RepairError::Decode(DecodeError::Unsupported)));
        assert_eq!(regs.rip, 0x1000);
    }

    #[test]
    fn test_fetch_insn_reads_through_page_tables() {
        let vm = LongMode::new();
        vm.mem
            .write_slice(&[0xcc, 0x90], GuestAddress(0x50_0100))
            .unwrap();
        let regs = regs_at(0xffff_8000_0020_0100);
        let bytes = fetch_insn(&vm.mem, &regs, &vm.sregs);
        assert_eq!(bytes.len(), 15);
        assert_eq!(&bytes[..2], &[0xcc, 0x90]);
    }

    #[test]
    fn test_stats_count_per_kind() {
        let stats = RepairStats::default();
        stats.record(RepairKind::Int3);
        stats.record(RepairKind::Int3);
        stats.record(RepairKind::Fwait);
        assert_eq!(stats.snapshot(), vec![("int3", 2), ("fwait", 1)]);
        assert_eq!(stats.total(), 3);
    }
}
