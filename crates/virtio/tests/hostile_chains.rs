//! Malformed descriptor chains fed to every device model through its public contract
//! (`VirtioDevice::activate` with virtio-queue's mock driver-side queues, doorbells as
//! eventfds): loops, next indices and heads out of range, indirect tables outside memory,
//! buffers beyond RAM or wrapping the address space, huge lengths, wrong directions, avail
//! indices running ahead, zero-length chains, indirect tables that loop, nest, have odd
//! lengths or are longer than the queue.
//!
//! For each case the device must not panic, must either mark itself broken
//! (DEVICE_NEEDS_RESET), answer the chain (an error status or a short length) or count it
//! as dropped (virtio-net's receive queue keeps a buffer too small for any frame and drops
//! the frames instead), and its worker must stay alive (it still pauses and resumes).
//! virtio-net also gets cases of its own: malformed transmit frames must be dropped (never
//! reach the TAP) and answered, runt frames from the TAP must not disturb the receive
//! queue. Devices of other authors are added to [`targets`] as they land.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio::{
    ActivateContext, Balloon, BalloonOptions, BalloonShared, Block, Console, ConsoleBackend,
    ConsoleSize, InterruptKind, Net, NetBackend, NetMetrics, Rng, VirtioDevice, VirtioInterrupt,
    Vsock, VsockMetrics,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_device::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;
use vmm_sys_util::tempfile::TempFile;

const MEM_SIZE: u64 = 0x40_0000;
const QSIZE: u16 = 16;
/// Queue i's rings live at QUEUE_BASE + i * QUEUE_STRIDE.
const QUEUE_BASE: u64 = 0x1000;
const QUEUE_STRIDE: u64 = 0x4000;
const BUF: u64 = 0x20_0000;
/// Where indirect descriptor tables are written.
const TABLE: u64 = 0x30_0000;
/// A chain every device accepts: 16 readable header bytes, then 512 writable bytes (a block
/// read of sector 0; random bytes for rng; console data).
const GOOD_CHAIN: &[(u64, u32, u32, u16)] = &[
    (BUF, 16, N, 1),
    (BUF + 0x1000, 512, N | W, 2),
    (BUF + 0x2000, 1, W, 0),
];
/// A receive buffer for virtio-net: one writable buffer for header and frame.
const NET_RX_CHAIN: &[(u64, u32, u32, u16)] = &[(BUF + 0x1000, 2048, W, 0)];
/// virtio-net's `virtio_net_hdr_v1` length.
const VNET_HDR: usize = 12;

#[derive(Default)]
struct Irqs(Mutex<Vec<InterruptKind>>);
impl VirtioInterrupt for Irqs {
    fn trigger(&self, kind: InterruptKind) {
        self.0.lock().unwrap().push(kind);
    }
}

/// Host resources a target keeps alive while its device runs.
#[allow(dead_code)]
enum Keep {
    Dir(TempDir),
    File(TempFile),
    Socket(TempDir, UnixStream),
}

/// A counter of chains the device declined without answering them (allowed for buffers
/// the device keeps for later, e.g. virtio-net receive buffers too small for any frame).
type DropCounter = Arc<dyn Fn() -> u64 + Send + Sync>;

/// One device model under attack, with the queues that take chains without host help.
struct Target {
    name: &'static str,
    device: Box<dyn VirtioDevice>,
    /// Queues the device pops as soon as they are notified.
    eager_queues: Vec<usize>,
    /// A well-formed chain for the first eager queue (the recovery check).
    good_chain: &'static [(u64, u32, u32, u16)],
    /// Chains dropped without an answer, if the device may do that.
    dropped: Option<DropCounter>,
    _keep: Vec<Keep>,
}

fn block() -> Target {
    let file = TempFile::new().unwrap();
    file.as_file().set_len(64 * 512).unwrap();
    let disk = disk::RawDisk::open(file.as_path(), false).unwrap();
    Target {
        name: "block",
        device: Box::new(Block::new(disk, Some("hostile")).unwrap()),
        eager_queues: vec![0],
        good_chain: GOOD_CHAIN,
        dropped: None,
        _keep: vec![Keep::File(file)],
    }
}

fn rng() -> Target {
    Target {
        name: "rng",
        device: Box::new(Rng::new()),
        eager_queues: vec![0],
        good_chain: GOOD_CHAIN,
        dropped: None,
        _keep: Vec::new(),
    }
}

