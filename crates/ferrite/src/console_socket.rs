//! `--console socket:PATH[,log=FILE]`: the serial console served on a Unix socket, for a
//! supervisor (ferrited) that attaches and detaches clients while the VM keeps running.
//!
//! Guest output is appended to the log file (when given) and copied to every connected
//! client; a client that cannot keep up loses output rather than stalling the guest (sends
//! never wait). Bytes from any client go to the guest's COM1.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use vmm::{ConsoleInput, StopHandle};

/// Most clients attached at once; more are refused with a message.
const MAX_CLIENTS: usize = 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The connected clients' write halves.
type Clients = Arc<Mutex<Vec<UnixStream>>>;

/// The console's output side: the log file plus every attached client.
pub struct SocketSink {
    log: Option<std::fs::File>,
    clients: Clients,
}

impl Write for SocketSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(log) = &mut self.log {
            // The log is best effort: a full disk must not stop the guest's console.
            let _ = log.write_all(buf);
        }
        lock(&self.clients).retain_mut(|client| write_some(client, buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Write what `client` takes without waiting; false when it is gone.
fn write_some(client: &mut UnixStream, mut buf: &[u8]) -> bool {
    while !buf.is_empty() {
        // Not `set_nonblocking`: O_NONBLOCK is shared with the reader's duplicate of this
        // socket. MSG_DONTWAIT makes only this send non-blocking; MSG_NOSIGNAL turns a
        // departed client into EPIPE instead of SIGPIPE.
        // SAFETY: `buf` is valid for `buf.len()` bytes for the duration of the call.
        let n = unsafe {
            libc::send(
                client.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n > 0 {
            buf = &buf[n as usize..];
            continue;
        }
        if n == 0 {
            return false;
        }
        match io::Error::last_os_error().kind() {
            // A slow reader loses this output; the guest never waits for it.
            io::ErrorKind::WouldBlock => return true,
            io::ErrorKind::Interrupted => continue,
            _ => return false,
        }
    }
    true
}

/// A bound console socket, ready to serve once the VM's input path exists.
pub struct SocketConsole {
    listener: UnixListener,
    clients: Clients,
}

impl SocketConsole {
    /// Bind `path` (a stale socket file there is replaced; mode 0600) and open `log` for
    /// appending. Returns the console and its output sink.
    pub fn bind(path: &Path, log: Option<&Path>) -> io::Result<(Self, SocketSink)> {
        let log = match log {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| annotate(e, "console log", p))?,
            ),
            None => None,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
                std::fs::remove_file(path)
                    .map_err(|e| annotate(e, "stale console socket", path))?;
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket: choose another console socket path",
                        path.display()
                    ),
                ))
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(|e| annotate(e, "console socket", path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let clients = Clients::default();
        let sink = SocketSink {
            log,
            clients: clients.clone(),
        };
        Ok((Self { listener, clients }, sink))
    }

    /// Accept clients on a thread; each client's input goes to `input`.
    pub fn serve(self, input: ConsoleInput, stop: StopHandle) -> io::Result<()> {
        std::thread::Builder::new()
            .name("ferrite-console".into())
            .stack_size(64 << 10)
            .spawn(move || {
                for conn in self.listener.incoming() {
                    let Ok(mut conn) = conn else { continue };
                    if lock(&self.clients).len() >= MAX_CLIENTS {
                        let _ = conn.write_all(b"ferrite: too many console clients\r\n");
                        continue;
                    }
                    let Ok(writer) = conn.try_clone() else {
                        continue;
                    };
                    lock(&self.clients).push(writer);
                    let (input, stop) = (input.clone(), stop.clone());
                    let _ = std::thread::Builder::new()
                        .name("ferrite-console-in".into())
                        .stack_size(64 << 10)
                        .spawn(move || forward_input(&mut conn, &input, &stop));
                }
            })?;
        Ok(())
    }
}

/// Copy one client's bytes to the guest until it disconnects.
fn forward_input(conn: &mut UnixStream, input: &ConsoleInput, stop: &StopHandle) {
    let mut buf = [0u8; 256];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => crate::input::deliver(input, stop, &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn test_output_reaches_log_and_every_client() {
        let dir = TempDir::new_with_prefix("/tmp/ferrite-console-").unwrap();
        let (sock, log) = (dir.as_path().join("c.sock"), dir.as_path().join("c.log"));
        let (console, mut sink) = SocketConsole::bind(&sock, Some(&log)).unwrap();
        console
            .serve(ConsoleInput::default(), StopHandle::new().unwrap())
            .unwrap();
        let mut a = UnixStream::connect(&sock).unwrap();
        let mut b = UnixStream::connect(&sock).unwrap();
        wait_for(|| lock(&sink.clients).len() == 2);

        sink.write_all(b"hello\n").unwrap();

        for client in [&mut a, &mut b] {
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut got = [0u8; 6];
            client.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"hello\n");
        }
        assert_eq!(std::fs::read(&log).unwrap(), b"hello\n");
    }

    #[test]
    fn test_departed_client_is_dropped_and_output_continues() {
        let dir = TempDir::new_with_prefix("/tmp/ferrite-console-").unwrap();
        let sock = dir.as_path().join("c.sock");
        let (console, mut sink) = SocketConsole::bind(&sock, None).unwrap();
        console
            .serve(ConsoleInput::default(), StopHandle::new().unwrap())
            .unwrap();
        let gone = UnixStream::connect(&sock).unwrap();
        wait_for(|| lock(&sink.clients).len() == 1);
        drop(gone);

        sink.write_all(b"a").unwrap();
        sink.write_all(b"b").unwrap();

        assert!(lock(&sink.clients).is_empty());
    }

    #[test]
    fn test_bind_refuses_a_regular_file() {
        let dir = TempDir::new_with_prefix("/tmp/ferrite-console-").unwrap();
        let path = dir.as_path().join("file");
        std::fs::write(&path, b"keep me").unwrap();

        let err = SocketConsole::bind(&path, None).err().unwrap();

        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    fn wait_for(cond: impl Fn() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("condition not reached in 5 s");
    }
}
