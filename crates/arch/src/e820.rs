//! The guest memory map: which guest-physical ranges are RAM and what the guest is told.
//!
//! What Linux expects: an e820 table (in `boot_params` or the PVH `hvm_start_info` memory map)
//! that lists usable RAM (type 1) and reserved ranges (type 2), sorted by address and not
//! overlapping. Low memory must stop at the EBDA (0x9fc00) and 0x9fc00..1 MiB must be reserved
//! (Linux keeps the BIOS area out of its allocator and scans it for the ACPI RSDP). The PCIe
//! ECAM window given in the MCFG table must be reserved in e820 (or in a PNP0C02 `_CRS`), or
//! Linux refuses to use MMCONFIG. RAM never overlaps the 32-bit MMIO hole: what does not fit
//! below [`MMIO_HOLE_START`] is placed from [`RAM_64BIT_START`] on, so a guest given N bytes
//! of RAM sees exactly N bytes of usable-or-reserved RAM.

use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;

use crate::layout::{
    EBDA_START, HIMEM_START, MIN_MEMORY, MMIO_HOLE_START, PCI_ECAM_SIZE, PCI_ECAM_START,
    PCI_MMIO64_ALIGN, PCI_MMIO64_SIZE, RAM_64BIT_START,
};

/// Guest page size; RAM sizes must be a multiple of it.
pub const PAGE_SIZE: u64 = 4096;

/// Errors from building the memory map.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The requested RAM size is below [`MIN_MEMORY`].
    #[error("Guest memory {size:#x} is below the minimum of {min:#x} bytes")]
    TooSmall {
        /// Requested size.
        size: u64,
        /// Minimum accepted size.
        min: u64,
    },
    /// The requested RAM size is not a multiple of the page size.
    #[error("Guest memory {0:#x} is not a multiple of 4 KiB")]
    NotPageAligned(u64),
    /// RAM plus the 64-bit PCI window does not fit the physical address width.
    #[error(
        "Guest memory {size:#x} does not fit in {phys_bits} physical address bits \
         (top of guest address space would be {top:#x})"
    )]
    TooLarge {
        /// Requested size.
        size: u64,
        /// Physical address bits of the host.
        phys_bits: u8,
        /// End of the guest physical address space that would be needed.
        top: u64,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Type of an e820 range, as defined by the ACPI/BIOS e820 interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: the guest must not use it as RAM.
    Reserved = 2,
    /// ACPI reclaimable memory.
    Acpi = 3,
}

/// One entry of the guest memory map given to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct E820Entry {
    /// First guest-physical address of the range.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Type,
}

impl E820Entry {
    /// Numeric e820 type as written into `boot_params` / `hvm_memmap_table_entry`.
    pub fn type_code(&self) -> u32 {
        self.kind as u32
    }
}

/// A validated guest RAM size and everything placed around it.
///
/// Built once per VM with [`MemoryLayout::new`]; serialisable so a snapshot records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    ram_size: u64,
}

impl MemoryLayout {
    /// Validates `ram_size` (bytes) and builds the layout.
    ///
    /// `phys_bits` is the host's physical address width (see [`host_phys_bits`]); the whole
    /// guest physical address space including the 64-bit PCI window must fit below
    /// `1 << phys_bits`. Pass `None` to skip that check (unit tests).
    pub fn new(ram_size: u64, phys_bits: Option<u8>) -> Result<Self> {
        if ram_size < MIN_MEMORY {
            return Err(Error::TooSmall {
                size: ram_size,
                min: MIN_MEMORY,
            });
        }
        if ram_size & (PAGE_SIZE - 1) != 0 {
            return Err(Error::NotPageAligned(ram_size));
        }
        let too_large = |top: u64| Error::TooLarge {
            size: ram_size,
            phys_bits: phys_bits.unwrap_or(64),
            top,
        };
        // Compute the top of the address space with checked arithmetic so absurd sizes give
        // an error instead of wrapping.
        let high = ram_size.saturating_sub(MMIO_HOLE_START);
        let ram_top = RAM_64BIT_START
            .checked_add(high)
            .ok_or_else(|| too_large(u64::MAX))?;
        let window = align_up(ram_top, PCI_MMIO64_ALIGN).ok_or_else(|| too_large(u64::MAX))?;
        let top = window
            .checked_add(PCI_MMIO64_SIZE)
            .ok_or_else(|| too_large(u64::MAX))?;
        if let Some(bits) = phys_bits {
            if bits < 64 && top > (1u64 << bits) {
                return Err(too_large(top));
            }
        }
        Ok(MemoryLayout { ram_size })
    }

