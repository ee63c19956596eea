//! The `hostile` command: behaves like a broken or malicious driver towards every virtio
//! function, then checks that each device either reported DEVICE_NEEDS_RESET, answered, or
//! ignored the garbage, and that it still works after a reset.
//!
//! Per function: transport-level garbage (doorbells before DRIVER_OK, for queues that do
//! not exist, for a queue that is not enabled, out-of-range queue_select writes), then for
//! each queue (up to [`MAX_QUEUES`]) a set of bad chains (loops, next and head indices out of
//! range, avail index jumps, buffers beyond RAM / in the MMIO hole / wrapping the address
//! space, huge lengths, zero lengths, wrong directions). Every attack starts from a device
//! reset. Rings and buffers live in scratch RAM at [`SCRATCH`] (above the guest image, as
//! `mem-fill` uses it), so a device that writes more than asked cannot corrupt this program.

use crate::pci::Pci;
use crate::println;
use crate::sys::{self, mmio, phys_ok};
use crate::virtio::{common, desc_flags, feat, status, Transport};

/// First byte of the scratch RAM (16 MiB; the guest needs at least 32 MiB of RAM).
const SCRATCH: u64 = 16 << 20;
/// Buffers the attacks point at.
const BUF: u64 = SCRATCH;
/// Rings: queue q uses RINGS + q * RING_STRIDE (desc, avail at +0x1000, used at +0x2000).
const RINGS: u64 = SCRATCH + (8 << 20);
const RING_STRIDE: u64 = 0x4000;
/// Queues attacked per device.
const MAX_QUEUES: u16 = 4;
/// Entries per attacked queue (or the device's maximum if smaller).
const QSIZE: u16 = 16;
/// How long to wait for a device to react (ms); a device that neither breaks nor answers
/// in that time "ignored" the chain (e.g. a receive queue with no host data).
const REACT_MS: u64 = 100;

/// An attacked queue, programmed through the common configuration registers directly (no
/// DMA-pool allocation, so the many resets cost no memory).
struct RawQueue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: Option<u64>,
    avail_idx: u16,
}

impl RawQueue {
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + (i % self.size) as u64 * 16;
        mmio::w64(d, addr);
        mmio::w32(d + 8, len);
        mmio::w16(d + 12, flags);
        mmio::w16(d + 14, next);
    }

    fn publish(&mut self, head: u16) {
        mmio::w16(
            self.avail + 4 + 2 * (self.avail_idx % self.size) as u64,
            head,
        );
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mmio::w16(self.avail + 2, self.avail_idx);
    }

    fn kick(&self) {
        if let Some(n) = self.notify {
            mmio::w16(n, self.index);
        }
    }

    fn used_idx(&self) -> u16 {
        mmio::r16(self.used + 2)
    }
}

/// Programs queue `index` (size, rings in scratch RAM) and enables it; None if the device
/// has no such queue.
fn setup_queue(t: &Transport, index: u16) -> Option<RawQueue> {
    let c = t.common_base();
    mmio::w16(c + common::Q_SELECT, index);
    let max = mmio::r16(c + common::Q_SIZE);
    if max == 0 || mmio::r16(c + common::Q_ENABLE) != 0 {
        return None;
    }
    let size = max.min(QSIZE);
    let size = 1u16 << (15 - size.leading_zeros().min(15));
    let base = RINGS + index as u64 * RING_STRIDE;
    for off in (0..RING_STRIDE).step_by(8) {
        mmio::w64(base + off, 0);
    }
    let q = RawQueue {
        index,
        size,
        desc: base,
        avail: base + 0x1000,
        used: base + 0x2000,
        notify: t.notify_addr(index),
        avail_idx: 0,
    };
    mmio::w16(c + common::Q_SELECT, index);
    mmio::w16(c + common::Q_SIZE, size);
    mmio::w16(c + common::Q_MSIX, crate::virtio::NO_VECTOR);
    mmio::w64(c + common::Q_DESC, q.desc);
    mmio::w64(c + common::Q_AVAIL, q.avail);
    mmio::w64(c + common::Q_USED, q.used);
    mmio::w16(c + common::Q_ENABLE, 1);
    Some(q)
}

/// What a device did with an attack.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reaction {
    /// DEVICE_NEEDS_RESET.
    Broken,
    /// A used entry appeared (an error status or a short length).
    Answered,
    /// Nothing within [`REACT_MS`].
    Ignored,
}

fn react(t: &Transport, q: Option<&RawQueue>, tsc_hz: u64) -> Reaction {
    let deadline = sys::rdtsc().wrapping_add(tsc_hz / 1000 * REACT_MS);
    loop {
        if t.needs_reset() {
            return Reaction::Broken;
        }
        if q.is_some_and(|q| q.used_idx() != 0) {
            return Reaction::Answered;
        }
        if (sys::rdtsc().wrapping_sub(deadline) as i64) > 0 {
            return Reaction::Ignored;
        }
        core::hint::spin_loop();
    }
}

