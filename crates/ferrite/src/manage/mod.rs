//! Management commands: `ferrite vm ...`, `ferrite snapshot ...` and `ferrite top`, clients
//! of `ferrited`'s API.

mod clone;
mod console;
mod disk_snapshot;
mod migrate;
mod set;
mod snapshot;
mod spinner;
mod top;

#[cfg(test)]
mod tests;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use api::client::{Client, ClientError};
use api::{VmInfo, VmSpec};
use clap::{Args, Subcommand};

pub use disk_snapshot::{run_disk_snapshot, DiskSnapshotArgs};
pub use set::SetArgs;
pub use snapshot::{run_snapshot, SnapshotArgs};
pub use top::{run_top, TopArgs};

/// Options shared by all management commands (given before the subcommand).
#[derive(Debug, Clone)]
pub struct Global {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Print the API's JSON instead of tables.
    pub json: bool,
}

impl Global {
    fn client(&self) -> Client {
        Client::new(&self.socket)
    }
}

/// A failed management command: printed as `ferrite: <message>`, exit status 1.
#[derive(Debug)]
pub struct Failed(pub String);

impl From<ClientError> for Failed {
    fn from(e: ClientError) -> Self {
        Failed(e.to_string())
    }
}

impl From<std::io::Error> for Failed {
    fn from(e: std::io::Error) -> Self {
        Failed(e.to_string())
    }
}

type Res<T = ()> = Result<T, Failed>;

/// Exit status of a management command, after printing its error.
pub fn finish(r: Res) -> i32 {
    match r {
        Ok(()) => 0,
        Err(Failed(msg)) => {
            if !msg.is_empty() {
                eprintln!("ferrite: {msg}");
            }
            1
        }
    }
}

/// `ferrite vm`.
#[derive(Debug, Args)]
pub struct VmArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: VmCommand,
}

