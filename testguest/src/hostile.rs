//! The `hostile` command: behaves like a broken or malicious driver towards every virtio
//! function, then checks that each device either reported DEVICE_NEEDS_RESET, answered, or
//! ignored the garbage, and that it still works after a reset.
//!
//! Per function: transport-level garbage (doorbells before DRIVER_OK, for queues that do
//! not exist, for a queue that is not enabled, out-of-range queue_select writes), then for
//! each queue (up to [`MAX_QUEUES`]) a set of bad chains (loops, next and head indices out of
//! range, avail index jumps, buffers beyond RAM / in the MMIO hole / wrapping the address
//! space, huge lengths, zero lengths, wrong directions), then transport-level attacks (see
//! [`TRANSPORT_ATTACKS`]): queue sizes that are not a power of two, rings beyond RAM, in the
//! MMIO hole, in the device's own BAR, misaligned or at the end of RAM, device-status writes
//! out of order, queue registers rewritten after DRIVER_OK, odd-width register accesses,
//! garbage in the device configuration and in the MSI-X table (with interrupts then sent
//! through it), and doorbells of odd widths. Every attack starts from a device reset. Rings
//! and buffers live in scratch RAM at [`SCRATCH`] (above the guest image, as `mem-fill` uses
//! it), so a device that writes more than asked cannot corrupt this program; the buffers are
//! refilled before each attack with page numbers inside the scratch area, so a balloon that
//! takes them as pages to give back only ever discards scratch memory.
//!
//! Readbacks the virtio spec fixes are checked and counted as `anomalies`: an out-of-range
//! MSI-X vector must read back as NO_VECTOR, FEATURES_OK must not stick for features that
//! were not offered, DRIVER_OK must not stick without FEATURES_OK, num_queues is read-only.

use crate::pci::{BarKind, Cfg, Func, Pci};
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
/// Bytes at [`BUF`] refilled with scratch page numbers before each attack.
const BUF_FILL: u64 = 64 << 10;
/// First page number written into the buffers (17 MiB: inside the scratch area, clear of
/// the rings).
const FILL_PFN: u32 = (17 << 20) >> 12;
/// 256 GiB: identity mapped by the guest, never RAM here.
const FAR: u64 = 0x40_0000_0000;
/// MSI-X table entries saved and restored around the MSI-X attack.
const MAX_MSIX: usize = 64;

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
    /// False when the device was given another used ring than `used` (then only
    /// DEVICE_NEEDS_RESET tells a reaction).
    watch_used: bool,
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
        if self.watch_used {
            mmio::r16(self.used + 2)
        } else {
            0
        }
    }
}

/// What the device is told about one queue instead of the plain setup (the driver side
/// still writes its rings in scratch RAM).
#[derive(Clone, Copy, Default)]
struct Layout {
    size: Option<u16>,
    desc: Option<u64>,
    avail: Option<u64>,
    used: Option<u64>,
}

/// Programs queue `index` (size, rings in scratch RAM) and enables it; None if the device
/// has no such queue.
fn setup_queue(t: &Transport, index: u16) -> Option<RawQueue> {
    setup_queue_with(t, index, Layout::default())
}

/// [`setup_queue`] with the device told `lay` (the size it reads back is used).
fn setup_queue_with(t: &Transport, index: u16, lay: Layout) -> Option<RawQueue> {
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
    let mut q = RawQueue {
        index,
        size,
        desc: base,
        avail: base + 0x1000,
        used: base + 0x2000,
        notify: t.notify_addr(index),
        avail_idx: 0,
        watch_used: lay.used.is_none(),
    };
    mmio::w16(c + common::Q_SELECT, index);
    mmio::w16(c + common::Q_SIZE, lay.size.unwrap_or(size));
    // The ring layout follows the size the device took; our ring areas hold up to 256
    // entries, and all entries we write are below QSIZE.
    q.size = mmio::r16(c + common::Q_SIZE).clamp(1, 256);
    mmio::w16(c + common::Q_MSIX, crate::virtio::NO_VECTOR);
    mmio::w64(c + common::Q_DESC, lay.desc.unwrap_or(q.desc));
    mmio::w64(c + common::Q_AVAIL, lay.avail.unwrap_or(q.avail));
    mmio::w64(c + common::Q_USED, lay.used.unwrap_or(q.used));
    mmio::w16(c + common::Q_ENABLE, 1);
    Some(q)
}

