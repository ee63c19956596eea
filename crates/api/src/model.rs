//! Request and response bodies.
//!
//! Devices are given as strings in the same syntax as `ferrite run`'s flags
//! (`"/var/lib/web.qcow2,bw=20M,iops=2000"`), as Proxmox's API does for its disks: one syntax
//! for the CLI, the API and the docs, parsed and validated by the same code in the VMM crate.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The longest VM name.
pub const MAX_NAME_LEN: usize = 63;

/// Whether `name` is a valid VM name: 1–63 of `a-z A-Z 0-9 - _ .`, starting with a letter or
/// digit (it becomes a directory, a cgroup and a URL path segment).
pub fn valid_vm_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= MAX_NAME_LEN
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A VM definition: what `POST /v1/vms` takes and what is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique name (see [`valid_vm_name`]).
    pub name: String,
    /// vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Guest RAM in MiB (at least 128).
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Kernel image (vmlinux with a PVH note, or bzImage), a path on the host.
    pub kernel: String,
    /// Initial ramdisk.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Disks in `ferrite run --disk` syntax: `PATH[,readonly][,id=S][,format=F][,bw=N][,iops=N]`.
    #[serde(default)]
    pub disks: Vec<String>,
    /// NICs in `--net` syntax: `tap=NAME,mac=MAC,rx-bw=N,...` (empty string: a new TAP).
    #[serde(default)]
    pub nets: Vec<String>,
    /// vsock in `--vsock` syntax: `cid=N,socket=PATH`.
    #[serde(default)]
    pub vsock: Option<String>,
    /// virtio-rng in `--rng` syntax (empty string: unlimited).
    #[serde(default)]
    pub rng: Option<String>,
    /// virtio-balloon in `--balloon` syntax (empty string: defaults).
    #[serde(default)]
    pub balloon: Option<String>,
    /// Start the VM when the daemon starts.
    #[serde(default)]
    pub autostart: bool,
    /// Restart the VM when its monitor process crashes.
    #[serde(default)]
    pub restart_on_crash: bool,
    /// Host resources (cgroup limits).
    #[serde(default)]
    pub resources: Resources,
    /// Emulation repair (`auto`, `on`, `off`), as `ferrite run --repair-emulation`.
    #[serde(default)]
    pub repair_emulation: Option<String>,
    /// CPU features to hide, as `--cpu-features` (`-avx512f,-x2apic`).
    #[serde(default)]
    pub cpu_features: Option<String>,
    /// Set on VMs made by `POST /v1/vms/{name}/snapshots/{snapshot}/clone`: the snapshot they
    /// were cloned from (their first start continued it; later starts boot their own disks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<CloneOrigin>,
}

/// Where a clone came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneOrigin {
    /// The VM the snapshot was taken of.
    pub vm: String,
    /// The snapshot's name.
    pub snapshot: String,
}

/// Body of `POST /v1/vms/{name}/snapshots/{snapshot}/clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// How many clones to start (1 to [`MAX_CLONES`]).
    pub count: u32,
    /// Clone names are `<prefix>-1`, `<prefix>-2`, ... (taken numbers are skipped); default
    /// `<vm>-clone`.
    #[serde(default)]
    pub prefix: Option<String>,
}

/// Most clones one request may start.
pub const MAX_CLONES: u32 = 64;

fn default_vcpus() -> u32 {
    1
}

fn default_memory_mib() -> u64 {
    512
}

/// Host resources of one VM, enforced through its cgroup; changeable while it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU bandwidth cap in percent of one host CPU (`cpu.max`; 150 = one and a half CPUs).
    /// `None`: no cap.
    #[serde(default)]
    pub cpu_quota_pct: Option<u32>,
    /// CPU priority relative to other VMs, 1–10000 (`cpu.weight`, default 100).
    #[serde(default)]
    pub cpu_weight: Option<u32>,
    /// Hard memory limit of the VMM process in MiB (`memory.max`); `None`: guest RAM plus
    /// the VMM's overhead allowance.
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
    /// Host CPUs the VM's threads may run on (`cpuset.cpus`); empty: any.
    #[serde(default)]
    pub pin_cpus: Vec<u32>,
}

