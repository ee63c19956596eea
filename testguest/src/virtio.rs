//! The generic virtio-pci layer every test-guest device driver builds on (virtio 1.2 §4.1,
//! modern transport, split virtqueues, polled at CPL3):
//!
//! - [`Transport`]: capability discovery, reset, feature negotiation, queue setup, MSI-X,
//!   device configuration access and status;
//! - [`Virtq`]: a split virtqueue with a private free list (the device never sees the list,
//!   so a hostile or buggy device cannot corrupt it), `add` / `kick` / `poll` / `wait`, and raw
//!   accessors for the `hostile` command;
//! - [`dma_alloc`]: a bump allocator of zeroed, page-aligned guest-physical memory for rings
//!   and buffers (identity mapped, so an address is both a pointer and a DMA address).
//!
//! Typical use:
//!
//! ```ignore
//! let mut t = Transport::probe(&cfg, &func)?;          // reset, ACKNOWLEDGE | DRIVER
//! let feats = t.negotiate(feat::VERSION_1 | MY_FEATURES)?; // FEATURES_OK
//! let vector = t.enable_msix(slot);                    // optional, entry 0 -> VEC_MSIX_FIRST+slot
//! let mut q = t.setup_queue(0, 128)?;                   // queue 0, at most 128 entries
//! t.driver_ok();
//! let buf = dma_alloc(4096).unwrap();
//! let head = q.add(&[Buf::write(buf, 4096)]).unwrap();   // device-writable buffer
//! q.kick();
//! let (id, len) = q.wait(tsc_hz).ok_or(..)?;            // one second timeout
//! ```

// Drivers use different parts of this layer; a build without one of them must not warn.
#![allow(dead_code)]

use core::fmt;
use core::sync::atomic::{fence, Ordering};

use crate::pci::{BarKind, Cfg, Func};
use crate::sys::{self, mmio, phys_ok};

