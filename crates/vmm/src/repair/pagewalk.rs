//! Guest-virtual to guest-physical translation by walking the guest's own page tables, and
//! byte access through it. Page-table entries come from guest memory and are untrusted: a
//! missing table or an entry pointing outside RAM is an error, never a panic.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const CR0_PG: u64 = 1 << 31;
const CR0_WP: u64 = 1 << 16;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_PS: u64 = 1 << 7;
/// Physical-address bits 12..51 of a 64-bit entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The control registers that define how the guest translates addresses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Paging {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
}

/// Why a guest-virtual address could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// A paging-structure entry (or the page) is not present.
    #[error("Page not present at guest-virtual {0:#x}")]
    NotPresent(u64),
    /// A write to a read-only page with CR0.WP set.
    #[error("Write to read-only page at guest-virtual {0:#x}")]
    ReadOnly(u64),
    /// A paging structure or the target lies outside guest RAM.
    #[error("Guest-physical {0:#x} is not RAM")]
    NotRam(u64),
}

impl WalkError {
    /// The faulting guest-virtual address for a #PF, if this is a page fault.
    pub fn fault_address(&self) -> Option<u64> {
        match self {
            Self::NotPresent(a) | Self::ReadOnly(a) => Some(*a),
            Self::NotRam(_) => None,
        }
    }
}

fn read_entry<M: GuestMemoryBackend>(mem: &M, gpa: u64, wide: bool) -> Result<u64, WalkError> {
    if wide {
        mem.read_obj::<u64>(GuestAddress(gpa))
            .map_err(|_| WalkError::NotRam(gpa))
    } else {
        mem.read_obj::<u32>(GuestAddress(gpa))
            .map(u64::from)
            .map_err(|_| WalkError::NotRam(gpa))
    }
}

/// Translate `gva` to a guest-physical address, checking presence (and writability when
/// `write`) at every level. Honours 4 MiB, 2 MiB and 1 GiB pages.
pub fn translate<M: GuestMemoryBackend>(
    mem: &M,
    paging: &Paging,
    gva: u64,
    write: bool,
) -> Result<u64, WalkError> {
    if paging.cr0 & CR0_PG == 0 {
        return Ok(gva & 0xffff_ffff);
    }
    let check_rw = write && paging.cr0 & CR0_WP != 0;
    let check = |entry: u64| -> Result<(), WalkError> {
        if entry & PTE_P == 0 {
            return Err(WalkError::NotPresent(gva));
        }
        if check_rw && entry & PTE_RW == 0 {
            return Err(WalkError::ReadOnly(gva));
        }
        Ok(())
    };
    if paging.cr4 & CR4_PAE == 0 {
        // Legacy 32-bit two-level paging.
        let gva = gva & 0xffff_ffff;
        let pde_addr = (paging.cr3 & 0xffff_f000) + ((gva >> 22) & 0x3ff) * 4;
        let pde = read_entry(mem, pde_addr, false)?;
        check(pde)?;
        if pde & PTE_PS != 0 && paging.cr4 & CR4_PSE != 0 {
            return Ok((pde & 0xffc0_0000) | (gva & 0x3f_ffff));
        }
        let pte_addr = (pde & 0xffff_f000) + ((gva >> 12) & 0x3ff) * 4;
        let pte = read_entry(mem, pte_addr, false)?;
        check(pte)?;
        return Ok((pte & 0xffff_f000) | (gva & 0xfff));
    }
    let (mut table, top_level) = if paging.efer & EFER_LMA == 0 {
        // PAE: a 4-entry PDPT, then 2 levels.
        let pdpte_addr = (paging.cr3 & 0xffff_ffe0) + ((gva >> 30) & 3) * 8;
        let pdpte = read_entry(mem, pdpte_addr, true)?;
        if pdpte & PTE_P == 0 {
            return Err(WalkError::NotPresent(gva));
        }
        (pdpte & ADDR_MASK, 2u32)
    } else if paging.cr4 & CR4_LA57 != 0 {
        (paging.cr3 & ADDR_MASK, 5)
    } else {
        (paging.cr3 & ADDR_MASK, 4)
    };
    // Levels: 5 = PML5, 4 = PML4, 3 = PDPT, 2 = PD, 1 = PT.
    let mut level = top_level;
    loop {
        let shift = 12 + 9 * (level - 1);
        let entry_addr = table + ((gva >> shift) & 0x1ff) * 8;
        let entry = read_entry(mem, entry_addr, true)?;
        check(entry)?;
        let large = entry & PTE_PS != 0 && (level == 2 || (level == 3 && top_level >= 4));
        if level == 1 || large {
            let page_mask = (1u64 << shift) - 1;
            return Ok((entry & ADDR_MASK & !page_mask) | (gva & page_mask));
        }
        table = entry & ADDR_MASK;
        level -= 1;
    }
}

/// Read `buf.len()` bytes at guest-virtual `gva`, page by page.
pub fn read_virt<M: GuestMemoryBackend>(
    mem: &M,
    paging: &Paging,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), WalkError> {
    let mut done = 0usize;
    while done < buf.len() {
        let addr = gva.wrapping_add(done as u64);
        let chunk = (0x1000 - (addr & 0xfff) as usize).min(buf.len() - done);
        let gpa = translate(mem, paging, addr, false)?;
        mem.read_slice(&mut buf[done..done + chunk], GuestAddress(gpa))
            .map_err(|_| WalkError::NotRam(gpa))?;
        done += chunk;
    }
    Ok(())
}

