//! The configuration-space model of one PCI function: registers, write masks, BARs and the
//! capability list.

use serde::{Deserialize, Serialize};

use crate::PciError;

/// Dwords in the standard (legacy) configuration space.
pub const STD_CONFIG_DWORDS: usize = 64;
/// Dwords in the PCIe extended configuration space reachable through ECAM.
pub const EXT_CONFIG_DWORDS: usize = 1024;
/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;
/// First BAR register (dword index).
pub const BAR0_REG: usize = 4;
/// Command/status register (dword index).
pub const COMMAND_REG: usize = 1;
/// Command register: memory space decode enable.
pub const COMMAND_MEMORY: u32 = 1 << 1;
/// Command register: bus master enable.
pub const COMMAND_BUS_MASTER: u32 = 1 << 2;
/// Command bits the guest may change: I/O, memory, bus master, parity, SERR, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0547;
/// Status register: capabilities list present.
const STATUS_CAP_LIST: u32 = 1 << 4;
/// Capabilities pointer register (dword index).
const CAP_PTR_REG: usize = 0x34 / 4;
/// First byte offset available for capabilities.
const FIRST_CAP_OFFSET: usize = 0x40;
/// BAR flag bits: 64-bit memory type.
const BAR_MEM_TYPE_64: u32 = 0b10 << 1;
/// BAR flag bits: prefetchable.
const BAR_PREFETCHABLE: u32 = 1 << 3;

/// Identification written into a new function's header.
#[derive(Debug, Clone, Copy)]
pub struct PciConfigParams {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision_id: u8,
    /// Base class code.
    pub class: u8,
    /// Subclass code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Interrupt pin (0 = none, 1 = INTA#).
    pub interrupt_pin: u8,
}

/// The kind of a memory BAR (I/O BARs are not supported: CPL3 guests cannot use ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    /// 32-bit memory BAR (one register).
    Mem32,
    /// 64-bit memory BAR (two registers; the next index is consumed).
    Mem64,
}

/// One declared BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarInfo {
    /// BAR index (0..=5).
    pub index: usize,
    /// Size in bytes (power of two).
    pub size: u64,
    /// 32 or 64 bit.
    pub kind: BarKind,
    /// Whether reads have no side effects.
    pub prefetchable: bool,
}

/// Serialisable image of a configuration space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigurationState {
    /// All registers (standard + extended).
    pub registers: Vec<u32>,
    /// Per-register write masks.
    pub write_masks: Vec<u32>,
    /// Declared BARs.
    pub bars: Vec<BarInfo>,
    /// Byte offset of the last capability added (0 = none).
    pub last_capability: usize,
    /// Byte offset where the next capability goes.
    pub next_capability: usize,
}

/// The configuration space of one function: what the guest sees through CF8/CFC or ECAM.
/// Read-only fields stay read-only because every write goes through the write mask.
#[derive(Debug, Clone)]
pub struct PciConfiguration {
    registers: Vec<u32>,
    write_masks: Vec<u32>,
    bars: Vec<BarInfo>,
    last_capability: usize,
    next_capability: usize,
}

impl PciConfiguration {
    /// A type-0 header with the given identity, no BARs, no capabilities, decode off.
    pub fn new(params: PciConfigParams) -> Self {
        let mut registers = vec![0u32; EXT_CONFIG_DWORDS];
        let mut write_masks = vec![0u32; EXT_CONFIG_DWORDS];
        registers[0] = u32::from(params.vendor_id) | u32::from(params.device_id) << 16;
        write_masks[COMMAND_REG] = COMMAND_WRITABLE;
        registers[2] = u32::from(params.revision_id)
            | u32::from(params.prog_if) << 8
            | u32::from(params.subclass) << 16
            | u32::from(params.class) << 24;
        // Cache line size and latency timer are plain storage; header type 0.
        write_masks[3] = 0x0000_ffff;
        registers[0x2c / 4] =
            u32::from(params.subsystem_vendor_id) | u32::from(params.subsystem_id) << 16;
        registers[0x3c / 4] = u32::from(params.interrupt_pin) << 8;
        // Interrupt line is storage for the OS.
        write_masks[0x3c / 4] = 0xff;
        Self {
            registers,
            write_masks,
            bars: Vec::new(),
            last_capability: 0,
            next_capability: FIRST_CAP_OFFSET,
        }
    }

