//! virtio-balloon tests through virtio-queue's mock driver-side queue, on real anonymous
//! guest memory (so released pages really read back as zero).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_device::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::release::{coalesce, release, ReleaseError};
use super::*;
use crate::device::{InterruptKind, VirtioInterrupt};
use crate::worker::QueueHandler;

const RING: u64 = 0x1000;
const BUF: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const MEM_SIZE: usize = 0x40_0000;
const QSIZE: u16 = 16;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;
const REPORTING: usize = 3;

#[derive(Default)]
struct FakeInterrupt(Mutex<Vec<InterruptKind>>);
impl VirtioInterrupt for FakeInterrupt {
    fn trigger(&self, kind: InterruptKind) {
        self.0.lock().unwrap().push(kind);
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    shared: Arc<BalloonShared>,
    handler: BalloonHandler,
    irq: Arc<FakeInterrupt>,
    needs_reset: Arc<AtomicBool>,
    queues: Vec<Arc<Mutex<Queue>>>,
}

fn harness() -> Harness {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let irq = Arc::new(FakeInterrupt::default());
    let needs_reset = Arc::new(AtomicBool::new(false));
    let shared = BalloonShared::new(BalloonOptions::default()).unwrap();
    let queues: Vec<_> = (0..4)
        .map(|_| Arc::new(Mutex::new(Queue::new(QSIZE).unwrap())))
        .collect();
    let handler = BalloonHandler::new(
        mem.clone(),
        queues.clone(),
        queue_roles(u64::MAX),
        shared.clone(),
        irq.clone(),
        needs_reset.clone(),
    );
    Harness {
        mem,
        shared,
        handler,
        irq,
        needs_reset,
        queues,
    }
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// Put chains on a fresh mock queue as queue `index`, run the handler, return the mock.
fn run<'a>(
    mem: &'a GuestMemoryMmap,
    h: &mut Harness,
    index: usize,
    descs: &[RawDescriptor],
) -> MockSplitQueue<'a, GuestMemoryMmap> {
    let vq = MockSplitQueue::create(mem, GuestAddress(RING), QSIZE);
    vq.add_desc_chains(descs, 0).unwrap();
    *h.queues[index].lock().unwrap() = vq.create_queue().unwrap();
    h.handler.process_queue(index);
    vq
}

fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
    (0..vq.used().idx().load())
        .map(|i| {
            let e = vq.used().ring().ref_at(i as usize).unwrap().load();
            (e.id(), e.len())
        })
        .collect()
}

fn write_pfns(mem: &GuestMemoryMmap, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    bytes.len() as u32
}

fn page_is_zero(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    let mut v = vec![0xffu8; PAGE_SIZE as usize];
    mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
    v.iter().all(|&b| b == 0)
}

#[test]
fn test_balloon_inflate_releases_pages_and_acknowledges() {
    let mut h = harness();
    let first = (DATA >> PAGE_SHIFT) as u32;
    for p in 0..4u64 {
        h.mem
            .write_slice(
                &[0xabu8; PAGE_SIZE as usize],
                GuestAddress(DATA + p * PAGE_SIZE),
            )
            .unwrap();
    }
    // Pages 0, 1 and 3: two runs; page 2 keeps its data.
    let len = write_pfns(&h.mem, &[first, first + 1, first + 3]);

    let mem = h.mem.clone();
    let vq = run(&mem, &mut h, INFLATE, &[desc(BUF, len, 0, 0)]);

    assert_eq!(used(&vq), vec![(0, 0)]);
    assert!(page_is_zero(&h.mem, DATA));
    assert!(page_is_zero(&h.mem, DATA + PAGE_SIZE));
    assert!(!page_is_zero(&h.mem, DATA + 2 * PAGE_SIZE));
    assert!(page_is_zero(&h.mem, DATA + 3 * PAGE_SIZE));
    let m = h.shared.metrics().snapshot();
    assert_eq!((m.inflated_pages, m.released_bytes), (3, 3 * PAGE_SIZE));
    assert_eq!(
        h.irq.0.lock().unwrap().as_slice(),
        [InterruptKind::Queue(0)]
    );
}

#[test]
fn test_balloon_inflate_pfn_outside_ram_is_counted_and_ignored() {
    let mut h = harness();
    let len = write_pfns(&h.mem, &[u32::MAX, (MEM_SIZE as u64 >> PAGE_SHIFT) as u32]);

    let mem = h.mem.clone();
    let vq = run(&mem, &mut h, INFLATE, &[desc(BUF, len, 0, 0)]);

    assert_eq!(used(&vq), vec![(0, 0)]);
    let m = h.shared.metrics().snapshot();
    assert_eq!((m.invalid_ranges, m.released_bytes), (2, 0));
    assert!(!h.needs_reset.load(Ordering::Acquire));
}