/// `ferrite vm` subcommands.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// List VMs: NAME STATE VCPUS MEMORY PID UPTIME.
    #[command(visible_alias = "list")]
    Ls {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one VM's definition and state.
    #[command(visible_alias = "info")]
    Show {
        /// The VM.
        name: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Define a new VM.
    Create(CreateArgs),
    /// Start VMs (returns once they run).
    Start(Names),
    /// Stop VMs gracefully: ACPI power button, killed after --timeout.
    Stop {
        /// The VMs.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Seconds to wait for the guest to power off before killing it (0: at once).
        #[arg(long, short = 't', value_name = "SECONDS")]
        timeout: Option<u64>,
    },
    /// Kill VMs at once (no guest shutdown).
    Kill(Names),
    /// Pause VMs' vCPUs.
    #[command(visible_alias = "suspend")]
    Pause(Names),
    /// Resume paused VMs.
    Resume(Names),
    /// Reset VMs (a hard reboot).
    #[command(visible_alias = "restart")]
    Reboot(Names),
    /// Change a VM: resources, balloon and rate limits live; the rest while stopped.
    Set(SetArgs),
    /// Attach to a VM's serial console (Ctrl-] detaches; the VM keeps running).
    Console {
        /// The VM.
        name: String,
    },
    /// Delete VMs (definition and state directory).
    #[command(visible_alias = "delete")]
    Rm {
        /// The VMs.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Kill running VMs first.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Print the end of a VM's console log.
    Log {
        /// The VM.
        name: String,
        /// Bytes from the end.
        #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
        tail: u64,
    },
    /// Start clones of a snapshot, each with its own MAC, vsock CID, VM generation ID and
    /// qcow2 overlay disks (the source VM must be stopped if it has disks).
    Clone(clone::CloneArgs),
    /// Live-migrate a running VM to another ferrited (its definition moves with it), showing
    /// the progress until the guest runs there; --cancel stops a migration in progress
    /// (Ctrl-C only stops following it).
    Migrate(migrate::MigrateArgs),
    /// Follow lifecycle events (all VMs, or the ones named).
    Events {
        /// Only these VMs.
        names: Vec<String>,
        /// One JSON event per line.
        #[arg(long)]
        json: bool,
    },
}

/// One or more VM names.
#[derive(Debug, Args)]
pub struct Names {
    /// The VMs.
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

/// `ferrite vm create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM's name (letters, digits, - _ .).
    pub name: String,
    /// Kernel image (vmlinux with a PVH note, or bzImage).
    #[arg(long, required_unless_present = "from")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest RAM (plain number: MiB; K/M/G suffixes).
    #[arg(long, default_value = "512", value_parser = parse_mib)]
    pub memory: u64,
    /// A disk in `ferrite run --disk` syntax (repeatable).
    #[arg(long = "disk", value_name = "PATH[,OPTS]")]
    pub disks: Vec<String>,
    /// A NIC in `ferrite run --net` syntax (repeatable).
    #[arg(long = "net", value_name = "OPTS")]
    pub nets: Vec<String>,
    /// vsock: `cid=N,socket=PATH`.
    #[arg(long)]
    pub vsock: Option<String>,
    /// virtio-rng (`""` for unlimited).
    #[arg(long)]
    pub rng: Option<String>,
    /// virtio-balloon (`""` for defaults).
    #[arg(long)]
    pub balloon: Option<String>,
    /// Start the VM when ferrited starts.
    #[arg(long)]
    pub autostart: bool,
    /// Restart the VM when its VMM crashes.
    #[arg(long)]
    pub restart_on_crash: bool,
    /// CPU cap in percent of one host CPU.
    #[arg(long, value_name = "PCT")]
    pub cpu_quota: Option<u32>,
    /// CPU weight 1-10000.
    #[arg(long, value_name = "W")]
    pub cpu_weight: Option<u32>,
    /// Hard memory limit of the VMM process.
    #[arg(long, value_name = "SIZE", value_parser = parse_mib)]
    pub memory_limit: Option<u64>,
    /// Host CPUs to run on (`0-3,6`).
    #[arg(long, value_name = "LIST", value_parser = set::parse_cpu_list)]
    pub pin_cpus: Option<set::CpuList>,
    /// Take the whole definition from a JSON file (`-` for stdin); NAME overrides its name.
    #[arg(long, value_name = "FILE", conflicts_with = "kernel")]
    pub from: Option<PathBuf>,
    /// Start the VM once defined.
    #[arg(long)]
    pub start: bool,
}

/// A memory size in MiB.
pub(crate) fn parse_mib(s: &str) -> Result<u64, String> {
    let bytes = vmm::config::parse_memory_size(s).map_err(|e| e.to_string())?;
    if bytes % (1 << 20) != 0 {
        return Err(format!("{s} is not a whole number of MiB"));
    }
    Ok(bytes >> 20)
}

/// Run `ferrite vm ...`.
pub fn run_vm(g: &Global, args: VmArgs) -> i32 {
    finish(vm(g, args.command))
}

fn vm(g: &Global, cmd: VmCommand) -> Res {
    let c = g.client();
    match cmd {
        VmCommand::Ls { json } => {
            let vms = c.list_vms()?;
            if json || g.json {
                print_json(&vms)
            } else {
                print!("{}", vm_table(&vms, now_ms()));
                Ok(())
            }
        }
        VmCommand::Show { name, json } => {
            let info = c.get_vm(&name)?;
            if json || g.json {
                print_json(&info)
            } else {
                print!("{}", show_text(&info, now_ms()));
                Ok(())
            }
        }
        VmCommand::Create(a) => create(g, &c, a),
        VmCommand::Clone(a) => clone::run(g, &c, a),
        VmCommand::Migrate(a) => migrate::run(g, &c, a),
        VmCommand::Start(n) => each(g, "Starting", &n.names, |name| c.action(name, "start")),
        VmCommand::Stop { names, timeout } => {
            each(g, "Stopping", &names, |name| c.stop(name, timeout))
        }
        VmCommand::Kill(n) => each(g, "Killing", &n.names, |name| c.action(name, "kill")),
        VmCommand::Pause(n) => each(g, "Pausing", &n.names, |name| c.action(name, "pause")),
        VmCommand::Resume(n) => each(g, "Resuming", &n.names, |name| c.action(name, "resume")),
        VmCommand::Reboot(n) => each(g, "Rebooting", &n.names, |name| c.action(name, "reboot")),
        VmCommand::Set(a) => {
            let body = set::update_body(&a).map_err(Failed)?;
            let info = c.update_vm(&a.name, &body)?;
            if g.json {
                print_json(&info)?;
            }
            Ok(())
        }
        VmCommand::Console { name } => console::attach(&c, &name),
        VmCommand::Rm { names, force } => {
            let mut failed = false;
            for name in &names {
                if let Err(e) = c.delete_vm(name, force) {
                    eprintln!("ferrite: {name}: {e}");
                    failed = true;
                }
            }
            if failed {
                Err(Failed(String::new()))
            } else {
                Ok(())
            }
        }
        VmCommand::Log { name, tail } => {
            let log = c.console_log(&name, Some(tail))?;
            let mut out = std::io::stdout().lock();
            out.write_all(&log)?;
            out.flush()?;
            Ok(())
        }
        VmCommand::Events { names, json } => {
            let mut out = std::io::stdout().lock();
            for ev in c.events()? {
                let ev = ev?;
                if !names.is_empty() && !names.contains(&ev.vm) {
                    continue;
                }
                if json || g.json {
                    let line = serde_json::to_string(&ev).map_err(|e| Failed(e.to_string()))?;
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(
                        out,
                        "{} {} {}{}",
                        format_time_ms(ev.at_ms),
                        ev.vm,
                        ev.kind,
                        if ev.detail.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", ev.detail)
                        }
                    )?;
                }
                out.flush()?;
            }
            Ok(())
        }
    }
}

/// Run `f` on every name in parallel (a stop waits for each guest), with a spinner labelled
/// `doing` when it takes a while; print `NAME: state` lines (or the JSON of each VM) in the
/// order given. Fails if any failed.
fn each(
    g: &Global,
    doing: &str,
    names: &[String],
    f: impl Fn(&str) -> Result<VmInfo, ClientError> + Sync,
) -> Res {
    let spinner = spinner::Spinner::start(format!("{doing} {}", names.join(", ")), g.json);
    let results: Vec<Result<VmInfo, ClientError>> = std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|n| {
                let f = &f;
                s.spawn(move || f(n))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread panicked"))
            .collect()
    });
    spinner.finish();
    let mut failed = false;
    let mut infos = Vec::new();
    for (name, r) in names.iter().zip(results) {
        match r {
            Ok(info) => infos.push(info),
            Err(e @ ClientError::Unreachable { .. }) => return Err(e.into()),
            Err(e) => {
                eprintln!("ferrite: {name}: {e}");
                failed = true;
            }
        }
    }
    if g.json {
        print_json(&infos)?;
    } else {
        for info in &infos {
            println!("{}: {}", info.spec.name, info.state.as_str());
        }
    }
    if failed {
        Err(Failed(String::new()))
    } else {
        Ok(())
    }
}

