//! One-way UDP benchmarks over virtio-net, polled at CPL3 (no interrupts):
//!
//! - `net-bench-tx NIC IP DST_IP PORT COUNT SIZE`: resolves DST_IP with ARP, then sends COUNT
//!   UDP datagrams of SIZE payload bytes to DST_IP:PORT as fast as the device takes them
//!   (up to the whole tx ring in flight) and prints
//!   `OK net-bench-tx frames=N bytes=PAYLOAD ns=NANOS kicks=K`.
//! - `net-bench-rx NIC IP PORT COUNT SECONDS`: prints `OK net-bench-rx started`, answers ARP
//!   for IP and counts UDP datagrams to PORT until COUNT arrived, one second passed without
//!   one, or SECONDS ran out; prints `OK net-bench-rx frames=N bytes=PAYLOAD ns=NANOS` (first
//!   to last datagram).
//!
//! The NIC is (re)initialised by each command through the generic virtio layer (VERSION_1 and
//! MAC only, like `net-up`; no MSI-X vector), so a NIC brought up by `net-up` must be brought up
//! again afterwards.

use crate::netstack::{self, Iface, Kind};
use crate::pci::Pci;
use crate::println;
use crate::sys::{self, mmio};
use crate::virtio::{self, feat, Buf, Transport, Virtq};

const DEVICE_ID: u16 = 0x1041;
const F_MAC: u64 = 1 << 5;
/// virtio_net_hdr_v1.
const HDR: usize = 12;
const BUF_LEN: usize = 2048;
const RING: u16 = 128;
/// Ethernet + IPv4 + UDP headers.
const HEADERS: usize = 14 + 20 + 8;
/// Largest payload of one untagged 1500-byte-MTU frame.
const MAX_PAYLOAD: usize = 1472;
/// Seconds to wait for the ARP answer.
const ARP_SECONDS: u64 = 5;

struct Nic {
    rx: Virtq,
    tx: Virtq,
    rx_base: u64,
    tx_base: u64,
    rx_of_head: [u64; virtio::MAX_QUEUE_SIZE as usize],
    ifc: Iface,
}

