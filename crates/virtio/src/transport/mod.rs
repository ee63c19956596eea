//! The virtio-pci modern transport (virtio 1.2 §4.1): a PCI function whose single 64-bit
//! memory BAR holds the common configuration, ISR, device configuration, doorbells and the
//! MSI-X table and PBA.

mod caps;
mod common_cfg;
mod interrupt;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use pci::{
    BarInfo, BarKind, MsixConfig, MsixState, PciConfigParams, PciConfiguration,
    PciConfigurationState, PciDevice, PciError,
};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_device::{GuestMemoryMmap, IoEventRegistrar, MsiRouter};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use caps::*;
use interrupt::{InterruptVectors, PciInterrupt};

use crate::device::{VirtioDevice, VirtioDeviceState};
use crate::queue_state::QueueSnapshot;
use crate::{device_type, status, Result, VirtioError};

/// virtio-pci vendor ID.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem ID used for modern-only devices.
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// "No MSI-X vector" in queue_msix_vector / config_msix_vector.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// Most queues a device may have (limited by the notify window and MSI-X table).
pub const MAX_QUEUES: usize = 255;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serialisable state of the whole function (take it while the device is paused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// PCI configuration space.
    pub pci: PciConfigurationState,
    /// MSI-X table, PBA, enable/mask.
    pub msix: MsixState,
    /// device_status as last written (without DEVICE_NEEDS_RESET).
    pub device_status: u8,
    /// Whether the device asked for a reset.
    pub needs_reset: bool,
    /// device_feature_select.
    pub device_feature_select: u32,
    /// driver_feature_select.
    pub driver_feature_select: u32,
    /// Features the driver wrote.
    pub acked_features: u64,
    /// queue_select.
    pub queue_select: u16,
    /// config_msix_vector.
    pub config_msix_vector: u16,
    /// queue_msix_vector of each queue.
    pub queue_msix_vectors: Vec<u16>,
    /// Each queue's configuration and ring positions.
    pub queues: Vec<QueueSnapshot>,
    /// config_generation.
    pub config_generation: u8,
    /// Pending ISR bits.
    pub isr: u8,
    /// Device-specific state.
    pub device: VirtioDeviceState,
}

/// A virtio device on PCI. Plug it into a [`pci::PciRoot`] with `add_device`.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    msix: Arc<Mutex<MsixConfig>>,
    msix_cap_offset: usize,
    pci_cfg_cap_offset: usize,
    ioevents: Arc<dyn IoEventRegistrar>,
    queue_events: Vec<EventFd>,
    queues: Vec<Arc<Mutex<Queue>>>,
    vectors: Arc<InterruptVectors>,
    isr: Arc<AtomicU8>,
    needs_reset: Arc<AtomicBool>,
    device_status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    acked_features: u64,
    queue_select: u16,
    config_generation: u8,
    /// Where the BAR is mapped (doorbell ioeventfds are registered relative to it).
    bar_base: Option<u64>,
    activated: bool,
    /// The device's own saved state while it is restored from a snapshot and not yet
    /// through [`VirtioPciDevice::activate_restored`].
    restore_pending: Option<VirtioDeviceState>,
}

/// PCI class/subclass for a virtio device type.
fn class_for(device_type: u32) -> (u8, u8) {
    match device_type {
        device_type::BLOCK => (0x01, 0x00),
        device_type::NET => (0x02, 0x00),
        device_type::CONSOLE => (0x07, 0x80),
        _ => (0xff, 0x00),
    }
}

