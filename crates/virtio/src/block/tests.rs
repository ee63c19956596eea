//! Block request tests driven through virtio-queue's mock driver-side queue: the happy path
//! against a temp-file RawDisk and a set of hostile chains.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use disk::RawDisk;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_device::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::handler::BlockHandler;
use super::pool::Shared;
use super::*;
use crate::device::{InterruptKind, VirtioInterrupt};
use crate::worker::QueueHandler;

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const MEM_SIZE: usize = 0x40_0000;
const DISK_SECTORS: u64 = 64;
const QSIZE: u16 = 16;

#[derive(Default)]
struct FakeInterrupt(Mutex<Vec<InterruptKind>>);
impl VirtioInterrupt for FakeInterrupt {
    fn trigger(&self, kind: InterruptKind) {
        self.0.lock().unwrap().push(kind);
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    _file: TempFile,
    queue: Arc<Mutex<Queue>>,
    disk: Arc<dyn disk::DiskBackend>,
    serial: Vec<u8>,
    limits: Limits,
    metrics: Arc<BlockMetrics>,
    /// Negotiated features, fixed when the handler is first used.
    features: u64,
    /// I/O threads of the handler (0: inline execution, results visible at once).
    io_threads: usize,
    handler: Option<BlockHandler>,
    irq: Arc<FakeInterrupt>,
    needs_reset: Arc<AtomicBool>,
}

impl Harness {
    /// The handler, built on first use from the harness's current settings.
    fn handler(&mut self) -> &mut BlockHandler {
        if self.handler.is_none() {
            let shared = Shared::new(
                self.mem.clone(),
                self.queue.clone(),
                self.disk.clone(),
                self.serial.clone(),
                self.features,
                self.limits,
                self.metrics.clone(),
                self.irq.clone(),
                self.needs_reset.clone(),
            )
            .unwrap();
            self.handler = Some(BlockHandler::new(Arc::new(shared), self.io_threads).unwrap());
        }
        self.handler.as_mut().unwrap()
    }
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn harness(read_only: bool, features: u64) -> (Harness, Block) {
    let file = TempFile::new().unwrap();
    file.as_file().set_len(DISK_SECTORS * 512).unwrap();
    let pattern: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| (i / 512) as u8).collect();
    std::os::unix::fs::FileExt::write_all_at(file.as_file(), &pattern, 0).unwrap();
    let disk = RawDisk::open(file.as_path(), read_only).unwrap();
    let block = Block::new(disk, Some("ferrite-test-serial")).unwrap();
    let mem = guest_memory();
    (
        Harness {
            mem,
            _file: file,
            queue: Arc::new(Mutex::new(Queue::new(QSIZE).unwrap())),
            disk: block.disk.clone(),
            serial: block.serial.clone(),
            limits: block.limits,
            metrics: block.metrics(),
            features,
            io_threads: 0,
            handler: None,
            irq: Arc::new(FakeInterrupt::default()),
            needs_reset: Arc::new(AtomicBool::new(false)),
        },
        block,
    )
}

fn all_features(block: &Block) -> u64 {
    block.features()
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// A standard header / data / status chain starting at descriptor `first`.
fn request(
    h: &Harness,
    req_type: u32,
    sector: u64,
    data_len: u32,
    data_flags: u32,
    first: u16,
) -> Vec<RawDescriptor> {
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&req_type.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    h.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut v = vec![desc(HDR, 16, VRING_DESC_F_NEXT, first + 1)];
    if data_len > 0 {
        v.push(desc(
            DATA,
            data_len,
            data_flags | VRING_DESC_F_NEXT,
            first + 2,
        ));
    }
    let n = v.len() as u16;
    v.push(desc(STATUS, 1, VRING_DESC_F_WRITE, first + n + 1));
    v
}

/// Put chains on a fresh mock queue, run the handler, return (used elems, status byte).
fn run(h: &mut Harness, descs: &[RawDescriptor]) -> (Vec<(u32, u32)>, u8) {
    let mem = h.mem.clone();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QSIZE);
    vq.add_desc_chains(descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(h.features & (1 << 29) != 0);
    *h.queue.lock().unwrap() = q;
    h.handler().process_queue(0);
    let used_idx = vq.used().idx().load();
    let used = (0..used_idx)
        .map(|i| {
            let e = vq.used().ring().ref_at(i as usize).unwrap().load();
            (e.id(), e.len())
        })
        .collect();
    (used, h.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
}

fn metrics(h: &Harness) -> BlockMetricsSnapshot {
    h.metrics.snapshot()
}

#[test]
fn test_blk_read_returns_disk_data_and_interrupts() {
    let (mut h, b) = harness(false, 0);
    h.features = all_features(&b);
    let d = request(&h, VIRTIO_BLK_T_IN, 3, 1024, VRING_DESC_F_WRITE, 0);
    let (used, status) = run(&mut h, &d);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(used, vec![(0, 1025)]);
    let mut buf = [0u8; 1024];
    h.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf[..512].iter().all(|&x| x == 3));
    assert!(buf[512..].iter().all(|&x| x == 4));
    assert_eq!(
        h.irq.0.lock().unwrap().as_slice(),
        [InterruptKind::Queue(0)]
    );
    assert_eq!(metrics(&h).read_bytes, 1024);
    assert_eq!(metrics(&h).reads, 1);
}

#[test]
fn test_blk_write_then_flush_reaches_disk() {
    let (mut h, b) = harness(false, 0);
    h.features = all_features(&b);
    h.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    let d = request(&h, VIRTIO_BLK_T_OUT, 10, 512, 0, 0);
    let (used, status) = run(&mut h, &d);
    assert_eq!((used, status), (vec![(0, 1)], VIRTIO_BLK_S_OK as u8));
    let d = request(&h, VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
    let (_, status) = run(&mut h, &d);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    let mut buf = [0u8; 512];
    h.disk.read_at(10 * 512, &mut buf).unwrap();
    assert_eq!(buf, [0xab; 512]);
    assert_eq!(metrics(&h).flushes, 1);
}

#[test]
fn test_blk_get_id_returns_serial() {
    let (mut h, b) = harness(false, 0);
    h.features = all_features(&b);
    let d = request(&h, VIRTIO_BLK_T_GET_ID, 0, 20, VRING_DESC_F_WRITE, 0);
    let (used, status) = run(&mut h, &d);
    assert_eq!((used, status), (vec![(0, 21)], VIRTIO_BLK_S_OK as u8));
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..19], b"ferrite-test-serial");
    assert_eq!(id[19], 0);
}

fn dwz_segment(h: &Harness, sector: u64, num: u32, flags: u32) {
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&num.to_le_bytes());
    seg[12..].copy_from_slice(&flags.to_le_bytes());
    h.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
}

