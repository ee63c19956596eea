//! Mutual-certificate TLS for migrations between hosts (rustls, ring provider, TLS 1.3).
//!
//! Both sides hold a certificate chain with its private key and a CA bundle ([`TlsFiles`]).
//! The source ([`TlsClient`]) verifies the destination's certificate against its CA bundle for
//! the destination's host (a DNS name or an IP address) or an explicit server name; the
//! destination ([`TlsServer`]) requires a client certificate and verifies it against its own
//! CA bundle. A connection without a valid certificate on either side is refused before any
//! byte of the migration stream moves.
//!
//! TLS 1.3 completes the client's side of the handshake before the server has checked the
//! client's certificate, so the destination confirms with [`ACCEPTED`] once it has; the source
//! waits for it, and a refused certificate is then reported as such, in the handshake.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{
    AlertDescription, ClientConfig, ClientConnection, RootCertStore, ServerConfig,
    ServerConnection, StreamOwned,
};

use crate::endpoint::Endpoint;
use crate::error::{MigrationError, Result};
use crate::wire;

/// How long the TLS handshake (and the destination's confirmation) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the destination sends first over a TLS connection, once it has verified the source's
/// certificate.
const ACCEPTED: &[u8; 8] = b"FERRTLS\x01";

fn tls(msg: impl Into<String>) -> MigrationError {
    MigrationError::Tls(msg.into())
}

