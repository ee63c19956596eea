//! virtio-rng counters (lock-free; read by the VMM's stats request).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Live counters of one entropy device.
#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Requests completed (any outcome).
    pub requests: AtomicU64,
    /// Random bytes written into guest buffers.
    pub bytes: AtomicU64,
    /// Requests the device could not fill (readable buffers, addresses outside RAM,
    /// getrandom failures); each is answered with what was written so far.
    pub errors: AtomicU64,
    /// Times a request had to wait for the rate limiter.
    pub throttled: AtomicU64,
    /// Times the driver broke the queue (device then needs a reset).
    pub broken_queues: AtomicU64,
    /// Interrupts sent to the guest.
    pub interrupts: AtomicU64,
}

/// A serialisable copy of [`RngMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngMetricsSnapshot {
    /// See [`RngMetrics::requests`].
    pub requests: u64,
    /// See [`RngMetrics::bytes`].
    pub bytes: u64,
    /// See [`RngMetrics::errors`].
    pub errors: u64,
    /// See [`RngMetrics::throttled`].
    pub throttled: u64,
    /// See [`RngMetrics::broken_queues`].
    pub broken_queues: u64,
    /// See [`RngMetrics::interrupts`].
    pub interrupts: u64,
}

impl RngMetrics {
    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Copy the counters.
    pub fn snapshot(&self) -> RngMetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RngMetricsSnapshot {
            requests: g(&self.requests),
            bytes: g(&self.bytes),
            errors: g(&self.errors),
            throttled: g(&self.throttled),
            broken_queues: g(&self.broken_queues),
            interrupts: g(&self.interrupts),
        }
    }
}
