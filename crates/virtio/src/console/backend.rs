//! The host side of the console: where guest output goes and host input comes from. Opened
//! once per run and shared by every VM instance of that run (guest reboots keep the file,
//! the listening socket, its connected client and the pty).
//!
//! All descriptors are non-blocking; the worker thread never waits on the host. Guest output
//! goes through a bounded buffer: Linux's hvc path (drivers/char/virtio_console.c,
//! `__send_to_port` for `put_chars`) spins until the device has used each output buffer, so
//! the device must always consume output promptly and drops (and counts) what a slow host
//! reader cannot take.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// Most guest output held while the host side cannot take it.
pub const OUTPUT_BUFFER_BYTES: usize = 256 * 1024;
/// Most host input read ahead of the guest's receive buffers.
pub const INPUT_CHUNK_BYTES: usize = 4096;

/// The kind of host endpoint.
#[derive(Debug)]
pub enum HostIo {
    /// Output appended to a file; no input.
    File(File),
    /// A listening Unix socket; one connected host client at a time carries both directions
    /// (further clients wait in the backlog until it disconnects).
    Socket {
        /// The listening socket.
        listener: UnixListener,
        /// The connected client.
        conn: Option<UnixStream>,
    },
    /// A pseudo-terminal: the master is ours; the slave is kept open so that the master
    /// never reports a hang-up while no terminal program has it open.
    Pty {
        /// Master side.
        master: File,
        /// Slave side, held open.
        slave: File,
    },
}

/// Result of reading host input.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many bytes were appended to the pending input.
    Data(usize),
    /// Nothing to read now.
    WouldBlock,
    /// The host side went away (client disconnected).
    Closed,
    /// This endpoint has no input.
    NoInput,
}

/// Result of pushing buffered output to the host.
#[derive(Debug, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Everything was written (or there is no place to write it yet).
    Done,
    /// The host side is full; wait for it to become writable.
    Blocked,
    /// The host side went away.
    Closed,
}

/// I/O state behind the [`ConsoleBackend`] lock.
#[derive(Debug)]
pub struct BackendState {
    /// The endpoint.
    pub io: HostIo,
    /// Guest output not yet written to the host.
    pub out: VecDeque<u8>,
    /// Host input not yet delivered to the guest.
    pub rx_pending: VecDeque<u8>,
}

/// The host endpoint of a console, shared between VM instances of one run.
#[derive(Debug)]
pub struct ConsoleBackend {
    state: Mutex<BackendState>,
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl ConsoleBackend {
    fn with_io(io: HostIo) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(BackendState {
                io,
                out: VecDeque::new(),
                rx_pending: VecDeque::new(),
            }),
        })
    }

    /// Output to `file` (opened for appending by the caller); the guest gets no input.
    pub fn file(file: File) -> Arc<Self> {
        Self::with_io(HostIo::File(file))
    }

    /// Serve one host client at a time on `listener`.
    pub fn socket(listener: UnixListener) -> std::io::Result<Arc<Self>> {
        listener.set_nonblocking(true)?;
        Ok(Self::with_io(HostIo::Socket {
            listener,
            conn: None,
        }))
    }

    /// Allocate a pseudo-terminal in raw mode; returns the backend and the slave's path
    /// (for `screen`/`minicom`/`socat`).
    pub fn pty() -> std::io::Result<(Arc<Self>, PathBuf)> {
        let (master, slave, path) = open_pty()?;
        Ok((Self::with_io(HostIo::Pty { master, slave }), path))
    }

    /// Lock the I/O state (the worker holds it while it moves bytes).
    pub fn lock(&self) -> MutexGuard<'_, BackendState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn open_pty() -> std::io::Result<(File, File, PathBuf)> {
    // SAFETY: posix_openpt takes flags only and returns a new descriptor or -1.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own; File closes it on error paths too.
    let master = unsafe { File::from_raw_fd(fd) };
    // SAFETY: grantpt/unlockpt act on the master descriptor we own.
    if unsafe { libc::grantpt(fd) } != 0 || unsafe { libc::unlockpt(fd) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut name = [0u8; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name of at most `name.len()` bytes.
    let rc = unsafe { libc::ptsname_r(fd, name.as_mut_ptr().cast(), name.len()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let path = PathBuf::from(String::from_utf8_lossy(&name[..len]).into_owned());
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)?;
    // Raw mode: no echo, no line editing, no CR/LF translation.
    // SAFETY: termios is plain data; tcgetattr fills it for a terminal descriptor we own.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut tio) } == 0 {
        // SAFETY: cfmakeraw edits the struct in place; tcsetattr reads it.
        unsafe {
            libc::cfmakeraw(&mut tio);
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &tio);
        }
    }
    set_nonblocking(master.as_raw_fd())?;
    Ok((master, slave, path))
}

use std::os::unix::fs::OpenOptionsExt;

