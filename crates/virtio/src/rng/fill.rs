//! Filling one request: host entropy from getrandom(2) into the chain's writable buffers.

use vm_device::GuestMemoryMmap;
use vm_memory::Bytes;

use crate::block::request::Segment;

/// Fill `buf` from the kernel's CSPRNG (getrandom(2), the same pool as /dev/urandom; it only
/// blocks before the host's pool is initialised at boot). Retries on EINTR and short reads.
pub fn getrandom_fill(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the duration
        // of the call; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        done += n as usize;
    }
    Ok(())
}

/// Copy `data` into the guest buffers `segs` in order; returns how many bytes landed. A
/// buffer outside guest memory ends the copy (the guest gets what was written before it).
pub fn write_segments(mem: &GuestMemoryMmap, segs: &[Segment], data: &[u8]) -> (usize, bool) {
    let mut written = 0usize;
    for s in segs {
        if written >= data.len() {
            break;
        }
        let take = usize::try_from(s.len)
            .unwrap_or(usize::MAX)
            .min(data.len() - written);
        if mem
            .write_slice(&data[written..written + take], s.addr)
            .is_err()
        {
            return (written, false);
        }
        written += take;
    }
    (written, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_getrandom_fill_large_buffer_is_not_constant() {
        let mut buf = vec![0u8; 70_000];

        getrandom_fill(&mut buf).unwrap();

        let zeros = buf.iter().filter(|&&b| b == 0).count();
        assert!(zeros < buf.len() / 16, "{zeros} zero bytes");
    }
}
