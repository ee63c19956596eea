//! Raw image files (and block devices): guest sector N is file byte N * 512.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::bitmap::Bitmap;

use crate::backend::{DiskBackend, GuestSlice, SECTOR_SIZE};
use crate::lock::{lock_file, LockMode};
use crate::{DiskError, Result};

/// Size of the zero buffer used when the filesystem cannot zero a range itself.
const ZERO_CHUNK: usize = 64 * 1024;

/// A raw disk image, opened and locked for the lifetime of this value.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    serial: String,
    /// Cleared once the kernel refuses `RWF_NOWAIT` reads (then every read may block).
    nowait: AtomicBool,
    /// Cleared once the kernel refuses `RWF_NOWAIT` writes (ext4 before buffered-NOWAIT
    /// support); inline writes are then plain buffered writes.
    nowait_write: AtomicBool,
}

impl RawDisk {
    /// Open `path` read-write (exclusive lock) or read-only (shared lock). Fails with
    /// [`DiskError::Locked`] if another VM or process holds a conflicting lock.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = OpenOptions::new()
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
        // Seeking works for regular files and block devices alike.
        let bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Size {
                path: path.clone(),
                source,
            })?;
        let size = bytes - bytes % SECTOR_SIZE;
        if size != bytes {
            tracing::warn!(
                "disk image {} is not a multiple of {SECTOR_SIZE} bytes; the last {} bytes are not visible",
                path.display(),
                bytes - size
            );
        }
        let meta = file.metadata().map_err(|source| DiskError::Size {
            path: path.clone(),
            source,
        })?;
        let mut serial = format!("{:x}{:x}", meta.dev(), meta.ino());
        serial.truncate(20);
        Ok(Self {
            file,
            path,
            size,
            read_only,
            serial,
            nowait: AtomicBool::new(true),
            nowait_write: AtomicBool::new(true),
        })
    }

    /// The image path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
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

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        loop {
            // SAFETY: plain syscall on a descriptor we own; no memory is passed.
            let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
            if ret == 0 {
                return Ok(());
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn zero_by_writing(&self, mut offset: u64, len: u64) -> Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZERO_CHUNK as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// Outcome of [`read_guest_nowait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nowait {
    /// Every byte was read.
    Done,
    /// Some data is not in the page cache (or the file ends early).
    WouldBlock,
    /// The kernel or file system refuses `RWF_NOWAIT`.
    Unsupported,
}

/// Fill `dst` from `file` at `offset` with `preadv2(RWF_NOWAIT)`: only what the page cache
/// holds, never blocking on the disk. Marks what was read dirty.
pub(crate) fn read_guest_nowait(file: &File, offset: u64, dst: &GuestSlice<'_>) -> Result<Nowait> {
    let len = dst.len();
    let guard = dst.ptr_guard_mut();
    let base = guard.as_ptr();
    let mut done = 0usize;
    let outcome = loop {
        if done >= len {
            break Nowait::Done;
        }
        let Some(pos) = offset
            .checked_add(done as u64)
            .and_then(|p| libc::off_t::try_from(p).ok())
        else {
            break Nowait::WouldBlock;
        };
        let iov = libc::iovec {
            // SAFETY: `done < len`, so the pointer stays inside the mapping of `dst`.
            iov_base: unsafe { base.add(done) }.cast(),
            iov_len: len - done,
        };
        // SAFETY: the iovec describes `base+done..base+len`, a live mapping of guest memory
        // kept valid by `dst`'s guard for this call; the kernel writes only inside it. Guest
        // memory may change concurrently, which preadv2 tolerates.
        let ret = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, pos, libc::RWF_NOWAIT) };
        if ret < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => break Nowait::WouldBlock,
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                    break Nowait::Unsupported
                }
                _ => {
                    dst.bitmap().mark_dirty(0, done);
                    return Err(DiskError::Io(err));
                }
            }
        }
        if ret == 0 {
            // End of file: the blocking path decides what that means.
            break Nowait::WouldBlock;
        }
        done += ret as usize;
    };
    dst.bitmap().mark_dirty(0, done);
    Ok(outcome)
}

