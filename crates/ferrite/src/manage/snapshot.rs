//! `ferrite snapshot ...`: snapshots of ferrited's VMs, taken, listed, restored and deleted
//! through its API.

use api::client::Client;
use api::{SnapshotInfo, SnapshotRequest};
use clap::{Args, Subcommand};

use super::{finish, format_bytes, print_json, spinner, table, Failed, Global, Res};

/// `ferrite snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

/// `ferrite snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a running or paused VM (it continues afterwards unless --stay-paused).
    Create {
        /// The VM.
        vm: String,
        /// The snapshot's name (letters, digits, - _ .).
        name: String,
        /// Leave the VM paused once the snapshot is written.
        #[arg(long)]
        stay_paused: bool,
    },
    /// List a VM's snapshots: NAME CREATED MEMORY STATE PATH.
    #[command(visible_alias = "list")]
    Ls {
        /// The VM.
        vm: String,
    },
    /// Start a stopped VM from one of its snapshots.
    Restore {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
    },
    /// Delete a snapshot and its files.
    #[command(visible_alias = "delete")]
    Rm {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
    },
    /// Merge a diff snapshot directory with its base into a new full snapshot directory
    /// (local files; no daemon involved).
    Merge {
        /// The diff snapshot (taken with `"diff":true`).
        diff: std::path::PathBuf,
        /// The new full snapshot directory (must not exist).
        output: std::path::PathBuf,
    },
}

/// Run `ferrite snapshot ...`.
pub fn run_snapshot(g: &Global, args: SnapshotArgs) -> i32 {
    finish(snapshot(g, &g.client(), args.command))
}

fn snapshot(g: &Global, c: &Client, cmd: SnapshotCommand) -> Res {
    match cmd {
        SnapshotCommand::Create {
            vm,
            name,
            stay_paused,
        } => {
            let spinner = spinner::Spinner::start(format!("Snapshotting {vm} as {name}"), g.json);
            let req = SnapshotRequest {
                name: name.clone(),
                stay_paused,
            };
            let info = c.create_snapshot(&vm, &req);
            spinner.finish();
            let info = info?;
            if g.json {
                print_json(&info)
            } else {
                println!(
                    "{vm}: snapshot {name} ({} of memory) in {}",
                    format_bytes(info.memory_bytes),
                    info.path
                );
                Ok(())
            }
        }
        SnapshotCommand::Ls { vm } => {
            let list = c.list_snapshots(&vm)?;
            if g.json {
                print_json(&list)
            } else {
                print!("{}", snapshot_table(&list));
                Ok(())
            }
        }
        SnapshotCommand::Restore { vm, name } => {
            let spinner = spinner::Spinner::start(format!("Restoring {vm} from {name}"), g.json);
            let info = c.restore_snapshot(&vm, &name);
            spinner.finish();
            let info = info?;
            if g.json {
                print_json(&info)
            } else {
                println!("{}: {} (from snapshot {name})", vm, info.state.as_str());
                Ok(())
            }
        }
        SnapshotCommand::Rm { vm, name } => {
            c.delete_snapshot(&vm, &name)?;
            Ok(())
        }
        SnapshotCommand::Merge { diff, output } => {
            match crate::snapshot_merge::run(&diff, &output, g.json) {
                0 => Ok(()),
                _ => Err(Failed(String::new())),
            }
        }
    }
}

/// UTC `YYYY-MM-DD HH:MM:SS` of a Unix time in ms.
pub(crate) fn format_date_ms(ms: u64) -> String {
    let t = devices::cmos::DateTime::from_unix((ms / 1000) as i64);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// The `snapshot ls` table.
pub(crate) fn snapshot_table(list: &[SnapshotInfo]) -> String {
    let mut rows = vec![["NAME", "CREATED", "MEMORY", "STATE", "PATH"]
        .map(String::from)
        .to_vec()];
    for s in list {
        rows.push(vec![
            s.name.clone(),
            format_date_ms(s.created_ms),
            format_bytes(s.memory_bytes),
            format_bytes(s.state_bytes),
            s.path.clone(),
        ]);
    }
    table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_format_date_ms_gives_utc_calendar_time() {
        assert_eq!(format_date_ms(0), "1970-01-01 00:00:00");
        assert_eq!(format_date_ms(1_709_210_096_000), "2024-02-29 12:34:56");
    }

    #[test]
    fn test_snapshot_table_has_a_row_per_snapshot() {
        let s = SnapshotInfo {
            vm: "web".into(),
            name: "before-upgrade".into(),
            path: "/var/lib/ferrite/snapshots/web/before-upgrade".into(),
            created_ms: 0,
            memory_bytes: 3 << 20,
            state_bytes: 20_000,
        };

        let t = snapshot_table(&[s]);

        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2, "{t}");
        assert!(lines[0].starts_with("NAME"), "{t}");
        assert!(
            lines[1].starts_with("before-upgrade  1970-01-01 00:00:00  3M"),
            "{t}"
        );
    }
}
