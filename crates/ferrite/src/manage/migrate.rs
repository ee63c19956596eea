//! `ferrite vm migrate NAME --to DEST`: live-migrate a running VM to another ferrited, showing
//! its progress until the guest runs there; `--cancel` stops a migration in progress.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use api::client::Client;
use api::{Converge, MigrateRequest, MigrationInfo, MigrationPhase};
use clap::Args;

use super::{print_json, Failed, Global, Res};

/// How often the progress is read.
const POLL: Duration = Duration::from_millis(250);
/// Failed reads of the progress in a row before giving up following it.
const MAX_POLL_ERRORS: u32 = 20;

/// `ferrite vm migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The VM (running; its disks on storage both daemons see, or --copy-disks).
    pub name: String,
    /// The destination daemon: its API socket (a daemon on this host) or https://HOST:PORT.
    #[arg(long, value_name = "DEST", required_unless_present = "cancel")]
    pub to: Option<String>,
    /// Longest acceptable pause of the guest for the switch-over, ms (default 10).
    #[arg(long, value_name = "MS")]
    pub downtime_ms: Option<u64>,
    /// Bandwidth limit in MiB/s (default: unlimited).
    #[arg(long, value_name = "MIB_S")]
    pub bandwidth: Option<u64>,
    /// Give up after this many seconds, the VM staying here (default 120).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// When the guest dirties memory faster than it is copied: slow its vCPUs down
    /// (throttle, the default) or give up at the timeout (abort).
    #[arg(long, value_name = "HOW", value_parser = parse_converge)]
    pub converge: Option<Converge>,
    /// Copy the VM's writable disks too (local disks, not on storage both daemons see): the
    /// destination daemon keeps them in its state directory.
    #[arg(long)]
    pub copy_disks: bool,
    /// Post-copy: run the guest on the destination right after its state, fetching the
    /// pages it touches before they came (the pause no longer depends on its write rate; a
    /// connection lost before every page is across stops the VM).
    #[arg(long, conflicts_with = "copy_disks")]
    pub postcopy: bool,
    /// With --postcopy: pre-copy rounds before the switch (default 0).
    #[arg(long, value_name = "N", requires = "postcopy")]
    pub precopy_rounds: Option<u32>,
    /// Copy the bulk of memory (round 0) over N connections at once (1..=15).
    #[arg(long, value_name = "N")]
    pub connections: Option<u32>,
    /// Cancel the VM's migration in progress instead (it keeps running here).
    #[arg(long, conflicts_with_all = ["to", "downtime_ms", "bandwidth", "timeout", "converge", "copy_disks", "postcopy", "connections"])]
    pub cancel: bool,
    /// Print the final migration record as JSON (no progress).
    #[arg(long)]
    pub json: bool,
}

fn parse_converge(s: &str) -> Result<Converge, String> {
    match s {
        "throttle" => Ok(Converge::Throttle),
        "abort" => Ok(Converge::Abort),
        _ => Err(format!("{s:?}: use throttle or abort")),
    }
}

/// A socket path made absolute (the daemon does not share our working directory); URLs as
/// they are.
fn destination(to: &str) -> Res<String> {
    if to.contains("://") {
        return Ok(to.to_string());
    }
    let abs = std::path::absolute(Path::new(to)).map_err(|e| Failed(format!("{to}: {e}")))?;
    Ok(abs.to_string_lossy().into_owned())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// One progress line.
pub(crate) fn progress_line(m: &MigrationInfo) -> String {
    match m.phase {
        MigrationPhase::Connecting => {
            format!("{}: connecting to {}{}", m.vm, m.endpoint, tls_note(m))
        }
        MigrationPhase::Final => format!(
            "{}: final copy (guest paused), {:.1} MiB sent",
            m.vm,
            mib(m.sent_bytes)
        ),
        _ => format!(
            "{}: {}{} round {}: {:.1} MiB left, {:.1} MiB/s, throttle {}%, {:.1} MiB sent",
            m.vm,
            m.phase.as_str(),
            tls_note(m),
            m.round,
            mib(m.remaining_bytes),
            mib(m.rate_bytes_per_s),
            m.throttle_pct,
            mib(m.sent_bytes)
        ),
    }
}

/// How the stream is carried, for the progress and summary lines.
fn tls_note(m: &MigrationInfo) -> &'static str {
    if m.tls {
        " (TLS)"
    } else {
        ""
    }
}

/// The summary of a completed migration.
pub(crate) fn summary(m: &MigrationInfo) -> String {
    format!(
        "{}: migrated to {}{} in {:.0} ms (downtime {:.1} ms, {:.1} MiB sent in {} rounds, {} zero pages)",
        m.vm,
        m.to,
        if m.tls { " over TLS" } else { "" },
        m.total_ms.unwrap_or(m.elapsed_ms as f64),
        m.downtime_ms.unwrap_or(0.0),
        mib(m.sent_bytes),
        m.round + 1,
        m.zero_pages
    )
}

/// Why a migration that is over did not complete, as the command's error.
fn failure(m: &MigrationInfo) -> Failed {
    let why = m
        .error
        .clone()
        .unwrap_or_else(|| m.phase.as_str().to_string());
    Failed(match m.phase {
        MigrationPhase::Cancelled => format!("{}: migration cancelled; the VM keeps running here", m.vm),
        MigrationPhase::Unknown => format!(
            "{}: the destination did not confirm the switch-over: the guest is paused here; if the destination does not run it, resume it here ({why})",
            m.vm
        ),
        _ if why.contains("keeps running here") => format!("{}: migration failed: {why}", m.vm),
        _ => format!("{}: migration failed: {why}; the VM keeps running here", m.vm),
    })
}

