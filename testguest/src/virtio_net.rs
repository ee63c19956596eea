//! virtio-net driver (PCI device 0x1041) on the generic virtio layer, polled at CPL3, and the
//! `net-up NIC IP/PREFIX` and `net-serve SECONDS` commands (ARP, ICMP echo and UDP echo on
//! port 7 through [`crate::netstack`]).
//!
//! Only VERSION_1 and MAC are negotiated: no offloads and no mergeable buffers, so every
//! receive buffer holds a whole frame after the 12-byte `virtio_net_hdr_v1`, and frames are
//! sent with a zeroed header (no checksum offload, GSO_NONE).

use crate::netstack::{self, Iface, Kind};
use crate::pci::Pci;
use crate::println;
use crate::sys;
use crate::virtio::{self, feat, status, Buf, Transport, Virtq};

/// PCI device ID of a modern virtio-net function.
const DEVICE_ID: u16 = 0x1041;
/// VIRTIO_NET_F_MAC.
const F_MAC: u64 = 1 << 5;
/// Length of `virtio_net_hdr_v1`.
const HDR: usize = 12;
/// Bytes per receive or transmit buffer (header + a 1514-byte frame fits).
const BUF_LEN: usize = 2048;
/// Receive buffers kept posted.
const RX_BUFS: usize = 64;
/// Transmit buffers (frames in flight at most).
const TX_BUFS: usize = 32;
/// NICs the driver handles.
const MAX_NICS: usize = 4;
/// Longest `net-serve`.
const MAX_SECONDS: u64 = 3600;

struct NetDev {
    t: Transport,
    rxq: Virtq,
    txq: Virtq,
    rx_base: u64,
    /// Receive buffer of each descriptor head in flight.
    rx_of_head: [u64; virtio::MAX_QUEUE_SIZE as usize],
    tx_base: u64,
    tx_next: usize,
    ifc: Iface,
}

static mut NICS: [Option<NetDev>; MAX_NICS] = [None, None, None, None];

fn nics() -> &'static mut [Option<NetDev>; MAX_NICS] {
    // SAFETY: single-threaded CPL3 code; nothing else holds a reference to NICS.
    unsafe { &mut *core::ptr::addr_of_mut!(NICS) }
}

fn init(pci: &Pci, n: usize, ip: [u8; 4]) -> Result<NetDev, &'static str> {
    let f = virtio::find_function(pci, DEVICE_ID, n).ok_or("no-device")?;
    let cfg = pci.cfg(&f);
    let mut t = Transport::probe(&cfg, &f).map_err(|_| "probe-failed")?;
    t.negotiate(feat::VERSION_1 | F_MAC)
        .map_err(|_| "features-rejected")?;
    let rxq = t.setup_queue(0, 128).map_err(|_| "rx-queue-unavailable")?;
    let txq = t.setup_queue(1, 128).map_err(|_| "tx-queue-unavailable")?;
    let rx_base = virtio::dma_alloc(RX_BUFS * BUF_LEN).ok_or("out-of-dma-memory")?;
    let tx_base = virtio::dma_alloc(TX_BUFS * BUF_LEN).ok_or("out-of-dma-memory")?;
    let mut mac = [0u8; 6];
    if t.has(F_MAC) {
        for (i, b) in mac.iter_mut().enumerate() {
            *b = t.cfg_r8(i as u64);
        }
    } else {
        mac = [0x02, 0, 0, 0, 0, n as u8];
    }
    t.driver_ok();
    let mut d = NetDev {
        t,
        rxq,
        txq,
        rx_base,
        rx_of_head: [0; virtio::MAX_QUEUE_SIZE as usize],
        tx_base,
        tx_next: 0,
        ifc: Iface { mac, ip },
    };
    for i in 0..RX_BUFS {
        d.post_rx(d.rx_base + (i * BUF_LEN) as u64)?;
    }
    d.rxq.kick();
    Ok(d)
}

impl NetDev {
    fn post_rx(&mut self, addr: u64) -> Result<(), &'static str> {
        let head = self
            .rxq
            .add(&[Buf::write(addr, BUF_LEN as u32)])
            .ok_or("rx-queue-full")?;
        self.rx_of_head[head as usize] = addr;
        Ok(())
    }

    fn healthy(&self) -> bool {
        self.t.status() & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET) == status::DRIVER_OK
    }

    /// Reclaim finished transmissions.
    fn reap_tx(&mut self) -> Result<(), &'static str> {
        while self.txq.poll().map_err(|_| "bad-tx-used-id")?.is_some() {}
        Ok(())
    }

    /// Send `frame` (without the vnet header); waits for a free buffer.
    fn send(&mut self, frame: &[u8], tsc_hz: u64) -> Result<(), &'static str> {
        if frame.len() + HDR > BUF_LEN {
            return Err("frame-too-long");
        }
        let deadline = sys::rdtsc().wrapping_add(tsc_hz.saturating_mul(5));
        loop {
            self.reap_tx()?;
            if (self.txq.in_flight() as usize) < TX_BUFS {
                break;
            }
            if sys::rdtsc() > deadline {
                return Err("tx-timeout");
            }
        }
        let addr = self.tx_base + (self.tx_next * BUF_LEN) as u64;
        self.tx_next = (self.tx_next + 1) % TX_BUFS;
        // SAFETY: `addr` is a BUF_LEN-byte DMA buffer of ours (identity mapped) that the
        // device is not using: the device completes transmissions in order and at most
        // TX_BUFS are in flight.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, BUF_LEN) };
        buf[..HDR].fill(0);
        buf[HDR..HDR + frame.len()].copy_from_slice(frame);
        self.txq
            .add(&[Buf::read(addr, (HDR + frame.len()) as u32)])
            .ok_or("tx-queue-full")?;
        self.txq.kick();
        Ok(())
    }
}