/// Refill the attack buffers with page numbers inside the scratch area (see the module
/// documentation).
fn fill_buffers() {
    for i in 0..BUF_FILL / 4 {
        mmio::w32(BUF + i * 4, FILL_PFN + (i % 256) as u32);
    }
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
    "avail-backwards",
    "kick-storm",
];

fn chain_attack(q: &mut RawQueue, name: &str) {
    const N: u16 = desc_flags::NEXT;
    const W: u16 = desc_flags::WRITE;
    let far = FAR;
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
        "avail-backwards" => {
            q.desc(0, BUF, 16, N, 1);
            q.desc(1, BUF + 0x1000, 512, W, 0);
            q.publish(0);
        }
        "kick-storm" => {
            q.desc(0, BUF, 16, N, 1);
            q.desc(1, BUF + 64, 16, N | W, 0);
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
    /// Readbacks that break a rule of the virtio spec (see the module documentation).
    anomalies: u32,
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
    fresh_with(cfg, f, feat::VERSION_1)
}

/// [`fresh`], accepting the offered features in `wanted` (u64::MAX: all of them).
fn fresh_with(cfg: &crate::pci::Cfg, f: &crate::pci::Func, wanted: u64) -> Option<Transport> {
    let mut t = Transport::probe(cfg, f).ok()?;
    t.negotiate(wanted).ok()?;
    Some(t)
}

fn attack_device(pci: &Pci, f: &crate::pci::Func, tsc_hz: u64, ram_top: u64) {
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
            fill_buffers();
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
    // 3. Bad chains on every attacked queue (all queues enabled, the others left idle),
    //    once with only VERSION_1 and once with every offered feature (EVENT_IDX, offloads,
    //    mergeable buffers, extra queues...).
    for wanted in [feat::VERSION_1, u64::MAX] {
        for qi in 0..attacked {
            for name in CHAIN_ATTACKS {
                let Some(t) = fresh_with(&cfg, f, wanted) else {
                    tally.reset_failed += 1;
                    continue;
                };
                let mut queues: [Option<RawQueue>; MAX_QUEUES as usize] = [None, None, None, None];
                for (i, slot) in queues.iter_mut().enumerate().take(attacked as usize) {
                    *slot = setup_queue(&t, i as u16);
                }
                t.driver_ok();
                if let Some(q) = queues[qi as usize].as_mut() {
                    fill_buffers();
                    chain_attack(q, name);
                    q.kick();
                    tally.add(react(&t, Some(q), tsc_hz));
                    match *name {
                        // The device consumed the chain (or not): now the avail index
                        // goes back behind the device's position.
                        "avail-backwards" => {
                            mmio::w16(q.avail + 2, 0);
                            q.kick();
                            tally.add(react(&t, Some(q), tsc_hz));
                        }
                        // Doorbells keep coming at a queue the loop broke.
                        "kick-storm" => {
                            for _ in 0..10_000 {
                                q.kick();
                            }
                            tally.add(react(&t, Some(q), tsc_hz));
                        }
                        _ => {}
                    }
                }
                tally.reset_failed += u32::from(!reset_ok(&t));
            }
        }
    }
    // 3b. Requests with malformed contents for the device kinds this guest knows.
    for &(device, queue, name) in PAYLOAD_ATTACKS {
        if device == f.device && queue < attacked {
            payload_attack(&cfg, f, queue, name, attacked, tsc_hz, &mut tally);
        }
    }
    // 4. Transport-level attacks.
    for name in TRANSPORT_ATTACKS {
        transport_attack(&cfg, f, name, attacked, ram_top, tsc_hz, &mut tally);
    }
    // 5. After all that, a clean bring-up must work.
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
        "hostile {:02x}:{:02x}.{} {:04x}:{:04x} queues={} attacks={} broken={} answered={} ignored={} reset_failed={} anomalies={} recovered={}",
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
        tally.anomalies,
        u8::from(recovered)
    );
    SUMMARY.with(|s| {
        s.devices += 1;
        s.attacks += tally.attacks;
        s.reset_failed += tally.reset_failed;
        s.anomalies += tally.anomalies;
        s.unrecovered += u32::from(!recovered);
    });
}

