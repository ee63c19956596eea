//! Host side of the hybrid vsock (Firecracker's protocol) for tests: a private socket
//! directory per VM, `CONNECT <port>` handshakes and echo round trips.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Hang guard for host-side socket waits (not a performance threshold).
pub const HANG: Duration = Duration::from_secs(100);

/// A private directory for one VM's sockets, removed at the end.
pub struct SockDir(pub PathBuf);

impl SockDir {
    pub fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fvs-{}-{}-{}",
            name,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        SockDir(dir)
    }

    pub fn vm_socket(&self) -> PathBuf {
        self.0.join("vm.sock")
    }

    /// Where guest connections to host port `port` arrive.
    pub fn host_port(&self, port: u32) -> PathBuf {
        self.0.join(format!("vm.sock_{port}"))
    }
}

impl Drop for SockDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Connect to the VM's socket once Ferrite has created it.
pub fn connect_vm(path: &Path) -> UnixStream {
    let end = Instant::now() + HANG;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                s.set_read_timeout(Some(HANG)).unwrap();
                return s;
            }
            Err(e) => {
                assert!(Instant::now() < end, "VM socket never came up: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Read one line byte by byte (so nothing after it is consumed); "" at end of stream.
pub fn read_line(s: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => break,
            _ => {
                line.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// `CONNECT <port>\n` on a fresh connection; returns the stream and the answer line.
pub fn hybrid_connect(path: &Path, port: u32) -> (UnixStream, String) {
    let mut s = connect_vm(path);
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let line = read_line(&mut s).unwrap_or_default();
    (s, line)
}

/// Send `data`, half-close, read everything back.
pub fn echo_through(s: &mut UnixStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    back
}

pub fn assert_ok_line(line: &str) -> u64 {
    let port = line
        .strip_prefix("OK ")
        .and_then(|p| p.strip_suffix('\n'))
        .and_then(|p| p.parse::<u64>().ok());
    let port = port.unwrap_or_else(|| panic!("expected `OK <port>`, got {line:?}"));
    assert!(port >= 1 << 30, "{line:?}");
    port
}