    /// Make this a type-0 header of a host bridge (class 06/00) — no BARs, no capabilities.
    pub fn new_host_bridge(vendor_id: u16, device_id: u16) -> Self {
        Self::new(PciConfigParams {
            vendor_id,
            device_id,
            revision_id: 0,
            class: 0x06,
            subclass: 0x00,
            prog_if: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            interrupt_pin: 0,
        })
    }

    /// Read the dword register `reg` (0..1024). Out-of-range registers read as all-ones.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.registers.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Guest write of `data` (1, 2 or 4 bytes) at byte `offset` (0..4) of register `reg`,
    /// honouring the write mask. Malformed accesses are ignored.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let Some((value, mask)) = merge_bytes(offset, data) else {
            return;
        };
        let (Some(cur), Some(wmask)) = (self.registers.get(reg), self.write_masks.get(reg)) else {
            return;
        };
        let mask = mask & wmask;
        self.registers[reg] = (cur & !mask) | (value & mask);
    }

    /// Set a register directly (device-side, bypassing the write mask).
    pub fn set_reg(&mut self, reg: usize, value: u32) {
        if let Some(r) = self.registers.get_mut(reg) {
            *r = value;
        }
    }

    /// Set the write mask of a register (device-side).
    pub fn set_write_mask(&mut self, reg: usize, mask: u32) {
        if let Some(m) = self.write_masks.get_mut(reg) {
            *m = mask;
        }
    }

    /// Read a byte range of configuration space (device-side helper).
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            let off = offset + i;
            *b = (self.read_reg(off / 4) >> ((off % 4) * 8)) as u8;
        }
    }

    /// Write a byte range of configuration space, bypassing write masks (device-side helper).
    pub fn write_bytes(&mut self, offset: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let off = offset + i;
            let shift = (off % 4) * 8;
            if let Some(r) = self.registers.get_mut(off / 4) {
                *r = (*r & !(0xff << shift)) | (u32::from(*b) << shift);
            }
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.registers[COMMAND_REG] as u16
    }

    /// Whether memory-space decoding is enabled.
    pub fn memory_enabled(&self) -> bool {
        self.registers[COMMAND_REG] & COMMAND_MEMORY != 0
    }

    /// Set or clear command-register bits (device/firmware-side).
    pub fn set_command_bits(&mut self, bits: u32, on: bool) {
        if on {
            self.registers[COMMAND_REG] |= bits & 0xffff;
        } else {
            self.registers[COMMAND_REG] &= !(bits & 0xffff);
        }
    }

    /// Declare a memory BAR. Its address starts at 0 until [`Self::set_bar_addr`].
    pub fn add_bar(&mut self, bar: BarInfo) -> Result<(), PciError> {
        let regs_needed = match bar.kind {
            BarKind::Mem32 => 1,
            BarKind::Mem64 => 2,
        };
        if bar.index + regs_needed > NUM_BARS {
            return Err(PciError::InvalidBar(bar.index));
        }
        if !bar.size.is_power_of_two() || bar.size < 16 {
            return Err(PciError::InvalidBarSize(bar.size));
        }
        if bar.kind == BarKind::Mem32 && bar.size > 1 << 31 {
            return Err(PciError::InvalidBarSize(bar.size));
        }
        let taken = self.bars.iter().any(|b| {
            let end = b.index + if b.kind == BarKind::Mem64 { 2 } else { 1 };
            bar.index < end && b.index < bar.index + regs_needed
        });
        if taken {
            return Err(PciError::InvalidBar(bar.index));
        }
        let mut flags = 0;
        if bar.kind == BarKind::Mem64 {
            flags |= BAR_MEM_TYPE_64;
        }
        if bar.prefetchable {
            flags |= BAR_PREFETCHABLE;
        }
        let mask = !(bar.size - 1);
        let reg = BAR0_REG + bar.index;
        self.registers[reg] = flags;
        self.write_masks[reg] = (mask as u32) & 0xffff_fff0;
        if bar.kind == BarKind::Mem64 {
            self.registers[reg + 1] = 0;
            self.write_masks[reg + 1] = (mask >> 32) as u32;
        }
        self.bars.push(bar);
        Ok(())
    }

    /// The declared BARs.
    pub fn bars(&self) -> &[BarInfo] {
        &self.bars
    }

    /// The declared BAR with this index.
    pub fn bar(&self, index: usize) -> Option<BarInfo> {
        self.bars.iter().find(|b| b.index == index).copied()
    }

    /// The BAR whose registers include dword register `reg`, if any.
    pub fn bar_for_reg(&self, reg: usize) -> Option<BarInfo> {
        let idx = reg.checked_sub(BAR0_REG)?;
        self.bars.iter().copied().find(|b| {
            let n = if b.kind == BarKind::Mem64 { 2 } else { 1 };
            idx >= b.index && idx < b.index + n
        })
    }

    /// The address the guest (or the allocator) programmed into a BAR.
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let reg = BAR0_REG + index;
        let lo = u64::from(self.registers[reg] & 0xffff_fff0);
        Some(match bar.kind {
            BarKind::Mem32 => lo,
            BarKind::Mem64 => lo | u64::from(self.registers[reg + 1]) << 32,
        })
    }

    /// Program a BAR's address (firmware-side allocation). Must be size-aligned.
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        let bar = self.bar(index).ok_or(PciError::InvalidBar(index))?;
        if addr & (bar.size - 1) != 0 || (bar.kind == BarKind::Mem32 && addr > u64::from(u32::MAX))
        {
            return Err(PciError::InvalidBarAddress(addr));
        }
        let reg = BAR0_REG + index;
        let flags = self.registers[reg] & 0xf;
        self.registers[reg] = (addr as u32 & 0xffff_fff0) | flags;
        if bar.kind == BarKind::Mem64 {
            self.registers[reg + 1] = (addr >> 32) as u32;
        }
        Ok(())
    }

    /// Append a capability. `body` starts with the capability ID; its second byte (next
    /// pointer) is filled in here. `write_mask` (same length or shorter) marks guest-writable
    /// bits. Returns the capability's byte offset in configuration space.
    pub fn add_capability(&mut self, body: &[u8], write_mask: &[u8]) -> Result<usize, PciError> {
        if body.len() < 2 {
            return Err(PciError::CapabilityTooSmall);
        }
        let offset = self.next_capability;
        let end = offset + body.len();
        if end > STD_CONFIG_DWORDS * 4 {
            return Err(PciError::CapabilitySpaceFull);
        }
        self.write_bytes(offset, body);
        self.write_bytes(offset + 1, &[0]);
        for (i, m) in write_mask.iter().enumerate().take(body.len()) {
            let off = offset + i;
            let shift = (off % 4) * 8;
            let reg = off / 4;
            self.write_masks[reg] =
                (self.write_masks[reg] & !(0xff << shift)) | u32::from(*m) << shift;
        }
        if self.last_capability == 0 {
            self.registers[CAP_PTR_REG] = (self.registers[CAP_PTR_REG] & !0xff) | offset as u32;
        } else {
            self.write_bytes(self.last_capability + 1, &[offset as u8]);
        }
        self.registers[COMMAND_REG] |= STATUS_CAP_LIST << 16;
        self.last_capability = offset;
        self.next_capability = (end + 3) & !3;
        Ok(offset)
    }

    /// Snapshot of the whole space.
    pub fn state(&self) -> PciConfigurationState {
        PciConfigurationState {
            registers: self.registers.clone(),
            write_masks: self.write_masks.clone(),
            bars: self.bars.clone(),
            last_capability: self.last_capability,
            next_capability: self.next_capability,
        }
    }

    /// Rebuild from a snapshot (validated: sizes and BAR declarations must make sense).
    pub fn from_state(state: PciConfigurationState) -> Result<Self, PciError> {
        if state.registers.len() != EXT_CONFIG_DWORDS
            || state.write_masks.len() != EXT_CONFIG_DWORDS
        {
            return Err(PciError::InvalidState("register file size"));
        }
        let mut check = PciConfiguration::new_host_bridge(0, 0);
        for bar in &state.bars {
            check.add_bar(*bar)?;
        }
        if state.next_capability > STD_CONFIG_DWORDS * 4 || state.last_capability >= 256 {
            return Err(PciError::InvalidState("capability pointers"));
        }
        Ok(Self {
            registers: state.registers,
            write_masks: state.write_masks,
            bars: state.bars,
            last_capability: state.last_capability,
            next_capability: state.next_capability,
        })
    }
}

