//! Giving guest pages back to the host.
//!
//! Guest RAM is an anonymous private mapping (`vmm::memory::create_guest_memory`), so
//! madvise(MADV_DONTNEED) frees the host pages at once (the VMM's RSS drops) and KVM's MMU
//! notifier drops the guest's mappings; a later guest access faults in a zero page. (A
//! memfd/MAP_SHARED backing would need fallocate(PUNCH_HOLE) instead: DONTNEED only unmaps
//! shared pages.)

use vm_device::GuestMemoryMmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::PAGE_SIZE;

/// Why a range was not released.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReleaseError {
    /// The range is not entirely inside one guest RAM region.
    #[error("Range {gpa:#x}+{len:#x} is not guest RAM")]
    NotRam {
        /// Guest physical address.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
    /// madvise failed.
    #[error("madvise failed on {gpa:#x}+{len:#x}: {errno}")]
    Madvise {
        /// Guest physical address.
        gpa: u64,
        /// Length in bytes.
        len: u64,
        /// errno.
        errno: i32,
    },
}

/// Give the whole 4 KiB pages inside `[gpa, gpa + len)` back to the host; returns the bytes
/// released (0 if the range holds no whole page). The range must lie inside one RAM region.
pub fn release(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<u64, ReleaseError> {
    let not_ram = ReleaseError::NotRam { gpa, len };
    let end = gpa.checked_add(len).ok_or_else(|| not_ram.clone())?;
    let start = gpa
        .checked_next_multiple_of(PAGE_SIZE)
        .ok_or_else(|| not_ram.clone())?;
    let end = end & !(PAGE_SIZE - 1);
    if end <= start {
        return Ok(0);
    }
    let bytes = end - start;
    let count = usize::try_from(bytes).map_err(|_| not_ram.clone())?;
    let slice = mem
        .get_slice(GuestAddress(start), count)
        .map_err(|_| not_ram)?;
    let guard = slice.ptr_guard_mut();
    let ptr = guard.as_ptr();
    // SAFETY: `ptr..ptr+count` lies inside one region's host mapping (get_slice checked the
    // bounds), which lives as long as `mem`. MADV_DONTNEED on a private anonymous mapping
    // only replaces the pages' contents with zeroes on the next access; the mapping stays
    // valid, so no Rust reference into guest memory is invalidated (guest memory is only
    // ever accessed through volatile slices).
    let rc = unsafe { libc::madvise(ptr.cast(), count, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(ReleaseError::Madvise {
            gpa: start,
            len: bytes,
            errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        });
    }
    Ok(bytes)
}

/// Coalesces page numbers into runs of contiguous pages: (first pfn, pages).
pub fn coalesce(pfns: &[u32]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &pfn in pfns {
        let pfn = u64::from(pfn);
        match runs.last_mut() {
            Some((first, n)) if *first + *n == pfn => *n += 1,
            _ => runs.push((pfn, 1)),
        }
    }
    runs
}