/// A console whose socket client has typed input, so the receive queue is eager too.
fn console() -> Target {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("c.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let backend = ConsoleBackend::socket(listener).unwrap();
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(&[b'x'; 512]).unwrap();
    Target {
        name: "console",
        device: Box::new(Console::new(backend, ConsoleSize::default())),
        eager_queues: vec![0, 1],
        good_chain: GOOD_CHAIN,
        dropped: None,
        _keep: vec![Keep::Socket(dir, client)],
    }
}

/// A vsock device; its transmit queue takes chains at once.
fn vsock() -> Target {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("v.sock");
    let listener = Arc::new(UnixListener::bind(&path).unwrap());
    let device = Vsock::new(3, listener, &path, Arc::new(VsockMetrics::default())).unwrap();
    Target {
        name: "vsock",
        device: Box::new(device),
        eager_queues: vec![1],
        good_chain: GOOD_CHAIN,
        dropped: None,
        _keep: vec![Keep::Dir(dir)],
    }
}

/// The host side of a NIC in memory: frames queued for the guest, frames it sent.
#[derive(Clone, Default)]
struct FakeTap {
    to_guest: Arc<Mutex<VecDeque<Vec<u8>>>>,
    from_guest: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FakeTap {
    /// A TAP holding `frames` ready for the guest, each a zeroed vnet header plus
    /// `payload` bytes.
    fn with_frames(frames: usize, payload: usize) -> Self {
        let tap = Self::default();
        for i in 0..frames {
            tap.push(vnet_frame(payload, i as u8));
        }
        tap
    }

    fn push(&self, frame: Vec<u8>) {
        self.to_guest.lock().unwrap().push_back(frame);
    }

    fn sent(&self) -> Vec<Vec<u8>> {
        self.from_guest.lock().unwrap().clone()
    }
}

impl NetBackend for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(f) = self.to_guest.lock().unwrap().pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.from_guest.lock().unwrap().push(buf.to_vec());
        Ok(buf.len())
    }
    fn fd(&self) -> Option<RawFd> {
        // No descriptor: the receive queue is served when the guest notifies it.
        None
    }
    fn set_offloads(&mut self, _acked: u64) -> io::Result<()> {
        Ok(())
    }
    fn try_clone_box(&self) -> io::Result<Box<dyn NetBackend>> {
        Ok(Box::new(self.clone()))
    }
}

/// A frame as the TAP hands it over: a zeroed vnet header, then `payload` bytes.
fn vnet_frame(payload: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR];
    f.extend((0..payload).map(|i| seed.wrapping_add(i as u8)));
    f
}

fn net_with(tap: FakeTap) -> (Target, Arc<NetMetrics>) {
    let device = Net::new(Box::new(tap), net::MacAddr([0x52, 0x54, 0, 0, 0, 9]));
    let metrics = device.metrics();
    let m = metrics.clone();
    let target = Target {
        name: "net",
        device: Box::new(device),
        // Receive (with frames waiting on the TAP) and transmit.
        eager_queues: vec![0, 1],
        good_chain: NET_RX_CHAIN,
        dropped: Some(Arc::new(move || m.rx_dropped.load(Ordering::Relaxed))),
        _keep: Vec::new(),
    };
    (target, metrics)
}

/// A NIC whose TAP has frames waiting, so both queues are eager.
fn net() -> Target {
    net_with(FakeTap::with_frames(8, 60)).0
}

/// A balloon with every feature. Inflate, deflate and reporting answer at once; the
/// statistics queue keeps its buffer, so it is attacked by its own test.
fn balloon() -> Target {
    let shared = BalloonShared::new(BalloonOptions::default()).unwrap();
    Target {
        name: "balloon",
        device: Box::new(Balloon::new(shared)),
        eager_queues: vec![0, 1, 3],
        good_chain: GOOD_CHAIN,
        dropped: None,
        _keep: Vec::new(),
    }
}