impl BackendState {
    /// The descriptor carrying both directions now (socket client or pty master).
    pub fn stream_fd(&self) -> Option<RawFd> {
        match &self.io {
            HostIo::File(_) => None,
            HostIo::Socket { conn, .. } => conn.as_ref().map(|c| c.as_raw_fd()),
            HostIo::Pty { master, .. } => Some(master.as_raw_fd()),
        }
    }

    /// The listening socket, while no client is connected.
    pub fn listener_fd(&self) -> Option<RawFd> {
        match &self.io {
            HostIo::Socket {
                listener,
                conn: None,
            } => Some(listener.as_raw_fd()),
            _ => None,
        }
    }

    /// Whether this endpoint can ever deliver input.
    pub fn has_input(&self) -> bool {
        !matches!(self.io, HostIo::File(_))
    }

    /// Accept a waiting client; true if one is now connected.
    pub fn accept(&mut self) -> std::io::Result<bool> {
        let HostIo::Socket { listener, conn } = &mut self.io else {
            return Ok(false);
        };
        if conn.is_some() {
            return Ok(true);
        }
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(true)?;
                *conn = Some(stream);
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Drop the connected client (it hung up); input read ahead from it is discarded.
    pub fn disconnect(&mut self) {
        if let HostIo::Socket { conn, .. } = &mut self.io {
            *conn = None;
            self.rx_pending.clear();
        }
    }

    /// Read up to [`INPUT_CHUNK_BYTES`] of host input into `rx_pending`.
    pub fn read_input(&mut self) -> ReadOutcome {
        let mut buf = [0u8; INPUT_CHUNK_BYTES];
        let r = match &mut self.io {
            HostIo::File(_) => return ReadOutcome::NoInput,
            HostIo::Socket { conn: None, .. } => return ReadOutcome::NoInput,
            HostIo::Socket { conn: Some(c), .. } => c.read(&mut buf),
            HostIo::Pty { master, .. } => master.read(&mut buf),
        };
        match r {
            Ok(0) => ReadOutcome::Closed,
            Ok(n) => {
                self.rx_pending.extend(&buf[..n]);
                ReadOutcome::Data(n)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                ReadOutcome::WouldBlock
            }
            // A pty master reads EIO while its slave is closed; treat as nothing to read.
            Err(_) if matches!(self.io, HostIo::Pty { .. }) => ReadOutcome::WouldBlock,
            Err(_) => ReadOutcome::Closed,
        }
    }

    /// Append guest output; returns how many bytes did not fit and were dropped.
    pub fn queue_output(&mut self, data: &[u8]) -> usize {
        let room = OUTPUT_BUFFER_BYTES.saturating_sub(self.out.len());
        let take = data.len().min(room);
        self.out.extend(&data[..take]);
        data.len() - take
    }

    /// Write buffered output to the host without blocking.
    pub fn flush(&mut self) -> FlushOutcome {
        while !self.out.is_empty() {
            let (chunk, _) = self.out.as_slices();
            let r = match &mut self.io {
                HostIo::File(f) => f.write(chunk),
                HostIo::Socket { conn: None, .. } => return FlushOutcome::Done,
                HostIo::Socket { conn: Some(c), .. } => send_nosignal(c.as_raw_fd(), chunk),
                HostIo::Pty { master, .. } => master.write(chunk),
            };
            match r {
                Ok(0) => return FlushOutcome::Blocked,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return FlushOutcome::Blocked,
                Err(e) => {
                    if let HostIo::File(_) = self.io {
                        tracing::warn!("virtio-console: output file write failed: {e}");
                        self.out.clear();
                        return FlushOutcome::Done;
                    }
                    return FlushOutcome::Closed;
                }
            }
        }
        FlushOutcome::Done
    }
}

/// send(2) without SIGPIPE when the client has gone.
fn send_nosignal(fd: RawFd, data: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `data` is valid for `data.len()` bytes; send only reads it.
    let n = unsafe {
        libc::send(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_output_buffer_full_drops_excess() {
        let (_dir, f) = temp_file();
        let b = ConsoleBackend::file(f);
        let mut st = b.lock();

        let dropped = st.queue_output(&vec![1u8; OUTPUT_BUFFER_BYTES + 10]);

        assert_eq!(dropped, 10);
        assert_eq!(st.out.len(), OUTPUT_BUFFER_BYTES);
    }

    fn temp_file() -> (vmm_sys_util::tempfile::TempFile, File) {
        let t = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(t.as_path())
            .unwrap();
        (t, f)
    }

    #[test]
    fn test_pty_round_trips_bytes() {
        let (b, path) = ConsoleBackend::pty().unwrap();
        let mut other = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();

        other.write_all(b"hi").unwrap();
        let mut st = b.lock();
        let mut got = ReadOutcome::WouldBlock;
        for _ in 0..1000 {
            got = st.read_input();
            if got != ReadOutcome::WouldBlock {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }

        assert_eq!(got, ReadOutcome::Data(2));
        assert_eq!(st.rx_pending.iter().copied().collect::<Vec<_>>(), b"hi");
    }
}
