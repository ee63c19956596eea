//! Copying a sparse memory file without filling its holes: only the data extents the file
//! system reports (`SEEK_DATA`/`SEEK_HOLE`) are copied, so copying a 4 GiB memory file that
//! holds 10 MiB of pages writes 10 MiB.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{io_err, Result};

/// The next data extent at or after `from`: `Some((start, end))`, or `None` past the last.
fn next_extent(file: &File, from: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    if from >= len {
        return Ok(None);
    }
    // SAFETY: lseek on a valid fd has no memory-safety preconditions.
    let start = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let err = io::Error::last_os_error();
        // ENXIO: no data at or after `from`.
        return if err.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(file.as_raw_fd(), start, libc::SEEK_HOLE) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some((start as u64, (end as u64).min(len))))
}

/// Copy `src` to the new file `dst` (same length), keeping holes as holes. Returns the data
/// bytes copied.
pub fn copy_sparse(src: &Path, dst: &Path) -> Result<u64> {
    let input = File::open(src).map_err(io_err("open", src))?;
    let len = input.metadata().map_err(io_err("stat", src))?.len();
    let output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io_err("create", dst))?;
    output.set_len(len).map_err(io_err("size", dst))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    let mut pos = 0;
    while let Some((start, end)) = next_extent(&input, pos, len).map_err(io_err("seek", src))? {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            input
                .read_exact_at(&mut buf[..n], at)
                .map_err(io_err("read", src))?;
            output
                .write_all_at(&buf[..n], at)
                .map_err(io_err("write", dst))?;
            at += n as u64;
            copied += n as u64;
        }
        pos = end;
    }
    output.sync_all().map_err(io_err("sync", dst))?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn test_copy_keeps_data_and_holes() {
        let dir = TempDir::new_with_prefix("/tmp/ferrite-sparse-").unwrap();
        let (src, dst) = (dir.as_path().join("a"), dir.as_path().join("b"));
        let file = File::create(&src).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(b"head", 0).unwrap();
        file.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        file.sync_all().unwrap();

        let copied = copy_sparse(&src, &dst).unwrap();

        let out = std::fs::read(&dst).unwrap();
        assert_eq!(out.len(), 64 << 20);
        assert_eq!(&out[..4], b"head");
        assert_eq!(&out[out.len() - 4..], b"tail");
        assert!(copied < 1 << 20, "holes are not copied: {copied} bytes");
    }

    #[test]
    fn test_copy_refuses_an_existing_target() {
        let dir = TempDir::new_with_prefix("/tmp/ferrite-sparse-").unwrap();
        let (src, dst) = (dir.as_path().join("a"), dir.as_path().join("b"));
        std::fs::write(&src, b"x").unwrap();
        std::fs::write(&dst, b"keep").unwrap();

        assert!(copy_sparse(&src, &dst).is_err());
        assert_eq!(std::fs::read(&dst).unwrap(), b"keep");
    }
}
