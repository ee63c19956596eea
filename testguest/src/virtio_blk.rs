//! virtio-blk driver (virtio 1.2, modern PCI transport, split ring, polled) at CPL3.

use core::fmt;
use core::sync::atomic::{fence, Ordering};

use crate::pci::{BarKind, Cfg, Func};
use crate::sys::{self, mmio, phys_ok};

/// Most disks driven.
pub const MAX_DISKS: usize = 8;
/// Ring size used (or the device maximum if smaller).
const QUEUE_SIZE: u16 = 64;
/// Sectors per data request.
pub const CHUNK_SECTORS: u64 = 128;
const CHUNK_BYTES: usize = CHUNK_SECTORS as usize * 512;

/// Feature bits.
pub mod feat {
    /// Maximum segments per request.
    pub const SEG_MAX: u64 = 1 << 2;
    /// Read-only device.
    pub const RO: u64 = 1 << 5;
    /// Block size reported.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Flush command.
    pub const FLUSH: u64 = 1 << 9;
    /// Discard command.
    pub const DISCARD: u64 = 1 << 13;
    /// Write-zeroes command.
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// Virtio 1.x device.
    pub const VERSION_1: u64 = 1 << 32;
}

const WANTED: u64 = feat::VERSION_1
    | feat::RO
    | feat::FLUSH
    | feat::BLK_SIZE
    | feat::SEG_MAX
    | feat::DISCARD
    | feat::WRITE_ZEROES;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const S_ACK: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;
const S_FAILED: u8 = 128;

/// Why a disk operation failed.
#[derive(Clone, Copy)]
pub enum BlkError {
    /// Device status VIRTIO_BLK_S_IOERR.
    IoErr,
    /// Device status VIRTIO_BLK_S_UNSUPP.
    Unsupp,
    /// Any other status byte.
    BadStatus(u8),
    /// No used-ring entry before the deadline.
    Timeout,
    /// Used ring returned an unexpected descriptor id.
    BadUsed(u32),
    /// Range outside the capacity.
    Range,
    /// Feature needed by the command was not negotiated.
    NotNegotiated(&'static str),
    /// The queue is unusable after an earlier timeout.
    Broken,
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkError::IoErr => write!(f, "status=IOERR"),
            BlkError::Unsupp => write!(f, "status=UNSUPP"),
            BlkError::BadStatus(s) => write!(f, "status={s}"),
            BlkError::Timeout => write!(f, "timeout"),
            BlkError::BadUsed(id) => write!(f, "bad-used-id={id}"),
            BlkError::Range => write!(f, "out-of-range"),
            BlkError::NotNegotiated(n) => write!(f, "feature-not-negotiated={n}"),
            BlkError::Broken => write!(f, "queue-broken"),
        }
    }
}

/// Why a virtio-blk function could not be brought up.
#[derive(Clone, Copy)]
pub enum InitError {
    /// A required capability is missing or points outside its BAR.
    Caps(&'static str),
    /// The device did not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// FEATURES_OK did not stick.
    FeaturesRejected,
    /// Queue 0 has size 0 or is already enabled.
    Queue,
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::Caps(c) => write!(f, "bad-capability={c}"),
            InitError::NoVersion1 => write!(f, "no-version-1"),
            InitError::FeaturesRejected => write!(f, "features-rejected"),
            InitError::Queue => write!(f, "queue-unavailable"),
        }
    }
}

#[repr(C, align(4096))]
struct QueueMem([u8; 2 * 4096]);

#[repr(C, align(4096))]
struct DmaMem([u8; 4096 + CHUNK_BYTES]);

static mut QUEUES: [QueueMem; MAX_DISKS] = [const { QueueMem([0; 2 * 4096]) }; MAX_DISKS];
static mut DMA: DmaMem = DmaMem([0; 4096 + CHUNK_BYTES]);

const DMA_HDR: u64 = 0;
const DMA_STATUS: u64 = 64;
const DMA_ID: u64 = 128;
const DMA_SEG: u64 = 192;
const DMA_DATA: u64 = 4096;

