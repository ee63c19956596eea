//! VM lifecycle: starting a VM's own `ferrite run` process in its cgroup, watching it, stopping
//! it gracefully or by force, re-adopting it after a daemon restart, and restarting it after a
//! crash when asked to.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use api::{ApiError, ErrorCode, LastExit, VmState};
use serde_json::{json, Value};

use crate::app::{now_ms, Daemon, Runtime, StopIntent, VmSlot};
use crate::error::{conflict, internal};
use crate::{procfs, spec, vmm_link};

/// How long a new VMM gets to open its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// After a graceful stop's timeout: SIGTERM, then this long before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// Default wait for the guest to power off after the power button.
pub const DEFAULT_STOP_TIMEOUT_S: u64 = 30;

/// Exit as the VMM reported it in its status file.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct StatusFile {
    pub outcome: String,
    #[serde(default)]
    pub detail: String,
    /// With `migrated`: the migration's final status (`migrate-status`'s `migration`).
    #[serde(default)]
    pub migration: Option<Value>,
}

/// What an exit means for the VM.
enum Fate {
    /// An earlier run's late report: nothing to do.
    Stale,
    /// An ordinary end: the VM stays defined in `state`.
    Ended {
        state: VmState,
        outcome: String,
        detail: String,
        restart: bool,
    },
    /// Its guest was migrated away and runs on the destination: forget it here.
    Migrated(String),
    /// An incoming migration ended before its guest ran here: drop the reservation.
    IncomingFailed(String),
}

fn read_status(slot: &VmSlot) -> Option<StatusFile> {
    let text = std::fs::read_to_string(&slot.paths.status).ok()?;
    serde_json::from_str(&text).ok()
}

pub(crate) fn last_stderr_line(slot: &VmSlot) -> String {
    std::fs::read_to_string(&slot.paths.vmm_log)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "no output".to_string())
}

/// The snapshot a start continues (`ferrite run --restore`).
#[derive(Debug, Clone, Copy)]
pub struct RestoreFrom<'a> {
    /// The snapshot directory.
    pub dir: &'a Path,
    /// For a clone's first start: its identity file (`--clone-identity`).
    pub clone_identity: Option<&'a Path>,
}

/// How a VM's VMM process is started.
#[derive(Debug, Clone, Copy)]
pub enum Launch<'a> {
    /// A fresh boot of the definition (`--config`).
    Boot,
    /// Continue a snapshot (`--restore`).
    Restore(RestoreFrom<'a>),
    /// Receive a live migration on `endpoint` (`--incoming tcp:HOST:PORT`), with `tls` only
    /// over mutual TLS (`--incoming-tls-cert`, `-key`, `-ca`).
    Incoming {
        /// `tcp:HOST:PORT`.
        endpoint: &'a str,
        /// This daemon's certificate, key and cluster CA.
        tls: Option<&'a crate::args::TlsIdentity>,
        /// Block migration: create the received disks here (`--incoming-disk-dir`).
        disk_dir: Option<&'a std::path::Path>,
    },
}