/// Changes to a VM (`PATCH /v1/vms/{name}`). Resource, balloon and rate-limit changes apply to a
/// running VM at once and are saved; the other fields need the VM stopped (409 otherwise).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmUpdate {
    /// New vCPU count (stopped VMs only).
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// New RAM size in MiB (stopped VMs only).
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// New kernel command line (stopped VMs only).
    #[serde(default)]
    pub cmdline: Option<String>,
    /// New autostart flag.
    #[serde(default)]
    pub autostart: Option<bool>,
    /// New restart-on-crash flag.
    #[serde(default)]
    pub restart_on_crash: Option<bool>,
    /// New resources; each given field replaces the old one (live).
    #[serde(default)]
    pub resources: Option<ResourcesUpdate>,
    /// Balloon target in MiB (live; needs a balloon device).
    #[serde(default)]
    pub balloon_mib: Option<u64>,
    /// Rate limits by device (`disk0`, `net0.rx`, `net0.tx`, `rng`), live.
    #[serde(default)]
    pub rate_limits: BTreeMap<String, RateLimitUpdate>,
}

/// A partial [`Resources`]: `Some(None)` (JSON `null`) clears a limit, absent keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesUpdate {
    /// See [`Resources::cpu_quota_pct`].
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_quota_pct: Option<Option<u32>>,
    /// See [`Resources::cpu_weight`].
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_weight: Option<Option<u32>>,
    /// See [`Resources::memory_limit_mib`].
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_limit_mib: Option<Option<u64>>,
    /// See [`Resources::pin_cpus`].
    #[serde(default)]
    pub pin_cpus: Option<Vec<u32>>,
}

/// New limits for one rate-limited device; 0 or absent = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitUpdate {
    /// Bytes per second.
    #[serde(default)]
    pub bytes_per_s: Option<u64>,
    /// Operations (requests, packets) per second.
    #[serde(default)]
    pub ops_per_s: Option<u64>,
}

/// `null` vs absent for PATCH bodies.
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(inner) => inner.serialize(s),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Defined, never started or cleanly stopped.
    Stopped,
    /// Its VMM process is being started.
    Starting,
    /// Running.
    Running,
    /// vCPUs paused.
    Paused,
    /// A graceful stop is in progress (power button pressed, waiting).
    Stopping,
    /// Its VMM process died without a clean exit (signal, crash), or the VM failed.
    Crashed,
    /// A live migration is arriving (destination side): its VMM waits for the source and
    /// receives the VM; it becomes `running` once the guest runs here, and the definition is
    /// dropped again if the migration fails.
    Incoming,
}

impl VmState {
    /// Whether a VMM process exists for the VM.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Starting
                | VmState::Running
                | VmState::Paused
                | VmState::Stopping
                | VmState::Incoming
        )
    }

    /// The lower-case name used in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Crashed => "crashed",
            VmState::Incoming => "incoming",
        }
    }
}

/// How the last run of a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    /// `poweroff`, `reset`, `stopped`, `failed`, `error` (the VMM could not run it),
    /// `killed`, `crashed`, `migrated` (it runs on another host now).
    pub outcome: String,
    /// Details (failure reason, signal).
    #[serde(default)]
    pub detail: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// A VM as `GET /v1/vms/{name}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The definition.
    pub spec: VmSpec,
    /// Current state.
    pub state: VmState,
    /// The VMM process, while active.
    #[serde(default)]
    pub pid: Option<u32>,
    /// When the current run started (ms since the Unix epoch).
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    /// How the previous run ended.
    #[serde(default)]
    pub last_exit: Option<LastExit>,
    /// Automatic restarts after crashes since the VM was last started by a user.
    #[serde(default)]
    pub crash_restarts: u32,
}

/// Optional body of `POST /v1/vms/{name}/stop`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds to wait for the guest to power off after the ACPI power button before
    /// killing it (default 30; 0 kills at once).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// Body of `POST /v1/vms/{name}/snapshots`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The snapshot's name, unique per VM (same rules as VM names, see [`valid_vm_name`]).
    pub name: String,
    /// Leave the VM paused after the snapshot (default: it resumes as it was).
    #[serde(default)]
    pub stay_paused: bool,
}

