//! Guest RAM: anonymous, lazily-populated host mappings registered with KVM, one slot per
//! region.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_device::GuestMemoryMmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Errors setting up guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host could not reserve the address space.
    #[error("Cannot map {size} MiB of guest memory")]
    Map {
        /// Requested size in MiB.
        size: u64,
        /// What the mapping layer said.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory slot {slot}")]
    Register {
        /// Slot number.
        slot: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
}

/// Map guest RAM at `ranges` (from `arch::e820::MemoryLayout::ram_ranges`). Nothing is
/// touched: pages are allocated by the host on first use, so a 16 GiB guest starts in a few
/// MiB of host RAM.
pub fn create_guest_memory(
    ranges: &[(GuestAddress, usize)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let size: u64 = ranges.iter().map(|r| r.1 as u64).sum();
    let mem = GuestMemoryMmap::from_ranges(ranges).map_err(|source| MemoryError::Map {
        size: size >> 20,
        source,
    })?;
    for region in mem.iter() {
        advise(region.as_ptr(), region.len() as usize);
    }
    Ok(mem)
}

fn advise(addr: *mut u8, len: usize) {
    // SAFETY: `addr..addr+len` is a mapping owned by the guest memory object; madvise only
    // changes the core-dump policy and cannot invalidate it. A failure only means guest RAM
    // would appear in a core dump, so it is ignored. (MADV_MERGEABLE is deliberately not
    // used: KSM scanning costs host CPU and leaks timing between guests.)
    unsafe {
        libc::madvise(addr.cast(), len, libc::MADV_DONTDUMP);
    }
}

/// Register every region of `mem` with KVM, slot `i` for region `i`.
pub fn register_guest_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region's host mapping lives as long as `mem`, and the VM (which owns a
        // clone of `mem`) is torn down before `mem` is dropped.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_create_guest_memory_16g_is_lazy() {
        let layout = arch::e820::MemoryLayout::new(16 << 30, None).unwrap();
        let mem = create_guest_memory(&layout.ram_ranges()).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(mem.iter().map(|r| r.len()).sum::<u64>(), 16 << 30);
    }
}
