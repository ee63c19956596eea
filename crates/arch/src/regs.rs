//! Initial register state of the boot vCPU, the boot GDT/IDT/page tables and the LAPIC LVTs.
//!
//! What Linux expects at entry:
//! - **PVH**: 32-bit protected mode (`CR0.PE`, paging off, `EFER` = 0), flat 4 GiB code and
//!   data segments, `EBX` = address of `hvm_start_info`, interrupts off. Linux loads its own
//!   GDT at once, so only the hidden segment state matters.
//! - **64-bit boot protocol** (bzImage at +0x200 or ELF `startup_64`): long mode
//!   (`CR0.PE|PG`, `CR4.PAE`, `EFER.LME|LMA`) with an identity map covering the kernel, the
//!   zero page and the command line; a GDT with flat `__BOOT_CS` = 0x10 (64-bit code) and
//!   `__BOOT_DS` = 0x18; `RSI` = zero page; interrupts off.
//! - FPU in its reset state (FCW 0x37f, MXCSR 0x1f80).
//! - LAPIC LINT0 = ExtINT (the 8259 PIC's output) and LINT1 = NMI, as firmware leaves them;
//!   Linux's legacy-PIC timer check and NMI watchdog rely on it.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::boot::BootProtocol;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};

/// Errors from writing the boot tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Guest memory does not cover a boot table.
    #[error("Cannot write the boot {0} to guest memory")]
    WriteTable(&'static str),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// CR0.PE: protected mode.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0.NW: not write-through.
pub const X86_CR0_NW: u64 = 1 << 29;
/// CR0.CD: cache disable.
pub const X86_CR0_CD: u64 = 1 << 30;
/// CR0.PG: paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (required for long mode).
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// Selector of the flat 32-bit code segment (PVH entry).
pub const BOOT_CS32_SELECTOR: u16 = 0x08;
/// Selector of the flat 64-bit code segment (Linux `__BOOT_CS`).
pub const BOOT_CS64_SELECTOR: u16 = 0x10;
/// Selector of the flat data segment (Linux `__BOOT_DS`).
pub const BOOT_DS_SELECTOR: u16 = 0x18;

/// RFLAGS at entry: only the always-one bit 1 (interrupts off).
const BOOT_RFLAGS: u64 = 0x2;
/// Present + writable page-table entry bits.
const PTE_PRESENT_RW: u64 = 0x3;
/// Present + writable + 2 MiB page bits of a page-directory entry.
const PDE_PRESENT_RW_2M: u64 = 0x83;

/// Builds a GDT descriptor from access/flags bits (`0xF0FF` mask as in the SDM), base and
/// 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT: null, flat 32-bit code (0x08), flat 64-bit code (0x10), flat data (0x18).
/// Four entries: it must fit between [`BOOT_GDT_START`] and [`BOOT_IDT_START`].
pub const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
];

const _: () = assert!(BOOT_GDT_START + 8 * BOOT_GDT.len() as u64 <= BOOT_IDT_START);

/// Decodes a GDT descriptor into the hidden segment state KVM takes.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// Writes the boot GDT and an empty IDT and, for 64-bit entries, the identity page tables
/// (PML4 → PDPT → PD of 512 × 2 MiB pages = first 1 GiB).
pub fn write_boot_tables<M: GuestMemoryBackend>(mem: &M, kind: BootProtocol) -> Result<()> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| Error::WriteTable("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| Error::WriteTable("IDT"))?;
    if kind.uses_zero_page() {
        write_identity_page_tables(mem)?;
    }
    Ok(())
}

fn write_identity_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<()> {
    let err = |_| Error::WriteTable("page tables");
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(err)?;
    mem.write_obj(PDE_START | PTE_PRESENT_RW, GuestAddress(PDPTE_START))
        .map_err(err)?;
    let mut pd = Vec::with_capacity(512 * 8);
    for i in 0..512u64 {
        pd.extend_from_slice(&((i << 21) | PDE_PRESENT_RW_2M).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PDE_START)).map_err(err)
}

