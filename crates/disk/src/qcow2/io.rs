//! Request buffers: a host byte slice or a piece of guest memory, so that reads and writes of
//! allocated data clusters go straight between the image file and guest memory.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::Bitmap;

use crate::backend::{DiskBackend, GuestSlice};
use crate::{DiskError, Result};

/// Where read data goes.
pub enum Dst<'a, 'g> {
    /// A host buffer.
    Buf(RefCell<&'a mut [u8]>),
    /// Guest memory.
    Guest(&'a GuestSlice<'g>),
}

/// Where written data comes from.
pub enum Src<'a, 'g> {
    /// A host buffer.
    Buf(&'a [u8]),
    /// Guest memory.
    Guest(&'a GuestSlice<'g>),
}

fn sub<'g>(s: &GuestSlice<'g>, at: usize, n: usize) -> Result<GuestSlice<'g>> {
    s.subslice(at, n)
        .map_err(|_| DiskError::Io(std::io::ErrorKind::InvalidInput.into()))
}

impl Dst<'_, '_> {
    /// Length of the request.
    pub fn len(&self) -> usize {
        match self {
            Dst::Buf(b) => b.borrow().len(),
            Dst::Guest(g) => g.len(),
        }
    }

    /// Fill `[at, at+n)` from the file at `off`; bytes past the end of the file read as 0.
    pub fn read_file(&self, file: &File, off: u64, at: usize, n: usize) -> Result<()> {
        match self {
            Dst::Buf(b) => super::read_full(file, &mut b.borrow_mut()[at..at + n], off),
            Dst::Guest(g) => {
                let s = sub(g, at, n)?;
                let guard = s.ptr_guard_mut();
                let base = guard.as_ptr();
                let mut done = 0usize;
                while done < n {
                    // SAFETY: `base..base+n` is a live mapping of guest memory described by
                    // `s` (its guard keeps it valid) and `done < n`, so the kernel writes only
                    // inside it.
                    let ret = unsafe {
                        libc::pread(
                            file.as_raw_fd(),
                            base.add(done).cast(),
                            n - done,
                            (off + done as u64) as libc::off_t,
                        )
                    };
                    if ret < 0 {
                        let err = std::io::Error::last_os_error();
                        if err.kind() == std::io::ErrorKind::Interrupted {
                            continue;
                        }
                        s.bitmap().mark_dirty(0, done);
                        return Err(DiskError::Io(err));
                    }
                    if ret == 0 {
                        // Past the end of the file: the rest of the cluster reads as zeroes.
                        s.bitmap().mark_dirty(0, done);
                        return self.zero(at + done, n - done);
                    }
                    done += ret as usize;
                }
                s.bitmap().mark_dirty(0, n);
                Ok(())
            }
        }
    }

    /// Zero `[at, at+n)`.
    pub fn zero(&self, at: usize, n: usize) -> Result<()> {
        match self {
            Dst::Buf(b) => {
                b.borrow_mut()[at..at + n].fill(0);
                Ok(())
            }
            Dst::Guest(g) => {
                let s = sub(g, at, n)?;
                s.copy_from(&vec![0u8; n]);
                Ok(())
            }
        }
    }

    /// Copy `data` to position `at`.
    pub fn copy_from(&self, data: &[u8], at: usize) -> Result<()> {
        match self {
            Dst::Buf(b) => {
                b.borrow_mut()[at..at + data.len()].copy_from_slice(data);
                Ok(())
            }
            Dst::Guest(g) => {
                sub(g, at, data.len())?.copy_from(data);
                Ok(())
            }
        }
    }

    /// Read `[at, at+n)` from `backing` at `off`.
    pub fn read_backing(
        &self,
        backing: &dyn DiskBackend,
        off: u64,
        at: usize,
        n: usize,
    ) -> Result<()> {
        match self {
            Dst::Buf(b) => backing.read_at(off, &mut b.borrow_mut()[at..at + n]),
            Dst::Guest(g) => backing.read_to_guest(off, &sub(g, at, n)?),
        }
    }
}

impl Src<'_, '_> {
    /// Length of the request.
    pub fn len(&self) -> usize {
        match self {
            Src::Buf(b) => b.len(),
            Src::Guest(g) => g.len(),
        }
    }

    /// Write `[at, at+n)` to the file at `off`.
    pub fn write_file(&self, file: &File, off: u64, at: usize, n: usize) -> Result<()> {
        match self {
            Src::Buf(b) => Ok(file.write_all_at(&b[at..at + n], off)?),
            Src::Guest(g) => {
                let s = sub(g, at, n)?;
                let guard = s.ptr_guard();
                let base = guard.as_ptr();
                let mut done = 0usize;
                while done < n {
                    // SAFETY: `base..base+n` is a live mapping described by `s`, kept valid by
                    // its guard; the kernel only reads `n - done` bytes from `base + done`.
                    let ret = unsafe {
                        libc::pwrite(
                            file.as_raw_fd(),
                            base.add(done).cast(),
                            n - done,
                            (off + done as u64) as libc::off_t,
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
        }
    }

    /// Copy `[at, at+out.len())` into `out`.
    pub fn copy_to(&self, out: &mut [u8], at: usize) -> Result<()> {
        match self {
            Src::Buf(b) => {
                out.copy_from_slice(&b[at..at + out.len()]);
                Ok(())
            }
            Src::Guest(g) => {
                sub(g, at, out.len())?.copy_to(out);
                Ok(())
            }
        }
    }
}
