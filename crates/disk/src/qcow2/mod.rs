//! qcow2 (version 3, and version 2 images) disk images: read and write, allocation on write,
//! backing files, zero clusters, discard and compressed (deflate) clusters.
//!
//! No maintained crate reads and writes qcow2 (Cloud Hypervisor's `block` crate is not
//! published), so this is our own implementation of QEMU's `docs/interop/qcow2.txt`.
//!
//! Metadata rules that keep images consistent (so `qemu-img check` finds no errors or leaks):
//! - every metadata change is written through at once (no dirty caches to lose);
//! - order of writes: refcount of a new cluster, then its contents, then the L2 entry, then
//!   (for a new L2 table) the L1 entry; a freed cluster's pointer is cleared before its
//!   refcount drops, so a crash can leak a cluster but never leave a dangling pointer;
//! - the dirty bit (lazy refcounts) is never set; images with it set are refused;
//! - images with internal snapshots open read-only (writing would need copy-on-write of
//!   shared clusters).
//!
//! Locking: a `Mutex` guards metadata; reads and writes of already-allocated data clusters run
//! outside it.

mod compress;
mod create;
mod header;
mod io;
mod lru;
mod refcount;
#[cfg(test)]
mod tests;

pub use create::{create_qcow2, CreateOptions};
pub use header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, QCOW_MAGIC};

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{DiskBackend, GuestSlice, SECTOR_SIZE};
use crate::lock::{lock_file, LockMode};
use crate::{DiskError, Result};

use io::{Dst, Src};
use lru::Lru;
use refcount::Refcounts;

/// L1 entry bits 9-55: offset of the L2 table.
const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry bits 9-55: offset of a standard data cluster.
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 bit 63: refcount is exactly 1 (the cluster may be written in place).
const OFLAG_COPIED: u64 = 1 << 63;
/// L2 bit 62: compressed cluster.
const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 bit 0 (v3): the cluster reads as zeroes.
const OFLAG_ZERO: u64 = 1;
/// L2 tables kept in memory (each one cluster).
const L2_CACHE: usize = 16;

/// Where the bytes of one guest cluster are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Not allocated here: read from the backing file (or zeroes).
    Unallocated,
    /// Reads as zeroes; `Some` if a host cluster stays allocated for it.
    Zero(Option<u64>),
    /// A standard cluster at this file offset.
    Data(u64),
    /// A compressed cluster: file offset and the (upper bound of the) compressed length.
    Compressed { offset: u64, len: u64 },
}

/// Metadata under the lock.
#[derive(Debug)]
struct Meta {
    l1: Vec<u64>,
    l2_cache: Lru<Vec<u64>>,
    refcounts: Refcounts,
    /// The last decompressed cluster (its L2 entry and contents).
    decompressed: Option<(u64, Vec<u8>)>,
}

/// An open qcow2 image, locked for the lifetime of this value.
pub struct Qcow2Disk {
    file: File,
    path: PathBuf,
    header: Header,
    read_only: bool,
    size: u64,
    serial: String,
    backing: Option<Arc<dyn DiskBackend>>,
    /// File length (a lower bound that covers every cluster a table points to): saves an
    /// fstat per lookup. Raised after every cluster this process appends.
    file_len: AtomicU64,
    meta: Mutex<Meta>,
    /// Cleared once the kernel refuses `RWF_NOWAIT` reads.
    nowait: AtomicBool,
    /// Cleared once the kernel refuses `RWF_NOWAIT` writes (inline writes are then plain
    /// buffered writes).
    nowait_write: AtomicBool,
}

impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .field("has_backing", &self.backing.is_some())
            .finish()
    }
}

/// Read the header cluster of `file` and parse it.
pub fn read_header(file: &File, path: &Path) -> Result<Header> {
    read_header_inner(file, path, false)
}

/// Read the header for `disk info`: the dirty and corrupt bits are reported, not refused.
pub fn read_header_for_info(file: &File, path: &Path) -> Result<Header> {
    read_header_inner(file, path, true)
}

