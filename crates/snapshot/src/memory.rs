//! The memory file: guest RAM regions laid out one after another in a sparse file, holding
//! only the pages the guest touched.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{io_err, Result, SnapshotError};
use crate::pagemap::PageMap;
use crate::resident::resident_pages;

/// The page size of the memory file layout, dirty bitmaps and [`PageMap`]s (KVM's dirty log
/// granularity).
pub const PAGE_SIZE: u64 = 4096;

pub(crate) const PAGE: usize = PAGE_SIZE as usize;

/// Where one guest RAM region lives in the memory file. The caller stores the list as a state
/// section; restore maps each region back from `file_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// The region's guest physical address.
    pub guest_addr: u64,
    /// Its length in bytes, a multiple of [`PAGE_SIZE`].
    pub size: u64,
    /// Where its first byte is in the memory file, a multiple of [`PAGE_SIZE`].
    pub file_offset: u64,
}

impl MemoryRegion {
    /// Lays out `(guest_addr, size)` regions one after another from file offset 0, each at a
    /// page-aligned offset, which is the layout every snapshot uses.
    pub fn layout(regions: &[(u64, u64)]) -> Result<Vec<MemoryRegion>> {
        let mut offset = 0u64;
        let mut out = Vec::with_capacity(regions.len());
        for &(guest_addr, size) in regions {
            out.push(MemoryRegion {
                guest_addr,
                size,
                file_offset: offset,
            });
            offset = offset
                .checked_add(size.next_multiple_of(PAGE_SIZE))
                .ok_or_else(|| layout_err("regions exceed the largest file"))?;
        }
        memory_file_len(&out)?;
        Ok(out)
    }
}

/// What a memory write did, for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryWriteStats {
    /// Bytes written to the file.
    pub bytes_written: u64,
    /// Pages written to the file.
    pub pages_written: u64,
    /// Resident (or dirty) pages left as holes because they are all zero.
    pub pages_skipped_zero: u64,
}

pub(crate) fn layout_err(reason: impl Into<String>) -> SnapshotError {
    SnapshotError::InvalidLayout {
        reason: reason.into(),
    }
}

/// The memory file length `regions` need, after checking they are page-aligned and do not
/// overlap in the file.
pub fn memory_file_len(regions: &[MemoryRegion]) -> Result<u64> {
    let mut sorted: Vec<&MemoryRegion> = regions.iter().collect();
    sorted.sort_by_key(|r| r.file_offset);
    let mut end = 0u64;
    for r in sorted {
        if !r.file_offset.is_multiple_of(PAGE_SIZE) || !r.size.is_multiple_of(PAGE_SIZE) {
            return Err(layout_err(format!(
                "region at guest {:#x} is not 4 KiB aligned (offset {:#x}, size {:#x})",
                r.guest_addr, r.file_offset, r.size
            )));
        }
        if r.file_offset < end {
            return Err(layout_err(format!(
                "region at guest {:#x} overlaps another in the file",
                r.guest_addr
            )));
        }
        end = r
            .file_offset
            .checked_add(r.size)
            .ok_or_else(|| layout_err("regions exceed the largest file"))?;
    }
    Ok(end)
}

/// Checks the slices match their regions and returns the file length.
fn check_regions(regions: &[(MemoryRegion, &[u8])]) -> Result<u64> {
    for (r, mem) in regions {
        if mem.len() as u64 != r.size {
            return Err(layout_err(format!(
                "region at guest {:#x} is {:#x} bytes but its memory slice is {:#x}",
                r.guest_addr,
                r.size,
                mem.len()
            )));
        }
    }
    let plain: Vec<MemoryRegion> = regions.iter().map(|(r, _)| *r).collect();
    memory_file_len(&plain)
}

/// Creates `path` as a sparse file of `len` bytes.
fn create_sparse(path: &Path, len: u64) -> Result<File> {
    let file = File::create(path).map_err(io_err("create", path))?;
    file.set_len(len)
        .map_err(io_err("set the length of", path))?;
    Ok(file)
}

/// Saves guest RAM that lives in anonymous private mappings into a new sparse memory file at
/// `path`. Only touched pages (resident per `mincore(2)`, or swapped out) that are not all
/// zero are read and written, so the time taken grows with the memory the guest touched,
/// not its size.
///
/// Each slice is a region's host memory; the guest must be paused while this runs.
///
/// Only correct for anonymous memory: for a file-backed mapping (a VM restored with
/// [`crate::map_memory_private`]) `mincore` reports pages that are not in the page cache as
/// absent although the file holds them. Save such VMs with [`write_memory_dirty`] and
/// [`merge_diff`].
pub fn write_memory(path: &Path, regions: &[(MemoryRegion, &[u8])]) -> Result<MemoryWriteStats> {
    let len = check_regions(regions)?;
    let file = create_sparse(path, len)?;
    let mut out = PageWriter::new(&file, path);
    for (region, mem) in regions {
        let resident = resident_pages(mem, path)?;
        out.write_region(region, mem, |page| resident[page], None)?;
    }
    file.sync_all().map_err(io_err("sync", path))?;
    Ok(out.stats)
}