/// The PEM files of one side: its certificate chain (leaf first), the chain's private key,
/// and the CA certificates the peer's certificate must be signed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, PEM (leaf first, then any intermediates).
    pub cert: PathBuf,
    /// The leaf certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1; unencrypted).
    pub key: PathBuf,
    /// CA bundle the peer's certificate is verified against, PEM.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// Three optional paths as the caller's options give them: all three (TLS), none (no
    /// TLS), or an error naming the missing ones by `names` (the options' names, in the order
    /// cert, key, ca).
    pub fn from_options(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
        names: [&str; 3],
    ) -> Result<Option<TlsFiles>> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                ca: ca.to_path_buf(),
            })),
            (cert, key, ca) => {
                let missing: Vec<&str> = [cert.is_none(), key.is_none(), ca.is_none()]
                    .iter()
                    .zip(names)
                    .filter(|(missing, _)| **missing)
                    .map(|(_, name)| name)
                    .collect();
                Err(tls(format!(
                    "TLS needs all of {}, {} and {}: {} {} missing (the certificate chain, its \
                     private key and the CA bundle that signed the peer's certificate, as PEM \
                     files)",
                    names[0],
                    names[1],
                    names[2],
                    missing.join(" and "),
                    if missing.len() == 1 { "is" } else { "are" }
                )))
            }
        }
    }

    fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
        std::fs::read(path).map_err(|e| {
            tls(format!(
                "Cannot read the TLS {what} {}: {e}; give a readable PEM file",
                path.display()
            ))
        })
    }

    fn certs(path: &Path, what: &str, fix: &str) -> Result<Vec<CertificateDer<'static>>> {
        let pem = Self::read(path, what)?;
        let certs = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| {
                tls(format!(
                    "The TLS {what} {} is not valid PEM ({e}): {fix}",
                    path.display()
                ))
            })?;
        if certs.is_empty() {
            return Err(tls(format!(
                "The TLS {what} {} holds no certificate: {fix}",
                path.display()
            )));
        }
        Ok(certs)
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>> {
        Self::certs(
            &self.cert,
            "certificate chain",
            "give a PEM file with this side's certificate (-----BEGIN CERTIFICATE-----) first, \
             then any intermediate CA certificates",
        )
    }

    fn private_key(&self) -> Result<PrivateKeyDer<'static>> {
        let pem = Self::read(&self.key, "private key")?;
        let fix = "give a PEM file with the certificate's unencrypted private key (-----BEGIN \
                   PRIVATE KEY-----, EC PRIVATE KEY or RSA PRIVATE KEY)";
        rustls_pemfile::private_key(&mut pem.as_slice())
            .map_err(|e| {
                tls(format!(
                    "The TLS private key {} is not valid PEM ({e}): {fix}",
                    self.key.display()
                ))
            })?
            .ok_or_else(|| {
                tls(format!(
                    "The TLS private key {} holds no private key: {fix}",
                    self.key.display()
                ))
            })
    }

    fn roots(&self) -> Result<RootCertStore> {
        let fix = "give a PEM file with the certificate of the CA that signed the peer's \
                   certificate";
        let mut roots = RootCertStore::empty();
        for cert in Self::certs(&self.ca, "CA bundle", fix)? {
            roots.add(cert).map_err(|e| {
                tls(format!(
                    "The TLS CA bundle {} holds a certificate that cannot be used as a CA \
                     ({e}): {fix}",
                    self.ca.display()
                ))
            })?;
        }
        Ok(roots)
    }

    /// The error of a certificate chain and key rustls does not take together.
    fn key_error(&self, e: rustls::Error) -> MigrationError {
        match e {
            rustls::Error::InconsistentKeys(_) => tls(format!(
                "The TLS private key {} does not belong to the certificate {}: give the key \
                 the certificate was made for",
                self.key.display(),
                self.cert.display()
            )),
            rustls::Error::InvalidCertificate(e) => {
                let detail = format!("{e:?}");
                let fix = if detail.contains("UnsupportedCertVersion") {
                    "it is an X.509 v1 certificate: make a v3 one (openssl x509 -req makes v3 \
                     when given extensions, e.g. -extfile FILE with a subjectAltName= line)"
                } else {
                    "give a valid X.509 v3 certificate, PEM"
                };
                tls(format!(
                    "The TLS certificate {} cannot be used ({detail}): {fix}",
                    self.cert.display()
                ))
            }
            e => tls(format!(
                "Cannot use the TLS certificate {} with the private key {} ({e}): give an \
                 ECDSA, Ed25519 or RSA key and its certificate",
                self.cert.display(),
                self.key.display()
            )),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The source's TLS: its certificate for client authentication, the CA bundle that verifies
/// the destination, and the name the destination's certificate must carry.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Load `files` (every error names the file and what to give instead). The destination's
    /// certificate must be issued for `server_name` (a DNS name or an IP address), or when
    /// None, for the host part of the endpoint connected to.
    pub fn new(files: &TlsFiles, server_name: Option<&str>) -> Result<Self> {
        let server_name = server_name.map(parse_server_name).transpose()?;
        let (chain, key, roots) = (files.chain()?, files.private_key()?, files.roots()?);
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls(format!("Cannot set up TLS: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| files.key_error(e))?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The name the destination's certificate is checked against when connecting to
    /// `endpoint` (also checks that the endpoint can carry TLS).
    pub fn server_name_for(&self, endpoint: &Endpoint) -> Result<ServerName<'static>> {
        let addr = tcp_addr(endpoint)?;
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        parse_server_name(host).map_err(|_| {
            tls(format!(
                "The destination host {host:?} is neither a DNS name nor an IP address a \
                 certificate can name: give tls_server_name"
            ))
        })
    }

    /// TLS over a connected `tcp` to `endpoint`: handshake, and the destination's
    /// confirmation that it accepted our certificate.
    pub(crate) fn handshake(&self, tcp: TcpStream, endpoint: &Endpoint) -> Result<TlsStream> {
        let name = self.server_name_for(endpoint)?;
        let shown = server_name_text(&name);
        let raw = tcp.try_clone()?;
        raw.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        raw.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let conn = ClientConnection::new(self.config.clone(), name)
            .map_err(|e| tls(format!("Cannot start TLS: {e}")))?;
        let mut stream = StreamOwned::new(conn, tcp);
        let fail = |e: std::io::Error| client_error(&e, endpoint, &shown);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).map_err(fail)?;
        }
        let mut ack = [0u8; ACCEPTED.len()];
        stream.read_exact(&mut ack).map_err(fail)?;
        if &ack != ACCEPTED {
            return Err(tls(format!(
                "{endpoint} completed the TLS handshake but is not a Ferrite migration \
                 destination"
            )));
        }
        raw.set_read_timeout(None)?;
        raw.set_write_timeout(None)?;
        Ok(TlsStream::new(Conn::Client(stream), raw))
    }
}

/// The destination's TLS: its certificate, and the CA bundle every source's certificate must
/// be signed by (a source without one is refused).
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer").finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Load `files` (every error names the file and what to give instead).
    pub fn new(files: &TlsFiles) -> Result<Self> {
        let (chain, key, roots) = (files.chain()?, files.private_key()?, files.roots()?);
        let provider = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| {
            tls(format!(
                "Cannot verify client certificates with the TLS CA bundle {} ({e}): give a \
                 PEM file with the certificate of the CA that signed the source's certificate",
                files.ca.display()
            ))
        })?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls(format!("Cannot set up TLS: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| files.key_error(e))?;
        // One connection per process: nothing to resume.
        config.send_tls13_tickets = 0;
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// TLS over an accepted `tcp`: the source's certificate is verified, then confirmed. A
    /// plaintext Ferrite source is answered in its own protocol (a refusal naming the TLS
    /// options) before the error returns.
    pub(crate) fn handshake(&self, mut tcp: TcpStream) -> Result<TlsStream> {
        let raw = tcp.try_clone()?;
        raw.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        raw.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut first = [0u8; 1];
        match tcp.peek(&mut first) {
            Ok(0) => {
                return Err(tls(
                    "The source closed the connection before the TLS handshake",
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(server_error(&e)),
        }
        if first[0] == wire::MAGIC[0] {
            let reason = "this destination takes only TLS migrations: give the migrate request \
                          tls_cert, tls_key and tls_ca";
            // Read the hello so the refusal is not lost to a reset.
            let _ = wire::read_hello(&mut tcp);
            let _ = wire::write_reply(&mut tcp, &wire::Reply::Refuse(reason.to_string()));
            return Err(tls(
                "The source connected without TLS, but this destination takes only TLS \
                 migrations (--incoming-tls-cert, --incoming-tls-key, --incoming-tls-ca): give \
                 the source's migrate request tls_cert, tls_key and tls_ca",
            ));
        }
        let conn = ServerConnection::new(self.config.clone())
            .map_err(|e| tls(format!("Cannot start TLS: {e}")))?;
        let mut stream = StreamOwned::new(conn, tcp);
        let fail = |e: std::io::Error| server_error(&e);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).map_err(fail)?;
        }
        stream.write_all(ACCEPTED).map_err(fail)?;
        stream.flush().map_err(fail)?;
        raw.set_read_timeout(None)?;
        raw.set_write_timeout(None)?;
        Ok(TlsStream::new(Conn::Server(stream), raw))
    }
}

/// TLS runs over TCP only: a `unix:` endpoint never leaves the host.
pub fn check_endpoint(endpoint: &Endpoint) -> Result<()> {
    tcp_addr(endpoint).map(|_| ())
}

/// The `HOST:PORT` of a TCP endpoint; a `unix:` one cannot carry TLS.
fn tcp_addr(endpoint: &Endpoint) -> Result<&str> {
    match endpoint {
        Endpoint::Tcp(addr) => Ok(addr),
        Endpoint::Unix(_) => Err(tls(format!(
            "TLS is for migrations between hosts over tcp:HOST:PORT; {endpoint} is a Unix \
             socket on this host: drop the TLS options or migrate over tcp:"
        ))),
    }
}

fn parse_server_name(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_string()).map_err(|_| {
        tls(format!(
            "tls_server_name {name:?} is neither a DNS name nor an IP address"
        ))
    })
}

fn server_name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// The rustls error inside an I/O error, if that is what it is.
fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref())
}

