//! Snapshot directories that appear complete or not at all.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{io_err, Result, SnapshotError};
use crate::state::sync_parent;

/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// The memory file's name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";

/// A snapshot directory. Created under a `.partial-<pid>` name and renamed into place by
/// [`SnapshotDir::commit`], so a snapshot that fails or is interrupted never shows up under
/// its final name; dropped uncommitted, the partial directory is removed.
#[derive(Debug)]
pub struct SnapshotDir {
    path: PathBuf,
    /// Where the directory goes on commit.
    final_path: PathBuf,
    /// Set while the directory is a partial one this value must clean up.
    pending: Option<PathBuf>,
}

impl SnapshotDir {
    /// Starts a snapshot that will be at `final_path`, refusing a path that exists.
    pub fn create(final_path: &Path) -> Result<Self> {
        if final_path.symlink_metadata().is_ok() {
            return Err(SnapshotError::AlreadyExists {
                path: final_path.to_path_buf(),
            });
        }
        let Some(name) = final_path.file_name() else {
            return Err(io_err("create snapshot", final_path)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "path has no final component",
            )));
        };
        let mut partial_name = name.to_os_string();
        partial_name.push(format!(".partial-{}", std::process::id()));
        let partial = final_path.with_file_name(partial_name);
        fs::create_dir(&partial).map_err(io_err("create", &partial))?;
        Ok(Self {
            path: partial.clone(),
            final_path: final_path.to_path_buf(),
            pending: Some(partial),
        })
    }

    /// Opens an existing snapshot for restore, checking it holds a state file.
    pub fn open(path: &Path) -> Result<Self> {
        let dir = Self {
            path: path.to_path_buf(),
            final_path: path.to_path_buf(),
            pending: None,
        };
        fs::metadata(dir.state_path()).map_err(io_err("open snapshot state", dir.state_path()))?;
        Ok(dir)
    }

    /// Where the directory is now (the partial name until committed).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state file's path.
    pub fn state_path(&self) -> PathBuf {
        self.path.join(STATE_FILE)
    }

    /// The memory file's path.
    pub fn memory_path(&self) -> PathBuf {
        self.path.join(MEMORY_FILE)
    }

    /// Fsyncs every file and the directory, then renames it to the final path given to
    /// [`SnapshotDir::create`] (refusing if something appeared there meanwhile) and fsyncs the
    /// parent. Returns the committed directory, ready for reading.
    pub fn commit(mut self) -> Result<SnapshotDir> {
        let final_path = self.final_path.clone();
        let final_path = final_path.as_path();
        let Some(partial) = self.pending.clone() else {
            return Ok(self);
        };
        for entry in fs::read_dir(&partial).map_err(io_err("list", &partial))? {
            let entry = entry.map_err(io_err("list", &partial))?;
            let path = entry.path();
            if entry.file_type().map_err(io_err("stat", &path))?.is_file() {
                File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err("sync", &path))?;
            }
        }
        File::open(&partial)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync", &partial))?;
        rename_noreplace(&partial, final_path)?;
        self.pending = None;
        self.path = final_path.to_path_buf();
        sync_parent(final_path)?;
        Ok(self)
    }
}

impl Drop for SnapshotDir {
    fn drop(&mut self) {
        if let Some(partial) = self.pending.take() {
            // Best effort: nothing useful can be done with a failure while dropping.
            let _ = fs::remove_dir_all(partial);
        }
    }
}

/// Renames `from` to `to`, failing if `to` exists (plain rename would replace an empty
/// directory there).
fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|e| io_err("rename to", to)(e.into()))
    };
    let (cfrom, cto) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cfrom.as_ptr(),
            libc::AT_FDCWD,
            cto.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => Err(SnapshotError::AlreadyExists {
            path: to.to_path_buf(),
        }),
        // File systems without RENAME_NOREPLACE: check, then rename.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if to.symlink_metadata().is_ok() {
                return Err(SnapshotError::AlreadyExists {
                    path: to.to_path_buf(),
                });
            }
            fs::rename(from, to).map_err(io_err("rename into place", to))
        }
        _ => Err(io_err("rename into place", to)(err)),
    }
}
