//! virtio-pci transport tests: a driver's view through ECAM and the BAR, with fake KVM
//! plumbing (MSI routes and ioeventfds as plain eventfds).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arch::layout::{PCI_ECAM_SIZE, PCI_ECAM_START};
use disk::RawDisk;
use pci::{PciConfigMmio, PciRoot};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_device::{Bus, BusDevice, InterruptError, MsiRoute};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::block::Block;
use crate::status::*;

const MEM_SIZE: usize = 0x40_0000;

#[derive(Default)]
struct FakeRouter {
    next: Mutex<u32>,
    events: Mutex<HashMap<u32, EventFd>>,
    routes: Mutex<HashMap<u32, (u64, u32, bool)>>,
}

impl MsiRouter for FakeRouter {
    fn allocate(&self) -> std::result::Result<MsiRoute, InterruptError> {
        let mut n = self.next.lock().unwrap();
        *n += 1;
        let gsi = 23 + *n;
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        self.events
            .lock()
            .unwrap()
            .insert(gsi, event.try_clone().unwrap());
        Ok(MsiRoute { gsi, event })
    }
    fn update(
        &self,
        gsi: u32,
        addr: u64,
        data: u32,
        enabled: bool,
    ) -> std::result::Result<(), InterruptError> {
        self.routes
            .lock()
            .unwrap()
            .insert(gsi, (addr, data, enabled));
        Ok(())
    }
    fn release(&self, _route: MsiRoute) -> std::result::Result<(), InterruptError> {
        Ok(())
    }
}

#[derive(Default)]
struct FakeIoEvents {
    regs: Mutex<HashMap<u64, EventFd>>,
}

impl IoEventRegistrar for FakeIoEvents {
    fn register_mmio(
        &self,
        event: &EventFd,
        addr: u64,
        _datamatch: Option<u32>,
    ) -> std::result::Result<(), InterruptError> {
        self.regs
            .lock()
            .unwrap()
            .insert(addr, event.try_clone().unwrap());
        Ok(())
    }
    fn unregister_mmio(
        &self,
        _event: &EventFd,
        addr: u64,
        _datamatch: Option<u32>,
    ) -> std::result::Result<(), InterruptError> {
        self.regs
            .lock()
            .unwrap()
            .remove(&addr)
            .map(|_| ())
            .ok_or(InterruptError::Hypervisor("not registered".into()))
    }
}

/// A driver-side split ring with room for every field (virtio-queue's mock places its used
/// ring over the avail ring's used_event, which breaks EVENT_IDX tests).
struct TestRing {
    mem: GuestMemoryMmap,
}

impl TestRing {
    const SIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn new(mem: GuestMemoryMmap) -> Self {
        for a in [Self::AVAIL, Self::USED] {
            mem.write_slice(&[0u8; 0x200], GuestAddress(a)).unwrap();
        }
        Self { mem }
    }
    fn set_desc(&self, i: u16, d: RawDescriptor) {
        self.mem
            .write_obj(d, GuestAddress(Self::DESC + 16 * u64::from(i)))
            .unwrap();
    }
    fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(Self::AVAIL + 2)).unwrap()
    }
    /// Publish the chain starting at `head`.
    fn publish(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = Self::AVAIL + 4 + 2 * u64::from(idx % Self::SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(Self::AVAIL + 2))
            .unwrap();
    }
    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(Self::USED + 2)).unwrap()
    }
    fn set_used_event(&self, v: u16) {
        let addr = Self::AVAIL + 4 + 2 * u64::from(Self::SIZE);
        self.mem.write_obj(v, GuestAddress(addr)).unwrap();
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    bus: Bus,
    root: PciRoot,
    ecam: PciConfigMmio,
    router: Arc<FakeRouter>,
    ioevents: Arc<FakeIoEvents>,
    dev: Arc<Mutex<VirtioPciDevice>>,
    slot: u8,
    _file: TempFile,
}

/// A zero-filled 64-sector disk image.
fn temp_disk() -> TempFile {
    let file = TempFile::new().unwrap();
    file.as_file().set_len(64 * 512).unwrap();
    file
}

/// A virtio-blk PCI device over the disk image `file`.
fn block_device(
    file: &TempFile,
    mem: &GuestMemoryMmap,
    router: Arc<FakeRouter>,
    ioevents: Arc<FakeIoEvents>,
) -> VirtioPciDevice {
    let block = Block::new(RawDisk::open(file.as_path(), false).unwrap(), None).unwrap();
    VirtioPciDevice::new(Box::new(block), mem.clone(), router, ioevents).unwrap()
}

