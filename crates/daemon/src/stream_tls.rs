//! Whether a live migration's VMM-to-VMM stream runs over TLS, and which name the
//! destination's certificate is checked by.
//!
//! With `--migration-tls required` (the default when the daemon has `--tls-cert`, `--tls-key`
//! and `--tls-client-ca`) the destination starts its incoming VMM with its own certificate and
//! key and the cluster CA (`--incoming-tls-*`), so that VMM takes only TLS sources whose
//! certificate chains to that CA; the source passes its own certificate, key and CA to its
//! VMM's `migrate`. The one plaintext exception is two daemons on one host: a reservation over
//! the Unix API socket from a source that does not offer TLS gets a VMM listening on loopback
//! only, so the stream never leaves the host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use api::{ApiError, ErrorCode};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

use crate::args::TlsIdentity;
use crate::server::ViaTls;

/// How the destination's incoming VMM takes the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncomingStream {
    /// Mutual TLS with this daemon's certificate; the source checks it by `server_name`.
    Tls {
        /// A name (DNS name or IP address) this daemon's certificate is issued for.
        server_name: String,
    },
    /// Plaintext, the VMM listening on `listen`.
    Plain {
        /// The address the incoming VMM listens on.
        listen: IpAddr,
    },
}

fn not_supported(message: String) -> ApiError {
    ApiError::new(ErrorCode::NotSupported, message)
}

/// The destination's choice for a reservation: `identity` is this daemon's migration TLS
/// (None: `--migration-tls off`), `source_offers` whether the source can do TLS, `via` how
/// the request arrived (None: the Unix socket, so the source is on this host).
pub fn incoming_stream(
    identity: Option<&TlsIdentity>,
    source_offers: bool,
    via: Option<&ViaTls>,
    migration_addr: IpAddr,
) -> Result<IncomingStream, ApiError> {
    let Some(identity) = identity else {
        return Ok(IncomingStream::Plain {
            listen: migration_addr,
        });
    };
    if !source_offers {
        if via.is_some() {
            return Err(not_supported(
                "This daemon takes migration streams from other hosts only over TLS \
                 (--migration-tls required): start the source ferrited with --tls-cert, \
                 --tls-key, --tls-client-ca and --migration-tls required"
                    .to_string(),
            ));
        }
        // Same host, plaintext: on loopback only, so nothing outside can connect.
        let listen = if migration_addr.is_ipv6() {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        };
        return Ok(IncomingStream::Plain { listen });
    }
    let candidates = name_candidates(migration_addr, via);
    let cert = leaf_certificate(identity)?;
    let parsed = rustls::server::ParsedCertificate::try_from(&cert).map_err(|e| {
        not_supported(format!(
            "This daemon's certificate {} cannot be used for migrations: {e}",
            identity.cert.display()
        ))
    })?;
    let server_name = candidates.iter().find(|name| {
        ServerName::try_from(name.as_str())
            .is_ok_and(|sn| rustls::client::verify_server_name(&parsed, &sn).is_ok())
    });
    match server_name {
        Some(name) => Ok(IncomingStream::Tls {
            server_name: name.clone(),
        }),
        None => Err(not_supported(format!(
            "This daemon's certificate {} is issued for none of the names a migration source \
             can check it by ({}): add one of them to its subjectAltName (e.g. IP:{}), or use \
             --migration-tls off on a trusted network",
            identity.cert.display(),
            candidates.join(", "),
            candidates.first().map(String::as_str).unwrap_or("HOST")
        ))),
    }
}

/// The names a source may check this daemon's certificate by, best first: the migration
/// address (what the source's VMM connects to), then the name or address the source reached
/// the API at (its VMM connects there when the migration address is unspecified; the
/// certificate was already checked for it), then, for a source on this host, loopback.
fn name_candidates(migration_addr: IpAddr, via: Option<&ViaTls>) -> Vec<String> {
    let mut names = Vec::new();
    if !migration_addr.is_unspecified() {
        names.push(migration_addr.to_string());
    }
    match via {
        Some(via) => {
            names.extend(via.sni.clone());
            names.extend(via.local.map(|a| a.ip().to_string()));
        }
        None => {
            names.push("localhost".to_string());
            names.push(if migration_addr.is_ipv6() {
                Ipv6Addr::LOCALHOST.to_string()
            } else {
                Ipv4Addr::LOCALHOST.to_string()
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// The first certificate of this daemon's chain.
fn leaf_certificate(identity: &TlsIdentity) -> Result<CertificateDer<'static>, ApiError> {
    let bad = |why: String| {
        not_supported(format!(
            "This daemon's certificate {} cannot be read for the migration: {why}",
            identity.cert.display()
        ))
    };
    let pem = std::fs::read(&identity.cert).map_err(|e| bad(e.to_string()))?;
    let first = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .ok_or_else(|| bad("it holds no certificate".to_string()))?
        .map_err(|e| bad(e.to_string()))?;
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn identity() -> TlsIdentity {
        TlsIdentity {
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/k.pem".into(),
            ca: "/nonexistent/ca.pem".into(),
        }
    }

    #[test]
    fn test_tls_off_keeps_plaintext_on_the_migration_address() {
        let plan = incoming_stream(None, true, None, ip("10.0.0.2")).unwrap();

        assert_eq!(
            plan,
            IncomingStream::Plain {
                listen: ip("10.0.0.2")
            }
        );
    }

    #[test]
    fn test_same_host_source_without_tls_gets_a_loopback_listener() {
        let id = identity();

        let v4 = incoming_stream(Some(&id), false, None, ip("0.0.0.0")).unwrap();
        let v6 = incoming_stream(Some(&id), false, None, ip("::")).unwrap();

        assert_eq!(
            v4,
            IncomingStream::Plain {
                listen: ip("127.0.0.1")
            }
        );
        assert_eq!(v6, IncomingStream::Plain { listen: ip("::1") });
    }

    #[test]
    fn test_remote_source_without_tls_is_refused() {
        let id = identity();
        let via = ViaTls {
            sni: Some("b.example".into()),
            local: None,
        };

        let err = incoming_stream(Some(&id), false, Some(&via), ip("10.0.0.2")).unwrap_err();

        assert_eq!(err.code, ErrorCode::NotSupported);
        assert!(err.message.contains("only over TLS"), "{}", err.message);
    }

    #[test]
    fn test_name_candidates_put_the_migration_address_first_and_dedupe() {
        let via = ViaTls {
            sni: Some("b.example".into()),
            local: Some(SocketAddr::new(ip("10.0.0.2"), 8443)),
        };

        let names = name_candidates(ip("10.0.0.2"), Some(&via));
        let local = name_candidates(ip("0.0.0.0"), None);

        assert_eq!(names, ["10.0.0.2", "b.example"]);
        assert_eq!(local, ["localhost", "127.0.0.1"]);
    }
}
