//! Bus 0: slot bookkeeping, BAR allocation and BAR mapping on the MMIO bus.

use std::sync::{Arc, Mutex, MutexGuard};

use arch::layout::{PCI_MMIO32_SIZE, PCI_MMIO32_START};
use vm_device::{Bus, BusDevice};

use crate::configuration::{BarInfo, COMMAND_MEMORY, COMMAND_REG, NUM_BARS};
use crate::device::{HostBridge, PciDevice};
use crate::PciError;

/// A device as the root holds it.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Device slots on bus 0 (slot 0 is the host bridge).
const NUM_SLOTS: usize = 32;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forwards MMIO accesses inside one BAR to its device.
struct BarRegion {
    device: SharedPciDevice,
    bar: usize,
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.bar, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write_bar(self.bar, offset, data)
    }
}

struct Slot {
    device: SharedPciDevice,
    /// Where each BAR is currently mapped on the MMIO bus.
    mapped: [Option<u64>; NUM_BARS],
}

struct RootInner {
    mmio_bus: Bus,
    slots: Vec<Option<Slot>>,
    /// Address ranges BARs may live in: `(start, size)`.
    windows: Vec<(u64, u64)>,
    /// Next free address of the 32-bit window (bump allocation at device-add time).
    next_mmio32: u64,
}

/// PCI bus 0. Cloning gives another handle to the same bus (for the CF8 and ECAM devices).
#[derive(Clone)]
pub struct PciRoot {
    inner: Arc<Mutex<RootInner>>,
}

/// Whether `[base, base+size)` lies inside one of `windows`.
fn in_windows(windows: &[(u64, u64)], base: u64, size: u64) -> bool {
    let Some(end) = base.checked_add(size) else {
        return false;
    };
    windows
        .iter()
        .any(|&(start, len)| base >= start && end <= start.saturating_add(len))
}

impl PciRoot {
    /// Bus 0 with the host bridge in slot 0. BARs are allocated from and may only be moved
    /// within the 32-bit window `PCI_MMIO32_START..+PCI_MMIO32_SIZE` (see
    /// [`PciRoot::add_mmio_window`]) and are mapped on `mmio_bus`.
    pub fn new(mmio_bus: Bus) -> Self {
        let mut slots: Vec<Option<Slot>> = (0..NUM_SLOTS).map(|_| None).collect();
        let bridge: SharedPciDevice = Arc::new(Mutex::new(HostBridge::new()));
        slots[0] = Some(Slot {
            device: bridge,
            mapped: [None; NUM_BARS],
        });
        Self {
            inner: Arc::new(Mutex::new(RootInner {
                mmio_bus,
                slots,
                windows: vec![(PCI_MMIO32_START, PCI_MMIO32_SIZE)],
                next_mmio32: PCI_MMIO32_START,
            })),
        }
    }

    /// Also let the guest place BARs in `[start, start+size)` (e.g. the 64-bit window above
    /// RAM, which is not known to this crate).
    pub fn add_mmio_window(&self, start: u64, size: u64) {
        lock(&self.inner).windows.push((start, size));
    }