fn parse_ip(s: &str) -> Option<[u8; 4]> {
    let s = s.split('/').next()?;
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in out.iter_mut() {
        let v = crate::cmd::parse_u64(parts.next()?)?;
        *o = u8::try_from(v).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn init(pci: &Pci, n: usize, ip: [u8; 4]) -> Result<Nic, &'static str> {
    let f = virtio::find_function(pci, DEVICE_ID, n).ok_or("no-device")?;
    let cfg = pci.cfg(&f);
    let mut t = Transport::probe(&cfg, &f).map_err(|_| "probe-failed")?;
    t.negotiate(feat::VERSION_1 | F_MAC)
        .map_err(|_| "features-rejected")?;
    let rx = t.setup_queue(0, RING).map_err(|_| "rx-queue-unavailable")?;
    let tx = t.setup_queue(1, RING).map_err(|_| "tx-queue-unavailable")?;
    for q in 0..2 {
        mmio::w16(t.common_base() + virtio::common::Q_SELECT, q);
        mmio::w16(t.common_base() + virtio::common::Q_MSIX, virtio::NO_VECTOR);
    }
    let rx_base = virtio::dma_alloc(rx.size as usize * BUF_LEN).ok_or("out-of-dma-memory")?;
    let tx_base = virtio::dma_alloc(tx.size as usize * BUF_LEN).ok_or("out-of-dma-memory")?;
    let mut mac = [0x02, 0, 0, 0, 0, n as u8];
    if t.has(F_MAC) {
        for (i, b) in mac.iter_mut().enumerate() {
            *b = t.cfg_r8(i as u64);
        }
    }
    t.driver_ok();
    let mut nic = Nic {
        rx,
        tx,
        rx_base,
        tx_base,
        rx_of_head: [0; virtio::MAX_QUEUE_SIZE as usize],
        ifc: Iface { mac, ip },
    };
    for i in 0..nic.rx.size as usize {
        nic.post_rx(nic.rx_base + (i * BUF_LEN) as u64)?;
    }
    nic.rx.kick();
    Ok(nic)
}

impl Nic {
    fn post_rx(&mut self, addr: u64) -> Result<(), &'static str> {
        let head = self
            .rx
            .add(&[Buf::write(addr, BUF_LEN as u32)])
            .ok_or("rx-queue-full")?;
        self.rx_of_head[head as usize] = addr;
        Ok(())
    }

    /// The next received frame (without the vnet header), handed to `f`; its buffer is
    /// posted again afterwards. `Ok(false)` when nothing arrived.
    fn recv(&mut self, f: &mut dyn FnMut(&mut Nic, &[u8])) -> Result<bool, &'static str> {
        let Some((head, len)) = self.rx.poll().map_err(|_| "bad-rx-used-id")? else {
            return Ok(false);
        };
        let addr = self.rx_of_head[head as usize];
        let len = (len as usize).min(BUF_LEN);
        if len > HDR {
            // SAFETY: `addr` is one of our BUF_LEN-byte DMA buffers (identity mapped) and the
            // device has returned it; `len` is clamped to the buffer.
            let frame = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
            f(self, &frame[HDR..]);
        }
        self.post_rx(addr)?;
        self.rx.kick();
        Ok(true)
    }

    /// Send one frame through tx slot `slot` (the caller keeps at most `tx.size` in flight).
    fn send_raw(&mut self, slot: usize, frame: &[u8]) -> Result<(), &'static str> {
        let addr = self.tx_base + (slot * BUF_LEN) as u64;
        // SAFETY: `addr` is tx slot `slot`'s BUF_LEN-byte DMA buffer, not in flight.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, BUF_LEN) };
        let n = frame.len().min(BUF_LEN - HDR);
        buf[..HDR].fill(0);
        buf[HDR..HDR + n].copy_from_slice(&frame[..n]);
        self.tx
            .add(&[Buf::read(addr, (HDR + n) as u32)])
            .ok_or("tx-queue-full")?;
        self.tx.kick();
        Ok(())
    }

    /// Wait until every transmission is done.
    fn drain_tx(&mut self, tsc_hz: u64) -> Result<(), &'static str> {
        let deadline = sys::rdtsc().wrapping_add(tsc_hz.saturating_mul(5));
        while self.tx.in_flight() > 0 {
            self.tx.poll().map_err(|_| "bad-tx-used-id")?;
            if (sys::rdtsc().wrapping_sub(deadline) as i64) > 0 {
                return Err("tx-timeout");
            }
        }
        Ok(())
    }
}

/// Answer ARP requests for us (the only thing the receive paths reply to).
fn answer_arp(nic: &mut Nic, frame: &[u8]) {
    let mut out = [0u8; 128];
    let ifc = Iface {
        mac: nic.ifc.mac,
        ip: nic.ifc.ip,
    };
    if let (Kind::Arp, n) = netstack::handle(&ifc, frame, &mut out) {
        if n > 0 && nic.drain_tx(1 << 32).is_ok() {
            let _ = nic.send_raw(0, &out[..n]);
        }
    }
}

