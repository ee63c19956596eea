//! The migration wire protocol. All integers are little-endian.
//!
//! 1. The source opens with [`MAGIC`], the u32 [`PROTOCOL_VERSION`], a u32 length and a JSON
//!    [`Hello`] (the VM's configuration and memory layout). The destination answers
//!    [`Reply::Accept`] or [`Reply::Refuse`]: a different protocol version, Ferrite version or
//!    an impossible configuration is refused here, before any memory moves.
//! 2. The source sends [`Frame`]s: runs of pages with their bytes, runs of zero pages (never
//!    sent as bytes), with a block migration ([`Hello::disks`]) disk blocks with their
//!    bytes and zero ranges of the disks, round markers, then the VM's state (the snapshot state file's bytes,
//!    checksummed) and [`Frame::Done`].
//! 3. The destination builds the VM (vCPUs not running) and answers [`Reply::Ready`], or
//!    [`Reply::Failed`]. The source answers [`Frame::Commit`] and never runs the guest again;
//!    the destination starts the vCPUs and answers [`Reply::Running`]. Until it receives
//!    `Commit`, the destination never runs the guest, and a cut connection makes it discard
//!    everything; until it sends `Commit`, the source can resume.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::error::{MigrationError, Result};

/// The first bytes of every migration stream.
pub const MAGIC: &[u8; 8] = b"FERRMIG\0";
/// This build's protocol version; both sides must speak the same.
/// 2: disk block and disk zero frames, and the hello's disk list (block migration).
pub const PROTOCOL_VERSION: u32 = 2;
/// Guest page size on the wire.
pub const PAGE_SIZE: u64 = 4096;
/// Most pages in one run frame (1 MiB), so a receiver never trusts a huge count.
pub const MAX_RUN_PAGES: u32 = 256;
/// Most bytes in one disk data frame (1 MiB).
pub const MAX_DISK_RUN: u32 = 1 << 20;
/// Disk offsets and lengths on the wire are multiples of this (virtio-blk sectors).
pub const DISK_SECTOR: u64 = 512;
/// Largest hello the destination reads.
pub const MAX_HELLO_BYTES: u32 = 1 << 20;
/// Largest state blob the destination reads.
pub const MAX_STATE_BYTES: u64 = 64 << 20;
/// Longest reason text.
const MAX_REASON_BYTES: u32 = 4096;

/// One guest RAM region as both sides lay it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
}

/// A disk whose contents the source copies (block migration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Its index in the configuration's disk list.
    pub index: u32,
    /// Guest-visible size in bytes (a multiple of [`DISK_SECTOR`]).
    pub virtual_size: u64,
    /// The image format to create it in on the destination (`raw` or `qcow2`).
    pub format: String,
}

/// What the source announces before anything else.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The source's Ferrite version.
    pub ferrite_version: String,
    /// The VM's configuration (the VMM's own type, as JSON).
    pub config: serde_json::Value,
    /// Guest RAM regions in order; page runs name them by index.
    pub regions: Vec<RegionInfo>,
    /// Same-host handover: guest RAM is not copied; the source sends one open memory file
    /// per region ([`MEMORY_FDS_TAG`]) right after [`Reply::Accept`], and the destination
    /// answers [`Reply::Mapped`] once it mapped them.
    #[serde(default)]
    pub memory_fds: bool,
    /// Post-copy: after the pre-copy rounds (if any), the source pauses, sends a
    /// [`Frame::Fetch`] map per region and the state; the destination runs the guest at once
    /// and asks for the pages it touches ([`Reply::Request`]) while the source pushes the rest.
    #[serde(default)]
    pub postcopy: bool,
    /// Block migration: the disks whose contents follow; disk frames name them by position
    /// in this list. Empty: the disks are on storage both sides see.
    #[serde(default)]
    pub disks: Vec<DiskInfo>,
}

/// The message the memory files of a same-host handover are attached to.
pub const MEMORY_FDS_TAG: &[u8; 8] = b"MEMFDS\0\0";