fn rig() -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let file = temp_disk();
    std::os::unix::fs::FileExt::write_all_at(file.as_file(), &[0x5a; 512], 512).unwrap();
    let router = Arc::new(FakeRouter::default());
    let ioevents = Arc::new(FakeIoEvents::default());
    let bus = Bus::new();
    let root = PciRoot::new(bus.clone());
    let dev = Arc::new(Mutex::new(block_device(
        &file,
        &mem,
        router.clone(),
        ioevents.clone(),
    )));
    let slot = root.add_device(dev.clone()).unwrap();
    let ecam = PciConfigMmio::new(root.clone());
    Rig {
        mem,
        bus,
        root,
        ecam,
        router,
        ioevents,
        dev,
        slot,
        _file: file,
    }
}

/// A rig whose device is live (`Rig::activate`) on a freshly zeroed `TestRing`.
fn active_rig() -> (Rig, TestRing) {
    let mut rig = rig();
    let ring = TestRing::new(rig.mem.clone());
    rig.activate();
    (rig, ring)
}

impl Rig {
    fn cfg_read(&mut self, off: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.ecam
            .read(u64::from(self.slot) << 15 | off, &mut b[..len]);
        u32::from_le_bytes(b)
    }
    fn cfg_write(&mut self, off: u64, data: &[u8]) {
        self.ecam.write(u64::from(self.slot) << 15 | off, data);
    }
    fn bar(&self) -> u64 {
        self.root.bar_mapping(self.slot, 0).unwrap()
    }
    fn r(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(self.bus.read(self.bar() + off, &mut b[..len]));
        u64::from_le_bytes(b)
    }
    fn w(&self, off: u64, v: u64, len: usize) {
        assert!(self.bus.write(self.bar() + off, &v.to_le_bytes()[..len]));
    }
    fn status(&self) -> u8 {
        self.r(0x14, 1) as u8
    }
    /// Driver write of the device status register.
    fn set_status(&self, status: u8) {
        self.w(0x14, u64::from(status), 1);
    }
    /// Find vendor capabilities: cfg_type -> capability offset.
    fn virtio_caps(&mut self) -> HashMap<u8, u64> {
        let mut caps = HashMap::new();
        let mut ptr = self.cfg_read(0x34, 1) as u64;
        let mut guard = 0;
        while ptr != 0 && guard < 48 {
            let id = self.cfg_read(ptr, 1) as u8;
            if id == 0x09 {
                caps.insert(self.cfg_read(ptr + 3, 1) as u8, ptr);
            } else {
                caps.insert(0x80 | id, ptr);
            }
            ptr = self.cfg_read(ptr + 1, 1) as u64;
            guard += 1;
        }
        caps
    }
    /// The Linux-style bring-up up to (not including) DRIVER_OK, with MSI-X vector 0 for
    /// config and 1 for queue 0.
    fn negotiate(&mut self) {
        self.w(0x14, 0, 1);
        self.set_status(ACKNOWLEDGE | DRIVER);
        self.w(0x00, 1, 4);
        let hi = self.r(0x04, 4);
        self.w(0x00, 0, 4);
        let lo = self.r(0x04, 4);
        self.w(0x08, 0, 4);
        self.w(0x0c, lo, 4);
        self.w(0x08, 1, 4);
        self.w(0x0c, hi, 4);
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_ne!(self.status() & FEATURES_OK, 0);
        // MSI-X: enable in config space, program and unmask vectors 0 and 1.
        let msix = self.virtio_caps()[&(0x80 | 0x11)];
        self.cfg_write(msix + 2, &0x8000u16.to_le_bytes());
        for v in 0..2u64 {
            let e = MSIX_TABLE_OFFSET + v * 16;
            self.w(e, 0xfee0_0000, 4);
            self.w(e + 4, 0, 4);
            self.w(e + 8, 0x30 + v, 4);
            self.w(e + 12, 0, 4);
        }
        self.w(0x10, 0, 2);
        assert_eq!(self.r(0x10, 2), 0);
        self.w(0x16, 0, 2);
        self.w(0x18, 16, 2);
        self.w(0x1a, 1, 2);
        assert_eq!(self.r(0x1a, 2), 1);
        self.w(0x20, TestRing::DESC, 8);
        self.w(0x28, TestRing::AVAIL & 0xffff_ffff, 4);
        self.w(0x2c, TestRing::AVAIL >> 32, 4);
        self.w(0x30, TestRing::USED, 8);
        self.w(0x1c, 1, 2);
    }
    /// `negotiate`, then DRIVER_OK: the device is live.
    fn activate(&mut self) {
        self.negotiate();
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }
    /// The queue 0 doorbell as KVM would deliver it: the registered ioeventfd.
    fn doorbell(&self) -> EventFd {
        self.ioevents.regs.lock().unwrap()[&(self.bar() + NOTIFY_OFFSET)]
            .try_clone()
            .unwrap()
    }
    fn queue_vector_event(&self) -> EventFd {
        let gsi = 25; // Second allocated route: vector 1.
        self.router.events.lock().unwrap()[&gsi]
            .try_clone()
            .unwrap()
    }
}