/// A stored snapshot of a VM (`GET /v1/vms/{name}/snapshots`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The VM it was taken of.
    pub vm: String,
    /// Its name.
    pub name: String,
    /// Its directory on the daemon's host.
    pub path: String,
    /// When it was taken (ms since the Unix epoch).
    pub created_ms: u64,
    /// Guest memory bytes written (untouched pages are skipped).
    pub memory_bytes: u64,
    /// Bytes of vCPU and device state.
    pub state_bytes: u64,
}

/// Per-VM statistics (`GET /v1/vms/{name}/stats`, and each entry of `GET /v1/stats`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmStats {
    /// The VM.
    pub name: String,
    /// State.
    pub state: Option<VmState>,
    /// Seconds since the current run started.
    pub uptime_s: f64,
    /// vCPU threads' CPU time in seconds, by vCPU index.
    pub vcpu_seconds: Vec<f64>,
    /// CPU time of the whole VMM process (vCPUs, device threads) in seconds.
    pub process_cpu_seconds: f64,
    /// VM exits by reason, summed over vCPUs (`io`, `mmio`, `hlt`, ...).
    pub exits: BTreeMap<String, u64>,
    /// Resident memory of the VMM process in bytes.
    pub rss_bytes: u64,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Balloon size in bytes (what the guest gave back), when there is a balloon.
    pub balloon_bytes: Option<u64>,
    /// Balloon target in bytes.
    pub balloon_target_bytes: Option<u64>,
    /// Free memory the guest reports through the balloon statistics.
    pub guest_free_bytes: Option<u64>,
    /// Disk counters by device (`disk0`): read/write bytes and ops.
    pub disks: BTreeMap<String, IoCounters>,
    /// NIC counters by device (`net0`): rx/tx bytes and packets.
    pub nets: BTreeMap<String, IoCounters>,
    /// CPU time the cgroup was throttled by its quota, in seconds.
    pub cpu_throttled_seconds: f64,
}

/// Read/write (disks) or rx/tx (NICs) counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoCounters {
    /// Bytes read (disk) or received by the guest (NIC).
    pub read_bytes: u64,
    /// Bytes written (disk) or sent by the guest (NIC).
    pub write_bytes: u64,
    /// Read requests / received packets.
    pub read_ops: u64,
    /// Write requests / sent packets.
    pub write_ops: u64,
}

/// Host capacity and what the VMs hold (`GET /v1/host`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Host CPUs.
    pub cpus: u32,
    /// Host RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs allowed per host CPU.
    pub cpu_overcommit: f64,
    /// Guest RAM allowed per host RAM.
    pub memory_overcommit: f64,
    /// vCPUs of active VMs.
    pub allocated_vcpus: u32,
    /// Guest RAM of active VMs in MiB.
    pub allocated_memory_mib: u64,
    /// VMs defined.
    pub vms: u32,
    /// VMs active.
    pub active_vms: u32,
    /// Daemon version.
    pub version: String,
}

/// A lifecycle event (`GET /v1/events`, server-sent events with this JSON as `data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing id.
    pub id: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The VM.
    pub vm: String,
    /// `defined`, `starting`, `running`, `paused`, `resumed`, `stopping`, `stopped`,
    /// `crashed`, `restarted`, `restart-failed`, `autostart-failed`, `rebooted`, `updated`,
    /// `deleted`, `adopted`, `snapshot-created`, `snapshot-deleted`, `restored`, and for
    /// live migrations `migration-started`, `migration-progress`, `migrated`,
    /// `migration-failed`, `migration-cancelled`, `migration-unknown` (source) and
    /// `incoming`, `migrated-in`, `incoming-failed` (destination).
    pub kind: String,
    /// Free text.
    #[serde(default)]
    pub detail: String,
}