fn read_header_inner(file: &File, path: &Path, lenient: bool) -> Result<Header> {
    let file_len = file
        .metadata()
        .map_err(|source| DiskError::Size {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let want = file_len.min(1 << header::MAX_CLUSTER_BITS) as usize;
    let mut buf = vec![0u8; want];
    file.read_exact_at(&mut buf, 0)?;
    if lenient {
        Header::parse_for_info(&buf, file_len, path)
    } else {
        Header::parse(&buf, file_len, path)
    }
}

impl Qcow2Disk {
    /// Open a qcow2 image. `backing` is the already opened backing image (the caller resolves
    /// and opens the chain, see [`crate::open_image`]); `None` when the header names none.
    pub fn open(
        path: impl AsRef<Path>,
        read_only: bool,
        backing: Option<Arc<dyn DiskBackend>>,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|source| DiskError::Open {
                path: path.clone(),
                source,
            })?;
        let mode = if read_only {
            LockMode::Read
        } else {
            LockMode::Write
        };
        lock_file(&file, &path, mode)?;
        let header = read_header(&file, &path)?;
        Self::from_parts(file, path, header, read_only, backing)
    }

    fn from_parts(
        file: File,
        path: PathBuf,
        header: Header,
        read_only: bool,
        backing: Option<Arc<dyn DiskBackend>>,
    ) -> Result<Self> {
        if !read_only && header.nb_snapshots != 0 {
            return Err(DiskError::UnsupportedFeature {
                path,
                feature: "writing to an image with internal snapshots (open it read-only)".into(),
            });
        }
        let meta_fs = file.metadata().map_err(|source| DiskError::Size {
            path: path.clone(),
            source,
        })?;
        let mut raw_l1 = vec![0u8; header.l1_size as usize * 8];
        file.read_exact_at(&mut raw_l1, header.l1_table_offset)?;
        let l1 = raw_l1
            .chunks_exact(8)
            .map(|c| header::get64(c, 0))
            .collect();
        let refcounts = Refcounts::load(&file, &path, &header, meta_fs.len(), read_only)?;
        let mut serial = format!("{:x}{:x}", meta_fs.dev(), meta_fs.ino());
        serial.truncate(20);
        Ok(Self {
            size: header.size - header.size % SECTOR_SIZE,
            file,
            path,
            header,
            read_only,
            serial,
            backing,
            file_len: AtomicU64::new(meta_fs.len()),
            meta: Mutex::new(Meta {
                l1,
                l2_cache: Lru::new(L2_CACHE),
                refcounts,
                decompressed: None,
            }),
            nowait: AtomicBool::new(true),
            nowait_write: AtomicBool::new(true),
        })
    }

    /// The parsed header (for `ferrite disk info`).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    fn l2_bits(&self) -> u32 {
        self.header.cluster_bits - 3
    }

    fn corrupt(&self, reason: String) -> DiskError {
        DiskError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        // A panic while holding the lock cannot leave half-written in-memory state that is
        // not also on disk (metadata is written through), so a poisoned lock is still usable.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(DiskError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn file_end(&self) -> u64 {
        self.file_len.load(Ordering::Acquire)
    }

    /// Record that the file now reaches at least `end`.
    fn extend_file_end(&self, end: u64) {
        self.file_len.fetch_max(end, Ordering::AcqRel);
    }

    /// Split a guest offset into (L1 index, L2 index).
    fn indices(&self, guest: u64) -> (usize, usize) {
        let cb = self.header.cluster_bits;
        let l1 = guest >> (cb + self.l2_bits());
        let l2 = (guest >> cb) & ((1 << self.l2_bits()) - 1);
        (l1 as usize, l2 as usize)
    }

    /// Load the L2 table at `off` into the cache (validated).
    fn load_l2(&self, meta: &mut Meta, off: u64) -> Result<()> {
        if meta.l2_cache.get_mut(off).is_some() {
            return Ok(());
        }
        let cs = self.cluster_size();
        if !off.is_multiple_of(cs) || off.checked_add(cs).is_none_or(|e| e > self.file_end()) {
            return Err(self.corrupt(format!(
                "L2 table offset {off:#x} is unaligned or beyond the end of the file"
            )));
        }
        if off == 0
            || off == self.header.refcount_table_offset
            || off == self.header.l1_table_offset
        {
            return Err(self.corrupt(format!("L2 table at {off:#x} overlaps other metadata")));
        }
        let mut raw = vec![0u8; cs as usize];
        self.file.read_exact_at(&mut raw, off)?;
        let table = raw.chunks_exact(8).map(|c| header::get64(c, 0)).collect();
        meta.l2_cache.insert(off, table);
        Ok(())
    }

    /// The raw L2 entry for `guest` (0 when no L2 table exists).
    fn l2_entry(&self, meta: &mut Meta, guest: u64) -> Result<u64> {
        let (i1, i2) = self.indices(guest);
        let Some(&l1e) = meta.l1.get(i1) else {
            return Err(self.corrupt(format!("guest offset {guest:#x} beyond the L1 table")));
        };
        let l2_off = l1e & L1_OFFSET_MASK;
        if l2_off == 0 {
            return Ok(0);
        }
        self.load_l2(meta, l2_off)?;
        Ok(meta
            .l2_cache
            .get_mut(l2_off)
            .and_then(|t| t.get(i2).copied())
            .unwrap_or(0))
    }

    /// Decode an L2 entry.
    fn decode(&self, l2e: u64) -> Result<Mapping> {
        let cb = self.header.cluster_bits;
        if l2e & OFLAG_COMPRESSED != 0 {
            let x = 62 - (cb - 8);
            let offset = l2e & ((1u64 << x) - 1);
            let sectors = (l2e >> x) & ((1u64 << (62 - x)) - 1);
            let len = (sectors + 1) * 512 - (offset & 511);
            if offset == 0 || offset >= self.file_end() {
                return Err(self.corrupt(format!(
                    "compressed cluster at {offset:#x} beyond the end of the file"
                )));
            }
            return Ok(Mapping::Compressed { offset, len });
        }
        let host = l2e & L2_OFFSET_MASK;
        if !host.is_multiple_of(self.cluster_size()) {
            return Err(self.corrupt(format!("data cluster offset {host:#x} is unaligned")));
        }
        if self.header.version >= 3 && l2e & OFLAG_ZERO != 0 {
            return Ok(Mapping::Zero((host != 0).then_some(host)));
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        if host >= self.file_end() {
            return Err(self.corrupt(format!(
                "data cluster at {host:#x} beyond the end of the file"
            )));
        }
        Ok(Mapping::Data(host))
    }

    /// Decompress the compressed cluster into the cache (keyed by its L2 entry).
    fn decompressed<'m>(
        &self,
        meta: &'m mut Meta,
        l2e: u64,
        offset: u64,
        len: u64,
    ) -> Result<&'m [u8]> {
        let hit = matches!(&meta.decompressed, Some((e, _)) if *e == l2e);
        if !hit {
            let avail = self.file_end().saturating_sub(offset).min(len);
            let mut input = vec![0u8; avail as usize];
            self.file.read_exact_at(&mut input, offset)?;
            let out = compress::inflate_cluster(&input, self.cluster_size() as usize)
                .map_err(|e| self.corrupt(format!("compressed cluster at {offset:#x}: {e}")))?;
            meta.decompressed = Some((l2e, out));
        }
        match &meta.decompressed {
            Some((_, data)) => Ok(data),
            None => Err(self.corrupt("decompression cache empty".into())),
        }
    }

    /// Visit `[offset, offset+len)` one cluster piece at a time: (guest offset, position in
    /// the request, length).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> + '_ {
        let cs = self.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let n = (cs - pos % cs).min(end - pos);
            let item = (pos, (pos - offset) as usize, n as usize);
            pos += n;
            Some(item)
        })
    }

    /// Bytes from `guest` (mapped to the data cluster `host`) up to `end` that lie in data
    /// clusters stored one after the other in the file, so one pread/pwrite covers them.
    fn data_run(&self, meta: &mut Meta, guest: u64, end: u64, host: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let start = guest - guest % cs;
        let mut next = start + cs;
        while next < end {
            match self.decode(self.l2_entry(meta, next)?)? {
                Mapping::Data(h) if h == host + (next - start) => next += cs,
                _ => break,
            }
        }
        Ok(next.min(end) - guest)
    }

    fn read_into(&self, offset: u64, dst: &Dst<'_, '_>) -> Result<()> {
        let len = dst.len() as u64;
        self.check_range(offset, len)?;
        let mut done_to = offset;
        for (guest, at, n) in self.pieces(offset, len) {
            if guest < done_to {
                continue;
            }
            let mut meta = self.lock();
            let l2e = self.l2_entry(&mut meta, guest)?;
            match self.decode(l2e)? {
                Mapping::Data(host) => {
                    let run = self.data_run(&mut meta, guest, offset + len, host)?;
                    drop(meta);
                    let in_cluster = guest % self.cluster_size();
                    dst.read_file(&self.file, host + in_cluster, at, run as usize)?;
                    done_to = guest + run;
                }
                Mapping::Zero(_) => {
                    drop(meta);
                    dst.zero(at, n)?;
                }
                Mapping::Unallocated => {
                    drop(meta);
                    self.read_backing(guest, dst, at, n)?;
                }
                Mapping::Compressed { offset: c, len: l } => {
                    let data = self.decompressed(&mut meta, l2e, c, l)?;
                    let s = (guest % self.cluster_size()) as usize;
                    dst.copy_from(&data[s..s + n], at)?;
                }
            }
        }
        Ok(())
    }

    /// Read an unallocated piece from the backing image; beyond its end reads zeroes.
    fn read_backing(&self, guest: u64, dst: &Dst<'_, '_>, at: usize, n: usize) -> Result<()> {
        let Some(b) = &self.backing else {
            return dst.zero(at, n);
        };
        let bsize = b.size();
        let from_backing = bsize.saturating_sub(guest).min(n as u64) as usize;
        if from_backing > 0 {
            dst.read_backing(b.as_ref(), guest, at, from_backing)?;
        }
        if from_backing < n {
            dst.zero(at + from_backing, n - from_backing)?;
        }
        Ok(())
    }

    /// The current contents of the whole cluster containing `guest` as seen by the guest.
    fn cluster_contents(&self, meta: &mut Meta, guest: u64, l2e: u64) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let start = guest - guest % cs as u64;
        let mut buf = vec![0u8; cs];
        match self.decode(l2e)? {
            Mapping::Zero(_) => {}
            Mapping::Data(host) => {
                read_full(&self.file, &mut buf, host)?;
            }
            Mapping::Compressed { offset, len } => {
                buf.copy_from_slice(self.decompressed(meta, l2e, offset, len)?);
            }
            Mapping::Unallocated => {
                // Only the part inside the virtual disk can come from the backing image.
                let visible = (self.size.max(self.header.size) - start).min(cs as u64) as usize;
                let d = Dst::Buf(std::cell::RefCell::new(&mut buf[..visible]));
                self.read_backing(start, &d, 0, visible)?;
            }
        }
        Ok(buf)
    }

    fn write_from(&self, offset: u64, src: &Src<'_, '_>) -> Result<()> {
        self.check_writable()?;
        let len = src.len() as u64;
        self.check_range(offset, len)?;
        let cs = self.cluster_size();
        let mut done_to = offset;
        for (guest, at, n) in self.pieces(offset, len) {
            if guest < done_to {
                continue;
            }
            let mut meta = self.lock();
            let l2e = self.l2_entry(&mut meta, guest)?;
            if let Mapping::Data(host) = self.decode(l2e)? {
                let run = self.data_run(&mut meta, guest, offset + len, host)?;
                drop(meta);
                src.write_file(&self.file, host + guest % cs, at, run as usize)?;
                done_to = guest + run;
                continue;
            }
            // Allocate: build the whole new cluster, write it, then point the L2 entry at it.
            let mut cluster = self.cluster_contents(&mut meta, guest, l2e)?;
            let s = (guest % cs) as usize;
            src.copy_to(&mut cluster[s..s + n], at)?;
            let host = match self.decode(l2e)? {
                Mapping::Zero(Some(h)) => h,
                _ => meta.refcounts.alloc(&self.file)?,
            };
            self.file.write_all_at(&cluster, host)?;
            self.extend_file_end(host + cs);
            self.set_l2(&mut meta, guest, host | OFLAG_COPIED)?;
            self.release(&mut meta, l2e, Some(host))?;
        }
        Ok(())
    }

    /// [`DiskBackend::try_read_to_guest_nowait`]: only data clusters whose L2 table is cached,
    /// read with `RWF_NOWAIT`; anything else (zero, unallocated, compressed clusters, an
    /// uncached L2 table, data not in the page cache) answers `Ok(false)`.
    fn read_nowait(&self, offset: u64, dst: &GuestSlice<'_>) -> Result<bool> {
        if !self.nowait.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let len = dst.len() as u64;
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut guest = offset;
        while guest < end {
            let mut meta = self.lock();
            let (i1, _) = self.indices(guest);
            let l2_off = meta.l1.get(i1).map_or(0, |e| e & L1_OFFSET_MASK);
            if l2_off == 0 || meta.l2_cache.get_mut(l2_off).is_none() {
                return Ok(false);
            }
            let Mapping::Data(host) = self.decode(self.l2_entry(&mut meta, guest)?)? else {
                return Ok(false);
            };
            let run = self.data_run(&mut meta, guest, end, host)?;
            drop(meta);
            let at = (guest - offset) as usize;
            let piece = dst
                .subslice(at, run as usize)
                .map_err(|_| DiskError::Io(std::io::ErrorKind::InvalidInput.into()))?;
            let host_off = host + guest % self.cluster_size();
            match crate::raw::read_guest_nowait(&self.file, host_off, &piece)? {
                crate::raw::Nowait::Done => {}
                crate::raw::Nowait::WouldBlock => return Ok(false),
                crate::raw::Nowait::Unsupported => {
                    self.nowait.store(false, Ordering::Relaxed);
                    return Ok(false);
                }
            }
            guest += run;
        }
        Ok(true)
    }

    /// [`DiskBackend::try_write_from_guest_inline`]: only writes into allocated data clusters
    /// whose L2 table is cached (no metadata changes); anything else answers `Ok(false)`.
    fn write_inline(&self, offset: u64, src: &GuestSlice<'_>) -> Result<bool> {
        if self.read_only {
            return Ok(false);
        }
        let len = src.len() as u64;
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut guest = offset;
        while guest < end {
            let mut meta = self.lock();
            let (i1, _) = self.indices(guest);
            let l2_off = meta.l1.get(i1).map_or(0, |e| e & L1_OFFSET_MASK);
            if l2_off == 0 || meta.l2_cache.get_mut(l2_off).is_none() {
                return Ok(false);
            }
            let Mapping::Data(host) = self.decode(self.l2_entry(&mut meta, guest)?)? else {
                return Ok(false);
            };
            let run = self.data_run(&mut meta, guest, end, host)?;
            drop(meta);
            let at = (guest - offset) as usize;
            let host_off = host + guest % self.cluster_size();
            let mut blocking = !self.nowait_write.load(Ordering::Relaxed);
            if !blocking {
                let piece = src
                    .subslice(at, run as usize)
                    .map_err(|_| DiskError::Io(std::io::ErrorKind::InvalidInput.into()))?;
                match crate::raw::write_guest_nowait(&self.file, host_off, &piece)? {
                    crate::raw::Nowait::Done => {}
                    crate::raw::Nowait::WouldBlock => return Ok(false),
                    crate::raw::Nowait::Unsupported => {
                        self.nowait_write.store(false, Ordering::Relaxed);
                        blocking = true;
                    }
                }
            }
            if blocking {
                Src::Guest(src).write_file(&self.file, host_off, at, run as usize)?;
            }
            guest += run;
        }
        Ok(true)
    }

    /// Drop the references the old L2 entry `old` held (after it was replaced), except for
    /// the cluster `kept` that the new entry still uses.
    fn release(&self, meta: &mut Meta, old: u64, kept: Option<u64>) -> Result<()> {
        match self.decode(old)? {
            Mapping::Data(h) | Mapping::Zero(Some(h)) if Some(h) != kept => {
                let freed = meta.refcounts.decref(&self.file, h)?;
                if freed {
                    self.punch_hole(h, self.cluster_size());
                }
            }
            Mapping::Compressed { offset, len } => {
                let cs = self.cluster_size();
                let first = offset / cs;
                let last = (offset + len - 1) / cs;
                for c in first..=last {
                    meta.refcounts.decref(&self.file, c * cs)?;
                }
                if matches!(&meta.decompressed, Some((e, _)) if *e == old) {
                    meta.decompressed = None;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn punch_hole(&self, off: u64, len: u64) {
        use std::os::fd::AsRawFd;
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return;
        };
        // SAFETY: plain syscall on a descriptor we own; no memory is passed. Failure only
        // means the freed cluster keeps its disk space.
        unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            );
        }
    }

    /// Set the L2 entry of `guest` to `value`, creating the L2 table if needed.
    fn set_l2(&self, meta: &mut Meta, guest: u64, value: u64) -> Result<()> {
        let (i1, i2) = self.indices(guest);
        let Some(&l1e) = meta.l1.get(i1) else {
            return Err(self.corrupt(format!("guest offset {guest:#x} beyond the L1 table")));
        };
        let mut l2_off = l1e & L1_OFFSET_MASK;
        if l2_off == 0 {
            l2_off = meta.refcounts.alloc(&self.file)?;
            let cs = self.cluster_size() as usize;
            self.file.write_all_at(&vec![0u8; cs], l2_off)?;
            self.extend_file_end(l2_off + cs as u64);
            meta.l2_cache.insert(l2_off, vec![0u64; cs / 8]);
            let entry = l2_off | OFLAG_COPIED;
            self.file.write_all_at(
                &entry.to_be_bytes(),
                self.header.l1_table_offset + i1 as u64 * 8,
            )?;
            meta.l1[i1] = entry;
        }
        self.load_l2(meta, l2_off)?;
        self.file
            .write_all_at(&value.to_be_bytes(), l2_off + i2 as u64 * 8)?;
        if let Some(t) = meta.l2_cache.get_mut(l2_off) {
            if let Some(slot) = t.get_mut(i2) {
                *slot = value;
            }
        }
        Ok(())
    }

    /// Make whole clusters read as zeroes (`zero`: v3 zero flag or, without a backing file,
    /// unallocated) and free their host clusters; partial clusters get zero bytes written if
    /// `write_partial`.
    fn zero_range(&self, offset: u64, len: u64, write_partial: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let cs = self.cluster_size();
        for (guest, _, n) in self.pieces(offset, len) {
            let mut meta = self.lock();
            let l2e = self.l2_entry(&mut meta, guest)?;
            let map = self.decode(l2e)?;
            let reads_zero = match map {
                Mapping::Zero(_) => true,
                Mapping::Unallocated => self.backing.is_none(),
                _ => false,
            };
            if reads_zero {
                continue;
            }
            if n as u64 == cs {
                let new = if self.backing.is_none() {
                    0
                } else if self.header.version >= 3 {
                    OFLAG_ZERO
                } else if write_partial {
                    drop(meta);
                    self.write_from(guest, &Src::Buf(&vec![0u8; n]))?;
                    continue;
                } else {
                    continue;
                };
                self.set_l2(&mut meta, guest, new)?;
                self.release(&mut meta, l2e, None)?;
            } else if write_partial {
                drop(meta);
                self.write_from(guest, &Src::Buf(&vec![0u8; n]))?;
            }
        }
        Ok(())
    }
}