#[test]
fn test_balloon_pfn_buffer_outside_ram_is_counted_and_acknowledged() {
    let mut h = harness();

    let mem = h.mem.clone();
    let vq = run(
        &mem,
        &mut h,
        INFLATE,
        &[desc(MEM_SIZE as u64 - 4, 64, 0, 0)],
    );

    assert_eq!(used(&vq), vec![(0, 0)]);
    assert_eq!(h.shared.metrics().snapshot().invalid_ranges, 1);
    assert!(!h.handler.broken);
}

#[test]
fn test_balloon_deflate_counts_valid_pages_only() {
    let mut h = harness();
    let first = (DATA >> PAGE_SHIFT) as u32;
    let len = write_pfns(&h.mem, &[first, first + 1, u32::MAX]);

    let mem = h.mem.clone();
    let vq = run(&mem, &mut h, DEFLATE, &[desc(BUF, len, 0, 0)]);

    assert_eq!(used(&vq), vec![(0, 0)]);
    let m = h.shared.metrics().snapshot();
    assert_eq!((m.deflated_pages, m.invalid_ranges), (2, 1));
}

fn stat_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect()
}

#[test]
fn test_balloon_stats_are_kept_and_buffer_held_until_requested() {
    let mut h = harness();
    let bytes = stat_bytes(&[(5, 512 << 20), (4, 100 << 20), (99, 7)]);
    h.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();

    let mem = h.mem.clone();
    let vq = run(&mem, &mut h, STATS, &[desc(BUF, bytes.len() as u32, 0, 0)]);
    let used_before_request = used(&vq);
    h.handler.request_stats();

    assert!(used_before_request.is_empty());
    assert_eq!(used(&vq), vec![(0, 0)]);
    let stats = h.shared.stats().unwrap();
    assert_eq!(stats.entries, vec![(5, 512 << 20), (4, 100 << 20), (99, 7)]);
    assert_eq!(stat_name(5), "total_memory");
    assert_eq!(stat_name(99), "tag_99");
    assert_eq!(
        h.irq.0.lock().unwrap().as_slice(),
        [InterruptKind::Queue(2)]
    );
}

#[test]
fn test_balloon_stats_trailing_partial_entry_is_ignored() {
    let mut h = harness();
    let mut bytes = stat_bytes(&[(6, 42)]);
    bytes.extend_from_slice(&[1, 2, 3]);
    h.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();

    run(
        &h.mem.clone(),
        &mut h,
        STATS,
        &[desc(BUF, bytes.len() as u32, 0, 0)],
    );

    assert_eq!(h.shared.stats().unwrap().entries, vec![(6, 42)]);
}

#[test]
fn test_balloon_stats_too_short_or_unreadable_are_counted() {
    let mut h = harness();

    run(&h.mem.clone(), &mut h, STATS, &[desc(BUF, 4, 0, 0)]);
    run(
        &h.mem.clone(),
        &mut h,
        STATS,
        &[desc(MEM_SIZE as u64 - 5, 10, 0, 0)],
    );

    assert!(h.shared.stats().is_none());
    assert_eq!(h.shared.metrics().snapshot().stats_errors, 2);
    assert!(!h.handler.broken);
}

#[test]
fn test_balloon_request_without_held_buffer_does_nothing() {
    let mut h = harness();

    h.handler.request_stats();

    assert!(h.irq.0.lock().unwrap().is_empty());
}

