//! Device tests: a real worker thread serves three virtqueues that the test drives from the
//! driver side (its own minimal split-ring writer over guest memory, like virtio-queue's mock
//! driver but with rings that do not overlap at 256 entries), with real host AF_UNIX sockets
//! on the other side. Includes hostile packets and hostile queues.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_device::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::packet::{op, shutdown, Header, HDR_LEN, HOST_CID, TYPE_STREAM};
use super::*;
use crate::device::{ActivateContext, InterruptKind, VirtioInterrupt};

const CID: u64 = 3;
const QSIZE: u16 = 256;
const QUEUE_BASE: [u64; 3] = [0x1_0000, 0x2_0000, 0x3_0000];
const RX_BUF: u64 = 0x10_0000;
const RX_BUF_LEN: u32 = 4096;
const TX_BUF: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x1_1000;
const EV_BUF: u64 = 0xf0_0000;
const MEM_SIZE: usize = 0x200_0000;
/// Hang guard for waits on the worker thread (not a performance threshold).
const HANG: Duration = Duration::from_secs(30);

#[derive(Default)]
struct FakeInterrupt(Mutex<Vec<InterruptKind>>);
impl VirtioInterrupt for FakeInterrupt {
    fn trigger(&self, kind: InterruptKind) {
        self.0.lock().unwrap().push(kind);
    }
}

/// Driver side of one split ring.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % QSIZE;
            let last = i + 1 == bufs.len();
            let mut flags = if writable { 2u16 } else { 0 };
            if !last {
                flags |= 1;
            }
            let next = (idx + 1) % QSIZE;
            let d = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % QSIZE;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Next used element (id, len), if any.
    fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        if self.used_idx(mem) == self.used_seen {
            return None;
        }
        let e = self.used + 4 + 8 * u64::from(self.used_seen % QSIZE);
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((
            mem.read_obj(GuestAddress(e)).unwrap(),
            mem.read_obj(GuestAddress(e + 4)).unwrap(),
        ))
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    dev: Vsock,
    dir: TempDir,
    rings: Vec<Ring>,
    bells: Vec<EventFd>,
    irq: Arc<FakeInterrupt>,
    needs_reset: Arc<AtomicBool>,
    tx_slot: u64,
}

