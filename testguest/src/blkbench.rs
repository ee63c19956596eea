//! `blk-bench D MODE SIZE_MIB QD BS`: a virtio-blk throughput benchmark that keeps QD requests
//! in flight (QD descriptor chains outstanding, used ring polled at CPL3, no interrupts) and
//! times the whole transfer with the TSC.
//!
//! The disk is driven through the generic virtio layer (its own queue of up to 256 entries,
//! EVENT_IDX negotiated so the device can suppress notifications while it is busy); the
//! `Disk` of the other `blk-*` commands is re-initialised by the caller afterwards. Data
//! buffers live in guest RAM at [`DATA_BASE`] (QD × BS bytes), one per request slot.

use crate::pci::Pci;
use crate::println;
use crate::sys::{self, mmio, phys_ok};
use crate::virtio::{self, feat, Buf, Transport};

/// First byte of the data buffers (above the image, the DMA pool and `mem-fill`'s area).
pub const DATA_BASE: u64 = 64 << 20;
/// Most requests in flight (each takes 3 descriptors of a 256-entry queue).
const MAX_QD: u64 = 64;
/// Largest request.
const MAX_BS: u64 = 4 << 20;
/// Most bytes of data buffers (QD × BS).
const MAX_BUFFERS: u64 = 128 << 20;
/// Seconds without any completion before the benchmark gives up.
const STALL_S: u64 = 30;
/// virtio-blk read-only feature bit.
const F_RO: u64 = 1 << 5;
/// virtio-blk FLUSH feature bit: negotiated so the device may cache writes (without it a
/// device must behave as write-through, i.e. sync every write).
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
/// Bytes per request slot in the header area: 16-byte header, status byte at 16.
const SLOT_HDR: u64 = 32;

/// What a run does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    SeqRead,
    SeqWrite,
    RandRead,
    RandWrite,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "seqread" => Mode::SeqRead,
            "seqwrite" => Mode::SeqWrite,
            "randread" => Mode::RandRead,
            "randwrite" => Mode::RandWrite,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Mode::SeqRead => "seqread",
            Mode::SeqWrite => "seqwrite",
            Mode::RandRead => "randread",
            Mode::RandWrite => "randwrite",
        }
    }

    fn reads(self) -> bool {
        matches!(self, Mode::SeqRead | Mode::RandRead)
    }

    fn random(self) -> bool {
        matches!(self, Mode::RandRead | Mode::RandWrite)
    }
}

/// A size with an optional K/M suffix (binary units): `4k`, `1M`, `65536`.
fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1u64 << 20),
        _ => (s, 1),
    };
    crate::cmd::parse_u64(num)?.checked_mul(mult)
}

/// The `d`-th virtio-blk function (modern 0x1042 or transitional 0x1001), in PCI order.
fn find_disk(pci: &Pci, d: usize) -> Option<crate::pci::Func> {
    pci.funcs[..pci.count]
        .iter()
        .filter(|f| f.vendor == 0x1af4 && (f.device == 0x1042 || f.device == 0x1001))
        .nth(d)
        .copied()
}

/// xorshift64*: the random block sequence (same seed, same sequence on every VMM).
fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Runs `blk-bench` (see the module comment); `ram_ok(addr, len)` tells whether a range is
/// RAM. Prints `OK blk-bench disk=D mode=M qd=Q bs=B ops=N bytes=N ns=N tsc=N kicks=N`.
pub fn cmd(pci: &Pci, tsc_hz: u64, ram_ok: &dyn Fn(u64, u64) -> bool, args: &[&str]) {
    let [d, mode, size, qd, bs] = args else {
        println!(
            "ERR blk-bench usage: blk-bench D seqread|seqwrite|randread|randwrite SIZE_MIB QD BS"
        );
        return;
    };
    let Some(mode) = Mode::parse(mode) else {
        println!("ERR blk-bench bad-mode={}", mode);
        return;
    };
    let (Some(d), Some(size_mib), Some(qd), Some(bs)) = (
        crate::cmd::parse_u64(d),
        crate::cmd::parse_u64(size),
        crate::cmd::parse_u64(qd),
        parse_size(bs),
    ) else {
        println!("ERR blk-bench bad-number");
        return;
    };
    if qd == 0 || qd > MAX_QD || bs == 0 || bs % 512 != 0 || bs > MAX_BS || size_mib == 0 {
        println!(
            "ERR blk-bench bad-parameters qd=1..{} bs=512*k<={}",
            MAX_QD, MAX_BS
        );
        return;
    }
    let buffers = qd * bs;
    let hdr_base = DATA_BASE + buffers;
    let region = buffers + qd * SLOT_HDR;
    if buffers > MAX_BUFFERS || !ram_ok(DATA_BASE, region) || !phys_ok(DATA_BASE, region) {
        println!(
            "ERR blk-bench not-ram start={:#x} bytes={}",
            DATA_BASE, region
        );
        return;
    }
    let Some(f) = find_disk(pci, d as usize) else {
        println!("ERR blk-bench no-disk={}", d);
        return;
    };
    match run(pci, &f, tsc_hz, mode, size_mib, qd, bs, hdr_base) {
        Ok(r) => println!(
            "OK blk-bench disk={} mode={} qd={} bs={} ops={} bytes={} ns={} tsc={} kicks={}",
            d,
            mode.name(),
            qd,
            bs,
            r.ops,
            r.ops * bs,
            r.ns,
            r.tsc,
            r.kicks
        ),
        Err(e) => println!("ERR blk-bench disk={} mode={} {}", d, mode.name(), e),
    }
}

