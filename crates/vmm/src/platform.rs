//! The devices of a Ferrite VM: legacy PC devices, PCI bus 0 with its configuration-space
//! decoders, and one virtio-blk function per disk.

use std::sync::{Arc, Mutex};

use arch::e820::MemoryLayout;
use arch::layout::{irqs, ports, PCI_ECAM_SIZE, PCI_ECAM_START};
use devices::{LegacyDevices, LegacyIrqs};
use pci::{PciConfigIo, PciConfigMmio, PciRoot};
use virtio::{Block, VirtioPciDevice};
use vm_device::{Bus, GuestMemoryMmap, IoEventRegistrar, SharedDevice, ShutdownSignal};

use crate::config::VmConfig;
use crate::console::Console;
use crate::error::VmmError;
use crate::gsi::GsiRouter;

/// Build the legacy devices (COM1 to the console, i8042, CMOS, ACPI PM, reset register) with
/// their interrupt lines.
pub fn legacy_devices(
    config: &VmConfig,
    console: &Console,
    router: &GsiRouter,
    shutdown: &ShutdownSignal,
) -> Result<LegacyDevices, VmmError> {
    let legacy_irqs = LegacyIrqs {
        keyboard: router.legacy_irq(irqs::KEYBOARD)?,
        com1: router.legacy_irq(irqs::COM1)?,
        acpi_sci: router.legacy_irq(irqs::ACPI_SCI)?,
    };
    let devices = LegacyDevices::new(
        config.memory_bytes,
        console.uart_output(),
        legacy_irqs,
        shutdown.clone(),
    )
    .map_err(VmmError::LegacyDevices)?;
    devices
        .attach_rtc_irq(router.legacy_irq(irqs::RTC)?)
        .map_err(VmmError::LegacyDevices)?;
    Ok(devices)
}

/// One virtio-blk PCI function per disk, plugged into `pci`.
pub fn attach_disks(
    disks: &[OpenDisk],
    pci: &PciRoot,
    mem: &GuestMemoryMmap,
    router: &Arc<GsiRouter>,
    ioevents: &Arc<dyn IoEventRegistrar>,
) -> Result<Vec<Arc<Mutex<VirtioPciDevice>>>, VmmError> {
    let mut virtio_devices = Vec::with_capacity(disks.len());
    for disk in disks {
        let block = Block::with_backend(disk.backend.clone(), disk.id.as_deref())
            .map(|b| {
                let b = b.with_metrics(disk.metrics.clone());
                match &disk.limiter {
                    Some(l) => b.with_rate_limiter(l.clone()),
                    None => b,
                }
            })
            .map_err(|source| VmmError::Disk {
                path: disk.path.clone(),
                source,
            })?;
        let dev = VirtioPciDevice::new(
            Box::new(block),
            mem.clone(),
            router.clone(),
            ioevents.clone(),
        )
        .map_err(|source| VmmError::DiskDevice {
            path: disk.path.clone(),
            source,
        })?;
        let dev = Arc::new(Mutex::new(dev));
        pci.add_device(dev.clone()).map_err(VmmError::Pci)?;
        virtio_devices.push(dev);
    }
    Ok(virtio_devices)
}

/// A disk opened and locked for the whole run.
pub struct OpenDisk {
    /// Image path (for messages).
    pub path: std::path::PathBuf,
    /// virtio-blk serial.
    pub id: Option<String>,
    /// The opened, locked image (switched to a new overlay by a live disk snapshot).
    pub backend: Arc<disk::SwappableDisk>,
    /// Attached read-only.
    pub readonly: bool,
    /// The disk's I/O limiter (shared with the block device's worker and the control
    /// socket); always `Some` today (unlimited unless `bw=`/`iops=` given).
    pub limiter: Option<rate_limiter::SharedRateLimiter>,
    /// The disk's counters, kept for the whole run (across reboots) for the control socket.
    pub metrics: Arc<virtio::block::BlockMetrics>,
}

/// Open and lock every disk of `config` (once per run; VM rebuilds share them).
pub fn open_disks(config: &VmConfig) -> Result<Vec<OpenDisk>, VmmError> {
    config
        .disks
        .iter()
        .map(|d| {
            // Probing (format: None) follows the qcow2 magic; see disk::open_image for why
            // guest-writable raw disks should say format=raw.
            let to_vmm = |e| match e {
                disk::DiskError::Locked { path } => VmmError::DiskLocked { path },
                other => VmmError::DiskOpen(other),
            };
            let format = match d.format {
                Some(f) => f,
                None => disk::probe_format(&d.path).map_err(to_vmm)?,
            };
            let backend = disk::open_image(&d.path, d.readonly, Some(format)).map_err(to_vmm)?;
            let backend = Arc::new(disk::SwappableDisk::new(disk::CurrentImage {
                backend,
                path: d.path.clone(),
                format,
            }));
            // Always present (unlimited by default) so the control socket can limit it later.
            let limiter = Some(rate_limiter::SharedRateLimiter::new(&d.rate_limit).map_err(
                |e| VmmError::DeviceOpen {
                    device: d.path.display().to_string(),
                    reason: "cannot create the rate limiter's timerfd".to_string(),
                    source: Some(e),
                },
            )?);
            Ok(OpenDisk {
                path: d.path.clone(),
                id: d.id.clone(),
                backend,
                readonly: d.readonly,
                limiter,
                metrics: Arc::default(),
            })
        })
        .collect()
}

/// The disks as the control socket's disk snapshot and chain operations see them.
pub fn live_disks(disks: &[OpenDisk]) -> Vec<crate::disk_snapshot::LiveDisk> {
    disks
        .iter()
        .map(|d| crate::disk_snapshot::LiveDisk {
            disk: d.backend.clone(),
            readonly: d.readonly,
        })
        .collect()
}

/// Create PCI bus 0 with its CF8/CFC (forwarding 0xcf9 to the ACPI reset register) and ECAM
/// decoders.
pub fn attach_pci(
    pio: &Bus,
    mmio: &Bus,
    layout: &MemoryLayout,
    devices: &LegacyDevices,
) -> Result<PciRoot, VmmError> {
    let root = PciRoot::new(mmio.clone());
    root.add_mmio_window(layout.pci_mmio64_start(), layout.pci_mmio64_size());
    let reset: SharedDevice = devices.acpi_reset.clone();
    let cf8 = PciConfigIo::new(root.clone()).with_port_cf9(reset);
    pio.insert(
        Arc::new(Mutex::new(cf8)),
        u64::from(ports::PCI_CONFIG_ADDRESS),
        8,
    )
    .map_err(VmmError::Bus)?;
    mmio.insert(
        Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
        PCI_ECAM_START,
        PCI_ECAM_SIZE,
    )
    .map_err(VmmError::Bus)?;
    Ok(root)
}
