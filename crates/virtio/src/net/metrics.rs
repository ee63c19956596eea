//! virtio-net counters (lock-free; read by the VMM's stats request).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Live counters of one network device.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Bytes delivered to the guest (Ethernet frames, without the vnet header).
    pub rx_bytes: AtomicU64,
    /// Frames read from the TAP that the guest could not take (its buffers too small).
    pub rx_dropped: AtomicU64,
    /// Failed TAP reads and guest buffers outside RAM on receive.
    pub rx_errors: AtomicU64,
    /// Frames sent to the TAP.
    pub tx_packets: AtomicU64,
    /// Bytes sent to the TAP (Ethernet frames, without the vnet header).
    pub tx_bytes: AtomicU64,
    /// Guest frames not sent (malformed, too large, TAP full or refusing them).
    pub tx_dropped: AtomicU64,
    /// Failed TAP writes and malformed guest frames.
    pub tx_errors: AtomicU64,
    /// Times the receive path waited for the guest to post buffers.
    pub rx_no_buffers: AtomicU64,
    /// Times the driver broke a queue (device then needs a reset).
    pub broken_queues: AtomicU64,
    /// Interrupts sent to the guest.
    pub interrupts: AtomicU64,
    /// Times the receive path waited for its rate limiter.
    pub rx_throttled: AtomicU64,
    /// Times the transmit path waited for its rate limiter.
    pub tx_throttled: AtomicU64,
}

/// A serialisable copy of [`NetMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetMetricsSnapshot {
    /// See [`NetMetrics::rx_packets`].
    pub rx_packets: u64,
    /// See [`NetMetrics::rx_bytes`].
    pub rx_bytes: u64,
    /// See [`NetMetrics::rx_dropped`].
    pub rx_dropped: u64,
    /// See [`NetMetrics::rx_errors`].
    pub rx_errors: u64,
    /// See [`NetMetrics::tx_packets`].
    pub tx_packets: u64,
    /// See [`NetMetrics::tx_bytes`].
    pub tx_bytes: u64,
    /// See [`NetMetrics::tx_dropped`].
    pub tx_dropped: u64,
    /// See [`NetMetrics::tx_errors`].
    pub tx_errors: u64,
    /// See [`NetMetrics::rx_no_buffers`].
    pub rx_no_buffers: u64,
    /// See [`NetMetrics::broken_queues`].
    pub broken_queues: u64,
    /// See [`NetMetrics::interrupts`].
    pub interrupts: u64,
    /// See [`NetMetrics::rx_throttled`].
    #[serde(default)]
    pub rx_throttled: u64,
    /// See [`NetMetrics::tx_throttled`].
    #[serde(default)]
    pub tx_throttled: u64,
}

impl NetMetrics {
    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Copy the counters.
    pub fn snapshot(&self) -> NetMetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetMetricsSnapshot {
            rx_packets: g(&self.rx_packets),
            rx_bytes: g(&self.rx_bytes),
            rx_dropped: g(&self.rx_dropped),
            rx_errors: g(&self.rx_errors),
            tx_packets: g(&self.tx_packets),
            tx_bytes: g(&self.tx_bytes),
            tx_dropped: g(&self.tx_dropped),
            tx_errors: g(&self.tx_errors),
            rx_no_buffers: g(&self.rx_no_buffers),
            broken_queues: g(&self.broken_queues),
            interrupts: g(&self.interrupts),
            rx_throttled: g(&self.rx_throttled),
            tx_throttled: g(&self.tx_throttled),
        }
    }
}