/// Read `buf.len()` bytes at `off`; bytes past the end of the file read as zeroes (QEMU may
/// leave the last data cluster short).
fn read_full(file: &File, buf: &mut [u8], off: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DiskError::Io(e)),
        }
    }
    Ok(())
}

impl Qcow2Disk {
    /// The guest ranges this image holds data for itself (standard and compressed clusters;
    /// zero clusters and unallocated ones are not), in order, merged.
    fn own_data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let cs = self.cluster_size();
        let l2_span = cs << self.l2_bits();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut guest = 0u64;
        while guest < self.size {
            // Locked per cluster: the guest's I/O goes on while a big image is walked.
            let mut meta = self.lock();
            let (i1, _) = self.indices(guest);
            if meta.l1.get(i1).is_none_or(|e| e & L1_OFFSET_MASK == 0) {
                // No L2 table: nothing allocated in this whole span.
                guest = (guest / l2_span + 1) * l2_span;
                continue;
            }
            let l2e = self.l2_entry(&mut meta, guest)?;
            let len = cs.min(self.size - guest);
            if matches!(
                self.decode(l2e)?,
                Mapping::Data(_) | Mapping::Compressed { .. }
            ) {
                match ranges.last_mut() {
                    Some((start, l)) if *start + *l == guest => *l += len,
                    _ => ranges.push((guest, len)),
                }
            }
            guest += cs;
        }
        Ok(ranges)
    }
}

