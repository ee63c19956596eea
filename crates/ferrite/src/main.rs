//! `ferrite`: run a VM with its serial console on this terminal.

mod cli;
mod console_socket;
mod disk_chain_cmd;
mod disk_cmd;
mod input;
mod manage;
mod signals;
mod snapshot_merge;
mod status_file;
mod terminal;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use vmm::error::chain_to_line;
use vmm::{Console, Outcome, RunReport, StopHandle, VmConfig};

use cli::{exit, Cli, Command, ConsoleArg, RunArgs};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    init_logging();
    terminal::install_panic_hook();
    let global = cli.global();
    let code = match cli.command {
        Command::Run(args) => run(args),
        Command::Disk(args) => disk_cmd::run(args),
        Command::Vm(args) => manage::run_vm(&global, args),
        Command::Snapshot(args) => manage::run_snapshot(&global, args),
        Command::DiskSnapshot(args) => manage::run_disk_snapshot(&global, args),
        Command::Top(args) => manage::run_top(&global, args),
        Command::Completions { shell } => manage::completions(shell),
    };
    terminal::restore();
    ExitCode::from(code as u8)
}

/// Print clap's error as one line (help and version go out unchanged).
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
        || matches!(
            e.kind(),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        )
    {
        let _ = e.print();
        let code = if e.use_stderr() { exit::USAGE } else { 0 };
        return ExitCode::from(code as u8);
    }
    let text = e.to_string();
    let line: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let line = line.join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    eprintln!("ferrite: {line}");
    ExitCode::from(exit::USAGE as u8)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRITE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The VM to run: the `--config` file, else the VM flags.
fn config_from(args: &RunArgs) -> Result<VmConfig, String> {
    let Some(path) = &args.config else {
        return Ok(config_from_flags(args));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the VM configuration {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        format!(
            "the VM configuration {} is not valid: {e} (it is the JSON form of VmConfig, as \
             ferrited writes it)",
            path.display()
        )
    })
}

