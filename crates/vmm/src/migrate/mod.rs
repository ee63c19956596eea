//! Live migration: the source side runs inside a running VMM (started by the control
//! socket's `migrate` request, see [`source`]), the destination side is a `ferrite run
//! --incoming ENDPOINT` process that receives the VM and continues it ([`incoming`]). The
//! wire protocol is the `migration` crate's; the state is the snapshot format's.

mod disk_receive;
mod disk_send;
pub mod incoming;
mod postcopy;
pub mod source;
mod throttle;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// What to do when the guest dirties memory faster than the link carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Converge {
    /// Slow the guest's vCPUs down (more each round the remainder does not shrink) until the
    /// remainder fits the downtime budget; give up at the timeout.
    #[default]
    Throttle,
    /// Never slow the guest; give up at the timeout.
    Abort,
}

/// How a migration is to run (the `migrate` request's fields).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateOptions {
    /// The destination: `tcp:HOST:PORT` or `unix:PATH` (a `ferrite run --incoming` there).
    pub to: String,
    /// Longest acceptable pause of the guest for the last copy, ms.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Bandwidth limit, MiB/s (0 or absent: unlimited).
    #[serde(default)]
    pub bandwidth_mib_s: u64,
    /// Give up (the VM keeps running here) after this many seconds.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// What to do when the copy does not converge.
    #[serde(default)]
    pub converge: Converge,
    /// Same host only (`unix:` endpoint): hand guest RAM over by file descriptor instead of
    /// copying it; needs a VM started with `--memory-shared`. The guest pauses once, for the
    /// state only.
    #[serde(default)]
    pub fd_handover: bool,
    /// Round 0 (the full copy) over this many connections at once (1..=15; 1: on the
    /// migration's own connection). Each carries its own 16 MiB stripes of guest RAM, with an
    /// even share of the bandwidth limit; over TLS each is encrypted on its own core.
    #[serde(default = "default_connections")]
    pub connections: u32,
    /// Post-copy: after `precopy_rounds` pre-copy rounds, pause, hand the state over and run
    /// the guest on the destination at once; its missing pages are fetched when it touches
    /// them while the rest is pushed in the background. The downtime no longer depends on
    /// how fast the guest writes; but until every page is across, losing the connection
    /// loses the guest.
    #[serde(default)]
    pub postcopy: bool,
    /// Post-copy: pre-copy rounds first (0: switch at once; 1: one full pass while the guest
    /// runs, then fetch only what it wrote since).
    #[serde(default)]
    pub precopy_rounds: u32,
    /// Block migration: copy the contents of every writable disk too (local disks), with
    /// the guest's writes during the copy tracked and sent again. The destination creates
    /// the images (`ferrite run --incoming ... --incoming-disk-dir DIR`). Without it, the
    /// disks must be on storage both sides see.
    #[serde(default)]
    pub copy_disks: bool,
    /// TLS (with `tls_key` and `tls_ca`): this source's certificate chain, PEM. The stream
    /// is then encrypted and both sides authenticated by certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: the private key of `tls_cert`, PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// TLS: the CA bundle the destination's certificate must be signed by, PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// TLS: the name (DNS name or IP address) the destination's certificate must be issued
    /// for; default: the host of `to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
}

/// A checked `migrate` request's destination: where to connect, and with what TLS.
#[derive(Debug)]
pub struct MigrateTarget {
    /// The destination.
    pub endpoint: migration::Endpoint,
    /// TLS, loaded and checked (None: plaintext).
    pub tls: Option<migration::TlsClient>,
}

fn default_downtime_ms() -> u64 {
    10
}

fn default_connections() -> u32 {
    1
}

fn default_timeout_s() -> u64 {
    120
}