/// Every device model in the crate.
fn targets() -> Vec<fn() -> Target> {
    vec![block, rng, console, vsock, net, balloon]
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// How the driver misbehaves on the attacked queue.
#[derive(Clone, Copy, Debug)]
enum Attack {
    /// Chains to publish with `add_desc_chains`.
    Chains(&'static [(u64, u32, u32, u16)]),
    /// Avail ring entry 0 names this descriptor.
    Head(u16),
    /// The avail index is set this far ahead of the device.
    AvailAhead(u16),
    /// One descriptor naming an indirect table (written at [`TABLE`]) of these entries.
    Indirect(&'static [(u64, u32, u32, u16)]),
    /// One descriptor naming an indirect table of this many 16-byte writable buffers, each
    /// chained to the next (longer than the queue: virtio 1.2 §2.7.5.3.1 forbids it).
    LongIndirect(u16),
}

/// Whether the device must break the queue (true) or may also answer the chain (false).
struct Case {
    name: &'static str,
    attack: Attack,
    must_break: bool,
}

const W: u32 = VRING_DESC_F_WRITE;
const N: u32 = VRING_DESC_F_NEXT;
const I: u32 = VRING_DESC_F_INDIRECT;
const END: u64 = MEM_SIZE;

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "two-descriptor loop",
            attack: Attack::Chains(&[(BUF, 16, N, 1), (BUF, 16, N | W, 0)]),
            must_break: true,
        },
        Case {
            name: "self loop",
            attack: Attack::Chains(&[(BUF, 16, N | W, 0)]),
            must_break: true,
        },
        Case {
            name: "next index out of range",
            attack: Attack::Chains(&[(BUF, 16, N, QSIZE + 3)]),
            must_break: true,
        },
        Case {
            name: "head index out of range",
            attack: Attack::Head(200),
            must_break: true,
        },
        Case {
            name: "avail index runs ahead",
            attack: Attack::AvailAhead(QSIZE + 1),
            must_break: true,
        },
        Case {
            name: "avail index far ahead",
            attack: Attack::AvailAhead(0x8000),
            must_break: true,
        },
        Case {
            name: "indirect table outside memory",
            attack: Attack::Chains(&[(u64::MAX - 0xfff, 64, I, 0)]),
            must_break: true,
        },
        Case {
            name: "chain longer than 4 GiB",
            attack: Attack::Chains(&[(BUF, 0xffff_0000, N | W, 1), (BUF, 0xffff_0000, W, 0)]),
            must_break: true,
        },
        Case {
            name: "writable buffer beyond RAM",
            attack: Attack::Chains(&[(END + 0x1000, 512, W, 0)]),
            must_break: false,
        },
        Case {
            name: "buffer straddling the end of RAM",
            attack: Attack::Chains(&[(END - 8, 512, N, 1), (END - 8, 512, W, 0)]),
            must_break: false,
        },
        Case {
            name: "buffer wrapping the address space",
            attack: Attack::Chains(&[(u64::MAX - 16, 512, N, 1), (u64::MAX - 16, 512, W, 0)]),
            must_break: false,
        },
        Case {
            name: "buffer in the MMIO hole",
            attack: Attack::Chains(&[(0xe000_0000, 4096, N, 1), (0xfee0_0000, 64, W, 0)]),
            must_break: false,
        },
        Case {
            name: "huge writable length",
            attack: Attack::Chains(&[(BUF, 0xffff_fff0, W, 0)]),
            must_break: false,
        },
        Case {
            name: "only readable buffers",
            attack: Attack::Chains(&[(BUF, 64, N, 1), (BUF + 64, 64, 0, 0)]),
            must_break: false,
        },
        Case {
            name: "only writable buffers",
            attack: Attack::Chains(&[(BUF, 64, N | W, 1), (BUF + 64, 64, W, 0)]),
            must_break: false,
        },
        Case {
            name: "readable after writable",
            attack: Attack::Chains(&[(BUF, 16, N | W, 1), (BUF + 64, 16, 0, 0)]),
            must_break: false,
        },
        Case {
            name: "zero-length chain",
            attack: Attack::Chains(&[(BUF, 0, 0, 0)]),
            must_break: false,
        },
        Case {
            name: "zero-length writable chain",
            attack: Attack::Chains(&[(BUF, 0, W, 0)]),
            must_break: false,
        },
        Case {
            name: "indirect table that loops",
            attack: Attack::Indirect(&[(BUF, 16, N, 1), (BUF + 64, 16, N | W, 0)]),
            must_break: true,
        },
        Case {
            name: "indirect next index out of range",
            attack: Attack::Indirect(&[(BUF, 16, N, 7)]),
            must_break: true,
        },
        Case {
            name: "indirect table inside an indirect table",
            attack: Attack::Indirect(&[(TABLE, 16, I, 0)]),
            must_break: true,
        },
        Case {
            name: "indirect table length not a multiple of 16",
            attack: Attack::Chains(&[(TABLE, 20, I, 0)]),
            must_break: true,
        },
        Case {
            name: "empty indirect table",
            attack: Attack::Chains(&[(TABLE, 0, I, 0)]),
            must_break: false,
        },
        Case {
            name: "indirect descriptor with NEXT set",
            attack: Attack::Chains(&[(TABLE, 32, I | N, 1), (BUF, 16, W, 0)]),
            must_break: false,
        },
        Case {
            name: "indirect chain longer than the queue",
            attack: Attack::LongIndirect(4 * QSIZE),
            must_break: false,
        },
    ]
}

