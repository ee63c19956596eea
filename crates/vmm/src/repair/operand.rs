//! Reading the vCPU's view of memory: execution mode, paging registers, the instruction at
//! RIP, and the linear address of a decoded memory operand.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_device::GuestMemoryMmap;

use super::decode::{CpuMode, MemOperand, Segment, MAX_INSN_LEN};
use super::pagewalk::{self, Paging};

const CR0_PE: u64 = 1;
const EFER_LMA: u64 = 1 << 10;

/// The execution mode the segment and control registers describe.
pub fn cpu_mode(sregs: &kvm_sregs) -> CpuMode {
    if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
        CpuMode::Bits64
    } else if sregs.cr0 & CR0_PE == 0 || sregs.cs.db == 0 {
        CpuMode::Bits16
    } else {
        CpuMode::Bits32
    }
}

/// The paging registers of `sregs`.
pub fn paging(sregs: &kvm_sregs) -> Paging {
    Paging {
        cr0: sregs.cr0,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        efer: sregs.efer,
    }
}

/// Linear address of the current instruction (CS base + RIP, truncated outside 64-bit mode).
pub fn linear_rip(regs: &kvm_regs, sregs: &kvm_sregs) -> u64 {
    match cpu_mode(sregs) {
        CpuMode::Bits64 => regs.rip,
        _ => sregs.cs.base.wrapping_add(regs.rip) & 0xffff_ffff,
    }
}

/// Read up to 15 instruction bytes at RIP through the guest page tables; stops early at a
/// page that cannot be read.
pub fn fetch_insn(mem: &GuestMemoryMmap, regs: &kvm_regs, sregs: &kvm_sregs) -> Vec<u8> {
    let pg = paging(sregs);
    let mut addr = linear_rip(regs, sregs);
    let mut out = Vec::with_capacity(MAX_INSN_LEN);
    while out.len() < MAX_INSN_LEN {
        let chunk = (0x1000 - (addr & 0xfff) as usize).min(MAX_INSN_LEN - out.len());
        let mut buf = [0u8; MAX_INSN_LEN];
        if pagewalk::read_virt(mem, &pg, addr, &mut buf[..chunk]).is_err() {
            break;
        }
        out.extend_from_slice(&buf[..chunk]);
        addr = addr.wrapping_add(chunk as u64);
    }
    out
}

/// General-purpose register number `n` (0 = RAX … 15 = R15).
pub fn gpr(regs: &kvm_regs, n: u8) -> u64 {
    match n & 15 {
        0 => regs.rax,
        1 => regs.rcx,
        2 => regs.rdx,
        3 => regs.rbx,
        4 => regs.rsp,
        5 => regs.rbp,
        6 => regs.rsi,
        7 => regs.rdi,
        8 => regs.r8,
        9 => regs.r9,
        10 => regs.r10,
        11 => regs.r11,
        12 => regs.r12,
        13 => regs.r13,
        14 => regs.r14,
        _ => regs.r15,
    }
}

fn segment(sregs: &kvm_sregs, seg: Segment) -> &kvm_segment {
    match seg {
        Segment::Es => &sregs.es,
        Segment::Cs => &sregs.cs,
        Segment::Ss => &sregs.ss,
        Segment::Ds => &sregs.ds,
        Segment::Fs => &sregs.fs,
        Segment::Gs => &sregs.gs,
    }
}

/// Linear address of memory operand `m` for an instruction ending at `next_rip`.
pub fn operand_address(
    m: &MemOperand,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    mode: CpuMode,
    next_rip: u64,
) -> u64 {
    let mut ea = m.disp as u64;
    if let Some(b) = m.base {
        ea = ea.wrapping_add(gpr(regs, b));
    }
    if let Some((i, scale)) = m.index {
        ea = ea.wrapping_add(gpr(regs, i).wrapping_mul(u64::from(scale)));
    }
    if m.rip_relative {
        ea = ea.wrapping_add(next_rip);
    }
    if m.addr_size == 4 {
        ea &= 0xffff_ffff;
    }
    let base = match (mode, m.segment) {
        (CpuMode::Bits64, Segment::Fs) => sregs.fs.base,
        (CpuMode::Bits64, Segment::Gs) => sregs.gs.base,
        (CpuMode::Bits64, _) => 0,
        (_, seg) => segment(sregs, seg).base,
    };
    let linear = base.wrapping_add(ea);
    if mode == CpuMode::Bits64 {
        linear
    } else {
        linear & 0xffff_ffff
    }
}
