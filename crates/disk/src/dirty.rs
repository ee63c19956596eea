//! Dirty tracking of guest writes at a fixed block granularity, for block migration: while
//! tracking is on, every write, write-zeroes and discard marks the blocks it touches; a
//! harvest returns the marked blocks and clears them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Granularity of the tracking: one bit per this many bytes of the disk.
pub const DIRTY_BLOCK_SIZE: u64 = 64 << 10;

/// The blocks of one disk written since the last harvest (one bit per
/// [`DIRTY_BLOCK_SIZE`] block), switchable on and off at runtime.
#[derive(Debug)]
pub struct WriteTracker {
    enabled: AtomicBool,
    size: u64,
    bits: Vec<AtomicU64>,
}

impl WriteTracker {
    /// A tracker (off) for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        let words = Self::block_count(size).div_ceil(64) as usize;
        Self {
            enabled: AtomicBool::new(false),
            size,
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn block_count(size: u64) -> u64 {
        size.div_ceil(DIRTY_BLOCK_SIZE)
    }

    /// Number of blocks of the disk.
    pub fn blocks(&self) -> u64 {
        Self::block_count(self.size)
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The byte range of block `block` (the last one may be short).
    pub fn block_range(&self, block: u64) -> (u64, u64) {
        let start = block.saturating_mul(DIRTY_BLOCK_SIZE).min(self.size);
        (start, (self.size - start).min(DIRTY_BLOCK_SIZE))
    }

    /// Start recording with an empty dirty set.
    pub fn start(&self) {
        for w in &self.bits {
            w.store(0, Ordering::SeqCst);
        }
        self.enabled.store(true, Ordering::SeqCst);
    }

    /// Stop recording (the dirty set is dropped).
    pub fn stop(&self) {
        self.enabled.store(false, Ordering::SeqCst);
        for w in &self.bits {
            w.store(0, Ordering::SeqCst);
        }
    }

    /// Whether writes are being recorded.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Mark the blocks `offset..offset+len` touches. Call it after the write is done: a
    /// harvest either sees the mark or comes before it, and then the mark lands in the next
    /// harvest, so a copier that reads after harvesting never misses a write.
    pub fn record(&self, offset: u64, len: u64) {
        if len == 0 || !self.enabled.load(Ordering::SeqCst) || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let (first, last) = (offset / DIRTY_BLOCK_SIZE, (end - 1) / DIRTY_BLOCK_SIZE);
        for b in first..=last {
            if let Some(w) = self.bits.get((b / 64) as usize) {
                w.fetch_or(1 << (b % 64), Ordering::SeqCst);
            }
        }
    }

    /// The blocks written since the last harvest (or the start), one bit each; clears them.
    pub fn harvest(&self) -> Vec<u64> {
        self.bits
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect()
    }
}

/// Whether block `b` is set in a bitmap from [`WriteTracker::harvest`].
pub fn block_is_set(map: &[u64], b: u64) -> bool {
    map.get((b / 64) as usize)
        .is_some_and(|w| w & (1 << (b % 64)) != 0)
}

/// Number of blocks set in a bitmap from [`WriteTracker::harvest`].
pub fn blocks_set(map: &[u64]) -> u64 {
    map.iter().map(|w| u64::from(w.count_ones())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_writes_are_recorded_only_while_tracking_is_on() {
        let t = WriteTracker::new(1 << 20);

        t.record(0, 512);
        t.start();
        t.record(DIRTY_BLOCK_SIZE - 512, 1024);
        t.record(5 * DIRTY_BLOCK_SIZE, 1);
        let first = t.harvest();
        let second = t.harvest();
        t.stop();
        t.record(0, 512);

        assert_eq!(blocks_set(&first), 3);
        assert!(block_is_set(&first, 0) && block_is_set(&first, 1));
        assert!(block_is_set(&first, 5));
        assert_eq!(blocks_set(&second), 0);
        assert_eq!(blocks_set(&t.harvest()), 0);
    }

    #[test]
    fn test_ranges_past_the_end_are_clipped_and_the_last_block_is_short() {
        let t = WriteTracker::new(DIRTY_BLOCK_SIZE + 4096);
        t.start();

        t.record(DIRTY_BLOCK_SIZE, u64::MAX);
        t.record(u64::MAX - 1, 10);
        let map = t.harvest();

        assert_eq!(t.blocks(), 2);
        assert_eq!(blocks_set(&map), 1);
        assert_eq!(t.block_range(1), (DIRTY_BLOCK_SIZE, 4096));
    }
}
