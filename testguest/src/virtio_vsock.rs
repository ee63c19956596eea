//! virtio-vsock driver (PCI device 0x1053) on the generic virtio layer, polled at CPL3, and the
//! `vsock`, `vsock-listen` and `vsock-connect` commands.
//!
//! Stream sockets only (virtio 1.2 §5.10.6), with the credit rules of Linux's
//! virtio_transport_common.c: every packet carries our `buf_alloc` and `fwd_cnt`; we never send
//! more than the peer's `buf_alloc - (tx_cnt - peer_fwd_cnt)`; we send a CREDIT_UPDATE when we
//! have consumed half our buffer since the peer last heard, or when asked (CREDIT_REQUEST).
//! A connection is closed the Linux way: SHUTDOWN with both flags, then the peer's RST.

use core::sync::atomic::{fence, Ordering};

use crate::pci::Pci;
use crate::println;
use crate::sys;
use crate::virtio::{self, feat, status, Buf, Transport, Virtq};

/// PCI device ID of a modern virtio-vsock function.
const DEVICE_ID: u16 = 0x1053;
const HOST_CID: u64 = 2;
const HDR_LEN: usize = 44;
/// Bytes of each RX and TX buffer (header + payload).
const PKT_BUF: usize = 4096;
const MAX_PAYLOAD: usize = PKT_BUF - HDR_LEN;
const RX_BUFS: usize = 64;
const TX_BUFS: usize = 64;
const EV_BUFS: usize = 4;
/// Connections the driver can hold at once.
pub const MAX_CONNS: usize = 80;
/// Per-connection receive buffer (our `buf_alloc`).
const CONN_BUF: usize = 4096;
/// Seconds without progress before a command gives up.
const IDLE_TIMEOUT_S: u64 = 60;
/// First local port for `vsock-connect`.
const FIRST_LOCAL_PORT: u32 = 49152;

mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}
const SHUT_RCV: u32 = 1;
const SHUT_SEND: u32 = 2;
const TYPE_STREAM: u16 = 1;

#[derive(Clone, Copy, Default)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn rd<const N: usize>(b: &[u8], o: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[o..o + N]);
    a
}

impl Hdr {
    fn parse(b: &[u8]) -> Hdr {
        Hdr {
            src_cid: u64::from_le_bytes(rd(b, 0)),
            dst_cid: u64::from_le_bytes(rd(b, 8)),
            src_port: u32::from_le_bytes(rd(b, 16)),
            dst_port: u32::from_le_bytes(rd(b, 20)),
            len: u32::from_le_bytes(rd(b, 24)),
            type_: u16::from_le_bytes(rd(b, 28)),
            op: u16::from_le_bytes(rd(b, 30)),
            flags: u32::from_le_bytes(rd(b, 32)),
            buf_alloc: u32::from_le_bytes(rd(b, 36)),
            fwd_cnt: u32::from_le_bytes(rd(b, 40)),
        }
    }

    fn write(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
    }
}

/// A DMA buffer as a byte slice (identity-mapped guest memory the driver owns).
fn dma(addr: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: `addr` comes from dma_alloc of at least `len` bytes, is identity mapped and
    // user accessible; single-threaded code, and the device only touches a buffer while it
    // is in flight (callers access it only after the used entry came back, or before adding).
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    /// We sent REQUEST, waiting for RESPONSE or RST.
    Connecting,
    Established,
    /// We sent SHUTDOWN(RCV|SEND), waiting for the peer's RST.
    Closing,
    /// Finished (RST received after our shutdown, or reset by the peer).
    Done,
}

/// Echo server or pattern client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Echo,
    Client,
}

#[derive(Clone, Copy)]
struct Conn {
    state: State,
    mode: Mode,
    local_port: u32,
    peer_port: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_sent: u32,
    peer_shut: u32,
    shut_sent: bool,
    reset_by_peer: bool,
    /// Echo: received bytes not yet sent back, in `echo_buf(i)` from `head`.
    head: usize,
    len: usize,
    /// Client: bytes to send, sent, received and verified.
    total: u64,
    sent: u64,
    received: u64,
    mismatch_at: Option<u64>,
    echoed: u64,
}

const FREE_CONN: Conn = Conn {
    state: State::Free,
    mode: Mode::Echo,
    local_port: 0,
    peer_port: 0,
    peer_buf_alloc: 0,
    peer_fwd_cnt: 0,
    tx_cnt: 0,
    fwd_cnt: 0,
    last_fwd_sent: 0,
    peer_shut: 0,
    shut_sent: false,
    reset_by_peer: false,
    head: 0,
    len: 0,
    total: 0,
    sent: 0,
    received: 0,
    mismatch_at: None,
    echoed: 0,
};

