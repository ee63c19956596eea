//! What kinds of instruction were repaired, and how often.

use std::sync::atomic::{AtomicU64, Ordering};

/// Which instruction was repaired, for the per-kind counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairKind {
    /// `int3`.
    Int3,
    /// `int n`.
    IntN,
    /// `int1`.
    Int1,
    /// `into`.
    Into,
    /// `fwait`.
    Fwait,
    /// `cmpxchg16b`.
    Cmpxchg16b,
    /// `ldmxcsr`.
    Ldmxcsr,
    /// `stmxcsr`.
    Stmxcsr,
    /// `xgetbv`.
    Xgetbv,
    /// `xsetbv`.
    Xsetbv,
    /// `clac`.
    Clac,
    /// `stac`.
    Stac,
    /// Same-privilege `iretd`/`iretq`.
    Iret,
}

impl RepairKind {
    /// Every kind, in counter order.
    pub const ALL: [RepairKind; 13] = [
        Self::Int3,
        Self::IntN,
        Self::Int1,
        Self::Into,
        Self::Fwait,
        Self::Cmpxchg16b,
        Self::Ldmxcsr,
        Self::Stmxcsr,
        Self::Xgetbv,
        Self::Xsetbv,
        Self::Clac,
        Self::Stac,
        Self::Iret,
    ];

    /// Mnemonic.
    pub fn name(self) -> &'static str {
        match self {
            Self::Int3 => "int3",
            Self::IntN => "int_n",
            Self::Int1 => "int1",
            Self::Into => "into",
            Self::Fwait => "fwait",
            Self::Cmpxchg16b => "cmpxchg16b",
            Self::Ldmxcsr => "ldmxcsr",
            Self::Stmxcsr => "stmxcsr",
            Self::Xgetbv => "xgetbv",
            Self::Xsetbv => "xsetbv",
            Self::Clac => "clac",
            Self::Stac => "stac",
            Self::Iret => "iret",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// Per-kind repair counters for one VM.
#[derive(Debug, Default)]
pub struct RepairStats {
    counts: [AtomicU64; RepairKind::ALL.len()],
}

impl RepairStats {
    /// Count one repair.
    pub fn record(&self, kind: RepairKind) {
        self.counts[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// (name, count) for every kind with a non-zero count.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        RepairKind::ALL
            .iter()
            .map(|k| (k.name(), self.counts[k.index()].load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Total repairs.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}