fn dma_base() -> u64 {
    // SAFETY: only the address is taken.
    core::ptr::addr_of_mut!(DMA) as u64
}

/// The shared data buffer (CHUNK_SECTORS sectors).
pub fn data_buf() -> &'static mut [u8] {
    // SAFETY: single-threaded CPL3 code; callers never hold two of these at once and
    // the device only writes it while a request is in flight inside `Disk::request`.
    unsafe { core::slice::from_raw_parts_mut((dma_base() + DMA_DATA) as *mut u8, CHUNK_BYTES) }
}

/// One initialised virtio-blk device.
pub struct Disk {
    /// PCI location.
    pub bdf: (u8, u8, u8),
    common: u64,
    notify: u64,
    devcfg: u64,
    /// Features the device offered.
    pub offered: u64,
    /// Features negotiated.
    pub features: u64,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size (512 if not offered).
    pub blk_size: u32,
    /// Max segments (0 if not offered).
    pub seg_max: u32,
    max_discard: u32,
    max_zeroes: u32,
    qsize: u16,
    qmem: u64,
    avail_idx: u16,
    last_used: u16,
    broken: bool,
    timeout_ticks: u64,
    /// IDT vector the queue's MSI-X message targets, if MSI-X is in use.
    pub msix_vector: Option<u8>,
}

struct Caps {
    common: Option<u64>,
    notify: Option<(u64, u32)>,
    devcfg: Option<u64>,
    isr: Option<u64>,
    /// MSI-X (capability offset, table address, table size).
    msix: Option<(u16, u64, u16)>,
}

fn find_caps(cfg: &Cfg, func: &Func) -> Caps {
    let mut caps = Caps {
        common: None,
        notify: None,
        devcfg: None,
        isr: None,
        msix: None,
    };
    cfg.caps(|off, id| {
        if id == 0x11 && caps.msix.is_none() {
            let size = (cfg.r16(off + 2) & 0x7ff) + 1;
            let table = cfg.r32(off + 4);
            if let Some(b) = func.bars.get((table & 7) as usize) {
                let offset = (table & !7) as u64;
                let bytes = size as u64 * 16;
                let mem = matches!(b.kind, BarKind::Mem32 | BarKind::Mem64) && b.addr != 0;
                if mem && offset + bytes <= b.size && phys_ok(b.addr.saturating_add(offset), bytes)
                {
                    caps.msix = Some((off, b.addr + offset, size));
                }
            }
            return;
        }
        if id != 0x09 {
            return;
        }
        let kind = cfg.r8(off + 3);
        let bar = cfg.r8(off + 4) as usize;
        let offset = cfg.r32(off + 8) as u64;
        let length = cfg.r32(off + 12) as u64;
        let Some(b) = func.bars.get(bar) else { return };
        if !matches!(b.kind, BarKind::Mem32 | BarKind::Mem64) || b.addr == 0 {
            return;
        }
        if offset.checked_add(length).is_none_or(|end| end > b.size)
            || !phys_ok(b.addr.saturating_add(offset), length.max(1))
        {
            return;
        }
        let addr = b.addr + offset;
        match kind {
            1 if caps.common.is_none() && length >= 0x38 => caps.common = Some(addr),
            2 if caps.notify.is_none() => caps.notify = Some((addr, cfg.r32(off + 16))),
            3 if caps.isr.is_none() => caps.isr = Some(addr),
            4 if caps.devcfg.is_none() && length >= 8 => caps.devcfg = Some(addr),
            _ => {}
        }
    });
    caps
}

