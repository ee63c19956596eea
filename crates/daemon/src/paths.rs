//! Where each VM's files live: runtime files (sockets, the VMM's config and exit status) under
//! the run directory, logs and snapshots under the state directory.

use std::path::{Path, PathBuf};

/// The files of one VM.
#[derive(Debug, Clone)]
pub struct VmPaths {
    /// `<run>/vms/<name>`.
    pub dir: PathBuf,
    /// The VMM's control socket.
    pub control: PathBuf,
    /// The VMM's serial console socket.
    pub console: PathBuf,
    /// The `VmConfig` JSON the VMM is started with.
    pub config: PathBuf,
    /// The status file the VMM writes when it exits.
    pub status: PathBuf,
    /// Everything the guest printed on its serial console, across runs.
    pub console_log: PathBuf,
    /// The VMM process's own stderr/stdout.
    pub vmm_log: PathBuf,
    /// `<state>/snapshots/<name>`: one directory per snapshot of the VM.
    pub snapshots: PathBuf,
    /// `<state>/disks/<name>`: disk images the daemon made for the VM (a clone's overlays).
    pub disks: PathBuf,
}

impl VmPaths {
    /// The paths of VM `name`.
    pub fn new(run_dir: &Path, state_dir: &Path, name: &str) -> Self {
        let dir = run_dir.join("vms").join(name);
        let logs = state_dir.join("logs");
        VmPaths {
            control: dir.join("control.sock"),
            console: dir.join("console.sock"),
            config: dir.join("config.json"),
            status: dir.join("status.json"),
            console_log: logs.join(format!("{name}.console.log")),
            vmm_log: logs.join(format!("{name}.vmm.log")),
            snapshots: state_dir.join("snapshots").join(name),
            disks: state_dir.join("disks").join(name),
            dir,
        }
    }
}