/// Write `src` to `file` at `offset` with `pwritev2(RWF_NOWAIT)`: only if the page cache
/// takes it without blocking.
pub(crate) fn write_guest_nowait(file: &File, offset: u64, src: &GuestSlice<'_>) -> Result<Nowait> {
    let len = src.len();
    let guard = src.ptr_guard();
    let base = guard.as_ptr();
    let mut done = 0usize;
    while done < len {
        let Some(pos) = offset
            .checked_add(done as u64)
            .and_then(|p| libc::off_t::try_from(p).ok())
        else {
            return Ok(Nowait::WouldBlock);
        };
        let iov = libc::iovec {
            // SAFETY: `done < len`, so the pointer stays inside the mapping of `src`.
            iov_base: unsafe { base.add(done) }.cast_mut().cast(),
            iov_len: len - done,
        };
        // SAFETY: the iovec describes `base+done..base+len`, a live mapping of guest memory
        // kept valid by `src`'s guard for this call; the kernel only reads it.
        let ret = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, pos, libc::RWF_NOWAIT) };
        if ret < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(Nowait::WouldBlock),
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                    return Ok(Nowait::Unsupported)
                }
                _ => return Err(DiskError::Io(err)),
            }
        }
        if ret == 0 {
            return Ok(Nowait::WouldBlock);
        }
        done += ret as usize;
    }
    Ok(Nowait::Done)
}

/// The data extents of `file` below `size` (`SEEK_DATA`/`SEEK_HOLE`); the whole range when
/// the filesystem cannot tell.
fn data_ranges(file: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |off: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor this file owns; it only moves the file offset, which
        // no other code of this backend uses (all I/O is positioned).
        let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        }
    };
    let mut ranges = Vec::new();
    let mut off = 0u64;
    while off < size {
        let start = match seek(off, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(e) if not_supported(&e) => return Ok(vec![(0, size)]),
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if end <= start {
            break;
        }
        ranges.push((start, end - start));
        off = end;
    }
    Ok(ranges)
}

