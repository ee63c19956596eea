//! Guest RAM: anonymous (or, on restore, private file-backed), lazily-populated host
//! mappings registered with KVM, one slot per region.

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
    /// A snapshot's memory file cannot back guest RAM.
    #[error("Cannot map {size} MiB of guest memory from the snapshot: {reason}")]
    File {
        /// Requested size in MiB.
        size: u64,
        /// Why.
        reason: String,
    },
    /// KVM could not report a slot's dirty pages.
    #[error("Cannot read the dirty-page log of memory slot {slot}")]
    DirtyLog {
        /// Slot number.
        slot: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
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

/// Map guest RAM at `ranges` from `file` (a snapshot's memory file), region `i` at file
/// offset `file_offsets[i]`, copy-on-write (`MAP_PRIVATE`): nothing is read up front, so the
/// time to map does not grow with the guest's size; pages fault in from the page cache on
/// first touch, several VMs restored from one file share its unchanged pages, and guest
/// writes never reach the file.
pub fn create_guest_memory_from_file(
    ranges: &[(GuestAddress, usize)],
    file: &std::fs::File,
    file_offsets: &[u64],
) -> Result<GuestMemoryMmap, MemoryError> {
    use vm_memory::FileOffset;
    let size: u64 = ranges.iter().map(|r| r.1 as u64).sum();
    let bad = |reason: String| MemoryError::File {
        size: size >> 20,
        reason,
    };
    if ranges.len() != file_offsets.len() {
        return Err(bad(format!(
            "{} memory regions but {} file offsets",
            ranges.len(),
            file_offsets.len()
        )));
    }
    let file_len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut regions = Vec::with_capacity(ranges.len());
    for (&(addr, len), &offset) in ranges.iter().zip(file_offsets) {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > file_len) {
            return Err(bad(format!(
                "the memory file is {file_len} bytes, too short for {len} bytes at offset {offset}"
            )));
        }
        let dup = file.try_clone().map_err(|e| bad(e.to_string()))?;
        regions.push(
            file_region(addr, len, FileOffset::new(dup, offset), libc::MAP_PRIVATE).map_err(bad)?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| bad(e.to_string()))
}

/// Map guest RAM at `ranges` as shared memory files (one memfd per region, `MAP_SHARED`):
/// like [`create_guest_memory`], lazily populated, but another process on this host can map
/// the same memory (a same-host migration hands the files over instead of copying).
pub fn create_guest_memory_shared(
    ranges: &[(GuestAddress, usize)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let size: u64 = ranges.iter().map(|r| r.1 as u64).sum();
    let bad = |reason: String| MemoryError::File {
        size: size >> 20,
        reason,
    };
    let files = ranges
        .iter()
        .map(|&(_, len)| {
            // memfd_create by hand: vmm-sys-util has no wrapper for it, and it is one call.
            // SAFETY: the name is a valid NUL-terminated string; the returned descriptor is
            // checked and then owned by the File.
            let fd =
                unsafe { libc::memfd_create(c"ferrite-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(bad(format!(
                    "cannot create a memory file: {}",
                    std::io::Error::last_os_error()
                )));
            }
            // SAFETY: `fd` is a freshly created descriptor nothing else owns.
            let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            file.set_len(len as u64)
                .map_err(|e| bad(format!("cannot size the memory file: {e}")))?;
            Ok(file)
        })
        .collect::<Result<Vec<_>, _>>()?;
    create_guest_memory_from_files(ranges, files)
}