fn wait_until(mut f: impl FnMut() -> bool) {
    let end = Instant::now() + HANG;
    while !f() {
        assert!(Instant::now() < end, "hang guard expired");
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Harness {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("vm.vsock");
        let listener = Arc::new(UnixListener::bind(&path).unwrap());
        let mut dev = Vsock::new(CID, listener, &path, Arc::default()).unwrap();
        let mut rings = Vec::new();
        let mut queues = Vec::new();
        let mut events = Vec::new();
        let mut bells = Vec::new();
        for base in QUEUE_BASE {
            // Own layout (virtio-queue's mock places the used ring inside the avail ring for
            // queues of more than 128 entries): descriptors, avail at +4 KiB, used at +8 KiB.
            let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
            let mut q = Queue::new(QSIZE).unwrap();
            q.set_size(QSIZE);
            q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
            q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
            q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
            q.set_ready(true);
            rings.push(Ring {
                desc,
                avail,
                used,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
            });
            queues.push(Arc::new(Mutex::new(q)));
            let e = EventFd::new(EFD_NONBLOCK).unwrap();
            bells.push(e.try_clone().unwrap());
            events.push(e);
        }
        let irq = Arc::new(FakeInterrupt::default());
        let needs_reset = Arc::new(AtomicBool::new(false));
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues,
            queue_events: events,
            interrupt: irq.clone(),
            acked_features: dev.features(),
            needs_reset: needs_reset.clone(),
        })
        .unwrap();
        Harness {
            mem,
            dev,
            dir,
            rings,
            bells,
            irq,
            needs_reset,
            tx_slot: 0,
        }
    }

    fn vm_socket(&self) -> PathBuf {
        self.dir.as_path().join("vm.vsock")
    }

    fn host_listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(self.dir.as_path().join(format!("vm.vsock_{port}"))).unwrap()
    }

    /// Let the worker finish what the TX chains sent so far caused: wait until it used them
    /// all, then take the handler's lock, which the worker holds for the whole batch (so the
    /// RX packets of that batch are out too).
    fn settle(&mut self) {
        self.wait_tx();
        let _ = self.dev.vsock_state();
    }

    /// Wait until the device used every TX chain sent so far.
    fn wait_tx(&mut self) {
        let mem = self.mem.clone();
        let want = self.rings[1].avail_idx;
        wait_until(|| self.rings[1].used_idx(&mem) == want);
    }

    fn give_rx(&mut self, n: u16) {
        let base = self.rings[0].next_desc;
        for i in 0..n {
            let slot = u64::from((base + i) % QSIZE);
            let addr = RX_BUF + slot * u64::from(RX_BUF_LEN);
            self.rings[0].add(&self.mem, &[(addr, RX_BUF_LEN, true)]);
        }
        self.bells[0].write(1).unwrap();
    }

    fn send_raw(&mut self, bufs: &[(u64, u32, bool)]) {
        self.rings[1].add(&self.mem, bufs);
        self.bells[1].write(1).unwrap();
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let addr = TX_BUF + (self.tx_slot % 64) * TX_SLOT;
        self.tx_slot += 1;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + 0x1000))
            .unwrap();
        if payload.is_empty() {
            self.send_raw(&[(addr, HDR_LEN as u32, false)]);
        } else {
            self.send_raw(&[
                (addr, HDR_LEN as u32, false),
                (addr + 0x1000, payload.len() as u32, false),
            ]);
        }
    }

    /// Wait for the next RX packet.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let mut got = None;
        let mem = self.mem.clone();
        wait_until(|| {
            got = self.rings[0].pop_used(&mem);
            got.is_some()
        });
        let (id, len) = got.unwrap();
        let addr = RX_BUF + u64::from(id) * u64::from(RX_BUF_LEN);
        let mut hb = [0u8; HDR_LEN];
        self.mem.read_slice(&mut hb, GuestAddress(addr)).unwrap();
        let hdr = Header::from_bytes(&hb);
        assert_eq!(len as usize, HDR_LEN + hdr.len as usize);
        let mut payload = vec![0u8; hdr.len as usize];
        self.mem
            .read_slice(&mut payload, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        (hdr, payload)
    }

    /// The RX packet, if one is already there.
    fn try_recv(&mut self) -> Option<Header> {
        self.settle();
        let (id, _) = self.rings[0].pop_used(&self.mem)?;
        let mut hb = [0u8; HDR_LEN];
        let addr = RX_BUF + u64::from(id) * u64::from(RX_BUF_LEN);
        self.mem.read_slice(&mut hb, GuestAddress(addr)).unwrap();
        Some(Header::from_bytes(&hb))
    }

    fn metrics(&self) -> VsockMetricsSnapshot {
        self.dev.metrics().snapshot()
    }
}

fn guest_hdr(src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

fn host_stream(s: UnixStream) -> UnixStream {
    s.set_read_timeout(Some(HANG)).unwrap();
    s
}

/// Guest connects to host port 5000 and gets RESPONSE; returns (harness, host side).
fn guest_initiated() -> (Harness, UnixStream) {
    let mut h = Harness::new();
    let l = h.host_listen(5000);
    h.give_rx(64);

    h.send(guest_hdr(1000, 5000, op::REQUEST, 0), &[]);

    let (resp, _) = h.recv();
    assert_eq!(resp.op, op::RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (5000, 1000));
    assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, CID));
    let (s, _) = l.accept().unwrap();
    (h, host_stream(s))
}

