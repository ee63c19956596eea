//! virtio-rng request tests through virtio-queue's mock driver-side queue.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_device::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::device::{InterruptKind, VirtioInterrupt};
use crate::worker::QueueHandler;

const BUF: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x40_0000;
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
    handler: RngHandler,
    irq: Arc<FakeInterrupt>,
    needs_reset: Arc<AtomicBool>,
}

fn harness() -> Harness {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let irq = Arc::new(FakeInterrupt::default());
    let needs_reset = Arc::new(AtomicBool::new(false));
    let handler = RngHandler::new(
        mem.clone(),
        Arc::new(Mutex::new(Queue::new(QSIZE).unwrap())),
        Arc::new(RngMetrics::default()),
        irq.clone(),
        needs_reset.clone(),
    );
    Harness {
        mem,
        handler,
        irq,
        needs_reset,
    }
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// Put chains on a fresh mock queue, run the handler, return the used elements.
fn run(h: &mut Harness, descs: &[RawDescriptor]) -> Vec<(u32, u32)> {
    let vq = MockSplitQueue::create(&h.mem, GuestAddress(0x1000), QSIZE);
    vq.add_desc_chains(descs, 0).unwrap();
    *h.handler.queue.lock().unwrap() = vq.create_queue().unwrap();
    h.handler.process_queue(0);
    let used_idx = vq.used().idx().load();
    (0..used_idx)
        .map(|i| {
            let e = vq.used().ring().ref_at(i as usize).unwrap().load();
            (e.id(), e.len())
        })
        .collect()
}

fn read(h: &Harness, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    h.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn test_rng_request_is_filled_and_interrupts() {
    let mut h = harness();

    let used = run(&mut h, &[desc(BUF, 4096, VRING_DESC_F_WRITE, 0)]);

    assert_eq!(used, vec![(0, 4096)]);
    let data = read(&h, BUF, 4096);
    let distinct = data
        .iter()
        .fold([false; 256], |mut s, &b| {
            s[b as usize] = true;
            s
        })
        .iter()
        .filter(|&&x| x)
        .count();
    assert!(distinct > 200, "only {distinct} distinct byte values");
    assert_eq!(
        h.irq.0.lock().unwrap().as_slice(),
        [InterruptKind::Queue(0)]
    );
    let m = h.handler.metrics.snapshot();
    assert_eq!((m.requests, m.bytes, m.interrupts), (1, 4096, 1));
}

#[test]
fn test_rng_two_requests_get_different_bytes() {
    let mut h = harness();

    run(&mut h, &[desc(BUF, 64, VRING_DESC_F_WRITE, 0)]);
    let first = read(&h, BUF, 64);
    run(&mut h, &[desc(BUF, 64, VRING_DESC_F_WRITE, 0)]);
    let second = read(&h, BUF, 64);

    assert_ne!(first, second);
}

#[test]
fn test_rng_multi_descriptor_chain_fills_every_buffer() {
    let mut h = harness();
    h.mem
        .write_slice(&[0u8; 256], GuestAddress(BUF + 0x1000))
        .unwrap();

    let used = run(
        &mut h,
        &[
            desc(BUF, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(BUF + 0x1000, 256, VRING_DESC_F_WRITE, 0),
        ],
    );

    assert_eq!(used, vec![(0, 272)]);
    assert_ne!(read(&h, BUF + 0x1000, 256), vec![0u8; 256]);
}

#[test]
fn test_rng_huge_buffer_is_capped() {
    let mut h = harness();

    let used = run(&mut h, &[desc(BUF, 0x20_0000, VRING_DESC_F_WRITE, 0)]);

    assert_eq!(used, vec![(0, MAX_REQUEST_BYTES as u32)]);
}

#[test]
fn test_rng_readable_buffer_gets_zero_length() {
    let mut h = harness();
    h.mem.write_slice(&[7u8; 64], GuestAddress(BUF)).unwrap();

    let used = run(&mut h, &[desc(BUF, 64, 0, 0)]);

    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(read(&h, BUF, 64), vec![7u8; 64]);
    assert_eq!(h.handler.metrics.snapshot().errors, 1);
    assert!(!h.needs_reset.load(Ordering::Acquire));
}

#[test]
fn test_rng_buffer_outside_memory_gets_partial_length() {
    let mut h = harness();

    let used = run(
        &mut h,
        &[
            desc(BUF, 32, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(
                MEM_SIZE as u64 - 8,
                64,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                2,
            ),
            desc(u64::MAX - 8, 64, VRING_DESC_F_WRITE, 0),
        ],
    );

    assert_eq!(used, vec![(0, 32)]);
    assert_eq!(h.handler.metrics.snapshot().errors, 1);
    assert!(!h.needs_reset.load(Ordering::Acquire));
}

#[test]
fn test_rng_zero_length_buffer_gets_zero_length() {
    let mut h = harness();

    let used = run(&mut h, &[desc(BUF, 0, VRING_DESC_F_WRITE, 0)]);

    assert_eq!(used, vec![(0, 0)]);
}

fn assert_broken(h: &Harness) {
    assert!(h.handler.broken);
    assert!(h.needs_reset.load(Ordering::Acquire));
    assert!(h.irq.0.lock().unwrap().contains(&InterruptKind::Config));
}

#[test]
fn test_rng_descriptor_loop_marks_queue_broken() {
    let mut h = harness();

    let used = run(
        &mut h,
        &[
            desc(BUF, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(BUF, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
        ],
    );

    assert!(used.is_empty());
    assert_broken(&h);
    h.handler.process_queue(0);
    assert_eq!(h.handler.metrics.snapshot().broken_queues, 1);
}

#[test]
fn test_rng_avail_index_far_ahead_marks_queue_broken() {
    let mut h = harness();
    let vq = MockSplitQueue::create(&h.mem, GuestAddress(0x1000), QSIZE);
    vq.avail().idx().store(QSIZE + 3);
    *h.handler.queue.lock().unwrap() = vq.create_queue().unwrap();

    h.handler.process_queue(0);

    assert_broken(&h);
}

struct Deny(u32);
impl Budget for Deny {
    fn try_consume(&mut self, _bytes: u64) -> bool {
        if self.0 == 0 {
            return false;
        }
        self.0 -= 1;
        true
    }
}

#[test]
fn test_rng_exhausted_budget_leaves_request_queued() {
    let mut h = harness();
    h.handler.budget = Some(Box::new(Deny(1)));
    let vq = MockSplitQueue::create(&h.mem, GuestAddress(0x1000), QSIZE);
    vq.add_desc_chains(
        &[
            desc(BUF, 64, VRING_DESC_F_WRITE, 0),
            desc(BUF + 64, 64, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    *h.handler.queue.lock().unwrap() = vq.create_queue().unwrap();

    h.handler.process_queue(0);
    assert_eq!(vq.used().idx().load(), 1);
    h.handler.budget = Some(Box::new(Deny(1)));
    h.handler.process_queue(0);

    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(h.handler.metrics.snapshot().throttled, 1);
    assert!(!h.needs_reset.load(Ordering::Acquire));
}

#[test]
fn test_rng_device_offers_version_1_and_no_config() {
    let rng = Rng::new();
    let mut cfg = [0xffu8; 8];

    rng.read_config(0, &mut cfg);

    assert_eq!(rng.device_type(), crate::device_type::RNG);
    assert_eq!(rng.features(), 1 << 32);
    assert_eq!(cfg, [0u8; 8]);
}

/// A budget that refuses until its timer eventfd fires once.
struct Gate {
    open: bool,
    timer: vmm_sys_util::eventfd::EventFd,
}
impl Budget for Gate {
    fn try_consume(&mut self, _bytes: u64) -> bool {
        self.open
    }
    fn timer_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.timer.as_raw_fd())
    }
    fn on_timer(&mut self) {
        let _ = self.timer.read();
        self.open = true;
    }
}

#[test]
fn test_rng_throttled_request_is_served_when_timer_fires() {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let mut h = harness();
    let timer = EventFd::new(EFD_NONBLOCK).unwrap();
    let fire = timer.try_clone().unwrap();
    let vq = MockSplitQueue::create(&h.mem, GuestAddress(0x1000), QSIZE);
    vq.add_desc_chains(&[desc(BUF, 64, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    *h.handler.queue.lock().unwrap() = vq.create_queue().unwrap();
    h.handler.budget = Some(Box::new(Gate { open: false, timer }));
    let metrics = h.handler.metrics.clone();
    let bell = EventFd::new(EFD_NONBLOCK).unwrap();
    let _worker =
        crate::worker::Worker::spawn("rng-test", vec![bell.try_clone().unwrap()], h.handler)
            .unwrap();
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "gave up on {what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };

    wait("throttled", &|| metrics.snapshot().throttled >= 1);
    let used_while_closed = vq.used().idx().load();
    fire.write(1).unwrap();
    wait("served", &|| vq.used().idx().load() == 1);

    assert_eq!(used_while_closed, 0);
    assert_eq!(metrics.snapshot().bytes, 64);
}

#[test]
fn test_rng_byte_limit_holds_request_until_limiter_timer() {
    // Arrange: 64 bytes per 300 ms; two 64-byte requests queued.
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let mut h = harness();
    let vq = MockSplitQueue::create(&h.mem, GuestAddress(0x1000), QSIZE);
    vq.add_desc_chains(
        &[
            desc(BUF, 64, VRING_DESC_F_WRITE, 0),
            desc(BUF + 64, 64, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    *h.handler.queue.lock().unwrap() = vq.create_queue().unwrap();
    let limiter = rate_limiter::SharedRateLimiter::new(&rate_limiter::RateLimitConfig {
        bandwidth: Some(rate_limiter::BucketConfig {
            size: 64,
            one_time_burst: 0,
            refill_time_ms: 300,
        }),
        ops: None,
    })
    .unwrap();
    h.handler.budget = Some(Box::new(limiter));
    let metrics = h.handler.metrics.clone();
    let bell = EventFd::new(EFD_NONBLOCK).unwrap();
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        // Hang guard only.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "gave up on {what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };

    // Act: no doorbell after the worker's first drain.
    let _worker = crate::worker::Worker::spawn("rng-test", vec![bell], h.handler).unwrap();
    wait("first request", &|| vq.used().idx().load() >= 1);
    wait("second request", &|| vq.used().idx().load() == 2);

    // Assert
    let m = metrics.snapshot();
    assert!(m.throttled >= 1, "{m:?}");
    assert_eq!(m.bytes, 128);
}