/// A running device with mock queues.
struct Rig<'m> {
    target: Target,
    vqs: Vec<MockSplitQueue<'m, GuestMemoryMmap>>,
    bells: Vec<EventFd>,
    needs_reset: Arc<AtomicBool>,
}

fn start<'m>(mem: &'m GuestMemoryMmap, target: Target) -> Rig<'m> {
    start_with(mem, target, None)
}

/// Where one queue's ring is moved so that its EVENT_IDX field lies just past the end of
/// guest memory (the rest of the ring inside it).
#[derive(Clone, Copy, Debug)]
enum EdgeRing {
    /// The used ring ends at the end of memory: `avail_event` is outside.
    Used,
    /// The avail ring ends at the end of memory: `used_event` is outside.
    Avail,
}

/// Used ring size without `avail_event`.
const USED_RING_BYTES: u64 = 4 + 8 * QSIZE as u64;
/// Avail ring size without `used_event`.
const AVAIL_RING_BYTES: u64 = 4 + 2 * QSIZE as u64;

/// [`start`]; with `edge`, EVENT_IDX is negotiated and queue `.0`'s ring is moved to the
/// end of memory as `.1` says.
fn start_with<'m>(
    mem: &'m GuestMemoryMmap,
    mut target: Target,
    edge: Option<(usize, EdgeRing)>,
) -> Rig<'m> {
    let nq = target.device.queue_max_sizes().len();
    let vqs: Vec<_> = (0..nq)
        .map(|i| {
            MockSplitQueue::create(
                mem,
                GuestAddress(QUEUE_BASE + i as u64 * QUEUE_STRIDE),
                QSIZE,
            )
        })
        .collect();
    let queues = vqs
        .iter()
        .enumerate()
        .map(|(i, vq)| {
            let mut q = vq.create_queue::<Queue>().unwrap();
            match edge {
                Some((e, EdgeRing::Used)) if e == i => {
                    let a = END - USED_RING_BYTES;
                    q.set_used_ring_address(Some(a as u32), Some((a >> 32) as u32));
                }
                Some((e, EdgeRing::Avail)) if e == i => {
                    let a = END - AVAIL_RING_BYTES;
                    q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
                }
                _ => {}
            }
            Arc::new(Mutex::new(q))
        })
        .collect();
    let bells: Vec<EventFd> = (0..nq)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let needs_reset = Arc::new(AtomicBool::new(false));
    let features = target.device.features();
    target
        .device
        .activate(ActivateContext {
            mem: mem.clone(),
            queues,
            queue_events: bells.iter().map(|b| b.try_clone().unwrap()).collect(),
            interrupt: Arc::new(Irqs::default()),
            // Everything the device offers except EVENT_IDX (the mock has no event fields
            // set), unless the edge cases want it.
            acked_features: if edge.is_some() {
                features
            } else {
                features & !(1 << 29)
            },
            needs_reset: needs_reset.clone(),
        })
        .unwrap();
    Rig {
        target,
        vqs,
        bells,
        needs_reset,
    }
}