#[derive(Default)]
struct Summary {
    devices: u32,
    attacks: u32,
    reset_failed: u32,
    unrecovered: u32,
    anomalies: u32,
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
    anomalies: 0,
}));

/// `hostile`: attack every modern virtio function; one `hostile ...` line per device, then
/// `hostile: done` and
/// `OK hostile devices=N attacks=A reset_failed=R unrecovered=U anomalies=X`.
/// Every device is left reset (status 0); drivers re-initialise on next use.
pub fn cmd(pci: &Pci, tsc_hz: u64, ram_top: u64) {
    if ram_top < RINGS + MAX_QUEUES as u64 * RING_STRIDE || !phys_ok(SCRATCH, 16 << 20) {
        println!("ERR hostile needs-32MiB-of-ram");
        return;
    }
    SUMMARY.with(|s| *s = Summary::default());
    for f in &pci.funcs[..pci.count] {
        if f.vendor == 0x1af4 && (0x1041..=0x107f).contains(&f.device) {
            attack_device(pci, f, tsc_hz, ram_top);
        }
    }
    println!("hostile: done");
    SUMMARY.with(|s| {
        println!(
            "OK hostile devices={} attacks={} reset_failed={} unrecovered={} anomalies={}",
            s.devices, s.attacks, s.reset_failed, s.unrecovered, s.anomalies
        )
    });
}

/// Transport-level attacks, each on a freshly reset device with all attacked queues set up;
/// a probe chain is then published on the probe queue (1 if the device has two queues, else
/// 0) and the reaction counted.
const TRANSPORT_ATTACKS: &[&str] = &[
    "size-3",
    "size-0",
    "size-too-big",
    "desc-beyond-ram",
    "avail-in-mmio-hole",
    "used-beyond-ram",
    "used-in-lapic",
    "used-in-own-bar",
    "used-misaligned",
    "used-at-end-of-ram",
    "used-over-desc",
    "shared-rings",
    "driver-ok-without-features-ok",
    "unoffered-features",
    "features-after-features-ok",
    "status-clear-bits",
    "status-garbage",
    "status-failed-first",
    "queue-rewrite-after-driver-ok",
    "odd-widths",
    "devcfg-garbage",
    "msix-garbage",
    "notify-widths",
];

/// The device layout an attack programs for the probe queue.
fn attack_layout(name: &str, t: &Transport, q_base: u64, ram_top: u64) -> Layout {
    let mut lay = Layout::default();
    match name {
        "size-3" => lay.size = Some(3),
        "size-0" => lay.size = Some(0),
        "size-too-big" => lay.size = Some(0x8000),
        "desc-beyond-ram" => lay.desc = Some(FAR),
        // Only the device is told: our avail writes still go to scratch RAM.
        "avail-in-mmio-hole" => lay.avail = Some(0xfec0_0000),
        "used-beyond-ram" => lay.used = Some(FAR),
        "used-in-lapic" => lay.used = Some(0xfee0_0000),
        "used-in-own-bar" => lay.used = Some(t.common_base()),
        "used-misaligned" => lay.used = Some(q_base + 0x2002),
        "used-at-end-of-ram" => lay.used = Some(ram_top - 8),
        "used-over-desc" => lay.used = Some(q_base),
        // The probe queue is told queue 0's rings (when it is not queue 0 itself).
        "shared-rings" if q_base != RINGS => {
            lay.desc = Some(RINGS);
            lay.avail = Some(RINGS + 0x1000);
            lay.used = Some(RINGS + 0x2000);
        }
        _ => {}
    }
    lay
}

