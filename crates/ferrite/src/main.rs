//! `ferrite`: run a VM with its serial console on this terminal.

mod cli;
mod disk_cmd;
mod input;
mod signals;
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
    let code = match cli.command {
        Command::Run(args) => run(args),
        Command::Disk(args) => disk_cmd::run(args),
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

fn config_from(args: &RunArgs) -> VmConfig {
    VmConfig {
        kernel: args.kernel.clone(),
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
    }
}

fn console_sink(arg: &ConsoleArg) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match arg {
        ConsoleArg::Stdio => Box::new(std::io::stdout()),
        ConsoleArg::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
        ConsoleArg::None => Box::new(std::io::sink()),
    })
}

fn run(args: RunArgs) -> i32 {
    let config = config_from(&args);
    // Check what needs no KVM first, so bad input fails before anything is set up.
    if let Err(e) = config.validate(None) {
        eprintln!("ferrite: {}", chain_to_line(&e));
        return exit::USAGE;
    }
    let stop = match StopHandle::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferrite: cannot create stop event: {e}");
            return exit::VM_FAILED;
        }
    };
    if let Err(e) = signals::install(stop.clone()) {
        eprintln!("ferrite: cannot set up signal handling: {e}");
        return exit::VM_FAILED;
    }
    let sink = match console_sink(&args.console) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferrite: cannot open console output: {e}");
            return exit::USAGE;
        }
    };
    let console = match Console::new(sink) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferrite: cannot start the console: {e}");
            return exit::VM_FAILED;
        }
    };
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
            eprintln!("ferrite: cannot start the input thread: {e}");
            return exit::VM_FAILED;
        }
    }
    let result = vmm::run(&config, &console, &stop);
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
            code
        }
        Err(e) => {
            eprintln!("ferrite: {}", chain_to_line(&e));
            if e.is_user_error() {
                exit::USAGE
            } else {
                exit::VM_FAILED
            }
        }
    }
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