/// Common feature bits (virtio 1.2 §6).
pub mod feat {
    /// Indirect descriptors.
    pub const INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event suppression.
    pub const EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.x device (mandatory for the modern transport).
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Features negotiated.
    pub const FEATURES_OK: u8 = 8;
    /// The device needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// Descriptor flags.
pub mod desc_flags {
    /// The chain continues at `next`.
    pub const NEXT: u16 = 1;
    /// The device writes this buffer.
    pub const WRITE: u16 = 2;
    /// The buffer is an indirect descriptor table.
    pub const INDIRECT: u16 = 4;
}

/// Offsets in the common configuration structure (virtio 1.2 §4.1.4.3).
pub mod common {
    /// device_feature_select.
    pub const DFSELECT: u64 = 0x00;
    /// device_feature.
    pub const DF: u64 = 0x04;
    /// driver_feature_select.
    pub const GFSELECT: u64 = 0x08;
    /// driver_feature.
    pub const GF: u64 = 0x0c;
    /// config_msix_vector.
    pub const MSIX_CONFIG: u64 = 0x10;
    /// num_queues.
    pub const NUM_QUEUES: u64 = 0x12;
    /// device_status.
    pub const STATUS: u64 = 0x14;
    /// config_generation.
    pub const CFG_GENERATION: u64 = 0x15;
    /// queue_select.
    pub const Q_SELECT: u64 = 0x16;
    /// queue_size.
    pub const Q_SIZE: u64 = 0x18;
    /// queue_msix_vector.
    pub const Q_MSIX: u64 = 0x1a;
    /// queue_enable.
    pub const Q_ENABLE: u64 = 0x1c;
    /// queue_notify_off.
    pub const Q_NOFF: u64 = 0x1e;
    /// queue_desc.
    pub const Q_DESC: u64 = 0x20;
    /// queue_driver (avail ring).
    pub const Q_AVAIL: u64 = 0x28;
    /// queue_device (used ring).
    pub const Q_USED: u64 = 0x30;
}

/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;
/// Largest queue a [`Virtq`] manages (its private bookkeeping is sized for this).
pub const MAX_QUEUE_SIZE: u16 = 256;

/// Why a device could not be brought up.
#[derive(Clone, Copy, Debug)]
pub enum InitError {
    /// A required capability is missing or points outside its BAR.
    Caps(&'static str),
    /// The device did not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// FEATURES_OK did not stick.
    FeaturesRejected,
    /// The queue does not exist, has size 0, or is already enabled.
    Queue(u16),
    /// The DMA pool is exhausted.
    NoMemory,
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::Caps(c) => write!(f, "bad-capability={c}"),
            InitError::NoVersion1 => write!(f, "no-version-1"),
            InitError::FeaturesRejected => write!(f, "features-rejected"),
            InitError::Queue(q) => write!(f, "queue-unavailable={q}"),
            InitError::NoMemory => write!(f, "out-of-dma-memory"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DMA pool.

/// Bytes of the DMA pool.
pub const DMA_POOL_BYTES: usize = 4 << 20;
const PAGE: u64 = 4096;

#[repr(C, align(4096))]
struct DmaPool([u8; DMA_POOL_BYTES]);

static mut DMA_POOL: DmaPool = DmaPool([0; DMA_POOL_BYTES]);
static mut DMA_NEXT: u64 = 0;

/// `bytes` (rounded up to whole pages) of zeroed, page-aligned memory that stays allocated
/// forever, or None when the pool is exhausted. Single-threaded CPL3 code only.
pub fn dma_alloc(bytes: usize) -> Option<u64> {
    let pages = (bytes as u64).div_ceil(PAGE).max(1);
    // SAFETY: single-threaded CPL3 code; the pool and its cursor are only touched here.
    unsafe {
        let base = core::ptr::addr_of_mut!(DMA_POOL) as u64;
        let next = core::ptr::addr_of_mut!(DMA_NEXT);
        let off = next.read();
        let end = off.checked_add(pages * PAGE)?;
        if end > DMA_POOL_BYTES as u64 {
            return None;
        }
        next.write(end);
        let addr = base + off;
        for i in 0..(pages * PAGE / 8) {
            mmio::w64(addr + i * 8, 0);
        }
        Some(addr)
    }
}

/// Bytes of the DMA pool still free.
pub fn dma_free_bytes() -> u64 {
    // SAFETY: read of the cursor; single-threaded.
    DMA_POOL_BYTES as u64 - unsafe { core::ptr::addr_of!(DMA_NEXT).read() }
}

// ---------------------------------------------------------------------------------------------
// Transport.

/// One virtio-pci function being driven.
pub struct Transport {
    /// PCI location (bus, device, function).
    pub bdf: (u8, u8, u8),
    /// PCI device ID (0x1040 + virtio device type for modern devices).
    pub device_id: u16,
    cfg: Cfg,
    common: u64,
    notify_base: u64,
    notify_mult: u32,
    isr: u64,
    devcfg: u64,
    devcfg_len: u64,
    /// MSI-X (capability offset, table address, table size).
    msix: Option<(u16, u64, u16)>,
    /// Features the device offered.
    pub offered: u64,
    /// Features negotiated.
    pub features: u64,
}

struct Caps {
    common: Option<u64>,
    notify: Option<(u64, u32)>,
    devcfg: Option<(u64, u64)>,
    isr: Option<u64>,
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
            4 if caps.devcfg.is_none() => caps.devcfg = Some((addr, length)),
            _ => {}
        }
    });
    caps
}

impl Transport {
    /// Finds the capabilities, enables memory decoding and bus mastering, resets the device
    /// and sets ACKNOWLEDGE | DRIVER.
    pub fn probe(cfg: &Cfg, func: &Func) -> Result<Transport, InitError> {
        let caps = find_caps(cfg, func);
        let common = caps.common.ok_or(InitError::Caps("common"))?;
        let (notify_base, notify_mult) = caps.notify.ok_or(InitError::Caps("notify"))?;
        let isr = caps.isr.ok_or(InitError::Caps("isr"))?;
        let (devcfg, devcfg_len) = caps.devcfg.unwrap_or((0, 0));
        cfg.w16(0x04, cfg.r16(0x04) | 0x6);
        let t = Transport {
            bdf: (func.bus, func.dev, func.func),
            device_id: func.device,
            cfg: *cfg,
            common,
            notify_base,
            notify_mult,
            isr,
            devcfg,
            devcfg_len,
            msix: caps.msix,
            offered: 0,
            features: 0,
        };
        t.reset();
        t.set_status(status::ACKNOWLEDGE);
        t.set_status(status::ACKNOWLEDGE | status::DRIVER);
        Ok(t)
    }