impl VirtioPciDevice {
    /// Wrap `device`: builds configuration space (IDs, capabilities, one 64-bit BAR),
    /// allocates one MSI-X vector per queue plus one for configuration changes, and one
    /// doorbell eventfd per queue (bound to ioeventfds when the BAR is mapped).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        msi_router: Arc<dyn MsiRouter>,
        ioevents: Arc<dyn IoEventRegistrar>,
    ) -> Result<Self> {
        let max_sizes = device.queue_max_sizes().to_vec();
        let num_queues = max_sizes.len();
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(VirtioError::InvalidState("queue count must be 1..=255"));
        }
        let dtype = device.device_type();
        let (class, subclass) = class_for(dtype);
        let device_id = u16::try_from(dtype)
            .ok()
            .and_then(|t| VIRTIO_PCI_DEVICE_ID_BASE.checked_add(t))
            .ok_or(VirtioError::InvalidState("device type out of range"))?;
        let mut config = PciConfiguration::new(PciConfigParams {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id,
            revision_id: 1,
            class,
            subclass,
            prog_if: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
            interrupt_pin: 0,
        });
        config.add_bar(BarInfo {
            index: VIRTIO_BAR,
            size: BAR_SIZE,
            kind: BarKind::Mem64,
            prefetchable: false,
        })?;

        let num_vectors = (num_queues + 1) as u16;
        let msix = MsixConfig::new(num_vectors, msi_router)?;
        let (body, mask) = msix.capability(
            VIRTIO_BAR as u8,
            MSIX_TABLE_OFFSET as u32,
            VIRTIO_BAR as u8,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap_offset = config.add_capability(&body, &mask)?;
        let add = |config: &mut PciConfiguration, (b, m): (Vec<u8>, Vec<u8>)| {
            config.add_capability(&b, &m)
        };
        add(
            &mut config,
            virtio_cap(
                VIRTIO_PCI_CAP_COMMON_CFG,
                COMMON_CFG_OFFSET as u32,
                COMMON_CFG_SIZE as u32,
                &[],
            ),
        )?;
        add(&mut config, notify_cap(num_queues))?;
        add(
            &mut config,
            virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET as u32, 1, &[]),
        )?;
        add(
            &mut config,
            virtio_cap(
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CFG_OFFSET as u32,
                DEVICE_CFG_SIZE as u32,
                &[],
            ),
        )?;
        let pci_cfg_cap_offset = add(&mut config, pci_cfg_cap())?;

        let mut queues = Vec::with_capacity(num_queues);
        let mut queue_events = Vec::with_capacity(num_queues);
        for (i, &max) in max_sizes.iter().enumerate() {
            let q = Queue::new(max).map_err(|e| VirtioError::InvalidQueue {
                index: i,
                reason: e.to_string(),
            })?;
            queues.push(Arc::new(Mutex::new(q)));
            queue_events.push(EventFd::new(EFD_NONBLOCK)?);
        }
        Ok(Self {
            config,
            device,
            mem,
            msix: Arc::new(Mutex::new(msix)),
            msix_cap_offset,
            pci_cfg_cap_offset,
            ioevents,
            queue_events,
            queues,
            vectors: Arc::new(InterruptVectors::new(num_queues)),
            isr: Arc::new(AtomicU8::new(0)),
            needs_reset: Arc::new(AtomicBool::new(false)),
            device_status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            acked_features: 0,
            queue_select: 0,
            config_generation: 0,
            bar_base: None,
            activated: false,
            restore_pending: None,
        })
    }

    /// Where the BAR is mapped now, if memory decode is on.
    pub fn bar_base(&self) -> Option<u64> {
        self.bar_base
    }

    /// The doorbell (notify) address of queue `index` in the current BAR mapping.
    pub fn notify_addr(&self, index: u16) -> Option<u64> {
        let base = self.bar_base?;
        ((index as usize) < self.queues.len())
            .then(|| base + NOTIFY_OFFSET + u64::from(index) * u64::from(NOTIFY_OFF_MULTIPLIER))
    }

    /// Whether the driver set DRIVER_OK and the device is serving its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Pause the device's worker (in-flight requests finish first). For snapshots.
    pub fn pause(&mut self) -> Result<()> {
        if self.activated {
            self.device.pause()?;
        }
        Ok(())
    }

    /// Resume after [`VirtioPciDevice::pause`].
    pub fn resume(&mut self) -> Result<()> {
        if self.activated {
            self.device.resume()?;
        }
        Ok(())
    }

    /// Machine reset (VM reboot without rebuilding devices): virtio reset plus MSI-X back to
    /// power-on state (disabled, all vectors masked). BAR placement is kept.
    pub fn platform_reset(&mut self) {
        self.reset();
        lock(&self.msix).reset();
        let reg = self.msix_cap_offset / 4;
        let ctl_bits = 0xc000_0000u32;
        let v = self.config.read_reg(reg) & !ctl_bits;
        self.config.set_reg(reg, v);
    }

    /// Stop the worker thread for good and unregister the doorbells (VM shutdown).
    pub fn shutdown(&mut self) {
        self.device.reset();
        self.activated = false;
        if let Some(base) = self.bar_base.take() {
            self.unregister_doorbells(base);
        }
    }

    fn register_doorbells(&self, base: u64) -> std::result::Result<(), vm_device::InterruptError> {
        for (i, evt) in self.queue_events.iter().enumerate() {
            let addr = base + NOTIFY_OFFSET + (i as u64) * u64::from(NOTIFY_OFF_MULTIPLIER);
            if let Err(e) = self.ioevents.register_mmio(evt, addr, None) {
                // Roll back so no doorbell is left registered at an address we forget.
                for (j, evt) in self.queue_events.iter().enumerate().take(i) {
                    let addr = base + NOTIFY_OFFSET + (j as u64) * u64::from(NOTIFY_OFF_MULTIPLIER);
                    let _ = self.ioevents.unregister_mmio(evt, addr, None);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn unregister_doorbells(&self, base: u64) {
        for (i, evt) in self.queue_events.iter().enumerate() {
            let addr = base + NOTIFY_OFFSET + (i as u64) * u64::from(NOTIFY_OFF_MULTIPLIER);
            if let Err(e) = self.ioevents.unregister_mmio(evt, addr, None) {
                tracing::warn!("virtio-pci: cannot unregister doorbell at {addr:#x}: {e}");
            }
        }
    }

    fn interrupt(&self) -> Arc<PciInterrupt> {
        Arc::new(PciInterrupt {
            msix: self.msix.clone(),
            vectors: self.vectors.clone(),
            isr: self.isr.clone(),
        })
    }

    /// Serialisable state. Pause first so queue positions are stable.
    pub fn state(&self) -> VirtioPciState {
        VirtioPciState {
            pci: self.config.state(),
            msix: lock(&self.msix).state(),
            device_status: self.device_status,
            needs_reset: self.needs_reset.load(Ordering::Acquire),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            config_msix_vector: self.vectors.config(),
            queue_msix_vectors: (0..self.queues.len())
                .map(|q| self.vectors.queue(q as u16))
                .collect(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot::from(lock(q).state()))
                .collect(),
            config_generation: self.config_generation,
            isr: self.isr.load(Ordering::Acquire),
            device: self.device.state(),
        }
    }

    /// Tell the driver that the device configuration space changed under it (a snapshot
    /// restored as a clone reads a new MAC or CID): bumps `config_generation` and, if the
    /// driver is running, raises the configuration-change interrupt.
    pub fn announce_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.device_status & status::DRIVER_OK != 0 {
            use crate::device::{InterruptKind, VirtioInterrupt};
            self.interrupt().trigger(InterruptKind::Config);
        }
    }

    /// Load a snapshot into a freshly created (never activated) device of the same kind. The
    /// BAR mapping is taken from the restored configuration space: call
    /// `PciRoot::sync_mappings` afterwards. The device starts serving its queues only at
    /// [`VirtioPciDevice::activate_restored`], once the vCPUs and the irqchip are restored:
    /// an interrupt raised earlier would land in a LAPIC the restore then overwrites.
    pub fn restore(&mut self, state: &VirtioPciState) -> Result<()> {
        let bad = |m: &str| VirtioError::InvalidSnapshot(m.to_string());
        if self.activated {
            return Err(VirtioError::InvalidState("restore into an active device"));
        }
        if state.device.device_type != self.device.device_type()
            || state.queues.len() != self.queues.len()
            || state.queue_msix_vectors.len() != self.queues.len()
        {
            return Err(bad("device type or queue count differs"));
        }
        if state.acked_features & !self.device.features() != 0 {
            return Err(bad("acked features not offered by this device"));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (snap, max)) in state
            .queues
            .iter()
            .zip(self.device.queue_max_sizes())
            .enumerate()
        {
            if snap.max_size != *max {
                return Err(bad("queue max size differs"));
            }
            queues.push(snap.to_queue().map_err(|e| VirtioError::InvalidQueue {
                index: i,
                reason: e.to_string(),
            })?);
        }
        let config = PciConfiguration::from_state(state.pci.clone())?;
        if config.bars() != self.config.bars() {
            return Err(bad("BAR layout differs"));
        }
        lock(&self.msix).restore(&state.msix)?;
        self.config = config;
        for (slot, q) in self.queues.iter().zip(queues) {
            *lock(slot) = q;
        }
        let num_vectors = lock(&self.msix).num_vectors();
        self.vectors
            .set_config(state.config_msix_vector, num_vectors);
        for (i, v) in state.queue_msix_vectors.iter().enumerate() {
            self.vectors.set_queue(i as u16, *v, num_vectors);
        }
        self.device_feature_select = state.device_feature_select;
        self.driver_feature_select = state.driver_feature_select;
        self.acked_features = state.acked_features;
        self.queue_select = state.queue_select;
        self.config_generation = state.config_generation;
        self.isr.store(state.isr, Ordering::Release);
        self.needs_reset.store(state.needs_reset, Ordering::Release);
        self.device_status = state.device_status;
        self.restore_pending = Some(state.device.clone());
        Ok(())
    }

    /// Second half of [`VirtioPciDevice::restore`]: tell the device it was restored, and
    /// re-activate it if the snapshot was taken with DRIVER_OK set. Does nothing for a
    /// device that was not restored.
    pub fn activate_restored(&mut self) -> Result<()> {
        let Some(device_state) = self.restore_pending.take() else {
            return Ok(());
        };
        self.device.restored(&device_state)?;
        if self.device_status & status::DRIVER_OK != 0 && !self.needs_reset.load(Ordering::Acquire)
        {
            self.activate()?;
        }
        Ok(())
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg == (self.pci_cfg_cap_offset + 16) / 4 {
            return self.pci_cfg_read();
        }
        self.config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        if reg == (self.pci_cfg_cap_offset + 16) / 4 {
            self.pci_cfg_write(offset, data);
            return;
        }
        self.config.write_reg(reg, offset, data);
        if reg == self.msix_cap_offset / 4 {
            let ctl = (self.config.read_reg(reg) >> 16) as u16;
            lock(&self.msix).set_message_control(ctl);
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != VIRTIO_BAR || data.len() > 8 {
            return;
        }
        match offset {
            o if o < COMMON_CFG_OFFSET + 0x1000 => self.common_cfg_read(o, data),
            // Reading the ISR acknowledges it.
            ISR_CFG_OFFSET => {
                if let Some(b) = data.first_mut() {
                    *b = self.isr.swap(0, Ordering::AcqRel);
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + MSIX_TABLE_SIZE).contains(&o) => {
                lock(&self.msix).read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + MSIX_PBA_SIZE).contains(&o) => {
                lock(&self.msix).read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != VIRTIO_BAR || data.len() > 8 {
            return;
        }
        match offset {
            o if o < COMMON_CFG_OFFSET + 0x1000 => self.common_cfg_write(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_SIZE).contains(&o) => {
                // Fallback for doorbells that were not caught by an ioeventfd.
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                if let Some(evt) = self.queue_events.get(q) {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!("virtio-pci: doorbell for queue {q} failed: {e}");
                    }
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + MSIX_TABLE_SIZE).contains(&o) => {
                lock(&self.msix).write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_moved(
        &mut self,
        bar: usize,
        old: Option<u64>,
        new: Option<u64>,
    ) -> std::result::Result<(), PciError> {
        if bar != VIRTIO_BAR {
            return Ok(());
        }
        if let Some(o) = old {
            self.unregister_doorbells(o);
        }
        self.bar_base = None;
        if let Some(n) = new {
            self.register_doorbells(n).map_err(PciError::Interrupt)?;
            self.bar_base = Some(n);
        }
        Ok(())
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests;