#[test]
fn test_blk_write_zeroes_and_discard_clear_sectors() {
    let (mut h, b) = harness(false, 0);
    h.features = all_features(&b);
    dwz_segment(&h, 4, 2, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let d = request(&h, VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, 0, 0);
    let (_, status) = run(&mut h, &d);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    let mut buf = [0xffu8; 1024];
    h.disk.read_at(4 * 512, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    dwz_segment(&h, 8, 8, 0);
    let d = request(&h, VIRTIO_BLK_T_DISCARD, 0, 16, 0, 0);
    let (_, status) = run(&mut h, &d);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    // Discard with a flag set is unsupported; beyond capacity is an I/O error.
    dwz_segment(&h, 8, 8, 1);
    assert_eq!(run(&mut h, &d).1, VIRTIO_BLK_S_UNSUPP as u8);
    dwz_segment(&h, DISK_SECTORS - 1, 2, 0);
    assert_eq!(run(&mut h, &d).1, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(metrics(&h).discards, 4);
}

#[test]
fn test_blk_discard_without_feature_is_unsupported() {
    let (mut h, _b) = harness(false, 0);
    dwz_segment(&h, 0, 1, 0);
    let d = request(&h, VIRTIO_BLK_T_DISCARD, 0, 16, 0, 0);
    assert_eq!(run(&mut h, &d).1, VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn test_blk_read_only_write_is_ioerr() {
    let (mut h, b) = harness(true, 0);
    h.features = all_features(&b);
    assert_ne!(b.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(b.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    let d = request(&h, VIRTIO_BLK_T_OUT, 0, 512, 0, 0);
    assert_eq!(run(&mut h, &d).1, VIRTIO_BLK_S_IOERR as u8);
    let mut buf = [0u8; 512];
    h.disk.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 512]);
}

#[test]
fn test_blk_unknown_type_is_unsupported() {
    let (mut h, _b) = harness(false, 0);
    let d = request(&h, 0x7777, 0, 0, 0, 0);
    let (used, status) = run(&mut h, &d);
    assert_eq!((used, status), (vec![(0, 1)], VIRTIO_BLK_S_UNSUPP as u8));
    assert_eq!(metrics(&h).unsupported, 1);
}

#[test]
fn test_blk_sector_beyond_capacity_is_ioerr() {
    let (mut h, _b) = harness(false, 0);
    for sector in [DISK_SECTORS - 1, DISK_SECTORS, u64::MAX / 512, u64::MAX] {
        let d = request(&h, VIRTIO_BLK_T_IN, sector, 1024, VRING_DESC_F_WRITE, 0);
        assert_eq!(
            run(&mut h, &d).1,
            VIRTIO_BLK_S_IOERR as u8,
            "sector {sector}"
        );
    }
}

#[test]
fn test_blk_length_not_sector_multiple_is_ioerr() {
    let (mut h, _b) = harness(false, 0);
    let d = request(&h, VIRTIO_BLK_T_IN, 0, 100, VRING_DESC_F_WRITE, 0);
    assert_eq!(run(&mut h, &d).1, VIRTIO_BLK_S_IOERR as u8);
    let d = request(&h, VIRTIO_BLK_T_OUT, 0, 700, 0, 0);
    assert_eq!(run(&mut h, &d).1, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn test_blk_wrong_direction_data_is_ioerr() {
    let (mut h, _b) = harness(false, 0);
    // IN with device-readable data.
    let d = request(&h, VIRTIO_BLK_T_IN, 0, 512, 0, 0);
    assert_eq!(run(&mut h, &d).1, VIRTIO_BLK_S_IOERR as u8);
    // OUT with device-writable data: the disk must not change.
    let d = request(&h, VIRTIO_BLK_T_OUT, 1, 512, VRING_DESC_F_WRITE, 0);
    assert_eq!(run(&mut h, &d).1, VIRTIO_BLK_S_IOERR as u8);
    let mut buf = [0u8; 512];
    h.disk.read_at(512, &mut buf).unwrap();
    assert_eq!(buf, [1u8; 512]);
}

#[test]
fn test_blk_writable_header_is_ioerr() {
    let (mut h, _b) = harness(false, 0);
    let mut d = request(&h, VIRTIO_BLK_T_IN, 0, 512, VRING_DESC_F_WRITE, 0);
    d[0] = desc(HDR, 16, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1);
    assert_eq!(run(&mut h, &d).1, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn test_blk_readable_after_writable_is_ioerr() {
    let (mut h, _b) = harness(false, 0);
    let mut d = request(&h, VIRTIO_BLK_T_IN, 0, 512, VRING_DESC_F_WRITE, 0);
    d.insert(2, desc(HDR, 16, VRING_DESC_F_NEXT, 3));
    d[1] = desc(DATA, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2);
    d[3] = desc(STATUS, 1, VRING_DESC_F_WRITE, 0);
    assert_eq!(run(&mut h, &d).1, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn test_blk_out_of_range_data_address_is_ioerr() {
    let (mut h, _b) = harness(false, 0);
    for addr in [MEM_SIZE as u64, MEM_SIZE as u64 - 256, u64::MAX - 100] {
        let mut d = request(&h, VIRTIO_BLK_T_IN, 0, 512, VRING_DESC_F_WRITE, 0);
        d[1] = desc(addr, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2);
        assert_eq!(
            run(&mut h, &d).1,
            VIRTIO_BLK_S_IOERR as u8,
            "addr {addr:#x}"
        );
    }
    assert!(!h.needs_reset.load(std::sync::atomic::Ordering::Acquire));
}

#[test]
fn test_blk_huge_length_is_ioerr() {
    let (mut h, _b) = harness(false, 0);
    let d = request(&h, VIRTIO_BLK_T_IN, 0, 0xffff_fe00, VRING_DESC_F_WRITE, 0);
    assert_eq!(run(&mut h, &d).1, VIRTIO_BLK_S_IOERR as u8);
    let d = request(&h, VIRTIO_BLK_T_OUT, 0, 0xffff_fe00, 0, 0);
    assert_eq!(run(&mut h, &d).1, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn test_blk_status_outside_memory_gets_zero_status_no_panic() {
    let (mut h, _b) = harness(false, 0);
    let mut d = request(&h, VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
    d[1] = desc(u64::MAX, 1, VRING_DESC_F_WRITE, 0);
    let (used, _) = run(&mut h, &d);
    assert_eq!(used, vec![(0, 0)]);
}

#[test]
fn test_blk_no_writable_descriptor_answers_zero_length() {
    let (mut h, _b) = harness(false, 0);
    h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let d = vec![desc(HDR, 16, 0, 0)];
    let (used, status) = run(&mut h, &d);
    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(status, 0xff);
    assert_eq!(metrics(&h).errors, 1);
}

fn assert_broken(h: &mut Harness) {
    assert!(h.handler().shared.is_broken());
    assert!(h.needs_reset.load(std::sync::atomic::Ordering::Acquire));
    assert!(h.irq.0.lock().unwrap().contains(&InterruptKind::Config));
}

#[test]
fn test_blk_descriptor_loop_marks_queue_broken() {
    let (mut h, _b) = harness(false, 0);
    let d = vec![
        desc(HDR, 16, VRING_DESC_F_NEXT, 1),
        desc(STATUS, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
    ];
    let (used, _) = run(&mut h, &d);
    assert!(used.is_empty());
    assert_broken(&mut h);
    // Later notifications are ignored until reset.
    h.handler().process_queue(0);
    assert_eq!(metrics(&h).broken_queues, 1);
}

#[test]
fn test_blk_next_index_out_of_range_marks_queue_broken() {
    let (mut h, _b) = harness(false, 0);
    let d = vec![desc(HDR, 16, VRING_DESC_F_NEXT, QSIZE + 5)];
    run(&mut h, &d);
    assert_broken(&mut h);
}

#[test]
fn test_blk_head_index_out_of_range_marks_queue_broken() {
    let (mut h, _b) = harness(false, 0);
    let mem = h.mem.clone();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QSIZE);
    // One avail entry naming descriptor 200 of a 16-entry table: zero descriptors.
    vq.avail().ring().ref_at(0).unwrap().store(200);
    vq.avail().idx().store(1);
    *h.queue.lock().unwrap() = vq.create_queue().unwrap();
    h.handler().process_queue(0);
    assert_broken(&mut h);
}

#[test]
fn test_blk_avail_index_far_ahead_marks_queue_broken() {
    let (mut h, _b) = harness(false, 0);
    let mem = h.mem.clone();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QSIZE);
    vq.avail().idx().store(QSIZE + 1);
    *h.queue.lock().unwrap() = vq.create_queue().unwrap();
    h.handler().process_queue(0);
    assert_broken(&mut h);
}

#[test]
fn test_blk_indirect_table_outside_memory_marks_queue_broken() {
    let (mut h, _b) = harness(false, 0);
    let d = vec![desc(u64::MAX - 0xfff, 64, VRING_DESC_F_INDIRECT, 0)];
    run(&mut h, &d);
    assert_broken(&mut h);
}

#[test]
fn test_blk_indirect_chain_is_served() {
    let (mut h, b) = harness(false, 0);
    h.features = all_features(&b);
    let table = 0x8000u64;
    let inner = request(&h, VIRTIO_BLK_T_IN, 2, 512, VRING_DESC_F_WRITE, 0);
    for (i, d) in inner.iter().enumerate() {
        h.mem
            .write_obj(*d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let d = vec![desc(table, 48, VRING_DESC_F_INDIRECT, 0)];
    let (used, status) = run(&mut h, &d);
    assert_eq!((used, status), (vec![(0, 513)], VIRTIO_BLK_S_OK as u8));
}

#[test]
fn test_blk_event_idx_suppresses_interrupt_until_used_event() {
    let (mut h, b) = harness(false, 0);
    h.features = all_features(&b);
    let mem = h.mem.clone();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QSIZE);
    let d = request(&h, VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
    vq.add_desc_chains(&d, 0).unwrap();
    // used_event (after the avail ring) = 5: the driver wants an interrupt only past entry 5.
    let used_event = vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    h.mem.write_obj(5u16, GuestAddress(used_event)).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    // The mock's used ring overlaps used_event; move it out of the way.
    let used = 0x8000u64;
    h.mem.write_slice(&[0u8; 256], GuestAddress(used)).unwrap();
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_event_idx(true);
    *h.queue.lock().unwrap() = q;
    h.handler().process_queue(0);
    assert_eq!(h.mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);
    assert!(h.irq.0.lock().unwrap().is_empty());
    // Once used_event is reached, the next completion interrupts.
    h.mem.write_obj(1u16, GuestAddress(used_event)).unwrap();
    vq.add_desc_chains(&d, 0).unwrap();
    h.handler().process_queue(0);
    assert_eq!(h.mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 2);
    assert_eq!(
        h.irq.0.lock().unwrap().as_slice(),
        [InterruptKind::Queue(0)]
    );
}

#[test]
fn test_blk_config_space_reports_capacity_and_limits() {
    let (_h, b) = harness(false, 0);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    let mut v = [0u8; 4];
    b.read_config(20, &mut v);
    assert_eq!(u32::from_le_bytes(v), 512);
    b.read_config(u64::MAX - 1, &mut v);
    assert_eq!(v, [0; 4]);
    let f = b.features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_SEG_MAX,
        29,
        32,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
}

/// A disk whose reads wait at a gate, so tests can hold requests in flight.
struct GateDisk {
    inner: Arc<dyn disk::DiskBackend>,
    open: Mutex<bool>,
    opened: std::sync::Condvar,
    /// Reads that entered the backend.
    calls: std::sync::atomic::AtomicUsize,
    /// Reads that finished writing guest memory.
    finished: std::sync::atomic::AtomicUsize,
}

impl GateDisk {
    fn new(inner: Arc<dyn disk::DiskBackend>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            open: Mutex::new(false),
            opened: std::sync::Condvar::new(),
            calls: Default::default(),
            finished: Default::default(),
        })
    }
    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
    fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn finished(&self) -> usize {
        self.finished.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// Wait (deadline only against hangs) until `n` reads entered the backend.
    fn wait_calls(&self, n: usize) {
        wait_until(|| self.calls() >= n);
    }
}

impl disk::DiskBackend for GateDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn serial(&self) -> String {
        self.inner.serial()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> disk::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> disk::Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn read_to_guest(&self, offset: u64, dst: &disk::GuestSlice<'_>) -> disk::Result<()> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        drop(open);
        let r = self.inner.read_to_guest(offset, dst);
        self.finished
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        r
    }
    fn write_from_guest(&self, offset: u64, src: &disk::GuestSlice<'_>) -> disk::Result<()> {
        self.inner.write_from_guest(offset, src)
    }
    fn flush(&self) -> disk::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> disk::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> disk::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
}

/// Poll `cond` (the deadline only turns a hang into a failure, it measures nothing).
fn wait_until(cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "condition never met");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// `n` one-sector reads of sectors 0..n, each with its own header, buffer and status byte.
fn reads(h: &Harness, n: u16) -> Vec<RawDescriptor> {
    let mut v = Vec::new();
    for i in 0..n {
        let hdr = HDR + u64::from(i) * 16;
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        bytes[8..].copy_from_slice(&u64::from(i).to_le_bytes());
        h.mem.write_slice(&bytes, GuestAddress(hdr)).unwrap();
        h.mem
            .write_obj(0xffu8, GuestAddress(STATUS + u64::from(i)))
            .unwrap();
        let first = i * 3;
        v.push(desc(hdr, 16, VRING_DESC_F_NEXT, first + 1));
        v.push(desc(
            DATA + u64::from(i) * 512,
            512,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            first + 2,
        ));
        v.push(desc(STATUS + u64::from(i), 1, VRING_DESC_F_WRITE, 0));
    }
    v
}

#[test]
fn test_blk_pool_requests_in_flight_all_complete_with_data() {
    let (mut h, b) = harness(false, 0);
    h.features = all_features(&b);
    h.io_threads = 4;
    let d = reads(&h, 5);
    let mem = h.mem.clone();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QSIZE);
    vq.add_desc_chains(&d, 0).unwrap();
    *h.queue.lock().unwrap() = vq.create_queue().unwrap();

    h.handler().process_queue(0);
    wait_until(|| vq.used().idx().load() == 5);

    let mut heads: Vec<u32> = (0..5)
        .map(|i| vq.used().ring().ref_at(i).unwrap().load().id())
        .collect();
    heads.sort_unstable();
    assert_eq!(heads, vec![0, 3, 6, 9, 12]);
    for i in 0..5u64 {
        let mut buf = [0u8; 512];
        h.mem
            .read_slice(&mut buf, GuestAddress(DATA + i * 512))
            .unwrap();
        assert!(buf.iter().all(|&x| x == i as u8), "sector {i}");
        assert_eq!(
            h.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
    }
    assert_eq!(h.handler().shared.in_flight(), 0);
}

#[test]
fn test_blk_pool_queue_broken_while_in_flight_publishes_nothing_more() {
    let (mut h, _b) = harness(false, 0);
    let gate = GateDisk::new(h.disk.clone());
    h.disk = gate.clone();
    h.io_threads = 1;
    let d = reads(&h, 3);
    let mem = h.mem.clone();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QSIZE);
    vq.add_desc_chains(&d, 0).unwrap();
    *h.queue.lock().unwrap() = vq.create_queue().unwrap();
    h.handler().process_queue(0);
    gate.wait_calls(1);

    // The driver now breaks the queue while the first read is stuck in the backend.
    vq.avail().idx().store(3 + QSIZE + 1);
    h.handler().process_queue(0);
    gate.release();
    h.handler().shared.wait_idle();

    assert_broken(&mut h);
    assert_eq!(
        gate.calls(),
        1,
        "requests queued behind the break must not run"
    );
    assert_eq!(vq.used().idx().load(), 0);
}

#[test]
fn test_blk_pool_drop_waits_for_in_flight_and_cancels_queued() {
    let (mut h, _b) = harness(false, 0);
    let gate = GateDisk::new(h.disk.clone());
    h.disk = gate.clone();
    h.io_threads = 1;
    let d = reads(&h, 4);
    let mem = h.mem.clone();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QSIZE);
    vq.add_desc_chains(&d, 0).unwrap();
    *h.queue.lock().unwrap() = vq.create_queue().unwrap();
    h.handler().process_queue(0);
    gate.wait_calls(1);
    let handler = h.handler.take().unwrap();
    let shared = handler.shared.clone();

    let dropper = std::thread::spawn(move || drop(handler));
    wait_until(|| shared.cancelled());
    gate.release();
    dropper.join().unwrap();

    // The stuck read finished before the drop returned; the queued ones never ran.
    assert_eq!(gate.finished(), 1);
    assert_eq!(gate.calls(), 1);
    assert_eq!(shared.in_flight(), 0);
}

#[test]
fn test_blk_device_reset_with_requests_in_flight_returns_after_io() {
    let (h, _b) = harness(false, 0);
    let gate = GateDisk::new(h.disk.clone());
    let mut block = Block::with_backend(gate.clone(), None)
        .unwrap()
        .with_io_threads(2);
    let d = reads(&h, 2);
    let mem = h.mem.clone();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QSIZE);
    vq.add_desc_chains(&d, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_ready(true);
    block
        .activate(crate::device::ActivateContext {
            mem: h.mem.clone(),
            queues: vec![Arc::new(Mutex::new(q))],
            queue_events: vec![vmm_sys_util::eventfd::EventFd::new(0).unwrap()],
            interrupt: h.irq.clone(),
            acked_features: 0,
            needs_reset: h.needs_reset.clone(),
        })
        .unwrap();
    gate.wait_calls(2);

    let g = gate.clone();
    let resetter = std::thread::spawn(move || {
        block.reset();
        g.finished()
    });
    gate.release();
    let finished_when_reset_returned = resetter.join().unwrap();

    assert_eq!(finished_when_reset_returned, 2);
}

#[test]
fn test_blk_pool_cached_reads_complete_on_worker_without_io_threads() {
    // Arrange: the disk was just written, so its data is in the host page cache.
    let (mut h, b) = harness(false, 0);
    h.features = all_features(&b);
    h.io_threads = 2;
    let d = reads(&h, 5);
    let mem = h.mem.clone();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QSIZE);
    vq.add_desc_chains(&d, 0).unwrap();
    *h.queue.lock().unwrap() = vq.create_queue().unwrap();

    // Act
    h.handler().process_queue(0);

    // Assert: everything is in the used ring when the worker returns, nothing went to the
    // I/O threads, data and statuses are right and one interrupt covered the batch.
    assert_eq!(vq.used().idx().load(), 5);
    assert_eq!(h.handler().shared.in_flight(), 0);
    for i in 0..5u64 {
        let mut buf = [0u8; 512];
        h.mem
            .read_slice(&mut buf, GuestAddress(DATA + i * 512))
            .unwrap();
        assert!(buf.iter().all(|&x| x == i as u8), "sector {i}");
        assert_eq!(
            h.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
    }
    assert_eq!(
        h.irq.0.lock().unwrap().as_slice(),
        [InterruptKind::Queue(0)]
    );
    let m = metrics(&h);
    assert_eq!((m.requests, m.read_bytes), (5, 5 * 512));
}

#[test]
fn test_blk_pool_long_inline_run_is_published_in_batches_and_resumed_by_wake() {
    // Arrange: more cached reads than one inline batch, on a queue that holds them all.
    let (mut h, b) = harness(false, 0);
    h.features = all_features(&b);
    h.io_threads = 1;
    let n = 40u16;
    let d = reads(&h, n);
    let mem = h.mem.clone();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 256);
    vq.add_desc_chains(&d, 0).unwrap();
    *h.queue.lock().unwrap() = vq.create_queue().unwrap();

    // Act: one pass, then what the worker does when its wake-up eventfd fires.
    h.handler().process_queue(0);
    let after_first = vq.used().idx().load();
    let woken = h.handler().shared.wake.read().is_ok();
    h.handler().process_queue(0);

    // Assert
    assert_eq!(after_first, 32, "one batch, published before the rest");
    assert!(woken, "the worker re-armed itself for the rest");
    assert_eq!(vq.used().idx().load(), n);
    assert_eq!(h.irq.0.lock().unwrap().len(), 2, "one interrupt per batch");
    for i in 0..u64::from(n) {
        assert_eq!(
            h.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK as u8,
            "request {i}"
        );
    }
}

#[test]
fn test_blk_pool_write_completes_inline_and_reads_back() {
    // Arrange: FLUSH negotiated (a buffered write may then complete before it is durable).
    let (mut h, b) = harness(false, 0);
    h.features = all_features(&b);
    h.io_threads = 2;
    h.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    let d = request(&h, VIRTIO_BLK_T_OUT, 7, 512, 0, 0);
    let mem = h.mem.clone();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QSIZE);
    vq.add_desc_chains(&d, 0).unwrap();
    *h.queue.lock().unwrap() = vq.create_queue().unwrap();

    // Act
    h.handler().process_queue(0);
    h.handler().shared.wait_idle();

    // Assert: served (inline where the kernel allows RWF_NOWAIT writes, else by the pool).
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(
        h.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
    let mut buf = [0u8; 512];
    h.disk.read_at(7 * 512, &mut buf).unwrap();
    assert_eq!(buf, [0x5a; 512]);
    assert_eq!(metrics(&h).write_bytes, 512);
    assert_eq!(metrics(&h).writes, 1);
}
