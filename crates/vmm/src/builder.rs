//! Assembling a VM from a [`VmConfig`], running it until it stops, and rebuilding it after a
//! guest reset.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arch::cpuid::CpuidConfig;
use arch::e820::MemoryLayout;
use devices::LegacyDevices;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::VmFd;
use pci::PciRoot;
use virtio::VirtioPciDevice;
use vm_device::{Bus, GuestMemoryMmap, IoEventRegistrar, ShutdownKind, ShutdownSignal};

use crate::boot;
use crate::config::{RepairMode, VmConfig};
use crate::console::Console;
use crate::devices::{AttachContext, RunDevices};
use crate::dirty::DirtyLog;
use crate::dump::FailureReport;
use crate::error::VmmError;
use crate::gsi::GsiRouter;
use crate::ioevent::KvmIoEvents;
use crate::memory;
use crate::platform::{self, OpenDisk};
use crate::repair::RepairStats;
use crate::stop::StopHandle;
use crate::vcpu::{RunControl, Vcpu, VcpuContext, VcpuHandle};
use crate::vm::{Hypervisor, PitCreation};
use crate::vm_snapshot::{LoadedSnapshot, SnapshotMemory, VmSnapshotError};
use crate::vmgenid::GenerationId;
use crate::{kick, stats::ExitCounters};

/// How long teardown keeps kicking a vCPU thread before giving up on joining it.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// How a VM run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The guest powered off.
    PowerOff,
    /// The guest reset and `no_reboot` was set.
    Reset,
    /// The host asked the VM to stop ([`StopHandle::request_stop`]).
    Stopped,
    /// The VM failed: triple fault, KVM error, unrepairable emulation failure.
    Failed(Box<FailureReport>),
    /// The guest was migrated to another VMM and runs there (the migration's final status).
    Migrated(Box<crate::migrate::MigrationStatus>),
}

