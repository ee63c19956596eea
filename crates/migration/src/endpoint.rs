//! Where a migration goes: a TCP address or a Unix socket, and the connection itself.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{MigrationError, Result};

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
}

impl Stream {
    /// Another handle on the same connection (a reader next to a writer, or a canceller).
    pub fn try_clone(&self) -> Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Cut the connection both ways: a blocked read or write on any handle returns.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Bound how long one read may block (None: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout)?,
            Stream::Unix(s) => s.set_read_timeout(timeout)?,
        }
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// A destination waiting for its source.
pub enum Listener {
    /// Listening on TCP.
    Tcp(TcpListener),
    /// Listening on a Unix socket (removed when dropped).
    Unix(UnixListener, PathBuf),
}

impl Endpoint {
    /// Connect to a listening destination, trying for up to `patience` (the destination may
    /// still be starting).
    pub fn connect(&self, patience: Duration) -> Result<Stream> {
        let start = std::time::Instant::now();
        loop {
            let attempt = match self {
                Endpoint::Tcp(addr) => TcpStream::connect(addr).map(|s| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
                Endpoint::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            };
            match attempt {
                Ok(stream) => return Ok(stream),
                Err(e) if start.elapsed() >= patience => {
                    return Err(MigrationError::Connect {
                        action: "connect to",
                        endpoint: self.to_string(),
                        source: e,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Listen for one source.
    pub fn listen(&self) -> Result<Listener> {
        let err = |source| MigrationError::Connect {
            action: "listen on",
            endpoint: self.to_string(),
            source,
        };
        match self {
            Endpoint::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr).map_err(err)?)),
            Endpoint::Unix(path) => Ok(Listener::Unix(
                UnixListener::bind(path).map_err(err)?,
                path.clone(),
            )),
        }
    }
}

impl Listener {
    /// Wait for the source to connect.
    pub fn accept(&self) -> Result<Stream> {
        let err = |source| MigrationError::Connect {
            action: "accept on",
            endpoint: self.describe(),
            source,
        };
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().map_err(err)?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept().map_err(err)?.0)),
        }
    }

    /// The address actually bound (a TCP port 0 becomes the real port).
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
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