/// The MSI-X capability of `f`: (capability offset, table address, table size, PBA address).
fn msix_of(cfg: &Cfg, f: &Func) -> Option<(u16, u64, u16, u64)> {
    let mut found = None;
    cfg.caps(|off, id| {
        if id != 0x11 || found.is_some() {
            return;
        }
        let size = (cfg.r16(off + 2) & 0x7ff) + 1;
        let locate = |reg: u32, bytes: u64| -> Option<u64> {
            let b = f.bars.get((reg & 7) as usize)?;
            let offset = (reg & !7) as u64;
            let mem = matches!(b.kind, BarKind::Mem32 | BarKind::Mem64) && b.addr != 0;
            (mem && offset + bytes <= b.size && phys_ok(b.addr + offset, bytes))
                .then_some(b.addr + offset)
        };
        let table = locate(cfg.r32(off + 4), size as u64 * 16);
        let pba = locate(cfg.r32(off + 8), 8);
        if let (Some(table), Some(pba)) = (table, pba) {
            found = Some((off, table, size, pba));
        }
    });
    found
}

/// The MSI-X state saved before the MSI-X attack.
struct MsixSaved {
    cap: u16,
    table: u64,
    size: u16,
    ctrl: u16,
    entries: [[u32; 4]; MAX_MSIX],
}

/// Enable MSI-X with garbage in every table entry (addresses with garbage high dwords and,
/// except entry 0, destinations no vCPU has; reserved bits set; vector 0x77, fixed delivery,
/// so a message that does reach a vCPU is only counted by the kernel), write the PBA (read-only), toggle
/// the enable and mask bits, point config and probe-queue vectors out of range (they must
/// read back NO_VECTOR) and then at the garbage entry 0.
fn msix_garbage(
    cfg: &Cfg,
    f: &Func,
    t: &Transport,
    probe: u16,
    tally: &mut Tally,
) -> Option<MsixSaved> {
    let (cap, table, size, pba) = msix_of(cfg, f)?;
    let ctrl = cfg.r16(cap + 2);
    let mut saved = MsixSaved {
        cap,
        table,
        size,
        ctrl,
        entries: [[0; 4]; MAX_MSIX],
    };
    for (v, e) in saved.entries.iter_mut().enumerate().take(size as usize) {
        for (k, w) in e.iter_mut().enumerate() {
            *w = mmio::r32(table + v as u64 * 16 + k as u64 * 4);
        }
    }
    const ENABLE: u16 = 1 << 15;
    const MASK: u16 = 1 << 14;
    cfg.w16(cap + 2, ctrl | ENABLE | MASK);
    for v in 0..size as u64 {
        let e = table + v * 16;
        mmio::w32(e, 0x1234_5000 | ((v as u32 & 0xff) << 4));
        mmio::w32(e + 4, 0xdead_beef);
        mmio::w32(e + 8, 0xffff_0077);
        mmio::w32(e + 12, 0xffff_fffe);
    }
    // Entry 0 (the vector the queues use below) does reach this vCPU, through an address
    // with a garbage high dword: the message must arrive as plain vector 0x77 (`irqs`
    // counts it as `other`).
    mmio::w32(table, 0xfee0_0000 | (crate::platform::bsp_apic_id() << 12));
    // Odd widths inside entry 0, writes past the table's last entry are not made (the
    // BAR holds other structures there).
    mmio::w8(table + 4, 0xef);
    mmio::w64(table + 8, 0x0000_0000_ffff_0077);
    mmio::w64(pba, u64::MAX);
    cfg.w16(cap + 2, ctrl | ENABLE);
    cfg.w16(cap + 2, ctrl & !ENABLE);
    cfg.w16(cap + 2, ctrl | ENABLE | MASK);
    cfg.w16(cap + 2, ctrl | ENABLE);
    let c = t.common_base();
    mmio::w16(c + common::MSIX_CONFIG, size);
    tally.anomalies += u32::from(mmio::r16(c + common::MSIX_CONFIG) != crate::virtio::NO_VECTOR);
    mmio::w16(c + common::Q_SELECT, probe);
    mmio::w16(c + common::Q_MSIX, 0x7ff0);
    tally.anomalies += u32::from(mmio::r16(c + common::Q_MSIX) != crate::virtio::NO_VECTOR);
    mmio::w16(c + common::Q_MSIX, 0);
    mmio::w16(c + common::MSIX_CONFIG, 0);
    Some(saved)
}

