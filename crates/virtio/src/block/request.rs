//! Turning one descriptor chain into a block request and executing it against the disk.
//!
//! The chain is treated as the spec's byte stream: device-readable bytes (16-byte header, then
//! data for OUT/DISCARD/WRITE_ZEROES) followed by device-writable bytes (data for IN/GET_ID,
//! then the status byte last). Every guest address is checked by vm-memory on access and every
//! sector range against the disk size, so a hostile chain can at worst earn an IOERR.

use std::ops::Deref;

use disk::{DiskBackend, DiskError, SECTOR_SHIFT, SECTOR_SIZE};
use virtio_bindings::virtio_blk::*;
use virtio_queue::DescriptorChain;
use vm_device::GuestMemoryMmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::metrics::BlockMetrics;

/// Bytes in the request header (type, reserved, sector).
const HEADER_LEN: u64 = 16;
/// Bytes per DISCARD / WRITE_ZEROES segment.
const DWZ_SEGMENT_LEN: u64 = 16;
/// Largest request [`Executor::try_run_inline`] serves. Past this the copy costs far more than
/// the hand-off to an I/O thread, and I/O threads overlap large copies where the worker would
/// do them one after another.
const INLINE_MAX_LEN: u64 = 64 * 1024;

/// One guest buffer of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

/// A chain split into its readable and writable byte streams.
#[derive(Debug, Default)]
pub struct ParsedChain {
    /// Device-readable buffers, in order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Segment>,
    /// A readable buffer came after a writable one (a spec violation).
    pub misordered: bool,
}

/// The chain cannot be walked (loop, next index out of range, unreadable descriptor table,
/// empty): the queue is broken.
#[derive(Debug, PartialEq, Eq)]
pub struct MalformedChain;

/// Walk a chain. Descriptors are bounded by the queue size (virtio-queue's TTL), so loops end.
pub fn parse_chain<M>(chain: DescriptorChain<M>) -> Result<ParsedChain, MalformedChain>
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let mut parsed = ParsedChain::default();
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        last_has_next = desc.has_next();
        if desc.len() == 0 {
            continue;
        }
        let seg = Segment {
            addr: desc.addr(),
            len: u64::from(desc.len()),
        };
        if desc.is_write_only() {
            parsed.writable.push(seg);
        } else {
            if !parsed.writable.is_empty() {
                parsed.misordered = true;
            }
            parsed.readable.push(seg);
        }
    }
    // The iterator stops early (with NEXT still set on the last descriptor) on loops,
    // out-of-range next indices, unreadable descriptors and 4 GiB overflows.
    if count == 0 || last_has_next {
        return Err(MalformedChain);
    }
    Ok(parsed)
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().fold(0u64, |acc, s| acc.saturating_add(s.len))
}

/// The pieces of the byte stream `segs` covering `[start, start + len)`; None if out of
/// range or an address would overflow.
fn sub_range(segs: &[Segment], start: u64, len: u64) -> Option<Vec<Segment>> {
    let end = start.checked_add(len)?;
    if end > total(segs) {
        return None;
    }
    let mut out = Vec::new();
    let mut pos = 0u64;
    for s in segs {
        let s_end = pos + s.len;
        let lo = start.max(pos);
        let hi = end.min(s_end);
        if lo < hi {
            out.push(Segment {
                addr: s.addr.checked_add(lo - pos)?,
                len: hi - lo,
            });
        }
        pos = s_end;
        if pos >= end {
            break;
        }
    }
    Some(out)
}

/// Request outcome: status byte and the bytes written into the chain's writable part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// VIRTIO_BLK_S_*.
    pub status: u8,
    /// Bytes of data the device wrote (excluding the status byte).
    pub data_written: u32,
}

impl Completion {
    fn ok(data_written: u32) -> Self {
        Self {
            status: VIRTIO_BLK_S_OK as u8,
            data_written,
        }
    }
    fn ioerr() -> Self {
        Self {
            status: VIRTIO_BLK_S_IOERR as u8,
            data_written: 0,
        }
    }
    fn unsupp() -> Self {
        Self {
            status: VIRTIO_BLK_S_UNSUPP as u8,
            data_written: 0,
        }
    }
}

/// What requests may ask for (advertised in the config space).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most data segments per IN/OUT request.
    pub seg_max: u32,
    /// Most sectors per DISCARD segment.
    pub max_discard_sectors: u32,
    /// Most segments per DISCARD request.
    pub max_discard_seg: u32,
    /// Most sectors per WRITE_ZEROES segment.
    pub max_write_zeroes_sectors: u32,
    /// Most segments per WRITE_ZEROES request.
    pub max_write_zeroes_seg: u32,
}