struct Measured {
    ops: u64,
    ns: u64,
    tsc: u64,
    kicks: u64,
}

#[allow(clippy::too_many_arguments)]
fn run(
    pci: &Pci,
    f: &crate::pci::Func,
    tsc_hz: u64,
    mode: Mode,
    size_mib: u64,
    qd: u64,
    bs: u64,
    hdr_base: u64,
) -> Result<Measured, &'static str> {
    let cfg = pci.cfg(f);
    let mut t = Transport::probe(&cfg, f).map_err(|_| "probe-failed")?;
    let feats = t
        .negotiate(feat::VERSION_1 | feat::EVENT_IDX | F_RO | F_FLUSH)
        .map_err(|_| "features-rejected")?;
    if feats & F_RO != 0 && !mode.reads() {
        return Err("read-only");
    }
    let capacity = t.cfg_r64(0).saturating_mul(512);
    let blocks = capacity / bs;
    if blocks == 0 {
        return Err("disk-smaller-than-bs");
    }
    let mut q = t.setup_queue(0, 256).map_err(|_| "queue-unavailable")?;
    if u64::from(q.size) < qd * 3 {
        return Err("queue-too-small");
    }
    // No MSI-X vector for the queue (an earlier driver may have left MSI-X enabled): a
    // completion must never enter the guest's (emulated, slow) CPL0 interrupt path.
    mmio::w16(t.common_base() + virtio::common::Q_SELECT, 0);
    mmio::w16(t.common_base() + virtio::common::Q_MSIX, virtio::NO_VECTOR);
    t.driver_ok();
    // Ask for no interrupts: we poll. (With EVENT_IDX the device also looks at used_event,
    // which polling keeps current; no MSI-X vector is programmed, so nothing is delivered.)
    q.set_interrupts(false);

    let total = (size_mib << 20).div_ceil(bs).max(1);
    let sectors_per_block = bs / 512;
    let mut slot_of_head = [0u8; virtio::MAX_QUEUE_SIZE as usize];
    let mut free = [0u8; MAX_QD as usize];
    let mut nfree = qd as usize;
    for (i, s) in free.iter_mut().enumerate().take(nfree) {
        *s = i as u8;
    }
    let kind = if mode.reads() { T_IN } else { T_OUT };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut seq_block = 0u64;
    let (mut issued, mut done, mut kicks) = (0u64, 0u64, 0u64);
    let stall_ticks = tsc_hz.saturating_mul(STALL_S).max(1);
    let t0 = sys::rdtsc();
    let mut last_progress = t0;
    while done < total {
        let mut added = false;
        while issued < total && nfree > 0 {
            let block = if mode.random() {
                next_random(&mut rng) % blocks
            } else {
                let b = seq_block;
                seq_block = (seq_block + 1) % blocks;
                b
            };
            nfree -= 1;
            let slot = u64::from(free[nfree]);
            let hdr = hdr_base + slot * SLOT_HDR;
            mmio::w32(hdr, kind);
            mmio::w32(hdr + 4, 0);
            mmio::w64(hdr + 8, block * sectors_per_block);
            mmio::w8(hdr + 16, 0xff);
            let data = DATA_BASE + slot * bs;
            let data_buf = if mode.reads() {
                Buf::write(data, bs as u32)
            } else {
                Buf::read(data, bs as u32)
            };
            let head = q
                .add(&[Buf::read(hdr, 16), data_buf, Buf::write(hdr + 16, 1)])
                .ok_or("no-descriptors")?;
            slot_of_head[head as usize] = slot as u8;
            issued += 1;
            added = true;
        }
        if added {
            q.kick();
            kicks += 1;
        }
        let mut progressed = false;
        while let Some((head, _len)) = q.poll().map_err(|_| "bad-used-id")? {
            let slot = slot_of_head[usize::from(head)];
            let status = mmio::r8(hdr_base + u64::from(slot) * SLOT_HDR + 16);
            if status != 0 {
                return Err(if status == 1 {
                    "status=IOERR"
                } else {
                    "bad-status"
                });
            }
            free[nfree] = slot;
            nfree += 1;
            done += 1;
            progressed = true;
        }
        let now = sys::rdtsc();
        if progressed {
            last_progress = now;
        } else if now.wrapping_sub(last_progress) > stall_ticks {
            return Err("timeout");
        } else {
            core::hint::spin_loop();
        }
    }
    let tsc = sys::rdtsc().wrapping_sub(t0);
    let ns = (u128::from(tsc) * 1_000_000_000 / u128::from(tsc_hz.max(1))) as u64;
    t.reset();
    Ok(Measured {
        ops: total,
        ns: ns.max(1),
        tsc,
        kicks,
    })
}