fn attack(rig: &Rig<'_>, mem: &GuestMemoryMmap, q: usize, a: Attack) {
    let vq = &rig.vqs[q];
    match a {
        Attack::Chains(list) => {
            let descs: Vec<RawDescriptor> = list
                .iter()
                .map(|&(addr, len, flags, next)| desc(addr, len, flags, next))
                .collect();
            vq.add_desc_chains(&descs, 0).unwrap();
        }
        Attack::Head(head) => {
            vq.avail().ring().ref_at(0).unwrap().store(head);
            vq.avail().idx().store(1);
        }
        Attack::AvailAhead(n) => vq.avail().idx().store(n),
        Attack::Indirect(table) => {
            for (i, &(addr, len, flags, next)) in table.iter().enumerate() {
                let d = desc(addr, len, flags, next);
                mem.write_obj(d, GuestAddress(TABLE + 16 * i as u64))
                    .unwrap();
            }
            let head = desc(TABLE, 16 * table.len() as u32, I, 0);
            vq.add_desc_chains(&[head], 0).unwrap();
        }
        Attack::LongIndirect(n) => {
            for i in 0..n {
                let (flags, next) = if i + 1 < n { (N | W, i + 1) } else { (W, 0) };
                let d = desc(BUF + 0x1000 + 16 * u64::from(i), 16, flags, next);
                mem.write_obj(d, GuestAddress(TABLE + 16 * u64::from(i)))
                    .unwrap();
            }
            let head = desc(TABLE, 16 * u32::from(n), I, 0);
            vq.add_desc_chains(&[head], 0).unwrap();
        }
    }
    // Make sure the writes are visible before the doorbell.
    let _ = mem.read_obj::<u8>(GuestAddress(0));
    rig.bells[q].write(1).unwrap();
}

/// Chains the rig's device dropped so far (0 for devices that never drop).
fn dropped(rig: &Rig<'_>) -> u64 {
    rig.target.dropped.as_ref().map_or(0, |f| f())
}

