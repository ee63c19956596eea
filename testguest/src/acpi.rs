//! Minimal ACPI table reader: RSDP -> XSDT/RSDT -> MADT, MCFG, FADT (+ \_S5 in the DSDT).

use crate::sys::{mmio, phys_ok};

/// Most CPUs recorded from the MADT.
pub const MAX_CPUS: usize = 256;

/// A Generic Address Structure (FADT registers).
#[derive(Clone, Copy, Default)]
pub struct Gas {
    /// 0 = system memory, 1 = system I/O.
    pub space: u8,
    /// Register address.
    pub addr: u64,
}

/// What the guest uses from the MADT.
pub struct Madt {
    /// Local APIC MMIO base.
    pub lapic_base: u64,
    /// Enabled processors (LAPIC/x2APIC entries with flags bit 0).
    pub cpus: u32,
    /// APIC IDs of the enabled processors.
    pub apic_ids: [u32; MAX_CPUS],
    /// First IOAPIC base, if any.
    pub ioapic_base: Option<u64>,
    /// GSI base of that IOAPIC.
    pub ioapic_gsi_base: u32,
    /// GSI of ISA IRQ 4 (COM1), after interrupt source overrides.
    pub com1_gsi: u32,
}

/// PCIe ECAM window from the MCFG.
#[derive(Clone, Copy)]
pub struct Mcfg {
    /// ECAM base of the segment.
    pub base: u64,
    /// PCI segment group.
    pub segment: u16,
    /// First decoded bus.
    pub start_bus: u8,
    /// Last decoded bus.
    pub end_bus: u8,
}

/// Power-management registers from the FADT.
#[derive(Clone, Copy, Default)]
pub struct Fadt {
    /// PM1a event block port (PM1 status, then PM1 enable; 0 if absent).
    pub pm1a_evt: u32,
    /// PM1 event block length in bytes (status and enable are half each).
    pub pm1_evt_len: u8,
    /// PM1a control block port (0 if absent).
    pub pm1a_cnt: u32,
    /// PM timer port (0 if absent).
    pub pm_tmr: u32,
    /// Reset register, if RESET_REG_SUP.
    pub reset: Option<(Gas, u8)>,
    /// Sleep control register (hardware-reduced ACPI).
    pub sleep_ctl: Option<Gas>,
    /// SLP_TYP of \_S5 from the DSDT, if found.
    pub s5_typ: Option<u8>,
    /// GPE0 block port (status bytes, then enable bytes; 0 if absent).
    pub gpe0_blk: u32,
    /// GPE0 block length in bytes.
    pub gpe0_len: u8,
    /// Address of the VM generation ID, from the DSDT's `VGEN.ADDR` method, if found.
    pub vmgenid: Option<u64>,
}

/// Tables found.
pub struct Acpi {
    /// RSDP address.
    pub rsdp: u64,
    /// Revision of the RSDP.
    pub revision: u8,
    /// MADT contents.
    pub madt: Option<Madt>,
    /// MCFG contents.
    pub mcfg: Option<Mcfg>,
    /// FADT contents.
    pub fadt: Option<Fadt>,
    /// Signatures of the tables listed in the XSDT/RSDT (first 16).
    pub sigs: [[u8; 4]; 16],
    /// Valid entries of `sigs`.
    pub nsigs: usize,
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        sum = sum.wrapping_add(mmio::r8(addr + i));
    }
    sum == 0
}

fn sig(addr: u64) -> [u8; 4] {
    [
        mmio::r8(addr),
        mmio::r8(addr + 1),
        mmio::r8(addr + 2),
        mmio::r8(addr + 3),
    ]
}

/// Finds the RSDP: the loader's pointer if valid, else a scan of 0xe0000..0x100000.
pub fn find_rsdp(hint: u64) -> Option<u64> {
    let valid = |a: u64| {
        phys_ok(a, 36) && &sig(a) == b"RSD " && &sig(a + 4) == b"PTR " && checksum_ok(a, 20)
    };
    if hint != 0 && valid(hint) {
        return Some(hint);
    }
    (0xe0000u64..0x100000).step_by(16).find(|&a| valid(a))
}