    /// Writes 0 to device_status and waits (bounded) for the device to read back 0.
    pub fn reset(&self) {
        self.set_status(0);
        let mut tries = 0;
        while self.status() != 0 && tries < 100_000 {
            tries += 1;
            core::hint::spin_loop();
        }
    }

    /// device_status.
    pub fn status(&self) -> u8 {
        mmio::r8(self.common + common::STATUS)
    }

    /// Writes device_status.
    pub fn set_status(&self, s: u8) {
        mmio::w8(self.common + common::STATUS, s);
    }

    /// Reads the offered features, accepts `offered & wanted`, sets FEATURES_OK and checks it
    /// stuck. VERSION_1 is required.
    pub fn negotiate(&mut self, wanted: u64) -> Result<u64, InitError> {
        let c = self.common;
        mmio::w32(c + common::DFSELECT, 0);
        let lo = mmio::r32(c + common::DF) as u64;
        mmio::w32(c + common::DFSELECT, 1);
        let hi = mmio::r32(c + common::DF) as u64;
        self.offered = lo | (hi << 32);
        if self.offered & feat::VERSION_1 == 0 {
            self.set_status(status::FAILED);
            return Err(InitError::NoVersion1);
        }
        let features = self.offered & (wanted | feat::VERSION_1);
        mmio::w32(c + common::GFSELECT, 0);
        mmio::w32(c + common::GF, features as u32);
        mmio::w32(c + common::GFSELECT, 1);
        mmio::w32(c + common::GF, (features >> 32) as u32);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            self.set_status(status::FAILED);
            return Err(InitError::FeaturesRejected);
        }
        self.features = features;
        mmio::w16(c + common::MSIX_CONFIG, NO_VECTOR);
        Ok(features)
    }

    /// True if `bit` (a feature mask) was negotiated.
    pub fn has(&self, bit: u64) -> bool {
        self.features & bit != 0
    }

    /// num_queues.
    pub fn num_queues(&self) -> u16 {
        mmio::r16(self.common + common::NUM_QUEUES)
    }

    /// Programs MSI-X table entry 0 to deliver vector `VEC_MSIX_FIRST + slot` to the BSP (the
    /// kernel counts those interrupts; drivers still poll). Queues set up afterwards with
    /// [`Transport::setup_queue`] are routed to entry 0. Returns the vector, or None.
    pub fn enable_msix(&mut self, slot: usize) -> Option<u8> {
        let (cap, table, size) = self.msix?;
        if size == 0 || slot as u64 >= crate::abi::MSIX_VECTORS {
            return None;
        }
        let cfg = &self.cfg;
        let vector = (crate::abi::VEC_MSIX_FIRST + slot as u64) as u8;
        let ctrl = cfg.r16(cap + 2);
        cfg.w16(cap + 2, ctrl | (1 << 15) | (1 << 14)); // enable, function masked
        let dest = crate::platform::bsp_apic_id();
        mmio::w32(table, 0xfee0_0000 | (dest << 12));
        mmio::w32(table + 4, 0);
        mmio::w32(table + 8, vector as u32);
        mmio::w32(table + 12, 0); // unmasked
        cfg.w16(cap + 2, (ctrl | (1 << 15)) & !(1 << 14));
        Some(vector)
    }

    fn msix_enabled(&self) -> bool {
        self.msix
            .is_some_and(|(cap, _, _)| self.cfg.r16(cap + 2) & (1 << 15) != 0)
    }