/// Turn a 1/2/4-byte access at byte `offset` of a dword into (value, byte-enable mask).
pub fn merge_bytes(offset: u64, data: &[u8]) -> Option<(u32, u32)> {
    let len = data.len();
    if !matches!(len, 1 | 2 | 4) || offset > 3 || offset as usize + len > 4 {
        return None;
    }
    let shift = (offset as u32) * 8;
    let mut value = 0u32;
    for (i, b) in data.iter().enumerate() {
        value |= u32::from(*b) << (i * 8);
    }
    let mask = if len == 4 {
        0xffff_ffff
    } else {
        ((1u32 << (len * 8)) - 1) << shift
    };
    Some((value << shift, mask))
}

/// Extract `data.len()` bytes at byte `offset` from a dword value (reads of 1, 2 or 4 bytes).
pub fn extract_bytes(value: u32, offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        let pos = offset.saturating_add(i as u64);
        *b = if pos < 4 {
            (value >> (pos * 8)) as u8
        } else {
            0xff
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> PciConfigParams {
        PciConfigParams {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            class: 0x01,
            subclass: 0x00,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
            interrupt_pin: 0,
        }
    }

    #[test]
    fn test_config_identity_registers_are_read_only() {
        let mut cfg = PciConfiguration::new(params());
        cfg.write_reg(0, 0, &[0xff, 0xff, 0xff, 0xff]);
        cfg.write_reg(2, 0, &[0; 4]);
        assert_eq!(cfg.read_reg(0), 0x1042_1af4);
        assert_eq!(cfg.read_reg(2) >> 24, 0x01);
    }

    #[test]
    fn test_config_command_only_writable_bits_change() {
        let mut cfg = PciConfiguration::new(params());
        cfg.write_reg(COMMAND_REG, 0, &[0xff, 0xff]);
        assert_eq!(cfg.command(), 0x0547);
        assert!(cfg.memory_enabled());
    }

    #[test]
    fn test_bar32_sizing_all_ones_returns_size_mask() {
        let mut cfg = PciConfiguration::new(params());
        cfg.add_bar(BarInfo {
            index: 0,
            size: 0x1000,
            kind: BarKind::Mem32,
            prefetchable: false,
        })
        .unwrap();
        cfg.set_bar_addr(0, 0xc000_0000).unwrap();
        cfg.write_reg(BAR0_REG, 0, &[0xff; 4]);
        assert_eq!(cfg.read_reg(BAR0_REG), 0xffff_f000);
        cfg.write_reg(BAR0_REG, 0, &0xc000_1000u32.to_le_bytes());
        assert_eq!(cfg.bar_addr(0), Some(0xc000_1000));
    }

    #[test]
    fn test_bar64_sizing_both_halves_return_mask_and_flags() {
        let mut cfg = PciConfiguration::new(params());
        cfg.add_bar(BarInfo {
            index: 2,
            size: 0x8000,
            kind: BarKind::Mem64,
            prefetchable: true,
        })
        .unwrap();
        cfg.write_reg(BAR0_REG + 2, 0, &[0xff; 4]);
        cfg.write_reg(BAR0_REG + 3, 0, &[0xff; 4]);
        assert_eq!(cfg.read_reg(BAR0_REG + 2), 0xffff_8000 | 0b1100);
        assert_eq!(cfg.read_reg(BAR0_REG + 3), 0xffff_ffff);
        assert_eq!(cfg.bar_addr(2), Some(0xffff_ffff_ffff_8000));
        assert_eq!(cfg.bar_for_reg(BAR0_REG + 3).map(|b| b.index), Some(2));
    }

    #[test]
    fn test_bar_overlapping_declaration_is_refused() {
        let mut cfg = PciConfiguration::new(params());
        let bar = |index, kind| BarInfo {
            index,
            size: 0x1000,
            kind,
            prefetchable: false,
        };
        cfg.add_bar(bar(0, BarKind::Mem64)).unwrap();
        assert!(cfg.add_bar(bar(1, BarKind::Mem32)).is_err());
        assert!(cfg.add_bar(bar(5, BarKind::Mem64)).is_err());
        assert!(cfg
            .add_bar(BarInfo {
                size: 0x1001,
                ..bar(2, BarKind::Mem32)
            })
            .is_err());
    }

    #[test]
    fn test_unimplemented_bar_reads_zero_after_sizing() {
        let mut cfg = PciConfiguration::new(params());
        cfg.write_reg(BAR0_REG + 1, 0, &[0xff; 4]);
        assert_eq!(cfg.read_reg(BAR0_REG + 1), 0);
    }

    #[test]
    fn test_capability_chain_links_in_order() {
        let mut cfg = PciConfiguration::new(params());
        let a = cfg.add_capability(&[0x09, 0, 16, 1, 2, 3], &[]).unwrap();
        let b = cfg
            .add_capability(&[0x11, 0, 0, 0], &[0, 0, 0xff, 0xff])
            .unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_eq!(cfg.read_reg(0x34 / 4) & 0xff, 0x40);
        let mut next = [0u8; 1];
        cfg.read_bytes(a + 1, &mut next);
        assert_eq!(next[0] as usize, b);
        cfg.read_bytes(b + 1, &mut next);
        assert_eq!(next[0], 0);
        assert_ne!(cfg.read_reg(COMMAND_REG) & (STATUS_CAP_LIST << 16), 0);
        // The writable mask applies to the capability's bytes only.
        cfg.write_reg(b / 4, 0, &[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(cfg.read_reg(b / 4), 0xddcc_0011);
    }

    #[test]
    fn test_capability_space_overflow_is_refused() {
        let mut cfg = PciConfiguration::new(params());
        let big = vec![0x09u8; 0xb0];
        cfg.add_capability(&big, &[]).unwrap();
        assert!(matches!(
            cfg.add_capability(&big, &[]),
            Err(PciError::CapabilitySpaceFull)
        ));
    }

    #[test]
    fn test_malformed_write_widths_are_ignored() {
        let mut cfg = PciConfiguration::new(params());
        cfg.write_reg(COMMAND_REG, 3, &[0xff, 0xff]);
        cfg.write_reg(COMMAND_REG, 0, &[0xff, 0xff, 0xff]);
        cfg.write_reg(5000, 0, &[0xff; 4]);
        cfg.write_reg(COMMAND_REG, u64::MAX, &[0xff]);
        let mut out = [0u8; 2];
        extract_bytes(0x1234_5678, u64::MAX, &mut out);
        assert_eq!(out, [0xff; 2]);
        assert_eq!(cfg.command(), 0);
        assert_eq!(cfg.read_reg(5000), 0xffff_ffff);
    }

    #[test]
    fn test_state_roundtrip_preserves_registers() {
        let mut cfg = PciConfiguration::new(params());
        cfg.add_bar(BarInfo {
            index: 0,
            size: 0x4000,
            kind: BarKind::Mem64,
            prefetchable: false,
        })
        .unwrap();
        cfg.set_bar_addr(0, 0xc000_4000).unwrap();
        let restored = PciConfiguration::from_state(cfg.state()).unwrap();
        assert_eq!(restored.bar_addr(0), Some(0xc000_4000));
        assert_eq!(restored.read_reg(0), cfg.read_reg(0));
    }
}