/// The bad chains, applied to a freshly enabled queue.
const CHAIN_ATTACKS: &[&str] = &[
    "loop",
    "self-loop",
    "next-out-of-range",
    "head-out-of-range",
    "avail-jump",
    "beyond-ram",
    "mmio-hole",
    "wrapping",
    "huge-len",
    "zero-len",
    "wrong-direction",
];

fn chain_attack(q: &mut RawQueue, name: &str) {
    const N: u16 = desc_flags::NEXT;
    const W: u16 = desc_flags::WRITE;
    let far = 0x40_0000_0000u64; // 256 GiB: identity mapped, never RAM here
    match name {
        "loop" => {
            q.desc(0, BUF, 16, N, 1);
            q.desc(1, BUF + 64, 16, N | W, 0);
            q.publish(0);
        }
        "self-loop" => {
            q.desc(0, BUF, 16, N | W, 0);
            q.publish(0);
        }
        "next-out-of-range" => {
            q.desc(0, BUF, 16, N, q.size + 3);
            q.publish(0);
        }
        "head-out-of-range" => q.publish(q.size + 100),
        "avail-jump" => {
            q.avail_idx = 0x8000;
            mmio::w16(q.avail + 2, q.avail_idx);
        }
        "beyond-ram" => {
            q.desc(0, far, 16, N, 1);
            q.desc(1, far + 0x1000, 512, W, 0);
            q.publish(0);
        }
        "mmio-hole" => {
            q.desc(0, 0xe000_0000, 16, N, 1);
            q.desc(1, 0xfee0_0000, 64, W, 0);
            q.publish(0);
        }
        "wrapping" => {
            q.desc(0, u64::MAX - 8, 16, N, 1);
            q.desc(1, u64::MAX - 8, 512, W, 0);
            q.publish(0);
        }
        "huge-len" => {
            q.desc(0, BUF, 16, N, 1);
            q.desc(1, BUF + 0x1000, 0xffff_f000, W, 0);
            q.publish(0);
        }
        "zero-len" => {
            q.desc(0, BUF, 0, 0, 0);
            q.publish(0);
        }
        "wrong-direction" => {
            q.desc(0, BUF, 16, N | W, 1);
            q.desc(1, BUF + 64, 512, 0, 0);
            q.publish(0);
        }
        _ => {}
    }
}

#[derive(Default)]
struct Tally {
    attacks: u32,
    broken: u32,
    answered: u32,
    ignored: u32,
    reset_failed: u32,
}

impl Tally {
    fn add(&mut self, r: Reaction) {
        self.attacks += 1;
        match r {
            Reaction::Broken => self.broken += 1,
            Reaction::Answered => self.answered += 1,
            Reaction::Ignored => self.ignored += 1,
        }
    }
}

/// Reset and check the device reads back status 0.
fn reset_ok(t: &Transport) -> bool {
    t.reset();
    t.status() == 0
}

/// Re-probe and negotiate; None if the device no longer gets that far.
fn fresh(cfg: &crate::pci::Cfg, f: &crate::pci::Func) -> Option<Transport> {
    let mut t = Transport::probe(cfg, f).ok()?;
    t.negotiate(feat::VERSION_1).ok()?;
    Some(t)
}