/// The end of a `ferrite run`: the outcome plus statistics.
#[derive(Debug)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Guest resets that were turned into in-process restarts.
    pub reboots: u32,
    /// Exit counters of the last VM instance, per vCPU: (vcpu, [(counter, value)]).
    pub exits: Vec<(u32, Vec<(&'static str, u64)>)>,
    /// Instruction repairs per kind over the whole run.
    pub repairs: Vec<(&'static str, u64)>,
    /// Whether the repair hook was enabled.
    pub repair_enabled: bool,
}

/// Run the VM described by `config` until it powers off, fails, is stopped, or (with
/// `no_reboot`) resets. Guest resets otherwise rebuild the VM in this process.
pub fn run(config: &VmConfig, console: &Console, stop: &StopHandle) -> Result<RunReport, VmmError> {
    run_with(config, None, console, stop)
}

/// Like [`run`], but the first VM instance continues from `restore` (a snapshot of a VM built
/// from `config`) instead of booting; a later guest reset boots it afresh.
pub fn run_with(
    config: &VmConfig,
    restore: Option<crate::vm_snapshot::LoadedSnapshot>,
    console: &Console,
    stop: &StopHandle,
) -> Result<RunReport, VmmError> {
    let mut restore = restore;
    let hv = Hypervisor::open()?;
    config.validate(Some(hv.max_vcpus()))?;
    kick::install_handler().map_err(VmmError::Signal)?;
    let repair_enabled = match config.repair {
        RepairMode::On => true,
        RepairMode::Off => false,
        RepairMode::Auto => Hypervisor::needs_repair(),
    };
    let repairs = repair_enabled.then(|| Arc::new(RepairStats::default()));
    // Disks are opened (and locked) once and shared by every VM instance across reboots.
    let disks = platform::open_disks(config)?;
    // One generation ID per run (kept across guest reboots): a plain restore keeps the
    // snapshot's, a clone and a fresh boot get a new one.
    let generation = match restore
        .as_ref()
        .and_then(|s| (!s.new_identity).then_some(s.vmgenid))
    {
        Some(Some(id)) => id,
        _ => GenerationId::random()?,
    };
    let run_devices = RunDevices::open(config)?;
    // The control socket lives for the whole run (across reboots); dropping it removes PATH.
    let live = crate::control::LiveSlot::default();
    let reboot_count = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let migration = crate::migrate::SharedStatus::default();
    // A restored VM's socket appears only once the VM is live: a request served earlier
    // (a balloon target, say) would be overwritten by the snapshot's device state.
    let mut control = match restore {
        Some(_) => None,
        None => start_control(
            config,
            &disks,
            &run_devices,
            &live,
            &reboot_count,
            &migration,
        )?,
    };
    let mut reboots = 0;
    loop {
        let vm = BuiltVm::build(
            &hv,
            config,
            console,
            &disks,
            &run_devices,
            repairs.clone(),
            Origin {
                restore: restore.take().as_ref(),
                generation,
            },
        )?;
        vm.publish(config, &disks, &run_devices, &live, &migration);
        if control.is_none() && config.api_socket.is_some() {
            match start_control(
                config,
                &disks,
                &run_devices,
                &live,
                &reboot_count,
                &migration,
            ) {
                Ok(started) => control = started,
                Err(e) => {
                    vm.teardown(console, &live);
                    return Err(e);
                }
            }
        }
        let outcome = vm.wait(stop);
        let exits = vm.exit_counters();
        vm.teardown(console, &live);
        let finish = |outcome| RunReport {
            outcome,
            reboots,
            exits: exits.clone(),
            repairs: repairs.as_ref().map(|r| r.snapshot()).unwrap_or_default(),
            repair_enabled,
        };
        match outcome {
            Outcome::Reset if !config.no_reboot && !stop.requested() => {
                reboots += 1;
                reboot_count.store(reboots, std::sync::atomic::Ordering::SeqCst);
                tracing::info!(reboots, "guest reset: rebuilding the VM");
            }
            Outcome::Migrated(_) => {
                let status = migration.lock().unwrap_or_else(|e| e.into_inner()).clone();
                return Ok(finish(Outcome::Migrated(Box::new(status))));
            }
            other => {
                console.flush(Duration::from_secs(1));
                return Ok(finish(other));
            }
        }
    }
}

/// Load a snapshot's device states into freshly attached devices: the legacy devices, then
/// every virtio function, then the BAR mappings their restored configuration spaces name.
/// The virtio functions the driver had started serve their queues again only at
/// [`activate_restored`], after the irqchip restore.
fn restore_devices(
    snap: &LoadedSnapshot,
    legacy: &LegacyDevices,
    virtio_devices: &[Arc<Mutex<VirtioPciDevice>>],
    pci: &PciRoot,
) -> Result<(), VmmError> {
    legacy
        .restore(&snap.legacy)
        .map_err(VmmError::LegacyDevices)?;
    if snap.virtio.len() != virtio_devices.len() {
        return Err(VmSnapshotError::Mismatch(format!(
            "it has {} virtio functions, the configuration gives {}",
            snap.virtio.len(),
            virtio_devices.len()
        ))
        .into());
    }
    for (index, (dev, state)) in virtio_devices.iter().zip(&snap.virtio).enumerate() {
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(state)
            .map_err(|source| VmmError::RestoreDevice { index, source })?;
    }
    pci.sync_mappings();
    Ok(())
}

/// Re-activate the restored virtio functions: last, once the vCPUs and the irqchip hold
/// their saved state, so no completion interrupt is raised into state a restore overwrites.
fn activate_restored(virtio_devices: &[Arc<Mutex<VirtioPciDevice>>]) -> Result<(), VmmError> {
    for (index, dev) in virtio_devices.iter().enumerate() {
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .activate_restored()
            .map_err(|source| VmmError::RestoreDevice { index, source })?;
    }
    Ok(())
}

/// After a restore as a clone: every virtio function whose device configuration space now
/// differs from the saved one (a new MAC, CID) announces the change to its driver.
fn announce_changed_configs(
    virtio_devices: &[Arc<Mutex<VirtioPciDevice>>],
    saved: &[virtio::VirtioPciState],
) {
    for (dev, state) in virtio_devices.iter().zip(saved) {
        let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
        if dev.state().device.config != state.device.config {
            dev.announce_config_change();
        }
    }
}

/// Start `--api-socket` (if given) with the run's rate limiters (`disk0`, `net0.rx`, ...),
/// device counters and balloon.
fn start_control(
    config: &VmConfig,
    disks: &[platform::OpenDisk],
    run_devices: &RunDevices,
    live: &crate::control::LiveSlot,
    reboots: &Arc<std::sync::atomic::AtomicU32>,
    migration: &crate::migrate::SharedStatus,
) -> Result<Option<crate::control::ControlServer>, VmmError> {
    let Some(path) = &config.api_socket else {
        return Ok(None);
    };
    let mut handles = run_devices.control_handles();
    for (i, d) in disks.iter().enumerate() {
        if let Some(l) = &d.limiter {
            handles.limiters.insert(format!("disk{i}"), l.clone());
        }
        handles.stats.insert(
            format!("disk{i}"),
            crate::devices::stats_fn(&d.metrics, |m| m.snapshot()),
        );
    }
    let state = crate::control::ControlState {
        limiters: handles.limiters,
        device_stats: handles.stats,
        balloon: handles.balloon,
        info: serde_json::to_value(config).unwrap_or_default(),
        started: std::time::Instant::now(),
        live: live.clone(),
        reboots: reboots.clone(),
        disks: platform::live_disks(disks),
        migration: migration.clone(),
    };
    crate::control::ControlServer::start(path, state)
        .map(Some)
        .map_err(|e| VmmError::DeviceOpen {
            device: "api-socket".to_string(),
            reason: e.to_string(),
            source: None,
        })
}

/// A KVM VM as [`create_kvm_vm`] makes it.
struct KvmVm {
    vm: Arc<VmFd>,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    dirty: DirtyLog,
}

/// The KVM VM with `mem` registered, its dirty-page tracking (`config.dirty_log`: the ring
/// is turned on before any vCPU exists, as KVM requires), its vCPUs, and its PIT being
/// created.
fn create_kvm_vm(
    hv: &Hypervisor,
    config: &VmConfig,
    mem: &GuestMemoryMmap,
) -> Result<(KvmVm, PitCreation), VmmError> {
    let mut ring_bytes = None;
    let vm = hv.create_vm_without_pit(|vm| {
        memory::register_guest_memory(vm, mem, config.track_dirty_pages)
            .map_err(VmmError::Memory)?;
        ring_bytes = crate::dirty::prepare(vm, config.dirty_log)?;
        Ok::<(), VmmError>(())
    })?;
    let mut fds = Vec::with_capacity(config.vcpus as usize);
    for id in 0..config.vcpus {
        fds.push(
            vm.create_vcpu(u64::from(id))
                .map_err(|e| VmmError::vcpu(id, "KVM_CREATE_VCPU", e))?,
        );
    }
    let dirty = crate::dirty::attach(vm.clone(), ring_bytes, &fds, mem)?;
    let pit = PitCreation::start(vm.clone()).map_err(VmmError::Io)?;
    Ok((
        KvmVm {
            vm,
            vcpus: fds,
            dirty,
        },
        pit,
    ))
}

/// A KVM VM created ahead of time for `mem` (memory registered, dirty-page tracking set up,
/// vCPUs and PIT created): an incoming migration builds it while guest RAM still arrives, so
/// the guest's pause does not pay for it.
pub struct PrebuiltVm {
    kvm: KvmVm,
}

impl PrebuiltVm {
    /// Create the KVM VM for `config` over `mem` (which a restore then uses as guest RAM).
    pub fn create(config: &VmConfig, mem: &GuestMemoryMmap) -> Result<Self, VmmError> {
        let hv = Hypervisor::open()?;
        crate::devices::vsock::validate_incoming(config, Some(hv.max_vcpus()))?;
        let (kvm, pit) = create_kvm_vm(&hv, config, mem)?;
        pit.finish()?;
        Ok(Self { kvm })
    }
}

/// Where a VM instance starts from: a boot, or the snapshot it continues; and the generation
/// ID its guest sees when it boots or is a clone.
struct Origin<'a> {
    restore: Option<&'a LoadedSnapshot>,
    generation: GenerationId,
}

/// One built and running VM instance.
struct BuiltVm {
    _vm: Arc<VmFd>,
    _memory: GuestMemoryMmap,
    _router: Arc<GsiRouter>,
    _devices: Arc<LegacyDevices>,
    _pci: PciRoot,
    virtio_devices: Vec<Arc<Mutex<VirtioPciDevice>>>,
    control: Arc<RunControl>,
    shutdown: ShutdownSignal,
    vcpus: Vec<VcpuHandle>,
    counters: Vec<(u32, Arc<ExitCounters>)>,
    /// The snapshot this instance continues, if it was restored.
    restored_from: Option<std::path::PathBuf>,
    /// The generation ID the guest sees (None: restored from a snapshot without one).
    vmgenid: Option<GenerationId>,
    /// How its dirty pages are read.
    dirty: DirtyLog,
}

impl BuiltVm {
    fn build(
        hv: &Hypervisor,
        config: &VmConfig,
        console: &Console,
        disks: &[OpenDisk],
        run_devices: &RunDevices,
        repairs: Option<Arc<RepairStats>>,
        origin: Origin<'_>,
    ) -> Result<Self, VmmError> {
        let Origin {
            restore,
            generation,
        } = origin;
        let layout = MemoryLayout::new(config.memory_bytes, Some(arch::e820::host_phys_bits()))
            .map_err(VmmError::Layout)?;
        let ranges = layout.ram_ranges();
        let mem = match restore {
            Some(snap) => match &snap.memory {
                SnapshotMemory::File(file) => {
                    let offsets = snap.file_offsets(&ranges)?;
                    memory::create_guest_memory_from_file(&ranges, file, &offsets)?
                }
                SnapshotMemory::Received(mem) => {
                    snap.file_offsets(&ranges)?;
                    mem.clone()
                }
            },
            None if config.memory_shared => memory::create_guest_memory_shared(&ranges)?,
            None => memory::create_guest_memory(&ranges)?,
        };
        tracing::debug!(restore = restore.is_some(), "guest memory mapped");
        let prebuilt = restore
            .and_then(|snap| snap.prebuilt.as_ref())
            .and_then(|p| p.lock().unwrap_or_else(|e| e.into_inner()).take());
        let (
            KvmVm {
                vm,
                vcpus: fds,
                dirty,
            },
            pit,
        ) = match prebuilt {
            Some(p) => (p.kvm, None),
            None => {
                let (kvm, pit) = create_kvm_vm(hv, config, &mem)?;
                (kvm, Some(pit))
            }
        };
        tracing::debug!("VM and vCPUs created");

        // A restored guest's kernel, tables and boot data are already in its memory.
        let kernel = match restore {
            Some(_) => None,
            None => Some(boot::load_guest(config, &layout, &mem)?),
        };
        // A booted guest finds its generation ID next to the ACPI tables; a clone gets a new
        // one (the guest is notified once its state is restored, below).
        let vmgenid = match restore {
            Some(snap) if !snap.new_identity => snap.vmgenid,
            _ => {
                generation.publish(&mem)?;
                Some(generation)
            }
        };

        // Interrupts and devices.
        let router = Arc::new(GsiRouter::new(vm.clone())?);
        let shutdown = ShutdownSignal::new().map_err(VmmError::Io)?;
        let pio = Bus::new();
        let mmio = Bus::new();
        let devices = Arc::new(platform::legacy_devices(
            config, console, &router, &shutdown,
        )?);
        let pci = platform::attach_pci(&pio, &mmio, &layout, &devices)?;
        devices.insert_into(&pio).map_err(VmmError::Bus)?;
        let ioevents: Arc<dyn IoEventRegistrar> = Arc::new(KvmIoEvents::new(vm.clone()));
        let mut virtio_devices = platform::attach_disks(disks, &pci, &mem, &router, &ioevents)?;
        virtio_devices.extend(run_devices.attach_all(&AttachContext {
            pci: &pci,
            mem: &mem,
            router: &router,
            ioevents: &ioevents,
        })?);
        if let Some(snap) = restore {
            restore_devices(snap, &devices, &virtio_devices, &pci)?;
            tracing::debug!("devices restored");
        }

        // vCPUs.
        let control = Arc::new(RunControl::new().map_err(VmmError::Io)?);
        let ctx = Arc::new(VcpuContext {
            pio,
            mmio,
            memory: mem.clone(),
            shutdown: shutdown.clone(),
            control: control.clone(),
            repair: repairs.clone(),
            dirty_ring: dirty.ring().cloned(),
        });
        match restore {
            // The snapshot holds every register, CPUID and MSR the boot set-up would write.
            Some(snap) => {
                for (id, fd) in fds.iter().enumerate() {
                    let state = snap.vcpus.get(id).ok_or_else(|| {
                        VmSnapshotError::Mismatch(format!("no saved state for vCPU {id}"))
                    })?;
                    crate::persist::restore_vcpu(fd, state).map_err(VmSnapshotError::from)?;
                }
            }
            None => {
                let supported = hv
                    .kvm
                    .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .map_err(|e| VmmError::vcpu(0, "KVM_GET_SUPPORTED_CPUID", e))?;
                let cpuid_config = CpuidConfig {
                    vcpu_count: config.vcpus,
                    // `vmcall` hangs vCPUs on emulating hosts whatever the repair mode.
                    hide_pv_hypercalls: repairs.is_some() || Hypervisor::needs_repair(),
                    feature_mask: config.cpu_features.clone(),
                };
                for (id, fd) in (0u32..).zip(&fds) {
                    boot::configure_vcpu(fd, id, &supported, &cpuid_config, kernel.as_ref())?;
                }
            }
        }
        if let Some(pit) = pit {
            pit.finish()?;
        }
        if let Some(snap) = restore {
            // After the vCPUs (their LAPICs), with the clock last, right before they run.
            crate::persist::restore_vm(&vm, &snap.kvm_vm).map_err(VmSnapshotError::from)?;
            // An incoming migration's devices start only once the source committed: a disk
            // request popped earlier could write while the source still owns the disk.
            if snap.start_gate.is_none() {
                activate_restored(&virtio_devices)?;
            }
            tracing::debug!("vCPUs, VM state and devices restored");
            if snap.new_identity {
                // Into the restored irqchip: GPE0 bit 0 runs \_GPE._E00, which notifies VGEN.
                let notified = devices
                    .acpi_pm
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .raise_gpe(arch::acpi::VMGENID_GPE);
                tracing::info!(
                    vmgenid = generation.hex(),
                    notified,
                    "clone: new VM generation ID"
                );
                announce_changed_configs(&virtio_devices, &snap.virtio);
            }
        }
        let mut vcpus = Vec::with_capacity(fds.len());
        let mut counters = Vec::with_capacity(fds.len());
        let mut built = BuiltVm {
            _vm: vm,
            _memory: mem,
            _router: router,
            _devices: devices,
            _pci: pci,
            virtio_devices,
            control,
            shutdown,
            vcpus: Vec::new(),
            counters: Vec::new(),
            restored_from: restore.and_then(|snap| snap.dir.clone()),
            vmgenid,
            dirty,
        };
        // Host input reaches COM1 only now: a byte arriving earlier would raise its interrupt
        // into an irqchip that a restore then overwrites, and the guest would miss it.
        if let Err(e) = console.input().attach(built._devices.serial.clone()) {
            built.teardown(console, &crate::control::LiveSlot::default());
            return Err(VmmError::Io(e));
        }
        // An incoming migration: the guest may run here only once the source committed.
        let gate = restore
            .and_then(|snap| snap.start_gate.as_ref())
            .and_then(|g| g.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(gate) = gate {
            if let Err(reason) = gate.open() {
                built.teardown(console, &crate::control::LiveSlot::default());
                return Err(VmmError::Migration(reason));
            }
            tracing::debug!("migration committed");
            if let Err(e) = activate_restored(&built.virtio_devices) {
                built.teardown(console, &crate::control::LiveSlot::default());
                return Err(e);
            }
        }
        for (id, fd) in fds.into_iter().enumerate() {
            match Vcpu::new(id as u32, fd, ctx.clone()).spawn() {
                Ok(handle) => {
                    counters.push((handle.id, handle.counters.clone()));
                    vcpus.push(handle);
                }
                Err(e) => {
                    built.vcpus = vcpus;
                    built.teardown(console, &crate::control::LiveSlot::default());
                    return Err(VmmError::Io(e));
                }
            }
        }
        built.vcpus = vcpus;
        built.counters = counters;
        tracing::debug!("vCPUs started");
        Ok(built)
    }

    /// Hand the control socket its handle on this instance (pause, power button, ...).
    fn publish(
        &self,
        config: &VmConfig,
        disks: &[OpenDisk],
        run_devices: &RunDevices,
        live: &crate::control::LiveSlot,
        migration: &crate::migrate::SharedStatus,
    ) {
        use std::os::unix::thread::JoinHandleExt;
        let vm = crate::live::LiveVm {
            control: self.control.clone(),
            vcpus: self
                .vcpus
                .iter()
                .map(|h| crate::live::LiveVcpu {
                    id: h.id,
                    thread: h.thread.as_pthread_t(),
                    tid: h.tid.clone(),
                    counters: h.counters.clone(),
                })
                .collect(),
            virtio_devices: self.virtio_devices.clone(),
            acpi_pm: self._devices.acpi_pm.clone(),
            shutdown: self.shutdown.clone(),
            paused: std::sync::atomic::AtomicBool::new(false),
            disks: platform::live_disks(disks),
            vsock_socket: run_devices.vsock.as_ref().map(|v| v.socket_file.clone()),
            taps: run_devices.handover_taps(),
            snapshot: crate::live::SnapshotHandles {
                vm: self._vm.clone(),
                memory: self._memory.clone(),
                legacy: self._devices.clone(),
                config: config.clone(),
                restored_from: self.restored_from.clone(),
                vmgenid: self.vmgenid,
                dirty_log: self.dirty.clone(),
                dirty: Mutex::new(crate::live::DirtyTracker::new(
                    config.track_dirty_pages,
                    self.restored_from.as_deref(),
                    &vm_memory::GuestMemoryBackend::iter(&self._memory)
                        .map(vm_memory::GuestMemoryRegion::len)
                        .collect::<Vec<_>>(),
                )),
            },
        };
        *live.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(
            crate::live::LiveHandle::new(vm, migration.clone()),
        ));
    }

    /// Block until the guest powers off/resets, a vCPU fails, or the host asks to stop.
    fn wait(&self, stop: &StopHandle) -> Outcome {
        let fds = [
            self.shutdown.event().as_raw_fd(),
            self.control.failure_event().as_raw_fd(),
            stop.event().as_raw_fd(),
        ];
        loop {
            if let Some(report) = self.control.take_failure() {
                return Outcome::Failed(Box::new(report));
            }
            match self.shutdown.requested() {
                Some(ShutdownKind::PowerOff) => return Outcome::PowerOff,
                Some(ShutdownKind::Reset) => return Outcome::Reset,
                Some(ShutdownKind::Migrated) => {
                    return Outcome::Migrated(Box::default());
                }
                None => {}
            }
            if stop.requested() {
                return Outcome::Stopped;
            }
            let mut pfds: Vec<libc::pollfd> = fds
                .iter()
                .map(|&fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `pfds` is a valid array of pollfds for the duration of the call.
            unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 1000) };
        }
    }

    fn exit_counters(&self) -> Vec<(u32, Vec<(&'static str, u64)>)> {
        self.counters
            .iter()
            .map(|(id, c)| (*id, c.snapshot()))
            .collect()
    }

    /// Stop every vCPU thread (kicking it out of KVM_RUN) and detach the console.
    /// Empties `live` first (after any control operation in progress, which the exit request
    /// cuts short), so the control socket never touches a stopped instance.
    fn teardown(mut self, console: &Console, live: &crate::control::LiveSlot) {
        console.input().detach();
        self.control.request_exit();
        let handle = live.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Resumes paused device workers so they can be shut down below.
        drop(handle);
        let start = Instant::now();
        for handle in self.vcpus.drain(..) {
            while !handle.thread.is_finished() && start.elapsed() < VCPU_STOP_TIMEOUT {
                handle.kick();
                std::thread::sleep(Duration::from_millis(1));
            }
            if handle.thread.is_finished() {
                let _ = handle.thread.join();
            } else {
                tracing::warn!(vcpu = handle.id, "vCPU thread did not stop; leaving it");
            }
        }
        // Stop device workers so nothing touches guest memory or the disks any more.
        for dev in self.virtio_devices.drain(..) {
            dev.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
        }
    }
}
