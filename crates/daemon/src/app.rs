//! The daemon's shared state: the store, the per-VM runtime slots, the event bus and the
//! host's capacity.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use api::{ApiError, Event, LastExit, VmInfo, VmSpec, VmState};
use serde_json::Value;
use store::Store;
use tokio::sync::{broadcast, Notify};

use crate::args::DaemonArgs;
use crate::error::{internal, store_error};
use crate::paths::VmPaths;
use crate::procfs;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why the daemon is ending a VM's process (so its exit is not taken for a crash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopIntent {
    /// Graceful stop (power button, then forced).
    Stop,
    /// Immediate kill.
    Kill,
}

/// What the daemon knows about a VM's current run.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Lifecycle state.
    pub state: VmState,
    /// The VMM process.
    pub pid: Option<u32>,
    /// Its start time (pid-reuse guard).
    pub start_ticks: Option<u64>,
    /// When the run started.
    pub started_ms: Option<u64>,
    /// How the previous run ended.
    pub last_exit: Option<LastExit>,
    /// Crash restarts since the last user start.
    pub crash_restarts: u32,
    /// Set when the daemon itself is ending the process.
    pub stop_intent: Option<StopIntent>,
    /// Increases with every run, so a late exit report of an old run is ignored.
    pub generation: u64,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            state: VmState::Stopped,
            pid: None,
            start_ticks: None,
            started_ms: None,
            last_exit: None,
            crash_restarts: 0,
            stop_intent: None,
            generation: 0,
        }
    }
}

/// One VM: its definition, runtime, and the lock that serialises lifecycle operations on it.
pub struct VmSlot {
    /// Name.
    pub name: String,
    /// Held for the whole of start/stop/kill/delete/update so they never interleave.
    pub op_lock: Arc<tokio::sync::Mutex<()>>,
    /// Definition (mirror of the store).
    pub spec: Mutex<VmSpec>,
    /// Runtime (mirror of the store).
    pub runtime: Mutex<Runtime>,
    /// Notified whenever the runtime changes.
    pub changed: Notify,
    /// File locations.
    pub paths: VmPaths,
}

impl VmSlot {
    /// Copy of the definition.
    pub fn spec(&self) -> VmSpec {
        lock(&self.spec).clone()
    }

    /// Copy of the runtime.
    pub fn runtime(&self) -> Runtime {
        lock(&self.runtime).clone()
    }

    /// Change the runtime in place and wake waiters.
    pub fn update_runtime<R>(&self, f: impl FnOnce(&mut Runtime) -> R) -> R {
        let r = f(&mut lock(&self.runtime));
        self.changed.notify_waiters();
        r
    }

    /// Replace the definition.
    pub fn set_spec(&self, spec: VmSpec) {
        *lock(&self.spec) = spec;
    }

    /// The API view.
    pub fn info(&self) -> VmInfo {
        let rt = self.runtime();
        VmInfo {
            spec: self.spec(),
            state: rt.state,
            pid: rt.pid.filter(|_| rt.state.is_active()),
            started_at_ms: rt.started_ms.filter(|_| rt.state.is_active()),
            last_exit: rt.last_exit,
            crash_restarts: rt.crash_restarts,
        }
    }

    /// Wait until `done(runtime)` holds or `timeout` passes; returns whether it held.
    pub async fn wait_for(
        &self,
        timeout: std::time::Duration,
        done: impl Fn(&Runtime) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if done(&lock(&self.runtime)) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return done(&lock(&self.runtime));
            }
        }
    }
}

/// Host capacity for admission control.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// Online host CPUs.
    pub cpus: u32,
    /// Host RAM in MiB.
    pub memory_mib: u64,
}

/// The daemon.
pub struct Daemon {
    /// Command-line settings.
    pub args: DaemonArgs,
    /// Persistent state.
    pub store: Store,
    /// Per-VM cgroups (None with --no-cgroups).
    pub cgroups: Option<cgroups::CgroupManager>,
    /// Lifecycle events for `/v1/events`.
    pub events: broadcast::Sender<Event>,
    /// Host capacity.
    pub capacity: Capacity,
    /// The VMM binary.
    pub vmm_binary: PathBuf,
    /// The current or last outgoing live migration of each VM, by VM name (kept after the
    /// VM left, until the daemon restarts or the name migrates again).
    pub migrations: Mutex<BTreeMap<String, crate::migration::Outgoing>>,
    vms: Mutex<BTreeMap<String, Arc<VmSlot>>>,
}

impl Daemon {
    /// A daemon over `store` with no VMs loaded yet.
    pub fn new(
        args: DaemonArgs,
        store: Store,
        cgroups: Option<cgroups::CgroupManager>,
        capacity: Capacity,
    ) -> Self {
        let (events, _) = broadcast::channel(1024);
        Daemon {
            vmm_binary: args.vmm_binary(),
            args,
            store,
            cgroups,
            events,
            capacity,
            migrations: Mutex::new(BTreeMap::new()),
            vms: Mutex::new(BTreeMap::new()),
        }
    }