#[test]
fn test_balloon_reporting_releases_ranges_and_acknowledges() {
    let mut h = harness();
    h.mem
        .write_slice(&[0x11u8; 0x4000], GuestAddress(DATA))
        .unwrap();

    let mem = h.mem.clone();
    let vq = run(
        &mem,
        &mut h,
        REPORTING,
        &[
            desc(DATA, 0x2000, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(DATA + 0x3000, 0x1000, VRING_DESC_F_WRITE, 0),
        ],
    );

    assert_eq!(used(&vq), vec![(0, 0)]);
    assert!(page_is_zero(&h.mem, DATA));
    assert!(page_is_zero(&h.mem, DATA + 0x1000));
    assert!(!page_is_zero(&h.mem, DATA + 0x2000));
    assert!(page_is_zero(&h.mem, DATA + 0x3000));
    let m = h.shared.metrics().snapshot();
    assert_eq!((m.reported_bytes, m.released_bytes), (0x3000, 0x3000));
}

#[test]
fn test_balloon_descriptor_loop_marks_queue_broken() {
    let mut h = harness();

    let mem = h.mem.clone();
    let vq = run(
        &mem,
        &mut h,
        INFLATE,
        &[
            desc(BUF, 16, VRING_DESC_F_NEXT, 1),
            desc(BUF, 16, VRING_DESC_F_NEXT, 0),
        ],
    );

    assert!(used(&vq).is_empty());
    assert!(h.handler.broken);
    assert!(h.needs_reset.load(Ordering::Acquire));
    assert!(h.irq.0.lock().unwrap().contains(&InterruptKind::Config));
}

#[test]
fn test_balloon_avail_index_far_ahead_marks_queue_broken() {
    let mut h = harness();
    let vq = MockSplitQueue::create(&h.mem, GuestAddress(RING), QSIZE);
    vq.avail().idx().store(QSIZE + 3);
    *h.queues[DEFLATE].lock().unwrap() = vq.create_queue().unwrap();

    h.handler.process_queue(DEFLATE);

    assert!(h.handler.broken);
    assert_eq!(h.shared.metrics().snapshot().broken_queues, 1);
}

#[test]
fn test_balloon_release_refuses_ranges_outside_one_region() {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x20_0000), 0x10_0000),
    ])
    .unwrap();

    let across = release(&mem, 0xf_f000, 0x2000);
    let hole = release(&mem, 0x18_0000, 0x1000);
    let wrap = release(&mem, u64::MAX - 0xfff, 0x2000);
    let unaligned = release(&mem, 0x800, 0x1000);
    let inside = release(&mem, 0x20_0800, 0x2000);

    assert!(matches!(across, Err(ReleaseError::NotRam { .. })));
    assert!(matches!(hole, Err(ReleaseError::NotRam { .. })));
    assert!(matches!(wrap, Err(ReleaseError::NotRam { .. })));
    assert_eq!(unaligned, Ok(0));
    assert_eq!(inside, Ok(0x1000));
}

#[test]
fn test_balloon_coalesce_joins_contiguous_pages() {
    let runs = coalesce(&[5, 6, 7, 9, 3, 4]);

    assert_eq!(runs, vec![(5, 3), (9, 1), (3, 2)]);
}

#[test]
fn test_balloon_queue_roles_are_compact_over_negotiated_features() {
    let stats = 1u64 << features::VIRTIO_BALLOON_F_STATS_VQ;
    let reporting = 1u64 << features::VIRTIO_BALLOON_F_REPORTING;

    assert_eq!(
        queue_roles(stats | reporting),
        [
            QueueRole::Inflate,
            QueueRole::Deflate,
            QueueRole::Stats,
            QueueRole::Reporting
        ]
    );
    assert_eq!(
        queue_roles(reporting),
        [QueueRole::Inflate, QueueRole::Deflate, QueueRole::Reporting]
    );
    assert_eq!(queue_roles(0), [QueueRole::Inflate, QueueRole::Deflate]);
}

#[test]
fn test_balloon_config_has_target_and_guest_writable_actual() {
    let shared = BalloonShared::new(BalloonOptions::default()).unwrap();
    let mut dev = Balloon::new(shared.clone());
    shared.set_target_pages(0x1234);
    let mut cfg = [0u8; 8];

    dev.write_config(0, &[9, 9, 9, 9]);
    dev.write_config(4, &0x77u32.to_le_bytes());
    dev.read_config(0, &mut cfg);

    assert_eq!(dev.device_type(), crate::device_type::BALLOON);
    assert_eq!(u32::from_le_bytes(cfg[..4].try_into().unwrap()), 0x1234);
    assert_eq!(u32::from_le_bytes(cfg[4..].try_into().unwrap()), 0x77);
    assert_eq!(dev.queue_max_sizes().len(), 4);
    assert_eq!(dev.features(), (1 << 32) | 0b100110);
    assert_eq!(dev.balloon_state().actual_pages, 0x77);
}

#[test]
fn test_balloon_options_off_offer_only_two_queues() {
    let shared = BalloonShared::new(BalloonOptions {
        stats: false,
        stats_period: None,
        deflate_on_oom: false,
        reporting: false,
    })
    .unwrap();

    let dev = Balloon::new(shared);

    assert_eq!(dev.queue_max_sizes().len(), 2);
    assert_eq!(dev.features(), 1 << 32);
}

#[test]
fn test_balloon_target_change_interrupts_an_active_driver_only() {
    let shared = BalloonShared::new(BalloonOptions::default()).unwrap();
    let irq = Arc::new(FakeInterrupt::default());

    shared.set_target_pages(10);
    shared.set_interrupt(Some(irq.clone()));
    shared.set_target_pages(20);

    assert_eq!(irq.0.lock().unwrap().as_slice(), [InterruptKind::Config]);
    assert_eq!(shared.target_pages(), 20);
}

