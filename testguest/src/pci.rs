//! PCI enumeration: ECAM (MMIO from CPL3) or, without an MCFG, mechanism #1 ports via services.

use crate::acpi::Mcfg;
use crate::sys::{self, mmio, phys_ok};

/// ECAM base probed when ACPI has no MCFG (Ferrite layout, QEMU microvm).
pub const FALLBACK_ECAM: u64 = 0xe000_0000;

/// Most functions recorded.
pub const MAX_FUNCS: usize = 64;

/// How configuration space is reached.
#[derive(Clone, Copy)]
pub enum CfgAccess {
    /// PCIe ECAM window.
    Ecam(Mcfg),
    /// Ports 0xcf8/0xcfc through the port-I/O services (slow, bus 0..255 of segment 0).
    Legacy,
}

/// Kind of a BAR.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub enum BarKind {
    /// Not implemented.
    #[default]
    None,
    /// I/O space.
    Io,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory (occupies two BAR slots).
    Mem64,
}

/// One decoded BAR.
#[derive(Clone, Copy, Default)]
pub struct Bar {
    /// Type.
    pub kind: BarKind,
    /// Base address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Prefetchable memory.
    pub prefetch: bool,
    /// True if this guest had to assign the address (the BAR was 0).
    pub assigned: bool,
}

/// One PCI function.
#[derive(Clone, Copy, Default)]
pub struct Func {
    /// Bus number.
    pub bus: u8,
    /// Device number.
    pub dev: u8,
    /// Function number.
    pub func: u8,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (base, sub, prog-if).
    pub class: u32,
    /// Header type (without the multi-function bit).
    pub header: u8,
    /// BARs.
    pub bars: [Bar; 6],
}

/// Configuration-space accessor for one function.
#[derive(Clone, Copy)]
pub struct Cfg {
    access: CfgAccess,
    bus: u8,
    dev: u8,
    func: u8,
}

impl Cfg {
    fn ecam_addr(&self, m: &Mcfg, off: u16) -> u64 {
        m.base
            + ((self.bus as u64) << 20)
            + ((self.dev as u64) << 15)
            + ((self.func as u64) << 12)
            + off as u64
    }
    fn legacy_addr(&self, off: u16) -> u64 {
        0x8000_0000
            | (self.bus as u64) << 16
            | (self.dev as u64) << 11
            | (self.func as u64) << 8
            | (off as u64 & 0xfc)
    }
    /// 32-bit read (`off` 4-aligned, < 4096).
    pub fn r32(&self, off: u16) -> u32 {
        match self.access {
            CfgAccess::Ecam(m) => mmio::r32(self.ecam_addr(&m, off & 0xffc)),
            CfgAccess::Legacy => {
                sys::pio_out(0xcf8, self.legacy_addr(off), 4);
                sys::pio_in(0xcfc, 4) as u32
            }
        }
    }
    /// 32-bit write.
    pub fn w32(&self, off: u16, v: u32) {
        match self.access {
            CfgAccess::Ecam(m) => mmio::w32(self.ecam_addr(&m, off & 0xffc), v),
            CfgAccess::Legacy => {
                sys::pio_out(0xcf8, self.legacy_addr(off), 4);
                sys::pio_out(0xcfc, v as u64, 4);
            }
        }
    }
    /// 16-bit read.
    pub fn r16(&self, off: u16) -> u16 {
        (self.r32(off & !3) >> ((off & 2) * 8)) as u16
    }
    /// 8-bit read.
    pub fn r8(&self, off: u16) -> u8 {
        (self.r32(off & !3) >> ((off & 3) * 8)) as u8
    }
    /// 16-bit write (as a native 16-bit access, so neighbouring RW1C bits are untouched).
    pub fn w16(&self, off: u16, v: u16) {
        match self.access {
            CfgAccess::Ecam(m) => mmio::w16(self.ecam_addr(&m, off & 0xffe), v),
            CfgAccess::Legacy => {
                sys::pio_out(0xcf8, self.legacy_addr(off), 4);
                sys::pio_out(0xcfc + (off & 2), v as u64, 2);
            }
        }
    }
    /// Iterates the capability list: returns (offset, id) pairs via the callback; bounded.
    pub fn caps(&self, mut f: impl FnMut(u16, u8)) {
        if self.r16(0x06) & (1 << 4) == 0 {
            return;
        }
        let mut p = (self.r8(0x34) & 0xfc) as u16;
        let mut n = 0;
        while p >= 0x40 && n < 48 {
            f(p, self.r8(p));
            p = (self.r8(p + 1) & 0xfc) as u16;
            n += 1;
        }
    }
}