    /// Sets up queue `index` with at most `max_size` entries (also capped by the device and by
    /// [`MAX_QUEUE_SIZE`]) and enables it. EVENT_IDX is used if negotiated.
    pub fn setup_queue(&mut self, index: u16, max_size: u16) -> Result<Virtq, InitError> {
        let c = self.common;
        if index >= self.num_queues() {
            return Err(InitError::Queue(index));
        }
        mmio::w16(c + common::Q_SELECT, index);
        let dev_max = mmio::r16(c + common::Q_SIZE);
        if dev_max == 0 || mmio::r16(c + common::Q_ENABLE) != 0 {
            return Err(InitError::Queue(index));
        }
        let size = dev_max.min(max_size).min(MAX_QUEUE_SIZE);
        // Split rings need a power-of-two size.
        let size = 1u16 << (15 - size.leading_zeros().min(15));
        let desc = dma_alloc(16 * size as usize).ok_or(InitError::NoMemory)?;
        let avail = dma_alloc(6 + 2 * size as usize).ok_or(InitError::NoMemory)?;
        let used = dma_alloc(6 + 8 * size as usize).ok_or(InitError::NoMemory)?;
        mmio::w16(c + common::Q_SIZE, size);
        if self.msix_enabled() {
            mmio::w16(c + common::Q_MSIX, 0);
            if mmio::r16(c + common::Q_MSIX) != 0 {
                mmio::w16(c + common::Q_MSIX, NO_VECTOR);
            }
        } else {
            mmio::w16(c + common::Q_MSIX, NO_VECTOR);
        }
        mmio::w64(c + common::Q_DESC, desc);
        mmio::w64(c + common::Q_AVAIL, avail);
        mmio::w64(c + common::Q_USED, used);
        let noff = mmio::r16(c + common::Q_NOFF) as u64;
        let notify = self
            .notify_base
            .saturating_add(noff.saturating_mul(self.notify_mult as u64));
        if !phys_ok(notify, 2) {
            return Err(InitError::Caps("notify-offset"));
        }
        mmio::w16(c + common::Q_ENABLE, 1);
        Ok(Virtq::new(
            index,
            size,
            desc,
            avail,
            used,
            notify,
            self.has(feat::EVENT_IDX),
        ))
    }

    /// Sets DRIVER_OK: the device may now use the queues.
    pub fn driver_ok(&self) {
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    /// Whether the device reports DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.status() & status::DEVICE_NEEDS_RESET != 0
    }

    /// Reads (and so clears) the ISR status byte.
    pub fn isr(&self) -> u8 {
        mmio::r8(self.isr)
    }

    /// config_generation.
    pub fn config_generation(&self) -> u8 {
        mmio::r8(self.common + common::CFG_GENERATION)
    }

    /// Length of the device-specific configuration structure.
    pub fn devcfg_len(&self) -> u64 {
        self.devcfg_len
    }

    fn devcfg_addr(&self, off: u64, width: u64) -> Option<u64> {
        (self.devcfg != 0 && off.checked_add(width)? <= self.devcfg_len)
            .then_some(self.devcfg + off)
    }

    /// Device configuration byte at `off` (0 outside the structure).
    pub fn cfg_r8(&self, off: u64) -> u8 {
        self.devcfg_addr(off, 1).map_or(0, mmio::r8)
    }

    /// Device configuration u16 at `off`.
    pub fn cfg_r16(&self, off: u64) -> u16 {
        self.devcfg_addr(off, 2).map_or(0, mmio::r16)
    }

    /// Device configuration u32 at `off`.
    pub fn cfg_r32(&self, off: u64) -> u32 {
        self.devcfg_addr(off, 4).map_or(0, mmio::r32)
    }

    /// Device configuration u64 at `off`, read as two u32 halves under config_generation
    /// (virtio 1.2 §4.1.3.1: 64-bit fields are not read atomically).
    pub fn cfg_r64(&self, off: u64) -> u64 {
        for _ in 0..8 {
            let gen = self.config_generation();
            let v = self.cfg_r32(off) as u64 | (self.cfg_r32(off + 4) as u64) << 32;
            if self.config_generation() == gen {
                return v;
            }
        }
        self.cfg_r32(off) as u64 | (self.cfg_r32(off + 4) as u64) << 32
    }

