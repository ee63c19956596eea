//! Address-range dispatch for port I/O and MMIO exits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device model that answers guest accesses in the address range it was inserted at.
///
/// `offset` is relative to the start of the range the device was inserted with; `data.len()` is
/// the access width (1, 2, 4 or 8 bytes, or anything a hostile guest chooses for MMIO).
/// Implementations must never panic on any offset or width: the guest controls both.
pub trait BusDevice: Send {
    /// Guest read: fill `data` (leave it zeroed/0xff for unmapped registers).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A half-open address range `[base, base + len)` on a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusRange {
    /// First address of the range.
    pub base: u64,
    /// Length in bytes (never zero).
    pub len: u64,
}

impl BusRange {
    /// Whether `addr` falls inside the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }
}

/// Errors from inserting into or removing from a [`Bus`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a range already on the bus.
    #[error("Bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    /// A zero-length range or one that wraps around the address space.
    #[error("Bus range {base:#x}+{len:#x} is empty or wraps")]
    InvalidRange { base: u64, len: u64 },
    /// Nothing is mapped at the address given to `remove`.
    #[error("No device at {0:#x}")]
    NotFound(u64),
}

/// A shared device handle as stored on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Maps address ranges to devices. Cloneable handles share one map so the PCI layer can move a
/// BAR while vCPU threads keep dispatching.
#[derive(Clone, Default)]
pub struct Bus {
    devices: Arc<RwLock<BTreeMap<u64, (BusRange, SharedDevice)>>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Map `device` at `[base, base+len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let range = BusRange { base, len };
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let overlaps = map
            .range(..base.saturating_add(len))
            .next_back()
            .is_some_and(|(_, (r, _))| r.base + r.len > base);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        map.insert(base, (range, device));
        Ok(())
    }

    /// Unmap the device whose range starts at `base`, returning it.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&base)
            .map(|(_, d)| d)
            .ok_or(BusError::NotFound(base))
    }

    /// The device covering `addr` and the offset of `addr` inside its range.
    pub fn resolve(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (_, (range, dev)) = map.range(..=addr).next_back()?;
        range
            .contains(addr)
            .then(|| (dev.clone(), addr - range.base))
    }

    /// Dispatch a guest read. Returns false if no device claims `addr` (data is left untouched).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a guest write. Returns false if no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn test_bus_dispatch_offset_is_relative_to_range_base() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x100, 0x10)
            .unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x105, &mut data));
        assert_eq!(data[0], 15);
        assert!(!bus.read(0x110, &mut data));
    }

    #[test]
    fn test_bus_insert_overlapping_range_is_refused() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(0))), 0x100, 0x10)
            .unwrap();
        let err = bus.insert(Arc::new(Mutex::new(Echo(0))), 0x108, 0x10);
        assert_eq!(
            err,
            Err(BusError::Overlap {
                base: 0x108,
                len: 0x10
            })
        );
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(0))), 0x110, 0x10)
            .is_ok());
    }

    #[test]
    fn test_bus_insert_wrapping_range_is_refused() {
        let bus = Bus::new();
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(0))), u64::MAX, 2)
            .is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0, 0).is_err());
    }
}
