//! Disk image backends for block devices.
//!
//! A [`DiskBackend`] is what a virtio-blk device reads and writes; [`RawDisk`] is the raw-file
//! implementation (a qcow2 backend can implement the same trait later). Every backend holds an
//! exclusive (OFD) lock on its image so that two VMs never open one image read-write.

#![warn(missing_docs)]

mod backend;
mod lock;
mod raw;

pub use backend::{DiskBackend, GuestSlice, SECTOR_SHIFT, SECTOR_SIZE};
pub use lock::LockMode;
pub use raw::RawDisk;

use std::path::PathBuf;

/// Errors from opening and accessing disk images.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image could not be opened.
    #[error("Cannot open disk image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another open file description holds a conflicting lock on the image.
    #[error("Disk image {path} is already in use by another VM (or process)")]
    Locked {
        /// The image path.
        path: PathBuf,
    },
    /// Taking the lock failed for a reason other than a conflict.
    #[error("Cannot lock disk image {path}: {source}")]
    Lock {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The image's size could not be read.
    #[error("Cannot read the size of disk image {path}: {source}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An access falls (partly) outside the image.
    #[error("Access at {offset:#x}+{len:#x} is outside the disk ({size:#x} bytes)")]
    OutOfRange {
        /// Byte offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Size of the disk in bytes.
        size: u64,
    },
    /// A write-type operation on a read-only disk.
    #[error("Disk is read-only")]
    ReadOnly,
    /// The file ended before the requested bytes were read.
    #[error("Short read at {0:#x}")]
    ShortRead(u64),
    /// The backend or filesystem cannot do this operation.
    #[error("Operation not supported: {0}")]
    NotSupported(&'static str),
    /// A read, write, sync or fallocate failed.
    #[error("Disk I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, DiskError>;