/// Reads a table header; returns (address, length) if it is sane.
fn table(addr: u64) -> Option<u64> {
    if !phys_ok(addr, 36) {
        return None;
    }
    let len = mmio::r32(addr + 4) as u64;
    if !(36..=(16 << 20)).contains(&len) || !phys_ok(addr, len) {
        return None;
    }
    Some(len)
}

impl Acpi {
    /// Parses the tables reachable from the RSDP (bad tables are skipped).
    pub fn parse(rsdp: u64) -> Acpi {
        let revision = mmio::r8(rsdp + 15);
        let mut acpi = Acpi {
            rsdp,
            revision,
            madt: None,
            mcfg: None,
            fadt: None,
            sigs: [[0; 4]; 16],
            nsigs: 0,
        };
        let (root, entry) = if revision >= 2 && mmio::r64(rsdp + 24) != 0 {
            (mmio::r64(rsdp + 24), 8u64)
        } else {
            (mmio::r32(rsdp + 16) as u64, 4u64)
        };
        let Some(root_len) = table(root) else {
            return acpi;
        };
        let n = (root_len - 36) / entry;
        for i in 0..n.min(64) {
            let p = root + 36 + i * entry;
            let t = if entry == 8 {
                mmio::r64(p)
            } else {
                mmio::r32(p) as u64
            };
            let Some(len) = table(t) else { continue };
            if acpi.nsigs < acpi.sigs.len() {
                acpi.sigs[acpi.nsigs] = sig(t);
                acpi.nsigs += 1;
            }
            match &sig(t) {
                b"APIC" => acpi.madt = Some(parse_madt(t, len)),
                b"MCFG" if len >= 60 => {
                    acpi.mcfg = Some(Mcfg {
                        base: mmio::r64(t + 44),
                        segment: mmio::r16(t + 52),
                        start_bus: mmio::r8(t + 54),
                        end_bus: mmio::r8(t + 55),
                    })
                }
                b"FACP" => acpi.fadt = Some(parse_fadt(t, len)),
                _ => {}
            }
        }
        acpi
    }
}

fn parse_madt(t: u64, len: u64) -> Madt {
    let mut m = Madt {
        lapic_base: mmio::r32(t + 36) as u64,
        cpus: 0,
        apic_ids: [0; MAX_CPUS],
        ioapic_base: None,
        ioapic_gsi_base: 0,
        com1_gsi: 4,
    };
    let mut off = 44;
    while off + 2 <= len {
        let kind = mmio::r8(t + off);
        let elen = mmio::r8(t + off + 1) as u64;
        if elen < 2 || off + elen > len {
            break;
        }
        let e = t + off;
        let mut add_cpu = |id: u32, flags: u32| {
            if flags & 1 != 0 {
                if (m.cpus as usize) < MAX_CPUS {
                    m.apic_ids[m.cpus as usize] = id;
                }
                m.cpus += 1;
            }
        };
        match kind {
            0 if elen >= 8 => add_cpu(mmio::r8(e + 3) as u32, mmio::r32(e + 4)),
            9 if elen >= 16 => add_cpu(mmio::r32(e + 4), mmio::r32(e + 8)),
            1 if elen >= 12 && m.ioapic_base.is_none() => {
                m.ioapic_base = Some(mmio::r32(e + 4) as u64);
                m.ioapic_gsi_base = mmio::r32(e + 8);
            }
            2 if elen >= 10 && mmio::r8(e + 2) == 0 && mmio::r8(e + 3) == 4 => {
                m.com1_gsi = mmio::r32(e + 4)
            }
            5 if elen >= 12 => m.lapic_base = mmio::r64(e + 4),
            _ => {}
        }
        off += elen;
    }
    m
}