impl Conn {
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

static mut ECHO_BUFS: [[u8; CONN_BUF]; MAX_CONNS] = [[0; CONN_BUF]; MAX_CONNS];

/// Connection `i`'s echo ring.
fn echo_buf(i: usize) -> &'static mut [u8; CONN_BUF] {
    // SAFETY: single-threaded CPL3 code; callers hold no other reference to this ring, and
    // `i` < MAX_CONNS (it indexes `conns`), else the index panics.
    unsafe { &mut (*core::ptr::addr_of_mut!(ECHO_BUFS))[i] }
}

/// Byte `i` of the client pattern for a connection to `port`.
pub fn pattern(port: u32, i: u64) -> u8 {
    (i as u8).wrapping_mul(31) ^ (i >> 8) as u8 ^ port as u8
}

struct VsockDev {
    t: Transport,
    rx: Virtq,
    tx: Virtq,
    ev: Virtq,
    cid: u64,
    rx_bufs: [u64; RX_BUFS],
    tx_bufs: [u64; TX_BUFS],
    tx_free: [bool; TX_BUFS],
    /// TX slot of each in-flight head.
    tx_slot_of: [u16; virtio::MAX_QUEUE_SIZE as usize],
    rx_slot_of: [u16; virtio::MAX_QUEUE_SIZE as usize],
    ev_buf: u64,
    conns: [Conn; MAX_CONNS],
    listen_port: Option<u32>,
    next_local_port: u32,
    /// Counters for the command answers.
    accepted: u64,
    refused: u64,
    transport_resets: u64,
    bad_packets: u64,
}

static mut DEV: Option<VsockDev> = None;

fn init(pci: &Pci) -> Result<VsockDev, &'static str> {
    let f = virtio::find_function(pci, DEVICE_ID, 0).ok_or("no-device")?;
    let cfg = pci.cfg(&f);
    let mut t = Transport::probe(&cfg, &f).map_err(|_| "probe-failed")?;
    t.negotiate(feat::VERSION_1)
        .map_err(|_| "features-rejected")?;
    let rx = t
        .setup_queue(0, RX_BUFS as u16)
        .map_err(|_| "queue-unavailable")?;
    let tx = t
        .setup_queue(1, TX_BUFS as u16)
        .map_err(|_| "queue-unavailable")?;
    let ev = t
        .setup_queue(2, EV_BUFS as u16)
        .map_err(|_| "queue-unavailable")?;
    let cid = t.cfg_r64(0);
    let mut rx_bufs = [0u64; RX_BUFS];
    for b in rx_bufs.iter_mut() {
        *b = virtio::dma_alloc(PKT_BUF).ok_or("out-of-dma-memory")?;
    }
    let mut tx_bufs = [0u64; TX_BUFS];
    for b in tx_bufs.iter_mut() {
        *b = virtio::dma_alloc(PKT_BUF).ok_or("out-of-dma-memory")?;
    }
    let ev_buf = virtio::dma_alloc(4096).ok_or("out-of-dma-memory")?;
    let mut d = VsockDev {
        t,
        rx,
        tx,
        ev,
        cid,
        rx_bufs,
        tx_bufs,
        tx_free: [true; TX_BUFS],
        tx_slot_of: [0; virtio::MAX_QUEUE_SIZE as usize],
        rx_slot_of: [0; virtio::MAX_QUEUE_SIZE as usize],
        ev_buf,
        conns: [FREE_CONN; MAX_CONNS],
        listen_port: None,
        next_local_port: FIRST_LOCAL_PORT,
        accepted: 0,
        refused: 0,
        transport_resets: 0,
        bad_packets: 0,
    };
    d.rx.set_interrupts(false);
    d.tx.set_interrupts(false);
    d.ev.set_interrupts(false);
    for i in 0..RX_BUFS.min(d.rx.size as usize) {
        d.give_rx(i);
    }
    for i in 0..EV_BUFS.min(d.ev.size as usize) {
        d.ev.add(&[Buf::write(ev_buf + 4 * i as u64, 4)]);
    }
    d.t.driver_ok();
    d.rx.kick_always();
    d.ev.kick_always();
    Ok(d)
}