/// What to do when the guest dirties memory faster than the link carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Converge {
    /// Slow the guest's vCPUs down more each round until the rest fits the downtime budget
    /// (give up at the timeout).
    #[default]
    Throttle,
    /// Never slow the guest; give up at the timeout.
    Abort,
}

impl Converge {
    /// The name used in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Converge::Throttle => "throttle",
            Converge::Abort => "abort",
        }
    }
}

/// Body of `POST /v1/vms/{name}/migrate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination daemon: the path of its Unix socket (two daemons on one host), or
    /// `https://HOST:PORT` (its `--tls-listen`).
    pub to: String,
    /// Longest acceptable pause of the guest for the last copy, ms (default 10, 1..=60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Bandwidth limit in MiB/s (default 0: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mib_s: Option<u64>,
    /// Give up after this many seconds, the VM staying here (default 120, 1..=86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// What to do when the copy does not converge (default `throttle`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converge: Option<Converge>,
    /// Block migration: copy the contents of the VM's writable disks too (local disks); the
    /// destination daemon puts them in its state directory. Default: the disks are on
    /// storage both daemons see.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub copy_disks: bool,
    /// Post-copy: run the guest on the destination right after the state; its missing pages
    /// follow on demand (see the VMM's `postcopy`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub postcopy: bool,
    /// With `postcopy`: pre-copy rounds before the switch (default 0, 0..=30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy_rounds: Option<u32>,
    /// The full copy (round 0) over this many connections at once (default 1, 1..=15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
}

/// Default pause budget of a migration, ms.
pub const DEFAULT_MIGRATION_DOWNTIME_MS: u64 = 10;
/// Default time limit of a migration, seconds.
pub const DEFAULT_MIGRATION_TIMEOUT_S: u64 = 120;

/// Where a migration stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// No migration was started.
    #[default]
    None,
    /// Connecting to the destination's VMM and handshaking.
    Connecting,
    /// Copying memory while the guest runs.
    Copying,
    /// The guest is paused for the last copy and its state.
    Final,
    /// Post-copy: the guest runs on the destination, which fetches the pages it still lacks
    /// from the source.
    Postcopy,
    /// The guest runs on the destination; the source forgot the VM.
    Completed,
    /// It failed; the guest keeps running on the source.
    Failed,
    /// Cancelled; the guest keeps running on the source.
    Cancelled,
    /// The commit was sent but the destination did not confirm: the guest stays paused on
    /// the source. Check the destination: if it does not run the VM, resume it here.
    Unknown,
}

impl MigrationPhase {
    /// Whether the migration is over (whatever the result).
    pub fn is_done(self) -> bool {
        !matches!(
            self,
            MigrationPhase::Connecting
                | MigrationPhase::Copying
                | MigrationPhase::Final
                | MigrationPhase::Postcopy
        )
    }

    /// The name used in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::None => "none",
            MigrationPhase::Connecting => "connecting",
            MigrationPhase::Copying => "copying",
            MigrationPhase::Final => "final",
            MigrationPhase::Postcopy => "postcopy",
            MigrationPhase::Completed => "completed",
            MigrationPhase::Failed => "failed",
            MigrationPhase::Cancelled => "cancelled",
            MigrationPhase::Unknown => "unknown",
        }
    }
}

/// An outgoing live migration (`GET /v1/vms/{name}/migration`): the source VMM's progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// The VM.
    pub vm: String,
    /// The destination daemon, as given.
    #[serde(default)]
    pub to: String,
    /// The destination VMM's endpoint the memory goes to (`tcp:HOST:PORT`).
    #[serde(default)]
    pub endpoint: String,
    /// Where it stands.
    pub phase: MigrationPhase,
    /// When it started (ms since the Unix epoch).
    #[serde(default)]
    pub started_ms: u64,
    /// The current copy round (0: the first full pass).
    #[serde(default)]
    pub round: u32,
    /// Dirty bytes left to copy at the start of this round.
    #[serde(default)]
    pub remaining_bytes: u64,
    /// Bytes sent so far.
    #[serde(default)]
    pub sent_bytes: u64,
    /// Pages sent with their bytes.
    #[serde(default)]
    pub pages_sent: u64,
    /// Pages sent as zero-page markers.
    #[serde(default)]
    pub zero_pages: u64,
    /// Achieved rate, bytes/s.
    #[serde(default)]
    pub rate_bytes_per_s: u64,
    /// Share of time the vCPUs are held back by auto-converge, percent.
    #[serde(default)]
    pub throttle_pct: u32,
    /// Time since the start, ms.
    #[serde(default)]
    pub elapsed_ms: u64,
    /// How long the guest was paused, ms (once completed).
    #[serde(default)]
    pub downtime_ms: Option<f64>,
    /// Total time, ms (once completed).
    #[serde(default)]
    pub total_ms: Option<f64>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// The VMM-to-VMM stream is encrypted and both sides authenticated (mutual TLS).
    #[serde(default)]
    pub tls: bool,
}

