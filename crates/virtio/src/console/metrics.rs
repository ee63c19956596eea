//! virtio-console counters (lock-free; read by the VMM's stats request).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Live counters of one console device.
#[derive(Debug, Default)]
pub struct ConsoleMetrics {
    /// Bytes from the host delivered into the guest's receive buffers.
    pub rx_bytes: AtomicU64,
    /// Bytes the guest sent that reached the host output (or its buffer).
    pub tx_bytes: AtomicU64,
    /// Guest output dropped because the host side did not keep up (bounded buffer full).
    pub tx_dropped_bytes: AtomicU64,
    /// Host connections accepted on the console socket.
    pub connections: AtomicU64,
    /// Buffers the device could not use (wrong direction, outside guest memory).
    pub errors: AtomicU64,
    /// Times the driver broke a queue (device then needs a reset).
    pub broken_queues: AtomicU64,
    /// Interrupts sent to the guest.
    pub interrupts: AtomicU64,
}

/// A serialisable copy of [`ConsoleMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleMetricsSnapshot {
    /// See [`ConsoleMetrics::rx_bytes`].
    pub rx_bytes: u64,
    /// See [`ConsoleMetrics::tx_bytes`].
    pub tx_bytes: u64,
    /// See [`ConsoleMetrics::tx_dropped_bytes`].
    pub tx_dropped_bytes: u64,
    /// See [`ConsoleMetrics::connections`].
    pub connections: u64,
    /// See [`ConsoleMetrics::errors`].
    pub errors: u64,
    /// See [`ConsoleMetrics::broken_queues`].
    pub broken_queues: u64,
    /// See [`ConsoleMetrics::interrupts`].
    pub interrupts: u64,
}

impl ConsoleMetrics {
    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Copy the counters.
    pub fn snapshot(&self) -> ConsoleMetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConsoleMetricsSnapshot {
            rx_bytes: g(&self.rx_bytes),
            tx_bytes: g(&self.tx_bytes),
            tx_dropped_bytes: g(&self.tx_dropped_bytes),
            connections: g(&self.connections),
            errors: g(&self.errors),
            broken_queues: g(&self.broken_queues),
            interrupts: g(&self.interrupts),
        }
    }
}
