//! virtio-net tests through virtio-queue's mock driver-side queues and a fake TAP.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_device::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::device::{InterruptKind, VirtioInterrupt};
use crate::worker::QueueHandler;

const RXQ: u64 = 0x1000;
const TXQ: u64 = 0x8000;
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

#[derive(Default)]
struct Wire {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
}

#[derive(Clone, Default)]
struct FakeTap(Arc<Mutex<Wire>>);

impl NetBackend for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(f) = self.0.lock().unwrap().to_guest.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        buf[..f.len()].copy_from_slice(&f);
        Ok(f.len())
    }
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().from_guest.push(buf.to_vec());
        Ok(buf.len())
    }
    fn fd(&self) -> Option<RawFd> {
        None
    }
    fn set_offloads(&mut self, _acked: u64) -> io::Result<()> {
        Ok(())
    }
    fn try_clone_box(&self) -> io::Result<Box<dyn NetBackend>> {
        Ok(Box::new(self.clone()))
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    tap: FakeTap,
    irq: Arc<FakeInterrupt>,
    needs_reset: Arc<AtomicBool>,
}

fn harness() -> Harness {
    Harness {
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        tap: FakeTap::default(),
        irq: Arc::new(FakeInterrupt::default()),
        needs_reset: Arc::new(AtomicBool::new(false)),
    }
}