#[test]
fn test_balloon_worker_gives_stats_buffer_back_on_host_request() {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let h = harness();
    let bytes = stat_bytes(&[(5, 1 << 30)]);
    h.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    let vq = MockSplitQueue::create(&h.mem, GuestAddress(RING), QSIZE);
    vq.add_desc_chains(&[desc(BUF, bytes.len() as u32, 0, 0)], 0)
        .unwrap();
    *h.queues[STATS].lock().unwrap() = vq.create_queue().unwrap();
    let shared = h.shared.clone();
    let handler = h
        .handler
        .with_stats_events(shared.stats_request.try_clone().unwrap(), None);
    let bells: Vec<_> = (0..4)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let _worker = crate::worker::Worker::spawn("balloon-test", bells, handler).unwrap();
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "gave up on {what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };

    wait("stats", &|| shared.stats().is_some());
    let used_before = vq.used().idx().load();
    shared.request_stats();
    wait("buffer back", &|| vq.used().idx().load() == 1);

    assert_eq!(used_before, 0);
    assert_eq!(shared.stats().unwrap().entries, vec![(5, 1 << 30)]);
}

#[test]
fn test_balloon_state_records_held_stats_buffer_and_round_trips() {
    let mut h = harness();
    let bytes = stat_bytes(&[(5, 1)]);
    h.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    let dev = Balloon::new(h.shared.clone());
    h.shared.set_target_pages(300);

    run(
        &h.mem.clone(),
        &mut h,
        STATS,
        &[desc(BUF, bytes.len() as u32, 0, 0)],
    );
    let state = dev.balloon_state();
    let json = serde_json::to_string(&state).unwrap();

    assert_eq!(state.stats_head, Some(0));
    assert_eq!(state.target_pages, 300);
    assert_eq!(serde_json::from_str::<BalloonState>(&json).unwrap(), state);
}

#[test]
fn test_balloon_restored_from_its_state_has_target_actual_and_held_stats_buffer() {
    // Arrange: a balloon holding the driver's statistics buffer, target 300 pages.
    let mut h = harness();
    let bytes = stat_bytes(&[(5, 1)]);
    h.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    let dev = Balloon::new(h.shared.clone());
    h.shared.set_target_pages(300);
    run(
        &h.mem.clone(),
        &mut h,
        STATS,
        &[desc(BUF, bytes.len() as u32, 0, 0)],
    );
    let saved = dev.state();

    // Act: a fresh device of the same options takes the state back.
    let fresh = BalloonShared::new(h.shared.options()).unwrap();
    let mut restored = Balloon::new(fresh.clone());
    restored.restored(&saved).unwrap();

    // Assert
    assert_eq!(fresh.target_pages(), 300);
    assert_eq!(fresh.stats_head(), Some(0));
    assert_eq!(restored.state().specific, saved.specific);
}

#[test]
fn test_balloon_restore_refuses_other_features_and_bad_buffer_index() {
    let h = harness();
    let dev = Balloon::new(h.shared.clone());
    let mut other_features = dev.state();
    let mut bad_head = dev.state();
    if let Some(DeviceSpecificState::Balloon(b)) = other_features.specific.as_mut() {
        b.avail_features ^= 1 << features::VIRTIO_BALLOON_F_STATS_VQ;
    }
    if let Some(DeviceSpecificState::Balloon(b)) = bad_head.specific.as_mut() {
        b.stats_head = Some(QUEUE_SIZE);
    }

    let mut fresh = Balloon::new(BalloonShared::new(h.shared.options()).unwrap());
    let features_err = fresh.restored(&other_features).unwrap_err().to_string();
    let head_err = fresh.restored(&bad_head).unwrap_err().to_string();

    assert!(features_err.contains("--balloon"), "{features_err}");
    assert!(head_err.contains("outside the queue"), "{head_err}");
}

#[test]
fn test_balloon_inflate_run_leaving_ram_still_releases_its_ram_pages() {
    let mut h = harness();
    let last = (MEM_SIZE as u64 >> PAGE_SHIFT) as u32 - 1;
    h.mem
        .write_slice(
            &[0x22u8; PAGE_SIZE as usize],
            GuestAddress(u64::from(last) << PAGE_SHIFT),
        )
        .unwrap();
    let len = write_pfns(&h.mem, &[last, last + 1]);

    run(&h.mem.clone(), &mut h, INFLATE, &[desc(BUF, len, 0, 0)]);

    assert!(page_is_zero(&h.mem, u64::from(last) << PAGE_SHIFT));
    let m = h.shared.metrics().snapshot();
    assert_eq!((m.released_bytes, m.invalid_ranges), (PAGE_SIZE, 1));
}
