//! virtio-console tests: a real worker thread, virtio-queue's mock driver-side queues and
//! real host endpoints (a temp file, a Unix socket).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_device::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::*;
use crate::device::{ActivateContext, InterruptKind, VirtioInterrupt};

const MEM_SIZE: usize = 0x40_0000;
const QSIZE: u16 = 16;
const RXQ: u64 = 0x1000;
const TXQ: u64 = 0x8000;
const BUF: u64 = 0x10_0000;

#[derive(Default)]
struct FakeInterrupt(Mutex<Vec<InterruptKind>>);
impl VirtioInterrupt for FakeInterrupt {
    fn trigger(&self, kind: InterruptKind) {
        self.0.lock().unwrap().push(kind);
    }
}

struct Rig {
    dev: Console,
    bells: Vec<EventFd>,
    needs_reset: Arc<AtomicBool>,
    irq: Arc<FakeInterrupt>,
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn activate(
    mem: &GuestMemoryMmap,
    rx: &MockSplitQueue<GuestMemoryMmap>,
    tx: &MockSplitQueue<GuestMemoryMmap>,
    backend: Arc<ConsoleBackend>,
) -> Rig {
    let mut dev = Console::new(backend, ConsoleSize::default());
    let queues: Vec<Arc<Mutex<Queue>>> = [rx, tx]
        .iter()
        .map(|vq| Arc::new(Mutex::new(vq.create_queue::<Queue>().unwrap())))
        .collect();
    let bells: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let needs_reset = Arc::new(AtomicBool::new(false));
    let irq = Arc::new(FakeInterrupt::default());
    dev.activate(ActivateContext {
        mem: mem.clone(),
        queues,
        queue_events: bells.iter().map(|b| b.try_clone().unwrap()).collect(),
        interrupt: irq.clone(),
        acked_features: dev.features(),
        needs_reset: needs_reset.clone(),
    })
    .unwrap();
    Rig {
        dev,
        bells,
        needs_reset,
        irq,
    }
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// Wait (bounded by a generous deadline, which only catches hangs) for `cond`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn used(vq: &MockSplitQueue<GuestMemoryMmap>, i: u16) -> (u32, u32) {
    let e = vq.used().ring().ref_at(i as usize).unwrap().load();
    (e.id(), e.len())
}

fn send_tx(
    mem: &GuestMemoryMmap,
    tx: &MockSplitQueue<GuestMemoryMmap>,
    rig: &Rig,
    at: u16,
    text: &[u8],
) {
    let addr = BUF + 0x1_0000 + u64::from(at) * 0x100;
    mem.write_slice(text, GuestAddress(addr)).unwrap();
    tx.add_desc_chains(&[desc(addr, text.len() as u32, 0, 0)], at)
        .unwrap();
    rig.bells[TX_QUEUE].write(1).unwrap();
}

fn socket_backend(dir: &TempDir) -> (Arc<ConsoleBackend>, std::path::PathBuf) {
    let path = dir.as_path().join("con.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (ConsoleBackend::socket(listener).unwrap(), path)
}

#[test]
fn test_console_tx_reaches_output_file() {
    let mem = memory();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QSIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QSIZE);
    let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
    let out = std::fs::OpenOptions::new()
        .append(true)
        .open(file.as_path())
        .unwrap();
    let rig = activate(&mem, &rx, &tx, ConsoleBackend::file(out));

    send_tx(&mem, &tx, &rig, 0, b"hello hvc0\n");
    wait_for("tx used", || tx.used().idx().load() == 1);

    assert_eq!(used(&tx, 0), (0, 0));
    assert_eq!(
        std::fs::read(file.as_path()).unwrap(),
        b"hello hvc0\n".to_vec()
    );
    assert!(rig
        .irq
        .0
        .lock()
        .unwrap()
        .contains(&InterruptKind::Queue(TX_QUEUE as u16)));
    assert_eq!(rig.dev.metrics().snapshot().tx_bytes, 11);
}

#[test]
fn test_console_socket_carries_both_directions() {
    let mem = memory();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QSIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QSIZE);
    let dir = TempDir::new().unwrap();
    let (backend, path) = socket_backend(&dir);
    let rig = activate(&mem, &rx, &tx, backend);
    rx.add_desc_chains(&[desc(BUF, 64, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    rig.bells[RX_QUEUE].write(1).unwrap();
    let mut client = UnixStream::connect(&path).unwrap();

    client.write_all(b"ping\n").unwrap();
    wait_for("rx used", || rx.used().idx().load() == 1);
    send_tx(&mem, &tx, &rig, 0, b"pong\n");
    let mut got = [0u8; 5];
    client.read_exact(&mut got).unwrap();

    assert_eq!(used(&rx, 0), (0, 5));
    let mut buf = [0u8; 5];
    mem.read_slice(&mut buf, GuestAddress(BUF)).unwrap();
    assert_eq!(&buf, b"ping\n");
    assert_eq!(&got, b"pong\n");
    let m = rig.dev.metrics().snapshot();
    assert_eq!((m.rx_bytes, m.tx_bytes, m.connections), (5, 5, 1));
}

#[test]
fn test_console_input_waits_for_guest_buffers() {
    let mem = memory();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QSIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QSIZE);
    let dir = TempDir::new().unwrap();
    let (backend, path) = socket_backend(&dir);
    let rig = activate(&mem, &rx, &tx, backend);
    let mut client = UnixStream::connect(&path).unwrap();
    wait_for("connection", || {
        rig.dev.metrics().snapshot().connections == 1
    });

    client.write_all(b"early").unwrap();
    // A TX round trip proves the worker has handled everything queued before it.
    send_tx(&mem, &tx, &rig, 0, b"x");
    wait_for("tx used", || tx.used().idx().load() == 1);
    let before = rig.dev.metrics().snapshot().rx_bytes;
    rx.add_desc_chains(
        &[
            desc(BUF, 3, VRING_DESC_F_WRITE, 0),
            desc(BUF + 0x100, 64, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    rig.bells[RX_QUEUE].write(1).unwrap();
    wait_for("rx used", || rx.used().idx().load() == 2);

    assert_eq!(before, 0);
    assert_eq!((used(&rx, 0), used(&rx, 1)), ((0, 3), (1, 2)));
    let mut a = [0u8; 3];
    let mut b = [0u8; 2];
    mem.read_slice(&mut a, GuestAddress(BUF)).unwrap();
    mem.read_slice(&mut b, GuestAddress(BUF + 0x100)).unwrap();
    assert_eq!((&a, &b), (b"ear", b"ly"));
}

#[test]
fn test_console_output_before_connect_is_delivered_on_connect() {
    let mem = memory();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QSIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QSIZE);
    let dir = TempDir::new().unwrap();
    let (backend, path) = socket_backend(&dir);
    let rig = activate(&mem, &rx, &tx, backend);

    send_tx(&mem, &tx, &rig, 0, b"boot log\n");
    wait_for("tx used", || tx.used().idx().load() == 1);
    let mut client = UnixStream::connect(&path).unwrap();
    let mut got = [0u8; 9];
    client.read_exact(&mut got).unwrap();

    assert_eq!(&got, b"boot log\n");
}

#[test]
fn test_console_client_reconnect_is_served() {
    let mem = memory();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QSIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QSIZE);
    let dir = TempDir::new().unwrap();
    let (backend, path) = socket_backend(&dir);
    let rig = activate(&mem, &rx, &tx, backend);
    let first = UnixStream::connect(&path).unwrap();
    wait_for("first connection", || {
        rig.dev.metrics().snapshot().connections == 1
    });

    drop(first);
    let mut second = UnixStream::connect(&path).unwrap();
    wait_for("second connection", || {
        rig.dev.metrics().snapshot().connections == 2
    });
    send_tx(&mem, &tx, &rig, 0, b"again\n");
    let mut got = [0u8; 6];
    second.read_exact(&mut got).unwrap();

    assert_eq!(&got, b"again\n");
}

#[test]
fn test_console_tx_descriptor_loop_marks_device_broken() {
    let mem = memory();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QSIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QSIZE);
    let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
    let out = std::fs::File::create(file.as_path()).unwrap();
    let rig = activate(&mem, &rx, &tx, ConsoleBackend::file(out));

    tx.add_desc_chains(
        &[
            desc(BUF, 4, VRING_DESC_F_NEXT, 1),
            desc(BUF, 4, VRING_DESC_F_NEXT, 0),
        ],
        0,
    )
    .unwrap();
    rig.bells[TX_QUEUE].write(1).unwrap();
    wait_for("needs reset", || rig.needs_reset.load(Ordering::Acquire));

    assert_eq!(tx.used().idx().load(), 0);
    assert!(rig.irq.0.lock().unwrap().contains(&InterruptKind::Config));
    assert_eq!(rig.dev.metrics().snapshot().broken_queues, 1);
}

#[test]
fn test_console_rx_buffer_outside_memory_is_answered_short() {
    let mem = memory();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QSIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QSIZE);
    let dir = TempDir::new().unwrap();
    let (backend, path) = socket_backend(&dir);
    let rig = activate(&mem, &rx, &tx, backend);
    rx.add_desc_chains(
        &[
            desc(u64::MAX - 4, 64, VRING_DESC_F_WRITE, 0),
            desc(BUF, 64, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    rig.bells[RX_QUEUE].write(1).unwrap();
    let mut client = UnixStream::connect(&path).unwrap();

    client.write_all(b"abc").unwrap();
    wait_for("rx used", || rx.used().idx().load() == 2);

    assert_eq!((used(&rx, 0), used(&rx, 1)), ((0, 0), (1, 3)));
    assert!(!rig.needs_reset.load(Ordering::Acquire));
    assert_eq!(rig.dev.metrics().snapshot().errors, 1);
}

#[test]
fn test_console_config_reports_size_and_one_port() {
    let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
    let out = std::fs::File::create(file.as_path()).unwrap();
    let dev = Console::new(
        ConsoleBackend::file(out),
        ConsoleSize {
            cols: 132,
            rows: 43,
        },
    );
    let mut cfg = [0u8; 8];

    dev.read_config(0, &mut cfg);

    assert_eq!(cfg, [132, 0, 43, 0, 1, 0, 0, 0]);
    assert_eq!(dev.features(), 1 << 32 | 1);
    assert_eq!(dev.queue_max_sizes().len(), 2);
}

#[test]
fn test_console_slow_client_never_blocks_output() {
    let mem = memory();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QSIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QSIZE);
    let dir = TempDir::new().unwrap();
    let (backend, path) = socket_backend(&dir);
    let rig = activate(&mem, &rx, &tx, backend);
    let _client = UnixStream::connect(&path).unwrap();
    wait_for("connection", || {
        rig.dev.metrics().snapshot().connections == 1
    });

    // 16 chains of 64 KiB = 1 MiB, far more than the socket and the device buffer hold.
    let chains: Vec<RawDescriptor> = (0..QSIZE).map(|_| desc(BUF, 0x1_0000, 0, 0)).collect();
    tx.add_desc_chains(&chains, 0).unwrap();
    rig.bells[TX_QUEUE].write(1).unwrap();
    wait_for("all tx used", || tx.used().idx().load() == QSIZE);

    let m = rig.dev.metrics().snapshot();
    assert!(m.tx_dropped_bytes > 0, "{m:?}");
    assert_eq!(m.tx_bytes + m.tx_dropped_bytes, 16 * 0x1_0000, "{m:?}");
}
