//! `ferrite snapshot merge DIFF OUT`: turn a diff snapshot and its base into one full snapshot
//! that `ferrite run --restore` (and the daemon) can restore. Runs locally, without ferrited.

use std::path::Path;

use vmm::error::chain_to_line;

use crate::cli::exit;

/// Merge `diff` onto its base into the new directory `out`; prints what was written.
pub fn run(diff: &Path, out: &Path, json: bool) -> i32 {
    match vmm::vm_snapshot::merge(diff, out) {
        Ok(summary) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&summary).unwrap_or_else(|_| "{}".to_string())
                );
            } else {
                println!(
                    "{}: full snapshot ({} MiB of memory data) in {:.0} ms",
                    summary.path.display(),
                    summary.memory_bytes_written >> 20,
                    summary.write_ms
                );
            }
            0
        }
        Err(e) => {
            eprintln!("ferrite: {}: {}", diff.display(), chain_to_line(&e));
            exit::USAGE
        }
    }
}
