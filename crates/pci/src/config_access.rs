//! The two ways the guest reaches configuration space: port I/O mechanism #1 (CF8/CFC) and
//! PCIe ECAM (memory-mapped).

use vm_device::{BusDevice, SharedDevice};

use crate::configuration::extract_bytes;
use crate::root::PciRoot;

/// Mechanism #1: insert at port 0xcf8 with length 8. The address register (0xcf8) takes dword
/// accesses only; the data port (0xcfc..0xcff) takes 1/2/4-byte accesses. Byte accesses to
/// 0xcf9 (the reset control register on PC chipsets) are forwarded to an optional device.
pub struct PciConfigIo {
    root: PciRoot,
    address: u32,
    port_cf9: Option<SharedDevice>,
}

/// Enable bit of the CF8 address register.
const CONFIG_ENABLE: u32 = 1 << 31;

impl PciConfigIo {
    /// A CF8/CFC decoder for `root`.
    pub fn new(root: PciRoot) -> Self {
        Self {
            root,
            address: 0,
            port_cf9: None,
        }
    }

    /// Forward byte accesses at port 0xcf9 (offset 0 of `device`), e.g. to the reset register.
    pub fn with_port_cf9(mut self, device: SharedDevice) -> Self {
        self.port_cf9 = Some(device);
        self
    }

    /// Decode the latched address: (bus, device, function, register) if enabled.
    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        if self.address & CONFIG_ENABLE == 0 {
            return None;
        }
        let a = self.address;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            ((a >> 2) & 0x3f) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            1 if data.len() == 1 => match &self.port_cf9 {
                Some(d) => d.lock().unwrap_or_else(|e| e.into_inner()).read(0, data),
                None => data.fill(0xff),
            },
            4..=7 if (offset - 4) as usize + data.len() <= 4 && matches!(data.len(), 1 | 2 | 4) => {
                match self.target() {
                    Some((bus, dev, func, reg)) => {
                        let v = self.root.config_read(bus, dev, func, reg);
                        extract_bytes(v, offset - 4, data);
                    }
                    None => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                // Bits 1:0 are reserved (read as zero); bits 30:24 are reserved too.
                self.address = u32::from_le_bytes(b) & 0x80ff_fffc;
            }
            1 if data.len() == 1 => {
                if let Some(d) = &self.port_cf9 {
                    d.lock().unwrap_or_else(|e| e.into_inner()).write(0, data);
                }
            }
            4..=7 if (offset - 4) as usize + data.len() <= 4 && matches!(data.len(), 1 | 2 | 4) => {
                if let Some((bus, dev, func, reg)) = self.target() {
                    self.root
                        .config_write(bus, dev, func, reg, offset - 4, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM: insert at `PCI_ECAM_START` with length `PCI_ECAM_SIZE`. Offset =
/// bus << 20 | device << 15 | function << 12 | register byte; 1/2/4-byte aligned-within-dword
/// accesses, anything else reads all-ones and is ignored on write.
pub struct PciConfigMmio {
    root: PciRoot,
}

impl PciConfigMmio {
    /// An ECAM decoder for `root`.
    pub fn new(root: PciRoot) -> Self {
        Self { root }
    }

    fn decode(offset: u64, len: usize) -> Option<(u8, u8, u8, usize, u64)> {
        let byte = offset & 3;
        if !matches!(len, 1 | 2 | 4) || byte as usize + len > 4 || offset >= 1 << 28 {
            return None;
        }
        Some((
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            ((offset & 0xfff) >> 2) as usize,
            byte,
        ))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::decode(offset, data.len()) {
            Some((bus, dev, func, reg, byte)) => {
                let v = self.root.config_read(bus, dev, func, reg);
                extract_bytes(v, byte, data);
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bus, dev, func, reg, byte)) = Self::decode(offset, data.len()) {
            self.root.config_write(bus, dev, func, reg, byte, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vm_device::Bus;

    fn cf8(dev: u32, reg: u32) -> [u8; 4] {
        (CONFIG_ENABLE | dev << 11 | reg << 2).to_le_bytes()
    }

    #[test]
    fn test_cf8_reads_host_bridge_id_in_all_widths() {
        let mut io = PciConfigIo::new(PciRoot::new(Bus::new()));
        io.write(0, &cf8(0, 0));
        let mut d4 = [0u8; 4];
        io.read(4, &mut d4);
        assert_eq!(u32::from_le_bytes(d4), 0x0d57_8086);
        let mut d2 = [0u8; 2];
        io.read(6, &mut d2);
        assert_eq!(u16::from_le_bytes(d2), 0x0d57);
        let mut d1 = [0u8; 1];
        io.read(5, &mut d1);
        assert_eq!(d1[0], 0x80);
        io.read(0, &mut d4);
        assert_eq!(d4, cf8(0, 0));
    }

    #[test]
    fn test_cf8_disabled_or_absent_device_reads_all_ones() {
        let mut io = PciConfigIo::new(PciRoot::new(Bus::new()));
        let mut d = [0u8; 4];
        io.write(0, &0u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        io.write(0, &cf8(7, 0));
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Misaligned data-port access.
        io.write(0, &cf8(0, 0));
        io.read(6, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn test_cf8_byte_write_to_cf9_goes_to_reset_device() {
        struct Rec(Vec<u8>);
        impl BusDevice for Rec {
            fn read(&mut self, _o: u64, d: &mut [u8]) {
                d.fill(0);
            }
            fn write(&mut self, _o: u64, d: &[u8]) {
                self.0.extend_from_slice(d);
            }
        }
        let rec = Arc::new(Mutex::new(Rec(Vec::new())));
        let mut io = PciConfigIo::new(PciRoot::new(Bus::new())).with_port_cf9(rec.clone());
        io.write(1, &[0x06]);
        assert_eq!(rec.lock().unwrap().0, vec![0x06]);
        let mut d4 = [0u8; 4];
        io.read(0, &mut d4);
        assert_eq!(d4, [0; 4]);
    }

    #[test]
    fn test_ecam_decodes_bus_device_function_register() {
        let root = PciRoot::new(Bus::new());
        let mut ecam = PciConfigMmio::new(root);
        let mut d = [0u8; 4];
        ecam.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        let mut b = [0u8; 1];
        ecam.read(0xb, &mut b);
        assert_eq!(b[0], 0x06);
        // Device 1 absent, function 1 of slot 0 absent, bus 1 absent.
        for off in [1 << 15, 1 << 12, 1 << 20] {
            ecam.read(off, &mut d);
            assert_eq!(d, [0xff; 4]);
        }
        // Width/alignment violations.
        let mut d8 = [0u8; 8];
        ecam.read(0, &mut d8);
        assert_eq!(d8, [0xff; 8]);
        ecam.read(3, &mut d[..2]);
        assert_eq!(d[..2], [0xff; 2]);
    }

    #[test]
    fn test_ecam_extended_space_reads_zero_for_present_device() {
        let mut ecam = PciConfigMmio::new(PciRoot::new(Bus::new()));
        let mut d = [0xaa; 4];
        ecam.read(0x100, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
