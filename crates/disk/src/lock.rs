//! Whole-file open-file-description (OFD) locks that keep two VMs off one image.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::{DiskError, Result};

/// Which lock an open image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LockMode {
    /// Shared lock: any number of read-only users, no writer.
    Read,
    /// Exclusive lock: a single read-write user.
    Write,
    /// No lock: the image is open but handed over (a migrating VM's source lets the
    /// destination take it while its own guest is paused).
    Unlocked,
}

/// Take a whole-file OFD lock without waiting. OFD locks belong to the open file description,
/// so they conflict even between two opens in one process and go away when the file is closed.
pub fn lock_file(file: &File, path: &Path, mode: LockMode) -> Result<()> {
    let l_type = match mode {
        LockMode::Read => libc::F_RDLCK,
        LockMode::Write => libc::F_WRLCK,
        LockMode::Unlocked => libc::F_UNLCK,
    };
    // SAFETY: all-zero is a valid `flock` (plain integers).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // The whole file, however long it grows.
    fl.l_pid = 0; // Required to be 0 for OFD locks.
                  // SAFETY: `file` owns a valid descriptor and `fl` is a properly initialised flock that
                  // outlives the call; F_OFD_SETLK does not keep the pointer.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if ret == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(DiskError::Locked {
            path: path.to_path_buf(),
        }),
        _ => Err(DiskError::Lock {
            path: path.to_path_buf(),
            source: err,
        }),
    }
}