/// Source → destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `count` pages from `first_page` of region `region`; their bytes follow the header
    /// (read them with [`read_pages_into`]).
    Pages {
        /// Region index.
        region: u32,
        /// First page index in the region.
        first_page: u64,
        /// Number of pages (1..=[`MAX_RUN_PAGES`]).
        count: u32,
    },
    /// `count` pages from `first_page` of region `region` are all zero.
    Zero {
        /// Region index.
        region: u32,
        /// First page index in the region.
        first_page: u64,
        /// Number of pages.
        count: u64,
    },
    /// `len` bytes of disk `disk` (position in [`Hello::disks`]) from byte `offset`; the
    /// bytes follow the header (read them with [`read_pages_into`]).
    DiskData {
        /// Position in the hello's disk list.
        disk: u32,
        /// Byte offset (a multiple of [`DISK_SECTOR`]).
        offset: u64,
        /// Bytes (a multiple of [`DISK_SECTOR`], 1..=[`MAX_DISK_RUN`]).
        len: u32,
    },
    /// `len` bytes of disk `disk` from byte `offset` read as zeroes.
    DiskZero {
        /// Position in the hello's disk list.
        disk: u32,
        /// Byte offset (a multiple of [`DISK_SECTOR`]).
        offset: u64,
        /// Bytes (a multiple of [`DISK_SECTOR`]).
        len: u64,
    },
    /// Block migration, right before the source pauses: make the disk data received so far
    /// durable and answer [`Reply::DiskSynced`] (so the flush in the pause is short).
    DiskSync,
    /// Round `n` of the copy starts (for progress reporting).
    Round(u32),
    /// The VM's state (vCPUs, irqchip, clock, devices): the snapshot state file's bytes.
    State(Vec<u8>),
    /// Everything was sent.
    Done,
    /// The source has stopped for good: run the guest.
    Commit,
    /// The source gives up (cancelled, failed): discard everything.
    Abort(String),
    /// Post-copy: the pages of region `region` the destination does not hold yet (one bit a
    /// page, 64 pages a word); any other page it lacks is zero. Sent once per region, after
    /// the pre-copy rounds and before the state.
    Fetch {
        /// Region index.
        region: u32,
        /// The page bitmap, `ceil(pages / 64)` words.
        bitmap: Vec<u64>,
    },
    /// Post-copy: every page of the fetch maps was sent.
    PostcopyEnd,
    /// Round 0 also runs over `count` more connections, each opening with
    /// [`write_parallel_hello`] and `token`, carrying page runs and ending with
    /// [`Frame::Done`]; the next frame on this connection after their pages comes only once
    /// they are all sent.
    Parallel {
        /// Extra connections (1..=[`MAX_PARALLEL`]).
        count: u32,
        /// What each extra connection must present.
        token: u64,
    },
}

/// Most extra connections of a [`Frame::Parallel`].
pub const MAX_PARALLEL: u32 = 15;
/// The first bytes of an extra connection.
pub const PARALLEL_MAGIC: &[u8; 8] = b"FERRPAR\0";

/// Source: open an extra connection (index `index` of a [`Frame::Parallel`] with `token`).
pub fn write_parallel_hello(w: &mut impl Write, token: u64, index: u32) -> Result<()> {
    let mut buf = PARALLEL_MAGIC.to_vec();
    buf.extend_from_slice(&token.to_le_bytes());
    buf.extend_from_slice(&index.to_le_bytes());
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Destination: read an extra connection's opening: (token, index).
pub fn read_parallel_hello(r: &mut impl Read) -> Result<(u64, u32)> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != PARALLEL_MAGIC {
        return Err(protocol("an extra connection that is not the source's"));
    }
    Ok((read_u64(r)?, read_u32(r)?))
}