    /// Total guest RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// End (exclusive) of RAM below the MMIO hole.
    pub fn low_ram_end(&self) -> u64 {
        self.ram_size.min(MMIO_HOLE_START)
    }

    /// Bytes of RAM placed above 4 GiB (0 for small guests).
    pub fn high_ram_size(&self) -> u64 {
        self.ram_size.saturating_sub(MMIO_HOLE_START)
    }

    /// End (exclusive) of the highest RAM byte.
    pub fn ram_end(&self) -> u64 {
        match self.high_ram_size() {
            0 => self.low_ram_end(),
            high => RAM_64BIT_START + high,
        }
    }

    /// Guest-RAM regions for `GuestMemoryMmap::from_ranges`: one below the hole and, for
    /// guests larger than [`MMIO_HOLE_START`], one from [`RAM_64BIT_START`].
    pub fn ram_ranges(&self) -> Vec<(GuestAddress, usize)> {
        let mut ranges = vec![(GuestAddress(0), self.low_ram_end() as usize)];
        let high = self.high_ram_size();
        if high > 0 {
            ranges.push((GuestAddress(RAM_64BIT_START), high as usize));
        }
        ranges
    }

    /// The e820 map given to the guest, sorted by address.
    pub fn e820_entries(&self) -> Vec<E820Entry> {
        let mut entries = vec![
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Type::Ram,
            },
            E820Entry {
                addr: EBDA_START,
                size: HIMEM_START - EBDA_START,
                kind: E820Type::Reserved,
            },
            E820Entry {
                addr: HIMEM_START,
                size: self.low_ram_end() - HIMEM_START,
                kind: E820Type::Ram,
            },
            E820Entry {
                addr: PCI_ECAM_START,
                size: PCI_ECAM_SIZE,
                kind: E820Type::Reserved,
            },
        ];
        let high = self.high_ram_size();
        if high > 0 {
            entries.push(E820Entry {
                addr: RAM_64BIT_START,
                size: high,
                kind: E820Type::Ram,
            });
        }
        entries
    }

    /// Start of the 64-bit PCI MMIO window: above 4 GiB, after RAM, [`PCI_MMIO64_ALIGN`]
    /// aligned.
    pub fn pci_mmio64_start(&self) -> u64 {
        // Cannot overflow: `new` checked that the window end fits in a u64.
        let top = self.ram_end().max(RAM_64BIT_START);
        align_up(top, PCI_MMIO64_ALIGN).unwrap_or(u64::MAX)
    }

    /// Size of the 64-bit PCI MMIO window.
    pub fn pci_mmio64_size(&self) -> u64 {
        PCI_MMIO64_SIZE
    }
}