/// Write `buf` at guest-virtual `gva`, page by page. All pages are translated before any byte
/// is written, so a fault leaves memory untouched.
pub fn write_virt<M: GuestMemoryBackend>(
    mem: &M,
    paging: &Paging,
    gva: u64,
    buf: &[u8],
) -> Result<(), WalkError> {
    let mut pieces = Vec::with_capacity(2);
    let mut done = 0usize;
    while done < buf.len() {
        let addr = gva.wrapping_add(done as u64);
        let chunk = (0x1000 - (addr & 0xfff) as usize).min(buf.len() - done);
        let gpa = translate(mem, paging, addr, true)?;
        if !mem.address_in_range(GuestAddress(gpa))
            || !mem.address_in_range(GuestAddress(gpa + chunk as u64 - 1))
        {
            return Err(WalkError::NotRam(gpa));
        }
        pieces.push((gpa, done, chunk));
        done += chunk;
    }
    for (gpa, off, len) in pieces {
        mem.write_slice(&buf[off..off + len], GuestAddress(gpa))
            .map_err(|_| WalkError::NotRam(gpa))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_device::GuestMemoryMmap;

    pub(crate) const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;

    /// 8 MiB of RAM with 4-level tables: 0xffff_8000_0000_0000 + 2 MiB → a 4 KiB page at
    /// 0x50_0000 (read-only at +0x1000 → 0x51_0000 is absent), and the first 2 MiB identity
    /// mapped by a large page.
    pub(crate) fn long_mode_memory() -> (GuestMemoryMmap, Paging) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let w = |addr: u64, val: u64| mem.write_obj(val, GuestAddress(addr)).unwrap();
        // Identity: PML4[0] → PDPT, PDPT[0] → PD, PD[0] = 2 MiB page at 0.
        w(PML4, PDPT | 3);
        w(PDPT, PD | 3);
        w(PD, PTE_PS | 3);
        // High half: PML4[256] → PDPT (shared), PD[1] → PT.
        w(PML4 + 256 * 8, PDPT | 3);
        w(PD + 8, PT | 3);
        w(PT, 0x50_0000 | 3);
        w(PT + 8, 0x50_1000 | 1); // read-only
        let paging = Paging {
            cr0: CR0_PG | CR0_WP | 1,
            cr3: PML4,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
        };
        (mem, paging)
    }

    #[test]
    fn test_translate_4level_large_page_identity() {
        let (mem, paging) = long_mode_memory();
        assert_eq!(translate(&mem, &paging, 0x1234, false), Ok(0x1234));
        assert_eq!(translate(&mem, &paging, 0x1f_ffff, true), Ok(0x1f_ffff));
    }

    #[test]
    fn test_translate_4level_small_page_in_high_half() {
        let (mem, paging) = long_mode_memory();
        let gva = 0xffff_8000_0020_0abc;
        assert_eq!(translate(&mem, &paging, gva, false), Ok(0x50_0abc));
    }

    #[test]
    fn test_translate_write_to_readonly_page_faults() {
        let (mem, paging) = long_mode_memory();
        let gva = 0xffff_8000_0020_1000;
        assert_eq!(translate(&mem, &paging, gva, false), Ok(0x50_1000));
        assert_eq!(
            translate(&mem, &paging, gva, true),
            Err(WalkError::ReadOnly(gva))
        );
    }

    #[test]
    fn test_translate_absent_mapping_is_not_present() {
        let (mem, paging) = long_mode_memory();
        let gva = 0x4000_0000;
        assert_eq!(
            translate(&mem, &paging, gva, false),
            Err(WalkError::NotPresent(gva))
        );
    }

    #[test]
    fn test_translate_table_outside_ram_is_error() {
        let (mem, mut paging) = long_mode_memory();
        paging.cr3 = 0x10_0000_0000;
        assert!(matches!(
            translate(&mem, &paging, 0, false),
            Err(WalkError::NotRam(_))
        ));
    }

    #[test]
    fn test_translate_paging_off_is_identity() {
        let (mem, _) = long_mode_memory();
        let paging = Paging::default();
        assert_eq!(translate(&mem, &paging, 0x1234_5678, true), Ok(0x1234_5678));
    }

    #[test]
    fn test_translate_32bit_paging_with_4m_page() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        // PDE[3] (0x00c0_0000..) = 4 MiB page at 0x0040_0000.
        mem.write_obj(0x0040_0000u32 | 0x83, GuestAddress(0x1000 + 3 * 4))
            .unwrap();
        let paging = Paging {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: CR4_PSE,
            efer: 0,
        };
        assert_eq!(
            translate(&mem, &paging, 0x00c1_2345, false),
            Ok(0x0041_2345)
        );
    }

    #[test]
    fn test_read_write_virt_across_page_boundary() {
        let (mem, paging) = long_mode_memory();
        let gva = 0x10_0ffa;
        write_virt(&mem, &paging, gva, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).unwrap();
        let mut out = [0u8; 10];
        read_virt(&mem, &paging, gva, &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn test_write_virt_partial_fault_writes_nothing() {
        let (mem, paging) = long_mode_memory();
        // Last 4 bytes of the writable page, then the read-only page.
        let gva = 0xffff_8000_0020_0ffc;
        let err = write_virt(&mem, &paging, gva, &[0xaa; 8]);
        assert!(matches!(err, Err(WalkError::ReadOnly(_))));
        let mut out = [0u8; 4];
        read_virt(&mem, &paging, gva, &mut out).unwrap();
        assert_eq!(out, [0; 4]);
    }
}
