//! virtio-net (virtio 1.2 §5.1) over a host TAP: one receive and one transmit queue, the
//! 12-byte `virtio_net_hdr_v1` shared with the TAP as its vnet header, checksum and TSO
//! offloads in both directions (the TAP's offloads follow the guest's acked features), and
//! mergeable receive buffers.
//!
//! Linux's driver (drivers/net/virtio_net.c) posts mergeable page-fragment buffers when
//! MRG_RXBUF is negotiated and reads `num_buffers` from the first one; it reads the MAC from
//! the config space when VIRTIO_NET_F_MAC is offered and the link state from `status`.

pub mod features;
mod handler;
mod metrics;

use std::sync::Arc;

pub use handler::{NetBackend, NetHandler};
pub use metrics::{NetMetrics, NetMetricsSnapshot};
use rate_limiter::SharedRateLimiter;
use serde::{Deserialize, Serialize};

use self::features::*;
use crate::device::{ActivateContext, VirtioDevice, VirtioDeviceState};
use crate::features::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};
use crate::worker::Worker;
use crate::{device_type, Result, VirtioError};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of `virtio_net_hdr_v1` (always used: the device is VERSION_1 only).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame with its header: a 64 KiB GSO frame plus Ethernet and vnet headers (the
/// same bound as Firecracker's MAX_BUFFER_SIZE).
pub const MAX_FRAME_BUF: usize = 65562;
/// `status` bit: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// The device's configuration space (virtio 1.2 §5.1.4), serialisable for snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfigSpace {
    /// The NIC's MAC address.
    pub mac: [u8; 6],
    /// Link status bits.
    pub status: u16,
    /// Queue pairs (1: no multiqueue).
    pub max_virtqueue_pairs: u16,
}

impl NetConfigSpace {
    /// The little-endian layout the driver reads.
    pub fn bytes(&self) -> [u8; 10] {
        let mut b = [0u8; 10];
        b[..6].copy_from_slice(&self.mac);
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b
    }
}

/// A virtio network card backed by a host TAP queue.
pub struct Net {
    backend: Box<dyn NetBackend>,
    config: NetConfigSpace,
    avail_features: u64,
    queue_sizes: [u16; 2],
    metrics: Arc<NetMetrics>,
    rx_limiter: Option<SharedRateLimiter>,
    tx_limiter: Option<SharedRateLimiter>,
    worker: Option<Worker>,
}

impl Net {
    /// A NIC with address `mac` on `backend` (e.g. a [`net::Tap`]).
    pub fn new(backend: Box<dyn NetBackend>, mac: net::MacAddr) -> Self {
        let bits = [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
            VIRTIO_F_RING_EVENT_IDX,
            VIRTIO_F_VERSION_1,
        ];
        Self {
            backend,
            config: NetConfigSpace {
                mac: mac.bytes(),
                status: VIRTIO_NET_S_LINK_UP,
                max_virtqueue_pairs: 1,
            },
            avail_features: bits.iter().fold(0u64, |a, b| a | (1u64 << b)),
            queue_sizes: [QUEUE_SIZE, QUEUE_SIZE],
            metrics: Arc::new(NetMetrics::default()),
            rx_limiter: None,
            tx_limiter: None,
            worker: None,
        }
    }

    /// Use `metrics` (kept across VM reboots by the caller) instead of fresh counters.
    pub fn with_metrics(mut self, metrics: Arc<NetMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Limit frames into the guest with `rx` and frames from it with `tx` (bytes/s and
    /// packets/s each). The limiters are kept by the caller across device re-creations and
    /// changed while the VM runs through their `update`.
    pub fn with_rate_limiters(
        mut self,
        rx: Option<SharedRateLimiter>,
        tx: Option<SharedRateLimiter>,
    ) -> Self {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
        self
    }

    /// The live counters (shared with the worker thread).
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// The configuration space.
    pub fn config_space(&self) -> NetConfigSpace {
        self.config
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.config.bytes();
        for (i, out) in data.iter_mut().enumerate() {
            *out = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| bytes.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is read-only without VIRTIO_NET_F_CTRL_MAC_ADDR (not offered).
        tracing::debug!("virtio-net: ignored config write at {offset:#x}");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        if self.worker.is_some() {
            return Err(VirtioError::InvalidState("already active"));
        }
        if ctx.queues.len() < 2 {
            return Err(VirtioError::InvalidState("virtio-net needs two queues"));
        }
        for (i, q) in ctx.queues.iter().take(2).enumerate() {
            if !virtio_queue::QueueT::ready(&*q.lock().unwrap_or_else(|e| e.into_inner())) {
                return Err(VirtioError::InvalidQueue {
                    index: i,
                    reason: "not enabled".into(),
                });
            }
        }
        let mut backend = self.backend.try_clone_box()?;
        if let Err(e) = backend.set_offloads(ctx.acked_features) {
            // The TAP then hands us plain frames only, which every driver accepts.
            tracing::warn!("virtio-net: cannot set TAP offloads: {e}");
        }
        let handler = NetHandler::new(
            ctx.mem,
            ctx.queues[0].clone(),
            ctx.queues[1].clone(),
            backend,
            self.metrics.clone(),
            ctx.interrupt,
            ctx.needs_reset,
            ctx.acked_features,
        )?
        .with_rate_limiters(self.rx_limiter.clone(), self.tx_limiter.clone());
        let events = ctx.queue_events.into_iter().take(2).collect();
        self.worker = Some(Worker::spawn("virtio-net", events, handler)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }

    fn worker(&self) -> Option<&Worker> {
        self.worker.as_ref()
    }

    fn state(&self) -> VirtioDeviceState {
        VirtioDeviceState {
            device_type: device_type::NET,
            avail_features: self.avail_features,
            config: self.config.bytes().to_vec(),
            specific: None,
        }
    }
}

#[cfg(test)]
mod tests;
