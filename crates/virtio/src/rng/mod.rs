//! virtio-rng (virtio 1.2 §5.4): one request queue whose device-writable buffers the device
//! fills with entropy from the host's getrandom(2), optionally rate-limited in bytes/s.
//!
//! Linux's driver (drivers/char/hw_random/virtio-rng.c) posts one writable buffer at a time
//! (its `data` array, up to 64 bytes, or the caller's buffer) and accepts any used length up
//! to the buffer size, so a request is answered with min(buffer, [`MAX_REQUEST_BYTES`]) bytes.

pub mod fill;
mod handler;
mod metrics;

use std::sync::Arc;

use rate_limiter::SharedRateLimiter;

pub use handler::{Budget, RngHandler};
pub use metrics::{RngMetrics, RngMetricsSnapshot};

use crate::device::{ActivateContext, VirtioDevice, VirtioDeviceState};
use crate::features::VIRTIO_F_VERSION_1;
use crate::worker::Worker;
use crate::{device_type, Result, VirtioError};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes one request receives (bounds the work a single guest buffer can ask for).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A virtio entropy device.
pub struct Rng {
    avail_features: u64,
    queue_sizes: [u16; 1],
    metrics: Arc<RngMetrics>,
    limiter: Option<SharedRateLimiter>,
    worker: Option<Worker>,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// An unlimited entropy device.
    pub fn new() -> Self {
        Self {
            avail_features: 1u64 << VIRTIO_F_VERSION_1,
            queue_sizes: [QUEUE_SIZE],
            metrics: Arc::new(RngMetrics::default()),
            limiter: None,
            worker: None,
        }
    }

    /// Use `metrics` (kept across VM reboots by the caller) instead of fresh counters.
    pub fn with_metrics(mut self, metrics: Arc<RngMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Limit the bytes handed to the guest with `limiter` (kept by the caller across device
    /// re-creations and changed while the VM runs through its `update`).
    pub fn with_rate_limiter(mut self, limiter: SharedRateLimiter) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// The live counters (shared with the worker thread).
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-rng: ignored config write at {offset:#x}");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        if self.worker.is_some() {
            return Err(VirtioError::InvalidState("already active"));
        }
        let queue = ctx
            .queues
            .first()
            .cloned()
            .ok_or(VirtioError::InvalidState("no queue"))?;
        if !virtio_queue::QueueT::ready(&*queue.lock().unwrap_or_else(|e| e.into_inner())) {
            return Err(VirtioError::InvalidQueue {
                index: 0,
                reason: "not enabled".into(),
            });
        }
        let mut handler = RngHandler::new(
            ctx.mem,
            queue,
            self.metrics.clone(),
            ctx.interrupt,
            ctx.needs_reset,
        );
        if let Some(l) = &self.limiter {
            handler.budget = Some(Box::new(l.clone()));
        }
        let events = ctx.queue_events.into_iter().take(1).collect();
        self.worker = Some(Worker::spawn("virtio-rng", events, handler)?);
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
            device_type: device_type::RNG,
            avail_features: self.avail_features,
            config: Vec::new(),
            specific: None,
        }
    }
}

#[cfg(test)]
mod tests;