/// Routes queue 0 to MSI-X table entry 0, which targets the BSP's vector
/// `VEC_MSIX_FIRST + slot`. Completion is still polled; the interrupts are only counted
/// (to prove delivery). Returns the vector, or None if the device refused it.
fn enable_msix(
    cfg: &Cfg,
    (cap, table, size): (u16, u64, u16),
    slot: usize,
    common: u64,
) -> Option<u8> {
    if size == 0 || slot as u64 >= crate::abi::MSIX_VECTORS {
        return None;
    }
    let vector = (crate::abi::VEC_MSIX_FIRST + slot as u64) as u8;
    let ctrl = cfg.r16(cap + 2);
    cfg.w16(cap + 2, ctrl | (1 << 15) | (1 << 14)); // enable, function masked
    let dest = crate::platform::bsp_apic_id();
    mmio::w32(table, 0xfee0_0000 | (dest << 12));
    mmio::w32(table + 4, 0);
    mmio::w32(table + 8, vector as u32);
    mmio::w32(table + 12, 0); // unmasked
    cfg.w16(cap + 2, (ctrl | (1 << 15)) & !(1 << 14));
    mmio::w16(common + 0x1a, 0); // queue 0 -> table entry 0
    if mmio::r16(common + 0x1a) == 0 {
        Some(vector)
    } else {
        mmio::w16(common + 0x1a, 0xffff);
        cfg.w16(cap + 2, ctrl & !(1 << 15));
        None
    }
}