fn handler(h: &Harness, rx: Queue, tx: Queue, features: &[u32]) -> NetHandler {
    let acked = features.iter().fold(0u64, |a, b| a | (1u64 << b));
    NetHandler::new(
        h.mem.clone(),
        Arc::new(Mutex::new(rx)),
        Arc::new(Mutex::new(tx)),
        Box::new(h.tap.clone()),
        Arc::new(NetMetrics::default()),
        h.irq.clone(),
        h.needs_reset.clone(),
        acked,
    )
    .unwrap()
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let n = vq.used().idx().load();
    (0..n)
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

/// A frame as the TAP hands it over: a zero vnet header then `payload_len` bytes.
fn tap_frame(payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

#[test]
fn test_net_rx_frame_fills_one_buffer_and_interrupts() {
    let h = harness();
    let rxq = MockSplitQueue::create(&h.mem, GuestAddress(RXQ), QSIZE);
    let txq = MockSplitQueue::create(&h.mem, GuestAddress(TXQ), QSIZE);
    rxq.add_desc_chains(&[desc(BUF, 2048, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    let mut nh = handler(
        &h,
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        &[],
    );
    let frame = tap_frame(100, 1);
    h.tap.0.lock().unwrap().to_guest.push_back(frame.clone());

    nh.process_queue(0);

    assert_eq!(used(&rxq), vec![(0, 112)]);
    let got = read(&h, BUF, 112);
    assert_eq!(&got[..10], &frame[..10]);
    assert_eq!(&got[10..12], &1u16.to_le_bytes());
    assert_eq!(&got[12..], &frame[12..]);
    assert_eq!(
        h.irq.0.lock().unwrap().as_slice(),
        [InterruptKind::Queue(0)]
    );
    let m = nh.metrics.snapshot();
    assert_eq!((m.rx_packets, m.rx_bytes, m.rx_dropped), (1, 100, 0));
}

#[test]
fn test_net_rx_mergeable_frame_spans_buffers_with_num_buffers() {
    let h = harness();
    let rxq = MockSplitQueue::create(&h.mem, GuestAddress(RXQ), QSIZE);
    let txq = MockSplitQueue::create(&h.mem, GuestAddress(TXQ), QSIZE);
    rxq.add_desc_chains(
        &[
            desc(BUF, 512, VRING_DESC_F_WRITE, 0),
            desc(BUF + 0x1000, 512, VRING_DESC_F_WRITE, 0),
            desc(BUF + 0x2000, 512, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut nh = handler(
        &h,
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        &[features::VIRTIO_NET_F_MRG_RXBUF],
    );
    let frame = tap_frame(1200, 3);
    h.tap.0.lock().unwrap().to_guest.push_back(frame.clone());

    nh.process_queue(0);

    assert_eq!(used(&rxq), vec![(0, 512), (1, 512), (2, 188)]);
    let mut got = read(&h, BUF, 512);
    got.extend(read(&h, BUF + 0x1000, 512));
    got.extend(read(&h, BUF + 0x2000, 188));
    assert_eq!(&got[10..12], &3u16.to_le_bytes());
    assert_eq!(&got[12..], &frame[12..]);
}

#[test]
fn test_net_rx_without_buffers_keeps_frame_until_guest_posts_one() {
    let h = harness();
    let rxq = MockSplitQueue::create(&h.mem, GuestAddress(RXQ), QSIZE);
    let txq = MockSplitQueue::create(&h.mem, GuestAddress(TXQ), QSIZE);
    let mut nh = handler(
        &h,
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        &[],
    );
    h.tap.0.lock().unwrap().to_guest.push_back(tap_frame(60, 5));
    nh.process_queue(0);
    assert!(used(&rxq).is_empty());

    rxq.add_desc_chains(&[desc(BUF, 2048, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    nh.process_queue(0);

    assert_eq!(used(&rxq), vec![(0, 72)]);
    let m = nh.metrics.snapshot();
    assert_eq!((m.rx_packets, m.rx_dropped, m.rx_no_buffers), (1, 0, 1));
}

#[test]
fn test_net_rx_buffer_too_small_without_mrg_drops_and_counts() {
    let h = harness();
    let rxq = MockSplitQueue::create(&h.mem, GuestAddress(RXQ), QSIZE);
    let txq = MockSplitQueue::create(&h.mem, GuestAddress(TXQ), QSIZE);
    rxq.add_desc_chains(&[desc(BUF, 64, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    let mut nh = handler(
        &h,
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        &[],
    );
    h.tap
        .0
        .lock()
        .unwrap()
        .to_guest
        .push_back(tap_frame(1000, 5));
    h.tap.0.lock().unwrap().to_guest.push_back(tap_frame(20, 6));

    nh.process_queue(0);

    // The small frame still gets the buffer the large one could not use.
    assert_eq!(used(&rxq), vec![(0, 32)]);
    let m = nh.metrics.snapshot();
    assert_eq!((m.rx_packets, m.rx_dropped), (1, 1));
    assert!(!h.needs_reset.load(Ordering::Acquire));
}

#[test]
fn test_net_rx_readable_buffer_breaks_queue() {
    let h = harness();
    let rxq = MockSplitQueue::create(&h.mem, GuestAddress(RXQ), QSIZE);
    let txq = MockSplitQueue::create(&h.mem, GuestAddress(TXQ), QSIZE);
    rxq.add_desc_chains(&[desc(BUF, 2048, 0, 0)], 0).unwrap();
    let mut nh = handler(
        &h,
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        &[],
    );
    h.tap.0.lock().unwrap().to_guest.push_back(tap_frame(60, 5));

    nh.process_queue(0);

    assert!(h.needs_reset.load(Ordering::Acquire));
    assert_eq!(h.irq.0.lock().unwrap().as_slice(), [InterruptKind::Config]);
}

#[test]
fn test_net_rx_buffer_outside_memory_breaks_queue_without_panic() {
    let h = harness();
    let rxq = MockSplitQueue::create(&h.mem, GuestAddress(RXQ), QSIZE);
    let txq = MockSplitQueue::create(&h.mem, GuestAddress(TXQ), QSIZE);
    rxq.add_desc_chains(&[desc(u64::MAX - 100, 2048, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    let mut nh = handler(
        &h,
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        &[],
    );
    h.tap.0.lock().unwrap().to_guest.push_back(tap_frame(60, 5));

    nh.process_queue(0);

    assert!(h.needs_reset.load(Ordering::Acquire));
}

#[test]
fn test_net_tx_chain_is_written_to_tap_whole() {
    let h = harness();
    let rxq = MockSplitQueue::create(&h.mem, GuestAddress(RXQ), QSIZE);
    let txq = MockSplitQueue::create(&h.mem, GuestAddress(TXQ), QSIZE);
    let frame = tap_frame(90, 9);
    h.mem.write_slice(&frame[..12], GuestAddress(BUF)).unwrap();
    h.mem
        .write_slice(&frame[12..], GuestAddress(BUF + 0x1000))
        .unwrap();
    txq.add_desc_chains(
        &[
            desc(BUF, 12, VRING_DESC_F_NEXT, 1),
            desc(BUF + 0x1000, 90, 0, 0),
        ],
        0,
    )
    .unwrap();
    let mut nh = handler(
        &h,
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        &[],
    );

    nh.process_queue(1);

    assert_eq!(used(&txq), vec![(0, 0)]);
    assert_eq!(h.tap.0.lock().unwrap().from_guest, vec![frame]);
    assert_eq!(
        h.irq.0.lock().unwrap().as_slice(),
        [InterruptKind::Queue(1)]
    );
    let m = nh.metrics.snapshot();
    assert_eq!((m.tx_packets, m.tx_bytes), (1, 90));
}

#[test]
fn test_net_tx_hostile_chains_are_dropped_and_completed() {
    let h = harness();
    let rxq = MockSplitQueue::create(&h.mem, GuestAddress(RXQ), QSIZE);
    let txq = MockSplitQueue::create(&h.mem, GuestAddress(TXQ), QSIZE);
    let mut gso = [0u8; 12];
    gso[1] = 1; // TCPv4 segmentation, not negotiated.
    h.mem.write_slice(&gso, GuestAddress(BUF + 0x3000)).unwrap();
    txq.add_desc_chains(
        &[
            desc(BUF, 4, 0, 0),                    // shorter than the header
            desc(u64::MAX - 8, 100, 0, 0),         // outside memory
            desc(BUF, 100, VRING_DESC_F_WRITE, 0), // device-writable
            desc(BUF, 0x10_0000, 0, 0),            // larger than any frame
            desc(BUF + 0x3000, 100, 0, 0),         // GSO not negotiated
        ],
        0,
    )
    .unwrap();
    let mut nh = handler(
        &h,
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        &[],
    );

    nh.process_queue(1);

    assert_eq!(used(&txq).len(), 5);
    assert!(h.tap.0.lock().unwrap().from_guest.is_empty());
    let m = nh.metrics.snapshot();
    assert_eq!((m.tx_packets, m.tx_dropped, m.tx_errors), (0, 5, 5));
    assert!(!h.needs_reset.load(Ordering::Acquire));
}

#[test]
fn test_net_config_space_has_mac_and_link_up() {
    let mac: net::MacAddr = "52:54:00:01:02:03".parse().unwrap();
    let dev = Net::new(Box::new(FakeTap::default()), mac);
    let mut data = [0u8; 12];

    dev.read_config(0, &mut data);

    assert_eq!(&data[..6], &mac.bytes());
    assert_eq!(&data[6..8], &VIRTIO_NET_S_LINK_UP.to_le_bytes());
    assert_eq!(&data[8..], &[1, 0, 0, 0]);
    assert_eq!(dev.device_type(), crate::device_type::NET);
    assert_ne!(dev.features() & (1 << features::VIRTIO_NET_F_MRG_RXBUF), 0);
}

#[test]
fn test_net_config_read_at_huge_offset_is_zero() {
    let dev = Net::new(
        Box::new(FakeTap::default()),
        net::MacAddr([2, 0, 0, 0, 0, 1]),
    );
    let mut data = [0xffu8; 4];

    dev.read_config(u64::MAX - 1, &mut data);

    assert_eq!(data, [0; 4]);
}

/// A limiter allowing one packet per `ms` milliseconds (its bucket starts full).
fn one_packet_per(ms: u64) -> rate_limiter::SharedRateLimiter {
    rate_limiter::SharedRateLimiter::new(&rate_limiter::RateLimitConfig {
        bandwidth: None,
        ops: Some(rate_limiter::BucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time_ms: ms,
        }),
    })
    .unwrap()
}

/// Poll `cond` every millisecond; the 20 s bound is a hang guard, not a threshold.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "gave up on {what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn bells() -> Vec<vmm_sys_util::eventfd::EventFd> {
    (0..2)
        .map(|_| vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap())
        .collect()
}

#[test]
fn test_net_tx_limited_queue_resumes_on_timer_without_kick() {
    // Arrange: two frames on the transmit queue (EVENT_IDX on), one packet per 300 ms.
    let h = harness();
    let rxq = MockSplitQueue::create(&h.mem, GuestAddress(RXQ), QSIZE);
    let txq = MockSplitQueue::create(&h.mem, GuestAddress(TXQ), QSIZE);
    let frame = tap_frame(60, 3);
    h.mem.write_slice(&frame, GuestAddress(BUF)).unwrap();
    txq.add_desc_chains(
        &[
            desc(BUF, frame.len() as u32, 0, 0),
            desc(BUF, frame.len() as u32, 0, 0),
        ],
        0,
    )
    .unwrap();
    let mut tx: Queue = txq.create_queue().unwrap();
    virtio_queue::QueueT::set_event_idx(&mut tx, true);
    let nh = handler(
        &h,
        rxq.create_queue().unwrap(),
        tx,
        &[crate::features::VIRTIO_F_RING_EVENT_IDX],
    )
    .with_rate_limiters(None, Some(one_packet_per(300)));
    let metrics = nh.metrics.clone();

    // Act: the worker's first drain is the only "kick"; nothing rings afterwards.
    let _worker = crate::worker::Worker::spawn("net-test", bells(), nh).unwrap();
    wait_for("first frame", || used(&txq).len() == 1);
    let sent_while_limited = h.tap.0.lock().unwrap().from_guest.len();
    wait_for("second frame", || used(&txq).len() == 2);

    // Assert
    assert_eq!(sent_while_limited, 1);
    assert_eq!(h.tap.0.lock().unwrap().from_guest.len(), 2);
    assert!(metrics.snapshot().tx_throttled >= 1);
    assert!(!h.needs_reset.load(Ordering::Acquire));
}

#[test]
fn test_net_rx_limited_frame_waits_then_is_delivered_on_timer() {
    // Arrange: two frames waiting in the TAP, two guest buffers, one packet per 300 ms.
    let h = harness();
    let rxq = MockSplitQueue::create(&h.mem, GuestAddress(RXQ), QSIZE);
    let txq = MockSplitQueue::create(&h.mem, GuestAddress(TXQ), QSIZE);
    rxq.add_desc_chains(
        &[
            desc(BUF, 2048, VRING_DESC_F_WRITE, 0),
            desc(BUF + 0x1000, 2048, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    for seed in [1, 2] {
        h.tap
            .0
            .lock()
            .unwrap()
            .to_guest
            .push_back(tap_frame(100, seed));
    }
    let nh = handler(
        &h,
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        &[],
    )
    .with_rate_limiters(Some(one_packet_per(300)), None);
    let metrics = nh.metrics.clone();

    // Act: the fake TAP never becomes readable; only the limiter's timer can resume.
    let _worker = crate::worker::Worker::spawn("net-test", bells(), nh).unwrap();
    wait_for("first frame", || used(&rxq).len() == 1);
    wait_for("second frame", || used(&rxq).len() == 2);

    // Assert: the second frame was held back by the limiter, then delivered intact.
    let m = metrics.snapshot();
    assert!(m.rx_throttled >= 1, "{m:?}");
    assert_eq!((m.rx_packets, m.rx_bytes), (2, 200));
    assert_eq!(read(&h, BUF + 0x1000 + 12, 100), tap_frame(100, 2)[12..]);
}
