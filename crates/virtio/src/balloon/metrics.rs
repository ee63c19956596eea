//! virtio-balloon counters (lock-free; read by the VMM's stats and balloon-status requests).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Live counters of one balloon device (kept across guest reboots by the caller).
#[derive(Debug, Default)]
pub struct BalloonMetrics {
    /// 4 KiB pages the guest put in the balloon (inflateq).
    pub inflated_pages: AtomicU64,
    /// 4 KiB pages the guest took back out (deflateq).
    pub deflated_pages: AtomicU64,
    /// Bytes the guest reported free (reporting_vq).
    pub reported_bytes: AtomicU64,
    /// Bytes given back to the host (madvise(MADV_DONTNEED) succeeded).
    pub released_bytes: AtomicU64,
    /// Page numbers or reported ranges outside guest RAM (ignored).
    pub invalid_ranges: AtomicU64,
    /// Ranges inside guest RAM that the host failed to release.
    pub release_errors: AtomicU64,
    /// Statistics buffers received from the guest.
    pub stats_updates: AtomicU64,
    /// Statistics buffers that could not be read or parsed (ignored).
    pub stats_errors: AtomicU64,
    /// Times the driver broke a queue (device then needs a reset).
    pub broken_queues: AtomicU64,
    /// Interrupts sent to the guest (queues and configuration changes).
    pub interrupts: AtomicU64,
}

/// A serialisable copy of [`BalloonMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonMetricsSnapshot {
    /// See [`BalloonMetrics::inflated_pages`].
    pub inflated_pages: u64,
    /// See [`BalloonMetrics::deflated_pages`].
    pub deflated_pages: u64,
    /// See [`BalloonMetrics::reported_bytes`].
    pub reported_bytes: u64,
    /// See [`BalloonMetrics::released_bytes`].
    pub released_bytes: u64,
    /// See [`BalloonMetrics::invalid_ranges`].
    pub invalid_ranges: u64,
    /// See [`BalloonMetrics::release_errors`].
    pub release_errors: u64,
    /// See [`BalloonMetrics::stats_updates`].
    pub stats_updates: u64,
    /// See [`BalloonMetrics::stats_errors`].
    pub stats_errors: u64,
    /// See [`BalloonMetrics::broken_queues`].
    pub broken_queues: u64,
    /// See [`BalloonMetrics::interrupts`].
    pub interrupts: u64,
}

impl BalloonMetrics {
    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Copy the counters.
    pub fn snapshot(&self) -> BalloonMetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BalloonMetricsSnapshot {
            inflated_pages: g(&self.inflated_pages),
            deflated_pages: g(&self.deflated_pages),
            reported_bytes: g(&self.reported_bytes),
            released_bytes: g(&self.released_bytes),
            invalid_ranges: g(&self.invalid_ranges),
            release_errors: g(&self.release_errors),
            stats_updates: g(&self.stats_updates),
            stats_errors: g(&self.stats_errors),
            broken_queues: g(&self.broken_queues),
            interrupts: g(&self.interrupts),
        }
    }
}