    /// Plug `device` into the first free slot: allocate and program its BARs, enable memory
    /// decode (as firmware would) and map the BARs. Returns the slot (device) number.
    pub fn add_device<D: PciDevice + 'static>(
        &self,
        device: Arc<Mutex<D>>,
    ) -> Result<u8, PciError> {
        let device: SharedPciDevice = device;
        let mut inner = lock(&self.inner);
        let slot = (1..NUM_SLOTS)
            .find(|&s| inner.slots[s].is_none())
            .ok_or(PciError::NoFreeSlot)?;
        let mut dev = lock(&device);
        let mut bars: Vec<BarInfo> = dev.bars();
        // Largest first keeps natural alignment from wasting space.
        bars.sort_by_key(|b| std::cmp::Reverse(b.size));
        let window_end = PCI_MMIO32_START + PCI_MMIO32_SIZE;
        let mut next = inner.next_mmio32;
        let mut placed = Vec::new();
        for bar in &bars {
            let base = next
                .checked_next_multiple_of(bar.size)
                .filter(|b| b.checked_add(bar.size).is_some_and(|e| e <= window_end))
                .ok_or(PciError::OutOfMmioSpace(bar.size))?;
            placed.push((bar.index, base, bar.size));
            next = base + bar.size;
        }
        for &(index, base, _) in &placed {
            dev.config_mut().set_bar_addr(index, base)?;
        }
        dev.config_mut().set_command_bits(COMMAND_MEMORY, true);
        let mut mapped = [None; NUM_BARS];
        for &(index, base, size) in &placed {
            let region = Arc::new(Mutex::new(BarRegion {
                device: device.clone(),
                bar: index,
            }));
            if let Err(e) = inner.mmio_bus.insert(region, base, size) {
                for (i, m) in mapped.iter().enumerate() {
                    if let Some(b) = m {
                        let _ = inner.mmio_bus.remove(*b);
                        let _ = dev.bar_moved(i, Some(*b), None);
                    }
                }
                return Err(e.into());
            }
            mapped[index] = Some(base);
            dev.bar_moved(index, None, Some(base))?;
        }
        drop(dev);
        inner.next_mmio32 = next;
        inner.slots[slot] = Some(Slot { device, mapped });
        Ok(slot as u8)
    }

    /// Re-derive every BAR mapping from the devices' configuration space, e.g. after device
    /// state was restored from a snapshot (add the devices first, restore them, then call
    /// this).
    pub fn sync_mappings(&self) {
        let mut inner = lock(&self.inner);
        for slot in 0..NUM_SLOTS {
            let Some(Some(s)) = inner.slots.get(slot) else {
                continue;
            };
            let device = s.device.clone();
            let mut d = lock(&device);
            inner.update_mappings(slot, &device, &mut *d);
        }
    }

    /// Where BAR `bar` of the device in `slot` is mapped now.
    pub fn bar_mapping(&self, slot: u8, bar: usize) -> Option<u64> {
        let inner = lock(&self.inner);
        inner
            .slots
            .get(slot as usize)?
            .as_ref()?
            .mapped
            .get(bar)
            .copied()?
    }

    /// Configuration read of dword `reg` of bus/device/function; absent functions read
    /// all-ones.
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, reg: usize) -> u32 {
        let inner = lock(&self.inner);
        match inner.slot(bus, dev, func) {
            Some(slot) => lock(&slot.device).read_config_register(reg),
            None => 0xffff_ffff,
        }
    }

    /// Configuration write; BAR and command-register changes move the BAR mappings.
    pub fn config_write(&self, bus: u8, dev: u8, func: u8, reg: usize, offset: u64, data: &[u8]) {
        let mut inner = lock(&self.inner);
        let Some(slot) = inner.slot(bus, dev, func) else {
            return;
        };
        let device = slot.device.clone();
        let mut d = lock(&device);
        d.write_config_register(reg, offset, data);
        let touches_bars = reg == COMMAND_REG || d.config().bar_for_reg(reg).is_some();
        if touches_bars {
            inner.update_mappings(dev as usize, &device, &mut *d);
        }
    }
}

