//! The common configuration structure (virtio 1.2 §4.1.4.3) and the device-status state
//! machine, plus the PCI-configuration-space access window (VIRTIO_PCI_CAP_PCI_CFG).

use std::sync::atomic::Ordering;

use pci::PciDevice;
use virtio_queue::QueueT;

use super::{lock, VirtioPciDevice, VIRTIO_BAR, VIRTIO_MSI_NO_VECTOR};
use crate::device::{ActivateContext, InterruptKind, VirtioInterrupt};
use crate::features::VIRTIO_F_RING_EVENT_IDX;
use crate::features::VIRTIO_F_VERSION_1;
use crate::{status, Result, VirtioError};

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const COMMON_END: usize = 0x38;

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
    u64::from_le_bytes(b)
}

impl VirtioPciDevice {
    /// The register file as the guest would read it now.
    /// `with_queue`: include the selected queue's registers (locks the queue, which the
    /// worker holds while it serves requests, so only done when those bytes are read).
    fn common_image(&self, with_queue: bool) -> [u8; COMMON_END] {
        let mut img = [0u8; COMMON_END];
        let mut put = |off: u64, bytes: &[u8]| {
            img[off as usize..off as usize + bytes.len()].copy_from_slice(bytes)
        };
        let features = self.device.features();
        let feat_word = match self.device_feature_select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        put(
            DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(DEVICE_FEATURE, &feat_word.to_le_bytes());
        put(
            DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        let drv_word = match self.driver_feature_select {
            0 => self.acked_features as u32,
            1 => (self.acked_features >> 32) as u32,
            _ => 0,
        };
        put(DRIVER_FEATURE, &drv_word.to_le_bytes());
        put(CONFIG_MSIX_VECTOR, &self.vectors.config().to_le_bytes());
        put(NUM_QUEUES, &(self.queues.len() as u16).to_le_bytes());
        put(DEVICE_STATUS, &[self.status()]);
        put(CONFIG_GENERATION, &[self.config_generation]);
        put(QUEUE_SELECT, &self.queue_select.to_le_bytes());
        let selected = self.queues.get(self.queue_select as usize);
        if let (Some(q), true) = (selected, with_queue) {
            let q = lock(q);
            put(QUEUE_SIZE, &q.size().to_le_bytes());
            put(
                QUEUE_MSIX_VECTOR,
                &self.vectors.queue(self.queue_select).to_le_bytes(),
            );
            put(QUEUE_ENABLE, &u16::from(q.ready()).to_le_bytes());
            put(QUEUE_NOTIFY_OFF, &self.queue_select.to_le_bytes());
            put(QUEUE_DESC, &q.desc_table().to_le_bytes());
            put(QUEUE_DRIVER, &q.avail_ring().to_le_bytes());
            put(QUEUE_DEVICE, &q.used_ring().to_le_bytes());
        } else if selected.is_none() {
            put(QUEUE_MSIX_VECTOR, &VIRTIO_MSI_NO_VECTOR.to_le_bytes());
        }
        img
    }

    /// device_status as the guest reads it.
    pub(super) fn status(&self) -> u8 {
        let mut s = self.device_status;
        if self.needs_reset.load(Ordering::Acquire) {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    pub(super) fn common_cfg_read(&self, offset: u64, data: &mut [u8]) {
        let end = offset.saturating_add(data.len() as u64);
        let img = self.common_image(end > QUEUE_SIZE);
        for (i, b) in data.iter_mut().enumerate() {
            *b = img.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    pub(super) fn common_cfg_write(&mut self, offset: u64, data: &[u8]) {
        let v = le(data);
        let configuring = self.device_status & status::DRIVER_OK == 0;
        let num_vectors = lock(&self.msix).num_vectors();
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = v as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = v as u32,
            (DRIVER_FEATURE, 4) => {
                if self.device_status & status::FEATURES_OK != 0 {
                    tracing::debug!("virtio-pci: feature write after FEATURES_OK ignored");
                    return;
                }
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.acked_features =
                    (self.acked_features & !(0xffff_ffffu64 << shift)) | (v << shift);
            }
            (CONFIG_MSIX_VECTOR, 2) => self.vectors.set_config(v as u16, num_vectors),
            (DEVICE_STATUS, 1) => self.write_status(v as u8),
            (QUEUE_SELECT, 2) => self.queue_select = v as u16,
            (QUEUE_MSIX_VECTOR, 2) => {
                self.vectors
                    .set_queue(self.queue_select, v as u16, num_vectors)
            }
            (QUEUE_SIZE | QUEUE_ENABLE | QUEUE_DESC..=0x37, _) if configuring => {
                self.queue_write(offset, data.len(), v)
            }
            _ => tracing::debug!(
                "virtio-pci: ignored common cfg write at {offset:#x} len {}",
                data.len()
            ),
        }
    }

    fn queue_write(&mut self, offset: u64, len: usize, v: u64) {
        let Some(q) = self.queues.get(self.queue_select as usize) else {
            return;
        };
        let mut q = lock(q);
        if q.ready() && offset != QUEUE_ENABLE {
            // The driver must not change a queue after enabling it.
            return;
        }
        let lo = Some(v as u32);
        let hi = Some((v >> 32) as u32);
        match (offset, len) {
            (QUEUE_SIZE, 2) => q.set_size(v as u16),
            // Only 1 may be written; disabling goes through a device reset.
            (QUEUE_ENABLE, 2) if v == 1 => q.set_ready(true),
            (QUEUE_DESC, 8) => q.set_desc_table_address(lo, hi),
            (QUEUE_DESC, 4) => q.set_desc_table_address(lo, None),
            (o, 4) if o == QUEUE_DESC + 4 => q.set_desc_table_address(None, lo),
            (QUEUE_DRIVER, 8) => q.set_avail_ring_address(lo, hi),
            (QUEUE_DRIVER, 4) => q.set_avail_ring_address(lo, None),
            (o, 4) if o == QUEUE_DRIVER + 4 => q.set_avail_ring_address(None, lo),
            (QUEUE_DEVICE, 8) => q.set_used_ring_address(lo, hi),
            (QUEUE_DEVICE, 4) => q.set_used_ring_address(lo, None),
            (o, 4) if o == QUEUE_DEVICE + 4 => q.set_used_ring_address(None, lo),
            _ => {}
        }
    }

    fn write_status(&mut self, mut v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        if old & !v != 0 {
            tracing::warn!("virtio-pci: driver tried to clear status bits ({old:#x} -> {v:#x})");
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set, never the driver's.
        v &= !status::DEVICE_NEEDS_RESET;
        let new = v & !old;
        if new & status::FEATURES_OK != 0 && !self.features_acceptable() {
            tracing::warn!(
                "virtio-pci: refusing features {:#x} (offered {:#x})",
                self.acked_features,
                self.device.features()
            );
            v &= !status::FEATURES_OK;
        }
        if new & status::DRIVER_OK != 0 {
            if v & status::FEATURES_OK == 0 {
                tracing::warn!("virtio-pci: DRIVER_OK without FEATURES_OK ignored");
                v &= !status::DRIVER_OK;
            } else {
                self.device_status = v;
                if let Err(e) = self.activate() {
                    tracing::error!("virtio-pci: activation failed: {e}");
                    self.needs_reset.store(true, Ordering::Release);
                    self.interrupt().trigger(InterruptKind::Config);
                }
                return;
            }
        }
        self.device_status = v;
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        self.acked_features & !offered == 0 && self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    /// Validate the enabled queues against guest memory and start the device.
    pub(super) fn activate(&mut self) -> Result<()> {
        let event_idx = self.acked_features & (1 << VIRTIO_F_RING_EVENT_IDX) != 0;
        for (i, q) in self.queues.iter().enumerate() {
            let mut q = lock(q);
            if !q.ready() {
                continue;
            }
            q.set_event_idx(event_idx);
            if !q.is_valid(&self.mem) {
                return Err(VirtioError::InvalidQueue {
                    index: i,
                    reason: "rings outside guest memory".into(),
                });
            }
        }
        let mut queue_events = Vec::with_capacity(self.queue_events.len());
        for e in &self.queue_events {
            queue_events.push(e.try_clone()?);
        }
        self.needs_reset.store(false, Ordering::Release);
        self.device.activate(ActivateContext {
            mem: self.mem.clone(),
            queues: self.queues.clone(),
            queue_events,
            interrupt: self.interrupt(),
            acked_features: self.acked_features,
            needs_reset: self.needs_reset.clone(),
        })?;
        self.activated = true;
        Ok(())
    }

    /// Device reset (status 0): stop the device, forget queues, features and vectors.
    pub(super) fn reset(&mut self) {
        self.device.reset();
        self.activated = false;
        for q in &self.queues {
            lock(q).reset();
        }
        for e in &self.queue_events {
            let _ = e.read();
        }
        self.vectors.reset();
        self.isr.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
        self.device_status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
    }

    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap_offset;
        let mut b = [0u8; 1];
        self.config.read_bytes(cap + 4, &mut b);
        let mut off = [0u8; 4];
        self.config.read_bytes(cap + 8, &mut off);
        let mut len = [0u8; 4];
        self.config.read_bytes(cap + 12, &mut len);
        let offset = u64::from(u32::from_le_bytes(off));
        let length = u32::from_le_bytes(len) as usize;
        (b[0] as usize == VIRTIO_BAR && matches!(length, 1 | 2 | 4) && offset % length as u64 == 0)
            .then_some((offset, length))
    }

    pub(super) fn pci_cfg_read(&mut self) -> u32 {
        let Some((offset, length)) = self.pci_cfg_window() else {
            return 0;
        };
        let mut buf = [0u8; 4];
        self.read_bar(VIRTIO_BAR, offset, &mut buf[..length]);
        u32::from_le_bytes(buf)
    }

    pub(super) fn pci_cfg_write(&mut self, byte: u64, data: &[u8]) {
        let Some((offset, length)) = self.pci_cfg_window() else {
            return;
        };
        // The driver writes the whole window at once: take the bytes it covers.
        if byte != 0 || data.len() < length {
            return;
        }
        let bytes = data[..length].to_vec();
        self.write_bar(VIRTIO_BAR, offset, &bytes);
    }
}
