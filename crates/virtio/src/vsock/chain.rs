//! Reading and writing a descriptor chain's readable / writable parts as one byte stream,
//! through vm-memory (bounds-checked, dirty-tracked).

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_device::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

/// A chain split into its device-readable and device-writable buffers.
#[derive(Debug, Default)]
pub struct ParsedChain {
    /// Device-readable buffers, in order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Segment>,
}

/// The chain cannot be walked (loop, next index out of range, unreadable descriptor table,
/// empty): the queue is broken.
#[derive(Debug, PartialEq, Eq)]
pub struct MalformedChain;

/// Walk a chain. virtio-queue bounds the walk by the queue size, so loops end; when it stops
/// early the last descriptor still has NEXT set, which marks the chain malformed.
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
            parsed.readable.push(seg);
        }
    }
    if count == 0 || last_has_next {
        return Err(MalformedChain);
    }
    Ok(parsed)
}

/// Bytes in `segs`.
pub fn total(segs: &[Segment]) -> usize {
    segs.iter()
        .fold(0u64, |acc, s| acc.saturating_add(s.len))
        .try_into()
        .unwrap_or(usize::MAX)
}

/// Whether every segment is guest RAM.
pub fn all_valid(mem: &GuestMemoryMmap, segs: &[Segment]) -> bool {
    segs.iter()
        .all(|s| usize::try_from(s.len).is_ok_and(|len| mem.check_range(s.addr, len)))
}

/// Visit the pieces of `segs` covering `[offset, offset + len)` as (address, position in
/// the range, length).
fn for_range(
    segs: &[Segment],
    offset: usize,
    len: usize,
    mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), ()>,
) -> Result<(), ()> {
    let end = offset.checked_add(len).ok_or(())?;
    if end > total(segs) {
        return Err(());
    }
    let mut pos = 0usize;
    for s in segs {
        let s_len = usize::try_from(s.len).map_err(|_| ())?;
        let s_end = pos.checked_add(s_len).ok_or(())?;
        let lo = offset.max(pos);
        let hi = end.min(s_end);
        if lo < hi {
            let addr = s.addr.0.checked_add((lo - pos) as u64).ok_or(())?;
            f(GuestAddress(addr), lo - offset, hi - lo)?;
        }
        pos = s_end;
        if pos >= end {
            break;
        }
    }
    Ok(())
}

/// Read `buf.len()` bytes starting `offset` bytes into the stream.
pub fn read(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    offset: usize,
    buf: &mut [u8],
) -> Result<(), ()> {
    let len = buf.len();
    for_range(segs, offset, len, |addr, at, n| {
        mem.read_slice(&mut buf[at..at + n], addr).map_err(|_| ())
    })
}

/// Write `data` starting `offset` bytes into the stream.
pub fn write(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    offset: usize,
    data: &[u8],
) -> Result<(), ()> {
    for_range(segs, offset, data.len(), |addr, at, n| {
        mem.write_slice(&data[at..at + n], addr).map_err(|_| ())
    })
}
