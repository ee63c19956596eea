//! Cluster reference counts: the refcount table (kept in memory), refcount blocks (a small LRU
//! cache, written through), allocation at the end of the file and freeing.
//!
//! Allocation always takes the first cluster at or after the end of the allocated area whose
//! refcount is 0. A new refcount block is placed where it describes itself, so growing the
//! refcount structure never needs a second allocation.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::lru::Lru;
use crate::{DiskError, Result};

/// Refcount blocks kept in memory.
const BLOCK_CACHE: usize = 8;
/// How many clusters an allocation skips over at most (each with a nonzero refcount) before
/// it gives up: guards against images whose refcounts claim the whole address space.
const MAX_ALLOC_SCAN: u64 = 1 << 20;
/// Refcount table entries: bits 9-63 hold the block offset.
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

/// Read the `idx`-th `1 << order`-bit big-endian refcount from `block`.
pub fn get_entry(block: &[u8], idx: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits < 8 {
        let bit = idx * bits;
        let byte = block[(bit / 8) as usize];
        // Sub-byte refcounts are stored from the least significant bit up (qcow2 spec).
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    } else {
        let n = (bits / 8) as usize;
        let start = idx as usize * n;
        block[start..start + n]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Store `value` as the `idx`-th refcount; returns the byte range that changed.
pub fn set_entry(block: &mut [u8], idx: u64, order: u32, value: u64) -> (usize, usize) {
    let bits = 1u64 << order;
    if bits < 8 {
        let bit = idx * bits;
        let i = (bit / 8) as usize;
        let mask = (((1u64 << bits) - 1) << (bit % 8)) as u8;
        let v = ((value << (bit % 8)) as u8) & mask;
        block[i] = (block[i] & !mask) | v;
        (i, i + 1)
    } else {
        let n = (bits / 8) as usize;
        let start = idx as usize * n;
        let bytes = value.to_be_bytes();
        block[start..start + n].copy_from_slice(&bytes[8 - n..]);
        (start, start + n)
    }
}

/// Refcount bookkeeping of one open image.
#[derive(Debug)]
pub struct Refcounts {
    path: PathBuf,
    table: Vec<u64>,
    table_offset: u64,
    cluster_bits: u32,
    order: u32,
    cache: Lru<Vec<u8>>,
    /// First cluster index not yet known to be in use (the allocation cursor).
    next_free: u64,
    read_only: bool,
}

impl Refcounts {
    /// Load the refcount table (already bounds-checked by the header) from `file`.
    pub fn load(
        file: &File,
        path: &Path,
        header: &super::Header,
        file_len: u64,
        read_only: bool,
    ) -> Result<Self> {
        let table_offset = header.refcount_table_offset;
        let table_clusters = header.refcount_table_clusters;
        let cluster_bits = header.cluster_bits;
        let order = header.refcount_order;
        let bytes = (u64::from(table_clusters) << cluster_bits) as usize;
        let mut raw = vec![0u8; bytes];
        file.read_exact_at(&mut raw, table_offset)?;
        let table = raw
            .chunks_exact(8)
            .map(|c| super::header::get64(c, 0) & REFTABLE_OFFSET_MASK)
            .collect();
        let cs = 1u64 << cluster_bits;
        Ok(Self {
            path: path.to_path_buf(),
            table,
            table_offset,
            cluster_bits,
            order,
            cache: Lru::new(BLOCK_CACHE),
            next_free: file_len.div_ceil(cs),
            read_only,
        })
    }

    fn corrupt(&self, reason: String) -> DiskError {
        DiskError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of refcount entries per block.
    fn block_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.order
    }

    /// The allocation cursor in bytes (everything from here on is free).
    pub fn end_offset(&self) -> u64 {
        self.next_free << self.cluster_bits
    }

    /// Refcount block index covering cluster `c`, and the entry index in it.
    fn split(&self, c: u64) -> (u64, u64) {
        (c >> self.block_bits(), c & ((1 << self.block_bits()) - 1))
    }

    fn load_block(&mut self, file: &File, offset: u64) -> Result<()> {
        if self.cache.get_mut(offset).is_some() {
            return Ok(());
        }
        let cs = self.cluster_size();
        if offset == 0 || !offset.is_multiple_of(cs) || offset >= self.end_offset() {
            return Err(self.corrupt(format!("refcount block offset {offset:#x} invalid")));
        }
        if offset == self.table_offset
            || super::header::overlaps(offset, cs, self.table_offset, self.table.len() as u64 * 8)
        {
            return Err(self.corrupt(format!(
                "refcount block at {offset:#x} overlaps the refcount table"
            )));
        }
        let mut block = vec![0u8; cs as usize];
        file.read_exact_at(&mut block, offset)?;
        self.cache.insert(offset, block);
        Ok(())
    }

    /// The refcount of cluster index `c`.
    pub fn get(&mut self, file: &File, c: u64) -> Result<u64> {
        let (bi, idx) = self.split(c);
        let Some(&off) = self.table.get(bi as usize) else {
            return Ok(0);
        };
        if off == 0 {
            return Ok(0);
        }
        self.load_block(file, off)?;
        let order = self.order;
        Ok(self
            .cache
            .get_mut(off)
            .map(|b| get_entry(b, idx, order))
            .unwrap_or(0))
    }

    /// Set the refcount of cluster index `c`, creating its refcount block if needed.
    pub fn set(&mut self, file: &File, c: u64, value: u64) -> Result<()> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        if self.order < 6 && value >> (1u64 << self.order) != 0 {
            return Err(self.corrupt(format!("refcount of cluster {c} overflows")));
        }
        let (bi, idx) = self.split(c);
        if bi as usize >= self.table.len() {
            self.grow_table(file, bi)?;
        }
        let mut off = self.table[bi as usize];
        if off == 0 {
            off = self.new_block(file, bi)?;
        }
        self.load_block(file, off)?;
        let order = self.order;
        let Some(block) = self.cache.get_mut(off) else {
            return Err(self.corrupt("refcount block vanished from the cache".into()));
        };
        let (s, e) = set_entry(block, idx, order, value);
        file.write_all_at(&block[s..e], off + s as u64)?;
        Ok(())
    }

    /// Replace the refcount table by a larger one (at the allocation cursor) with room for
    /// block index `bi`, as QEMU does: the new table and the refcount blocks describing it
    /// are written first, then the header points at the new table, then the old table's
    /// clusters are freed.
    fn grow_table(&mut self, file: &File, bi: u64) -> Result<()> {
        let cs = self.cluster_size();
        let old_len = self.table.len() as u64;
        let entries = (bi + 1).max(old_len * 2).max(cs / 8);
        let n = (entries * 8).div_ceil(cs);
        if n * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(DiskError::NotSupported(
                "growing the qcow2 refcount table beyond 8 MiB",
            ));
        }
        let entries = n * cs / 8;
        let c0 = self.next_free;
        let mut table = self.table.clone();
        table.resize(entries as usize, 0);
        // Blocks for the new region [c0, c0 + n + k) that do not exist yet go right after the
        // new table; iterate until the region's block count is stable.
        let mut missing: Vec<u64> = Vec::new();
        for _ in 0..8 {
            let end = c0 + n + missing.len() as u64;
            let next: Vec<u64> = (c0 >> self.block_bits()..=(end - 1) >> self.block_bits())
                .filter(|&b| table.get(b as usize).is_none_or(|&o| o == 0))
                .collect();
            if next.len() == missing.len() {
                break;
            }
            missing = next;
        }
        let k = missing.len() as u64;
        let region_end = c0 + n + k;
        if missing.iter().any(|&b| b >= entries) {
            return Err(DiskError::NotSupported(
                "growing the qcow2 refcount table by this much at once",
            ));
        }
        for (j, &b) in missing.iter().enumerate() {
            table[b as usize] = (c0 + n + j as u64) << self.cluster_bits;
        }
        // New blocks, with the region's refcounts already in them.
        for &b in &missing {
            let mut block = vec![0u8; cs as usize];
            let first = b << self.block_bits();
            let last = first + (1 << self.block_bits());
            for c in c0.max(first)..region_end.min(last) {
                set_entry(&mut block, c - first, self.order, 1);
            }
            let off = table[b as usize];
            file.write_all_at(&block, off)?;
            self.cache.insert(off, block);
        }
        let mut raw = vec![0u8; (n * cs) as usize];
        for (i, &o) in table.iter().enumerate() {
            super::header::put64(&mut raw, i * 8, o);
        }
        file.write_all_at(&raw, c0 << self.cluster_bits)?;
        let old_off = self.table_offset;
        let old_clusters = (old_len * 8).div_ceil(cs);
        self.table = table;
        self.table_offset = c0 << self.cluster_bits;
        self.next_free = region_end;
        // Region clusters covered by blocks that already existed.
        for c in c0..region_end {
            let (b, _) = self.split(c);
            if !missing.contains(&b) {
                self.set(file, c, 1)?;
            }
        }
        // The new table must be durable before the header points at it.
        file.sync_data()?;
        let mut hdr = [0u8; 12];
        super::header::put64(&mut hdr, 0, self.table_offset);
        super::header::put32(&mut hdr, 8, n as u32);
        file.write_all_at(&hdr, 48)?;
        file.sync_data()?;
        for i in 0..old_clusters {
            let c = (old_off >> self.cluster_bits) + i;
            let v = self.get(file, c)?;
            if v > 0 {
                self.set(file, c, v - 1)?;
            }
        }
        Ok(())
    }

    /// Create refcount block `bi` at the allocation cursor (where it usually counts itself).
    fn new_block(&mut self, file: &File, bi: u64) -> Result<u64> {
        let c = self.next_free;
        self.next_free += 1;
        let off = c << self.cluster_bits;
        let mut block = vec![0u8; self.cluster_size() as usize];
        let (own_bi, own_idx) = self.split(c);
        let self_described = own_bi == bi;
        if self_described {
            set_entry(&mut block, own_idx, self.order, 1);
        }
        // The block's contents go to disk before the table points at it.
        file.write_all_at(&block, off)?;
        self.cache.insert(off, block);
        self.table[bi as usize] = off;
        file.write_all_at(&off.to_be_bytes(), self.table_offset + bi * 8)?;
        if !self_described {
            self.set(file, c, 1)?;
        }
        Ok(off)
    }

    /// Allocate one cluster (refcount 1) and return its file offset. The caller writes it.
    pub fn alloc(&mut self, file: &File) -> Result<u64> {
        for _ in 0..MAX_ALLOC_SCAN {
            let c = self.next_free;
            self.next_free += 1;
            if self.get(file, c)? == 0 {
                self.set(file, c, 1)?;
                return Ok(c << self.cluster_bits);
            }
        }
        Err(self.corrupt("no free cluster found: refcounts claim the whole file".into()))
    }

    /// Drop one reference to the cluster at file offset `off`; returns true when it became
    /// free.
    pub fn decref(&mut self, file: &File, off: u64) -> Result<bool> {
        let c = off >> self.cluster_bits;
        let v = self.get(file, c)?;
        if v == 0 {
            return Err(self.corrupt(format!("freeing cluster {off:#x} whose refcount is 0")));
        }
        self.set(file, c, v - 1)?;
        Ok(v == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_refcount_entry_widths_roundtrip() {
        for order in 0..=6u32 {
            // Arrange
            let mut block = vec![0u8; 512];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            // Act
            set_entry(&mut block, 3, order, max);
            set_entry(&mut block, 4, order, 1);
            // Assert
            assert_eq!(get_entry(&block, 3, order), max, "order {order}");
            assert_eq!(get_entry(&block, 4, order), 1, "order {order}");
            assert_eq!(get_entry(&block, 2, order), 0, "order {order}");
            assert_eq!(get_entry(&block, 5, order), 0, "order {order}");
        }
    }

    #[test]
    fn test_refcount_16bit_entry_is_big_endian() {
        // Arrange
        let mut block = vec![0u8; 8];
        // Act
        let range = set_entry(&mut block, 1, 4, 0x0102);
        // Assert
        assert_eq!(range, (2, 4));
        assert_eq!(&block[2..4], &[1, 2]);
    }
}