#[test]
fn test_vsock_config_space_reports_guest_cid() {
    let h = Harness::new();
    let mut cfg = [0u8; 8];

    h.dev.read_config(0, &mut cfg);

    assert_eq!(u64::from_le_bytes(cfg), CID);
    assert_eq!(h.dev.device_type(), 19);
}

#[test]
fn test_vsock_new_reserved_cid_rejected() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("s");
    let l = Arc::new(UnixListener::bind(&path).unwrap());

    for cid in [0, 1, 2, u64::from(u32::MAX)] {
        assert!(Vsock::new(cid, l.clone(), &path, Arc::default()).is_err());
    }
}

#[test]
fn test_vsock_guest_initiated_data_flows_both_ways_and_half_closes() {
    let (mut h, mut host) = guest_initiated();

    h.send(guest_hdr(1000, 5000, op::RW, 5), b"hello");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    host.write_all(b"world!").unwrap();
    let (data, payload) = h.recv();
    host.shutdown(Shutdown::Write).unwrap();
    let (shut, _) = h.recv();
    h.send(
        Header {
            flags: shutdown::RCV | shutdown::SEND,
            ..guest_hdr(1000, 5000, op::SHUTDOWN, 0)
        },
        &[],
    );
    let (rst, _) = h.recv();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();

    assert_eq!(&buf, b"hello");
    assert_eq!((data.op, payload.as_slice()), (op::RW, &b"world!"[..]));
    assert_eq!(data.buf_alloc, BUF_ALLOC);
    assert_eq!(data.fwd_cnt, 5);
    assert_eq!((shut.op, shut.flags), (op::SHUTDOWN, shutdown::SEND));
    assert_eq!(rst.op, op::RST);
    assert!(rest.is_empty());
    assert_eq!(h.metrics().active_connections, 0);
    assert_eq!(h.metrics().guest_connections, 1);
}

#[test]
fn test_vsock_guest_connect_nobody_listening_gets_rst() {
    let mut h = Harness::new();
    h.give_rx(4);

    h.send(guest_hdr(1000, 6000, op::REQUEST, 0), &[]);
    let (rst, _) = h.recv();

    assert_eq!(rst.op, op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (6000, 1000));
    assert_eq!(h.metrics().guest_connect_refused, 1);
}

fn host_connect(h: &mut Harness, port: u32) -> (UnixStream, Header) {
    let mut s = host_stream(UnixStream::connect(h.vm_socket()).unwrap());
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let (req, _) = h.recv();
    (s, req)
}

#[test]
fn test_vsock_host_initiated_gets_ok_with_assigned_port_and_echo() {
    let mut h = Harness::new();
    h.give_rx(16);

    let (mut s, req) = host_connect(&mut h, 1234);
    s.write_all(b"early").unwrap();
    let mut resp = guest_hdr(1234, req.src_port, op::RESPONSE, 0);
    resp.dst_port = req.src_port;
    h.send(resp, &[]);
    let ok = read_line(&mut s);
    let (data, payload) = h.recv();
    h.send(guest_hdr(1234, req.src_port, op::RW, 3), b"abc");
    let mut back = [0u8; 3];
    s.read_exact(&mut back).unwrap();

    assert_eq!(req.op, op::REQUEST);
    assert_eq!(req.dst_port, 1234);
    assert!(req.src_port >= 1 << 30);
    assert_eq!(ok, format!("OK {}\n", req.src_port));
    assert_eq!((data.op, payload.as_slice()), (op::RW, &b"early"[..]));
    assert_eq!(&back, b"abc");
    assert_eq!(h.dev.vsock_state().connections.len(), 1);
    assert_eq!(h.metrics().host_connections, 1);
}

#[test]
fn test_vsock_host_initiated_refused_closes_without_ok() {
    let mut h = Harness::new();
    h.give_rx(4);

    let (mut s, req) = host_connect(&mut h, 77);
    h.send(guest_hdr(77, req.src_port, op::RST, 0), &[]);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();

    assert!(rest.is_empty());
    h.settle();
    assert_eq!(h.metrics().active_connections, 0);
}

