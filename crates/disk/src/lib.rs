//! Disk image backends for block devices.
//!
//! A [`DiskBackend`] is what a virtio-blk device reads and writes; [`RawDisk`] is the raw-file
//! implementation and [`Qcow2Disk`] the qcow2 one; [`open_image`] picks the format (probing
//! the qcow2 magic unless told) and opens backing chains. Every backend holds an exclusive
//! (OFD) lock on its image so that two VMs never open one image read-write; backing files get
//! shared (read) locks.

#![warn(missing_docs)]

mod backend;
mod chain;
mod dirty;
mod image;
mod lock;
pub mod qcow2;
mod raw;
mod swap;

pub use backend::{DiskBackend, GuestSlice, SECTOR_SHIFT, SECTOR_SIZE};
pub use chain::{create_overlay, flatten, image_chain, overlay_path, revert, RevertOutcome};
pub use dirty::{block_is_set, blocks_set, WriteTracker, DIRTY_BLOCK_SIZE};
pub use image::{
    convert_image, create_image, image_info, open_image, probe_format, ChainEntry, CreateSpec,
    ImageFormat, ImageInfo,
};
pub use lock::LockMode;
pub use qcow2::Qcow2Disk;
pub use raw::RawDisk;
pub use swap::{backing_name, CurrentImage, SwappableDisk};

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
    /// A change that needs the image closed was asked for while a VM uses it.
    #[error("Disk image {0} is in use by a running VM (or another process): stop the VM first")]
    InUse(PathBuf),
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
    /// The image's metadata is inconsistent or hostile (qcow2 tables out of range, ...).
    #[error("Disk image {path} is corrupt: {reason}")]
    Corrupt {
        /// The image path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The image uses a format feature Ferrite does not implement.
    #[error("Disk image {path} uses an unsupported feature: {feature}")]
    UnsupportedFeature {
        /// The image path.
        path: PathBuf,
        /// The feature, named as in the qcow2 specification.
        feature: String,
    },
    /// The backing chain cannot be followed (loop, too deep, missing file).
    #[error("Backing chain of {path} is invalid: {reason}")]
    BackingChain {
        /// The image whose backing file is the problem.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The destination of create/convert already exists.
    #[error("{0} already exists (use --force to overwrite it)")]
    Exists(PathBuf),
    /// A bad parameter for create/convert.
    #[error("{0}")]
    InvalidArgument(String),
    /// A read, write, sync or fallocate failed.
    #[error("Disk I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, DiskError>;