/// Put the MSI-X table and message control back as they were.
fn msix_restore(cfg: &Cfg, s: &MsixSaved) {
    cfg.w16(s.cap + 2, s.ctrl | (1 << 14));
    for (v, e) in s.entries.iter().enumerate().take(s.size as usize) {
        for (k, w) in e.iter().enumerate() {
            mmio::w32(s.table + v as u64 * 16 + k as u64 * 4, *w);
        }
    }
    cfg.w16(s.cap + 2, s.ctrl);
}

/// The probe chain: 64 readable bytes on a transmit-like queue (probe queue 1), else 16
/// readable header bytes and 512 writable bytes.
fn probe_chain(q: &mut RawQueue) {
    const N: u16 = desc_flags::NEXT;
    const W: u16 = desc_flags::WRITE;
    if q.index == 1 {
        q.desc(0, BUF, 64, 0, 0);
    } else {
        q.desc(0, BUF, 16, N, 1);
        q.desc(1, BUF + 0x1000, 512, W, 0);
    }
    q.publish(0);
}

fn transport_attack(
    cfg: &Cfg,
    f: &Func,
    name: &str,
    attacked: u16,
    ram_top: u64,
    tsc_hz: u64,
    tally: &mut Tally,
) {
    fill_buffers();
    let Ok(mut t) = Transport::probe(cfg, f) else {
        tally.reset_failed += 1;
        return;
    };
    let c = t.common_base();
    // Negotiation (or not).
    match name {
        "driver-ok-without-features-ok" => {}
        "unoffered-features" => {
            for sel in 0..2 {
                mmio::w32(c + common::GFSELECT, sel);
                mmio::w32(c + common::GF, u32::MAX);
            }
            t.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
            tally.anomalies += u32::from(t.status() & status::FEATURES_OK != 0);
        }
        "status-failed-first" => {
            t.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FAILED);
            let _ = t.negotiate(feat::VERSION_1);
        }
        _ => {
            if t.negotiate(feat::VERSION_1).is_err() {
                tally.reset_failed += 1;
                return;
            }
        }
    }
    if name == "features-after-features-ok" {
        for sel in [0, 1, 7, u32::MAX] {
            mmio::w32(c + common::GFSELECT, sel);
            mmio::w32(c + common::GF, u32::MAX);
        }
        mmio::w32(c + common::DFSELECT, u32::MAX);
        let _ = mmio::r32(c + common::DF);
    }
    // Queues: all attacked ones, the probe queue with the attack's layout.
    let nq = t.num_queues();
    let probe = if nq >= 2 { 1 } else { 0 };
    let mut pq: Option<RawQueue> = None;
    for i in 0..attacked {
        let base = RINGS + i as u64 * RING_STRIDE;
        if i == probe {
            pq = setup_queue_with(&t, i, attack_layout(name, &t, base, ram_top));
        } else {
            let _ = setup_queue(&t, i);
        }
    }
    let saved = if name == "msix-garbage" {
        msix_garbage(cfg, f, &t, probe, tally)
    } else {
        None
    };
    // DRIVER_OK (or an out-of-order version of it).
    if name == "driver-ok-without-features-ok" {
        t.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
        tally.anomalies += u32::from(t.status() & status::DRIVER_OK != 0);
    } else {
        t.driver_ok();
    }
    // After DRIVER_OK.
    match name {
        "status-clear-bits" => t.set_status(status::ACKNOWLEDGE),
        "status-garbage" => t.set_status(0xff),
        "queue-rewrite-after-driver-ok" => {
            mmio::w16(c + common::Q_SELECT, probe);
            mmio::w16(c + common::Q_SIZE, 3);
            mmio::w64(c + common::Q_DESC, FAR);
            mmio::w64(c + common::Q_AVAIL, FAR);
            mmio::w64(c + common::Q_USED, FAR);
            mmio::w16(c + common::Q_ENABLE, 0);
            mmio::w16(c + common::Q_SELECT, 0x7fff);
            mmio::w16(c + common::Q_ENABLE, 1);
        }
        "odd-widths" => {
            let before = t.num_queues();
            mmio::w64(c + 0x10, u64::MAX);
            mmio::w32(c + common::STATUS, 0);
            mmio::w8(c + common::Q_SELECT, 0x55);
            mmio::w8(c + common::Q_DESC + 3, 0xff);
            mmio::w32(c + common::Q_USED + 4, 0xffff_ffff);
            mmio::w16(c + common::NUM_QUEUES, 0);
            mmio::w8(c + common::CFG_GENERATION, 0x77);
            let _ = mmio::r64(c + 0x10);
            let _ = mmio::r64(c + common::Q_USED);
            let _ = mmio::r8(c + common::Q_DESC + 5);
            tally.anomalies += u32::from(t.num_queues() != before);
        }
        "devcfg-garbage" => {
            for off in (0..t.devcfg_len().min(256)).step_by(4) {
                t.cfg_w32(off, u32::MAX);
            }
        }
        _ => {}
    }
    if let Some(q) = pq.as_mut() {
        probe_chain(q);
        match (name, q.notify) {
            ("notify-widths", Some(n)) => {
                mmio::w8(n, q.index as u8);
                mmio::w32(n & !3, 0xdead_0000 | q.index as u32);
                mmio::w16(n, 0xbeef);
                q.kick();
            }
            ("shared-rings", _) if q.index != 0 => {
                // A chain in queue 0's rings, which both queues now use: ring both.
                let mut q0 = RawQueue {
                    index: 0,
                    size: q.size,
                    desc: RINGS,
                    avail: RINGS + 0x1000,
                    used: RINGS + 0x2000,
                    notify: t.notify_addr(0),
                    avail_idx: 0,
                    watch_used: true,
                };
                probe_chain(&mut q0);
                q0.kick();
                q.kick();
                tally.add(react(&t, Some(&q0), tsc_hz));
                tally.reset_failed += u32::from(!reset_ok(&t));
                return;
            }
            _ => q.kick(),
        }
    }
    tally.add(react(&t, pq.as_ref(), tsc_hz));
    tally.reset_failed += u32::from(!reset_ok(&t));
    if let Some(s) = saved {
        msix_restore(cfg, &s);
    }
}

