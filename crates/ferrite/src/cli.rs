//! Command-line syntax of `ferrite`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use vmm::config::{
    parse_cpu_features, parse_memory_size, BalloonConfig, ConsoleConfig, DiskConfig, NetConfig,
    RepairMode, RngConfig, VsockConfig,
};
use vmm::error::chain_to_line;

/// Exit statuses, printed in `--help`.
pub mod exit {
    /// The guest powered off.
    pub const POWER_OFF: i32 = 0;
    /// The VM failed (triple fault, KVM error, unrepairable emulation failure) or the host
    /// failed while running it.
    pub const VM_FAILED: i32 = 1;
    /// Bad command line or configuration (missing/unusable file, bad size, too many vCPUs).
    pub const USAGE: i32 = 2;
    /// The guest rebooted and `--no-reboot` was given.
    pub const REBOOT: i32 = 3;
    /// Stopped from the host: console escape Ctrl-A x, SIGINT, SIGTERM or SIGHUP.
    pub const STOPPED: i32 = 4;
    /// The guest was migrated away and runs on the destination now.
    pub const MIGRATED: i32 = 5;
}

/// The exit-status table, shared by the top-level and `run` help.
macro_rules! exit_status_help {
    () => {
        "\
Exit status:
  0  the guest powered off
  1  the VM failed (triple fault, KVM internal error, unrepairable emulation failure, host
     error while running); the reason, the vCPU registers and the bytes at RIP go to stderr
  2  bad command line or configuration (the problem is printed as one line)
  3  the guest rebooted and --no-reboot was given
  4  stopped from the host: Ctrl-A x on the console, SIGINT, SIGTERM, SIGHUP or SIGQUIT
  5  the guest was migrated away (it runs on the destination)"
    };
}

const EXIT_STATUS_HELP: &str = exit_status_help!();

const RUN_HELP: &str = concat!(
    "\
Console: guest serial output goes to stdout, stdin goes to the guest. When stdin is a
terminal it is put in raw mode (restored on every exit); Ctrl-A x quits, Ctrl-A Ctrl-A
sends a literal Ctrl-A, Ctrl-A h shows help. End of input on a non-terminal stdin leaves
the VM running.

Memory sizes: a plain number is MiB (--memory 1024 = 1 GiB); suffixes K, M, G, T are
binary units (any case, optional B or iB). At least 128M.

Reboot: a guest reboot restarts the VM in the same process (same configuration, disks
stay locked), unless --no-reboot is given.

Emulating hosts: on KVM without hardware virtualization (kvm_pvm) guest kernel code is
emulated and some instructions fail to emulate; --repair-emulation auto (the default)
finishes them in Ferrite there. Debug logs: FERRITE_LOG=debug.

",
    exit_status_help!()
);