fn parse_cidr(s: &str) -> Option<([u8; 4], u8)> {
    let (addr, prefix) = s.split_once('/')?;
    let prefix = crate::cmd::parse_u64(prefix)?;
    if prefix > 32 {
        return None;
    }
    let mut ip = [0u8; 4];
    let mut parts = addr.split('.');
    for b in ip.iter_mut() {
        let v = crate::cmd::parse_u64(parts.next()?)?;
        *b = u8::try_from(v).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some((ip, prefix as u8))
}

/// `net-up NIC IP/PREFIX`: brings up the NIC-th virtio-net function with that address and
/// prints `OK net-up nic=N mac=MAC ip=IP/PREFIX`.
pub fn cmd_up(pci: &Pci, args: &[&str]) {
    let [nic, cidr] = args else {
        println!("ERR net-up usage: net-up NIC IP/PREFIX");
        return;
    };
    let Some(n) = crate::cmd::parse_u64(nic).filter(|&n| (n as usize) < MAX_NICS) else {
        println!("ERR net-up bad-nic={}", nic);
        return;
    };
    let Some((ip, prefix)) = parse_cidr(cidr) else {
        println!("ERR net-up bad-address={}", cidr);
        return;
    };
    let slot = &mut nics()[n as usize];
    if let Some(d) = slot.as_mut().filter(|d| d.healthy()) {
        d.ifc.ip = ip;
        // Re-read: a snapshot restored as a clone has a new MAC in config space.
        if d.t.has(F_MAC) {
            for (i, b) in d.ifc.mac.iter_mut().enumerate() {
                *b = d.t.cfg_r8(i as u64);
            }
        }
    } else {
        match init(pci, n as usize, ip) {
            Ok(d) => *slot = Some(d),
            Err(e) => {
                println!("ERR net-up {}", e);
                return;
            }
        }
    }
    let Some(d) = slot.as_ref() else {
        return;
    };
    let m = d.ifc.mac;
    println!(
        "OK net-up nic={} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip={}.{}.{}.{}/{}",
        n, m[0], m[1], m[2], m[3], m[4], m[5], ip[0], ip[1], ip[2], ip[3], prefix
    );
}

#[derive(Default)]
struct Counters {
    frames: u64,
    arp: u64,
    icmp: u64,
    udp: u64,
    bad: u64,
    other: u64,
}

/// Handle everything one NIC received; returns false if the device broke.
fn serve_nic(d: &mut NetDev, c: &mut Counters, tsc_hz: u64) -> Result<(), &'static str> {
    let mut frame = [0u8; BUF_LEN];
    let mut reply = [0u8; BUF_LEN];
    let mut reposted = false;
    while let Some((head, len)) = d.rxq.poll().map_err(|_| "bad-rx-used-id")? {
        let addr = d.rx_of_head[head as usize];
        let len = (len as usize).min(BUF_LEN);
        // SAFETY: `addr` is one of our BUF_LEN-byte receive buffers (identity mapped) that
        // the device just returned, so it no longer writes it.
        let buf = unsafe { core::slice::from_raw_parts(addr as *const u8, BUF_LEN) };
        frame[..len].copy_from_slice(&buf[..len]);
        d.post_rx(addr)?;
        reposted = true;
        c.frames += 1;
        if len < HDR {
            c.bad += 1;
            continue;
        }
        let (kind, n) = netstack::handle(&d.ifc, &frame[HDR..len], &mut reply);
        match kind {
            Kind::Arp => c.arp += 1,
            Kind::Icmp => c.icmp += 1,
            Kind::Udp => c.udp += 1,
            Kind::Bad => c.bad += 1,
            Kind::Other => c.other += 1,
        }
        if n > 0 {
            d.send(&reply[..n], tsc_hz)?;
        }
    }
    if reposted {
        d.rxq.kick();
    }
    d.reap_tx()
}

/// `net-serve SECONDS`: answers ARP, ICMP echo and UDP echo (port 7) on every NIC that is up
/// for SECONDS, then prints `OK net-serve frames=F arp=A icmp=I udp=U bad=B other=O`.
pub fn cmd_serve(tsc_hz: u64, args: &[&str]) {
    let [secs] = args else {
        println!("ERR net-serve usage: net-serve SECONDS");
        return;
    };
    let Some(secs) = crate::cmd::parse_u64(secs).filter(|&s| s > 0 && s <= MAX_SECONDS) else {
        println!("ERR net-serve bad-seconds={}", secs);
        return;
    };
    if nics().iter().all(|n| n.is_none()) {
        println!("ERR net-serve no-nic-up");
        return;
    }
    println!("OK net-serve started seconds={}", secs);
    let mut c = Counters::default();
    let end = sys::rdtsc().wrapping_add(tsc_hz.saturating_mul(secs));
    while sys::rdtsc() < end {
        for d in nics().iter_mut().flatten() {
            if let Err(e) = serve_nic(d, &mut c, tsc_hz) {
                println!("ERR net-serve {}", e);
                return;
            }
        }
    }
    println!(
        "OK net-serve frames={} arp={} icmp={} udp={} bad={} other={}",
        c.frames, c.arp, c.icmp, c.udp, c.bad, c.other
    );
}