fn config_from_flags(args: &RunArgs) -> VmConfig {
    VmConfig {
        kernel: args.kernel.clone().unwrap_or_default(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        vcpus: args.cpus,
        memory_bytes: args.memory,
        disks: args.disks.clone(),
        no_reboot: args.no_reboot,
        repair: args.repair_emulation,
        cpu_features: args.cpu_features.clone().unwrap_or_default(),
        nets: args.nets.clone(),
        vsock: args.vsock.clone(),
        rng: args.rng.clone(),
        balloon: args.balloon.clone(),
        virtio_console: args.virtio_console.clone(),
        api_socket: args.api_socket.clone(),
        track_dirty_pages: args.track_dirty_pages,
        memory_shared: args.memory_shared,
        dirty_log: args.dirty_log,
    }
}

/// Where guest output goes, plus the socket console to serve once the input path exists.
type ConsoleSetup = (Box<dyn Write + Send>, Option<console_socket::SocketConsole>);

fn console_sink(arg: &ConsoleArg) -> std::io::Result<ConsoleSetup> {
    if let ConsoleArg::Socket { path, log } = arg {
        let (console, sink) = console_socket::SocketConsole::bind(path, log.as_deref())?;
        return Ok((Box::new(sink), Some(console)));
    }
    let sink: Box<dyn Write + Send> = match arg {
        ConsoleArg::Stdio => Box::new(std::io::stdout()),
        ConsoleArg::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
        ConsoleArg::None | ConsoleArg::Socket { .. } => Box::new(std::io::sink()),
    };
    Ok((sink, None))
}

/// `ferrite run`: run the VM, then record how it ended in `--status-file` if asked.
fn run(args: RunArgs) -> i32 {
    let (code, outcome, detail, reboots, migration) = run_vm(&args);
    if let Some(path) = &args.status_file {
        let mut status = status_file::RunStatus::now(outcome, code, detail, reboots);
        status.migration = migration;
        if let Err(e) = status.write(path) {
            eprintln!(
                "ferrite: cannot write the status file {}: {e}",
                path.display()
            );
        }
    }
    code
}

/// How a run ended: (exit status, outcome name, one-line detail, reboots, the final status
/// of the migration that moved the guest away).
type RunEnd = (
    i32,
    &'static str,
    String,
    u32,
    Option<vmm::migrate::MigrationStatus>,
);

/// Run the VM: how it ended (see [`RunEnd`]).
fn run_vm(args: &RunArgs) -> RunEnd {
    let error = |code: i32, line: String| {
        eprintln!("ferrite: {line}");
        (code, "error", line, 0, None)
    };
    let (config, restore) = match (&args.restore, &args.incoming) {
        (None, Some(endpoint)) => match receive_migration(endpoint, args) {
            Ok(received) => received,
            Err(line) => return error(exit::USAGE, line),
        },
        (Some(dir), _) => match vmm::vm_snapshot::load(dir) {
            Ok(mut snap) => {
                tracing::debug!("snapshot loaded");
                let mut config = snap.meta.config.clone();
                // The original's control socket may still be in use: only --api-socket names one.
                config.api_socket = args.api_socket.clone();
                if let Some(file) = &args.clone_identity {
                    if let Err(e) = vmm::clone::CloneIdentity::from_file(file)
                        .and_then(|id| vmm::clone::apply(&mut snap, &mut config, &id))
                    {
                        return error(exit::USAGE, chain_to_line(&e));
                    }
                }
                (config, Some(snap))
            }
            Err(e) => {
                return error(
                    exit::USAGE,
                    format!("{}: {}", dir.display(), chain_to_line(&e)),
                )
            }
        },
        (None, None) => match config_from(args) {
            Ok(c) => (c, None),
            Err(line) => return error(exit::USAGE, line),
        },
    };
    // Check what needs no KVM first, so bad input fails before anything is set up.
    if let Err(e) = config.validate(None) {
        return error(exit::USAGE, chain_to_line(&e));
    }
    let stop = match StopHandle::new() {
        Ok(s) => s,
        Err(e) => return error(exit::VM_FAILED, format!("cannot create stop event: {e}")),
    };
    if let Err(e) = signals::install(stop.clone()) {
        return error(
            exit::VM_FAILED,
            format!("cannot set up signal handling: {e}"),
        );
    }
    let (sink, socket_console) = match console_sink(&args.console) {
        Ok(s) => s,
        Err(e) => return error(exit::USAGE, format!("cannot open console output: {e}")),
    };
    let console = match Console::new(sink) {
        Ok(c) => c,
        Err(e) => return error(exit::VM_FAILED, format!("cannot start the console: {e}")),
    };
    if let Some(socket_console) = socket_console {
        if let Err(e) = socket_console.serve(console.input(), stop.clone()) {
            return error(
                exit::VM_FAILED,
                format!("cannot serve the console socket: {e}"),
            );
        }
    }
    let stdin_tty = terminal::is_tty(libc::STDIN_FILENO);
    let _raw = if args.console == ConsoleArg::Stdio && stdin_tty {
        match terminal::RawMode::enable(libc::STDIN_FILENO) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("ferrite: cannot put the terminal in raw mode: {e}");
                None
            }
        }
    } else {
        None
    };
    if args.console == ConsoleArg::Stdio {
        if let Err(e) = input::spawn_stdin_thread(console.input(), stop.clone(), stdin_tty) {
            return error(
                exit::VM_FAILED,
                format!("cannot start the input thread: {e}"),
            );
        }
    }
    let result = vmm::run_with(&config, restore, &console, &stop);
    terminal::restore();
    match result {
        Ok(report) => {
            let code = finish(&report, args.stats);
            if args.stats {
                eprintln!(
                    "ferrite: console output dropped: {} bytes",
                    console.dropped_bytes()
                );
            }
            // Let queued guest output reach the log before the process ends.
            console.flush(std::time::Duration::from_secs(2));
            let (outcome, detail) = match &report.outcome {
                Outcome::PowerOff => ("poweroff", String::new()),
                Outcome::Reset => ("reset", "the guest rebooted (--no-reboot)".to_string()),
                Outcome::Stopped => (
                    "stopped",
                    signals::received()
                        .map(|sig| format!("stopped by {sig}"))
                        .unwrap_or_else(|| "stopped from the console".to_string()),
                ),
                Outcome::Failed(failure) => ("failed", failure_line(failure)),
                Outcome::Migrated(status) => ("migrated", migrated_line(status)),
            };
            let migration = match &report.outcome {
                Outcome::Migrated(status) => Some(status.as_ref().clone()),
                _ => None,
            };
            (code, outcome, detail, report.reboots, migration)
        }
        Err(e) => {
            let code = if e.is_user_error() {
                exit::USAGE
            } else {
                exit::VM_FAILED
            };
            error(code, chain_to_line(&e))
        }
    }
}