fn gas(a: u64) -> Gas {
    Gas {
        space: mmio::r8(a),
        addr: mmio::r64(a + 4),
    }
}

fn parse_fadt(t: u64, len: u64) -> Fadt {
    let mut f = Fadt {
        pm1a_evt: mmio::r32(t + 56),
        pm1_evt_len: mmio::r8(t + 88),
        pm1a_cnt: mmio::r32(t + 64),
        pm_tmr: mmio::r32(t + 76),
        gpe0_blk: mmio::r32(t + 80),
        gpe0_len: mmio::r8(t + 92),
        ..Fadt::default()
    };
    let flags = if len >= 116 { mmio::r32(t + 112) } else { 0 };
    if len >= 129 && flags & (1 << 10) != 0 {
        let g = gas(t + 116);
        if g.addr != 0 {
            f.reset = Some((g, mmio::r8(t + 128)));
        }
    }
    if len >= 256 {
        let g = gas(t + 244);
        if g.addr != 0 {
            f.sleep_ctl = Some(g);
        }
    }
    let mut dsdt = mmio::r32(t + 40) as u64;
    if len >= 148 && mmio::r64(t + 140) != 0 {
        dsdt = mmio::r64(t + 140);
    }
    if let Some(dlen) = table(dsdt) {
        f.s5_typ = find_s5(dsdt, dlen);
        f.vmgenid = find_vmgenid(dsdt, dlen);
    }
    f
}

/// Finds `Name(_S5_, Package(){SLP_TYPa, ...})` in AML and returns SLP_TYPa.
fn find_s5(t: u64, len: u64) -> Option<u8> {
    let mut i = 36;
    while i + 8 < len {
        if &sig(t + i) == b"_S5_" && mmio::r8(t + i + 4) == 0x12 {
            let mut p = t + i + 5;
            let lead = mmio::r8(p);
            p += 1 + (lead >> 6) as u64; // PkgLength
            p += 1; // NumElements
            return Some(match mmio::r8(p) {
                0x0a => mmio::r8(p + 1),
                0x00 => 0,
                0x01 => 1,
                v => v,
            });
        }
        i += 1;
    }
    None
}

/// Reads an AML integer term at `p` (ZeroOp, OneOp, Byte/Word/DWord/QWord prefix); returns
/// (value, length).
fn aml_int(p: u64) -> Option<(u64, u64)> {
    Some(match mmio::r8(p) {
        0x00 => (0, 1),
        0x01 => (1, 1),
        0x0a => (mmio::r8(p + 1) as u64, 2),
        0x0b => (mmio::r16(p + 1) as u64, 3),
        0x0c => (mmio::r32(p + 1) as u64, 5),
        0x0e => (mmio::r64(p + 1), 9),
        _ => return None,
    })
}

/// Finds `Method(ADDR) { Return(Package(2) { low, high }) }` after the `VGEN` device name
/// and returns `low | high << 32` (no AML interpreter: the encoding Ferrite emits).
fn find_vmgenid(t: u64, len: u64) -> Option<u64> {
    let mut i = 36;
    let mut seen_vgen = false;
    while i + 16 < len {
        let s = sig(t + i);
        if &s == b"VGEN" {
            seen_vgen = true;
        }
        // "ADDR", method flags, ReturnOp, PackageOp, PkgLength (1 byte), NumElements 2.
        if seen_vgen
            && &s == b"ADDR"
            && mmio::r8(t + i + 5) == 0xa4
            && mmio::r8(t + i + 6) == 0x12
            && mmio::r8(t + i + 7) >> 6 == 0
            && mmio::r8(t + i + 8) == 2
        {
            let (lo, n) = aml_int(t + i + 9)?;
            let (hi, _) = aml_int(t + i + 9 + n)?;
            return Some((lo & 0xffff_ffff) | (hi << 32));
        }
        i += 1;
    }
    None
}