/// The device, (re)initialised if it is not running (first use, or after `hostile`).
fn device(pci: &Pci) -> Result<&'static mut VsockDev, &'static str> {
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

impl VsockDev {
    fn give_rx(&mut self, slot: usize) {
        if let Some(head) = self
            .rx
            .add(&[Buf::write(self.rx_bufs[slot], PKT_BUF as u32)])
        {
            self.rx_slot_of[head as usize] = slot as u16;
        }
    }

    fn reclaim_tx(&mut self) {
        while let Ok(Some((head, _))) = self.tx.poll() {
            let slot = self.tx_slot_of[head as usize] as usize;
            if slot < TX_BUFS {
                self.tx_free[slot] = true;
            }
        }
    }

    /// Queues one packet; spins (bounded) for a free TX buffer. False if none came.
    fn send(&mut self, hdr: &Hdr, payload: &[u8], tsc_hz: u64) -> bool {
        let deadline = sys::rdtsc().wrapping_add(tsc_hz.saturating_mul(IDLE_TIMEOUT_S));
        loop {
            self.reclaim_tx();
            if let Some(slot) = self.tx_free.iter().position(|&f| f) {
                let addr = self.tx_bufs[slot];
                let b = dma(addr, PKT_BUF);
                hdr.write(&mut b[..HDR_LEN]);
                b[HDR_LEN..HDR_LEN + payload.len()].copy_from_slice(payload);
                fence(Ordering::SeqCst);
                let len = (HDR_LEN + payload.len()) as u32;
                let Some(head) = self.tx.add(&[Buf::read(addr, len)]) else {
                    return false;
                };
                self.tx_free[slot] = false;
                self.tx_slot_of[head as usize] = slot as u16;
                self.tx.kick();
                return true;
            }
            if (sys::rdtsc().wrapping_sub(deadline) as i64) > 0 {
                return false;
            }
            core::hint::spin_loop();
        }
    }

    fn hdr_for(&self, c: &Conn, op: u16, len: u32, flags: u32) -> Hdr {
        Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: c.local_port,
            dst_port: c.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF as u32,
            fwd_cnt: c.fwd_cnt,
        }
    }

    fn send_ctl(&mut self, i: usize, op: u16, flags: u32, tsc_hz: u64) -> bool {
        let h = self.hdr_for(&self.conns[i], op, 0, flags);
        self.conns[i].last_fwd_sent = self.conns[i].fwd_cnt;
        self.send(&h, &[], tsc_hz)
    }

    fn send_rst_to(&mut self, h: &Hdr, tsc_hz: u64) {
        let r = Hdr {
            src_cid: self.cid,
            dst_cid: h.src_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        };
        self.send(&r, &[], tsc_hz);
    }

    fn find(&self, local_port: u32, peer_port: u32) -> Option<usize> {
        self.conns.iter().position(|c| {
            !matches!(c.state, State::Free | State::Done)
                && c.local_port == local_port
                && c.peer_port == peer_port
        })
    }

    /// Processes every used RX and event buffer; returns whether anything happened.
    fn poll(&mut self, tsc_hz: u64) -> bool {
        let mut progress = false;
        while let Ok(Some((_, _))) = self.ev.poll() {
            // VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: every connection is gone; re-read the CID.
            self.transport_resets += 1;
            for c in self.conns.iter_mut() {
                if !matches!(c.state, State::Free) {
                    c.state = State::Done;
                    c.reset_by_peer = true;
                }
            }
            self.cid = self.t.cfg_r64(0);
            self.ev.add(&[Buf::write(self.ev_buf, 4)]);
            self.ev.kick();
            progress = true;
        }
        let mut refill = false;
        loop {
            let (head, len) = match self.rx.poll() {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(_) => {
                    self.bad_packets += 1;
                    break;
                }
            };
            progress = true;
            let slot = self.rx_slot_of[head as usize] as usize;
            if slot < RX_BUFS {
                let len = (len as usize).min(PKT_BUF);
                let b = dma(self.rx_bufs[slot], PKT_BUF);
                let mut copy = [0u8; PKT_BUF];
                copy[..len].copy_from_slice(&b[..len]);
                self.give_rx(slot);
                refill = true;
                if len >= HDR_LEN {
                    let h = Hdr::parse(&copy[..HDR_LEN]);
                    let plen = (h.len as usize).min(len - HDR_LEN);
                    self.on_packet(&h, &copy[HDR_LEN..HDR_LEN + plen], tsc_hz);
                } else {
                    self.bad_packets += 1;
                }
            }
        }
        if refill {
            self.rx.kick();
        }
        for i in 0..MAX_CONNS {
            if self.pump(i, tsc_hz) {
                progress = true;
            }
        }
        progress
    }

    fn on_packet(&mut self, h: &Hdr, payload: &[u8], tsc_hz: u64) {
        if h.src_cid != HOST_CID || h.dst_cid != self.cid || h.type_ != TYPE_STREAM {
            self.bad_packets += 1;
            return;
        }
        let Some(i) = self.find(h.dst_port, h.src_port) else {
            if h.op == op::REQUEST && Some(h.dst_port) == self.listen_port {
                self.accept(h, tsc_hz);
            } else if h.op != op::RST {
                self.refused += 1;
                self.send_rst_to(h, tsc_hz);
            }
            return;
        };
        let c = &mut self.conns[i];
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match (c.state, h.op) {
            (_, op::RST) => {
                if c.state != State::Closing {
                    c.reset_by_peer = true;
                }
                c.state = State::Done;
            }
            (State::Connecting, op::RESPONSE) => c.state = State::Established,
            (State::Established | State::Closing, op::RW) => {
                let n = payload.len();
                match c.mode {
                    Mode::Echo => {
                        if c.len + n > CONN_BUF {
                            // The peer overran our credit: reset.
                            c.state = State::Done;
                            c.reset_by_peer = true;
                            let h2 = *h;
                            self.send_rst_to(&h2, tsc_hz);
                            return;
                        }
                        let ring = echo_buf(i);
                        for &byte in payload {
                            ring[(c.head + c.len) % CONN_BUF] = byte;
                            c.len += 1;
                        }
                    }
                    Mode::Client => {
                        for (k, &byte) in payload.iter().enumerate() {
                            let pos = c.received + k as u64;
                            if c.mismatch_at.is_none()
                                && (pos >= c.total || byte != pattern(c.peer_port, pos))
                            {
                                c.mismatch_at = Some(pos);
                            }
                        }
                        c.received += n as u64;
                        c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                    }
                }
            }
            (State::Established | State::Closing, op::SHUTDOWN) => c.peer_shut |= h.flags,
            (State::Established | State::Closing, op::CREDIT_REQUEST) => {
                self.send_ctl(i, op::CREDIT_UPDATE, 0, tsc_hz);
            }
            (State::Established | State::Closing, op::CREDIT_UPDATE) => {}
            _ => {
                c.state = State::Done;
                c.reset_by_peer = true;
                let h2 = *h;
                self.send_rst_to(&h2, tsc_hz);
            }
        }
    }

    fn accept(&mut self, h: &Hdr, tsc_hz: u64) {
        let Some(i) = self
            .conns
            .iter()
            .position(|c| matches!(c.state, State::Free | State::Done))
        else {
            self.refused += 1;
            self.send_rst_to(h, tsc_hz);
            return;
        };
        self.conns[i] = Conn {
            state: State::Established,
            mode: Mode::Echo,
            local_port: h.dst_port,
            peer_port: h.src_port,
            peer_buf_alloc: h.buf_alloc,
            peer_fwd_cnt: h.fwd_cnt,
            ..FREE_CONN
        };
        self.accepted += 1;
        self.send_ctl(i, op::RESPONSE, 0, tsc_hz);
    }

    /// Sends what connection `i` can send now; returns whether it sent anything.
    fn pump(&mut self, i: usize, tsc_hz: u64) -> bool {
        let c = self.conns[i];
        if c.state != State::Established {
            return false;
        }
        let mut sent_any = false;
        // Data.
        let credit = c.peer_credit() as usize;
        let mut chunk = [0u8; MAX_PAYLOAD];
        let n = match c.mode {
            Mode::Echo => {
                let n = c.len.min(credit).min(MAX_PAYLOAD);
                let ring = echo_buf(i);
                for (k, b) in chunk[..n].iter_mut().enumerate() {
                    *b = ring[(c.head + k) % CONN_BUF];
                }
                n
            }
            Mode::Client => {
                let left = c.total - c.sent;
                let n = (left.min(credit as u64) as usize).min(MAX_PAYLOAD);
                for (k, b) in chunk[..n].iter_mut().enumerate() {
                    *b = pattern(c.peer_port, c.sent + k as u64);
                }
                n
            }
        };
        if n > 0 {
            let mut cc = c;
            if cc.mode == Mode::Echo {
                // Consumed from our buffer: that is what fwd_cnt counts.
                cc.head = (cc.head + n) % CONN_BUF;
                cc.len -= n;
                cc.fwd_cnt = cc.fwd_cnt.wrapping_add(n as u32);
                cc.echoed += n as u64;
            } else {
                cc.sent += n as u64;
            }
            let h = self.hdr_for(&cc, op::RW, n as u32, 0);
            if !self.send(&h, &chunk[..n], tsc_hz) {
                return false;
            }
            cc.tx_cnt = cc.tx_cnt.wrapping_add(n as u32);
            cc.last_fwd_sent = cc.fwd_cnt;
            self.conns[i] = cc;
            sent_any = true;
        }
        let c = self.conns[i];
        // Credit update once half our buffer was consumed unseen.
        if c.fwd_cnt.wrapping_sub(c.last_fwd_sent) as usize >= CONN_BUF / 2 {
            self.send_ctl(i, op::CREDIT_UPDATE, 0, tsc_hz);
            sent_any = true;
        }
        // Close when our side is done: echo after the peer stopped sending and everything
        // went back; client after all data came back.
        let done = match c.mode {
            Mode::Echo => c.peer_shut & SHUT_SEND != 0 && c.len == 0,
            Mode::Client => {
                c.sent == c.total
                    && (c.received >= c.total
                        || c.mismatch_at.is_some()
                        || c.peer_shut & SHUT_SEND != 0)
            }
        };
        if done && !c.shut_sent {
            self.conns[i].shut_sent = true;
            self.conns[i].state = State::Closing;
            self.send_ctl(i, op::SHUTDOWN, SHUT_RCV | SHUT_SEND, tsc_hz);
            sent_any = true;
        }
        sent_any
    }

    fn connect(&mut self, port: u32, total: u64, tsc_hz: u64) -> Option<usize> {
        let i = self
            .conns
            .iter()
            .position(|c| matches!(c.state, State::Free | State::Done))?;
        let local_port = self.next_local_port;
        self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        self.conns[i] = Conn {
            state: State::Connecting,
            mode: Mode::Client,
            local_port,
            peer_port: port,
            total,
            ..FREE_CONN
        };
        if !self.send_ctl(i, op::REQUEST, 0, tsc_hz) {
            self.conns[i].state = State::Free;
            return None;
        }
        Some(i)
    }

    fn forget_done(&mut self) {
        for c in self.conns.iter_mut() {
            if c.state == State::Done {
                c.state = State::Free;
            }
        }
    }
}

