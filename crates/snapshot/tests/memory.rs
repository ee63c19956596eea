//! The memory file: sparse, holding only touched non-zero pages, restorable copy-on-write,
//! and diff snapshots that merge back onto their base.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use snapshot::{
    map_memory_private, merge_diff, write_memory, write_memory_dirty, MemoryRegion, SnapshotError,
    PAGE_SIZE,
};
use vmm_sys_util::tempdir::TempDir;

const PAGE: usize = PAGE_SIZE as usize;
const MIB: usize = 1 << 20;

/// An anonymous private mapping standing in for guest RAM.
struct AnonMemory {
    ptr: *mut u8,
    len: usize,
}

impl AnonMemory {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks aliases nothing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        Self {
            ptr: ptr.cast(),
            len,
        }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped for self's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// How many of its pages are resident, asked without touching them.
    fn resident_pages(&self) -> usize {
        let mut vec = vec![0u8; self.len / PAGE];
        // SAFETY: the range is this mapping; vec has one byte per 4 KiB page (x86_64 hosts).
        let rc = unsafe { libc::mincore(self.ptr.cast(), self.len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore");
        vec.iter().filter(|v| *v & 1 != 0).count()
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in new.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Fills page `page` with a pattern that names it.
fn fill_page(mem: &mut [u8], page: usize, seed: u8) {
    for (i, b) in mem[page * PAGE..(page + 1) * PAGE].iter_mut().enumerate() {
        *b = (i as u8) ^ (page as u8) ^ seed | 1;
    }
}

fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    File::open(path)
        .expect("open")
        .read_exact_at(&mut buf, offset)
        .expect("read");
    buf
}

#[test]
fn test_write_memory_512m_guest_with_3m_touched_stores_3m() {
    // Arrange: 512 MiB of guest RAM in two regions, 3 MiB of it touched, spread out.
    let size = 512 * MIB;
    let mut mem = AnonMemory::new(size);
    let touched: Vec<usize> = (0..768).map(|i| i * 170 + 3).collect();
    for &page in &touched {
        fill_page(mem.as_mut_slice(), page, 0x5a);
    }
    let resident_before = mem.resident_pages();
    let regions = MemoryRegion::layout(&[(0, 256 * MIB as u64), (1 << 32, 256 * MIB as u64)])
        .expect("layout");
    let (low, high) = mem.as_slice().split_at(256 * MIB);
    let dir = TempDir::new().expect("tempdir");
    let path = dir.as_path().join("memory.bin");

    // Act
    let stats = write_memory(&path, &[(regions[0], low), (regions[1], high)]).expect("write");

    // Assert: only the touched pages were written, and nothing else was read.
    assert_eq!(stats.pages_written, touched.len() as u64);
    assert_eq!(stats.bytes_written, (touched.len() * PAGE) as u64);
    assert_eq!(
        mem.resident_pages(),
        resident_before,
        "untouched memory was read"
    );
    let meta = std::fs::metadata(&path).expect("stat");
    assert_eq!(meta.len(), size as u64);
    let allocated = meta.blocks() * 512;
    assert!(
        allocated >= (3 * MIB) as u64 && allocated < (6 * MIB) as u64,
        "allocated {allocated} bytes for 3 MiB of touched memory"
    );

    // Assert: content round-trips through a private mapping.
    let restored = map_memory_private(&path, 0, size as u64).expect("map");
    assert!(
        restored.as_slice() == mem.as_slice(),
        "restored memory differs"
    );
}

#[test]
fn test_write_memory_skips_resident_zero_pages() {
    // Arrange
    let mut mem = AnonMemory::new(64 * PAGE);
    fill_page(mem.as_mut_slice(), 1, 7);
    mem.as_mut_slice()[5 * PAGE] = 0; // resident, all zero
    mem.as_mut_slice()[6 * PAGE] = 0;
    let _ = mem.as_slice()[9 * PAGE]; // read fault: the shared zero page
    let region = MemoryRegion::layout(&[(0, 64 * PAGE_SIZE)]).expect("layout")[0];
    let dir = TempDir::new().expect("tempdir");
    let path = dir.as_path().join("memory.bin");

    // Act
    let stats = write_memory(&path, &[(region, mem.as_slice())]).expect("write");

    // Assert
    assert_eq!(stats.pages_written, 1);
    assert!(stats.pages_skipped_zero >= 2, "{stats:?}");
    assert_eq!(
        read_file_at(&path, PAGE_SIZE, PAGE),
        mem.as_slice()[PAGE..2 * PAGE]
    );
}

#[test]
fn test_write_memory_coalesces_contiguous_pages() {
    // Arrange
    let mut mem = AnonMemory::new(16 * PAGE);
    for page in 2..10 {
        fill_page(mem.as_mut_slice(), page, 1);
    }
    let region = MemoryRegion::layout(&[(0, 16 * PAGE_SIZE)]).expect("layout")[0];
    let dir = TempDir::new().expect("tempdir");
    let path = dir.as_path().join("memory.bin");

    // Act
    let stats = write_memory(&path, &[(region, mem.as_slice())]).expect("write");

    // Assert
    assert_eq!(stats.pages_written, 8);
    assert_eq!(read_file_at(&path, 0, 16 * PAGE), mem.as_slice());
}

#[test]
fn test_writes_to_private_mapping_do_not_reach_the_file() {
    // Arrange
    let mut mem = AnonMemory::new(8 * PAGE);
    fill_page(mem.as_mut_slice(), 3, 9);
    let region = MemoryRegion::layout(&[(0, 8 * PAGE_SIZE)]).expect("layout")[0];
    let dir = TempDir::new().expect("tempdir");
    let path = dir.as_path().join("memory.bin");
    write_memory(&path, &[(region, mem.as_slice())]).expect("write");
    let before = std::fs::read(&path).expect("read");
    let mut first = map_memory_private(&path, 0, 8 * PAGE_SIZE).expect("map");
    let second = map_memory_private(&path, 0, 8 * PAGE_SIZE).expect("map again");

    // Act
    first.as_mut_slice()[3 * PAGE] = 0xee;
    first.as_mut_slice()[7 * PAGE] = 0xee;

    // Assert
    assert_eq!(std::fs::read(&path).expect("read"), before);
    assert_eq!(
        second.as_slice(),
        &before[..],
        "a clone saw another clone's write"
    );
}

#[test]
fn test_map_memory_private_at_offset_maps_that_region() {
    // Arrange
    let mut mem = AnonMemory::new(8 * PAGE);
    fill_page(mem.as_mut_slice(), 6, 3);
    let regions =
        MemoryRegion::layout(&[(0, 4 * PAGE_SIZE), (1 << 32, 4 * PAGE_SIZE)]).expect("layout");
    let (low, high) = mem.as_slice().split_at(4 * PAGE);
    let dir = TempDir::new().expect("tempdir");
    let path = dir.as_path().join("memory.bin");
    write_memory(&path, &[(regions[0], low), (regions[1], high)]).expect("write");

    // Act
    let mapped = map_memory_private(&path, regions[1].file_offset, regions[1].size).expect("map");

    // Assert
    assert_eq!(mapped.as_slice(), high);
}

#[test]
fn test_map_memory_private_too_short_file_is_refused() {
    // Arrange
    let dir = TempDir::new().expect("tempdir");
    let path = dir.as_path().join("memory.bin");
    File::create(&path)
        .and_then(|f| f.set_len(4 * PAGE_SIZE))
        .expect("create");

    // Act
    let err = map_memory_private(&path, PAGE_SIZE, 4 * PAGE_SIZE).expect_err("too short");

    // Assert
    assert!(
        matches!(err, SnapshotError::MemoryFileTooShort { len, needed, .. }
            if len == 4 * PAGE_SIZE && needed == 5 * PAGE_SIZE),
        "{err}"
    );
}

#[test]
fn test_map_memory_private_unaligned_offset_is_refused() {
    // Arrange
    let dir = TempDir::new().expect("tempdir");
    let path = dir.as_path().join("memory.bin");
    File::create(&path)
        .and_then(|f| f.set_len(4 * PAGE_SIZE))
        .expect("create");

    // Act
    let result = map_memory_private(&path, 100, PAGE_SIZE);

    // Assert
    assert!(matches!(result, Err(SnapshotError::InvalidLayout { .. })));
}

#[test]
fn test_write_memory_slice_of_wrong_length_is_refused() {
    // Arrange
    let mem = AnonMemory::new(4 * PAGE);
    let region = MemoryRegion::layout(&[(0, 8 * PAGE_SIZE)]).expect("layout")[0];
    let dir = TempDir::new().expect("tempdir");

    // Act
    let result = write_memory(&dir.as_path().join("m"), &[(region, mem.as_slice())]);

    // Assert
    assert!(matches!(result, Err(SnapshotError::InvalidLayout { .. })));
}

#[test]
fn test_diff_merged_onto_base_reproduces_final_memory() {
    // Arrange: a base snapshot, then the guest changes some pages, zeroes one and touches
    // a new one.
    let pages = 64;
    let mut mem = AnonMemory::new(pages * PAGE);
    for page in [0, 1, 2, 10, 11, 40] {
        fill_page(mem.as_mut_slice(), page, 0x11);
    }
    let regions =
        MemoryRegion::layout(&[(0, 32 * PAGE_SIZE), (1 << 32, 32 * PAGE_SIZE)]).expect("layout");
    let dir = TempDir::new().expect("tempdir");
    let base = dir.as_path().join("base.bin");
    let diff = dir.as_path().join("diff.bin");
    {
        let (low, high) = mem.as_slice().split_at(32 * PAGE);
        write_memory(&base, &[(regions[0], low), (regions[1], high)]).expect("base");
    }
    let mut dirty_low = [0u64; 1];
    let mut dirty_high = [0u64; 1];
    for page in [1, 2, 20] {
        fill_page(mem.as_mut_slice(), page, 0x22);
        dirty_low[0] |= 1 << page;
    }
    mem.as_mut_slice()[10 * PAGE..11 * PAGE].fill(0);
    dirty_low[0] |= 1 << 10;
    fill_page(mem.as_mut_slice(), 45, 0x33);
    dirty_high[0] |= 1 << (45 - 32);
    let (low, high) = mem.as_slice().split_at(32 * PAGE);

    // Act
    let (stats, map) = write_memory_dirty(
        &diff,
        &[(regions[0], low), (regions[1], high)],
        &[&dirty_low, &dirty_high],
    )
    .expect("diff");
    merge_diff(&base, &diff, &map).expect("merge");

    // Assert
    assert_eq!(stats.pages_written, 4);
    assert_eq!(stats.pages_skipped_zero, 1);
    assert_eq!(map.page_count(), 5);
    assert!(map.contains(10) && map.contains(45) && !map.contains(0));
    assert_eq!(std::fs::read(&base).expect("read"), mem.as_slice());
}

#[test]
fn test_merge_diff_into_too_short_base_is_refused() {
    // Arrange
    let mut mem = AnonMemory::new(8 * PAGE);
    fill_page(mem.as_mut_slice(), 7, 1);
    let region = MemoryRegion::layout(&[(0, 8 * PAGE_SIZE)]).expect("layout")[0];
    let dir = TempDir::new().expect("tempdir");
    let base = dir.as_path().join("base.bin");
    let diff = dir.as_path().join("diff.bin");
    File::create(&base)
        .and_then(|f| f.set_len(4 * PAGE_SIZE))
        .expect("short base");
    let (_, map) =
        write_memory_dirty(&diff, &[(region, mem.as_slice())], &[&[1 << 7]]).expect("diff");

    // Act
    let result = merge_diff(&base, &diff, &map);

    // Assert
    assert!(matches!(
        result,
        Err(SnapshotError::MemoryFileTooShort { .. })
    ));
}

#[test]
fn test_write_memory_dirty_short_bitmap_is_refused() {
    // Arrange
    let mem = AnonMemory::new(128 * PAGE);
    let region = MemoryRegion::layout(&[(0, 128 * PAGE_SIZE)]).expect("layout")[0];
    let dir = TempDir::new().expect("tempdir");

    // Act
    let result = write_memory_dirty(
        &dir.as_path().join("d"),
        &[(region, mem.as_slice())],
        &[&[0]],
    );

    // Assert
    assert!(matches!(
        result,
        Err(SnapshotError::DirtyBitmapTooShort {
            words: 1,
            needed: 2,
            ..
        })
    ));
}