/// Everything needed to execute requests.
pub struct Executor<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The disk.
    pub disk: &'a dyn DiskBackend,
    /// GET_ID answer (≤ 20 bytes).
    pub serial: &'a [u8],
    /// Negotiated features.
    pub acked_features: u64,
    /// Advertised limits.
    pub limits: Limits,
    /// Counters.
    pub metrics: &'a BlockMetrics,
}

impl Executor<'_> {
    fn has(&self, feature: u32) -> bool {
        self.acked_features & (1u64 << feature) != 0
    }

    /// Execute a parsed chain and write its status byte. Returns the used length to report
    /// (data bytes written + 1 for the status), or 0 if there was nowhere to put a status.
    pub fn run(&self, chain: &ParsedChain) -> u32 {
        let w_total = total(&chain.writable);
        let status_seg = if w_total == 0 {
            None
        } else {
            sub_range(&chain.writable, w_total - 1, 1).and_then(|v| v.first().copied())
        };
        let Some(status_seg) = status_seg else {
            BlockMetrics::add(&self.metrics.errors, 1);
            return 0;
        };
        let completion = if chain.misordered {
            Completion::ioerr()
        } else {
            self.execute(chain, w_total - 1)
        };
        BlockMetrics::add(&self.metrics.requests, 1);
        match u32::from(completion.status) {
            VIRTIO_BLK_S_IOERR => BlockMetrics::add(&self.metrics.errors, 1),
            VIRTIO_BLK_S_UNSUPP => BlockMetrics::add(&self.metrics.unsupported, 1),
            _ => {}
        }
        if self
            .mem
            .write_obj(completion.status, status_seg.addr)
            .is_err()
        {
            BlockMetrics::add(&self.metrics.errors, 1);
            return completion.data_written;
        }
        completion.data_written.saturating_add(1)
    }

    /// Execute a small well-formed read (IN) or write (OUT) that the disk can serve on this
    /// thread without waiting for the device (read data in the host page cache, a write the
    /// page cache takes; see [`DiskBackend::try_read_to_guest_nowait`] and
    /// [`DiskBackend::try_write_from_guest_inline`]) and write its status byte; returns the
    /// used length. `None` leaves the request to [`Executor::run`]: any other request type,
    /// anything invalid (`run` produces the error status) and I/O that would block. Guest
    /// buffers (or the disk range of a write) may then be partly written; `run` writes them
    /// again in full.
    pub fn try_run_inline(&self, chain: &ParsedChain) -> Option<u32> {
        if chain.misordered {
            return None;
        }
        let mut header = [0u8; HEADER_LEN as usize];
        self.read_stream(&chain.readable, 0, &mut header)?;
        let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        let w_total = total(&chain.writable);
        let status_at = w_total.checked_sub(1)?;
        let data_out = total(&chain.readable) - HEADER_LEN;
        let (len, segs) = match req_type {
            VIRTIO_BLK_T_IN if data_out == 0 => {
                (status_at, sub_range(&chain.writable, 0, status_at)?)
            }
            // Without a negotiated FLUSH every write must reach stable storage (blocking).
            VIRTIO_BLK_T_OUT
                if status_at == 0 && self.has(VIRTIO_BLK_F_FLUSH) && !self.disk.is_read_only() =>
            {
                (data_out, sub_range(&chain.readable, HEADER_LEN, data_out)?)
            }
            _ => return None,
        };
        if len == 0 || !len.is_multiple_of(SECTOR_SIZE) || len > INLINE_MAX_LEN {
            return None;
        }
        let status = sub_range(&chain.writable, status_at, 1)?.first().copied()?;
        let mut offset = self.disk_range(sector, len)?;
        if segs.len() > self.limits.seg_max as usize {
            return None;
        }
        for s in segs {
            for slice in GuestMemoryBackend::get_slices(self.mem, s.addr, s.len as usize) {
                let slice = slice.ok()?;
                let done = if req_type == VIRTIO_BLK_T_IN {
                    self.disk.try_read_to_guest_nowait(offset, &slice)
                } else {
                    self.disk.try_write_from_guest_inline(offset, &slice)
                };
                if !matches!(done, Ok(true)) {
                    return None;
                }
                offset += slice.len() as u64;
            }
        }
        self.mem
            .write_obj(VIRTIO_BLK_S_OK as u8, status.addr)
            .ok()?;
        BlockMetrics::add(&self.metrics.requests, 1);
        if req_type == VIRTIO_BLK_T_IN {
            BlockMetrics::add(&self.metrics.reads, 1);
            BlockMetrics::add(&self.metrics.read_bytes, len);
            // `len <= INLINE_MAX_LEN` was checked above.
            Some(len as u32 + 1)
        } else {
            BlockMetrics::add(&self.metrics.writes, 1);
            BlockMetrics::add(&self.metrics.write_bytes, len);
            Some(1)
        }
    }

    fn execute(&self, chain: &ParsedChain, data_in_len: u64) -> Completion {
        let mut header = [0u8; HEADER_LEN as usize];
        if self.read_stream(&chain.readable, 0, &mut header).is_none() {
            return Completion::ioerr();
        }
        let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        let data_out_len = total(&chain.readable) - HEADER_LEN;
        match req_type {
            VIRTIO_BLK_T_IN => {
                if data_out_len != 0 {
                    return Completion::ioerr();
                }
                self.read(chain, sector, data_in_len)
            }
            VIRTIO_BLK_T_OUT => {
                if data_in_len != 0 {
                    return Completion::ioerr();
                }
                self.write(chain, sector, data_out_len)
            }
            VIRTIO_BLK_T_FLUSH => {
                if data_in_len != 0 || data_out_len != 0 {
                    return Completion::ioerr();
                }
                BlockMetrics::add(&self.metrics.flushes, 1);
                match self.disk.flush() {
                    Ok(()) => Completion::ok(0),
                    Err(e) => {
                        tracing::warn!("virtio-blk: flush failed: {e}");
                        Completion::ioerr()
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                if data_out_len != 0 {
                    return Completion::ioerr();
                }
                self.get_id(chain, data_in_len)
            }
            VIRTIO_BLK_T_DISCARD if self.has(VIRTIO_BLK_F_DISCARD) => {
                self.discard_or_zero(chain, data_out_len, data_in_len, false)
            }
            VIRTIO_BLK_T_WRITE_ZEROES if self.has(VIRTIO_BLK_F_WRITE_ZEROES) => {
                self.discard_or_zero(chain, data_out_len, data_in_len, true)
            }
            _ => Completion::unsupp(),
        }
    }

    /// Read `buf.len()` bytes at `start` of a byte stream from guest memory.
    fn read_stream(&self, segs: &[Segment], start: u64, buf: &mut [u8]) -> Option<()> {
        let mut done = 0usize;
        for s in sub_range(segs, start, buf.len() as u64)? {
            let n = s.len as usize;
            self.mem.read_slice(&mut buf[done..done + n], s.addr).ok()?;
            done += n;
        }
        Some(())
    }

    /// Byte offset on the disk of `sector`, if `[sector, +len)` fits the disk.
    fn disk_range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        (offset.checked_add(len)? <= self.disk.size()).then_some(offset)
    }

    fn read(&self, chain: &ParsedChain, sector: u64, len: u64) -> Completion {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Completion::ioerr();
        }
        let Some(mut offset) = self.disk_range(sector, len) else {
            return Completion::ioerr();
        };
        let Some(segs) = sub_range(&chain.writable, 0, len) else {
            return Completion::ioerr();
        };
        if segs.len() > self.limits.seg_max as usize {
            return Completion::ioerr();
        }
        let mut written = 0u64;
        for s in segs {
            for slice in GuestMemoryBackend::get_slices(self.mem, s.addr, s.len as usize) {
                let Ok(slice) = slice else {
                    return Completion::ioerr();
                };
                if let Err(e) = self.disk.read_to_guest(offset, &slice) {
                    tracing::warn!("virtio-blk: read at {offset:#x} failed: {e}");
                    return Completion::ioerr();
                }
                offset += slice.len() as u64;
                written += slice.len() as u64;
            }
        }
        BlockMetrics::add(&self.metrics.reads, 1);
        BlockMetrics::add(&self.metrics.read_bytes, written);
        Completion::ok(written as u32)
    }

    fn write(&self, chain: &ParsedChain, sector: u64, len: u64) -> Completion {
        if self.disk.is_read_only() || !len.is_multiple_of(SECTOR_SIZE) {
            return Completion::ioerr();
        }
        let Some(mut offset) = self.disk_range(sector, len) else {
            return Completion::ioerr();
        };
        let Some(segs) = sub_range(&chain.readable, HEADER_LEN, len) else {
            return Completion::ioerr();
        };
        if segs.len() > self.limits.seg_max as usize {
            return Completion::ioerr();
        }
        for s in segs {
            for slice in GuestMemoryBackend::get_slices(self.mem, s.addr, s.len as usize) {
                let Ok(slice) = slice else {
                    return Completion::ioerr();
                };
                if let Err(e) = self.disk.write_from_guest(offset, &slice) {
                    tracing::warn!("virtio-blk: write at {offset:#x} failed: {e}");
                    return Completion::ioerr();
                }
                offset += slice.len() as u64;
            }
        }
        BlockMetrics::add(&self.metrics.writes, 1);
        BlockMetrics::add(&self.metrics.write_bytes, len);
        // Without a negotiated FLUSH the device must behave as write-through.
        if !self.has(VIRTIO_BLK_F_FLUSH) && self.disk.flush().is_err() {
            return Completion::ioerr();
        }
        Completion::ok(0)
    }

    fn get_id(&self, chain: &ParsedChain, len: u64) -> Completion {
        let n = len.min(u64::from(VIRTIO_BLK_ID_BYTES)) as usize;
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let m = self.serial.len().min(id.len());
        id[..m].copy_from_slice(&self.serial[..m]);
        let Some(segs) = sub_range(&chain.writable, 0, n as u64) else {
            return Completion::ioerr();
        };
        let mut done = 0usize;
        for s in segs {
            let k = s.len as usize;
            if self.mem.write_slice(&id[done..done + k], s.addr).is_err() {
                return Completion::ioerr();
            }
            done += k;
        }
        Completion::ok(n as u32)
    }

    fn discard_or_zero(
        &self,
        chain: &ParsedChain,
        data_len: u64,
        data_in_len: u64,
        zeroes: bool,
    ) -> Completion {
        let (max_seg, max_sectors) = if zeroes {
            (
                self.limits.max_write_zeroes_seg,
                self.limits.max_write_zeroes_sectors,
            )
        } else {
            (self.limits.max_discard_seg, self.limits.max_discard_sectors)
        };
        if data_in_len != 0
            || data_len == 0
            || !data_len.is_multiple_of(DWZ_SEGMENT_LEN)
            || data_len / DWZ_SEGMENT_LEN > u64::from(max_seg)
        {
            return Completion::ioerr();
        }
        if self.disk.is_read_only() {
            return Completion::ioerr();
        }
        BlockMetrics::add(&self.metrics.discards, 1);
        let mut start = HEADER_LEN;
        while start < HEADER_LEN + data_len {
            let mut seg = [0u8; DWZ_SEGMENT_LEN as usize];
            if self.read_stream(&chain.readable, start, &mut seg).is_none() {
                return Completion::ioerr();
            }
            start += DWZ_SEGMENT_LEN;
            let mut s = [0u8; 8];
            s.copy_from_slice(&seg[0..8]);
            let sector = u64::from_le_bytes(s);
            let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let allowed_flags = if zeroes {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed_flags != 0 {
                return Completion::unsupp();
            }
            if num > max_sectors {
                return Completion::ioerr();
            }
            let len = u64::from(num) << SECTOR_SHIFT;
            let Some(offset) = self.disk_range(sector, len) else {
                return Completion::ioerr();
            };
            let result = if !zeroes {
                self.disk.discard(offset, len)
            } else if flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
                // Unmapping is allowed: a punched hole reads as zeroes and frees space.
                match self.disk.discard(offset, len) {
                    Err(DiskError::NotSupported(_)) => self.disk.write_zeroes(offset, len),
                    r => r,
                }
            } else {
                self.disk.write_zeroes(offset, len)
            };
            match result {
                Ok(()) => {}
                // Discard is a hint: a filesystem that cannot punch holes keeps the data.
                Err(DiskError::NotSupported(_)) if !zeroes => {}
                Err(e) => {
                    tracing::warn!("virtio-blk: discard/write-zeroes failed: {e}");
                    return Completion::ioerr();
                }
            }
        }
        Completion::ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u64) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn test_sub_range_spans_segments() {
        let segs = [seg(0x1000, 10), seg(0x2000, 10)];
        assert_eq!(
            sub_range(&segs, 5, 10).unwrap(),
            vec![seg(0x1005, 5), seg(0x2000, 5)]
        );
        assert!(sub_range(&segs, 15, 6).is_none());
        assert!(sub_range(&segs, u64::MAX, 2).is_none());
    }

    #[test]
    fn test_sub_range_address_overflow_is_refused() {
        let segs = [seg(u64::MAX - 2, 10)];
        assert!(sub_range(&segs, 5, 1).is_none());
    }
}
