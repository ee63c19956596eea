//! MSI-X interrupt delivery for virtio-pci: maps "queue N" / "config" to the vector the driver
//! chose and fires it through the function's MSI-X model.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use pci::MsixConfig;

use super::VIRTIO_MSI_NO_VECTOR;
use crate::device::{InterruptKind, VirtioInterrupt};

/// ISR bit: a queue has used buffers.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: the configuration changed.
pub const ISR_CONFIG: u8 = 2;

/// The vectors the driver assigned (read by worker threads, written by vCPUs).
pub struct InterruptVectors {
    config: AtomicU16,
    queues: Vec<AtomicU16>,
}

impl InterruptVectors {
    /// All vectors unassigned.
    pub fn new(num_queues: usize) -> Self {
        Self {
            config: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queues: (0..num_queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
        }
    }

    /// config_msix_vector.
    pub fn config(&self) -> u16 {
        self.config.load(Ordering::Acquire)
    }

    /// queue_msix_vector of queue `q` (NO_VECTOR for a nonexistent queue).
    pub fn queue(&self, q: u16) -> u16 {
        self.queues
            .get(q as usize)
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    fn checked(v: u16, num_vectors: u16) -> u16 {
        if v < num_vectors {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// Store config_msix_vector; an invalid vector is stored as NO_VECTOR (the driver reads
    /// that back to learn the assignment failed).
    pub fn set_config(&self, v: u16, num_vectors: u16) {
        self.config
            .store(Self::checked(v, num_vectors), Ordering::Release);
    }

    /// Store queue_msix_vector of queue `q` (same validation).
    pub fn set_queue(&self, q: u16, v: u16, num_vectors: u16) {
        if let Some(slot) = self.queues.get(q as usize) {
            slot.store(Self::checked(v, num_vectors), Ordering::Release);
        }
    }

    /// Back to NO_VECTOR everywhere (device reset).
    pub fn reset(&self) {
        self.config.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for q in &self.queues {
            q.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
    }
}

/// The [`VirtioInterrupt`] handed to devices on activation.
pub struct PciInterrupt {
    /// The function's MSI-X model.
    pub msix: Arc<Mutex<MsixConfig>>,
    /// Driver-assigned vectors.
    pub vectors: Arc<InterruptVectors>,
    /// ISR status byte.
    pub isr: Arc<AtomicU8>,
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: InterruptKind) {
        let (bit, vector) = match kind {
            InterruptKind::Config => (ISR_CONFIG, self.vectors.config()),
            InterruptKind::Queue(q) => (ISR_QUEUE, self.vectors.queue(q)),
        };
        self.isr.fetch_or(bit, Ordering::AcqRel);
        if vector != VIRTIO_MSI_NO_VECTOR {
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .trigger(vector);
        }
    }
}
