//! Restoring guest RAM: copy-on-write mappings of a memory file.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;

use crate::error::{io_err, Result, SnapshotError};
use crate::memory::{layout_err, PAGE_SIZE};
use crate::resident::host_page_size;

/// A copy-on-write mapping of part of a memory file, unmapped on drop. Restore maps guest RAM
/// this way: no data is copied up front, pages fault in from the page cache as the guest
/// touches them, and several clones of one snapshot share those cached pages.
#[derive(Debug)]
pub struct PrivateMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; moving it to another thread moves
// that ownership, and unmapping from any thread is fine.
unsafe impl Send for PrivateMapping {}
// SAFETY: shared references only hand out `&[u8]`; writing needs `&mut self` or going
// through the raw pointer, whose callers take on the synchronisation.
unsafe impl Sync for PrivateMapping {}

impl PrivateMapping {
    /// The mapping's first byte, for registering it as guest memory with KVM.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never, as empty mappings are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped readable for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Its bytes, writable; writes stay private to this mapping.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is mapped writable for as long as self lives, and `&mut self`
        // makes this the only reference made through this value.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PrivateMapping {
    fn drop(&mut self) {
        // SAFETY: ptr and len are exactly what mmap returned and were given; nothing borrowed
        // from self outlives it.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Maps `size` bytes of the memory file at `path` from `offset` (a multiple of
/// [`PAGE_SIZE`]), readable and writable, `MAP_PRIVATE | MAP_NORESERVE`: writes are
/// copy-on-write and never reach the file, and restore time does not grow with guest size.
pub fn map_memory_private(path: &Path, offset: u64, size: u64) -> Result<PrivateMapping> {
    if !offset.is_multiple_of(host_page_size() as u64)
        || !offset.is_multiple_of(PAGE_SIZE)
        || size == 0
    {
        return Err(layout_err(format!(
            "cannot map {size:#x} bytes at offset {offset:#x}: use a non-empty range at a 4 KiB aligned offset"
        )));
    }
    let file = File::open(path).map_err(io_err("open", path))?;
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    let needed = offset
        .checked_add(size)
        .ok_or_else(|| layout_err("mapping exceeds the largest file"))?;
    if len < needed {
        return Err(SnapshotError::MemoryFileTooShort {
            path: path.to_path_buf(),
            len,
            needed,
        });
    }
    let (Ok(map_len), Ok(map_offset)) = (usize::try_from(size), libc::off_t::try_from(offset))
    else {
        return Err(layout_err("mapping exceeds the address space"));
    };
    // SAFETY: a fresh mapping at an address the kernel picks, so it aliases nothing; the
    // descriptor is valid for the call and the mapping keeps its own reference to the file.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            map_offset,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io_err("map", path)(io::Error::last_os_error()));
    }
    let ptr = NonNull::new(ptr.cast::<u8>())
        .ok_or_else(|| io_err("map", path)(io::Error::other("mmap returned null")))?;
    Ok(PrivateMapping { ptr, len: map_len })
}