impl Disk {
    /// Resets and initialises the device behind `func`, using queue memory slot `slot`.
    pub fn init(cfg: &Cfg, func: &Func, slot: usize, tsc_hz: u64) -> Result<Disk, InitError> {
        let caps = find_caps(cfg, func);
        let common = caps.common.ok_or(InitError::Caps("common"))?;
        let (notify_base, mult) = caps.notify.ok_or(InitError::Caps("notify"))?;
        let devcfg = caps.devcfg.ok_or(InitError::Caps("device"))?;
        caps.isr.ok_or(InitError::Caps("isr"))?;
        // Memory decoding + bus mastering.
        cfg.w16(0x04, cfg.r16(0x04) | 0x6);

        let status = |v: u8| mmio::w8(common + 0x14, v);
        status(0);
        let mut tries = 0;
        while mmio::r8(common + 0x14) != 0 && tries < 100_000 {
            tries += 1;
        }
        status(S_ACK);
        status(S_ACK | S_DRIVER);
        mmio::w32(common, 0);
        let lo = mmio::r32(common + 0x04) as u64;
        mmio::w32(common, 1);
        let hi = mmio::r32(common + 0x04) as u64;
        let offered = lo | (hi << 32);
        if offered & feat::VERSION_1 == 0 {
            status(S_FAILED);
            return Err(InitError::NoVersion1);
        }
        let features = offered & WANTED;
        mmio::w32(common + 0x08, 0);
        mmio::w32(common + 0x0c, features as u32);
        mmio::w32(common + 0x08, 1);
        mmio::w32(common + 0x0c, (features >> 32) as u32);
        status(S_ACK | S_DRIVER | S_FEATURES_OK);
        if mmio::r8(common + 0x14) & S_FEATURES_OK == 0 {
            status(S_FAILED);
            return Err(InitError::FeaturesRejected);
        }

        mmio::w16(common + 0x10, 0xffff); // config MSI-X vector: none
        mmio::w16(common + 0x16, 0); // queue_select
        let max = mmio::r16(common + 0x18);
        if max == 0 || mmio::r16(common + 0x1c) != 0 {
            status(S_FAILED);
            return Err(InitError::Queue);
        }
        let qsize = max.min(QUEUE_SIZE);
        // SAFETY: only the address of this disk's queue slot is taken.
        let qmem = unsafe { core::ptr::addr_of_mut!(QUEUES[slot % MAX_DISKS]) as u64 };
        for i in 0..(2 * 4096 / 8) {
            mmio::w64(qmem + i * 8, 0);
        }
        mmio::w16(common + 0x18, qsize);
        let msix_vector = caps.msix.and_then(|m| enable_msix(cfg, m, slot, common));
        mmio::w64(common + 0x20, qmem); // descriptors
        mmio::w64(common + 0x28, qmem + 2048); // driver (avail) ring
        mmio::w64(common + 0x30, qmem + 4096); // device (used) ring
        let notify_off = mmio::r16(common + 0x1e) as u64;
        let notify = notify_base.saturating_add(notify_off * mult as u64);
        if !phys_ok(notify, 2) {
            status(S_FAILED);
            return Err(InitError::Caps("notify-offset"));
        }
        mmio::w16(common + 0x1c, 1); // queue_enable

        let mut disk = Disk {
            bdf: (func.bus, func.dev, func.func),
            common,
            notify,
            devcfg,
            offered,
            features,
            capacity: 0,
            blk_size: 512,
            seg_max: 0,
            max_discard: 0,
            max_zeroes: 0,
            qsize,
            qmem,
            avail_idx: 0,
            last_used: 0,
            broken: false,
            timeout_ticks: tsc_hz.saturating_mul(30),
            msix_vector,
        };
        disk.read_config();
        status(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        Ok(disk)
    }

    fn read_config(&mut self) {
        for _ in 0..8 {
            let gen = mmio::r8(self.common + 0x15);
            let d = self.devcfg;
            self.capacity = mmio::r32(d) as u64 | (mmio::r32(d + 4) as u64) << 32;
            if self.features & feat::SEG_MAX != 0 {
                self.seg_max = mmio::r32(d + 12);
            }
            if self.features & feat::BLK_SIZE != 0 {
                let bs = mmio::r32(d + 20);
                if bs.is_power_of_two() && bs >= 512 {
                    self.blk_size = bs;
                }
            }
            if self.features & feat::DISCARD != 0 {
                self.max_discard = mmio::r32(d + 36);
            }
            if self.features & feat::WRITE_ZEROES != 0 {
                self.max_zeroes = mmio::r32(d + 48);
            }
            if mmio::r8(self.common + 0x15) == gen {
                break;
            }
        }
    }

    /// True if the device is read-only (VIRTIO_BLK_F_RO negotiated).
    pub fn ro(&self) -> bool {
        self.features & feat::RO != 0
    }

    fn desc(&self, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.qmem + i * 16;
        mmio::w64(d, addr);
        mmio::w32(d + 8, len);
        mmio::w16(d + 12, flags);
        mmio::w16(d + 14, next);
    }

    /// Submits one request (header, optional data, status) and polls for completion.
    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<(u64, u32, bool)>,
    ) -> Result<u32, BlkError> {
        if self.broken {
            return Err(BlkError::Broken);
        }
        let dma = dma_base();
        mmio::w32(dma + DMA_HDR, kind);
        mmio::w32(dma + DMA_HDR + 4, 0);
        mmio::w64(dma + DMA_HDR + 8, sector);
        mmio::w8(dma + DMA_STATUS, 0xff);
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        self.desc(0, dma + DMA_HDR, 16, NEXT, 1);
        let last = match data {
            Some((addr, len, device_writes)) => {
                self.desc(
                    1,
                    addr,
                    len,
                    NEXT | if device_writes { WRITE } else { 0 },
                    2,
                );
                2
            }
            None => 1,
        };
        self.desc(last, dma + DMA_STATUS, 1, WRITE, 0);
        let avail = self.qmem + 2048;
        let used = self.qmem + 4096;
        mmio::w16(avail + 4 + 2 * (self.avail_idx % self.qsize) as u64, 0);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mmio::w16(avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        mmio::w16(self.notify, 0);
        let deadline = sys::rdtsc().wrapping_add(self.timeout_ticks);
        loop {
            fence(Ordering::SeqCst);
            if mmio::r16(used + 2) != self.last_used {
                break;
            }
            if (sys::rdtsc().wrapping_sub(deadline) as i64) > 0 {
                self.broken = true;
                return Err(BlkError::Timeout);
            }
            core::hint::spin_loop();
        }
        fence(Ordering::SeqCst);
        let elem = used + 4 + 8 * (self.last_used % self.qsize) as u64;
        self.last_used = self.last_used.wrapping_add(1);
        let id = mmio::r32(elem);
        let len = mmio::r32(elem + 4);
        if id != 0 {
            self.broken = true;
            return Err(BlkError::BadUsed(id));
        }
        match mmio::r8(dma + DMA_STATUS) {
            0 => Ok(len),
            1 => Err(BlkError::IoErr),
            2 => Err(BlkError::Unsupp),
            s => Err(BlkError::BadStatus(s)),
        }
    }

    fn check_range(&self, sector: u64, count: u64) -> Result<(), BlkError> {
        match sector.checked_add(count) {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(BlkError::Range),
        }
    }

    /// Reads `count` (<= CHUNK_SECTORS) sectors into `data_buf()`.
    pub fn read_chunk(&mut self, sector: u64, count: u64) -> Result<(), BlkError> {
        self.check_range(sector, count)?;
        let len = (count.min(CHUNK_SECTORS) * 512) as u32;
        self.request(T_IN, sector, Some((dma_base() + DMA_DATA, len, true)))
            .map(|_| ())
    }

    /// Writes `count` (<= CHUNK_SECTORS) sectors from `data_buf()`. The range is checked
    /// against the capacity; a read-only device still gets the request so its own
    /// status is reported.
    pub fn write_chunk(&mut self, sector: u64, count: u64) -> Result<(), BlkError> {
        self.check_range(sector, count)?;
        let len = (count.min(CHUNK_SECTORS) * 512) as u32;
        self.request(T_OUT, sector, Some((dma_base() + DMA_DATA, len, false)))
            .map(|_| ())
    }

    /// VIRTIO_BLK_T_FLUSH.
    pub fn flush(&mut self) -> Result<(), BlkError> {
        if self.features & feat::FLUSH == 0 {
            return Err(BlkError::NotNegotiated("FLUSH"));
        }
        self.request(T_FLUSH, 0, None).map(|_| ())
    }

    /// VIRTIO_BLK_T_GET_ID: the serial string (up to 20 bytes) into `out`; returns its length.
    pub fn get_id(&mut self, out: &mut [u8; 20]) -> Result<usize, BlkError> {
        let dma = dma_base();
        for i in 0..20 {
            mmio::w8(dma + DMA_ID + i, 0);
        }
        self.request(T_GET_ID, 0, Some((dma + DMA_ID, 20, true)))?;
        let mut n = 0;
        while n < 20 {
            let b = mmio::r8(dma + DMA_ID + n as u64);
            if b == 0 {
                break;
            }
            out[n] = b;
            n += 1;
        }
        Ok(n)
    }

    /// Discard (`zeroes` false) or write-zeroes (`zeroes` true) over a range, split by the
    /// device's per-request maximum.
    pub fn discard_or_zero(
        &mut self,
        zeroes: bool,
        sector: u64,
        count: u64,
    ) -> Result<u64, BlkError> {
        let (bit, name, max, kind) = if zeroes {
            (
                feat::WRITE_ZEROES,
                "WRITE_ZEROES",
                self.max_zeroes,
                T_WRITE_ZEROES,
            )
        } else {
            (feat::DISCARD, "DISCARD", self.max_discard, T_DISCARD)
        };
        if self.features & bit == 0 {
            return Err(BlkError::NotNegotiated(name));
        }
        self.check_range(sector, count)?;
        let max = if max == 0 {
            u32::MAX as u64
        } else {
            max as u64
        };
        let dma = dma_base();
        let mut done = 0;
        let mut requests = 0;
        while done < count {
            let n = (count - done).min(max);
            mmio::w64(dma + DMA_SEG, sector + done);
            mmio::w32(dma + DMA_SEG + 8, n as u32);
            mmio::w32(dma + DMA_SEG + 12, 0);
            self.request(kind, 0, Some((dma + DMA_SEG, 16, false)))?;
            done += n;
            requests += 1;
        }
        Ok(requests)
    }
}