/// `vsock`: `OK vsock cid=N transport_resets=R` (pending events are taken first, so a
/// reset the device sent since the last command is counted and the CID re-read).
pub fn cmd_info(pci: &Pci, tsc_hz: u64) {
    match device(pci) {
        Ok(d) => {
            d.poll(tsc_hz);
            // Re-read, as a driver does on a transport reset: a restored clone has a new CID.
            d.cid = d.t.cfg_r64(0);
            println!(
                "OK vsock cid={} transport_resets={}",
                d.cid, d.transport_resets
            )
        }
        Err(e) => println!("ERR vsock {}", e),
    }
}

fn parse_args<const N: usize>(cmd: &str, usage: &str, args: &[&str]) -> Option<[u64; N]> {
    if args.len() != N {
        println!("ERR {} usage: {}", cmd, usage);
        return None;
    }
    let mut out = [0u64; N];
    for (o, a) in out.iter_mut().zip(args) {
        let Some(v) = crate::cmd::parse_u64(a) else {
            println!("ERR {} bad-number={}", cmd, a);
            return None;
        };
        *o = v;
    }
    Some(out)
}

/// `vsock-listen PORT COUNT`: accepts COUNT connections on PORT (any number at once, up to
/// MAX_CONNS), echoes each until its peer shuts down, then closes it. Prints
/// `vsock listening port=P` first, then `OK vsock-listen port=P conns=N bytes=B resets=R
/// refused=F`.
pub fn cmd_listen(pci: &Pci, tsc_hz: u64, args: &[&str]) {
    let Some([port, count]) = parse_args::<2>("vsock-listen", "vsock-listen PORT COUNT", args)
    else {
        return;
    };
    if port > u32::MAX as u64 || count == 0 || count > 100_000 {
        println!(
            "ERR vsock-listen out-of-range port={} count={}",
            port, count
        );
        return;
    }
    let d = match device(pci) {
        Ok(d) => d,
        Err(e) => {
            println!("ERR vsock-listen {}", e);
            return;
        }
    };
    d.forget_done();
    d.listen_port = Some(port as u32);
    d.accepted = 0;
    d.refused = 0;
    println!("vsock listening port={}", port);
    let mut finished = 0u64;
    let mut bytes = 0u64;
    let mut resets = 0u64;
    let mut last = sys::rdtsc();
    loop {
        if d.poll(tsc_hz) {
            last = sys::rdtsc();
        }
        for c in d.conns.iter_mut() {
            if c.state == State::Done && c.mode == Mode::Echo && c.local_port == port as u32 {
                finished += 1;
                bytes += c.echoed;
                if c.reset_by_peer {
                    resets += 1;
                }
                c.state = State::Free;
            }
        }
        if finished >= count {
            break;
        }
        if sys::rdtsc().wrapping_sub(last) > tsc_hz.saturating_mul(IDLE_TIMEOUT_S) {
            d.listen_port = None;
            println!(
                "ERR vsock-listen timeout port={} accepted={} done={}",
                port, d.accepted, finished
            );
            return;
        }
        core::hint::spin_loop();
    }
    d.listen_port = None;
    println!(
        "OK vsock-listen port={} conns={} bytes={} resets={} refused={}",
        port, finished, bytes, resets, d.refused
    );
}

