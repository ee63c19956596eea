//! Host-side AF_UNIX helpers: a connect that never blocks the worker, peeking at the
//! `CONNECT <port>\n` line, and parsing it (Firecracker's hybrid vsock handshake).

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;

/// Longest `CONNECT <port>\n` line accepted (Firecracker reads at most 32 bytes).
pub const MAX_CONNECT_LINE: usize = 32;

/// Connect a non-blocking stream socket to `path`. A listener whose backlog is full gives
/// `WouldBlock` instead of stalling the device thread.
pub fn connect_nonblocking(path: &OsStr) -> io::Result<UnixStream> {
    let bytes = path.as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or invalid",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call and `len` does not exceed
    // its size.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// Look at up to `buf.len()` queued bytes without consuming them. Ok(0) is end of stream.
pub fn peek(stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Parse `CONNECT <port>\n` (the keyword in any case, as Firecracker accepts it).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix('\n')?;
    let mut words = text.split_ascii_whitespace();
    if !words.next()?.eq_ignore_ascii_case("connect") {
        return None;
    }
    let port = words.next()?.parse::<u32>().ok()?;
    if words.next().is_some() {
        return None;
    }
    Some(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_connect_valid_lines_give_port() {
        assert_eq!(parse_connect(b"CONNECT 1234\n"), Some(1234));
        assert_eq!(parse_connect(b"connect 52\r\n"), Some(52));
        assert_eq!(parse_connect(b"Connect   4294967295\n"), Some(u32::MAX));
    }

    #[test]
    fn test_parse_connect_garbage_rejected() {
        for bad in [
            &b"CONNECT 1234"[..],
            b"CONNECT\n",
            b"CONNECT -1\n",
            b"CONNECT 4294967296\n",
            b"LISTEN 5\n",
            b"CONNECT 5 6\n",
            b"\xff\xfe\n",
            b"\n",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn test_connect_nonblocking_nobody_listening_fails() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("nobody");

        let r = connect_nonblocking(path.as_os_str());

        assert!(r.is_err());
    }

    #[test]
    fn test_connect_nonblocking_listener_accepts() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("l");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();

        let s = connect_nonblocking(path.as_os_str()).unwrap();

        assert!(l.accept().is_ok());
        drop(s);
    }
}
