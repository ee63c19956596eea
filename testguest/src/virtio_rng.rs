//! virtio-rng driver (PCI device 0x1044) on the generic virtio layer, polled at CPL3, and the
//! `rng BYTES` command.

use crate::pattern::{fnv1a64, FNV_OFFSET};
use crate::pci::Pci;
use crate::println;
use crate::sys::{self, mmio};
use crate::virtio::{self, feat, status, Buf, Transport, Virtq};

/// PCI device ID of a modern virtio-rng function.
const DEVICE_ID: u16 = 0x1044;
/// Bytes asked for per request.
const CHUNK: usize = 4096;
/// Largest `rng` request.
const MAX_BYTES: u64 = 16 << 20;
/// Seconds to wait for one request (generous: the device may be rate-limited).
const TIMEOUT_S: u64 = 60;

struct RngDev {
    t: Transport,
    q: Virtq,
    buf: u64,
}

static mut DEV: Option<RngDev> = None;

fn init(pci: &Pci) -> Result<RngDev, &'static str> {
    let f = virtio::find_function(pci, DEVICE_ID, 0).ok_or("no-device")?;
    let cfg = pci.cfg(&f);
    let mut t = Transport::probe(&cfg, &f).map_err(|_| "probe-failed")?;
    t.negotiate(feat::VERSION_1)
        .map_err(|_| "features-rejected")?;
    let q = t.setup_queue(0, 16).map_err(|_| "queue-unavailable")?;
    t.driver_ok();
    let buf = virtio::dma_alloc(CHUNK).ok_or("out-of-dma-memory")?;
    Ok(RngDev { t, q, buf })
}

/// The device, (re)initialised if it is not running (first use, or after `hostile` reset it).
fn device(pci: &Pci) -> Result<&'static mut RngDev, &'static str> {
    // SAFETY: single-threaded CPL3 code; nothing else holds a reference to DEV.
    let slot = unsafe { &mut *core::ptr::addr_of_mut!(DEV) };
    let healthy = slot.as_ref().is_some_and(|d| {
        d.t.status() & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET) == status::DRIVER_OK
    });
    if !healthy {
        *slot = Some(init(pci)?);
    }
    slot.as_mut().ok_or("no-device")
}

/// `rng BYTES`: reads BYTES random bytes in requests of up to 4 KiB and prints
/// `OK rng bytes=N requests=R distinct=D first=HEX fnv1a64=HEX ms=M`.
pub fn cmd(pci: &Pci, tsc_hz: u64, args: &[&str]) {
    let [arg] = args else {
        println!("ERR rng usage: rng BYTES");
        return;
    };
    let Some(total) = crate::cmd::parse_u64(arg) else {
        println!("ERR rng bad-number={}", arg);
        return;
    };
    if total == 0 || total > MAX_BYTES {
        println!("ERR rng out-of-range bytes={} max={}", total, MAX_BYTES);
        return;
    }
    let dev = match device(pci) {
        Ok(d) => d,
        Err(e) => {
            println!("ERR rng {}", e);
            return;
        }
    };
    let mut seen = [false; 256];
    let mut first = [0u8; 8];
    let mut hash = FNV_OFFSET;
    let mut got = 0u64;
    let mut requests = 0u64;
    let start = sys::rdtsc();
    while got < total {
        let want = (total - got).min(CHUNK as u64) as u32;
        if dev.q.add(&[Buf::write(dev.buf, want)]).is_none() {
            println!("ERR rng queue-full");
            return;
        }
        dev.q.kick();
        let len = match dev.q.wait(tsc_hz.saturating_mul(TIMEOUT_S)) {
            Ok(Some((_, len))) => len.min(want),
            Ok(None) => {
                println!("ERR rng timeout bytes={}", got);
                return;
            }
            Err(_) => {
                println!("ERR rng bad-used-id");
                return;
            }
        };
        requests += 1;
        if len == 0 {
            println!("ERR rng empty-answer bytes={}", got);
            return;
        }
        for i in 0..len as u64 {
            let b = mmio::r8(dev.buf + i);
            if got + i < 8 {
                first[(got + i) as usize] = b;
            }
            seen[b as usize] = true;
            hash = fnv1a64(hash, &[b]);
        }
        got += len as u64;
    }
    let cycles = sys::rdtsc().wrapping_sub(start);
    let ms = (cycles as u128 * 1000 / tsc_hz.max(1) as u128) as u64;
    let distinct = seen.iter().filter(|&&s| s).count();
    println!(
        "OK rng bytes={} requests={} distinct={} first={:016x} fnv1a64={:016x} ms={}",
        got,
        requests,
        distinct,
        u64::from_be_bytes(first),
        hash,
        ms
    );
}
