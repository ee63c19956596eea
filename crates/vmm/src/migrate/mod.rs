//! Live migration: the source side runs inside a running VMM (started by the control
//! socket's `migrate` request, see [`source`]), the destination side is a `ferrite run
//! --incoming ENDPOINT` process that receives the VM and continues it ([`incoming`]). The
//! wire protocol is the `migration` crate's; the state is the snapshot format's.

pub mod incoming;
pub mod source;
mod throttle;

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
}

fn default_downtime_ms() -> u64 {
    10
}

fn default_timeout_s() -> u64 {
    120
}

impl MigrateOptions {
    /// Check the fields before anything starts.
    pub fn validate(&self) -> Result<migration::Endpoint, String> {
        let endpoint = self
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
        if self.timeout_s == 0 || self.timeout_s > 86_400 {
            return Err(format!(
                "timeout_s {} is out of range: give 1..=86400",
                self.timeout_s
            ));
        }
        Ok(endpoint)
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
}

/// The status shared by the migration thread and the control socket.
pub type SharedStatus = Arc<Mutex<MigrationStatus>>;
