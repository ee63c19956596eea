//! `ferrite-bench`: boots the same guest under Ferrite and QEMU (microvm and q35) in one run and
//! prints boot timeline, exit throughput and VMM memory overhead with Ferrite/peer ratios.

mod child;
mod cpu_time;
mod devio;
mod error;
mod minimal_guest;
mod netio;
mod report;
mod runner;
mod scenario;
mod smaps;
mod stats;
mod vmm;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::report::{Report, Scenario};
use crate::runner::Plan;
use crate::scenario::RunConfig;
use crate::vmm::{GuestSpec, Vmm, VmmKind};

/// Firmware QEMU q35 boots through before the PVH kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Q35Firmware {
    /// qboot (`-bios qboot.rom`): QEMU's minimal firmware, the fastest q35 path.
    Qboot,
    /// QEMU's default SeaBIOS (slow here: real mode is emulated).
    Seabios,
}

#[derive(Debug, Parser)]
#[command(
    name = "ferrite-bench",
    about = "Benchmark Ferrite against QEMU on the same guest in the same run"
)]
struct Args {
    /// Counted iterations per VMM and scenario.
    #[arg(long, default_value_t = 10)]
    iterations: usize,
    /// Uncounted warm-up iterations per VMM and scenario.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// VMMs to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ferrite,qemu-microvm,qemu-q35"
    )]
    vmms: Vec<VmmKind>,
    /// Scenarios to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "boot,exits,memory"
    )]
    scenarios: Vec<Scenario>,
    /// Guest PVH ELF (default: the test guest built in testguest/), or `minimal` for the
    /// built-in guest that only prints the ready marker and powers off (boot and memory only).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// The ferrite binary (default: `ferrite` next to this executable).
    #[arg(long)]
    ferrite: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: PathBuf,
    /// QEMU `-M` value of the microvm peer.
    #[arg(long, default_value = "microvm,x-option-roms=off")]
    microvm_machine: String,
    /// QEMU `-M` value of the q35 peer.
    #[arg(long, default_value = "q35")]
    q35_machine: String,
    /// Firmware of the q35 peer.
    #[arg(long, value_enum, default_value = "qboot")]
    q35_firmware: Q35Firmware,
    /// qboot image used with `--q35-firmware qboot`.
    #[arg(long, default_value = "/usr/share/qemu/qboot.rom")]
    qboot: PathBuf,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    memory_mib: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Console line (substring) that marks the guest ready.
    #[arg(long, default_value = "FERRITE-TESTGUEST READY")]
    ready_marker: String,
    /// Extra kernel command-line words before `cmds=...`.
    #[arg(long, default_value = "")]
    cmdline_extra: String,
    /// Port writes per `bench-pio`.
    #[arg(long, default_value_t = 100_000)]
    pio_count: u64,
    /// MMIO writes per `bench-mmio`.
    #[arg(long, default_value_t = 100_000)]
    mmio_count: u64,
    /// `cmds=` of the idle guest for the memory measurement (empty: none).
    #[arg(long, default_value = "")]
    idle_cmds: String,
    /// Milliseconds between the ready marker and reading smaps.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
    /// Milliseconds over which the idle VMM's CPU use is measured (after smaps is read).
    #[arg(long, default_value_t = 1000)]
    idle_window_ms: u64,
    /// Seconds from spawn to the ready marker before giving up.
    #[arg(long, default_value_t = 60)]
    boot_timeout_s: u64,
    /// Seconds to wait for the process exit after the ready marker (boot timeline).
    #[arg(long, default_value_t = 3)]
    exit_grace_s: u64,
    /// Seconds to wait for one benchmark command's answer.
    #[arg(long, default_value_t = 120)]
    command_timeout_s: u64,
    /// Seconds after which the watchdog kills any VMM.
    #[arg(long, default_value_t = 300)]
    hard_timeout_s: u64,
    /// Directory of the disk scenario's images (created; the images are left for inspection).
    #[arg(long)]
    disk_dir: Option<PathBuf>,
    /// Size of each disk image in MiB.
    #[arg(long, default_value_t = 256)]
    disk_size_mib: u64,
    /// MiB moved per sequential disk row.
    #[arg(long, default_value_t = 256)]
    disk_seq_mib: u64,
    /// MiB moved per random disk row.
    #[arg(long, default_value_t = 32)]
    disk_rand_mib: u64,
    /// Disk requests in flight.
    #[arg(long, default_value_t = 32)]
    disk_qd: u64,
    /// Sequential request size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    disk_seq_bs: u64,
    /// Random request size in bytes.
    #[arg(long, default_value_t = 4096)]
    disk_rand_bs: u64,
    /// QEMU `-drive aio=` for the disk scenario.
    #[arg(long, default_value = "threads")]
    qemu_aio: String,
    /// The fio binary (host ceiling of the disk scenario).
    #[arg(long, default_value = "fio")]
    fio: PathBuf,
    /// fio engines tried for the ceiling; the best result counts.
    #[arg(long, value_delimiter = ',', default_value = "io_uring,libaio")]
    fio_engines: Vec<String>,
    /// TAP device the net scenario creates in its own network namespace.
    #[arg(long, default_value = "fbtap0")]
    net_tap: String,
    /// UDP datagrams per payload size in the net scenario.
    #[arg(long, default_value_t = 20_000)]
    net_count: u64,
    /// UDP datagrams in flight in the net scenario.
    #[arg(long, default_value_t = 32)]
    net_window: u64,
    /// UDP payload sizes of the net scenario, bytes (8 to 1472: one frame each).
    #[arg(long, value_delimiter = ',', default_value = "64,1400")]
    net_sizes: Vec<usize>,
    /// The ferrited binary of the daemon scenario (default: `ferrited` next to `--ferrite`).
    #[arg(long)]
    ferrited: Option<PathBuf>,
    /// How the daemon scenario starts and kills VMs: the `ferrite vm` CLI or curl.
    #[arg(long, value_enum, default_value = "cli")]
    daemon_client: scenario::daemon::Client,
    /// `ferrited --cpu-overcommit` in the daemon scenario.
    #[arg(long, default_value_t = 64.0)]
    daemon_cpu_overcommit: f64,
    /// `ferrited --memory-overcommit` in the daemon scenario.
    #[arg(long, default_value_t = 4.0)]
    daemon_memory_overcommit: f64,
    /// Seconds of the daemon scenario's density window (0: no density run).
    #[arg(long, default_value_t = 60)]
    density_window_s: u64,
    /// VMs defined for the density run: the most it can start.
    #[arg(long, default_value_t = 1000)]
    density_max_vms: usize,
    /// Starts in flight at once in the density run (1: one after another).
    #[arg(long, default_value_t = 1)]
    density_concurrency: usize,
    /// Guest RAM sizes of the snapshot scenario, MiB.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    snapshot_sizes_mib: Vec<u64>,
    /// Restores started at once from one snapshot in the snapshot scenario.
    #[arg(long, default_value_t = 10)]
    snapshot_clones: usize,
    /// `count-forever` interval (ms) of the ticking guest in the snapshot scenario.
    #[arg(long, default_value_t = 100)]
    snapshot_tick_ms: u64,
    /// Parent of the snapshot scenario's temporary directory (removed at the end).
    #[arg(long)]
    snapshot_dir: Option<PathBuf>,
    /// Guest RAM sizes of the migrate scenario, MiB.
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    migrate_sizes_mib: Vec<u64>,
    /// Workloads of the migrate scenario: idle (at the prompt), spin (`dirty 1 1`: a busy
    /// loop that measures the pause), dirty (`dirty` with --migrate-dirty).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "idle,spin,dirty"
    )]
    migrate_workloads: Vec<scenario::migrate::Workload>,
    /// `MIB RATE` of the dirtying guest's `dirty` command (RATE pages/s, 0 = as fast as it can).
    #[arg(long, default_value = "64 20000")]
    migrate_dirty: String,
    /// Tick period (`dirty ... REPORT_MS`) of the migrate scenario's guests, ms.
    #[arg(long, default_value_t = 20)]
    migrate_report_ms: u64,
    /// Milliseconds the workload runs before the migration starts.
    #[arg(long, default_value_t = 500)]
    migrate_settle_ms: u64,
    /// Ferrite's `downtime_ms` (its default is 10).
    #[arg(long, default_value_t = 10)]
    migrate_downtime_ms: u64,
    /// Ferrite's `bandwidth_mib_s` (0: unlimited, its default).
    #[arg(long, default_value_t = 0)]
    migrate_bandwidth_mib_s: u64,
    /// Ferrite's `converge`: throttle (its default) or abort.
    #[arg(long, default_value = "throttle")]
    migrate_converge: String,
    /// Ferrite source's `--dirty-log`: auto (its default), ring or bitmap.
    #[arg(long, default_value = "auto")]
    migrate_dirty_log: String,
    /// QEMU columns of the migrate scenario: its default max-bandwidth, and unlimited.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "default,unlimited"
    )]
    migrate_qemu_bandwidths: Vec<scenario::migrate::QemuBandwidth>,
    /// Transports of the migrate scenario, each with every column: loopback (TCP 127.0.0.1),
    /// netns (TCP between two network namespaces over a veth pair; needs root and `ip`), fd
    /// (same-host handover: Ferrite `--memory-shared` + `fd_handover`, QEMU a shared RAM file
    /// + `x-ignore-shared`, over a Unix socket).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "loopback,netns,fd"
    )]
    migrate_transports: Vec<scenario::migrate::Transport>,
    /// Print JSON on stdout instead of Markdown.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    let minimal = args.guest.as_deref() == Some(Path::new("minimal"));
    let guest = if minimal {
        match minimal_guest::write_to(&std::env::temp_dir()) {
            Ok(path) => path,
            Err(e) => {
                eprintln!("ferrite-bench: cannot write the minimal guest: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let guest = args.guest.clone().unwrap_or_else(default_guest);
        guest.canonicalize().unwrap_or(guest)
    };
    if minimal && args.scenarios.contains(&Scenario::Exits) {
        eprintln!(
            "ferrite-bench: the minimal guest has no bench commands: skipping the exits scenario"
        );
        args.scenarios.retain(|s| *s != Scenario::Exits);
    }
    if minimal && args.scenarios.contains(&Scenario::Disk) {
        eprintln!(
            "ferrite-bench: the minimal guest has no disk driver: skipping the disk scenario"
        );
        args.scenarios.retain(|s| *s != Scenario::Disk);
    }
    if minimal && args.scenarios.contains(&Scenario::Net) {
        eprintln!(
            "ferrite-bench: the minimal guest has no network stack: skipping the net scenario"
        );
        args.scenarios.retain(|s| *s != Scenario::Net);
    }
    if minimal && args.scenarios.contains(&Scenario::Migrate) {
        eprintln!(
            "ferrite-bench: the minimal guest has no console commands: skipping the migrate scenario"
        );
        args.scenarios.retain(|s| *s != Scenario::Migrate);
    }
    if !guest.is_file() {
        eprintln!(
            "ferrite-bench: guest {} not found (build it: cd testguest && cargo build --release)",
            guest.display()
        );
        return ExitCode::FAILURE;
    }
    let cfg = run_config(&args, guest.clone());
    let vmms = vmms(&args);
    let plan = Plan {
        iterations: args.iterations.max(1),
        warmup: args.warmup,
    };
    // Before any scenario runs, so the load average is the one at the start.
    let host = host_description();
    let disk = args.scenarios.contains(&Scenario::Disk);
    args.scenarios.retain(|s| *s != Scenario::Disk);
    let devio = disk.then(|| {
        let mut r = devio::run(&vmms, plan, &disk_plan(&args), &cfg);
        r.reproduce = reproduce_command();
        r.host = host.clone();
        r
    });
    let net = args.scenarios.contains(&Scenario::Net);
    args.scenarios.retain(|s| *s != Scenario::Net);
    let netio = net.then(|| {
        let nplan = scenario::net::NetPlan {
            tap: args.net_tap.clone(),
            count: args.net_count.max(1),
            window: args.net_window.max(1),
            sizes: args.net_sizes.iter().map(|&s| s.clamp(8, 1472)).collect(),
        };
        let mut r = netio::run(&vmms, plan, &nplan, &cfg);
        r.reproduce = reproduce_command();
        r.host = host.clone();
        r
    });
    let daemon = args.scenarios.contains(&Scenario::Daemon);
    args.scenarios.retain(|s| *s != Scenario::Daemon);
    let daemon = daemon.then(|| {
        let mut r = scenario::daemon::run(plan, &daemon_plan(&args), &cfg);
        r.reproduce = reproduce_command();
        r.host = host.clone();
        r
    });
    let snapshot = args.scenarios.contains(&Scenario::Snapshot);
    args.scenarios.retain(|s| *s != Scenario::Snapshot);
    let snapshot = snapshot.then(|| {
        let splan = scenario::snapshot::SnapshotPlan {
            sizes_mib: args.snapshot_sizes_mib.clone(),
            clones: args.snapshot_clones.max(1),
            tick_ms: args.snapshot_tick_ms.max(1),
            dir: args.snapshot_dir.clone().unwrap_or_else(std::env::temp_dir),
        };
        let mut r = scenario::snapshot::run(&vmms, plan, &splan, &cfg);
        r.reproduce = reproduce_command();
        r.host = host.clone();
        r
    });
    let migrate = args.scenarios.contains(&Scenario::Migrate);
    args.scenarios.retain(|s| *s != Scenario::Migrate);
    let migrate = migrate.then(|| {
        let mplan = scenario::migrate::MigratePlan {
            sizes_mib: args.migrate_sizes_mib.clone(),
            workloads: args.migrate_workloads.clone(),
            dirty_args: args.migrate_dirty.clone(),
            spin_args: "1 1".to_string(),
            report_ms: args.migrate_report_ms.clamp(1, 60_000),
            settle: Duration::from_millis(args.migrate_settle_ms),
            downtime_ms: args.migrate_downtime_ms,
            bandwidth_mib_s: args.migrate_bandwidth_mib_s,
            converge: args.migrate_converge.clone(),
            dirty_log: args.migrate_dirty_log.clone(),
            qemu_bandwidths: args.migrate_qemu_bandwidths.clone(),
            transports: args.migrate_transports.clone(),
            dir: std::env::temp_dir(),
        };
        let mut r = scenario::migrate::run(&vmms, plan, &mplan, &cfg);
        r.reproduce = reproduce_command();
        r.host = host.clone();
        r
    });
    let reports = if args.scenarios.is_empty() {
        Vec::new()
    } else {
        runner::run_all(&vmms, &args.scenarios, plan, &cfg)
    };
    let guest_label = if minimal {
        let _ = std::fs::remove_file(&guest);
        "built-in minimal PVH guest (--guest minimal)".to_string()
    } else {
        guest.display().to_string()
    };
    let report = Report {
        reproduce: reproduce_command(),
        host,
        guest: guest_label,
        memory_mib: args.memory_mib,
        iterations: plan.iterations,
        warmup: plan.warmup,
        scenarios: args.scenarios.clone(),
        vmms: reports,
    };
    let value = json_value(
        &report,
        devio.as_ref(),
        netio.as_ref(),
        daemon.as_ref(),
        snapshot.as_ref(),
        migrate.as_ref(),
    );
    let json = match value
        .and_then(|v| serde_json::to_string_pretty(&v))
        .map_err(error::BenchError::Json)
    {
        Ok(j) => j,
        Err(e) => {
            eprintln!("ferrite-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &args.json_out {
        if let Err(e) = std::fs::write(path, format!("{json}\n")) {
            eprintln!("ferrite-bench: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if args.json {
        println!("{json}");
    } else {
        if !report.scenarios.is_empty() {
            print!("{}", report.to_markdown());
        }
        let mut first = report.scenarios.is_empty();
        for md in [
            devio.as_ref().map(devio::DevioReport::to_markdown),
            netio.as_ref().map(netio::NetReport::to_markdown),
            daemon
                .as_ref()
                .map(scenario::daemon::DaemonReport::to_markdown),
            snapshot
                .as_ref()
                .map(scenario::snapshot::SnapshotReport::to_markdown),
            migrate
                .as_ref()
                .map(scenario::migrate::MigrateReport::to_markdown),
        ]
        .into_iter()
        .flatten()
        {
            if !first {
                println!();
            }
            first = false;
            print!("{md}");
        }
    }
    ExitCode::SUCCESS
}

/// The JSON document: the one report that ran alone, or an object with one key per part.
fn json_value(
    report: &Report,
    devio: Option<&devio::DevioReport>,
    netio: Option<&netio::NetReport>,
    daemon: Option<&scenario::daemon::DaemonReport>,
    snapshot: Option<&scenario::snapshot::SnapshotReport>,
    migrate: Option<&scenario::migrate::MigrateReport>,
) -> serde_json::Result<serde_json::Value> {
    let mut parts = serde_json::Map::new();
    if !report.scenarios.is_empty() {
        parts.insert("scenarios".into(), serde_json::to_value(report)?);
    }
    if let Some(d) = devio {
        parts.insert("disk".into(), serde_json::to_value(d)?);
    }
    if let Some(n) = netio {
        parts.insert("net".into(), serde_json::to_value(n)?);
    }
    if let Some(d) = daemon {
        parts.insert("daemon".into(), serde_json::to_value(d)?);
    }
    if let Some(s) = snapshot {
        parts.insert("snapshot".into(), serde_json::to_value(s)?);
    }
    if let Some(m) = migrate {
        parts.insert("migrate".into(), serde_json::to_value(m)?);
    }
    if parts.len() == 1 {
        return Ok(parts.into_iter().next().map(|(_, v)| v).unwrap_or_default());
    }
    if parts.is_empty() {
        return serde_json::to_value(report);
    }
    Ok(serde_json::Value::Object(parts))
}

fn run_config(args: &Args, kernel: PathBuf) -> RunConfig {
    RunConfig {
        guest: GuestSpec {
            kernel,
            memory_mib: args.memory_mib,
            cpus: args.cpus,
        },
        ready_marker: args.ready_marker.clone(),
        cmdline_extra: args.cmdline_extra.clone(),
        boot_timeout: Duration::from_secs(args.boot_timeout_s),
        exit_grace: Duration::from_secs(args.exit_grace_s),
        command_timeout: Duration::from_secs(args.command_timeout_s),
        hard_timeout: Duration::from_secs(args.hard_timeout_s),
        pio_count: args.pio_count,
        mmio_count: args.mmio_count,
        idle_cmds: args.idle_cmds.clone(),
        settle: Duration::from_millis(args.settle_ms),
        idle_window: Duration::from_millis(args.idle_window_ms),
    }
}

fn disk_plan(args: &Args) -> scenario::disk::DiskPlan {
    scenario::disk::DiskPlan {
        dir: args
            .disk_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("ferrite-bench-disk")),
        size_mib: args.disk_size_mib.max(1),
        seq_mib: args.disk_seq_mib.max(1),
        rand_mib: args.disk_rand_mib.max(1),
        qd: args.disk_qd,
        seq_bs: args.disk_seq_bs,
        rand_bs: args.disk_rand_bs,
        qemu_aio: args.qemu_aio.clone(),
        fio: args.fio.clone(),
        fio_engines: args.fio_engines.clone(),
    }
}

fn daemon_plan(args: &Args) -> scenario::daemon::DaemonPlan {
    let ferrite = args.ferrite.clone().unwrap_or_else(default_ferrite);
    let ferrited = args.ferrited.clone().unwrap_or_else(|| {
        ferrite
            .parent()
            .map(|dir| dir.join("ferrited"))
            .unwrap_or_else(|| PathBuf::from("ferrited"))
    });
    scenario::daemon::DaemonPlan {
        ferrite,
        ferrited,
        client: args.daemon_client,
        cpu_overcommit: args.daemon_cpu_overcommit,
        memory_overcommit: args.daemon_memory_overcommit,
        density_window: Duration::from_secs(args.density_window_s),
        density_max_vms: args.density_max_vms,
        density_concurrency: args.density_concurrency.max(1),
    }
}

fn vmms(args: &Args) -> Vec<Vmm> {
    let ferrite = args.ferrite.clone().unwrap_or_else(default_ferrite);
    let mut out: Vec<Vmm> = Vec::new();
    for kind in [VmmKind::Ferrite, VmmKind::QemuMicrovm, VmmKind::QemuQ35] {
        if !args.vmms.contains(&kind) {
            continue;
        }
        out.push(match kind {
            VmmKind::Ferrite => Vmm {
                kind,
                program: ferrite.clone(),
                machine: String::new(),
                extra_args: vec![],
            },
            VmmKind::QemuMicrovm => Vmm {
                kind,
                program: args.qemu.clone(),
                machine: args.microvm_machine.clone(),
                extra_args: vec![],
            },
            VmmKind::QemuQ35 => Vmm {
                kind,
                program: args.qemu.clone(),
                machine: args.q35_machine.clone(),
                extra_args: match args.q35_firmware {
                    Q35Firmware::Qboot => vec!["-bios".into(), args.qboot.display().to_string()],
                    Q35Firmware::Seabios => vec![],
                },
            },
        });
    }
    out
}

fn default_guest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testguest/target/x86_64-unknown-none/release/testguest")
}

fn default_ferrite() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("ferrite")))
        .unwrap_or_else(|| PathBuf::from("target/x86_64-unknown-linux-gnu/release/ferrite"))
}

fn reproduce_command() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo run --release -p bench -- {}", args.join(" "))
        .trim_end()
        .to_string()
}

fn host_description() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "Linux {}, {} × {}, load average at start {}",
        kernel.trim(),
        cpus,
        cpu,
        load.join(" ")
    )
}
