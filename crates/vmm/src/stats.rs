//! Per-vCPU exit counters, kept for `--stats` and the future metrics API.

use std::sync::atomic::{AtomicU64, Ordering};

/// Exit reasons counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Port read.
    IoIn,
    /// Port write.
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// Port access no device claimed.
    UnclaimedPio,
    /// MMIO access no device claimed.
    UnclaimedMmio,
    /// `hlt` reaching userspace.
    Hlt,
    /// `KVM_EXIT_SHUTDOWN` (triple fault).
    Shutdown,
    /// `KVM_EXIT_SYSTEM_EVENT`.
    SystemEvent,
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError,
    /// `KVM_EXIT_FAIL_ENTRY`.
    FailEntry,
    /// Interrupted by a signal (kick) or `KVM_EXIT_INTR`.
    Interrupted,
    /// `KVM_EXIT_DIRTY_RING_FULL`: the vCPU drained the dirty rings itself.
    DirtyRingFull,
    /// Not an exit: a pausing vCPU ran once more so that a #BP `kvm_pvm` had queued was
    /// delivered before its state could be saved (see `repair::soft_exception`).
    SettleRun,
    /// Anything else.
    Other,
}

impl ExitKind {
    /// Every kind, in counter order.
    pub const ALL: [ExitKind; 15] = [
        Self::IoIn,
        Self::IoOut,
        Self::MmioRead,
        Self::MmioWrite,
        Self::UnclaimedPio,
        Self::UnclaimedMmio,
        Self::Hlt,
        Self::Shutdown,
        Self::SystemEvent,
        Self::InternalError,
        Self::FailEntry,
        Self::Interrupted,
        Self::DirtyRingFull,
        Self::SettleRun,
        Self::Other,
    ];

    /// Counter name.
    pub fn name(self) -> &'static str {
        match self {
            Self::IoIn => "io_in",
            Self::IoOut => "io_out",
            Self::MmioRead => "mmio_read",
            Self::MmioWrite => "mmio_write",
            Self::UnclaimedPio => "unclaimed_pio",
            Self::UnclaimedMmio => "unclaimed_mmio",
            Self::Hlt => "hlt",
            Self::Shutdown => "shutdown",
            Self::SystemEvent => "system_event",
            Self::InternalError => "internal_error",
            Self::FailEntry => "fail_entry",
            Self::Interrupted => "interrupted",
            Self::DirtyRingFull => "dirty_ring_full",
            Self::SettleRun => "settle_run",
            Self::Other => "other",
        }
    }
}

/// Exit counters of one vCPU.
#[derive(Debug, Default)]
pub struct ExitCounters {
    counts: [AtomicU64; ExitKind::ALL.len()],
}

impl ExitCounters {
    /// Count one exit.
    pub fn inc(&self, kind: ExitKind) {
        self.counts[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Current value of one counter.
    pub fn get(&self, kind: ExitKind) -> u64 {
        self.counts[kind as usize].load(Ordering::Relaxed)
    }

    /// (name, count) for every non-zero counter.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        ExitKind::ALL
            .iter()
            .map(|k| (k.name(), self.get(*k)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_exit_counters_snapshot_lists_nonzero_only() {
        let c = ExitCounters::default();
        c.inc(ExitKind::IoOut);
        c.inc(ExitKind::IoOut);
        c.inc(ExitKind::Other);
        assert_eq!(c.snapshot(), vec![("io_out", 2), ("other", 1)]);
    }
}
