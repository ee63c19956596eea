//! `--status-file PATH`: how the run ended, as JSON written atomically when `ferrite run`
//! exits, for a supervisor (ferrited) that may not be the VMM's parent after a restart and so
//! cannot read its exit status.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

/// The file's content.
#[derive(Debug, Serialize)]
pub struct RunStatus {
    /// `poweroff`, `reset` (with --no-reboot), `stopped` (from the host), `failed` (the VM
    /// failed), `error` (Ferrite could not run it) or `migrated` (the guest runs on a
    /// migration's destination now).
    pub outcome: &'static str,
    /// The process's exit status.
    pub exit_code: i32,
    /// One line on the cause (empty for a clean end).
    pub detail: String,
    /// Guest reboots handled in-process before the end.
    pub reboots: u32,
    /// When it ended, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// With `migrated`: the migration's final status (as the control socket's
    /// `migrate-status` reports it), so a supervisor has the numbers after the process is gone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<vmm::migrate::MigrationStatus>,
}

impl RunStatus {
    /// A status stamped with the current time.
    pub fn now(outcome: &'static str, exit_code: i32, detail: String, reboots: u32) -> Self {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self {
            outcome,
            exit_code,
            detail,
            reboots,
            at_ms,
            migration: None,
        }
    }

    /// Write to `path` atomically (a temporary file beside it, fsync, rename), so a reader
    /// never sees half a status.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = Path::new(&tmp_name);
        let mut file = std::fs::File::create(tmp)?;
        serde_json::to_writer(&mut file, self).map_err(std::io::Error::other)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn test_status_is_written_as_json_without_leftovers() {
        let dir = TempDir::new_with_prefix("/tmp/ferrite-status-").unwrap();
        let path = dir.as_path().join("status.json");
        let status = RunStatus::now("failed", 1, "triple fault".into(), 2);

        status.write(&path).unwrap();

        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["outcome"], "failed");
        assert_eq!(v["exit_code"], 1);
        assert_eq!(v["detail"], "triple fault");
        assert_eq!(v["reboots"], 2);
        assert!(v["at_ms"].as_u64().unwrap() > 0);
        assert!(
            v.get("migration").is_none(),
            "no migration key unless migrated"
        );
        let names: Vec<_> = std::fs::read_dir(dir.as_path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
    }
}