/// Map guest RAM at `ranges` from shared memory files (region `i` is `files[i]` from offset
/// 0, `MAP_SHARED`): the memory files of a same-host migration. Each file must be at least
/// its region's size.
pub fn create_guest_memory_from_files(
    ranges: &[(GuestAddress, usize)],
    files: Vec<std::fs::File>,
) -> Result<GuestMemoryMmap, MemoryError> {
    use vm_memory::FileOffset;
    let size: u64 = ranges.iter().map(|r| r.1 as u64).sum();
    let bad = |reason: String| MemoryError::File {
        size: size >> 20,
        reason,
    };
    if ranges.len() != files.len() {
        return Err(bad(format!(
            "{} memory regions but {} memory files",
            ranges.len(),
            files.len()
        )));
    }
    let mut regions = Vec::with_capacity(ranges.len());
    for (&(addr, len), file) in ranges.iter().zip(files) {
        let file_len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        if file_len < len as u64 {
            return Err(bad(format!(
                "a memory file is {file_len} bytes, too short for a {len}-byte region"
            )));
        }
        regions
            .push(file_region(addr, len, FileOffset::new(file, 0), libc::MAP_SHARED).map_err(bad)?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| bad(e.to_string()))
}

/// The shared memory files behind guest RAM (one per region), or None when it is not
/// shared ([`create_guest_memory_shared`]).
pub fn shared_memory_fds(mem: &GuestMemoryMmap) -> Option<Vec<std::os::fd::RawFd>> {
    use std::os::fd::AsRawFd;
    mem.iter()
        .map(|r| {
            let mapping = std::ops::Deref::deref(r);
            (mapping.flags() & libc::MAP_SHARED != 0)
                .then(|| mapping.file_offset().map(|f| f.file().as_raw_fd()))
                .flatten()
        })
        .collect()
}

/// One guest RAM region of `len` bytes at `addr`, mapped from `file` (`MAP_PRIVATE` or
/// `MAP_SHARED`, never reserving swap), with its dirty bitmap.
fn file_region(
    addr: GuestAddress,
    len: usize,
    file: vm_memory::FileOffset,
    share: libc::c_int,
) -> Result<vm_memory::mmap::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>, String> {
    use vm_memory::mmap::{GuestRegionMmap, MmapRegionBuilder};
    let mapping =
        MmapRegionBuilder::new_with_bitmap(len, vm_memory::bitmap::NewBitmap::with_len(len))
            .with_file_offset(file)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(share | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| e.to_string())?;
    advise(mapping.as_ptr(), len);
    GuestRegionMmap::new(mapping, addr)
        .ok_or_else(|| format!("region at {:#x} wraps the address space", addr.0))
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

/// Register every region of `mem` with KVM, slot `i` for region `i`, with KVM's dirty-page
/// log on when `track_dirty` (see [`dirty_pages`]).
pub fn register_guest_memory(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    track_dirty: bool,
) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: if track_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
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

/// The 4 KiB pages written since the last call, one bitmap per region (bit `i` of word `w`:
/// page `64 * w + i` of the region): what the vCPUs wrote (KVM's dirty log, which this call
/// also clears) merged with what devices wrote (the regions' own bitmaps, also cleared). Call
/// with the vCPUs and device workers paused.
pub fn dirty_pages(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, MemoryError> {
    let mut out = Vec::with_capacity(mem.num_regions());
    for (slot, region) in mem.iter().enumerate() {
        let mut bits = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|source| MemoryError::DirtyLog {
                slot: slot as u32,
                source,
            })?;
        // What devices wrote (vm-memory marks their writes in the region's bitmap).
        let devices = std::ops::Deref::deref(region).bitmap().get_and_reset();
        for (word, dev) in bits.iter_mut().zip(devices) {
            *word |= dev;
        }
        out.push(bits);
    }
    Ok(out)
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

    fn memory_file(bytes: &[u8]) -> std::fs::File {
        use std::io::Write;
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.write_all(bytes).unwrap();
        file
    }

    #[test]
    fn test_file_backed_memory_reads_the_file_and_keeps_writes_private() {
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;
        let mut content = vec![0u8; 2 * 4096];
        content[4096..4100].copy_from_slice(b"SNAP");
        let file = memory_file(&content);
        let ranges = [(GuestAddress(0), 4096), (GuestAddress(1 << 20), 4096)];

        let mem = create_guest_memory_from_file(&ranges, &file, &[0, 4096]).unwrap();
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(1 << 20)).unwrap();
        mem.write_slice(b"GUES", GuestAddress(1 << 20)).unwrap();
        let mut on_disk = [0u8; 4];
        file.read_exact_at(&mut on_disk, 4096).unwrap();

        assert_eq!(&got, b"SNAP");
        assert_eq!(
            &on_disk, b"SNAP",
            "guest writes must not reach the snapshot file"
        );
    }

    #[test]
    fn test_file_backed_memory_refuses_a_short_file() {
        let file = memory_file(&[0u8; 4096]);

        let err = create_guest_memory_from_file(&[(GuestAddress(0), 8192)], &file, &[0])
            .err()
            .unwrap();

        assert!(err.to_string().contains("too short"), "{err}");
    }
}