/// Where progress goes: one updated line on a terminal, a line per phase or round otherwise.
struct Progress {
    tty: bool,
    quiet: bool,
    last: String,
    /// (phase, round) of the last line written off a terminal.
    step: Option<(MigrationPhase, u32)>,
    shown: bool,
}

impl Progress {
    fn show(&mut self, m: &MigrationInfo) {
        if self.quiet {
            return;
        }
        let line = progress_line(m);
        if line == self.last {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            self.shown = true;
        } else if self.step != Some((m.phase, m.round)) {
            // Off a terminal: a line per phase or round, not per sample.
            let _ = writeln!(err, "{line}");
            self.step = Some((m.phase, m.round));
        }
        let _ = err.flush();
        self.last = line;
    }

    fn clear(&mut self) {
        if self.tty && self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
            self.shown = false;
        }
    }
}

/// Run `ferrite vm migrate`.
pub fn run(g: &Global, c: &Client, a: MigrateArgs) -> Res {
    let json = a.json || g.json;
    if a.cancel {
        let m = c.cancel_migration(&a.name)?;
        return if json {
            print_json(&m)
        } else {
            println!("{}: migration {}", m.vm, m.phase.as_str());
            Ok(())
        };
    }
    let to = destination(a.to.as_deref().unwrap_or_default())?;
    let req = MigrateRequest {
        to,
        downtime_ms: a.downtime_ms,
        bandwidth_mib_s: a.bandwidth,
        timeout_s: a.timeout,
        converge: a.converge,
        copy_disks: a.copy_disks,
        postcopy: a.postcopy,
        precopy_rounds: a.precopy_rounds,
        connections: a.connections,
    };
    let mut m = c.migrate(&a.name, &req)?;
    let mut progress = Progress {
        tty: std::io::stderr().is_terminal(),
        quiet: json,
        last: String::new(),
        step: None,
        shown: false,
    };
    let mut errors = 0;
    while !m.phase.is_done() {
        progress.show(&m);
        std::thread::sleep(POLL);
        match c.migration(&a.name) {
            Ok(now) => {
                m = now;
                errors = 0;
            }
            Err(e) if errors < MAX_POLL_ERRORS => {
                errors += 1;
                tracing::debug!("reading the migration's progress: {e}");
            }
            Err(e) => {
                progress.clear();
                return Err(Failed(format!(
                    "{}: lost the migration's progress ({e}); see `ferrite vm show {}` and GET /v1/vms/{}/migration",
                    a.name, a.name, a.name
                )));
            }
        }
    }
    progress.clear();
    if json {
        print_json(&m)?;
    }
    if m.phase != MigrationPhase::Completed {
        return Err(failure(&m));
    }
    if !json {
        println!("{}", summary(&m));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(phase: MigrationPhase) -> MigrationInfo {
        MigrationInfo {
            vm: "web".into(),
            to: "/run/b.sock".into(),
            endpoint: "tcp:127.0.0.1:4000".into(),
            phase,
            round: 2,
            remaining_bytes: 3 << 20,
            sent_bytes: 130 << 20,
            rate_bytes_per_s: 512 << 20,
            throttle_pct: 20,
            zero_pages: 7,
            downtime_ms: Some(4.31),
            total_ms: Some(812.0),
            ..Default::default()
        }
    }

    #[test]
    fn test_progress_line_shows_round_remaining_rate_and_throttle() {
        let line = progress_line(&info(MigrationPhase::Copying));

        assert_eq!(
            line,
            "web: copying round 2: 3.0 MiB left, 512.0 MiB/s, throttle 20%, 130.0 MiB sent"
        );
    }

    #[test]
    fn test_summary_gives_downtime_total_and_bytes() {
        let s = summary(&info(MigrationPhase::Completed));

        assert_eq!(
            s,
            "web: migrated to /run/b.sock in 812 ms (downtime 4.3 ms, 130.0 MiB sent in 3 rounds, 7 zero pages)"
        );
    }

    #[test]
    fn test_tls_streams_say_so_in_progress_and_summary() {
        let mut m = info(MigrationPhase::Copying);
        m.tls = true;

        let line = progress_line(&m);
        m.phase = MigrationPhase::Completed;
        let s = summary(&m);

        assert!(line.starts_with("web: copying (TLS) round 2:"), "{line}");
        assert!(
            s.starts_with("web: migrated to /run/b.sock over TLS in 812 ms"),
            "{s}"
        );
    }

    #[test]
    fn test_failures_say_where_the_vm_is() {
        let mut m = info(MigrationPhase::Failed);
        m.error = Some("Migration connection lost".into());

        let failed = failure(&m).0;
        let cancelled = failure(&info(MigrationPhase::Cancelled)).0;

        assert!(failed.contains("Migration connection lost"), "{failed}");
        assert!(failed.contains("keeps running here"), "{failed}");
        assert!(cancelled.contains("cancelled"), "{cancelled}");
    }

    #[test]
    fn test_destination_keeps_urls_and_makes_paths_absolute() {
        assert_eq!(destination("https://b:8443").unwrap(), "https://b:8443");
        assert!(destination("b.sock").unwrap().starts_with('/'));
    }
}
