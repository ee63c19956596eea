//! The migrate scenario: live migration of a running test guest to a new VMM process on the
//! same host, Ferrite against QEMU in the same run, over three transports (each with every
//! column, reported in a table of its own):
//!
//! - `loopback`: TCP 127.0.0.1;
//! - `netns`: TCP between two network namespaces (`fb-mig-a-PID` 10.99.0.1 and `fb-mig-b-PID`
//!   10.99.0.2, joined by a veth pair, created once per run and deleted at the end): the source
//!   runs under `ip netns exec A`, the destination under `ip netns exec B` (control and QMP
//!   sockets are Unix sockets on the filesystem, reachable from both);
//! - `fd`: same-host handover over a Unix socket, no guest RAM copied: Ferrite's source runs
//!   with `--memory-shared` and gets `fd_handover: true`; QEMU keeps guest RAM in a `/dev/shm`
//!   file mapped shared by both sides (`memory-backend-file,share=on`), its destination starts
//!   with `-incoming defer`, and both get the `x-ignore-shared` capability.
//!
//! The steps below are the loopback ones; the others differ only in the endpoint.
//!
//! Per guest RAM size, workload and iteration, for every column in turn (Ferrite, then each
//! QEMU machine with its default migration bandwidth and with the bandwidth unlimited):
//!
//! 1. Boot the source (Ferrite `--api-socket S`, QEMU `-qmp unix:S`) with the workload on the
//!    guest command line (`cmds="dirty ..."`, nothing for the idle guest) and wait for READY,
//!    then for `OK dirty`, then `settle` more while the guest's tick lines come in.
//! 2. Start the destination (Ferrite `run --incoming tcp:127.0.0.1:PORT`, QEMU the source's
//!    command line plus `-incoming tcp:127.0.0.1:PORT`) and wait until PORT listens
//!    (`/proc/net/tcp`, so the check does not take the destination's one connection).
//! 3. Start the migration (Ferrite: the `migrate` request; QEMU: QMP `migrate`, after
//!    `migrate-set-parameters max-bandwidth` for the unlimited column) and poll its status
//!    every 2 ms (Ferrite `migrate-status`, QEMU `query-migrate`) until it completes.
//!    The VMM's own figures: Ferrite's `migrated to ...` stderr line (downtime, total, rounds,
//!    MiB sent); QEMU's `query-migrate` (`downtime`, `total-time`, `ram.transferred`,
//!    `ram.dirty-sync-count`).
//! 4. On the destination: the guest's tick lines continue there. The first tick line that
//!    starts at the destination carries in `gap_us` the longest gap between two iterations of
//!    the guest's loop in the tick window that contains the switch-over (guest TSC, which is
//!    the host's TSC here and keeps running across the pause): the guest-visible pause. The
//!    loop counter gives a second view: run time lost between the source's last tick and the
//!    destination's second tick, against the counting rate before the migration.
//! 5. Check the guest on the destination: `dirty` is stopped with a byte and `dirty-check`
//!    must find every page as the dirtying loop left it; the idle guest must answer `echo`.
//!    Then both VMMs are killed.
//!
//! Everything lives in a temporary directory removed at the end; every VMM is killed when its
//! handle is dropped (and by `PR_SET_PDEATHSIG` if the harness dies).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ChildStdin;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::interrupt::{interrupted, SignalGuard};
use super::snapshot::{sized, source_spec, Qmp, TempDir};
use crate::child::{CommandSpec, VmmProcess};
use crate::error::BenchError;
use crate::runner::Plan;
use crate::scenario::{ms_between, RunConfig};
use crate::stats::Summary;
use crate::vmm::{GuestSpec, Vmm, VmmKind};

const MIB: f64 = (1u64 << 20) as f64;
/// Migration status is polled this often.
const POLL: Duration = Duration::from_millis(2);
/// QEMU's `max-bandwidth` in the unlimited column (bytes/s): effectively none.
const QEMU_UNLIMITED: u64 = 100 << 30;
/// How long the destination may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Tick lines awaited on the destination after the switch-over.
const AFTER_TICKS: usize = 3;
/// `echo M` is written again this often until the destination's guest answers.
const ECHO_RETRY: Duration = Duration::from_millis(200);
/// Pre-migration tick intervals needed for the counting rate.
const MIN_RATE_SAMPLES: usize = 2;

/// What the guest does while it is migrated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// At the console prompt, no command (the guest halts between timer interrupts).
    Idle,
    /// `dirty` over 1 MiB at 1 page/s: a busy loop that writes next to nothing but measures
    /// the pause.
    Spin,
    /// `dirty` with `--migrate-dirty` (default 64 MiB at 20000 pages/s).
    Dirty,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::Idle => "idle guest",
            Workload::Spin => "busy loop, nothing dirtied",
            Workload::Dirty => "dirtying guest",
        }
    }
}

/// How the source reaches the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// TCP over 127.0.0.1, both VMMs in the harness's network namespace.
    Loopback,
    /// TCP over a veth pair between two network namespaces: the source runs in one
    /// (10.99.0.1), the destination in the other (10.99.0.2).
    Netns,
    /// Same-host handover over a Unix socket without copying guest RAM: Ferrite
    /// `--memory-shared` + `fd_handover`; QEMU guest RAM in one shared `/dev/shm` file mapped
    /// by both sides + the `x-ignore-shared` capability.
    Fd,
}

impl Transport {
    fn title(self) -> &'static str {
        match self {
            Transport::Loopback => "TCP 127.0.0.1",
            Transport::Netns => "TCP between two network namespaces (veth)",
            Transport::Fd => {
                "same-host handover over a Unix socket (Ferrite fd passing; QEMU shared RAM file + x-ignore-shared)"
            }
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Transport::Loopback => "",
            Transport::Netns => "-netns",
            Transport::Fd => "-fd",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Transport::Loopback => "",
            Transport::Netns => " (netns)",
            Transport::Fd => " (handover)",
        }
    }
}

/// QEMU's migration bandwidth in a QEMU column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QemuBandwidth {
    /// QEMU's default `max-bandwidth` (not touched).
    Default,
    /// `migrate-set-parameters max-bandwidth` 100 GiB/s.
    Unlimited,
}

/// Settings of the migrate scenario.
#[derive(Debug, Clone)]
pub struct MigratePlan {
    /// Guest RAM sizes, MiB.
    pub sizes_mib: Vec<u64>,
    /// Workloads, each at every size.
    pub workloads: Vec<Workload>,
    /// `MIB RATE` of the dirtying guest's `dirty`.
    pub dirty_args: String,
    /// `MIB RATE` of the busy-loop guest's `dirty`.
    pub spin_args: String,
    /// `REPORT_MS` of `dirty`: the tick period.
    pub report_ms: u64,
    /// Time the workload runs before the migration starts.
    pub settle: Duration,
    /// Ferrite's `downtime_ms`.
    pub downtime_ms: u64,
    /// Ferrite's `bandwidth_mib_s` (0: unlimited).
    pub bandwidth_mib_s: u64,
    /// Ferrite's `converge` (`throttle` or `abort`).
    pub converge: String,
    /// Ferrite's source `--dirty-log` (`auto`, `ring` or `bitmap`).
    pub dirty_log: String,
    /// The QEMU columns per QEMU machine.
    pub qemu_bandwidths: Vec<QemuBandwidth>,
    /// The transports, each with every column.
    pub transports: Vec<Transport>,
    /// Parent of the temporary directory.
    pub dir: PathBuf,
}

impl MigratePlan {
    /// The guest command line's `cmds` for a workload.
    pub fn guest_cmds(&self, w: Workload) -> String {
        match w {
            Workload::Idle => String::new(),
            Workload::Spin => format!("dirty {} {}", self.spin_args, self.report_ms),
            Workload::Dirty => format!("dirty {} {}", self.dirty_args, self.report_ms),
        }
    }

