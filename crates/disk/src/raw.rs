//! Raw image files (and block devices): guest sector N is file byte N * 512.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

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

fn not_supported(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

impl DiskBackend for RawDisk {
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