/// Saves only the pages marked in `dirty` (one bitmap per region, bit `i` of word `i / 64`,
/// least significant bit first, for the region's 4 KiB page `i`, as KVM's dirty log has it)
/// into a new sparse memory file with the same layout as a full one. Returns the pages the
/// file holds: store the [`PageMap`] in the state file and pass it to [`merge_diff`].
///
/// Dirty pages that are all zero are in the map but left as holes, which read back as zero.
pub fn write_memory_dirty(
    path: &Path,
    regions: &[(MemoryRegion, &[u8])],
    dirty: &[&[u64]],
) -> Result<(MemoryWriteStats, PageMap)> {
    let len = check_regions(regions)?;
    if dirty.len() != regions.len() {
        return Err(SnapshotError::DirtyBitmapCount {
            bitmaps: dirty.len(),
            regions: regions.len(),
        });
    }
    for (index, ((_, mem), bitmap)) in regions.iter().zip(dirty).enumerate() {
        let needed = (mem.len() / PAGE).div_ceil(64);
        if bitmap.len() < needed {
            return Err(SnapshotError::DirtyBitmapTooShort {
                index,
                words: bitmap.len(),
                needed,
            });
        }
    }
    let file = create_sparse(path, len)?;
    let mut map = PageMap::new();
    let mut out = PageWriter::new(&file, path);
    // The map must be built in file order.
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by_key(|&i| regions[i].0.file_offset);
    for i in order {
        let (region, mem) = &regions[i];
        let bitmap = dirty[i];
        let is_dirty = |page: usize| bitmap[page / 64] & (1 << (page % 64)) != 0;
        out.write_region(region, mem, is_dirty, Some(&mut map))?;
    }
    file.sync_all().map_err(io_err("sync", path))?;
    Ok((out.stats, map))
}

/// Writes chosen pages of regions, coalescing consecutive ones into one `pwrite`.
struct PageWriter<'a> {
    file: &'a File,
    path: &'a Path,
    stats: MemoryWriteStats,
}

impl<'a> PageWriter<'a> {
    fn new(file: &'a File, path: &'a Path) -> Self {
        Self {
            file,
            path,
            stats: MemoryWriteStats::default(),
        }
    }

    fn write_region(
        &mut self,
        region: &MemoryRegion,
        mem: &[u8],
        wanted: impl Fn(usize) -> bool,
        mut map: Option<&mut PageMap>,
    ) -> Result<()> {
        let first_file_page = region.file_offset / PAGE_SIZE;
        let mut run: Option<(usize, usize)> = None;
        for (page, bytes) in mem.chunks_exact(PAGE).enumerate() {
            if !wanted(page) {
                self.flush(region, mem, run.take())?;
                continue;
            }
            if let Some(map) = map.as_deref_mut() {
                map.push_page(first_file_page + page as u64);
            }
            if is_zero(bytes) {
                self.stats.pages_skipped_zero += 1;
                self.flush(region, mem, run.take())?;
                continue;
            }
            run = match run {
                Some((start, n)) => Some((start, n + 1)),
                None => Some((page, 1)),
            };
        }
        self.flush(region, mem, run)
    }

    fn flush(
        &mut self,
        region: &MemoryRegion,
        mem: &[u8],
        run: Option<(usize, usize)>,
    ) -> Result<()> {
        let Some((start, pages)) = run else {
            return Ok(());
        };
        let bytes = &mem[start * PAGE..(start + pages) * PAGE];
        let offset = region.file_offset + (start * PAGE) as u64;
        self.file
            .write_all_at(bytes, offset)
            .map_err(io_err("write", self.path))?;
        self.stats.pages_written += pages as u64;
        self.stats.bytes_written += bytes.len() as u64;
        Ok(())
    }
}

/// Whether a page is all zero, in a form the compiler vectorises.
fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(64)
        .all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Copies the pages of a diff memory file (`diff_map`, from [`write_memory_dirty`]) onto the
/// base memory file, so base plus diff becomes one full memory file again. Pages that are all
/// zero become holes in the base where the file system allows it.
pub fn merge_diff(base_memory: &Path, diff_memory: &Path, diff_map: &PageMap) -> Result<()> {
    diff_map.validate()?;
    let needed = diff_map.end_page() * PAGE_SIZE;
    let base = OpenOptions::new()
        .read(true)
        .write(true)
        .open(base_memory)
        .map_err(io_err("open", base_memory))?;
    let diff = File::open(diff_memory).map_err(io_err("open", diff_memory))?;
    for (file, path) in [(&base, base_memory), (&diff, diff_memory)] {
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        if len < needed {
            return Err(SnapshotError::MemoryFileTooShort {
                path: path.to_path_buf(),
                len,
                needed,
            });
        }
    }
    const CHUNK_PAGES: u64 = 256;
    let mut buf = vec![0u8; CHUNK_PAGES as usize * PAGE];
    for run in diff_map.runs() {
        let mut page = run.first;
        let end = run.first + run.count;
        while page < end {
            let n = (end - page).min(CHUNK_PAGES);
            let offset = page * PAGE_SIZE;
            let chunk = &mut buf[..n as usize * PAGE];
            diff.read_exact_at(chunk, offset)
                .map_err(io_err("read", diff_memory))?;
            if !(is_zero(chunk) && punch_hole(&base, offset, chunk.len() as u64)) {
                base.write_all_at(chunk, offset)
                    .map_err(io_err("write", base_memory))?;
            }
            page += n;
        }
    }
    base.sync_all().map_err(io_err("sync", base_memory))
}

/// Deallocates a byte range of `file` (it then reads as zero); false if the file system
/// cannot, and the caller writes zeros instead.
fn punch_hole(file: &File, offset: u64, len: u64) -> bool {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return false;
    };
    // SAFETY: fallocate on an owned, open descriptor touches only the file's blocks.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    rc == 0
}