impl MigrateOptions {
    /// Check the fields before anything starts, and load the TLS files (every error names
    /// the field or file and the fix).
    pub fn validate(&self) -> Result<MigrateTarget, String> {
        let endpoint: migration::Endpoint = self
            .to
            .parse()
            .map_err(|e: migration::MigrationError| e.to_string())?;
        if self.downtime_ms == 0 || self.downtime_ms > 60_000 {
            return Err(format!(
                "downtime_ms {} is out of range: give 1..=60000",
                self.downtime_ms
            ));
        }
        if self.fd_handover && !matches!(endpoint, migration::Endpoint::Unix(_)) {
            return Err(format!(
                "fd_handover hands memory over on this host only: give a unix:PATH endpoint, \
                 not {}",
                self.to
            ));
        }
        if self.connections == 0 || self.connections > migration::wire::MAX_PARALLEL {
            return Err(format!(
                "connections {} is out of range: give 1..={}",
                self.connections,
                migration::wire::MAX_PARALLEL
            ));
        }
        if self.connections > 1 && self.fd_handover {
            return Err(
                "connections and fd_handover exclude each other: a handover copies no memory"
                    .to_string(),
            );
        }
        if self.postcopy && self.fd_handover {
            return Err(
                "postcopy and fd_handover exclude each other: a handover moves no pages"
                    .to_string(),
            );
        }
        if self.precopy_rounds > 0 && !self.postcopy {
            return Err(
                "precopy_rounds only applies to post-copy: add \"postcopy\": true, or drop it"
                    .to_string(),
            );
        }
        if self.precopy_rounds > 30 {
            return Err(format!(
                "precopy_rounds {} is out of range: give 0..=30",
                self.precopy_rounds
            ));
        }
        if self.copy_disks && self.fd_handover {
            return Err(
                "copy_disks with fd_handover is not supported: on one host the disks can stay \
                 where they are; leave copy_disks out"
                    .to_string(),
            );
        }
        if self.copy_disks && self.postcopy {
            return Err(
                "copy_disks with postcopy is not supported: the disks' last blocks must cross \
                 during the pause; use pre-copy (leave postcopy out)"
                    .to_string(),
            );
        }
        if self.timeout_s == 0 || self.timeout_s > 86_400 {
            return Err(format!(
                "timeout_s {} is out of range: give 1..=86400",
                self.timeout_s
            ));
        }
        let files = migration::TlsFiles::from_options(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_ca.as_deref(),
            ["tls_cert", "tls_key", "tls_ca"],
        )
        .map_err(|e| e.to_string())?;
        let tls = match files {
            None if self.tls_server_name.is_some() => {
                return Err(
                    "tls_server_name needs TLS: give tls_cert, tls_key and tls_ca too".to_string(),
                )
            }
            None => None,
            Some(files) => {
                migration::check_tls_endpoint(&endpoint).map_err(|e| e.to_string())?;
                let tls = migration::TlsClient::new(&files, self.tls_server_name.as_deref())
                    .map_err(|e| e.to_string())?;
                tls.server_name_for(&endpoint).map_err(|e| e.to_string())?;
                Some(tls)
            }
        };
        Ok(MigrateTarget { endpoint, tls })
    }
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// No migration was started.
    #[default]
    None,
    /// Connecting and handshaking.
    Connecting,
    /// Copying memory while the guest runs.
    Copying,
    /// The guest is paused for the last copy and the state.
    Final,
    /// Post-copy: the guest runs on the destination, which fetches the pages it still lacks.
    Postcopy,
    /// The guest runs on the destination; this VMM stops.
    Completed,
    /// It failed; the guest keeps running here.
    Failed,
    /// The user cancelled; the guest keeps running here.
    Cancelled,
    /// The commit was sent but the destination did not confirm: the guest stays paused here
    /// (resume it only if the destination is not running it).
    Unknown,
}