/// Destination → source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The hello is acceptable: send memory.
    Accept,
    /// The hello is not acceptable (why).
    Refuse(String),
    /// The VM is built from what was sent, vCPUs not yet running.
    Ready,
    /// The VM could not be built from what was sent (why).
    Failed(String),
    /// The guest runs on the destination.
    Running,
    /// Same-host handover: the memory files are mapped and the VM is built over them.
    Mapped,
    /// Post-copy: the guest needs these pages now (they jump the background push).
    Request {
        /// Region index.
        region: u32,
        /// First page index in the region.
        first_page: u64,
        /// Number of pages (1..=[`MAX_RUN_PAGES`]).
        count: u32,
    },
    /// Post-copy: every fetched page is in place; the source may go.
    PostcopyDone,
    /// Block migration: the disk data received so far is durable.
    DiskSynced,
}

const F_PAGES: u8 = 1;
const F_ZERO: u8 = 2;
const F_ROUND: u8 = 3;
const F_STATE: u8 = 4;
const F_DONE: u8 = 5;
const F_COMMIT: u8 = 6;
const F_ABORT: u8 = 7;
const F_DISK_DATA: u8 = 8;
const F_DISK_ZERO: u8 = 9;
const F_DISK_SYNC: u8 = 10;
const R_ACCEPT: u8 = 0x81;
const R_REFUSE: u8 = 0x82;
const R_READY: u8 = 0x83;
const R_FAILED: u8 = 0x84;
const R_RUNNING: u8 = 0x85;
const R_MAPPED: u8 = 0x86;
const F_FETCH: u8 = 0x10;
const F_POSTCOPY_END: u8 = 0x11;
const F_PARALLEL: u8 = 0x12;
const R_REQUEST: u8 = 0x90;
const R_POSTCOPY_DONE: u8 = 0x91;
/// Largest fetch bitmap (words): 64 TiB of guest RAM in one region.
const MAX_FETCH_WORDS: u64 = 1 << 28;
const R_DISK_SYNCED: u8 = 0x87;

fn protocol(msg: impl Into<String>) -> MigrationError {
    MigrationError::Protocol(msg.into())
}