/// Body of `POST /v1/migrations/incoming` (sent by the source daemon).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingMigrationRequest {
    /// The VM's definition as the source stores it (its name is reserved here).
    pub spec: VmSpec,
    /// The migration's time limit in seconds: the destination gives up on a VM that does
    /// not run here within this (plus a grace period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// The source can run the VMM-to-VMM stream over mutual TLS with its daemon's certificate
    /// (it has `--tls-cert`, `--tls-key` and `--tls-client-ca` and its `--migration-tls` is
    /// `required`). Sent only when true, so a plaintext source still suits a daemon from
    /// before this field (which refuses unknown fields).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    /// Block migration: the writable disks' contents come with the VM; the destination
    /// creates them under its state directory and points the definition at them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub copy_disks: bool,
}

/// The answer to `POST /v1/migrations/incoming`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingMigration {
    /// The reserved VM (state `incoming`).
    pub vm: VmInfo,
    /// Where the source VMM must send the VM: `tcp:HOST:PORT` (the host is unspecified,
    /// `0.0.0.0` or `::`, when the destination listens on every address; the source then uses
    /// the destination daemon's host).
    pub endpoint: String,
    /// The destination's VMM takes only TLS: the source must connect with its daemon's
    /// certificate and check the destination's against its CA.
    #[serde(default)]
    pub tls: bool,
    /// With `tls`: the name (DNS name or IP address) the destination's certificate is issued
    /// for, which the source checks it by (the endpoint's host may not be in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vm_names_accept_dns_like_and_refuse_paths() {
        assert!(valid_vm_name("web-1.prod_a"));
        assert!(!valid_vm_name(""));
        assert!(!valid_vm_name("-x"));
        assert!(!valid_vm_name("a/b"));
        assert!(!valid_vm_name(".."));
        assert!(!valid_vm_name(&"a".repeat(64)));
    }

    #[test]
    fn test_spec_defaults_fill_missing_fields() {
        let spec: VmSpec = serde_json::from_str(r#"{"name":"a","kernel":"/k"}"#).unwrap();

        assert_eq!(spec.vcpus, 1);
        assert_eq!(spec.memory_mib, 512);
        assert!(spec.disks.is_empty());
    }

    #[test]
    fn test_migrate_request_takes_defaults_and_refuses_unknown_fields() {
        let r: MigrateRequest =
            serde_json::from_str(r#"{"to":"/run/b.sock","converge":"abort"}"#).unwrap();
        let bad = serde_json::from_str::<MigrateRequest>(r#"{"to":"x","speed":1}"#);

        assert_eq!(r.converge, Some(Converge::Abort));
        assert_eq!(r.downtime_ms, None);
        assert!(bad.is_err());
        assert!(MigrationPhase::Completed.is_done());
        assert!(!MigrationPhase::Final.is_done());
    }

    #[test]
    fn test_update_distinguishes_null_from_absent() {
        let u: VmUpdate =
            serde_json::from_str(r#"{"resources":{"cpu_quota_pct":null,"cpu_weight":50}}"#)
                .unwrap();
        let r = u.resources.unwrap();

        assert_eq!(r.cpu_quota_pct, Some(None));
        assert_eq!(r.cpu_weight, Some(Some(50)));
        assert_eq!(r.memory_limit_mib, None);
    }
}
