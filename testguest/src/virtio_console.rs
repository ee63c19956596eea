//! virtio-console driver (PCI device 0x1043, port 0 = hvc0, no MULTIPORT) on the generic
//! virtio layer, polled at CPL3, and the `vcon`, `vcon-write` and `vcon-echo` commands.

use crate::pci::Pci;
use crate::println;
use crate::sys::{self, mmio};
use crate::virtio::{self, feat, status, Buf, Transport, Virtq};

/// PCI device ID of a modern virtio-console function.
const DEVICE_ID: u16 = 0x1043;
/// VIRTIO_CONSOLE_F_SIZE.
const F_SIZE: u64 = 1 << 0;
/// Receive buffers kept posted.
const RX_BUFS: usize = 8;
/// Bytes per receive buffer.
const RX_BUF_LEN: u32 = 256;
/// Longest line `vcon-echo` collects (longer lines are cut).
const LINE_MAX: usize = 200;
/// Seconds `vcon-echo` waits for all its lines; seconds a write may take.
const ECHO_TIMEOUT_S: u64 = 60;
const WRITE_TIMEOUT_S: u64 = 10;

struct ConDev {
    t: Transport,
    rx: Virtq,
    tx: Virtq,
    rx_base: u64,
    tx_buf: u64,
    /// Receive buffer index of each in-flight head.
    buf_of_head: [u8; virtio::MAX_QUEUE_SIZE as usize],
    line: [u8; LINE_MAX],
    line_len: usize,
    /// Received buffer being consumed: (buffer index, next byte, length).
    cur: Option<(usize, u32, u32)>,
}

static mut DEV: Option<ConDev> = None;

impl ConDev {
    fn post_rx(&mut self, i: usize) -> bool {
        let addr = self.rx_base + i as u64 * RX_BUF_LEN as u64;
        match self.rx.add(&[Buf::write(addr, RX_BUF_LEN)]) {
            Some(head) => {
                self.buf_of_head[head as usize] = i as u8;
                true
            }
            None => false,
        }
    }

    /// Sends `bytes` (up to 4 KiB) on hvc0 and waits for the device to take them.
    fn send(&mut self, bytes: &[u8], tsc_hz: u64) -> Result<(), &'static str> {
        let n = bytes.len().min(4096);
        for (i, &b) in bytes[..n].iter().enumerate() {
            mmio::w8(self.tx_buf + i as u64, b);
        }
        self.tx
            .add(&[Buf::read(self.tx_buf, n as u32)])
            .ok_or("queue-full")?;
        self.tx.kick();
        match self.tx.wait(tsc_hz.saturating_mul(WRITE_TIMEOUT_S)) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err("timeout"),
            Err(_) => Err("bad-used-id"),
        }
    }

    /// Consumes received bytes until a newline completes a line; returns its length (the
    /// line is copied into `out`), or None when no more bytes have arrived. A buffer is
    /// posted again once all its bytes are consumed.
    fn poll_rx(&mut self, out: &mut [u8; LINE_MAX]) -> Result<Option<usize>, &'static str> {
        loop {
            let (i, pos, len) = match self.cur {
                Some(c) => c,
                None => {
                    let Some((head, len)) = self.rx.poll().map_err(|_| "bad-used-id")? else {
                        return Ok(None);
                    };
                    let i = self.buf_of_head[head as usize] as usize;
                    (i, 0, len.min(RX_BUF_LEN))
                }
            };
            let addr = self.rx_base + i as u64 * RX_BUF_LEN as u64;
            let mut p = pos;
            let mut done = None;
            while p < len {
                let b = mmio::r8(addr + p as u64);
                p += 1;
                if b == b'\n' {
                    let n = self.line_len;
                    out[..n].copy_from_slice(&self.line[..n]);
                    self.line_len = 0;
                    done = Some(n);
                    break;
                }
                if b != b'\r' && self.line_len < LINE_MAX {
                    self.line[self.line_len] = b;
                    self.line_len += 1;
                }
            }
            if p < len {
                self.cur = Some((i, p, len));
            } else {
                self.cur = None;
                if !self.post_rx(i) {
                    return Err("rx-queue-full");
                }
                self.rx.kick();
            }
            if done.is_some() {
                return Ok(done);
            }
        }
    }
}