    fn ferrite_request(&self, to: &str, fd_handover: bool, timeout: Duration) -> serde_json::Value {
        let mut req = serde_json::json!({
            "op": "migrate",
            "to": to,
            "downtime_ms": self.downtime_ms,
            "bandwidth_mib_s": self.bandwidth_mib_s,
            "timeout_s": timeout.as_secs().max(1),
            "converge": self.converge,
        });
        if fd_handover {
            req["fd_handover"] = serde_json::Value::Bool(true);
        }
        req
    }
}

/// Metrics measured every iteration: (id, label, unit, decimals).
const METRICS: &[(&str, &str, &str, usize)] = &[
    (
        "total_ms",
        "total time, the VMM's figure (Ferrite `total`, QEMU `total-time`)",
        "ms",
        1,
    ),
    (
        "client_ms",
        "request → source reports completed (harness clock, 2 ms polling)",
        "ms",
        1,
    ),
    (
        "downtime_ms",
        "downtime, the VMM's figure (Ferrite `downtime`, QEMU `downtime` in whole ms)",
        "ms",
        1,
    ),
    (
        "guest_gap_ms",
        "guest-visible pause: longest loop gap in the switch-over tick (guest TSC)",
        "ms",
        1,
    ),
    (
        "guest_lost_ms",
        "guest run time lost around the switch-over (loop-counter deficit)",
        "ms",
        1,
    ),
    (
        "sent_mib",
        "sent (Ferrite `sent`, QEMU `ram.transferred`)",
        "MiB",
        1,
    ),
    (
        "rounds",
        "copy rounds (Ferrite `rounds`, QEMU `dirty-sync-count`)",
        "",
        0,
    ),
    (
        "throttle_pct",
        "largest vCPU throttle seen (Ferrite `throttle_pct`, QEMU `cpu-throttle-percentage`)",
        "%",
        0,
    ),
    (
        "harvest_ms",
        "dirty-log harvest per round, the VMM's figure (Ferrite `dirty log ...: N harvests, T ms`: T/N)",
        "ms",
        3,
    ),
];

/// One column of the report: a VMM and, for QEMU, its bandwidth setting.
#[derive(Debug, Clone, Serialize)]
pub struct ColumnInfo {
    /// Stable key (JSON).
    pub key: String,
    /// Column title.
    pub label: String,
    /// Which VMM.
    pub vmm: VmmKind,
    /// QEMU bandwidth setting.
    pub qemu_bandwidth: Option<QemuBandwidth>,
    /// How the source reaches the destination.
    pub transport: Transport,
    /// Why it did not run, if it did not.
    pub skipped: Option<String>,
    /// Source command (first size and workload, placeholders for the socket).
    pub source_command: String,
    /// Destination command.
    pub destination_command: String,
    /// How the migration is started.
    pub request: String,
    /// `tsc_hz` the guest printed at boot (its own calibration).
    pub guest_tsc_hz: Option<u64>,
}

/// The samples of one metric in one column: the median of the iterations that produced a
/// value, and why the others did not.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Median, min, max and count of the values.
    pub summary: Option<Summary>,
    /// Iterations without a value.
    pub missing: usize,
    /// The first reason a value was missing.
    pub reason: Option<String>,
}

/// One column in one case.
#[derive(Debug, Clone, Serialize)]
pub struct ColumnResult {
    /// [`ColumnInfo::key`].
    pub key: String,
    /// Metric id → cell.
    pub metrics: BTreeMap<String, Cell>,
    /// Iterations whose migration (or its check) failed, with the reason.
    pub failures: Vec<String>,
}

/// One guest RAM size and workload.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// The workload.
    pub workload: Workload,
    /// The guest's `cmds=`.
    pub guest_cmds: String,
    /// One entry per column that ran.
    pub columns: Vec<ColumnResult>,
}

/// The whole scenario.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    /// Command that reproduces this run.
    pub reproduce: String,
    /// Host description.
    pub host: String,
    /// Guest ELF.
    pub guest: String,
    /// Counted iterations.
    pub iterations: usize,
    /// Warm-up iterations.
    pub warmup: usize,
    /// The host's TSC rate, measured by the harness (Hz).
    pub host_tsc_hz: Option<f64>,
    /// Ferrite's `migrate` request (port elided).
    pub ferrite_request: String,
    /// QEMU's defaults as `query-migrate-parameters` gave them.
    pub qemu_defaults: Option<String>,
    /// Tick period of `dirty`, ms.
    pub report_ms: u64,
    /// The columns.
    pub columns: Vec<ColumnInfo>,
    /// One entry per size and workload.
    pub cases: Vec<CaseReport>,
    /// Set when the scenario stopped early or could not run.
    pub error: Option<String>,
}

/// A column while the scenario runs.
struct Column<'a> {
    vmm: &'a Vmm,
    bw: Option<QemuBandwidth>,
    transport: Transport,
    key: String,
}

/// What one migration measured.
#[derive(Debug, Clone)]
struct Sample {
    total_ms: f64,
    client_ms: f64,
    downtime_ms: f64,
    guest_gap_ms: Result<f64, String>,
    guest_lost_ms: Result<f64, String>,
    sent_mib: f64,
    rounds: f64,
    throttle_pct: f64,
    harvest_ms: Result<f64, String>,
}

/// Things learnt along the way, for the report.
#[derive(Default)]
struct Observed {
    guest_tsc_hz: Option<u64>,
    qemu_defaults: Option<String>,
}