impl RootInner {
    fn slot(&self, bus: u8, dev: u8, func: u8) -> Option<&Slot> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(dev as usize)?.as_ref()
    }

    /// Bring the bus mappings of the device in `slot` in line with its BAR registers and
    /// command register. An unacceptable new address (outside the windows, overlapping
    /// another mapping) is refused: the old mapping stays and the refusal is logged.
    fn update_mappings(&mut self, slot: usize, device: &SharedPciDevice, dev: &mut dyn PciDevice) {
        let decode = dev.config().memory_enabled();
        let bars: Vec<BarInfo> = dev.config().bars().to_vec();
        for bar in bars {
            let Some(Some(s)) = self.slots.get(slot) else {
                return;
            };
            let old = s.mapped[bar.index];
            let wanted = if decode {
                dev.config().bar_addr(bar.index)
            } else {
                None
            };
            if wanted == old {
                continue;
            }
            let new = match wanted {
                Some(base) if in_windows(&self.windows, base, bar.size) => {
                    if let Some(o) = old {
                        let _ = self.mmio_bus.remove(o);
                    }
                    let region = Arc::new(Mutex::new(BarRegion {
                        device: device.clone(),
                        bar: bar.index,
                    }));
                    match self.mmio_bus.insert(region.clone(), base, bar.size) {
                        Ok(()) => Some(base),
                        Err(e) => {
                            tracing::warn!(
                                "PCI 00:{slot:02x}.0 BAR{} move to {base:#x} refused: {e}",
                                bar.index
                            );
                            if let Some(o) = old {
                                if let Err(e) = self.mmio_bus.insert(region, o, bar.size) {
                                    tracing::error!(
                                        "PCI BAR{} remap at {o:#x} failed: {e}",
                                        bar.index
                                    );
                                    None
                                } else {
                                    old
                                }
                            } else {
                                None
                            }
                        }
                    }
                }
                Some(base) => {
                    // Sizing writes (all-ones) land here too; they are expected and harmless.
                    tracing::debug!(
                        "PCI 00:{slot:02x}.0 BAR{} at {base:#x} is outside the MMIO windows; not mapped",
                        bar.index
                    );
                    old
                }
                None => {
                    if let Some(o) = old {
                        let _ = self.mmio_bus.remove(o);
                    }
                    None
                }
            };
            if new != old {
                if let Err(e) = dev.bar_moved(bar.index, old, new) {
                    tracing::warn!("PCI 00:{slot:02x}.0 BAR{}: {e}", bar.index);
                }
                if let Some(Some(s)) = self.slots.get_mut(slot) {
                    s.mapped[bar.index] = new;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::{BarKind, PciConfigParams, PciConfiguration, BAR0_REG};

    /// A device with one 64-bit BAR that records accesses and moves.
    struct TestDev {
        config: PciConfiguration,
        moves: Vec<(usize, Option<u64>, Option<u64>)>,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }

    impl TestDev {
        fn new(size: u64) -> Self {
            let mut config = PciConfiguration::new(PciConfigParams {
                vendor_id: 0x1af4,
                device_id: 0x1042,
                revision_id: 1,
                class: 1,
                subclass: 0,
                prog_if: 0,
                subsystem_vendor_id: 0x1af4,
                subsystem_id: 2,
                interrupt_pin: 0,
            });
            config
                .add_bar(BarInfo {
                    index: 0,
                    size,
                    kind: BarKind::Mem64,
                    prefetchable: false,
                })
                .unwrap();
            Self {
                config,
                moves: Vec::new(),
                last_write: None,
            }
        }
    }

    impl PciDevice for TestDev {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.config
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) ^ (offset as u8));
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((bar, offset, data.to_vec()));
        }
        fn bar_moved(
            &mut self,
            bar: usize,
            old: Option<u64>,
            new: Option<u64>,
        ) -> Result<(), PciError> {
            self.moves.push((bar, old, new));
            Ok(())
        }
    }

    fn write32(root: &PciRoot, dev: u8, reg: usize, v: u32) {
        root.config_write(0, dev, 0, reg, 0, &v.to_le_bytes());
    }

    #[test]
    fn test_root_slot0_is_host_bridge_and_empty_slots_read_ones() {
        let root = PciRoot::new(Bus::new());
        assert_eq!(root.config_read(0, 0, 0, 0), 0x0d57_8086);
        assert_eq!(root.config_read(0, 0, 0, 2) >> 24, 0x06);
        assert_eq!(root.config_read(0, 5, 0, 0), 0xffff_ffff);
        assert_eq!(root.config_read(0, 0, 1, 0), 0xffff_ffff);
        assert_eq!(root.config_read(1, 0, 0, 0), 0xffff_ffff);
    }

    #[test]
    fn test_root_add_device_maps_bar_and_forwards_accesses() {
        let bus = Bus::new();
        let root = PciRoot::new(bus.clone());
        let dev = Arc::new(Mutex::new(TestDev::new(0x4000)));
        let slot = root.add_device(dev.clone()).unwrap();
        assert_eq!(slot, 1);
        let base = root.bar_mapping(1, 0).unwrap();
        assert_eq!(base, PCI_MMIO32_START);
        assert_eq!(base % 0x4000, 0);
        let mut data = [0u8; 4];
        assert!(bus.read(base + 0x10, &mut data));
        assert_eq!(data, [0x10; 4]);
        assert!(bus.write(base + 0x3000, &[1, 2]));
        assert_eq!(
            dev.lock().unwrap().last_write,
            Some((0, 0x3000, vec![1, 2]))
        );
        assert_eq!(dev.lock().unwrap().moves, vec![(0, None, Some(base))]);
        assert_ne!(root.config_read(0, 1, 0, COMMAND_REG) & COMMAND_MEMORY, 0);
    }

    #[test]
    fn test_root_bars_are_naturally_aligned_and_disjoint() {
        let root = PciRoot::new(Bus::new());
        root.add_device(Arc::new(Mutex::new(TestDev::new(0x1000))))
            .unwrap();
        root.add_device(Arc::new(Mutex::new(TestDev::new(0x10000))))
            .unwrap();
        let a = root.bar_mapping(1, 0).unwrap();
        let b = root.bar_mapping(2, 0).unwrap();
        assert_eq!(b % 0x10000, 0);
        assert!(a + 0x1000 <= b);
    }

    #[test]
    fn test_root_guest_moves_bar_and_device_is_told() {
        let bus = Bus::new();
        let root = PciRoot::new(bus.clone());
        let dev = Arc::new(Mutex::new(TestDev::new(0x4000)));
        root.add_device(dev.clone()).unwrap();
        let old = root.bar_mapping(1, 0).unwrap();
        let new = PCI_MMIO32_START + 0x10_0000;
        write32(&root, 1, BAR0_REG, new as u32);
        assert_eq!(root.bar_mapping(1, 0), Some(new));
        let mut data = [0u8; 1];
        assert!(!bus.read(old, &mut data));
        assert!(bus.read(new + 1, &mut data));
        assert_eq!(
            dev.lock().unwrap().moves.last(),
            Some(&(0, Some(old), Some(new)))
        );
    }

    #[test]
    fn test_root_bar_outside_window_or_overlapping_is_refused() {
        let bus = Bus::new();
        let root = PciRoot::new(bus.clone());
        root.add_device(Arc::new(Mutex::new(TestDev::new(0x4000))))
            .unwrap();
        root.add_device(Arc::new(Mutex::new(TestDev::new(0x4000))))
            .unwrap();
        let a = root.bar_mapping(1, 0).unwrap();
        let b = root.bar_mapping(2, 0).unwrap();
        // Onto RAM.
        write32(&root, 2, BAR0_REG, 0x10_0000);
        assert_eq!(root.bar_mapping(2, 0), Some(b));
        // Onto the other device's BAR.
        write32(&root, 2, BAR0_REG, a as u32);
        assert_eq!(root.bar_mapping(2, 0), Some(b));
        assert!(bus.read(b, &mut [0u8; 1]));
        // Sizing: all-ones does not move anything.
        write32(&root, 2, BAR0_REG, 0xffff_ffff);
        write32(&root, 2, BAR0_REG + 1, 0xffff_ffff);
        assert_eq!(root.bar_mapping(2, 0), Some(b));
        assert_eq!(root.config_read(0, 2, 0, BAR0_REG), 0xffff_c004);
    }

    #[test]
    fn test_root_memory_decode_off_unmaps_bars() {
        let bus = Bus::new();
        let root = PciRoot::new(bus.clone());
        let dev = Arc::new(Mutex::new(TestDev::new(0x4000)));
        root.add_device(dev.clone()).unwrap();
        let base = root.bar_mapping(1, 0).unwrap();
        write32(&root, 1, COMMAND_REG, 0);
        assert_eq!(root.bar_mapping(1, 0), None);
        assert!(!bus.read(base, &mut [0u8; 1]));
        write32(&root, 1, COMMAND_REG, COMMAND_MEMORY);
        assert_eq!(root.bar_mapping(1, 0), Some(base));
        assert_eq!(
            dev.lock().unwrap().moves[1..],
            [(0, Some(base), None), (0, None, Some(base))]
        );
    }

    #[test]
    fn test_root_sync_mappings_follows_restored_config() {
        let bus = Bus::new();
        let root = PciRoot::new(bus.clone());
        let dev = Arc::new(Mutex::new(TestDev::new(0x4000)));
        root.add_device(dev.clone()).unwrap();
        let new = PCI_MMIO32_START + 0x40_0000;
        dev.lock()
            .unwrap()
            .config_mut()
            .set_bar_addr(0, new)
            .unwrap();
        root.sync_mappings();
        assert_eq!(root.bar_mapping(1, 0), Some(new));
        assert!(bus.read(new, &mut [0u8; 1]));
    }

    #[test]
    fn test_root_full_bus_refuses_device() {
        let root = PciRoot::new(Bus::new());
        for _ in 1..32 {
            root.add_device(Arc::new(Mutex::new(TestDev::new(0x1000))))
                .unwrap();
        }
        assert!(matches!(
            root.add_device(Arc::new(Mutex::new(TestDev::new(0x1000)))),
            Err(PciError::NoFreeSlot)
        ));
    }
}