/// The enumerated bus.
pub struct Pci {
    /// Access method.
    pub access: CfgAccess,
    /// Functions found.
    pub funcs: [Func; MAX_FUNCS],
    /// Valid entries of `funcs`.
    pub count: usize,
    /// Functions beyond `MAX_FUNCS` (not recorded).
    pub dropped: usize,
    next_mmio: u64,
}

impl Pci {
    /// Config accessor for a function.
    pub fn cfg(&self, f: &Func) -> Cfg {
        Cfg {
            access: self.access,
            bus: f.bus,
            dev: f.dev,
            func: f.func,
        }
    }

    /// Scans the buses reachable from the first bus (following bridges) and sizes BARs.
    /// Without an MCFG: ports 0xcf8/0xcfc, and if they show nothing, ECAM at
    /// `FALLBACK_ECAM` (Ferrite's and QEMU microvm's fixed address).
    pub fn scan(mcfg: Option<Mcfg>) -> Pci {
        match mcfg {
            Some(m)
                if m.segment == 0
                    && m.end_bus >= m.start_bus
                    && phys_ok(m.base, ((m.end_bus as u64) + 1) << 20) =>
            {
                Pci::scan_with(CfgAccess::Ecam(m), m.start_bus, m.end_bus)
            }
            _ => {
                let legacy = Pci::scan_with(CfgAccess::Legacy, 0, 255);
                if legacy.count > 0 {
                    return legacy;
                }
                let m = Mcfg {
                    base: FALLBACK_ECAM,
                    segment: 0,
                    start_bus: 0,
                    end_bus: 255,
                };
                Pci::scan_with(CfgAccess::Ecam(m), 0, 255)
            }
        }
    }

    fn scan_with(access: CfgAccess, first: u8, last: u8) -> Pci {
        let mut pci = Pci {
            access,
            funcs: [Func::default(); MAX_FUNCS],
            count: 0,
            dropped: 0,
            next_mmio: 0,
        };
        let mut pending = [0u8; 64];
        let mut npending = 1;
        pending[0] = first;
        let mut seen = [false; 256];
        while npending > 0 {
            npending -= 1;
            let bus = pending[npending];
            if seen[bus as usize] || bus < first || bus > last {
                continue;
            }
            seen[bus as usize] = true;
            for dev in 0..32u8 {
                for func in 0..8u8 {
                    let cfg = Cfg {
                        access,
                        bus,
                        dev,
                        func,
                    };
                    let id = cfg.r32(0);
                    if id & 0xffff == 0xffff || id == 0 {
                        if func == 0 {
                            break;
                        }
                        continue;
                    }
                    let hdr = cfg.r8(0x0e);
                    let mut f = Func {
                        bus,
                        dev,
                        func,
                        vendor: id as u16,
                        device: (id >> 16) as u16,
                        class: cfg.r32(0x08) >> 8,
                        header: hdr & 0x7f,
                        bars: [Bar::default(); 6],
                    };
                    if f.header == 1 {
                        let secondary = cfg.r8(0x19);
                        if npending < pending.len() && secondary != 0 {
                            pending[npending] = secondary;
                            npending += 1;
                        }
                    }
                    if pci.count < MAX_FUNCS {
                        f.bars = size_bars(&cfg, f.header);
                        pci.funcs[pci.count] = f;
                        pci.count += 1;
                    } else {
                        pci.dropped += 1;
                    }
                    if func == 0 && hdr & 0x80 == 0 {
                        break;
                    }
                }
            }
        }
        pci.assign_unset_bars();
        pci
    }