/// Run the scenario.
pub fn run(vmms: &[Vmm], plan: Plan, mplan: &MigratePlan, cfg: &RunConfig) -> MigrateReport {
    let _signals = SignalGuard::install();
    let host_tsc_hz = host_tsc_hz();
    let mut report = MigrateReport {
        reproduce: String::new(),
        host: String::new(),
        guest: cfg.guest.kernel.display().to_string(),
        iterations: plan.iterations,
        warmup: plan.warmup,
        host_tsc_hz,
        ferrite_request: mplan
            .ferrite_request("tcp:HOST:PORT", false, cfg.command_timeout)
            .to_string(),
        qemu_defaults: None,
        report_ms: mplan.report_ms,
        columns: Vec::new(),
        cases: Vec::new(),
        error: None,
    };
    let mut columns: Vec<Column> = Vec::new();
    for &transport in &mplan.transports {
        for v in vmms {
            let bws: Vec<Option<QemuBandwidth>> = match (v.kind, transport) {
                (VmmKind::Ferrite, _) => vec![None],
                // Nothing is copied on a handover: the bandwidth does not matter.
                (_, Transport::Fd) => vec![Some(QemuBandwidth::Unlimited)],
                (VmmKind::QemuMicrovm | VmmKind::QemuQ35, _) => {
                    mplan.qemu_bandwidths.iter().copied().map(Some).collect()
                }
            };
            for bw in bws {
                columns.push(Column {
                    vmm: v,
                    bw,
                    transport,
                    key: column_key(v.kind, bw, transport),
                });
            }
        }
    }
    // The namespaces exist for the whole run and are deleted when this guard drops (also
    // when the scenario stops early).
    let netns = if mplan.transports.contains(&Transport::Netns) {
        Some(NetnsPair::create())
    } else {
        None
    };
    let netns_error = match &netns {
        Some(Err(e)) => Some(e.clone()),
        _ => None,
    };
    let pair = match &netns {
        Some(Ok(p)) => Some(p),
        _ => None,
    };
    let first_size = mplan.sizes_mib.first().copied().unwrap_or(512);
    let first_cmds = mplan.guest_cmds(mplan.workloads.first().copied().unwrap_or(Workload::Idle));
    let guest0 = sized(&cfg.guest, first_size);
    for c in &columns {
        let placeholder = Route::new(c, pair, Path::new("DIR"), 0);
        // Port 0 of the placeholder shown as PORT (a Unix endpoint has none).
        let shown_to = match placeholder.to.strip_suffix(":0") {
            Some(base) if base.starts_with("tcp:") => format!("{base}:PORT"),
            _ => placeholder.to.clone(),
        };
        let skipped = c.vmm.unavailable_reason().or_else(|| {
            (c.transport == Transport::Netns)
                .then(|| netns_error.clone())
                .flatten()
        });
        report.columns.push(ColumnInfo {
            key: c.key.clone(),
            label: column_label(c),
            vmm: c.vmm.kind,
            qemu_bandwidth: c.bw,
            transport: c.transport,
            skipped,
            source_command: in_ns(
                source_spec_for(
                    c,
                    &guest0,
                    &cfg.cmdline(&first_cmds),
                    Path::new("SRC.sock"),
                    Path::new("RAM"),
                    &mplan.dirty_log,
                ),
                placeholder.src_ns.as_deref(),
            )
            .display(),
            destination_command: in_ns(
                dest_spec(
                    c,
                    &guest0,
                    &cfg.cmdline(&first_cmds),
                    &placeholder.to,
                    Path::new("DST.sock"),
                    Path::new("RAM"),
                ),
                placeholder.dst_ns.as_deref(),
            )
            .display()
            .replace(&placeholder.to, &shown_to),
            request: request_text(c, mplan, cfg, &shown_to),
            guest_tsc_hz: None,
        });
    }
    let root = mplan
        .dir
        .join(format!("ferrite-bench-migrate-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&root) {
        report.error = Some(format!("cannot create {}: {e}", root.display()));
        return report;
    }
    let root = TempDir(root);
    let active: Vec<usize> = (0..columns.len())
        .filter(|&i| report.columns[i].skipped.is_none())
        .collect();
    let mut observed: Vec<Observed> = (0..columns.len()).map(|_| Observed::default()).collect();
    'cases: for &mib in &mplan.sizes_mib {
        let guest = sized(&cfg.guest, mib);
        for &w in &mplan.workloads {
            let cmds = mplan.guest_cmds(w);
            let mut samples: Vec<Vec<Result<Sample, String>>> = vec![Vec::new(); columns.len()];
            for it in 0..plan.warmup + plan.iterations {
                let counted = it >= plan.warmup;
                for &ci in &active {
                    if interrupted() {
                        report.error = Some("interrupted by a signal".to_string());
                        break 'cases;
                    }
                    let c = &columns[ci];
                    eprintln!(
                        "ferrite-bench: migrate {mib} MiB {} {} iteration {}/{}",
                        w.label(),
                        column_label(c),
                        it + 1,
                        plan.warmup + plan.iterations
                    );
                    let r = migrate_once(
                        c,
                        pair,
                        &guest,
                        &cmds,
                        w,
                        cfg,
                        mplan,
                        &root.0,
                        host_tsc_hz,
                        &mut observed[ci],
                    );
                    match &r {
                        Ok(s) => eprintln!(
                            "ferrite-bench:   total {:.1} ms, downtime {:.1} ms, guest gap {}, {:.1} MiB, {} rounds",
                            s.total_ms,
                            s.downtime_ms,
                            s.guest_gap_ms
                                .as_ref()
                                .map(|g| format!("{g:.1} ms"))
                                .unwrap_or_else(|e| format!("n/a ({e})")),
                            s.sent_mib,
                            s.rounds
                        ),
                        Err(e) => eprintln!("ferrite-bench:   failed: {e}"),
                    }
                    if counted {
                        samples[ci].push(r);
                    }
                }
            }
            let mut case = CaseReport {
                memory_mib: mib,
                workload: w,
                guest_cmds: cmds.clone(),
                columns: Vec::new(),
            };
            for &ci in &active {
                case.columns
                    .push(column_result(&columns[ci].key, &samples[ci]));
            }
            report.cases.push(case);
        }
    }
    for (ci, o) in observed.iter().enumerate() {
        report.columns[ci].guest_tsc_hz = o.guest_tsc_hz;
        if report.qemu_defaults.is_none() {
            report.qemu_defaults.clone_from(&o.qemu_defaults);
        }
    }
    drop(root);
    drop(netns);
    report
}

fn column_key(kind: VmmKind, bw: Option<QemuBandwidth>, transport: Transport) -> String {
    let vmm = match kind {
        VmmKind::Ferrite => "ferrite",
        VmmKind::QemuMicrovm => "qemu-microvm",
        VmmKind::QemuQ35 => "qemu-q35",
    };
    let base = match (bw, transport) {
        (None, _) | (_, Transport::Fd) => vmm.to_string(),
        (Some(QemuBandwidth::Default), _) => format!("{vmm}-default-bw"),
        (Some(QemuBandwidth::Unlimited), _) => format!("{vmm}-unlimited-bw"),
    };
    format!("{base}{}", transport.suffix())
}

fn column_label(c: &Column) -> String {
    let kind = c.vmm.kind;
    let base = match (c.bw, c.transport) {
        (None, _) => kind.label().to_string(),
        (_, Transport::Fd) => format!("{}, shared RAM file", kind.label()),
        (Some(QemuBandwidth::Default), _) => format!("{}, default bandwidth", kind.label()),
        (Some(QemuBandwidth::Unlimited), _) => format!("{}, unlimited bandwidth", kind.label()),
    };
    format!("{base}{}", c.transport.short())
}

/// How a column's migration is started, for the report.
fn request_text(c: &Column, mplan: &MigratePlan, cfg: &RunConfig, to: &str) -> String {
    match (c.vmm.kind, c.transport, c.bw) {
        (VmmKind::Ferrite, t, _) => mplan
            .ferrite_request(to, t == Transport::Fd, cfg.command_timeout)
            .to_string(),
        (_, Transport::Fd, _) => format!(
            "both sides: QMP migrate-set-capabilities x-ignore-shared; destination: migrate-incoming {{\"uri\": \"{to}\"}}; source: migrate-set-parameters {{\"max-bandwidth\": {QEMU_UNLIMITED}}}; migrate {{\"uri\": \"{to}\"}}"
        ),
        (_, _, Some(QemuBandwidth::Unlimited)) => format!(
            "QMP migrate-set-parameters {{\"max-bandwidth\": {QEMU_UNLIMITED}}}; migrate {{\"uri\": \"{to}\"}}"
        ),
        _ => format!("QMP migrate {{\"uri\": \"{to}\"}}"),
    }
}

fn column_result(key: &str, samples: &[Result<Sample, String>]) -> ColumnResult {
    type Get = fn(&Sample) -> Result<f64, String>;
    let getters: [(&str, Get); 9] = [
        ("total_ms", |s| Ok(s.total_ms)),
        ("client_ms", |s| Ok(s.client_ms)),
        ("downtime_ms", |s| Ok(s.downtime_ms)),
        ("guest_gap_ms", |s| s.guest_gap_ms.clone()),
        ("guest_lost_ms", |s| s.guest_lost_ms.clone()),
        ("sent_mib", |s| Ok(s.sent_mib)),
        ("rounds", |s| Ok(s.rounds)),
        ("throttle_pct", |s| Ok(s.throttle_pct)),
        ("harvest_ms", |s| s.harvest_ms.clone()),
    ];
    let mut metrics = BTreeMap::new();
    for (id, get) in getters {
        let mut values = Vec::new();
        let mut missing = 0;
        let mut reason = None;
        for s in samples {
            match s.as_ref().map_err(Clone::clone).and_then(get) {
                Ok(v) => values.push(v),
                Err(e) => {
                    missing += 1;
                    reason.get_or_insert(e);
                }
            }
        }
        metrics.insert(
            id.to_string(),
            Cell {
                summary: Summary::of(&values),
                missing,
                reason,
            },
        );
    }
    ColumnResult {
        key: key.to_string(),
        metrics,
        failures: samples
            .iter()
            .filter_map(|s| s.as_ref().err().cloned())
            .collect(),
    }
}

