//! Where a migration goes: a TCP address or a Unix socket, and the connection itself
//! (plain, or TLS over TCP).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{MigrationError, Result};
use crate::tls::{TlsClient, TlsServer, TlsStream};

/// A migration endpoint: `tcp:HOST:PORT` (another host, or loopback) or `unix:PATH` (same
/// host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `HOST:PORT`.
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::str::FromStr for Endpoint {
    type Err = MigrationError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || MigrationError::BadEndpoint(s.to_string());
        match s.split_once(':') {
            Some(("tcp", addr)) => {
                let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(bad());
                }
                Ok(Endpoint::Tcp(addr.to_string()))
            }
            Some(("unix", path)) if !path.is_empty() => Ok(Endpoint::Unix(PathBuf::from(path))),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// One migration connection.
pub enum Stream {
    /// Over TCP (Nagle off: the commit exchange is a few small messages).
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
    /// TLS over TCP; its handles share one connection (see [`TlsStream`]).
    Tls(TlsStream),
}

impl Stream {
    /// Another handle on the same connection (a reader next to a writer, or a canceller).
    /// The protocol must not read or write one connection from two handles at once.
    pub fn try_clone(&self) -> Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.try_clone()?),
        })
    }

    /// Cut the connection both ways: a blocked read or write on any handle returns.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tls(s) => {
                s.shutdown();
                Ok(())
            }
        };
    }

    /// Send `tag` with the open files `fds` attached (`SCM_RIGHTS`): same-host memory
    /// handover. Only over a Unix socket.
    pub fn send_fds(&self, tag: &[u8], fds: &[std::os::fd::RawFd]) -> Result<()> {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        match self {
            Stream::Unix(s) => {
                let sent = s.send_with_fds(&[tag], fds).map_err(|e| {
                    MigrationError::Io(std::io::Error::from_raw_os_error(e.errno()))
                })?;
                if sent != tag.len() {
                    return Err(MigrationError::Protocol(
                        "short file-descriptor message".into(),
                    ));
                }
                Ok(())
            }
            Stream::Tcp(_) | Stream::Tls(_) => Err(MigrationError::Protocol(
                "file descriptors can only be handed over on a unix: endpoint".into(),
            )),
        }
    }

    /// Receive a `tag.len()`-byte message with up to `max` open files attached; returns the
    /// message and the files (owned, closed when dropped).
    pub fn recv_fds(&self, len: usize, max: usize) -> Result<(Vec<u8>, Vec<std::fs::File>)> {
        use std::os::fd::FromRawFd;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let Stream::Unix(s) = self else {
            return Err(MigrationError::Protocol(
                "file descriptors can only be handed over on a unix: endpoint".into(),
            ));
        };
        let mut buf = vec![0u8; len];
        let mut fds = vec![-1; max];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points into `buf`, which lives until the call returns and may be
        // written arbitrary bytes.
        let (n, count) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }
            .map_err(|e| MigrationError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
        let files = fds[..count]
            .iter()
            // SAFETY: the first `count` descriptors were just received and are owned by us.
            .map(|&fd| unsafe { std::fs::File::from_raw_fd(fd) })
            .collect();
        buf.truncate(n);
        Ok((buf, files))
    }

    /// Bound how long one read may block (None: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout)?,
            Stream::Unix(s) => s.set_read_timeout(timeout)?,
            Stream::Tls(s) => s.set_read_timeout(timeout)?,
        }
        Ok(())
    }

    /// Whether the connection is encrypted and both sides authenticated.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// A destination waiting for its source.
pub enum Listener {
    /// Listening on TCP; with TLS, every source must present a certificate it accepts.
    Tcp(TcpListener, Option<TlsServer>),
    /// Listening on a Unix socket (removed when dropped).
    Unix(UnixListener, PathBuf),
}