fn not_supported(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

impl DiskBackend for RawDisk {
    fn relock(&self, mode: LockMode) -> Result<()> {
        lock_file(&self.file, &self.path, mode)
    }

    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        data_ranges(&self.file, self.size)
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
        self.check_range(offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                DiskError::ShortRead(offset)
            } else {
                DiskError::Io(e)
            }
        })
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)?;
        Ok(())
    }

    fn read_to_guest(&self, offset: u64, dst: &GuestSlice<'_>) -> Result<()> {
        let len = dst.len();
        self.check_range(offset, len as u64)?;
        let guard = dst.ptr_guard_mut();
        let base = guard.as_ptr();
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            // SAFETY: `base..base+len` is a live mapping of guest memory described by `dst`
            // (its guard keeps it valid for this call) and `done < len`, so the kernel writes
            // only inside it. Guest memory may change concurrently, which pread tolerates.
            let ret = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    base.add(done).cast(),
                    len - done,
                    pos as libc::off_t,
                )
            };
            if ret < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                dst.bitmap().mark_dirty(0, done);
                return Err(DiskError::Io(err));
            }
            if ret == 0 {
                dst.bitmap().mark_dirty(0, done);
                return Err(DiskError::ShortRead(pos));
            }
            done += ret as usize;
        }
        dst.bitmap().mark_dirty(0, len);
        Ok(())
    }

    fn try_read_to_guest_nowait(&self, offset: u64, dst: &GuestSlice<'_>) -> Result<bool> {
        if !self.nowait.load(Ordering::Relaxed) {
            return Ok(false);
        }
        self.check_range(offset, dst.len() as u64)?;
        match read_guest_nowait(&self.file, offset, dst)? {
            Nowait::Done => Ok(true),
            Nowait::WouldBlock => Ok(false),
            Nowait::Unsupported => {
                self.nowait.store(false, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    fn try_write_from_guest_inline(&self, offset: u64, src: &GuestSlice<'_>) -> Result<bool> {
        if self.read_only {
            return Ok(false);
        }
        if !self.nowait_write.load(Ordering::Relaxed) {
            return self.write_from_guest(offset, src).map(|()| true);
        }
        self.check_range(offset, src.len() as u64)?;
        match write_guest_nowait(&self.file, offset, src)? {
            Nowait::Done => Ok(true),
            Nowait::WouldBlock => Ok(false),
            Nowait::Unsupported => {
                self.nowait_write.store(false, Ordering::Relaxed);
                self.write_from_guest(offset, src).map(|()| true)
            }
        }
    }

    fn write_from_guest(&self, offset: u64, src: &GuestSlice<'_>) -> Result<()> {
        self.check_writable()?;
        let len = src.len();
        self.check_range(offset, len as u64)?;
        let guard = src.ptr_guard();
        let base = guard.as_ptr();
        let mut done = 0usize;
        while done < len {
            // SAFETY: `base..base+len` is a live mapping described by `src`, kept valid by
            // its guard; the kernel only reads `len - done` bytes from `base + done`.
            let ret = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    base.add(done).cast(),
                    len - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if ret < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DiskError::Io(err));
            }
            if ret == 0 {
                return Err(DiskError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            done += ret as usize;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()?;
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if not_supported(&e) => Err(DiskError::NotSupported("discard")),
            Err(e) => Err(DiskError::Io(e)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if not_supported(&e) => self.zero_by_writing(offset, len),
            Err(e) => Err(DiskError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    fn image(len: u64) -> TempFile {
        let f = TempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }

    type Mem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

    fn guest_memory() -> Mem {
        Mem::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)]).unwrap()
    }

    fn guest_slice(mem: &Mem, addr: u64, len: usize) -> GuestSlice<'_> {
        use vm_memory::GuestMemoryBackend;
        mem.get_slice(vm_memory::GuestAddress(addr), len).unwrap()
    }

    #[test]
    fn test_raw_nowait_read_of_cached_data_fills_guest_memory() {
        // Arrange: just written, so the data is in the page cache.
        let f = image(8192);
        let disk = RawDisk::open(f.as_path(), false).unwrap();
        disk.write_at(4096, &[0x3c; 4096]).unwrap();
        let mem = guest_memory();

        // Act
        let done = disk
            .try_read_to_guest_nowait(4096, &guest_slice(&mem, 0x1000, 4096))
            .unwrap();

        // Assert
        assert!(done);
        let mut buf = [0u8; 4096];
        vm_memory::Bytes::read_slice(&mem, &mut buf, vm_memory::GuestAddress(0x1000)).unwrap();
        assert_eq!(buf, [0x3c; 4096]);
    }

    #[test]
    fn test_data_ranges_of_a_sparse_raw_image_skip_its_holes() {
        // Arrange: 4 MiB, data only at 1 MiB and at 3 MiB.
        let f = image(4 << 20);
        let disk = RawDisk::open(f.as_path(), false).unwrap();
        disk.write_at(1 << 20, &[1; 4096]).unwrap();
        disk.write_at(3 << 20, &[2; 4096]).unwrap();

        // Act
        let ranges = disk.data_ranges().unwrap();

        // Assert: every written byte is covered, and far less than the disk is.
        let covers = |off: u64| ranges.iter().any(|&(s, l)| s <= off && off + 4096 <= s + l);
        assert!(covers(1 << 20) && covers(3 << 20), "{ranges:?}");
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert!(total < 4 << 20, "{ranges:?}");
    }

    #[test]
    fn test_raw_nowait_read_past_end_is_refused() {
        let f = image(4096);
        let disk = RawDisk::open(f.as_path(), true).unwrap();
        let mem = guest_memory();

        let r = disk.try_read_to_guest_nowait(2048, &guest_slice(&mem, 0, 4096));

        assert!(matches!(r, Err(DiskError::OutOfRange { .. })));
    }

    #[test]
    fn test_raw_inline_write_then_read_roundtrips() {
        let f = image(8192);
        let disk = RawDisk::open(f.as_path(), false).unwrap();
        let mem = guest_memory();
        vm_memory::Bytes::write_slice(&mem, &[0x77; 512], vm_memory::GuestAddress(0x2000)).unwrap();

        let done = disk
            .try_write_from_guest_inline(512, &guest_slice(&mem, 0x2000, 512))
            .unwrap();
        if !done {
            // The kernel would block (or lacks RWF_NOWAIT writes): the blocking path serves.
            disk.write_from_guest(512, &guest_slice(&mem, 0x2000, 512))
                .unwrap();
        }

        let mut buf = [0u8; 512];
        disk.read_at(512, &mut buf).unwrap();
        assert_eq!(buf, [0x77; 512]);
    }

    #[test]
    fn test_raw_inline_write_on_read_only_disk_declines() {
        let f = image(4096);
        let disk = RawDisk::open(f.as_path(), true).unwrap();
        let mem = guest_memory();

        let done = disk
            .try_write_from_guest_inline(0, &guest_slice(&mem, 0, 512))
            .unwrap();

        assert!(!done);
        let mut buf = [1u8; 512];
        disk.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 512]);
    }

    #[test]
    fn test_raw_open_size_is_rounded_down_to_sectors() {
        let f = image(4096 + 100);
        let disk = RawDisk::open(f.as_path(), true).unwrap();
        assert_eq!(disk.size(), 4096);
    }

    #[test]
    fn test_raw_write_then_read_roundtrips() {
        let f = image(8192);
        let disk = RawDisk::open(f.as_path(), false).unwrap();
        disk.write_at(512, &[0xab; 1024]).unwrap();
        disk.flush().unwrap();
        let mut buf = [0u8; 1024];
        disk.read_at(512, &mut buf).unwrap();
        assert_eq!(buf, [0xab; 1024]);
    }

    #[test]
    fn test_raw_access_past_end_is_refused() {
        let f = image(4096);
        let disk = RawDisk::open(f.as_path(), false).unwrap();
        let mut buf = [0u8; 512];
        assert!(matches!(
            disk.read_at(4096, &mut buf),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.write_at(u64::MAX - 10, &buf),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(disk.discard(4000, 512).is_err());
    }

    #[test]
    fn test_raw_read_only_refuses_writes() {
        let f = image(4096);
        let disk = RawDisk::open(f.as_path(), true).unwrap();
        assert!(matches!(
            disk.write_at(0, &[1; 512]),
            Err(DiskError::ReadOnly)
        ));
        assert!(matches!(
            disk.write_zeroes(0, 512),
            Err(DiskError::ReadOnly)
        ));
        assert!(matches!(disk.discard(0, 512), Err(DiskError::ReadOnly)));
    }

    #[test]
    fn test_raw_write_zeroes_clears_range() {
        let f = image(8192);
        let disk = RawDisk::open(f.as_path(), false).unwrap();
        disk.write_at(0, &[0xff; 8192]).unwrap();
        disk.write_zeroes(1024, 2048).unwrap();
        let mut buf = [0u8; 8192];
        disk.read_at(0, &mut buf).unwrap();
        assert!(buf[..1024].iter().all(|&b| b == 0xff));
        assert!(buf[1024..3072].iter().all(|&b| b == 0));
        assert!(buf[3072..].iter().all(|&b| b == 0xff));
        assert_eq!(f.as_file().metadata().unwrap().len(), 8192);
    }

    #[test]
    fn test_raw_discard_keeps_size_and_reads_zero_or_old() {
        let f = image(65536);
        let disk = RawDisk::open(f.as_path(), false).unwrap();
        disk.write_at(0, &[0x5a; 65536]).unwrap();
        match disk.discard(0, 65536) {
            Ok(()) => {
                let mut buf = [1u8; 512];
                disk.read_at(0, &mut buf).unwrap();
                assert_eq!(buf, [0u8; 512]);
            }
            Err(e) => assert!(matches!(e, DiskError::NotSupported(_))),
        }
        assert_eq!(f.as_file().metadata().unwrap().len(), 65536);
    }

    #[test]
    fn test_raw_second_read_write_open_is_locked() {
        let f = image(4096);
        let _first = RawDisk::open(f.as_path(), false).unwrap();
        let err = RawDisk::open(f.as_path(), false).unwrap_err();
        assert!(matches!(err, DiskError::Locked { .. }));
        assert!(err.to_string().contains("already in use by another VM"));
        assert!(err.to_string().contains(&f.as_path().display().to_string()));
        assert!(matches!(
            RawDisk::open(f.as_path(), true),
            Err(DiskError::Locked { .. })
        ));
    }

    #[test]
    fn test_raw_read_only_opens_share_but_exclude_writer() {
        let f = image(4096);
        let _a = RawDisk::open(f.as_path(), true).unwrap();
        let _b = RawDisk::open(f.as_path(), true).unwrap();
        assert!(matches!(
            RawDisk::open(f.as_path(), false),
            Err(DiskError::Locked { .. })
        ));
    }

    #[test]
    fn test_raw_lock_released_on_drop() {
        let f = image(4096);
        let first = RawDisk::open(f.as_path(), false).unwrap();
        drop(first);
        assert!(RawDisk::open(f.as_path(), false).is_ok());
    }

    #[test]
    fn test_raw_missing_file_names_path() {
        let err = RawDisk::open("/nonexistent/ferrite.img", true).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ferrite.img"));
    }

    #[test]
    fn test_raw_serial_fits_virtio_id() {
        let f = image(4096);
        let disk = RawDisk::open(f.as_path(), true).unwrap();
        assert!(!disk.serial().is_empty() && disk.serial().len() <= 20);
    }
}
