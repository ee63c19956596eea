//! The control socket's handle on one running VM instance: pause/resume, power button, reboot
//! and per-vCPU statistics (see [`crate::control::VmOps`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::AcpiPm;
use serde_json::{json, Value};
use virtio::VirtioPciDevice;
use vm_device::{ShutdownKind, ShutdownSignal};

use crate::control::VmOps;
use crate::stats::ExitCounters;
use crate::vcpu::RunControl;

/// How long `pause` waits for the vCPUs to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// One vCPU as the control socket sees it.
pub struct LiveVcpu {
    /// vCPU index.
    pub id: u32,
    /// Its thread, for kicks. Valid while the instance is in the live slot: the VM clears
    /// the slot (waiting for any running operation) before it joins the threads.
    pub thread: libc::pthread_t,
    /// Kernel thread id (0 until the thread started).
    pub tid: Arc<AtomicI32>,
    /// Exit counters.
    pub counters: Arc<ExitCounters>,
}

/// What the control socket holds of a running VM instance.
pub struct LiveVm {
    /// vCPU coordination.
    pub control: Arc<RunControl>,
    /// The vCPUs.
    pub vcpus: Vec<LiveVcpu>,
    /// Virtio functions (their workers are paused with the vCPUs).
    pub virtio_devices: Vec<Arc<Mutex<VirtioPciDevice>>>,
    /// The ACPI PM block (power button).
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    /// Where the reset request goes.
    pub shutdown: ShutdownSignal,
    /// Whether `pause` is in effect.
    pub paused: AtomicBool,
    /// The disks (switched to new overlays by a disk snapshot).
    pub disks: Vec<crate::disk_snapshot::LiveDisk>,
    /// The vsock device's listening socket file (handed over to a migration destination).
    pub vsock_socket: Option<Arc<crate::devices::vsock::SocketFile>>,
    /// Queues of multiqueue TAPs (handed over to a migration destination).
    pub taps: Vec<net::Tap>,
    /// What a snapshot is taken from.
    pub snapshot: SnapshotHandles,
}

/// Handles on the parts of a running instance a snapshot reads.
pub struct SnapshotHandles {
    /// The KVM VM.
    pub vm: Arc<kvm_ioctls::VmFd>,
    /// Guest RAM.
    pub memory: vm_device::GuestMemoryMmap,
    /// Legacy devices.
    pub legacy: Arc<devices::LegacyDevices>,
    /// The configuration the instance was built from.
    pub config: crate::config::VmConfig,
    /// The snapshot this instance was restored from (its RAM is a private mapping of that
    /// snapshot's memory file).
    pub restored_from: Option<std::path::PathBuf>,
    /// How KVM's dirty pages are read (ring or bitmap): every reader goes through it.
    pub dirty_log: crate::dirty::DirtyLog,
    /// Dirty-page bookkeeping between snapshots.
    pub dirty: Mutex<DirtyTracker>,
    /// The VM generation ID the guest sees (None: restored from a snapshot without one).
    pub vmgenid: Option<crate::vmgenid::GenerationId>,
}

/// What the dirty-page log is relative to.
#[derive(Debug, Default)]
pub struct DirtyTracker {
    /// KVM dirty logging is on (`track_dirty_pages`).
    pub enabled: bool,
    /// The snapshot the log is relative to: the last one taken, or the restore source.
    pub base: Option<std::path::PathBuf>,
    /// For a restored VM: every page written since the restore (one bitmap per region).
    pub since_restore: Option<Vec<Vec<u64>>>,
}

impl DirtyTracker {
    /// Bookkeeping for an instance with `enabled` dirty logging over `regions` bytes each,
    /// restored from `restored_from` if it was.
    pub fn new(enabled: bool, restored_from: Option<&std::path::Path>, regions: &[u64]) -> Self {
        Self {
            enabled,
            base: restored_from.map(|p| p.to_path_buf()),
            since_restore: restored_from.map(|_| {
                regions
                    .iter()
                    .map(|len| vec![0u64; (*len as usize / 4096).div_ceil(64)])
                    .collect()
            }),
        }
    }
}

