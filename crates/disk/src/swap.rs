//! A disk whose image can be replaced while a device uses it: live external snapshots put a
//! new overlay on top of the running image and switch the device to it in one step.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use crate::backend::{DiskBackend, GuestSlice};
use crate::dirty::WriteTracker;
use crate::image::ImageFormat;
use crate::lock::LockMode;
use crate::Result;

/// The image a [`SwappableDisk`] currently serves.
#[derive(Clone)]
pub struct CurrentImage {
    /// The open image (with its backing chain).
    pub backend: Arc<dyn DiskBackend>,
    /// Its path, as the user (or the snapshot that made it) named it.
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
}

/// A [`DiskBackend`] that forwards to the current image and can switch to another one
/// atomically: every request sees either the old or the new image, never a mix.
pub struct SwappableDisk {
    current: RwLock<CurrentImage>,
    serial: String,
    writes: WriteTracker,
}

impl SwappableDisk {
    /// Serve `image`; the GET_ID serial stays the first image's for the disk's lifetime.
    pub fn new(image: CurrentImage) -> Self {
        let serial = image.backend.serial();
        let writes = WriteTracker::new(image.backend.size());
        Self {
            current: RwLock::new(image),
            serial,
            writes,
        }
    }

    fn inner(&self) -> RwLockReadGuard<'_, CurrentImage> {
        // Swapping cannot panic half-way (it moves one value), so a poisoned lock is usable.
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The image served now.
    pub fn current(&self) -> CurrentImage {
        self.inner().clone()
    }

    /// The record of guest writes (off unless a block migration runs): every write-type
    /// request passes through this disk, whatever the image format.
    pub fn write_tracker(&self) -> &WriteTracker {
        &self.writes
    }

    /// The path of the image served now.
    pub fn path(&self) -> PathBuf {
        self.inner().path.clone()
    }

    /// Serve `image` from now on (waiting for requests running on the old one) and return the
    /// old one. The caller checks that the sizes match.
    pub fn swap(&self, image: CurrentImage) -> CurrentImage {
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *cur, image)
    }
}

impl std::fmt::Debug for SwappableDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwappableDisk")
            .field("path", &self.path())
            .finish()
    }
}

impl DiskBackend for SwappableDisk {
    fn size(&self) -> u64 {
        self.inner().backend.size()
    }
    fn is_read_only(&self) -> bool {
        self.inner().backend.is_read_only()
    }
    fn serial(&self) -> String {
        self.serial.clone()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner().backend.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let r = self.inner().backend.write_at(offset, buf);
        self.writes.record(offset, buf.len() as u64);
        r
    }
    fn read_to_guest(&self, offset: u64, dst: &GuestSlice<'_>) -> Result<()> {
        self.inner().backend.read_to_guest(offset, dst)
    }
    fn try_read_to_guest_nowait(&self, offset: u64, dst: &GuestSlice<'_>) -> Result<bool> {
        self.inner().backend.try_read_to_guest_nowait(offset, dst)
    }
    fn try_write_from_guest_inline(&self, offset: u64, src: &GuestSlice<'_>) -> Result<bool> {
        let r = self
            .inner()
            .backend
            .try_write_from_guest_inline(offset, src);
        // Even a write that would block may have written part of the range.
        self.writes.record(offset, src.len() as u64);
        r
    }
    fn write_from_guest(&self, offset: u64, src: &GuestSlice<'_>) -> Result<()> {
        let r = self.inner().backend.write_from_guest(offset, src);
        self.writes.record(offset, src.len() as u64);
        r
    }
    fn flush(&self) -> Result<()> {
        self.inner().backend.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.inner().backend.discard(offset, len);
        self.writes.record(offset, len);
        r
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.inner().backend.write_zeroes(offset, len);
        self.writes.record(offset, len);
        r
    }
    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        self.inner().backend.data_ranges()
    }
    fn relock(&self, mode: LockMode) -> Result<()> {
        self.inner().backend.relock(mode)
    }
}

/// Where `path` is as seen from `from`'s directory: the bare file name when both sit in one
/// directory (so the pair can be moved together), else the absolute path.
pub fn backing_name(from: &Path, path: &Path) -> Result<String> {
    let abs = |p: &Path| -> Result<PathBuf> {
        Ok(if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()?.join(p)
        })
    };
    let (from_abs, path_abs) = (abs(from)?, abs(path)?);
    let name = match (from_abs.parent(), path_abs.parent(), path_abs.file_name()) {
        (Some(a), Some(b), Some(name)) if a == b => PathBuf::from(name),
        _ => path_abs,
    };
    name.to_str().map(str::to_string).ok_or_else(|| {
        crate::DiskError::InvalidArgument(format!(
            "{} is not valid UTF-8 and cannot be recorded as a backing file",
            path.display()
        ))
    })
}