#[test]
fn test_vsock_host_garbage_connect_line_closes_socket() {
    let mut h = Harness::new();
    h.give_rx(4);

    let mut s = host_stream(UnixStream::connect(h.vm_socket()).unwrap());
    s.write_all(b"HELLO THERE\n").unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let mut long = host_stream(UnixStream::connect(h.vm_socket()).unwrap());
    long.write_all(&[b'x'; 40]).unwrap();
    // Closed with unread bytes: the client sees a reset rather than a clean EOF.
    let _ = long.read_to_end(&mut rest);

    assert!(rest.is_empty());
    assert_eq!(h.try_recv(), None);
    assert_eq!(h.metrics().host_connect_errors, 2);
}

#[test]
fn test_vsock_hostile_headers_dropped_or_reset() {
    let mut h = Harness::new();
    h.give_rx(16);
    let wrong_src = Header {
        src_cid: 9,
        ..guest_hdr(1, 2, op::REQUEST, 0)
    };
    let wrong_dst = Header {
        dst_cid: 7,
        ..guest_hdr(1, 2, op::REQUEST, 0)
    };

    h.send(wrong_src, &[]);
    h.send(wrong_dst, &[]);
    h.send_raw(&[(TX_BUF, 20, false)]); // short header
    h.send_raw(&[(MEM_SIZE as u64 * 2, 44, false)]); // header outside guest RAM
    let silent = h.try_recv();
    h.send(
        Header {
            type_: 2,
            ..guest_hdr(1, 2, op::REQUEST, 0)
        },
        &[],
    );
    let (bad_type, _) = h.recv();
    h.send(guest_hdr(1, 3, 42, 0), &[]);
    let (bad_op, _) = h.recv();
    let mut lying = guest_hdr(1, 4, op::RW, 4000);
    lying.len = 4000; // only 10 payload bytes follow
    h.send(lying, &[0u8; 10]);
    let (bad_len, _) = h.recv();
    h.send(guest_hdr(1, 5, op::RW, 3), b"abc"); // no such connection
    let (unknown, _) = h.recv();
    h.send(guest_hdr(1, 6, op::RST, 0), &[]); // RST for nothing: ignored

    assert_eq!(silent, None);
    for (rst, port) in [(bad_type, 2), (bad_op, 3), (bad_len, 4), (unknown, 5)] {
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (op::RST, port, 1));
    }
    assert_eq!(h.try_recv(), None);
    let m = h.metrics();
    assert_eq!(m.tx_dropped, 4);
    assert_eq!(m.tx_rejected, 4);
    assert!(!h.needs_reset.load(Ordering::Acquire));
}

#[test]
fn test_vsock_protocol_error_on_connection_resets_it() {
    let (mut h, mut host) = guest_initiated();

    h.send(guest_hdr(1000, 5000, op::REQUEST, 0), &[]); // REQUEST on an open connection
    let (rst, _) = h.recv();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();

    assert_eq!(rst.op, op::RST);
    assert!(rest.is_empty());
    assert_eq!(h.metrics().active_connections, 0);
}

#[test]
fn test_vsock_bad_rx_buffers_returned_empty_and_packet_kept() {
    let mut h = Harness::new();
    h.rings[0].add(&h.mem, &[(RX_BUF, 10, true)]); // smaller than a header
    h.rings[0].add(&h.mem, &[(MEM_SIZE as u64 * 4, 4096, true)]); // outside RAM
    h.bells[0].write(1).unwrap();

    h.send(guest_hdr(1000, 6000, op::REQUEST, 0), &[]);
    h.settle();
    let first = h.rings[0].pop_used(&h.mem);
    let second = h.rings[0].pop_used(&h.mem);
    h.give_rx(1);
    let (rst, _) = h.recv();

    assert_eq!(first, Some((0, 0)));
    assert_eq!(second, Some((1, 0)));
    assert_eq!(h.metrics().rx_bad_buffers, 2);
    assert_eq!(rst.op, op::RST);
}