    /// Gives an address to memory BARs the firmware/VMM left at 0, above every
    /// assigned BAR below 4 GiB (or at 0xc000_0000 if none).
    fn assign_unset_bars(&mut self) {
        let mut top = 0u64;
        for f in &self.funcs[..self.count] {
            for b in &f.bars {
                if b.kind != BarKind::None
                    && b.kind != BarKind::Io
                    && b.addr != 0
                    && b.addr < (1 << 32)
                {
                    top = top.max(b.addr.saturating_add(b.size));
                }
            }
        }
        self.next_mmio = if top == 0 { 0xc000_0000 } else { top };
        for i in 0..self.count {
            let f = self.funcs[i];
            let cfg = self.cfg(&f);
            for (slot, b) in f.bars.iter().enumerate() {
                if b.addr != 0 || b.size == 0 || !matches!(b.kind, BarKind::Mem32 | BarKind::Mem64)
                {
                    continue;
                }
                // Only sane sizes: a power of two up to 256 MiB, placed below the IOAPIC.
                if !b.size.is_power_of_two() || b.size > (256 << 20) {
                    continue;
                }
                let addr = self.next_mmio.saturating_add(b.size - 1) & !(b.size - 1);
                if addr.saturating_add(b.size) > 0xfec0_0000 {
                    continue;
                }
                self.next_mmio = addr + b.size;
                let off = 0x10 + 4 * slot as u16;
                let low = cfg.r32(off) & 0xf;
                cfg.w32(off, addr as u32 | low);
                if b.kind == BarKind::Mem64 {
                    cfg.w32(off + 4, 0);
                }
                self.funcs[i].bars[slot].addr = addr;
                self.funcs[i].bars[slot].assigned = true;
            }
        }
    }
}

/// Decodes and sizes the BARs of a function (decoding disabled while sizing).
fn size_bars(cfg: &Cfg, header: u8) -> [Bar; 6] {
    let mut bars = [Bar::default(); 6];
    let n = match header {
        0 => 6,
        1 => 2,
        _ => 0,
    };
    if n == 0 {
        return bars;
    }
    let cmd = cfg.r16(0x04);
    cfg.w16(0x04, cmd & !0x3);
    let mut i = 0;
    while i < n {
        let off = 0x10 + 4 * i as u16;
        let orig = cfg.r32(off);
        cfg.w32(off, 0xffff_ffff);
        let probe = cfg.r32(off);
        cfg.w32(off, orig);
        if orig & 1 == 1 {
            let mask = probe & !0x3;
            if mask != 0 {
                let size = (!mask).wrapping_add(1) & 0xffff;
                bars[i] = Bar {
                    kind: BarKind::Io,
                    addr: (orig & !0x3) as u64,
                    size: size as u64,
                    ..Bar::default()
                };
            }
            i += 1;
            continue;
        }
        let prefetch = orig & 0x8 != 0;
        if (orig >> 1) & 3 == 2 && i + 1 < n {
            let orig_hi = cfg.r32(off + 4);
            cfg.w32(off + 4, 0xffff_ffff);
            let probe_hi = cfg.r32(off + 4);
            cfg.w32(off + 4, orig_hi);
            let mask = ((probe_hi as u64) << 32) | (probe & !0xf) as u64;
            if mask != 0 {
                bars[i] = Bar {
                    kind: BarKind::Mem64,
                    addr: ((orig_hi as u64) << 32) | (orig & !0xf) as u64,
                    size: (!mask).wrapping_add(1),
                    prefetch,
                    assigned: false,
                };
            }
            i += 2;
        } else {
            let mask = probe & !0xf;
            if mask != 0 {
                bars[i] = Bar {
                    kind: BarKind::Mem32,
                    addr: (orig & !0xf) as u64,
                    size: (!mask).wrapping_add(1) as u64,
                    prefetch,
                    assigned: false,
                };
            }
            i += 1;
        }
    }
    cfg.w16(0x04, cmd);
    bars
}