/// Requests whose contents are malformed, per device kind: (PCI device ID, queue, attack).
/// Run with every offered feature negotiated.
const PAYLOAD_ATTACKS: &[(u16, u16, &str)] = &[
    (0x1042, 0, "blk-read-past-end"),
    (0x1042, 0, "blk-read-straddling-end"),
    (0x1042, 0, "blk-write-past-end"),
    (0x1042, 0, "blk-discard-garbage"),
    (0x1042, 0, "blk-write-zeroes-garbage"),
    (0x1042, 0, "blk-get-id-short"),
    (0x1042, 0, "blk-unknown-type"),
    (0x1042, 0, "blk-header-short"),
    (0x1042, 0, "blk-no-status-byte"),
    (0x1042, 0, "blk-reset-mid-request"),
    (0x1041, 1, "net-gso-garbage"),
    (0x1041, 1, "net-csum-outside-frame"),
    (0x1041, 1, "net-runt-frame"),
    (0x1041, 1, "net-jumbo-frame"),
    (0x1041, 1, "net-num-buffers-garbage"),
    (0x1053, 1, "vsock-len-lies"),
    (0x1053, 1, "vsock-spoofed-cid"),
    (0x1053, 1, "vsock-unknown-op"),
    (0x1053, 1, "vsock-short-header"),
    (0x1053, 1, "vsock-request-flood"),
];