#[test]
fn test_vsock_no_rx_buffers_host_data_waits_then_arrives() {
    let mut h = Harness::new();
    let l = h.host_listen(5002);
    h.give_rx(2);
    h.send(guest_hdr(1000, 5002, op::REQUEST, 0), &[]);
    let (resp, _) = h.recv();
    let (mut host, _) = l.accept().unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();

    host.write_all(&data).unwrap();
    let (first, mut got) = h.recv();
    let stalled = h.try_recv();
    h.give_rx(8);
    while got.len() < data.len() {
        let (hdr, p) = h.recv();
        assert_eq!(hdr.op, op::RW);
        got.extend_from_slice(&p);
    }

    assert_eq!(resp.op, op::RESPONSE);
    assert_eq!(first.op, op::RW);
    assert_eq!(stalled, None);
    assert_eq!(got, data);
    assert!(!h.needs_reset.load(Ordering::Acquire));
}

#[test]
fn test_vsock_guest_credit_limits_host_to_guest_data() {
    let mut h = Harness::new();
    let l = h.host_listen(5001);
    h.give_rx(64);
    let mut req = guest_hdr(1000, 5001, op::REQUEST, 0);
    req.buf_alloc = 1000; // the guest can take 1000 bytes until it forwards some
    h.send(req, &[]);
    let _ = h.recv();
    let (mut host, _) = l.accept().unwrap();

    host.write_all(&[1u8; 5000]).unwrap();
    let (d, p) = h.recv();
    let (credit_req, _) = h.recv();
    h.settle();
    let quiet = h.try_recv();
    let mut upd = guest_hdr(1000, 5001, op::CREDIT_UPDATE, 0);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 1000;
    h.send(upd, &[]);
    let (d2, p2) = h.recv();

    assert_eq!((d.op, p.len()), (op::RW, 1000));
    assert_eq!(credit_req.op, op::CREDIT_REQUEST);
    assert_eq!(quiet, None);
    assert_eq!((d2.op, p2.len()), (op::RW, 1000));
}

#[test]
fn test_vsock_credit_request_answered_with_update() {
    let (mut h, _host) = guest_initiated();

    h.send(guest_hdr(1000, 5000, op::CREDIT_REQUEST, 0), &[]);
    let (upd, _) = h.recv();

    assert_eq!(upd.op, op::CREDIT_UPDATE);
    assert_eq!(upd.buf_alloc, BUF_ALLOC);
}

#[test]
fn test_vsock_guest_ignoring_credit_is_reset() {
    let (mut h, _host_not_reading) = guest_initiated();
    let chunk = vec![7u8; 60 * 1024];

    // The host socket's own buffer takes some; then our BUF_ALLOC; then the guest cheats.
    let mut got_rst = false;
    for _ in 0..64 {
        h.send(guest_hdr(1000, 5000, op::RW, chunk.len() as u32), &chunk);
        if let Some(hdr) = h.try_recv() {
            if hdr.op == op::RST {
                got_rst = true;
                break;
            }
        }
    }

    assert!(got_rst);
    assert_eq!(h.metrics().credit_violations, 1);
    assert_eq!(h.metrics().active_connections, 0);
}

