//! Talking to another `ferrited` (a live migration's destination): over its Unix socket when
//! both daemons run on this host, or over HTTPS to its `--tls-listen` with this daemon's own
//! certificate as the client identity. Requests are blocking ([`api::client`]) and run on
//! the blocking pool.

use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use api::client::{Client, ClientError};
use api::{ApiError, ErrorCode, IncomingMigration, IncomingMigrationRequest};
use tokio_rustls::rustls;

use crate::args::DaemonArgs;

/// How long a request to another daemon may take (a reservation starts a VMM there).
const PEER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting to another daemon may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Another daemon.
#[derive(Clone)]
pub enum Peer {
    /// Its API socket on this host.
    Unix(PathBuf),
    /// `https://HOST:PORT`.
    Https {
        /// Host name or IP address (no brackets).
        host: String,
        /// Port.
        port: u16,
        /// Our client identity and the CA its certificate must chain to.
        config: Arc<rustls::ClientConfig>,
    },
}

fn bad_to(message: String) -> ApiError {
    ApiError::bad_field("to", message)
}

/// `(host, port)` of `https://HOST:PORT[/]`.
fn parse_https(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("https://")?.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

impl Peer {
    /// The daemon `to` names: an absolute socket path, or `https://HOST:PORT`.
    pub fn parse(to: &str, args: &DaemonArgs) -> Result<Peer, ApiError> {
        if to.starts_with("https://") {
            let (host, port) = parse_https(to).ok_or_else(|| {
                bad_to(format!(
                    "to {to:?}: write https://HOST:PORT (the destination daemon's --tls-listen)"
                ))
            })?;
            let config = client_tls(args)?;
            return Ok(Peer::Https {
                host,
                port,
                config: Arc::new(config),
            });
        }
        if to.starts_with('/') {
            return Ok(Peer::Unix(PathBuf::from(to)));
        }
        Err(bad_to(format!(
            "to {to:?}: give the destination daemon's API socket (an absolute path, for a daemon on this host) or https://HOST:PORT"
        )))
    }

    /// How the destination is named in messages.
    pub fn describe(&self) -> String {
        match self {
            Peer::Unix(path) => path.display().to_string(),
            Peer::Https { host, port, .. } => format!("https://{}", host_port(host, *port)),
        }
    }

    /// The host name or address we checked the destination's certificate for (HTTPS only).
    pub fn tls_host(&self) -> Option<&str> {
        match self {
            Peer::Unix(_) => None,
            Peer::Https { host, .. } => Some(host),
        }
    }

    /// Whether the destination may be on another host (reached over the network, not its
    /// Unix socket).
    pub fn is_remote(&self) -> bool {
        matches!(self, Peer::Https { .. })
    }

    /// The host our VMM reaches the destination's VMM at when it listens on every address.
    fn host(&self) -> String {
        match self {
            Peer::Unix(_) => "127.0.0.1".to_string(),
            Peer::Https { host, .. } => host.clone(),
        }
    }

    /// The endpoint our VMM sends the VM to: `endpoint` as the destination reported it, with
    /// an unspecified host (it listens everywhere) replaced by the host we reach it at.
    pub fn reachable_endpoint(&self, endpoint: &str) -> String {
        let Some((host, port)) = endpoint
            .strip_prefix("tcp:")
            .and_then(|a| a.rsplit_once(':'))
        else {
            return endpoint.to_string();
        };
        let ip: Option<IpAddr> = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok();
        match ip {
            Some(ip) if ip.is_unspecified() => {
                format!("tcp:{}", host_port(&self.host(), port.parse().unwrap_or(0)))
            }
            _ => endpoint.to_string(),
        }
    }

    /// One request; the answer's body (empty for 204).
    async fn call(
        &self,
        method: &'static str,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, ClientError> {
        let peer = self.clone();
        let task = tokio::task::spawn_blocking(move || match &peer {
            Peer::Unix(socket) => Client::new(socket)
                .with_read_timeout(Some(PEER_TIMEOUT))
                .request(method, &path, body.as_deref())
                .map(|r| r.body),
            Peer::Https { host, port, config } => {
                let stream = tls_connect(host, *port, config.clone())?;
                api::client::request_on(stream, host, method, &path, body.as_deref())
                    .map(|r| r.body)
            }
        });
        task.await
            .map_err(|e| ClientError::Protocol(format!("the request task failed: {e}")))?
    }

    /// Reserve the VM's name at the destination and start its incoming VMM there.
    pub async fn reserve(
        &self,
        req: &IncomingMigrationRequest,
    ) -> Result<IncomingMigration, ApiError> {
        let body = serde_json::to_vec(req).map_err(crate::error::internal)?;
        let answer = self
            .call(
                "POST",
                api::routes::INCOMING_MIGRATIONS.to_string(),
                Some(body),
            )
            .await
            .map_err(|e| self.refusal(e))?;
        serde_json::from_slice(&answer).map_err(|e| {
            self.unavailable(format!(
                "its answer to the reservation is not an IncomingMigration: {e}"
            ))
        })
    }

    /// Drop a reservation whose VMM never got the VM (our VMM refused to start or failed
    /// before its commit). The destination refuses if the guest already runs there.
    pub async fn abandon(&self, name: &str) -> Result<(), ApiError> {
        match self
            .call("DELETE", api::routes::incoming_migration(name), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(()),
            Err(e) => Err(self.refusal(e)),
        }
    }

    fn unavailable(&self, why: String) -> ApiError {
        ApiError::new(
            ErrorCode::PeerUnavailable,
            format!("The destination ferrited {}: {why}", self.describe()),
        )
    }

    /// An error from the destination as ours: what it refused for the VM's or its own state
    /// stays a conflict (or capacity, or not-supported); anything else means it could not be
    /// used (502).
    fn refusal(&self, e: ClientError) -> ApiError {
        match e {
            ClientError::Api { error, .. } => {
                let code = match error.code {
                    ErrorCode::Conflict | ErrorCode::BadRequest => ErrorCode::Conflict,
                    c @ (ErrorCode::InsufficientCapacity | ErrorCode::NotSupported) => c,
                    _ => ErrorCode::PeerUnavailable,
                };
                ApiError::new(
                    code,
                    format!(
                        "The destination ferrited {} refused: {}",
                        self.describe(),
                        error.message
                    ),
                )
            }
            other => self.unavailable(other.to_string()),
        }
    }
}

/// `HOST:PORT`, with brackets around an IPv6 address.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A TLS session to `host:port` (blocking).
fn tls_connect(
    host: &str,
    port: u16,
    config: Arc<rustls::ClientConfig>,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, ClientError> {
    let io = |e: std::io::Error| ClientError::Io(e);
    let addr = host_port(host, port)
        .to_socket_addrs()
        .map_err(io)?
        .next()
        .ok_or_else(|| ClientError::Protocol(format!("{host} has no address")))?;
    let tcp = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(io)?;
    tcp.set_read_timeout(Some(PEER_TIMEOUT)).map_err(io)?;
    tcp.set_write_timeout(Some(PEER_TIMEOUT)).map_err(io)?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| ClientError::Protocol(format!("{host}: {e}")))?;
    let conn = rustls::ClientConnection::new(config, name)
        .map_err(|e| ClientError::Protocol(format!("TLS: {e}")))?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// Our client side of mutual TLS: this daemon's `--tls-cert`/`--tls-key` as its identity,
/// the destination's certificate checked against `--tls-client-ca` (one CA for the
/// daemons of a cluster).
fn client_tls(args: &DaemonArgs) -> Result<rustls::ClientConfig, ApiError> {
    let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.tls_client_ca)
    else {
        return Err(ApiError::new(
            ErrorCode::NotSupported,
            "Reaching another daemon over HTTPS needs this daemon's --tls-cert and --tls-key (its client certificate) and --tls-client-ca (the CA the destination's certificate must chain to)",
        ));
    };
    let tls_err = |what: &std::path::Path, e: &dyn std::fmt::Display| {
        ApiError::new(
            ErrorCode::Internal,
            format!("TLS setup: {}: {e}", what.display()),
        )
    };
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| tls_err(p, &e));
    let certs: Vec<_> = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(cert, &e))?;
    let key_der = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| tls_err(key, &e))?
        .ok_or_else(|| tls_err(key, &"no private key"))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut read(ca)?.as_slice()) {
        let c = c.map_err(|e| tls_err(ca, &e))?;
        roots.add(c).map_err(|e| tls_err(ca, &e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(cert, &e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key_der)
        .map_err(|e| tls_err(cert, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_https_urls_parse_with_ipv6_and_refuse_missing_ports() {
        assert_eq!(
            parse_https("https://b.example:8443/"),
            Some(("b.example".to_string(), 8443))
        );
        assert_eq!(
            parse_https("https://[::1]:8443"),
            Some(("::1".to_string(), 8443))
        );
        assert_eq!(parse_https("https://b.example"), None);
        assert_eq!(parse_https("http://b:1"), None);
    }

    #[test]
    fn test_unspecified_endpoint_hosts_become_the_peer_host() {
        let unix = Peer::Unix(PathBuf::from("/run/b.sock"));

        assert_eq!(
            unix.reachable_endpoint("tcp:0.0.0.0:4000"),
            "tcp:127.0.0.1:4000"
        );
        assert_eq!(
            unix.reachable_endpoint("tcp:10.0.0.2:4000"),
            "tcp:10.0.0.2:4000"
        );
        assert_eq!(
            unix.reachable_endpoint("tcp:[::]:4000"),
            "tcp:127.0.0.1:4000"
        );
    }
}