/// `vsock-connect PORT BYTES [COUNT]`: opens COUNT (default 1) connections to host port PORT
/// at once, sends BYTES pattern bytes on each, checks the echo, closes. Prints
/// `OK vsock-connect port=P conns=N bytes=B result=match` or
/// `ERR vsock-connect refused port=P` (RST instead of RESPONSE), `... mismatch ...`,
/// `... short ...` (peer closed early) or `... timeout ...`.
pub fn cmd_connect(pci: &Pci, tsc_hz: u64, args: &[&str]) {
    let usage = "vsock-connect PORT BYTES [COUNT]";
    let vals: Option<[u64; 3]> = match args.len() {
        2 => parse_args::<2>("vsock-connect", usage, args).map(|[p, b]| [p, b, 1]),
        _ => parse_args::<3>("vsock-connect", usage, args),
    };
    let Some([port, total, count]) = vals else {
        return;
    };
    if port > u32::MAX as u64 || total > (1 << 30) || count == 0 || count > MAX_CONNS as u64 {
        println!(
            "ERR vsock-connect out-of-range port={} bytes={} count={} max_count={}",
            port, total, count, MAX_CONNS
        );
        return;
    }
    let d = match device(pci) {
        Ok(d) => d,
        Err(e) => {
            println!("ERR vsock-connect {}", e);
            return;
        }
    };
    d.forget_done();
    let mut ids = [0usize; MAX_CONNS];
    for id in ids.iter_mut().take(count as usize) {
        match d.connect(port as u32, total, tsc_hz) {
            Some(i) => *id = i,
            None => {
                println!("ERR vsock-connect no-free-connection port={}", port);
                return;
            }
        }
    }
    let ids = &ids[..count as usize];
    let mut last = sys::rdtsc();
    loop {
        if d.poll(tsc_hz) {
            last = sys::rdtsc();
        }
        if ids.iter().all(|&i| d.conns[i].state == State::Done) {
            break;
        }
        if sys::rdtsc().wrapping_sub(last) > tsc_hz.saturating_mul(IDLE_TIMEOUT_S) {
            let open = ids
                .iter()
                .filter(|&&i| d.conns[i].state != State::Done)
                .count();
            println!("ERR vsock-connect timeout port={} open={}", port, open);
            return;
        }
        core::hint::spin_loop();
    }
    let mut bytes = 0u64;
    for &i in ids {
        let c = d.conns[i];
        d.conns[i].state = State::Free;
        if c.reset_by_peer && c.sent == 0 && c.received == 0 {
            println!(
                "ERR vsock-connect refused port={} local_port={}",
                port, c.local_port
            );
            return;
        }
        if let Some(at) = c.mismatch_at {
            println!("ERR vsock-connect mismatch port={} offset={}", port, at);
            return;
        }
        if c.received != c.total {
            println!(
                "ERR vsock-connect short port={} received={} expected={} reset={}",
                port, c.received, c.total, c.reset_by_peer
            );
            return;
        }
        bytes += c.received;
    }
    println!(
        "OK vsock-connect port={} conns={} bytes={} result=match",
        port, count, bytes
    );
}
