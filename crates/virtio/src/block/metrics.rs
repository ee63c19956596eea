//! Per-device counters (lock-free; read by the VMM's metrics endpoint).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Live counters of one block device.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Requests completed (any type, any status).
    pub requests: AtomicU64,
    /// Successful read requests.
    pub reads: AtomicU64,
    /// Successful write requests.
    pub writes: AtomicU64,
    /// Bytes read from the disk into the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written from the guest to the disk.
    pub write_bytes: AtomicU64,
    /// FLUSH requests.
    pub flushes: AtomicU64,
    /// DISCARD and WRITE_ZEROES requests.
    pub discards: AtomicU64,
    /// Requests answered IOERR (or dropped for lack of a status byte).
    pub errors: AtomicU64,
    /// Requests answered UNSUPP.
    pub unsupported: AtomicU64,
    /// Times the driver broke the queue (device then needs a reset).
    pub broken_queues: AtomicU64,
    /// Interrupts sent to the guest.
    pub interrupts: AtomicU64,
}

/// A serialisable copy of [`BlockMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMetricsSnapshot {
    /// See [`BlockMetrics::requests`].
    pub requests: u64,
    /// See [`BlockMetrics::reads`].
    #[serde(default)]
    pub reads: u64,
    /// See [`BlockMetrics::writes`].
    #[serde(default)]
    pub writes: u64,
    /// See [`BlockMetrics::read_bytes`].
    pub read_bytes: u64,
    /// See [`BlockMetrics::write_bytes`].
    pub write_bytes: u64,
    /// See [`BlockMetrics::flushes`].
    pub flushes: u64,
    /// See [`BlockMetrics::discards`].
    pub discards: u64,
    /// See [`BlockMetrics::errors`].
    pub errors: u64,
    /// See [`BlockMetrics::unsupported`].
    pub unsupported: u64,
    /// See [`BlockMetrics::broken_queues`].
    pub broken_queues: u64,
    /// See [`BlockMetrics::interrupts`].
    pub interrupts: u64,
}

impl BlockMetrics {
    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Copy the counters.
    pub fn snapshot(&self) -> BlockMetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockMetricsSnapshot {
            requests: g(&self.requests),
            reads: g(&self.reads),
            writes: g(&self.writes),
            read_bytes: g(&self.read_bytes),
            write_bytes: g(&self.write_bytes),
            flushes: g(&self.flushes),
            discards: g(&self.discards),
            errors: g(&self.errors),
            unsupported: g(&self.unsupported),
            broken_queues: g(&self.broken_queues),
            interrupts: g(&self.interrupts),
        }
    }
}
