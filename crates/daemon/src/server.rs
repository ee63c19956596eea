//! Serving the router on the Unix socket and, optionally, on TCP with mutual TLS.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::rustls;

/// A request came over the TLS listener (an extension of those requests; requests on the
/// Unix socket have none): what the client reached this daemon by, which names a live
/// migration's destination certificate may be checked by.
#[derive(Debug, Clone)]
pub struct ViaTls {
    /// The server name the client asked for (SNI; none when it connected to an IP address).
    pub sni: Option<String>,
    /// The local address the client connected to.
    pub local: Option<SocketAddr>,
}

/// Errors bringing the listeners up.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket path is taken by something that is not a stale socket.
    #[error("{0} exists and is not a stale socket: is another ferrited running? Remove it or use --socket")]
    SocketInUse(String),
    /// Binding or preparing a listener failed.
    #[error("Cannot listen on {what}: {source}")]
    Listen {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS files are unusable.
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// Bind the API's Unix socket (mode 0660), replacing a stale socket.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    let listen_err = |source| ServeError::Listen {
        what: path.display().to_string(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let stale =
            meta.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_err();
        if !stale {
            return Err(ServeError::SocketInUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(listen_err)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(listen_err)?;
    Ok(listener)
}

/// Serve `router` on `listener` until the process ends.
pub async fn serve_unix(listener: UnixListener, router: Router) {
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!("API server stopped: {e}");
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|e| ServeError::Tls(format!("cannot read {}: {e}", path.display())))
}

/// A rustls server config that requires client certificates signed by `client_ca`.
pub fn tls_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<rustls::ServerConfig, ServeError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut read_pem(cert)?.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| ServeError::Tls(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(ServeError::Tls(format!(
            "{} holds no certificate",
            cert.display()
        )));
    }
    let key_der = rustls_pemfile::private_key(&mut read_pem(key)?.as_slice())
        .map_err(|e| ServeError::Tls(format!("{}: {e}", key.display())))?
        .ok_or_else(|| ServeError::Tls(format!("{} holds no private key", key.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls_pemfile::certs(&mut read_pem(client_ca)?.as_slice()) {
        let ca = ca.map_err(|e| ServeError::Tls(format!("{}: {e}", client_ca.display())))?;
        roots
            .add(ca)
            .map_err(|e| ServeError::Tls(format!("{}: {e}", client_ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| ServeError::Tls(format!("client CA {}: {e}", client_ca.display())))?;
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key_der)
        .map_err(|e| ServeError::Tls(format!("{} / {}: {e}", cert.display(), key.display())))
}

/// Serve `router` over TLS on `listener`, one task per connection.
pub async fn serve_tls(listener: TcpListener, config: rustls::ServerConfig, router: Router) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("TLS accept failed: {e}");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let local = tcp.local_addr().ok();
            let tls = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(%peer, "TLS handshake refused: {e}");
                    return;
                }
            };
            let sni = tls.get_ref().1.server_name().map(str::to_string);
            let router = router.layer(axum::Extension(ViaTls { sni, local }));
            let service = TowerToHyperService::new(router);
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, "TLS connection ended: {e}");
            }
        });
    }
}