/// Special registers for the boot vCPU, derived from its current `KVM_GET_SREGS` (which keeps
/// the APIC base and pending-interrupt bitmap). Pair with [`write_boot_tables`].
pub fn boot_sregs(kind: BootProtocol, current: &kvm_sregs) -> kvm_sregs {
    let mut sregs = *current;
    let code = match kind {
        BootProtocol::Pvh => segment_from_gdt(BOOT_GDT[1], BOOT_CS32_SELECTOR),
        BootProtocol::Linux64 | BootProtocol::Elf64 => {
            segment_from_gdt(BOOT_GDT[2], BOOT_CS64_SELECTOR)
        }
    };
    let data = segment_from_gdt(BOOT_GDT[3], BOOT_DS_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    // Busy TSS and LDT as after reset: valid for VM entry; Linux loads its own before use.
    sregs.tr = kvm_segment {
        limit: 0xffff,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        limit: 0xffff,
        type_: 2,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (8 * BOOT_GDT.len() - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cr2 = 0;
    sregs.cr8 = 0;
    let cr0 = (current.cr0 & !(X86_CR0_CD | X86_CR0_NW | X86_CR0_PG)) | X86_CR0_PE | X86_CR0_ET;
    match kind {
        BootProtocol::Pvh => {
            sregs.cr0 = cr0;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootProtocol::Linux64 | BootProtocol::Elf64 => {
            sregs.cr0 = cr0 | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// General registers for the boot vCPU: RIP at the entry point, `EBX` = `hvm_start_info` for
/// PVH, `RSI` = zero page and a stack for 64-bit entries, interrupts off.
pub fn boot_regs(kind: BootProtocol, entry_addr: GuestAddress) -> kvm_regs {
    let mut regs = kvm_regs {
        rip: entry_addr.0,
        rflags: BOOT_RFLAGS,
        ..Default::default()
    };
    match kind {
        BootProtocol::Pvh => regs.rbx = PVH_INFO_START,
        BootProtocol::Linux64 | BootProtocol::Elf64 => {
            regs.rsi = ZERO_PAGE_START;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    regs
}

/// FPU state every vCPU starts with: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Offset of the LVT LINT0 register in the LAPIC register page.
const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register.
const APIC_LVT1: usize = 0x360;
/// LVT delivery mode ExtINT.
const APIC_MODE_EXTINT: u32 = 0x7;
/// LVT delivery mode NMI.
const APIC_MODE_NMI: u32 = 0x4;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Returns `lapic` (from `KVM_GET_LAPIC`) with LINT0 = ExtINT and LINT1 = NMI, other bits kept.
pub fn lapic_with_lint(lapic: &kvm_lapic_state) -> kvm_lapic_state {
    let mut out = *lapic;
    let lint0 = with_delivery_mode(lapic_reg(lapic, APIC_LVT0), APIC_MODE_EXTINT);
    let lint1 = with_delivery_mode(lapic_reg(lapic, APIC_LVT1), APIC_MODE_NMI);
    set_lapic_reg(&mut out, APIC_LVT0, lint0);
    set_lapic_reg(&mut out, APIC_LVT1, lint1);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    type Mem = GuestMemoryMmap<()>;

    fn mem() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn test_gdt_entry_flat_code64_matches_known_value() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn test_segment_from_gdt_code64_is_long_mode_flat() {
        let seg = segment_from_gdt(BOOT_GDT[2], BOOT_CS64_SELECTOR);

        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.selector, 0x10);
        assert_eq!(seg.type_, 0xb);
        assert_eq!((seg.present, seg.s, seg.l, seg.db, seg.g), (1, 1, 1, 0, 1));
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn test_segment_from_gdt_data_is_flat_rw() {
        let seg = segment_from_gdt(BOOT_GDT[3], BOOT_DS_SELECTOR);

        assert_eq!(seg.type_, 0x3);
        assert_eq!((seg.present, seg.s, seg.l, seg.db, seg.g), (1, 1, 0, 1, 1));
        assert_eq!(seg.limit, 0xffff_ffff);
    }

    #[test]
    fn test_segment_from_gdt_null_is_unusable() {
        let seg = segment_from_gdt(0, 0);

        assert_eq!(seg.unusable, 1);
    }

    #[test]
    fn test_write_boot_tables_linux64_writes_gdt_and_identity_map() {
        let mem = mem();

        write_boot_tables(&mem, BootProtocol::Linux64).unwrap();

        let cs: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 0x10)).unwrap();
        assert_eq!(cs, BOOT_GDT[2]);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpt: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpt, PDE_START | 3);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }

    #[test]
    fn test_write_boot_tables_pvh_skips_page_tables() {
        let mem = mem();

        write_boot_tables(&mem, BootProtocol::Pvh).unwrap();

        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, 0);
        let code32: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code32, BOOT_GDT[1]);
    }

    #[test]
    fn test_write_boot_tables_no_memory_is_error() {
        let mem = Mem::from_ranges(&[(GuestAddress(0x10_0000), 0x1000)]).unwrap();

        let err = write_boot_tables(&mem, BootProtocol::Linux64).unwrap_err();

        assert_eq!(err, Error::WriteTable("GDT"));
    }

    fn reset_sregs() -> kvm_sregs {
        kvm_sregs {
            cr0: 0x6000_0010,
            apic_base: 0xfee0_0900,
            ..Default::default()
        }
    }

    #[test]
    fn test_boot_sregs_linux64_is_long_mode() {
        let sregs = boot_sregs(BootProtocol::Linux64, &reset_sregs());

        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET | X86_CR0_PG);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cr4, X86_CR4_PAE);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.selector, 0x10);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.ss.selector, 0x18);
        assert_eq!(sregs.gdt.base, BOOT_GDT_START);
        assert_eq!(sregs.gdt.limit, 31);
        assert_eq!(sregs.idt.base, BOOT_IDT_START);
        assert_eq!(sregs.apic_base, 0xfee0_0900);
        assert_eq!((sregs.tr.type_, sregs.tr.present, sregs.tr.s), (11, 1, 0));
    }

    #[test]
    fn test_boot_sregs_pvh_is_protected_mode_without_paging() {
        let sregs = boot_sregs(BootProtocol::Pvh, &reset_sregs());

        assert_eq!(sregs.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.efer, 0);
        assert_eq!(sregs.cr4, 0);
        assert_eq!(sregs.cs.selector, BOOT_CS32_SELECTOR);
        assert_eq!((sregs.cs.db, sregs.cs.l), (1, 0));
        assert_eq!(sregs.ds.selector, BOOT_DS_SELECTOR);
    }

    #[test]
    fn test_boot_regs_pvh_sets_ebx_to_start_info() {
        let regs = boot_regs(BootProtocol::Pvh, GuestAddress(0x100_0040));

        assert_eq!(regs.rip, 0x100_0040);
        assert_eq!(regs.rbx, PVH_INFO_START);
        assert_eq!(regs.rflags, 2);
    }

    #[test]
    fn test_boot_regs_linux64_sets_rsi_and_stack() {
        let regs = boot_regs(BootProtocol::Linux64, GuestAddress(0x10_0200));

        assert_eq!(regs.rip, 0x10_0200);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(regs.rsp, BOOT_STACK_POINTER);
        assert_eq!(regs.rbp, BOOT_STACK_POINTER);
    }

    #[test]
    fn test_boot_fpu_has_reset_control_words() {
        let fpu = boot_fpu();

        assert_eq!(fpu.fcw, 0x37f);
        assert_eq!(fpu.mxcsr, 0x1f80);
    }

    #[test]
    fn test_lapic_with_lint_sets_extint_and_nmi_keeping_mask() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0000); // masked, fixed
        set_lapic_reg(&mut lapic, APIC_LVT1, 0x0001_0700);

        let out = lapic_with_lint(&lapic);

        assert_eq!(lapic_reg(&out, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&out, APIC_LVT1), 0x0001_0400);
    }
}