fn create(g: &Global, c: &Client, a: CreateArgs) -> Res {
    let spec = match &a.from {
        Some(file) => {
            let text = if file == Path::new("-") {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(file)
                    .map_err(|e| Failed(format!("{}: {e}", file.display())))?
            };
            let mut spec: VmSpec = serde_json::from_str(&text)
                .map_err(|e| Failed(format!("{}: {e}", file.display())))?;
            spec.name = a.name.clone();
            spec
        }
        None => spec_from_args(&a)?,
    };
    let mut info = c.create_vm(&spec)?;
    if a.start {
        let spinner = spinner::Spinner::start(format!("Starting {}", spec.name), g.json);
        let started = c.action(&spec.name, "start");
        spinner.finish();
        info = started?;
    }
    if g.json {
        print_json(&info)
    } else {
        println!("{}: {}", info.spec.name, info.state.as_str());
        Ok(())
    }
}

/// An absolute path (the daemon does not share our working directory).
fn absolute(p: &Path) -> Res<String> {
    let abs = std::path::absolute(p).map_err(|e| Failed(format!("{}: {e}", p.display())))?;
    Ok(abs.to_string_lossy().into_owned())
}

/// `--disk PATH,opts` with PATH made absolute.
fn absolute_disk(d: &str) -> Res<String> {
    let (path, rest) = match d.split_once(',') {
        Some((p, r)) => (p, Some(r)),
        None => (d, None),
    };
    if path.is_empty() || path.contains('=') {
        return Ok(d.to_string());
    }
    let abs = absolute(Path::new(path))?;
    Ok(match rest {
        Some(r) => format!("{abs},{r}"),
        None => abs,
    })
}

fn spec_from_args(a: &CreateArgs) -> Res<VmSpec> {
    let kernel = a
        .kernel
        .as_deref()
        .ok_or_else(|| Failed("--kernel is required".into()))?;
    Ok(VmSpec {
        name: a.name.clone(),
        vcpus: a.cpus,
        memory_mib: a.memory,
        kernel: absolute(kernel)?,
        initrd: a.initrd.as_deref().map(absolute).transpose()?,
        cmdline: a.cmdline.clone(),
        disks: a
            .disks
            .iter()
            .map(|d| absolute_disk(d))
            .collect::<Res<_>>()?,
        nets: a.nets.clone(),
        vsock: a.vsock.clone(),
        rng: a.rng.clone(),
        balloon: a.balloon.clone(),
        autostart: a.autostart,
        restart_on_crash: a.restart_on_crash,
        resources: api::Resources {
            cpu_quota_pct: a.cpu_quota,
            cpu_weight: a.cpu_weight,
            memory_limit_mib: a.memory_limit,
            pin_cpus: a.pin_cpus.clone().map(|l| l.0).unwrap_or_default(),
        },
        repair_emulation: None,
        cpu_features: None,
        clone_of: None,
    })
}