/// Progress and result of the current (or last) migration, as `migrate-status` reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Where it stands.
    pub phase: Phase,
    /// The destination.
    pub to: String,
    /// The current copy round (0: the first full pass).
    pub round: u32,
    /// Dirty bytes left to copy at the start of this round.
    pub remaining_bytes: u64,
    /// Bytes sent so far (headers and page data).
    pub sent_bytes: u64,
    /// Pages sent with their bytes.
    pub pages_sent: u64,
    /// Pages sent as zero-page markers (no bytes).
    pub zero_pages: u64,
    /// Achieved rate, bytes/s.
    pub rate_bytes_per_s: u64,
    /// Post-copy: pages the destination asked for (the guest touched them before they came).
    pub postcopy_requests: u64,
    /// Block migration: dirty disk bytes left to copy at the start of this round (included
    /// in `remaining_bytes`).
    #[serde(default)]
    pub disk_remaining_bytes: u64,
    /// Block migration: disk bytes sent with their data (included in `sent_bytes`).
    #[serde(default)]
    pub disk_sent_bytes: u64,
    /// Block migration: disk bytes that were all zero, sent as zero ranges or not at all.
    #[serde(default)]
    pub disk_zero_bytes: u64,
    /// Share of time the vCPUs are held back by auto-converge, percent.
    pub throttle_pct: u32,
    /// Time since the start, ms.
    pub elapsed_ms: u64,
    /// How long the guest was paused (source's view: pause to destination running), ms.
    pub downtime_ms: Option<f64>,
    /// Total time, ms.
    pub total_ms: Option<f64>,
    /// Why it failed.
    pub error: Option<String>,
    /// How the source reads the guest's dirty pages: `ring` (KVM's per-vCPU dirty rings)
    /// or `bitmap` (`KVM_GET_DIRTY_LOG`); None with a memory handover (no dirty log).
    #[serde(default)]
    pub dirty_log: Option<String>,
    /// Dirty-log harvests so far (one per round, plus the final one).
    #[serde(default)]
    pub harvests: u32,
    /// Time spent in those harvests, µs.
    #[serde(default)]
    pub harvest_us: u64,
    /// The stream runs over mutual TLS (the destination's certificate checked, ours shown).
    #[serde(default)]
    pub tls: bool,
}

/// The status shared by the migration thread and the control socket.
pub type SharedStatus = Arc<Mutex<MigrationStatus>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(json: &str) -> Result<MigrateTarget, String> {
        serde_json::from_str::<MigrateOptions>(json)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn test_tls_options_are_checked_before_the_migration_starts() {
        let plain = validate(r#"{"to":"tcp:10.0.0.2:7000"}"#).unwrap();
        let no_key =
            validate(r#"{"to":"tcp:10.0.0.2:7000","tls_cert":"/c.pem","tls_ca":"/ca.pem"}"#)
                .unwrap_err();
        let missing = validate(
            r#"{"to":"tcp:10.0.0.2:7000","tls_cert":"/nonexistent/c.pem","tls_key":"/k.pem",
                "tls_ca":"/ca.pem"}"#,
        )
        .unwrap_err();
        let unix = validate(
            r#"{"to":"unix:/run/m.sock","tls_cert":"/c.pem","tls_key":"/k.pem","tls_ca":"/ca.pem"}"#,
        )
        .unwrap_err();
        let name_alone =
            validate(r#"{"to":"tcp:10.0.0.2:7000","tls_server_name":"db"}"#).unwrap_err();
        let typo = validate(r#"{"to":"tcp:10.0.0.2:7000","tls_certs":"/c.pem"}"#).unwrap_err();

        assert!(plain.tls.is_none());
        assert!(no_key.contains("tls_key is missing"), "{no_key}");
        assert!(missing.contains("/nonexistent/c.pem"), "{missing}");
        assert!(unix.contains("tcp:"), "{unix}");
        assert!(
            name_alone.contains("tls_server_name needs TLS"),
            "{name_alone}"
        );
        assert!(typo.contains("tls_certs"), "{typo}");
    }
}