fn wait_for(evt: &EventFd) {
    // Hang guard only: the worker answers in microseconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    while evt.read().is_err() {
        assert!(Instant::now() < deadline, "no interrupt");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Queue a 512-byte read of sector 1 into 0x20_0000 (status at 0x30_0000).
fn read_request(rig: &Rig, ring: &TestRing) {
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    hdr[8..].copy_from_slice(&1u64.to_le_bytes());
    rig.mem.write_slice(&hdr, GuestAddress(0x10_0000)).unwrap();
    rig.mem.write_obj(0xffu8, GuestAddress(0x30_0000)).unwrap();
    let d = |a, l, f: u32, n| RawDescriptor::from(SplitDescriptor::new(a, l, f as u16, n));
    ring.set_desc(0, d(0x10_0000, 16, VRING_DESC_F_NEXT, 1));
    ring.set_desc(
        1,
        d(0x20_0000, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
    );
    ring.set_desc(2, d(0x30_0000, 1, VRING_DESC_F_WRITE, 0));
    ring.publish(0);
}

/// Queue `read_request`, ring the doorbell by a write that reaches the transport (not the
/// ioeventfd) and wait for the queue interrupt.
fn read_through_transport_notify(rig: &Rig, ring: &TestRing) {
    let irq = rig.queue_vector_event();
    read_request(rig, ring);
    rig.w(NOTIFY_OFFSET, 0, 2);
    wait_for(&irq);
}

#[test]
fn test_pci_identity_and_capability_chain() {
    let mut rig = rig();
    assert_eq!(rig.cfg_read(0, 4), 0x1042_1af4);
    assert_eq!(rig.cfg_read(8, 1), 1, "revision");
    assert_eq!(rig.cfg_read(0xb, 1), 0x01, "storage class");
    assert_eq!(rig.cfg_read(0x2c, 4), 0x1100_1af4);
    let caps = rig.virtio_caps();
    for t in [1, 2, 3, 4, 5, 0x80 | 0x11] {
        assert!(caps.contains_key(&t), "capability {t:#x}");
    }
    let notify = caps[&2];
    assert_eq!(rig.cfg_read(notify + 2, 1), 20, "notify cap_len");
    assert_eq!(rig.cfg_read(notify + 8, 4) as u64, NOTIFY_OFFSET);
    assert_eq!(rig.cfg_read(notify + 16, 4), NOTIFY_OFF_MULTIPLIER);
    let common = caps[&1];
    assert_eq!(rig.cfg_read(common + 4, 1), 0, "BAR 0");
    assert_eq!(rig.cfg_read(common + 12, 4) as u64, COMMON_CFG_SIZE);
    // 64-bit memory BAR of BAR_SIZE.
    let bar = rig.bar();
    assert_eq!(rig.cfg_read(0x10, 4) as u64, (bar & 0xffff_fff0) | 0b100);
    rig.cfg_write(0x10, &[0xff; 4]);
    assert_eq!(
        rig.cfg_read(0x10, 4) as u64,
        (!(BAR_SIZE - 1) & 0xffff_fff0) | 0b100
    );
    rig.cfg_write(0x10, &(bar as u32).to_le_bytes());
    assert_eq!(rig.bar(), bar);
    // MSI-X: table size N-1 = 1 (one queue + config), table and PBA in BAR 0.
    let msix = caps[&(0x80 | 0x11)];
    assert_eq!(rig.cfg_read(msix + 2, 2), 1);
    assert_eq!(rig.cfg_read(msix + 4, 4) as u64, MSIX_TABLE_OFFSET);
    assert_eq!(rig.cfg_read(msix + 8, 4) as u64, MSIX_PBA_OFFSET);
    let _ = PCI_ECAM_START + PCI_ECAM_SIZE;
}

#[test]
fn test_doorbell_is_registered_as_ioeventfd_and_follows_bar() {
    let mut rig = rig();
    let bar = rig.bar();
    assert!(rig
        .ioevents
        .regs
        .lock()
        .unwrap()
        .contains_key(&(bar + NOTIFY_OFFSET)));
    let new = bar + 0x10_0000;
    rig.cfg_write(0x10, &(new as u32).to_le_bytes());
    rig.cfg_write(0x14, &((new >> 32) as u32).to_le_bytes());
    assert_eq!(rig.bar(), new);
    let regs = rig.ioevents.regs.lock().unwrap();
    assert!(regs.contains_key(&(new + NOTIFY_OFFSET)));
    assert!(!regs.contains_key(&(bar + NOTIFY_OFFSET)));
    assert_eq!(
        rig.dev.lock().unwrap().notify_addr(0),
        Some(new + NOTIFY_OFFSET)
    );
}

#[test]
fn test_block_read_end_to_end_through_ioeventfd_and_msix() {
    let (rig, ring) = active_rig();
    assert_eq!(rig.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(rig.dev.lock().unwrap().is_activated());
    let irq = rig.queue_vector_event();
    read_request(&rig, &ring);
    // The doorbell as KVM would deliver it: through the registered ioeventfd.
    let bell = rig.doorbell();
    bell.write(1).unwrap();
    wait_for(&irq);
    assert_eq!(ring.used_idx(), 1);
    assert_eq!(
        rig.mem.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
    let mut data = [0u8; 512];
    rig.mem
        .read_slice(&mut data, GuestAddress(0x20_0000))
        .unwrap();
    assert_eq!(data, [0x5a; 512]);
    let route = rig.router.routes.lock().unwrap()[&25];
    assert_eq!(route, (0xfee0_0000, 0x31, true));
    // Reset stops the worker and clears the queue.
    rig.w(0x14, 0, 1);
    assert_eq!(rig.status(), 0);
    assert!(!rig.dev.lock().unwrap().is_activated());
    assert_eq!(rig.r(0x1c, 2), 0);
    assert_eq!(rig.r(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
}

#[test]
fn test_notify_write_reaching_the_transport_still_rings() {
    let (rig, ring) = active_rig();
    read_through_transport_notify(&rig, &ring);
    assert_eq!(ring.used_idx(), 1);
}

#[test]
fn test_features_ok_refused_without_version_1_or_with_unoffered_bits() {
    let rig = rig();
    rig.set_status(ACKNOWLEDGE | DRIVER);
    rig.w(0x08, 0, 4);
    rig.w(0x0c, 1 << VIRTIO_BLK_F_FLUSH_BIT, 4);
    rig.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rig.status() & FEATURES_OK, 0, "VERSION_1 missing");
    rig.w(0x08, 1, 4);
    rig.w(0x0c, 1 | 1 << 30, 4);
    rig.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rig.status() & FEATURES_OK, 0, "unoffered bit 62");
    rig.w(0x0c, 1, 4);
    rig.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_ne!(rig.status() & FEATURES_OK, 0);
    // Features are frozen after FEATURES_OK.
    rig.w(0x0c, 0, 4);
    assert_eq!(rig.r(0x0c, 4), 1);
}

const VIRTIO_BLK_F_FLUSH_BIT: u64 = 9;

#[test]
fn test_queue_registers_validate_guest_values() {
    let rig = rig();
    rig.w(0x16, 0, 2);
    assert_eq!(rig.r(0x18, 2), 256, "max size by default");
    rig.w(0x18, 100, 2);
    assert_eq!(rig.r(0x18, 2), 256, "not a power of two");
    rig.w(0x18, 512, 2);
    assert_eq!(rig.r(0x18, 2), 256, "above max");
    rig.w(0x18, 64, 2);
    assert_eq!(rig.r(0x18, 2), 64);
    rig.w(0x1a, 7, 2);
    assert_eq!(rig.r(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    rig.w(0x10, 2, 2);
    assert_eq!(rig.r(0x10, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    rig.w(0x12, 9, 2);
    assert_eq!(rig.r(0x12, 2), 1, "num_queues is read-only");
    // A nonexistent queue reads size 0.
    rig.w(0x16, 3, 2);
    assert_eq!(rig.r(0x18, 2), 0);
    rig.w(0x18, 16, 2);
    // Garbage widths and offsets are ignored without harm.
    rig.w(0x13, 0xff, 1);
    rig.w(0x7ff, u64::MAX, 8);
    let mut big = [0u8; 16];
    rig.bus.read(rig.bar() + 0x10, &mut big);
    rig.bus
        .write(rig.bar() + MSIX_TABLE_OFFSET + 0xff8, &[0xff; 16]);
}

#[test]
fn test_rings_outside_memory_set_needs_reset_not_panic() {
    let rig = rig();
    rig.set_status(ACKNOWLEDGE | DRIVER);
    rig.w(0x08, 1, 4);
    rig.w(0x0c, 1, 4);
    rig.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    rig.w(0x16, 0, 2);
    rig.w(0x18, 16, 2);
    rig.w(0x20, TestRing::DESC, 8);
    rig.w(0x28, TestRing::AVAIL, 8);
    rig.w(0x30, MEM_SIZE as u64 - 8, 8);
    rig.w(0x1c, 1, 2);
    rig.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_ne!(rig.status() & DEVICE_NEEDS_RESET, 0);
    assert!(!rig.dev.lock().unwrap().is_activated());
    rig.w(0x14, 0, 1);
    assert_eq!(rig.status(), 0);
}

#[test]
fn test_isr_is_read_to_clear() {
    let rig = rig();
    rig.dev.lock().unwrap().isr.store(3, Ordering::Release);
    assert_eq!(rig.r(ISR_CFG_OFFSET, 1), 3);
    assert_eq!(rig.r(ISR_CFG_OFFSET, 1), 0);
}

#[test]
fn test_device_config_reads_capacity() {
    let rig = rig();
    assert_eq!(rig.r(DEVICE_CFG_OFFSET, 8), 64);
}

#[test]
fn test_pci_cfg_capability_window_reaches_bar() {
    let mut rig = rig();
    let cap = rig.virtio_caps()[&5];
    rig.cfg_write(cap + 4, &[0]);
    rig.cfg_write(cap + 8, &(COMMON_CFG_OFFSET as u32 + 0x12).to_le_bytes());
    rig.cfg_write(cap + 12, &2u32.to_le_bytes());
    assert_eq!(
        rig.cfg_read(cap + 16, 4),
        1,
        "num_queues through the window"
    );
    rig.cfg_write(cap + 8, &(COMMON_CFG_OFFSET as u32 + 0x16).to_le_bytes());
    rig.cfg_write(cap + 16, &[0, 0, 0, 0]);
    // A bogus length is refused.
    rig.cfg_write(cap + 12, &3u32.to_le_bytes());
    assert_eq!(rig.cfg_read(cap + 16, 4), 0);
}

#[test]
fn test_state_roundtrip_restores_active_device() {
    let (rig, ring) = active_rig();
    read_through_transport_notify(&rig, &ring);
    let state = {
        let mut d = rig.dev.lock().unwrap();
        d.pause().unwrap();
        let s = d.state();
        d.resume().unwrap();
        s
    };
    assert_eq!(state.queues[0].next_avail, 1);
    let json = serde_json::to_string(&state).unwrap();
    let back: VirtioPciState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    // Restore into a second device on another disk.
    rig.dev.lock().unwrap().shutdown();
    let file = temp_disk();
    let mut other = block_device(&file, &rig.mem, rig.router.clone(), rig.ioevents.clone());
    other.restore(&back).unwrap();
    assert!(
        !other.is_activated(),
        "no queue is served before activate_restored"
    );
    other.activate_restored().unwrap();
    assert!(other.is_activated());
    assert_eq!(other.state().queues, state.queues);
    other.shutdown();
}

#[test]
fn test_announce_config_change_bumps_generation_and_raises_config_interrupt() {
    let (rig, _ring) = active_rig();
    let before = rig.dev.lock().unwrap().state();

    rig.dev.lock().unwrap().announce_config_change();

    let after = rig.dev.lock().unwrap().state();
    assert_eq!(
        after.config_generation,
        before.config_generation.wrapping_add(1)
    );
    assert_ne!(after.isr & 2, 0, "ISR config bit");
    rig.dev.lock().unwrap().shutdown();
}

#[test]
fn test_linux_style_bar_sizing_with_decode_off_reregisters_doorbells() {
    let mut rig = rig();
    let bar = rig.bar();
    let cmd = rig.cfg_read(0x04, 2) as u16;
    rig.cfg_write(0x04, &(cmd & !0x2).to_le_bytes());
    assert!(rig.ioevents.regs.lock().unwrap().is_empty());
    assert!(!rig.bus.read(bar, &mut [0u8; 4]));
    let lo = rig.cfg_read(0x10, 4);
    let hi = rig.cfg_read(0x14, 4);
    rig.cfg_write(0x10, &[0xff; 4]);
    rig.cfg_write(0x14, &[0xff; 4]);
    let size_lo = rig.cfg_read(0x10, 4) & 0xffff_fff0;
    let size_hi = rig.cfg_read(0x14, 4);
    let size = !(u64::from(size_hi) << 32 | u64::from(size_lo)) + 1;
    assert_eq!(size, BAR_SIZE);
    rig.cfg_write(0x10, &lo.to_le_bytes());
    rig.cfg_write(0x14, &hi.to_le_bytes());
    rig.cfg_write(0x04, &cmd.to_le_bytes());
    assert_eq!(rig.bar(), bar);
    assert!(rig
        .ioevents
        .regs
        .lock()
        .unwrap()
        .contains_key(&(bar + NOTIFY_OFFSET)));
    assert_eq!(rig.r(0x12, 2), 1);
}

#[test]
fn test_restore_then_sync_mappings_registers_doorbells() {
    let (mut rig, _ring) = active_rig();
    let moved = rig.bar() + 0x20_0000;
    rig.cfg_write(0x10, &(moved as u32).to_le_bytes());
    let state = rig.dev.lock().unwrap().state();
    rig.dev.lock().unwrap().shutdown();

    let file = temp_disk();
    let bus = Bus::new();
    let root = PciRoot::new(bus.clone());
    let ioevents = Arc::new(FakeIoEvents::default());
    let dev = Arc::new(Mutex::new(block_device(
        &file,
        &rig.mem,
        rig.router.clone(),
        ioevents.clone(),
    )));
    let slot = root.add_device(dev.clone()).unwrap();
    dev.lock().unwrap().restore(&state).unwrap();
    root.sync_mappings();
    assert_eq!(root.bar_mapping(slot, 0), Some(moved));
    assert!(ioevents
        .regs
        .lock()
        .unwrap()
        .contains_key(&(moved + NOTIFY_OFFSET)));
    assert_eq!(ioevents.regs.lock().unwrap().len(), 1);
    let mut st = [0u8; 1];
    assert!(bus.read(moved + 0x14, &mut st));
    assert_eq!(st[0], ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    dev.lock().unwrap().shutdown();
}

#[test]
fn test_many_rounds_with_event_idx_each_interrupt_arrives() {
    let (rig, ring) = active_rig();
    let irq = rig.queue_vector_event();
    let bell = rig.doorbell();
    for round in 0..40u16 {
        // Ask for an interrupt as soon as the next used entry appears.
        ring.set_used_event(round);
        read_request(&rig, &ring);
        bell.write(1).unwrap();
        wait_for(&irq);
        assert_eq!(ring.used_idx(), round + 1);
        assert_eq!(
            rig.mem.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
    }
    rig.dev.lock().unwrap().shutdown();
}

#[test]
fn test_platform_reset_disables_msix_and_device() {
    let (mut rig, _ring) = active_rig();
    let msix = rig.virtio_caps()[&(0x80 | 0x11)];
    assert_ne!(rig.cfg_read(msix + 2, 2) & 0x8000, 0);
    rig.dev.lock().unwrap().platform_reset();
    assert_eq!(rig.cfg_read(msix + 2, 2), 1);
    assert_eq!(rig.status(), 0);
    assert_eq!(rig.r(MSIX_TABLE_OFFSET + 12, 4), 1, "vector 0 masked again");
    assert!(!rig.router.routes.lock().unwrap()[&24].2);
}
