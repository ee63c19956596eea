//! `ferrited`'s command line.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;

/// ferrited: runs and supervises Ferrite VMs on this host behind a REST API.
#[derive(Debug, Clone, Parser)]
#[command(name = "ferrited", version)]
pub struct DaemonArgs {
    /// Unix socket the API is served on (created with mode 0660).
    #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET, env = "FERRITE_SOCKET")]
    pub socket: PathBuf,
    /// Persistent state: the database, VM console logs.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/ferrite")]
    pub state_dir: PathBuf,
    /// Runtime files: per-VM control and console sockets, configs, status files.
    #[arg(long, value_name = "DIR", default_value = "/run/ferrite")]
    pub run_dir: PathBuf,
    /// The VMM binary (default: `ferrite` next to this executable).
    #[arg(long, value_name = "PATH")]
    pub vmm_binary: Option<PathBuf>,
    /// vCPUs of running VMs allowed per host CPU.
    #[arg(long, value_name = "RATIO", default_value_t = 4.0)]
    pub cpu_overcommit: f64,
    /// Guest RAM of running VMs allowed per byte of host RAM.
    #[arg(long, value_name = "RATIO", default_value_t = 1.0)]
    pub memory_overcommit: f64,
    /// Host RAM in MiB kept for the host and the VMMs' own overhead (not given to guests).
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    pub reserved_memory_mib: u64,
    /// Name of the cgroup (under ferrited's own) that holds the per-VM cgroups.
    #[arg(long, value_name = "NAME", default_value = "ferrite")]
    pub cgroup_parent: String,
    /// Run VMs without per-VM cgroups (resource limits then refuse to apply).
    #[arg(long)]
    pub no_cgroups: bool,
    /// Also serve the API over TCP with TLS at this address (needs --tls-cert, --tls-key
    /// and --tls-client-ca: clients must present a certificate signed by that CA).
    #[arg(long, value_name = "ADDR:PORT", requires_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    pub tls_listen: Option<SocketAddr>,
    /// Server certificate chain (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to.
    #[arg(long, value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// Accept incoming live migrations: each incoming VM's VMM listens on this address, on a
    /// free port, for the source's VMM. Without it, incoming migrations are refused. An
    /// unspecified address (0.0.0.0, ::) listens everywhere; sources then connect to the host
    /// they reached this daemon at.
    #[arg(long, value_name = "IP")]
    pub migration_addr: Option<IpAddr>,
    /// Live migration streams (VMM to VMM) over mutual TLS with this daemon's --tls-cert,
    /// --tls-key and --tls-client-ca: `required` (the default when those three are given)
    /// takes and sends only TLS streams, except plaintext between two daemons on this host
    /// (over the Unix API socket, on loopback); `off` (the default without them) runs them in
    /// plaintext.
    #[arg(long, value_name = "required|off", value_enum)]
    pub migration_tls: Option<MigrationTls>,
    /// Seconds between crash restarts of a VM with restart_on_crash (doubles per crash, max 60).
    #[arg(long, value_name = "SECONDS", default_value_t = 1)]
    pub restart_backoff_s: u64,
}

/// `--migration-tls`: whether live migration streams run over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MigrationTls {
    /// Only TLS streams (plaintext only on this host, over loopback).
    Required,
    /// Plaintext streams.
    Off,
}

/// This daemon's certificate, key and cluster CA (absolute paths), which a TLS migration
/// stream uses too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsIdentity {
    /// Certificate chain (PEM), `--tls-cert`.
    pub cert: PathBuf,
    /// Its private key (PEM), `--tls-key`.
    pub key: PathBuf,
    /// The CA peers' certificates must chain to (PEM), `--tls-client-ca`.
    pub ca: PathBuf,
}

/// `--migration-tls` cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum MigrationTlsError {
    /// `required` without the daemon's certificate files.
    #[error(
        "--migration-tls required needs --tls-cert, --tls-key and --tls-client-ca (the daemon's \
         certificate is the migration stream's too): give them, or use --migration-tls off"
    )]
    NeedsFiles,
    /// A TLS file's path cannot be made absolute.
    #[error("Cannot make {path} absolute: {source}")]
    Path {
        /// The path as given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl DaemonArgs {
    /// The migration TLS identity when `--migration-tls` is (by default or explicitly)
    /// `required`; None when it is off. Err: `required` without the TLS files.
    pub fn migration_tls(&self) -> Result<Option<TlsIdentity>, MigrationTlsError> {
        let files = match (&self.tls_cert, &self.tls_key, &self.tls_client_ca) {
            (Some(cert), Some(key), Some(ca)) => Some((cert, key, ca)),
            _ => None,
        };
        match (self.migration_tls, files) {
            (Some(MigrationTls::Off), _) | (None, None) => Ok(None),
            (_, Some((cert, key, ca))) => {
                let abs = |p: &PathBuf| {
                    std::path::absolute(p).map_err(|source| MigrationTlsError::Path {
                        path: p.clone(),
                        source,
                    })
                };
                Ok(Some(TlsIdentity {
                    cert: abs(cert)?,
                    key: abs(key)?,
                    ca: abs(ca)?,
                }))
            }
            (Some(MigrationTls::Required), None) => Err(MigrationTlsError::NeedsFiles),
        }
    }

    /// The VMM binary to run.
    pub fn vmm_binary(&self) -> PathBuf {
        if let Some(p) = &self.vmm_binary {
            return p.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("ferrite")))
            .unwrap_or_else(|| PathBuf::from("ferrite"))
    }
}