impl Daemon {
    /// Start VM `slot` (caller holds its op lock): a fresh boot of its definition, or, with
    /// `restore`, the snapshot in that directory (`ferrite run --restore`). Returns once the
    /// VMM answers on its control socket.
    pub async fn start_locked(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        user: bool,
        restore: Option<RestoreFrom<'_>>,
    ) -> Result<(), ApiError> {
        let rt = slot.runtime();
        if rt.state.is_active() {
            return Err(conflict(format!(
                "VM {:?} is already {}",
                slot.name,
                rt.state.as_str()
            )));
        }
        let launch = match restore {
            None => Launch::Boot,
            Some(from) => Launch::Restore(from),
        };
        let (pid, generation) = self.spawn_vmm(slot, user, launch)?;

        // Wait for the control socket.
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let rt = slot.runtime();
            if rt.generation != generation || !rt.state.is_active() {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    format!(
                        "VM {:?} failed to start: {}",
                        slot.name,
                        last_stderr_line(slot)
                    ),
                ));
            }
            if vmm_link::call(&slot.paths.control, &json!({"op": "info"}))
                .await
                .is_ok()
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = procfs::kill(pid, libc::SIGKILL);
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    format!(
                        "VM {:?} did not open its control socket within 30 s",
                        slot.name
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let became_running = slot.update_runtime(|rt| {
            if rt.generation == generation && rt.state == VmState::Starting {
                rt.state = VmState::Running;
                true
            } else {
                false
            }
        });
        if became_running {
            self.persist_runtime(slot)?;
            self.event(&slot.name, "running", format!("pid {pid}"));
        }
        Ok(())
    }

    /// Prepare VM `slot`'s files and cgroup and run its VMM as `launch` says (caller holds
    /// its op lock and checked its state); a task reports the process's exit to
    /// [`Daemon::on_exit`]. Returns (pid, the run's generation) with the runtime set to
    /// `starting` (or `incoming`).
    pub(crate) fn spawn_vmm(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        user: bool,
        launch: Launch<'_>,
    ) -> Result<(u32, u64), ApiError> {
        let spec = slot.spec();
        // A restored VM's configuration comes from its snapshot.
        let config = match launch {
            Launch::Boot => Some(spec::to_vm_config(&spec, &slot.paths.control)?),
            Launch::Restore(_) | Launch::Incoming { .. } => None,
        };
        self.check_capacity(&slot.name, spec.vcpus, spec.memory_mib)?;

        std::fs::create_dir_all(&slot.paths.dir).map_err(internal)?;
        if let Some(logs) = slot.paths.console_log.parent() {
            std::fs::create_dir_all(logs).map_err(internal)?;
        }
        for stale in [&slot.paths.status, &slot.paths.control, &slot.paths.console] {
            let _ = std::fs::remove_file(stale);
        }
        if let Some(config) = &config {
            let config_json = serde_json::to_vec_pretty(config).map_err(internal)?;
            std::fs::write(&slot.paths.config, config_json).map_err(internal)?;
        }

        let cgroup = match &self.cgroups {
            Some(mgr) => {
                let cg = mgr.create(&slot.name).map_err(internal)?;
                crate::resources::apply(&cg, &spec.resources, spec.memory_mib)?;
                Some(cg)
            }
            None => {
                crate::resources::refuse_without_cgroups(&spec.resources)?;
                None
            }
        };

        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&slot.paths.vmm_log)
            .map_err(internal)?;
        let log2 = log.try_clone().map_err(internal)?;
        let mut cmd = Command::new(&self.vmm_binary);
        cmd.arg("run");
        match launch {
            Launch::Boot => cmd.arg("--config").arg(&slot.paths.config),
            Launch::Incoming {
                endpoint,
                tls,
                disk_dir,
            } => {
                cmd.arg("--incoming")
                    .arg(endpoint)
                    .arg("--api-socket")
                    .arg(&slot.paths.control);
                if let Some(tls) = tls {
                    cmd.arg("--incoming-tls-cert")
                        .arg(&tls.cert)
                        .arg("--incoming-tls-key")
                        .arg(&tls.key)
                        .arg("--incoming-tls-ca")
                        .arg(&tls.ca);
                }
                if let Some(dir) = disk_dir {
                    cmd.arg("--incoming-disk-dir").arg(dir);
                }
                &mut cmd
            }
            Launch::Restore(from) => {
                cmd.arg("--restore")
                    .arg(from.dir)
                    .arg("--api-socket")
                    .arg(&slot.paths.control);
                if let Some(identity) = from.clone_identity {
                    cmd.arg("--clone-identity").arg(identity);
                }
                &mut cmd
            }
        };
        cmd.arg("--console")
            .arg(format!(
                "socket:{},log={}",
                slot.paths.console.display(),
                slot.paths.console_log.display()
            ))
            .arg("--status-file")
            .arg(&slot.paths.status)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .env("FERRITE_VM_NAME", &slot.name);
        // SAFETY: setsid is async-signal-safe; the VMM gets its own session so that neither a
        // terminal nor the daemon's death signals it.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("Cannot run the VMM {}: {e}", self.vmm_binary.display()),
            )
        })?;
        let pid = child.id();
        if let Some(cg) = &cgroup {
            if let Err(e) = cg.add_process(pid) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(internal(e));
            }
        }
        let incoming = matches!(launch, Launch::Incoming { .. });
        let generation = slot.update_runtime(|rt| {
            rt.state = if incoming {
                VmState::Incoming
            } else {
                VmState::Starting
            };
            rt.pid = Some(pid);
            rt.start_ticks = procfs::start_ticks(pid);
            rt.started_ms = Some(now_ms());
            rt.stop_intent = None;
            if user {
                rt.crash_restarts = 0;
            }
            rt.generation += 1;
            rt.generation
        });
        self.persist_runtime(slot)?;
        match launch {
            Launch::Incoming { endpoint, tls, .. } => self.event(
                &slot.name,
                "incoming",
                format!(
                    "pid {pid}, waiting for the source on {endpoint}{}",
                    if tls.is_some() { " (TLS only)" } else { "" }
                ),
            ),
            _ => self.event(&slot.name, "starting", format!("pid {pid}")),
        }

        // Reap the child on a blocking thread and report its exit.
        let daemon = self.clone();
        let watched = slot.clone();
        tokio::spawn(async move {
            let status = tokio::task::spawn_blocking(move || child.wait()).await;
            let signal = match status {
                Ok(Ok(s)) => std::os::unix::process::ExitStatusExt::signal(&s),
                _ => None,
            };
            daemon.on_exit(&watched, generation, signal).await;
        });

        Ok((pid, generation))
    }

    /// Refuse a start that would take the host past its overcommit limits.
    pub(crate) fn check_capacity(
        &self,
        name: &str,
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<(), ApiError> {
        let (used_cpus, used_mem) = self.allocated(Some(name));
        let cpu_cap = (f64::from(self.capacity.cpus) * self.args.cpu_overcommit).floor() as u64;
        let usable_mem = self
            .capacity
            .memory_mib
            .saturating_sub(self.args.reserved_memory_mib);
        let mem_cap = (usable_mem as f64 * self.args.memory_overcommit).floor() as u64;
        let mut short = Vec::new();
        if u64::from(used_cpus) + u64::from(vcpus) > cpu_cap {
            short.push(format!(
                "vCPUs: it needs {vcpus}, {} of {cpu_cap} are free ({} host CPUs x overcommit {})",
                cpu_cap.saturating_sub(u64::from(used_cpus)),
                self.capacity.cpus,
                self.args.cpu_overcommit
            ));
        }
        if used_mem + memory_mib > mem_cap {
            short.push(format!(
                "memory: it needs {memory_mib} MiB, {} MiB of {mem_cap} MiB are free ({} MiB host RAM - {} MiB reserved, x overcommit {})",
                mem_cap.saturating_sub(used_mem),
                self.capacity.memory_mib,
                self.args.reserved_memory_mib,
                self.args.memory_overcommit
            ));
        }
        if short.is_empty() {
            return Ok(());
        }
        Err(ApiError::new(
            ErrorCode::InsufficientCapacity,
            format!(
                "Not enough host capacity to start {name:?}: {}. Stop another VM, shrink this one, or raise the daemon's overcommit ratio",
                short.join("; ")
            ),
        ))
    }

    /// The VMM of run `generation` exited (killed by `signal` if known).
    pub async fn on_exit(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        generation: u64,
        signal: Option<i32>,
    ) {
        let status = read_status(slot);
        // Why an incoming migration ended, when its VMM left no status.
        let vmm_said = (slot.runtime().state == VmState::Incoming).then(|| last_stderr_line(slot));
        let fate = slot.update_runtime(|rt| {
            if rt.generation != generation {
                return Fate::Stale;
            }
            let incoming = rt.state == VmState::Incoming;
            let migrated = status.as_ref().is_some_and(|s| s.outcome == "migrated");
            let (state, outcome, detail) = match (rt.stop_intent, &status) {
                _ if incoming => (
                    VmState::Stopped,
                    "error".to_string(),
                    match &status {
                        Some(s) if !s.detail.is_empty() => s.detail.clone(),
                        _ => vmm_said.clone().unwrap_or_default(),
                    },
                ),
                (_, Some(s)) if migrated => (VmState::Stopped, s.outcome.clone(), s.detail.clone()),
                (Some(StopIntent::Kill), _) => {
                    (VmState::Stopped, "killed".to_string(), String::new())
                }
                (_, Some(s)) if s.outcome == "failed" || s.outcome == "error" => {
                    (VmState::Crashed, s.outcome.clone(), s.detail.clone())
                }
                (_, Some(s)) => (VmState::Stopped, s.outcome.clone(), s.detail.clone()),
                (Some(StopIntent::Stop), None) => (
                    VmState::Stopped,
                    "killed".to_string(),
                    "forced after the stop timeout".to_string(),
                ),
                (None, None) => (
                    VmState::Crashed,
                    "crashed".to_string(),
                    match signal {
                        Some(sig) => format!("the VMM process died from signal {sig}"),
                        None => "the VMM process died without reporting an exit".to_string(),
                    },
                ),
            };
            rt.state = state;
            rt.pid = None;
            rt.start_ticks = None;
            rt.last_exit = Some(LastExit {
                outcome: outcome.clone(),
                detail: detail.clone(),
                at_ms: now_ms(),
            });
            let restart = state == VmState::Crashed && rt.stop_intent.is_none();
            rt.stop_intent = None;
            if incoming {
                Fate::IncomingFailed(detail)
            } else if migrated {
                Fate::Migrated(detail)
            } else {
                Fate::Ended {
                    state,
                    outcome,
                    detail,
                    restart,
                }
            }
        });
        if matches!(fate, Fate::Stale) {
            return;
        }
        if let Some(mgr) = &self.cgroups {
            if let Some(cg) = mgr.open(&slot.name) {
                let _ = cg.remove_when_empty(std::time::Duration::from_secs(2));
            }
        }
        let (state, outcome, detail, restart) = match fate {
            Fate::Stale => return,
            Fate::Migrated(detail) => {
                let final_status = status.and_then(|s| s.migration);
                self.finish_outgoing_migration(slot, final_status, &detail);
                return;
            }
            Fate::IncomingFailed(detail) => {
                self.drop_incoming(slot, &detail);
                return;
            }
            Fate::Ended {
                state,
                outcome,
                detail,
                restart,
            } => (state, outcome, detail, restart),
        };
        let _ = self.persist_runtime(slot);
        let text = if detail.is_empty() {
            outcome
        } else {
            format!("{outcome}: {detail}")
        };
        self.event(&slot.name, state.as_str(), text);
        if restart && slot.spec().restart_on_crash {
            self.schedule_restart(slot.clone());
        }
        self.outgoing_vmm_exited(slot);
    }

    fn schedule_restart(self: &Arc<Self>, slot: Arc<VmSlot>) {
        let daemon = self.clone();
        tokio::spawn(async move {
            let n = slot.update_runtime(|rt| {
                rt.crash_restarts += 1;
                rt.crash_restarts
            });
            let backoff = (daemon.args.restart_backoff_s.max(1) << (n - 1).min(6)).min(60);
            tokio::time::sleep(Duration::from_secs(backoff)).await;
            let _guard = slot.op_lock.lock().await;
            if slot.runtime().state != VmState::Crashed {
                return;
            }
            match daemon.start_locked(&slot, false, None).await {
                Ok(()) => daemon.event(&slot.name, "restarted", format!("after crash {n}")),
                Err(e) => daemon.event(&slot.name, "restart-failed", e.message),
            }
        });
    }

    /// Graceful stop: ACPI power button, wait up to `timeout`, then SIGTERM and SIGKILL.
    pub async fn stop_locked(&self, slot: &Arc<VmSlot>, timeout: Duration) -> Result<(), ApiError> {
        let rt = slot.runtime();
        if !rt.state.is_active() {
            return Err(conflict(format!("VM {:?} is not running", slot.name)));
        }
        let Some(pid) = rt.pid else {
            return Err(conflict(format!("VM {:?} has no process", slot.name)));
        };
        slot.update_runtime(|rt| {
            rt.stop_intent = Some(StopIntent::Stop);
            rt.state = VmState::Stopping;
        });
        self.event(
            &slot.name,
            "stopping",
            format!("power button, timeout {} s", timeout.as_secs()),
        );
        let _ = self.persist_runtime(slot);
        let gone = |rt: &Runtime| !rt.state.is_active();
        if !timeout.is_zero() {
            if rt.state == VmState::Paused {
                let _ = vmm_link::call(&slot.paths.control, &json!({"op": "resume"})).await;
            }
            let _ = vmm_link::call(&slot.paths.control, &json!({"op": "power-button"})).await;
            if slot.wait_for(timeout, gone).await {
                return Ok(());
            }
        }
        let _ = procfs::kill(pid, libc::SIGTERM);
        if slot.wait_for(TERM_GRACE, gone).await {
            return Ok(());
        }
        slot.update_runtime(|rt| rt.stop_intent = Some(StopIntent::Kill));
        let _ = procfs::kill(pid, libc::SIGKILL);
        if slot.wait_for(Duration::from_secs(10), gone).await {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::Internal,
                format!("VM {:?} (pid {pid}) did not exit after SIGKILL", slot.name),
            ))
        }
    }

    /// Immediate SIGKILL.
    pub async fn kill_locked(&self, slot: &Arc<VmSlot>) -> Result<(), ApiError> {
        let rt = slot.runtime();
        let (true, Some(pid)) = (rt.state.is_active(), rt.pid) else {
            return Err(conflict(format!("VM {:?} is not running", slot.name)));
        };
        slot.update_runtime(|rt| rt.stop_intent = Some(StopIntent::Kill));
        let _ = procfs::kill(pid, libc::SIGKILL);
        if slot
            .wait_for(Duration::from_secs(10), |rt| !rt.state.is_active())
            .await
        {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::Internal,
                format!("VM {:?} (pid {pid}) did not exit after SIGKILL", slot.name),
            ))
        }
    }

    /// Pause or resume the vCPUs.
    pub async fn pause_resume_locked(
        &self,
        slot: &Arc<VmSlot>,
        pause: bool,
    ) -> Result<(), ApiError> {
        let state = slot.runtime().state;
        let (from, to, op, kind) = if pause {
            (VmState::Running, VmState::Paused, "pause", "paused")
        } else {
            (VmState::Paused, VmState::Running, "resume", "resumed")
        };
        if state != from {
            return Err(conflict(format!(
                "VM {:?} is {}: only a {} VM can be {kind}",
                slot.name,
                state.as_str(),
                from.as_str()
            )));
        }
        vmm_link::call(&slot.paths.control, &json!({ "op": op })).await?;
        slot.update_runtime(|rt| rt.state = to);
        let _ = self.persist_runtime(slot);
        self.event(&slot.name, kind, "");
        Ok(())
    }

    /// Reset the guest (the VMM rebuilds it in the same process).
    pub async fn reboot_locked(&self, slot: &Arc<VmSlot>) -> Result<(), ApiError> {
        let state = slot.runtime().state;
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(conflict(format!(
                "VM {:?} is {}: only a running VM can be rebooted",
                slot.name,
                state.as_str()
            )));
        }
        vmm_link::call(&slot.paths.control, &json!({"op": "reboot"})).await?;
        slot.update_runtime(|rt| rt.state = VmState::Running);
        let _ = self.persist_runtime(slot);
        self.event(&slot.name, "rebooted", "");
        Ok(())
    }

    /// After a daemon restart: take back a VM whose VMM still runs, or record how it ended.
    pub async fn adopt(self: &Arc<Self>, slot: &Arc<VmSlot>) {
        let rt = slot.runtime();
        if !rt.state.is_active() {
            return;
        }
        let alive = match (rt.pid, rt.start_ticks) {
            (Some(pid), Some(ticks)) => procfs::is_same_process(pid, ticks),
            _ => false,
        };
        let answer = if alive {
            vmm_link::call(&slot.paths.control, &json!({"op": "stats"}))
                .await
                .ok()
        } else {
            None
        };
        if let (true, Some(pid), None, VmState::Incoming) = (alive, rt.pid, &answer, rt.state) {
            // Still waiting for (or receiving) its migration.
            self.adopt_incoming(slot, pid);
            return;
        }
        let (Some(pid), Some(stats)) = (rt.pid, answer) else {
            // The VMM is gone (or is not ours any more): record its end.
            let generation = slot.update_runtime(|rt| {
                rt.generation += 1;
                rt.generation
            });
            self.on_exit(slot, generation, None).await;
            return;
        };
        let pidfd = match procfs::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(vm = %slot.name, "cannot watch pid {pid}: {e}");
                return;
            }
        };
        let state = match stats.get("state").and_then(Value::as_str) {
            Some("paused") => VmState::Paused,
            _ => VmState::Running,
        };
        let generation = slot.update_runtime(|rt| {
            rt.state = state;
            rt.generation += 1;
            rt.generation
        });
        let _ = self.persist_runtime(slot);
        self.event(&slot.name, "adopted", format!("pid {pid}"));
        let daemon = self.clone();
        let watched = slot.clone();
        tokio::spawn(async move {
            let _ = procfs::wait_pidfd(pidfd).await;
            daemon.on_exit(&watched, generation, None).await;
        });
    }
}