/// Wait for a migration source on `endpoint` and receive its VM: (configuration, the state
/// to continue from). The guest runs here only once the source commits (the builder opens
/// the snapshot's start gate).
fn receive_migration(
    endpoint: &str,
    args: &RunArgs,
) -> Result<(VmConfig, Option<vmm::vm_snapshot::LoadedSnapshot>), String> {
    let endpoint: migration::Endpoint = endpoint.parse().map_err(|e| chain_to_line(&e))?;
    // The TLS files are loaded and checked before listening.
    let tls = migration::TlsFiles::from_options(
        args.incoming_tls_cert.as_deref(),
        args.incoming_tls_key.as_deref(),
        args.incoming_tls_ca.as_deref(),
        [
            "--incoming-tls-cert",
            "--incoming-tls-key",
            "--incoming-tls-ca",
        ],
    )
    .and_then(|files| files.map(|f| migration::TlsServer::new(&f)).transpose())
    .map_err(|e| chain_to_line(&e))?;
    let disk_dir = args.incoming_disk_dir.as_deref();
    if let Some(dir) = disk_dir {
        if !dir.is_dir() {
            return Err(format!(
                "--incoming-disk-dir {} is not a directory: create it or name an existing one",
                dir.display()
            ));
        }
    }
    let incoming = vmm::migrate::incoming::accept(&endpoint, tls.as_ref(), disk_dir)
        .map_err(|e| chain_to_line(&e))?;
    let mut config = incoming.config.clone();
    // The source's control socket is its own: only --api-socket names one here.
    config.api_socket = args.api_socket.clone();
    let snap = incoming.receive().map_err(|e| {
        format!(
            "Incoming migration failed; the guest did not run here: {}",
            chain_to_line(&e)
        )
    })?;
    tracing::debug!("migration received");
    Ok((config, Some(snap)))
}

/// One line on a completed outgoing migration.
fn migrated_line(status: &vmm::migrate::MigrationStatus) -> String {
    let line = format!(
        "migrated to {}{}: downtime {:.1} ms, total {:.1} ms, {} rounds, {:.1} MiB sent ({} pages, {} zero pages)",
        status.to,
        if status.tls { " over TLS" } else { "" },
        status.downtime_ms.unwrap_or(0.0),
        status.total_ms.unwrap_or(0.0),
        status.round + 1,
        status.sent_bytes as f64 / f64::from(1 << 20),
        status.pages_sent,
        status.zero_pages
    ) + &if status.disk_sent_bytes + status.disk_zero_bytes > 0 {
        format!(
            "; disks: {:.1} MiB of data, {:.1} MiB zero",
            status.disk_sent_bytes as f64 / f64::from(1 << 20),
            status.disk_zero_bytes as f64 / f64::from(1 << 20)
        )
    } else {
        String::new()
    };
    match &status.dirty_log {
        Some(tracker) => format!(
            "{line}; dirty log {tracker}: {} harvests, {:.2} ms",
            status.harvests,
            status.harvest_us as f64 / 1000.0
        ),
        None => line,
    }
}

/// The first line of a failure report (the reason, without the register dump).
fn failure_line(failure: &vmm::dump::FailureReport) -> String {
    failure
        .to_string()
        .lines()
        .next()
        .unwrap_or("the VM failed")
        .to_string()
}

fn finish(report: &RunReport, stats: bool) -> i32 {
    let code = outcome_status(report, stats);
    if stats {
        print_stats(report);
    }
    code
}

/// Report how the VM ended and choose the exit status.
fn outcome_status(report: &RunReport, stats: bool) -> i32 {
    match &report.outcome {
        Outcome::PowerOff => exit::POWER_OFF,
        Outcome::Reset => {
            eprintln!("ferrite: the guest rebooted (--no-reboot)");
            exit::REBOOT
        }
        Outcome::Migrated(status) => {
            eprintln!("ferrite: {}", migrated_line(status));
            exit::MIGRATED
        }
        Outcome::Stopped => {
            match signals::received() {
                Some(sig) => eprintln!("ferrite: stopped by {sig}"),
                None => eprintln!("ferrite: stopped from the console"),
            }
            exit::STOPPED
        }
        Outcome::Failed(failure) => {
            eprintln!("ferrite: {failure}");
            if !stats && !report.repairs.is_empty() {
                eprintln!(
                    "ferrite: instruction repairs: {}",
                    format_counts(&report.repairs)
                );
            }
            exit::VM_FAILED
        }
    }
}

fn format_counts(counts: &[(&str, u64)]) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_stats(report: &RunReport) {
    eprintln!("ferrite: reboots: {}", report.reboots);
    for (id, counts) in &report.exits {
        eprintln!("ferrite: vcpu{id} exits: {}", format_counts(counts));
    }
    if report.repair_enabled {
        eprintln!(
            "ferrite: instruction repairs: {}",
            if report.repairs.is_empty() {
                "none".to_string()
            } else {
                format_counts(&report.repairs)
            }
        );
    } else {
        eprintln!("ferrite: instruction repairs: disabled");
    }
}