fn attack_device(pci: &Pci, f: &crate::pci::Func, tsc_hz: u64) {
    let cfg = pci.cfg(f);
    let mut tally = Tally::default();
    let Some(t) = fresh(&cfg, f) else {
        println!(
            "hostile {:02x}:{:02x}.{} {:04x}:{:04x} init-failed",
            f.bus, f.dev, f.func, f.vendor, f.device
        );
        return;
    };
    let nq = t.num_queues();
    let attacked = nq.min(MAX_QUEUES);

    // 1. Doorbells before DRIVER_OK (with a loop chain waiting), then DRIVER_OK.
    if let Some(t) = fresh(&cfg, f) {
        if let Some(mut q) = setup_queue(&t, 0) {
            chain_attack(&mut q, "loop");
            q.kick();
            q.kick();
            t.driver_ok();
            tally.add(react(&t, Some(&q), tsc_hz));
        }
        tally.reset_failed += u32::from(!reset_ok(&t));
    }
    // 2. Doorbells for queues that do not exist and garbage values, queue_select out of
    //    range with writes to its registers, a doorbell for a queue left disabled.
    if let Some(t) = fresh(&cfg, f) {
        let c = t.common_base();
        mmio::w16(c + common::Q_SELECT, 0xffff);
        mmio::w16(c + common::Q_SIZE, 0xffff);
        mmio::w64(c + common::Q_DESC, u64::MAX);
        mmio::w16(c + common::Q_ENABLE, 1);
        let q0 = setup_queue(&t, 0);
        t.driver_ok();
        let (base, mult) = t.notify_base();
        for bogus in [nq, nq + 5, 0x7fff, 0xffff] {
            let addr = base.saturating_add(bogus as u64 * mult as u64);
            if phys_ok(addr, 2) && addr < base + 0x1000 {
                mmio::w16(addr, bogus);
            }
            mmio::w16(base, bogus);
        }
        if nq > 1 {
            if let Some(a) = t.notify_addr(1) {
                mmio::w16(a, 1);
            }
        }
        tally.add(react(&t, q0.as_ref(), tsc_hz));
        tally.reset_failed += u32::from(!reset_ok(&t));
    }
    // 3. Bad chains on every attacked queue (all queues enabled, the others left idle).
    for qi in 0..attacked {
        for name in CHAIN_ATTACKS {
            let Some(t) = fresh(&cfg, f) else {
                tally.reset_failed += 1;
                continue;
            };
            let mut queues: [Option<RawQueue>; MAX_QUEUES as usize] = [None, None, None, None];
            for (i, slot) in queues.iter_mut().enumerate().take(attacked as usize) {
                *slot = setup_queue(&t, i as u16);
            }
            t.driver_ok();
            if let Some(q) = queues[qi as usize].as_mut() {
                chain_attack(q, name);
                q.kick();
                tally.add(react(&t, Some(q), tsc_hz));
            }
            tally.reset_failed += u32::from(!reset_ok(&t));
        }
    }
    // 4. After all that, a clean bring-up must work.
    let recovered = match fresh(&cfg, f) {
        Some(t) => {
            let all = (0..attacked).all(|i| setup_queue(&t, i).is_some());
            t.driver_ok();
            let s = t.status();
            let ok = all
                && s & status::DRIVER_OK != 0
                && s & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0;
            tally.reset_failed += u32::from(!reset_ok(&t));
            ok
        }
        None => false,
    };
    println!(
        "hostile {:02x}:{:02x}.{} {:04x}:{:04x} queues={} attacks={} broken={} answered={} ignored={} reset_failed={} recovered={}",
        f.bus,
        f.dev,
        f.func,
        f.vendor,
        f.device,
        nq,
        tally.attacks,
        tally.broken,
        tally.answered,
        tally.ignored,
        tally.reset_failed,
        u8::from(recovered)
    );
    SUMMARY.with(|s| {
        s.devices += 1;
        s.attacks += tally.attacks;
        s.reset_failed += tally.reset_failed;
        s.unrecovered += u32::from(!recovered);
    });
}

#[derive(Default)]
struct Summary {
    devices: u32,
    attacks: u32,
    reset_failed: u32,
    unrecovered: u32,
}

/// Single-threaded accumulator (the guest's CPL3 code has one thread).
struct Cell(core::cell::UnsafeCell<Summary>);
// SAFETY: only touched from the single CPL3 thread.
unsafe impl Sync for Cell {}
impl Cell {
    fn with(&self, f: impl FnOnce(&mut Summary)) {
        // SAFETY: single-threaded; no reference escapes `f`.
        f(unsafe { &mut *self.0.get() })
    }
}
static SUMMARY: Cell = Cell(core::cell::UnsafeCell::new(Summary {
    devices: 0,
    attacks: 0,
    reset_failed: 0,
    unrecovered: 0,
}));

/// `hostile`: attack every modern virtio function; one `hostile ...` line per device, then
/// `hostile: done` and `OK hostile devices=N attacks=A reset_failed=R unrecovered=U`.
/// Every device is left reset (status 0); drivers re-initialise on next use.
pub fn cmd(pci: &Pci, tsc_hz: u64, ram_top: u64) {
    if ram_top < RINGS + MAX_QUEUES as u64 * RING_STRIDE || !phys_ok(SCRATCH, 16 << 20) {
        println!("ERR hostile needs-32MiB-of-ram");
        return;
    }
    SUMMARY.with(|s| *s = Summary::default());
    for f in &pci.funcs[..pci.count] {
        if f.vendor == 0x1af4 && (0x1041..=0x107f).contains(&f.device) {
            attack_device(pci, f, tsc_hz);
        }
    }
    println!("hostile: done");
    SUMMARY.with(|s| {
        println!(
            "OK hostile devices={} attacks={} reset_failed={} unrecovered={}",
            s.devices, s.attacks, s.reset_failed, s.unrecovered
        )
    });
}