/// Sort and merge overlapping or adjacent ranges.
fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        match out.last_mut() {
            Some((s, l)) if *s + *l >= start => *l = (*l).max(start + len - *s),
            _ => out.push((start, len)),
        }
    }
    out
}

impl DiskBackend for Qcow2Disk {
    fn relock(&self, mode: LockMode) -> Result<()> {
        lock_file(&self.file, &self.path, mode)
    }

    /// This image's data clusters, and what its backing chain holds data for (clipped to
    /// this image's size; a range a zero cluster here covers is included and reads as
    /// zeroes: the caller skips zero blocks).
    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let mut ranges = self.own_data_ranges()?;
        if let Some(b) = &self.backing {
            for (start, len) in b.data_ranges()? {
                if start < self.size {
                    ranges.push((start, len.min(self.size - start)));
                }
            }
        }
        Ok(merge_ranges(ranges))
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn serial(&self) -> String {
        self.serial.clone()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_into(offset, &Dst::Buf(std::cell::RefCell::new(buf)))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_from(offset, &Src::Buf(buf))
    }

    fn read_to_guest(&self, offset: u64, dst: &GuestSlice<'_>) -> Result<()> {
        self.read_into(offset, &Dst::Guest(dst))
    }

    fn try_read_to_guest_nowait(&self, offset: u64, dst: &GuestSlice<'_>) -> Result<bool> {
        self.read_nowait(offset, dst)
    }

    fn try_write_from_guest_inline(&self, offset: u64, src: &GuestSlice<'_>) -> Result<bool> {
        self.write_inline(offset, src)
    }

    fn write_from_guest(&self, offset: u64, src: &GuestSlice<'_>) -> Result<()> {
        self.write_from(offset, &Src::Guest(src))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Metadata is written through, so one fdatasync makes data and metadata durable
        // (fdatasync also syncs the file size when the image grew; only timestamps are skipped).
        self.file.sync_data()?;
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true)
    }
}
