//! virtio 1.2 for Ferrite: the device-side [`VirtioDevice`] contract, the virtio-pci modern
//! transport ([`VirtioPciDevice`]) and the devices themselves ([`Block`]).
//!
//! Devices process their queues on worker threads of their own (never on vCPU threads): the
//! guest's doorbell writes reach them through ioeventfds, and they interrupt the guest through
//! the MSI-X vector's irqfd.
//!
//! Wiring (in the VMM):
//!
//! ```ignore
//! let root = pci::PciRoot::new(mmio_bus.clone());
//! let block = virtio::Block::new(disk::RawDisk::open(path, read_only)?, serial.as_deref())?;
//! let metrics = block.metrics();
//! let dev = Arc::new(Mutex::new(virtio::VirtioPciDevice::new(
//!     Box::new(block), mem.clone(), msi_router.clone(), ioevents.clone())?));
//! root.add_device(dev.clone())?;
//! pio_bus.insert(Arc::new(Mutex::new(pci::PciConfigIo::new(root.clone()))), 0xcf8, 8)?;
//! mmio_bus.insert(Arc::new(Mutex::new(pci::PciConfigMmio::new(root.clone()))),
//!     PCI_ECAM_START, PCI_ECAM_SIZE)?;
//! // Snapshot: dev.lock().pause()?; dev.lock().state(); dev.lock().resume()?;
//! // Exit:     dev.lock().shutdown();
//! ```

#![warn(missing_docs)]

pub mod balloon;
pub mod block;
pub mod console;
mod device;
pub mod net;
mod queue_state;
pub mod rng;
pub mod transport;
pub mod vsock;
mod worker;

pub use balloon::{Balloon, BalloonMetrics, BalloonMetricsSnapshot, BalloonOptions, BalloonShared};
pub use block::{Block, BlockMetrics, BlockMetricsSnapshot};
pub use console::{Console, ConsoleBackend, ConsoleMetrics, ConsoleMetricsSnapshot, ConsoleSize};
pub use device::{
    ActivateContext, InterruptKind, VirtioDevice, VirtioDeviceState, VirtioInterrupt,
};
pub use net::{Net, NetBackend, NetMetrics, NetMetricsSnapshot};
pub use queue_state::QueueSnapshot;
pub use rng::{Rng, RngMetrics, RngMetricsSnapshot};
pub use transport::{VirtioPciDevice, VirtioPciState};
pub use vsock::{Vsock, VsockMetrics, VsockMetricsSnapshot, VsockState};
pub use worker::{EventControl, EventSet, QueueHandler, Worker};

/// virtio device type IDs (virtio 1.2 §5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Memory balloon.
    pub const BALLOON: u32 = 5;
    /// Socket device (virtio-vsock).
    pub const VSOCK: u32 = 19;
}

/// Feature bits common to all devices (virtio 1.2 §6).
pub mod features {
    /// Indirect descriptor tables.
    pub const VIRTIO_F_RING_INDIRECT_DESC: u32 = 28;
    /// used_event / avail_event notification suppression.
    pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
    /// Compliance with virtio 1.0+ (mandatory for the modern transport).
    pub const VIRTIO_F_VERSION_1: u32 = 32;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: queues may be used.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Errors of the virtio layer.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// A queue's configuration or rings are unusable.
    #[error("Invalid queue {index}: {reason}")]
    InvalidQueue {
        /// Queue index.
        index: usize,
        /// Why.
        reason: String,
    },
    /// Creating an eventfd, epoll set or thread failed.
    #[error("Device plumbing failed: {0}")]
    Io(#[from] std::io::Error),
    /// The worker thread is gone.
    #[error("Device worker thread died")]
    WorkerGone,
    /// Registering an ioeventfd or MSI route failed.
    #[error("Interrupt setup failed: {0}")]
    Interrupt(#[from] vm_device::InterruptError),
    /// PCI setup failed.
    #[error("PCI setup failed: {0}")]
    Pci(#[from] pci::PciError),
    /// The disk backend failed.
    #[error("Disk error: {0}")]
    Disk(#[from] disk::DiskError),
    /// An operation not valid in the device's current state.
    #[error("Invalid device state: {0}")]
    InvalidState(&'static str),
    /// A snapshot that does not fit this device.
    #[error("Invalid snapshot: {0}")]
    InvalidSnapshot(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, VirtioError>;
