//! Malformed descriptor chains fed to every device model through its public contract
//! (`VirtioDevice::activate` with virtio-queue's mock driver-side queues, doorbells as
//! eventfds): loops, next indices and heads out of range, indirect tables outside memory,
//! buffers beyond RAM or wrapping the address space, huge lengths, wrong directions, avail
//! indices running ahead, zero-length chains.
//!
//! For each case the device must not panic, must either mark itself broken
//! (DEVICE_NEEDS_RESET) or answer the chain (an error status or a short length), and its
//! worker must stay alive (it still pauses and resumes). Devices of other authors (net,
//! vsock, balloon) are added to [`targets`] as they land.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio::{
    ActivateContext, Block, Console, ConsoleBackend, ConsoleSize, InterruptKind, Rng, VirtioDevice,
    VirtioInterrupt, Vsock, VsockMetrics,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
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

/// One device model under attack, with the queues that take chains without host help.
struct Target {
    name: &'static str,
    device: Box<dyn VirtioDevice>,
    /// Queues the device pops as soon as they are notified.
    eager_queues: Vec<usize>,
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
        _keep: vec![Keep::File(file)],
    }
}

fn rng() -> Target {
    Target {
        name: "rng",
        device: Box::new(Rng::new()),
        eager_queues: vec![0],
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
        _keep: vec![Keep::Dir(dir)],
    }
}

/// Every device model in the crate.
fn targets() -> Vec<fn() -> Target> {
    vec![block, rng, console, vsock]
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
    ]
}

/// A running device with mock queues.
struct Rig<'m> {
    target: Target,
    vqs: Vec<MockSplitQueue<'m, GuestMemoryMmap>>,
    bells: Vec<EventFd>,
    needs_reset: Arc<AtomicBool>,
}

fn start<'m>(mem: &'m GuestMemoryMmap, mut target: Target) -> Rig<'m> {
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
        .map(|vq| Arc::new(Mutex::new(vq.create_queue::<Queue>().unwrap())))
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
            // Everything the device offers except EVENT_IDX (the mock has no event fields set).
            acked_features: features & !(1 << 29),
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
    }
    // Make sure the writes are visible before the doorbell.
    let _ = mem.read_obj::<u8>(GuestAddress(0));
    rig.bells[q].write(1).unwrap();
}

/// Waits (deadline only against hangs) until the device broke or answered on queue `q`.
fn outcome(rig: &Rig<'_>, q: usize) -> Option<(bool, u16)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let broken = rig.needs_reset.load(Ordering::Acquire);
        let used = rig.vqs[q].used().idx().load();
        if broken || used > 0 {
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

                attack(&rig, &mem, q, case.attack);
                let result = outcome(&rig, q);
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
        assert_eq!(outcome(&rig, q), Some((true, 0)), "{name}");

        // Reset, then activate again on fresh rings: the device must serve a normal chain.
        rig.target.device.reset();
        let device = std::mem::replace(&mut rig.target.device, Box::new(Rng::new()));
        let again = Target {
            name,
            device,
            eager_queues: vec![q],
            _keep: Vec::new(),
        };
        drop(rig.vqs);
        let rig = start(&mem, again);
        // A chain every device accepts: 16 readable header bytes, then 512 writable bytes
        // (a block read of sector 0; random bytes for rng; console data).
        mem.write_slice(&[0u8; 16], GuestAddress(BUF)).unwrap();
        attack(
            &rig,
            &mem,
            q,
            Attack::Chains(&[
                (BUF, 16, N, 1),
                (BUF + 0x1000, 512, N | W, 2),
                (BUF + 0x2000, 1, W, 0),
            ]),
        );
        let result = outcome(&rig, q);

        assert_eq!(result.map(|r| r.0), Some(false), "{name} broke again");
    }
}