/// Alerts a peer sends when it does not accept our certificate.
fn certificate_alert(alert: &AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRequired
            | AlertDescription::AccessDenied
            | AlertDescription::DecryptError
    )
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn is_closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// The source's view of a failed handshake with `endpoint`, whose certificate must name
/// `name`.
fn client_error(e: &std::io::Error, endpoint: &Endpoint, name: &str) -> MigrationError {
    let text = match rustls_error(e) {
        Some(rustls::Error::InvalidCertificate(cert)) => format!(
            "The destination {endpoint} presented a certificate this source does not accept \
             ({cert}): it must be signed by the CA in tls_ca and issued for {name} (the \
             destination's host, or tls_server_name)"
        ),
        Some(rustls::Error::AlertReceived(alert)) if certificate_alert(alert) => format!(
            "The destination {endpoint} refused this source's certificate (TLS alert {alert:?}): \
             tls_cert must be signed by the CA in the destination's --incoming-tls-ca"
        ),
        Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => {
            format!(
                "The destination {endpoint} does not answer in TLS ({e}): it takes plaintext \
                 migrations; start it with --incoming-tls-cert, --incoming-tls-key and \
                 --incoming-tls-ca, or migrate without tls_cert, tls_key and tls_ca"
            )
        }
        Some(other) => format!("The TLS handshake with {endpoint} failed: {other}"),
        None if is_timeout(e) => format!(
            "The destination {endpoint} did not complete the TLS handshake within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
        None if is_closed(e) => format!(
            "The destination {endpoint} closed the connection during the TLS handshake: it \
             takes plaintext migrations only (start it with --incoming-tls-cert, \
             --incoming-tls-key and --incoming-tls-ca), or it refused this source's \
             certificate (see its log)"
        ),
        None => format!("The TLS handshake with {endpoint} failed: {e}"),
    };
    tls(text)
}

/// The destination's view of a failed handshake.
fn server_error(e: &std::io::Error) -> MigrationError {
    let text = match rustls_error(e) {
        Some(rustls::Error::InvalidCertificate(cert)) => format!(
            "Refused the source's certificate ({cert}): it must be signed by the CA in \
             --incoming-tls-ca"
        ),
        Some(rustls::Error::NoCertificatesPresented) => {
            "The source presented no certificate: give its migrate request tls_cert and \
             tls_key, signed by the CA in --incoming-tls-ca"
                .to_string()
        }
        Some(rustls::Error::AlertReceived(alert)) if certificate_alert(alert) => format!(
            "The source refused this destination's certificate (TLS alert {alert:?}): \
             --incoming-tls-cert must be signed by the CA in the source's tls_ca and be issued \
             for the host the source connects to (or its tls_server_name)"
        ),
        Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => {
            format!("The source did not start a TLS handshake ({e})")
        }
        Some(other) => format!("The TLS handshake with the source failed: {other}"),
        None if is_timeout(e) => format!(
            "The source did not complete the TLS handshake within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
        None if is_closed(e) => "The source closed the connection during the TLS handshake \
                                 (it did not accept this destination's certificate?)"
            .to_string(),
        None => format!("The TLS handshake with the source failed: {e}"),
    };
    tls(text)
}

/// One side's TLS connection.
enum Conn {
    Client(StreamOwned<ClientConnection, TcpStream>),
    Server(StreamOwned<ServerConnection, TcpStream>),
}

/// A TLS connection shared by every handle of one [`crate::Stream`]: rustls connections
/// cannot be cloned, so the handles take turns through a mutex, held only while records are
/// encrypted or decrypted: a read waits for the socket without it, so one thread may read
/// while another writes (post-copy does). Cancelling, shutting down and timeouts go to a raw
/// clone of the socket, without the mutex: a shutdown returns a read blocked while holding it.
pub struct TlsStream {
    conn: Arc<Mutex<Conn>>,
    raw: TcpStream,
}

impl TlsStream {
    fn new(conn: Conn, raw: TcpStream) -> Self {
        Self {
            conn: Arc::new(Mutex::new(conn)),
            raw,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Another handle on the same connection.
    pub(crate) fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            conn: self.conn.clone(),
            raw: self.raw.try_clone()?,
        })
    }

    /// Cut the connection both ways (without the mutex).
    pub(crate) fn shutdown(&self) {
        let _ = self.raw.shutdown(std::net::Shutdown::Both);
    }

    /// Bound how long one read may block (without the mutex).
    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.raw.set_read_timeout(timeout)
    }
}

