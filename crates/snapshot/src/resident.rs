//! Which pages of guest RAM the guest has touched, found without touching them.
//!
//! `mincore(2)` reports pages that are in memory. For anonymous memory that is every page
//! the guest ever touched, except pages the kernel swapped out: when the process has swapped
//! memory (`VmSwap` in `/proc/self/status`), those are found in `/proc/self/pagemap` too.

use std::ffi::c_void;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{io_err, Result};
use crate::memory::PAGE;

/// `/proc/self/pagemap` entry bit: the page is swapped out.
const PM_SWAPPED: u64 = 1 << 62;
/// `/proc/self/pagemap` entry bit: the page is in memory.
#[cfg(test)]
const PM_PRESENT: u64 = 1 << 63;

/// Host pages handled per system call, so one call's kernel work stays short.
const CHUNK: usize = 1 << 16;

/// The host's page size.
pub(crate) fn host_page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .unwrap_or(PAGE)
}

/// For each 4 KiB page of `mem`, whether the guest touched it (any host page under it is
/// resident or swapped out). `path` names the memory file in errors.
pub fn resident_pages(mem: &[u8], path: &Path) -> Result<Vec<bool>> {
    let pages = mem.len() / PAGE;
    if pages == 0 {
        return Ok(Vec::new());
    }
    let host_page = host_page_size();
    let start = mem.as_ptr() as usize;
    let base = start - start % host_page;
    let host_pages = (start + mem.len() - base).div_ceil(host_page);
    let mut touched = mincore(base, host_pages, host_page)
        .map_err(io_err("find resident guest pages for", path))?;
    if process_has_swap() {
        let proc_path = Path::new("/proc/self/pagemap");
        let entries = pagemap(base / host_page, host_pages)
            .map_err(io_err("find swapped guest pages in", proc_path))?;
        for (t, e) in touched.iter_mut().zip(entries) {
            *t |= e & PM_SWAPPED != 0;
        }
    }
    Ok((0..pages)
        .map(|p| {
            let first = (start + p * PAGE - base) / host_page;
            let last = (start + (p + 1) * PAGE - 1 - base) / host_page;
            touched[first..=last].iter().any(|&t| t)
        })
        .collect())
}

/// `mincore` over `host_pages` pages from `base`, which must be mapped.
fn mincore(base: usize, host_pages: usize, host_page: usize) -> io::Result<Vec<bool>> {
    let mut vec = vec![0u8; host_pages];
    for (i, chunk) in vec.chunks_mut(CHUNK).enumerate() {
        let addr = base + i * CHUNK * host_page;
        // SAFETY: the caller's slice keeps [base, base + host_pages * host_page) mapped, and
        // this range lies inside it; mincore writes exactly one byte per host page of the
        // range into `chunk`, which has that many bytes.
        let rc = unsafe {
            libc::mincore(
                addr as *mut c_void,
                chunk.len() * host_page,
                chunk.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(vec.into_iter().map(|v| v & 1 != 0).collect())
}

/// Whether any of this process's memory is swapped out.
fn process_has_swap() -> bool {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        // No procfs: assume swap so that pagemap is tried and its failure reported.
        return true;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmSwap:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .is_none_or(|kib| kib > 0)
}

/// The `/proc/self/pagemap` entries of `count` host pages from page number `first`.
fn pagemap(first: usize, count: usize) -> io::Result<Vec<u64>> {
    let file = File::open("/proc/self/pagemap")?;
    let mut out = Vec::with_capacity(count);
    let mut buf = vec![0u8; CHUNK.min(count) * 8];
    let mut page = first;
    while out.len() < count {
        let n = (count - out.len()).min(CHUNK);
        let bytes = &mut buf[..n * 8];
        file.read_exact_at(bytes, page as u64 * 8)?;
        out.extend(
            bytes
                .chunks_exact(8)
                .map(|e| u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]])),
        );
        page += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pagemap_reports_touched_page_present_and_untouched_absent() {
        // Arrange
        let host_page = host_page_size();
        let len = 8 * host_page;
        // SAFETY: a fresh anonymous mapping aliases nothing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        // SAFETY: the mapping is len bytes and only this test uses it.
        let mem = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) };
        mem[3 * host_page] = 1;

        // Act
        let entries = pagemap(ptr as usize / host_page, 8).expect("pagemap");
        let touched = resident_pages(mem, Path::new("m")).expect("resident");

        // Assert
        let present: Vec<bool> = entries.iter().map(|e| e & PM_PRESENT != 0).collect();
        let mut expected = vec![false; 8];
        expected[3] = true;
        assert_eq!(present, expected);
        assert_eq!(touched.iter().filter(|&&t| t).count(), host_page / PAGE);
        // SAFETY: exactly the mapping made above; `mem` is not used after this.
        unsafe { libc::munmap(ptr, len) };
    }
}