    /// Writes the device configuration u32 at `off` (ignored outside the structure).
    pub fn cfg_w32(&self, off: u64, v: u32) {
        if let Some(a) = self.devcfg_addr(off, 4) {
            mmio::w32(a, v);
        }
    }

    /// Address of the notification register of queue `index` as the device describes it
    /// (for the `hostile` command; None if it would fall outside the notify area).
    pub fn notify_addr(&self, index: u16) -> Option<u64> {
        mmio::w16(self.common + common::Q_SELECT, index);
        let noff = mmio::r16(self.common + common::Q_NOFF) as u64;
        let a = self
            .notify_base
            .checked_add(noff.checked_mul(self.notify_mult as u64)?)?;
        phys_ok(a, 2).then_some(a)
    }

    /// Raw notification write: queue `index`'s doorbell at `addr` (the `hostile` command rings
    /// doorbells of queues that do not exist).
    pub fn raw_notify(&self, addr: u64, value: u16) {
        if phys_ok(addr, 2) {
            mmio::w16(addr, value);
        }
    }

    /// Base of the notify area (for the `hostile` command).
    pub fn notify_base(&self) -> (u64, u32) {
        (self.notify_base, self.notify_mult)
    }

    /// Address of the common configuration structure (for the `hostile` command).
    pub fn common_base(&self) -> u64 {
        self.common
    }
}

// ---------------------------------------------------------------------------------------------
// Virtqueue.

/// One buffer of a descriptor chain.
#[derive(Clone, Copy)]
pub struct Buf {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (otherwise it reads it).
    pub write: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn read(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            write: false,
        }
    }

    /// A device-writable buffer.
    pub fn write(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            write: true,
        }
    }
}

/// A split virtqueue (virtio 1.2 §2.7) driven by polling.
pub struct Virtq {
    /// Queue index.
    pub index: u16,
    /// Number of entries (a power of two).
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    event_idx: bool,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    /// avail_idx at the last kick.
    kicked_idx: u16,
    last_used: u16,
    /// Private copies of each descriptor's `next` (the device cannot corrupt them).
    next: [u16; MAX_QUEUE_SIZE as usize],
    /// Length of the chain headed by each descriptor (0: not in flight).
    chain_len: [u16; MAX_QUEUE_SIZE as usize],
}

/// What went wrong reading the used ring.
#[derive(Clone, Copy, Debug)]
pub enum UsedError {
    /// The device returned a head that is not in flight.
    BadId(u32),
}

impl Virtq {
    fn new(
        index: u16,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        notify: u64,
        event_idx: bool,
    ) -> Virtq {
        let mut next = [0u16; MAX_QUEUE_SIZE as usize];
        for (i, n) in next.iter_mut().enumerate() {
            *n = (i as u16).wrapping_add(1);
        }
        Virtq {
            index,
            size,
            desc,
            avail,
            used,
            notify,
            event_idx,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            next,
            chain_len: [0; MAX_QUEUE_SIZE as usize],
        }
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Requests in flight (chains added and not yet returned).
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    /// Writes descriptor `i` (no bounds check beyond the queue size: `hostile` uses it too).
    pub fn raw_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + (i % self.size) as u64 * 16;
        mmio::w64(d, addr);
        mmio::w32(d + 8, len);
        mmio::w16(d + 12, flags);
        mmio::w16(d + 14, next);
    }

    /// Puts `head` in the next avail slot and publishes the new avail index without any
    /// bookkeeping (`hostile` only: the chain is never reclaimed).
    pub fn raw_publish(&mut self, head: u16) {
        mmio::w16(
            self.avail + 4 + 2 * (self.avail_idx % self.size) as u64,
            head,
        );
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mmio::w16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    /// Sets the avail index to any value (`hostile` only).
    pub fn raw_set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        mmio::w16(self.avail + 2, idx);
        fence(Ordering::SeqCst);
    }