/// rustls reports a connection cut without a TLS close as an error with a long text; say
/// it the way a plain connection would.
fn plain(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the peer closed the connection",
        )
    } else {
        e
    }
}

impl Read for TlsStream {
    /// Reads wait for the socket without the mutex, so one handle may write (post-copy page
    /// requests, replies) while another waits for data: the lock is held only to decrypt what
    /// already arrived.
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.lock().read_plaintext(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => return other.map_err(plain),
            }
            wait_readable(&self.raw, self.raw.read_timeout()?)?;
            self.lock().receive_records()?;
        }
    }
}

impl Conn {
    /// Plaintext already decrypted, or WouldBlock when none is.
    fn read_plaintext(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Client(s) => s.conn.reader().read(buf),
            Conn::Server(s) => s.conn.reader().read(buf),
        }
    }

    /// Take in the records the socket holds (it is readable, so this does not block) and
    /// decrypt them.
    fn receive_records(&mut self) -> std::io::Result<()> {
        let bad = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        match self {
            Conn::Client(s) => {
                s.conn.read_tls(&mut s.sock)?;
                s.conn.process_new_packets().map_err(bad)?;
            }
            Conn::Server(s) => {
                s.conn.read_tls(&mut s.sock)?;
                s.conn.process_new_packets().map_err(bad)?;
            }
        }
        Ok(())
    }
}