/// Waits (deadline only against hangs) until the device broke, answered on queue `q` or
/// dropped a chain since `dropped_before`: (broken, used index).
fn outcome(rig: &Rig<'_>, q: usize, dropped_before: u64) -> Option<(bool, u16)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let broken = rig.needs_reset.load(Ordering::Acquire);
        let used = rig.vqs[q].used().idx().load();
        if broken || used > 0 || dropped(rig) > dropped_before {
            return Some((broken, used));
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn test_hostile_chains_every_device_survives_every_case() {
    let mut failures = Vec::new();
    for make in targets() {
        let probe = make();
        let queues = probe.eager_queues.clone();
        let name = probe.name;
        drop(probe);
        for &q in &queues {
            for case in cases() {
                let mem =
                    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
                let mut rig = start(&mem, make());
                let before = dropped(&rig);

                attack(&rig, &mem, q, case.attack);
                let result = outcome(&rig, q, before);
                // The worker must still be there: a second doorbell, then pause/resume.
                rig.bells[q].write(1).unwrap();
                let alive = rig.target.device.pause().is_ok();
                let resumed = rig.target.device.resume().is_ok();
                rig.target.device.reset();

                let what = format!("{name} queue {q}: {}", case.name);
                match result {
                    None => failures.push(format!("{what}: neither broken nor answered")),
                    Some((false, _)) if case.must_break => {
                        failures.push(format!("{what}: answered instead of breaking the queue"))
                    }
                    Some(_) => {}
                }
                if !(alive && resumed) {
                    failures.push(format!("{what}: worker died"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn test_hostile_chains_broken_device_recovers_after_reset() {
    for make in targets() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let target = make();
        let q = target.eager_queues[0];
        let name = target.name;
        let mut rig = start(&mem, target);
        attack(&rig, &mem, q, Attack::AvailAhead(QSIZE + 1));
        assert_eq!(outcome(&rig, q, dropped(&rig)), Some((true, 0)), "{name}");

        // Reset, then activate again on fresh rings: the device must serve a normal chain.
        rig.target.device.reset();
        let device = std::mem::replace(&mut rig.target.device, Box::new(Rng::new()));
        let good = rig.target.good_chain;
        let again = Target {
            name,
            device,
            eager_queues: vec![q],
            good_chain: good,
            dropped: None,
            _keep: Vec::new(),
        };
        drop(rig.vqs);
        let rig = start(&mem, again);
        mem.write_slice(&[0u8; 16], GuestAddress(BUF)).unwrap();
        attack(&rig, &mem, q, Attack::Chains(good));
        let result = outcome(&rig, q, 0);

        assert_eq!(result.map(|r| r.0), Some(false), "{name} broke again");
    }
}

#[test]
fn test_hostile_chains_balloon_stats_queue_breaks_on_malformed_chains() {
    for case in cases().into_iter().filter(|c| c.must_break) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let mut rig = start(&mem, balloon());

        attack(&rig, &mem, 2, case.attack);
        let result = outcome(&rig, 2, 0);
        let alive = rig.target.device.pause().is_ok() && rig.target.device.resume().is_ok();
        rig.target.device.reset();

        assert_eq!(
            result,
            Some((true, 0)),
            "balloon stats queue: {}",
            case.name
        );
        assert!(alive, "balloon stats queue: {}: worker died", case.name);
    }
}

/// A transmit chain virtio-net must drop (never hand to the TAP) and still answer.
struct TxCase {
    name: &'static str,
    chain: &'static [(u64, u32, u32, u16)],
    /// The vnet header the driver wrote at [`BUF`].
    header: [u8; VNET_HDR],
}

fn tx_cases() -> Vec<TxCase> {
    const ZERO: [u8; VNET_HDR] = [0; VNET_HDR];
    vec![
        TxCase {
            name: "frame shorter than the vnet header",
            chain: &[(BUF, 8, 0, 0)],
            header: ZERO,
        },
        TxCase {
            name: "frame longer than a 64 KiB GSO frame",
            chain: &[(BUF, 40_000, N, 1), (BUF, 40_000, 0, 0)],
            header: ZERO,
        },
        TxCase {
            name: "device-writable buffer only",
            chain: &[(BUF, 64, W, 0)],
            header: ZERO,
        },
        TxCase {
            name: "writable buffer after the frame",
            chain: &[(BUF, 64, N, 1), (BUF + 0x1000, 64, W, 0)],
            header: ZERO,
        },
        TxCase {
            name: "frame outside guest memory",
            chain: &[(END + 0x1000, 64, 0, 0)],
            header: ZERO,
        },
        TxCase {
            name: "frame straddling the end of memory",
            chain: &[(END - 16, 64, 0, 0)],
            header: ZERO,
        },
        TxCase {
            name: "segmentation type never offered (UDP fragmentation)",
            chain: &[(BUF, 64, 0, 0)],
            header: [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        },
        TxCase {
            name: "unknown segmentation type",
            chain: &[(BUF, 64, 0, 0)],
            header: [0, 0x7f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        },
    ]
}

#[test]
fn test_hostile_net_malformed_tx_frames_are_dropped_and_answered() {
    let mut failures = Vec::new();
    for case in tx_cases() {
        // Arrange
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let tap = FakeTap::default();
        let (target, metrics) = net_with(tap.clone());
        let mut rig = start(&mem, target);
        mem.write_slice(&case.header, GuestAddress(BUF)).unwrap();

        // Act: the bad chain, then a good 60-byte frame behind it.
        attack(&rig, &mem, 1, Attack::Chains(case.chain));
        let bad = outcome(&rig, 1, 0);
        mem.write_slice(&[0u8; VNET_HDR], GuestAddress(BUF + 0x8000))
            .unwrap();
        attack(
            &rig,
            &mem,
            1,
            Attack::Chains(&[(BUF + 0x8000, (VNET_HDR + 60) as u32, 0, 0)]),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while tap.sent().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let alive = rig.target.device.pause().is_ok() && rig.target.device.resume().is_ok();
        rig.target.device.reset();

        // Assert
        let sent = tap.sent();
        let what = case.name;
        if bad != Some((false, 1)) {
            failures.push(format!("{what}: expected a used entry, got {bad:?}"));
        }
        if metrics.tx_dropped.load(Ordering::Relaxed) != 1 {
            failures.push(format!("{what}: tx_dropped is not 1"));
        }
        if sent.len() != 1 || sent[0].len() != VNET_HDR + 60 {
            failures.push(format!(
                "{what}: the TAP got {:?} instead of only the good frame",
                sent.iter().map(Vec::len).collect::<Vec<_>>()
            ));
        }
        if !alive {
            failures.push(format!("{what}: worker died"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn test_hostile_net_runt_frames_from_tap_are_counted_and_skipped() {
    // Arrange: a TAP frame shorter than the vnet header, an empty one, then a good frame.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let tap = FakeTap::default();
    tap.push(vec![0xaa; 5]);
    tap.push(Vec::new());
    tap.push(vnet_frame(60, 7));
    let (target, metrics) = net_with(tap.clone());
    let mut rig = start(&mem, target);

    // Act
    attack(&rig, &mem, 0, Attack::Chains(NET_RX_CHAIN));
    let result = outcome(&rig, 0, 0);
    rig.target.device.reset();

    // Assert
    assert_eq!(result, Some((false, 1)));
    let len = rig.vqs[0].used().ring().ref_at(0).unwrap().load().len();
    assert_eq!(len as usize, VNET_HDR + 60);
    assert_eq!(metrics.rx_errors.load(Ordering::Relaxed), 2);
    assert_eq!(metrics.rx_packets.load(Ordering::Relaxed), 1);
}

#[test]
fn test_hostile_net_rx_buffer_shorter_than_vnet_header_drops_frames_only() {
    // Arrange
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let tap = FakeTap::with_frames(3, 60);
    let (target, metrics) = net_with(tap.clone());
    let mut rig = start(&mem, target);

    // Act: a 10-byte buffer cannot even hold the header.
    attack(&rig, &mem, 0, Attack::Chains(&[(BUF, 10, W, 0)]));
    let result = outcome(&rig, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tap.to_guest.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let alive = rig.target.device.pause().is_ok() && rig.target.device.resume().is_ok();
    rig.target.device.reset();

    // Assert: nothing was written into the guest, the device is not broken, frames dropped.
    assert_eq!(result, Some((false, 0)));
    assert_eq!(rig.vqs[0].used().idx().load(), 0);
    assert_eq!(metrics.rx_dropped.load(Ordering::Relaxed), 3);
    assert!(alive, "worker died");
}

#[test]
fn test_hostile_chains_event_idx_fields_beyond_memory_do_not_panic() {
    let mut failures = Vec::new();
    for make in targets() {
        let probe = make();
        let queues = probe.eager_queues.clone();
        let (name, good) = (probe.name, probe.good_chain);
        drop(probe);
        for &q in &queues {
            for edge in [EdgeRing::Used, EdgeRing::Avail] {
                // Arrange: rings whose EVENT_IDX field is the first byte past RAM.
                let mem =
                    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
                let mut rig = start_with(&mem, make(), Some((q, edge)));
                let before = dropped(&rig);
                // The receive chain for net's queue 0, a plain request elsewhere; the
                // transmit-side queues take the readable part.
                let chain = if q == 0 { good } else { &[(BUF, 64, 0, 0)][..] };
                mem.write_slice(&[0u8; 64], GuestAddress(BUF)).unwrap();

                // Act
                let used_idx_addr = match edge {
                    EdgeRing::Used => {
                        attack(&rig, &mem, q, Attack::Chains(chain));
                        GuestAddress(END - USED_RING_BYTES + 2)
                    }
                    EdgeRing::Avail => {
                        // The mock writes its own avail ring: publish by hand at the edge.
                        let descs: Vec<RawDescriptor> =
                            chain.iter().map(|&(a, l, f, n)| desc(a, l, f, n)).collect();
                        for (i, d) in descs.iter().enumerate() {
                            rig.vqs[q].desc_table().store(i as u16, *d).unwrap();
                        }
                        let avail = END - AVAIL_RING_BYTES;
                        mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
                        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
                        rig.bells[q].write(1).unwrap();
                        GuestAddress(rig.vqs[q].used_addr().0 + 2)
                    }
                };
                let deadline = Instant::now() + Duration::from_secs(20);
                let reacted = loop {
                    let used: u16 = mem.read_obj(used_idx_addr).unwrap();
                    if rig.needs_reset.load(Ordering::Acquire) || used > 0 || dropped(&rig) > before
                    {
                        break true;
                    }
                    if Instant::now() > deadline {
                        break false;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                };
                rig.bells[q].write(1).unwrap();
                let alive = rig.target.device.pause().is_ok() && rig.target.device.resume().is_ok();
                rig.target.device.reset();

                // Assert
                let what = format!("{name} queue {q}, {edge:?} ring at the end of memory");
                if !reacted {
                    failures.push(format!("{what}: no reaction"));
                }
                if !alive {
                    failures.push(format!("{what}: worker died"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