    /// Adds a chain of `bufs` (device-readable ones must come before device-writable ones) and
    /// publishes it; returns its head, or None when there are not enough free descriptors or
    /// `bufs` is empty. Call [`Virtq::kick`] afterwards (once per batch).
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        let n = bufs.len();
        if n == 0 || n > self.num_free as usize {
            return None;
        }
        let head = self.free_head;
        let mut i = head;
        for (k, b) in bufs.iter().enumerate() {
            let last = k + 1 == n;
            let mut flags = if b.write { desc_flags::WRITE } else { 0 };
            let next = self.next[i as usize];
            if !last {
                flags |= desc_flags::NEXT;
            }
            self.raw_desc(i, b.addr, b.len, flags, if last { 0 } else { next });
            if !last {
                i = next;
            }
        }
        self.free_head = self.next[i as usize];
        self.num_free -= n as u16;
        self.chain_len[head as usize] = n as u16;
        self.raw_publish(head);
        Some(head)
    }

    /// Notifies the device unless it asked not to be (used flags, or avail_event with
    /// EVENT_IDX).
    pub fn kick(&mut self) {
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let old = self.kicked_idx;
        let need = if self.event_idx {
            // vring_need_event(avail_event, new, old) over everything published since the
            // last kick.
            let event = mmio::r16(self.used + 4 + 8 * self.size as u64);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            mmio::r16(self.used) & 1 == 0
        };
        self.kicked_idx = new;
        if need {
            mmio::w16(self.notify, self.index);
        }
    }

    /// Always notifies the device.
    pub fn kick_always(&mut self) {
        fence(Ordering::SeqCst);
        self.kicked_idx = self.avail_idx;
        mmio::w16(self.notify, self.index);
    }

    /// Asks the device not to interrupt (we poll), or to interrupt again.
    pub fn set_interrupts(&self, on: bool) {
        mmio::w16(self.avail, if on { 0 } else { 1 });
        if self.event_idx {
            // used_event: interrupt when the next entry is used.
            mmio::w16(self.avail + 4 + 2 * self.size as u64, self.last_used);
        }
    }

    /// Takes the next used entry: (head, bytes written by the device). The chain's
    /// descriptors go back to the free list.
    pub fn poll(&mut self) -> Result<Option<(u16, u32)>, UsedError> {
        fence(Ordering::SeqCst);
        if mmio::r16(self.used + 2) == self.last_used {
            return Ok(None);
        }
        fence(Ordering::SeqCst);
        let elem = self.used + 4 + 8 * (self.last_used % self.size) as u64;
        let id = mmio::r32(elem);
        let len = mmio::r32(elem + 4);
        if id >= self.size as u32 || self.chain_len[id as usize] == 0 {
            return Err(UsedError::BadId(id));
        }
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            mmio::w16(self.avail + 4 + 2 * self.size as u64, self.last_used);
        }
        let head = id as u16;
        let n = self.chain_len[head as usize];
        self.chain_len[head as usize] = 0;
        let mut tail = head;
        for _ in 1..n {
            tail = self.next[tail as usize];
        }
        self.next[tail as usize] = self.free_head;
        self.free_head = head;
        self.num_free += n;
        Ok(Some((head, len)))
    }

    /// Polls until a used entry arrives or `timeout_ticks` TSC ticks pass.
    pub fn wait(&mut self, timeout_ticks: u64) -> Result<Option<(u16, u32)>, UsedError> {
        let deadline = sys::rdtsc().wrapping_add(timeout_ticks);
        loop {
            if let Some(e) = self.poll()? {
                return Ok(Some(e));
            }
            if (sys::rdtsc().wrapping_sub(deadline) as i64) > 0 {
                return Ok(None);
            }
            core::hint::spin_loop();
        }
    }
}

/// Finds the `n`-th (0-based) modern virtio function with PCI device ID `device_id`
/// (0x1040 + virtio device type).
pub fn find_function(pci: &crate::pci::Pci, device_id: u16, n: usize) -> Option<Func> {
    pci.funcs[..pci.count]
        .iter()
        .filter(|f| f.vendor == 0x1af4 && f.device == device_id)
        .nth(n)
        .copied()
}