#[test]
fn test_vsock_transport_reset_event_drops_connections() {
    let (mut h, mut host) = guest_initiated();
    h.rings[2].add(&h.mem, &[(EV_BUF, 4, true)]);
    h.mem
        .write_obj(0xffff_ffffu32, GuestAddress(EV_BUF))
        .unwrap();
    h.bells[2].write(1).unwrap();

    h.dev.request_transport_reset();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    let mem = h.mem.clone();
    let mut ev = None;
    wait_until(|| {
        ev = h.rings[2].pop_used(&mem);
        ev.is_some()
    });

    assert!(rest.is_empty());
    assert_eq!(ev.unwrap().1, 4);
    assert_eq!(h.mem.read_obj::<u32>(GuestAddress(EV_BUF)).unwrap(), 0);
    assert_eq!(h.metrics().transport_resets, 1);
    assert!(h.dev.vsock_state().connections.is_empty());
}

#[test]
fn test_vsock_avail_index_far_ahead_breaks_queue_not_process() {
    let h = Harness::new();
    let avail = h.rings[1].avail;

    h.mem.write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
    h.bells[1].write(1).unwrap();
    wait_until(|| h.needs_reset.load(Ordering::Acquire));

    assert_eq!(h.metrics().broken_queues, 1);
    assert!(h.irq.0.lock().unwrap().contains(&InterruptKind::Config));
    // A host client is still accepted and closed without harm.
    let mut s = host_stream(UnixStream::connect(h.vm_socket()).unwrap());
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

#[test]
fn test_vsock_state_serialises() {
    let (h, _host) = guest_initiated();

    let st = h.dev.vsock_state();
    let json = serde_json::to_string(&st).unwrap();
    let back: VsockState = serde_json::from_str(&json).unwrap();

    assert_eq!(back, st);
    assert_eq!(st.connections[0].key.local_port, 5000);
    assert_eq!(st.connections[0].state, ConnState::Established);
}

#[test]
fn test_vsock_connect_line_in_pieces_still_reaches_guest() {
    let mut h = Harness::new();
    h.give_rx(4);
    let mut s = host_stream(UnixStream::connect(h.vm_socket()).unwrap());

    s.write_all(b"conn").unwrap();
    let early = h.try_recv();
    s.write_all(b"ect 7\npayload").unwrap();
    let (req, _) = h.recv();

    assert_eq!(early, None);
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 7));
}

#[test]
fn test_vsock_hundreds_of_host_connections_each_carry_their_data() {
    const N: usize = 300;
    let mut h = Harness::new();
    h.give_rx(128);
    let mut clients: Vec<UnixStream> = (0..N)
        .map(|i| {
            let mut s = host_stream(UnixStream::connect(h.vm_socket()).unwrap());
            s.write_all(format!("CONNECT {}\n", 10_000 + i).as_bytes())
                .unwrap();
            s
        })
        .collect();

    let mut host_port_of = std::collections::HashMap::new();
    while host_port_of.len() < N {
        let (req, _) = h.recv();
        h.give_rx(1);
        assert_eq!(req.op, op::REQUEST);
        host_port_of.insert(req.dst_port, req.src_port);
        h.send(guest_hdr(req.dst_port, req.src_port, op::RESPONSE, 0), &[]);
        h.wait_tx();
    }
    let oks: Vec<String> = clients.iter_mut().map(read_line).collect();
    for (i, s) in clients.iter_mut().enumerate() {
        s.write_all(format!("data-{i:04}").as_bytes()).unwrap();
    }
    let mut got: std::collections::HashMap<u32, Vec<u8>> = std::collections::HashMap::new();
    let mut bytes = 0;
    while bytes < N * 9 {
        let (hdr, p) = h.recv();
        h.give_rx(1);
        assert_eq!(hdr.op, op::RW);
        bytes += p.len();
        got.entry(hdr.dst_port).or_default().extend_from_slice(&p);
    }

    for (i, ok) in oks.iter().enumerate() {
        let guest_port = 10_000 + i as u32;
        assert_eq!(ok, &format!("OK {}\n", host_port_of[&guest_port]));
        assert_eq!(got[&guest_port], format!("data-{i:04}").into_bytes());
    }
    assert_eq!(h.metrics().active_connections, N as u64);
    assert_eq!(h.dev.vsock_state().connections.len(), N);
}