/// Ferrite: a lightweight KVM virtual machine monitor.
#[derive(Debug, Parser)]
#[command(name = "ferrite", version, after_help = EXIT_STATUS_HELP)]
pub struct Cli {
    /// ferrited's API socket, for the management commands (vm, snapshot, disk-snapshot, top) [env: FERRITE_SOCKET]
    /// [default: /run/ferrite/ferrited.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the API's JSON instead of tables (management commands).
    #[arg(long)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The options of the management commands: `--socket`, else `FERRITE_SOCKET`, else
    /// the default socket.
    pub fn global(&self) -> crate::manage::Global {
        let socket = self
            .socket
            .clone()
            .or_else(|| {
                std::env::var_os("FERRITE_SOCKET")
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from(api::DEFAULT_SOCKET));
        crate::manage::Global {
            socket,
            json: self.json,
        }
    }
}

/// Subcommands.
// Parsed once per process: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM and connect its serial console to this terminal.
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
    /// Create, inspect and convert disk images (raw, qcow2).
    Disk(crate::disk_cmd::DiskArgs),
    /// Manage the VMs of ferrited: create, start, stop, console, set resources, ...
    Vm(crate::manage::VmArgs),
    /// Snapshot ferrited's VMs and restore them: create, ls, restore, rm.
    Snapshot(crate::manage::SnapshotArgs),
    /// Live disk snapshots of ferrited's VMs (qcow2 overlays): create, ls, revert, flatten.
    DiskSnapshot(crate::manage::DiskSnapshotArgs),
    /// Live CPU, memory, disk and network rates of ferrited's VMs.
    Top(crate::manage::TopArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Where guest serial output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleArg {
    /// This process's stdout (and stdin as input).
    Stdio,
    /// Appended to a file; no input.
    File(PathBuf),
    /// A Unix socket serving output to, and input from, any attached clients; output is
    /// also appended to `log`.
    Socket {
        /// The socket to bind.
        path: PathBuf,
        /// The console log.
        log: Option<PathBuf>,
    },
    /// Discarded; no input.
    None,
}

fn parse_console(s: &str) -> Result<ConsoleArg, String> {
    match s {
        "stdio" => Ok(ConsoleArg::Stdio),
        "none" => Ok(ConsoleArg::None),
        _ => {
            if let Some(p) = s.strip_prefix("file:").filter(|p| !p.is_empty()) {
                return Ok(ConsoleArg::File(PathBuf::from(p)));
            }
            if let Some(rest) = s.strip_prefix("socket:") {
                let (path, log) = match rest.split_once(",log=") {
                    Some((path, log)) if !log.is_empty() => (path, Some(PathBuf::from(log))),
                    Some(_) => return Err("socket:PATH,log=FILE needs a FILE".to_string()),
                    None => (rest, None),
                };
                if path.is_empty() {
                    return Err("socket: needs a PATH (socket:PATH[,log=FILE])".to_string());
                }
                return Ok(ConsoleArg::Socket {
                    path: PathBuf::from(path),
                    log,
                });
            }
            Err("use stdio, file:PATH, socket:PATH[,log=FILE] or none".to_string())
        }
    }
}

fn parse_memory(s: &str) -> Result<u64, String> {
    parse_memory_size(s).map_err(|e| chain_to_line(&e))
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    DiskConfig::parse(s).map_err(|e| chain_to_line(&e))
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    NetConfig::parse(s).map_err(|e| chain_to_line(&e))
}

fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    VsockConfig::parse(s).map_err(|e| chain_to_line(&e))
}

fn parse_rng(s: &str) -> Result<RngConfig, String> {
    RngConfig::parse(s).map_err(|e| chain_to_line(&e))
}

fn parse_balloon(s: &str) -> Result<BalloonConfig, String> {
    BalloonConfig::parse(s).map_err(|e| chain_to_line(&e))
}

fn parse_virtio_console(s: &str) -> Result<ConsoleConfig, String> {
    ConsoleConfig::parse(s).map_err(|e| chain_to_line(&e))
}

fn parse_features(s: &str) -> Result<arch::cpuid::FeatureMask, String> {
    parse_cpu_features(s).map_err(|e| chain_to_line(&e))
}

/// `ferrite run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The whole VM as a JSON file (the VmConfig ferrited writes); replaces the VM flags
    /// (--kernel, --cpus, --disk, ...), which then may not be given.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "cpus", "memory", "disks", "nets", "vsock", "rng",
        "balloon", "virtio_console", "api_socket", "no_reboot", "repair_emulation",
        "cpu_features", "track_dirty_pages", "memory_shared", "dirty_log",
    ])]
    pub config: Option<PathBuf>,
    /// Continue the VM saved in this snapshot directory (taken with the control socket's
    /// `snapshot` request) instead of booting; its configuration comes from the snapshot, only
    /// --api-socket, --clone-identity and the console options may be given.
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "config", "kernel", "initrd", "cmdline", "cpus", "memory", "disks", "nets", "vsock",
        "rng", "balloon", "virtio_console", "no_reboot", "repair_emulation", "cpu_features",
        "track_dirty_pages", "memory_shared", "dirty_log",
    ])]
    pub restore: Option<PathBuf>,
    /// Receive a running VM from a migration source on ENDPOINT (tcp:HOST:PORT or
    /// unix:PATH) and continue it: the source's control socket request
    /// {"op":"migrate","to":ENDPOINT} sends it. Its configuration comes from the source; only
    /// --api-socket and the console options may be given. The guest runs here only once the
    /// source has stopped it for good.
    #[arg(long, value_name = "ENDPOINT", conflicts_with_all = [
        "config", "kernel", "initrd", "cmdline", "cpus", "memory", "disks", "nets", "vsock",
        "rng", "balloon", "virtio_console", "no_reboot", "repair_emulation", "cpu_features",
        "track_dirty_pages", "memory_shared", "dirty_log", "restore",
    ])]
    pub incoming: Option<String>,
    /// With --incoming: take the migration only over TLS, presenting this certificate chain
    /// (PEM, leaf first; issued for the host or IP address the source connects to). The
    /// source must present a certificate signed by --incoming-tls-ca. Needs
    /// --incoming-tls-key and --incoming-tls-ca.
    #[arg(long, value_name = "PEM", requires_all = ["incoming", "incoming_tls_key", "incoming_tls_ca"])]
    pub incoming_tls_cert: Option<PathBuf>,
    /// With --incoming-tls-cert: its private key (PEM, unencrypted).
    #[arg(long, value_name = "PEM", requires_all = ["incoming", "incoming_tls_cert", "incoming_tls_ca"])]
    pub incoming_tls_key: Option<PathBuf>,
    /// With --incoming-tls-cert: the CA bundle (PEM) the source's certificate must be signed
    /// by; a source without one is refused.
    #[arg(long, value_name = "PEM", requires_all = ["incoming", "incoming_tls_cert", "incoming_tls_key"])]
    pub incoming_tls_ca: Option<PathBuf>,
    /// With --incoming: where a block migration's disks go (the source's migrate request
    /// has copy_disks). Each copied disk is created as DIR/<its file name> (an existing
    /// file is refused) and removed again if the migration does not complete.
    #[arg(long, value_name = "DIR", requires = "incoming")]
    pub incoming_disk_dir: Option<PathBuf>,
    /// With --restore: start the snapshot as a clone with its own identity, from this JSON
    /// file: {"nets":[{"tap":NAME,"mac":MAC}],"vsock":{"cid":N,"socket":PATH},
    /// "disks":[{"overlay":PATH}]} (one entry per NIC and disk, in order; tap and mac may be
    /// left out). Each disk becomes a new qcow2 overlay over the snapshot's image, and the
    /// guest gets a new VM generation ID. The snapshot's disk images must not be in use
    /// read-write (stop the source VM first).
    #[arg(long, value_name = "FILE", requires = "restore")]
    pub clone_identity: Option<PathBuf>,
    /// Kernel image: vmlinux with a PVH note, or bzImage (required unless --config or
    /// --restore).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["config", "restore", "incoming"])]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = "")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,
    /// Guest RAM: 512M, 2G, or a plain number of MiB.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_memory)]
    pub memory: u64,
    /// A virtio-blk disk (raw or qcow2 image); repeat for more. Options: readonly, id=SERIAL,
    /// format=raw|qcow2 (default: qcow2 if the file starts with the qcow2 magic, else raw;
    /// give format=raw for raw disks a guest writes, or a guest-written qcow2 header could
    /// name a host file as backing file). Rate limits: bw=BYTES_PER_S, iops=OPS_PER_S, and
    /// one-time bursts bw-burst=BYTES, iops-burst=OPS (K/M/G suffixes; changeable live
    /// through --api-socket as disk0, disk1, ...).
    #[arg(long = "disk", value_name = "PATH[,readonly][,id=SERIAL][,format=F][,bw=N][,iops=N]", value_parser = parse_disk)]
    pub disks: Vec<DiskConfig>,
    /// A virtio-net NIC on a host TAP device; repeat for more. `tap=NAME` uses (or creates)
    /// that TAP; `--net` alone creates `fe<pid>n<index>`, removed on exit. Without `mac=` the
    /// MAC is derived from the TAP name (stable, locally administered). Rate limits per
    /// direction (rx = into the guest): rx-bw=, tx-bw= (bytes/s), rx-pps=, tx-pps=
    /// (packets/s), one-time bursts rx-bw-burst=, tx-bw-burst=, rx-pps-burst=, tx-pps-burst=
    /// (K/M/G suffixes; changeable live through --api-socket as net0.rx, net0.tx, ...).
    #[arg(long = "net", value_name = "tap=NAME,mac=MAC,rx-bw=N,tx-pps=N,...", num_args = 0..=1, default_missing_value = "", value_parser = parse_net)]
    pub nets: Vec<NetConfig>,
    /// virtio-vsock with host AF_UNIX sockets (Firecracker's hybrid vsock).
    #[arg(long, value_name = "cid=N,socket=PATH", value_parser = parse_vsock)]
    pub vsock: Option<VsockConfig>,
    /// virtio-rng fed from the host's getrandom; `--rng` alone is unlimited,
    /// `--rng=bw=BYTES_PER_S[,burst=BYTES]` rate-limits it (burst: one-time extra bytes;
    /// changeable live through --api-socket as rng).
    #[arg(long, value_name = "bw=N,burst=N", num_args = 0..=1, default_missing_value = "", value_parser = parse_rng)]
    pub rng: Option<RngConfig>,
    /// virtio-balloon: the control socket's balloon-set asks the guest to give memory back.
    /// Without a value: target 0, statistics every second, deflate-on-OOM and free page
    /// reporting offered.
    #[arg(long, value_name = "size=SIZE,deflate-on-oom=on|off,stats=SECONDS|off,reporting=on|off", num_args = 0..=1, default_missing_value = "", value_parser = parse_balloon)]
    pub balloon: Option<BalloonConfig>,
    /// virtio-console (hvc0), a second console next to the serial port: guest output appended
    /// to a file, a Unix socket the host connects to (both directions), or a new pty (its
    /// path is printed on stderr).
    #[arg(long, value_name = "file:PATH|socket:PATH|pty", value_parser = parse_virtio_console)]
    pub virtio_console: Option<ConsoleConfig>,
    /// Per-VM control socket: JSON requests to change rate limits and the balloon target and
    /// to read statistics while the VM runs.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Exit with status 3 when the guest reboots instead of restarting it.
    #[arg(long)]
    pub no_reboot: bool,
    /// Log the pages the guest writes, for diff snapshots (`"diff":true`) and so that a VM
    /// restored from a snapshot can be snapshotted again (kept by snapshots of this VM).
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// Back guest RAM with shared memory files (memfd), so a live migration to a
    /// destination on this host can hand it over by file descriptor instead of copying it
    /// (`"fd_handover":true`; for upgrading Ferrite under a running VM).
    #[arg(long)]
    pub memory_shared: bool,
    /// How KVM reports the pages the guest writes (live migration, diff snapshots): its
    /// per-vCPU dirty ring, its dirty bitmap, or auto (the ring where the host offers it).
    #[arg(long, value_name = "auto|ring|bitmap", default_value = "auto")]
    pub dirty_log: vmm::config::DirtyLogMode,
    /// Finish instructions the host's KVM cannot emulate (auto: only on kvm_pvm hosts).
    #[arg(long, value_name = "on|off|auto", default_value = "auto")]
    pub repair_emulation: RepairMode,
    /// CPU features to hide from the guest, e.g. -avx512f,-x2apic.
    #[arg(long, value_name = "-NAME,...", value_parser = parse_features, allow_hyphen_values = true)]
    pub cpu_features: Option<arch::cpuid::FeatureMask>,
    /// Serial console: stdio, file:PATH (output appended), socket:PATH[,log=FILE] (a Unix
    /// socket clients attach to and detach from while the VM runs; output also appended to
    /// FILE) or none.
    #[arg(long, value_name = "stdio|file:PATH|socket:PATH[,log=FILE]|none", default_value = "stdio", value_parser = parse_console)]
    pub console: ConsoleArg,
    /// When the run ends, write how (outcome, exit code, detail, reboots, time) as JSON to
    /// this file, atomically.
    #[arg(long, value_name = "PATH")]
    pub status_file: Option<PathBuf>,
    /// Print exit and repair counters on stderr when the VM stops.
    #[arg(long)]
    pub stats: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cli_run_parses_all_flags() {
        let cli = Cli::try_parse_from([
            "ferrite",
            "run",
            "--kernel",
            "k",
            "--cpus",
            "4",
            "--memory",
            "2G",
            "--disk",
            "a.img",
            "--disk",
            "b.img,readonly",
            "--no-reboot",
            "--repair-emulation",
            "off",
            "--cpu-features",
            "-avx2",
            "--console",
            "file:/tmp/x",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not a run command")
        };
        assert_eq!(args.cpus, 4);
        assert_eq!(args.memory, 2 << 30);
        assert_eq!(args.disks.len(), 2);
        assert!(args.disks[1].readonly);
        assert!(args.no_reboot);
        assert_eq!(args.repair_emulation, RepairMode::Off);
        assert!(args.cpu_features.is_some());
        assert_eq!(args.console, ConsoleArg::File("/tmp/x".into()));
    }

    #[test]
    fn test_cli_console_socket_with_log_parses() {
        let cli = Cli::try_parse_from([
            "ferrite",
            "run",
            "--kernel",
            "k",
            "--console",
            "socket:/run/c.sock,log=/var/log/c.log",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not a run command")
        };
        assert_eq!(
            args.console,
            ConsoleArg::Socket {
                path: "/run/c.sock".into(),
                log: Some("/var/log/c.log".into())
            }
        );
    }

    #[test]
    fn test_cli_config_replaces_kernel_and_conflicts_with_vm_flags() {
        let ok = Cli::try_parse_from(["ferrite", "run", "--config", "vm.json"]);
        let clash = Cli::try_parse_from(["ferrite", "run", "--config", "vm.json", "--cpus", "2"]);
        let neither = Cli::try_parse_from(["ferrite", "run"]);

        assert!(ok.is_ok());
        assert!(clash.is_err());
        assert!(neither.is_err());
    }

    #[test]
    fn test_cli_bad_memory_is_error() {
        assert!(
            Cli::try_parse_from(["ferrite", "run", "--kernel", "k", "--memory", "12X"]).is_err()
        );
    }

    #[test]
    fn test_cli_bad_console_is_error() {
        assert!(
            Cli::try_parse_from(["ferrite", "run", "--kernel", "k", "--console", "tcp"]).is_err()
        );
    }
}