    /// The slot of VM `name`.
    pub fn slot(&self, name: &str) -> Result<Arc<VmSlot>, ApiError> {
        lock(&self.vms)
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::no_vm(name))
    }

    /// Every slot, by name.
    pub fn slots(&self) -> Vec<Arc<VmSlot>> {
        lock(&self.vms).values().cloned().collect()
    }

    /// Register a slot for a VM the store holds.
    pub fn insert_slot(&self, spec: VmSpec, runtime: Runtime) -> Arc<VmSlot> {
        let paths = VmPaths::new(&self.args.run_dir, &self.args.state_dir, &spec.name);
        let slot = Arc::new(VmSlot {
            name: spec.name.clone(),
            op_lock: Arc::new(tokio::sync::Mutex::new(())),
            spec: Mutex::new(spec),
            runtime: Mutex::new(runtime),
            changed: Notify::new(),
            paths,
        });
        lock(&self.vms).insert(slot.name.clone(), slot.clone());
        slot
    }

    /// Forget a slot (after the store deleted the VM).
    pub fn remove_slot(&self, name: &str) {
        lock(&self.vms).remove(name);
    }

    /// Forget a VM that no longer belongs to this daemon (it migrated away, or an incoming
    /// migration failed): its definition with its snapshot records, its slot, its run
    /// directory, snapshot and (unless `keep_disks`: a VM that migrated away takes its disks,
    /// on storage both hosts see, with it) disk directories. Its console and VMM logs stay.
    /// Does nothing to a newer VM of the same name.
    pub fn forget_vm(&self, slot: &Arc<VmSlot>, keep_disks: bool) {
        {
            let mut vms = lock(&self.vms);
            match vms.get(&slot.name) {
                Some(now) if Arc::ptr_eq(now, slot) => {
                    vms.remove(&slot.name);
                }
                _ => return,
            }
        }
        match self.store.delete_vm(&slot.name) {
            Ok(()) | Err(store::StoreError::NotFound(_)) => {}
            Err(e) => tracing::error!(vm = %slot.name, "cannot delete the definition: {e}"),
        }
        let _ = std::fs::remove_dir_all(&slot.paths.dir);
        crate::snapshots::remove_dir(&slot.paths.snapshots);
        if !keep_disks {
            crate::snapshots::remove_dir(&slot.paths.disks);
        }
    }

    /// The last outgoing migration of VM `name`.
    pub fn migration_of(&self, name: &str) -> Option<api::MigrationInfo> {
        lock(&self.migrations).get(name).map(|m| m.info.clone())
    }

    /// Record an event in the store and publish it.
    pub fn event(&self, vm: &str, kind: &str, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::info!(vm, kind, detail = %detail, "event");
        match self.store.add_event(vm, kind, &detail) {
            Ok(ev) => {
                let _ = self.events.send(Event {
                    id: ev.id as u64,
                    at_ms: ev.at_ms as u64,
                    vm: vm.to_string(),
                    kind: kind.to_string(),
                    detail,
                });
            }
            Err(e) => tracing::error!("cannot record event: {e}"),
        }
    }

    /// Save a slot's runtime to the store.
    pub fn persist_runtime(&self, slot: &VmSlot) -> Result<(), ApiError> {
        let rt = slot.runtime();
        let record = store::Runtime {
            state: rt.state.as_str().to_string(),
            pid: rt.pid,
            pid_start_ticks: rt.start_ticks,
            run_dir: slot.paths.dir.display().to_string(),
            started_ms: rt.started_ms,
            last_exit: rt
                .last_exit
                .as_ref()
                .and_then(|e| serde_json::to_value(e).ok()),
            crash_restarts: rt.crash_restarts,
        };
        self.store
            .set_runtime(&slot.name, &record)
            .map_err(store_error)
    }

    /// Save a slot's definition to the store.
    pub fn persist_spec(&self, slot: &VmSlot) -> Result<(), ApiError> {
        let spec = serde_json::to_value(slot.spec()).map_err(internal)?;
        self.store
            .update_spec(&slot.name, &spec)
            .map_err(store_error)
    }

    /// vCPUs and guest MiB of active VMs other than `except`.
    pub fn allocated(&self, except: Option<&str>) -> (u32, u64) {
        self.slots()
            .iter()
            .filter(|s| Some(s.name.as_str()) != except && s.runtime().state.is_active())
            .fold((0, 0), |(c, m), s| {
                let spec = s.spec();
                (c + spec.vcpus, m + spec.memory_mib)
            })
    }

    /// The `/v1/host` view.
    pub fn host_info(&self) -> api::HostInfo {
        let (vcpus, mem) = self.allocated(None);
        let slots = self.slots();
        api::HostInfo {
            cpus: self.capacity.cpus,
            memory_mib: self.capacity.memory_mib,
            cpu_overcommit: self.args.cpu_overcommit,
            memory_overcommit: self.args.memory_overcommit,
            allocated_vcpus: vcpus,
            allocated_memory_mib: mem,
            vms: slots.len() as u32,
            active_vms: slots
                .iter()
                .filter(|s| s.runtime().state.is_active())
                .count() as u32,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// Turn a stored record back into API types.
pub fn from_record(rec: &store::VmRecord) -> Result<(VmSpec, Runtime), String> {
    let spec: VmSpec = serde_json::from_value(rec.spec.clone())
        .map_err(|e| format!("stored definition of {:?} is unreadable: {e}", rec.name))?;
    let rt = &rec.runtime;
    let state = serde_json::from_value(Value::String(rt.state.clone())).unwrap_or(VmState::Stopped);
    Ok((
        spec,
        Runtime {
            state,
            pid: rt.pid,
            start_ticks: rt.pid_start_ticks,
            started_ms: rt.started_ms,
            last_exit: rt
                .last_exit
                .clone()
                .and_then(|v| serde_json::from_value(v).ok()),
            crash_restarts: rt.crash_restarts,
            stop_intent: None,
            generation: 0,
        },
    ))
}

/// Milliseconds since the epoch (re-exported for the modules that stamp times).
pub fn now_ms() -> u64 {
    procfs::now_ms()
}