fn w_bytes(addr: u64, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        mmio::w8(addr + i as u64, *b);
    }
}

/// A virtio-blk request header at `at`.
fn blk_header(at: u64, kind: u32, sector: u64) {
    mmio::w32(at, kind);
    mmio::w32(at + 4, 0);
    mmio::w64(at + 8, sector);
}

/// A virtio-vsock packet header at `at` (virtio 1.2 §5.10.6).
fn vsock_header(at: u64, src_cid: u64, dst_cid: u64, dst_port: u32, len: u32, kind: u16, op: u16) {
    mmio::w64(at, src_cid);
    mmio::w64(at + 8, dst_cid);
    mmio::w32(at + 16, 0x4000_0000);
    mmio::w32(at + 20, dst_port);
    mmio::w32(at + 24, len);
    mmio::w16(at + 28, kind);
    mmio::w16(at + 30, op);
    mmio::w32(at + 32, 0);
    mmio::w32(at + 36, 4096);
    mmio::w32(at + 40, 0);
}

/// Builds the malformed request `name` on `q` (contents at [`BUF`]).
fn payload_chain(q: &mut RawQueue, t: &Transport, name: &str) {
    const N: u16 = desc_flags::NEXT;
    const W: u16 = desc_flags::WRITE;
    const DATA: u64 = BUF + 0x1000;
    const STATUS: u64 = BUF + 0x800;
    let capacity = t.cfg_r64(0);
    let guest_cid = t.cfg_r64(0);
    // Header, data (direction, length), status byte.
    let mut blk = |kind: u32, sector: u64, data_flags: u16, data_len: u32| {
        blk_header(BUF, kind, sector);
        q.desc(0, BUF, 16, N, 1);
        q.desc(1, DATA, data_len, data_flags | N, 2);
        q.desc(2, STATUS, 1, W, 0);
        q.publish(0);
    };
    match name {
        "blk-read-past-end" => blk(0, u64::MAX - 1, W, 4096),
        "blk-read-straddling-end" => blk(0, capacity.saturating_sub(1), W, 4096),
        "blk-write-past-end" => blk(1, capacity, 0, 512),
        "blk-discard-garbage" | "blk-write-zeroes-garbage" => {
            let kind = if name == "blk-discard-garbage" {
                11
            } else {
                13
            };
            mmio::w64(DATA, u64::MAX - 3);
            mmio::w32(DATA + 8, u32::MAX);
            mmio::w32(DATA + 12, u32::MAX);
            blk(kind, 0, 0, 16)
        }
        "blk-get-id-short" => blk(8, 0, W, 1),
        "blk-unknown-type" => blk(0xdead_beef, 0, W, 512),
        "blk-header-short" => {
            blk_header(BUF, 0, 0);
            q.desc(0, BUF, 8, N, 1);
            q.desc(1, STATUS, 1, W, 0);
            q.publish(0);
        }
        "blk-reset-mid-request" => {
            // A 4 MiB read in 15 pieces plus a write: the device is reset right after the
            // doorbell, while it still works on them.
            blk_header(BUF, 0, 0);
            q.desc(0, BUF, 16, N, 1);
            for i in 1..15u16 {
                let piece = BUF + 0x10_0000 + u64::from(i - 1) * 0x4_0000;
                q.desc(i, piece, 0x4_0000, W | N, i + 1);
            }
            q.desc(15, STATUS, 1, W, 0);
            q.publish(0);
        }
        "blk-no-status-byte" => {
            blk_header(BUF, 0, 0);
            q.desc(0, BUF, 16, 0, 0);
            q.publish(0);
        }
        "net-gso-garbage" | "net-csum-outside-frame" | "net-num-buffers-garbage" => {
            // flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
            let hdr: [u8; 12] = match name {
                "net-gso-garbage" => [1, 1, 0xff, 0xff, 0, 0, 0xf0, 0xff, 0xf0, 0xff, 0, 0],
                "net-csum-outside-frame" => [1, 0, 0, 0, 0, 0, 0x00, 0x10, 0x00, 0x10, 0, 0],
                _ => [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff],
            };
            w_bytes(BUF, &hdr);
            // A broadcast Ethernet frame with a bogus EtherType.
            w_bytes(BUF + 12, &[0xff; 6]);
            w_bytes(BUF + 18, &[0x02, 0, 0, 0, 0, 0x66, 0x88, 0xb5]);
            q.desc(0, BUF, 12 + 64, 0, 0);
            q.publish(0);
        }
        "net-runt-frame" => {
            w_bytes(BUF, &[0; 12]);
            q.desc(0, BUF, 13, 0, 0);
            q.publish(0);
        }
        "net-jumbo-frame" => {
            w_bytes(BUF, &[0; 12]);
            q.desc(0, BUF, 12 + 70_000, 0, 0);
            q.publish(0);
        }
        "vsock-len-lies" => {
            vsock_header(BUF, guest_cid, 2, 1234, u32::MAX, 1, 5);
            q.desc(0, BUF, 44 + 16, 0, 0);
            q.publish(0);
        }
        "vsock-spoofed-cid" => {
            vsock_header(BUF, 0xdead, 2, 1234, 0, 1, 1);
            q.desc(0, BUF, 44, 0, 0);
            q.publish(0);
        }
        "vsock-unknown-op" => {
            vsock_header(BUF, guest_cid, 2, 1234, 0, 0x7777, 0xffff);
            q.desc(0, BUF, 44, 0, 0);
            q.publish(0);
        }
        "vsock-short-header" => {
            vsock_header(BUF, guest_cid, 2, 1234, 0, 1, 1);
            q.desc(0, BUF, 20, 0, 0);
            q.publish(0);
        }
        "vsock-request-flood" => {
            // Connection requests to host ports nobody listens on: each is answered with a
            // reset on the receive queue, which has no buffers.
            for i in 0..(q.size.min(QSIZE) - 1) {
                let at = BUF + u64::from(i) * 64;
                vsock_header(at, guest_cid, 2, 40_000 + u32::from(i), 0, 1, 1);
                q.desc(i, at, 44, 0, 0);
                q.publish(i);
            }
        }
        _ => {}
    }
}

fn payload_attack(
    cfg: &Cfg,
    f: &Func,
    queue: u16,
    name: &str,
    attacked: u16,
    tsc_hz: u64,
    tally: &mut Tally,
) {
    fill_buffers();
    let Some(t) = fresh_with(cfg, f, u64::MAX) else {
        tally.reset_failed += 1;
        return;
    };
    let mut target = None;
    for i in 0..attacked {
        let q = setup_queue(&t, i);
        if i == queue {
            target = q;
        }
    }
    t.driver_ok();
    if let Some(q) = target.as_mut() {
        payload_chain(q, &t, name);
        q.kick();
        if name.ends_with("reset-mid-request") {
            // No waiting: the reset below races the device's work.
            tally.add(Reaction::Ignored);
        } else {
            tally.add(react(&t, Some(q), tsc_hz));
        }
    }
    tally.reset_failed += u32::from(!reset_ok(&t));
}
