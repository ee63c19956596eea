//! `ferrite disk-snapshot ...`: live disk snapshots of ferrited's VMs (a qcow2 overlay on
//! every writable disk at one point), listed with each disk's chain, reverted and flattened
//! through its API.

use api::client::Client;
use api::DiskSnapshotList;
use clap::{Args, Subcommand};

use super::snapshot::format_date_ms;
use super::{finish, print_json, spinner, table, Global, Res};

/// `ferrite disk-snapshot`.
#[derive(Debug, Args)]
pub struct DiskSnapshotArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: DiskSnapshotCommand,
}

/// `ferrite disk-snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum DiskSnapshotCommand {
    /// Put a new qcow2 overlay on every writable disk of a running VM, all at one point.
    Create {
        /// The VM.
        vm: String,
        /// The snapshot's tag (letters, digits, - _ .); overlays are named BASE@TAG.qcow2.
        tag: String,
    },
    /// List a VM's disk snapshots and each disk's chain (top image first).
    #[command(visible_alias = "list")]
    Ls {
        /// The VM.
        vm: String,
    },
    /// Put a stopped VM's disks back to a snapshot (new empty overlays over the images it
    /// froze; the later layers are kept on disk, unused).
    Revert {
        /// The VM.
        vm: String,
        /// The snapshot's tag.
        tag: String,
    },
    /// Merge a stopped VM's disk chain into its top image (the images below are kept).
    Flatten {
        /// The VM.
        vm: String,
        /// The disk's number (0 is the first --disk).
        disk: usize,
    },
}

/// Run `ferrite disk-snapshot ...`.
pub fn run_disk_snapshot(g: &Global, args: DiskSnapshotArgs) -> i32 {
    finish(disk_snapshot(g, &g.client(), args.command))
}

fn disk_snapshot(g: &Global, c: &Client, cmd: DiskSnapshotCommand) -> Res {
    match cmd {
        DiskSnapshotCommand::Create { vm, tag } => {
            let info = c.create_disk_snapshot(&vm, &tag)?;
            if g.json {
                return print_json(&info);
            }
            for d in &info.disks {
                println!(
                    "{vm}: disk {} now on {} (over {})",
                    d.index, d.path, d.backing
                );
            }
            Ok(())
        }
        DiskSnapshotCommand::Ls { vm } => {
            let list = c.list_disk_snapshots(&vm)?;
            if g.json {
                return print_json(&list);
            }
            print!("{}", list_text(&list));
            Ok(())
        }
        DiskSnapshotCommand::Revert { vm, tag } => {
            let info = c.revert_disk_snapshot(&vm, &tag)?;
            if g.json {
                return print_json(&info);
            }
            for d in &info.disks {
                println!(
                    "{vm}: disk {} reverted to {tag}: now on {}",
                    d.index, d.path
                );
                for old in &d.detached {
                    println!("  kept, no longer used (delete it when nothing uses it): {old}");
                }
            }
            Ok(())
        }
        DiskSnapshotCommand::Flatten { vm, disk } => {
            let spinner = spinner::Spinner::start(format!("Flattening {vm} disk {disk}"), g.json);
            let info = c.flatten_disk(&vm, disk);
            spinner.finish();
            let info = info?;
            if g.json {
                return print_json(&info);
            }
            println!("{vm}: disk {disk} is standalone: {}", info.path);
            Ok(())
        }
    }
}

/// The `disk-snapshot ls` text: a TAG CREATED table, then each disk's chain.
pub(crate) fn list_text(list: &DiskSnapshotList) -> String {
    let mut rows = vec![["TAG", "CREATED", "DISKS"].map(String::from).to_vec()];
    for s in &list.snapshots {
        rows.push(vec![
            s.tag.clone(),
            format_date_ms(s.created_ms),
            s.disks.len().to_string(),
        ]);
    }
    let mut out = table(&rows);
    for d in &list.disks {
        out += &format!("disk {}:\n", d.index);
        for (n, image) in d.chain.iter().enumerate() {
            out += &format!("  {n}: {} ({})\n", image.path, image.format);
        }
    }
    out
}
