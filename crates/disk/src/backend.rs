//! The interface every disk image format implements.

use vm_memory::bitmap::{AtomicBitmap, BS};
use vm_memory::VolatileSlice;

use crate::lock::LockMode;
use crate::{DiskError, Result};

/// Bytes per sector, the unit of virtio-blk addressing.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// A piece of guest memory as handed out by `vm_device::GuestMemoryMmap` (its dirty bitmap
/// travels with it so DMA writes are recorded for migration).
pub type GuestSlice<'a> = VolatileSlice<'a, BS<'a, AtomicBitmap>>;

/// A disk image a block device can read and write. Offsets and lengths are in bytes and are
/// checked against [`DiskBackend::size`] by every implementation.
pub trait DiskBackend: Send + Sync {
    /// Usable size in bytes (a multiple of [`SECTOR_SIZE`]).
    fn size(&self) -> u64;
    /// Usable size in 512-byte sectors (virtio-blk capacity).
    fn sectors(&self) -> u64 {
        self.size() >> SECTOR_SHIFT
    }
    /// Whether write-type operations are refused.
    fn is_read_only(&self) -> bool;
    /// A stable identifier of the image (for virtio-blk GET_ID when the user gave none).
    fn serial(&self) -> String;
    /// Fill `buf` from the disk at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Write `buf` to the disk at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()>;
    /// Read from the disk straight into guest memory (no bounce buffer); marks it dirty.
    fn read_to_guest(&self, offset: u64, dst: &GuestSlice<'_>) -> Result<()>;
    /// Read from the disk straight into guest memory only if that cannot block (the data is
    /// in the host page cache). `Ok(true)`: `dst` is filled and marked dirty. `Ok(false)`:
    /// the read would block (or the backend cannot tell); `dst` may be partly written and the
    /// caller must use [`DiskBackend::read_to_guest`] instead. The default always answers
    /// `Ok(false)`.
    fn try_read_to_guest_nowait(&self, offset: u64, dst: &GuestSlice<'_>) -> Result<bool> {
        let _ = (offset, dst);
        Ok(false)
    }
    /// Write guest memory straight to the disk if that is cheap enough for the caller's
    /// thread: a buffered write the page cache takes without waiting for the device
    /// (`RWF_NOWAIT` where the kernel supports it for the file, else a plain buffered write,
    /// which waits only under dirty-page throttling). `Ok(true)`: written. `Ok(false)`: it
    /// would block (or the backend cannot tell); part of the range may be written and the
    /// caller must use [`DiskBackend::write_from_guest`] instead. The default always answers
    /// `Ok(false)`.
    fn try_write_from_guest_inline(&self, offset: u64, src: &GuestSlice<'_>) -> Result<bool> {
        let _ = (offset, src);
        Ok(false)
    }
    /// Write guest memory straight to the disk.
    fn write_from_guest(&self, offset: u64, src: &GuestSlice<'_>) -> Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Tell the backend the range is no longer needed (may free space; contents then read as
    /// zeroes on a raw file). `NotSupported` when the filesystem cannot.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Make the range read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// The byte ranges that may hold data, in order (holes of a sparse file read as zeroes
    /// and need not be copied). The default: the whole disk.
    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        Ok(vec![(0, self.size())])
    }
    /// Change the lock this open image holds (a writer downgrades to [`LockMode::Read`] when
    /// it becomes the backing file of an overlay, and upgrades back if that is undone).
    /// `Locked` when another user's lock conflicts. The default cannot relock.
    fn relock(&self, mode: LockMode) -> Result<()> {
        let _ = mode;
        Err(DiskError::NotSupported(
            "changing the lock of this disk backend",
        ))
    }
}