/// Wait until `sock` has data (or is closed), at most `timeout`.
fn wait_readable(sock: &TcpStream, timeout: Option<Duration>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut fds = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
    loop {
        // SAFETY: `fds` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut fds, 1, ms) };
        match n {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "timed out waiting for the peer",
                ))
            }
            n if n > 0 => return Ok(()),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut *self.lock() {
            Conn::Client(s) => s.write(buf),
            Conn::Server(s) => s.write(buf),
        }
        .map_err(plain)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut *self.lock() {
            Conn::Client(s) => s.flush(),
            Conn::Server(s) => s.flush(),
        }
        .map_err(plain)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufReader, BufWriter};
    use std::process::Command;
    use std::sync::mpsc;
    use std::thread::JoinHandle;

    use super::*;
    use crate::endpoint::{Listener, Stream};
    use crate::wire::{Hello, Reply};

    /// Certificates made with the `openssl` CLI in a scratch directory.
    struct Pki {
        dir: PathBuf,
    }

    impl Pki {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("ferrite-mig-tls-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self { dir }
        }

        fn openssl(&self, args: &[&str]) {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&self.dir)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        fn new_key(&self, name: &str, extra: &[&str], out: &str) {
            let (key, subj) = (format!("{name}.key"), format!("/CN={name}"));
            let mut args = vec!["req"];
            args.extend_from_slice(extra);
            args.extend_from_slice(&[
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                out,
                "-subj",
                &subj,
            ]);
            self.openssl(&args);
        }

        /// A self-signed CA `NAME.pem` / `NAME.key`.
        fn ca(&self, name: &str) -> &Self {
            self.new_key(name, &["-x509", "-days", "2"], &format!("{name}.pem"));
            self
        }

        /// `NAME.pem` / `NAME.key` signed by `ca`, for the subject alternative names `san`.
        fn leaf(&self, name: &str, ca: &str, san: &str) -> &Self {
            let (csr, ext, pem) = (
                format!("{name}.csr"),
                format!("{name}.ext"),
                format!("{name}.pem"),
            );
            self.new_key(name, &[], &csr);
            std::fs::write(self.dir.join(&ext), format!("subjectAltName={san}\n")).unwrap();
            let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
            self.openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ]);
            self
        }

        fn path(&self, file: &str) -> PathBuf {
            self.dir.join(file)
        }

        fn files(&self, leaf: &str, ca: &str) -> TlsFiles {
            TlsFiles {
                cert: self.path(&format!("{leaf}.pem")),
                key: self.path(&format!("{leaf}.key")),
                ca: self.path(&format!("{ca}.pem")),
            }
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A CA, a destination certificate for 127.0.0.1 and a source certificate, both signed by
    /// it.
    fn pki(tag: &str) -> Pki {
        let pki = Pki::new(tag);
        pki.ca("ca")
            .leaf("dst", "ca", "IP:127.0.0.1,DNS:localhost")
            .leaf("src", "ca", "DNS:source.example");
        pki
    }

    fn loopback(tls: Option<&TlsServer>) -> (Listener, Endpoint) {
        let listener = "tcp:127.0.0.1:0"
            .parse::<Endpoint>()
            .unwrap()
            .listen(tls)
            .unwrap();
        let endpoint = listener.describe().parse().unwrap();
        (listener, endpoint)
    }

    fn accept_in_thread<T: Send + 'static>(
        listener: Listener,
        then: impl FnOnce(Stream) -> T + Send + 'static,
    ) -> JoinHandle<Result<T>> {
        std::thread::spawn(move || listener.accept().map(then))
    }

    fn hello() -> Hello {
        Hello {
            ferrite_version: "test".into(),
            config: serde_json::json!({}),
            regions: Vec::new(),
            memory_fds: false,
            postcopy: false,
            disks: Vec::new(),
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn test_mutual_tls_carries_the_stream_both_ways_with_cloned_handles() {
        // Arrange: the destination verified by its IP address (no server name given).
        let pki = pki("ok");
        let server = TlsServer::new(&pki.files("dst", "ca")).unwrap();
        let client = TlsClient::new(&pki.files("src", "ca"), None).unwrap();
        let (listener, endpoint) = loopback(Some(&server));
        let payload = pattern(3 << 20);
        let expected = payload.clone();
        let dst = accept_in_thread(listener, move |mut stream| {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let hello = wire::read_hello(&mut reader).unwrap();
            wire::write_reply(&mut stream, &Reply::Accept).unwrap();
            let mut got = vec![0u8; expected.len()];
            wire::read_pages_into(&mut reader, &mut got).unwrap();
            drop(reader);
            wire::write_reply(&mut stream, &Reply::Ready).unwrap();
            (stream.is_tls(), hello.ferrite_version, got == expected)
        });

        // Act
        let stream = endpoint
            .connect(Duration::from_secs(5), Some(&client))
            .unwrap();
        let mut reader = stream.try_clone().unwrap();
        let mut writer = BufWriter::new(stream);
        wire::write_hello(writer.get_mut(), &hello()).unwrap();
        let accept = wire::read_reply(&mut reader).unwrap();
        writer.write_all(&payload).unwrap();
        writer.flush().unwrap();
        let ready = wire::read_reply(&mut reader).unwrap();
        let (dst_tls, version, same) = dst.join().unwrap().unwrap();

        // Assert
        assert!(reader.is_tls());
        assert!(dst_tls);
        assert_eq!((accept, ready), (Reply::Accept, Reply::Ready));
        assert_eq!(version, "test");
        assert!(same, "the payload arrived changed");
    }

    #[test]
    fn test_client_certificate_signed_by_another_ca_is_refused_on_both_sides() {
        // Arrange
        let pki = pki("other-ca");
        pki.ca("rogue")
            .leaf("intruder", "rogue", "DNS:source.example");
        let server = TlsServer::new(&pki.files("dst", "ca")).unwrap();
        let client = TlsClient::new(&pki.files("intruder", "ca"), None).unwrap();
        let (listener, endpoint) = loopback(Some(&server));
        let dst = accept_in_thread(listener, |_| ());

        // Act
        let src_err = endpoint
            .connect(Duration::from_secs(5), Some(&client))
            .err()
            .expect("the source must fail")
            .to_string();
        let dst_err = dst.join().unwrap().unwrap_err().to_string();

        // Assert
        assert!(
            src_err.contains("refused this source's certificate"),
            "{src_err}"
        );
        assert!(src_err.contains("--incoming-tls-ca"), "{src_err}");
        assert!(
            dst_err.contains("Refused the source's certificate"),
            "{dst_err}"
        );
    }

    #[test]
    fn test_destination_certificate_must_name_the_host_or_the_server_name() {
        // Arrange
        let pki = pki("name");
        let server = TlsServer::new(&pki.files("dst", "ca")).unwrap();
        let wrong = TlsClient::new(&pki.files("src", "ca"), Some("db.example")).unwrap();
        let by_dns = TlsClient::new(&pki.files("src", "ca"), Some("localhost")).unwrap();
        let (listener, endpoint) = loopback(Some(&server));
        let dst = accept_in_thread(listener, |_| ());
        let (listener2, endpoint2) = loopback(Some(&server));
        let dst2 = accept_in_thread(listener2, |s| s.is_tls());

        // Act
        let src_err = endpoint
            .connect(Duration::from_secs(5), Some(&wrong))
            .err()
            .expect("the source must fail")
            .to_string();
        let dst_err = dst.join().unwrap().unwrap_err().to_string();
        let good = endpoint2.connect(Duration::from_secs(5), Some(&by_dns));

        // Assert
        assert!(src_err.contains("db.example"), "{src_err}");
        assert!(src_err.contains("does not accept"), "{src_err}");
        assert!(
            dst_err.contains("refused this destination's certificate"),
            "{dst_err}"
        );
        assert!(good.is_ok_and(|s| s.is_tls()));
        assert!(dst2.join().unwrap().unwrap());
    }

    #[test]
    fn test_plaintext_source_is_refused_in_its_own_protocol() {
        // Arrange
        let pki = pki("plain-src");
        let server = TlsServer::new(&pki.files("dst", "ca")).unwrap();
        let (listener, endpoint) = loopback(Some(&server));
        let dst = accept_in_thread(listener, |_| ());

        // Act
        let mut stream = endpoint.connect(Duration::from_secs(5), None).unwrap();
        wire::write_hello(&mut stream, &hello()).unwrap();
        let reply = wire::read_reply(&mut stream).unwrap();
        let dst_err = dst.join().unwrap().unwrap_err();

        // Assert
        match reply {
            Reply::Refuse(reason) => assert!(reason.contains("tls_cert"), "{reason}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(matches!(dst_err, MigrationError::Tls(_)), "{dst_err}");
        assert!(dst_err.to_string().contains("without TLS"), "{dst_err}");
    }

    #[test]
    fn test_tls_source_to_a_plaintext_destination_fails_clearly_on_both_sides() {
        // Arrange: a plaintext destination that answers as `ferrite run --incoming` does.
        let pki = pki("plain-dst");
        let client = TlsClient::new(&pki.files("src", "ca"), None).unwrap();
        let (listener, endpoint) = loopback(None);
        let dst = accept_in_thread(listener, |mut stream| {
            let err = wire::read_hello(&mut stream).unwrap_err();
            let _ = wire::write_reply(&mut stream, &Reply::Refuse(err.to_string()));
            err.to_string()
        });

        // Act
        let src_err = endpoint
            .connect(Duration::from_secs(5), Some(&client))
            .err()
            .expect("the source must fail");
        let dst_err = dst.join().unwrap().unwrap();

        // Assert
        assert!(matches!(src_err, MigrationError::Tls(_)), "{src_err}");
        assert!(
            src_err.to_string().contains("--incoming-tls-cert"),
            "{src_err}"
        );
        assert!(dst_err.contains("opened a TLS connection"), "{dst_err}");
    }

    #[test]
    fn test_shutdown_from_another_handle_ends_a_read_blocked_holding_the_connection() {
        // Arrange: the destination never writes; a source handle blocks reading.
        let pki = pki("cancel");
        let server = TlsServer::new(&pki.files("dst", "ca")).unwrap();
        let client = TlsClient::new(&pki.files("src", "ca"), None).unwrap();
        let (listener, endpoint) = loopback(Some(&server));
        let (hold_tx, hold_rx) = mpsc::channel::<()>();
        let dst = accept_in_thread(listener, move |stream| {
            let _ = hold_rx.recv();
            drop(stream);
        });
        let stream = endpoint
            .connect(Duration::from_secs(5), Some(&client))
            .unwrap();
        let mut reader = stream.try_clone().unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            let _ = done_tx.send(reader.read(&mut b).map(|_| ()).is_err());
        });
        std::thread::sleep(Duration::from_millis(200));

        // Act
        stream.shutdown();
        let ended = done_rx.recv_timeout(Duration::from_secs(5));
        let mut writer = stream.try_clone().unwrap();
        let write = writer.write_all(b"after").and_then(|()| writer.flush());

        // Assert: the read returned (an error: no TLS close), and the connection is free.
        assert_eq!(ended, Ok(true));
        assert!(write.is_err());
        let _ = hold_tx.send(());
        dst.join().unwrap().unwrap();
    }

    #[test]
    fn test_bad_pem_files_are_named_with_the_fix() {
        // Arrange
        let pki = pki("files");
        pki.ca("other");
        std::fs::write(pki.path("empty.pem"), "").unwrap();
        let good = pki.files("src", "ca");
        let missing = TlsFiles {
            cert: pki.path("nope.pem"),
            ..good.clone()
        };
        let cert_as_key = TlsFiles {
            key: pki.path("src.pem"),
            ..good.clone()
        };
        let empty_ca = TlsFiles {
            ca: pki.path("empty.pem"),
            ..good.clone()
        };
        let other_key = TlsFiles {
            key: pki.path("dst.key"),
            ..good.clone()
        };
        // Signed without extensions: an X.509 v1 certificate, which WebPKI refuses.
        pki.new_key("v1", &[], "v1.csr");
        pki.openssl(&[
            "x509", "-req", "-in", "v1.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-out", "v1.pem",
            "-days", "2",
        ]);
        let v1 = pki.files("v1", "ca");

        // Act
        let errors: Vec<String> = [&missing, &cert_as_key, &empty_ca, &other_key, &v1]
            .iter()
            .map(|f| TlsClient::new(f, None).unwrap_err().to_string())
            .collect();
        let server_missing = TlsServer::new(&missing).unwrap_err().to_string();

        // Assert
        assert!(errors[0].contains("nope.pem"), "{}", errors[0]);
        assert!(errors[0].contains("readable PEM file"), "{}", errors[0]);
        assert!(errors[1].contains("src.pem"), "{}", errors[1]);
        assert!(errors[1].contains("holds no private key"), "{}", errors[1]);
        assert!(errors[2].contains("empty.pem"), "{}", errors[2]);
        assert!(errors[2].contains("holds no certificate"), "{}", errors[2]);
        assert!(errors[3].contains("dst.key"), "{}", errors[3]);
        assert!(errors[3].contains("does not belong"), "{}", errors[3]);
        assert!(errors[4].contains("v1.pem"), "{}", errors[4]);
        assert!(errors[4].contains("make a v3 one"), "{}", errors[4]);
        assert!(server_missing.contains("nope.pem"), "{server_missing}");
    }

    #[test]
    fn test_tls_options_come_all_three_or_none() {
        let names = ["tls_cert", "tls_key", "tls_ca"];
        let (cert, ca) = (Path::new("/c.pem"), Path::new("/ca.pem"));

        let none = TlsFiles::from_options(None, None, None, names).unwrap();
        let all = TlsFiles::from_options(Some(cert), Some(cert), Some(ca), names).unwrap();
        let no_key = TlsFiles::from_options(Some(cert), None, Some(ca), names)
            .unwrap_err()
            .to_string();
        let only_ca = TlsFiles::from_options(None, None, Some(ca), names)
            .unwrap_err()
            .to_string();

        assert_eq!(none, None);
        assert_eq!(all.map(|f| f.ca), Some(ca.to_path_buf()));
        assert!(no_key.contains("tls_key is missing"), "{no_key}");
        assert!(
            only_ca.contains("tls_cert and tls_key are missing"),
            "{only_ca}"
        );
    }

    #[test]
    fn test_server_names_come_from_the_endpoint_and_tls_over_unix_is_refused() {
        // Arrange
        let pki = pki("names");
        let client = TlsClient::new(&pki.files("src", "ca"), None).unwrap();
        let server = TlsServer::new(&pki.files("dst", "ca")).unwrap();
        let name = |e: &str| client.server_name_for(&e.parse().unwrap());

        // Act
        let ip = name("tcp:10.0.0.2:7000").unwrap();
        let v6 = name("tcp:[::1]:7000").unwrap();
        let dns = name("tcp:dest-host:7000").unwrap();
        let unix = name("unix:/run/m.sock").unwrap_err().to_string();
        let unix_listen = "unix:/tmp/never-bound.sock"
            .parse::<Endpoint>()
            .unwrap()
            .listen(Some(&server))
            .err()
            .expect("TLS over unix: must be refused")
            .to_string();
        let bad_name = TlsClient::new(&pki.files("src", "ca"), Some("not a name"))
            .unwrap_err()
            .to_string();

        // Assert
        assert_eq!(server_name_text(&ip), "10.0.0.2");
        assert!(matches!(v6, ServerName::IpAddress(_)), "{v6:?}");
        assert!(matches!(dns, ServerName::DnsName(_)), "{dns:?}");
        assert!(unix.contains("tcp:HOST:PORT"), "{unix}");
        assert!(unix_listen.contains("Unix socket"), "{unix_listen}");
        assert!(bad_name.contains("tls_server_name"), "{bad_name}");
    }
}