/// The source's command: [`source_spec`], plus shared guest RAM for a handover (Ferrite
/// `--memory-shared`; QEMU a `/dev/shm` file `ram` mapped shared).
fn source_spec_for(
    c: &Column,
    guest: &GuestSpec,
    cmdline: &str,
    sock: &Path,
    ram: &Path,
    dirty_log: &str,
) -> CommandSpec {
    let mut spec = source_spec(c.vmm, guest, cmdline, sock);
    if c.vmm.kind == VmmKind::Ferrite && c.transport != Transport::Fd {
        spec.args
            .extend(["--dirty-log".into(), dirty_log.to_string()]);
    }
    if c.transport == Transport::Fd {
        match c.vmm.kind {
            VmmKind::Ferrite => spec.args.push("--memory-shared".into()),
            VmmKind::QemuMicrovm | VmmKind::QemuQ35 => {
                spec.args.extend(qemu_shared_ram(guest, ram))
            }
        }
    }
    spec
}

/// QEMU arguments that put guest RAM in the file `ram`, mapped shared.
fn qemu_shared_ram(guest: &GuestSpec, ram: &Path) -> [String; 4] {
    [
        "-object".into(),
        format!(
            "memory-backend-file,id=fbram,size={}M,mem-path={},share=on",
            guest.memory_mib,
            ram.display()
        ),
        "-machine".into(),
        "memory-backend=fbram".into(),
    ]
}

/// The destination's command: Ferrite takes everything from the source; QEMU needs the same
/// machine and devices (the kernel command line does not matter, it is kept the same). For a
/// QEMU handover the destination maps the source's RAM file, gets a QMP socket `sock` and
/// waits (`-incoming defer`) until the capability is set there.
fn dest_spec(
    c: &Column,
    guest: &GuestSpec,
    cmdline: &str,
    to: &str,
    sock: &Path,
    ram: &Path,
) -> CommandSpec {
    let v = c.vmm;
    match v.kind {
        VmmKind::Ferrite => CommandSpec {
            program: v.program.clone(),
            args: vec!["run".into(), "--incoming".into(), to.to_string()],
        },
        VmmKind::QemuMicrovm | VmmKind::QemuQ35 => {
            let mut spec = v.command(guest, cmdline);
            if c.transport == Transport::Fd {
                spec.args.extend(qemu_shared_ram(guest, ram));
                spec.args.extend([
                    "-qmp".to_string(),
                    format!("unix:{},server=on,wait=off", sock.display()),
                    "-incoming".to_string(),
                    "defer".to_string(),
                ]);
            } else {
                spec.args.extend(["-incoming".to_string(), to.to_string()]);
            }
            spec
        }
    }
}

/// `spec` run inside network namespace `ns` (`ip netns exec`, which execs the program: the
/// pid stays the VMM's).
fn in_ns(spec: CommandSpec, ns: Option<&str>) -> CommandSpec {
    match ns {
        None => spec,
        Some(ns) => {
            let mut args = vec![
                "netns".to_string(),
                "exec".to_string(),
                ns.to_string(),
                spec.program.display().to_string(),
            ];
            args.extend(spec.args);
            CommandSpec {
                program: PathBuf::from("ip"),
                args,
            }
        }
    }
}

/// The source's namespace's address on the veth pair.
const NETNS_SRC_CIDR: &str = "10.99.0.1/24";
/// The destination's.
const NETNS_DST_CIDR: &str = "10.99.0.2/24";
const NETNS_DST_ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 99, 0, 2);

/// Two network namespaces joined by a veth pair, deleted on drop (which also deletes the
/// veth pair).
struct NetnsPair {
    a: String,
    b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetnsPair {
    fn create() -> Result<Self, String> {
        let pid = std::process::id();
        let pair = NetnsPair {
            a: format!("fb-mig-a-{pid}"),
            b: format!("fb-mig-b-{pid}"),
        };
        let (va, vb) = (format!("fbma{pid}"), format!("fbmb{pid}"));
        ip(&["netns", "add", &pair.a])?;
        ip(&["netns", "add", &pair.b])?;
        ip(&[
            "-n", &pair.a, "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns",
            &pair.b,
        ])?;
        for (ns, dev, cidr) in [
            (&pair.a, &va, NETNS_SRC_CIDR),
            (&pair.b, &vb, NETNS_DST_CIDR),
        ] {
            ip(&["-n", ns, "addr", "add", cidr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// Where the destination listens, for the readiness check.
enum Listen {
    /// TCP: address and port, read from the destination's own `/proc/PID/net/tcp` (its
    /// namespace's).
    Tcp(std::net::Ipv4Addr, u16),
    /// A Unix socket path, read from `/proc/net/unix`.
    Unix(PathBuf),
}

/// One migration's endpoints.
struct Route {
    src_ns: Option<String>,
    dst_ns: Option<String>,
    /// The destination's endpoint (`tcp:...` or `unix:...`).
    to: String,
    listen: Listen,
}

impl Route {
    fn new(c: &Column, pair: Option<&NetnsPair>, dir: &Path, port: u16) -> Self {
        match c.transport {
            Transport::Loopback => Route {
                src_ns: None,
                dst_ns: None,
                to: format!("tcp:127.0.0.1:{port}"),
                listen: Listen::Tcp(std::net::Ipv4Addr::LOCALHOST, port),
            },
            Transport::Netns => Route {
                src_ns: Some(pair.map_or("NS_A".into(), |p| p.a.clone())),
                dst_ns: Some(pair.map_or("NS_B".into(), |p| p.b.clone())),
                to: format!("tcp:{NETNS_DST_ADDR}:{port}"),
                listen: Listen::Tcp(NETNS_DST_ADDR, port),
            },
            Transport::Fd => {
                let path = dir.join(format!("{}.mig", c.key));
                Route {
                    src_ns: None,
                    dst_ns: None,
                    to: format!("unix:{}", path.display()),
                    listen: Listen::Unix(path),
                }
            }
        }
    }

    /// Whether the destination (pid) listens yet.
    fn listening(&self, pid: u32) -> bool {
        match &self.listen {
            Listen::Tcp(addr, port) => std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))
                .is_ok_and(|t| listening_in(&t, *addr, *port)),
            Listen::Unix(path) => {
                std::fs::read_to_string("/proc/net/unix").is_ok_and(|t| unix_listening_in(&t, path))
            }
        }
    }
}

/// A TCP port on 127.0.0.1 that nobody listens on right now.
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

/// Whether something listens on `addr`:`port` (or on any address) in a `/proc/net/tcp` text.
fn listening_in(proc_net_tcp: &str, addr: std::net::Ipv4Addr, port: u16) -> bool {
    let want = [
        format!("{:08X}:{port:04X}", u32::from_le_bytes(addr.octets())),
        format!("00000000:{port:04X}"),
    ];
    proc_net_tcp.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[3] == "0A" && want.iter().any(|w| w == f[1])
    })
}

/// Whether a `/proc/net/unix` text has a listening socket (flag `__SO_ACCEPTCON`) at `path`.
fn unix_listening_in(proc_net_unix: &str, path: &Path) -> bool {
    let Some(path) = path.to_str() else {
        return false;
    };
    proc_net_unix.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 7 && f[3] == "00010000" && f[7] == path
    })
}

/// A file removed on drop.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The host's TSC rate: TSC cycles over 200 ms of `Instant` time.
fn host_tsc_hz() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let t0 = Instant::now();
        // SAFETY: rdtsc reads a counter; every x86_64 CPU has it and it touches no memory.
        let c0 = unsafe { core::arch::x86_64::_rdtsc() };
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: as above.
        let c1 = unsafe { core::arch::x86_64::_rdtsc() };
        let secs = t0.elapsed().as_secs_f64();
        (secs > 0.0 && c1 > c0).then(|| (c1 - c0) as f64 / secs)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Console lines of one VMM with their arrival times, collected while waiting.
struct Console {
    lines: Vec<(Instant, String)>,
}

impl Console {
    fn new() -> Self {
        Self { lines: Vec::new() }
    }