fn print_json<T: serde::Serialize>(v: &T) -> Res {
    let text = serde_json::to_string_pretty(v).map_err(|e| Failed(e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `1d02h`, `3h04m`, `5m06s`, `7s`.
pub(crate) fn format_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// `512M`, `1.5G`, `12K`, `100B` (binary units).
pub(crate) fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 || v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}{}", UNITS[i])
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

/// UTC `HH:MM:SS` of a Unix time in ms (events are recent).
fn format_time_ms(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", s / 3600 % 24, s / 60 % 60, s % 60)
}

/// Left-aligned columns separated by two spaces.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn uptime(info: &VmInfo, now_ms: u64) -> String {
    match info.started_at_ms {
        Some(t) if info.state.is_active() => format_duration(now_ms.saturating_sub(t) / 1000),
        _ => "-".to_string(),
    }
}

/// The `vm ls` table.
pub(crate) fn vm_table(vms: &[VmInfo], now_ms: u64) -> String {
    let mut rows = vec![["NAME", "STATE", "VCPUS", "MEMORY", "PID", "UPTIME"]
        .map(String::from)
        .to_vec()];
    for v in vms {
        rows.push(vec![
            v.spec.name.clone(),
            v.state.as_str().to_string(),
            v.spec.vcpus.to_string(),
            format_bytes(v.spec.memory_mib << 20),
            v.pid.map_or("-".to_string(), |p| p.to_string()),
            uptime(v, now_ms),
        ]);
    }
    table(&rows)
}

fn show_text(v: &VmInfo, now_ms: u64) -> String {
    let s = &v.spec;
    let r = &s.resources;
    let opt = |o: Option<String>| o.unwrap_or_else(|| "-".to_string());
    let mut lines = vec![
        ("name", s.name.clone()),
        ("state", v.state.as_str().to_string()),
        ("pid", opt(v.pid.map(|p| p.to_string()))),
        ("uptime", uptime(v, now_ms)),
        ("vcpus", s.vcpus.to_string()),
        ("memory", format_bytes(s.memory_mib << 20)),
        ("kernel", s.kernel.clone()),
        ("initrd", opt(s.initrd.clone())),
        ("cmdline", s.cmdline.clone()),
    ];
    for (i, d) in s.disks.iter().enumerate() {
        lines.push(("disk", format!("disk{i}: {d}")));
    }
    for (i, n) in s.nets.iter().enumerate() {
        lines.push(("net", format!("net{i}: {n}")));
    }
    if let Some(b) = &s.balloon {
        lines.push(("balloon", b.clone()));
    }
    lines.extend([
        ("autostart", s.autostart.to_string()),
        ("restart-on-crash", s.restart_on_crash.to_string()),
        ("cpu-quota", opt(r.cpu_quota_pct.map(|p| format!("{p}%")))),
        ("cpu-weight", opt(r.cpu_weight.map(|w| w.to_string()))),
        (
            "memory-limit",
            opt(r.memory_limit_mib.map(|m| format_bytes(m << 20))),
        ),
        (
            "pin-cpus",
            if r.pin_cpus.is_empty() {
                "-".to_string()
            } else {
                r.pin_cpus
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
        ),
    ]);
    if let Some(e) = &v.last_exit {
        let detail = if e.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", e.detail)
        };
        lines.push(("last-exit", format!("{}{detail}", e.outcome)));
    }
    if v.crash_restarts > 0 {
        lines.push(("crash-restarts", v.crash_restarts.to_string()));
    }
    let w = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    lines
        .iter()
        .map(|(k, val)| format!("{:<w$}  {val}\n", format!("{k}:"), w = w + 1))
        .collect()
}

/// `ferrite completions SHELL`.
pub fn completions(shell: clap_complete::Shell) -> i32 {
    use clap::CommandFactory;
    let mut cmd = crate::cli::Cli::command();
    clap_complete::generate(shell, &mut cmd, "ferrite", &mut std::io::stdout());
    0
}