/// Rounds `value` up to a multiple of `align` (a power of two); `None` on overflow.
pub(crate) fn align_up(value: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// Physical address width of the host CPU (CPUID 0x80000008 EAX bits 7:0), used to bound the
/// guest's address space. Falls back to 36 bits if the leaf is missing.
// `__cpuid` became a safe function in Rust 1.94; keep `unsafe` for older toolchains.
#[allow(unused_unsafe)]
pub fn host_phys_bits() -> u8 {
    // SAFETY: CPUID is available on every x86_64 CPU and has no side effects.
    let max_ext = unsafe { std::arch::x86_64::__cpuid(0x8000_0000) }.eax;
    if max_ext < 0x8000_0008 {
        return 36;
    }
    // SAFETY: as above; the leaf exists (checked against the maximum extended leaf).
    let leaf = unsafe { std::arch::x86_64::__cpuid(0x8000_0008) };
    (leaf.eax & 0xff) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn ram_total(entries: &[E820Entry]) -> u64 {
        entries
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn test_layout_below_minimum_is_rejected() {
        let err = MemoryLayout::new(64 << 20, None).unwrap_err();

        assert_eq!(
            err,
            Error::TooSmall {
                size: 64 << 20,
                min: MIN_MEMORY
            }
        );
    }

    #[test]
    fn test_layout_unaligned_size_is_rejected() {
        let err = MemoryLayout::new(MIN_MEMORY + 1, None).unwrap_err();

        assert_eq!(err, Error::NotPageAligned(MIN_MEMORY + 1));
    }

    #[test]
    fn test_layout_too_large_for_phys_bits_is_rejected() {
        let err = MemoryLayout::new(64 * GIB, Some(36)).unwrap_err();

        assert!(matches!(err, Error::TooLarge { phys_bits: 36, .. }));
    }

    #[test]
    fn test_layout_huge_size_does_not_overflow() {
        let size = !(PAGE_SIZE - 1);

        let err = MemoryLayout::new(size, None).unwrap_err();

        assert!(matches!(err, Error::TooLarge { .. }));
    }

    #[test]
    fn test_ram_ranges_small_guest_single_region() {
        let layout = MemoryLayout::new(512 << 20, None).unwrap();

        let ranges = layout.ram_ranges();

        assert_eq!(ranges, vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(layout.ram_end(), 512 << 20);
    }

    #[test]
    fn test_ram_ranges_six_gib_split_around_hole() {
        let layout = MemoryLayout::new(6 * GIB, None).unwrap();

        let ranges = layout.ram_ranges();

        assert_eq!(
            ranges,
            vec![
                (GuestAddress(0), MMIO_HOLE_START as usize),
                (
                    GuestAddress(RAM_64BIT_START),
                    (6 * GIB - MMIO_HOLE_START) as usize
                ),
            ]
        );
        let total: usize = ranges.iter().map(|r| r.1).sum();
        assert_eq!(total as u64, 6 * GIB);
    }

    #[test]
    fn test_e820_six_gib_counts_all_ram_except_bios_area() {
        let layout = MemoryLayout::new(6 * GIB, None).unwrap();

        let entries = layout.e820_entries();

        // The BIOS area (EBDA..1 MiB) is backed by RAM but reserved.
        assert_eq!(ram_total(&entries), 6 * GIB - (HIMEM_START - EBDA_START));
        assert!(entries.iter().any(|e| e.addr == EBDA_START
            && e.size == HIMEM_START - EBDA_START
            && e.kind == E820Type::Reserved));
        assert!(entries.iter().any(|e| e.addr == PCI_ECAM_START
            && e.size == PCI_ECAM_SIZE
            && e.kind == E820Type::Reserved));
    }

    #[test]
    fn test_e820_entries_sorted_and_disjoint() {
        for size in [MIN_MEMORY, 3 * GIB, 3 * GIB + PAGE_SIZE, 6 * GIB] {
            let entries = MemoryLayout::new(size, None).unwrap().e820_entries();

            for pair in entries.windows(2) {
                assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{entries:?}");
            }
        }
    }

    #[test]
    fn test_e820_low_ram_stops_at_ebda() {
        let entries = MemoryLayout::new(MIN_MEMORY, None).unwrap().e820_entries();

        assert_eq!(
            entries[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Type::Ram
            }
        );
        assert_eq!(entries[0].type_code(), 1);
    }

    #[test]
    fn test_pci_mmio64_start_small_guest_is_4gib() {
        let layout = MemoryLayout::new(MIN_MEMORY, None).unwrap();

        assert_eq!(layout.pci_mmio64_start(), RAM_64BIT_START);
    }

    #[test]
    fn test_pci_mmio64_start_after_high_ram_aligned() {
        let layout = MemoryLayout::new(6 * GIB + PAGE_SIZE, None).unwrap();

        let start = layout.pci_mmio64_start();

        assert!(start >= layout.ram_end());
        assert_eq!(start % PCI_MMIO64_ALIGN, 0);
        assert_eq!(start, 8 * GIB);
    }

    #[test]
    fn test_host_phys_bits_is_plausible() {
        let bits = host_phys_bits();

        assert!((32..=64).contains(&bits));
    }
}