    /// Read lines until one satisfies `pred` (its index) or `deadline`.
    fn until(
        &mut self,
        p: &mut VmmProcess,
        deadline: Instant,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<usize, String> {
        loop {
            let line = p.next_line(deadline, what).map_err(|e| e.to_string())?;
            let hit = pred(&line.text);
            self.lines.push((line.at, line.text));
            if hit {
                return Ok(self.lines.len() - 1);
            }
        }
    }

    /// Read lines until `deadline`; an exit of the VMM ends it early when `exit_ok`.
    fn collect(
        &mut self,
        p: &mut VmmProcess,
        deadline: Instant,
        exit_ok: bool,
    ) -> Result<(), String> {
        loop {
            match p.next_line(deadline, "console lines") {
                Ok(line) => self.lines.push((line.at, line.text)),
                Err(BenchError::Timeout { .. }) => return Ok(()),
                Err(BenchError::EarlyExit { .. }) if exit_ok => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// One `tick` line of `dirty`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tick {
    n: u64,
    value: u64,
    gap_us: u64,
}

/// Parses `tick n=N value=V gen=G pos=P dirtied=D gap_us=X maxgap_us=Y`; a line that does not
/// start with `tick n=` (the part of a line printed after the switch-over) is not one.
fn parse_tick(text: &str) -> Option<Tick> {
    if !text.starts_with("tick n=") {
        return None;
    }
    let field = |key: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse::<u64>().ok())
    };
    // maxgap_us is the last field: a line cut short lacks it.
    field("maxgap_us")?;
    Some(Tick {
        n: field("n")?,
        value: field("value")?,
        gap_us: field("gap_us")?,
    })
}

/// `tsc_hz=N` of the test guest's `boot ...` line.
fn parse_tsc_hz(text: &str) -> Option<u64> {
    if !text.starts_with("boot ") {
        return None;
    }
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("tsc_hz="))
        .and_then(|v| v.parse().ok())
}

/// The guest's view of the switch-over, from the tick lines.
#[derive(Debug, Clone, PartialEq)]
struct GuestView {
    gap_ms: Result<f64, String>,
    lost_ms: Result<f64, String>,
}

/// `src`: the source's tick lines with whether each arrived before the migration request;
/// `dst`: the destination's console lines in order. `scale` converts the guest's idea of
/// time (its calibrated `tsc_hz`) to real time: guest_tsc_hz / host_tsc_hz.
fn guest_view(src: &[(bool, Tick)], dst: &[&str], period_ms: f64, scale: f64) -> GuestView {
    let dst_ticks: Vec<Tick> = dst.iter().filter_map(|l| parse_tick(l)).collect();
    let Some(first) = dst_ticks.first() else {
        return GuestView {
            gap_ms: Err("no tick line on the destination".into()),
            lost_ms: Err("no tick line on the destination".into()),
        };
    };
    let gap_ms = Ok(first.gap_us as f64 / 1e3 * scale);
    let lost_ms = (|| {
        let pre: Vec<Tick> = src
            .iter()
            .filter(|(before, t)| *before && t.n >= 2)
            .map(|(_, t)| *t)
            .collect();
        let mut rates: Vec<f64> = pre
            .windows(2)
            .filter(|w| w[1].n > w[0].n)
            .map(|w| (w[1].value - w[0].value) as f64 / (w[1].n - w[0].n) as f64)
            .collect();
        if rates.len() < MIN_RATE_SAMPLES {
            return Err(format!(
                "only {} tick intervals before the migration",
                rates.len()
            ));
        }
        rates.sort_by(f64::total_cmp);
        let rate = rates[rates.len() / 2];
        let last = src
            .last()
            .map(|(_, t)| *t)
            .ok_or("no tick line on the source")?;
        let second = dst_ticks.get(1).ok_or("one tick line on the destination")?;
        if second.n <= last.n || second.value < last.value || rate <= 0.0 {
            return Err(format!(
                "tick lines out of order: source n={} value={}, destination n={} value={}",
                last.n, last.value, second.n, second.value
            ));
        }
        let periods = (second.n - last.n) as f64;
        let ran = (second.value - last.value) as f64 / rate;
        Ok(((periods - ran) * period_ms * scale).max(0.0))
    })();
    GuestView { gap_ms, lost_ms }
}

/// One request line to a Ferrite control socket and its reply.
fn ferrite_call(
    sock: &Path,
    req: &serde_json::Value,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let mut s =
        UnixStream::connect(sock).map_err(|e| format!("connect {}: {e}", sock.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{req}\n").as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("read reply: {e}"))?;
    serde_json::from_str(line.trim()).map_err(|e| format!("reply {line:?}: {e}"))
}

/// The VMM's own figures of a completed migration.
struct Figures {
    total_ms: f64,
    downtime_ms: f64,
    sent_mib: f64,
    rounds: f64,
    /// Time per dirty-log harvest (Ferrite only).
    harvest_ms: Option<f64>,
}

/// Parses Ferrite's `ferrite: migrated to ENDPOINT: downtime D ms, total T ms, R rounds,
/// M MiB sent (P pages, Z zero pages)` line.
fn parse_migrated(stderr: &str) -> Option<Figures> {
    let line = stderr
        .split(" | ")
        .flat_map(str::lines)
        .find(|l| l.contains("migrated to "))?;
    let after = |key: &str| -> Option<f64> {
        let i = line.find(key)? + key.len();
        line[i..].split_whitespace().next()?.parse().ok()
    };
    let before = |key: &str| -> Option<f64> {
        let i = line.find(key)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    Some(Figures {
        downtime_ms: after(": downtime ")?,
        total_ms: after(", total ")?,
        rounds: before(" rounds")?,
        sent_mib: before(" MiB sent")?,
        harvest_ms: line.find(" harvests, ").and_then(|i| {
            let n: f64 = line[..i].split_whitespace().last()?.parse().ok()?;
            let t: f64 = line[i + " harvests, ".len()..]
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            (n > 0.0).then(|| t / n)
        }),
    })
}

/// Boot a source, migrate it to a fresh destination and check the guest there.
#[allow(clippy::too_many_arguments)]
fn migrate_once(
    c: &Column,
    pair: Option<&NetnsPair>,
    guest: &GuestSpec,
    cmds: &str,
    w: Workload,
    cfg: &RunConfig,
    mplan: &MigratePlan,
    dir: &Path,
    host_tsc_hz: Option<f64>,
    observed: &mut Observed,
) -> Result<Sample, String> {
    let sock = dir.join(format!("{}.sock", c.key));
    let dst_sock = dir.join(format!("{}-dst.sock", c.key));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&dst_sock);
    // QEMU's shared RAM file for a handover: in /dev/shm (tmpfs), removed after the iteration.
    let ram = RemoveOnDrop(PathBuf::from(format!(
        "/dev/shm/ferrite-bench-migrate-{}-{}",
        std::process::id(),
        c.key
    )));
    let _ = std::fs::remove_file(&ram.0);
    let route = Route::new(c, pair, dir, free_port()?);
    if let Listen::Unix(p) = &route.listen {
        let _ = std::fs::remove_file(p);
    }
    let cmdline = cfg.cmdline(cmds);
    let mut src = VmmProcess::spawn(
        &in_ns(
            source_spec_for(c, guest, &cmdline, &sock, &ram.0, &mplan.dirty_log),
            route.src_ns.as_deref(),
        ),
        cfg.hard_timeout,
    )
    .map_err(|e| e.to_string())?;
    let mut src_out = Console::new();
    let boot_deadline = src.start() + cfg.boot_timeout;
    src_out
        .until(&mut src, boot_deadline, "the ready marker", |l| {
            l.contains(cfg.ready_marker.as_str())
        })
        .map_err(|e| format!("source: {e}"))?;
    let guest_hz = src_out.lines.iter().find_map(|(_, l)| parse_tsc_hz(l));
    if observed.guest_tsc_hz.is_none() {
        observed.guest_tsc_hz = guest_hz;
    }
    // Guest time → real time (the guest counts in its own calibration of the host's TSC).
    let scale = match (guest_hz, host_tsc_hz) {
        (Some(g), Some(h)) if h > 0.0 => g as f64 / h,
        _ => 1.0,
    };
    if w != Workload::Idle {
        let i = src_out
            .until(
                &mut src,
                Instant::now() + cfg.command_timeout,
                "`OK dirty`",
                |l| l.starts_with("OK dirty") || l.starts_with("ERR"),
            )
            .map_err(|e| format!("source: {e}"))?;
        if !src_out.lines[i].1.starts_with("OK dirty") {
            return Err(format!("guest refused `{cmds}`: {}", src_out.lines[i].1));
        }
    }
    src_out
        .collect(&mut src, Instant::now() + mplan.settle, false)
        .map_err(|e| format!("source: {e}"))?;

    let (mut dst, mut dst_in) = VmmProcess::spawn_with_stdin(
        &in_ns(
            dest_spec(c, guest, &cmdline, &route.to, &dst_sock, &ram.0),
            route.dst_ns.as_deref(),
        ),
        cfg.hard_timeout,
    )
    .map_err(|e| e.to_string())?;
    let listen_deadline = Instant::now() + LISTEN_TIMEOUT;
    // The QEMU handover's destination waits for its capability and `migrate-incoming`.
    let _dst_qmp = if c.transport == Transport::Fd && c.vmm.kind != VmmKind::Ferrite {
        Some(qemu_incoming(
            &mut dst,
            &dst_sock,
            &route.to,
            cfg,
            listen_deadline,
        )?)
    } else {
        None
    };
    while !route.listening(dst.pid()) {
        if Instant::now() > listen_deadline {
            return Err(format!("destination not listening on {}", route.to));
        }
        if let Some(exit) = dst.wait_exit(Instant::now() + Duration::from_millis(1)) {
            return Err(format!(
                "destination exited ({}) before listening: {}",
                exit.status,
                dst.stderr_after_exit()
            ));
        }
    }

    let deadline = Instant::now() + cfg.command_timeout;
    let (t_req, t_done, figures, throttle_pct) = match c.vmm.kind {
        VmmKind::Ferrite => ferrite_migrate(
            &mut src,
            &sock,
            &route.to,
            c.transport == Transport::Fd,
            mplan,
            cfg,
            deadline,
        )?,
        VmmKind::QemuMicrovm | VmmKind::QemuQ35 => qemu_migrate(
            &sock,
            &route.to,
            c.bw,
            c.transport == Transport::Fd,
            cfg,
            deadline,
            observed,
        )?,
    };
    // The source's last lines: Ferrite's has exited, QEMU's is paused for good.
    src_out
        .collect(&mut src, Instant::now() + Duration::from_millis(50), true)
        .map_err(|e| format!("source: {e}"))?;
    let n_before = src_out.lines.iter().filter(|(at, _)| *at < t_req).count();
    let src_ticks: Vec<(bool, Tick)> = src_out
        .lines
        .iter()
        .enumerate()
        .filter_map(|(i, (_, l))| parse_tick(l).map(|t| (i < n_before, t)))
        .collect();

    let mut dst_out = Console::new();
    let view = if w == Workload::Idle {
        echo_until_answered(&mut dst, &mut dst_in, &mut dst_out, deadline)?;
        let why = "the idle guest runs no loop that could measure it".to_string();
        GuestView {
            gap_ms: Err(why.clone()),
            lost_ms: Err(why),
        }
    } else {
        for _ in 0..AFTER_TICKS {
            dst_out
                .until(&mut dst, deadline, "tick lines on the destination", |l| {
                    parse_tick(l).is_some()
                })
                .map_err(|e| format!("destination: {e}"))?;
        }
        let dst_lines: Vec<&str> = dst_out.lines.iter().map(|(_, l)| l.as_str()).collect();
        let mut view = guest_view(&src_ticks, &dst_lines, mplan.report_ms as f64, scale);
        if w == Workload::Dirty {
            view.lost_ms = Err(
                "dirty logging slows every first write to a page while copying, so the counter deficit is not a pause"
                    .to_string(),
            );
        }
        check_dirty(&mut dst, &mut dst_in, &mut dst_out, deadline)?;
        view
    };
    drop(dst_in);
    dst.kill();
    src.kill();
    Ok(Sample {
        total_ms: figures.total_ms,
        client_ms: ms_between(t_req, t_done),
        downtime_ms: figures.downtime_ms,
        guest_gap_ms: view.gap_ms,
        guest_lost_ms: view.lost_ms,
        sent_mib: figures.sent_mib,
        rounds: figures.rounds,
        throttle_pct,
        harvest_ms: figures
            .harvest_ms
            .ok_or_else(|| "no dirty-log harvest figure (QEMU, or a memory handover)".to_string()),
    })
}

/// Write `echo M` to the destination's console until the guest answers. Input that reaches
/// a QEMU destination before it has loaded the serial port's state is lost with the old state
/// (QEMU's source reports `completed` once it has sent everything, which can be before the
/// destination has loaded it), so it is repeated.
fn echo_until_answered(
    dst: &mut VmmProcess,
    dst_in: &mut ChildStdin,
    out: &mut Console,
    deadline: Instant,
) -> Result<(), String> {
    loop {
        dst_in
            .write_all(b"echo M\r")
            .map_err(|e| format!("destination console: {e}"))?;
        let soon = (Instant::now() + ECHO_RETRY).min(deadline);
        match out.until(dst, soon, "`OK echo M` on the destination", |l| {
            l.contains("OK echo M")
        }) {
            Ok(_) => return Ok(()),
            Err(_) if Instant::now() < deadline && dst.wait_exit(Instant::now()).is_none() => {}
            Err(e) => return Err(format!("destination: {e}")),
        }
    }
}

/// Stop `dirty` on the destination and let `dirty-check` verify every page.
fn check_dirty(
    dst: &mut VmmProcess,
    dst_in: &mut ChildStdin,
    out: &mut Console,
    deadline: Instant,
) -> Result<(), String> {
    dst_in
        .write_all(b"x")
        .map_err(|e| format!("destination console: {e}"))?;
    out.until(dst, deadline, "`OK dirty stopped`", |l| {
        l.starts_with("OK dirty stopped")
    })
    .map_err(|e| format!("destination: {e}"))?;
    dst_in
        .write_all(b"dirty-check\r")
        .map_err(|e| format!("destination console: {e}"))?;
    let i = out
        .until(dst, deadline, "`dirty-check`'s answer", |l| {
            l.starts_with("OK dirty-check") || l.starts_with("ERR")
        })
        .map_err(|e| format!("destination: {e}"))?;
    if out.lines[i].1.starts_with("OK dirty-check") {
        Ok(())
    } else {
        Err(format!(
            "guest memory wrong after the migration: {}",
            out.lines[i].1
        ))
    }
}

type Migrated = (Instant, Instant, Figures, f64);

fn ferrite_migrate(
    src: &mut VmmProcess,
    sock: &Path,
    to: &str,
    fd_handover: bool,
    mplan: &MigratePlan,
    cfg: &RunConfig,
    deadline: Instant,
) -> Result<Migrated, String> {
    let req = mplan.ferrite_request(to, fd_handover, cfg.command_timeout);
    let t_req = Instant::now();
    let reply = ferrite_call(sock, &req, cfg.command_timeout)?;
    if reply["ok"] != serde_json::Value::Bool(true) {
        return Err(format!("migrate refused: {reply}"));
    }
    let status_req = serde_json::json!({"op": "migrate-status"});
    let mut throttle: f64 = 0.0;
    let mut completed_at: Option<Instant> = None;
    let exit = loop {
        if let Some(exit) = src.wait_exit(Instant::now() + POLL) {
            break exit;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "migration not completed after {:?}",
                cfg.command_timeout
            ));
        }
        // The socket goes away as the source exits: a failed call is not an error.
        if let Ok(r) = ferrite_call(sock, &status_req, Duration::from_secs(1)) {
            let m = &r["migration"];
            throttle = throttle.max(m["throttle_pct"].as_f64().unwrap_or(0.0));
            match m["phase"].as_str() {
                Some("completed") => {
                    completed_at.get_or_insert_with(Instant::now);
                }
                Some(p @ ("failed" | "cancelled" | "unknown")) => {
                    return Err(format!("migration {p}: {}", m["error"]));
                }
                _ => {}
            }
        }
    };
    let stderr = src.stderr_after_exit();
    if exit.status != "exit code 5" {
        return Err(format!(
            "source ended with {} instead of 5 (migrated); stderr: {stderr}",
            exit.status
        ));
    }
    let figures =
        parse_migrated(&stderr).ok_or_else(|| format!("no `migrated to` line in: {stderr}"))?;
    Ok((
        t_req,
        completed_at.unwrap_or(exit.at).min(exit.at),
        figures,
        throttle,
    ))
}

/// `migrate-set-capabilities` argument that turns `x-ignore-shared` on.
fn ignore_shared() -> serde_json::Value {
    serde_json::json!({
        "capabilities": [{ "capability": "x-ignore-shared", "state": true }]
    })
}

/// A QEMU handover's destination: connect to its QMP socket (retrying until it exists), turn
/// `x-ignore-shared` on and start listening with `migrate-incoming`. The connection is kept
/// open for the iteration.
fn qemu_incoming(
    dst: &mut VmmProcess,
    sock: &Path,
    to: &str,
    cfg: &RunConfig,
    deadline: Instant,
) -> Result<Qmp, String> {
    let mut q = loop {
        match Qmp::connect(sock, cfg.command_timeout) {
            Ok(q) => break q,
            Err(e) if Instant::now() > deadline => {
                return Err(format!("destination QMP: {e}"));
            }
            Err(_) => {
                if let Some(exit) = dst.wait_exit(Instant::now() + Duration::from_millis(5)) {
                    return Err(format!(
                        "destination exited ({}) before its QMP socket: {}",
                        exit.status,
                        dst.stderr_after_exit()
                    ));
                }
            }
        }
    };
    q.execute("migrate-set-capabilities", Some(ignore_shared()))?;
    q.execute("migrate-incoming", Some(serde_json::json!({ "uri": to })))?;
    Ok(q)
}

#[allow(clippy::too_many_arguments)]
fn qemu_migrate(
    sock: &Path,
    to: &str,
    bw: Option<QemuBandwidth>,
    ignore_shared_ram: bool,
    cfg: &RunConfig,
    deadline: Instant,
    observed: &mut Observed,
) -> Result<Migrated, String> {
    let mut q = Qmp::connect(sock, cfg.command_timeout)?;
    if observed.qemu_defaults.is_none() {
        let p = q.execute("query-migrate-parameters", None)?;
        observed.qemu_defaults = Some(format!(
            "max-bandwidth {} MiB/s, downtime-limit {} ms",
            p["max-bandwidth"].as_f64().unwrap_or(f64::NAN) / MIB,
            p["downtime-limit"]
        ));
    }
    if ignore_shared_ram {
        q.execute("migrate-set-capabilities", Some(ignore_shared()))?;
    }
    if bw == Some(QemuBandwidth::Unlimited) {
        q.execute(
            "migrate-set-parameters",
            Some(serde_json::json!({ "max-bandwidth": QEMU_UNLIMITED })),
        )?;
    }
    let t_req = Instant::now();
    q.execute("migrate", Some(serde_json::json!({ "uri": to })))?;
    let mut throttle: f64 = 0.0;
    loop {
        let r = q.execute("query-migrate", None)?;
        throttle = throttle.max(r["cpu-throttle-percentage"].as_f64().unwrap_or(0.0));
        match r["status"].as_str() {
            Some("completed") => {
                let t_done = Instant::now();
                let num = |v: &serde_json::Value, what: &str| {
                    v.as_f64().ok_or_else(|| format!("no {what} in {r}"))
                };
                let figures = Figures {
                    total_ms: num(&r["total-time"], "total-time")?,
                    downtime_ms: num(&r["downtime"], "downtime")?,
                    sent_mib: num(&r["ram"]["transferred"], "ram.transferred")? / MIB,
                    rounds: num(&r["ram"]["dirty-sync-count"], "ram.dirty-sync-count")?,
                    harvest_ms: None,
                };
                return Ok((t_req, t_done, figures, throttle));
            }
            Some(s @ ("failed" | "cancelled")) => {
                return Err(format!("migration {s}: {r}"));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!(
                "migration not completed after {:?}: {r}",
                cfg.command_timeout
            ));
        }
        std::thread::sleep(POLL);
    }
}

impl MigrateReport {
    /// Render as Markdown: one table per size and workload.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "Migrate scenario (source and destination on this host; transports: {}). Guest `{}`, 1 vCPU, {} counted iterations (+{} warm-up) per column, median (min–max).  \nHost: {}  \nCommand: `{}`\n\n",
            {
                let mut ts: Vec<&str> = Vec::new();
                for c in &self.columns {
                    if !ts.contains(&c.transport.title()) {
                        ts.push(c.transport.title());
                    }
                }
                ts.join("; ")
            },
            self.guest,
            self.iterations,
            self.warmup,
            self.host,
            self.reproduce
        ));
        if let Some(e) = &self.error {
            if self.cases.is_empty() {
                out.push_str(&format!("Not run: {e}\n"));
                return out;
            }
            out.push_str(&format!("Stopped early: {e}\n\n"));
        }
        let mut notes: Vec<String> = Vec::new();
        for c in &self.columns {
            if let Some(s) = &c.skipped {
                notes.push(format!("{}: skipped: {s}", c.label));
            }
        }
        let label = |key: &str| {
            self.columns
                .iter()
                .find(|c| c.key == key)
                .map(|c| c.label.clone())
                .unwrap_or_default()
        };
        for case in &self.cases {
            out.push_str(&format!(
                "#### {} MiB, {} (`{}`)\n\n",
                case.memory_mib,
                case.workload.label(),
                if case.guest_cmds.is_empty() {
                    "no command"
                } else {
                    case.guest_cmds.as_str()
                }
            ));
            let info = |key: &str| self.columns.iter().find(|c| c.key == key);
            let mut transports: Vec<Transport> = Vec::new();
            for c in &case.columns {
                if let Some(t) = info(&c.key).map(|i| i.transport) {
                    if !transports.contains(&t) {
                        transports.push(t);
                    }
                }
            }
            for t in transports {
                let cols: Vec<&ColumnResult> = case
                    .columns
                    .iter()
                    .filter(|c| info(&c.key).map(|i| i.transport) == Some(t))
                    .collect();
                let is_ferrite =
                    |c: &ColumnResult| info(&c.key).map(|i| i.vmm) == Some(VmmKind::Ferrite);
                let ferrite = cols.iter().copied().find(|c| is_ferrite(c));
                let peers: Vec<&ColumnResult> =
                    cols.iter().copied().filter(|c| !is_ferrite(c)).collect();
                out.push_str(&format!("{}:\n\n", t.title()));
                let mut header = vec!["metric".to_string(), "unit".to_string()];
                header.extend(cols.iter().map(|c| label(&c.key)));
                if ferrite.is_some() {
                    header.extend(peers.iter().map(|p| format!("Ferrite / {}", label(&p.key))));
                }
                out.push_str(&format!(
                    "| {} |\n|{}\n",
                    header.join(" | "),
                    "---|".repeat(header.len())
                ));
                for (id, name, unit, d) in METRICS {
                    let mut row = vec![name.to_string(), unit.to_string()];
                    for c in &cols {
                        row.push(match c.metrics.get(*id) {
                            Some(cell) => render(cell, *d, &mut notes, &label(&c.key)),
                            None => "—".into(),
                        });
                    }
                    if let Some(f) = ferrite {
                        for p in &peers {
                            let m = |c: &ColumnResult| {
                                c.metrics
                                    .get(*id)
                                    .and_then(|cell| cell.summary)
                                    .map(|s| s.median)
                            };
                            row.push(match (m(f), m(p)) {
                                (Some(a), Some(b)) if b > 0.0 && *id != "rounds" => {
                                    format!("{:.2}×", a / b)
                                }
                                _ => "—".into(),
                            });
                        }
                    }
                    out.push_str(&format!("| {} |\n", row.join(" | ")));
                }
                out.push('\n');
            }
            for c in &case.columns {
                if !c.failures.is_empty() {
                    let mut distinct: Vec<&String> = Vec::new();
                    for f in &c.failures {
                        if !distinct.contains(&f) {
                            distinct.push(f);
                        }
                    }
                    out.push_str(&format!(
                        "\n{}: {} of {} iterations failed: {}\n",
                        label(&c.key),
                        c.failures.len(),
                        self.iterations,
                        distinct
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join("; ")
                    ));
                }
            }
            out.push('\n');
        }
        if !notes.is_empty() {
            for (i, n) in notes.iter().enumerate() {
                out.push_str(&format!("{}. {}\n", i + 1, n));
            }
            out.push('\n');
        }
        if let Some(hz) = self.host_tsc_hz {
            out.push_str(&format!(
                "Host TSC {:.3} GHz (measured by the harness); guest `tsc_hz` at boot: {}. Guest times are scaled by guest/host.  \n",
                hz / 1e9,
                self.columns
                    .iter()
                    .map(|c| format!(
                        "{} {}",
                        c.label,
                        c.guest_tsc_hz
                            .map(|g| format!("{:.3} GHz", g as f64 / 1e9))
                            .unwrap_or_else(|| "n/a".into())
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Some(q) = &self.qemu_defaults {
            out.push_str(&format!(
                "QEMU defaults (`query-migrate-parameters`): {q}.  \n"
            ));
        }
        out.push_str(&format!(
            "Tick period of `dirty`: {} ms. Ratios: Ferrite's median / the peer's (below 1 is better).\n\nCommands (first size and workload):\n\n",
            self.report_ms
        ));
        for c in &self.columns {
            out.push_str(&format!(
                "- {}: source `{}`; destination `{}`; start: `{}`\n",
                c.label, c.source_command, c.destination_command, c.request
            ));
        }
        out
    }
}

fn render(cell: &Cell, d: usize, notes: &mut Vec<String>, label: &str) -> String {
    let note = |notes: &mut Vec<String>, reason: String| {
        let i = match notes.iter().position(|n| *n == reason) {
            Some(i) => i,
            None => {
                notes.push(reason);
                notes.len() - 1
            }
        };
        i + 1
    };
    match (&cell.summary, &cell.reason) {
        (Some(s), None) => format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max),
        (Some(s), Some(r)) => format!(
            "{:.d$} ({:.d$}–{:.d$}), n={} [{}]",
            s.median,
            s.min,
            s.max,
            s.n,
            note(notes, format!("{label}: {} missing: {r}", cell.missing))
        ),
        (None, Some(r)) => format!("n/a [{}]", note(notes, format!("{label}: {r}"))),
        (None, None) => "n/a".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(n: u64, value: u64, gap_us: u64) -> String {
        format!("tick n={n} value={value} gen=1 pos=1 dirtied=1 gap_us={gap_us} maxgap_us=9")
    }

    #[test]
    fn test_parse_tick_full_line_and_fragment() {
        // Arrange
        let full = tick(40, 57948163, 17139);
        let fragment = "57698532 gen=1 pos=1 dirtied=1 gap_us=4134 maxgap_us=17787";
        let cut = "tick n=39 value=5769";

        // Act
        let parsed = (parse_tick(&full), parse_tick(fragment), parse_tick(cut));

        // Assert
        assert_eq!(
            parsed,
            (
                Some(Tick {
                    n: 40,
                    value: 57948163,
                    gap_us: 17139
                }),
                None,
                None
            )
        );
    }

    #[test]
    fn test_guest_view_gap_of_first_destination_tick_and_deficit() {
        // Arrange: 1000 counts per 100 ms period before; the source's last tick is n=5; the
        // destination's first complete tick (n=7, after a fragment) has the 30 ms gap; n=8
        // follows. Between n=5 and n=8 (3 periods = 300 ms) the loop counted 2700: 30 ms lost.
        let src: Vec<(bool, Tick)> = [(1, 0), (2, 1000), (3, 2000), (4, 3000), (5, 4000)]
            .iter()
            .map(|&(n, v)| {
                (
                    n < 5,
                    Tick {
                        n,
                        value: v,
                        gap_us: 10,
                    },
                )
            })
            .collect();
        let t7 = tick(7, 5900, 30_000);
        let t8 = tick(8, 6700, 2_000);
        let dst = [
            "",
            "5000 gen=1 pos=1 dirtied=1 gap_us=5 maxgap_us=5",
            &t7,
            &t8,
        ];

        // Act
        let v = guest_view(&src, &dst, 100.0, 1.0);

        // Assert
        assert_eq!(v.gap_ms, Ok(30.0));
        let lost = v.lost_ms.expect("lost");
        assert!((lost - 30.0).abs() < 1e-9, "{lost}");
    }

    #[test]
    fn test_guest_view_scales_guest_time() {
        // Arrange
        let src = [(
            true,
            Tick {
                n: 2,
                value: 1,
                gap_us: 1,
            },
        )];
        let t = tick(3, 10, 20_000);

        // Act
        let v = guest_view(&src, &[t.as_str()], 100.0, 0.5);

        // Assert
        assert_eq!(v.gap_ms, Ok(10.0));
        assert!(v.lost_ms.is_err());
    }

    #[test]
    fn test_parse_migrated_line() {
        // Arrange
        let stderr = "something | ferrite: migrated to tcp:127.0.0.1:4000: downtime 15.5 ms, total 56.2 ms, 2 rounds, 10.3 MiB sent (2625 pages, 1148 zero pages)";

        // Act
        let f = parse_migrated(stderr).expect("parsed");

        // Assert
        assert_eq!(
            (f.downtime_ms, f.total_ms, f.rounds, f.sent_mib),
            (15.5, 56.2, 2.0, 10.3)
        );
    }

    #[test]
    fn test_listening_in_proc_net_tcp() {
        // Arrange
        let text = "  sl  local_address rem_address   st tx_queue rx_queue\n   0: 0100007F:B871 00000000:0000 0A 00000000:00000000\n   1: 0100007F:B872 0100007F:B871 01 00000000:00000000\n";

        let lo = std::net::Ipv4Addr::LOCALHOST;
        let ns = "  sl  local_address rem_address   st\n   0: 0200630A:1B58 00000000:0000 0A 00000000:00000000\n";

        // Act
        let r = (
            listening_in(text, lo, 0xb871),
            listening_in(text, lo, 0xb872),
            listening_in(ns, NETNS_DST_ADDR, 7000),
            listening_in(ns, lo, 7000),
        );

        // Assert
        assert_eq!(r, (true, false, true, false));
    }

    #[test]
    fn test_unix_listening_in_proc_net_unix() {
        // Arrange
        let text = "Num       RefCount Protocol Flags    Type St Inode Path\n0000000000000000: 00000002 00000000 00010000 0001 01 4242 /tmp/d/ferrite-fd.mig\n0000000000000000: 00000003 00000000 00000000 0001 03 4243 /tmp/d/other.mig\n";

        // Act
        let r = (
            unix_listening_in(text, Path::new("/tmp/d/ferrite-fd.mig")),
            unix_listening_in(text, Path::new("/tmp/d/other.mig")),
        );

        // Assert
        assert_eq!(r, (true, false));
    }

    #[test]
    fn test_in_ns_wraps_command() {
        // Arrange
        let spec = CommandSpec {
            program: PathBuf::from("/x/ferrite"),
            args: vec!["run".into(), "--incoming".into(), "tcp:10.99.0.2:1".into()],
        };

        // Act
        let wrapped = in_ns(spec, Some("fb-mig-b-1")).display();

        // Assert
        assert_eq!(
            wrapped,
            "ip netns exec fb-mig-b-1 /x/ferrite run --incoming tcp:10.99.0.2:1"
        );
    }

    #[test]
    fn test_parse_tsc_hz_from_boot_line() {
        // Arrange
        let line = "boot start_info=0x6000 cpus_started=1 tsc_hz=2000000000 tsc_source=guess";

        // Act
        let hz = parse_tsc_hz(line);

        // Assert
        assert_eq!(hz, Some(2_000_000_000));
    }
}
