//! virtio-vsock (virtio 1.2 §5.10) with host AF_UNIX sockets, as Firecracker's hybrid vsock:
//!
//! - host → guest: a host client connects to the VM's socket `PATH` and writes
//!   `CONNECT <port>\n`; the device sends the guest a REQUEST for that port and, on the guest's
//!   RESPONSE, answers the client `OK <host_port>\n` (the ephemeral host port it assigned,
//!   from 2^30 up). A refused (RST) or unanswered request closes the client's socket.
//! - guest → host: a guest connection to CID 2, port P is connected to `PATH_P`; if nothing
//!   listens there the guest gets a RST.
//!
//! Data flows with the credit-based flow control of the spec; SHUTDOWN half-closes.
//!
//! Snapshots: the device state ([`VsockState`]) describes each connection's protocol view
//! ([`ConnectionInfo`]), but host sockets and bytes in flight cannot be saved. On restore the
//! connections are gone: the transport's restore calls [`VirtioDevice::restored`], which
//! requests a transport reset, and on activation the guest receives
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET and drops its sockets (as on Firecracker).

mod chain;
pub mod connection;
mod handler;
pub mod hostsock;
mod metrics;
pub mod packet;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use connection::{ConnKey, ConnState, ConnectionInfo, BUF_ALLOC};
pub use handler::MAX_CONNECTIONS;
pub use metrics::{VsockMetrics, VsockMetricsSnapshot};

use crate::device::{ActivateContext, VirtioDevice, VirtioDeviceState};
use crate::features::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};
use crate::worker::Worker;
use crate::{device_type, Result, VirtioError};
use handler::{HostSide, SharedHandler, VsockHandler};

/// Size of each of the three queues (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;
/// Lowest CID a guest may have (0-2 are reserved: hypervisor, local, host).
pub const MIN_GUEST_CID: u64 = 3;
/// CIDs from here up are reserved (VMADDR_CID_ANY = u32::MAX; Linux CIDs are 32-bit).
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Serialisable device state: the CID and each connection's protocol view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID.
    pub guest_cid: u64,
    /// Open connections (informational: they are reset on restore).
    pub connections: Vec<ConnectionInfo>,
}

/// A virtio-vsock device bridged to host AF_UNIX sockets.
pub struct Vsock {
    guest_cid: u64,
    listener: Arc<UnixListener>,
    path: PathBuf,
    avail_features: u64,
    queue_sizes: [u16; 3],
    metrics: Arc<VsockMetrics>,
    reset_requested: Arc<AtomicBool>,
    handler: Option<Arc<Mutex<VsockHandler>>>,
    kick: Option<EventFd>,
    worker: Option<Worker>,
}

impl Vsock {
    /// A device for guest `guest_cid` serving `listener` (bound at `path`, non-blocking);
    /// guest connections to host port P go to `<path>_<P>`. `metrics` may outlive the
    /// device (one set per run, across guest reboots).
    pub fn new(
        guest_cid: u64,
        listener: Arc<UnixListener>,
        path: &Path,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&guest_cid) {
            return Err(VirtioError::InvalidState(
                "guest CID must be 3..=4294967294",
            ));
        }
        listener.set_nonblocking(true)?;
        Ok(Self {
            guest_cid,
            listener,
            path: path.to_path_buf(),
            avail_features: 1u64 << VIRTIO_F_VERSION_1 | 1u64 << VIRTIO_F_RING_EVENT_IDX,
            queue_sizes: [QUEUE_SIZE; 3],
            metrics,
            reset_requested: Arc::new(AtomicBool::new(false)),
            handler: None,
            kick: None,
            worker: None,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The live counters (shared with the worker thread).
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// The open connections' protocol state.
    pub fn vsock_state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            connections: self
                .handler
                .as_ref()
                .map(|h| h.lock().unwrap_or_else(|e| e.into_inner()).connections())
                .unwrap_or_default(),
        }
    }

    /// Drop every connection and send the guest VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (now if
    /// the device runs, else as soon as it is activated): what a restored guest needs.
    pub fn request_transport_reset(&self) {
        self.reset_requested.store(true, Ordering::Release);
        if let Some(k) = &self.kick {
            if let Err(e) = k.write(1) {
                tracing::error!("virtio-vsock: cannot wake the worker: {e}");
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let config = self.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-vsock: ignored config write at {offset:#x}");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        if self.worker.is_some() {
            return Err(VirtioError::InvalidState("already active"));
        }
        if ctx.queues.len() != 3 || ctx.queue_events.len() != 3 {
            return Err(VirtioError::InvalidState("vsock needs three queues"));
        }
        for (index, q) in ctx.queues.iter().enumerate() {
            let q = q.lock().unwrap_or_else(|e| e.into_inner());
            if !virtio_queue::QueueT::ready(&*q) {
                return Err(VirtioError::InvalidQueue {
                    index,
                    reason: "not enabled".into(),
                });
            }
        }
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let reset_owed = self.reset_requested.load(Ordering::Acquire);
        let handler = Arc::new(Mutex::new(VsockHandler::new(
            ctx.mem,
            ctx.queues,
            ctx.interrupt,
            ctx.needs_reset,
            self.metrics.clone(),
            HostSide {
                guest_cid: self.guest_cid,
                listener: self.listener.clone(),
                path: self.path.clone(),
            },
            kick.try_clone()?,
            self.reset_requested.clone(),
        )));
        self.worker = Some(Worker::spawn(
            "virtio-vsock",
            ctx.queue_events,
            SharedHandler(handler.clone()),
        )?);
        if reset_owed {
            // Deliver it now, not at the guest's next doorbell.
            kick.write(1)?;
        }
        self.handler = Some(handler);
        self.kick = Some(kick);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        // Dropping the handler closes every host socket; the listener stays.
        self.handler = None;
        self.kick = None;
    }

    fn worker(&self) -> Option<&Worker> {
        self.worker.as_ref()
    }

    fn state(&self) -> VirtioDeviceState {
        VirtioDeviceState {
            device_type: device_type::VSOCK,
            avail_features: self.avail_features,
            config: self.guest_cid.to_le_bytes().to_vec(),
            specific: None,
        }
    }

    /// The guest's connections went with the snapshot's host sockets: tell it so.
    fn restored(&mut self, _state: &VirtioDeviceState) -> Result<()> {
        self.request_transport_reset();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