fn ipv4_udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    port: u16,
    payload: usize,
    out: &mut [u8],
) -> usize {
    let total = HEADERS + payload;
    out[..total].fill(0);
    out[0..6].copy_from_slice(&dst_mac);
    out[6..12].copy_from_slice(&src_mac);
    out[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut out[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + 8 + payload) as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = netstack::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp = &mut out[34..42];
    udp[0..2].copy_from_slice(&port.to_be_bytes());
    udp[2..4].copy_from_slice(&port.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    // UDP checksum 0: none (allowed over IPv4).
    total
}

/// MAC of `dst` (ARP request, polled answer).
fn resolve(nic: &mut Nic, dst: [u8; 4], tsc_hz: u64) -> Result<[u8; 6], &'static str> {
    let mut req = [0u8; 42];
    req[0..6].fill(0xff);
    req[6..12].copy_from_slice(&nic.ifc.mac);
    req[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    req[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    req[22..28].copy_from_slice(&nic.ifc.mac);
    req[28..32].copy_from_slice(&nic.ifc.ip);
    req[38..42].copy_from_slice(&dst);
    let end = sys::rdtsc().wrapping_add(tsc_hz.saturating_mul(ARP_SECONDS));
    let mut next_send = 0u64;
    let mut found = None;
    while found.is_none() {
        let now = sys::rdtsc();
        if (now.wrapping_sub(end) as i64) > 0 {
            return Err("arp-timeout");
        }
        if now >= next_send {
            nic.drain_tx(tsc_hz)?;
            nic.send_raw(0, &req)?;
            next_send = now.wrapping_add(tsc_hz / 4);
        }
        nic.recv(&mut |n, f| {
            let reply = f.len() >= 42
                && f[12..14] == [0x08, 0x06]
                && f[20..22] == [0, 2]
                && f[28..32] == dst;
            if reply {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&f[22..28]);
                found = Some(mac);
            } else {
                answer_arp(n, f);
            }
        })?;
    }
    found.ok_or("arp-timeout")
}

fn ns(tsc: u64, tsc_hz: u64) -> u64 {
    (u128::from(tsc) * 1_000_000_000 / u128::from(tsc_hz.max(1))) as u64
}

/// `net-bench-tx NIC IP DST_IP PORT COUNT SIZE`.
pub fn cmd_tx(pci: &Pci, tsc_hz: u64, args: &[&str]) {
    let [nic, ip, dst, port, count, size] = args else {
        println!("ERR net-bench-tx usage: net-bench-tx NIC IP DST_IP PORT COUNT SIZE");
        return;
    };
    let p = crate::cmd::parse_u64;
    let (Some(n), Some(ip), Some(dst), Some(port), Some(count), Some(size)) = (
        p(nic),
        parse_ip(ip),
        parse_ip(dst),
        p(port),
        p(count),
        p(size),
    ) else {
        println!("ERR net-bench-tx bad-argument");
        return;
    };
    if port == 0 || port > 0xffff || count == 0 || size < 8 || size as usize > MAX_PAYLOAD {
        println!(
            "ERR net-bench-tx bad-argument port=1..65535 size=8..{}",
            MAX_PAYLOAD
        );
        return;
    }
    match tx(
        pci,
        tsc_hz,
        n as usize,
        ip,
        dst,
        port as u16,
        count,
        size as usize,
    ) {
        Ok((tsc, kicks)) => println!(
            "OK net-bench-tx frames={} bytes={} ns={} kicks={}",
            count,
            count * size,
            ns(tsc, tsc_hz).max(1),
            kicks
        ),
        Err(e) => println!("ERR net-bench-tx {}", e),
    }
}

#[allow(clippy::too_many_arguments)]
fn tx(
    pci: &Pci,
    tsc_hz: u64,
    n: usize,
    ip: [u8; 4],
    dst: [u8; 4],
    port: u16,
    count: u64,
    size: usize,
) -> Result<(u64, u64), &'static str> {
    let mut nic = init(pci, n, ip)?;
    let dst_mac = resolve(&mut nic, dst, tsc_hz)?;
    nic.drain_tx(tsc_hz)?;
    let slots = nic.tx.size as u64;
    // Every slot holds a ready frame; only the sequence number changes (UDP checksum 0).
    let mut frame = [0u8; HEADERS + MAX_PAYLOAD];
    let len = ipv4_udp_frame(nic.ifc.mac, dst_mac, ip, dst, port, size, &mut frame);
    for s in 0..slots as usize {
        let addr = nic.tx_base + (s * BUF_LEN) as u64;
        // SAFETY: tx slot `s`'s DMA buffer; nothing is in flight.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, BUF_LEN) };
        buf[..HDR].fill(0);
        buf[HDR..HDR + len].copy_from_slice(&frame[..len]);
    }
    let (mut sent, mut kicks) = (0u64, 0u64);
    let stall = tsc_hz.saturating_mul(5);
    let t0 = sys::rdtsc();
    let mut progress = t0;
    while sent < count {
        let mut added = false;
        while sent < count && u64::from(nic.tx.in_flight()) < slots {
            let slot = (sent % slots) as usize;
            let addr = nic.tx_base + (slot * BUF_LEN) as u64;
            mmio::w64(addr + (HDR + HEADERS) as u64, sent);
            nic.tx
                .add(&[Buf::read(addr, (HDR + len) as u32)])
                .ok_or("tx-queue-full")?;
            sent += 1;
            added = true;
        }
        if added {
            nic.tx.kick();
            kicks += 1;
        }
        let mut reaped = false;
        while nic.tx.poll().map_err(|_| "bad-tx-used-id")?.is_some() {
            reaped = true;
        }
        let now = sys::rdtsc();
        if reaped || added {
            progress = now;
        } else if now.wrapping_sub(progress) > stall {
            return Err("tx-timeout");
        }
    }
    nic.drain_tx(tsc_hz)?;
    Ok((sys::rdtsc().wrapping_sub(t0), kicks))
}

/// `net-bench-rx NIC IP PORT COUNT SECONDS`.
pub fn cmd_rx(pci: &Pci, tsc_hz: u64, args: &[&str]) {
    let [nic, ip, port, count, secs] = args else {
        println!("ERR net-bench-rx usage: net-bench-rx NIC IP PORT COUNT SECONDS");
        return;
    };
    let p = crate::cmd::parse_u64;
    let (Some(n), Some(ip), Some(port), Some(count), Some(secs)) =
        (p(nic), parse_ip(ip), p(port), p(count), p(secs))
    else {
        println!("ERR net-bench-rx bad-argument");
        return;
    };
    if port == 0 || port > 0xffff || count == 0 || secs == 0 || secs > 3600 {
        println!("ERR net-bench-rx bad-argument");
        return;
    }
    let mut nic = match init(pci, n as usize, ip) {
        Ok(d) => d,
        Err(e) => {
            println!("ERR net-bench-rx {}", e);
            return;
        }
    };
    println!("OK net-bench-rx started port={}", port);
    let port = (port as u16).to_be_bytes();
    let end = sys::rdtsc().wrapping_add(tsc_hz.saturating_mul(secs));
    let idle = tsc_hz;
    let (mut frames, mut bytes, mut first, mut last) = (0u64, 0u64, 0u64, 0u64);
    loop {
        let mut got = false;
        let r = nic.recv(&mut |d, f| {
            let udp = f.len() >= HEADERS
                && f[12..14] == [0x08, 0x00]
                && f[23] == 17
                && f[30..34] == d.ifc.ip
                && f[36..38] == port;
            if udp {
                got = true;
                bytes += (f.len() - HEADERS) as u64;
            } else {
                answer_arp(d, f);
            }
        });
        if let Err(e) = r {
            println!("ERR net-bench-rx {}", e);
            return;
        }
        let now = sys::rdtsc();
        if got {
            if frames == 0 {
                first = now;
            }
            frames += 1;
            last = now;
            if frames >= count {
                break;
            }
        } else if (now.wrapping_sub(end) as i64) > 0
            || (frames > 0 && now.wrapping_sub(last) > idle)
        {
            break;
        }
    }
    println!(
        "OK net-bench-rx frames={} bytes={} ns={}",
        frames,
        bytes,
        ns(last.wrapping_sub(first), tsc_hz)
    );
}