/// How long the vCPUs get to save their state once parked.
const VCPU_SAVE_TIMEOUT: Duration = Duration::from_secs(10);

impl LiveVm {
    fn resume_devices(&self) -> Result<(), (&'static str, String)> {
        let mut first_err = None;
        for dev in &self.virtio_devices {
            if let Err(e) = dev.lock().unwrap_or_else(|e| e.into_inner()).resume() {
                first_err.get_or_insert(("device-error", format!("Cannot resume a device: {e}")));
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl LiveVm {
    /// Hand the writable disks over to a migration destination (storage both hosts see):
    /// flush them, then drop their write locks so the destination can open them. The VM is
    /// paused, so nothing writes them here any more.
    pub(crate) fn release_disks(&self) -> Result<(), String> {
        use disk::DiskBackend;
        for d in self.disks.iter().filter(|d| !d.readonly) {
            let path = d.disk.path();
            d.disk
                .flush()
                .and_then(|()| d.disk.relock(disk::LockMode::Unlocked))
                .map_err(|e| format!("Cannot hand over the disk {}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// Take the writable disks' locks back after a failed migration, waiting up to
    /// `patience` for a destination that is still exiting to let go of them.
    pub(crate) fn retake_disks(&self, patience: Duration) -> Result<(), String> {
        use disk::DiskBackend;
        let deadline = std::time::Instant::now() + patience;
        for d in self.disks.iter().filter(|d| !d.readonly) {
            loop {
                match d.disk.relock(disk::LockMode::Write) {
                    Ok(()) => break,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => {
                        return Err(format!(
                            "Cannot take the disk {} back: {e}",
                            d.disk.path().display()
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Hand the host resources a destination on this host opens by name over to a
    /// migration destination: the queue of every multiqueue TAP (detached; the descriptors
    /// stay open) and the vsock socket path (renamed aside; the listener and its connections
    /// stay open). The VM is paused, so no device uses them.
    pub(crate) fn release_host_devices(&self) -> Result<(), String> {
        for (i, tap) in self.taps.iter().enumerate() {
            if let Err(e) = tap.detach_queue() {
                for t in &self.taps[..i] {
                    let _ = t.attach_queue();
                }
                return Err(format!("Cannot hand over the TAP {}: {e}", tap.name()));
            }
        }
        if let Some(s) = &self.vsock_socket {
            s.hand_over().map_err(|e| {
                format!(
                    "Cannot hand over the vsock socket {}: {e}",
                    s.path().display()
                )
            })?;
        }
        Ok(())
    }

    /// Take the host resources back after a failed migration (the guest's vsock host
    /// connections open before it are intact). A failure is logged: the guest runs on,
    /// without that device's host side.
    pub(crate) fn retake_host_devices(&self) {
        for tap in &self.taps {
            match tap.attach_queue() {
                Ok(()) => {}
                // A queue that was never detached (the handover failed before it).
                Err(net::NetError::Ioctl { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => tracing::warn!("cannot attach to the TAP {} again: {e}", tap.name()),
            }
        }
        if let Some(s) = &self.vsock_socket {
            if let Err(e) = s.take_back() {
                tracing::warn!(
                    "cannot put the vsock socket back at {} (it is at {}): {e}",
                    s.path().display(),
                    s.aside().display()
                );
            }
        }
    }

    /// Do the slow part of saving vCPU state (probing the host's MSR list) ahead of a pause.
    pub(crate) fn prepare_save(&self) -> Result<(), crate::vm_snapshot::VmSnapshotError> {
        snapshot_msrs().map(|_| ())
    }

    /// The configuration as it stands (disks on their current overlays).
    pub(crate) fn current_config(&self) -> crate::config::VmConfig {
        crate::disk_snapshot::current_config(&self.snapshot.config, &self.disks)
    }

    /// Turn KVM's dirty-page log on for a migration (already on for a VM that tracks dirty
    /// pages) and start the log afresh.
    pub(crate) fn start_dirty_log(&self) -> Result<(), String> {
        if !self.snapshot.config.track_dirty_pages {
            crate::memory::register_guest_memory(&self.snapshot.vm, &self.snapshot.memory, true)
                .map_err(|e| format!("Cannot turn on dirty-page logging: {e}"))?;
        }
        self.harvest_dirty().map(|_| ())
    }

    /// Turn the dirty-page log back off after a failed migration (unless the VM tracks dirty
    /// pages for its snapshots).
    pub(crate) fn stop_dirty_log(&self) {
        if !self.snapshot.config.track_dirty_pages {
            if let Err(e) = crate::memory::register_guest_memory(
                &self.snapshot.vm,
                &self.snapshot.memory,
                false,
            ) {
                tracing::warn!("cannot turn dirty-page logging off again: {e}");
            }
        }
    }

    /// The pages written since the last harvest (see [`crate::dirty::DirtyLog::harvest`]). For a
    /// VM that tracks dirty pages for its snapshots, they also count as written since its
    /// restore, and the next diff snapshot needs a full snapshot first (the log it would be
    /// relative to was consumed).
    pub(crate) fn harvest_dirty(&self) -> Result<Vec<Vec<u64>>, String> {
        let mut tracker = self
            .snapshot
            .dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let pages = self
            .snapshot
            .dirty_log
            .harvest(&self.snapshot.vm, &self.snapshot.memory)
            .map_err(|e| e.to_string())?;
        if tracker.enabled {
            if let Some(acc) = tracker.since_restore.as_mut() {
                for (acc, new) in acc.iter_mut().zip(&pages) {
                    for (a, n) in acc.iter_mut().zip(new) {
                        *a |= n;
                    }
                }
            }
            tracker.base = None;
        }
        Ok(pages)
    }

    /// Park the vCPUs (not the devices) for `held`, then let them run: one auto-converge
    /// slice. Does nothing while the VM is paused.
    pub(crate) fn hold_vcpus(&self, held: Duration) {
        if self.paused.load(Ordering::SeqCst) {
            return;
        }
        self.control.request_pause();
        let kick = || {
            for v in &self.vcpus {
                crate::kick::kick(v.thread);
            }
        };
        let _ = self
            .control
            .wait_parked_timeout(self.vcpus.len(), PAUSE_TIMEOUT, kick);
        std::thread::sleep(held);
        self.control.resume();
    }

    /// Save every parked vCPU's state, each on its own thread (the vCPUs are paused).
    pub(crate) fn save_vcpus(
        &self,
    ) -> Result<Vec<crate::persist::VcpuState>, crate::vm_snapshot::VmSnapshotError> {
        use crate::vm_snapshot::VmSnapshotError::Capture;
        let msrs = Arc::new(snapshot_msrs()?);
        type Saved = BTreeMap<u32, Result<crate::persist::VcpuState, String>>;
        let saved: Arc<Mutex<Saved>> = Arc::default();
        let sink = saved.clone();
        let task: crate::vcpu::ParkedTask = Arc::new(move |id, fd| {
            let state = crate::persist::vcpu_state::save_vcpu(fd, &msrs).map_err(|e| e.to_string());
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, state);
        });
        if !self.control.run_on_parked(task, VCPU_SAVE_TIMEOUT) {
            return Err(Capture("the vCPUs did not save their state in time".into()));
        }
        let mut saved = std::mem::take(&mut *saved.lock().unwrap_or_else(|e| e.into_inner()));
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            match saved.remove(&v.id) {
                Some(Ok(state)) => vcpus.push(state),
                Some(Err(e)) => return Err(Capture(format!("vCPU {}: {e}", v.id))),
                None => return Err(Capture(format!("vCPU {} is not running", v.id))),
            }
        }
        Ok(vcpus)
    }

    /// The parts of this paused instance a snapshot or a migration's final state is read
    /// from.
    pub(crate) fn sources<'a>(
        &'a self,
        vcpus: Vec<crate::persist::VcpuState>,
        capture: crate::vm_snapshot::MemoryCapture,
        config: &'a crate::config::VmConfig,
    ) -> crate::vm_snapshot::SnapshotSources<'a> {
        crate::vm_snapshot::SnapshotSources {
            vm: &self.snapshot.vm,
            memory: &self.snapshot.memory,
            legacy: &self.snapshot.legacy,
            virtio: &self.virtio_devices,
            config,
            vcpus,
            capture,
            vmgenid: self.snapshot.vmgenid,
        }
    }

    /// Save every parked vCPU on its own thread, then write the snapshot (all paused).
    fn write_snapshot(
        &self,
        path: &std::path::Path,
        diff: bool,
    ) -> Result<crate::vm_snapshot::SnapshotSummary, crate::vm_snapshot::VmSnapshotError> {
        use crate::vm_snapshot::{MemoryCapture, VmSnapshotError::Capture};
        let vcpus = self.save_vcpus()?;
        let mut tracker = self
            .snapshot
            .dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let dirty = if tracker.enabled {
            let pages = self
                .snapshot
                .dirty_log
                .harvest(&self.snapshot.vm, &self.snapshot.memory)
                .map_err(|e| Capture(e.to_string()))?;
            if let Some(acc) = tracker.since_restore.as_mut() {
                for (acc, new) in acc.iter_mut().zip(&pages) {
                    for (a, n) in acc.iter_mut().zip(new) {
                        *a |= n;
                    }
                }
            }
            Some(pages)
        } else {
            None
        };
        let capture = match (diff, &self.snapshot.restored_from, dirty) {
            (true, _, Some(dirty)) => MemoryCapture::Diff {
                base: tracker.base.clone().ok_or_else(|| {
                    Capture(
                        "a diff snapshot needs an earlier snapshot of this VM to be a diff to"
                            .into(),
                    )
                })?,
                dirty,
            },
            (false, Some(base), Some(_)) => MemoryCapture::BasePlusDirty {
                base: base.clone(),
                dirty: tracker.since_restore.clone().unwrap_or_default(),
            },
            (false, None, _) => MemoryCapture::Touched,
            _ => return Err(Capture("this VM does not track dirty pages".into())),
        };
        let config = crate::disk_snapshot::current_config(&self.snapshot.config, &self.disks);
        let summary = crate::vm_snapshot::write(path, self.sources(vcpus, capture, &config))?;
        tracker.base = Some(summary.path.clone());
        Ok(summary)
    }
}

/// The MSRs a snapshot saves on this host: probed once per process (the probe builds a
/// scratch VM, ~10 ms) and reused by every later snapshot.
fn snapshot_msrs() -> Result<Vec<u32>, crate::vm_snapshot::VmSnapshotError> {
    static LIST: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    if let Some(list) = LIST.get() {
        return Ok(list.clone());
    }
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| {
        crate::vm_snapshot::VmSnapshotError::Capture(format!("cannot open /dev/kvm: {e}"))
    })?;
    let list = crate::persist::vcpu_state::snapshot_msr_list(&kvm)?;
    Ok(LIST.get_or_init(|| list).clone())
}

fn state_name(paused: bool) -> &'static str {
    if paused {
        "paused"
    } else {
        "running"
    }
}

/// CPU time of thread `tid` in ns: the first field of `/proc/self/task/TID/schedstat`.
fn cpu_ns(tid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

impl VmOps for LiveVm {
    fn pause(&self) -> Result<(), (&'static str, String)> {
        if self.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.control.request_pause();
        let kick = || {
            for v in &self.vcpus {
                crate::kick::kick(v.thread);
            }
        };
        if !self
            .control
            .wait_parked_timeout(self.vcpus.len(), PAUSE_TIMEOUT, kick)
        {
            self.control.resume();
            return Err((
                "timeout",
                format!(
                    "The vCPUs did not stop within {} s; the VM keeps running",
                    PAUSE_TIMEOUT.as_secs()
                ),
            ));
        }
        for (i, dev) in self.virtio_devices.iter().enumerate() {
            if let Err(e) = dev.lock().unwrap_or_else(|e| e.into_inner()).pause() {
                // Undo: the VM keeps running.
                for d in &self.virtio_devices[..i] {
                    let _ = d.lock().unwrap_or_else(|e| e.into_inner()).resume();
                }
                self.control.resume();
                return Err(("device-error", format!("Cannot pause a device: {e}")));
            }
        }
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn resume(&self) -> Result<(), (&'static str, String)> {
        if !self.paused.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let devices = self.resume_devices();
        self.control.resume();
        devices
    }

    fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    fn power_button(&self) -> bool {
        self.acpi_pm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .press_power_button()
    }

    fn reboot(&self) {
        self.shutdown.request(ShutdownKind::Reset);
    }

    fn snapshot(
        &self,
        path: &std::path::Path,
        stay_paused: bool,
        diff: bool,
    ) -> Result<Value, (&'static str, String)> {
        if let Some(base) = &self.snapshot.restored_from {
            if !self.snapshot.config.track_dirty_pages {
                // Pages of the base's memory file the guest has not touched yet are not
                // resident, so a snapshot would silently miss them.
                return Err((
                    "not-supported",
                    format!(
                        "This VM was restored from {} without dirty-page tracking; \
                         snapshotting it again needs the original to run with \
                         --track-dirty-pages. Reboot it (it then boots afresh) or restore the \
                         original snapshot instead",
                        base.display()
                    ),
                ));
            }
        }
        if diff && !self.snapshot.config.track_dirty_pages {
            return Err((
                "not-supported",
                "Diff snapshots need dirty-page tracking: start the VM with \
                 --track-dirty-pages"
                    .to_string(),
            ));
        }
        let was_paused = self.paused();
        self.pause()?;
        let result = self.write_snapshot(path, diff);
        if !was_paused && !stay_paused {
            self.resume()?;
        }
        let summary = result.map_err(|e| ("snapshot-failed", e.to_string()))?;
        Ok(json!({
            "ok": true,
            "state": if was_paused || stay_paused { "paused" } else { "running" },
            "diff": diff,
            "snapshot": summary,
        }))
    }

    fn disk_snapshot(&self, tag: &str) -> Result<Value, (&'static str, String)> {
        crate::disk_snapshot::check_tag(tag).map_err(|m| ("bad-request", m))?;
        let was_paused = self.paused();
        // Parks the vCPUs and lets every block device finish its requests in flight.
        self.pause()?;
        let result = crate::disk_snapshot::take(&self.disks, tag);
        if !was_paused {
            self.resume()?;
        }
        Ok(json!({
            "ok": true,
            "tag": tag,
            "state": state_name(was_paused),
            "disks": result?,
        }))
    }

    fn vcpus(&self) -> Value {
        self.vcpus
            .iter()
            .map(|v| {
                let tid = v.tid.load(Ordering::SeqCst);
                let exits: BTreeMap<&str, u64> = v.counters.snapshot().into_iter().collect();
                json!({
                    "id": v.id,
                    "tid": tid,
                    "cpu_ns": if tid > 0 { cpu_ns(tid) } else { None },
                    "exits": exits,
                })
            })
            .collect()
    }
}

impl Drop for LiveVm {
    /// A VM torn down while paused: let the device workers run again so they can be stopped.
    fn drop(&mut self) {
        if self.paused.load(Ordering::SeqCst) {
            let _ = self.resume_devices();
        }
    }
}

/// What the control socket holds of a running instance: the instance (shared with a migration
/// running on its own thread) and that migration. Dropping it (the instance is torn down)
/// cancels and waits for the migration first.
pub struct LiveHandle {
    vm: Arc<LiveVm>,
    migration: Mutex<Option<crate::migrate::source::SourceJob>>,
    status: crate::migrate::SharedStatus,
}

impl LiveHandle {
    /// The control socket's handle on `vm`; migrations report to `status` (which outlives
    /// the instance, so the run's end can report a completed migration).
    pub fn new(vm: LiveVm, status: crate::migrate::SharedStatus) -> Self {
        Self {
            vm: Arc::new(vm),
            migration: Mutex::new(None),
            status,
        }
    }

    /// Refuse what would interfere with a migration in progress.
    fn not_migrating(&self) -> Result<(), (&'static str, String)> {
        let job = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        match job.as_ref() {
            Some(job) if !job.finished() => Err((
                "busy",
                "A migration is in progress: wait for it (migrate-status) or cancel it \
                 (migrate-cancel)"
                    .to_string(),
            )),
            _ => Ok(()),
        }
    }
}

impl VmOps for LiveHandle {
    fn pause(&self) -> Result<(), (&'static str, String)> {
        self.not_migrating()?;
        self.vm.pause()
    }

    fn resume(&self) -> Result<(), (&'static str, String)> {
        self.not_migrating()?;
        self.vm.resume()
    }

    fn paused(&self) -> bool {
        self.vm.paused()
    }

    fn power_button(&self) -> bool {
        self.vm.power_button()
    }

    fn reboot(&self) {
        self.vm.reboot()
    }

    fn vcpus(&self) -> Value {
        self.vm.vcpus()
    }

    fn snapshot(
        &self,
        path: &std::path::Path,
        stay_paused: bool,
        diff: bool,
    ) -> Result<Value, (&'static str, String)> {
        self.not_migrating()?;
        self.vm.snapshot(path, stay_paused, diff)
    }

    fn disk_snapshot(&self, tag: &str) -> Result<Value, (&'static str, String)> {
        self.not_migrating()?;
        self.vm.disk_snapshot(tag)
    }

    fn migrate(
        &self,
        opts: crate::migrate::MigrateOptions,
    ) -> Result<Value, (&'static str, String)> {
        let endpoint = opts.validate().map_err(|m| ("bad-request", m))?;
        self.not_migrating()?;
        if self.vm.paused() {
            return Err((
                "not-supported",
                "The VM is paused: resume it before migrating it".to_string(),
            ));
        }
        if opts.fd_handover && crate::memory::shared_memory_fds(&self.vm.snapshot.memory).is_none()
        {
            return Err((
                "not-supported",
                "fd_handover needs guest RAM in shared memory files: start the VM with \
                 --memory-shared (a VM restored from a snapshot maps the snapshot file \
                 privately and cannot be handed over)"
                    .to_string(),
            ));
        }
        let job = crate::migrate::source::SourceJob::start(
            self.vm.clone(),
            opts.clone(),
            endpoint,
            self.status.clone(),
        )
        .map_err(|e| ("migrate-failed", format!("Cannot start the migration: {e}")))?;
        *self.migration.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
        Ok(json!({"ok": true, "migration": "started", "to": opts.to}))
    }

    fn migrate_cancel(&self) -> Result<Value, (&'static str, String)> {
        let job = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        match job.as_ref() {
            Some(job) if !job.finished() => {
                job.cancel();
                Ok(json!({"ok": true, "migration": "cancelling"}))
            }
            _ => Err(("bad-request", "No migration is in progress".to_string())),
        }
    }
}

impl Drop for LiveHandle {
    fn drop(&mut self) {
        // Joins the migration thread (cancelling it if it still runs) before the instance
        // goes away.
        drop(
            self.migration
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
    }
}
