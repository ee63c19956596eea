//! The contract between a virtio device model and its transport.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vm_device::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::worker::Worker;
use crate::Result;

/// Which interrupt a device raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device configuration changed (or the device needs a reset).
    Config,
    /// Queue `n` has new used buffers.
    Queue(u16),
}

/// How a device interrupts the guest; implemented by the transport (MSI-X for PCI).
pub trait VirtioInterrupt: Send + Sync {
    /// Raise the interrupt (subject to MSI-X masking; masked vectors become pending).
    fn trigger(&self, kind: InterruptKind);
}

/// Everything a device needs to start processing its queues after DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory (every access is bounds-checked by vm-memory).
    pub mem: GuestMemoryMmap,
    /// The queues, shared with the transport so it can snapshot their positions.
    pub queues: Vec<Arc<Mutex<Queue>>>,
    /// One doorbell eventfd per queue (bound to ioeventfds by the transport).
    pub queue_events: Vec<EventFd>,
    /// Interrupt sink.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Set by the device when the driver broke a queue; the transport then reports
    /// DEVICE_NEEDS_RESET.
    pub needs_reset: Arc<AtomicBool>,
}

/// Device-specific state that is not in the transport (serialisable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// virtio device type.
    pub device_type: u32,
    /// Features offered.
    pub avail_features: u64,
    /// Raw device configuration space.
    pub config: Vec<u8>,
    /// Host-side state a device needs back after a restore (absent in snapshots of
    /// devices that keep none, and in snapshots written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specific: Option<DeviceSpecificState>,
}

/// Device-kind state beyond the configuration space, by device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceSpecificState {
    /// virtio-balloon: target, actual and the statistics buffer the device holds.
    Balloon(crate::balloon::BalloonState),
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// virtio device type ([`crate::device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Guest read of device configuration space at `offset` (out-of-range bytes read 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Guest write of device configuration space (read-only fields ignore writes).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start serving the queues (spawns the worker thread).
    fn activate(&mut self, ctx: ActivateContext) -> Result<()>;
    /// Stop serving the queues and return to the pre-activation state. Joins the worker.
    fn reset(&mut self);
    /// The worker thread serving the queues while the device is active; the default
    /// [`VirtioDevice::pause`] and [`VirtioDevice::resume`] act on it.
    fn worker(&self) -> Option<&Worker> {
        None
    }
    /// Stop processing (in-flight requests complete first) so state can be saved.
    fn pause(&mut self) -> Result<()> {
        self.worker().map_or(Ok(()), Worker::pause)
    }
    /// Continue after [`VirtioDevice::pause`].
    fn resume(&mut self) -> Result<()> {
        if let Some(w) = self.worker() {
            w.resume();
        }
        Ok(())
    }
    /// Device-specific serialisable state.
    fn state(&self) -> VirtioDeviceState;
    /// The transport has just loaded a snapshot's state into this (not yet active) device:
    /// take back the device's own part of it (`state`, as [`VirtioDevice::state`] saved it)
    /// and drop or announce what a snapshot cannot carry (host sockets, in-flight bytes).
    fn restored(&mut self, state: &VirtioDeviceState) -> Result<()> {
        let _ = state;
        Ok(())
    }
}