fn read_u8(r: &mut impl Read) -> Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u32(r: &mut impl Read) -> Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_text(r: &mut impl Read) -> Result<String> {
    let len = read_u32(r)?;
    if len > MAX_REASON_BYTES {
        return Err(protocol(format!("a {len}-byte reason is too long")));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn text_bytes(text: &str) -> Vec<u8> {
    let mut end = text.len().min(MAX_REASON_BYTES as usize);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = (end as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&text.as_bytes()[..end]);
    out
}

/// Source: open the stream with the handshake.
pub fn write_hello(w: &mut impl Write, hello: &Hello) -> Result<()> {
    let json = serde_json::to_vec(hello).map_err(|e| protocol(e.to_string()))?;
    let mut buf = Vec::with_capacity(16 + json.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
    buf.extend_from_slice(&json);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Destination: read the handshake. A stream that is not Ferrite's or speaks another
/// protocol version is [`MigrationError::Incompatible`] (answer it with [`Reply::Refuse`]).
pub fn read_hello(r: &mut impl Read) -> Result<Hello> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    // A TLS record: a handshake (0x16), TLS major version 3.
    if magic[..2] == [0x16, 0x03] {
        return Err(MigrationError::Incompatible(
            "the source opened a TLS connection, but this destination takes plaintext \
             migrations: start it with --incoming-tls-cert, --incoming-tls-key and \
             --incoming-tls-ca, or migrate without tls_cert, tls_key and tls_ca"
                .to_string(),
        ));
    }
    if &magic != MAGIC {
        return Err(MigrationError::Incompatible(
            "the peer is not a Ferrite migration source".to_string(),
        ));
    }
    let version = read_u32(r)?;
    if version != PROTOCOL_VERSION {
        return Err(MigrationError::Incompatible(format!(
            "the source speaks migration protocol {version}, this destination {PROTOCOL_VERSION}: \
             run the same Ferrite version on both hosts"
        )));
    }
    let len = read_u32(r)?;
    if len > MAX_HELLO_BYTES {
        return Err(protocol(format!("a {len}-byte hello is too long")));
    }
    let mut json = vec![0u8; len as usize];
    r.read_exact(&mut json)?;
    serde_json::from_slice(&json).map_err(|e| protocol(format!("bad hello: {e}")))
}

/// Encode a frame's header (and, for [`Frame::State`] and [`Frame::Abort`], its payload).
/// A [`Frame::Pages`] header must be followed by the pages' bytes.
pub fn frame_bytes(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    match frame {
        Frame::Pages {
            region,
            first_page,
            count,
        } => {
            out.push(F_PAGES);
            out.extend_from_slice(&region.to_le_bytes());
            out.extend_from_slice(&first_page.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        Frame::Zero {
            region,
            first_page,
            count,
        } => {
            out.push(F_ZERO);
            out.extend_from_slice(&region.to_le_bytes());
            out.extend_from_slice(&first_page.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        Frame::DiskData { disk, offset, len } => {
            out.push(F_DISK_DATA);
            out.extend_from_slice(&disk.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        Frame::DiskZero { disk, offset, len } => {
            out.push(F_DISK_ZERO);
            out.extend_from_slice(&disk.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        Frame::DiskSync => out.push(F_DISK_SYNC),
        Frame::Round(n) => {
            out.push(F_ROUND);
            out.extend_from_slice(&n.to_le_bytes());
        }
        Frame::State(bytes) => {
            out.push(F_STATE);
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
            out.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
        }
        Frame::Done => out.push(F_DONE),
        Frame::Commit => out.push(F_COMMIT),
        Frame::Abort(reason) => {
            out.push(F_ABORT);
            out.extend_from_slice(&text_bytes(reason));
        }
        Frame::Fetch { region, bitmap } => {
            out.reserve(12 + bitmap.len() * 8);
            out.push(F_FETCH);
            out.extend_from_slice(&region.to_le_bytes());
            out.extend_from_slice(&(bitmap.len() as u64).to_le_bytes());
            for w in bitmap {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        Frame::PostcopyEnd => out.push(F_POSTCOPY_END),
        Frame::Parallel { count, token } => {
            out.push(F_PARALLEL);
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&token.to_le_bytes());
        }
    }
    out
}

/// Read the next frame. For [`Frame::Pages`] only the header is read: read the bytes next
/// with [`read_pages_into`].
pub fn read_frame(r: &mut impl Read) -> Result<Frame> {
    Ok(match read_u8(r)? {
        F_PAGES => {
            let region = read_u32(r)?;
            let first_page = read_u64(r)?;
            let count = read_u32(r)?;
            if count == 0 || count > MAX_RUN_PAGES {
                return Err(protocol(format!("a run of {count} pages")));
            }
            Frame::Pages {
                region,
                first_page,
                count,
            }
        }
        F_ZERO => Frame::Zero {
            region: read_u32(r)?,
            first_page: read_u64(r)?,
            count: read_u64(r)?,
        },
        F_DISK_DATA => {
            let (disk, offset, len) = (read_u32(r)?, read_u64(r)?, read_u32(r)?);
            if len == 0 || len > MAX_DISK_RUN {
                return Err(protocol(format!("a disk run of {len} bytes")));
            }
            Frame::DiskData { disk, offset, len }
        }
        F_DISK_ZERO => Frame::DiskZero {
            disk: read_u32(r)?,
            offset: read_u64(r)?,
            len: read_u64(r)?,
        },
        F_DISK_SYNC => Frame::DiskSync,
        F_ROUND => Frame::Round(read_u32(r)?),
        F_STATE => {
            let len = read_u64(r)?;
            if len > MAX_STATE_BYTES {
                return Err(protocol(format!("a {len}-byte state is too large")));
            }
            let mut bytes = vec![0u8; len as usize];
            r.read_exact(&mut bytes)?;
            let crc = read_u32(r)?;
            if crc32fast::hash(&bytes) != crc {
                return Err(protocol("the VM state arrived damaged (checksum mismatch)"));
            }
            Frame::State(bytes)
        }
        F_DONE => Frame::Done,
        F_COMMIT => Frame::Commit,
        F_ABORT => Frame::Abort(read_text(r)?),
        F_FETCH => {
            let region = read_u32(r)?;
            let words = read_u64(r)?;
            if words > MAX_FETCH_WORDS {
                return Err(protocol(format!(
                    "a fetch map of {words} words is too large"
                )));
            }
            let mut raw = vec![0u8; words as usize * 8];
            r.read_exact(&mut raw)?;
            let bitmap = raw
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect();
            Frame::Fetch { region, bitmap }
        }
        F_POSTCOPY_END => Frame::PostcopyEnd,
        F_PARALLEL => {
            let count = read_u32(r)?;
            if count == 0 || count > MAX_PARALLEL {
                return Err(protocol(format!("{count} extra connections")));
            }
            Frame::Parallel {
                count,
                token: read_u64(r)?,
            }
        }
        other => return Err(protocol(format!("unknown frame type {other:#x}"))),
    })
}

/// Where a page run lands: its byte offset and length inside region `region`, checked
/// against `regions` (a run outside guest RAM is a protocol error, never a host write).
pub fn run_bounds(
    regions: &[RegionInfo],
    region: u32,
    first_page: u64,
    count: u64,
) -> Result<(u64, u64)> {
    let info = regions
        .get(region as usize)
        .ok_or_else(|| protocol(format!("page run in region {region}, which does not exist")))?;
    let start = first_page.checked_mul(PAGE_SIZE);
    let len = count.checked_mul(PAGE_SIZE);
    match (start, len) {
        (Some(start), Some(len)) if start.checked_add(len).is_some_and(|end| end <= info.size) => {
            Ok((start, len))
        }
        _ => Err(protocol(format!(
            "page run {first_page}+{count} lies outside region {region} ({} pages)",
            info.size / PAGE_SIZE
        ))),
    }
}

/// Check a [`Frame::Fetch`] map against `regions`: it must name an existing region and hold
/// exactly one bit per page of it (rounded up to whole words), with no bit past its end.
/// Returns the region's page count.
pub fn check_fetch(regions: &[RegionInfo], region: u32, bitmap: &[u64]) -> Result<usize> {
    let info = regions.get(region as usize).ok_or_else(|| {
        protocol(format!(
            "fetch map for region {region}, which does not exist"
        ))
    })?;
    let pages = (info.size / PAGE_SIZE) as usize;
    if bitmap.len() != pages.div_ceil(64) {
        return Err(protocol(format!(
            "the fetch map of region {region} has {} words for {pages} pages",
            bitmap.len()
        )));
    }
    if !pages.is_multiple_of(64) && bitmap.last().is_some_and(|w| w >> (pages % 64) != 0) {
        return Err(protocol(format!(
            "the fetch map of region {region} names pages past its end"
        )));
    }
    Ok(pages)
}

/// Check a disk frame against the announced disks: `disk` exists, `offset..offset+len` is
/// sector-aligned, not empty and inside its virtual size (anything else is a protocol error,
/// never a write).
pub fn disk_bounds(disks: &[DiskInfo], disk: u32, offset: u64, len: u64) -> Result<()> {
    let info = disks.get(disk as usize).ok_or_else(|| {
        protocol(format!(
            "disk data for disk {disk}, which was not announced"
        ))
    })?;
    let aligned = offset.is_multiple_of(DISK_SECTOR) && len.is_multiple_of(DISK_SECTOR) && len > 0;
    let inside = offset
        .checked_add(len)
        .is_some_and(|end| end <= info.virtual_size);
    if aligned && inside {
        Ok(())
    } else {
        Err(protocol(format!(
            "disk run {offset:#x}+{len:#x} is not aligned or lies outside disk {disk} ({} bytes)",
            info.virtual_size
        )))
    }
}

/// Read a page run's bytes into `dest` (exactly the run's length).
pub fn read_pages_into(r: &mut impl Read, dest: &mut [u8]) -> Result<()> {
    r.read_exact(dest)?;
    Ok(())
}

/// Destination: send a reply.
pub fn write_reply(w: &mut impl Write, reply: &Reply) -> Result<()> {
    let mut out = Vec::new();
    match reply {
        Reply::Accept => out.push(R_ACCEPT),
        Reply::Refuse(reason) => {
            out.push(R_REFUSE);
            out.extend_from_slice(&text_bytes(reason));
        }
        Reply::Ready => out.push(R_READY),
        Reply::Failed(reason) => {
            out.push(R_FAILED);
            out.extend_from_slice(&text_bytes(reason));
        }
        Reply::Running => out.push(R_RUNNING),
        Reply::Mapped => out.push(R_MAPPED),
        Reply::Request {
            region,
            first_page,
            count,
        } => {
            out.push(R_REQUEST);
            out.extend_from_slice(&region.to_le_bytes());
            out.extend_from_slice(&first_page.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        Reply::PostcopyDone => out.push(R_POSTCOPY_DONE),
        Reply::DiskSynced => out.push(R_DISK_SYNCED),
    }
    w.write_all(&out)?;
    w.flush()?;
    Ok(())
}

/// Source: read a reply.
pub fn read_reply(r: &mut impl Read) -> Result<Reply> {
    Ok(match read_u8(r)? {
        R_ACCEPT => Reply::Accept,
        R_REFUSE => Reply::Refuse(read_text(r)?),
        R_READY => Reply::Ready,
        R_FAILED => Reply::Failed(read_text(r)?),
        R_RUNNING => Reply::Running,
        R_MAPPED => Reply::Mapped,
        R_REQUEST => {
            let region = read_u32(r)?;
            let first_page = read_u64(r)?;
            let count = read_u32(r)?;
            if count == 0 || count > MAX_RUN_PAGES {
                return Err(protocol(format!("a request for {count} pages")));
            }
            Reply::Request {
                region,
                first_page,
                count,
            }
        }
        R_POSTCOPY_DONE => Reply::PostcopyDone,
        R_DISK_SYNCED => Reply::DiskSynced,
        other => return Err(protocol(format!("unknown reply type {other:#x}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(frame: Frame) -> Frame {
        let bytes = frame_bytes(&frame);
        read_frame(&mut bytes.as_slice()).unwrap()
    }

    #[test]
    fn test_frames_roundtrip() {
        for frame in [
            Frame::Pages {
                region: 1,
                first_page: 7,
                count: 3,
            },
            Frame::Zero {
                region: 0,
                first_page: 1 << 20,
                count: 9,
            },
            Frame::DiskData {
                disk: 1,
                offset: 1 << 30,
                len: 65536,
            },
            Frame::DiskZero {
                disk: 0,
                offset: 512,
                len: 1 << 40,
            },
            Frame::DiskSync,
            Frame::Round(4),
            Frame::State(b"state".to_vec()),
            Frame::Done,
            Frame::Commit,
            Frame::Abort("cancelled".into()),
            Frame::Fetch {
                region: 1,
                bitmap: vec![5, u64::MAX],
            },
            Frame::PostcopyEnd,
            Frame::Parallel {
                count: 3,
                token: 0xfeed,
            },
        ] {
            assert_eq!(roundtrip(frame.clone()), frame);
        }
    }

    #[test]
    fn test_damaged_state_is_refused() {
        let mut bytes = frame_bytes(&Frame::State(b"vcpu state".to_vec()));
        bytes[12] ^= 1;

        let err = read_frame(&mut bytes.as_slice()).unwrap_err().to_string();

        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn test_oversized_and_empty_page_runs_are_refused() {
        for count in [0, MAX_RUN_PAGES + 1] {
            let bytes = frame_bytes(&Frame::Pages {
                region: 0,
                first_page: 0,
                count,
            });
            assert!(read_frame(&mut bytes.as_slice()).is_err(), "{count}");
        }
    }

    #[test]
    fn test_runs_outside_guest_ram_are_refused() {
        let regions = [RegionInfo {
            guest_addr: 0,
            size: 16 * PAGE_SIZE,
        }];

        assert_eq!(
            run_bounds(&regions, 0, 15, 1).unwrap(),
            (15 * PAGE_SIZE, PAGE_SIZE)
        );
        assert!(run_bounds(&regions, 0, 15, 2).is_err());
        assert!(run_bounds(&regions, 1, 0, 1).is_err());
        assert!(run_bounds(&regions, 0, u64::MAX, 1).is_err());
        assert!(run_bounds(&regions, 0, 0, u64::MAX).is_err());
    }

    #[test]
    fn test_fetch_maps_must_fit_their_region() {
        let regions = [RegionInfo {
            guest_addr: 0,
            size: 70 * PAGE_SIZE,
        }];

        assert_eq!(check_fetch(&regions, 0, &[u64::MAX, 0x3f]).unwrap(), 70);
        assert!(check_fetch(&regions, 0, &[u64::MAX, 0x40]).is_err());
        assert!(check_fetch(&regions, 0, &[u64::MAX]).is_err());
        assert!(check_fetch(&regions, 1, &[0, 0]).is_err());
    }

    #[test]
    fn test_disk_runs_outside_the_announced_disks_are_refused() {
        let disks = [DiskInfo {
            index: 3,
            virtual_size: 1 << 20,
            format: "raw".into(),
        }];

        assert!(disk_bounds(&disks, 0, (1 << 20) - 512, 512).is_ok());
        assert!(disk_bounds(&disks, 0, 1 << 20, 512).is_err());
        assert!(disk_bounds(&disks, 1, 0, 512).is_err());
        assert!(disk_bounds(&disks, 0, 100, 512).is_err());
        assert!(disk_bounds(&disks, 0, 0, 0).is_err());
        assert!(disk_bounds(&disks, 0, u64::MAX - 511, 512).is_err());
        let empty = frame_bytes(&Frame::DiskData {
            disk: 0,
            offset: 0,
            len: MAX_DISK_RUN + 512,
        });
        assert!(read_frame(&mut empty.as_slice()).is_err());
    }

    #[test]
    fn test_other_protocol_versions_and_strangers_are_incompatible() {
        let mut stream = MAGIC.to_vec();
        stream.extend_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        let not_ferrite = b"GET / HTTP/1.1\r\n".to_vec();

        let version = read_hello(&mut stream.as_slice()).unwrap_err();
        let stranger = read_hello(&mut not_ferrite.as_slice()).unwrap_err();

        assert!(
            matches!(version, MigrationError::Incompatible(_)),
            "{version}"
        );
        assert!(version.to_string().contains("same Ferrite version"));
        assert!(
            matches!(stranger, MigrationError::Incompatible(_)),
            "{stranger}"
        );
    }

    #[test]
    fn test_hello_and_replies_roundtrip() {
        let hello = Hello {
            ferrite_version: "0.1.0".into(),
            config: serde_json::json!({"vcpus": 2}),
            regions: vec![RegionInfo {
                guest_addr: 0,
                size: 1 << 20,
            }],
            memory_fds: false,
            postcopy: true,
            disks: vec![DiskInfo {
                index: 0,
                virtual_size: 1 << 30,
                format: "raw".into(),
            }],
        };
        let mut buf = Vec::new();
        write_hello(&mut buf, &hello).unwrap();
        for reply in [
            Reply::Accept,
            Reply::Refuse("no".into()),
            Reply::Ready,
            Reply::Failed("bad".into()),
            Reply::Running,
            Reply::Mapped,
            Reply::Request {
                region: 0,
                first_page: 9,
                count: 2,
            },
            Reply::PostcopyDone,
            Reply::DiskSynced,
        ] {
            write_reply(&mut buf, &reply).unwrap();
        }

        let mut r = buf.as_slice();
        let got = read_hello(&mut r).unwrap();
        let replies: Vec<Reply> = (0..9).map(|_| read_reply(&mut r).unwrap()).collect();

        assert_eq!(got.regions, hello.regions);
        assert!(got.postcopy);
        assert_eq!(
            replies[6],
            Reply::Request {
                region: 0,
                first_page: 9,
                count: 2
            }
        );
        assert_eq!(replies[7], Reply::PostcopyDone);
        assert_eq!(replies[8], Reply::DiskSynced);
        assert_eq!(got.disks, hello.disks);
        assert_eq!(replies[1], Reply::Refuse("no".into()));
        assert_eq!(replies[4], Reply::Running);
        assert_eq!(replies[5], Reply::Mapped);
    }
}