fn init(pci: &Pci) -> Result<ConDev, &'static str> {
    let f = virtio::find_function(pci, DEVICE_ID, 0).ok_or("no-device")?;
    let cfg = pci.cfg(&f);
    let mut t = Transport::probe(&cfg, &f).map_err(|_| "probe-failed")?;
    t.negotiate(feat::VERSION_1 | F_SIZE)
        .map_err(|_| "features-rejected")?;
    let rx = t.setup_queue(0, 16).map_err(|_| "queue-unavailable")?;
    let tx = t.setup_queue(1, 16).map_err(|_| "queue-unavailable")?;
    let rx_base = virtio::dma_alloc(RX_BUFS * RX_BUF_LEN as usize).ok_or("out-of-dma-memory")?;
    let tx_buf = virtio::dma_alloc(4096).ok_or("out-of-dma-memory")?;
    t.driver_ok();
    let mut d = ConDev {
        t,
        rx,
        tx,
        rx_base,
        tx_buf,
        buf_of_head: [0; virtio::MAX_QUEUE_SIZE as usize],
        line: [0; LINE_MAX],
        line_len: 0,
        cur: None,
    };
    for i in 0..RX_BUFS {
        if !d.post_rx(i) {
            return Err("rx-queue-full");
        }
    }
    d.rx.kick();
    Ok(d)
}

/// The device, (re)initialised if it is not running (first use, or after `hostile`).
fn device(pci: &Pci) -> Result<&'static mut ConDev, &'static str> {
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

fn printable(bytes: &[u8], out: &mut [u8; LINE_MAX]) -> usize {
    for (o, &b) in out.iter_mut().zip(bytes) {
        *o = if b.is_ascii_graphic() || b == b' ' {
            b
        } else {
            b'_'
        };
    }
    bytes.len().min(LINE_MAX)
}

/// `vcon`: `OK vcon bdf=BB:DD.F cols=C rows=R features=0x...`.
pub fn cmd_info(pci: &Pci) {
    match device(pci) {
        Ok(d) => println!(
            "OK vcon bdf={:02x}:{:02x}.{} cols={} rows={} features={:#x}",
            d.t.bdf.0,
            d.t.bdf.1,
            d.t.bdf.2,
            d.t.cfg_r16(0),
            d.t.cfg_r16(2),
            d.t.features
        ),
        Err(e) => println!("ERR vcon {}", e),
    }
}

/// `vcon-write TEXT`: sends TEXT and a newline on hvc0; `OK vcon-write bytes=N`.
pub fn cmd_write(pci: &Pci, tsc_hz: u64, text: &str) {
    let d = match device(pci) {
        Ok(d) => d,
        Err(e) => {
            println!("ERR vcon-write {}", e);
            return;
        }
    };
    let mut buf = [0u8; 1024];
    let n = text.len().min(buf.len() - 1);
    buf[..n].copy_from_slice(&text.as_bytes()[..n]);
    buf[n] = b'\n';
    match d.send(&buf[..n + 1], tsc_hz) {
        Ok(()) => println!("OK vcon-write bytes={}", n + 1),
        Err(e) => println!("ERR vcon-write {}", e),
    }
}

/// `vcon-echo N`: reads N lines from hvc0, prints each as `vcon-line I TEXT` on the serial
/// console and sends it back on hvc0; `OK vcon-echo lines=N bytes=B`.
pub fn cmd_echo(pci: &Pci, tsc_hz: u64, args: &[&str]) {
    let [arg] = args else {
        println!("ERR vcon-echo usage: vcon-echo N");
        return;
    };
    let Some(want) = crate::cmd::parse_u64(arg) else {
        println!("ERR vcon-echo bad-number={}", arg);
        return;
    };
    let d = match device(pci) {
        Ok(d) => d,
        Err(e) => {
            println!("ERR vcon-echo {}", e);
            return;
        }
    };
    // Tell the host we are listening (tests wait for this before typing).
    println!("vcon-echo waiting lines={}", want);
    let deadline = sys::rdtsc().wrapping_add(tsc_hz.saturating_mul(ECHO_TIMEOUT_S));
    let mut lines = 0u64;
    let mut bytes = 0u64;
    let mut line = [0u8; LINE_MAX];
    while lines < want {
        match d.poll_rx(&mut line) {
            Ok(Some(n)) => {
                let mut shown = [0u8; LINE_MAX];
                let k = printable(&line[..n], &mut shown);
                println!(
                    "vcon-line {} {}",
                    lines,
                    core::str::from_utf8(&shown[..k]).unwrap_or("?")
                );
                let mut reply = [0u8; LINE_MAX + 1];
                reply[..n].copy_from_slice(&line[..n]);
                reply[n] = b'\n';
                if let Err(e) = d.send(&reply[..n + 1], tsc_hz) {
                    println!("ERR vcon-echo send-{} lines={}", e, lines);
                    return;
                }
                lines += 1;
                bytes += n as u64 + 1;
            }
            Ok(None) => {
                if (sys::rdtsc().wrapping_sub(deadline) as i64) > 0 {
                    println!("ERR vcon-echo timeout lines={}", lines);
                    return;
                }
                core::hint::spin_loop();
            }
            Err(e) => {
                println!("ERR vcon-echo {} lines={}", e, lines);
                return;
            }
        }
    }
    println!("OK vcon-echo lines={} bytes={}", lines, bytes);
}