impl Endpoint {
    /// Connect to a listening destination, trying for up to `patience` (the destination may
    /// still be starting); with `tls`, the TLS handshake follows (not retried: a refused
    /// certificate is final).
    pub fn connect(&self, patience: Duration, tls: Option<&TlsClient>) -> Result<Stream> {
        if let Some(tls) = tls {
            tls.server_name_for(self)?;
        }
        let start = std::time::Instant::now();
        loop {
            let attempt = match self {
                Endpoint::Tcp(addr) => TcpStream::connect(addr).map(|s| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
                Endpoint::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            };
            match (attempt, tls) {
                (Ok(Stream::Tcp(tcp)), Some(tls)) => {
                    return tls.handshake(tcp, self).map(Stream::Tls)
                }
                (Ok(stream), _) => return Ok(stream),
                (Err(e), _) if start.elapsed() >= patience => {
                    return Err(MigrationError::Connect {
                        action: "connect to",
                        endpoint: self.to_string(),
                        source: e,
                    })
                }
                (Err(_), _) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Listen for one source; with `tls`, it must connect with TLS and a certificate `tls`
    /// accepts.
    pub fn listen(&self, tls: Option<&TlsServer>) -> Result<Listener> {
        if tls.is_some() {
            crate::tls::check_endpoint(self)?;
        }
        let err = |source| MigrationError::Connect {
            action: "listen on",
            endpoint: self.to_string(),
            source,
        };
        match self {
            Endpoint::Tcp(addr) => Ok(Listener::Tcp(
                TcpListener::bind(addr).map_err(err)?,
                tls.cloned(),
            )),
            Endpoint::Unix(path) => Ok(Listener::Unix(
                UnixListener::bind(path).map_err(err)?,
                path.clone(),
            )),
        }
    }
}

impl Listener {
    /// Wait for the source to connect (and with TLS, for its handshake).
    pub fn accept(&self) -> Result<Stream> {
        let err = |source| MigrationError::Connect {
            action: "accept on",
            endpoint: self.describe(),
            source,
        };
        match self {
            Listener::Tcp(l, tls) => {
                let (s, _) = l.accept().map_err(err)?;
                let _ = s.set_nodelay(true);
                match tls {
                    Some(tls) => Ok(Stream::Tls(tls.handshake(s)?)),
                    None => Ok(Stream::Tcp(s)),
                }
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept().map_err(err)?.0)),
        }
    }

    /// Like [`Listener::accept`], but give up after `patience` (an extra connection the
    /// source announced and never opened must not hang the destination).
    pub fn accept_within(&self, patience: Duration) -> Result<Stream> {
        let (fd, what) = match self {
            Listener::Tcp(l, _) => (std::os::fd::AsRawFd::as_raw_fd(l), self.describe()),
            Listener::Unix(l, _) => (std::os::fd::AsRawFd::as_raw_fd(l), self.describe()),
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = patience.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n <= 0 {
            return Err(MigrationError::Connect {
                action: "accept on",
                endpoint: what,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the source did not open its announced connection",
                ),
            });
        }
        self.accept()
    }

    /// The address actually bound (a TCP port 0 becomes the real port).
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l, _) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".to_string(),
            },
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_memory_files_travel_with_their_tag_over_a_unix_socket() {
        use std::io::{Read, Seek};
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (Stream::Unix(a), Stream::Unix(b));
        let file = tempfile_with(b"guest ram");

        a.send_fds(b"MEMFDS\0\0", &[std::os::fd::AsRawFd::as_raw_fd(&file)])
            .unwrap();
        let (tag, files) = b.recv_fds(8, 2).unwrap();
        let mut got = String::new();
        let mut received = &files[0];
        received.rewind().unwrap();
        received.read_to_string(&mut got).unwrap();

        assert_eq!(tag, b"MEMFDS\0\0");
        assert_eq!(files.len(), 1);
        assert_eq!(got, "guest ram");
    }

    #[test]
    fn test_file_descriptors_are_refused_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = Stream::Tcp(TcpStream::connect(listener.local_addr().unwrap()).unwrap());

        let err = tcp.send_fds(b"x", &[0]).unwrap_err().to_string();

        assert!(err.contains("unix:"), "{err}");
    }

    fn tempfile_with(bytes: &[u8]) -> std::fs::File {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("ferrite-mig-fd-{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    #[test]
    fn test_endpoints_parse_and_bad_ones_name_the_forms() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "tcp:[::1]:4444".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("[::1]:4444".into())
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/m.sock".into())
        );
        for bad in [
            "127.0.0.1:4444",
            "tcp:host",
            "tcp:host:99999",
            "unix:",
            "udp:x:1",
        ] {
            let err = bad.parse::<Endpoint>().unwrap_err().to_string();
            assert!(err.contains("tcp:HOST:PORT"), "{bad}: {err}");
        }
    }
}
